package sim

import (
	"fmt"
	"html"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// The charts are plain SVG text: no dependency, and the same report gives
// the same bytes.

var palette = []string{"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"}

const (
	chartW, chartH = 960, 480
	padL, padR     = 70, 170
	padT, padB     = 40, 50
)

// WriteSVGs writes nodes.svg (tunnels per node over time), moves.svg
// (moves per event against the ideal) and, when the report has a
// comparison, compare.svg, into dir. It returns the files written.
func WriteSVGs(r *Report, dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("write charts: %w", err)
	}
	charts := []struct {
		name string
		fn   func(io.Writer, *Report)
	}{{"nodes.svg", nodesChart}, {"moves.svg", movesChart}}
	if r.Compare != nil {
		charts = append(charts, struct {
			name string
			fn   func(io.Writer, *Report)
		}{"compare.svg", compareChart})
	}
	var out []string
	for _, c := range charts {
		var b strings.Builder
		c.fn(&b, r)
		path := filepath.Join(dir, c.name)
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			return out, fmt.Errorf("write chart %s: %w", path, err)
		}
		out = append(out, path)
	}
	return out, nil
}

func svgStart(w io.Writer, title string) {
	fmt.Fprintf(w, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", chartW, chartH, chartW, chartH)
	fmt.Fprintf(w, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(w, `<text x="%d" y="24" font-size="16">%s</text>`+"\n", padL, html.EscapeString(title))
}

// axes draws the frame and ymax's ticks; it returns the plot's size.
func axes(w io.Writer, ymax float64, xlabel, ylabel string) (pw, ph float64) {
	pw, ph = float64(chartW-padL-padR), float64(chartH-padT-padB)
	fmt.Fprintf(w, `<rect x="%d" y="%d" width="%.0f" height="%.0f" fill="none" stroke="#444"/>`+"\n", padL, padT, pw, ph)
	for i := 0; i <= 4; i++ {
		y := float64(padT) + ph - ph*float64(i)/4
		fmt.Fprintf(w, `<line x1="%d" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", padL, y, float64(padL)+pw, y)
		fmt.Fprintf(w, `<text x="%d" y="%.1f" text-anchor="end">%.0f</text>`+"\n", padL-6, y+4, ymax*float64(i)/4)
	}
	fmt.Fprintf(w, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", float64(padL)+pw/2, chartH-12, html.EscapeString(xlabel))
	fmt.Fprintf(w, `<text x="16" y="%.1f" transform="rotate(-90 16 %.1f)" text-anchor="middle">%s</text>`+"\n", float64(padT)+ph/2, float64(padT)+ph/2, html.EscapeString(ylabel))
	return pw, ph
}

func niceMax(v float64) float64 {
	if v <= 0 {
		return 1
	}
	step := 1.0
	for step*10 < v {
		step *= 10
	}
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if step*m >= v {
			return step * m
		}
	}
	return step * 10
}

func nodesChart(w io.Writer, r *Report) {
	svgStart(w, "Tunnels per node over time")
	s := r.Series
	top := 0
	for _, n := range s.Nodes {
		for _, c := range n.Tunnels {
			top = max(top, c)
		}
	}
	ymax := niceMax(float64(top))
	pw, ph := axes(w, ymax, "time (days)", "tunnels")
	xmax := 1.0
	if len(s.AtHours) > 0 {
		xmax = max(s.AtHours[len(s.AtHours)-1], 1)
	}
	for d := 0.0; d <= xmax/24; d += max(1, float64(int(xmax/24/10))) {
		x := float64(padL) + pw*d*24/xmax
		fmt.Fprintf(w, `<text x="%.1f" y="%.1f" text-anchor="middle">%.0f</text>`+"\n", x, float64(padT)+ph+16, d)
	}
	for i, n := range s.Nodes {
		color := palette[i%len(palette)]
		var pts strings.Builder
		for k, c := range n.Tunnels {
			x := float64(padL) + pw*s.AtHours[k]/xmax
			y := float64(padT) + ph - ph*float64(c)/ymax
			fmt.Fprintf(&pts, "%.1f,%.1f ", x, y)
		}
		fmt.Fprintf(w, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`+"\n", color, strings.TrimSpace(pts.String()))
		ly := padT + 14 + i*16
		fmt.Fprintf(w, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"/><text x="%d" y="%d">%s</text>`+"\n",
			chartW-padR+12, ly-4, chartW-padR+32, ly-4, color, chartW-padR+38, ly, html.EscapeString(n.Node))
	}
	fmt.Fprintln(w, "</svg>")
}

// bars draws groups of bars, one group per label, one bar per series.
func bars(w io.Writer, title string, labels []string, series []string, values [][]int) {
	svgStart(w, title)
	top := 0
	for _, g := range values {
		for _, v := range g {
			top = max(top, v)
		}
	}
	ymax := niceMax(float64(top))
	pw, ph := axes(w, ymax, "event", "tunnels moved")
	if len(labels) == 0 {
		fmt.Fprintln(w, "</svg>")
		return
	}
	gw := pw / float64(len(labels))
	bw := gw * 0.8 / float64(max(1, len(series)))
	for gi, g := range values {
		x0 := float64(padL) + gw*float64(gi) + gw*0.1
		for si, v := range g {
			h := ph * float64(v) / ymax
			fmt.Fprintf(w, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s: %d</title></rect>`+"\n",
				x0+bw*float64(si), float64(padT)+ph-h, bw, h, palette[si%len(palette)], html.EscapeString(series[si]), v)
		}
		fmt.Fprintf(w, `<text x="%.1f" y="%.1f" text-anchor="middle" font-size="10">%s</text>`+"\n", x0+gw*0.4, float64(padT)+ph+14, html.EscapeString(labels[gi]))
	}
	for si, name := range series {
		ly := padT + 14 + si*16
		fmt.Fprintf(w, `<rect x="%d" y="%d" width="16" height="10" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n",
			chartW-padR+12, ly-9, palette[si%len(palette)], chartW-padR+34, ly, html.EscapeString(name))
	}
	fmt.Fprintln(w, "</svg>")
}

func eventLabel(kind, node string) string {
	if node != "" {
		return kind + " " + node
	}
	return kind
}

func movesChart(w io.Writer, r *Report) {
	var labels []string
	var values [][]int
	for _, e := range r.Events {
		labels = append(labels, eventLabel(e.Kind, e.Node))
		ideal := e.Moves
		if e.Ideal != nil {
			ideal = *e.Ideal
		}
		values = append(values, []int{e.Moves, ideal})
	}
	bars(w, "Tunnels moved per event", labels, []string{"moved", "ideal minimum"}, values)
}

func compareChart(w io.Writer, r *Report) {
	var labels, series []string
	var values [][]int
	for _, s := range r.Compare.Strategies {
		series = append(series, s.Name)
	}
	for _, e := range r.Compare.Events {
		switch e.Kind {
		case EvNodeDown, EvNodeUp, EvNodeAdd, EvNodeRemove, EvNodeDrain, EvNodeDies, EvNodeRevives:
			labels = append(labels, eventLabel(e.Kind, e.Node))
			values = append(values, e.Moves)
		}
	}
	bars(w, "Moves per node event by strategy", labels, series, values)
}

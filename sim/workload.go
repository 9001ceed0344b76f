package sim

import (
	"bufio"
	"cmp"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Step kinds besides the Event kinds.
const (
	StepTunnelUp   = "tunnel-up"
	StepTunnelDown = "tunnel-down"
	// StepEnd marks the end of the run, so a replay runs as long.
	StepEnd = "end"
)

// Step is one timestamped input of a run: a tunnel coming up or going
// down, or a timed event. A workload is a list of steps sorted by time;
// the trace file is its CSV form, so a generated run and its replay see
// the same steps in the same order.
type Step struct {
	At   time.Duration
	Kind string
	// Tunnel is the tunnel coming up (ID, Peer, Subnets; Node and Pinned
	// when the NMS pinned it). For tunnel-down only ID is set.
	Tunnel affinity.Tunnel
	// Unknown marks a tunnel-up whose peer the NMS never announced: the
	// kernel steers it until the director learns it from its first packet.
	Unknown bool
	// Event is the timed event for the other kinds.
	Event Event
}

// Workload builds the steps of a scenario: node-add steps at 0 for the
// initial farm, tunnel-up steps at 0 for the initial tunnels, Poisson
// arrivals and their departures, and the scenario's events, all from the
// seed.
func Workload(s *Scenario) ([]Step, error) {
	r := rand.New(rand.NewPCG(s.Seed, 0x51a1))
	var arrivals []time.Duration
	var mean time.Duration
	switch s.Churn.Lifetime {
	case "exponential":
		mean = s.Churn.Mean
	case "lognormal":
		mean = time.Duration(float64(s.Churn.Median) * math.Exp(s.Churn.Sigma*s.Churn.Sigma/2))
	}
	if mean > 0 {
		perHour := s.Churn.ArrivalsPerHour
		if perHour == 0 {
			// Pinned tunnels stay, so only the others need replacing.
			perHour = float64(s.Tunnels.Count) * (1 - s.Tunnels.PinnedShare) / mean.Hours()
		}
		if perHour > 0 {
			for t := 0.0; ; {
				t += r.ExpFloat64() / perHour * float64(time.Hour)
				if t >= float64(s.Duration) {
					break
				}
				arrivals = append(arrivals, roundMs(time.Duration(t)))
			}
		}
	}
	total := s.Tunnels.Count + len(arrivals)
	// A /27 per IPv4 subnet while they fit in 10.0.0.0/7, else a /29.
	bits := 27
	if float64(total)*float64(s.Tunnels.MaxSubnets+1)/2*(1-s.Tunnels.IPv6Share)*1.1 > 1<<20 {
		bits = 29
	}
	farm, err := GenerateFarm(FarmSpec{
		Seed: s.Seed, Nodes: len(s.Nodes), Tunnels: total, MaxSubnets: s.Tunnels.MaxSubnets,
		IPv6Share: s.Tunnels.IPv6Share, PinnedShare: s.Tunnels.PinnedShare, Subnet4Bits: bits,
	})
	if err != nil {
		return nil, fmt.Errorf("workload: %w", err)
	}
	rename := map[string]string{}
	for i, n := range farm.Nodes {
		rename[n.Name] = s.Nodes[i].Name
	}
	life := func() time.Duration {
		switch s.Churn.Lifetime {
		case "exponential":
			return time.Duration(r.ExpFloat64() * float64(s.Churn.Mean))
		case "lognormal":
			return time.Duration(float64(s.Churn.Median) * math.Exp(s.Churn.Sigma*r.NormFloat64()))
		}
		return -1
	}
	// The tunnels up at the start have been up a while: their remaining
	// life follows the equilibrium residual distribution (a length-biased
	// lifetime times a uniform share), or the population would sag while
	// arrivals catch up. A length-biased lognormal is lognormal with mu
	// raised by sigma squared; the exponential is memoryless.
	residual := func() time.Duration {
		switch s.Churn.Lifetime {
		case "lognormal":
			sg := s.Churn.Sigma
			return time.Duration(r.Float64() * float64(s.Churn.Median) * math.Exp(sg*sg+sg*r.NormFloat64()))
		}
		return life()
	}
	// Which arrivals are unknown peers: a stream of its own, so the share
	// changes nothing else of the workload.
	ru := rand.New(rand.NewPCG(s.Seed, 0x756e6b6e))
	steps := make([]Step, 0, len(s.Nodes)+2*total+len(s.Events))
	for _, n := range s.Nodes {
		steps = append(steps, Step{Kind: EvNodeAdd, Event: Event{Kind: EvNodeAdd, Node: n.Name, Weight: n.Weight, Capacity: n.Capacity}})
	}
	for i := range farm.Tunnels {
		tu := farm.Tunnels[i]
		start := time.Duration(0)
		if i >= s.Tunnels.Count {
			start = arrivals[i-s.Tunnels.Count]
			// Only the initial population is pre-provisioned; arrivals
			// are learned by the director.
			tu.Node, tu.Pinned = "", false
		} else if tu.Pinned {
			tu.Node = rename[tu.Node]
		}
		unknown := i >= s.Tunnels.Count && s.Unknown.Share > 0 && ru.Float64() < s.Unknown.Share
		steps = append(steps, Step{At: start, Kind: StepTunnelUp, Tunnel: tu, Unknown: unknown})
		// NMS-pinned sites are permanent; the rest come and go.
		if tu.Pinned {
			continue
		}
		l := life()
		if i < s.Tunnels.Count {
			l = residual()
		}
		if l >= 0 {
			if end := roundMs(start + l); end > start && end < s.Duration {
				steps = append(steps, Step{At: end, Kind: StepTunnelDown, Tunnel: affinity.Tunnel{ID: tu.ID}})
			}
		}
	}
	for _, e := range s.Events {
		steps = append(steps, Step{At: e.At, Kind: e.Kind, Event: e})
	}
	SortSteps(steps)
	steps = append(steps, Step{At: s.Duration, Kind: StepEnd})
	return steps, nil
}

// runEnd is when a run of the steps ends: at the end step if there is
// one (a trace written by a run), else at the later of the duration and
// the last step.
func runEnd(steps []Step, d time.Duration) time.Duration {
	for i := len(steps) - 1; i >= 0; i-- {
		if steps[i].Kind == StepEnd {
			return steps[i].At
		}
	}
	if n := len(steps); n > 0 {
		return max(d, steps[n-1].At)
	}
	return d
}

func roundMs(d time.Duration) time.Duration { return d.Round(time.Millisecond) }

// SortSteps orders steps by time, keeping the given order among equal
// times (the order a trace file lists them in).
func SortSteps(steps []Step) {
	slices.SortStableFunc(steps, func(a, b Step) int { return cmp.Compare(a.At, b.At) })
}

// traceHeader is the CSV header of a trace file.
var traceHeader = []string{"at", "kind", "tunnel", "peer", "subnets", "node", "pinned", "weight", "capacity", "budget", "mode", "loss", "unknown"}

// WriteTrace writes steps as a trace CSV: one line per step, "at" in
// seconds with millisecond precision, subnets separated by spaces.
func WriteTrace(w io.Writer, steps []Step) error {
	bw := bufio.NewWriter(w)
	cw := csv.NewWriter(bw)
	if err := cw.Write(traceHeader); err != nil {
		return fmt.Errorf("write trace: %w", err)
	}
	rec := make([]string, len(traceHeader))
	var sb strings.Builder
	for _, st := range steps {
		clear(rec)
		rec[0] = formatSeconds(st.At)
		rec[1] = st.Kind
		switch st.Kind {
		case StepTunnelUp:
			rec[2] = st.Tunnel.ID
			rec[3] = st.Tunnel.Peer.String()
			sb.Reset()
			for i, p := range st.Tunnel.Subnets {
				if i > 0 {
					sb.WriteByte(' ')
				}
				sb.WriteString(p.String())
			}
			rec[4] = sb.String()
			rec[5] = st.Tunnel.Node
			if st.Tunnel.Pinned {
				rec[6] = "true"
			}
			if st.Unknown {
				rec[12] = "true"
			}
		case StepTunnelDown:
			rec[2] = st.Tunnel.ID
		case StepEnd:
		default:
			e := st.Event
			rec[5] = e.Node
			if e.Weight != 0 {
				rec[7] = strconv.FormatUint(uint64(e.Weight), 10)
			}
			if e.Capacity != 0 {
				rec[8] = strconv.Itoa(e.Capacity)
			}
			if e.Budget != 0 {
				rec[9] = strconv.Itoa(e.Budget)
			}
			rec[10] = e.Mode
			if e.Kind == EvLinkLoss {
				rec[11] = strconv.FormatFloat(e.Loss, 'g', -1, 64)
			}
		}
		if err := cw.Write(rec); err != nil {
			return fmt.Errorf("write trace: %w", err)
		}
	}
	cw.Flush()
	if err := cw.Error(); err != nil {
		return fmt.Errorf("write trace: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write trace: %w", err)
	}
	return nil
}

func formatSeconds(d time.Duration) string {
	ms := d.Milliseconds()
	return fmt.Sprintf("%d.%03d", ms/1000, ms%1000)
}

// parseSeconds reads "at": seconds with up to millisecond decimals, or a
// duration ("36h", "1d2h").
func parseSeconds(s string) (time.Duration, error) {
	if f, err := strconv.ParseFloat(s, 64); err == nil {
		if f < 0 || math.IsNaN(f) || f > 1e10 {
			return 0, fmt.Errorf("%q: out of range", s)
		}
		return roundMs(time.Duration(f * float64(time.Second))), nil
	}
	d, err := ParseDuration(s)
	if err != nil {
		return 0, err
	}
	return roundMs(d), nil
}

// ReadTrace reads a trace CSV (as WriteTrace writes it; columns may come
// in any order, unknown columns are refused). Every bad record is reported,
// by line and column, up to 50.
func ReadTrace(name string, r io.Reader) ([]Step, error) {
	cr := csv.NewReader(bufio.NewReader(r))
	cr.FieldsPerRecord = -1
	cr.ReuseRecord = true
	head, err := cr.Read()
	if err != nil {
		return nil, fmt.Errorf("read trace %s: header: %w", name, err)
	}
	col := map[string]int{}
	var errs []error
	for i, h := range head {
		h = strings.TrimSpace(h)
		if !slices.Contains(traceHeader, h) {
			errs = append(errs, fmt.Errorf("%s:1: unknown column %q (known: %s)", name, h, strings.Join(traceHeader, ", ")))
		}
		col[h] = i
	}
	for _, must := range []string{"at", "kind"} {
		if _, ok := col[must]; !ok {
			errs = append(errs, fmt.Errorf("%s:1: missing column %q", name, must))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	var steps []Step
	for {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		line, _ := cr.FieldPos(0)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s:%d: %w", name, line, err))
			break
		}
		get := func(c string) string {
			if i, ok := col[c]; ok && i < len(rec) {
				return strings.TrimSpace(rec[i])
			}
			return ""
		}
		bad := func(c, format string, args ...any) {
			errs = append(errs, fmt.Errorf("%s:%d: %s: %s", name, line, c, fmt.Sprintf(format, args...)))
		}
		var st Step
		if st.At, err = parseSeconds(get("at")); err != nil {
			bad("at", "%v", err)
		}
		st.Kind = get("kind")
		switch st.Kind {
		case StepTunnelUp:
			st.Tunnel.ID = get("tunnel")
			if err := affinity.ValidateID("tunnel id", st.Tunnel.ID); err != nil {
				bad("tunnel", "%v", err)
			}
			if st.Tunnel.Peer, err = netip.ParseAddr(get("peer")); err != nil {
				bad("peer", "%q: not an address", get("peer"))
			}
			for _, f := range strings.Fields(get("subnets")) {
				p, err := netip.ParsePrefix(f)
				if err != nil {
					bad("subnets", "%q: not a prefix", f)
					continue
				}
				st.Tunnel.Subnets = append(st.Tunnel.Subnets, p)
			}
			st.Tunnel.Node = get("node")
			for _, f := range []struct {
				col string
				dst *bool
			}{{"pinned", &st.Tunnel.Pinned}, {"unknown", &st.Unknown}} {
				switch get(f.col) {
				case "", "false":
				case "true":
					*f.dst = true
				default:
					bad(f.col, "%q: want true or false", get(f.col))
				}
			}
			if st.Unknown && (st.Tunnel.Pinned || st.Tunnel.Node != "") {
				bad("unknown", "an unknown peer has no node and is not pinned")
			}
		case StepTunnelDown:
			st.Tunnel.ID = get("tunnel")
			if st.Tunnel.ID == "" {
				bad("tunnel", "missing")
			}
		case StepEnd:
		default:
			if !slices.Contains(eventKinds, st.Kind) {
				bad("kind", "%q: want tunnel-up, tunnel-down or one of %s", st.Kind, strings.Join(eventKinds, ", "))
				break
			}
			e := Event{At: st.At, Kind: st.Kind, Node: get("node"), Mode: get("mode")}
			num := func(c string, dst *int) {
				if v := get(c); v != "" {
					if *dst, err = strconv.Atoi(v); err != nil {
						bad(c, "%q: not an integer", v)
					}
				}
			}
			var w int
			num("weight", &w)
			e.Weight = uint32(max(0, min(w, 10000)))
			num("capacity", &e.Capacity)
			num("budget", &e.Budget)
			if v := get("loss"); v != "" {
				if e.Loss, err = strconv.ParseFloat(v, 64); err != nil {
					bad("loss", "%q: not a number", v)
				}
			}
			st.Event = e
		}
		steps = append(steps, st)
		if len(errs) >= 50 {
			break
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	SortSteps(steps)
	return steps, nil
}

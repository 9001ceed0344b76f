package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// metricsAddr is where each lab director serves metrics: its own
// namespace's loopback.
var metricsAddr = netip.MustParseAddrPort("127.0.0.1:9410")

// scrape fetches /metrics of the daemon in h's namespace and returns the
// text and the parsed families.
func scrape(t *testing.T, h *netlab.Host) (string, map[string]*dto.MetricFamily) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return h.DialTCP(ctx, netip.Addr{}, metricsAddr)
		},
	}}
	resp, err := c.Get("http://" + metricsAddr.String() + "/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", h.Name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s %v\n%s", h.Name, resp.Status, err, b)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("parse the metrics of %s: %v\n%s", h.Name, err, b)
	}
	return string(b), fams
}

// value returns the value of the family's series with exactly these
// labels (name=value pairs); it fails the test when there is none.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	f, ok := fams[name]
	if !ok {
		t.Fatalf("no family %s", name)
	}
next:
	for _, m := range f.Metric {
		if len(m.Label) != len(labels)/2 {
			continue
		}
		for i := 0; i < len(labels); i += 2 {
			found := false
			for _, l := range m.Label {
				if l.GetName() == labels[i] && l.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch f.GetType() {
		case dto.MetricType_COUNTER:
			return m.Counter.GetValue()
		case dto.MetricType_GAUGE:
			return m.Gauge.GetValue()
		case dto.MetricType_HISTOGRAM:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	t.Fatalf("family %s has no series %v", name, labels)
	return 0
}

// TestMetricsOfARealPair runs a replicated pair of real daemons with
// metrics.listen set, changes the table through the master (an import, a
// refused import, a node down), scrapes both endpoints and checks names,
// types and values against what the daemons report through their API;
// promtool check metrics accepts the output.
func TestMetricsOfARealPair(t *testing.T) {
	netlab.RequireRoot(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 2, Nodes: 3, VIPOnDirectors: true})
	dir := t.TempDir()
	// Unknown-peer buckets balance once a day: after the first
	// assignment only a node down moves buckets (at once), so the
	// revision holds still for the scrape.
	ds := startPairWith(t, top, dir, pairOptions{extra: fmt.Sprintf("metrics: {listen: %q}\nunknown_peers: {interval: 24h}\n", metricsAddr.String())}, "master", "backup")
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if cond() {
				return
			}
		}
		t.Fatalf("timed out waiting for %s", what)
	}
	for _, d := range ds {
		waitFor("daemon API", func() bool { _, err := apiStatus(d.socket); return err == nil })
	}

	const n = 40
	var b strings.Builder
	b.WriteString("id,peer,subnets\n")
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "m-%02d,100.64.0.%d,10.80.%d.0/24\n", i, i+1, i)
	}
	f := filepath.Join(dir, "tunnels.csv")
	os.WriteFile(f, []byte(b.String()), 0o600)
	if out, err := ds[0].cli(t, "import", f); err != nil {
		t.Fatalf("import: %v %s", err, out)
	}
	bad := filepath.Join(dir, "bad.csv")
	os.WriteFile(bad, []byte("id,peer,subnets\nx,100.64.9.1,10.0.0.1/24\n"), 0o600)
	if _, err := ds[0].cli(t, "import", bad); err == nil {
		t.Fatal("an import with host bits set was accepted")
	}
	out, err := ds[0].cli(t, "--json", "node", "down", "node0")
	if err != nil {
		t.Fatalf("node down: %v %s", err, out)
	}
	var nr director.NodeResult
	if err := json.Unmarshal([]byte(out), &nr); err != nil || nr.Plan == nil || len(nr.Plan.Moves) == 0 {
		t.Fatalf("node down moved nothing: %v %s", err, out)
	}
	moved := float64(len(nr.Plan.Moves))
	// The master gives node0's buckets to the others right after the
	// node down, one more revision.
	waitFor("node0's unknown-peer buckets moved", func() bool {
		b := ds[0].status(t).UnknownPeers
		return b != nil && b.Buckets == 4096 && b.Nodes["node0"] == 0
	})
	rev := ds[0].status(t).Revision
	waitFor("both kernels at the master's revision", func() bool {
		for _, d := range ds {
			if s := d.status(t); s.Revision != rev || s.KernelRevision != rev {
				return false
			}
		}
		return true
	})
	out, err = ds[0].cli(t, "--json", "show", "nodes")
	if err != nil {
		t.Fatal(err)
	}
	var nodes []director.NodeInfo
	if err := json.Unmarshal([]byte(out), &nodes); err != nil {
		t.Fatal(err)
	}

	for i, d := range ds {
		text, fams := scrape(t, d.host)
		role := map[int]string{0: "master", 1: "backup"}[i]
		// Types follow the conventions: _total is a counter, the
		// reconcile durations a histogram, the rest gauges (the pair's lag
		// and the last conntrack commit's duration too).
		for name, f := range fams {
			if !strings.HasPrefix(name, "tunneldirector_") {
				continue
			}
			want := dto.MetricType_GAUGE
			switch {
			case strings.HasSuffix(name, "_total"):
				want = dto.MetricType_COUNTER
			case strings.HasSuffix(name, "_seconds") && !strings.HasPrefix(name, "tunneldirector_pair_") && !strings.HasPrefix(name, "tunneldirector_conntrack_"):
				want = dto.MetricType_HISTOGRAM
			}
			if f.GetType() != want {
				t.Errorf("%s: %s is a %s, want %s", role, name, f.GetType(), want)
			}
		}
		for _, nd := range nodes {
			if got := value(t, fams, "tunneldirector_table_tunnels", "node", nd.Name, "source", "nms"); got != float64(nd.Tunnels) {
				t.Errorf("%s: tunnels of %s: metric %v, API %d", role, nd.Name, got, nd.Tunnels)
			}
			if got := value(t, fams, "tunneldirector_table_tunnels", "node", nd.Name, "source", "learned"); got != 0 {
				t.Errorf("%s: learned tunnels of %s: %v", role, nd.Name, got)
			}
		}
		checks := []struct {
			name   string
			labels []string
			want   float64
		}{
			{"tunneldirector_table_nodes", []string{"state", "down"}, 1},
			{"tunneldirector_table_nodes", []string{"state", "active"}, 2},
			{"tunneldirector_table_revision", nil, float64(rev)},
			{"tunneldirector_table_unknown_peer_buckets", []string{"node", "node0"}, 0},
			{"tunneldirector_table_moves_total", []string{"reason", "node_down"}, moved},
			{"tunneldirector_dataplane_kernel_revision", nil, float64(rev)},
			{"tunneldirector_dataplane_kernel_elements", []string{"map", "peers"}, n},
			{"tunneldirector_dataplane_kernel_elements", []string{"map", "subnets"}, n},
			{"tunneldirector_dataplane_kernel_elements", []string{"map", "nodes"}, 3},
			{"tunneldirector_dataplane_kernel_problems", nil, 0},
			{"tunneldirector_dataplane_mode", []string{"mode", "route-only"}, 1},
			{"tunneldirector_dataplane_mode", []string{"mode", "ipvs"}, 0},
			{"tunneldirector_pair_role", []string{"role", role}, 1},
			{"tunneldirector_pair_peer_reachable", nil, 1},
			{"tunneldirector_pair_auth_failures_total", nil, 0},
			{"tunneldirector_conntrack_cache_max_flows", nil, 2_000_000},
			{"tunneldirector_conntrack_malformed_total", []string{"kind", "records"}, 0},
		}
		if i == 0 {
			checks = append(checks,
				struct {
					name   string
					labels []string
					want   float64
				}{"tunneldirector_table_imports_total", []string{"kind", "tunnels", "result", "committed"}, 1},
				struct {
					name   string
					labels []string
					want   float64
				}{"tunneldirector_table_imports_total", []string{"kind", "tunnels", "result", "refused"}, 1})
		}
		for _, c := range checks {
			if got := value(t, fams, c.name, c.labels...); got != c.want {
				t.Errorf("%s: %s%v = %v, want %v", role, c.name, c.labels, got, c.want)
			}
		}
		if got := value(t, fams, "tunneldirector_table_unknown_peer_buckets", "node", "node1") +
			value(t, fams, "tunneldirector_table_unknown_peer_buckets", "node", "node2"); got != 4096 {
			t.Errorf("%s: unknown-peer buckets of node1 and node2: %v, want all 4096", role, got)
		}
		for _, c := range []struct {
			name   string
			labels []string
		}{
			{"tunneldirector_dataplane_reconcile_duration_seconds", []string{"kind", "full"}},
			{"tunneldirector_dataplane_reconciles_total", []string{"kind", "full", "result", "ok"}},
			{"tunneldirector_pair_datagrams_sent_total", nil},
			{"tunneldirector_pair_datagrams_received_total", nil},
			{"go_goroutines", nil},
			{"process_resident_memory_bytes", nil},
		} {
			if got := value(t, fams, c.name, c.labels...); got <= 0 {
				t.Errorf("%s: %s%v = %v, want > 0", role, c.name, c.labels, got)
			}
		}
		if i == 0 {
			examplesUseRealNames(t, fams)
		}
		promtoolCheck(t, role, text)
	}

	// A change through the daemon says when the kernel holds it.
	out, err = ds[0].cli(t, "node", "up", "node0")
	if err != nil || !strings.Contains(out, fmt.Sprintf("kernel: revision %d in place", rev+1)) {
		t.Errorf("node up through the daemon: %v\n%s", err, out)
	}
}

// promtoolCheck runs `promtool check metrics` over a scrape of the
// director called role.
func promtoolCheck(t *testing.T, role, text string) {
	t.Helper()
	promtool, err := exec.LookPath("promtool")
	netlab.Require(t, "promtool (Debian package prometheus; scripts/lab-deps.sh installs it)", err)
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("%s: promtool check metrics: %v\n%s", role, err, out)
	}
}

// examplesUseRealNames checks that every family the example dashboard and
// alerting rules name is one the daemon exports (the health and agent
// families come with their code), and that promtool accepts the
// rules.
func examplesUseRealNames(t *testing.T, fams map[string]*dto.MetricFamily) {
	t.Helper()
	name := regexp.MustCompile(`tunneldirector_[a-z_]+`)
	for _, f := range []string{"../../examples/prometheus/alerts.yml", "../../examples/grafana/tunneldirector.json"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		seen := 0
		for _, n := range name.FindAllString(string(b), -1) {
			if strings.HasPrefix(n, "tunneldirector_agent_") || strings.HasPrefix(n, "tunneldirector_health_") {
				continue
			}
			base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(n, "_bucket"), "_sum"), "_count")
			if _, ok := fams[base]; !ok {
				t.Errorf("%s names %s, which the daemon does not export", f, n)
			}
			seen++
		}
		if seen == 0 {
			t.Errorf("%s names no family", f)
		}
	}
	promtool, err := exec.LookPath("promtool")
	netlab.Require(t, "promtool (Debian package prometheus; scripts/lab-deps.sh installs it)", err)
	if out, err := exec.Command(promtool, "check", "rules", "../../examples/prometheus/alerts.yml").CombinedOutput(); err != nil {
		t.Errorf("promtool check rules: %v\n%s", err, out)
	}
}

package director

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/agents"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/ipvs/ipvstest"
	"github.com/tunneldirector/tunneldirector/store"
	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

const (
	operatorToken = "operator-token-0123456789"
	tokenA        = "vpn-a-token-0123456789abcdef"
	tokenB        = "vpn-b-token-0123456789abcdef"
	tokenGone     = "gone-token-0123456789abcdef0"
)

// agentDaemon is a daemon with agent reports on, its API on an httptest
// server (the TCP handler, with the operator token), and a recording
// dataplane.
type agentDaemon struct {
	d    *Daemon
	k    *ipvstest.Fake
	st   *store.Store
	srv  *httptest.Server
	hb   *heartbeats
	seqs map[string]uint64
}

type heartbeats struct {
	mu sync.Mutex
	n  map[string]int
}

func (h *heartbeats) Heartbeat(node string) {
	h.mu.Lock()
	h.n[node]++
	h.mu.Unlock()
}

func (h *heartbeats) count(node string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n[node]
}

func writeTokens(t *testing.T, byNode map[string]string) string {
	dir := filepath.Join(t.TempDir(), "agents")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for n, tok := range byNode {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func newAgentDaemon(t *testing.T, mut func(*Config), repl func(*store.Store) *replication.Replicator) *agentDaemon {
	t.Helper()
	st, c := testStore(t, 2)
	cfg := *c
	cfg.Agents.TokenDir = writeTokens(t, map[string]string{"vpn-a": tokenA, "vpn-b": tokenB, "gone": tokenGone})
	cfg.Agents.MergeDelay = 10 * time.Millisecond
	cfg.Agents.MaxReportBytes = 1 << 20
	if mut != nil {
		mut(&cfg)
	}
	var r *replication.Replicator
	if repl != nil {
		r = repl(st)
	}
	a := &agentDaemon{k: ipvstest.NewFake(ipvs.ModeRouteOnly), st: st, hb: &heartbeats{n: map[string]int{}}, seqs: map[string]uint64{}}
	var err error
	a.d, err = NewDaemon(DaemonOptions{Config: &cfg, Store: st, Dataplane: a.k, Logger: slog.New(slog.DiscardHandler), Replicator: r})
	if err != nil {
		t.Fatal(err)
	}
	a.d.SetAgentHeartbeats(a.hb)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.d.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	a.srv = httptest.NewServer(a.d.Handler(operatorToken))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *agentDaemon) request(t *testing.T, method, path, token string, body []byte) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, a.srv.URL+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func fullReport(t *testing.T, node string, ts ...xfrm.Tunnel) []byte {
	t.Helper()
	r := &report.Report{Version: report.Version, Kind: report.KindFull, Node: node, Session: strings.Repeat("ab", 16), Seq: 1, Sent: time.Now(), Tunnels: ts}
	for _, tu := range ts {
		r.Summary.SAs += tu.SAs
	}
	r.Summary.Tunnels = len(ts)
	b, err := report.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func heartbeatReport(t *testing.T, node string, seq uint64) []byte {
	r := &report.Report{Version: report.Version, Kind: report.KindHeartbeat, Node: node, Session: strings.Repeat("ab", 16), Seq: seq, Sent: time.Now()}
	b, err := report.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func espFacts(peer string, subnets ...string) xfrm.Tunnel {
	tu := xfrm.Tunnel{Peer: netip.MustParseAddr(peer), SAs: 2, Subnets: []netip.Prefix{},
		SPIs: []xfrm.SPI{{SPI: 0xc0000001, Reqid: 1, Dir: xfrm.In, Proto: "esp"}, {SPI: 0xc0000002, Reqid: 1, Dir: xfrm.Out, Proto: "esp"}}}
	for _, s := range subnets {
		tu.Subnets = append(tu.Subnets, netip.MustParsePrefix(s))
	}
	return tu
}

// TestAgentEndpointRefusals: every bad report is refused with its status
// and reason, counted by reason; a node token opens no operator request
// and the operator token no node's reports.
func TestAgentEndpointRefusals(t *testing.T) {
	a := newAgentDaemon(t, nil, nil)
	good := fullReport(t, "vpn-a", espFacts("192.0.2.7", "10.7.0.0/24"))
	big := bytes.Repeat([]byte(" "), 2<<20)
	cases := []struct {
		name, method, path, token string
		body                      []byte
		status                    int
		text                      string
	}{
		{"accepted", "POST", report.Path, tokenA, good, 200, `"need_full":false`},
		{"node token on the operator API", "GET", "/v1/status", tokenA, nil, 401, "missing or wrong API token"},
		{"node token on an operator write", "POST", "/v1/nodes/vpn-b/down", tokenA, []byte("{}"), 401, "missing or wrong API token"},
		{"operator token as a node token", "POST", report.Path, operatorToken, good, 401, "missing or unknown node token"},
		{"no token", "POST", report.Path, "", good, 401, "missing or unknown node token"},
		{"another node's report", "POST", report.Path, tokenB, good, 403, `names node \"vpn-a\", its token belongs to \"vpn-b\"`},
		{"node not in the table", "POST", report.Path, tokenGone, fullReport(t, "gone"), 403, "not in the director's table"},
		{"malformed", "POST", report.Path, tokenA, []byte(`{"version":1,"kind":"full","kind":"full"}`), 422, "duplicate"},
		{"invalid subnet", "POST", report.Path, tokenA, bytes.Replace(good, []byte("10.7.0.0/24"), []byte("10.7.0.1/24"), 1), 422, "host bits set"},
		{"oversized", "POST", report.Path, tokenA, big, 413, "too large"},
		{"GET", "GET", report.Path, tokenA, nil, 405, "POST only"},
	}
	for _, c := range cases {
		status, body := a.request(t, c.method, c.path, c.token, c.body)
		if status != c.status || !strings.Contains(body, c.text) {
			t.Errorf("%s: %d %s; want %d and %q", c.name, status, body, c.status, c.text)
		}
	}
	// The operator's API still works with its own token.
	if status, body := a.request(t, "GET", "/v1/status", operatorToken, nil); status != 200 {
		t.Fatalf("operator status: %d %s", status, body)
	}
	s := a.d.Status().Agents
	want := map[string]uint64{"unauthorized": 2, "wrong_node": 1, "unknown_node": 1, "invalid": 2, "too_large": 1, "method": 1}
	for k, v := range want {
		if s.Refused[k] != v {
			t.Errorf("refused[%s] = %d, want %d (all: %v)", k, s.Refused[k], v, s.Refused)
		}
	}
	if s.Reports[report.KindFull] != 1 {
		t.Errorf("reports %v", s.Reports)
	}
	if a.hb.count("vpn-a") != 1 || a.hb.count("vpn-b") != 0 {
		t.Errorf("heartbeats %v: only accepted reports count", a.hb.n)
	}
}

// TestAgentReportReachesTableAndKernel: an unknown peer's SAs on vpn-b are
// learned onto vpn-b with the negotiated subnets, in the table, the store
// and the (recording) kernel; the node's counts show in `show nodes`.
func TestAgentReportReachesTableAndKernel(t *testing.T) {
	a := newAgentDaemon(t, nil, nil)
	if status, body := a.request(t, "POST", report.Path, tokenB, fullReport(t, "vpn-b", espFacts("192.0.2.7", "10.7.0.0/24", "10.7.8.0/24"))); status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	eventually(t, "the learned tunnel in the kernel", func() bool {
		tu, ok := a.st.Table().LookupPeer(netip.MustParseAddr("192.0.2.7"))
		return ok && len(tu.Subnets) == 2 && kernelEquals(a.k, a.st.Table()) && a.d.Status().KernelRevision == a.st.Revision()
	})
	tu, _ := a.st.Table().LookupPeer(netip.MustParseAddr("192.0.2.7"))
	if tu.Node != "vpn-b" || !tu.Learned || tu.ID != "learned-192.0.2.7" {
		t.Fatalf("tunnel %+v", tu)
	}
	n, _ := a.st.Table().Node("vpn-b")
	if got := a.k.State().Subnets[netip.MustParsePrefix("10.7.8.0/24")]; got != n.Mark {
		t.Fatalf("kernel steers 10.7.8.0/24 to mark %d, want vpn-b's %d", got, n.Mark)
	}
	status, body := a.request(t, "GET", "/v1/nodes", operatorToken, nil)
	var nodes NodesResult
	if status != 200 || json.Unmarshal([]byte(body), &nodes) != nil {
		t.Fatalf("%d %s", status, body)
	}
	for _, ni := range nodes.Nodes {
		switch {
		case ni.Name == "vpn-b" && (ni.Agent == nil || ni.Agent.SAs != 2 || ni.Agent.Tunnels != 1):
			t.Fatalf("vpn-b's agent counts: %+v", ni.Agent)
		case ni.Name == "vpn-a" && ni.Agent != nil:
			t.Fatalf("vpn-a never reported but shows %+v", ni.Agent)
		}
	}
	s := a.d.Status().Agents
	if s == nil || s.Nodes != 1 || s.SAs != 2 || s.Learned != 1 {
		t.Fatalf("status %+v", s)
	}
}

// TestAgentMisplacedThroughTheAPI: an NMS tunnel on vpn-a whose SA vpn-b
// reports is listed by /v1/misplaced (show tunnels --misplaced) and, with
// follow-sa, moved once vpn-a's agent has reported no SA for hold.
func TestAgentMisplacedThroughTheAPI(t *testing.T) {
	a := newAgentDaemon(t, func(c *Config) { c.Agents.Adopt = agents.AdoptFollowSA; c.Agents.Hold = time.Second }, nil)
	if _, err := a.st.Commit([]affinity.Change{{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: "site", Peer: netip.MustParseAddr("192.0.2.1"),
		Node: "vpn-a", Subnets: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}}}}); err != nil {
		t.Fatal(err)
	}
	a.request(t, "POST", report.Path, tokenA, fullReport(t, "vpn-a"))
	a.request(t, "POST", report.Path, tokenB, fullReport(t, "vpn-b", espFacts("192.0.2.1", "10.1.0.0/24")))
	a.d.MergeAgents(true)
	status, body := a.request(t, "GET", "/v1/misplaced", operatorToken, nil)
	var res MisplacedResult
	if status != 200 || json.Unmarshal([]byte(body), &res) != nil || len(res.Misplaced) != 1 || res.Misplaced[0].Tunnel != "site" ||
		!slices.Equal(res.Misplaced[0].HeldOn, []string{"vpn-b"}) || !strings.Contains(res.Misplaced[0].Action, "follow-sa to vpn-b") {
		t.Fatalf("misplaced: %d %s", status, body)
	}
	// The owner's agent keeps reporting (heartbeats); after hold the
	// tunnel follows its SA.
	deadline := time.Now().Add(5 * time.Second)
	for {
		a.request(t, "POST", report.Path, tokenA, heartbeatReport(t, "vpn-a", 1))
		a.d.MergeAgents(true)
		if tu, _ := a.st.Table().Tunnel("site"); tu.Node == "vpn-b" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("follow-sa did not move the tunnel")
		}
		time.Sleep(100 * time.Millisecond)
	}
	eventually(t, "the move in the kernel", func() bool { return kernelEquals(a.k, a.st.Table()) })
}

// TestAgentReportsFollowTheMasterRole: the backup refuses reports (409:
// the agent goes to the other director); a director that changes role
// forgets the agents' sessions, so they start over with a full report.
func TestAgentReportsFollowTheMasterRole(t *testing.T) {
	var r *replication.Replicator
	a := newAgentDaemon(t, nil, func(st *store.Store) *replication.Replicator {
		_, ep, _ := replication.NewFakeNetwork(replication.FakeConfig{}, clock.Real())
		var err error
		r, err = replication.New(replication.Config{ID: 1, Key: bytes.Repeat([]byte("k"), 32), Store: st, Transport: ep, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		r.SetRole(replication.RoleMaster)
		return r
	})
	if status, body := a.request(t, "POST", report.Path, tokenA, fullReport(t, "vpn-a")); status != 200 {
		t.Fatalf("master: %d %s", status, body)
	}
	if err := a.d.SetRole(replication.RoleBackup); err != nil {
		t.Fatal(err)
	}
	status, body := a.request(t, "POST", report.Path, tokenA, heartbeatReport(t, "vpn-a", 1))
	if status != 409 || !strings.Contains(body, "not the master") {
		t.Fatalf("backup: %d %s", status, body)
	}
	if err := a.d.SetRole(replication.RoleMaster); err != nil {
		t.Fatal(err)
	}
	status, body = a.request(t, "POST", report.Path, tokenA, heartbeatReport(t, "vpn-a", 1))
	if status != 200 || !strings.Contains(body, `"need_full":true`) {
		t.Fatalf("master again, old session: %d %s", status, body)
	}
	if s := a.d.Status().Agents; s.Refused["not_master"] != 1 {
		t.Fatalf("refusals %v", s.Refused)
	}
}

// TestAgentsOffAnswersClearly: without agents.token_dir the endpoint says
// reports are off (and a node token still opens nothing else).
func TestAgentsOffAnswersClearly(t *testing.T) {
	a := newAgentDaemon(t, func(c *Config) { c.Agents.TokenDir = "" }, nil)
	status, body := a.request(t, "POST", report.Path, tokenA, fullReport(t, "vpn-a"))
	if status != 404 || !strings.Contains(body, "agents.token_dir") {
		t.Fatalf("%d %s", status, body)
	}
	if a.d.Status().Agents != nil {
		t.Fatal("status shows agents while they are off")
	}
}

func TestAgentsConfig(t *testing.T) {
	dir := writeTokens(t, map[string]string{"vpn-a": tokenA})
	tokFile := filepath.Join(t.TempDir(), "api.token")
	os.WriteFile(tokFile, []byte(tokenA), 0o600)
	cases := []struct{ yaml, want string }{
		{fmt.Sprintf("agents: {token_dir: %s}", dir), "agents.token_dir: needs api.tcp"},
		{fmt.Sprintf("api: {tcp: \"127.0.0.1:9400\", token_file: %s}\nagents: {token_dir: %s}", tokFile, dir), "vpn-a's token is the operator API token"},
		{"agents: {adopt: follow}", `agents.adopt (line 2): "follow" (want report or follow-sa)`},
		{"agents: {hold: 10ms, learned_ttl: 0s, merge_delay: 1m, max_report_bytes: 10}", "agents.hold: 10ms is below 1s"},
		{"agents: {subnets: [10.0.0.1/8]}", "agents.subnets[0]"},
		{"agents: {token_dir: /nonexistent}", "agents.token_dir: stat /nonexistent"},
	}
	for _, c := range cases {
		_, err := ParseConfig([]byte("vips: [192.0.2.1]\n" + c.yaml))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v; want %q", c.yaml, err, c.want)
		}
	}
}

// TestAgentMetrics: the agent families read the merge at scrape time:
// accepted reports by kind, refusals by reason (every reason present from
// the start), what the merge did, and per node what its agent reports.
func TestAgentMetrics(t *testing.T) {
	a := newAgentDaemon(t, nil, nil)
	c := newAgentCollector(a.d)
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", err, problems)
	}
	if status, body := a.request(t, "POST", report.Path, tokenB, fullReport(t, "vpn-b", espFacts("192.0.2.7", "10.7.0.0/24"))); status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	if status, _ := a.request(t, "POST", report.Path, tokenA, fullReport(t, "vpn-b")); status != 403 {
		t.Fatalf("vpn-b's report with vpn-a's token: %d", status)
	}
	eventually(t, "the merge counted", func() bool { return a.d.Status().Agents.Learned == 1 })
	const want = `
# HELP tunneldirector_agent_changes_total What the merges did, by kind: learned (a peer no one listed), subnets (a learned tunnel's subnets changed to what its owner negotiated), followed (a misplaced tunnel moved to its SA, adopt: follow-sa), expired (a learned tunnel past learned_ttl).
# TYPE tunneldirector_agent_changes_total counter
tunneldirector_agent_changes_total{kind="expired"} 0
tunneldirector_agent_changes_total{kind="followed"} 0
tunneldirector_agent_changes_total{kind="learned"} 1
tunneldirector_agent_changes_total{kind="subnets"} 0
# HELP tunneldirector_agent_refused_total Agent reports refused, by reason: unauthorized, unknown_node, wrong_node, off, method, not_master, too_large, invalid, error.
# TYPE tunneldirector_agent_refused_total counter
tunneldirector_agent_refused_total{reason="error"} 0
tunneldirector_agent_refused_total{reason="invalid"} 0
tunneldirector_agent_refused_total{reason="method"} 0
tunneldirector_agent_refused_total{reason="not_master"} 0
tunneldirector_agent_refused_total{reason="off"} 0
tunneldirector_agent_refused_total{reason="too_large"} 0
tunneldirector_agent_refused_total{reason="unauthorized"} 0
tunneldirector_agent_refused_total{reason="unknown_node"} 0
tunneldirector_agent_refused_total{reason="wrong_node"} 1
# HELP tunneldirector_agent_reports_total Agent reports accepted by this director as master, by kind: full, delta, heartbeat.
# TYPE tunneldirector_agent_reports_total counter
tunneldirector_agent_reports_total{kind="delta"} 0
tunneldirector_agent_reports_total{kind="full"} 1
tunneldirector_agent_reports_total{kind="heartbeat"} 0
# HELP tunneldirector_agent_sas SAs the node's agent reports (nodes whose agent reports to this director).
# TYPE tunneldirector_agent_sas gauge
tunneldirector_agent_sas{node="vpn-b"} 2
# HELP tunneldirector_agent_tunnels Tunnels (peers with SAs) the node's agent reports.
# TYPE tunneldirector_agent_tunnels gauge
tunneldirector_agent_tunnels{node="vpn-b"} 1
# HELP tunneldirector_agent_unapplied_subnets Negotiated subnets (and learned peers) reported and not applied: a conflict, a VIP, outside agents.subnets, over the limit.
# TYPE tunneldirector_agent_unapplied_subnets gauge
tunneldirector_agent_unapplied_subnets 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "tunneldirector_agent_changes_total", "tunneldirector_agent_refused_total",
		"tunneldirector_agent_reports_total", "tunneldirector_agent_sas", "tunneldirector_agent_tunnels", "tunneldirector_agent_unapplied_subnets"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(c, "tunneldirector_agent_last_report_timestamp_seconds"); n != 1 {
		t.Fatalf("%d last-report series, want vpn-b's only", n)
	}
	// The example alerting rules and dashboard name agent families this
	// collector exports (the e2e metrics test checks the others: without
	// agents reporting, the per-node families have no series there).
	for _, f := range []string{"../examples/prometheus/alerts.yml", "../examples/grafana/tunneldirector.json"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range regexp.MustCompile(`tunneldirector_agent_[a-z_]+`).FindAllString(string(b), -1) {
			if testutil.CollectAndCount(c, n) == 0 {
				t.Errorf("%s names %s, which the agents' collector does not export", f, n)
			}
		}
	}
}

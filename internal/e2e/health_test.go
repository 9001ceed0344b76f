package e2e

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/health"
	"github.com/tunneldirector/tunneldirector/internal/charon"
	"github.com/tunneldirector/tunneldirector/internal/ikeresponder"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// healthConfig turns the health checks on with their defaults (interval
// 1s, timeout 800ms, fall 2, rise 2, flap 3 downs in 10m held 1m, settle
// 3s), watching the director's inside interface. node3 is checked every
// 250 ms so that a node flapping every second goes down and up again.
// The director serves its metrics.
func healthConfig(cfg string) string {
	return strings.Replace(cfg, "health: {enabled: false}\n", `interfaces: {inside: in0}
health:
  nodes:
    node3: {interval: 250ms, timeout: 200ms, delay_before_retry: 100ms}
metrics: {listen: "`+metricsAddr.String()+`"}
`, 1)
}

// waitFor polls cond until it holds or timeout passes.
func (e *e2e) waitFor(what string, timeout time.Duration, cond func() bool) time.Duration {
	e.t.Helper()
	start := time.Now()
	for deadline := start.Add(timeout); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out after %s waiting for %s\n%s", timeout, what, e.cli("status"))
		}
	}
	return time.Since(start)
}

func (e *e2e) healthView(node string) health.NodeView {
	e.t.Helper()
	s := e.status()
	if s.Health == nil {
		e.t.Fatal("status without health")
	}
	v, ok := s.Health.Node(node)
	if !ok {
		e.t.Fatalf("no health view of %s", node)
	}
	return v
}

// owners returns every tunnel's owner, from the CLI.
func (e *e2e) owners() map[string]string {
	e.t.Helper()
	var list []affinity.Tunnel
	if err := json.Unmarshal([]byte(e.cli("--json", "show", "tunnels", "--limit", "0")), &list); err != nil {
		e.t.Fatal(err)
	}
	out := make(map[string]string, len(list))
	for _, tu := range list {
		out[tu.ID] = tu.Node
	}
	return out
}

// responder answers IKE on node i's inside address (the test responder,
// like charon) until the test ends.
func (e *e2e) responder(i int) *ikeresponder.Responder {
	e.t.Helper()
	n := e.top.Nodes[i]
	var r *ikeresponder.Responder
	err := n.Do(func() (err error) {
		r, err = ikeresponder.Listen(netip.AddrPortFrom(n.If(netlab.IfInside).Addr4, 500))
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
	r.Start()
	e.t.Cleanup(func() { r.Close() })
	return r
}

func (e *e2e) daemonLog() string {
	b, _ := os.ReadFile(e.logPath)
	return string(b)
}

// allPassing: every node's last round passed after since.
func (e *e2e) allPassing(since time.Time) bool {
	s := e.status()
	for _, v := range s.Health.Nodes {
		if v.Failing > 0 || v.LastCheck.Before(since) {
			return false
		}
		for _, c := range v.Checks {
			if !c.OK {
				return false
			}
		}
	}
	return len(s.Health.Nodes) > 0
}

// placement is what the health checks may change: every tunnel's owner
// and every node's state (not the revision: the master's unknown-peer
// buckets step in revisions of their own).
type placement struct {
	owners map[string]string
	states map[string]affinity.NodeState
}

func (e *e2e) placement() placement {
	e.t.Helper()
	p := placement{owners: e.owners(), states: map[string]affinity.NodeState{}}
	for _, v := range e.status().Health.Nodes {
		p.states[v.Name] = v.State
	}
	return p
}

// expectPlacement fails the test when a tunnel or a node changed since
// want.
func (e *e2e) expectPlacement(why string, want placement) {
	e.t.Helper()
	got := e.placement()
	if !maps.Equal(got.states, want.states) || !maps.Equal(got.owners, want.owners) {
		e.t.Fatalf("%s: nodes or tunnels changed (node states %v -> %v): health moved tunnels\n%s", why, want.states, got.states, e.cli("status"))
	}
}

// expectNothingMoves waits longer than detection takes (fall x interval
// + timeout, 2.8 s with the defaults) and checks that no node or tunnel
// changed meanwhile.
func (e *e2e) expectNothingMoves(why string, want placement) {
	e.t.Helper()
	time.Sleep(4 * time.Second)
	e.expectPlacement(why, want)
}

// TestHealthMovesDeadNode runs the real daemon in the director namespace
// with the health checks on, against four node namespaces with real IKE
// responders on the host kernel: a test responder on node0 and node3,
// strongSwan's charon on node1 and node2. With real packets it shows:
// node2's charon killed -> within fall x interval node2 is down, its
// tunnels (and only those) moved, and ESP from its peer reaches the new
// owner; charon restarted -> node2 up, nothing moves back; node3
// flapping every second -> held down (across a daemon restart too) until
// the operator's `node up`; the director's inside link cut -> nothing
// moves, status says why; 3 of 4 nodes failing at once -> nothing moves
// (panic), status says why.
func TestHealthMovesDeadNode(t *testing.T) {
	charon.Require(t)
	e := newE2EWith(t, netlab.TopologyOptions{Peers: 2, Directors: 1, Nodes: 4, VIPOnDirectors: true}, healthConfig)
	var goResp [4]*ikeresponder.Responder
	goResp[0], goResp[3] = e.responder(0), e.responder(3)
	charons := map[int]*charon.Daemon{1: charon.Start(t, e.top.Nodes[1].NS, charon.Options{}), 2: charon.Start(t, e.top.Nodes[2].NS, charon.Options{})}

	p0 := e.top.Peers[0].If(netlab.IfOutside)
	var csv strings.Builder
	csv.WriteString("id,peer,subnets,node\n")
	fmt.Fprintf(&csv, "peer0,%s,10.80.0.0/24,node2\n", p0.Addr4)
	for i := range 400 {
		fmt.Fprintf(&csv, "t%03d,100.64.%d.%d,10.%d.%d.0/27,\n", i, i/200, i%200+1, 90+i/8, i%8*32)
	}
	e.start()
	e.importTunnels(csv.String())
	start := time.Now()
	e.waitFor("every node passing its checks", 15*time.Second, func() bool { return e.allPassing(start) })
	if v := e.healthView("node1"); !strings.Contains(v.Checks[0].Detail, "NO_PROPOSAL_CHOSEN") {
		t.Fatalf("charon's answer on node1: %+v", v.Checks)
	}

	// node2's charon dies.
	before := e.owners()
	onNode2 := 0
	for _, n := range before {
		if n == "node2" {
			onNode2++
		}
	}
	charons[2].Kill()
	took := e.waitFor("node2 down by health", 20*time.Second, func() bool {
		v := e.healthView("node2")
		return v.State == affinity.NodeDown && v.Record.Down
	})
	t.Logf("node2's charon killed: down %s later (fall 2 x interval 1s, timeout 800ms), %d tunnels on it", took.Round(time.Millisecond), onNode2)
	e.waitKernel()
	after := e.owners()
	for id, n := range before {
		switch {
		case n == "node2" && (after[id] == "node2" || after[id] == ""):
			t.Fatalf("tunnel %s stayed on node2", id)
		case n != "node2" && after[id] != n:
			t.Fatalf("tunnel %s of %s moved to %s", id, n, after[id])
		}
	}
	owner := after["peer0"]
	var ownerIdx int
	fmt.Sscanf(owner, "node%d", &ownerIdx)
	e.expectAt(ownerIdx, "esp-after-health-down", func(tag string) error {
		return e.top.Peers[0].SendESP(p0.Addr4, e.top.VIP4, 0xbeef, 1, tag)
	})
	if s := e.status(); s.HealthDowns != 1 || s.HealthMoves != onNode2 {
		t.Fatalf("status counts %d downs, %d moves; want 1, %d", s.HealthDowns, s.HealthMoves, onNode2)
	}
	if out := e.cli("show", "nodes"); !strings.Contains(out, "HEALTH") || !strings.Contains(out, "down since") {
		t.Fatalf("show nodes:\n%s", out)
	} else {
		t.Logf("show nodes after node2's charon died:\n%s\n%s", out, e.cli("status"))
	}
	healthMetrics(t, e.top.Directors[0], onNode2)
	logb := e.daemonLog()
	if !strings.Contains(logb, "health: node taken down, its tunnels moved") || !strings.Contains(logb, "node=node2") {
		t.Fatalf("the down is not logged with its reason:\n%s", logb)
	}

	// charon back: node2 up, nothing moves back.
	charons[2].Restart()
	e.waitFor("node2 up again", 20*time.Second, func() bool { return e.healthView("node2").State == affinity.NodeActive })
	if now := e.owners(); !maps.Equal(now, after) {
		t.Fatal("tunnels moved when node2 came back")
	}

	// node3 flaps every second: it goes down and up until the flap
	// damping holds it down (the 4th down within 10 minutes).
	stop := make(chan struct{})
	flapped := make(chan struct{})
	go func() {
		defer close(flapped)
		for silent := true; ; silent = !silent {
			mode := ikeresponder.LikeStrongSwan
			if silent {
				mode = ikeresponder.Silent
			}
			goResp[3].SetMode(mode)
			select {
			case <-stop:
				goResp[3].SetMode(ikeresponder.LikeStrongSwan)
				return
			case <-time.After(time.Second):
			}
		}
	}()
	took = e.waitFor("node3 held down", 60*time.Second, func() bool { return !e.healthView("node3").HeldUntil.IsZero() })
	close(stop)
	<-flapped
	v := e.healthView("node3")
	t.Logf("node3 flapping every second: held down after %s, %d downs, until %s", took.Round(time.Millisecond), len(v.Record.Downs), v.HeldUntil.Format(time.TimeOnly))
	if len(v.Record.Downs) != 4 {
		t.Fatalf("node3 held after %d downs, want 4 (flap.count 3)", len(v.Record.Downs))
	}
	// It answers again, steadily: still held, also after a restart of
	// the daemon (the hold is in the store).
	time.Sleep(2 * time.Second)
	e.stop()
	e.start()
	// A restarted daemon answers before its checks know the nodes.
	e.waitFor("node3 checked again after the restart", 10*time.Second, func() bool {
		s := e.status()
		if s.Health == nil {
			return false
		}
		v, ok := s.Health.Node("node3")
		return ok && v.Rising >= 2
	})
	if v := e.healthView("node3"); v.State != affinity.NodeDown || v.HeldUntil.IsZero() || !strings.HasPrefix(v.Health(), "held down until") {
		t.Fatalf("node3 not held after the restart: %+v", v)
	}
	if out := e.cli("show", "nodes"); !strings.Contains(out, "held down until") {
		t.Fatalf("show nodes:\n%s", out)
	}
	e.cli("node", "up", "node3") // the operator's up clears the hold
	if v := e.healthView("node3"); v.State != affinity.NodeActive || !v.Record.IsZero() {
		t.Fatalf("node3 after the operator's up: %+v", v)
	}

	// The director's inside link goes down: every check fails, nothing
	// moves, status says why.
	start = time.Now()
	e.waitFor("every node passing its checks", 15*time.Second, func() bool { return e.allPassing(start) })
	settled := e.placement()
	dir := e.top.Directors[0]
	link, err := dir.Link(netlab.IfInside)
	if err != nil {
		t.Fatal(err)
	}
	if err := dir.Handle().LinkSetDown(link); err != nil {
		t.Fatal(err)
	}
	e.expectNothingMoves("inside link down", settled)
	if s := e.status(); s.Health.LinkUp || !strings.Contains(s.Health.Panic, "inside link down") {
		t.Fatalf("status with the inside link down: %+v", s.Health)
	}
	if out := e.cli("status"); !strings.Contains(out, "INSIDE LINK DOWN") {
		t.Fatalf("status:\n%s", out)
	}
	if err := dir.Handle().LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	e.waitFor("every node passing after the link came back", 20*time.Second, func() bool { return e.allPassing(start) })
	e.expectPlacement("around the link cut", settled)

	// Three of four nodes fail at once: the director trusts its own view
	// less than that and moves nothing (panic), and says so.
	goResp[0].SetMode(ikeresponder.Silent)
	charons[1].Kill()
	charons[2].Kill()
	e.expectNothingMoves("3 of 4 nodes failing", settled)
	// Failed rounds count only once the settle period after the link
	// came back is over: on a loaded machine the nodes pass again, and
	// fail, inside it. Wait for the panic, then check nothing moved.
	e.waitFor("the health panic", 20*time.Second, func() bool {
		return strings.Contains(e.status().Health.Panic, "3 of 4 nodes failing")
	})
	e.expectPlacement("3 of 4 nodes failing, in panic", settled)
	if out := e.cli("status"); !strings.Contains(out, "health panic") {
		t.Fatalf("status:\n%s", out)
	} else {
		t.Logf("status during the panic:\n%s", out)
	}
	goResp[0].SetMode(ikeresponder.LikeStrongSwan)
	charons[1].Restart()
	charons[2].Restart()
	start = time.Now()
	e.waitFor("the panic over", 20*time.Second, func() bool { return e.allPassing(start) && e.status().Health.Panic == "" })
	e.expectPlacement("around the panic", settled)
	e.stop()
}

// healthMetrics scrapes the director after node2 went down by health and
// checks the health families against it: node2 down, every node in
// exactly one state, the committed down and its moves counted, no panic,
// the link up, a probe's round trip; promtool accepts the output.
func healthMetrics(t *testing.T, dir *netlab.Host, moved int) {
	t.Helper()
	text, fams := scrape(t, dir)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"tunneldirector_health_node_state", []string{"node", "node2", "state", "down"}, 1},
		{"tunneldirector_health_node_state", []string{"node", "node2", "state", "up"}, 0},
		{"tunneldirector_health_transitions_total", []string{"state", "down"}, 1},
		{"tunneldirector_health_transitions_total", []string{"state", "up"}, 0},
		{"tunneldirector_health_moved_tunnels_total", nil, float64(moved)},
		{"tunneldirector_health_panic", nil, 0},
		{"tunneldirector_health_inside_link_up", nil, 1},
	} {
		if got := value(t, fams, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	answered := 0
	for i := range 4 {
		node := fmt.Sprintf("node%d", i)
		sum := 0.0
		for _, st := range []string{"up", "failing", "down", "held", "operator"} {
			sum += value(t, fams, "tunneldirector_health_node_state", "node", node, "state", st)
		}
		if sum != 1 {
			t.Errorf("%s is in %v health states, want exactly one", node, sum)
		}
		if value(t, fams, "tunneldirector_health_probe_latency_seconds", "node", node) > 0 {
			answered++
		}
	}
	if answered == 0 {
		t.Error("no node's IKE probe round trip in tunneldirector_health_probe_latency_seconds")
	}
	if value(t, fams, "tunneldirector_health_rounds_total") < value(t, fams, "tunneldirector_health_failed_rounds_total") ||
		value(t, fams, "tunneldirector_health_failed_rounds_total") < 2 {
		t.Error("tunneldirector_health_rounds_total / failed_rounds_total do not count node2's failed rounds")
	}
	promtoolCheck(t, dir.Name, text)
}

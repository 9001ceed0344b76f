package health

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/charon"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// fakeDaemon is the daemon's side of the integration, as the integrator
// will write it: a table of nodes; Apply commits a decision (state and
// record together) and gives the Monitor the new table; an operator's
// action does the same with Record.AfterOperator.
type fakeDaemon struct {
	mu        sync.Mutex
	mon       *Monitor
	nodes     []Node
	rev       uint64
	decisions chan Decision
}

func (d *fakeDaemon) Apply(dec Decision) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range d.nodes {
		if d.nodes[i].Name == dec.Node {
			d.nodes[i].State, d.nodes[i].Record = dec.State, dec.Record
		}
	}
	d.pushLocked()
	d.decisions <- dec
	return nil
}

func (d *fakeDaemon) operator(name, action string, state affinity.NodeState) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := range d.nodes {
		if d.nodes[i].Name == name {
			d.nodes[i].State = state
			d.nodes[i].Record = d.nodes[i].Record.AfterOperator(action)
		}
	}
	d.pushLocked()
}

func (d *fakeDaemon) pushLocked() {
	d.rev++
	d.mon.SetNodes(d.rev, d.nodes)
}

type scenario struct {
	t     *testing.T
	top   *netlab.Topology
	mon   *Monitor
	d     *fakeDaemon
	nodes []responderNode
	names []string
}

func (s *scenario) decision(within time.Duration) (Decision, bool) {
	select {
	case d := <-s.d.decisions:
		return d, true
	case <-time.After(within):
		return Decision{}, false
	}
}

func (s *scenario) expect(within time.Duration, node string, state affinity.NodeState) Decision {
	s.t.Helper()
	d, ok := s.decision(within)
	if !ok {
		s.t.Fatalf("no decision within %s, want %s %s; status:\n%s", within, node, state, s.status())
	}
	if d.Node != node || d.State != state {
		s.t.Fatalf("decision %s, want %s %s; status:\n%s", d, node, state, s.status())
	}
	return d
}

func (s *scenario) expectNone(during time.Duration, why string) {
	s.t.Helper()
	if d, ok := s.decision(during); ok {
		s.t.Fatalf("%s: decision %s, want none; status:\n%s", why, d, s.status())
	}
}

func (s *scenario) status() string {
	st := s.mon.Status()
	var b strings.Builder
	fmt.Fprintf(&b, "master=%v link=%v panic=%q counters=%+v\n", st.Master, st.LinkUp, st.Panic, st.Counters)
	for _, n := range st.Nodes {
		fmt.Fprintf(&b, "  %s %s: %s\n", n.Name, n.State, n.Health())
	}
	return b.String()
}

// waitAllPassing waits until every node's last round, ended after since,
// passed.
func (s *scenario) waitAllPassing(since time.Time, within time.Duration) {
	s.t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		st := s.mon.Status()
		ok := len(st.Nodes) == len(s.names)
		for _, n := range st.Nodes {
			if n.LastCheck.Before(since) || n.Failing > 0 || len(n.Checks) == 0 || !n.Checks[0].OK {
				ok = false
			}
		}
		if ok {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.t.Fatalf("not all nodes passing after %s:\n%s", within, s.status())
}

func (s *scenario) view(name string) NodeView { return viewOf(s.t, s.mon.Status(), name) }

func scenarioConfig() Config {
	cfg := DefaultConfig()
	// Faster than the defaults, but with room for a starved charon on a
	// loaded 2-core machine (150 ms timeouts were not enough there).
	cfg.Interval = 400 * time.Millisecond
	cfg.Timeout = 300 * time.Millisecond
	cfg.DelayBeforeRetry = 100 * time.Millisecond
	cfg.Flap = Flap{Count: 2, Window: time.Minute, Hold: 30 * time.Second, HoldMax: time.Minute}
	return cfg
}

func testLog(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	}
	return quiet()
}

func newScenario(t *testing.T, withCharon bool) *scenario {
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 1, Nodes: 4})
	dir := top.Directors[0]
	s := &scenario{t: t, top: top, d: &fakeDaemon{decisions: make(chan Decision, 64)}}
	for i, n := range top.Nodes {
		name := fmt.Sprintf("node%d", i)
		addr := n.If(netlab.IfInside).Addr4
		s.names = append(s.names, name)
		s.d.nodes = append(s.d.nodes, Node{Name: name, Addr: addr, State: affinity.NodeActive})
		if withCharon {
			s.nodes = append(s.nodes, charon.Start(t, n.NS, charon.Options{}))
		} else {
			s.nodes = append(s.nodes, newGoResponder(t, n.NS, netip.AddrPortFrom(addr, 500)))
		}
	}
	ns := dir.NsHandle()
	s.mon = newMonitor(Options{
		Config: scenarioConfig(), Sink: s.d, Log: testLog(t),
		Source4: dir.If(netlab.IfInside).Addr4, Interface: netlab.IfInside,
	}, seams{
		dial: dialIn(dir.NS),
		watchLink: func(ctx context.Context, name string, fn func(bool)) error {
			return watchLinkAt(ctx, &ns, name, fn)
		},
	})
	s.d.mon = s.mon
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.mon.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("monitor: %v", err)
		}
	})
	s.d.mu.Lock()
	s.d.pushLocked()
	s.d.mu.Unlock()
	s.mon.SetRole(true)
	return s
}

// TestMonitorInNamespaces runs the Monitor in a director namespace against
// four node namespaces with real IKE responders (strongSwan's charon, and
// the test responder), with real packets on the host kernel:
// a killed responder brings "down" after fall rounds and its restart "up";
// a node flapping every second is held down; with the director's inside
// link cut nothing moves; with 3 of 4 failing at once nothing moves
// (panic) and the status says why.
func TestMonitorInNamespaces(t *testing.T) {
	for _, kind := range []string{"charon", "responder"} {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			s := newScenario(t, kind == "charon")
			cfg := scenarioConfig()
			limit := 5 * time.Second // generous: a wait, not a timing assertion
			s.waitAllPassing(time.Now(), limit)

			// Kill node1's IKE daemon: down after fall rounds.
			t0 := time.Now()
			s.nodes[1].Kill()
			d := s.expect(limit, "node1", affinity.NodeDown)
			t.Logf("%s: node1 down %s after its IKE daemon died (fall %d x interval %s): %s", kind, time.Since(t0).Round(time.Millisecond), cfg.Fall, cfg.Interval, d.Reason)
			if !strings.HasPrefix(d.Reason, "health: ike: ") || !strings.HasSuffix(d.Reason, " 2/2") || !d.Record.Down {
				t.Fatalf("decision %+v", d)
			}
			if h := s.view("node1").Health(); !strings.HasPrefix(h, "down since ") {
				t.Fatalf("health column %q", h)
			}
			// Restart: up after rise rounds.
			s.nodes[1].Restart()
			s.expect(limit, "node1", affinity.NodeActive)
			s.expectNone(3*cfg.Interval, "after node1 came back")

			// node2 flaps (1.5 s dead, 1.5 s alive): the third down
			// within the window is held, and the node stays down while
			// it answers.
			collect := func(d time.Duration) []Decision {
				var out []Decision
				end := time.Now().Add(d)
				for {
					dec, ok := s.decision(time.Until(end))
					if !ok {
						return out
					}
					out = append(out, dec)
				}
			}
			var held Decision
			deadline := time.Now().Add(30 * time.Second)
			downs, last := 0, affinity.NodeActive
			handle := func(ds []Decision) {
				for _, d := range ds {
					// On a loaded machine a decision may come in the
					// next phase; it must still be node2's, alternating.
					if d.Node != "node2" || d.State == last {
						t.Fatalf("flapping node2: decision %s after %s", d, last)
					}
					last = d.State
					if d.State == affinity.NodeDown {
						downs++
						if !d.Record.HoldUntil.IsZero() {
							held = d
						}
					}
				}
			}
			for held.Node == "" && time.Now().Before(deadline) {
				s.nodes[2].Kill()
				handle(collect(1500 * time.Millisecond))
				s.nodes[2].Restart()
				if held.Node == "" {
					handle(collect(1500 * time.Millisecond))
				}
			}
			if held.Node == "" || downs != cfg.Flap.Count+1 {
				t.Fatalf("flapping node2: %d downs, held %+v; status:\n%s", downs, held, s.status())
			}
			t.Logf("%s: node2 held down after %d downs until %s", kind, downs, held.Record.HoldUntil.Format(time.TimeOnly))
			// It answers again (rise passing rounds in a row: it would
			// come up) but stays down.
			for wait := time.Now().Add(limit); s.view("node2").Rising < cfg.Rise; time.Sleep(20 * time.Millisecond) {
				if time.Now().After(wait) {
					t.Fatalf("held node2 does not pass its checks again:\n%s", s.status())
				}
			}
			s.expectNone(time.Second, "node2 answers again but is held down")
			if v := s.view("node2"); v.HeldUntil.IsZero() || !strings.HasPrefix(v.Health(), "held down until") || !strings.HasPrefix(v.Pending, "up due, held down until") {
				t.Fatalf("held node2: %q (pending %q)", v.Health(), v.Pending)
			}
			// `node up` by hand clears the hold.
			s.d.operator("node2", "up", affinity.NodeActive)
			s.expectNone(3*cfg.Interval, "node2 up by hand")
			if v := s.view("node2"); v.Record.Down || !v.HeldUntil.IsZero() || v.State != affinity.NodeActive {
				t.Fatalf("node2 after node up by hand: %+v", v)
			}

			// Cut the director's inside link: every check fails, nothing
			// moves.
			dir := s.top.Directors[0]
			in0, err := dir.Link(netlab.IfInside)
			if err != nil {
				t.Fatal(err)
			}
			if err := dir.Handle().LinkSetDown(in0); err != nil {
				t.Fatal(err)
			}
			s.expectNone(time.Duration(5*cfg.Fall)*cfg.Interval, "inside link down")
			st := s.mon.Status()
			if st.LinkUp || !strings.Contains(st.Panic, "inside link down") || st.Counters.NotCounted == 0 {
				t.Fatalf("status with the link down: %+v", st)
			}
			if err := dir.Handle().LinkSetUp(in0); err != nil {
				t.Fatal(err)
			}
			linkUp := time.Now()
			s.waitAllPassing(linkUp, limit)
			s.expectNone(0, "inside link back")
			// Failures count again after settle (with a margin: kills
			// right at its end would have some nodes' first failures
			// discounted and others' not).
			time.Sleep(time.Until(linkUp.Add(cfg.Settle + 3*cfg.Interval)))

			// Three of four fail at once (killed concurrently: one after
			// the other, on a loaded machine, is not at once): panic,
			// nothing moves. A reload to fall 4 leaves room for timers
			// that fire late on a loaded machine: the first node to reach
			// fall must see the others' first failures.
			panicCfg := cfg
			panicCfg.Fall = 4
			s.mon.SetConfig(panicCfg)
			s.waitAllPassing(time.Now(), limit)
			var wg sync.WaitGroup
			for _, i := range []int{0, 1, 3} {
				wg.Add(1)
				go func() { defer wg.Done(); s.nodes[i].Kill() }()
			}
			wg.Wait()
			s.expectNone(time.Duration(3*panicCfg.Fall)*cfg.Interval, "3 of 4 nodes failing")
			st = s.mon.Status()
			if !strings.Contains(st.Panic, "3 of 4 nodes failing") || st.Counters.PanicDowns == 0 {
				t.Fatalf("status in panic: %q %+v", st.Panic, st.Counters)
			}
			t.Logf("%s: status says: %s", kind, st.Panic)
			for _, i := range []int{0, 1, 3} {
				s.nodes[i].Restart()
			}
			s.waitAllPassing(time.Now(), limit)
			s.expectNone(0, "after the panic")
			if st := s.mon.Status(); st.Panic != "" {
				t.Fatalf("panic not over: %q", st.Panic)
			}
		})
	}
}

// TestMonitorOnLoopback runs the Monitor without root: test responders on
// loopback addresses, real sockets and timers. A killed responder brings
// "down", its restart "up"; a backup decides nothing.
func TestMonitorOnLoopback(t *testing.T) {
	const port = 45700
	cfg := scenarioConfig()
	cfg.IKE.Port = port
	d := &fakeDaemon{decisions: make(chan Decision, 16)}
	var rs []*goResponder
	for i := 1; i <= 3; i++ {
		a := loopbackNode(3, i)
		d.nodes = append(d.nodes, Node{Name: fmt.Sprintf("n%d", i), Addr: a, State: affinity.NodeActive})
		rs = append(rs, newGoResponder(t, nil, netip.AddrPortFrom(a, port)))
	}
	d.mon = New(Options{Config: cfg, Sink: d, Log: testLog(t)})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.mon.Run(ctx)
	d.mu.Lock()
	d.pushLocked()
	d.mu.Unlock()
	d.mon.SetRole(true)
	s := &scenario{t: t, mon: d.mon, d: d, names: []string{"n1", "n2", "n3"}}
	s.waitAllPassing(time.Now(), 5*time.Second)
	rs[1].Kill()
	dec := s.expect(5*time.Second, "n2", affinity.NodeDown)
	if !strings.HasPrefix(dec.Reason, "health: ike: ") {
		t.Fatalf("reason %q", dec.Reason)
	}
	rs[1].Restart()
	s.expect(5*time.Second, "n2", affinity.NodeActive)

	d.mon.SetRole(false)
	rs[0].Kill()
	deadline := time.Now().Add(5 * time.Second)
	for {
		v := s.view("n1")
		if v.Pending == "down due: the master decides" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("backup view of n1: %+v", v)
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.expectNone(0, "backup")
	d.mon.SetRole(true)
	s.expect(5*time.Second, "n1", affinity.NodeDown)
}

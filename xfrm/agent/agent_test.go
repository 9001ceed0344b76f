package agent

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// fakeKernel is an XFRM database in memory: changes update the snapshot
// and go out as events, as the kernel's multicast does.
type fakeKernel struct {
	mu     sync.Mutex
	snap   xfrm.Snapshot
	events chan xfrm.Event
	reads  atomic.Int32
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{snap: xfrm.Snapshot{Local: []netip.Addr{vip}}}
}

func (k *fakeKernel) Read() (xfrm.Snapshot, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.reads.Add(1)
	s := k.snap
	s.States = append([]xfrm.SA(nil), s.States...)
	s.Policies = append([]xfrm.Policy(nil), s.Policies...)
	return s, nil
}

func (k *fakeKernel) Watch(ctx context.Context) (<-chan xfrm.Event, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	ch := make(chan xfrm.Event, 4096)
	k.events = ch
	context.AfterFunc(ctx, func() {
		k.mu.Lock()
		defer k.mu.Unlock()
		if k.events == ch {
			k.events = nil
		}
		close(ch)
	})
	return ch, nil
}

func (k *fakeKernel) Close() error { return nil }

func (k *fakeKernel) emit(e xfrm.Event) {
	if k.events != nil {
		k.events <- e
	}
}

func (k *fakeKernel) add(p netip.Addr, spi uint32, remote string) {
	sas, pols := childSAs(p, spi, remote)
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, pol := range pols {
		k.snap.Policies = append(k.snap.Policies, pol)
		k.emit(xfrm.Event{Kind: xfrm.EventPolicy, Policy: pol})
	}
	for _, sa := range sas {
		k.snap.States = append(k.snap.States, sa)
		k.emit(xfrm.Event{Kind: xfrm.EventState, SA: sa})
	}
}

// director is a test director: report.Handler over an Inbox, master or
// not as the test says.
type director struct {
	srv     *httptest.Server
	inbox   *report.Inbox
	master  atomic.Bool
	mu      sync.Mutex
	got     []*report.Report
	refused []int
	arrived chan *report.Report
}

func newDirector(t *testing.T, master bool) *director {
	d := &director{inbox: report.NewInbox(), arrived: make(chan *report.Report, 1000)}
	d.master.Store(master)
	h := report.Handler(report.HandlerOptions{
		Authenticate: report.Tokens(map[string]string{"n1": "secret-1", "n2": "secret-2"}),
		Accept: func(node string, r *report.Report) (report.Ack, error) {
			if !d.master.Load() {
				return report.Ack{}, fmt.Errorf("%w: this one is the backup", report.ErrNotMaster)
			}
			ack, _, err := d.inbox.Accept(node, r, time.Now())
			d.mu.Lock()
			d.got = append(d.got, r)
			d.mu.Unlock()
			d.arrived <- r
			return ack, err
		},
		Refused: func(node string, status int, err error) {
			d.mu.Lock()
			d.refused = append(d.refused, status)
			d.mu.Unlock()
		},
	})
	mux := http.NewServeMux()
	mux.Handle("POST "+report.Path, h)
	d.srv = httptest.NewServer(mux)
	t.Cleanup(d.srv.Close)
	return d
}

func (d *director) wait(t *testing.T, what string, match func(*report.Report) bool) *report.Report {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case r := <-d.arrived:
			if match(r) {
				return r
			}
		case <-deadline:
			t.Fatalf("%s: no matching report within 10 s", what)
		}
	}
}

func testConfig(endpoints ...string) Config {
	return Config{Node: "n1", Token: "secret-1", Endpoints: endpoints,
		Heartbeat: 200 * time.Millisecond, Debounce: 20 * time.Millisecond, MaxDelay: 100 * time.Millisecond,
		RemoveHold: 100 * time.Millisecond, BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
		Timeout: 2 * time.Second}
}

func startAgent(t *testing.T, cfg Config, k xfrm.Kernel) *Agent {
	a := newAgent(cfg, k, &httpPoster{client: &http.Client{Timeout: cfg.Timeout}, token: cfg.Token}, time.Now, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	return a
}

// TestAgentReportsToTheMaster runs the agent against a pair of test
// directors over HTTP: it finds the master, sends its facts, follows a
// takeover, and the master's inbox ends up with exactly the node's
// tunnels.
func TestAgentReportsToTheMaster(t *testing.T) {
	backup, master := newDirector(t, false), newDirector(t, true)
	k := newFakeKernel()
	k.add(peer, 0x100, "172.16.1.0/24")
	startAgent(t, testConfig(backup.srv.URL, master.srv.URL), k)

	full := master.wait(t, "full report", func(r *report.Report) bool { return r.Kind == report.KindFull })
	if len(full.Tunnels) != 1 || full.Tunnels[0].Peer != peer {
		t.Fatalf("full report %+v", full)
	}
	other := netip.MustParseAddr("2001:db8:100::7")
	k.add(other, 0x200, "fd00:7::/48")
	master.wait(t, "delta with the new peer", func(r *report.Report) bool {
		return r.Kind == report.KindDelta && len(r.Tunnels) == 1 && r.Tunnels[0].Peer == other
	})
	master.wait(t, "heartbeat", func(r *report.Report) bool { return r.Kind == report.KindHeartbeat && r.Seq == 2 })
	n, _ := master.inbox.Node("n1")
	if len(n.Tunnels) != 2 || n.Tunnels[other].Subnets[0] != netip.MustParsePrefix("fd00:7::/48") {
		t.Fatalf("master holds %+v", n.Tunnels)
	}
	// Takeover: the backup becomes master, the master goes away.
	backup.master.Store(true)
	master.srv.CloseClientConnections()
	master.master.Store(false)
	f := backup.wait(t, "full report after the takeover", func(r *report.Report) bool { return r.Kind == report.KindFull })
	if len(f.Tunnels) != 2 || f.Session == full.Session {
		t.Fatalf("after takeover: %+v", f)
	}
	backup.mu.Lock()
	refusedByBackup := len(backup.refused)
	backup.mu.Unlock()
	if refusedByBackup == 0 {
		t.Fatal("the backup never refused a report while it was the backup (did the agent try the backup first?)")
	}
}

// TestAgentRefusedToken: a wrong token is refused with 401 and counted,
// and the agent says why. (That it backs off rather than hammering the
// director is TestCoreFailover's, on a fake clock.)
func TestAgentRefusedToken(t *testing.T) {
	d := newDirector(t, true)
	cfg := testConfig(d.srv.URL)
	cfg.Token = "wrong"
	a := startAgent(t, cfg, newFakeKernel())
	deadline := time.Now().Add(5 * time.Second)
	for {
		d.mu.Lock()
		refused := append([]int(nil), d.refused...)
		d.mu.Unlock()
		st := a.Status()
		if len(refused) > 0 && st.LastErr != nil {
			if refused[0] != http.StatusUnauthorized || st.Seq != 0 || len(d.inbox.Nodes()) != 0 {
				t.Fatalf("refused %v, status %+v, inbox %v", refused, st, d.inbox.Nodes())
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no refusal seen by the director and the agent within 5 s (refused %v, status %+v)", refused, st)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestAgentOtherNodesToken: a node cannot report as another node: n2's
// token with n1's reports is refused with 403, nothing is applied.
func TestAgentOtherNodesToken(t *testing.T) {
	d := newDirector(t, true)
	cfg := testConfig(d.srv.URL)
	cfg.Token = "secret-2"
	k := newFakeKernel()
	k.add(peer, 0x100, "172.16.1.0/24")
	startAgent(t, cfg, k)
	deadline := time.Now().Add(5 * time.Second)
	for {
		d.mu.Lock()
		refused := append([]int(nil), d.refused...)
		d.mu.Unlock()
		if len(refused) > 0 {
			if refused[0] != http.StatusForbidden {
				t.Fatalf("refused with %d, want 403", refused[0])
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no refusal")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(d.inbox.Nodes()) != 0 {
		t.Fatalf("inbox holds %v after a report with another node's token", d.inbox.Nodes())
	}
}

// TestAgentResyncHealsLostEvents: the kernel says events were lost; the
// agent reads everything again and reports what it missed.
func TestAgentResyncHealsLostEvents(t *testing.T) {
	d := newDirector(t, true)
	k := newFakeKernel()
	startAgent(t, testConfig(d.srv.URL), k)
	d.wait(t, "full", func(r *report.Report) bool { return r.Kind == report.KindFull })
	// Change the database without events, then signal the loss.
	sas, pols := childSAs(peer, 0x300, "172.16.3.0/24")
	k.mu.Lock()
	k.snap.States = append(k.snap.States, sas...)
	k.snap.Policies = append(k.snap.Policies, pols...)
	k.mu.Unlock()
	before := k.reads.Load()
	k.mu.Lock()
	k.emit(xfrm.Event{Kind: xfrm.EventResync, Reason: "events were lost"})
	k.mu.Unlock()
	d.wait(t, "delta after the resync", func(r *report.Report) bool {
		return r.Kind == report.KindDelta && len(r.Tunnels) == 1 && r.Tunnels[0].Peer == peer
	})
	if k.reads.Load() <= before {
		t.Fatal("no full read after the resync event")
	}
}

package director

import (
	"context"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/ipvs/ipvstest"
)

// gatedDataplane holds Sync and Update until the test opens their gates:
// a kernel that takes its time, or a reconcile that hangs.
type gatedDataplane struct {
	*ipvstest.Fake
	mu      sync.Mutex
	sync    chan struct{} // closed: Sync proceeds
	update  chan struct{} // non-nil and open: Update waits
	entered chan struct{} // receives when an Update starts waiting
}

func (g *gatedDataplane) Sync(ctx context.Context, d *ipvs.Desired) (ipvs.Stats, error) {
	<-g.sync
	return g.Fake.Sync(ctx, d)
}

func (g *gatedDataplane) Update(ctx context.Context, d *ipvs.Delta) (ipvs.Stats, error) {
	g.mu.Lock()
	gate := g.update
	g.mu.Unlock()
	if gate != nil {
		g.entered <- struct{}{}
		<-gate
	}
	return g.Fake.Update(ctx, d)
}

// notifySocket is a fake $NOTIFY_SOCKET: what the daemon tells systemd.
type notifySocket struct{ msgs chan string }

func listenNotify(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	n := &notifySocket{msgs: make(chan string, 1000)}
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			n.msgs <- string(buf[:k])
		}
	}()
	return n
}

// expect waits for a message containing want and returns it.
func (n *notifySocket) expect(t *testing.T, want string) string {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case m := <-n.msgs:
			if strings.Contains(m, want) {
				return m
			}
		case <-timeout:
			t.Fatalf("systemd was never told %q", want)
		}
	}
}

// none checks that no message containing what arrives within d.
func (n *notifySocket) none(t *testing.T, what string, d time.Duration) {
	t.Helper()
	timeout := time.After(d)
	for {
		select {
		case m := <-n.msgs:
			if strings.Contains(m, what) {
				t.Fatalf("systemd was told %q too early: %q", what, m)
			}
		case <-timeout:
			return
		}
	}
}

// TestSystemdNotify runs a daemon under a fake systemd: READY=1 comes only
// after the first full kernel sync, with a STATUS= line naming the mode
// and revision; WATCHDOG=1 comes from the reconcile loop every half
// WatchdogSec and stops while a reconcile hangs (so systemd would restart
// the daemon); STATUS= follows the table; STOPPING=1 at the end.
func TestSystemdNotify(t *testing.T) {
	sd := listenNotify(t)
	t.Setenv("WATCHDOG_USEC", "2000000") // WatchdogSec=2s: a ping every second
	st, cfg := testStore(t, 2)
	dp := &gatedDataplane{Fake: ipvstest.NewFake(ipvs.ModeRouteOnly), sync: make(chan struct{}), entered: make(chan struct{}, 1)}
	clk := clock.NewManual(time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC))
	d, err := NewDaemon(DaemonOptions{Config: cfg, Store: st, Dataplane: dp, Clock: clk, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.Run(ctx); close(done) }()
	var openSync sync.Once
	release := func() { openSync.Do(func() { close(dp.sync) }) }
	// A failed check must not leave the daemon stuck in a gate.
	defer func() { cancel(); release(); <-done }()

	// The first sync has not finished: not ready, no watchdog yet.
	sd.none(t, "READY=1", 300*time.Millisecond)
	release()
	m := sd.expect(t, "READY=1")
	// Revision 1 holds the nodes, 2 the first assignment of the
	// unknown-peer buckets (committed before the first sync).
	if !strings.Contains(m, "STATUS=route-only mode, alone, revision 2 (kernel at 2), 0 tunnels on 2 nodes") {
		t.Errorf("ready message %q lacks the status line", m)
	}
	clk.Advance(time.Second)
	sd.expect(t, "WATCHDOG=1")

	// A change: the status line follows the table.
	if _, err := d.Service().Import(strings.NewReader("id,peer,subnets\nt1,192.0.2.1,10.1.0.0/24\n"), ImportRequest{Name: "t.csv"}); err != nil {
		t.Fatal(err)
	}
	sd.expect(t, "revision 3 (kernel at 3), 1 tunnels")

	// A reconcile that hangs: the loop stops pinging however much time
	// passes, so systemd's watchdog fires.
	gate := make(chan struct{})
	var openGate sync.Once
	defer openGate.Do(func() { close(gate) })
	dp.mu.Lock()
	dp.update = gate
	dp.mu.Unlock()
	if _, err := d.Service().Import(strings.NewReader("id,peer,subnets\nt2,192.0.2.2,10.2.0.0/24\n"), ImportRequest{Name: "t2.csv"}); err != nil {
		t.Fatal(err)
	}
	<-dp.entered
	for i := 0; i < 3; i++ {
		clk.Advance(time.Second)
	}
	sd.none(t, "WATCHDOG=1", 300*time.Millisecond)
	dp.mu.Lock()
	dp.update = nil
	dp.mu.Unlock()
	openGate.Do(func() { close(gate) })
	sd.expect(t, "revision 4 (kernel at 4), 2 tunnels")
	clk.Advance(time.Second)
	sd.expect(t, "WATCHDOG=1")

	cancel()
	<-done
	sd.expect(t, "STOPPING=1")
}

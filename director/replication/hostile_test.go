package replication

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
)

// countingHandler counts log records by message.
type countingHandler struct {
	mu  sync.Mutex
	msg []string
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.msg = append(h.msg, r.Message)
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

func (h *countingHandler) count(sub string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, m := range h.msg {
		if strings.Contains(m, sub) {
			n++
		}
	}
	return n
}

// TestSilentMasterLogRate: when the master dies, the backup logs the
// silence when it starts and then with backoff, not at every tick (issue
// 11: 811 lines in 4 s, 3,395 in 20 s). Counted over 20 s of virtual time
// stepped in 1 ms ticks: 20,000 ticks.
func TestSilentMasterLogRate(t *testing.T) {
	h := &countingHandler{}
	p := newPair(t, lossy(0, 21), func(i int, c *Config) {
		if i == 1 {
			c.Logger = slog.New(h)
		}
	})
	p.startBoth()
	o := newOps(21)
	commit(p.st[0], o.init())
	if !p.settle(5 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	before := len(h.msg)
	p.r[0] = nil // the master dies
	p.net.Partition(true)
	for range 20_000 {
		p.step()
	}
	lines := len(h.msg) - before
	silent := h.count("no word from the master")
	if silent == 0 {
		t.Fatal("the master's silence was never logged")
	}
	// 3 s timeout, then reminders after 3, 6, 12 s: at most 3 lines.
	if lines > 4 {
		t.Errorf("%d log lines in 20 s of a silent master, want at most 4: %q", lines, h.msg[before:])
	}
	st := p.r[1].Status()
	if !strings.HasPrefix(st.Reason, "no word from the master for 2") || !p.r[1].Ready() {
		t.Errorf("status while the master is silent: %q, ready %v", st.Reason, p.r[1].Ready())
	}
	// The master comes back: said once.
	p.net.Partition(false)
	p.start(0)
	if !p.settle(10 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	if n := h.count("master heard again"); n != 1 {
		t.Errorf("the master's return logged %d times, want once", n)
	}
}

// TestMTUBound: replication.mtu above the largest UDP payload (65,507
// bytes) is refused with the bound named, by the replicator and the UDP
// link; at the bound itself a snapshot still converges (issue 11: mtu
// 100000 was accepted and replication never converged).
func TestMTUBound(t *testing.T) {
	p := newPair(t, lossy(0, 22), nil)
	for _, mtu := range []int{100_000, 65_508, 100} {
		_, err := New(Config{ID: 1, Key: testKey, Store: p.st[0], Transport: p.ep[0], Clock: p.clk, MTU: mtu})
		if err == nil || !strings.Contains(err.Error(), "mtu") {
			t.Errorf("MTU %d: %v, want an error naming the mtu", mtu, err)
		}
		if err := CheckMTU(mtu); err == nil {
			t.Errorf("CheckMTU(%d) passed", mtu)
		}
	}
	if _, err := ListenUDP(UDPConfig{Local: netip.MustParseAddrPort("127.0.0.1:0"), Peer: netip.MustParseAddrPort("127.0.0.1:9"), MTU: 100_000}); err == nil || !strings.Contains(err.Error(), "65507") {
		t.Errorf("ListenUDP with MTU 100000: %v, want refused naming 65507", err)
	}

	big := newPair(t, FakeConfig{Seed: 22, MTU: MaxMTU}, func(i int, c *Config) { c.MTU = MaxMTU })
	commit(big.st[0], benchNodes(4))
	commit(big.st[0], benchTunnels(0, 3000))
	big.startBoth()
	if !big.settle(10 * time.Second) {
		t.Fatal(big.describeDiff())
	}
	if c := big.r[0].Status().Counters; c.SendErrors != 0 {
		t.Errorf("%d send errors at MTU %d", c.SendErrors, MaxMTU)
	}
}

// TestReplayAfterBackupRestart: datagrams captured before the backup
// restarts are refused after it restarts. Its replay windows start
// empty, but every datagram is bound to the receiver's session, which is
// new at each start (issue 11: they were accepted as new).
func TestReplayAfterBackupRestart(t *testing.T) {
	p := newPair(t, lossy(0, 23), nil)
	var captured [][]byte
	p.net.SetTap(func(from int, b []byte) {
		if from == 0 {
			captured = append(captured, b)
		}
	})
	p.startBoth()
	p.churn(newOps(23), 20)
	p.net.SetTap(nil)
	// The backup restarts on its store; the master goes quiet so that
	// only the captures reach it.
	p.r[1].Close()
	p.start(1)
	master := p.r[0]
	p.r[0] = nil
	before := p.r[1].Status().Counters
	for _, b := range captured {
		p.r[1].HandleDatagram(b)
	}
	after := p.r[1].Status()
	stale := after.Counters.StaleSession - before.StaleSession
	if stale != uint64(len(captured)) {
		t.Errorf("%d of %d captured datagrams refused as stale; counters %+v", stale, len(captured), after.Counters)
	}
	if after.Peer.ID != 0 || after.MasterRevision != 0 {
		t.Errorf("captured datagrams were believed: peer %+v, master revision %d", after.Peer, after.MasterRevision)
	}
	// The live master is heard again once it learns the new session.
	p.r[0] = master
	if !p.settle(10 * time.Second) {
		t.Fatal(p.describeDiff())
	}
}

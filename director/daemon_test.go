package director

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/ipvs/ipvstest"
	"github.com/tunneldirector/tunneldirector/store"
)

// kernelEquals reports whether the fake kernel holds exactly the table's
// maps.
func kernelEquals(k *ipvstest.Fake, t *affinity.Table) bool {
	got := k.State()
	if got == nil {
		return false
	}
	peers, subnets := map[netip.Addr]uint16{}, map[netip.Prefix]uint16{}
	t.Marks(func(a netip.Addr, m uint16) { peers[a] = m }, func(p netip.Prefix, m uint16) { subnets[p] = m })
	return maps.Equal(peers, got.Peers) && maps.Equal(subnets, got.Subnets)
}

// countOps counts the fake's recorded calls of op.
func countOps(k *ipvstest.Fake, op string) int {
	n := 0
	for _, c := range k.Calls() {
		if c.Op == op {
			n++
		}
	}
	return n
}

func startDaemon(t *testing.T) (*Daemon, *ipvstest.Fake, *store.Store, context.CancelFunc) {
	return startDaemonWith(t, ipvstest.NewFake(ipvs.ModeRouteOnly))
}

// testStore opens a fresh store and a configuration with one VIP and the
// nodes vpn-a, vpn-b (and vpn-c unless two are asked for). The health
// checks are off: a unit test sends no probes into the host's network
// (the namespace tests in internal/e2e run them).
func testStore(t *testing.T, nodes int) (*store.Store, *Config) {
	t.Helper()
	st, err := store.Open(store.Options{Path: filepath.Join(t.TempDir(), "td.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	cfg := DefaultConfig()
	cfg.VIPs = []netip.Addr{netip.MustParseAddr("198.51.100.10")}
	cfg.Nodes = []NodeConfig{{Name: "vpn-a", Address: netip.MustParseAddr("172.16.0.1")}, {Name: "vpn-b", Address: netip.MustParseAddr("172.16.0.2")}, {Name: "vpn-c", Address: netip.MustParseAddr("172.16.0.3")}}[:nodes]
	cfg.Health.Enabled = false
	return st, &cfg
}

func startDaemonWith(t *testing.T, k *ipvstest.Fake) (*Daemon, *ipvstest.Fake, *store.Store, context.CancelFunc) {
	return startDaemonOpts(t, k, nil)
}

// startDaemonOpts runs a daemon with three nodes over a fresh store and
// the fake kernel; with (when set) adjusts its options first.
func startDaemonOpts(t *testing.T, k *ipvstest.Fake, with func(*DaemonOptions)) (*Daemon, *ipvstest.Fake, *store.Store, context.CancelFunc) {
	t.Helper()
	st, cfg := testStore(t, 3)
	o := DaemonOptions{Config: cfg, Store: st, Dataplane: k, Logger: slog.New(slog.DiscardHandler)}
	if with != nil {
		with(&o)
	}
	d, err := NewDaemon(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { d.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return d, k, st, cancel
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestDaemonReconcilesEveryChange(t *testing.T) {
	d, k, st, _ := startDaemon(t)
	svc := d.Service()
	var b strings.Builder
	b.WriteString("id,peer,subnets\n")
	for i := 0; i < 200; i++ {
		b.WriteString("t" + itoa(i) + ",100.64." + itoa(i/250) + "." + itoa(i%250+1) + ",10." + itoa(i/8) + "." + itoa(i%8*32) + ".0/27\n")
	}
	if _, err := svc.Import(strings.NewReader(b.String()), ImportRequest{Name: "t.csv"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the import in the kernel", func() bool { return kernelEquals(k, st.Table()) })

	// A node failure changes a node: a full sync.
	if _, err := svc.NodeAction(NodeRequest{Action: "down", Name: "vpn-b"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the failover in the kernel", func() bool { return kernelEquals(k, st.Table()) })

	// A tunnel changing its peer and subnets: the old keys go.
	tu, _ := st.Table().Tunnel("t7")
	tu.Peer = netip.MustParseAddr("192.0.2.77")
	tu.Subnets = []netip.Prefix{netip.MustParsePrefix("10.250.0.0/24")}
	if _, err := st.Commit([]affinity.Change{{Kind: affinity.PutTunnel, Tunnel: &tu}, {Kind: affinity.DeleteTunnel, Name: "t8"}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the move in the kernel", func() bool { return kernelEquals(k, st.Table()) })
	if countOps(k, "Update") == 0 {
		t.Fatal("tunnel changes went through full syncs, not deltas")
	}
	if s := d.Status(); s.KernelRevision != st.Revision() || s.Mode != "route-only" {
		t.Fatalf("status %+v, store at %d", s, st.Revision())
	}
}

// TestDaemonStartsWithAnUnreachableNode is issue 11's "network is
// unreachable": the dataplane applies everything but a route to one node
// and says so with an ipvs.PartialError. The daemon must start, steer, and
// report the node's objects in its status instead of refusing to run.
func TestDaemonStartsWithAnUnreachableNode(t *testing.T) {
	k := ipvstest.NewFake(ipvs.ModeRouteOnly)
	k.Partial = &ipvs.PartialError{Op: "sync", Failed: []error{
		errors.New("replace route 0.0.0.0/0 via 172.16.0.3 table 20003 (node mark 3): network is unreachable")}}
	d, k, st, _ := startDaemonWith(t, k)
	// The daemon's own record of its first sync: the fake counts a Sync
	// when it is called, before the daemon has its result.
	eventually(t, "the first sync", func() bool { return d.Status().Reconciles > 0 })
	s := d.Status()
	if len(s.KernelProblems) != 1 || !strings.Contains(s.KernelProblems[0], "172.16.0.3") || s.KernelRevision != st.Revision() {
		t.Fatalf("status after a partial sync: %+v", s)
	}
	// Still steering: a change reaches the kernel.
	if _, err := d.Service().Import(strings.NewReader("id,peer,subnets\nx,192.0.2.1,10.9.0.0/24\n"), ImportRequest{Name: "x.csv"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the import in the kernel", func() bool { return kernelEquals(k, st.Table()) })
}

func TestDaemonLearnsUnknownPeer(t *testing.T) {
	d, k, st, _ := startDaemon(t)
	// After the first sync: the unknown-peer buckets' first assignment is
	// a revision of its own, which must not land between the two learns.
	eventually(t, "the first sync", func() bool { return countOps(k, "Sync") > 0 })
	peer := netip.MustParseAddr("203.0.113.9")
	if err := d.Learn(peer, 2); err != nil {
		t.Fatal(err)
	}
	tu, ok := st.Table().LookupPeer(peer)
	if !ok || tu.Node != "vpn-b" || tu.Pinned {
		t.Fatalf("learned tunnel %+v %v", tu, ok)
	}
	// Learning again changes nothing.
	rev := st.Revision()
	if err := d.Learn(peer, 3); err != nil || st.Revision() != rev {
		t.Fatalf("second learn: %v, revision %d -> %d", err, rev, st.Revision())
	}
	eventually(t, "the learned peer in the kernel", func() bool { return kernelEquals(k, st.Table()) })
}

func TestAPIOverUnixSocket(t *testing.T) {
	d, _, _, _ := startDaemon(t)
	sock := filepath.Join(t.TempDir(), "run", "api.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.ServeAPI(ctx, sock, netip.AddrPort{}, "") }()
	t.Cleanup(func() { cancel(); <-done })
	c := NewUnixClient(sock)
	eventually(t, "the API socket", func() bool { _, err := c.Status(); return err == nil })

	res, err := c.Import(strings.NewReader("id,peer,subnets\nx,192.0.2.1,10.9.0.0/24\n"), ImportRequest{Name: "x.csv", Kind: nms.KindAuto})
	if err != nil || !res.Changed {
		t.Fatalf("import over the API: %+v %v", res, err)
	}
	lk, err := c.Lookup(netip.MustParseAddr("10.9.0.200"))
	if err != nil || !lk.Found || lk.Match.Tunnel.ID != "x" {
		t.Fatalf("lookup over the API: %+v %v", lk, err)
	}
	_, err = c.Import(strings.NewReader("id,peer,subnets\ny,192.0.2.2,10.9.0.0/25\n"), ImportRequest{Name: "y.csv"})
	if err == nil || !strings.Contains(err.Error(), "y.csv:2") || !strings.Contains(err.Error(), "tunnel x") {
		t.Fatalf("refused import over the API: %v", err)
	}
	if _, err := c.Tunnel("nope"); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("missing tunnel: %v", err)
	}
	nodes, err := c.Nodes()
	if err != nil || len(nodes.Nodes) != 3 || nodes.Tunnels != 1 {
		t.Fatalf("nodes over the API: %+v %v", nodes, err)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestAPITokenOverTCP(t *testing.T) {
	d, _, _, _ := startDaemon(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	sock := filepath.Join(t.TempDir(), "api.sock")
	go func() { done <- d.ServeAPI(ctx, sock, netip.MustParseAddrPort("127.0.0.1:17410"), "s3cret-token") }()
	t.Cleanup(func() { cancel(); <-done })
	good := NewTCPClient("127.0.0.1:17410", "s3cret-token")
	eventually(t, "the TCP API", func() bool { _, err := good.Status(); return err == nil })
	for _, tok := range []string{"", "wrong"} {
		if _, err := NewTCPClient("127.0.0.1:17410", tok).Nodes(); err == nil || !strings.Contains(err.Error(), "token") {
			t.Fatalf("token %q accepted: %v", tok, err)
		}
	}
	// The unix socket is root-only.
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v %v", fi.Mode(), err)
	}
}

// slowFirstSync is the fake kernel with its first Sync held, before it
// reads the table, until release is closed.
type slowFirstSync struct {
	*ipvstest.Fake
	entered, release chan struct{}
	once             sync.Once
}

func (s *slowFirstSync) Sync(ctx context.Context, d *ipvs.Desired) (ipvs.Stats, error) {
	first := false
	s.once.Do(func() { first = true })
	if first {
		close(s.entered)
		<-s.release
	}
	return s.Fake.Sync(ctx, d)
}

// TestAPIChangeWaitsForTheStartSync: a table change through the API while
// the start's kernel sync runs waits for that sync, and then reaches the
// kernel as a delta: committed during the sync, it would be in the sync's
// target but not in the kernel, whose maps a restarted daemon adopts by
// their digest (a mismatch reloads them whole).
func TestAPIChangeWaitsForTheStartSync(t *testing.T) {
	k := ipvstest.NewFake(ipvs.ModeRouteOnly)
	slow := &slowFirstSync{Fake: k, entered: make(chan struct{}), release: make(chan struct{})}
	d, _, st, _ := startDaemonOpts(t, k, func(o *DaemonOptions) { o.Dataplane = slow })
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(slow.release) }) }
	t.Cleanup(release) // before the daemon's own cleanup waits for Run
	<-slow.entered
	rev := st.Revision()
	done := make(chan error, 1)
	go func() {
		_, err := d.Service().Import(strings.NewReader("id,peer,subnets\nx,192.0.2.1,10.9.0.0/24\n"), ImportRequest{Name: "x.csv"})
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("the import returned (%v) while the start's sync ran", err)
	case <-time.After(200 * time.Millisecond):
	}
	if st.Revision() != rev {
		t.Fatalf("the import committed (revision %d, was %d) while the start's sync ran", st.Revision(), rev)
	}
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	eventually(t, "the import in the kernel", func() bool { return kernelEquals(k, st.Table()) })
	var ops []string
	for _, c := range k.Calls() {
		if c.Op == "Sync" || c.Op == "Update" {
			ops = append(ops, c.Op)
		}
	}
	if len(ops) != 2 || ops[0] != "Sync" || ops[1] != "Update" {
		t.Fatalf("kernel calls %v, want the start's Sync and the import's Update", ops)
	}
	if _, ok := k.Calls()[0].Sync.Peers[netip.MustParseAddr("192.0.2.1")]; ok {
		t.Fatal("the start's sync holds the imported peer")
	}
}

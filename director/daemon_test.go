package director

import (
	"context"
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
	"github.com/tunneldirector/tunneldirector/store"
)

// kernelModel is a dataplane that holds its state in maps, so the daemon's
// reconcile logic can be checked without a kernel (the kernel itself is
// proven in ipvs's namespace and VM tests).
type kernelModel struct {
	mu      sync.Mutex
	peers   map[netip.Addr]uint16
	subnets map[netip.Prefix]uint16
	nodes   []ipvs.Node
	syncs   int
	updates int
}

func (k *kernelModel) Mode() ipvs.Mode { return ipvs.ModeRouteOnly }
func (k *kernelModel) Sync(_ context.Context, d *ipvs.Desired) (ipvs.Stats, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.syncs++
	k.peers, k.subnets, k.nodes = maps.Clone(d.Peers), maps.Clone(d.Subnets), d.Nodes
	return ipvs.Stats{}, nil
}
func (k *kernelModel) Update(_ context.Context, d *ipvs.Delta) (ipvs.Stats, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.updates++
	for _, a := range d.DeletePeers {
		delete(k.peers, a)
	}
	for _, p := range d.DeleteSubnets {
		delete(k.subnets, p)
	}
	maps.Copy(k.peers, d.SetPeers)
	maps.Copy(k.subnets, d.SetSubnets)
	return ipvs.Stats{}, nil
}
func (k *kernelModel) Verify(context.Context) (ipvs.Stats, error)  { return ipvs.Stats{}, nil }
func (k *kernelModel) Read(context.Context) (*ipvs.Desired, error) { return nil, nil }
func (k *kernelModel) Teardown(context.Context) error              { return nil }
func (k *kernelModel) Close() error                                { return nil }

// equalsTable reports whether the model holds exactly the table's maps.
func (k *kernelModel) equalsTable(t *affinity.Table) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	peers, subnets := map[netip.Addr]uint16{}, map[netip.Prefix]uint16{}
	t.PeerMarks(func(a netip.Addr, m uint16) { peers[a] = m })
	t.SubnetMarks(func(p netip.Prefix, m uint16) { subnets[p] = m })
	return maps.Equal(peers, k.peers) && maps.Equal(subnets, k.subnets)
}

func startDaemon(t *testing.T) (*Daemon, *kernelModel, *store.Store, context.CancelFunc) {
	t.Helper()
	st, err := store.Open(store.Options{Path: filepath.Join(t.TempDir(), "td.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	cfg := DefaultConfig()
	cfg.VIPs = []netip.Addr{netip.MustParseAddr("198.51.100.10")}
	cfg.Nodes = []NodeConfig{{Name: "vpn-a", Address: netip.MustParseAddr("172.16.0.1")}, {Name: "vpn-b", Address: netip.MustParseAddr("172.16.0.2")}, {Name: "vpn-c", Address: netip.MustParseAddr("172.16.0.3")}}
	k := &kernelModel{}
	d, err := NewDaemon(DaemonOptions{Config: &cfg, Store: st, Dataplane: k, Logger: slog.New(slog.DiscardHandler)})
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
	eventually(t, "the import in the kernel", func() bool { return k.equalsTable(st.Table()) })

	// A node failure changes a node: a full sync.
	if _, err := svc.NodeAction(NodeRequest{Action: "down", Name: "vpn-b"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the failover in the kernel", func() bool { return k.equalsTable(st.Table()) })

	// A tunnel changing its peer and subnets: the old keys go.
	tu, _ := st.Table().Tunnel("t7")
	tu.Peer = netip.MustParseAddr("192.0.2.77")
	tu.Subnets = []netip.Prefix{netip.MustParsePrefix("10.250.0.0/24")}
	if _, err := st.Commit([]affinity.Change{{Kind: affinity.PutTunnel, Tunnel: &tu}, {Kind: affinity.DeleteTunnel, Name: "t8"}}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the move in the kernel", func() bool { return k.equalsTable(st.Table()) })
	k.mu.Lock()
	updates := k.updates
	k.mu.Unlock()
	if updates == 0 {
		t.Fatal("tunnel changes went through full syncs, not deltas")
	}
	if s := d.Status(); s.KernelRevision != st.Revision() || s.Mode != "route-only" {
		t.Fatalf("status %+v, store at %d", s, st.Revision())
	}
}

func TestDaemonLearnsUnknownPeer(t *testing.T) {
	d, k, st, _ := startDaemon(t)
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
	eventually(t, "the learned peer in the kernel", func() bool { return k.equalsTable(st.Table()) })
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

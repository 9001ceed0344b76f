package vmtest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/internal/vmlab"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/ipvs/lvs"
)

// retransmitter sends IKE the way a retransmitting IKE daemon does: from
// the SAME source port (500, and 4500 for NAT-T) to the VIP, every few
// milliseconds, each datagram tagged with its sequence number, so a test
// can tell which packets were sent after a move.
type retransmitter struct {
	prefix string
	seq    atomic.Int64
	stop   chan struct{}
	wg     sync.WaitGroup
	errs   chan error
}

func startRetransmitter(t *testing.T, h *netlab.Host, prefix string, src, vip netip.Addr) *retransmitter {
	t.Helper()
	r := &retransmitter{prefix: prefix, stop: make(chan struct{}), errs: make(chan error, 4)}
	// NAT-T starts once IKE on 500 is under way, as with a real peer
	// (IKE_SA_INIT goes to 500, the exchange moves to 4500 after it): two
	// first packets sent at the same instant from two CPUs both miss the
	// pin window and are both logged, a race no real peer runs.
	started := make(chan struct{})
	for _, port := range []uint16{500, 4500} {
		c, err := h.UDPSocket(netip.AddrPortFrom(src, port))
		if err != nil {
			t.Fatal(err)
		}
		r.wg.Add(1)
		go func(c *net.UDPConn, port uint16) {
			defer r.wg.Done()
			defer c.Close()
			if port != 500 {
				select {
				case <-started:
					time.Sleep(5 * time.Millisecond)
				case <-r.stop:
					return
				}
			}
			for first := port == 500; ; first = false {
				select {
				case <-r.stop:
					return
				default:
				}
				n := r.seq.Add(1)
				tag := fmt.Sprintf("%s-%d-%d", prefix, port, n)
				if _, err := c.WriteToUDPAddrPort([]byte(tag), netip.AddrPortFrom(vip, port)); err != nil {
					r.errs <- err
					return
				}
				if first {
					close(started)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}(c, port)
	}
	t.Cleanup(r.halt)
	return r
}

func (r *retransmitter) halt() {
	select {
	case <-r.stop:
	default:
		close(r.stop)
	}
	r.wg.Wait()
}

// seqOf returns the sequence number of a packet of this retransmitter.
func (r *retransmitter) seqOf(p netlab.Packet) (int64, bool) {
	rest, ok := strings.CutPrefix(p.Tag, r.prefix+"-")
	if !ok {
		return 0, false
	}
	_, n, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseInt(n, 10, 64)
	return v, err == nil
}

// after matches this retransmitter's packets numbered above seq.
func (r *retransmitter) after(seq int64) func(netlab.Packet) bool {
	return func(p netlab.Packet) bool { n, ok := r.seqOf(p); return ok && n > seq }
}

// upTo matches this retransmitter's packets numbered up to seq.
func (r *retransmitter) upTo(seq int64) func(netlab.Packet) bool {
	return func(p netlab.Packet) bool { n, ok := r.seqOf(p); return ok && n <= seq }
}

// settle waits until the retransmitter has sent at least n more packets.
func (r *retransmitter) settle(n int64) int64 {
	start := r.seq.Load()
	for r.seq.Load() < start+n {
		time.Sleep(5 * time.Millisecond)
	}
	return r.seq.Load()
}

// moveLab is a director with three nodes and one live peer per family.
type moveLab struct {
	top   *netlab.Topology
	dp    ipvs.Dataplane
	des   *ipvs.Desired
	caps  []*netlab.Capture
	names []string
}

func newMoveLab(t *testing.T) *moveLab {
	t.Helper()
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 1, Nodes: 3, VIPOnDirectors: true})
	l := &moveLab{top: top}
	l.des = &ipvs.Desired{
		VIPs:     []netip.Addr{top.VIP4, top.VIP6},
		Peers:    map[netip.Addr]uint16{},
		Subnets:  map[netip.Prefix]uint16{},
		HashSeed: 7,
	}
	for i, nd := range top.Nodes {
		in := nd.If(netlab.IfInside)
		l.des.Nodes = append(l.des.Nodes, ipvs.Node{Mark: uint16(i + 1), Name: nd.Name, Addr: in.Addr4, Addr6: in.Addr6, Active: true})
		c, err := nd.Capture(netlab.IfInside)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		l.caps = append(l.caps, c)
		l.names = append(l.names, nd.Name)
	}
	o := top.Peers[0].If(netlab.IfOutside)
	l.des.Peers[o.Addr4] = 1
	l.des.Peers[o.Addr6] = 1
	return l
}

func (l *moveLab) vip(v6 bool) netip.Addr {
	if v6 {
		return l.top.VIP6
	}
	return l.top.VIP4
}

func (l *moveLab) open(t *testing.T) {
	t.Helper()
	dir := l.top.Directors[0]
	if err := dir.Do(func() (err error) { l.dp, err = ipvs.New(ipvs.Config{}); return err }); err != nil {
		t.Fatalf("ipvs.New in %s: %v", dir.Name, err)
	}
	t.Cleanup(func() { l.dp.Close() })
	if l.dp.Mode() != ipvs.ModeIPVS {
		t.Fatalf("mode %s in the guest, want ipvs", l.dp.Mode())
	}
}

// start opens the dataplane and syncs the lab's desired state.
func (l *moveLab) start(t *testing.T) context.Context {
	t.Helper()
	l.open(t)
	ctx := context.Background()
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	return ctx
}

// onlyAt asserts that the packets matching m (at least min of them) all
// reached node want and none reached another node.
func (l *moveLab) onlyAt(t *testing.T, what string, want int, min int, m func(netlab.Packet) bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for l.caps[want].Count(m) < min && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	got := make([]int, len(l.caps))
	for i, c := range l.caps {
		got[i] = c.Count(m)
	}
	for i, n := range got {
		if i != want && n > 0 {
			t.Fatalf("%s: %d packets reached %s, want all at %s (counts per node %v)", what, n, l.names[i], l.names[want], got)
		}
	}
	if got[want] < min {
		t.Fatalf("%s: %d packets reached %s, want at least %d (counts per node %v)", what, got[want], l.names[want], min, got)
	}
	t.Logf("%s: %d packets, all at %s", what, got[want], l.names[want])
}

// TestGuestMoveLivePeer proves a move in IPVS mode with a peer whose IKE
// and NAT-T keep arriving from the same source ports (as a retransmitting
// IKE daemon's do) before, during and after the move: every packet sent
// after Update returned reaches the new owner only. Without one-packet
// scheduling IPVS keeps a connection entry per peer and port, looked up
// before the fwmark, and the peer stays on its old node.
func TestGuestMoveLivePeer(t *testing.T) {
	vmlab.RequireGuest(t)
	l := newMoveLab(t)
	ctx := l.start(t)
	p := l.top.Peers[0]
	o := p.If(netlab.IfOutside)
	for _, v6 := range []bool{false, true} {
		fam := map[bool]string{false: "v4", true: "v6"}[v6]
		r := startRetransmitter(t, p, "mv"+fam, o.Addr(v6), l.vip(v6))
		before := r.settle(40)
		l.onlyAt(t, fam+" before the move", 0, 30, r.upTo(before))

		// A move while both nodes are alive (rebalance, pinned move).
		if _, err := l.dp.Update(ctx, &ipvs.Delta{SetPeers: map[netip.Addr]uint16{o.Addr(v6): 2}}); err != nil {
			t.Fatal(err)
		}
		moved := r.seq.Load()
		r.settle(40)
		l.onlyAt(t, fam+" after the move to node 2", 1, 30, r.after(moved))
		r.halt()
		// Back to node 1 for the next family.
		if _, err := l.dp.Update(ctx, &ipvs.Delta{SetPeers: map[netip.Addr]uint16{o.Addr(v6): 1}}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestGuestNodeDownLivePeer takes the owner of a retransmitting peer down:
// its service goes and the peer, moved to another node, is followed by
// every packet sent after the Sync returned.
func TestGuestNodeDownLivePeer(t *testing.T) {
	vmlab.RequireGuest(t)
	l := newMoveLab(t)
	ctx := l.start(t)
	p := l.top.Peers[0]
	o := p.If(netlab.IfOutside)
	r4 := startRetransmitter(t, p, "dn4", o.Addr4, l.top.VIP4)
	r6 := startRetransmitter(t, p, "dn6", o.Addr6, l.top.VIP6)
	r4.settle(40)
	r6.settle(40)
	// node down: the node is neither active nor holds tunnels; its peers
	// move (as affinity's node down does).
	l.des.Nodes[0].Active, l.des.Nodes[0].Down = false, true
	l.des.Peers[o.Addr4], l.des.Peers[o.Addr6] = 3, 3
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	down4, down6 := r4.seq.Load(), r6.seq.Load()
	r4.settle(40)
	r6.settle(40)
	l.onlyAt(t, "v4 after node 1 went down", 2, 30, r4.after(down4))
	l.onlyAt(t, "v6 after node 1 went down", 2, 30, r6.after(down6))
	svcs, err := l.lvsOf(t).Services()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range svcs {
		if s.Mark&0xfff == 1 {
			t.Fatalf("the down node keeps fwmark service %#x", s.Mark)
		}
	}
	if len(svcs) != 4 {
		t.Fatalf("%d services, want 4 (2 nodes x 2 families)", len(svcs))
	}
}

// lvsOf opens the director namespace's IPVS for inspection.
func (l *moveLab) lvsOf(t *testing.T) lvs.Kernel {
	t.Helper()
	var h lvs.Kernel
	if err := l.top.Directors[0].Do(func() (err error) { h, _, err = lvs.Open(0); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// TestGuestAdoptLegacyServices starts the dataplane on a kernel that an
// older run programmed: fwmark services without one-packet scheduling,
// holding a connection entry of a live, retransmitting peer. The adopting
// Sync replaces them; a move afterwards must reach the new owner only (with
// the old services kept, the entry would hold the peer on its old node).
func TestGuestAdoptLegacyServices(t *testing.T) {
	vmlab.RequireGuest(t)
	l := newMoveLab(t)
	// The older run: same kernel objects, services without -o.
	ctx := l.start(t)
	h := l.lvsOf(t)
	svcs, err := h.Services()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range svcs {
		legacy := s
		legacy.OnePacket = false
		if err := h.Remove(s); err != nil {
			t.Fatal(err)
		}
		if err := h.Add(legacy); err != nil {
			t.Fatal(err)
		}
	}
	l.dp.Close()
	p := l.top.Peers[0]
	o := p.If(netlab.IfOutside)
	r := startRetransmitter(t, p, "legacy", o.Addr4, l.top.VIP4)
	r.settle(40)
	conns, err := h.Conns()
	if err != nil {
		t.Fatal(err)
	}
	held := 0
	for _, c := range conns {
		if c.Client.Addr() == o.Addr4 {
			held++
		}
	}
	if held == 0 {
		t.Fatalf("no IPVS connection entry for the peer under the legacy services: %+v", conns)
	}
	t.Logf("legacy services hold %d connection entries of the peer", held)

	// The new run adopts, replacing the services, while the peer sends.
	l.open(t)
	st, err := l.dp.Sync(ctx, l.des)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("adopting sync: %+v", st)
	if st.Changed < 6 {
		t.Fatalf("adopting sync replaced %d services, want 6", st.Changed)
	}
	if _, err := l.dp.Update(ctx, &ipvs.Delta{SetPeers: map[netip.Addr]uint16{o.Addr4: 2}}); err != nil {
		t.Fatal(err)
	}
	moved := r.seq.Load()
	r.settle(40)
	l.onlyAt(t, "after adopting and moving", 1, 30, r.after(moved))
}

// TestGuestMasqMoveLivePeer moves a live peer off a masq node. Masquerade
// keeps connection entries (its replies are translated through them, so
// its services have no one-packet scheduling); the dataplane drops the old
// node's entries after the move, and every packet sent after Update
// returned reaches the new owner only.
func TestGuestMasqMoveLivePeer(t *testing.T) {
	vmlab.RequireGuest(t)
	l := newMoveLab(t)
	for i := range l.des.Nodes {
		l.des.Nodes[i].Forward = ipvs.ForwardMasq
	}
	ctx := l.start(t)
	p := l.top.Peers[0]
	o := p.If(netlab.IfOutside)
	r := startRetransmitter(t, p, "masq", o.Addr4, l.top.VIP4)
	before := r.settle(40)
	// Masquerade rewrites the destination to the node's address.
	l.onlyAt(t, "masq before the move", 0, 30, r.upTo(before))
	t0 := time.Now()
	if _, err := l.dp.Update(ctx, &ipvs.Delta{SetPeers: map[netip.Addr]uint16{o.Addr4: 2}}); err != nil {
		t.Fatal(err)
	}
	t.Logf("masq move (with the old node's entries dropped) took %v", time.Since(t0))
	moved := r.seq.Load()
	r.settle(40)
	l.onlyAt(t, "masq after the move to node 2", 1, 30, r.after(moved))
}

package ipvs

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// lab is a director with three nodes, four peers and a target host, with a
// Dataplane programming the director's namespace.
type lab struct {
	top   *netlab.Topology
	dir   *netlab.Host
	dp    *dataplane
	des   *Desired
	caps  []*netlab.Capture
	peers []*netlab.Host
}

var (
	subnet4 = netip.MustParsePrefix("10.20.0.0/27")
	subnet6 = netip.MustParsePrefix("2001:db8:aaaa::/64")
)

func newLab(t *testing.T, cfg Config) *lab {
	t.Helper()
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 4, Directors: 1, Nodes: 3, VIPOnDirectors: true})
	l := &lab{top: top, dir: top.Directors[0], peers: top.Peers}
	des := &Desired{
		VIPs:     []netip.Addr{top.VIP4, top.VIP6},
		Peers:    map[netip.Addr]uint16{},
		Subnets:  map[netip.Prefix]uint16{subnet4: 2, subnet6: 3},
		HashSeed: 0x1234567,
	}
	for i, nd := range top.Nodes {
		in := nd.If(netlab.IfInside)
		des.Nodes = append(des.Nodes, Node{Mark: uint16(i + 1), Name: nd.Name, Addr: in.Addr4, Addr6: in.Addr6, Active: true})
	}
	// peer0 -> node mark 1, peer1 -> 2, peer2 -> 3; peer3 is unknown.
	for i := 0; i < 3; i++ {
		o := top.Peers[i].If(netlab.IfOutside)
		des.Peers[o.Addr4] = uint16(i + 1)
		des.Peers[o.Addr6] = uint16(i + 1)
	}
	l.des = des
	dp, err := newIn(cfg, l.dir.NsHandle())
	if err != nil {
		t.Fatalf("new dataplane in %s: %v", l.dir.Name, err)
	}
	t.Cleanup(func() { dp.Close() })
	l.dp = dp
	for _, nd := range top.Nodes {
		c, err := nd.Capture(netlab.IfInside)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		l.caps = append(l.caps, c)
	}
	return l
}

// send sends one packet of kind ("ike", "natt", "esp", "ah") from src (an
// address of host h) to dst with tag.
func send(h *netlab.Host, kind string, src, dst netip.Addr, tag string) error {
	switch kind {
	case "ike":
		return h.SendUDP(netip.AddrPortFrom(src, 500), netip.AddrPortFrom(dst, 500), []byte(tag))
	case "natt":
		return h.SendUDP(netip.AddrPortFrom(src, 4500), netip.AddrPortFrom(dst, 4500), []byte(tag))
	case "esp":
		return h.SendESP(src, dst, 0xc0ffee01, 1, tag)
	case "ah":
		return h.SendRaw(netlab.ProtoAH, src, dst, netlab.ESPPayload(0xc0ffee02, 1, tag))
	}
	return fmt.Errorf("unknown kind %q", kind)
}

// expectAt asserts that the packet tagged tag reaches node index want and
// no other node.
func (l *lab) expectAt(t *testing.T, want int, tag string) {
	t.Helper()
	l.expectMatch(t, want, tag, netlab.Tagged(tag))
}

// ahFrom matches AH packets from src seen after since: the capture does not
// parse AH payloads, so tags do not work for it.
func ahFrom(src netip.Addr, since time.Time) func(netlab.Packet) bool {
	return func(p netlab.Packet) bool { return p.Proto == netlab.ProtoAH && p.Src == src && !p.Time.Before(since) }
}

func (l *lab) expectMatch(t *testing.T, want int, tag string, match func(netlab.Packet) bool) {
	t.Helper()
	if _, ok := l.caps[want].Wait(2*time.Second, match); !ok {
		where := []string{}
		for i, c := range l.caps {
			if c.Count(match) > 0 {
				where = append(where, l.top.Nodes[i].Name)
			}
		}
		t.Fatalf("packet %q did not reach %s (seen at %v)", tag, l.top.Nodes[want].Name, where)
	}
	for i, c := range l.caps {
		if i != want && c.Count(match) > 0 {
			t.Fatalf("packet %q also reached %s", tag, l.top.Nodes[i].Name)
		}
	}
}

func (l *lab) vip(v6 bool) netip.Addr {
	if v6 {
		return l.top.VIP6
	}
	return l.top.VIP4
}

var kinds = []string{"ike", "natt", "esp", "ah"}

// checkPeers sends every kind from peers 0..2 in both families and expects
// each at owner[i] (node index).
func (l *lab) checkPeers(t *testing.T, round string, owner []int) {
	t.Helper()
	for _, v6 := range []bool{false, true} {
		for i := 0; i < 3; i++ {
			p := l.peers[i]
			src := p.If(netlab.IfOutside).Addr(v6)
			for _, k := range kinds {
				tag := fmt.Sprintf("%s-%s-p%d-%v", round, k, i, v6)
				since := time.Now()
				if err := send(p, k, src, l.vip(v6), tag); err != nil {
					t.Fatal(err)
				}
				if k == "ah" {
					l.expectMatch(t, owner[i], tag, ahFrom(src, since))
				} else {
					l.expectAt(t, owner[i], tag)
				}
			}
		}
	}
}

func (l *lab) checkSubnets(t *testing.T, round string, want4, want6 int) {
	t.Helper()
	tg := l.top.Target
	for _, c := range []struct {
		dst  netip.Addr
		v6   bool
		want int
	}{{subnet4.Addr().Next().Next(), false, want4}, {subnet6.Addr().Next().Next(), true, want6}} {
		tag := fmt.Sprintf("%s-ret-%v", round, c.v6)
		src := tg.If(netlab.IfTarget).Addr(c.v6)
		if err := tg.SendUDP(netip.AddrPortFrom(src, 40000), netip.AddrPortFrom(c.dst, 8080), []byte(tag)); err != nil {
			t.Fatal(err)
		}
		l.expectAt(t, c.want, tag)
	}
}

func TestNSRouteOnlySteering(t *testing.T) {
	l := newLab(t, Config{Mode: ModeAuto})
	ctx := context.Background()
	if l.dp.Mode() != ModeRouteOnly {
		t.Fatalf("mode %s on the host kernel, want route-only (no IPVS here)", l.dp.Mode())
	}
	st, err := l.dp.Sync(ctx, l.des)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first sync: %+v", st)
	l.checkPeers(t, "r1", []int{0, 1, 2})
	l.checkSubnets(t, "r1", 1, 2)

	// nft must show the marks as the director means them (host byte order).
	out, err := l.dir.Run(ctx, "nft", "list", "table", "inet", "tunneldirector")
	if err != nil {
		netlab.RequireTool(t, "nft binary (scripts/lab-deps.sh)", err)
	}
	for _, want := range []string{"0x7d000001", "0x7d000002", "0x7d000003", "jhash ip saddr mod 3 seed 0x1234567", "map sub4_27", "10.20.0.0 : 0x7d000002", "ip daddr & 255.255.255.224 map @sub4_27"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("nft list table lacks %q:\n%s", want, out)
		}
	}
	t.Logf("nft list table inet tunneldirector:\n%s", out)

	// Idempotence.
	st, err = l.dp.Sync(ctx, l.des)
	if err != nil {
		t.Fatal(err)
	}
	if st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("second sync changed something: %+v", st)
	}

	// Move peer0 to node mark 3 and subnet4 to mark 1.
	o := l.peers[0].If(netlab.IfOutside)
	st, err = l.dp.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{o.Addr4: 3, o.Addr6: 3}, SetSubnets: map[netip.Prefix]uint16{subnet4: 1}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Changed != 3 {
		t.Fatalf("update stats %+v, want 3 changed", st)
	}
	l.checkPeers(t, "r2", []int{2, 1, 2})
	l.checkSubnets(t, "r2", 0, 2)
}

// TestNSUnreachableNodeDoesNotStopSteering adds a node whose address the
// director has no route to: the kernel refuses its route ("network is
// unreachable"), and Sync must still program everything else, so the
// reachable nodes' peers and subnets are steered with real packets.
func TestNSUnreachableNodeDoesNotStopSteering(t *testing.T) {
	l := newLab(t, Config{})
	ctx := context.Background()
	l.des.Nodes = append(l.des.Nodes, Node{Mark: 9, Name: "far", Addr: netip.MustParseAddr("198.18.7.7"), Active: false})
	_, err := l.dp.Sync(ctx, l.des)
	var pe *PartialError
	if !errors.As(err, &pe) || !strings.Contains(err.Error(), "198.18.7.7") {
		t.Fatalf("sync with an unreachable node: %v", err)
	}
	t.Logf("sync: %v", err)
	l.checkPeers(t, "unreachable", []int{0, 1, 2})
	l.checkSubnets(t, "unreachable", 1, 2)
}

// TestNSNodeDownAsUpdate takes a node down with one Update (its tunnels'
// moves plus the new nodes) in a real kernel: the moved peers and subnet
// reach their new owners, the hash spreads unknown peers over the two
// remaining nodes only, and Verify then finds the kernel exactly as
// wanted.
func TestNSNodeDownAsUpdate(t *testing.T) {
	l := newLab(t, Config{})
	ctx := context.Background()
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	nodes := slices.Clone(l.des.Nodes)
	nodes[0].Active, nodes[0].Down = false, true
	o := l.peers[0].If(netlab.IfOutside)
	st, err := l.dp.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{o.Addr4: 2, o.Addr6: 2}, Nodes: nodes})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node down: %+v", st)
	l.checkPeers(t, "down", []int{1, 1, 2})
	l.checkSubnets(t, "down", 1, 2)
	out, err := l.dir.Run(ctx, "nft", "list", "map", "inet", "tunneldirector", "nodehash")
	if err != nil {
		netlab.RequireTool(t, "nft binary (scripts/lab-deps.sh)", err)
	}
	if strings.Contains(string(out), "0x7d000001") || !strings.Contains(string(out), "0x7d000002") || !strings.Contains(string(out), "0x7d000003") {
		t.Fatalf("the hash still picks the down node, or not the others:\n%s", out)
	}
	if st, err := verifySettled(ctx, l.dp); err != nil || st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("verify after the node update: %+v, %v", st, err)
	}
}

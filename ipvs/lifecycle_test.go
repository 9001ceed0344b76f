package ipvs

import (
	"context"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// TestNSHashPickMatchesKernel sends ESP and IKE from many unknown source
// addresses and checks that each lands on the node HashPick predicts, for
// three and then two active nodes (new addresses: the old ones are in
// their pin window, TestNSBucketWindow), IPv4 and IPv6.
func TestNSHashPickMatchesKernel(t *testing.T) {
	l := newLab(t, Config{})
	ctx := context.Background()
	p := l.peers[3]
	for round, active := range [][]uint16{{1, 2, 3}, {1, 3}} {
		srcs := unknownSources(t, p, 48, round)
		for i := range l.des.Nodes {
			l.des.Nodes[i].Active = false
			for _, m := range active {
				if l.des.Nodes[i].Mark == m {
					l.des.Nodes[i].Active = true
				}
			}
		}
		if _, err := l.dp.Sync(ctx, l.des); err != nil {
			t.Fatal(err)
		}
		hits := map[uint16]int{}
		for _, src := range srcs {
			want := HashPick(src, l.des.HashSeed, active)
			hits[want]++
			kind := "esp"
			if src.Is4() && src.As4()[3]%2 == 0 || src.Is6() && src.As16()[15]%2 == 0 {
				kind = "ike"
			}
			tag := fmt.Sprintf("h%d-%s-%s", round, kind, src)
			if err := send(p, kind, src, l.vip(src.Is6()), tag); err != nil {
				t.Fatal(err)
			}
			l.expectAt(t, int(want-1), tag)
		}
		t.Logf("round %d, active %v: %d addresses agreed with HashPick, spread %v", round, active, len(srcs), hits)
	}
}

// unknownSources gives peer host p n IPv4 and n IPv6 addresses of set k
// (different sets share no address) that the director does not know.
func unknownSources(t *testing.T, p *netlab.Host, n, k int) []netip.Addr {
	t.Helper()
	var srcs []netip.Addr
	if (k+1)*n > 105 {
		t.Fatalf("unknownSources: %d sets of %d IPv4 addresses do not fit 198.51.100.150-254", k+1, n)
	}
	for i := 0; i < n; i++ {
		j := k*n + i
		a4 := netip.AddrFrom4([4]byte{198, 51, 100, byte(150 + j)})
		a6 := netip.MustParseAddr(fmt.Sprintf("2001:db8:100::%x:%x", 0x1000+j*7919%0xefff, j*31337%0xffff))
		for _, a := range []netip.Addr{a4, a6} {
			if err := p.AddAddr(netlab.IfOutside, netip.PrefixFrom(a, a.BitLen())); err != nil {
				t.Fatal(err)
			}
			srcs = append(srcs, a)
		}
	}
	return srcs
}

// TestNSDriftRepair removes objects behind the Dataplane's back and
// checks that Verify puts them back and counts the repairs.
func TestNSDriftRepair(t *testing.T) {
	l := newLab(t, Config{})
	ctx := context.Background()
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	// The kernel's ruleset generation moved by exactly the director's
	// transaction, so an untouched kernel is verified without reading
	// the maps back; the removals below move it and are found.
	if !l.dp.genKnown {
		t.Fatal("after Sync the dataplane does not know the ruleset generation: every Verify reads the maps back")
	}
	if st, err := verifySettled(ctx, l.dp); err != nil || st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("verify of an untouched kernel: %+v, %v", st, err)
	}
	verify := func(what string, min int) {
		t.Helper()
		st, err := verifySettled(ctx, l.dp)
		if err != nil {
			t.Fatalf("verify after %s: %v", what, err)
		}
		n := st.Added + st.Changed + st.Removed
		if n < min {
			t.Fatalf("verify after %s repaired %d (%+v), want >= %d", what, n, st, min)
		}
		t.Logf("%s: verify repaired %+v", what, st)
		if st, err := verifySettled(ctx, l.dp); err != nil || st.Added+st.Changed+st.Removed != 0 {
			t.Fatalf("second verify after %s: %+v, %v", what, st, err)
		}
		l.checkPeers(t, what, []int{0, 1, 2})
		l.checkSubnets(t, what, 1, 2)
	}

	c, err := l.dir.Nft()
	if err != nil {
		t.Fatal(err)
	}
	c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "tunneldirector"})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	verify("table-deleted", 10)

	if _, err := l.dir.Run(ctx, "nft", "delete", "element", "inet", "tunneldirector", "peers4", "{", l.peers[0].If(netlab.IfOutside).Addr4.String(), "}"); err != nil {
		netlab.RequireTool(t, "nft binary", err)
	}
	verify("peer-element-deleted", 1)

	if _, err := l.dir.Run(ctx, "nft", "flush", "chain", "inet", "tunneldirector", "prerouting"); err != nil {
		t.Fatal(err)
	}
	verify("chain-flushed", 1)

	mask := uint32(0xff001fff)
	r := netlink.NewRule()
	r.Family, r.Priority, r.Mark, r.Mask, r.Table = unix.AF_INET, 100, 0x7d000001, &mask, 20001
	if err := l.dir.Handle().RuleDel(r); err != nil {
		t.Fatal(err)
	}
	verify("rule-deleted", 1)

	rt := &netlink.Route{Family: unix.AF_INET6, Table: 20003, Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}}
	if err := l.dir.Handle().RouteDel(rt); err != nil {
		t.Fatal(err)
	}
	verify("route-deleted", 1)

	lr := netlink.NewRule()
	lr.Family, lr.Priority, lr.Table = unix.AF_INET, 0, unix.RT_TABLE_LOCAL
	if err := l.dir.Handle().RuleAdd(lr); err != nil {
		t.Fatal(err)
	}
	verify("local-rule-back-at-0", 1)
}

// TestNSAdoptWithoutInterruption starts a second Dataplane on a programmed
// namespace while a peer sends continuously: its Sync must change nothing
// and no packet may be lost or misdelivered.
func TestNSAdoptWithoutInterruption(t *testing.T) {
	l := newLab(t, Config{})
	ctx := context.Background()
	dp2, st, sent := l.restartStreaming(t, "adopt-", l.des, nil)
	if st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("adopting sync changed the kernel: %+v", st)
	}
	if dp2.adopted != 1 {
		t.Fatalf("the restarted dataplane read the maps back instead of trusting the stored digest")
	}
	// The digest the kernel stores follows a delta, so the next restart
	// adopts too; and it is the digest of what the kernel really holds.
	if _, err := dp2.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{l.top.Peers[1].If(netlab.IfOutside).Addr4: 1}}); err != nil {
		t.Fatal(err)
	}
	ks, err := dp2.nft.Read()
	if err != nil {
		t.Fatal(err)
	}
	if !ks.HasStored || ks.Stored != ks.Digest() || ks.Stored != dp2.want.nft.Digest() {
		t.Fatalf("kernel stores digest %+v (%v); its maps' digest %+v, the target's %+v", ks.Stored, ks.HasStored, ks.Digest(), dp2.want.nft.Digest())
	}
	t.Logf("adoption: sync %+v; %d packets sent during it, all at the owner", st, sent)
}

// restartStreaming programs the lab's target with its dataplane, closes
// it, and starts a second one (prep, when set, adjusts it before its
// first Sync) that syncs to des while the first peer streams
// (streamWhile): a restarted director. It returns the second dataplane,
// its Sync's stats and the packets sent.
func (l *lab) restartStreaming(t *testing.T, prefix string, des *Desired, prep func(*dataplane)) (*dataplane, Stats, int) {
	t.Helper()
	ctx := context.Background()
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	if err := l.dp.Close(); err != nil {
		t.Fatal(err)
	}
	var dp2 *dataplane
	var st Stats
	sent := l.streamWhile(t, prefix, func() {
		var err error
		if dp2, err = newIn(Config{}, l.dir.NsHandle()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dp2.Close() })
		if prep != nil {
			prep(dp2)
		}
		if st, err = dp2.Sync(ctx, des); err != nil {
			t.Fatal(err)
		}
	})
	return dp2, st, sent
}

// streamWhile sends UDP to the VIP's NAT-T port from the first peer every
// millisecond, tagged with prefix, from 100 ms before during runs until
// 100 ms after, and fails t unless every packet reached the peer's owner
// (the first node) and none another node. It returns how many it sent.
func (l *lab) streamWhile(t *testing.T, prefix string, during func()) int {
	t.Helper()
	p := l.peers[0]
	conn, err := p.UDPSocket(netip.AddrPortFrom(p.If(netlab.IfOutside).Addr4, 4500))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	sent := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := conn.WriteToUDPAddrPort([]byte(fmt.Sprintf("%s%05d", prefix, sent)), netip.AddrPortFrom(l.top.VIP4, 4500)); err != nil {
				t.Error(err)
				return
			}
			sent++
			time.Sleep(time.Millisecond)
		}
	}()
	time.Sleep(100 * time.Millisecond)
	func() {
		defer func() { close(stop); wg.Wait() }()
		during()
		time.Sleep(100 * time.Millisecond)
	}()
	tagged := func(pk netlab.Packet) bool { return strings.HasPrefix(pk.Tag, prefix) }
	deadline := time.Now().Add(2 * time.Second)
	for l.caps[0].Count(tagged) < sent && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := l.caps[0].Count(tagged); got != sent || l.caps[1].Count(tagged)+l.caps[2].Count(tagged) != 0 {
		t.Fatalf("sent %d: %d at the owner, %d/%d elsewhere", sent, got, l.caps[1].Count(tagged), l.caps[2].Count(tagged))
	}
	return sent
}

// TestNSTeardownAndForeign checks that Teardown leaves only what was there
// before, and that a foreign rule or route in the director's ranges stops
// the constructor with an error naming it.
func TestNSTeardownAndForeign(t *testing.T) {
	l := newLab(t, Config{})
	ctx := context.Background()
	h := l.dir.Handle()
	snapshot := func() string {
		var b strings.Builder
		for _, f := range []int{unix.AF_INET, unix.AF_INET6} {
			rs, _ := h.RuleList(f)
			for _, r := range rs {
				fmt.Fprintf(&b, "rule %d %d %#x %d\n", f, r.Priority, r.Mark, r.Table)
			}
			rts, _ := h.RouteListFiltered(f, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
			for _, r := range rts {
				if r.Table != unix.RT_TABLE_LOCAL {
					fmt.Fprintf(&b, "route %d %v %v %d\n", f, r.Dst, r.Gw, r.Table)
				}
			}
		}
		return b.String()
	}
	before := snapshot()
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	if err := l.dp.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	if after := snapshot(); after != before {
		t.Fatalf("teardown left a difference:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	out, _ := l.dir.Run(ctx, "nft", "list", "tables")
	if strings.Contains(string(out), "tunneldirector") {
		t.Fatalf("table still present: %s", out)
	}

	r := netlink.NewRule()
	r.Family, r.Priority, r.Table = unix.AF_INET, 100, 777
	if err := h.RuleAdd(r); err != nil {
		t.Fatal(err)
	}
	_, err := newIn(Config{}, l.dir.NsHandle())
	if err == nil || !strings.Contains(err.Error(), "rule priority 100") {
		t.Fatalf("foreign rule at pref 100: err %v", err)
	}
	t.Logf("refused: %v", err)
	if err := h.RuleDel(r); err != nil {
		t.Fatal(err)
	}
	if err := l.dir.AddRoute(netlab.Route{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: l.top.Nodes[0].If(netlab.IfInside).Addr4, Table: 20005}); err != nil {
		t.Fatal(err)
	}
	_, err = newIn(Config{}, l.dir.NsHandle())
	if err == nil || !strings.Contains(err.Error(), "routing table 20005") {
		t.Fatalf("foreign route in table 20005: err %v", err)
	}
	t.Logf("refused: %v", err)
}

// TestNSConfirm asks the kernel for peers and subnets one by one, the way
// Verify checks what an interrupted dump lacked: the ones the maps hold
// come back with their marks, the others do not.
func TestNSConfirm(t *testing.T) {
	l := newLab(t, Config{})
	if _, err := l.dp.Sync(context.Background(), l.des); err != nil {
		t.Fatal(err)
	}
	held := l.peers[0].If(netlab.IfOutside).Addr4
	absent := netip.MustParseAddr("198.51.100.250")
	absent6 := netip.MustParseAddr("2001:db8:100::250")
	pm, sm, err := l.dp.nft.Confirm([]netip.Addr{held, absent, absent6}, []netip.Prefix{subnet4, subnet6, netip.MustParsePrefix("10.21.0.0/27")})
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := pm.Get(held); !ok || v != l.dp.cfg.Fwmark(l.des.Peers[held]) || pm.Len() != 1 {
		t.Fatalf("peers confirmed: %d, %s -> %#x %v (want only it, on %#x)", pm.Len(), held, v, ok, l.dp.cfg.Fwmark(l.des.Peers[held]))
	}
	if v, ok := sm.Get(subnet4); !ok || v != l.dp.cfg.Fwmark(l.des.Subnets[subnet4]) || sm.Len() != 2 {
		t.Fatalf("subnets confirmed: %d, %s -> %#x %v", sm.Len(), subnet4, v, ok)
	}
	if _, ok := sm.Get(subnet6); !ok {
		t.Fatalf("%s not confirmed", subnet6)
	}
}

// TestNSReloadInsteadOfRead: a restarted dataplane whose target differs
// from the maps the kernel holds (the director stopped between its store's
// commit and the kernel's), with more elements than it reads back,
// replaces the table in one transaction: the kernel ends up holding the
// target, and a peer's packets stream to their owner throughout.
func TestNSReloadInsteadOfRead(t *testing.T) {
	l := newLab(t, Config{})
	// The table gained a peer the kernel never got.
	des := *l.des
	des.Peers = maps.Clone(l.des.Peers)
	des.Peers[netip.MustParseAddr("192.0.2.200")] = 2
	dp2, st, sent := l.restartStreaming(t, "reload-", &des, func(d *dataplane) { d.reloadOver = 0 })
	if dp2.reloaded != 1 || dp2.adopted != 0 {
		t.Fatalf("reloaded %d, adopted %d: want the maps replaced without reading them", dp2.reloaded, dp2.adopted)
	}
	ks, err := dp2.nft.Read()
	if err != nil {
		t.Fatal(err)
	}
	if d := ks.Digest(); d != dp2.want.nft.Digest() || !ks.HasStored || ks.Stored != d || ks.Peers.Len() != len(des.Peers) {
		t.Fatalf("kernel after the reload: %d peers, digest %+v, stored %+v; the target's %+v", ks.Peers.Len(), d, ks.Stored, dp2.want.nft.Digest())
	}
	t.Logf("reload: sync %+v; %d packets sent during it, all at the owner", st, sent)
}

// TestNSMapGrows: the kernel creates the peer and subnet maps with the
// sizes the director gives them and refuses elements past a size, so an
// update that outgrows a map replaces the table with larger maps in one
// transaction: the kernel then holds the whole target in maps of the new
// size, and a peer's packets stream to their owner throughout.
func TestNSMapGrows(t *testing.T) {
	l := newLab(t, Config{})
	ctx := context.Background()
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	ks, err := l.dp.nft.ReadMeta()
	if err != nil {
		t.Fatal(err)
	}
	if ks.Sizes["peers4"] != 1024 || ks.Sizes["peers6"] != 1024 || ks.Sizes["sub4_27"] != 1024 {
		t.Fatalf("kernel map sizes after the first sync: %v; want 1024 each", ks.Sizes)
	}
	// 1,100 more IPv4 peers: 1,103 do not fit 1,024.
	dl := &Delta{SetPeers: map[netip.Addr]uint16{}}
	for i := range 1100 {
		dl.SetPeers[netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})] = uint16(i%3 + 1)
	}
	var st Stats
	sent := l.streamWhile(t, "grow-", func() {
		if st, err = l.dp.Update(ctx, dl); err != nil {
			t.Fatalf("update past the map's size: %v", err)
		}
	})
	if st.Added != 1100 || st.Changed+st.Removed != 0 {
		t.Fatalf("update stats %+v: want the 1,100 additions only", st)
	}
	if ks, err = l.dp.nft.Read(); err != nil {
		t.Fatal(err)
	}
	if ks.Sizes["peers4"] != 2048 || ks.Peers.Len() != len(l.des.Peers)+1100 || ks.Digest() != l.dp.want.nft.Digest() {
		t.Fatalf("kernel after growing: peers4 size %d, %d peers, digest %+v; want 2048, %d, the target's %+v",
			ks.Sizes["peers4"], ks.Peers.Len(), ks.Digest(), len(l.des.Peers)+1100, l.dp.want.nft.Digest())
	}
	// The model knows the new size: the next addition fits without a
	// recreation, and the kernel still agrees.
	if st, err = l.dp.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{netip.MustParseAddr("198.18.100.1"): 1}}); err != nil || st.Added != 1 {
		t.Fatalf("one more peer: %+v %v", st, err)
	}
	if vs, err := l.dp.Verify(ctx); err != nil || vs.Added+vs.Changed+vs.Removed != 0 {
		t.Fatalf("verify after growing: %+v %v; want nothing to repair", vs, err)
	}
	t.Logf("grown: %+v; %d packets sent during it, all at the owner", st, sent)
}

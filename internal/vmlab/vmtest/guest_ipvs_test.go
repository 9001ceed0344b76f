package vmtest

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/cloudflare/ipvs"
	"github.com/cloudflare/ipvs/netmask"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/internal/vmlab"
)

// requireIPVS opens IPVS in ns (the client's socket belongs to the
// namespace it is opened in) and probes it with Info.
func requireIPVS(t *testing.T, ns *netlab.NS) ipvs.Client {
	t.Helper()
	var h ipvs.Client
	if err := ns.Do(func() (err error) { h, err = ipvs.New(); return err }); err != nil {
		t.Fatalf("IPVS generic netlink family missing in the guest (ip_vs not loaded?): %v", err)
	}
	if _, err := h.Info(); err != nil {
		t.Fatalf("IPVS info in %s: %v", ns.Name, err)
	}
	return h
}

func fwmarkService(mark uint32, v6 bool) ipvs.Service {
	s := ipvs.Service{FWMark: mark, Family: ipvs.INET, Scheduler: "rr", Netmask: netmask.MaskFrom(32, 32)}
	if v6 {
		s.Family = ipvs.INET6
		s.Netmask = netmask.MaskFrom(128, 128)
	}
	return s
}

// TestGuestIPVSFwmarkService creates fwmark services with direct-routing
// destinations (IPv4 and IPv6) through cloudflare/ipvs and reads them back.
func TestGuestIPVSFwmarkService(t *testing.T) {
	vmlab.RequireGuest(t)
	l := netlab.New(t)
	d, _ := l.Pair(t, "dir", "node", "in0")
	// IPVS rejects (EINVAL) a destination the director cannot route, so
	// the inside network must exist first.
	for _, p := range []string{"192.0.2.1/24", "2001:db8:2::1/64"} {
		if err := d.AddAddr("in0", netip.MustParsePrefix(p)); err != nil {
			t.Fatal(err)
		}
	}
	h := requireIPVS(t, d)
	start := time.Now()
	for i, c := range []struct {
		v6   bool
		dest string
	}{{false, "192.0.2.11"}, {true, "2001:db8:2::b"}} {
		svc := fwmarkService(0x100+uint32(i), c.v6)
		if err := h.CreateService(svc); err != nil {
			t.Fatalf("new fwmark service %#x: %v", svc.FWMark, err)
		}
		dst := ipvs.Destination{Address: netip.MustParseAddr(c.dest), Weight: 1, FwdMethod: ipvs.DirectRoute, Family: svc.Family}
		if err := h.CreateDestination(svc, dst); err != nil {
			t.Fatalf("new DR destination %s for fwmark %#x: %v", c.dest, svc.FWMark, err)
		}
	}
	t.Logf("created 2 services with destinations in %v", time.Since(start))
	svcs, err := h.Services()
	if err != nil {
		t.Fatal(err)
	}
	if len(svcs) != 2 {
		t.Fatalf("read back %d services, want 2", len(svcs))
	}
	for _, s := range svcs {
		dests, err := h.Destinations(s.Service)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("service fwmark %#x af %s sched %s: %d destinations", s.FWMark, s.Family, s.Scheduler, len(dests))
		if len(dests) != 1 || dests[0].FwdMethod != ipvs.DirectRoute {
			t.Errorf("service fwmark %#x: destinations %+v, want one direct-routing destination", s.FWMark, dests)
		}
	}
}

// markByPeer installs on ns an nftables map peer address -> mark applied in
// prerouting at mangle priority.
func markByPeer(t *testing.T, ns *netlab.NS, marks map[netip.Addr]uint32) {
	t.Helper()
	c, err := ns.Nft()
	if err != nil {
		t.Fatal(err)
	}
	tbl := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "tdsteer"})
	ch := c.AddChain(&nftables.Chain{Name: "pre", Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
	for _, f := range []struct {
		nfproto  byte
		off, len uint32
		key      nftables.SetDatatype
		name     string
		v6       bool
	}{{unix.NFPROTO_IPV4, 12, 4, nftables.TypeIPAddr, "peer4", false}, {unix.NFPROTO_IPV6, 8, 16, nftables.TypeIP6Addr, "peer6", true}} {
		set := &nftables.Set{Table: tbl, Name: f.name, IsMap: true, KeyType: f.key, DataType: nftables.TypeMark}
		var els []nftables.SetElement
		for a, m := range marks {
			if a.Is6() == f.v6 {
				els = append(els, nftables.SetElement{Key: a.AsSlice(), Val: binaryutil.NativeEndian.PutUint32(m)})
			}
		}
		if err := c.AddSet(set, els); err != nil {
			t.Fatal(err)
		}
		c.AddRule(&nftables.Rule{Table: tbl, Chain: ch, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{f.nfproto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.off, Len: f.len},
			&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: set.Name, SetID: set.ID},
			&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
		}})
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("%s: install peer marks: %v", ns.Name, err)
	}
}

// TestGuestIPVSForwardsIKE proves the IKE/NAT-T path with real packets in a
// netlab topology inside the guest: nftables marks by peer address, one
// IPVS fwmark service per node with a direct-routing destination, VIP local
// on the director and on the nodes' lo. Each peer's UDP 500 and 4500
// datagrams must reach its owner node only, over IPv4 and IPv6.
func TestGuestIPVSForwardsIKE(t *testing.T) {
	vmlab.RequireGuest(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 2, Directors: 1, Nodes: 2, VIPOnDirectors: true})
	dir := top.Directors[0]
	h := requireIPVS(t, dir.NS)
	owners := []int{1, 0}
	marks := map[netip.Addr]uint32{}
	for i, p := range top.Peers {
		marks[p.If(netlab.IfOutside).Addr4] = 0x100 + uint32(owners[i])
		marks[p.If(netlab.IfOutside).Addr6] = 0x100 + uint32(owners[i])
	}
	markByPeer(t, dir.NS, marks)
	for i, nd := range top.Nodes {
		for _, v6 := range []bool{false, true} {
			svc := fwmarkService(0x100+uint32(i), v6)
			if err := h.CreateService(svc); err != nil {
				t.Fatal(err)
			}
			dst := ipvs.Destination{Address: nd.If(netlab.IfInside).Addr(v6), Weight: 1,
				FwdMethod: ipvs.DirectRoute, Family: svc.Family}
			if err := h.CreateDestination(svc, dst); err != nil {
				t.Fatalf("DR destination %s: %v", nd.If(netlab.IfInside).Addr(v6), err)
			}
		}
	}
	var caps []*netlab.Capture
	for _, nd := range top.Nodes {
		c, err := nd.Capture("")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		caps = append(caps, c)
	}
	for _, v6 := range []bool{false, true} {
		vip := top.VIP4
		if v6 {
			vip = top.VIP6
		}
		for _, port := range []uint16{500, 4500} {
			for pi, peer := range top.Peers {
				tag := fmt.Sprintf("ipvs/v6=%v/%d/%s", v6, port, peer.Name)
				src := netip.AddrPortFrom(peer.If(netlab.IfOutside).Addr(v6), 40500)
				if err := peer.SendUDP(src, netip.AddrPortFrom(vip, port), []byte(tag)); err != nil {
					t.Fatal(err)
				}
				want := owners[pi]
				if _, ok := caps[want].Wait(3*time.Second, netlab.Tagged(tag)); !ok {
					t.Fatalf("%s: not captured at owner node%d", tag, want)
				}
				time.Sleep(20 * time.Millisecond)
				for ni, c := range caps {
					if ni != want && c.Count(netlab.Tagged(tag)) != 0 {
						t.Errorf("%s: also captured at node%d", tag, ni)
					}
				}
			}
		}
	}
}

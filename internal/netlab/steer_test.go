package netlab_test

import (
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// installSteering programs the route-only steering of DESIGN.md on a
// director: an nftables map peer address -> mark for ESP and UDP 500/4500,
// "fwmark M lookup T" rules, and a default route to the owning node in T.
// owner maps a peer address to a node index.
func installSteering(t *testing.T, top *netlab.Topology, dir *netlab.Host, owner map[netip.Addr]int) {
	t.Helper()
	c, err := dir.Nft()
	if err != nil {
		t.Fatal(err)
	}
	tbl := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "tdsteer"})
	m4 := &nftables.Set{Table: tbl, Name: "peer4", IsMap: true, KeyType: nftables.TypeIPAddr, DataType: nftables.TypeMark}
	m6 := &nftables.Set{Table: tbl, Name: "peer6", IsMap: true, KeyType: nftables.TypeIP6Addr, DataType: nftables.TypeMark}
	var e4, e6 []nftables.SetElement
	for peer, node := range owner {
		el := nftables.SetElement{Key: peer.AsSlice(), Val: binaryutil.NativeEndian.PutUint32(markOf(node))}
		if peer.Is4() {
			e4 = append(e4, el)
		} else {
			e6 = append(e6, el)
		}
	}
	if err := c.AddSet(m4, e4); err != nil {
		t.Fatalf("add map peer4: %v", err)
	}
	if err := c.AddSet(m6, e6); err != nil {
		t.Fatalf("add map peer6: %v", err)
	}
	ch := c.AddChain(&nftables.Chain{Name: "pre", Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
	type fam struct {
		nfproto byte
		off     uint32
		alen    uint32
		set     *nftables.Set
	}
	for _, f := range []fam{{unix.NFPROTO_IPV4, 12, 4, m4}, {unix.NFPROTO_IPV6, 8, 16, m6}} {
		// One rule per selector: ESP, UDP dport 500, UDP dport 4500.
		sels := [][]expr.Any{
			{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ESP}}},
		}
		for _, port := range []uint16{500, 4500} {
			sels = append(sels, []expr.Any{
				&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
			})
		}
		for _, sel := range sels {
			ex := []expr.Any{
				&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{f.nfproto}},
			}
			ex = append(ex, sel...)
			ex = append(ex,
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.off, Len: f.alen},
				&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: f.set.Name, SetID: f.set.ID},
				&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
			)
			c.AddRule(&nftables.Rule{Table: tbl, Chain: ch, Exprs: ex})
		}
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("director %s: install nftables steering: %v", dir.Name, err)
	}
	for i, nd := range top.Nodes {
		for _, v6 := range []bool{false, true} {
			dst := netip.MustParsePrefix("0.0.0.0/0")
			if v6 {
				dst = netip.MustParsePrefix("::/0")
			}
			if err := dir.AddRoute(netlab.Route{Dst: dst, Via: nd.If(netlab.IfInside).Addr(v6), Table: tableOf(i)}); err != nil {
				t.Fatal(err)
			}
			if err := dir.AddRule(netlab.Rule{IPv6: v6, Priority: 100 + i, Mark: markOf(i), Table: tableOf(i)}); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func markOf(node int) uint32 { return 0x100 + uint32(node) }
func tableOf(node int) int   { return 1000 + node }

package ipvstest

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/tunneldirector/tunneldirector/ipvs"
)

var (
	pA = netip.MustParseAddr("198.51.100.101")
	pB = netip.MustParseAddr("2001:db8:100::66")
	sA = netip.MustParsePrefix("10.1.0.0/27")
	sB = netip.MustParsePrefix("2001:db8:aa::/64")
)

func unitDesired() *ipvs.Desired {
	return &ipvs.Desired{
		VIPs: []netip.Addr{netip.MustParseAddr("203.0.113.1")},
		Nodes: []ipvs.Node{
			{Mark: 1, Name: "n1", Addr: netip.MustParseAddr("192.0.2.11"), Active: true},
			{Mark: 2, Name: "n2", Addr: netip.MustParseAddr("192.0.2.12"), Active: true},
		},
		Peers:   map[netip.Addr]uint16{pA: 1, pB: 2},
		Subnets: map[netip.Prefix]uint16{sA: 1, sB: 2},
	}
}

func TestFakeRecordsAndHoldsState(t *testing.T) {
	f := NewFake(ipvs.ModeAuto)
	if f.Mode() != ipvs.ModeRouteOnly {
		t.Fatalf("mode %s", f.Mode())
	}
	ctx := context.Background()
	d := unitDesired()
	if st, err := f.Sync(ctx, d); err != nil || st.Added != 4 {
		t.Fatalf("%+v %v", st, err)
	}
	if st, _ := f.Sync(ctx, d); st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("idempotent sync %+v", st)
	}
	if st, _ := f.Update(ctx, &ipvs.Delta{SetPeers: map[netip.Addr]uint16{pA: 2}, DeleteSubnets: []netip.Prefix{sA}}); st.Changed != 1 || st.Removed != 1 {
		t.Fatalf("update %+v", st)
	}
	if got := f.State(); got.Peers[pA] != 2 || len(got.Subnets) != 1 {
		t.Fatalf("state %+v", got)
	}
	f.Err = errors.New("boom")
	if _, err := f.Update(ctx, &ipvs.Delta{}); err == nil {
		t.Fatal("Err not returned")
	}
	f.Drift = ipvs.Stats{Added: 3}
	if st, _ := f.Verify(ctx); st.Added != 3 {
		t.Fatalf("verify %+v", st)
	}
	if err := f.Teardown(ctx); err != nil || f.State() != nil {
		t.Fatal("teardown")
	}
	var ops []string
	for _, c := range f.Calls() {
		ops = append(ops, c.Op)
	}
	if len(ops) != 6 || ops[0] != "Sync" || ops[5] != "Teardown" {
		t.Fatalf("calls %v", ops)
	}
}

func TestFakeBuckets(t *testing.T) {
	f := NewFake(ipvs.ModeRouteOnly)
	ctx := context.Background()
	d := unitDesired()
	d.Buckets = []uint16{1, 2, 1, 2}
	if _, err := f.Sync(ctx, d); err != nil {
		t.Fatal(err)
	}
	if st, err := f.Update(ctx, &ipvs.Delta{Buckets: map[int]uint16{0: 2, 3: 0}}); err != nil || st.Changed != 2 {
		t.Fatalf("%+v %v", st, err)
	}
	if got := f.State().Buckets; got[0] != 2 || got[3] != 0 || got[1] != 2 {
		t.Fatalf("buckets %v", got)
	}
	if _, err := f.Update(ctx, &ipvs.Delta{Buckets: map[int]uint16{4: 1}}); err == nil {
		t.Fatal("a bucket beyond the synced count")
	}
}

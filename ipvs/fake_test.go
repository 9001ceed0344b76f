package ipvs

import (
	"context"
	"errors"
	"net/netip"
	"testing"
)

func TestFakeRecordsAndHoldsState(t *testing.T) {
	f := NewFake(ModeAuto)
	if f.Mode() != ModeRouteOnly {
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
	if st, _ := f.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{pA: 2}, DeleteSubnets: []netip.Prefix{sA}}); st.Changed != 1 || st.Removed != 1 {
		t.Fatalf("update %+v", st)
	}
	if got := f.State(); got.Peers[pA] != 2 || len(got.Subnets) != 1 {
		t.Fatalf("state %+v", got)
	}
	f.Err = errors.New("boom")
	if _, err := f.Update(ctx, &Delta{}); err == nil {
		t.Fatal("Err not returned")
	}
	f.Drift = Stats{Added: 3}
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

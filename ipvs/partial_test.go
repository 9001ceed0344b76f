package ipvs

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"syscall"
	"testing"
)

// TestSyncAppliesAllButAnUnreachableNode: a route the kernel refuses (the
// node is unreachable) fails that node's objects only; the maps, the other
// nodes' routes, rules and services are applied, the error names the
// object, and a Verify once the node is reachable completes the job.
func TestSyncAppliesAllButAnUnreachableNode(t *testing.T) {
	for _, ipvs := range []bool{false, true} {
		k := newFakeKernel(ipvs)
		unreachable := netip.MustParseAddr("192.0.2.12")
		k.failRoute = map[netip.Addr]error{unreachable: syscall.ENETUNREACH}
		dp, err := newFake(Config{}, k)
		if err != nil {
			t.Fatal(err)
		}
		_, err = dp.Sync(context.Background(), unitDesired())
		var pe *PartialError
		if !errors.As(err, &pe) || len(pe.Failed) != 1 || !strings.Contains(err.Error(), "192.0.2.12") || !errors.Is(err, syscall.ENETUNREACH) {
			t.Fatalf("ipvs=%v: sync with an unreachable node: %v", ipvs, err)
		}
		if k.nft.Peers.Len() != 2 || k.nft.Subnets.Len() != 2 || len(k.routes) != 2 {
			t.Fatalf("ipvs=%v: not everything else applied: peers %d subnets %d routes %v", ipvs, k.nft.Peers.Len(), k.nft.Subnets.Len(), k.routes)
		}
		if ipvs && len(k.svcs) != 3 {
			t.Fatalf("services %v", k.svcs)
		}
		delete(k.failRoute, unreachable)
		st, err := verifySettled(context.Background(), dp)
		if err != nil || st.Added != 1 {
			t.Fatalf("ipvs=%v: verify once reachable: %+v %v", ipvs, st, err)
		}
	}
}

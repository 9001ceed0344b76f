package route

import (
	"net/netip"
	"testing"
)

var cfg = Config{TableBase: 20000, RulePriority: 100, LocalRulePriority: 1000, MarkBase: 0x7d000000, MarkMask: 0xff001fff, NodeBits: 0x1fff, Protocol: 211}

// TestWantNodeRoutes: node 3's routes and rules are made by Want, one per
// family it has an address in.
func TestWantNodeRoutes(t *testing.T) {
	s := cfg.Want([]Node{
		{Mark: 3, Fwmark: 0x7d000003, Addr4: netip.MustParseAddr("192.0.2.13"), Addr6: netip.MustParseAddr("2001:db8:2::d")},
		{Mark: 4, Fwmark: 0x7d000004, Addr4: netip.MustParseAddr("192.0.2.14")},
	})
	if s.Routes[RouteKey{false, 20003}] != netip.MustParseAddr("192.0.2.13") || s.Routes[RouteKey{true, 20003}] != netip.MustParseAddr("2001:db8:2::d") || len(s.Routes) != 3 {
		t.Fatalf("routes %v", s.Routes)
	}
	if _, ok := s.Rules[RuleKey{true, 0x7d000003, 20003}]; !ok || len(s.Rules) != 3 {
		t.Fatalf("rules %v", s.Rules)
	}
	if s.Local != [2]bool{true, true} {
		t.Fatal("local rule not moved")
	}
}

func TestInRange(t *testing.T) {
	for _, c := range []struct {
		mark, mask uint32
		want       bool
	}{
		{0x7d000005, 0xffffffff, true},
		{0x7d001005, 0xff001fff, true},
		{0x7e000005, 0xffffffff, false},
		{0x00000005, 0x0000ffff, true},  // matches any base: overlaps
		{0x7d000000, 0xff000000, false}, // no node bits
	} {
		if got := cfg.inRange(c.mark, c.mask); got != c.want {
			t.Errorf("inRange(%#x/%#x) = %v", c.mark, c.mask, got)
		}
	}
}

package metrics

import (
	"net"
	"net/netip"
	"strings"
	"testing"
)

func panics(f func()) (msg string) {
	defer func() {
		if r := recover(); r != nil {
			msg = r.(string)
		}
	}()
	f()
	return ""
}

// TestNamingConventions: a family that breaks the conventions is refused
// when it is made, saying which rule.
func TestNamingConventions(t *testing.T) {
	if got := Name(Table, "moves_total", true); got != "tunneldirector_table_moves_total" {
		t.Errorf("Name: %s", got)
	}
	for _, tc := range []struct {
		f    func()
		want string
	}{
		{func() { NewCounterVec(Table, "moves", "h") }, "must end in _total"},
		{func() { NewGaugeVec(Table, "tunnels_total", "h") }, "not a counter"},
		{func() { NewGaugeVec("tables", "tunnels", "h") }, "subsystem \"tables\""},
		{func() { NewGaugeVec(Table, "Tunnels", "h") }, "lower snake case"},
		{func() { NewHistogramVec(Dataplane, "reconcile_duration", "h", DurationBuckets) }, "must end in its unit"},
	} {
		if got := panics(tc.f); !strings.Contains(got, tc.want) {
			t.Errorf("panic %q, want %q", got, tc.want)
		}
	}
	if got := panics(func() { NewHistogramVec(Dataplane, "reconcile_duration_seconds", "h", DurationBuckets, "kind") }); got != "" {
		t.Errorf("a well-named histogram refused: %s", got)
	}
}

// TestListenErrorNamesTheKey: an address in use is a start error naming
// metrics.listen.
func TestListenErrorNamesTheKey(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	addr := netip.MustParseAddrPort(busy.Addr().String())
	_, err = Listen(addr)
	if err == nil || !strings.HasPrefix(err.Error(), "metrics.listen: cannot listen on "+addr.String()) {
		t.Fatalf("listen on a busy port: %v", err)
	}
}

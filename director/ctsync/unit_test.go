package ctsync

import (
	"errors"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// kinds returns one flow of each kind the records distinguish.
func kinds() []conntrack.Flow {
	a := flowN(1)
	b := flowN(2) // IPv6, marked, zoned
	b.Orig = conntrack.MakeTuple(conntrack.ProtoTCP, netip.MustParseAddr("2001:db8:1::64"), netip.MustParseAddr("fd70::5"), 40000, 443)
	b.Reply = b.Orig.Inverse()
	b.Mark, b.Zone = 0x7d000003, 9
	c := flowN(3) // source NAT
	c.Reply = conntrack.MakeTuple(conntrack.ProtoTCP, server, netip.MustParseAddr("198.18.1.1"), 22, 61000)
	c.Status |= conntrack.StatusSrcNAT
	d := conntrack.Flow{Orig: conntrack.MakeTuple(conntrack.ProtoESP, netip.MustParseAddr("198.51.100.101"), netip.MustParseAddr("203.0.113.1"), 0, 0), Timeout: 600}
	d.Reply = d.Orig.Inverse()
	e := conntrack.Flow{Orig: conntrack.MakeTuple(conntrack.ProtoICMP, server, netip.MustParseAddr("10.70.0.9"), 77, 8<<8), Timeout: 30}
	e.Reply = e.Orig.Inverse()
	return []conntrack.Flow{a, b, c, d, e}
}

// TestRecordRoundTrip encodes every kind of record and decodes it back.
func TestRecordRoundTrip(t *testing.T) {
	var b []byte
	fs := kinds()
	for i := range fs {
		b = appendPut(b, &fs[i])
		b = appendDestroy(b, &fs[i])
	}
	b = appendMarker(b, recBegin, 5)
	b = appendMarker(b, recEnd, 5)
	if n := len(appendPut(nil, &fs[0])); n != 24 {
		t.Errorf("IPv4 TCP put is %d bytes, want 24", n)
	}
	r := reader{b: b}
	var rec record
	for i := range fs {
		if !r.next(&rec) || rec.kind != recPut || rec.flow != fs[i] {
			t.Fatalf("put %d: %+v %v, want %+v", i, rec.flow, r.err, fs[i])
		}
		if !r.next(&rec) || rec.kind != recDestroy || keyOf(&rec.flow) != keyOf(&fs[i]) {
			t.Fatalf("destroy %d: %+v %v", i, rec, r.err)
		}
	}
	if !r.next(&rec) || rec.kind != recBegin || rec.gen != 5 || !r.next(&rec) || rec.kind != recEnd || r.next(&rec) || r.err != nil {
		t.Fatalf("markers: %+v %v", rec, r.err)
	}
	for cut := 1; cut < len(appendPut(nil, &fs[1])); cut++ {
		r := reader{b: appendPut(nil, &fs[1])[:cut]}
		if r.next(&rec) || !errors.Is(r.err, errRecord) {
			t.Fatalf("put truncated to %d bytes decoded: %+v %v", cut, rec, r.err)
		}
	}
}

// FuzzRecords: the backup's decoder of the master's records never panics,
// refuses with errRecord, and what it decodes encodes back the same.
func FuzzRecords(f *testing.F) {
	fs := kinds()
	for i := range fs {
		f.Add(appendPut(nil, &fs[i]))
		f.Add(appendDestroy(nil, &fs[i]))
	}
	f.Add(appendMarker(appendMarker(nil, recBegin, 1), recEnd, 1))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := reader{b: b}
		var rec record
		for r.next(&rec) {
			var again []byte
			switch rec.kind {
			case recPut:
				again = appendPut(nil, &rec.flow)
			case recDestroy:
				again = appendDestroy(nil, &rec.flow)
			default:
				continue
			}
			r2 := reader{b: again}
			var rec2 record
			if !r2.next(&rec2) || rec2.flow != rec.flow {
				t.Fatalf("re-encoded record decodes as %+v (%v), was %+v", rec2.flow, r2.err, rec.flow)
			}
		}
		if r.err != nil && !errors.Is(r.err, errRecord) {
			t.Fatalf("error not errRecord: %v", r.err)
		}
	})
}

// TestFilter: the address, protocol and state rules.
func TestFilter(t *testing.T) {
	c := DefaultConfig()
	c.IgnoreProtocols = []Proto{conntrack.ProtoUDP}
	c.Ignore = []netip.Prefix{netip.MustParsePrefix("10.70.9.0/24")}
	c.Include = []netip.Prefix{netip.MustParsePrefix("100.64.0.0/10")}
	f := NewFilter(&c, testScope)
	f.SetOwn([]netip.Addr{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("198.18.1.1")})
	mk := func(proto uint8, src, dst string, state uint8) conntrack.Flow {
		fl := conntrack.Flow{Orig: conntrack.MakeTuple(proto, netip.MustParseAddr(src), netip.MustParseAddr(dst), 1, 2)}
		fl.Reply = fl.Orig.Inverse()
		if proto == conntrack.ProtoTCP {
			fl.TCP = conntrack.TCPInfo{Set: true, State: state}
		}
		return fl
	}
	nat := mk(conntrack.ProtoTCP, "192.0.2.50", "192.0.2.51", conntrack.TCPEstablished)
	nat.Reply.Dst = netip.MustParseAddr("10.70.1.1").As16() // translated into the subnet
	for _, c := range []struct {
		name string
		fl   conntrack.Flow
		want bool
	}{
		{"to a protected subnet", mk(conntrack.ProtoTCP, "198.18.1.100", "10.70.1.1", conntrack.TCPEstablished), true},
		{"from a protected subnet", mk(conntrack.ProtoTCP, "10.70.1.1", "198.18.1.100", conntrack.TCPEstablished), true},
		{"to the VIP", mk(conntrack.ProtoESP, "198.51.100.101", "203.0.113.1", 0), true},
		{"include", mk(conntrack.ProtoTCP, "100.64.1.1", "192.0.2.9", conntrack.TCPEstablished), true},
		{"elsewhere", mk(conntrack.ProtoTCP, "192.0.2.1", "192.0.2.9", conntrack.TCPEstablished), false},
		{"ignored protocol", mk(conntrack.ProtoUDP, "198.18.1.100", "10.70.1.1", 0), false},
		{"ignored prefix", mk(conntrack.ProtoTCP, "198.18.1.100", "10.70.9.1", conntrack.TCPEstablished), false},
		{"the director's own", mk(conntrack.ProtoTCP, "198.18.1.1", "10.70.1.1", conntrack.TCPEstablished), false},
		{"held back: SYN_SENT", mk(conntrack.ProtoTCP, "198.18.1.100", "10.70.1.1", conntrack.TCPSynSent), false},
		{"NAT into the subnet", nat, true},
	} {
		if got := f.Match(&c.fl); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
	held := mk(conntrack.ProtoTCP, "198.18.1.100", "10.70.1.1", conntrack.TCPSynSent)
	if !f.Addresses(&held) {
		t.Error("a held-back flow's destroy must pass")
	}
}

// TestCacheBoundAndExpiry: entries expire with their own timeouts (but
// not before hold), a full cache drops its oldest and counts them.
func TestCacheBoundAndExpiry(t *testing.T) {
	clk := clock.NewManual(epoch0)
	c := NewCache(1000, 90*time.Second, clk, nil)
	for i := range 1000 {
		f := flowN(i)
		f.Timeout = 30 // below hold: kept for hold
		if i >= 500 {
			f.Timeout = 432000
		}
		c.Put(&f)
		if i == 499 {
			clk.Advance(10 * time.Second)
		}
	}
	clk.Advance(75 * time.Second) // the first 500 are 85 s old
	if n := c.Expire(); n != 0 {
		t.Fatalf("expired %d before hold", n)
	}
	clk.Advance(10 * time.Second) // the first 500: 95 s old, hold 90 s
	if n := c.Expire(); n != 500 || c.Len() != 500 {
		t.Fatalf("expired %d, %d left", n, c.Len())
	}
	// Fill to the bound and beyond: the oldest go first.
	for i := 1000; i < 1600; i++ {
		clk.Advance(time.Second)
		f := flowN(i)
		c.Put(&f)
	}
	if c.Len() > 1000 || c.Counters().Evicted == 0 {
		t.Fatalf("cache at %d entries, evicted %d", c.Len(), c.Counters().Evicted)
	}
	// Every new entry is there; the entries dropped were old ones.
	have := map[key]bool{}
	for _, f := range c.Flows(0) {
		have[keyOf(&f)] = true
	}
	old := 0
	for i := 500; i < 1000; i++ {
		f := flowN(i)
		if have[keyOf(&f)] {
			old++
		}
	}
	for i := 1000; i < 1600; i++ {
		if f := flowN(i); !have[keyOf(&f)] {
			t.Fatalf("a new entry (%d) was evicted before the old ones", i)
		}
	}
	if old != 400 || c.Counters().Evicted != 100 {
		t.Fatalf("%d old entries left, %d evicted; want 400 and 100", old, c.Counters().Evicted)
	}
}

// TestCacheMemory measures the cache at 1,000,000 flows (the README's
// figure): go test -run TestCacheMemory -v ./director/ctsync/
func TestCacheMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("a million entries: not with -short")
	}
	n := 1_000_000
	clk := clock.NewManual(epoch0)
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	c := NewCache(2*n, time.Minute, clk, nil)
	for i := range n {
		f := flowN(i)
		f.Orig.Src = netip.AddrFrom4([4]byte{100, byte(i >> 16), byte(i >> 8), byte(i)}).As16()
		f.Reply = f.Orig.Inverse()
		c.Put(&f)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / float64(n)
	t.Logf("cache of %d flows: %.0f bytes per flow (%.0f MB)", c.Len(), per, per*float64(n)/1e6)
	if c.Len() != n {
		t.Fatalf("%d entries", c.Len())
	}
	if per > 200 {
		t.Errorf("%.0f bytes per flow, want at most 200", per)
	}
}

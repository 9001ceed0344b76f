package affinity

import (
	"bytes"
	"encoding/hex"
	"errors"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func sampleChanges() []Change {
	t0 := time.Date(2026, 3, 4, 5, 6, 7, 8, time.UTC)
	return []Change{
		{Kind: PutNode, Reason: "import", Node: &Node{Name: "vpn-a", Addr: addr("172.16.0.1"), Weight: 150, Capacity: 2000, State: NodeDraining, Mark: 7, Comment: "rack 3"}},
		{Kind: PutNode, Node: &Node{Name: "vpn-6", Addr: addr("fd00::6"), Weight: 100, Mark: 4095}},
		{Kind: PutTunnel, Reason: "node vpn-b down", Tunnel: &Tunnel{ID: "branch-17", Peer: addr("2001:db8::17"), Subnets: []netip.Prefix{pfx("10.17.0.0/27"), pfx("fd00:17::/64")}, Node: "vpn-a", Pinned: true, Comment: "Zürich, \"HQ\"", Created: t0, Updated: t0.Add(time.Hour), Revision: 99}},
		{Kind: PutTunnel, Reason: "agent vpn-a: negotiated subnets", Tunnel: &Tunnel{ID: "learned-192.0.2.9", Peer: addr("192.0.2.9"), Subnets: []netip.Prefix{pfx("10.9.0.0/24")}, Node: "vpn-a", Learned: true, Seen: t0.Add(2 * time.Hour).Truncate(time.Second), Created: t0, Updated: t0, Revision: 100}},
		{Kind: DeleteTunnel, Name: "old"},
		{Kind: DeleteNode, Name: "vpn-z"},
		{Kind: PutBucket, Reason: "unknown-peer buckets", Bucket: &BucketMark{Count: 4096, Index: 4095, Mark: 7}},
		{Kind: PutBucket, Bucket: &BucketMark{Count: 0}},
	}
}

// TestCodecReadsVersion1Tunnels: a record written before the learned and
// seen flags existed (bytes from that encoder) still decodes, and a tunnel
// that uses neither is written exactly as then.
func TestCodecReadsVersion1Tunnels(t *testing.T) {
	const old = "0106736974652d3104c000020101040a010000180576706e2d61010080d8f5d9b0c0c5993180d8f5d9b0c0c5993107"
	b, _ := hex.DecodeString(old)
	tu, err := UnmarshalTunnel(b)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	want := Tunnel{ID: "site-1", Peer: addr("192.0.2.1"), Subnets: []netip.Prefix{pfx("10.1.0.0/24")}, Node: "vpn-a", Pinned: true, Created: t0, Updated: t0, Revision: 7}
	if !reflect.DeepEqual(tu, want) {
		t.Fatalf("old record decodes as %+v, want %+v", tu, want)
	}
	if got := hex.EncodeToString(MarshalTunnel(&want)); got != old {
		t.Fatalf("a tunnel without learned/seen encodes as %s, want the version-1 bytes %s", got, old)
	}
	// An unknown flag is refused rather than silently dropped.
	bad := bytes.Clone(b)
	bad[bytes.Index(b, []byte("\x05vpn-a"))+6] |= 0x80 // the flags byte follows the owner's name
	if _, err := UnmarshalTunnel(bad); err == nil {
		t.Fatal("unknown tunnel flag accepted")
	}
}

func TestCodecRoundTrip(t *testing.T) {
	cs := sampleChanges()
	b := MarshalChanges(cs)
	got, err := UnmarshalChanges(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, cs) {
		t.Fatalf("round trip differs:\n got %+v\nwant %+v", got, cs)
	}
	n, err := UnmarshalNode(MarshalNode(cs[0].Node))
	if err != nil || !n.Equal(cs[0].Node) {
		t.Fatalf("node round trip: %+v %v", n, err)
	}
	tu, err := UnmarshalTunnel(MarshalTunnel(cs[2].Tunnel))
	if err != nil || !reflect.DeepEqual(tu, *cs[2].Tunnel) {
		t.Fatalf("tunnel round trip: %+v %v", tu, err)
	}
}

func TestCodecRefusesDamage(t *testing.T) {
	b := MarshalChanges(sampleChanges())
	for i := 0; i < len(b); i++ {
		if _, err := UnmarshalChanges(b[:i]); err == nil {
			t.Fatalf("truncated at %d of %d bytes decoded without error", i, len(b))
		}
	}
	bad := bytes.Clone(b)
	bad[0] = 9
	if _, err := UnmarshalChanges(bad); !errors.Is(err, ErrCodec) {
		t.Fatalf("newer version: %v", err)
	}
	if _, err := UnmarshalChanges(append(bytes.Clone(b), 0)); err == nil {
		t.Fatal("trailing byte accepted")
	}
}

func FuzzUnmarshalChanges(f *testing.F) {
	f.Add(MarshalChanges(sampleChanges()))
	f.Add(MarshalChanges(nil))
	f.Add([]byte{1, 200, 200, 200, 200, 1})
	withHealth := sampleChanges()
	withHealth[0].Node.Health = sampleHealth()
	f.Add(MarshalChanges(withHealth))
	f.Fuzz(func(t *testing.T, b []byte) {
		cs, err := UnmarshalChanges(b)
		if err != nil {
			return
		}
		// What decodes must encode back to the same bytes, unless the
		// input used a non-minimal varint or an unnormalised time.
		again, err := UnmarshalChanges(MarshalChanges(cs))
		if err != nil {
			t.Fatalf("re-decode: %v", err)
		}
		if !reflect.DeepEqual(again, cs) {
			t.Fatalf("not stable:\n%+v\n%+v", cs, again)
		}
	})
}

func FuzzUnmarshalTunnel(f *testing.F) {
	f.Add(MarshalTunnel(sampleChanges()[2].Tunnel))
	f.Fuzz(func(t *testing.T, b []byte) {
		tu, err := UnmarshalTunnel(b)
		if err != nil {
			return
		}
		again, err := UnmarshalTunnel(MarshalTunnel(&tu))
		if err != nil || !reflect.DeepEqual(again, tu) {
			t.Fatalf("not stable: %+v / %+v %v", tu, again, err)
		}
	})
}

// Records written by the release before health records (codec version 1,
// main at 43b5fe8), from sampleChanges: they must still decode, and a table that never used
// health checks must still write them byte for byte.
const (
	goldenNodeV1    = "010576706e2d6104ac1000019601d00f0107067261636b203300"
	goldenChangesV1 = "01070106696d706f72740576706e2d6104ac1000019601d00f0107067261636b20330001000576706e2d3610fd000000000000000000000000000006640000ff1f0000030f6e6f64652076706e2d6220646f776e096272616e63682d31371020010db800000000000000000000001702040a1100001b10fd000017000000000000000000000000400576706e2d61010d5ac3bc726963682c202248512290d8f5d9b0c0c5993190d8bae5f691c79931630400036f6c6402000576706e2d7a0514756e6b6e6f776e2d70656572206275636b6574738020ff1f070500000000"
	goldenBucketsV1 = "010400010fff00000007"
)

func TestCodecReadsVersion1(t *testing.T) {
	// The golden bytes predate learned tunnels too (their flags have
	// TestCodecReadsVersion1Tunnels): compare without the learned one.
	cs := slices.DeleteFunc(sampleChanges(), func(c Change) bool { return c.Tunnel != nil && c.Tunnel.Learned })
	nb, _ := hex.DecodeString(goldenNodeV1)
	n, err := UnmarshalNode(nb)
	if err != nil || !n.Equal(cs[0].Node) {
		t.Fatalf("version 1 node: %+v %v", n, err)
	}
	cb, _ := hex.DecodeString(goldenChangesV1)
	got, err := UnmarshalChanges(cb)
	if err != nil || !reflect.DeepEqual(got, cs) {
		t.Fatalf("version 1 changes: %v\n got %+v\nwant %+v", err, got, cs)
	}
	// Without health records the encoding is still version 1, unchanged.
	if h := hex.EncodeToString(MarshalNode(cs[0].Node)); h != goldenNodeV1 {
		t.Fatalf("node without health written as %s, want the version 1 bytes %s", h, goldenNodeV1)
	}
	if h := hex.EncodeToString(MarshalChanges(cs)); h != goldenChangesV1 {
		t.Fatalf("changes without health written as %s, want the version 1 bytes", h)
	}
	// The bucket record is version 1 as before, read and written.
	marks := []uint16{1, 4095, 0, 7}
	if h := hex.EncodeToString(MarshalBuckets(marks)); h != goldenBucketsV1 {
		t.Fatalf("bucket record written as %s, want the version 1 bytes %s", h, goldenBucketsV1)
	}
	bb, _ := hex.DecodeString(goldenBucketsV1)
	if got, err := UnmarshalBuckets(bb); err != nil || !reflect.DeepEqual(got, marks) {
		t.Fatalf("version 1 bucket record: %v %v", got, err)
	}
}

func sampleHealth() NodeHealth {
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 5, time.UTC)
	return NodeHealth{Down: true, Since: t0, Reason: "health: ike: timeout (4 requests, no answer) 2/2",
		Downs: []time.Time{t0.Add(-time.Minute), t0}, HoldUntil: t0.Add(2 * time.Minute), Holds: 3}
}

func TestCodecHealthRoundTrip(t *testing.T) {
	n := *sampleChanges()[0].Node
	n.Health = sampleHealth()
	b := MarshalNode(&n)
	if b[0] != codecHealth {
		t.Fatalf("node with health written as version %d", b[0])
	}
	got, err := UnmarshalNode(b)
	if err != nil || !got.Equal(&n) || !reflect.DeepEqual(got, n) {
		t.Fatalf("round trip: %v\n got %+v\nwant %+v", err, got, n)
	}
	// Only the health record differs: Equal must see it.
	other := got
	other.Health.HoldUntil = other.Health.HoldUntil.Add(time.Second)
	if other.Equal(&n) {
		t.Fatal("Equal ignores the health record")
	}
	// A batch with one such node is version 2 throughout; a record
	// with health but a zero time (Since unset) round-trips.
	cs := sampleChanges()
	cs[1].Node.Health = NodeHealth{Downs: []time.Time{time.Unix(0, 1).UTC()}, Holds: 1}
	bb := MarshalChanges(cs)
	if bb[0] != codecHealth {
		t.Fatalf("batch written as version %d", bb[0])
	}
	back, err := UnmarshalChanges(bb)
	if err != nil || !reflect.DeepEqual(back, cs) {
		t.Fatalf("batch round trip: %v\n got %+v\nwant %+v", err, back, cs)
	}
	for i := 0; i < len(bb); i++ {
		if _, err := UnmarshalChanges(bb[:i]); err == nil {
			t.Fatalf("truncated at %d of %d bytes decoded without error", i, len(bb))
		}
	}
}

func TestHealthClipAndValidate(t *testing.T) {
	h := sampleHealth()
	h.Reason = strings.Repeat("é", MaxHealthReason) // 2 bytes each
	for range MaxHealthDowns + 10 {
		h.Downs = append(h.Downs, h.Since)
	}
	local := h.Since.In(time.FixedZone("X", 3600))
	h.Since = local
	c := h.Clip()
	if len(c.Reason) > MaxHealthReason || !utf8.ValidString(c.Reason) || len(c.Downs) != MaxHealthDowns {
		t.Fatalf("clip: reason %d bytes (valid %v), %d downs", len(c.Reason), utf8.ValidString(c.Reason), len(c.Downs))
	}
	if c.Since.Location() != time.UTC || !c.Since.Equal(local) {
		t.Fatalf("clip: since %v", c.Since)
	}
	tb, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	put := func(h NodeHealth) error {
		_, err := tb.Apply([]Change{{Kind: PutNode, Node: &Node{Name: "n1", Addr: addr("172.16.0.1"), Health: h}}})
		return err
	}
	if err := put(h); err == nil || !strings.Contains(err.Error(), "health reason longer than") {
		t.Fatalf("oversized health record accepted: %v", err)
	}
	if err := put(c); err != nil {
		t.Fatal(err)
	}
	// The stored record survives the encoding unchanged.
	n, _ := tb.Node("n1")
	back, err := UnmarshalNode(MarshalNode(&n))
	if err != nil || !back.Equal(&n) {
		t.Fatalf("clipped record does not round-trip: %v", err)
	}
}

func TestAfterOperator(t *testing.T) {
	h := sampleHealth()
	for _, a := range []string{"up", "down", "drain", "undrain", ActionSetState} {
		if got := h.AfterOperator(a); !got.IsZero() {
			t.Errorf("%s kept the record: %+v", a, got)
		}
	}
	for _, a := range []string{"set-weight", "set-capacity", "add"} {
		if got := h.AfterOperator(a); !got.Equal(&h) {
			t.Errorf("%s changed the record", a)
		}
	}
}

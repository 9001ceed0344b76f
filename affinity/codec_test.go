package affinity

import (
	"bytes"
	"encoding/hex"
	"errors"
	"net/netip"
	"reflect"
	"testing"
	"time"
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
	if err != nil || n != *cs[0].Node {
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

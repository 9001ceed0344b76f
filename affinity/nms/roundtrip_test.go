package nms

import (
	"bytes"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/tunneldirector/tunneldirector/affinity"
)

func pfx(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, p := range s {
		out[i] = netip.MustParsePrefix(p)
	}
	return out
}

func sampleTunnels() []affinity.Tunnel {
	return []affinity.Tunnel{
		{ID: "z-last", Peer: netip.MustParseAddr("203.0.113.9"), Subnets: pfx("10.9.0.0/16"), Node: "vpn-b"},
		{ID: "berlin", Peer: netip.MustParseAddr("192.0.2.10"), Subnets: pfx("10.1.1.0/24", "10.1.0.0/24", "fd00:1::/64"), Node: "vpn-a", Pinned: true,
			Comment: `Berlin, "HQ"; 2 floors`},
		{ID: "#hash", Peer: netip.MustParseAddr("2001:db8::1"), Subnets: pfx("fd00:2::/48"), Comment: "Zürich – Ωμέγα ✓\nsecond line\twith tab"},
		{ID: "v6-only", Peer: netip.MustParseAddr("2001:db8:ffff::2"), Subnets: pfx("fd00:3::/64", "fd00:3:0:1::/64"), Node: "vpn-c", Pinned: false},
		{ID: "quote-only", Peer: netip.MustParseAddr("198.51.100.1"), Subnets: pfx("10.2.0.0/24"), Comment: `"`},
		{ID: "comma-first", Peer: netip.MustParseAddr("198.51.100.2"), Subnets: pfx("10.3.0.0/24"), Comment: `,leading comma`, Node: "vpn-a"},
		{ID: "backslash", Peer: netip.MustParseAddr("198.51.100.3"), Subnets: pfx("10.4.0.0/32"), Comment: `C:\path\ and </script>`},
	}
}

func sampleNodes() []affinity.Node {
	return []affinity.Node{
		{Name: "vpn-b", Addr: netip.MustParseAddr("10.255.0.12"), Weight: 100, Capacity: 5000, State: affinity.NodeDraining, Mark: 2, Comment: "rack 2, \"old\""},
		{Name: "vpn-a", Addr: netip.MustParseAddr("10.255.0.11"), Weight: 1, Mark: 1},
		{Name: "vpn-c", Addr: netip.MustParseAddr("fd00:ff::13"), Weight: 10000, State: affinity.NodeDown, Mark: 4095, Comment: "ünïcødé\nline"},
		{Name: "vpn-d", Addr: netip.MustParseAddr("10.255.0.14"), Weight: 100, Mark: 0, Comment: "#not a comment"},
	}
}

// normTunnels sorts like the export does, for comparing with what comes
// back.
func normTunnels(ts []affinity.Tunnel) []affinity.Tunnel {
	out := slices.Clone(ts)
	for i := range out {
		out[i].Subnets = slices.Clone(out[i].Subnets)
		slices.SortFunc(out[i].Subnets, affinity.ComparePrefix)
	}
	slices.SortFunc(out, func(a, b affinity.Tunnel) int { return strings.Compare(a.ID, b.ID) })
	return out
}

func sameTunnels(a, b []affinity.Tunnel) bool {
	return slices.EqualFunc(a, b, func(x, y affinity.Tunnel) bool {
		return x.ID == y.ID && x.Peer == y.Peer && slices.Equal(x.Subnets, y.Subnets) &&
			x.Node == y.Node && x.Pinned == y.Pinned && x.Comment == y.Comment
	})
}

func TestRoundTripTunnels(t *testing.T) {
	for _, f := range []Format{FormatCSV, FormatJSON} {
		t.Run(f.String(), func(t *testing.T) {
			in := sampleTunnels()
			orig := slices.Clone(in)
			var w1 bytes.Buffer
			if err := WriteTunnels(&w1, f, in); err != nil {
				t.Fatal(err)
			}
			if !sameTunnels(in, orig) || !slices.Equal(in[1].Subnets, orig[1].Subnets) {
				t.Fatal("WriteTunnels changed its argument")
			}
			recs, err := ReadTunnels(bytes.NewReader(w1.Bytes()), Options{Name: "x." + f.String()})
			if err != nil {
				t.Fatalf("%v\n%s", err, w1.String())
			}
			got := tunnelsOf(recs)
			if want := normTunnels(in); !sameTunnels(got, want) {
				t.Fatalf("round trip:\n got %+v\nwant %+v\nfile:\n%s", got, want, w1.String())
			}
			var w2 bytes.Buffer
			WriteTunnels(&w2, f, got)
			if !bytes.Equal(w1.Bytes(), w2.Bytes()) {
				t.Fatalf("second export differs:\n%s\n%s", w1.String(), w2.String())
			}
			t.Logf("\n%s", w1.String())
		})
	}
}

func TestRoundTripNodes(t *testing.T) {
	for _, f := range []Format{FormatCSV, FormatJSON} {
		t.Run(f.String(), func(t *testing.T) {
			in := sampleNodes()
			var w1 bytes.Buffer
			if err := WriteNodes(&w1, f, in); err != nil {
				t.Fatal(err)
			}
			recs, err := ReadNodes(bytes.NewReader(w1.Bytes()), Options{Name: "n." + f.String()})
			if err != nil {
				t.Fatalf("%v\n%s", err, w1.String())
			}
			want := slices.Clone(in)
			slices.SortFunc(want, func(a, b affinity.Node) int { return strings.Compare(a.Name, b.Name) })
			if got := nodesOf(recs); !sameNodes(got, want) {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, want)
			}
			var w2 bytes.Buffer
			WriteNodes(&w2, f, nodesOf(recs))
			if !bytes.Equal(w1.Bytes(), w2.Bytes()) {
				t.Fatalf("second export differs:\n%s\n%s", w1.String(), w2.String())
			}
			t.Logf("\n%s", w1.String())
		})
	}
}

// Converting between the formats loses nothing either.
func TestCrossFormat(t *testing.T) {
	var c, j bytes.Buffer
	WriteTunnels(&c, FormatCSV, sampleTunnels())
	recs, err := ReadTunnels(&c, Options{Name: "a.csv"})
	if err != nil {
		t.Fatal(err)
	}
	WriteTunnels(&j, FormatJSON, tunnelsOf(recs))
	recs2, err := ReadTunnels(&j, Options{Name: "a.json"})
	if err != nil {
		t.Fatal(err)
	}
	if !sameTunnels(tunnelsOf(recs), tunnelsOf(recs2)) {
		t.Fatal("CSV and JSON disagree")
	}
}

func TestWriteEmpty(t *testing.T) {
	var b bytes.Buffer
	WriteTunnels(&b, FormatJSON, nil)
	if b.String() != "[\n]\n" {
		t.Errorf("%q", b.String())
	}
	b.Reset()
	WriteNodes(&b, FormatCSV, nil)
	if b.String() != "name,address,address6,weight,capacity,state,mark,comment\n" {
		t.Errorf("%q", b.String())
	}
	if err := WriteNodes(&b, FormatAuto, nil); err == nil {
		t.Error("FormatAuto accepted")
	}
}

// sameNodes compares node lists record by record (affinity.Node.Equal).
func sameNodes(a, b []affinity.Node) bool {
	return slices.EqualFunc(a, b, func(x, y affinity.Node) bool { return x.Equal(&y) })
}

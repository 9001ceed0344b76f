package nms

import (
	"bytes"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/tunneldirector/tunneldirector/affinity"
)

func addExample(f *testing.F, name string) {
	data, err := os.ReadFile("../../examples/" + name)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data)
}

// fuzzTunnels checks that reading never panics and that whatever reads
// without error survives export and re-import unchanged, byte for byte on
// the second export.
func fuzzTunnels(t *testing.T, data []byte, format Format) {
	recs, err := ReadTunnels(bytes.NewReader(data), Options{Name: "fuzz", Format: format, MaxRecords: 10000})
	if err != nil {
		if _, ok := err.(*Errors); !ok {
			t.Fatalf("error of type %T: %v", err, err)
		}
		return
	}
	var w1, w2 bytes.Buffer
	if err := WriteTunnels(&w1, format, tunnelsOf(recs)); err != nil {
		t.Fatal(err)
	}
	again, err := ReadTunnels(bytes.NewReader(w1.Bytes()), Options{Name: "again", Format: format})
	if err != nil {
		t.Fatalf("re-reading the export: %v\ninput %q\nexport %q", err, data, w1.Bytes())
	}
	if want := normTunnels(tunnelsOf(recs)); !sameTunnels(tunnelsOf(again), want) {
		t.Fatalf("round trip changed the tunnels:\n got %+v\nwant %+v\nexport %q", tunnelsOf(again), want, w1.Bytes())
	}
	WriteTunnels(&w2, format, tunnelsOf(again))
	if !bytes.Equal(w1.Bytes(), w2.Bytes()) {
		t.Fatalf("second export differs:\n%q\n%q", w1.Bytes(), w2.Bytes())
	}
}

func fuzzNodes(t *testing.T, data []byte, format Format) {
	recs, err := ReadNodes(bytes.NewReader(data), Options{Name: "fuzz", Format: format, MaxRecords: 10000})
	if err != nil {
		if _, ok := err.(*Errors); !ok {
			t.Fatalf("error of type %T: %v", err, err)
		}
		return
	}
	var w1, w2 bytes.Buffer
	if err := WriteNodes(&w1, format, nodesOf(recs)); err != nil {
		t.Fatal(err)
	}
	again, err := ReadNodes(bytes.NewReader(w1.Bytes()), Options{Name: "again", Format: format})
	if err != nil {
		t.Fatalf("re-reading the export: %v\ninput %q\nexport %q", err, data, w1.Bytes())
	}
	want := nodesOf(recs)
	slices.SortFunc(want, func(a, b affinity.Node) int { return strings.Compare(a.Name, b.Name) })
	if got := nodesOf(again); !sameNodes(got, want) {
		t.Fatalf("round trip changed the nodes:\n got %+v\nwant %+v\nexport %q", got, want, w1.Bytes())
	}
	WriteNodes(&w2, format, nodesOf(again))
	if !bytes.Equal(w1.Bytes(), w2.Bytes()) {
		t.Fatalf("second export differs:\n%q\n%q", w1.Bytes(), w2.Bytes())
	}
}

func FuzzReadTunnelsCSV(f *testing.F) {
	addExample(f, "tunnels.csv")
	f.Add([]byte(tunnelHeader + "\"#x\",192.0.2.1,10.0.0.0/24,vpn-a,no,\"a\nb\"\n"))
	f.Add([]byte("ID,Peer,Subnets\nt1,2001:db8::1,fd00::/64;fd00:1::/64\n"))
	f.Add([]byte(tunnelHeader + "t1,192.0.2.1,10.0.0.1/24,,,\n"))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzTunnels(t, data, FormatCSV) })
}

func FuzzReadTunnelsJSON(f *testing.F) {
	addExample(f, "tunnels.json")
	f.Add([]byte(`[{"id":1,"peer":"192.0.2.1","subnets":"10.0.0.0/24 10.1.0.0/24","pinned":"no","comment":"\u00e9\n"}]`))
	f.Add([]byte(`[{"id":"t","peer":"192.0.2.1","subnets":["10.0.0.0/24"],"node":"a","pinned":null}]`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzTunnels(t, data, FormatJSON) })
}

func FuzzReadNodesCSV(f *testing.F) {
	addExample(f, "nodes.csv")
	f.Add([]byte("name,address\nvpn-a,10.255.0.1\n"))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzNodes(t, data, FormatCSV) })
}

func FuzzReadNodesJSON(f *testing.F) {
	addExample(f, "nodes.json")
	f.Add([]byte(`[{"name":"vpn-a","address":"fd00::1","weight":"007","mark":null}]`))
	f.Fuzz(func(t *testing.T, data []byte) { fuzzNodes(t, data, FormatJSON) })
}

package nms

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/tunneldirector/tunneldirector/affinity"
)

const tunnelHeader = "id,peer,subnets,node,pinned,comment\n"

type errCase struct {
	name    string
	file    string // file name, which also selects the format
	input   string
	want    []string // substrings of one single error line
	nodes   bool
	options Options
}

func runErrCases(t *testing.T, cases []errCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.options
			opts.Name = tc.file
			var err error
			if tc.nodes {
				_, err = ReadNodes(strings.NewReader(tc.input), opts)
			} else {
				_, err = ReadTunnels(strings.NewReader(tc.input), opts)
			}
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			var errs *Errors
			if !errors.As(err, &errs) {
				t.Fatalf("error %T %v, want *Errors", err, err)
			}
			for _, line := range strings.Split(err.Error(), "\n") {
				ok := true
				for _, w := range tc.want {
					ok = ok && strings.Contains(line, w)
				}
				if ok {
					return
				}
			}
			t.Errorf("no error line contains all of %q; got:\n%v", tc.want, err)
		})
	}
}

func TestTunnelCSVErrors(t *testing.T) {
	h := tunnelHeader
	h3, h4, h5 := "id,peer,subnets\n", "id,peer,subnets,node\n", "id,peer,subnets,node,pinned\n"
	runErrCases(t, []errCase{
		{name: "host bits", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.1/24\n",
			want: []string{`tunnels.csv:2: field subnets: "10.0.0.1/24": host bits set (0.0.0.1 beyond /24; did you mean 10.0.0.0/24?)`}},
		{name: "host bits v6", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,fd00::1:0/96\n",
			want: []string{`tunnels.csv:2: field subnets: "fd00::1:0/96"`, "::1:0 beyond /96", "did you mean fd00::/96?"}},
		{name: "v4 length above 32", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.0/64\n",
			want: []string{`tunnels.csv:2: field subnets: "10.0.0.0/64": IPv4 prefix length 64 above 32`}},
		{name: "v6 length above 128", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,2001:db8::1/129\n",
			want: []string{`tunnels.csv:2: field subnets: "2001:db8::1/129": IPv6 prefix length 129 above 128`}},
		{name: "bad length", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.0/x4\n",
			want: []string{`tunnels.csv:2: field subnets: "10.0.0.0/x4"`, "invalid prefix length"}},
		{name: "no length", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.9\n",
			want: []string{`tunnels.csv:2: field subnets: "10.0.0.9": missing prefix length (write 10.0.0.9/32`}},
		{name: "bad prefix address", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.300.0/24\n",
			want: []string{`tunnels.csv:2: field subnets: "10.0.300.0/24": invalid prefix address`}},
		{name: "mapped prefix", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,::ffff:10.0.0.0/104\n",
			want: []string{`tunnels.csv:2: field subnets: "::ffff:10.0.0.0/104"`, "IPv4-mapped"}},
		{name: "peer with port", file: "tunnels.csv", input: h3 + "t1,192.0.2.1:500,10.0.0.0/24\n",
			want: []string{`tunnels.csv:2: field peer: "192.0.2.1:500": address with a port`, "(192.0.2.1)"}},
		{name: "v6 peer with port", file: "tunnels.csv", input: h3 + "t1,[2001:db8::1]:4500,10.0.0.0/24\n",
			want: []string{`tunnels.csv:2: field peer: "[2001:db8::1]:4500": address with a port`}},
		{name: "mapped peer", file: "tunnels.csv", input: h3 + "t1,::ffff:192.0.2.1,10.0.0.0/24\n",
			want: []string{`tunnels.csv:2: field peer: "::ffff:192.0.2.1"`, "IPv4-mapped", "192.0.2.1"}},
		{name: "bad peer", file: "tunnels.csv", input: h3 + "t1,192.0.2.256,10.0.0.0/24\n",
			want: []string{`tunnels.csv:2: field peer: "192.0.2.256": invalid IP address`}},
		{name: "peer is prefix", file: "tunnels.csv", input: h3 + "t1,192.0.2.0/24,10.0.0.0/24\n",
			want: []string{`tunnels.csv:2: field peer: "192.0.2.0/24": a prefix`}},
		{name: "multicast peer", file: "tunnels.csv", input: h3 + "t1,224.0.0.5,10.0.0.0/24\n",
			want: []string{`tunnels.csv:2: field peer: "224.0.0.5"`, "multicast"}},
		{name: "zone peer", file: "tunnels.csv", input: h3 + "t1,fe80::1%eth0,10.0.0.0/24\n",
			want: []string{`tunnels.csv:2: field peer: "fe80::1%eth0"`, "zone"}},
		{name: "duplicate id", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.0/24\nt2,192.0.2.2,10.0.1.0/24\nt1,192.0.2.3,10.0.2.0/24\n",
			want: []string{`tunnels.csv:4: field id: "t1": duplicate tunnel id, first at line 2`}},
		{name: "duplicate peer", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.0/24\nt2,192.0.2.1,10.0.1.0/24\n",
			want: []string{`tunnels.csv:3: field peer: "192.0.2.1": peer of tunnel t2 is already the peer of tunnel t1 at line 2`}},
		{name: "same subnet", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.0/24\nt2,192.0.2.2,10.0.0.0/24\n",
			want: []string{`tunnels.csv:3: field subnets: "10.0.0.0/24": subnet of tunnel t2 is also a subnet of tunnel t1 at line 2`}},
		{name: "subnet inside", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.0/16\n# comment\n\nt2,192.0.2.2,10.0.5.0/24\n",
			want: []string{`tunnels.csv:5: field subnets: "10.0.5.0/24": subnet of tunnel t2 lies inside 10.0.0.0/16, a subnet of tunnel t1 at line 2`}},
		{name: "subnet contains", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.5.0/24\nt2,192.0.2.2,10.0.0.0/8\n",
			want: []string{`tunnels.csv:3: field subnets: "10.0.0.0/8": subnet of tunnel t2 contains 10.0.5.0/24, a subnet of tunnel t1 at line 2`}},
		{name: "overlap in tunnel", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.0/16;10.0.1.0/24\n",
			want: []string{`tunnels.csv:2: field subnets: "10.0.1.0/24": overlaps 10.0.0.0/16 of the same tunnel t1`}},
		{name: "too many subnets", file: "tunnels.csv", input: h3 + "t1,192.0.2.1," + manySubnets(65) + "\n",
			want: []string{`tunnels.csv:2: field subnets: 65 subnets, at most 64`}},
		{name: "missing subnets", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,\n",
			want: []string{`tunnels.csv:2: field subnets: missing`}},
		{name: "missing id", file: "tunnels.csv", input: h3 + ",192.0.2.1,10.0.0.0/24\n",
			want: []string{`tunnels.csv:2: field id: missing`}},
		{name: "bad id", file: "tunnels.csv", input: h3 + "\"t 1\",192.0.2.1,10.0.0.0/24\n",
			want: []string{`tunnels.csv:2: field id: "t 1": tunnel id`, "contains"}},
		{name: "bad node", file: "tunnels.csv", input: h4 + "t1,192.0.2.1,10.0.0.0/24,vpn;a\n",
			want: []string{`tunnels.csv:2: field node: "vpn;a": node name`}},
		{name: "pinned without node", file: "tunnels.csv", input: h5 + "t1,192.0.2.1,10.0.0.0/24,,yes\n",
			want: []string{`tunnels.csv:2: field pinned: "yes": pinned without a node`}},
		{name: "pinned bad", file: "tunnels.csv", input: h5 + "t1,192.0.2.1,10.0.0.0/24,vpn-a,maybe\n",
			want: []string{`tunnels.csv:2: field pinned: "maybe": want true or false`}},
		{name: "comment control", file: "tunnels.csv", input: h + "t1,192.0.2.1,10.0.0.0/24,,,\"a\x1bb\"\n",
			want: []string{`tunnels.csv:2: field comment: "a\x1bb": contains control character`}},
		{name: "comment too long", file: "tunnels.csv", input: h + "t1,192.0.2.1,10.0.0.0/24,,," + strings.Repeat("x", 1025) + "\n",
			want: []string{`tunnels.csv:2: field comment: "xxxx`, "longer than 1024 bytes"}},
		{name: "empty file", file: "tunnels.csv", input: "",
			want: []string{`tunnels.csv: empty file: no header`}},
		{name: "only comments", file: "tunnels.csv", input: "# nothing\n\n",
			want: []string{`tunnels.csv: empty file: no header`}},
		{name: "unknown column", file: "tunnels.csv", input: "id,peer,subnets,ndoe\nt1,192.0.2.1,10.0.0.0/24,vpn-a\n",
			want: []string{`tunnels.csv:1: "ndoe": unknown column`}},
		{name: "duplicate column", file: "tunnels.csv", input: "id,peer,subnets,Peer\n",
			want: []string{`tunnels.csv:1: "Peer": duplicate column (columns 2 and 4)`}},
		{name: "missing column", file: "tunnels.csv", input: "id,peer,node\n",
			want: []string{`tunnels.csv:1: missing required column subnets`}},
		{name: "nodes file", file: "tunnels.csv", input: "name,address\nvpn-a,10.255.0.1\n",
			want: []string{`tunnels.csv:1: this is a nodes file, not a tunnels file`}},
		{name: "field count", file: "tunnels.csv", input: h + "t1,192.0.2.1,10.0.0.0/24,,,,extra\nt2,192.0.2.2,10.0.1.0/24,,,\n",
			want: []string{`tunnels.csv:2: 7 fields, the header has 6`}},
		{name: "truncated last line", file: "tunnels.csv", input: h + "t1,192.0.2.1,10.0.0.0/24,,,\nt2,192.0.2.2,10.0",
			want: []string{`tunnels.csv:3: truncated file: the last line has 3 of the header's 6 fields`}},
		{name: "truncated in quotes", file: "tunnels.csv", input: h + "t1,192.0.2.1,10.0.0.0/24,,,\"Berlin, ",
			want: []string{`tunnels.csv:2: `, "the file is truncated"}},
		{name: "bare quote", file: "tunnels.csv", input: h + "t1,192.0.2.1,10.0.0.0/24,,,Ber\"lin\n",
			want: []string{`tunnels.csv:2: bare " in non-quoted-field`}},
		{name: "NUL", file: "tunnels.csv", input: h + "t1,\x00",
			want: []string{`tunnels.csv: binary file, not CSV or JSON (NUL byte at offset 39)`}},
		{name: "invalid UTF-8", file: "tunnels.csv", input: h + "t1,\xff\xfe",
			want: []string{`tunnels.csv: binary file, not CSV or JSON (invalid UTF-8 at offset 39)`}},
		{name: "bbolt store", file: "director.db", input: boltHeader(),
			want: []string{`director.db: binary file, not CSV or JSON (it is a bbolt database`}},
		{name: "gzip", file: "tunnels.csv.gz", input: "\x1f\x8b\x08\x00",
			want: []string{`binary file`, "gzip"}},
		{name: "too many records", file: "tunnels.csv", input: h3 + "t1,192.0.2.1,10.0.0.0/24\nt2,192.0.2.2,10.0.1.0/24\nt3,192.0.2.3,10.0.2.0/24\n",
			options: Options{MaxRecords: 2},
			want:    []string{`tunnels.csv:4: more than 2 records`}},
	})
}

func manySubnets(n int) string {
	var b strings.Builder
	for i := range n {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString("10.9." + strconv.Itoa(i) + ".0/24")
	}
	return b.String()
}

// boltHeader is the start of a bbolt file: page header, then the meta
// page's magic and version.
func boltHeader() string {
	b := make([]byte, 64)
	b[8] = 0x04 // meta page flag
	b[16], b[17], b[18], b[19] = 0xED, 0xDA, 0x0C, 0xED
	b[20] = 2
	return string(b)
}

func TestTunnelJSONErrors(t *testing.T) {
	runErrCases(t, []errCase{
		{name: "field error has index and line", file: "tunnels.json",
			input: "[\n{\"id\":\"t1\",\"peer\":\"192.0.2.1\",\"subnets\":[\"10.0.0.0/24\"]},\n{\"id\":\"t2\",\"peer\":\"192.0.2.2:500\",\"subnets\":[\"10.0.1.0/24\"]}\n]\n",
			want:  []string{`tunnels.json:3: element 1: field peer: "192.0.2.2:500": address with a port`}},
		{name: "pretty printed", file: "tunnels.json",
			input: "[\n  {\n    \"id\": \"t1\",\n    \"peer\": \"192.0.2.1\",\n    \"subnets\": \"10.0.0.1/24\"\n  }\n]",
			want:  []string{`tunnels.json:2: element 0: field subnets: "10.0.0.1/24": host bits set`}},
		{name: "unknown field", file: "tunnels.json",
			input: "[\n{\"id\":\"t1\",\"peer\":\"192.0.2.1\",\"subnets\":[\"10.0.0.0/24\"]},\n\n{\"id\":\"t2\",\"peer\":\"192.0.2.2\",\"subnet\":[\"10.0.1.0/24\"]}\n]",
			want:  []string{`tunnels.json:4: element 1: field subnet: unknown field`}},
		{name: "truncated", file: "tunnels.json",
			input: "[\n{\"id\":\"t1\",\"peer\":\"192.0.2.1\",\"subnets\":[\"10.0.0.0/24\"]},\n{\"id\":\"t2\",\"peer\":\"192.0.2.2\",\"subnets\":[\"10.0.1.0/24\"]},\n{\"id\":\"t3\",\"peer\":\"192.0",
			want:  []string{`tunnels.json:4: truncated JSON after element 1`}},
		{name: "truncated before ]", file: "tunnels.json",
			input: "[\n{\"id\":\"t1\",\"peer\":\"192.0.2.1\",\"subnets\":[\"10.0.0.0/24\"]}\n",
			want:  []string{`tunnels.json:`, `truncated JSON after element 0`}},
		{name: "truncated first", file: "tunnels.json", input: "[{\"id\":",
			want: []string{`tunnels.json: truncated JSON: the input ends before the first element`}},
		{name: "syntax error", file: "tunnels.json",
			input: "[\n{\"id\":\"t1\",\"peer\":\"192.0.2.1\",\"subnets\":[\"10.0.0.0/24\"]},\n{\"id\":\"t2\" \"peer\":\"192.0.2.2\"}\n]",
			want:  []string{`tunnels.json:3: JSON syntax error`}},
		{name: "missing comma", file: "tunnels.json",
			input: "[\n{\"id\":\"t1\",\"peer\":\"192.0.2.1\",\"subnets\":[\"10.0.0.0/24\"]}\n{\"id\":\"t2\"}\n]",
			want:  []string{`tunnels.json:3: JSON syntax error`}},
		{name: "object at top", file: "tunnels.json", input: `{"id":"t1"}`,
			want: []string{`tunnels.json:1: want a JSON array of objects`}},
		{name: "element not object", file: "tunnels.json", input: "[\n\"t1\"\n]",
			want: []string{`tunnels.json:2: element 0: element is a JSON string, not an object`}},
		{name: "wrong type", file: "tunnels.json", input: `[{"id":{"a":1},"peer":"192.0.2.1","subnets":["10.0.0.0/24"]}]`,
			want: []string{`tunnels.json:1: element 0: field id: "{\"a\":1}": want a string`}},
		{name: "subnets not strings", file: "tunnels.json", input: `[{"id":"t1","peer":"192.0.2.1","subnets":[10]}]`,
			want: []string{`tunnels.json:1: element 0: field subnets: "[10]": want a string`}},
		{name: "trailing data", file: "tunnels.json", input: "[\n]\n{}",
			want: []string{`tunnels.json:3: data after the closing ]`}},
		{name: "empty", file: "tunnels.json", input: "  \n",
			want: []string{`tunnels.json: empty file`}},
		{name: "duplicate across elements", file: "tunnels.json",
			input: "[\n{\"id\":\"t1\",\"peer\":\"192.0.2.1\",\"subnets\":[\"10.0.0.0/24\"]},\n{\"id\":\"t2\",\"peer\":\"192.0.2.2\",\"subnets\":[\"10.0.0.128/25\"]}\n]",
			want:  []string{`tunnels.json:3: element 1: field subnets: "10.0.0.128/25": subnet of tunnel t2 lies inside 10.0.0.0/24, a subnet of tunnel t1 at element 0 (line 2)`}},
		{name: "nodes file", file: "tunnels.json", input: `[{"name":"vpn-a","address":"10.255.0.1"}]`,
			want: []string{`tunnels.json:1: this is a nodes file, not a tunnels file`}},
		{name: "binary by content", file: "upload", input: "[\x00\x00",
			want: []string{`upload: binary file`}},
		{name: "too many", file: "tunnels.json", options: Options{MaxRecords: 1},
			input: "[\n{\"id\":\"t1\",\"peer\":\"192.0.2.1\",\"subnets\":[\"10.0.0.0/24\"]},\n{\"id\":\"t2\",\"peer\":\"192.0.2.2\",\"subnets\":[\"10.0.1.0/24\"]}\n]",
			want:  []string{`tunnels.json:3: element 1: more than 1 records`}},
	})
}

func TestNodeErrors(t *testing.T) {
	h := "name,address,weight,capacity,state,mark,comment\n"
	runErrCases(t, []errCase{
		{name: "weight zero", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1,0\n" + "",
			want: []string{`nodes.csv:2: 3 fields, the header has 7`}},
		{name: "weight zero 2", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1,0,,,,\n",
			want: []string{`nodes.csv:2: field weight: "0": zero weight`}},
		{name: "weight high", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1,20000,,,,\n",
			want: []string{`nodes.csv:2: field weight: "20000": above 10000`}},
		{name: "capacity negative", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1,,-5,,,\n",
			want: []string{`nodes.csv:2: field capacity: "-5": negative number`}},
		{name: "state", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1,,,broken,,\n",
			want: []string{`nodes.csv:2: field state: "broken": unknown node state`}},
		{name: "mark", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1,,,,5000,\n",
			want: []string{`nodes.csv:2: field mark: "5000": above 4095`}},
		{name: "address port", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1:22,,,,,\n",
			want: []string{`nodes.csv:2: field address: "10.255.0.1:22": address with a port`}},
		{name: "address missing", file: "nodes.csv", nodes: true, input: h + "vpn-a,,,,,,\n",
			want: []string{`nodes.csv:2: field address: missing`}},
		{name: "duplicate name", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1,,,,,\nvpn-a,10.255.0.2,,,,,\n",
			want: []string{`nodes.csv:3: field name: "vpn-a": duplicate node name, first at line 2`}},
		{name: "duplicate address", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1,,,,,\nvpn-b,10.255.0.1,,,,,\n",
			want: []string{`nodes.csv:3: field address: "10.255.0.1": address of node vpn-b is already the address of node vpn-a at line 2`}},
		{name: "duplicate mark", file: "nodes.csv", nodes: true, input: h + "vpn-a,10.255.0.1,,,,7,\nvpn-b,10.255.0.2,,,,7,\n",
			want: []string{`nodes.csv:3: field mark: "7": mark of node vpn-b is already the mark of node vpn-a at line 2`}},
		{name: "tunnels file", file: "nodes.csv", nodes: true, input: tunnelHeader,
			want: []string{`nodes.csv:1: this is a tunnels file, not a nodes file`}},
		{name: "json weight", file: "nodes.json", nodes: true, input: "[\n{\"name\":\"vpn-a\",\"address\":\"10.255.0.1\",\"weight\":-1}\n]",
			want: []string{`nodes.json:2: element 0: field weight: "-1": negative number`}},
		{name: "json unknown", file: "nodes.json", nodes: true, input: "[\n{\"name\":\"vpn-a\",\"address\":\"10.255.0.1\",\"weigth\":1}\n]",
			want: []string{`nodes.json:2: element 0: field weigth: unknown field`}},
		{name: "json mapped", file: "nodes.json", nodes: true, input: "[\n{\"name\":\"vpn-a\",\"address\":\"::ffff:10.255.0.1\"}\n]",
			want: []string{`nodes.json:2: element 0: field address: "::ffff:10.255.0.1": address ::ffff:10.255.0.1 is IPv4-mapped IPv6; write it as IPv4 10.255.0.1`}},
	})
}

func TestErrorsCapped(t *testing.T) {
	var b strings.Builder
	b.WriteString("id,peer,subnets\n")
	for i := range 120 {
		b.WriteString("t" + strconv.Itoa(i) + ",192.0.2.1:500,10.0.0.0/24\n")
	}
	_, err := ReadTunnels(strings.NewReader(b.String()), Options{Name: "t.csv", MaxErrors: 5})
	var errs *Errors
	if !errors.As(err, &errs) {
		t.Fatalf("got %v", err)
	}
	// Each line has a bad peer; every line after the first also reuses
	// the subnet.
	if len(errs.List) != 5 || errs.Total != 120+119 {
		t.Fatalf("listed %d, total %d", len(errs.List), errs.Total)
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != 6 || lines[5] != "... and 234 more" {
		t.Fatalf("message:\n%v", err)
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Line != 2 || fe.Field != "peer" {
		t.Fatalf("errors.As FieldError: %+v", fe)
	}
}

func TestHeaderOnly(t *testing.T) {
	for name, in := range map[string]string{
		"tunnels.csv":  "# exported\n" + tunnelHeader,
		"tunnels.json": "[\n]\n",
	} {
		recs, err := ReadTunnels(strings.NewReader(in), Options{Name: name})
		if err != nil || len(recs) != 0 {
			t.Errorf("%s: %v %v", name, recs, err)
		}
	}
	nodes, err := ReadNodes(strings.NewReader("NAME , Address\n"), Options{Name: "n.csv"})
	if err != nil || len(nodes) != 0 {
		t.Errorf("nodes: %v %v", nodes, err)
	}
}

func TestCSVFlexibility(t *testing.T) {
	in := "\xef\xbb\xbf Comment ;x,SUBNETS, pinned ,Peer,ID,node\n"
	_, err := ReadTunnels(strings.NewReader(in), Options{Name: "a.csv"})
	if err == nil || !strings.Contains(err.Error(), `"Comment ;x": unknown column`) {
		t.Fatalf("got %v", err)
	}
	in = "\xef\xbb\xbf Comment ,SUBNETS, pinned ,Peer,ID,node\r\n" +
		"\"hi, there\", 10.1.0.0/24 ; 10.0.0.0/24  10.2.0.0/24,,2001:DB8::1 , t1 ,vpn-a\r\n" +
		",fd00::/64,no,192.0.2.1,t2,vpn-b\r\n" +
		",10.5.0.0/16,,192.0.2.2,t3,\r\n"
	recs, err := ReadTunnels(strings.NewReader(in), Options{Name: "a.csv"})
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 3 {
		t.Fatalf("%d records", len(recs))
	}
	r := recs[0]
	if r.ID != "t1" || r.Peer.String() != "2001:db8::1" || r.Comment != "hi, there" || r.Node != "vpn-a" || !r.Pinned ||
		len(r.Subnets) != 3 || r.Subnets[0].String() != "10.0.0.0/24" || r.Subnets[2].String() != "10.2.0.0/24" {
		t.Errorf("record 0: %+v", r)
	}
	if r := recs[1]; r.Node != "vpn-b" || r.Pinned || r.Pos.Line != 3 {
		t.Errorf("record 1: %+v", r)
	}
	if r := recs[2]; r.Node != "" || r.Pinned {
		t.Errorf("record 2: %+v", r)
	}
}

func TestDetect(t *testing.T) {
	cases := []struct {
		name, head string
		format     Format
		kind       Kind
		kindErr    bool
	}{
		{"x.csv", "[weird", FormatCSV, KindAuto, true},
		{"x.json", tunnelHeader, FormatJSON, KindAuto, true},
		{"x", "\n  [{\"peer\":1}]", FormatJSON, KindTunnels, false},
		{"x", "# c\nname,address\n", FormatCSV, KindNodes, false},
		{"x", "id,peer,subnets\n", FormatCSV, KindTunnels, false},
		{"x", `[{"comment":"a","name":"vpn-a"}]`, FormatJSON, KindNodes, false},
		{"x", `[{"comment":"a"}]`, FormatJSON, KindAuto, true},
		{"x", `[]`, FormatJSON, KindAuto, true},
		{"x.JSON", `[{"address":"10.0.0.1"}]`, FormatJSON, KindNodes, false},
		{"x", "", FormatCSV, KindAuto, true},
	}
	for _, tc := range cases {
		if f := DetectFormat(tc.name, []byte(tc.head)); f != tc.format {
			t.Errorf("DetectFormat(%q, %q) = %v, want %v", tc.name, tc.head, f, tc.format)
		}
		k, err := DetectKind([]byte(tc.head), tc.format)
		if k != tc.kind || (err != nil) != tc.kindErr {
			t.Errorf("DetectKind(%q) = %v, %v; want %v", tc.head, k, err, tc.kind)
		}
	}
	// The override wins over detection.
	f, err := Read(strings.NewReader("id,peer,subnets\n"), Options{Name: "x", Kind: KindNodes})
	if err == nil || !strings.Contains(err.Error(), "this is a tunnels file") {
		t.Errorf("override: %v %v", f, err)
	}
	f, err = Read(strings.NewReader("[]"), Options{Name: "x", Kind: KindNodes})
	if err != nil || f.Kind != KindNodes || f.Format != FormatJSON {
		t.Errorf("override: %+v %v", f, err)
	}
	if _, err := Read(strings.NewReader("[]"), Options{Name: "x"}); err == nil || !strings.Contains(err.Error(), "say which") {
		t.Errorf("empty array: %v", err)
	}
}

func TestExamples(t *testing.T) {
	files, _ := filepath.Glob("../../examples/*")
	var seen int
	for _, path := range files {
		base := filepath.Base(path)
		want := map[string]Kind{"tunnels.csv": KindTunnels, "tunnels.json": KindTunnels, "nodes.csv": KindNodes, "nodes.json": KindNodes}[base]
		if want == KindAuto {
			continue
		}
		seen++
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		f, err := Read(strings.NewReader(string(data)), Options{Name: base})
		if err != nil {
			t.Fatalf("%s: %v", base, err)
		}
		if f.Kind != want || len(f.Tunnels)+len(f.Nodes) < 5 {
			t.Errorf("%s: kind %v, %d tunnels, %d nodes", base, f.Kind, len(f.Tunnels), len(f.Nodes))
		}
	}
	if seen != 4 {
		t.Errorf("found %d of the 4 example files", seen)
	}
	// The CSV and JSON examples describe the same farm.
	a, _ := os.ReadFile("../../examples/tunnels.csv")
	b, _ := os.ReadFile("../../examples/tunnels.json")
	ta, err1 := ReadTunnels(strings.NewReader(string(a)), Options{Name: "tunnels.csv"})
	tb, err2 := ReadTunnels(strings.NewReader(string(b)), Options{Name: "tunnels.json"})
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	var wa, wb strings.Builder
	WriteTunnels(&wa, FormatCSV, tunnelsOf(ta))
	WriteTunnels(&wb, FormatCSV, tunnelsOf(tb))
	if wa.String() != wb.String() {
		t.Errorf("examples differ:\n%s\n%s", wa.String(), wb.String())
	}
}

func tunnelsOf(recs []TunnelRecord) []affinity.Tunnel {
	out := make([]affinity.Tunnel, len(recs))
	for i := range recs {
		out[i] = recs[i].Tunnel
	}
	return out
}

func nodesOf(recs []NodeRecord) []affinity.Node {
	out := make([]affinity.Node, len(recs))
	for i := range recs {
		out[i] = recs[i].Node
	}
	return out
}

func TestProgress(t *testing.T) {
	var b strings.Builder
	b.WriteString(tunnelHeader)
	for i := range 20000 {
		b.WriteString(genLine(i))
	}
	size := int64(b.Len())
	var calls []int64
	_, err := ReadTunnels(strings.NewReader(b.String()), Options{Name: "t.csv", Progress: func(n int64) { calls = append(calls, n) }})
	if err != nil {
		t.Fatal(err)
	}
	if len(calls) < 2 || calls[len(calls)-1] != size {
		t.Fatalf("progress calls %v, size %d", calls, size)
	}
	if max := size/progressStep + 2; int64(len(calls)) > max {
		t.Errorf("%d progress calls for %d bytes, want at most %d", len(calls), size, max)
	}
	for i := 1; i < len(calls); i++ {
		if calls[i] < calls[i-1] {
			t.Errorf("progress went back: %v", calls)
		}
	}
}

// Line numbers stay right deep into a file, past the sniff window and
// the decoder's buffers, and across multi-line quoted fields.
func TestLinesDeepInFile(t *testing.T) {
	recs, err := ReadTunnels(strings.NewReader(string(genFile(5000))), Options{Name: "g.csv"})
	if err != nil {
		t.Fatal(err)
	}
	ts := tunnelsOf(recs)
	ts[10].Comment = "two\nlines"
	var js, cs strings.Builder
	WriteTunnels(&js, FormatJSON, ts)
	WriteTunnels(&cs, FormatCSV, ts)

	// Sorted by id, t4000 is not on line 4002; find it.
	found := 0
	jl := strings.Split(js.String(), "\n")
	for i, l := range jl {
		if strings.HasPrefix(l, `{"id":"t4000",`) {
			found++
			jl[i] = strings.Replace(l, `"peer":"`, `"peer":"x`, 1)
			_, err := ReadTunnels(strings.NewReader(strings.Join(jl, "\n")), Options{Name: "g.json"})
			want := "g.json:" + strconv.Itoa(i+1) + ": element " + strconv.Itoa(i-1) + ": field peer"
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("got %v, want %q", err, want)
			}
		}
	}
	cl := strings.Split(cs.String(), "\n")
	for i, l := range cl {
		if strings.HasPrefix(l, "t4000,") {
			found++
			cl[i] = strings.Replace(l, ",100.", ",x100.", 1)
			_, err := ReadTunnels(strings.NewReader(strings.Join(cl, "\n")), Options{Name: "g.csv"})
			// Line i+1 of the file, with the quoted comment's extra line
			// counted by the CSV reader like any other.
			want := "g.csv:" + strconv.Itoa(i+1) + ": field peer"
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("got %v, want %q", err, want)
			}
		}
	}
	if found != 2 {
		t.Errorf("found t4000 %d times", found)
	}
}

// TestRecordSubnetsOwnWindow: the records' subnets share buffers, but each
// record's slice is its own: appending to one leaves the next alone, and
// each comes sorted the way the table keeps subnets.
func TestRecordSubnetsOwnWindow(t *testing.T) {
	in := "id,peer,subnets\n" +
		"a,192.0.2.1,10.0.0.64/26 10.0.0.0/26\n" +
		"b,192.0.2.2,10.1.0.0/24\n"
	recs, err := ReadTunnels(strings.NewReader(in), Options{Name: "t.csv"})
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(recs[0].Subnets); got != "[10.0.0.0/26 10.0.0.64/26]" {
		t.Fatalf("a's subnets %s, want sorted", got)
	}
	_ = append(recs[0].Subnets, netip.MustParsePrefix("10.9.9.0/24"))
	if got := fmt.Sprint(recs[1].Subnets); got != "[10.1.0.0/24]" {
		t.Fatalf("b's subnets %s after appending to a's", got)
	}
}

package nms

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

const testNodes = `name,address,weight,capacity,state,mark,comment
vpn-a,10.255.0.11,100,0,active,1,
vpn-b,10.255.0.12,100,0,active,2,
vpn-c,10.255.0.13,100,0,active,,
`

func newTable(t testing.TB) *affinity.Table {
	t.Helper()
	tab, err := affinity.New(affinity.Options{Now: func() time.Time { return time.Unix(1700000000, 0) }})
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := ReadNodes(strings.NewReader(testNodes), Options{Name: "nodes.csv"})
	if err != nil {
		t.Fatal(err)
	}
	d := PlanNodes(tab, nodes, false)
	if len(d.Added) != 3 || len(d.Batch) != 3 {
		t.Fatalf("node diff %+v", d)
	}
	if _, err := tab.Apply(d.Batch); err != nil {
		t.Fatal(d.MapError(err))
	}
	if d := PlanNodes(tab, nodes, true); !d.Empty() || len(d.Unchanged) != 3 {
		t.Fatalf("node re-plan not empty: %s", d.Summary(10))
	}
	return tab
}

func mustReadTunnels(t testing.TB, name, s string) []TunnelRecord {
	t.Helper()
	recs, err := ReadTunnels(strings.NewReader(s), Options{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

func apply(t testing.TB, tab *affinity.Table, d *Diff) {
	t.Helper()
	if _, err := tab.Apply(d.Batch); err != nil {
		t.Fatal(d.MapError(err))
	}
}

func TestPlan(t *testing.T) {
	tab := newTable(t)
	first := mustReadTunnels(t, "v1.csv", `id,peer,subnets,node,pinned,comment
keep,192.0.2.1,10.1.0.0/24,,,
keep-pinned,192.0.2.2,10.2.0.0/24,vpn-a,,
comment,192.0.2.3,10.3.0.0/24,,,old
unpin,192.0.2.4,10.4.0.0/24,vpn-b,true,
gone,192.0.2.5,10.5.0.0/24,,,
move,192.0.2.6,10.6.0.0/24,vpn-a,false,
sticky,192.0.2.7,10.7.0.0/24,vpn-c,,
`)
	d := Plan(tab, first, false)
	if len(d.Added) != 7 || len(d.Batch) != 7 || d.Sources[0].Line != 2 {
		t.Fatalf("first import: %s", d.Summary(10))
	}
	apply(t, tab, d)
	if d := Plan(tab, first, true); !d.Empty() || len(d.Unchanged) != 7 {
		t.Fatalf("re-import not empty: %s", d.Summary(10))
	}
	before, _ := tab.Tunnel("sticky")

	second := mustReadTunnels(t, "v2.csv", `id,peer,subnets,node,pinned,comment
keep,192.0.2.1,10.1.0.0/24,,,
keep-pinned,192.0.2.2,10.2.0.0/24,vpn-a,true,
comment,192.0.2.3,10.3.0.0/24,,,new
unpin,192.0.2.4,10.4.0.0/24,,,
move,192.0.2.6,10.6.0.0/24,vpn-c,false,
sticky,192.0.2.7,10.7.0.0/24,,,
new,192.0.2.8,10.5.0.0/25,,,
`)
	rev := tab.Revision()
	d = Plan(tab, second, true)
	want := &Diff{
		Added:     []string{"new"},
		Changed:   []string{"comment", "move", "sticky", "unpin"},
		Removed:   []string{"gone"},
		Unchanged: []string{"keep", "keep-pinned"},
	}
	if !slices.Equal(d.Added, want.Added) || !slices.Equal(d.Changed, want.Changed) ||
		!slices.Equal(d.Removed, want.Removed) || !slices.Equal(d.Unchanged, want.Unchanged) {
		t.Fatalf("diff:\n%s", d.Summary(10))
	}
	// Deletions first, so "new" can take the subnet space "gone" frees.
	kinds := []affinity.ChangeKind{}
	for _, c := range d.Batch {
		kinds = append(kinds, c.Kind)
	}
	if kinds[0] != affinity.DeleteTunnel || d.Batch[len(d.Batch)-1].Tunnel.ID != "new" || len(d.Batch) != len(d.Sources) {
		t.Fatalf("batch order %v", kinds)
	}
	if d.Sources[0].Line != 0 || d.Sources[len(d.Sources)-1].Line != 8 {
		t.Fatalf("sources %+v", d.Sources)
	}
	apply(t, tab, d)
	if tab.Revision() != rev+1 {
		t.Errorf("revision %d, want %d", tab.Revision(), rev+1)
	}
	if d := Plan(tab, second, true); !d.Empty() {
		t.Fatalf("re-plan not empty: %s", d.Summary(10))
	}
	if u, _ := tab.Tunnel("unpin"); u.Pinned || u.Node != "vpn-b" {
		t.Errorf("unpin: %+v", u)
	}
	if u, _ := tab.Tunnel("move"); u.Pinned || u.Node != "vpn-c" {
		t.Errorf("move: %+v", u)
	}
	if u, _ := tab.Tunnel("sticky"); u.Pinned || u.Node != before.Node {
		t.Errorf("sticky: %+v", u)
	}
	if _, ok := tab.Tunnel("gone"); ok {
		t.Error("gone is still there")
	}

	// Without replace nothing is removed.
	d = Plan(tab, second[:2], false)
	if len(d.Removed) != 0 || !d.Empty() {
		t.Fatalf("no replace: %s", d.Summary(10))
	}

	// Export, import: nothing changes, owners and pins included.
	var buf bytes.Buffer
	if err := WriteTunnels(&buf, FormatCSV, tab.Tunnels()); err != nil {
		t.Fatal(err)
	}
	recs := mustReadTunnels(t, "export.csv", buf.String())
	if d := Plan(tab, recs, true); !d.Empty() || len(d.Unchanged) != tab.Len() {
		t.Fatalf("export re-import: %s", d.Summary(10))
	}
}

func TestPlanMapError(t *testing.T) {
	tab := newTable(t)
	recs := mustReadTunnels(t, "t.json", `[
{"id":"a","peer":"192.0.2.1","subnets":["10.1.0.0/24"]},
{"id":"b","peer":"192.0.2.2","subnets":["10.2.0.0/24"],"node":"vpn-zz"}
]`)
	d := Plan(tab, recs, false)
	_, err := tab.Apply(d.Batch)
	if err == nil {
		t.Fatal("unknown node accepted")
	}
	err = d.MapError(err)
	var errs *Errors
	if !errors.As(err, &errs) || errs.Total != 1 {
		t.Fatalf("%T %v", err, err)
	}
	if msg := err.Error(); !strings.Contains(msg, `t.json:3: element 1: "b": tunnel refused by the table`) || !strings.Contains(msg, "vpn-zz") {
		t.Errorf("message: %s", msg)
	}

	// A node that still owns tunnels cannot be replaced away.
	apply(t, tab, Plan(tab, recs[:1], false))
	nodes, _ := ReadNodes(strings.NewReader("name,address\nvpn-x,10.255.0.99\n"), Options{Name: "n.csv"})
	d = PlanNodes(tab, nodes, true)
	if len(d.Removed) != 3 || len(d.Added) != 1 {
		t.Fatalf("nodes: %s", d.Summary(5))
	}
	_, err = tab.Apply(d.Batch)
	err = d.MapError(err)
	if err == nil || !strings.Contains(err.Error(), "n.csv: ") || !strings.Contains(err.Error(), "node not in the file, so replacing removes it") {
		t.Fatalf("got %v", err)
	}
	if other := errors.New("disk full"); d.MapError(other) != other {
		t.Error("other errors must pass through")
	}
}

func TestPlanNodes(t *testing.T) {
	tab := newTable(t)
	nodes, err := ReadNodes(strings.NewReader(`[
{"name":"vpn-a","address":"10.255.0.11","weight":200},
{"name":"vpn-b","address":"10.255.0.12","mark":2},
{"name":"vpn-c","address":"10.255.0.13","mark":99}
]`), Options{Name: "n.json"})
	if err != nil {
		t.Fatal(err)
	}
	d := PlanNodes(tab, nodes, false)
	if !slices.Equal(d.Changed, []string{"vpn-a", "vpn-c"}) || !slices.Equal(d.Unchanged, []string{"vpn-b"}) {
		t.Fatalf("%s", d.Summary(5))
	}
	// vpn-c's mark is for life: the table refuses, the error names the line.
	_, err = tab.Apply(d.Batch)
	if err = d.MapError(err); err == nil || !strings.Contains(err.Error(), "n.json:4: element 2: \"vpn-c\"") {
		t.Fatalf("got %v", err)
	}
}

func TestSummary(t *testing.T) {
	d := &Diff{Kind: KindTunnels, Revision: 7, Added: []string{"a", "b", "c"}, Unchanged: []string{"x"}}
	got := d.Summary(2)
	want := "tunnels: 3 added, 0 changed, 0 removed, 1 unchanged (table revision 7); not replacing, so nothing is removed\n  added:     a b ... and 1 more\n  unchanged: x"
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

// TestPlanSuspendsPinsToDownNode: a tunnel pinned to a node that is down
// is placed by the scheduler (new) or left where failover put it
// (existing), and listed as suspended; the record itself is not changed.
func TestPlanSuspendsPinsToDownNode(t *testing.T) {
	tab := newTable(t)
	file := "id,peer,subnets,node\nold,192.0.2.1,10.1.0.0/24,vpn-b\n"
	apply(t, tab, Plan(tab, mustReadTunnels(t, "t.csv", file), false))
	p, err := tab.PlanNodeState("vpn-b", affinity.NodeDown)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tab.Apply(p.Batch()); err != nil {
		t.Fatal(err)
	}
	recs := mustReadTunnels(t, "t.csv", file+"new,192.0.2.2,10.2.0.0/24,vpn-b\n")
	d := Plan(tab, recs, false)
	if !slices.Equal(d.Suspended, []string{"new", "old"}) || !slices.Equal(d.Added, []string{"new"}) || len(d.Changed) != 0 {
		t.Fatalf("diff %s", d.Summary(10))
	}
	apply(t, tab, d)
	tu, _ := tab.Tunnel("new")
	if tu.Node == "vpn-b" || tu.Node == "" || tu.Pinned {
		t.Fatalf("new tunnel pinned to a down node placed as %+v", tu)
	}
	if recs[1].Node != "vpn-b" || !recs[1].Pinned {
		t.Fatalf("the record was changed: %+v", recs[1].Tunnel)
	}
}

// TestPlanNodesKeepsHealth: a nodes file carries no health record, so
// re-importing it keeps the record health stored; a file that sets
// another state is the operator's and clears it.
func TestPlanNodesKeepsHealth(t *testing.T) {
	tab := newTable(t)
	rec := affinity.NodeHealth{Down: true, Since: time.Unix(1700000100, 0).UTC(), Reason: "health: ike: timeout 2/2", HoldUntil: time.Unix(1700000200, 0).UTC(), Holds: 1}
	p, err := tab.PlanHealthState("vpn-b", affinity.NodeDown, rec, rec.Reason)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tab.Apply(p.Batch()); err != nil {
		t.Fatal(err)
	}
	same := strings.Replace(testNodes, "vpn-b,10.255.0.12,100,0,active,2,", "vpn-b,10.255.0.12,100,0,down,2,", 1)
	nodes, err := ReadNodes(strings.NewReader(same), Options{Name: "nodes.csv"})
	if err != nil {
		t.Fatal(err)
	}
	if d := PlanNodes(tab, nodes, false); !d.Empty() {
		t.Fatalf("re-import of the same nodes changes %v: the health record would be lost", d.Changed)
	}
	nodes, err = ReadNodes(strings.NewReader(testNodes), Options{Name: "nodes.csv"}) // vpn-b active
	if err != nil {
		t.Fatal(err)
	}
	d := PlanNodes(tab, nodes, false)
	if !slices.Equal(d.Changed, []string{"vpn-b"}) {
		t.Fatalf("%s", d.Summary(5))
	}
	apply(t, tab, d)
	if n, _ := tab.Node("vpn-b"); n.State != affinity.NodeActive || !n.Health.IsZero() {
		t.Fatalf("a state set by a file kept health's record: %+v", n)
	}
}

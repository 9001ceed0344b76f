package nms

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Diff is what importing a file would do to the table: which tunnels (or
// nodes) it adds, changes, removes and leaves alone, and the batch that
// does it.
type Diff struct {
	// Kind is KindTunnels for Plan and KindNodes for PlanNodes.
	Kind Kind `json:"kind"`
	// File is the file planned from, taken from the records; set it
	// yourself when planning an empty file, for messages.
	File string `json:"file,omitempty"`
	// Revision is the table revision the diff was planned against.
	Revision uint64 `json:"revision"`
	// Replace says the file replaces the table: what is not in the file
	// is removed.
	Replace bool `json:"replace"`
	// Tunnel ids or node names, each list sorted.
	Added     []string `json:"added"`
	Changed   []string `json:"changed"`
	Removed   []string `json:"removed"`
	Unchanged []string `json:"unchanged"`
	// Suspended lists tunnels the file pins to a node that is down: the
	// pin is not applied while the node is down (the tunnel stays where
	// failover put it, or a new one is scheduled), and re-importing the
	// file once the node is up moves them back.
	Suspended []string `json:"suspended_pins,omitempty"`
	// Batch is the change batch to apply or commit: deletions, then
	// changes, then additions. It is empty when the file matches the
	// table.
	Batch []affinity.Change `json:"-"`
	// Sources gives, for each element of Batch, the record it came from;
	// a removal has Line 0 and Index -1, since it is not in the file.
	Sources []Pos `json:"-"`
}

// importReason is the Change.Reason of an import, carried into journals.
func importReason(file string) string {
	if file == "" {
		return "import"
	}
	return "import " + file
}

// Plan compares a tunnels file with the table. A record equal to the
// table's tunnel in id, peer, subnets (as a set), comment and, when it
// names a node, node and pinned, is unchanged. A record without a node
// keeps whatever owner the scheduler gave the tunnel, but unpins a pinned
// one. With replace, tunnels the file does not list are removed.
// Importing the same file twice plans an empty batch the second time.
func Plan(t *affinity.Table, tunnels []TunnelRecord, replace bool) *Diff {
	d := &Diff{Kind: KindTunnels, Revision: t.Revision(), Replace: replace}
	if len(tunnels) > 0 {
		d.File = tunnels[0].Pos.File
	}
	reason := importReason(d.File)
	// One pass classifies every record, a second builds lists of the
	// exact size: a million records appended to growing slices copied
	// them over and over (a second of a million-tunnel import).
	class := make([]planClass, len(tunnels))
	var counts [planClasses]int
	suspended := 0
	var changes []affinity.Tunnel // the wanted tunnel of each changed record
	downNodes := map[string]bool{}
	for i := range tunnels {
		r := &tunnels[i]
		down := false
		if r.Node != "" {
			isDown, seen := downNodes[r.Node]
			if !seen {
				n, exists := t.Node(r.Node)
				isDown = exists && n.State == affinity.NodeDown
				downNodes[r.Node] = isDown
			}
			down = isDown
		}
		old, ok := t.Tunnel(r.ID)
		c := planAdd
		if ok {
			want := r.Tunnel
			if down {
				// Failover moved the tunnel off the down node; the
				// NMS's pin waits until the node is back.
				want.Node = ""
			}
			if want.Node == "" {
				// The scheduler's choice sticks; only a pin is undone.
				want.Node, want.Pinned = old.Node, false
			}
			// The table's own rule for a no-op change.
			if c = planUnchanged; !old.SameContent(&want) {
				c = planChange
				changes = append(changes, want)
			}
		}
		if down {
			c |= planSuspended
		}
		class[i] = c
		counts[c&^planSuspended]++
		if down {
			suspended++
		}
	}
	d.Added = make([]string, 0, counts[planAdd])
	d.Changed = make([]string, 0, counts[planChange])
	d.Unchanged = make([]string, 0, counts[planUnchanged])
	if suspended > 0 {
		d.Suspended = make([]string, 0, suspended)
	}
	if replace {
		inFile := make(map[string]struct{}, len(tunnels))
		for i := range tunnels {
			inFile[tunnels[i].ID] = struct{}{}
		}
		for _, tu := range t.Filter(func(tu *affinity.Tunnel) bool {
			_, ok := inFile[tu.ID]
			return !ok
		}) {
			d.Removed = append(d.Removed, tu.ID)
		}
	}

	n := len(d.Removed) + counts[planChange] + counts[planAdd]
	d.Batch = make([]affinity.Change, 0, n)
	d.Sources = make([]Pos, 0, n)
	for _, id := range d.Removed {
		d.Batch = append(d.Batch, affinity.Change{Kind: affinity.DeleteTunnel, Name: id, Reason: reason})
		d.Sources = append(d.Sources, Pos{File: d.File, Index: -1})
	}
	// Deletions, then changes, then additions, each in file order.
	// New tunnels whose pin is suspended (at most that many).
	unpinned := make([]affinity.Tunnel, 0, suspended)
	for _, want := range []planClass{planChange, planAdd} {
		k := 0
		for i := range tunnels {
			c := class[i]
			if c&^planSuspended != want {
				continue
			}
			r := &tunnels[i]
			// Apply copies the tunnel it is given, so the record can
			// serve.
			tu := &r.Tunnel
			switch {
			case want == planChange:
				tu = &changes[k]
				k++
				d.Changed = append(d.Changed, r.ID)
			case c&planSuspended != 0:
				// New tunnels whose pin is suspended are added
				// unpinned.
				unpinned = append(unpinned, r.Tunnel)
				tu = &unpinned[len(unpinned)-1]
				tu.Node, tu.Pinned = "", false
				d.Added = append(d.Added, r.ID)
			default:
				d.Added = append(d.Added, r.ID)
			}
			d.Batch = append(d.Batch, affinity.Change{Kind: affinity.PutTunnel, Tunnel: tu, Reason: reason})
			d.Sources = append(d.Sources, r.Pos)
		}
	}
	for i, c := range class {
		if c&^planSuspended == planUnchanged {
			d.Unchanged = append(d.Unchanged, tunnels[i].ID)
		}
		if c&planSuspended != 0 {
			d.Suspended = append(d.Suspended, tunnels[i].ID)
		}
	}
	d.sortLists()
	return d
}

// planClass is what Plan does with a record; planSuspended is or-ed in
// when the record pins a tunnel to a node that is down.
type planClass uint8

const (
	planAdd planClass = iota
	planChange
	planUnchanged
	planClasses

	planSuspended planClass = 1 << 7
)

// PlanNodes compares a nodes file with the table. A record equal to the
// table's node is unchanged; a record without a mark keeps the node's
// mark. With replace, nodes the file does not list are removed, which
// Apply refuses for nodes that still own tunnels.
func PlanNodes(t *affinity.Table, nodes []NodeRecord, replace bool) *Diff {
	d := &Diff{Kind: KindNodes, Revision: t.Revision(), Replace: replace}
	if len(nodes) > 0 {
		d.File = nodes[0].Pos.File
	}
	reason := importReason(d.File)
	var changed, added []int
	var changes []affinity.Node
	inFile := make(map[string]struct{}, len(nodes))
	for i := range nodes {
		r := &nodes[i]
		inFile[r.Name] = struct{}{}
		old, ok := t.Node(r.Name)
		if !ok {
			added = append(added, i)
			d.Added = append(d.Added, r.Name)
			continue
		}
		want := r.Node
		if want.Mark == 0 {
			want.Mark = old.Mark
		}
		if want.Weight == 0 {
			want.Weight = affinity.DefaultWeight
		}
		// Files carry no health record: the node keeps the table's,
		// unless the file sets another state, which is then the
		// operator's (as with `node up` or `node down`).
		want.Health = old.Health
		if want.State != old.State {
			want.Health = old.Health.AfterOperator(affinity.ActionSetState)
		}
		if want.Equal(&old) {
			d.Unchanged = append(d.Unchanged, r.Name)
			continue
		}
		d.Changed = append(d.Changed, r.Name)
		changed = append(changed, i)
		changes = append(changes, want)
	}
	if replace {
		for _, n := range t.Nodes() {
			if _, ok := inFile[n.Name]; !ok {
				d.Removed = append(d.Removed, n.Name)
			}
		}
	}
	d.startBatch(affinity.DeleteNode, len(changed)+len(added), reason)
	for k, i := range changed {
		d.add(affinity.Change{Kind: affinity.PutNode, Node: &changes[k], Reason: reason}, nodes[i].Pos)
	}
	for _, i := range added {
		d.add(affinity.Change{Kind: affinity.PutNode, Node: &nodes[i].Node, Reason: reason}, nodes[i].Pos)
	}
	d.sortLists()
	return d
}

func (d *Diff) sortLists() {
	for _, l := range [][]string{d.Added, d.Changed, d.Removed, d.Unchanged, d.Suspended} {
		slices.Sort(l)
	}
}

// startBatch sizes Batch for the removals and n more changes, and puts
// the removals (with del, by name) first: they come from no record of the
// file.
func (d *Diff) startBatch(del affinity.ChangeKind, n int, reason string) {
	d.Batch = make([]affinity.Change, 0, len(d.Removed)+n)
	d.Sources = make([]Pos, 0, cap(d.Batch))
	for _, name := range d.Removed {
		d.add(affinity.Change{Kind: del, Name: name, Reason: reason}, Pos{File: d.File, Index: -1})
	}
}

// add appends a change and the record it comes from, so Batch and
// Sources stay in step.
func (d *Diff) add(c affinity.Change, from Pos) {
	d.Batch = append(d.Batch, c)
	d.Sources = append(d.Sources, from)
}

// Empty reports whether applying the diff would change nothing.
func (d *Diff) Empty() bool { return len(d.Batch) == 0 }

// MapError turns a *affinity.BatchError from applying or committing
// d.Batch into an *Errors that points at the file's lines, so the operator
// fixes the file rather than decoding batch indexes. Other errors are
// returned as they are.
func (d *Diff) MapError(err error) error {
	var be *affinity.BatchError
	if !errors.As(err, &be) {
		return err
	}
	out := &Errors{Total: be.Total}
	what := "tunnel"
	if d.Kind == KindNodes {
		what = "node"
	}
	for _, ce := range be.Errors {
		fe := &FieldError{Pos: Pos{File: d.File, Index: -1}, Value: ce.Key}
		if ce.Index >= 0 && ce.Index < len(d.Sources) {
			fe.Pos = d.Sources[ce.Index]
		}
		if fe.Pos.Line == 0 && fe.Pos.Index < 0 {
			fe.Msg = fmt.Sprintf("%s not in the file, so replacing removes it: %v", what, ce.Err)
		} else {
			fe.Msg = fmt.Sprintf("%s refused by the table: %v", what, ce.Err)
		}
		out.List = append(out.List, fe)
	}
	return out
}

// Summary describes the diff for a dry run: the counts, then up to max
// ids or names of each list.
func (d *Diff) Summary(max int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %d added, %d changed, %d removed, %d unchanged (table revision %d)",
		d.Kind, len(d.Added), len(d.Changed), len(d.Removed), len(d.Unchanged), d.Revision)
	if !d.Replace {
		b.WriteString("; not replacing, so nothing is removed")
	}
	if len(d.Suspended) > 0 {
		fmt.Fprintf(&b, "\n%d pinned to a node that is down: the scheduler places them until it is back", len(d.Suspended))
	}
	for _, l := range []struct {
		name string
		ids  []string
	}{{"added", d.Added}, {"changed", d.Changed}, {"removed", d.Removed}, {"unchanged", d.Unchanged}, {"suspended", d.Suspended}} {
		if len(l.ids) == 0 || max <= 0 {
			continue
		}
		n := min(max, len(l.ids))
		fmt.Fprintf(&b, "\n  %-10s %s", l.name+":", strings.Join(l.ids[:n], " "))
		if n < len(l.ids) {
			fmt.Fprintf(&b, " ... and %d more", len(l.ids)-n)
		}
	}
	return b.String()
}

package affinity

import (
	"cmp"
	"maps"
	"slices"
)

// Previous returns the table's revision before the batch.
func (a *Applied) Previous() uint64 { return a.prev }

// DiffTo returns the resolved changes that make the table equal to s,
// records, times and revisions included, for ApplyAt or ApplyReset (a
// replica taking its master's snapshot, a simulator installing one).
// When in is set, only the tunnels it accepts are compared: s then holds
// just those (a repair of some hash buckets); nodes and the unknown-peer
// buckets are always compared whole.
//
// Deletes come first so that no put meets an outdated peer, subnet, mark
// or address: tunnels that differ or are gone, then nodes that are gone
// or changed mark or address (a mark is for life, so such a node is
// removed and added again, its tunnels with it). A tunnel that differs
// only in its times or revision is deleted and put again: a put of the
// same content alone would be a no-op and keep the old revision.
func (t *Table) DiffTo(s *Snapshot, in func(id string) bool) []Change {
	var cur []Tunnel
	if in == nil {
		cur = t.Tunnels()
	} else {
		cur = t.Filter(func(tu *Tunnel) bool { return in(tu.ID) })
	}
	curNodes := map[string]Node{}
	for _, n := range t.Nodes() {
		curNodes[n.Name] = n
	}
	wantNodes := make(map[string]*Node, len(s.Nodes))
	for i := range s.Nodes {
		wantNodes[s.Nodes[i].Name] = &s.Nodes[i]
	}
	want := make(map[string]*Tunnel, len(s.Tunnels))
	for i := range s.Tunnels {
		want[s.Tunnels[i].ID] = &s.Tunnels[i]
	}
	recreate := map[string]bool{}
	for name, c := range curNodes {
		if w, ok := wantNodes[name]; !ok || w.Mark != c.Mark || w.Addr != c.Addr {
			recreate[name] = true
		}
	}
	const reason = "snapshot"
	var ops []Change
	keep := map[string]bool{}
	slices.SortFunc(cur, func(a, b Tunnel) int { return cmp.Compare(a.ID, b.ID) })
	for i := range cur {
		c := &cur[i]
		if w := want[c.ID]; w != nil && !recreate[c.Node] && c.Equal(w) {
			keep[c.ID] = true
			continue
		}
		ops = append(ops, Change{Kind: DeleteTunnel, Name: c.ID, Reason: reason})
	}
	for _, name := range slices.Sorted(maps.Keys(recreate)) {
		ops = append(ops, Change{Kind: DeleteNode, Name: name, Reason: reason})
	}
	for _, name := range slices.Sorted(maps.Keys(wantNodes)) {
		w := wantNodes[name]
		if c, ok := curNodes[name]; ok && !recreate[name] && c.Equal(w) {
			continue
		}
		ops = append(ops, Change{Kind: PutNode, Node: w, Reason: reason})
	}
	for i := range s.Tunnels {
		if w := &s.Tunnels[i]; !keep[w.ID] {
			ops = append(ops, Change{Kind: PutTunnel, Tunnel: w, Reason: reason})
		}
	}
	// The unknown-peer buckets are compared whole, in a repair too.
	return append(ops, BucketChanges(t.Buckets(), s.Buckets, reason)...)
}

// Restamp moves a batch that Apply just applied to revision rev, above
// the one Apply gave it: the table's revision, the tunnels' revision
// stamps and Changes. A store whose revision is assigned when the batch
// commits elsewhere (etcd's revision of the transaction) learns it only
// then, and need not apply the batch twice. Like Rollback, it is valid
// only while no other change was applied after the batch.
func (a *Applied) Restamp(rev uint64) {
	if a == nil || a.t == nil || rev < a.Revision {
		return
	}
	a.t.mu.Lock()
	defer a.t.mu.Unlock()
	for _, u := range a.undo {
		if u.newT != nil {
			u.newT.rev = rev
		}
	}
	for i := range a.Changes {
		if c := &a.Changes[i]; c.Tunnel != nil {
			c.Tunnel.Revision = rev
		}
	}
	a.t.rev, a.Revision = rev, rev
}

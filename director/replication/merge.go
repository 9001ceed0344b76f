package replication

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Conflict is one record both directors changed differently during a
// split brain, and how the merge decided.
type Conflict struct {
	// Kind is "tunnel" or "node".
	Kind string `json:"kind"`
	// Key is the tunnel id or node name.
	Key string `json:"key"`
	// Local and Peer are the two versions (tunnels); LocalNode and
	// PeerNode for nodes. A nil version did not exist on that side.
	Local     *affinity.Tunnel `json:"local,omitempty"`
	Peer      *affinity.Tunnel `json:"peer,omitempty"`
	LocalNode *affinity.Node   `json:"local_node,omitempty"`
	PeerNode  *affinity.Node   `json:"peer_node,omitempty"`
	// Winner is "local" or "peer".
	Winner string `json:"winner"`
	// Why states the rule that decided, with the versions compared.
	Why string `json:"why"`
}

// MergeReport is what one split-brain merge did.
type MergeReport struct {
	At time.Time `json:"at"`
	// PeerID, PeerRevision and PeerEpoch identify the backup's history
	// that was merged; LocalRevision and LocalEpoch this master's.
	PeerID        uint32 `json:"peer_id"`
	PeerRevision  uint64 `json:"peer_revision"`
	PeerEpoch     uint64 `json:"peer_epoch"`
	LocalRevision uint64 `json:"local_revision"`
	LocalEpoch    uint64 `json:"local_epoch"`
	// Revision is the merge's commit (0 when nothing needed changing).
	Revision uint64 `json:"revision"`
	// KeptFromPeer lists tunnels only the peer had, now added here.
	KeptFromPeer []string `json:"kept_from_peer"`
	// NodesFromPeer lists nodes only the peer had.
	NodesFromPeer []string `json:"nodes_from_peer"`
	// Fork is the last revision both histories share, as far as the
	// epoch histories tell.
	Fork uint64 `json:"fork"`
	// AdoptedFromPeer lists tunnels only the peer changed since the fork,
	// taken from it without conflict.
	AdoptedFromPeer []string `json:"adopted_from_peer"`
	// Conflicts lists every record both sides changed since the fork
	// (and every peer change the table refused), with the winner.
	Conflicts []Conflict `json:"conflicts"`
}

// forkRev estimates the last revision two histories share: the revision
// before the first epoch range where they part.
func forkRev(a, b []epochStart, revA, revB uint64) uint64 {
	for i := 0; ; i++ {
		switch {
		case i < len(a) && i < len(b) && a[i] == b[i]:
			continue
		case i < len(a) && i < len(b):
			return min(a[i].first, b[i].first, revA+1, revB+1) - 1
		case i < len(a):
			return min(a[i].first, revB+1) - 1
		case i < len(b):
			return min(b[i].first, revA+1) - 1
		}
		return min(revA, revB)
	}
}

// version orders two versions of one record: the epoch of the master that
// wrote it, then its revision, then the writer's director id.
type version struct {
	epoch, rev uint64
	id         uint32
}

func (v version) cmp(o version) int {
	return cmp.Or(cmp.Compare(v.epoch, o.epoch), cmp.Compare(v.rev, o.rev), cmp.Compare(v.id, o.id))
}

func (v version) String() string {
	return fmt.Sprintf("(epoch %d, revision %d, director %d)", v.epoch, v.rev, v.id)
}

// sameNodeAttrs compares two sides' versions of a node, marks aside:
// a node's mark is kept from the master side.
func sameNodeAttrs(a, b *affinity.Node) bool {
	n := *b
	n.Mark = a.Mark
	return a.Equal(&n)
}

// merge folds a backup's diverged table into this master's by the rule in
// the package documentation, commits the result as one revision above
// both sides', and then sends the backup a snapshot of it.
func (r *Replicator) merge(t *target) {
	now := r.clk.Now()
	own := r.st.Table().Snapshot()
	rep := MergeReport{At: now, PeerID: r.peer.ID, PeerRevision: t.rev, PeerEpoch: t.revEpoch,
		LocalRevision: own.Revision, LocalEpoch: r.epochAt(own.Revision)}
	rep.Fork = forkRev(r.history, t.history, own.Revision, t.rev)
	localSide := version{epoch: r.epochAt(own.Revision), rev: own.Revision, id: r.cfg.ID}
	peerSide := version{epoch: t.revEpoch, rev: t.rev, id: r.peer.ID}

	// The merge is written in an epoch above both, so that it orders
	// after every version it chose between.
	if top := max(t.revEpoch, r.peer.Epoch); top >= r.epoch {
		r.epoch = top + 1
	}
	newRev := max(own.Revision, t.rev, r.rev) + 1
	r.noteEpoch(r.epoch, newRev)

	ownNodes := map[string]*affinity.Node{}
	marks := map[uint16]bool{}
	addrs := map[string]bool{}
	for i := range own.Nodes {
		n := &own.Nodes[i]
		ownNodes[n.Name] = n
		marks[n.Mark] = true
		addrs[n.Addr.String()] = true
	}
	var ops []affinity.Change
	reason := fmt.Sprintf("split-brain merge with director %d", r.peer.ID)
	slices.SortFunc(t.nodes, func(a, b affinity.Node) int { return cmp.Compare(a.Name, b.Name) })
	for i := range t.nodes {
		pn := t.nodes[i]
		on := ownNodes[pn.Name]
		switch {
		case on == nil:
			if marks[pn.Mark] {
				pn.Mark = 0 // taken here: the table assigns another
			}
			marks[pn.Mark] = true
			rep.NodesFromPeer = append(rep.NodesFromPeer, pn.Name)
			ops = append(ops, affinity.Change{Kind: affinity.PutNode, Node: &pn, Reason: reason})
		case !sameNodeAttrs(on, &pn):
			c := Conflict{Kind: "node", Key: pn.Name, LocalNode: ptrTo(*on), PeerNode: ptrTo(pn), Winner: "local"}
			if peerSide.cmp(localSide) > 0 {
				c.Winner = "peer"
				n := pn
				n.Mark = on.Mark // a node's mark is for life
				ops = append(ops, affinity.Change{Kind: affinity.PutNode, Node: &n, Reason: reason})
			}
			c.Why = fmt.Sprintf("nodes carry no version: the side whose latest revision is newer wins: local %s, peer %s", localSide, peerSide)
			rep.Conflicts = append(rep.Conflicts, c)
		}
	}
	ownT := make(map[string]*affinity.Tunnel, len(own.Tunnels))
	for i := range own.Tunnels {
		ownT[own.Tunnels[i].ID] = &own.Tunnels[i]
	}
	slices.SortFunc(t.tunnels, func(a, b affinity.Tunnel) int { return cmp.Compare(a.ID, b.ID) })
	var puts []affinity.Change
	for i := range t.tunnels {
		pt := t.tunnels[i]
		ot := ownT[pt.ID]
		if ot != nil && ot.SameContent(&pt) {
			continue
		}
		won := pt
		won.Revision = newRev
		put := affinity.Change{Kind: affinity.PutTunnel, Tunnel: &won, Reason: reason}
		if ot == nil {
			rep.KeptFromPeer = append(rep.KeptFromPeer, pt.ID)
			puts = append(puts, put)
			continue
		}
		lv := version{epoch: r.epochAt(ot.Revision), rev: ot.Revision, id: r.cfg.ID}
		pv := version{epoch: historyEpoch(t.history, pt.Revision), rev: pt.Revision, id: r.peer.ID}
		c := Conflict{Kind: "tunnel", Key: pt.ID, Local: ptrTo(*ot), Peer: ptrTo(pt), Winner: "local",
			Why: fmt.Sprintf("higher (epoch, revision, director) wins: local %s, peer %s", lv, pv)}
		if pv.cmp(lv) > 0 {
			c.Winner = "peer"
			puts = append(puts, put)
		}
		switch {
		case ot.Revision > rep.Fork && pt.Revision > rep.Fork:
			rep.Conflicts = append(rep.Conflicts, c)
		case c.Winner == "peer":
			rep.AdoptedFromPeer = append(rep.AdoptedFromPeer, pt.ID)
		}
	}
	ops = append(ops, puts...)

	// A peer's tunnel can clash with a local one (same peer address or an
	// overlapping subnet under another id): only one can stay. The table
	// names the refused changes; they are dropped and reported.
	var a *affinity.Applied
	for attempt := 0; len(ops) > 0; attempt++ {
		var err error
		a, err = r.st.CommitAt(newRev, ops)
		if err == nil {
			break
		}
		var be *affinity.BatchError
		if !errors.As(err, &be) || attempt >= 16 {
			r.setOOS(fmt.Sprintf("split-brain merge with director %d failed: %v", r.peer.ID, err))
			r.c.ApplyFailures++
			return
		}
		drop := map[int]bool{}
		for _, ce := range be.Errors {
			drop[ce.Index] = true
			c := ops[ce.Index]
			conf := Conflict{Kind: "tunnel", Key: c.Key(), Winner: "local", Why: "peer's version refused here: " + ce.Err.Error()}
			if c.Tunnel != nil {
				conf.Peer = ptrTo(*c.Tunnel)
				if ot := ownT[c.Key()]; ot != nil {
					conf.Local = ptrTo(*ot)
				}
			} else if c.Node != nil {
				conf.Kind, conf.PeerNode = "node", ptrTo(*c.Node)
			}
			rep.Conflicts = append(rep.Conflicts, conf)
		}
		kept := ops[:0:0]
		for i, c := range ops {
			if !drop[i] {
				kept = append(kept, c)
			}
		}
		ops = kept
	}
	if a != nil {
		r.committed(a)
		rep.Revision = a.Revision
	}
	r.m.merged = [2]uint64{t.rev, t.revEpoch}
	r.c.Merges++
	r.c.Conflicts += uint64(len(rep.Conflicts))
	r.conflicts = append(r.conflicts, rep)
	if len(r.conflicts) > 16 {
		r.conflicts = r.conflicts[len(r.conflicts)-16:]
	}
	r.log.Warn("split brain merged", "peer", r.peer.ID, "peer_revision", t.rev, "kept_from_peer", len(rep.KeptFromPeer),
		"conflicts", len(rep.Conflicts), "merge_revision", rep.Revision)
	if r.cfg.OnConflict != nil {
		r.cfg.OnConflict(rep)
	}
	r.out = nil
	r.m.deliveredAt = time.Time{}
	r.startOut(xSnapshot, allBuckets(), "after split-brain merge")
}

func ptrTo[T any](v T) *T { return &v }

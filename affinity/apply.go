package affinity

import (
	"errors"
	"iter"
	"slices"

	"fmt"
	"github.com/gaissmai/bart"
	"math"
	"net/netip"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/enum"
)

// ChangeKind says what a Change does.
type ChangeKind uint8

// The kinds of change.
const (
	PutNode ChangeKind = iota + 1
	DeleteNode
	PutTunnel
	DeleteTunnel
	// PutBucket gives one unknown-peer hash bucket to a node (see
	// BucketMark and Buckets).
	PutBucket
)

var changeKindNames = [...]string{"", "put-node", "delete-node", "put-tunnel", "delete-tunnel", "put-bucket"}

func (k ChangeKind) String() string { return enum.String(changeKindNames[:], "ChangeKind", k) }

// Change is one step of a batch given to Apply.
type Change struct {
	Kind ChangeKind
	// Node is the new node for PutNode.
	Node *Node
	// Tunnel is the new tunnel for PutTunnel. An empty Node asks the
	// scheduler to place a new tunnel and keeps an existing tunnel's owner.
	Tunnel *Tunnel
	// Bucket is the bucket and its new node for PutBucket.
	Bucket *BucketMark
	// Name is the node name or tunnel id for the Delete kinds.
	Name string
	// Reason says why the change was made ("import", "node n1 down",
	// "rebalance: node n2 draining"); carried into journals and reports.
	Reason string
	// Old is the tunnel as it was before a PutTunnel or DeleteTunnel, in
	// Applied.Changes only (not encoded): the dataplane removes the old
	// peer and subnets from it.
	Old *Tunnel
	// OldNode is the node as it was before a PutNode or DeleteNode, in
	// Applied.Changes only (not encoded); nil for a new node.
	OldNode *Node
	// OldBucket is the bucket as it was before a PutBucket, in
	// Applied.Changes only (not encoded): Count is the table's bucket
	// count before (a different one means the change resized the
	// buckets), Mark the bucket's node before (0 after a resize).
	OldBucket *BucketMark
}

// Key returns the node name or tunnel id the change is about.
func (c *Change) Key() string {
	switch {
	case c.Node != nil:
		return c.Node.Name
	case c.Tunnel != nil:
		return c.Tunnel.ID
	case c.Bucket != nil:
		return fmt.Sprintf("bucket %d/%d", c.Bucket.Index, c.Bucket.Count)
	}
	return c.Name
}

// ChangeError is a change that Apply refused.
type ChangeError struct {
	Index int // position in the batch
	Kind  ChangeKind
	Key   string // tunnel id or node name
	Err   error
}

func (e *ChangeError) Error() string {
	return fmt.Sprintf("change %d (%s %s): %v", e.Index, e.Kind, e.Key, e.Err)
}

func (e *ChangeError) Unwrap() error { return e.Err }

// MaxReportedErrors caps the errors a BatchError lists.
const MaxReportedErrors = 100

// BatchError lists every refused change of a batch (up to
// MaxReportedErrors) and how many there were in all. Nothing of the batch
// was applied.
type BatchError struct {
	Errors []*ChangeError
	Total  int
}

func (e *BatchError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d change(s) refused, nothing applied", e.Total)
	for _, ce := range e.Errors {
		b.WriteString("\n  ")
		b.WriteString(ce.Error())
	}
	if e.Total > len(e.Errors) {
		fmt.Fprintf(&b, "\n  ... and %d more", e.Total-len(e.Errors))
	}
	return b.String()
}

// Sentinel errors, wrapped by ChangeError, for callers that branch on them.
var (
	ErrConflict    = errors.New("conflict")
	ErrUnknownNode = errors.New("unknown node")
	ErrNotFound    = errors.New("not found")
	ErrInvalid     = errors.New("invalid")
)

// Applied is the result of a successful Apply.
type Applied struct {
	// Revision is the table revision after the batch; unchanged when
	// the batch changed nothing.
	Revision uint64
	// Changes are the effective changes, resolved: nodes carry their
	// marks, tunnels their owners, times and revision. No-op changes are
	// left out, so replaying Changes on an equal table gives an equal
	// table.
	Changes []Change

	t    *Table
	undo []undoRec
	prev uint64
}

// Rollback undoes the batch. It is valid only as long as no other change
// was applied after it; the store uses it when its commit fails.
func (a *Applied) Rollback() {
	if a == nil || a.t == nil {
		return
	}
	a.t.mu.Lock()
	defer a.t.mu.Unlock()
	a.t.rollback(a.undo)
	a.t.rev = a.prev
	a.t = nil
}

// undoRec undoes one change. It is kept to 40 bytes, one per change of a
// batch until it commits: the rare bucket change keeps its part behind a
// pointer.
type undoRec struct {
	oldT, newT *entry
	oldN, newN *Node
	bucket     *bucketUndo
}

// bucketUndo undoes a PutBucket: the bucket's old mark, or after a resize
// the whole old assignment.
type bucketUndo struct {
	resized    bool
	index      int
	mark       uint16
	oldBuckets []uint16
}

// Apply applies a batch of changes atomically: either every change is
// valid and all are applied, bumping the revision once, or a *BatchError
// lists every refused change and the table is unchanged. Changes that
// alter nothing are dropped; a batch of only those does not bump the
// revision.
func (t *Table) Apply(batch []Change) (*Applied, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.applyLocked(batch, t.rev+1, modeStamp)
}

// Check reports what Apply would refuse, changing nothing: the batch is
// applied and rolled back under one hold of the lock, so no reader sees it.
func (t *Table) Check(batch []Change) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	a, err := t.applyLocked(batch, t.rev+1, modeStamp)
	if err != nil {
		return err
	}
	t.rollback(a.undo)
	t.rev = a.prev
	return nil
}

// ApplyAt applies resolved changes (as Applied.Changes lists them) at the
// revision chosen by the caller, keeping the times and revisions they
// carry: a replica replaying its master's journal ends up equal to it. The
// revision must be above the table's.
func (t *Table) ApplyAt(rev uint64, batch []Change) (*Applied, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if rev <= t.rev {
		return nil, fmt.Errorf("apply at revision %d: table is already at revision %d", rev, t.rev)
	}
	return t.applyLocked(batch, rev, modeReplay)
}

// ApplyReset applies resolved changes and sets the table's revision to
// rev, whatever it was: a replica taking its master's snapshot or repair
// at a revision it already reached (or passed, on a history the master
// does not share) ends at exactly the master's revision. Rollback restores
// the previous revision.
func (t *Table) ApplyReset(rev uint64, changes []Change) (*Applied, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	a, err := t.applyLocked(changes, rev, modeReplay)
	if err != nil {
		return nil, err
	}
	t.rev, a.Revision = rev, rev
	return a, nil
}

// Load fills an empty table with nodes and tunnels as stored (marks, owners,
// times and revisions kept) and sets the revision. The table keeps the
// tunnels' Subnets slices. Every invariant is checked; on error the table
// is left empty.
// sizeHint, when known, sizes the indexes once instead of growing them.
func (t *Table) Load(rev uint64, nodes []Node, sizeHint int, tunnels iter.Seq[*Tunnel]) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.nodes) > 0 || len(t.tunnels) > 0 {
		return errors.New("load into a table that is not empty")
	}
	if sizeHint > 0 {
		t.tunnels = make(map[string]owned, sizeHint)
		t.peers = newPeerIndex(sizeHint)
	}
	var berr BatchError
	i := 0
	fail := func(c *Change, err error) {
		berr.Total++
		if len(berr.Errors) < MaxReportedErrors {
			berr.Errors = append(berr.Errors, &ChangeError{Index: i, Kind: c.Kind, Key: c.Key(), Err: err})
		}
	}
	for k := range nodes {
		c := Change{Kind: PutNode, Node: &nodes[k]}
		if nodes[k].Mark == 0 {
			fail(&c, fmt.Errorf("%w: stored node has no mark", ErrInvalid))
		} else if _, _, _, err := t.putNode(&c); err != nil {
			fail(&c, err)
		}
		i++
	}
	for tu := range tunnels {
		c := Change{Kind: PutTunnel, Tunnel: tu}
		n, np := len(t.tunnels), t.peers.len()
		if _, _, _, err := t.putTunnel(&c, 0, 0, modeLoad); err != nil {
			fail(&c, err)
		} else if len(t.tunnels) == n {
			fail(&c, fmt.Errorf("%w: tunnel %s appears twice", ErrConflict, tu.ID))
		} else if t.peers.len() == np {
			// Its peer replaced another tunnel's in the index: find
			// that one to name it (a refused load only).
			for _, o := range t.tunnels {
				if o.e.peer == tu.Peer && o.e.id != tu.ID {
					fail(&c, peerTaken(tu.Peer, o.e))
					break
				}
			}
		}
		i++
	}
	if berr.Total > 0 {
		t.reset()
		return &berr
	}
	t.rev = rev
	return nil
}

func (t *Table) reset() {
	clear(t.nodes)
	clear(t.tunnels)
	t.peers.clear()
	t.byMark = [MaxMark + 1]*Node{}
	t.count = [MaxMark + 1]int{}
	t.subnets = bart.Table[*entry]{}
	t.buckets = nil
	t.refreshActive()
}

// applyMode says how putTunnel treats times, revisions and results.
type applyMode uint8

const (
	// modeStamp stamps new times and the batch revision (local changes).
	modeStamp applyMode = iota
	// modeReplay keeps the times and revision the change carries.
	modeReplay
	// modeLoad is modeReplay without results or undo, and keeps the
	// caller's Subnets slice: a million tunnels load without copies.
	modeLoad
)

// sizedBatch is the batch size from which Apply sizes its results up front.
const sizedBatch = 4096

// applyLocked applies a batch, recording an undo log so that a failing
// batch leaves no trace.
func (t *Table) applyLocked(batch []Change, rev uint64, mode applyMode) (*Applied, error) {
	a := &Applied{t: t, prev: t.rev, Revision: t.rev}
	if len(batch) > sizedBatch {
		// Sized once: appending a million changes doubled and copied
		// the slices (and faulted in fresh pages) twenty times.
		a.Changes = make([]Change, 0, len(batch))
		a.undo = make([]undoRec, 0, len(batch))
		if len(t.tunnels) == 0 {
			// The first import into an empty table: size the
			// indexes for it instead of growing them.
			t.tunnels = make(map[string]owned, len(batch))
			t.peers = newPeerIndex(len(batch))
		}
	}
	var berr BatchError
	now := unixSeconds(t.now())
	fail := func(i int, c *Change, err error) {
		berr.Total++
		if len(berr.Errors) < MaxReportedErrors {
			berr.Errors = append(berr.Errors, &ChangeError{Index: i, Kind: c.Kind, Key: c.Key(), Err: err})
		}
	}
	for i := range batch {
		c := &batch[i]
		var (
			res Change
			u   undoRec
			ok  bool
			err error
		)
		switch c.Kind {
		case PutNode:
			res, u, ok, err = t.putNode(c)
		case DeleteNode:
			res, u, ok, err = t.deleteNode(c)
		case PutTunnel:
			res, u, ok, err = t.putTunnel(c, rev, now, mode)
		case DeleteTunnel:
			res, u, ok, err = t.deleteTunnel(c)
		case PutBucket:
			res, u, ok, err = t.putBucket(c)
		default:
			err = fmt.Errorf("%w: unknown change kind %d", ErrInvalid, c.Kind)
		}
		if err != nil {
			fail(i, c, err)
			continue
		}
		if ok {
			res.Reason = c.Reason
			a.Changes = append(a.Changes, res)
			a.undo = append(a.undo, u)
		}
	}
	if berr.Total > 0 {
		t.rollback(a.undo)
		return nil, &berr
	}
	if len(a.Changes) > 0 {
		t.rev = rev
		a.Revision = rev
	}
	return a, nil
}

func (t *Table) rollback(undo []undoRec) {
	for i := len(undo) - 1; i >= 0; i-- {
		u := undo[i]
		switch {
		case u.bucket != nil:
			t.rollbackBucket(u.bucket)
		case u.newT != nil || u.oldT != nil:
			switch {
			case u.newT != nil && u.oldT != nil:
				t.reindex(u.newT, u.oldT)
			case u.newT != nil:
				t.unindex(u.newT)
			default:
				t.index(u.oldT)
			}
		default:
			if u.newN != nil {
				delete(t.nodes, u.newN.Name)
				t.byMark[u.newN.Mark] = nil
			}
			if u.oldN != nil {
				t.nodes[u.oldN.Name] = u.oldN
				t.byMark[u.oldN.Mark] = u.oldN
			}
			t.refreshActive()
		}
	}
}

func (t *Table) index(e *entry) {
	t.tunnels[e.id] = owned{e, e.mark}
	t.setPeer(e)
	for _, p := range e.subnets {
		t.subnets.Insert(p, e)
	}
	t.count[e.mark]++
}

func (t *Table) unindex(e *entry) {
	delete(t.tunnels, e.id)
	t.deletePeer(e.peer)
	for _, p := range e.subnets {
		t.subnets.Delete(p)
	}
	t.count[e.mark]--
}

// reindex replaces old by e, the same tunnel id, in the indexes. A move
// (same peer and subnets, another node) only changes what the keys point
// to: no key leaves or enters the peer map or the prefix table, so the
// keys are overwritten in place instead of deleted and inserted again
// (a node down moves every tunnel of the node this way).
func (t *Table) reindex(old, e *entry) {
	if old.peer != e.peer || !slices.Equal(old.subnets, e.subnets) {
		t.unindex(old)
		t.index(e)
		return
	}
	t.tunnels[e.id] = owned{e, e.mark}
	t.setPeer(e)
	for _, p := range e.subnets {
		t.subnets.Insert(p, e)
	}
	t.count[old.mark]--
	t.count[e.mark]++
}

func (t *Table) isVIP(a netip.Addr) bool {
	for _, v := range t.vips {
		if v == a {
			return true
		}
	}
	return false
}

func (t *Table) putNode(c *Change) (Change, undoRec, bool, error) {
	if c.Node == nil {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: put-node without a node", ErrInvalid)
	}
	n := *c.Node
	if err := ValidateID("node name", n.Name); err != nil {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if err := ValidateAddr(n.Addr); err != nil {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: node address: %v", ErrInvalid, err)
	}
	if t.isVIP(n.Addr) {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: node address %s is a director VIP", ErrConflict, n.Addr)
	}
	if n.Addr6.IsValid() {
		if err := ValidateAddr(n.Addr6); err != nil || !n.Addr6.Is6() || !n.Addr.Is4() {
			return Change{}, undoRec{}, false, fmt.Errorf("%w: node IPv6 address %s: want a unicast IPv6 address beside an IPv4 address", ErrInvalid, n.Addr6)
		}
	}
	if n.Weight == 0 {
		n.Weight = DefaultWeight
	}
	if n.Weight > 10000 {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: weight %d above 10000", ErrInvalid, n.Weight)
	}
	if n.Capacity < 0 {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: capacity %d is negative", ErrInvalid, n.Capacity)
	}
	if n.State > NodeDown {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: state %d", ErrInvalid, n.State)
	}
	if err := ValidateComment(n.Comment); err != nil {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: node %v", ErrInvalid, err)
	}
	if err := n.Health.validate(); err != nil {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: node %s: %v", ErrInvalid, n.Name, err)
	}
	// The table keeps its own copy: callers keep theirs.
	n.Health.Downs = slices.Clone(n.Health.Downs)
	for _, o := range t.nodes {
		if o.Name != n.Name && o.Addr == n.Addr {
			return Change{}, undoRec{}, false, fmt.Errorf("%w: address %s already belongs to node %s", ErrConflict, n.Addr, o.Name)
		}
	}
	old := t.nodes[n.Name]
	switch {
	case old != nil && n.Mark == 0:
		n.Mark = old.Mark
	case old != nil && n.Mark != old.Mark:
		return Change{}, undoRec{}, false, fmt.Errorf("%w: node %s has mark %d for life, not %d", ErrConflict, n.Name, old.Mark, n.Mark)
	case old == nil && n.Mark == 0:
		for m := 1; m <= MaxMark; m++ {
			if t.byMark[m] == nil {
				n.Mark = uint16(m)
				break
			}
		}
		if n.Mark == 0 {
			return Change{}, undoRec{}, false, fmt.Errorf("%w: no free mark: %d nodes already", ErrConflict, MaxMark)
		}
	case old == nil:
		if int(n.Mark) > MaxMark {
			return Change{}, undoRec{}, false, fmt.Errorf("%w: mark %d above %d", ErrInvalid, n.Mark, MaxMark)
		}
		if o := t.byMark[n.Mark]; o != nil {
			return Change{}, undoRec{}, false, fmt.Errorf("%w: mark %d already belongs to node %s", ErrConflict, n.Mark, o.Name)
		}
	}
	if old != nil && old.Equal(&n) {
		return Change{}, undoRec{}, false, nil
	}
	nn := &n
	t.nodes[n.Name] = nn
	t.byMark[n.Mark] = nn
	t.refreshActive()
	res := *nn
	c2 := Change{Kind: PutNode, Node: &res}
	if old != nil {
		c2.OldNode = ptr(*old)
	}
	return c2, undoRec{oldN: old, newN: nn}, true, nil
}

func (t *Table) deleteNode(c *Change) (Change, undoRec, bool, error) {
	old := t.nodes[c.Name]
	if old == nil {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: node %q", ErrNotFound, c.Name)
	}
	if n := t.count[old.Mark]; n > 0 {
		var example string
		for id, o := range t.tunnels {
			if o.mark == old.Mark {
				example = id
				break
			}
		}
		return Change{}, undoRec{}, false, fmt.Errorf("%w: node %s still owns %d tunnel(s), for example %s: move them first", ErrConflict, old.Name, n, example)
	}
	delete(t.nodes, old.Name)
	t.byMark[old.Mark] = nil
	t.refreshActive()
	return Change{Kind: DeleteNode, Name: old.Name, OldNode: ptr(*old)}, undoRec{oldN: old}, true, nil
}

func (t *Table) deleteTunnel(c *Change) (Change, undoRec, bool, error) {
	old := t.tunnels[c.Name].e
	if old == nil {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: tunnel %q", ErrNotFound, c.Name)
	}
	t.unindex(old)
	return Change{Kind: DeleteTunnel, Name: old.id, Old: ptr(t.tunnelOf(old))}, undoRec{oldT: old}, true, nil
}

func (t *Table) putTunnel(c *Change, rev uint64, now uint32, mode applyMode) (Change, undoRec, bool, error) {
	if c.Tunnel == nil {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: put-tunnel without a tunnel", ErrInvalid)
	}
	tu := *c.Tunnel
	// A load fills an empty table from unique keys: there is no old
	// record to look up (a million lookups in a map that does not fit the
	// cache cost a tenth of the load), and Load refuses a repeated id.
	var old *entry
	if mode != modeLoad {
		old = t.tunnels[tu.ID].e
	}
	// A record that keeps its peer and subnets (a move: a node down moves
	// tens of thousands) brings no key the table has not checked: the
	// indexes hold these keys for old, and SetVIPs refuses a VIP inside
	// any of them. So only its comment is checked, and its subnets share
	// old's sorted slice.
	sameKeys := old != nil && tu.Peer == old.peer && slices.Equal(tu.Subnets, old.subnets)
	if sameKeys {
		tu.Subnets = old.subnets
		if err := ValidateComment(tu.Comment); err != nil {
			return Change{}, undoRec{}, false, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	} else {
		if mode != modeLoad || !slices.IsSortedFunc(tu.Subnets, ComparePrefix) {
			normalizeTunnel(&tu)
		}
		if err := t.checkTunnelShape(&tu); err != nil {
			return Change{}, undoRec{}, false, err
		}
	}

	// Owner: a named node, the current owner, or the scheduler's choice.
	var owner *Node
	switch {
	case tu.Node != "":
		owner = t.nodes[tu.Node]
		if owner == nil {
			return Change{}, undoRec{}, false, fmt.Errorf("%w: owner %q does not exist", ErrUnknownNode, tu.Node)
		}
		// A down node takes no tunnel it does not already hold: a rule
		// for placing, so only local changes obey it. A replica replays
		// and a load restores what its master or disk holds (a node
		// set down by import keeps its tunnels until they are moved).
		if owner.State == NodeDown && mode == modeStamp && (old == nil || old.mark != owner.Mark) {
			return Change{}, undoRec{}, false, fmt.Errorf("%w: owner %s is down: leave the node empty to let the scheduler choose, or bring %s up", ErrConflict, owner.Name, owner.Name)
		}
	case tu.Pinned:
		return Change{}, undoRec{}, false, fmt.Errorf("%w: pinned without an owner node", ErrInvalid)
	case old != nil:
		owner = t.byMark[old.mark]
	}

	// Conflicts with other tunnels (a load finds a repeated peer by the
	// peer index's length instead: Load).
	if !sameKeys {
		if mode != modeLoad {
			if o, ok := t.peer(tu.Peer); ok && o != old {
				return Change{}, undoRec{}, false, peerTaken(tu.Peer, o)
			}
		}
		for _, p := range tu.Subnets {
			if err := t.checkSubnetFree(p, old); err != nil {
				return Change{}, undoRec{}, false, err
			}
		}
	}

	if owner == nil {
		// Only new tunnels get here: an existing one keeps its owner.
		var err error
		owner, err = t.schedule(tu.Peer)
		if err != nil {
			return Change{}, undoRec{}, false, err
		}
	}
	tu.Node = owner.Name

	var prev *Tunnel // the old record, built once for the comparison and the result
	if old != nil {
		prev = ptr(t.tunnelOf(old))
		if prev.SameContent(&tu) {
			return Change{}, undoRec{}, false, nil
		}
	}
	e := &entry{
		id:      tu.ID,
		peer:    tu.Peer,
		subnets: tu.Subnets,
		mark:    owner.Mark,
		pinned:  tu.Pinned,
		learned: tu.Learned,
		seen:    unixSeconds(tu.Seen),
	}
	switch {
	case tu.Comment == "":
	case old != nil && old.comment != nil && *old.comment == tu.Comment:
		e.comment = old.comment // unchanged (a move): shared, not copied
	default:
		c := tu.Comment
		e.comment = &c
	}
	if mode == modeStamp {
		e.rev = rev
		e.updated = now
		e.created = now
		if old != nil {
			e.created = old.created
		}
	} else {
		e.rev = tu.Revision
		e.created = unixSeconds(tu.Created)
		e.updated = unixSeconds(tu.Updated)
	}
	if old != nil {
		t.reindex(old, e)
	} else {
		t.index(e)
	}
	if mode == modeLoad {
		return Change{}, undoRec{}, true, nil
	}
	res := Change{Kind: PutTunnel, Tunnel: ptr(t.tunnelOf(e))}
	res.Old = prev
	return res, undoRec{oldT: old, newT: e}, true, nil
}

func ptr[T any](v T) *T { return &v }

func peerTaken(a netip.Addr, o *entry) error {
	return fmt.Errorf("%w: peer %s already belongs to tunnel %s", ErrConflict, a, o.id)
}

// unixSeconds clamps a time into the entry's uint32 seconds.
func unixSeconds(t time.Time) uint32 {
	s := t.Unix()
	switch {
	case t.IsZero() || s < 0:
		return 0
	case s > math.MaxUint32:
		return math.MaxUint32
	}
	return uint32(s)
}

// checkTunnelShape checks what a tunnel must satisfy on its own.
func (t *Table) checkTunnelShape(tu *Tunnel) error {
	if err := ValidateID("tunnel id", tu.ID); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if err := ValidateAddr(tu.Peer); err != nil {
		return fmt.Errorf("%w: peer: %v", ErrInvalid, err)
	}
	if t.isVIP(tu.Peer) {
		return fmt.Errorf("%w: peer %s is a director VIP", ErrConflict, tu.Peer)
	}
	if len(tu.Subnets) > 64 {
		return fmt.Errorf("%w: %d protected subnets, at most 64", ErrInvalid, len(tu.Subnets))
	}
	for i, p := range tu.Subnets {
		if err := ValidatePrefix(p); err != nil {
			return fmt.Errorf("%w: subnet: %v", ErrInvalid, err)
		}
		for _, v := range t.vips {
			if p.Contains(v) {
				return fmt.Errorf("%w: subnet %s contains director VIP %s", ErrConflict, p, v)
			}
		}
		// Subnets are sorted, so a subnet overlaps its own tunnel's
		// earlier subnets only if one of those contains its address.
		for _, q := range tu.Subnets[:i] {
			if q.Overlaps(p) {
				return fmt.Errorf("%w: subnets %s and %s of the same tunnel overlap", ErrConflict, q, p)
			}
		}
	}
	if err := ValidateComment(tu.Comment); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return nil
}

// SubnetFree reports what would refuse p as a protected subnet of the
// tunnel with the given id (which need not exist): an invalid prefix, a
// director VIP inside it, or a subnet of another tunnel that equals,
// contains or lies inside it. The node agents' merge uses it to apply the
// negotiated subnets that fit and report the others.
func (t *Table) SubnetFree(p netip.Prefix, id string) error {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if err := ValidatePrefix(p); err != nil {
		return fmt.Errorf("%w: subnet: %v", ErrInvalid, err)
	}
	for _, v := range t.vips {
		if p.Contains(v) {
			return fmt.Errorf("%w: subnet %s contains director VIP %s", ErrConflict, p, v)
		}
	}
	return t.checkSubnetFree(p, t.tunnels[id].e)
}

// checkSubnetFree reports a conflict when p equals, contains or lies inside
// a subnet of a tunnel other than self.
func (t *Table) checkSubnetFree(p netip.Prefix, self *entry) error {
	for q, o := range t.subnets.Supernets(p) {
		if o != self {
			return subnetConflict(p, q, o)
		}
	}
	for q, o := range t.subnets.Subnets(p) {
		if o != self {
			return subnetConflict(p, q, o)
		}
	}
	return nil
}

func subnetConflict(p, q netip.Prefix, o *entry) error {
	switch {
	case p == q:
		return fmt.Errorf("%w: subnet %s is already protected by tunnel %s", ErrConflict, p, o.id)
	case q.Bits() < p.Bits():
		return fmt.Errorf("%w: subnet %s lies inside subnet %s of tunnel %s", ErrConflict, p, q, o.id)
	default:
		return fmt.Errorf("%w: subnet %s contains subnet %s of tunnel %s", ErrConflict, p, q, o.id)
	}
}

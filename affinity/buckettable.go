package affinity

import (
	"fmt"
	"slices"
)

// The table's unknown-peer buckets: the assignment bucket -> node mark
// that the kernel's hash map for unknown peers holds. It is part of the
// table so that it is stored with it (one record, written in the same
// bbolt transaction as the change that set it), travels the same change
// log (PutBucket changes) and is replicated with it: a backup programs the
// same map, and a takeover keeps it. Buckets (buckets.go) decides the
// assignment on the master; the table only records it.
//
// A bucket may name a mark no node has (its node was removed and the next
// step has not moved it yet): the dataplane steers such a bucket nowhere.
// The table does not tie buckets to nodes, so removing a node never has
// to touch them in the same batch.

// BucketMark gives one unknown-peer bucket to a node: the payload of a
// PutBucket change.
type BucketMark struct {
	// Count is the number of buckets in the table once the change is
	// applied. A count other than the table's first clears every bucket
	// (a resize); 0 removes the buckets altogether (Index and Mark 0).
	Count int `json:"count"`
	// Index is the bucket, 0..Count-1.
	Index int `json:"index"`
	// Mark is the node mark the bucket's unknown peers are steered to;
	// 0: none.
	Mark uint16 `json:"mark"`
}

func (b *BucketMark) validate() error {
	switch {
	case b.Count < 0 || b.Count > MaxBuckets:
		return fmt.Errorf("%w: bucket count %d out of range 0..%d", ErrInvalid, b.Count, MaxBuckets)
	case b.Count == 0 && (b.Index != 0 || b.Mark != 0):
		return fmt.Errorf("%w: bucket %d -> mark %d in a table of no buckets", ErrInvalid, b.Index, b.Mark)
	case b.Count > 0 && (b.Index < 0 || b.Index >= b.Count):
		return fmt.Errorf("%w: bucket %d out of range 0..%d", ErrInvalid, b.Index, b.Count-1)
	case b.Mark > MaxMark:
		return fmt.Errorf("%w: bucket %d: mark %d above %d", ErrInvalid, b.Index, b.Mark, MaxMark)
	}
	return nil
}

// ApplyTo returns the assignment marks after this change: a count other
// than len(marks) starts from a new, cleared assignment (nil for none),
// else marks itself is changed. It does not validate b (putBucket does):
// a store replaying its journal onto its stored record uses it too.
func (b BucketMark) ApplyTo(marks []uint16) []uint16 {
	if b.Count != len(marks) {
		marks = nil
		if b.Count > 0 {
			marks = make([]uint16, b.Count)
		}
	}
	if b.Count > 0 {
		marks[b.Index] = b.Mark
	}
	return marks
}

// Buckets returns a copy of the table's bucket assignment (bucket i ->
// node mark, 0: none), or nil when the table has none.
func (t *Table) Buckets() []uint16 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return slices.Clone(t.buckets)
}

// BucketCount returns the number of buckets the table holds (0: none).
func (t *Table) BucketCount() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.buckets)
}

// LoadBuckets sets the bucket assignment of a table being loaded from
// its store (after Load), without a change or a revision.
func (t *Table) LoadBuckets(marks []uint16) error {
	if len(marks) > MaxBuckets {
		return fmt.Errorf("load buckets: %d buckets, at most %d", len(marks), MaxBuckets)
	}
	for i, m := range marks {
		if m > MaxMark {
			return fmt.Errorf("load buckets: bucket %d: mark %d above %d", i, m, MaxMark)
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buckets = slices.Clone(marks)
	if len(t.buckets) == 0 {
		t.buckets = nil
	}
	return nil
}

// putBucket applies a PutBucket change. The resolved change carries the
// bucket as it was in OldBucket: the table's count before, and the old
// mark (0 after a resize, which cleared it).
func (t *Table) putBucket(c *Change) (Change, undoRec, bool, error) {
	b := c.Bucket
	if b == nil {
		return Change{}, undoRec{}, false, fmt.Errorf("%w: put-bucket without a bucket", ErrInvalid)
	}
	if err := b.validate(); err != nil {
		return Change{}, undoRec{}, false, err
	}
	old := BucketMark{Count: len(t.buckets), Index: b.Index}
	resize := b.Count != len(t.buckets)
	if !resize {
		if b.Count == 0 || t.buckets[b.Index] == b.Mark {
			return Change{}, undoRec{}, false, nil
		}
		old.Mark = t.buckets[b.Index]
	}
	u := undoRec{bucket: &bucketUndo{index: b.Index, mark: old.Mark}}
	if resize {
		u.bucket.resized, u.bucket.oldBuckets = true, t.buckets
	}
	t.buckets = b.ApplyTo(t.buckets)
	nb := *b
	return Change{Kind: PutBucket, Bucket: &nb, OldBucket: &old}, u, true, nil
}

// rollbackBucket undoes putBucket.
func (t *Table) rollbackBucket(u *bucketUndo) {
	if u.resized {
		t.buckets = u.oldBuckets
		return
	}
	t.buckets[u.index] = u.mark
}

// BucketChanges returns the PutBucket changes that turn the assignment cur
// into want (either may be nil: no buckets), the first carrying reason:
// one change per bucket that differs, or, when the counts differ, one per
// bucket of want that has a node (the first clears the old ones).
func BucketChanges(cur, want []uint16, reason string) []Change {
	var out []Change
	put := func(i int, m uint16) {
		c := Change{Kind: PutBucket, Bucket: &BucketMark{Count: len(want), Index: i, Mark: m}}
		if len(out) == 0 {
			c.Reason = reason
		}
		out = append(out, c)
	}
	if len(cur) == len(want) {
		for i, m := range want {
			if cur[i] != m {
				put(i, m)
			}
		}
		return out
	}
	for i, m := range want {
		if m != 0 {
			put(i, m)
		}
	}
	if len(out) == 0 {
		put(0, 0) // a resize to buckets without nodes, or to none
	}
	return out
}

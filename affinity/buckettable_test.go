package affinity

import (
	"bytes"
	"errors"
	"reflect"
	"slices"
	"testing"
)

// TestTableBuckets: bucket changes are applied as one revision, resolved
// with what they replaced, dropped when they change nothing, resized by a
// change of count, and undone with the rest of a refused batch.
func TestTableBuckets(t *testing.T) {
	tb := newTable(t, 3)
	rev := tb.Revision()
	want := []uint16{1, 2, 3, 1, 0, 2, 3, 1}
	a, err := tb.Apply(BucketChanges(tb.Buckets(), want, "first step"))
	if err != nil {
		t.Fatal(err)
	}
	if a.Revision != rev+1 || !slices.Equal(tb.Buckets(), want) || tb.BucketCount() != 8 {
		t.Fatalf("after the first step: revision %d (want %d), buckets %v", a.Revision, rev+1, tb.Buckets())
	}
	// A resize from none: one change per bucket with a node, the first
	// with the reason; each resolved with the count before (0).
	if len(a.Changes) != 7 || a.Changes[0].Reason != "first step" || a.Changes[1].Reason != "" {
		t.Fatalf("resolved changes: %+v", a.Changes)
	}
	for i, c := range a.Changes {
		if c.Kind != PutBucket || c.OldBucket == nil || c.OldBucket.Count != min(i, 1)*8 || c.OldBucket.Mark != 0 {
			t.Fatalf("change %d %+v: want a put-bucket resolved against no buckets (the first) or an empty bucket", i, c.OldBucket)
		}
	}
	if a, err := tb.Apply(BucketChanges(want, want, "nothing")); err != nil || len(a.Changes) != 0 || tb.Revision() != rev+1 {
		t.Fatalf("an unchanged assignment: %+v, %v, revision %d", a, err, tb.Revision())
	}
	next := slices.Clone(want)
	next[2], next[4] = 1, 3
	a, err = tb.Apply(BucketChanges(want, next, "balance"))
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Changes) != 2 || *a.Changes[0].OldBucket != (BucketMark{Count: 8, Index: 2, Mark: 3}) || *a.Changes[1].OldBucket != (BucketMark{Count: 8, Index: 4}) {
		t.Fatalf("resolved changes of a balancing step: %+v %+v", a.Changes[0].OldBucket, a.Changes[1].OldBucket)
	}

	// A refused batch takes its bucket changes back, a resize included.
	for _, bad := range [][]Change{
		append(BucketChanges(next, []uint16{3, 3, 3, 3, 3, 3, 3, 3}, ""), Change{Kind: DeleteNode, Name: "nope"}),
		append(BucketChanges(next, []uint16{2, 2}, ""), Change{Kind: DeleteNode, Name: "nope"}),
		append(BucketChanges(next, nil, ""), Change{Kind: DeleteNode, Name: "nope"}),
	} {
		if _, err := tb.Apply(bad); err == nil {
			t.Fatal("a batch with a bad change applied")
		}
		if !slices.Equal(tb.Buckets(), next) {
			t.Fatalf("a refused batch left buckets %v, want %v", tb.Buckets(), next)
		}
	}
	// Resize to 4, then to none.
	if _, err := tb.Apply(BucketChanges(next, []uint16{0, 2, 0, 0}, "resize")); err != nil || !slices.Equal(tb.Buckets(), []uint16{0, 2, 0, 0}) {
		t.Fatalf("resize: %v %v", tb.Buckets(), err)
	}
	if _, err := tb.Apply(BucketChanges([]uint16{0, 2, 0, 0}, []uint16{0, 0}, "resize")); err != nil || !slices.Equal(tb.Buckets(), []uint16{0, 0}) {
		t.Fatalf("resize to buckets without nodes: %v %v", tb.Buckets(), err)
	}
	if _, err := tb.Apply(BucketChanges(tb.Buckets(), nil, "off")); err != nil || tb.Buckets() != nil {
		t.Fatalf("remove the buckets: %v %v", tb.Buckets(), err)
	}
}

func TestTableBucketsRefused(t *testing.T) {
	tb := newTable(t, 1)
	for _, b := range []*BucketMark{
		nil,
		{Count: 4, Index: 4, Mark: 1},
		{Count: 4, Index: -1, Mark: 1},
		{Count: MaxBuckets + 1, Index: 0, Mark: 1},
		{Count: 4, Index: 0, Mark: MaxMark + 1},
		{Count: 0, Index: 1},
		{Count: -1},
	} {
		_, err := tb.Apply([]Change{{Kind: PutBucket, Bucket: b}})
		var be *BatchError
		if !errors.As(err, &be) || !errors.Is(be.Errors[0], ErrInvalid) {
			t.Errorf("bucket %+v: %v, want a refusal", b, err)
		}
	}
	if tb.Buckets() != nil {
		t.Fatalf("refused changes left buckets %v", tb.Buckets())
	}
}

// TestDiffToBuckets: a replica takes the master's buckets with a snapshot
// or a repair, whatever it held (other marks, another count, none).
func TestDiffToBuckets(t *testing.T) {
	master := newTable(t, 3)
	if _, err := master.Apply(BucketChanges(nil, []uint16{1, 2, 3, 3}, "step")); err != nil {
		t.Fatal(err)
	}
	for _, held := range [][]uint16{nil, {1, 1, 1, 1}, {2, 2}, {0, 0, 0, 0, 0, 0}} {
		replica := newTable(t, 3)
		if _, err := replica.Apply(BucketChanges(nil, held, "")); err != nil {
			t.Fatal(err)
		}
		snap := master.Snapshot()
		part := snap
		part.Tunnels = nil
		ops := replica.DiffTo(&part, func(string) bool { return false })
		if _, err := replica.ApplyReset(snap.Revision, ops); err != nil {
			t.Fatalf("held %v: %v", held, err)
		}
		assertSameSnapshot(t, snap, replica.Snapshot())
	}
}

func TestBucketsRecord(t *testing.T) {
	for _, marks := range [][]uint16{nil, {0}, {1, 4095, 0, 7}, make([]uint16, MaxBuckets)} {
		b := MarshalBuckets(marks)
		got, err := UnmarshalBuckets(b)
		if err != nil || !slices.Equal(got, marks) {
			t.Fatalf("round trip of %d buckets: %d, %v", len(marks), len(got), err)
		}
	}
	if n := len(MarshalBuckets(make([]uint16, DefaultBuckets))); n > 8196 {
		t.Errorf("a record of %d buckets takes %d bytes", DefaultBuckets, n)
	}
	b := MarshalBuckets([]uint16{1, 2, 3})
	for i := 0; i < len(b); i++ {
		if _, err := UnmarshalBuckets(b[:i]); !errors.Is(err, ErrCodec) {
			t.Fatalf("truncated at %d: %v", i, err)
		}
	}
	for _, bad := range [][]byte{append(bytes.Clone(b), 0), {2, 0}, {1, 1, 0x10, 0}} {
		if _, err := UnmarshalBuckets(bad); !errors.Is(err, ErrCodec) {
			t.Errorf("%x decoded: %v", bad, err)
		}
	}
}

func FuzzUnmarshalBuckets(f *testing.F) {
	f.Add(MarshalBuckets([]uint16{1, 2, 3, 0}))
	f.Add(MarshalBuckets(nil))
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0x0f})
	f.Fuzz(func(t *testing.T, b []byte) {
		marks, err := UnmarshalBuckets(b)
		if err != nil {
			return
		}
		tb, _ := New(Options{})
		if err := tb.LoadBuckets(marks); err != nil {
			t.Fatalf("decoded buckets refused by the table: %v", err)
		}
		again, err := UnmarshalBuckets(MarshalBuckets(marks))
		if err != nil || !reflect.DeepEqual(again, marks) {
			t.Fatalf("not stable: %v / %v %v", marks, again, err)
		}
	})
}

package store

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// TestBucketsPersist: the unknown-peer buckets are written with the
// commit that changes them, as one record, and come back on reopen; the
// journal holds the changes, the change log a batch of them; a reset
// (a replica taking a snapshot) writes them too; a damaged record is
// reported as damage.
func TestBucketsPersist(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	s := open(t, path)
	if _, err := s.Commit(nodes(3)); err != nil {
		t.Fatal(err)
	}
	marks := make([]uint16, affinity.DefaultBuckets)
	for i := range marks {
		marks[i] = uint16(i%3 + 1)
	}
	a, err := s.Commit(affinity.BucketChanges(nil, marks, "first step"))
	if err != nil || len(a.Changes) != len(marks) {
		t.Fatalf("commit the buckets: %v (%d changes)", err, len(a.Changes))
	}
	// A pin and a bucket change in one commit.
	next := slices.Clone(marks)
	next[7], next[4095] = 3, 2
	batch := append(tunnels(0, 1), affinity.BucketChanges(marks, next, "balance")...)
	if _, err := s.Commit(batch); err != nil {
		t.Fatal(err)
	}
	bs, err := readAll(s, 1)
	if err != nil || len(bs) != 2 || bs[1].Len() != 3 {
		t.Fatalf("change log: %d batches (%d, %d changes), %v", len(bs), bs[0].Len(), bs[1].Len(), err)
	}
	if err := s.Fold(); err != nil { // the record written
		t.Fatal(err)
	}
	var size int
	s.db.View(func(tx *bolt.Tx) error { size = len(tx.Bucket(bucketMeta).Get(keyBuckets)); return nil })
	if size > 2*len(marks)+8 {
		t.Errorf("bucket record of %d bytes", size)
	}
	s.Close()

	s = open(t, path)
	if !slices.Equal(s.Table().Buckets(), next) {
		t.Fatal("reopened store lost the buckets")
	}
	if r, err := s.Check(); err != nil || !r.OK() || r.Buckets != len(marks) {
		t.Fatalf("check: %+v %v", r, err)
	}
	// A reset to a snapshot with other buckets, then none.
	for _, want := range [][]uint16{{2, 2}, nil} {
		snap := s.Table().Snapshot()
		snap.Buckets = want
		if _, err := s.CommitReset(s.Revision(), s.Table().DiffTo(&snap, nil)); err != nil {
			t.Fatal(err)
		}
		s.Close()
		s = open(t, path)
		if !slices.Equal(s.Table().Buckets(), want) {
			t.Fatalf("after a reset to %v and a reopen: %v", want, s.Table().Buckets())
		}
	}
	if _, err := s.Commit(affinity.BucketChanges(nil, []uint16{1}, "")); err != nil {
		t.Fatal(err)
	}
	s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyBuckets, []byte{1, 1, 0x20, 0}) })
	s.Close()
	if _, err := Open(Options{Path: path}); !errors.Is(err, ErrDamaged) {
		t.Fatalf("a damaged bucket record: %v", err)
	}
}

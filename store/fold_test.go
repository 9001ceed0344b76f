package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// records reads what the file holds as written records: tunnel ids,
// nodes, the bucket record's length and keyFolded.
func records(t *testing.T, s *Store) (tunnelIDs []string, nodeN int, folded uint64) {
	t.Helper()
	s.db.View(func(tx *bolt.Tx) error {
		tx.Bucket(bucketTunnels).ForEach(func(k, _ []byte) error { tunnelIDs = append(tunnelIDs, string(k)); return nil })
		nodeN = tx.Bucket(bucketNodes).Stats().KeyN
		folded = binary.BigEndian.Uint64(tx.Bucket(bucketMeta).Get(keyFolded))
		return nil
	})
	return
}

// reopenCopy opens a consistent copy of the live file, as a crash at
// this instant would leave it, and returns its table's snapshot.
func reopenCopy(t *testing.T, s *Store) affinity.Snapshot {
	t.Helper()
	cp := filepath.Join(t.TempDir(), "crashed.db")
	if _, err := s.Backup(cp, BackupOptions{}); err != nil {
		t.Fatal(err)
	}
	c, err := Open(Options{Path: cp, ReadOnly: true})
	if err != nil {
		t.Fatalf("open the file as a crash leaves it: %v", err)
	}
	defer c.Close()
	if r, err := c.Check(); err != nil || !r.OK() {
		t.Fatalf("check of the file as a crash leaves it: %+v %v", r, err)
	}
	return c.Table().Snapshot()
}

// TestDeferredRecords: journaled commits (nodes, tunnels, a node down's
// moves, buckets, deletions) write no records; a file left at that point
// opens to the same table, by replaying the journal; a fold writes the
// records, and the file then opens to the same table from them alone.
func TestDeferredRecords(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), Table: affinity.Options{Now: clock()}, FoldIdle: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	commit := func(batch []affinity.Change) {
		t.Helper()
		if _, err := s.Commit(batch); err != nil {
			t.Fatal(err)
		}
	}
	commit(nodes(3))
	commit(tunnels(0, 300))
	if _, err := s.Do(func(tb *affinity.Table) ([]affinity.Change, error) {
		p, err := tb.PlanNodeState("vpn-1", affinity.NodeDown)
		if err != nil {
			return nil, err
		}
		if len(p.Moves) == 0 {
			t.Fatal("node down moved nothing")
		}
		return p.Batch(), nil
	}); err != nil {
		t.Fatal(err)
	}
	marks := []uint16{1, 3, 1, 3}
	commit(affinity.BucketChanges(nil, marks, "step"))
	commit(append(tunnels(300, 10), affinity.Change{Kind: affinity.DeleteTunnel, Name: "t000007"},
		affinity.Change{Kind: affinity.PutBucket, Bucket: &affinity.BucketMark{Count: 4, Index: 2, Mark: 3}}))
	want := s.Table().Snapshot()

	ids, nodeN, folded := records(t, s)
	if len(ids) != 0 || nodeN != 0 || folded != 0 {
		t.Fatalf("journaled commits wrote records: %d tunnels, %d nodes, folded to %d", len(ids), nodeN, folded)
	}
	if got := reopenCopy(t, s); !reflect.DeepEqual(got, want) {
		t.Fatal("the file with every record pending opens to another table")
	}
	if r, err := s.Check(); err != nil || !r.OK() || r.Pending < 300 || r.Folded != 0 {
		t.Fatalf("check with every record pending: %+v %v", r, err)
	}
	if err := s.Fold(); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Check(); err != nil || !r.OK() || r.Pending != 0 || r.Folded != s.Revision() {
		t.Fatalf("check after the fold: %+v %v", r, err)
	}
	ids, nodeN, folded = records(t, s)
	if len(ids) != 309 || nodeN != 3 || folded != s.Revision() || slices.Contains(ids, "t000007") {
		t.Fatalf("after the fold: %d tunnels, %d nodes, folded to %d of %d", len(ids), nodeN, folded, s.Revision())
	}
	if got := reopenCopy(t, s); !reflect.DeepEqual(got, want) || !slices.Equal(got.Buckets, []uint16{1, 3, 3, 3}) {
		t.Fatalf("the folded file opens to another table (buckets %v)", got.Buckets)
	}

	// Half folded: records up to one revision, the journal after it.
	commit(tunnels(400, 5))
	if _, err := s.Do(func(tb *affinity.Table) ([]affinity.Change, error) {
		p, err := tb.PlanNodeState("vpn-1", affinity.NodeActive)
		if err != nil {
			return nil, err
		}
		return p.Batch(), nil
	}); err != nil {
		t.Fatal(err)
	}
	if got := reopenCopy(t, s); !reflect.DeepEqual(got, s.Table().Snapshot()) {
		t.Fatal("a file folded up to an older revision opens to another table")
	}
}

// TestFoldWhenIdle: the store writes the records by itself once no
// commit came for FoldIdle.
func TestFoldWhenIdle(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), FoldIdle: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	s.Commit(tunnels(0, 50))
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if ids, _, folded := records(t, s); len(ids) == 50 && folded == s.Revision() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("records still pending 10 s after the last commit")
		}
	}
}

// TestInPlaceAfterPending: a reset and a batch too large to journal both
// start the journal over; what it held pending is written first, so
// neither loses an earlier commit.
func TestInPlaceAfterPending(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	s, err := Open(Options{Path: path, JournalChanges: 100, FoldIdle: -1})
	if err != nil {
		t.Fatal(err)
	}
	s.Commit(nodes(2))
	s.Commit(tunnels(0, 20))
	if _, err := s.Commit(tunnels(100, 150)); err != nil { // not journaled
		t.Fatal(err)
	}
	s.Commit(tunnels(20, 5))
	if _, err := s.CommitReset(s.Revision(), []affinity.Change{{Kind: affinity.DeleteTunnel, Name: "t000003"}}); err != nil {
		t.Fatal(err)
	}
	s.Commit(tunnels(30, 5))
	want := s.Table().Snapshot()
	if got := reopenCopy(t, s); !reflect.DeepEqual(got, want) || len(got.Tunnels) != 20+150+5-1+5 {
		t.Fatalf("reopened: %d tunnels, want the live table's %d", len(got.Tunnels), len(want.Tunnels))
	}
	s.Close()
	s, err = Open(Options{Path: path, JournalChanges: 100})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !reflect.DeepEqual(s.Table().Snapshot(), want) {
		t.Fatal("reopened after Close: another table")
	}
}

// TestJournalKeepsPending: the journal's bound never trims an entry whose
// records are pending; a store that is never idle folds once it holds
// more than its bound.
func TestJournalKeepsPending(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), JournalChanges: 50, FoldIdle: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	for i := range 4 {
		s.Commit(tunnels(i*10, 10))
	}
	if got := reopenCopy(t, s); len(got.Tunnels) != 40 {
		t.Fatalf("reopened: %d tunnels, want 40", len(got.Tunnels))
	}
	for i := 4; i < 20; i++ {
		s.Commit(tunnels(i*10, 10))
	}
	s.mu.Lock()
	pending := s.pending
	s.mu.Unlock()
	if pending > 50 {
		t.Fatalf("%d changes pending past a journal of 50", pending)
	}
	if got := reopenCopy(t, s); len(got.Tunnels) != 200 {
		t.Fatalf("reopened: %d tunnels, want 200", len(got.Tunnels))
	}
}

// TestFoldFailureReported: a fold that cannot read a record it replaces
// (a damaged page) fails without losing the pending change, logs it, and
// Check says so until a fold works.
func TestFoldFailureReported(t *testing.T) {
	var logged bytes.Buffer
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), Table: affinity.Options{Now: clock()}, FoldIdle: -1,
		Logger: slog.New(slog.NewTextHandler(&logged, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	s.Commit(tunnels(0, 10))
	if err := s.Fold(); err != nil {
		t.Fatal(err)
	}
	changed := tunnels(3, 1)
	changed[0].Tunnel.Comment = "changed"
	if _, err := s.Commit(changed); err != nil {
		t.Fatal(err)
	}
	var good []byte
	s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketTunnels)
		good = append([]byte(nil), b.Get([]byte("t000003"))...)
		return b.Put([]byte("t000003"), []byte{0xff})
	})
	if err := s.Fold(); err == nil || !errors.Is(err, ErrDamaged) {
		t.Fatalf("fold over a damaged record: %v", err)
	}
	r, err := s.Check()
	if err != nil || r.OK() || !strings.Contains(strings.Join(r.Problems, "\n"), "the last fold of the journal into the records failed (1 changes pending") {
		t.Fatalf("check after a failed fold: %+v %v", r, err)
	}
	if !strings.Contains(logged.String(), "level=ERROR") || !strings.Contains(logged.String(), "pending=1") {
		t.Fatalf("the failed fold was not logged: %q", logged.String())
	}
	s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketTunnels).Put([]byte("t000003"), good) })
	if err := s.Fold(); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Check(); err != nil || !r.OK() {
		t.Fatalf("check after the repaired fold: %+v %v", r, err)
	}
	if tu, _ := s.Table().Tunnel("t000003"); tu.Comment != "changed" {
		t.Fatalf("the pending change was lost: %+v", tu)
	}
}

// TestLargeBatchInPlace: a batch over deferMax (an import) writes its
// records at once, after what was pending, and leaves nothing to fold.
func TestLargeBatchInPlace(t *testing.T) {
	if got := deferMax(1_000_000); got != 125_000 || deferMax(10) != foldChunk {
		t.Fatalf("deferMax: %d at a million, %d at ten", got, deferMax(10))
	}
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), FoldIdle: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	s.Commit(tunnels(0, 10))
	if _, err := s.Commit(tunnels(10, foldChunk+1)); err != nil {
		t.Fatal(err)
	}
	if ids, nodeN, folded := records(t, s); len(ids) != foldChunk+11 || nodeN != 2 || folded != s.Revision() {
		t.Fatalf("after a large batch: %d tunnels, %d nodes written, folded to %d of %d", len(ids), nodeN, folded, s.Revision())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending != 0 {
		t.Fatalf("%d changes pending after a batch written in place", s.pending)
	}
}

// TestJournalChunks: an entry longer than journalChunk is written in
// chunks, and every reader of the journal gets it whole: a replay at open
// (records pending), a cursor that reads the journal, the fold, Check's
// entry count; trimming takes an entry's chunks with it.
func TestJournalChunks(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), Table: affinity.Options{Now: clock()},
		FoldIdle: -1, RingChanges: 10, JournalChanges: 3000})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	commit := func(batch []affinity.Change) *affinity.Applied {
		t.Helper()
		a, err := s.Commit(batch)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	// heads and chunks counts the journal's keys; an orphan chunk (one
	// whose entry's own key is gone) fails the test.
	keys := func() (heads, chunks int) {
		t.Helper()
		s.db.View(func(tx *bolt.Tx) error {
			have := map[uint64]bool{}
			return tx.Bucket(bucketJournal).ForEach(func(k, _ []byte) error {
				r := binary.BigEndian.Uint64(k)
				if !isJournalChunk(k) {
					heads++
					have[r] = true
				} else if chunks++; !have[r] {
					t.Errorf("journal chunk %x without its entry", k)
				}
				return nil
			})
		})
		return heads, chunks
	}
	commit(nodes(3))
	since := s.Revision()
	big := commit(tunnels(0, 2000))
	if _, chunks := keys(); chunks < 2 {
		t.Fatalf("a 2,000-tunnel entry is in %d chunks, want several", chunks)
	}
	for i := range 3 {
		commit(tunnels(5000+i, 1))
	}

	// Replay: every record is pending, so the copy's table comes from
	// the journal alone.
	if got := reopenCopy(t, s); !reflect.DeepEqual(got, s.Table().Snapshot()) {
		t.Fatal("the file opens to another table than the store's")
	}
	// A cursor behind the 10-change ring reads the entry from the
	// journal: the same bytes as were committed.
	c, err := s.Changes(since)
	if err != nil {
		t.Fatal(err)
	}
	b, ok, err := c.Next()
	c.Close()
	if err != nil || !ok || b.Revision != big.Revision {
		t.Fatalf("cursor at %d: %+v %v %v, want revision %d", since, b.Revision, ok, err, big.Revision)
	}
	if want := affinity.MarshalChanges(big.Changes); !bytes.Equal(b.Encoded, want) {
		t.Fatalf("the journal gives %d bytes for revision %d, %d were committed", len(b.Encoded), big.Revision, len(want))
	}
	// A cursor right after it: the key before the next entry is the
	// chunked entry's last chunk, which names its revision.
	if c, err = s.Changes(big.Revision); err != nil {
		t.Fatal(err)
	}
	b, ok, err = c.Next()
	c.Close()
	if err != nil || !ok || b.Revision != big.Revision+1 || b.Prev != big.Revision {
		t.Fatalf("cursor at %d: revision %d after %d, %v %v", big.Revision, b.Revision, b.Prev, ok, err)
	}
	if r, err := s.Check(); err != nil || !r.OK() || r.Journal != 5 {
		t.Fatalf("check: %+v %v, want 5 journal entries", r, err)
	}
	if err := s.Fold(); err != nil {
		t.Fatal(err)
	}
	if ids, _, _ := records(t, s); len(ids) != 2003 {
		t.Fatalf("the fold wrote %d tunnels, want 2,003", len(ids))
	}
	// Past the bound of 3,000 changes, folded entries are trimmed from
	// the oldest: the chunked one goes whole.
	commit(tunnels(6000, 1500))
	if heads, chunks := keys(); heads != 4 || chunks == 0 {
		t.Fatalf("after trimming: %d entries, %d chunks; want 4 entries, the newest in chunks", heads, chunks)
	}
	if got := reopenCopy(t, s); !reflect.DeepEqual(got, s.Table().Snapshot()) {
		t.Fatal("after trimming, the file opens to another table than the store's")
	}
}

// TestSchema3BecomesSchema4: a schema-3 store (every journal entry one
// key) with records pending opens read-only as it is and for writing as
// schema 4, to the same table either way.
func TestSchema3BecomesSchema4(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), Table: affinity.Options{Now: clock()}, FoldIdle: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	s.Commit(tunnels(0, 50))
	want := s.Table().Snapshot()
	cp := filepath.Join(t.TempDir(), "schema3.db")
	if _, err := s.Backup(cp, BackupOptions{}); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(cp, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keySchema, be32(3)) })
	db.Close()
	for _, ro := range []bool{true, false} {
		c, err := Open(Options{Path: cp, ReadOnly: ro})
		if err != nil {
			t.Fatalf("open read-only %v: %v", ro, err)
		}
		r, err := c.Check()
		got := c.Table().Snapshot()
		c.Close()
		if wantSchema := map[bool]uint32{true: 3, false: 4}[ro]; err != nil || !r.OK() || r.Schema != wantSchema || r.Pending == 0 && ro {
			t.Fatalf("open read-only %v: %+v %v, want schema %d", ro, r, err, wantSchema)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("open read-only %v: another table", ro)
		}
	}
}

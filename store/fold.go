package store

import (
	"encoding/binary"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Deferred records (schema 3). A journaled commit writes only its journal
// entry and the revision: the nodes, tunnels and buckets records, and the
// index digest that accounts for them, are brought up to date later by a
// fold, which replays the journal entries after keyFolded into them. Open
// loads the records (the table as of keyFolded) and replays the same
// entries into the table, so the file is whole at every commit and a
// crash loses nothing a commit returned.
//
// Why: a node failure moves a sixteenth of a million tunnels, spread over
// every leaf page of the tunnels bucket, and writing them in place
// rewrote the whole bucket (three seconds at a million, in the commit the
// node down waited for). The journal entry is one sequential value. The
// fold still rewrites the leaves, but when the store is idle, not between
// a node failure and the kernel.
//
// A commit larger than deferMax (an import, a replica's snapshot), and a
// reset, fold what is pending first and write their records in place, in
// their own transaction.

// keyFolded holds the revision up to which the records are written (8
// bytes). A store without it (schema 2) has every record written.
var keyFolded = []byte("folded")

const (
	// DefaultFoldIdle is how long the store waits, after its last
	// commit, before it folds: a burst of changes (a node failure and
	// the rebalancing after it) is folded once, after it, and not while
	// the daemon still programs the kernel with it (seconds at a
	// million tunnels, on the same cores).
	DefaultFoldIdle = 5 * time.Second
	// foldMaxAge bounds how long a commit stays unfolded under a steady
	// stream of changes that never leaves the store idle.
	foldMaxAge = 30 * time.Second
	// foldChunk is the number of changes folded in one transaction
	// (whole journal entries, at least one): commits wait for a fold's
	// transaction, not for a whole backlog.
	foldChunk = 65_536
)

// foldedRev reads keyFolded in tx: the revision itself when absent (a
// schema-2 store, every record written; init refuses a schema-3 store
// without it).
func foldedRev(tx *bolt.Tx) uint64 {
	m := tx.Bucket(bucketMeta)
	if v := m.Get(keyFolded); len(v) == 8 {
		return binary.BigEndian.Uint64(v)
	}
	return binary.BigEndian.Uint64(m.Get(keyRevision))
}

// unfolded counts the changes journaled after folded.
func unfolded(tx *bolt.Tx, folded uint64) int {
	n := 0
	c := tx.Bucket(bucketJournal).Cursor()
	for k, v := c.Seek(be64(folded + 1)); k != nil; k, v = c.Next() {
		if !isJournalChunk(k) {
			n += int(journalCount(v))
		}
	}
	return n
}

// foldTx writes the records of the journal entries after keyFolded, whole
// entries until at least limit changes (limit <= 0: all of them), and
// advances keyFolded. It returns the number of changes folded.
func (s *Store) foldTx(tx *bolt.Tx, limit int) (int, error) {
	folded := foldedRev(tx)
	tunnels := tx.Bucket(bucketTunnels)
	// The record each tunnel change replaces: the one written before
	// (in the bucket), or the one an earlier change of this fold left.
	last := map[string]*affinity.Tunnel{}
	old := func(id string) (*affinity.Tunnel, error) {
		if t, ok := last[id]; ok {
			return t, nil
		}
		v := tunnels.Get([]byte(id))
		if v == nil {
			return nil, nil
		}
		t, err := affinity.UnmarshalTunnel(v)
		if err != nil {
			return nil, damaged(s.path, "bucket tunnels: record %q: %v", shortKey([]byte(id)), err)
		}
		return &t, nil
	}
	var changes []affinity.Change
	for rev, v := range journalEntries(tx.Bucket(bucketJournal).Cursor(), folded+1) {
		cs, err := affinity.UnmarshalChanges(v)
		if err != nil {
			return 0, damaged(s.path, "bucket journal: entry %d: %v", rev, err)
		}
		for i := range cs {
			ch := &cs[i]
			switch ch.Kind {
			case affinity.PutTunnel, affinity.DeleteTunnel:
				id := ch.Key()
				if ch.Old, err = old(id); err != nil {
					return 0, err
				}
				last[id] = ch.Tunnel
			}
		}
		changes = append(changes, cs...)
		folded = rev
		if limit > 0 && len(changes) >= limit {
			break
		}
	}
	if len(changes) == 0 {
		return 0, nil
	}
	if err := writeRecords(tx, changes); err != nil {
		return 0, fmt.Errorf("fold the journal up to revision %d: %w", folded, err)
	}
	return len(changes), tx.Bucket(bucketMeta).Put(keyFolded, be64(folded))
}

// Fold writes every pending record now (see keyFolded). Close folds; so
// does the store on its own once it has been idle for a moment.
func (s *Store) Fold() error {
	for {
		more, err := s.foldSome()
		if err != nil || !more {
			return err
		}
	}
}

// foldSome folds one chunk and reports whether more is pending.
func (s *Store) foldSome() (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.foldLocked()
}

func (s *Store) foldLocked() (bool, error) {
	if s.readOnly || s.pending == 0 {
		return false, nil
	}
	var n int
	start := time.Now()
	// Guarded as Open is: the fold reads records no one read since.
	err := guard(s.path, "folding the journal into the records", func() error {
		return s.db.Update(func(tx *bolt.Tx) (err error) { n, err = s.foldTx(tx, foldChunk); return err })
	})
	if err != nil {
		s.foldErr = fmt.Errorf("fold store %s: %w", s.path, err)
		s.logger.Error("writing the journaled changes into the records failed; they stay in the journal, and the journal is kept past its bound until a fold works", "pending", s.pending, "err", err)
		return false, s.foldErr
	}
	s.foldErr = nil
	s.logger.Debug("journal folded into the records", "changes", n, "took", time.Since(start))
	s.pending = max(s.pending-n, 0)
	if n == 0 {
		s.pending = 0
	}
	return s.pending > 0, nil
}

// folder folds pending records once the store has had no commit for idle,
// or foldMaxAge after the oldest pending commit, until quit.
func (s *Store) folder(idle time.Duration, kick <-chan struct{}, quit <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var oldest time.Time
	for {
		select {
		case <-quit:
			timer.Stop()
			return
		case <-kick:
			if oldest.IsZero() {
				oldest = time.Now()
			}
			timer.Reset(min(idle, max(time.Until(oldest.Add(foldMaxAge)), 0)))
		case <-timer.C:
			oldest = time.Time{}
			more, err := s.foldSome()
			if err != nil {
				// The records stay pending, and Open replays
				// the journal, so nothing is lost; Check and
				// Close report the failure (foldErr), and the
				// next commit's kick tries again.
				continue
			}
			if more {
				oldest = time.Now()
				timer.Reset(0)
			}
		}
	}
}

// kickFolder tells the folder a commit left records pending.
func (s *Store) kickFolder() {
	select {
	case s.foldKick <- struct{}{}:
	default:
	}
}

// replayJournal applies the journal entries after folded to t, which was
// loaded from the records as of folded, and returns how many changes it
// replayed.
func (s *Store) replayJournal(tx *bolt.Tx, t *affinity.Table, folded, rev uint64) (int, error) {
	n := 0
	for r, v := range journalEntries(tx.Bucket(bucketJournal).Cursor(), folded+1) {
		cs, err := affinity.UnmarshalChanges(v)
		if err != nil {
			return 0, damaged(s.path, "bucket journal: entry %d: %v", r, err)
		}
		if _, err := t.ApplyAt(r, cs); err != nil {
			return 0, damaged(s.path, "bucket journal: entry %d does not apply to the records folded up to revision %d: %v", r, folded, err)
		}
		n += len(cs)
	}
	if got := t.Revision(); got != rev {
		return 0, damaged(s.path, "bucket journal: the records are folded up to revision %d and the journal reaches %d, but the store is at revision %d", folded, got, rev)
	}
	return n, nil
}

// migrate3 makes a schema-2 store (every record written) schema 3.
func (s *Store) migrate3() error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if err := m.Put(keyFolded, m.Get(keyRevision)); err != nil {
			return err
		}
		return m.Put(keySchema, be32(3))
	})
	if err != nil {
		return fmt.Errorf("migrate store %s to schema 3: %w", s.path, err)
	}
	s.schema = 3
	return nil
}

// migrate4 makes a schema-3 store schema 4: its journal entries are each
// one key, which schema 4 reads as they are.
func (s *Store) migrate4() error {
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keySchema, be32(4)) }); err != nil {
		return fmt.Errorf("migrate store %s to schema 4: %w", s.path, err)
	}
	s.schema = 4
	return nil
}

// recordsDigest sums the index digest of the tunnel records as written
// (what keyIndexDigest must equal while records are pending), decoding
// them as Open does.
func (s *Store) recordsDigest(tx *bolt.Tx) (indexDigest, error) {
	dec := s.decodeTunnels(tx)
	for range dec.seq {
	}
	dec.stop()
	return dec.digest, dec.err
}

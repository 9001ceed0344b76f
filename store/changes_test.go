package store

import (
	"errors"
	"path/filepath"
	"testing"
)

// readAll reads a cursor from since to the newest batch.
func readAll(s *Store, since uint64) ([]Batch, error) {
	c, err := s.Changes(since)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return ReadAll(c)
}

// TestCursorRingThenJournal: a cursor that falls behind the ring goes on
// from the journal, then back to the ring; one behind the journal is told
// to take a snapshot.
func TestCursorRingThenJournal(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), JournalChanges: 200, RingChanges: 30})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	slow, err := s.Changes(s.Revision())
	if err != nil {
		t.Fatal(err)
	}
	fast, _ := s.Changes(s.Revision())
	notified := fast.Notify()
	var fastRevs []uint64
	for i := range 15 {
		if _, err := s.Commit(tunnels(i*10, 10)); err != nil {
			t.Fatal(err)
		}
		select {
		case <-notified:
		default:
			t.Fatalf("no notification after commit %d", i)
		}
		b, ok, err := fast.Next()
		if err != nil || !ok || !b.Resolved || len(b.Changes) != 10 || b.Revision != b.Prev+1 {
			t.Fatalf("fast cursor: %+v %v %v", b, ok, err)
		}
		fastRevs = append(fastRevs, b.Revision)
	}
	// The ring holds the newest 3 batches; slow reads 12 from the
	// journal first, then the ring, without a gap.
	var got []uint64
	resolved := 0
	bs, err := ReadAll(slow)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bs {
		cs, err := b.Decoded()
		if err != nil || len(cs) != 10 || b.Len() != 10 {
			t.Fatalf("batch %d: %d changes (Len %d), %v", b.Revision, len(cs), b.Len(), err)
		}
		if b.Resolved {
			resolved++
		}
		got = append(got, b.Revision)
	}
	if len(got) != len(fastRevs) || got[0] != fastRevs[0] || got[len(got)-1] != fastRevs[len(fastRevs)-1] {
		t.Fatalf("slow cursor read %v, fast %v", got, fastRevs)
	}
	if resolved == 0 || resolved == len(got) {
		t.Errorf("%d of %d batches from the ring: want some from each", resolved, len(got))
	}
	// Far behind the journal (200 changes): a snapshot is needed.
	for i := range 30 {
		s.Commit(tunnels(1000+i*10, 10))
		if _, ok, err := fast.Next(); err != nil || !ok {
			t.Fatalf("a cursor that keeps up with the ring: %v", err)
		}
	}
	if _, _, err := slow.Next(); !errors.Is(err, ErrCompacted) {
		t.Fatalf("a cursor 300 changes behind a 200-change journal: %v, want ErrCompacted", err)
	}
	if _, err := s.Changes(3); !errors.Is(err, ErrCompacted) {
		t.Fatalf("revision 3 after 300 more changes: %v, want ErrCompacted", err)
	}
	if _, err := s.Changes(s.Revision() + 1); !errors.Is(err, ErrCompacted) {
		t.Fatalf("a revision ahead of the store: %v, want ErrCompacted", err)
	}
}

// TestOversizedBatchKeptEncoded: a batch larger than the whole ring keeps
// its resolved changes while a cursor has still to read it, then only
// its encoding: a cursor made later decodes it, unresolved.
func TestOversizedBatchKeptEncoded(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), RingChanges: 30})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	prev := s.Revision()
	c, _ := s.Changes(prev)
	defer c.Close()
	s.Commit(tunnels(0, 100))
	b, ok, err := c.Next()
	if err != nil || !ok || len(b.Changes) != 100 || !b.Resolved {
		t.Fatalf("oversized batch for a cursor that was there: ok %v, %d changes, resolved %v, %v", ok, len(b.Changes), b.Resolved, err)
	}
	s.log.mu.Lock()
	kept := s.log.ring[len(s.log.ring)-1].Changes
	s.log.mu.Unlock()
	if kept != nil {
		t.Errorf("a 100-change batch in a 30-change ring kept its %d resolved changes after every cursor read it", len(kept))
	}
	late, err := s.Changes(prev)
	if err != nil {
		t.Fatal(err)
	}
	defer late.Close()
	b, ok, err = late.Next()
	cs, derr := b.Decoded()
	if err != nil || derr != nil || !ok || len(cs) != 100 || b.Len() != 100 || b.Resolved {
		t.Fatalf("oversized batch for a later cursor: ok %v, %d changes, resolved %v, %v %v", ok, len(cs), b.Resolved, err, derr)
	}
}

// TestUnjournaledBatch: a batch larger than the journal reaches the
// cursors that were there at its commit, resolved; a reader that comes
// later is told to take a snapshot.
func TestUnjournaledBatch(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), RingChanges: 30, JournalChanges: 40})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	prev := s.Revision()
	c1, _ := s.Changes(prev)
	defer c1.Close()
	c2, _ := s.Changes(prev)
	s.Commit(tunnels(0, 100))
	s.Commit(tunnels(100, 3))
	for i, c := range []Cursor{c1, c2} {
		bs, err := ReadAll(c)
		if err != nil || len(bs) != 2 || len(bs[0].Changes) != 100 || !bs[0].Resolved || bs[1].Len() != 3 {
			t.Fatalf("cursor %d: %d batches, %v", i, len(bs), err)
		}
	}
	c2.Close()
	if _, err := s.Changes(prev); !errors.Is(err, ErrCompacted) {
		t.Fatalf("a reader behind an unjournaled batch: %v, want ErrCompacted", err)
	}
	s.log.mu.Lock()
	n := len(s.log.ring)
	s.log.mu.Unlock()
	if n != 1 {
		t.Errorf("ring holds %d batches after every cursor read the unjournaled one, want 1", n)
	}
}

// TestChangesAtTheRevisionBeingCommitted: a cursor opened at the table's
// revision while commits go on never fails. The table takes a commit's
// revision before the change log publishes the batch, so a reader could
// ask for a revision the log did not know yet and be told, wrongly, that
// the journal no longer reaches it (a daemon's health checks, starting
// as the first table change arrived, logged that error).
func TestChangesAtTheRevisionBeingCommitted(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	const commits = 300
	done := make(chan error, 1)
	go func() {
		for i := range commits {
			if _, err := s.Commit(tunnels(i, 1)); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for opened := 0; ; opened++ {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d cursors opened during %d commits", opened, commits)
			return
		default:
		}
		rev := s.Revision()
		c, err := s.Changes(rev)
		if err != nil {
			t.Fatalf("cursor at revision %d during commits: %v", rev, err)
		}
		c.Close()
	}
}

package store

import (
	"net/netip"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Backend is what the daemon and the operator's service need of a store:
// the loaded table, planned all-or-nothing commits, the change log, and
// the store's own maintenance. *Store (bbolt, the embedded default and the
// pair's store) implements it, and so does etcdstore.Store (the table
// shared by N active directors). The pair's replication writes with
// CommitAt and CommitReset, which only *Store has: a pair runs on bbolt.
type Backend interface {
	ChangeLog
	// Table is the loaded table. Read it freely; change it only through
	// Do, so that the store and the table stay equal.
	Table() *affinity.Table
	// Do plans against the table and commits the batch as one
	// transaction, all of it or nothing. A backend shared with other
	// writers may call plan more than once: again after another
	// writer's commit, on the newer table.
	Do(plan func(*affinity.Table) ([]affinity.Change, error)) (*affinity.Applied, error)
	// Try reports whether the planned batch would commit, changing
	// nothing.
	Try(plan func(*affinity.Table) ([]affinity.Change, error)) error
	// SetVIPs sets the table's VIPs (refused when a stored tunnel
	// conflicts with one) and stores them for the offline CLI.
	SetVIPs(vips []netip.Addr) error
	// Check verifies what the backend stores against the table.
	Check() (*CheckReport, error)
	// Backup writes a consistent copy of the table to a bbolt file.
	Backup(path string, opts BackupOptions) (int64, error)
	// Close releases the store.
	Close() error
}

var _ Backend = (*Store)(nil)

// Log is a change log held only in memory: a bounded ring of the newest
// batches, for a backend whose history lives elsewhere (etcd). A cursor
// it no longer reaches gets ErrCompacted, as a bbolt store's reader does
// when its journal no longer reaches it.
type Log struct{ l changeLog }

// NewLog returns a log at revision rev holding at most max changes (0:
// DefaultRingChanges).
func NewLog(rev uint64, max int) *Log {
	if max <= 0 {
		max = DefaultRingChanges
	}
	var l Log
	l.l.init(rev, max)
	return &l
}

// Add appends a committed batch and wakes the cursors. A batch with
// Revision <= Prev resets the log (see Batch.Reset).
func (l *Log) Add(b Batch) { l.l.add(b) }

// Revision is the newest revision added.
func (l *Log) Revision() uint64 { return l.l.newest() }

// Changes returns a cursor whose first batch is the one added right after
// revision since (see ChangeLog).
func (l *Log) Changes(since uint64) (Cursor, error) { return l.l.cursor(since, nil) }

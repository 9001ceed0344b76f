package etcdstore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/store"
)

// local is where this director keeps the table: in memory, or in a bbolt
// cache whose table is the one in memory (no second copy), written in the
// same step as every applied entry.
type local struct {
	mem   *affinity.Table
	cache *store.Store
}

func openLocal(o Options) (local, error) {
	if o.Cache == "" {
		t, err := affinity.New(o.Table)
		return local{mem: t}, err
	}
	st, err := store.Open(store.Options{Path: o.Cache, Table: o.Table})
	if err != nil {
		return local{}, fmt.Errorf("etcd store's local cache: %w", err)
	}
	return local{cache: st}, nil
}

func (l *local) table() *affinity.Table {
	if l.cache != nil {
		return l.cache.Table()
	}
	return l.mem
}

// apply applies resolved changes at rev (an etcd log entry).
func (l *local) apply(rev uint64, cs []affinity.Change) (*affinity.Applied, error) {
	if l.cache != nil {
		return l.cache.CommitAt(rev, cs)
	}
	return l.mem.ApplyAt(rev, cs)
}

// persist writes a batch already applied to the table (the cache only).
func (l *local) persist(a *affinity.Applied) error {
	if l.cache != nil {
		return l.cache.CommitApplied(a)
	}
	return nil
}

// reset applies resolved changes and sets the revision (a reload).
func (l *local) reset(rev uint64, cs []affinity.Change) (*affinity.Applied, error) {
	if l.cache != nil {
		return l.cache.CommitReset(rev, cs)
	}
	return l.mem.ApplyReset(rev, cs)
}

func (l *local) close() error {
	if l.cache != nil {
		return l.cache.Close()
	}
	return nil
}

// backupTable writes a table to a new bbolt store file at path: through a
// temporary file in the same directory, renamed into place.
func backupTable(t *affinity.Table, path string, opts store.BackupOptions) (int64, error) {
	fail := func(format string, args ...any) (int64, error) {
		return 0, fmt.Errorf("backup to %s: %w: %s", path, store.ErrBackupTarget, fmt.Sprintf(format, args...))
	}
	switch fi, err := os.Stat(path); {
	case err == nil && fi.IsDir():
		return fail("it is a directory; name the backup file")
	case err == nil && !opts.Force:
		return fail("the file exists; overwrite it with --force")
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return 0, fmt.Errorf("backup to %s: %w", path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".td-backup-*")
	if err != nil {
		return 0, fmt.Errorf("backup to %s: %w", path, err)
	}
	tmp.Close()
	os.Remove(tmp.Name())
	defer os.Remove(tmp.Name())
	snap := t.Snapshot()
	st, err := store.Open(store.Options{Path: tmp.Name(), Table: affinity.Options{VIPs: t.VIPs(), Epsilon: t.Epsilon()}})
	if err != nil {
		return 0, fmt.Errorf("backup to %s: %w", path, err)
	}
	empty, _ := affinity.New(affinity.Options{VIPs: t.VIPs(), Epsilon: t.Epsilon()})
	if _, err := st.CommitReset(snap.Revision, empty.DiffTo(&snap, nil)); err != nil {
		st.Close()
		return 0, fmt.Errorf("backup to %s: %w", path, err)
	}
	if err := st.Close(); err != nil {
		return 0, fmt.Errorf("backup to %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return 0, fmt.Errorf("backup to %s: %w", path, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

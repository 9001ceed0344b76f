package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	bolt "go.etcd.io/bbolt"
)

// BackupOptions says how Backup may treat an existing file.
type BackupOptions struct {
	// Force overwrites an existing file (never the live store).
	Force bool
}

// ErrBackupTarget refuses a backup target: the live store itself, an
// existing file without Force, a directory.
var ErrBackupTarget = errors.New("refused backup target")

// Backup writes a consistent copy of the store to path while it stays in
// use (a bbolt read transaction). The copy goes to a temporary file in the
// target's directory, is synced, and is renamed into place, and the
// directory is synced: a crash leaves the old file or the whole new one.
// The live store itself is never a target (a rename over it would leave
// the daemon committing to a deleted inode and lose every later change at
// the next restart), whatever path names it; an existing file is replaced
// only with Force.
func (s *Store) Backup(path string, opts BackupOptions) (int64, error) {
	fail := func(format string, args ...any) (int64, error) {
		return 0, fmt.Errorf("backup store %s to %s: %w: %s", s.path, path, ErrBackupTarget, fmt.Sprintf(format, args...))
	}
	live, err := os.Stat(s.path)
	if err != nil {
		return 0, fmt.Errorf("backup store %s: %w", s.path, err)
	}
	switch fi, err := os.Stat(path); {
	case err == nil && os.SameFile(fi, live):
		return fail("it is the live store itself")
	case err == nil && fi.IsDir():
		return fail("it is a directory; name the backup file")
	case err == nil && !opts.Force:
		return fail("the file exists; overwrite it with --force")
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return 0, fmt.Errorf("backup store %s to %s: %w", s.path, path, err)
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return 0, fmt.Errorf("backup store %s to %s: %w", s.path, path, err)
	}
	var n int64
	err = s.db.View(func(tx *bolt.Tx) error {
		var err error
		n, err = tx.WriteTo(tmp)
		if err == nil {
			err = tmp.Sync()
		}
		return err
	})
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o600)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return 0, fmt.Errorf("backup store %s to %s: %w", s.path, path, err)
	}
	return n, nil
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

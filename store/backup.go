package store

import (
	"errors"
	"fmt"
	"io"
	"os"

	bolt "go.etcd.io/bbolt"

	"github.com/tunneldirector/tunneldirector/internal/atomicfile"
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
// use (a bbolt read transaction), through atomicfile: a crash leaves the
// old file or the whole new one.
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
	var n int64
	err = atomicfile.Write(path, 0o600, func(w io.Writer) error {
		return s.db.View(func(tx *bolt.Tx) error {
			var err error
			n, err = tx.WriteTo(w)
			return err
		})
	})
	if err != nil {
		return 0, fmt.Errorf("backup store %s to %s: %w", s.path, path, err)
	}
	return n, nil
}

// Package atomicfile writes a file so that a crash leaves either the old
// file or the whole new one: a temporary file in the same directory,
// synced, renamed over the target, and the directory synced.
package atomicfile

import (
	"io"
	"os"
	"path/filepath"
)

// Write writes path through fn with the given permissions.
func Write(path string, perm os.FileMode, fn func(io.Writer) error) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	err = fn(tmp)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), perm)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

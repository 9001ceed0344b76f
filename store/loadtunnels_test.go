package store

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestLoadRefusesDamagedRecords: a record that does not decode, or holds
// another tunnel's id, several batches into the tunnels bucket (decoded
// in a goroutine while the table indexes the batches before it) refuses
// the open with the record named, and a later open of the repaired file
// succeeds (the refused open left no lock or goroutine holding the file).
func TestLoadRefusesDamagedRecords(t *testing.T) {
	for _, c := range []struct {
		name string
		put  func(b *bolt.Bucket) error
		want string
	}{
		{"garbage", func(b *bolt.Bucket) error { return b.Put([]byte("t002500"), []byte{0xff, 0x01}) }, `bucket tunnels: record "t002500"`},
		{"other id", func(b *bolt.Bucket) error { return b.Put([]byte("t002500"), b.Get([]byte("t000003"))) }, `record "t002500" holds id "t000003"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "td.db")
			s := open(t, path)
			s.Commit(nodes(2))
			if _, err := s.Commit(tunnels(0, 3*decodeBatch)); err != nil {
				t.Fatal(err)
			}
			if err := s.Fold(); err != nil { // the records to damage
				t.Fatal(err)
			}
			var good []byte
			s.db.Update(func(tx *bolt.Tx) error {
				b := tx.Bucket(bucketTunnels)
				good = append([]byte(nil), b.Get([]byte("t002500"))...)
				return c.put(b)
			})
			s.Close()
			for _, ro := range []bool{true, false} {
				_, err := Open(Options{Path: path, ReadOnly: ro})
				if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("open (read-only %v) of a store with a damaged record: %v, want %q", ro, err, c.want)
				}
			}
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketTunnels).Put([]byte("t002500"), good) })
			db.Close()
			s, err = Open(Options{Path: path})
			if err != nil {
				t.Fatalf("open of the repaired store: %v", err)
			}
			if n := s.Table().Len(); n != 3*decodeBatch {
				t.Fatalf("repaired store loaded %d tunnels, want %d", n, 3*decodeBatch)
			}
			s.Close()
		})
	}
}

package store

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
)

var (
	millionOnce sync.Once
	millionPath string
)

// millionStore writes a store of 1,000,000 tunnels (one peer and one /27
// each, over 16 nodes) once per benchmark run.
func millionStore(b *testing.B) string {
	millionOnce.Do(func() {
		dir, err := filepathTempDir()
		if err != nil {
			b.Fatal(err)
		}
		millionPath = filepath.Join(dir, "million.db")
		s, err := Open(Options{Path: millionPath, JournalChanges: 1})
		if err != nil {
			b.Fatal(err)
		}
		s.Commit(nodes(16))
		for i := 0; i < 10; i++ {
			if _, err := s.Commit(tunnels(i*100_000, 100_000)); err != nil {
				b.Fatal(err)
			}
		}
		s.Close()
	})
	return millionPath
}

// BenchmarkOpen1M opens and loads a store of a million tunnels, indexes
// checked.
func BenchmarkOpen1M(b *testing.B) {
	path := millionStore(b)
	for b.Loop() {
		s, err := Open(Options{Path: path, ReadOnly: true})
		if err != nil {
			b.Fatal(err)
		}
		if s.Table().Len() != 1_000_000 {
			b.Fatalf("loaded %d tunnels", s.Table().Len())
		}
		s.Close()
	}
}

// BenchmarkCommit100k commits 100,000 new tunnels into an empty store:
// validation, scheduling, and one bbolt transaction with its fsync.
func BenchmarkCommit100k(b *testing.B) {
	for b.Loop() {
		b.StopTimer()
		s, err := Open(Options{Path: filepath.Join(b.TempDir(), "td.db")})
		if err != nil {
			b.Fatal(err)
		}
		s.Commit(nodes(16))
		batch := tunnels(0, 100_000)
		b.StartTimer()
		if _, err := s.Commit(batch); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		s.Close()
		b.StartTimer()
	}
}

func filepathTempDir() (string, error) { return os.MkdirTemp("", "td-bench-") }

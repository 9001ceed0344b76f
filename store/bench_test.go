package store

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/internal/cputime"
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

// BenchmarkNodeDownCommit40k takes one of 4 nodes down with 40,000
// tunnels in the store (10,000 on the node, as the health failover
// benchmark does) and commits the plan in one transaction, as the health
// checks' Apply and `node down` do; the node comes back between runs,
// untimed. Reports wall and CPU time of the commit (plan included).
func BenchmarkNodeDownCommit40k(b *testing.B) {
	s, err := Open(Options{Path: filepath.Join(b.TempDir(), "td.db")})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Commit(nodes(4)); err != nil {
		b.Fatal(err)
	}
	if _, err := s.Commit(tunnels(0, 40_000)); err != nil {
		b.Fatal(err)
	}
	var cpu time.Duration
	moved := 0
	b.ResetTimer()
	for i := range b.N {
		name := fmt.Sprintf("vpn-%d", i%4)
		c0 := cputime.Process()
		a, err := s.Do(func(t *affinity.Table) ([]affinity.Change, error) {
			p, err := t.PlanNodeState(name, affinity.NodeDown)
			if err != nil {
				return nil, err
			}
			moved = len(p.Moves)
			return p.Batch(), nil
		})
		cpu += cputime.Process() - c0
		if err != nil || len(a.Changes) < 2 {
			b.Fatal(err, a)
		}
		b.StopTimer()
		if _, err := s.Do(func(t *affinity.Table) ([]affinity.Change, error) {
			p, err := t.PlanNodeState(name, affinity.NodeActive)
			if err != nil {
				return nil, err
			}
			return p.Batch(), nil
		}); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(moved), "tunnels-moved")
	b.ReportMetric(float64(cpu.Microseconds())/1000/float64(b.N), "cpu-ms/op")
}

// BenchmarkOpenFile opens the store named by TD_BENCH_STORE read-only
// (a daemon's restart at scale: `tunneldirector gen --tunnels 1000000`
// imported into a file) and reports the CPU time of the open beside its
// wall time. marks-s is the walk of every peer's and subnet's mark that
// the daemon's first kernel sync makes (Desired.Marks), untimed.
func BenchmarkOpenFile(b *testing.B) {
	path := os.Getenv("TD_BENCH_STORE")
	if path == "" {
		b.Skip("TD_BENCH_STORE names no store file")
	}
	var cpu, marks time.Duration
	n, elems := 0, 0
	for b.Loop() {
		c0 := cputime.Process()
		s, err := Open(Options{Path: path, ReadOnly: true})
		cpu += cputime.Process() - c0
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		n, elems = s.Table().Len(), 0
		t0 := time.Now()
		s.Table().Marks(func(netip.Addr, uint16) { elems++ }, func(netip.Prefix, uint16) { elems++ })
		marks += time.Since(t0)
		s.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(n), "tunnels")
	b.ReportMetric(float64(elems), "elements")
	b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
	b.ReportMetric(marks.Seconds()/float64(b.N), "marks-s")
}

// BenchmarkImport1kInto compares, in a store of TD_BENCH_TUNNELS tunnels
// (default 100,000), importing a CSV file of 1,000 new tunnels (read,
// validate, plan, commit: the path of `tunneldirector import`) with
// committing the same 1,000 tunnels as a batch. Each run adds 1,000 more
// tunnels. Reports wall and CPU time per run of each; the two should be
// of the same order, whatever the size of the table.
func BenchmarkImport1kInto(b *testing.B) {
	size := 100_000
	if v := os.Getenv("TD_BENCH_TUNNELS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("TD_BENCH_TUNNELS=%q: want a positive number", v)
		}
		size = n
	}
	s, err := Open(Options{Path: filepath.Join(b.TempDir(), "td.db")})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Commit(nodes(16)); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < size; i += 100_000 {
		if _, err := s.Commit(tunnels(i, min(100_000, size-i))); err != nil {
			b.Fatal(err)
		}
	}
	next := size
	batch := func() []affinity.Change {
		next += 1000
		return tunnels(next-1000, 1000)
	}
	run := func(b *testing.B, commit func([]affinity.Change) *affinity.Applied) {
		var cpu time.Duration
		for b.Loop() {
			b.StopTimer()
			batch := batch()
			b.StartTimer()
			c0 := cputime.Process()
			a := commit(batch)
			cpu += cputime.Process() - c0
			if len(a.Changes) != 1000 {
				b.Fatalf("%d changes committed, want 1000", len(a.Changes))
			}
		}
		b.ReportMetric(float64(cpu.Microseconds())/1000/float64(b.N), "cpu-ms/op")
	}
	b.Run("commit", func(b *testing.B) {
		run(b, func(batch []affinity.Change) *affinity.Applied {
			a, err := s.Commit(batch)
			if err != nil {
				b.Fatal(err)
			}
			return a
		})
	})
	b.Run("import", func(b *testing.B) {
		run(b, func(batch []affinity.Change) *affinity.Applied {
			b.StopTimer()
			list := make([]affinity.Tunnel, len(batch))
			for i := range batch {
				list[i] = *batch[i].Tunnel
			}
			var csv bytes.Buffer
			if err := nms.WriteTunnels(&csv, nms.FormatCSV, list); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			f, err := nms.Read(&csv, nms.Options{Name: "new.csv"})
			if err != nil {
				b.Fatal(err)
			}
			a, err := s.Do(func(t *affinity.Table) ([]affinity.Change, error) {
				return nms.Plan(t, f.Tunnels, false).Batch, nil
			})
			if err != nil {
				b.Fatal(err)
			}
			return a
		})
	})
}

// BenchmarkSmallCommitsAfterImport200k times the three one-tunnel commits
// that follow an import of 200,000 tunnels (journaled whole, as every
// batch up to the journal's bound is): each used to write the import's
// 30 MB journal entry again (journalChunk).
//
//	go test -run '^$' -bench SmallCommitsAfterImport -benchtime 5x ./store/
func BenchmarkSmallCommitsAfterImport200k(b *testing.B) {
	for i := range b.N {
		b.StopTimer()
		s, err := Open(Options{Path: filepath.Join(b.TempDir(), "td.db"), FoldIdle: -1})
		if err != nil {
			b.Fatal(err)
		}
		s.Commit(nodes(16))
		if _, err := s.Commit(tunnels(0, 200_000)); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		for j := range 3 {
			if _, err := s.Commit(tunnels(1_000_000+i*3+j, 1)); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		s.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(3*b.N), "ms/commit")
}

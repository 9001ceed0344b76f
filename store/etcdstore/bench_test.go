package etcdstore

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/tabletest"
	"github.com/tunneldirector/tunneldirector/store"
)

// BenchmarkImport100k commits an import of 100,000 unpinned tunnels (one
// /27 each, placed by the scheduler on 16 nodes) into a single in-process
// etcd member with etcd's default limits (so through the staged path),
// and into a bbolt store for comparison in the same run. For etcd it
// reports the space per tunnel: the logical bytes under the prefix (keys
// and values) as the log entry holds them, after a snapshot, and the
// growth of etcd's database in use.
//
//	go test -run '^$' -bench Import100k -benchtime 3x ./store/etcdstore/
func BenchmarkImport100k(b *testing.B) {
	b.Run("bbolt", func(b *testing.B) {
		batch := tabletest.Tunnels(0, 100_000)
		var took time.Duration
		for range b.N {
			s, err := store.Open(store.Options{Path: filepath.Join(b.TempDir(), "td.db")})
			if err != nil {
				b.Fatal(err)
			}
			s.Commit(tabletest.Nodes(16))
			start := time.Now()
			if _, err := s.Commit(batch); err != nil {
				b.Fatal(err)
			}
			took += time.Since(start)
			s.Close()
		}
		b.ReportMetric(took.Seconds()/float64(b.N), "s/import")
	})
	b.Run("etcd", benchImportEtcd)
}

func benchImportEtcd(b *testing.B) {
	const n = 100_000
	ep := endpoint(b)
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	ctx := context.Background()
	logical := func(p string) int {
		r, err := cli.Get(ctx, p, clientv3.WithPrefix())
		if err != nil {
			b.Fatal(err)
		}
		sum := 0
		for _, kv := range r.Kvs {
			sum += len(kv.Key) + len(kv.Value)
		}
		return sum
	}
	inUse := func() int64 {
		st, err := cli.Status(ctx, ep)
		if err != nil {
			b.Fatal(err)
		}
		return st.DbSizeInUse
	}
	batch := tabletest.Tunnels(0, n)
	var took time.Duration
	var logB, snapB, dbB float64
	for range b.N {
		p := newPrefix()
		s := openTest(b, p, affinity.Options{}, func(o *Options) { o.InlineBytes, o.ChunkBytes = 0, 0 })
		if _, err := s.Do(func(*affinity.Table) ([]affinity.Change, error) { return tabletest.Nodes(16), nil }); err != nil {
			b.Fatal(err)
		}
		before := inUse()
		start := time.Now()
		if _, err := s.Do(func(*affinity.Table) ([]affinity.Change, error) { return batch, nil }); err != nil {
			b.Fatal(err)
		}
		took += time.Since(start)
		logB += float64(logical(p)) / n
		if err := s.SnapshotNow(); err != nil {
			b.Fatal(err)
		}
		snapB += float64(logical(p)) / n
		dbB += float64(inUse()-before) / n
		s.Close()
		if _, err := cli.Delete(ctx, p, clientv3.WithPrefix()); err != nil {
			b.Fatal(err)
		}
	}
	f := float64(b.N)
	b.ReportMetric(took.Seconds()/f, "s/import")
	b.ReportMetric(logB/f, "logB/tunnel")
	b.ReportMetric(snapB/f, "withsnapB/tunnel")
	b.ReportMetric(dbB/f, "dbB/tunnel")
}

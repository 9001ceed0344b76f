// Package storetest is the one test suite every store.Backend passes: the
// bbolt store and the etcd store run the same tests (store/suite_test.go,
// store/etcdstore/suite_test.go).
package storetest

import (
	"errors"
	"net/netip"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/tabletest"
	"github.com/tunneldirector/tunneldirector/store"
)

// Backend describes a backend to the suite.
type Backend struct {
	// New makes a fresh, empty store for one test and returns a function
	// that opens it (again): every call opens the same store.
	New func(t *testing.T) func(t *testing.T, opts affinity.Options) store.Backend
	// Shared says two opens may be held at once (directors sharing one
	// table); the suite then checks that they see each other's commits
	// and that racing writers both commit.
	Shared bool
	// Settle waits until b holds revision rev (a shared backend's
	// follower applies another handle's commit a moment later).
	Settle func(t *testing.T, b store.Backend, rev uint64)
}

// Clock is a deterministic clock for the table's timestamps.
func Clock() func() time.Time {
	t0 := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	n := 0
	return func() time.Time { mu.Lock(); defer mu.Unlock(); n++; return t0.Add(time.Duration(n) * time.Second) }
}

func commit(t *testing.T, b store.Backend, cs []affinity.Change) *affinity.Applied {
	t.Helper()
	a, err := b.Do(func(*affinity.Table) ([]affinity.Change, error) { return cs, nil })
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func readAll(t *testing.T, b store.Backend, since uint64) []store.Batch {
	t.Helper()
	c, err := b.Changes(since)
	if err != nil {
		t.Fatalf("changes since %d: %v", since, err)
	}
	defer c.Close()
	bs, err := store.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	return bs
}

// Run runs the suite.
func Run(t *testing.T, be Backend) {
	opts := func() affinity.Options { return affinity.Options{Now: Clock()} }
	t.Run("CommitReopen", func(t *testing.T) {
		open := be.New(t)
		s := open(t, opts())
		commit(t, s, tabletest.Nodes(3))
		commit(t, s, tabletest.Tunnels(0, 100))
		moved, _ := s.Table().Tunnel("t000005")
		moved.Peer = netip.MustParseAddr("192.0.2.5")
		moved.Subnets = []netip.Prefix{netip.MustParsePrefix("10.200.0.0/24")}
		a := commit(t, s, []affinity.Change{{Kind: affinity.PutTunnel, Tunnel: &moved}, {Kind: affinity.DeleteTunnel, Name: "t000007"}})
		if a.Revision != s.Revision() || a.Revision <= a.Previous() {
			t.Fatalf("applied at %d after %d, store at %d", a.Revision, a.Previous(), s.Revision())
		}
		if tu, _ := s.Table().Tunnel("t000005"); tu.Revision != a.Revision {
			t.Fatalf("moved tunnel stamped with revision %d, change made %d", tu.Revision, a.Revision)
		}
		rev := s.Revision()
		if a := commit(t, s, tabletest.Tunnels(10, 10)); len(a.Changes) != 0 || s.Revision() != rev {
			t.Fatalf("no-op commit changed the revision %d -> %d", rev, s.Revision())
		}
		want := s.Table().Snapshot()
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		s = open(t, opts())
		defer s.Close()
		if got := s.Table().Snapshot(); !reflect.DeepEqual(got, want) {
			t.Fatalf("reopened table differs: revision %d vs %d, %d vs %d tunnels", got.Revision, want.Revision, len(got.Tunnels), len(want.Tunnels))
		}
		r, err := s.Check()
		if err != nil || !r.OK() || r.Tunnels != 99 || r.Revision != rev {
			t.Fatalf("check: %+v %v", r, err)
		}
	})

	t.Run("AllOrNothing", func(t *testing.T) {
		s := be.New(t)(t, opts())
		defer s.Close()
		commit(t, s, tabletest.Nodes(2))
		commit(t, s, tabletest.Tunnels(0, 10))
		rev, before := s.Revision(), s.Table().Snapshot()
		bad := tabletest.Tunnels(100, 50)
		clash := *bad[49].Tunnel
		clash.Peer = netip.AddrFrom4([4]byte{100, 0, 0, 3}) // t000003's peer
		bad[49].Tunnel = &clash
		_, err := s.Do(func(*affinity.Table) ([]affinity.Change, error) { return bad, nil })
		var batchErr *affinity.BatchError
		if !errors.As(err, &batchErr) || batchErr.Total != 1 || !errors.Is(batchErr.Errors[0], affinity.ErrConflict) {
			t.Fatalf("want one conflict, got %v", err)
		}
		if s.Revision() != rev || !reflect.DeepEqual(s.Table().Snapshot(), before) {
			t.Fatal("a refused batch changed the table")
		}
		planErr := errors.New("plan refused")
		if _, err := s.Do(func(*affinity.Table) ([]affinity.Change, error) { return nil, planErr }); !errors.Is(err, planErr) {
			t.Fatalf("plan error: %v", err)
		}
		if err := s.Try(func(*affinity.Table) ([]affinity.Change, error) { return tabletest.Tunnels(200, 5), nil }); err != nil {
			t.Fatal(err)
		}
		if s.Revision() != rev || s.Table().Len() != 10 {
			t.Fatal("Try changed the table")
		}
	})

	t.Run("ChangeLog", func(t *testing.T) {
		s := be.New(t)(t, opts())
		defer s.Close()
		commit(t, s, tabletest.Nodes(2))
		cur, err := s.Changes(s.Revision())
		if err != nil {
			t.Fatal(err)
		}
		defer cur.Close()
		var revs []uint64
		for i := range 5 {
			a := commit(t, s, tabletest.Tunnels(i*10, 10))
			select {
			case <-cur.Notify():
			case <-time.After(10 * time.Second):
				t.Fatalf("no notification after commit %d", i)
			}
			b, ok, err := cur.Next()
			if err != nil || !ok || b.Revision != a.Revision || b.Prev != a.Previous() || b.Len() != 10 || !b.Resolved {
				t.Fatalf("cursor after commit %d: %+v %v %v", i, b, ok, err)
			}
			revs = append(revs, b.Revision)
		}
		if _, ok, _ := cur.Next(); ok {
			t.Fatal("cursor read past the newest commit")
		}
		// A move carries the tunnel as it was, for the dataplane.
		tu, _ := s.Table().Tunnel("t000001")
		other := "vpn-0"
		if tu.Node == other {
			other = "vpn-1"
		}
		tu.Node = other
		commit(t, s, []affinity.Change{{Kind: affinity.PutTunnel, Tunnel: &tu}})
		b, ok, err := cur.Next()
		if err != nil || !ok || len(b.Changes) != 1 || b.Changes[0].Old == nil || b.Changes[0].Old.Node == other {
			t.Fatalf("move batch: %+v %v %v", b, ok, err)
		}
		all := readAll(t, s, revs[0])
		if len(all) != 5 || all[0].Prev != revs[0] || all[3].Revision != revs[4] {
			t.Fatalf("read from %d: %d batches", revs[0], len(all))
		}
		for i := 1; i < len(all); i++ {
			if all[i].Prev != all[i-1].Revision {
				t.Fatalf("batch %d does not follow batch %d", i, i-1)
			}
		}
		if _, err := s.Changes(s.Revision() + 1000); !errors.Is(err, store.ErrCompacted) {
			t.Fatalf("a revision the log never had: %v, want ErrCompacted", err)
		}
	})

	t.Run("VIPs", func(t *testing.T) {
		s := be.New(t)(t, opts())
		defer s.Close()
		commit(t, s, tabletest.Nodes(1))
		commit(t, s, tabletest.Tunnels(0, 3))
		if err := s.SetVIPs([]netip.Addr{netip.MustParseAddr("198.51.100.1")}); err != nil {
			t.Fatal(err)
		}
		sub := s.Table().Tunnels()[0].Subnets[0]
		if err := s.SetVIPs([]netip.Addr{sub.Addr().Next()}); err == nil {
			t.Fatalf("a VIP inside stored subnet %s was accepted", sub)
		}
		vip := tabletest.Tunnels(50, 1)
		vip[0].Tunnel.Subnets = []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}
		if _, err := s.Do(func(*affinity.Table) ([]affinity.Change, error) { return vip, nil }); err == nil {
			t.Fatal("a subnet holding the VIP was committed")
		}
	})

	t.Run("LargeBatch", func(t *testing.T) {
		open := be.New(t)
		s := open(t, opts())
		commit(t, s, tabletest.Nodes(4))
		a := commit(t, s, tabletest.Tunnels(0, 20_000))
		if len(a.Changes) != 20_000 || s.Table().Len() != 20_000 {
			t.Fatalf("large batch: %d changes, %d tunnels", len(a.Changes), s.Table().Len())
		}
		want := s.Table().Snapshot()
		s.Close()
		s = open(t, opts())
		defer s.Close()
		if got := s.Table().Snapshot(); !reflect.DeepEqual(got, want) {
			t.Fatal("large batch: reopened table differs")
		}
	})

	t.Run("Backup", func(t *testing.T) {
		s := be.New(t)(t, opts())
		defer s.Close()
		commit(t, s, tabletest.Nodes(2))
		commit(t, s, tabletest.Tunnels(0, 50))
		path := t.TempDir() + "/backup.db"
		if _, err := s.Backup(path, store.BackupOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Backup(path, store.BackupOptions{}); !errors.Is(err, store.ErrBackupTarget) {
			t.Fatalf("backup over an existing file without force: %v", err)
		}
		b, err := store.Open(store.Options{Path: path, ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		if b.Table().Len() != 50 || b.Revision() != s.Revision() {
			t.Fatalf("backup holds %d tunnels at %d", b.Table().Len(), b.Revision())
		}
	})

	if !be.Shared {
		return
	}
	t.Run("SharedFollow", func(t *testing.T) {
		open := be.New(t)
		a := open(t, opts())
		defer a.Close()
		b := open(t, opts())
		defer b.Close()
		cur, err := b.Changes(b.Revision())
		if err != nil {
			t.Fatal(err)
		}
		defer cur.Close()
		commit(t, a, tabletest.Nodes(3))
		ap := commit(t, a, tabletest.Tunnels(0, 30))
		be.Settle(t, b, ap.Revision)
		bs, err := store.ReadAll(cur)
		if err != nil || len(bs) != 2 || bs[1].Revision != ap.Revision || !bs[1].Resolved {
			t.Fatalf("b's cursor: %d batches, %v", len(bs), err)
		}
		if !reflect.DeepEqual(a.Table().Snapshot(), b.Table().Snapshot()) {
			t.Fatal("the two handles hold different tables")
		}
	})
	t.Run("SharedRace", func(t *testing.T) {
		open := be.New(t)
		a := open(t, opts())
		defer a.Close()
		b := open(t, opts())
		defer b.Close()
		commit(t, a, tabletest.Nodes(3))
		var wg sync.WaitGroup
		errs := make([]error, 2)
		plans := make([]int, 2)
		for i, s := range []store.Backend{a, b} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for k := range 10 {
					_, err := s.Do(func(*affinity.Table) ([]affinity.Change, error) {
						plans[i]++
						return tabletest.Tunnels(i*1000+k*10, 10), nil
					})
					if err != nil {
						errs[i] = err
						return
					}
				}
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
		be.Settle(t, a, b.Revision())
		be.Settle(t, b, a.Revision())
		if a.Table().Len() != 200 || !reflect.DeepEqual(a.Table().Snapshot(), b.Table().Snapshot()) {
			t.Fatalf("after the race: %d and %d tunnels, tables equal %v", a.Table().Len(), b.Table().Len(), reflect.DeepEqual(a.Table().Snapshot(), b.Table().Snapshot()))
		}
		t.Logf("plans: %d and %d for 10 commits each (a replan per conflict)", plans[0], plans[1])
	})
}

package store

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/tabletest"
)

func clock() func() time.Time {
	t0 := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	return func() time.Time { n++; return t0.Add(time.Duration(n) * time.Second) }
}

func open(t testing.TB, path string) *Store {
	t.Helper()
	s, err := Open(Options{Path: path, Table: affinity.Options{Now: clock()}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// nodes and tunnels generate the changes every store test commits.
var (
	nodes   = tabletest.Nodes
	tunnels = tabletest.Tunnels
)

func TestCommitReopenJournal(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	s := open(t, path)
	if _, err := s.Commit(nodes(3)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit(tunnels(0, 100)); err != nil {
		t.Fatal(err)
	}
	// A move and a deletion: the stale index entries must go.
	moved, _ := s.Table().Tunnel("t000005")
	moved.Peer = netip.MustParseAddr("192.0.2.5")
	moved.Subnets = []netip.Prefix{netip.MustParsePrefix("10.200.0.0/24")}
	if _, err := s.Commit([]affinity.Change{{Kind: affinity.PutTunnel, Tunnel: &moved}, {Kind: affinity.DeleteTunnel, Name: "t000007"}}); err != nil {
		t.Fatal(err)
	}
	// A no-op writes nothing.
	rev := s.Revision()
	if a, err := s.Commit(tunnels(10, 10)); err != nil || len(a.Changes) != 0 || s.Revision() != rev {
		t.Fatalf("no-op commit: %v, revision %d -> %d", err, rev, s.Revision())
	}
	want := s.Table().Snapshot()
	if rev != 3 {
		t.Fatalf("revision %d after 3 commits", rev)
	}
	var revs []uint64
	bs, err := readAll(s, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bs {
		revs = append(revs, b.Revision)
	}
	if !reflect.DeepEqual(revs, []uint64{1, 2, 3}) {
		t.Fatalf("change log revisions %v", revs)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = open(t, path)
	defer s.Close()
	// After a restart the ring is empty: the journal serves the cursor.
	bs, err = readAll(s, 1)
	if err != nil || len(bs) != 2 || bs[0].Prev != 1 || bs[1].Revision != 3 || bs[0].Resolved {
		t.Fatalf("journal after reopen: %+v %v", bs, err)
	}
	got := s.Table().Snapshot()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("reopened table differs")
	}
	r, err := s.Check()
	if err != nil || !r.OK() || r.Tunnels != 99 || r.Revision != 3 {
		t.Fatalf("check: %+v %v", r, err)
	}
}

// TestReplicaReplay: a second store that replays the first's journal with
// CommitAt ends up equal, revision included.
func TestReplicaReplay(t *testing.T) {
	dir := t.TempDir()
	m := open(t, filepath.Join(dir, "m.db"))
	defer m.Close()
	r := open(t, filepath.Join(dir, "r.db"))
	defer r.Close()
	m.Commit(nodes(4))
	m.Commit(tunnels(0, 500))
	p, _ := m.Table().PlanNodeState("vpn-2", affinity.NodeDown)
	if _, err := m.Commit(p.Batch()); err != nil {
		t.Fatal(err)
	}
	bs, err := readAll(m, r.Revision())
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bs {
		cs, err := b.Decoded()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := r.CommitAt(b.Revision, cs); err != nil {
			t.Fatal(err)
		}
	}
	if !reflect.DeepEqual(m.Table().Snapshot(), r.Table().Snapshot()) {
		t.Fatal("replica differs from master")
	}
}

func TestJournalBound(t *testing.T) {
	s, err := Open(Options{Path: filepath.Join(t.TempDir(), "td.db"), JournalChanges: 50})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.Commit(nodes(2))
	for i := 0; i < 20; i++ {
		if _, err := s.Commit(tunnels(i*10, 10)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err = s.Changes(0); !errors.Is(err, ErrCompacted) {
		t.Fatalf("want ErrCompacted reading from 0, got %v", err)
	}
	if bs, err := readAll(s, s.Revision()-5); err != nil || len(bs) != 5 {
		t.Fatalf("recent entries: %d, %v", len(bs), err)
	}
	// A batch bigger than the whole journal is not journaled: a reader
	// behind it takes a snapshot, one at it reads on.
	if _, err := s.Commit(tunnels(1000, 80)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Changes(s.Revision() - 1); !errors.Is(err, ErrCompacted) {
		t.Fatalf("reading across an unjournaled batch: %v, want ErrCompacted", err)
	}
	s.Commit(tunnels(2000, 5))
	if bs, err := readAll(s, s.Revision()-1); err != nil || len(bs) != 1 || bs[0].Len() != 5 {
		t.Fatalf("entry after an unjournaled batch: %v", err)
	}
	// The journal restarts after it, also across a reopen.
	path := s.Path()
	s.Close()
	s, err = Open(Options{Path: path, JournalChanges: 50})
	if err != nil {
		t.Fatal(err)
	}
	if bs, err := readAll(s, s.Revision()-1); err != nil || len(bs) != 1 {
		t.Fatalf("journal after reopen: %v", err)
	}
	if _, err := s.Changes(s.Revision() - 2); !errors.Is(err, ErrCompacted) {
		t.Fatalf("reading across an unjournaled batch after reopen: %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	notDB := filepath.Join(dir, "tunnels.csv")
	os.WriteFile(notDB, []byte("id,peer,subnets\nx,192.0.2.1,10.0.0.0/24\n"), 0o600)
	if _, err := Open(Options{Path: notDB}); err == nil || !strings.Contains(err.Error(), "not a tunneldirector store") {
		t.Fatalf("csv as store: %v", err)
	}

	other := filepath.Join(dir, "other.db")
	db, _ := bolt.Open(other, 0o600, nil)
	db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("x")); return err })
	db.Close()
	if _, err := Open(Options{Path: other}); err == nil || !strings.Contains(err.Error(), "bbolt file of something else") {
		t.Fatalf("foreign bbolt: %v", err)
	}

	newer := filepath.Join(dir, "newer.db")
	s := open(t, newer)
	s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keySchema, be32(SchemaVersion+1)) })
	s.Close()
	if _, err := Open(Options{Path: newer}); err == nil || !strings.Contains(err.Error(), "newer than this director's") {
		t.Fatalf("newer schema: %v", err)
	}

	locked := filepath.Join(dir, "locked.db")
	s = open(t, locked)
	defer s.Close()
	_, err := Open(Options{Path: locked, LockTimeout: 50 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("locked by process %d", os.Getpid())) {
		t.Fatalf("locked store: %v", err)
	}
}

func TestLoadDetectsBrokenIndex(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	s := open(t, path)
	s.Commit(nodes(2))
	s.Commit(tunnels(0, 10))
	if err := s.Fold(); err != nil { // the records written, to lose one
		t.Fatal(err)
	}
	// A record lost outside a commit (a damaged leaf that still parses):
	// the table alone cannot tell, the index digest can.
	s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketTunnels).Delete([]byte("t000003")) })
	s.Close()
	_, err := Open(Options{Path: path})
	if err == nil || !strings.Contains(err.Error(), "the index digest committed with them") {
		t.Fatalf("broken index: %v", err)
	}
}

// toSchema1 rewrites a store in the layout of schema 1: index buckets
// idx_peers and idx_subnets instead of the digest.
func toSchema1(t *testing.T, path string) {
	t.Helper()
	s := open(t, path)
	tab := s.Table()
	err := s.db.Update(func(tx *bolt.Tx) error {
		peers, _ := tx.CreateBucket(bucketPeers)
		subnets, _ := tx.CreateBucket(bucketSubnets)
		tab.EachKey(func(id string, peer netip.Addr, ps []netip.Prefix) {
			peers.Put(peerKey(peer), []byte(id))
			for _, p := range ps {
				subnets.Put(subnetKey(p), []byte(id))
			}
		})
		m := tx.Bucket(bucketMeta)
		m.Delete(keyIndexDigest)
		m.Delete(keyFolded)
		return m.Put(keySchema, be32(1))
	})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
}

// TestSchema1Migrates: a store written with index buckets is checked
// against them as before, then migrated to the digest when opened for
// writing; read-only opens leave it alone.
func TestSchema1Migrates(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	s := open(t, path)
	s.Commit(nodes(2))
	s.Commit(tunnels(0, 10))
	want := s.Table().Snapshot()
	s.Close()
	toSchema1(t, path)

	ro, err := Open(Options{Path: path, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if ro.schema != 1 || !reflect.DeepEqual(ro.Table().Snapshot(), want) {
		t.Fatalf("read-only open of schema 1: schema %d", ro.schema)
	}
	ro.Close()

	// A schema-1 index that lost an entry still names it.
	bad := filepath.Join(t.TempDir(), "bad.db")
	data, _ := os.ReadFile(path)
	os.WriteFile(bad, data, 0o600)
	db, _ := bolt.Open(bad, 0o600, nil)
	db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPeers).Delete(netip.MustParseAddr("100.0.0.3").AsSlice())
	})
	db.Close()
	if _, err := Open(Options{Path: bad}); err == nil || !strings.Contains(err.Error(), "peer index has 9 entries for 10 tunnels") {
		t.Fatalf("broken schema-1 index: %v", err)
	}

	s = open(t, path)
	if s.schema != SchemaVersion {
		t.Fatalf("schema %d after a writable open", s.schema)
	}
	s.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketPeers) != nil || tx.Bucket(bucketSubnets) != nil {
			t.Error("index buckets kept after migration")
		}
		return nil
	})
	if _, err := s.Commit(tunnels(10, 5)); err != nil {
		t.Fatal(err)
	}
	want = s.Table().Snapshot()
	s.Close()
	s = open(t, path)
	defer s.Close()
	if !reflect.DeepEqual(s.Table().Snapshot(), want) {
		t.Fatal("migrated store reopened differs")
	}
}

func TestBackup(t *testing.T) {
	dir := t.TempDir()
	s := open(t, filepath.Join(dir, "td.db"))
	defer s.Close()
	s.Commit(nodes(2))
	s.Commit(tunnels(0, 50))
	n, err := s.Backup(filepath.Join(dir, "copy.db"), BackupOptions{})
	if err != nil || n == 0 {
		t.Fatalf("backup: %d %v", n, err)
	}
	b := open(t, filepath.Join(dir, "copy.db"))
	defer b.Close()
	if !reflect.DeepEqual(b.Table().Snapshot(), s.Table().Snapshot()) {
		t.Fatal("backup differs")
	}
}

func TestPutThenDeleteInOneBatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	s := open(t, path)
	s.Commit(nodes(2))
	batch := append(tunnels(0, 3), affinity.Change{Kind: affinity.DeleteTunnel, Name: "t000001"})
	if _, err := s.Commit(batch); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = open(t, path) // Open checks the indexes against the records
	defer s.Close()
	if _, ok := s.Table().Tunnel("t000001"); ok || s.Table().Len() != 2 {
		t.Fatalf("after put+delete in one batch: %d tunnels", s.Table().Len())
	}
}

func TestTunnelTwiceInOneBatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	s := open(t, path)
	s.Commit(nodes(2))
	first := tunnels(0, 1)
	second := tunnels(0, 1)
	second[0].Tunnel.Subnets = []netip.Prefix{netip.MustParsePrefix("10.99.0.0/24")}
	second[0].Tunnel.Peer = netip.MustParseAddr("192.0.2.99")
	if _, err := s.Commit(append(first, second...)); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = open(t, path) // Open fails when stale index keys remain
	defer s.Close()
	if tu, _ := s.Table().Tunnel("t000000"); tu.Peer != netip.MustParseAddr("192.0.2.99") {
		t.Fatalf("tunnel %+v", tu)
	}
}

func TestCommitReset(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	s := open(t, path)
	s.Commit(nodes(2))
	s.Commit(tunnels(0, 10))
	s.Commit(tunnels(10, 10)) // revision 3
	// Back to revision 2's content, at revision 2: the snapshot of a
	// master whose history stopped there.
	a, err := s.CommitReset(2, []affinity.Change{{Kind: affinity.DeleteTunnel, Name: "t000015"}})
	if err != nil || a.Revision != 2 || s.Revision() != 2 {
		t.Fatalf("reset: %+v %v, revision %d", a, err, s.Revision())
	}
	if _, err := s.Changes(0); !errors.Is(err, ErrCompacted) {
		t.Fatalf("change log from 0 after reset: %v", err)
	}
	if bs, err := readAll(s, 3); err != nil || len(bs) != 1 || !bs[0].Reset() || bs[0].Revision != 2 {
		t.Fatalf("reset batch: %+v %v", bs, err)
	}
	// The next live revision follows at 3.
	if _, err := s.CommitAt(3, tunnels(30, 1)); err != nil {
		t.Fatal(err)
	}
	want := s.Table().Snapshot()
	s.Close()
	s = open(t, path)
	defer s.Close()
	if !reflect.DeepEqual(s.Table().Snapshot(), want) || s.Revision() != 3 {
		t.Fatal("reopened store differs after reset")
	}
}

// TestBulkRecordsIntact commits a batch whose records fill several of the
// commit's shared value buffers, long records (1 KiB comments) among
// short ones, and reads every record back from disk.
func TestBulkRecordsIntact(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	s := open(t, path)
	if _, err := s.Commit(nodes(3)); err != nil {
		t.Fatal(err)
	}
	batch := tunnels(0, 20_000)
	for i := range batch {
		if i%7 == 0 {
			batch[i].Tunnel.Comment = strings.Repeat(string(rune('a'+i%26)), affinity.MaxComment)
		}
	}
	if _, err := s.Commit(batch); err != nil {
		t.Fatal(err)
	}
	want := s.Table().Tunnels()
	s.Close()
	s, err := Open(Options{Path: path, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got := s.Table().Tunnels()
	if len(got) != len(want) {
		t.Fatalf("reopened: %d tunnels, want %d", len(got), len(want))
	}
	for i := range want {
		if !reflect.DeepEqual(got[i], want[i]) {
			t.Fatalf("tunnel %s reopened as %+v, want %+v", want[i].ID, got[i], want[i])
		}
	}
}

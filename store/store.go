// Package store persists the affinity table in a bbolt file.
//
// Every logical change (one import, one node action, one learned tunnel) is
// one bbolt transaction that writes the changed records, their index
// entries, the new revision and a journal entry, so a crash at any instant
// leaves either the old or the new table. Open loads the whole table into
// an affinity.Table and checks the stored indexes against it. Readers
// follow the commits through their own cursor on the change log
// (Changes, in changes.go).
package store

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// SchemaVersion is the layout of the buckets this code writes. A store
// with a newer schema is refused rather than misread.
const SchemaVersion = 1

// DefaultJournalChanges is how many changes the journal keeps by default.
const DefaultJournalChanges = 500_000

var (
	bucketMeta    = []byte("meta")
	bucketNodes   = []byte("nodes")
	bucketTunnels = []byte("tunnels")
	bucketPeers   = []byte("idx_peers")
	bucketSubnets = []byte("idx_subnets")
	bucketJournal = []byte("journal")

	keySchema   = []byte("schema")
	keyRevision = []byte("revision")
	keyJournalN = []byte("journal_changes")
	// keyBuckets holds the table's unknown-peer bucket assignment as one
	// record (affinity.MarshalBuckets), rewritten whole by every commit
	// that changes a bucket: 8 KiB at 4,096 buckets.
	keyBuckets = []byte("buckets")
)

// ErrLocked means another process (a running daemon) holds the store.
var ErrLocked = errors.New("locked")

// Options configures Open.
type Options struct {
	// Path is the bbolt file.
	Path string
	// Table configures the in-memory table (VIPs, epsilon, clock).
	Table affinity.Options
	// JournalChanges bounds the journal (0: DefaultJournalChanges). The
	// newest entry is always kept, however large.
	JournalChanges int
	// RingChanges bounds the change log's in-memory ring (0:
	// DefaultRingChanges; never more than the journal holds).
	RingChanges int
	// ReadOnly opens the file with a shared lock and refuses commits.
	ReadOnly bool
	// LockTimeout is how long to wait for another process's lock (0: 1s).
	LockTimeout time.Duration
	// NoCreate refuses to create a missing file.
	NoCreate bool
}

// Store is an open store: the bbolt file and the table loaded from it.
type Store struct {
	mu         sync.Mutex // serialises commits: plan, apply, persist
	db         *bolt.DB
	table      *affinity.Table
	path       string
	readOnly   bool
	journalMax int
	log        changeLog
}

// Open opens (or creates) a store and loads its table.
func Open(opts Options) (*Store, error) {
	if opts.Path == "" {
		return nil, errors.New("open store: no path")
	}
	if opts.NoCreate || opts.ReadOnly {
		if _, err := os.Stat(opts.Path); err != nil {
			return nil, fmt.Errorf("open store %s: %w", opts.Path, err)
		}
	} else if err := os.MkdirAll(filepath.Dir(opts.Path), 0o750); err != nil {
		return nil, fmt.Errorf("open store %s: %w", opts.Path, err)
	}
	if err := checkFile(opts.Path); err != nil {
		return nil, err
	}
	timeout := opts.LockTimeout
	if timeout == 0 {
		timeout = time.Second
	}
	var db *bolt.DB
	err := guard(opts.Path, "opening the file (reading its free pages)", func() (err error) {
		db, err = bolt.Open(opts.Path, 0o600, &bolt.Options{
			Timeout:        timeout,
			ReadOnly:       opts.ReadOnly,
			NoFreelistSync: true,
			FreelistType:   bolt.FreelistMapType,
		})
		return err
	})
	if errors.Is(err, ErrDamaged) {
		return nil, err
	}
	if err != nil {
		switch {
		case errors.Is(err, berrors.ErrTimeout):
			return nil, fmt.Errorf("open store %s: %w by %s (waited %s); stop it or use its API", opts.Path, ErrLocked, lockHolder(opts.Path), timeout)
		case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrChecksum), errors.Is(err, berrors.ErrVersionMismatch):
			return nil, fmt.Errorf("open store %s: not a tunneldirector store (bbolt: %v)", opts.Path, err)
		}
		return nil, fmt.Errorf("open store %s: %w", opts.Path, err)
	}
	s := &Store{db: db, path: opts.Path, readOnly: opts.ReadOnly, journalMax: opts.JournalChanges}
	if s.journalMax <= 0 {
		s.journalMax = DefaultJournalChanges
	}
	if err := guard(opts.Path, "reading its meta bucket", s.init); err != nil {
		db.Close()
		return nil, err
	}
	if opts.Table.VIPs == nil {
		// No configuration (the offline CLI): the VIPs the daemon stored.
		if err := db.View(func(tx *bolt.Tx) (err error) { opts.Table.VIPs, err = storedVIPs(tx); return err }); err != nil {
			db.Close()
			return nil, damaged(opts.Path, "%v", err)
		}
	}
	t, err := affinity.New(opts.Table)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", opts.Path, err)
	}
	// A bulk load allocates millions of small objects that all stay
	// live: collecting while it runs only burns the other core.
	gc := debug.SetGCPercent(400)
	err = guard(opts.Path, "loading the table", func() error { return s.load(t) })
	debug.SetGCPercent(gc)
	if err != nil {
		db.Close()
		return nil, err
	}
	s.table = t
	ring := opts.RingChanges
	if ring <= 0 {
		ring = DefaultRingChanges
	}
	s.log.init(t.Revision(), min(ring, s.journalMax))
	return s, nil
}

// lockHolder names the process holding a lock on the file, from /proc/locks.
func lockHolder(path string) string {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return "another process"
	}
	f, err := os.Open("/proc/locks")
	if err != nil {
		return "another process"
	}
	defer f.Close()
	want := ":" + strconv.FormatUint(st.Ino, 10)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// 1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || !strings.HasSuffix(fields[5], want) {
			continue
		}
		pid := fields[4]
		cmd, _ := os.ReadFile("/proc/" + pid + "/cmdline")
		c := strings.TrimSpace(strings.ReplaceAll(string(cmd), "\x00", " "))
		if c == "" {
			return "process " + pid
		}
		return fmt.Sprintf("process %s (%s)", pid, c)
	}
	return "another process"
}

func (s *Store) init() error {
	check := func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if m == nil {
			return fmt.Errorf("open store %s: not a tunneldirector store (no meta bucket)", s.path)
		}
		v := m.Get(keySchema)
		if len(v) != 4 {
			return fmt.Errorf("open store %s: not a tunneldirector store (no schema version)", s.path)
		}
		if r := m.Get(keyRevision); len(r) != 8 {
			return damaged(s.path, "bucket meta: revision is %d bytes, want 8", len(r))
		}
		if got := binary.BigEndian.Uint32(v); got > SchemaVersion {
			return fmt.Errorf("open store %s: schema version %d is newer than this director's %d; upgrade tunneldirector", s.path, got, SchemaVersion)
		}
		for _, b := range [][]byte{bucketNodes, bucketTunnels, bucketPeers, bucketSubnets, bucketJournal} {
			if tx.Bucket(b) == nil {
				return damaged(s.path, "bucket %s missing", b)
			}
		}
		return nil
	}
	if s.readOnly {
		return s.db.View(check)
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketMeta) == nil {
			if c := tx.Cursor(); func() bool { k, _ := c.First(); return k != nil }() {
				return fmt.Errorf("open store %s: a bbolt file of something else (no meta bucket)", s.path)
			}
			m, err := tx.CreateBucket(bucketMeta)
			if err != nil {
				return err
			}
			if err := m.Put(keySchema, be32(SchemaVersion)); err != nil {
				return err
			}
			if err := m.Put(keyRevision, be64(0)); err != nil {
				return err
			}
			for _, b := range [][]byte{bucketNodes, bucketTunnels, bucketPeers, bucketSubnets, bucketJournal} {
				if _, err := tx.CreateBucketIfNotExists(b); err != nil {
					return err
				}
			}
		}
		return check(tx)
	})
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func peerKey(a netip.Addr) []byte { return appendPeerKey(nil, a) }

func subnetKey(p netip.Prefix) []byte { return appendSubnetKey(nil, p) }

// appendPeerKey appends the index key of a peer: its 4 or 16 bytes.
func appendPeerKey(b []byte, a netip.Addr) []byte {
	if a.Is4() {
		v := a.As4()
		return append(b, v[:]...)
	}
	v := a.As16()
	return append(b, v[:]...)
}

// appendSubnetKey appends the index key of a subnet: address, then length.
func appendSubnetKey(b []byte, p netip.Prefix) []byte {
	return append(appendPeerKey(b, p.Addr()), byte(p.Bits()))
}

func (s *Store) load(t *affinity.Table) error {
	return s.db.View(func(tx *bolt.Tx) error {
		rev := binary.BigEndian.Uint64(tx.Bucket(bucketMeta).Get(keyRevision))
		var nodes []affinity.Node
		err := tx.Bucket(bucketNodes).ForEach(func(k, v []byte) error {
			n, err := affinity.UnmarshalNode(v)
			if err != nil {
				return damaged(s.path, "bucket nodes: record %q: %v", shortKey(k), err)
			}
			nodes = append(nodes, n)
			return nil
		})
		if err != nil {
			return err
		}
		// Tunnels stream from the cursor into the table: a million of
		// them never sit in a slice as well.
		var decodeErr error
		seq := func(yield func(*affinity.Tunnel) bool) {
			c := tx.Bucket(bucketTunnels).Cursor()
			var tu affinity.Tunnel
			for k, v := c.First(); k != nil; k, v = c.Next() {
				var err error
				if tu, err = affinity.UnmarshalTunnel(v); err != nil {
					decodeErr = damaged(s.path, "bucket tunnels: record %q: %v", shortKey(k), err)
					return
				}
				if tu.ID != string(k) {
					decodeErr = damaged(s.path, "bucket tunnels: record %q holds id %q", shortKey(k), shortKey([]byte(tu.ID)))
					return
				}
				if !yield(&tu) {
					return
				}
			}
		}
		err = t.Load(rev, nodes, tx.Bucket(bucketTunnels).Stats().KeyN, seq)
		if decodeErr != nil {
			return decodeErr
		}
		if err != nil {
			return fmt.Errorf("load store %s: the stored table breaks an invariant: %w", s.path, err)
		}
		if v := tx.Bucket(bucketMeta).Get(keyBuckets); v != nil {
			marks, err := affinity.UnmarshalBuckets(v)
			if err == nil {
				err = t.LoadBuckets(marks)
			}
			if err != nil {
				return damaged(s.path, "bucket meta: record %s: %v", keyBuckets, err)
			}
		}
		if errs := checkIndexes(tx, t, 5); len(errs) > 0 {
			return fmt.Errorf("load store %s: indexes disagree with the tunnels (run 'tunneldirector store check'): %w", s.path, errors.Join(errs...))
		}
		return nil
	})
}

// checkIndexes compares the stored peer and subnet indexes with the table
// built from the tunnel records, returning at most max problems. A cheap
// order-independent digest of both sides decides whether they agree; only
// when they do not is each index entry looked up to name the culprits.
func checkIndexes(tx *bolt.Tx, t *affinity.Table, max int) []error {
	var stored, built indexDigest
	_ = tx.Bucket(bucketPeers).ForEach(func(k, v []byte) error { stored.add(k, v); return nil })
	_ = tx.Bucket(bucketSubnets).ForEach(func(k, v []byte) error { stored.add(k, v); return nil })
	var buf, key []byte
	t.EachKey(func(id string, peer netip.Addr, subnets []netip.Prefix) {
		buf = append(buf[:0], id...)
		key = appendPeerKey(key[:0], peer)
		built.add(key, buf)
		for _, p := range subnets {
			key = appendSubnetKey(key[:0], p)
			built.add(key, buf)
		}
	})
	if stored == built {
		return nil
	}
	return findIndexProblems(tx, t, max)
}

// indexDigest sums a hash of every (key, tunnel id) pair, so two sets of
// pairs compare equal whatever order they were read in.
type indexDigest struct {
	n   int
	sum uint64
	xor uint64
}

func (d *indexDigest) add(k, v []byte) {
	// FNV-1a over key, a separator and value, inline: this runs for
	// every index entry at startup.
	x := uint64(14695981039346656037)
	for _, c := range k {
		x = (x ^ uint64(c)) * 1099511628211
	}
	x *= 1099511628211
	for _, c := range v {
		x = (x ^ uint64(c)) * 1099511628211
	}
	d.n++
	d.sum += x
	d.xor ^= x * 0x9E3779B97F4A7C15
}

func findIndexProblems(tx *bolt.Tx, t *affinity.Table, max int) []error {
	var errs []error
	add := func(err error) bool {
		errs = append(errs, err)
		return len(errs) < max
	}
	stop := errors.New("stop")
	peers, subnets := 0, 0
	_ = tx.Bucket(bucketPeers).ForEach(func(k, v []byte) error {
		peers++
		a, ok := netip.AddrFromSlice(k)
		tu, found := t.LookupPeer(a)
		if !ok || !found || tu.ID != string(v) {
			if !add(fmt.Errorf("peer index entry %s -> %q has no such tunnel", a, v)) {
				return stop
			}
		}
		return nil
	})
	_ = tx.Bucket(bucketSubnets).ForEach(func(k, v []byte) error {
		subnets++
		if len(k) != 5 && len(k) != 17 {
			if !add(fmt.Errorf("subnet index key %x malformed", k)) {
				return stop
			}
			return nil
		}
		a, _ := netip.AddrFromSlice(k[:len(k)-1])
		p := netip.PrefixFrom(a, int(k[len(k)-1]))
		tu, q, found := t.LookupSubnet(a)
		if !found || q != p || tu.ID != string(v) {
			if !add(fmt.Errorf("subnet index entry %s -> %q has no such tunnel", p, v)) {
				return stop
			}
		}
		return nil
	})
	wantSubnets := 0
	t.SubnetMarks(func(netip.Prefix, uint16) { wantSubnets++ })
	if n := t.Len(); peers != n {
		add(fmt.Errorf("peer index has %d entries for %d tunnels", peers, n))
	}
	if subnets != wantSubnets {
		add(fmt.Errorf("subnet index has %d entries for %d protected subnets", subnets, wantSubnets))
	}
	if len(errs) == 0 {
		errs = append(errs, errors.New("index digest differs from the tunnels, but no single entry was found wrong"))
	}
	return errs
}

// Table returns the loaded table. Read from it freely; change it only
// through Commit, so that the store and the table stay equal.
func (s *Store) Table() *affinity.Table { return s.table }

// Path returns the store's file.
func (s *Store) Path() string { return s.path }

// Revision returns the committed revision.
func (s *Store) Revision() uint64 { return s.table.Revision() }

// Commit applies a batch to the table and persists it in one transaction.
// A batch that changes nothing is not written and bumps no revision.
func (s *Store) Commit(batch []affinity.Change) (*affinity.Applied, error) {
	return s.Do(func(*affinity.Table) ([]affinity.Change, error) { return batch, nil })
}

// Do plans and commits under the store's lock: plan reads the table and
// returns the batch to commit, so nothing changes between the two.
func (s *Store) Do(plan func(*affinity.Table) ([]affinity.Change, error)) (*affinity.Applied, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	batch, err := plan(s.table)
	if err != nil {
		return nil, err
	}
	return s.commitLocked(func() (*affinity.Applied, error) { return s.table.Apply(batch) })
}

// Try plans and applies a batch under the store's lock and rolls it back
// at once: it reports whether the batch would commit, changing nothing.
func (s *Store) Try(plan func(*affinity.Table) ([]affinity.Change, error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	batch, err := plan(s.table)
	if err != nil {
		return err
	}
	return s.table.Check(batch)
}

// CommitAt applies resolved changes at a given revision (a replica
// following its master) and persists them.
func (s *Store) CommitAt(rev uint64, changes []affinity.Change) (*affinity.Applied, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.commitLocked(func() (*affinity.Applied, error) { return s.table.ApplyAt(rev, changes) })
}

func (s *Store) commitLocked(apply func() (*affinity.Applied, error)) (*affinity.Applied, error) {
	if s.readOnly {
		return nil, fmt.Errorf("commit to store %s: opened read-only", s.path)
	}
	applied, err := apply()
	if err != nil {
		return nil, err
	}
	if len(applied.Changes) == 0 {
		return applied, nil
	}
	prev := applied.Previous()
	var enc []byte
	err = s.db.Update(func(tx *bolt.Tx) (err error) { enc, err = s.persist(tx, applied); return err })
	if err != nil {
		applied.Rollback()
		return nil, fmt.Errorf("commit revision %d to store %s: %w", applied.Revision, s.path, err)
	}
	s.log.add(Batch{Revision: applied.Revision, Prev: prev, Changes: applied.Changes, Encoded: enc, Resolved: true})
	return applied, nil
}

// CommitReset applies resolved changes and sets the revision to rev even
// when the store is already at or past it: a replica taking its master's
// snapshot or repair. The journal is emptied, since the revisions it held
// no longer describe this store's history (a reader behind rev takes a
// snapshot). The change log gets the reset as one batch (Batch.Reset):
// a cursor at the revision before it reads it; older cursors are
// compacted.
func (s *Store) CommitReset(rev uint64, changes []affinity.Change) (*affinity.Applied, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.readOnly {
		return nil, fmt.Errorf("commit to store %s: opened read-only", s.path)
	}
	a, err := s.table.ApplyReset(rev, changes)
	if err != nil {
		return nil, err
	}
	prev := a.Previous()
	var enc []byte
	err = s.db.Update(func(tx *bolt.Tx) error {
		if err := s.writeRecords(tx, a); err != nil {
			return err
		}
		meta := tx.Bucket(bucketMeta)
		if err := meta.Put(keyRevision, be64(rev)); err != nil {
			return err
		}
		if err := resetJournal(tx, prev); err != nil {
			return err
		}
		enc, err = s.journal(tx, rev, a.Changes)
		return err
	})
	if err != nil {
		a.Rollback()
		return nil, fmt.Errorf("reset store %s to revision %d: %w", s.path, rev, err)
	}
	s.log.add(Batch{Revision: rev, Prev: prev, Changes: a.Changes, Encoded: enc, Resolved: true})
	return a, nil
}

// persist writes one applied batch: records, index entries, revision and
// journal entry, all in the caller's transaction. It returns the encoded
// batch.
func (s *Store) persist(tx *bolt.Tx, a *affinity.Applied) ([]byte, error) {
	if err := s.writeRecords(tx, a); err != nil {
		return nil, err
	}
	meta := tx.Bucket(bucketMeta)
	if err := meta.Put(keyRevision, be64(a.Revision)); err != nil {
		return nil, err
	}
	return s.journal(tx, a.Revision, a.Changes)
}

// writeRecords writes the changed records and their index entries.
//
// Why the idx_peers and idx_subnets buckets exist although nothing looks
// tunnels up in them (the table is in memory): they are a second copy of
// every peer and subnet key, written in the same transaction by a
// different path, so that Open and `store check` can tell a store whose
// tunnels bucket lost or changed records (a damaged leaf page that still
// parses, a bug in this writer, a hand-edited file) from a sound one: the
// table's own invariants cannot see a tunnel that is simply gone. The
// price is about one more key per peer and subnet in every commit.
func (s *Store) writeRecords(tx *bolt.Tx, a *affinity.Applied) error {
	nodes := tx.Bucket(bucketNodes)
	tunnels := tx.Bucket(bucketTunnels)
	peers := tx.Bucket(bucketPeers)
	subnets := tx.Bucket(bucketSubnets)
	// The old record's index entries go first: a changed tunnel may have
	// left a peer or subnet that another tunnel of this batch now holds.
	for i := range a.Changes {
		c := &a.Changes[i]
		if c.Kind != affinity.PutTunnel && c.Kind != affinity.DeleteTunnel {
			continue
		}
		if err := unindexOld(tunnels, peers, subnets, c.Key()); err != nil {
			return err
		}
	}
	// Puts go in key order: bbolt inserts into an in-memory node that it
	// splits only at commit, so keys in random order (IPv6 peers among
	// IPv4 ones) would make every insert move the node's tail: quadratic
	// for a large import.
	var puts [3][]kv // tunnels, peers, subnets
	// Only a tunnel's last change in the batch is written: a put then a
	// delete must end deleted though puts are written after deletions,
	// and an earlier put's index keys must not linger.
	last := map[string]int{}
	for i := range a.Changes {
		if c := &a.Changes[i]; c.Kind == affinity.PutTunnel || c.Kind == affinity.DeleteTunnel {
			last[c.Key()] = i
		}
	}
	for i := range a.Changes {
		c := &a.Changes[i]
		var err error
		switch c.Kind {
		case affinity.PutNode:
			err = nodes.Put([]byte(c.Node.Name), affinity.MarshalNode(c.Node))
		case affinity.DeleteNode:
			err = nodes.Delete([]byte(c.Name))
		case affinity.PutTunnel:
			t := c.Tunnel
			if last[t.ID] != i {
				continue
			}
			id := []byte(t.ID)
			puts[0] = append(puts[0], kv{id, affinity.MarshalTunnel(t)})
			puts[1] = append(puts[1], kv{peerKey(t.Peer), id})
			for _, p := range t.Subnets {
				puts[2] = append(puts[2], kv{subnetKey(p), id})
			}
		case affinity.DeleteTunnel:
			err = tunnels.Delete([]byte(c.Name))
		}
		if err != nil {
			return fmt.Errorf("write %s %s: %w", c.Kind, c.Key(), err)
		}
	}
	if slices.ContainsFunc(a.Changes, func(c affinity.Change) bool { return c.Kind == affinity.PutBucket }) {
		if err := putBuckets(tx.Bucket(bucketMeta), s.table.Buckets()); err != nil {
			return err
		}
	}
	for i, b := range []*bolt.Bucket{tunnels, peers, subnets} {
		slices.SortFunc(puts[i], func(x, y kv) int { return bytes.Compare(x.k, y.k) })
		for _, p := range puts[i] {
			if err := b.Put(p.k, p.v); err != nil {
				return fmt.Errorf("write key %x: %w", p.k, err)
			}
		}
	}
	return nil
}

type kv struct{ k, v []byte }

// putBuckets writes the whole bucket assignment as its one record (none:
// no record). The table already holds the batch being written.
func putBuckets(meta *bolt.Bucket, marks []uint16) error {
	var err error
	if len(marks) == 0 {
		err = meta.Delete(keyBuckets)
	} else {
		err = meta.Put(keyBuckets, affinity.MarshalBuckets(marks))
	}
	if err != nil {
		return fmt.Errorf("write the unknown-peer buckets: %w", err)
	}
	return nil
}

// unindexOld removes the index entries of the tunnel's stored record, if
// any. Keys another tunnel took over earlier in the batch are left alone.
func unindexOld(tunnels, peers, subnets *bolt.Bucket, id string) error {
	v := tunnels.Get([]byte(id))
	if v == nil {
		return nil
	}
	old, err := affinity.UnmarshalTunnel(v)
	if err != nil {
		return fmt.Errorf("read stored tunnel %s: %w", id, err)
	}
	if bytes.Equal(peers.Get(peerKey(old.Peer)), []byte(id)) {
		if err := peers.Delete(peerKey(old.Peer)); err != nil {
			return err
		}
	}
	for _, p := range old.Subnets {
		if bytes.Equal(subnets.Get(subnetKey(p)), []byte(id)) {
			if err := subnets.Delete(subnetKey(p)); err != nil {
				return err
			}
		}
	}
	return nil
}

// CheckReport is the result of an integrity check.
type CheckReport struct {
	Path     string   `json:"path"`
	Schema   uint32   `json:"schema"`
	Revision uint64   `json:"revision"`
	Nodes    int      `json:"nodes"`
	Tunnels  int      `json:"tunnels"`
	Subnets  int      `json:"subnets"`
	Journal  int      `json:"journal_entries"`
	Buckets  int      `json:"unknown_peer_buckets"`
	Oldest   uint64   `json:"journal_oldest"`
	Problems []string `json:"problems"`
}

// OK reports whether the check found nothing wrong.
func (r *CheckReport) OK() bool { return len(r.Problems) == 0 }

// Check verifies the bbolt pages (free lists, page references), the table's
// invariants (already checked at Open) and the indexes against the records.
func (s *Store) Check() (*CheckReport, error) {
	r := &CheckReport{Path: s.path, Revision: s.table.Revision(), Tunnels: s.table.Len(), Nodes: len(s.table.Nodes()), Buckets: s.table.BucketCount()}
	s.table.SubnetMarks(func(netip.Prefix, uint16) { r.Subnets++ })
	err := s.db.View(func(tx *bolt.Tx) error {
		for e := range tx.Check() {
			r.Problems = append(r.Problems, "bbolt: "+e.Error())
		}
		r.Schema = binary.BigEndian.Uint32(tx.Bucket(bucketMeta).Get(keySchema))
		for _, e := range checkIndexes(tx, s.table, 100) {
			r.Problems = append(r.Problems, e.Error())
		}
		j := tx.Bucket(bucketJournal)
		r.Journal = j.Stats().KeyN
		if k, _ := j.Cursor().First(); k != nil {
			r.Oldest = binary.BigEndian.Uint64(k)
		}
		return nil
	})
	return r, err
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

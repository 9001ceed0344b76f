// Package store persists the affinity table in a bbolt file.
//
// Every logical change (one import, one node action, one learned tunnel) is
// one bbolt transaction that writes its journal entry and the new revision
// (and, for a large change, the changed records and the index digest), so
// a crash at any instant leaves either the old or the new table. The
// records of the other changes are written later, by a fold (fold.go).
// Open loads the whole table into an affinity.Table, checks it against the
// stored index digest and replays what the fold had not written yet. Readers follow the commits through their own cursor on
// the change log (Changes, in changes.go).
package store

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
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
// with a newer schema is refused rather than misread. Version 1 kept the
// index buckets idx_peers and idx_subnets; version 2 keeps their digest
// in the meta bucket instead (indexdigest.go), and a version-1 store
// opened for writing is migrated once its indexes were checked; version 3
// writes the records of journaled changes later (keyFolded, fold.go), and
// a version-2 store opened for writing becomes version 3 at once; version
// 4 writes a long journal entry in chunks (journalChunk), which an older
// director would misread, and a version-3 store (whose entries are all
// one key) opened for writing becomes version 4 at once.
const SchemaVersion = 4

// DefaultJournalChanges is how many changes the journal keeps by default.
const DefaultJournalChanges = 500_000

var (
	bucketMeta    = []byte("meta")
	bucketNodes   = []byte("nodes")
	bucketTunnels = []byte("tunnels")
	bucketJournal = []byte("journal")
	// The index buckets of schema 1 (read to check and migrate them).
	bucketPeers   = []byte("idx_peers")
	bucketSubnets = []byte("idx_subnets")

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
	// FoldIdle is how long after its last commit the store writes the
	// records its journaled commits deferred (0: DefaultFoldIdle;
	// negative: only when Fold or Close is called, or a commit written in
	// place needs them).
	FoldIdle time.Duration
	// Logger gets the folds (debug) and a fold's failure (error); nil:
	// none.
	Logger *slog.Logger
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
	// schema is the file's schema version (1 until migrated).
	schema uint32
	// pending counts the changes whose records are not written yet
	// (fold.go); under mu.
	pending int
	// foldErr is the last fold's failure (nil after a fold that
	// worked), under mu: Check reports it, and a commit does not retry a
	// failed fold inline.
	foldErr error
	logger  *slog.Logger
	// The folder goroutine: kicked by a deferring commit, stopped by
	// Close.
	foldKick, foldQuit chan struct{}
	foldDone           chan struct{}
	closeOnce          sync.Once
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
			Timeout:         timeout,
			ReadOnly:        opts.ReadOnly,
			NoFreelistSync:  true,
			FreelistType:    bolt.FreelistMapType,
			InitialMmapSize: mmapSize(opts.Path),
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
	s := &Store{db: db, path: opts.Path, readOnly: opts.ReadOnly, journalMax: opts.JournalChanges, logger: opts.Logger}
	if s.logger == nil {
		s.logger = slog.New(slog.DiscardHandler)
	}
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
	err = guard(opts.Path, "loading the table", func() error { return s.load(t) })
	if err != nil {
		db.Close()
		return nil, err
	}
	s.table = t
	if s.schema < 2 && !s.readOnly {
		if err := s.migrate(); err != nil {
			db.Close()
			return nil, err
		}
	}
	if s.schema < 3 && !s.readOnly {
		if err := s.migrate3(); err != nil {
			db.Close()
			return nil, err
		}
	}
	if s.schema < 4 && !s.readOnly {
		if err := s.migrate4(); err != nil {
			db.Close()
			return nil, err
		}
	}
	if !s.readOnly {
		idle := opts.FoldIdle
		if idle == 0 {
			idle = DefaultFoldIdle
		}
		s.foldKick, s.foldQuit, s.foldDone = make(chan struct{}, 1), make(chan struct{}), make(chan struct{})
		if idle > 0 {
			go s.folder(idle, s.foldKick, s.foldQuit, s.foldDone)
			if s.pending > 0 {
				s.kickFolder()
			}
		} else {
			close(s.foldDone)
		}
	}
	ring := opts.RingChanges
	if ring <= 0 {
		ring = DefaultRingChanges
	}
	s.log.init(t.Revision(), min(ring, s.journalMax))
	return s, nil
}

// mmapSize is the address space bbolt maps at open: twice the file, at
// least 1 GiB. Whenever a commit outgrows the mapping, bbolt remaps and
// first copies every key and value of the transaction's dirty pages from
// the old mapping to the heap (node.dereference); a million-tunnel import
// grew the mapping a dozen times and spent a third of its CPU copying.
// Reserving address space costs nothing until pages are touched.
func mmapSize(path string) int {
	size := 1 << 30
	if st, err := os.Stat(path); err == nil && 2*st.Size() > int64(size) {
		size = int(2 * st.Size())
	}
	return size
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
		s.schema = binary.BigEndian.Uint32(v)
		if s.schema > SchemaVersion {
			return fmt.Errorf("open store %s: schema version %d is newer than this director's %d; upgrade tunneldirector", s.path, s.schema, SchemaVersion)
		}
		buckets := [][]byte{bucketNodes, bucketTunnels, bucketJournal}
		if s.schema < 2 {
			buckets = append(buckets, bucketPeers, bucketSubnets)
		} else if d := m.Get(keyIndexDigest); len(d) != indexDigestLen {
			return damaged(s.path, "bucket meta: index digest is %d bytes, want %d", len(d), indexDigestLen)
		}
		// Without it a schema-3 store would take its records as
		// current and drop the journal entries they lack.
		if f := m.Get(keyFolded); s.schema >= 3 && len(f) != 8 {
			return damaged(s.path, "bucket meta: folded revision is %d bytes, want 8", len(f))
		}
		for _, b := range buckets {
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
			if err := m.Put(keyFolded, be64(0)); err != nil {
				return err
			}
			if err := m.Put(keyIndexDigest, (&indexDigest{}).encode()); err != nil {
				return err
			}
			for _, b := range [][]byte{bucketNodes, bucketTunnels, bucketJournal} {
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
		// The records hold the table as of folded; the journal holds
		// the rest (fold.go).
		folded := foldedRev(tx)
		if folded > rev {
			return damaged(s.path, "bucket meta: records folded up to revision %d, past the store's revision %d", folded, rev)
		}
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
		hint := 0
		if d, err := decodeIndexDigest(tx.Bucket(bucketMeta).Get(keyIndexDigest)); err == nil {
			hint = int(min(d.tunnels, 1<<26))
		} else {
			hint = tx.Bucket(bucketTunnels).Stats().KeyN
		}
		dec := s.decodeTunnels(tx)
		err = t.Load(folded, nodes, hint, dec.seq)
		dec.stop()
		if dec.err != nil {
			return dec.err
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
		if errs := s.checkIndexes(tx, t, dec.digest, 5); len(errs) > 0 {
			return fmt.Errorf("load store %s: indexes disagree with the tunnels (run 'tunneldirector store check'): %w", s.path, errors.Join(errs...))
		}
		s.pending, err = s.replayJournal(tx, t, folded, rev)
		return err
	})
}

// checkIndexes compares the index (the stored digest, or on a schema-1
// store the index buckets) with built, the digest of the tunnel records
// (of the table t loaded from them, before any journal replay), returning
// at most max problems.
func (s *Store) checkIndexes(tx *bolt.Tx, t *affinity.Table, built indexDigest, max int) []error {
	if s.schema >= 2 {
		stored, _ := decodeIndexDigest(tx.Bucket(bucketMeta).Get(keyIndexDigest))
		if stored == built {
			return nil
		}
		return []error{fmt.Errorf("the tunnels hold %d peer and subnet keys, the index digest committed with them says %d, and the digests differ: tunnel records were lost or changed outside a commit", built.n, stored.n)}
	}
	// Schema 1: a digest of the index buckets decides; only when they
	// disagree is each entry looked up to name the culprits.
	stored := indexDigest{tunnels: built.tunnels}
	_ = tx.Bucket(bucketPeers).ForEach(func(k, v []byte) error { stored.add(k, v); return nil })
	_ = tx.Bucket(bucketSubnets).ForEach(func(k, v []byte) error { stored.add(k, v); return nil })
	if stored == built {
		return nil
	}
	return findIndexProblems(tx, t, max)
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
	wantSubnets := t.SubnetLen()
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
	return s.commitLocked(true, func() (*affinity.Applied, error) {
		a, err := s.table.Apply(batch)
		// The table copied what it keeps: whatever the batch points to
		// (a file's records) can go before the commit writes its pages.
		batch = nil
		return a, err
	})
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
	return s.commitLocked(false, func() (*affinity.Applied, error) { return s.table.ApplyAt(rev, changes) })
}

// commitLocked applies and persists a batch. collect says the caller
// drops what the batch was made from once it is applied (a local plan, a
// file's records): a large one is collected before the transaction
// allocates its pages. A replica's batches come from a transfer its
// replicator still holds, so a collection there would find little and
// cost a second at a million.
func (s *Store) commitLocked(collect bool, apply func() (*affinity.Applied, error)) (*affinity.Applied, error) {
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
	if collect && len(applied.Changes) >= collectBefore {
		// What the batch was made from (a file's records) is garbage
		// now, and the transaction is about to allocate its pages:
		// collecting here costs one cycle and lowers the peak by the
		// records' size (a fifth of a million-tunnel import's).
		runtime.GC()
	}
	prev := applied.Previous()
	var enc []byte
	var deferred bool
	err = s.db.Update(func(tx *bolt.Tx) (err error) { enc, deferred, err = s.persist(tx, applied); return err })
	if err != nil {
		applied.Rollback()
		return nil, fmt.Errorf("commit revision %d to store %s: %w", applied.Revision, s.path, err)
	}
	s.log.add(Batch{Revision: applied.Revision, Prev: prev, Changes: applied.Changes, Encoded: enc, Resolved: true, unjournaled: enc == nil})
	if deferred {
		s.pending += len(applied.Changes)
		s.kickFolder()
		// A store that is never idle long enough still keeps its
		// journal near its bound (only folded entries are trimmed).
		// Committed either way: a failed fold leaves the records
		// pending and is reported by Check; the folder retries it.
		if s.pending > s.journalMax && s.foldErr == nil {
			_, _ = s.foldLocked()
		}
	} else {
		s.pending = 0
	}
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
		// The journal starts over: what it holds unfolded is written
		// first, this batch's records after it.
		if err := s.writeInPlace(tx, a.Changes, rev); err != nil {
			return err
		}
		meta := tx.Bucket(bucketMeta)
		if err := meta.Put(keyRevision, be64(rev)); err != nil {
			return err
		}
		if err := resetJournal(tx, prev); err != nil {
			return err
		}
		enc, err = s.journal(tx, rev, prev, a.Changes)
		return err
	})
	if err != nil {
		a.Rollback()
		return nil, fmt.Errorf("reset store %s to revision %d: %w", s.path, rev, err)
	}
	s.log.add(Batch{Revision: rev, Prev: prev, Changes: a.Changes, Encoded: enc, Resolved: true, unjournaled: enc == nil})
	s.pending = 0
	return a, nil
}

// persist writes one applied batch in the caller's transaction: its
// journal entry and the revision, and, for a batch it does not defer
// (deferred), its records and the index digest (fold.go). It returns the
// encoded batch (nil when the batch was too large to journal).
func (s *Store) persist(tx *bolt.Tx, a *affinity.Applied) (enc []byte, deferred bool, err error) {
	deferred = len(a.Changes) <= s.journalMax && len(a.Changes) <= deferMax(s.table.Len())
	if !deferred {
		if err := s.writeInPlace(tx, a.Changes, a.Revision); err != nil {
			return nil, false, err
		}
	}
	meta := tx.Bucket(bucketMeta)
	if err := meta.Put(keyRevision, be64(a.Revision)); err != nil {
		return nil, false, err
	}
	enc, err = s.journal(tx, a.Revision, a.Previous(), a.Changes)
	return enc, deferred, err
}

// deferMax is the largest batch whose records a commit to a table of n
// tunnels leaves to a fold: a node failure's moves on a farm of eight or
// more nodes, and anything up to a fold's chunk. A larger batch (an
// import) is written at once: folded later, it would hold the store as
// long, at a moment nobody chose (a takeover, the next failure).
func deferMax(n int) int { return max(foldChunk, n/8) }

// writeInPlace folds what is pending, then writes changes (resolved, at
// revision rev) in place: for a batch not left to a fold (deferMax), and
// a reset, after which the journal starts over.
func (s *Store) writeInPlace(tx *bolt.Tx, changes []affinity.Change, rev uint64) error {
	if _, err := s.foldTx(tx, 0); err != nil {
		return err
	}
	if err := writeRecords(tx, changes); err != nil {
		return err
	}
	return tx.Bucket(bucketMeta).Put(keyFolded, be64(rev))
}

// writeRecords writes the changed records and updates the index digest.
// Every tunnel change carries the record it replaces in Old (nil for
// none): the table's, or the fold's (fold.go).
//
// The digest is what idx_peers and idx_subnets were in schema 1: a second
// account of every peer and subnet key, kept by a different path (the
// changes' old and new records, not the tunnels bucket), so that Open and
// `store check` tell a store whose tunnels bucket lost or changed records
// (a damaged leaf page that still parses, a bug in this writer, a
// hand-edited file) from a sound one: the table's own invariants cannot
// see a tunnel that is simply gone. Where the buckets cost a key per peer
// and subnet in every commit (3.5 million keys for a million tunnels),
// the digest costs 24 bytes.
func writeRecords(tx *bolt.Tx, changes []affinity.Change) error {
	nodes := tx.Bucket(bucketNodes)
	tunnels := tx.Bucket(bucketTunnels)
	meta := tx.Bucket(bucketMeta)
	dig, err := decodeIndexDigest(meta.Get(keyIndexDigest))
	if err != nil {
		return fmt.Errorf("read index digest: %w", err)
	}
	var order []int32 // tunnel changes, to write in key order
	for i := range changes {
		c := &changes[i]
		var err error
		switch c.Kind {
		case affinity.PutNode:
			err = nodes.Put([]byte(c.Node.Name), affinity.MarshalNode(c.Node))
		case affinity.DeleteNode:
			err = nodes.Delete([]byte(c.Name))
		case affinity.PutTunnel, affinity.DeleteTunnel:
			// Every change moves the digest from its old record to
			// its new one; a tunnel changed twice in the batch
			// telescopes to its last record.
			if c.Old != nil {
				dig.tunnel(c.Old, -1)
			}
			if c.Tunnel != nil {
				dig.tunnel(c.Tunnel, +1)
			}
			order = append(order, int32(i))
		}
		if err != nil {
			return fmt.Errorf("write %s %s: %w", c.Kind, c.Key(), err)
		}
	}
	if slices.ContainsFunc(changes, func(c affinity.Change) bool { return c.Kind == affinity.PutBucket }) {
		// The record as of the changes' revision: the stored one with
		// the batch's bucket changes replayed onto it.
		var marks []uint16
		if v := meta.Get(keyBuckets); v != nil {
			if marks, err = affinity.UnmarshalBuckets(v); err != nil {
				return fmt.Errorf("read the unknown-peer buckets: %w", err)
			}
		}
		for i := range changes {
			if c := &changes[i]; c.Kind == affinity.PutBucket {
				marks = c.Bucket.ApplyTo(marks)
			}
		}
		if err := putBuckets(meta, marks); err != nil {
			return err
		}
	}
	// Puts go in key order: bbolt inserts into an in-memory node that it
	// splits only at commit, so keys in random order would make every
	// insert move the node's tail: quadratic for a large import. Only a
	// tunnel's last change in the batch is written (a put then a delete
	// ends deleted): the stable sort keeps a key's changes in batch order.
	// A file exported or generated in id order needs no sort.
	byKey := func(x, y int32) int { return strings.Compare(changes[x].Key(), changes[y].Key()) }
	if !slices.IsSortedFunc(order, byKey) {
		slices.SortStableFunc(order, byKey)
	}
	if len(order) >= bulkPuts {
		// Keys go in order, so pages split at the fill percent stay
		// that full: bbolt's default of half would double the pages a
		// bulk load writes (and holds in memory until the commit
		// writes them).
		tunnels.FillPercent = 1
	}
	// bbolt copies each key but keeps each value until the commit: keys
	// go through one buffer, values into large shared buffers (a million
	// small allocations were a tenth of a million-tunnel import's
	// garbage).
	var key []byte
	var vals valueArena
	for k, i := range order {
		c := &changes[i]
		if k+1 < len(order) && changes[order[k+1]].Key() == c.Key() {
			continue
		}
		if c.Kind == affinity.DeleteTunnel {
			key = append(key[:0], c.Name...)
			err = tunnels.Delete(key)
		} else {
			key = append(key[:0], c.Tunnel.ID...)
			err = tunnels.Put(key, vals.add(c.Tunnel))
		}
		if err != nil {
			return fmt.Errorf("write %s %s: %w", c.Kind, c.Key(), err)
		}
	}
	return meta.Put(keyIndexDigest, dig.encode())
}

// valueArena holds encoded tunnel records for the life of one bbolt
// transaction, in buffers that double from 4 KiB to 1 MiB: a one-tunnel
// commit allocates little, a million-tunnel one a hundred buffers.
type valueArena struct{ buf, scratch []byte }

// add encodes t and returns its record, valid until the transaction ends.
func (v *valueArena) add(t *affinity.Tunnel) []byte {
	// Encoded aside first, so that a record never outgrows its buffer
	// (which would move the buffer, records before included).
	v.scratch = affinity.AppendTunnel(v.scratch[:0], t)
	if cap(v.buf)-len(v.buf) < len(v.scratch) {
		v.buf = make([]byte, 0, max(len(v.scratch), min(max(2*cap(v.buf), 4096), 1<<20)))
	}
	n := len(v.buf)
	v.buf = append(v.buf, v.scratch...)
	return v.buf[n:len(v.buf):len(v.buf)]
}

// collectBefore is the batch size from which a commit collects garbage
// between applying and writing.
const collectBefore = 100_000

// bulkPuts is the number of tunnel records from which a commit fills its
// pages completely.
const bulkPuts = 4096

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

// CheckReport is the result of an integrity check.
type CheckReport struct {
	Path     string `json:"path"`
	Schema   uint32 `json:"schema"`
	Revision uint64 `json:"revision"`
	Nodes    int    `json:"nodes"`
	Tunnels  int    `json:"tunnels"`
	Subnets  int    `json:"subnets"`
	Journal  int    `json:"journal_entries"`
	Buckets  int    `json:"unknown_peer_buckets"`
	Oldest   uint64 `json:"journal_oldest"`
	// Pending counts the journaled changes whose records a fold has
	// still to write (fold.go), those of the revisions after Folded.
	Pending  int      `json:"pending_changes"`
	Folded   uint64   `json:"folded_revision"`
	Problems []string `json:"problems"`
}

// OK reports whether the check found nothing wrong.
func (r *CheckReport) OK() bool { return len(r.Problems) == 0 }

// Check verifies the bbolt pages (free lists, page references), the table's
// invariants (already checked at Open) and the indexes against the records.
func (s *Store) Check() (*CheckReport, error) {
	r := &CheckReport{Path: s.path, Revision: s.table.Revision(), Tunnels: s.table.Len(), Subnets: s.table.SubnetLen(),
		Nodes: len(s.table.Nodes()), Buckets: s.table.BucketCount()}
	err := s.db.View(func(tx *bolt.Tx) error {
		for e := range tx.Check() {
			r.Problems = append(r.Problems, "bbolt: "+e.Error())
		}
		r.Schema = binary.BigEndian.Uint32(tx.Bucket(bucketMeta).Get(keySchema))
		// The index digest accounts for the records written: the
		// table's when nothing is pending, else the records' own.
		// With records pending, the digest is checked against the
		// records as written; that they and the journal make the table
		// was proven by Open's replay.
		built := tableDigest(s.table)
		r.Folded = foldedRev(tx)
		if r.Folded != binary.BigEndian.Uint64(tx.Bucket(bucketMeta).Get(keyRevision)) {
			r.Pending = unfolded(tx, r.Folded)
			var err error
			if built, err = s.recordsDigest(tx); err != nil {
				r.Problems = append(r.Problems, err.Error())
			}
		}
		s.mu.Lock()
		if s.foldErr != nil {
			r.Problems = append(r.Problems, fmt.Sprintf("the last fold of the journal into the records failed (%d changes pending; the journal keeps them): %v", s.pending, s.foldErr))
		}
		s.mu.Unlock()
		for _, e := range s.checkIndexes(tx, s.table, built, 100) {
			r.Problems = append(r.Problems, e.Error())
		}
		c := tx.Bucket(bucketJournal).Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			if !isJournalChunk(k) {
				r.Journal++
			}
		}
		if k, _ := c.First(); k != nil {
			r.Oldest = binary.BigEndian.Uint64(k)
		}
		return nil
	})
	return r, err
}

// Close writes the records still pending (fold.go) and closes the file.
func (s *Store) Close() error {
	var err error
	s.closeOnce.Do(func() {
		if !s.readOnly {
			close(s.foldQuit)
			<-s.foldDone
			err = s.Fold()
		}
		err = errors.Join(err, s.db.Close())
	})
	return err
}

// Package etcdstore keeps the affinity table in etcd, for N active
// directors that share one table (store: etcd://...). It implements
// store.Backend, as the bbolt store does.
//
// Layout under the farm's key prefix P:
//
//	P schema              "tunneldirector-table/1": the prefix is ours
//	P head                the guard: its ModRevision is the table's revision
//	P log/<prev>          one entry per committed change, keyed by the
//	                      revision it was planned on (20 digits); its
//	                      ModRevision is the revision it made
//	P stage/<prev>-<id>/<n>  chunks of a change too large for one request
//	P snap                the newest snapshot: its revision and chunk id
//	P snapdata/<id>/<n>   the whole table at that revision, in chunks
//	P vips                the VIPs the directors run with
//	P leader/             the election of the director that makes the
//	                      automatic writes (learned pins)
//	P learn/<peer>        a director's request that the leader pin a peer
//
// A change is one etcd transaction guarded by the revision it was
// planned on (head's ModRevision must still be it) and by the schema
// marker: it writes head and log/<prev>. A change larger than one
// request (etcd's --max-request-bytes, 1.5 MiB by default, and
// --max-txn-ops, 128) is first written as chunks under stage/, which no
// reader looks at until the commit's log entry names them: the commit is
// still one small transaction. The table's revision is therefore etcd's
// revision of that transaction, and every director that replays the log
// ends at the same table with the same revision.
//
// Each director keeps the table in memory (loaded from the snapshot and
// the log after it), follows head with a watch, and applies each new
// entry; its change log (store.Log) feeds the reconciler as the bbolt
// store's does. A director that cannot reach etcd keeps its table (the
// kernel keeps forwarding), reports it (Health) and refuses writes.
package etcdstore

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/store"
)

// schemaMarker is the value of P+"schema": a prefix that holds keys but
// not this marker belongs to something else and is never written.
const schemaMarker = "tunneldirector-table/1"

const (
	keySchema   = "schema"
	keyHead     = "head"
	keySnap     = "snap"
	keyVIPs     = "vips"
	dirLog      = "log/"
	dirStage    = "stage/"
	dirSnapData = "snapdata/"
	dirLeader   = "leader/"
	dirLearn    = "learn/"
)

// Defaults of Options.
const (
	DefaultDialTimeout = 5 * time.Second
	// DefaultRequestTimeout bounds one request; a member cut off from
	// its quorum answers no linearizable read within it.
	DefaultRequestTimeout = 3 * time.Second
	// DefaultInlineBytes is the largest change written inline in its log
	// entry; larger ones are staged.
	DefaultInlineBytes = 256 << 10
	// DefaultChunkBytes is the size of a staged or snapshot chunk: one
	// request each, under etcd's default 1.5 MiB request limit.
	DefaultChunkBytes = 1 << 20
	// DefaultSnapshotChanges is how many logged changes make the leader
	// write a new snapshot (at least the table's size).
	DefaultSnapshotChanges = 50_000
	// maxConflicts bounds the retries of a change whose revision moved.
	maxConflicts = 20
)

// Options configures Open.
type Options struct {
	Location Location
	// TLS, when set, is used for every connection.
	TLS *tls.Config
	// Table configures the in-memory table.
	Table affinity.Options
	// Cache is a bbolt file kept equal to the table ("" for none).
	Cache string
	// Name is this director's name in the election.
	Name string
	// ElectionTTL is the election lease in seconds (0: 5).
	ElectionTTL int
	// DialTimeout, RequestTimeout: 0 for the defaults.
	DialTimeout, RequestTimeout time.Duration
	// InlineBytes, ChunkBytes, SnapshotChanges: 0 for the defaults.
	InlineBytes, ChunkBytes, SnapshotChanges int
	// RingChanges bounds the in-memory change log (0: the default).
	RingChanges int
	// NoElection opens the store without campaigning (the offline CLI).
	NoElection bool
	Logger     *slog.Logger
}

// Store is the table in etcd, as one director holds it.
type Store struct {
	o     Options
	pfx   string
	cli   *clientv3.Client
	log   *store.Log
	loc   local
	vipMu sync.Mutex

	mu sync.Mutex // serialises commits and the follower's applies

	healthMu sync.Mutex
	health   Health

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	kick   chan struct{}

	elect     electState
	sinceSnap int // changes logged since the snapshot, as last seen
	snapRev   uint64
}

// Health is the store's connection to etcd, for the status.
type Health struct {
	// Connected is true while the last request to etcd succeeded.
	Connected bool `json:"connected"`
	// Since is when Connected last changed.
	Since time.Time `json:"since"`
	// LastError is the error that cut the connection.
	LastError string `json:"last_error,omitempty"`
	// Leader is true while this director holds the election.
	Leader bool `json:"leader"`
	// LeaderName is the elected director as last seen.
	LeaderName string `json:"leader_name,omitempty"`
	// Stale is true when the table may be behind etcd's (not connected).
	Stale bool `json:"stale"`
	// FromCache is true when the table came from the local cache at
	// start and etcd has not been reached since.
	FromCache bool `json:"from_cache,omitempty"`
}

// Open connects to etcd, checks that the prefix holds a tunneldirector
// table (or nothing: it is then claimed), loads the table and starts
// following it. An unreachable cluster is an error naming each endpoint
// and what went wrong with it, unless a local cache exists: the store
// then opens from the cache, reports itself stale and keeps trying.
func Open(o Options) (*Store, error) {
	s, err := newStore(o)
	if err != nil {
		return nil, err
	}
	err = s.connect()
	if err != nil {
		if s.loc.cache == nil || s.loc.table().Revision() == 0 {
			s.Close()
			return nil, err
		}
		s.o.Logger.Error("etcd unreachable at start: forwarding from the local cache until it answers", "cache", s.o.Cache, "revision", s.loc.table().Revision(), "err", err)
		s.setHealth(func(h *Health) { h.FromCache = true; h.LastError = err.Error() })
	}
	s.start()
	return s, nil
}

func newStore(o Options) (*Store, error) {
	if len(o.Location.Endpoints) == 0 || o.Location.Prefix == "" {
		return nil, errors.New("open etcd store: no endpoints or prefix")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	o.DialTimeout = cmpOr(o.DialTimeout, DefaultDialTimeout)
	o.RequestTimeout = cmpOr(o.RequestTimeout, DefaultRequestTimeout)
	o.InlineBytes = cmpOr(o.InlineBytes, DefaultInlineBytes)
	o.ChunkBytes = cmpOr(o.ChunkBytes, DefaultChunkBytes)
	o.SnapshotChanges = cmpOr(o.SnapshotChanges, DefaultSnapshotChanges)
	o.ElectionTTL = cmpOr(o.ElectionTTL, 5)
	s := &Store{o: o, pfx: o.Location.Prefix, kick: make(chan struct{}, 1)}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	var err error
	if s.loc, err = openLocal(o); err != nil {
		return nil, err
	}
	s.log = store.NewLog(s.loc.table().Revision(), o.RingChanges)
	scheme := "http://"
	if o.TLS != nil {
		scheme = "https://"
	}
	var eps []string
	for _, e := range o.Location.Endpoints {
		eps = append(eps, scheme+e)
	}
	s.cli, err = clientv3.New(clientv3.Config{
		Endpoints:   eps,
		DialTimeout: o.DialTimeout,
		TLS:         o.TLS,
		Logger:      zap.NewNop(),
		// The largest answer is a page of snapshot chunks.
		MaxCallRecvMsgSize: 64 << 20,
		// Keepalives notice a dead member in seconds, not minutes.
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
	})
	if err != nil {
		s.loc.close()
		return nil, fmt.Errorf("etcd %s: %w", o.Location, err)
	}
	return s, nil
}

func cmpOr[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// connect checks the prefix and brings the table up to etcd's.
func (s *Store) connect() error {
	ctx, cancel := context.WithTimeout(s.ctx, s.o.DialTimeout+s.o.RequestTimeout)
	defer cancel()
	if err := s.claim(ctx); err != nil {
		if isUnreachable(err) {
			return s.unreachable(err)
		}
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.catchUpLocked(ctx); err != nil {
		if isUnreachable(err) {
			return s.unreachable(err)
		}
		return err
	}
	s.setHealth(func(h *Health) { h.Connected, h.Stale, h.FromCache, h.LastError = true, false, false, "" })
	return nil
}

// claim checks that the prefix holds a tunneldirector table, or claims an
// empty prefix for one. A prefix that holds anything else is refused and
// left alone.
func (s *Store) claim(ctx context.Context) error {
	resp, err := s.cli.Get(ctx, s.pfx+keySchema)
	if err != nil {
		return err
	}
	if len(resp.Kvs) == 1 {
		if v := string(resp.Kvs[0].Value); v != schemaMarker {
			return fmt.Errorf("etcd %s: key %s%s holds %q, not %q: this prefix belongs to something else; refusing to read or write it", s.o.Location, s.pfx, keySchema, short(v), schemaMarker)
		}
		return nil
	}
	// An empty prefix is claimed in one transaction that succeeds only
	// while the prefix is still empty.
	txn, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(s.pfx), "=", 0).WithPrefix()).
		Then(clientv3.OpPut(s.pfx+keySchema, schemaMarker)).
		Else(clientv3.OpGet(s.pfx, clientv3.WithPrefix(), clientv3.WithLimit(3), clientv3.WithKeysOnly(), clientv3.WithCountOnly())).
		Commit()
	if err != nil {
		return err
	}
	if !txn.Succeeded {
		// Someone else claimed it meanwhile, or it holds foreign keys.
		again, err := s.cli.Get(ctx, s.pfx+keySchema)
		if err != nil {
			return err
		}
		if len(again.Kvs) == 1 && string(again.Kvs[0].Value) == schemaMarker {
			return nil
		}
		n := txn.Responses[0].GetResponseRange().Count
		first, _ := s.cli.Get(ctx, s.pfx, clientv3.WithPrefix(), clientv3.WithLimit(1), clientv3.WithKeysOnly())
		name := ""
		if first != nil && len(first.Kvs) > 0 {
			name = string(first.Kvs[0].Key)
		}
		return fmt.Errorf("etcd %s: the prefix %s holds %d keys (first: %s) but no tunneldirector schema key: it belongs to something else; refusing to read or write it (choose another prefix)", s.o.Location, s.pfx, n, short(name))
	}
	return nil
}

// isUnreachable reports errors of the connection rather than refusals.
func isUnreachable(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) ||
		strings.Contains(err.Error(), "connection") || strings.Contains(err.Error(), "Unavailable") ||
		strings.Contains(err.Error(), "no leader") || strings.Contains(err.Error(), "deadline")
}

// unreachable words an unreachable cluster: each endpoint with what a
// plain dial (and TLS handshake) to it says, so a refused port, a wrong
// address and a certificate problem are told apart.
func (s *Store) unreachable(err error) error {
	var why []string
	for _, ep := range s.o.Location.Endpoints {
		why = append(why, ep+": "+s.probe(ep))
	}
	return fmt.Errorf("etcd %s unreachable (%v): %s", s.o.Location, err, strings.Join(why, "; "))
}

// probe dials one endpoint as the client would and says what happened.
func (s *Store) probe(ep string) string {
	d := net.Dialer{Timeout: 2 * time.Second}
	conn, err := d.DialContext(s.ctx, "tcp", ep)
	if err != nil {
		return err.Error()
	}
	defer conn.Close()
	if s.o.TLS == nil {
		return "accepts connections, but gave no answer (a member without quorum, or not etcd)"
	}
	host, _, _ := net.SplitHostPort(ep)
	cfg := s.o.TLS.Clone()
	if cfg.ServerName == "" {
		cfg.ServerName = host
	}
	c := tls.Client(conn, cfg)
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if err := c.Handshake(); err != nil {
		return "TLS: " + err.Error()
	}
	// A server that wants a client certificate may refuse ours only
	// after the handshake: read to see it.
	_, err = c.Read(make([]byte, 1))
	var ne net.Error
	if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
		return "TLS: " + err.Error()
	}
	return "TLS handshake fine, but gave no answer (a member without quorum?)"
}

// ---- reading the table ----

func logKey(pfx string, prev uint64) string { return fmt.Sprintf("%s%s%020d", pfx, dirLog, prev) }

// rangeAll reads every key in [from, end) at revision rev, page by page.
func (s *Store) rangeAll(ctx context.Context, from, end string, rev int64, page int64, fn func(key string, val []byte, modRev int64) error) error {
	for {
		resp, err := s.cli.Get(ctx, from, clientv3.WithRange(end), clientv3.WithRev(rev), clientv3.WithLimit(page), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		if err != nil {
			return err
		}
		for _, kv := range resp.Kvs {
			if err := fn(string(kv.Key), kv.Value, kv.ModRevision); err != nil {
				return err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// chunks reads the chunks under dir (stage/<id>/ or snapdata/<id>/) and
// decodes each into changes, in order.
func (s *Store) chunks(ctx context.Context, dir string, want int, rev int64, fn func([]affinity.Change) error) error {
	n := 0
	err := s.rangeAll(ctx, dir, dir+"\xff", rev, 8, func(key string, val []byte, _ int64) error {
		if key != fmt.Sprintf("%s%06d", dir, n) {
			return fmt.Errorf("chunk %s out of order (want %s%06d)", key, dir, n)
		}
		n++
		cs, err := affinity.UnmarshalChanges(val)
		if err != nil {
			return fmt.Errorf("chunk %s: %w", key, err)
		}
		return fn(cs)
	})
	if err == nil && n != want {
		err = fmt.Errorf("%s holds %d chunks, the entry names %d", dir, n, want)
	}
	return err
}

// entryChanges returns a log entry's changes.
func (s *Store) entryChanges(ctx context.Context, e entry, rev int64) ([]affinity.Change, error) {
	if e.Stage == "" {
		return affinity.UnmarshalChanges(e.Inline)
	}
	var out []affinity.Change
	err := s.chunks(ctx, s.pfx+dirStage+e.Stage+"/", e.Chunks, rev, func(cs []affinity.Change) error {
		out = append(out, cs...)
		return nil
	})
	return out, err
}

// errBehind means the log no longer reaches the table's revision: the
// table is reloaded from the snapshot.
var errBehind = errors.New("the log no longer reaches this table's revision")

// catchUpLocked applies every entry committed after the table's revision,
// or reloads the table when the log no longer reaches it.
func (s *Store) catchUpLocked(ctx context.Context) error {
	head, err := s.cli.Get(ctx, s.pfx+keyHead)
	if err != nil {
		return err
	}
	rev := head.Header.Revision
	want := uint64(0)
	if len(head.Kvs) == 1 {
		want = uint64(head.Kvs[0].ModRevision)
	}
	t := s.loc.table()
	if t.Revision() == want {
		return nil
	}
	err = s.followLocked(ctx, t.Revision(), want, rev)
	if errors.Is(err, errBehind) {
		s.o.Logger.Warn("the etcd log no longer reaches this director's table: reloading it from the snapshot", "table_revision", t.Revision(), "etcd_revision", want)
		return s.reloadLocked(ctx, rev)
	}
	return err
}

// followLocked applies the log entries from revision from up to to, read
// at etcd revision rev.
func (s *Store) followLocked(ctx context.Context, from, to uint64, rev int64) error {
	type logged struct {
		e   entry
		rev uint64
	}
	next := map[uint64]logged{}
	err := s.rangeAll(ctx, logKey(s.pfx, from), s.pfx+dirLog+"\xff", rev, 1000, func(key string, val []byte, mod int64) error {
		e, err := unmarshalEntry(val)
		if err != nil {
			return fmt.Errorf("etcd key %s: %w", key, err)
		}
		next[e.Prev] = logged{e, uint64(mod)}
		return nil
	})
	if err != nil {
		return err
	}
	at := from
	for at != to {
		l, ok := next[at]
		if !ok {
			return fmt.Errorf("%w (at %d, etcd at %d)", errBehind, at, to)
		}
		cs, err := s.entryChanges(ctx, l.e, rev)
		if err != nil {
			return fmt.Errorf("etcd log entry %d: %w", l.rev, err)
		}
		if _, err := s.applyLocked(l.rev, at, cs); err != nil {
			return err
		}
		at = l.rev
	}
	return nil
}

// applyLocked applies one committed entry's changes at its revision. The
// tunnels carry the revision the entry made (the writer stamped them
// before it knew it).
func (s *Store) applyLocked(rev, prev uint64, cs []affinity.Change) (*affinity.Applied, error) {
	for i := range cs {
		if cs[i].Kind == affinity.PutTunnel {
			tu := *cs[i].Tunnel
			tu.Revision = rev
			cs[i].Tunnel = &tu
		}
	}
	a, err := s.loc.apply(rev, cs)
	if err != nil {
		return nil, fmt.Errorf("apply etcd log entry %d (after %d): %w", rev, prev, err)
	}
	s.log.Add(store.Batch{Revision: rev, Prev: prev, Changes: a.Changes, Resolved: true})
	s.sinceSnap += len(cs)
	return a, nil
}

// loadSnapshot reads the whole table as of etcd revision rev: the
// snapshot, then the log after it.
func (s *Store) loadSnapshot(ctx context.Context, rev int64) (*affinity.Table, snapPtr, error) {
	var p snapPtr
	resp, err := s.cli.Get(ctx, s.pfx+keySnap, clientv3.WithRev(rev))
	if err != nil {
		return nil, p, err
	}
	if len(resp.Kvs) == 1 {
		if p, err = unmarshalSnap(resp.Kvs[0].Value); err != nil {
			return nil, p, fmt.Errorf("etcd key %s%s: %w", s.pfx, keySnap, err)
		}
	}
	var nodes []affinity.Node
	var tunnels []*affinity.Tunnel
	if p.Chunks > 0 {
		err = s.chunks(ctx, s.pfx+dirSnapData+p.ID+"/", p.Chunks, rev, func(cs []affinity.Change) error {
			for i := range cs {
				switch c := &cs[i]; c.Kind {
				case affinity.PutNode:
					nodes = append(nodes, *c.Node)
				case affinity.PutTunnel:
					tunnels = append(tunnels, c.Tunnel)
				default:
					return fmt.Errorf("snapshot holds a %s", c.Kind)
				}
			}
			return nil
		})
		if err != nil {
			return nil, p, fmt.Errorf("etcd snapshot %d: %w", p.Rev, err)
		}
	}
	opts := s.o.Table
	opts.VIPs = s.loc.table().VIPs()
	t, err := affinity.New(opts)
	if err != nil {
		return nil, p, err
	}
	if err := t.Load(p.Rev, nodes, len(tunnels), slices.Values(tunnels)); err != nil {
		return nil, p, fmt.Errorf("etcd snapshot %d breaks an invariant: %w", p.Rev, err)
	}
	return t, p, nil
}

// reloadLocked makes the table equal to etcd's, as one batch: a director
// back after the log moved past it, or one that started from its cache.
func (s *Store) reloadLocked(ctx context.Context, rev int64) error {
	t, p, err := s.loadSnapshot(ctx, rev)
	if err != nil {
		return err
	}
	head, err := s.cli.Get(ctx, s.pfx+keyHead, clientv3.WithRev(rev))
	if err != nil {
		return err
	}
	want := p.Rev
	if len(head.Kvs) == 1 {
		want = uint64(head.Kvs[0].ModRevision)
	}
	// Replay the log after the snapshot into the fresh table.
	fresh := &Store{o: s.o, pfx: s.pfx, cli: s.cli, loc: local{mem: t}, log: store.NewLog(t.Revision(), 1)}
	if err := fresh.followLocked(ctx, t.Revision(), want, rev); err != nil {
		return fmt.Errorf("reload from etcd: %w", err)
	}
	snap := t.Snapshot()
	cur := s.loc.table()
	prev := cur.Revision()
	a, err := s.loc.reset(snap.Revision, cur.DiffTo(&snap, nil))
	if err != nil {
		return fmt.Errorf("reload from etcd: %w", err)
	}
	s.log.Add(store.Batch{Revision: snap.Revision, Prev: prev, Changes: a.Changes, Resolved: true})
	s.snapRev, s.sinceSnap = p.Rev, fresh.sinceSnap
	return nil
}

// ---- the store.Backend methods ----

// Table returns the table as this director holds it.
func (s *Store) Table() *affinity.Table { return s.loc.table() }

// Revision is the table's revision: the etcd revision of its last change.
func (s *Store) Revision() uint64 { return s.loc.table().Revision() }

// Changes returns a cursor over the changes this director applied after
// revision since (see store.ChangeLog).
func (s *Store) Changes(since uint64) (store.Cursor, error) { return s.log.Changes(since) }

// Location names the store.
func (s *Store) Location() Location { return s.o.Location }

// Health reports the connection to etcd and the election.
func (s *Store) Health() Health {
	s.healthMu.Lock()
	defer s.healthMu.Unlock()
	h := s.health
	h.Stale = !h.Connected
	h.Leader, h.LeaderName = s.elect.get()
	h.Leader = h.Leader && h.Connected
	return h
}

func (s *Store) setHealth(fn func(*Health)) {
	s.healthMu.Lock()
	defer s.healthMu.Unlock()
	was := s.health.Connected
	fn(&s.health)
	if was != s.health.Connected || s.health.Since.IsZero() {
		s.health.Since = time.Now()
	}
}

// Writable says whether this director may write now.
func (s *Store) Writable() error {
	if h := s.Health(); !h.Connected {
		return fmt.Errorf("%w (since %s: %s)", errOffline, h.Since.Format(time.RFC3339), h.LastError)
	}
	return nil
}

// Do plans against the table and commits the batch as one etcd
// transaction guarded by the revision it was planned on; when another
// director committed first, the table catches up and plan runs again.
func (s *Store) Do(plan func(*affinity.Table) ([]affinity.Change, error)) (*affinity.Applied, error) {
	if err := s.Writable(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// Plan on etcd's newest table, not on what the watch delivered so
	// far: a change made on another director a moment ago is seen.
	ctx, cancel := context.WithTimeout(s.ctx, s.o.RequestTimeout)
	err := s.catchUpLocked(ctx)
	cancel()
	if err != nil {
		return nil, s.failed(err)
	}
	t := s.loc.table()
	for attempt := 1; ; attempt++ {
		batch, err := plan(t)
		if err != nil {
			return nil, err
		}
		// The batch is applied at once (readers may see it while it
		// commits, as with bbolt) and rolled back if etcd refuses it.
		a, err := t.Apply(batch)
		if err != nil {
			return nil, err
		}
		if len(a.Changes) == 0 {
			return a, nil
		}
		prev := a.Previous()
		ctx, cancel := context.WithTimeout(s.ctx, s.o.RequestTimeout+time.Duration(len(a.Changes)/1000)*time.Millisecond*10)
		rev, err := s.commit(ctx, prev, a.Changes)
		if err != nil {
			a.Rollback()
		}
		if errors.Is(err, errConflict) && attempt < maxConflicts {
			err = s.catchUpLocked(ctx)
			cancel()
			if err != nil {
				return nil, s.failed(err)
			}
			continue
		}
		cancel()
		if err != nil {
			return nil, s.failed(err)
		}
		a.Restamp(rev)
		if err := s.loc.persist(a); err != nil {
			// etcd holds the change; the cache is behind and is
			// reloaded at the next start.
			s.o.Logger.Error("write the local cache", "revision", rev, "err", err)
		}
		s.log.Add(store.Batch{Revision: rev, Prev: prev, Changes: a.Changes, Resolved: true})
		s.sinceSnap += len(a.Changes)
		applied := a
		s.maybeSnapshot()
		return applied, nil
	}
}

// failed words a failed commit and marks the store disconnected when the
// failure was the connection's.
func (s *Store) failed(err error) error {
	if isUnreachable(err) {
		s.setHealth(func(h *Health) { h.Connected, h.LastError = false, err.Error() })
		return fmt.Errorf("commit to etcd %s: %w (%v)", s.o.Location, errOffline, err)
	}
	return fmt.Errorf("commit to etcd %s: %w", s.o.Location, err)
}

var errConflict = errors.New("another director committed first")

// commit writes one change: staged chunks first when it is large, then
// head and its log entry in one transaction guarded by prev.
func (s *Store) commit(ctx context.Context, prev uint64, cs []affinity.Change) (uint64, error) {
	e := entry{Prev: prev}
	enc := affinity.MarshalChanges(cs)
	if len(enc) <= s.o.InlineBytes {
		e.Inline = enc
	} else {
		enc = nil
		id := fmt.Sprintf("%020d-%s", prev, randomID())
		n, err := s.writeChunks(ctx, s.pfx+dirStage+id+"/", cs)
		if err != nil {
			return 0, fmt.Errorf("stage change after revision %d: %w", prev, err)
		}
		e.Stage, e.Chunks = id, n
	}
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(s.pfx+keyHead), "=", int64(prev)),
			clientv3.Compare(clientv3.Value(s.pfx+keySchema), "=", schemaMarker)).
		Then(clientv3.OpPut(s.pfx+keyHead, strconv.FormatUint(prev, 10)),
			clientv3.OpPut(logKey(s.pfx, prev), string(e.marshal()))).
		Commit()
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		if e.Stage != "" {
			_, _ = s.cli.Delete(ctx, s.pfx+dirStage+e.Stage+"/", clientv3.WithPrefix())
		}
		if err := s.ours(ctx); err != nil {
			return 0, err
		}
		return 0, errConflict
	}
	return uint64(resp.Header.Revision), nil
}

// ours checks the schema marker is still there: a prefix taken over by
// something else is never written.
func (s *Store) ours(ctx context.Context) error {
	r, err := s.cli.Get(ctx, s.pfx+keySchema)
	if err != nil {
		return err
	}
	if len(r.Kvs) != 1 || string(r.Kvs[0].Value) != schemaMarker {
		return fmt.Errorf("etcd %s: the schema key %s%s is gone or changed: refusing to write", s.o.Location, s.pfx, keySchema)
	}
	return nil
}

// writeChunks writes changes as chunks dir/000000, dir/000001, ... of at
// most ChunkBytes each, one request per chunk.
func (s *Store) writeChunks(ctx context.Context, dir string, cs []affinity.Change) (int, error) {
	n, step := 0, 4096
	for i := 0; i < len(cs); {
		j := min(i+step, len(cs))
		b := affinity.MarshalChanges(cs[i:j])
		for len(b) > s.o.ChunkBytes && j-i > 1 {
			step = max(1, (j-i)/2)
			j = i + step
			b = affinity.MarshalChanges(cs[i:j])
		}
		if _, err := s.cli.Put(ctx, fmt.Sprintf("%s%06d", dir, n), string(b)); err != nil {
			return 0, err
		}
		if len(b) < s.o.ChunkBytes/2 && step < 1<<16 {
			step *= 2
		}
		n++
		i = j
	}
	return n, nil
}

func randomID() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Try reports whether the planned batch would commit on the table as this
// director holds it, changing nothing.
func (s *Store) Try(plan func(*affinity.Table) ([]affinity.Change, error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.loc.table()
	batch, err := plan(t)
	if err != nil {
		return err
	}
	return t.Check(batch)
}

// SetVIPs sets the table's VIPs and stores them under P+"vips" (every
// director of a farm runs with the same VIPs; the last start wins).
func (s *Store) SetVIPs(vips []netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.loc.table().SetVIPs(vips); err != nil {
		return err
	}
	var b strings.Builder
	for _, v := range vips {
		b.WriteString(v.String())
		b.WriteByte('\n')
	}
	if !s.Health().Connected {
		return nil
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.o.RequestTimeout)
	defer cancel()
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.Value(s.pfx+keySchema), "=", schemaMarker)).
		Then(clientv3.OpPut(s.pfx+keyVIPs, b.String())).Commit()
	if err == nil && !resp.Succeeded {
		err = s.ours(ctx)
	}
	if err != nil {
		return fmt.Errorf("store VIPs in etcd %s: %w", s.o.Location, err)
	}
	return nil
}

// Check compares this director's table with etcd's, read afresh.
func (s *Store) Check() (*store.CheckReport, error) {
	ctx, cancel := context.WithTimeout(s.ctx, 10*s.o.RequestTimeout)
	defer cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.loc.table()
	r := &store.CheckReport{Path: s.o.Location.String(), Schema: 1, Revision: cur.Revision(), Tunnels: cur.Len(),
		Subnets: cur.SubnetLen(), Nodes: len(cur.Nodes())}
	head, err := s.cli.Get(ctx, s.pfx+keyHead)
	if err != nil {
		return nil, fmt.Errorf("check etcd %s: %w", s.o.Location, err)
	}
	rev := head.Header.Revision
	fresh, p, err := s.loadSnapshot(ctx, rev)
	if err != nil {
		r.Problems = append(r.Problems, err.Error())
		return r, nil
	}
	r.Oldest = p.Rev
	at := cur.Revision()
	f := &Store{o: s.o, pfx: s.pfx, cli: s.cli, loc: local{mem: fresh}, log: store.NewLog(fresh.Revision(), 1)}
	if err := f.followLocked(ctx, fresh.Revision(), at, rev); err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("replaying the etcd log to revision %d: %v", at, err))
		return r, nil
	}
	r.Journal = f.sinceSnap
	snap := fresh.Snapshot()
	if d := cur.DiffTo(&snap, nil); len(d) > 0 {
		r.Problems = append(r.Problems, fmt.Sprintf("this director's table differs from etcd's at revision %d in %d changes (first: %s %s)", at, len(d), d[0].Kind, d[0].Key()))
	}
	return r, nil
}

// Backup writes the table to a bbolt store file (a pair or a single
// director can run on it; etcdctl snapshot save backs up the cluster).
func (s *Store) Backup(path string, opts store.BackupOptions) (int64, error) {
	return backupTable(s.loc.table(), path, opts)
}

// Close stops following etcd and closes the client and the cache.
func (s *Store) Close() error {
	s.cancel()
	s.wg.Wait() // the campaign resigns on its way out
	err := s.cli.Close()
	if e := s.loc.close(); err == nil {
		err = e
	}
	return err
}

// ---- following ----

func (s *Store) start() {
	s.wg.Add(2)
	go s.follow()
	go s.campaign()
}

// follow watches head and applies each new log entry; a ticker checks
// the connection (a linearizable read needs the member's quorum) so a
// partitioned director knows within seconds.
func (s *Store) follow() {
	defer s.wg.Done()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var watch clientv3.WatchChan
	var stop []context.CancelFunc // the watches made, each ended on return
	defer func() {
		for _, c := range stop {
			c()
		}
	}()
	for {
		if watch == nil {
			for _, c := range stop {
				c()
			}
			wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(s.ctx))
			stop = []context.CancelFunc{wcancel}
			watch = s.cli.Watch(wctx, s.pfx+keyHead)
		}
		select {
		case <-s.ctx.Done():
			return
		case resp, ok := <-watch:
			if !ok || resp.Err() != nil {
				watch = nil
				if ok {
					s.o.Logger.Debug("etcd watch ended", "err", resp.Err())
				}
			}
		case <-tick.C:
		case <-s.kick:
		}
		s.sync()
	}
}

// sync catches up with etcd once and records the connection's health.
func (s *Store) sync() {
	// The lock first: a commit in progress (a large import) must not
	// eat the timeout and pass for a lost connection.
	s.mu.Lock()
	defer s.mu.Unlock()
	ctx, cancel := context.WithTimeout(s.ctx, s.o.RequestTimeout)
	defer cancel()
	h := s.Health()
	var err error
	if h.FromCache || !h.Connected {
		// Back after a start from the cache, or after a partition:
		// check the prefix is still ours before following it.
		err = s.claim(ctx)
	}
	if err == nil {
		err = s.catchUpLocked(ctx)
	}
	if s.ctx.Err() != nil {
		return
	}
	if err != nil {
		if h.Connected {
			s.o.Logger.Error("lost etcd: forwarding from the last table, no writes until it is back", "revision", s.Revision(), "err", err)
		}
		s.setHealth(func(h *Health) { h.Connected, h.LastError = false, err.Error() })
		return
	}
	if !h.Connected {
		s.o.Logger.Info("etcd reached: following the shared table", "revision", s.Revision())
	}
	s.setHealth(func(h *Health) { h.Connected, h.FromCache, h.LastError = true, false, "" })
}

// ---- snapshots ----

// maybeSnapshot writes a snapshot, in the background, when the log since
// the last one holds more changes than the table: a new director's load
// and a lagging one's reload then read at most about twice the table.
// Only the elected director writes snapshots.
func (s *Store) maybeSnapshot() {
	if l, _ := s.elect.get(); !l {
		return
	}
	if s.sinceSnap < max(s.o.SnapshotChanges, s.loc.table().Len()) || !s.elect.startSnapshot() {
		return
	}
	snap := s.loc.table().Snapshot()
	s.sinceSnap = 0
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer s.elect.endSnapshot()
		if err := s.writeSnapshot(&snap); err != nil && s.ctx.Err() == nil {
			s.o.Logger.Warn("write etcd snapshot", "revision", snap.Revision, "err", err)
		}
	}()
}

// writeSnapshot writes the table at snap.Revision as chunks, points snap
// at it (guarded: the pointer must not have moved), then trims what no
// reader needs: the log before the previous snapshot, its stages, and
// older snapshot chunks.
func (s *Store) writeSnapshot(snap *affinity.Snapshot) error {
	ctx, cancel := context.WithTimeout(s.ctx, time.Minute+time.Duration(len(snap.Tunnels))*20*time.Microsecond)
	defer cancel()
	cur, err := s.cli.Get(ctx, s.pfx+keySnap)
	if err != nil {
		return err
	}
	var old snapPtr
	var oldMod int64
	if len(cur.Kvs) == 1 {
		if old, err = unmarshalSnap(cur.Kvs[0].Value); err != nil {
			return err
		}
		oldMod = cur.Kvs[0].ModRevision
	}
	if old.Rev >= snap.Revision {
		return nil
	}
	cs := make([]affinity.Change, 0, len(snap.Nodes)+len(snap.Tunnels))
	for i := range snap.Nodes {
		cs = append(cs, affinity.Change{Kind: affinity.PutNode, Node: &snap.Nodes[i]})
	}
	for i := range snap.Tunnels {
		cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &snap.Tunnels[i]})
	}
	id := fmt.Sprintf("%020d-%s", snap.Revision, randomID())
	n, err := s.writeChunks(ctx, s.pfx+dirSnapData+id+"/", cs)
	if err != nil {
		return err
	}
	p := snapPtr{Rev: snap.Revision, ID: id, Chunks: n}
	ops := []clientv3.Op{clientv3.OpPut(s.pfx+keySnap, string(p.marshal()))}
	// Readers that loaded the old snapshot replay the log from it: keep
	// that part, drop what came before.
	if old.Rev > 0 {
		ops = append(ops,
			clientv3.OpDelete(s.pfx+dirLog, clientv3.WithRange(logKey(s.pfx, old.Rev))),
			clientv3.OpDelete(s.pfx+dirStage, clientv3.WithRange(fmt.Sprintf("%s%s%020d", s.pfx, dirStage, old.Rev))))
	}
	if old.ID != "" {
		ops = append(ops, clientv3.OpDelete(s.pfx+dirSnapData+old.ID+"/", clientv3.WithPrefix()))
	}
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(s.pfx+keySnap), "=", oldMod),
			clientv3.Compare(clientv3.Value(s.pfx+keySchema), "=", schemaMarker)).
		Then(ops...).Commit()
	if err == nil && !resp.Succeeded {
		err = errors.New("another snapshot was written meanwhile")
	}
	if err != nil {
		_, _ = s.cli.Delete(ctx, s.pfx+dirSnapData+id+"/", clientv3.WithPrefix())
		return err
	}
	s.mu.Lock()
	s.snapRev = p.Rev
	s.mu.Unlock()
	s.o.Logger.Info("etcd snapshot written", "revision", p.Rev, "chunks", n, "tunnels", len(snap.Tunnels))
	return nil
}

// SnapshotNow writes a snapshot of the table at once (tests, and the
// measurement of etcd's space per tunnel).
func (s *Store) SnapshotNow() error {
	snap := s.loc.table().Snapshot()
	return s.writeSnapshot(&snap)
}

// keysUnder lists the keys under the prefix (tests).
func (s *Store) keysUnder(ctx context.Context, dir string) ([]string, error) {
	resp, err := s.cli.Get(ctx, s.pfx+dir, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, err
	}
	var out []string
	for _, kv := range resp.Kvs {
		out = append(out, string(bytes.TrimPrefix(kv.Key, []byte(s.pfx))))
	}
	return out, nil
}

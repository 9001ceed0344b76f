package etcdstore

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// The elected director makes the writes no operator asked for (learned
// pins, snapshots), so N directors do not race for them: an etcd
// election under P+"leader/" on a lease of ElectionTTL seconds. A leader
// that dies or loses etcd loses the lease; another takes over.
type electState struct {
	mu           sync.Mutex
	leader       bool
	name         string
	snapshotting bool
	// session is the campaign's lease (learn requests live on it). The
	// election itself stays with the campaign goroutine:
	// concurrency.Election is not safe for concurrent use.
	session *concurrency.Session
	onLearn func(peer netip.Addr, mark uint16) error
}

func (e *electState) get() (bool, string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.leader, e.name
}

func (e *electState) set(leader bool, name string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.leader = leader
	if name != "" {
		e.name = name
	}
}

func (e *electState) startSnapshot() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.snapshotting {
		return false
	}
	e.snapshotting = true
	return true
}

func (e *electState) endSnapshot() {
	e.mu.Lock()
	e.snapshotting = false
	e.mu.Unlock()
}

// name is this director's name in the election.
func (s *Store) name() string {
	if s.o.Name != "" {
		return s.o.Name
	}
	h, _ := os.Hostname()
	return fmt.Sprintf("%s/%d", h, os.Getpid())
}

// IsLeader reports whether this director is the elected one (and still
// reaches etcd).
func (s *Store) IsLeader() bool {
	l, _ := s.elect.get()
	return l && s.Health().Connected
}

// OnLearnRequest sets what the elected director does with a request to
// pin a peer (another director saw its first packet).
func (s *Store) OnLearnRequest(fn func(peer netip.Addr, mark uint16) error) {
	s.elect.mu.Lock()
	s.elect.onLearn = fn
	s.elect.mu.Unlock()
}

// RequestLearn asks the elected director to pin peer on the node of mark.
// The request lives on this director's election lease: it vanishes with
// the director.
func (s *Store) RequestLearn(peer netip.Addr, mark uint16) error {
	if err := s.Writable(); err != nil {
		return err
	}
	s.elect.mu.Lock()
	sess := s.elect.session
	s.elect.mu.Unlock()
	opts := []clientv3.OpOption{}
	if sess != nil {
		opts = append(opts, clientv3.WithLease(sess.Lease()))
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.o.RequestTimeout)
	defer cancel()
	key := s.pfx + dirLearn + peer.String()
	_, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0),
			clientv3.Compare(clientv3.Value(s.pfx+keySchema), "=", schemaMarker)).
		Then(clientv3.OpPut(key, strconv.Itoa(int(mark)), opts...)).Commit()
	if err != nil {
		return fmt.Errorf("ask the elected director to pin %s: %w", peer, err)
	}
	return nil
}

// campaign runs the election for as long as the store is open: a new
// session whenever the last one ended (a lost lease, a partition).
func (s *Store) campaign() {
	defer s.wg.Done()
	if s.o.NoElection {
		return
	}
	for s.ctx.Err() == nil {
		if err := s.campaignOnce(); err != nil && s.ctx.Err() == nil {
			s.o.Logger.Debug("election", "err", err)
			select {
			case <-s.ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

func (s *Store) campaignOnce() error {
	sess, err := concurrency.NewSession(s.cli, concurrency.WithTTL(s.o.ElectionTTL), concurrency.WithContext(s.ctx))
	if err != nil {
		return err
	}
	defer func() {
		s.elect.mu.Lock()
		s.elect.session, s.elect.leader = nil, false
		s.elect.mu.Unlock()
		if s.ctx.Err() != nil {
			// A clean stop gives the election up at once (the lease's
			// keys, the leader key among them, go with it), so another
			// director takes over without waiting for the TTL. The
			// session's own Close revokes on the store's context, which
			// is already done.
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_, _ = s.cli.Revoke(ctx, sess.Lease())
			cancel()
		}
		sess.Close()
	}()
	el := concurrency.NewElection(sess, s.pfx+dirLeader)
	s.elect.mu.Lock()
	s.elect.session = sess
	s.elect.mu.Unlock()
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	go func() {
		for r := range el.Observe(ctx) {
			if len(r.Kvs) > 0 {
				s.elect.set(s.IsLeaderRaw(), string(r.Kvs[0].Value))
			}
		}
	}()
	go func() {
		select {
		case <-sess.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	me := s.name()
	if err := el.Campaign(ctx, me); err != nil {
		return err
	}
	s.elect.set(true, me)
	s.o.Logger.Info("elected: this director makes the automatic writes", "name", me)
	s.serveLearn(ctx)
	s.elect.set(false, "")
	if s.ctx.Err() == nil {
		s.o.Logger.Warn("no longer the elected director", "name", me)
	}
	return nil
}

// IsLeaderRaw is the election flag alone.
func (s *Store) IsLeaderRaw() bool { l, _ := s.elect.get(); return l }

// serveLearn handles learn requests while this director leads.
func (s *Store) serveLearn(ctx context.Context) {
	dir := s.pfx + dirLearn
	handle := func(key string, val []byte) {
		peer, err := netip.ParseAddr(strings.TrimPrefix(key, dir))
		mark, err2 := strconv.Atoi(string(val))
		s.elect.mu.Lock()
		fn := s.elect.onLearn
		s.elect.mu.Unlock()
		if err == nil && err2 == nil && mark > 0 && mark < 1<<16 && fn != nil {
			if err := fn(peer, uint16(mark)); err != nil {
				s.o.Logger.Warn("learn request", "peer", peer, "err", err)
			}
		}
		dctx, cancel := context.WithTimeout(s.ctx, s.o.RequestTimeout)
		_, _ = s.cli.Delete(dctx, key)
		cancel()
	}
	for ctx.Err() == nil {
		resp, err := s.cli.Get(ctx, dir, clientv3.WithPrefix())
		if err != nil {
			time.Sleep(500 * time.Millisecond)
			continue
		}
		for _, kv := range resp.Kvs {
			handle(string(kv.Key), kv.Value)
		}
		w := s.cli.Watch(clientv3.WithRequireLeader(ctx), dir, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
		for wr := range w {
			if wr.Err() != nil {
				break
			}
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypePut {
					handle(string(ev.Kv.Key), ev.Kv.Value)
				}
			}
		}
	}
}

package etcdstore

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/etcdlab"
	"github.com/tunneldirector/tunneldirector/internal/tabletest"
	"github.com/tunneldirector/tunneldirector/store"
)

func rawClient(t *testing.T, ep string) *clientv3.Client {
	t.Helper()
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{ep}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func commit(t *testing.T, s *Store, cs []affinity.Change) *affinity.Applied {
	t.Helper()
	a, err := s.Do(func(*affinity.Table) ([]affinity.Change, error) { return cs, nil })
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestForeignPrefixRefused: a prefix that holds someone else's keys is
// neither read nor written; a prefix whose schema key was replaced after
// the director opened it gets no more commits.
func TestForeignPrefixRefused(t *testing.T) {
	ep := endpoint(t)
	cli := rawClient(t, ep)
	ctx := context.Background()
	p := newPrefix()
	if _, err := cli.Put(ctx, p+"config/app", "not ours"); err != nil {
		t.Fatal(err)
	}
	_, err := Open(Options{Location: Location{Endpoints: []string{ep}, Prefix: p}, Logger: slog.New(slog.DiscardHandler)})
	if err == nil || !strings.Contains(err.Error(), "belongs to something else") || !strings.Contains(err.Error(), p+"config/app") {
		t.Fatalf("open on a foreign prefix: %v", err)
	}
	if r, _ := cli.Get(ctx, p, clientv3.WithPrefix()); len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "not ours" {
		t.Fatalf("the foreign prefix was written: %v", r.Kvs)
	}
	// A schema key of another kind.
	p2 := newPrefix()
	cli.Put(ctx, p2+keySchema, "someone-else/7")
	if _, err := Open(Options{Location: Location{Endpoints: []string{ep}, Prefix: p2}, Logger: slog.New(slog.DiscardHandler)}); err == nil || !strings.Contains(err.Error(), "someone-else/7") {
		t.Fatalf("open on a foreign schema: %v", err)
	}
	// Taken over while open: the next commit is refused.
	p3 := newPrefix()
	s := openTest(t, p3, affinity.Options{})
	defer s.Close()
	commit(t, s, tabletest.Nodes(1))
	cli.Put(ctx, p3+keySchema, "someone-else/7")
	if _, err := s.Do(func(*affinity.Table) ([]affinity.Change, error) { return tabletest.Tunnels(0, 1), nil }); err == nil || !strings.Contains(err.Error(), "refusing to write") {
		t.Fatalf("commit after the schema key changed: %v", err)
	}
	if r, _ := cli.Get(ctx, p3+keySchema); string(r.Kvs[0].Value) != "someone-else/7" {
		t.Fatal("the foreign schema key was overwritten")
	}
}

// TestUnreachableAtStart: an endpoint nobody serves is named with what
// went wrong; with a cache the store opens from it, stale, and refuses
// writes.
func TestUnreachableAtStart(t *testing.T) {
	dead := etcdlab.FreePorts(t, 1)[0]
	o := Options{Location: Location{Endpoints: []string{dead}, Prefix: "/td/"}, DialTimeout: time.Second, RequestTimeout: time.Second,
		Logger: slog.New(slog.DiscardHandler)}
	_, err := Open(o)
	if err == nil || !strings.Contains(err.Error(), dead) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("open on a dead endpoint: %v", err)
	}
	// A cache written while etcd answered.
	p := newPrefix()
	cache := filepath.Join(t.TempDir(), "cache.db")
	s := openTest(t, p, affinity.Options{}, func(o *Options) { o.Cache = cache })
	commit(t, s, tabletest.Nodes(2))
	commit(t, s, tabletest.Tunnels(0, 40))
	want := s.Table().Snapshot()
	s.Close()
	o.Cache, o.Location.Prefix = cache, p
	s, err = Open(o)
	if err != nil {
		t.Fatalf("open from the cache while etcd is down: %v", err)
	}
	defer s.Close()
	if got := s.Table().Snapshot(); !reflect.DeepEqual(got, want) {
		t.Fatal("the table from the cache differs")
	}
	h := s.Health()
	if h.Connected || !h.Stale || !h.FromCache || !strings.Contains(h.LastError, dead) {
		t.Fatalf("health from the cache: %+v", h)
	}
	if _, err := s.Do(func(*affinity.Table) ([]affinity.Change, error) { return tabletest.Tunnels(100, 1), nil }); !errors.Is(err, errOffline) {
		t.Fatalf("write while unreachable: %v", err)
	}
}

// TestCacheCatchesUp: a director that starts from its cache catches up
// with etcd, and one whose revision the log no longer reaches (two
// snapshots later) reloads the table as one batch its reconciler reads.
func TestCacheCatchesUp(t *testing.T) {
	p := newPrefix()
	cache := filepath.Join(t.TempDir(), "cache.db")
	b := openTest(t, p, affinity.Options{}, func(o *Options) { o.Cache = cache })
	a := openTest(t, p, affinity.Options{})
	defer a.Close()
	commit(t, a, tabletest.Nodes(3))
	commit(t, a, tabletest.Tunnels(0, 100))
	settle(t, b, a.Revision())
	b.Close()
	// a changes the table, snapshots twice: b's revision leaves the log.
	commit(t, a, tabletest.Tunnels(100, 100))
	if err := a.SnapshotNow(); err != nil {
		t.Fatal(err)
	}
	del := []affinity.Change{{Kind: affinity.DeleteTunnel, Name: "t000003"}}
	commit(t, a, del)
	if err := a.SnapshotNow(); err != nil {
		t.Fatal(err)
	}
	commit(t, a, tabletest.Tunnels(200, 10))
	keys, _ := a.keysUnder(context.Background(), dirLog)
	if len(keys) != 2 {
		t.Fatalf("log after two snapshots: %v (want the entries since the first snapshot)", keys)
	}
	b = openTest(t, p, affinity.Options{}, func(o *Options) { o.Cache = cache })
	defer b.Close()
	if !reflect.DeepEqual(a.Table().Snapshot(), b.Table().Snapshot()) {
		t.Fatalf("b reloaded to %d tunnels at %d, a holds %d at %d", b.Table().Len(), b.Revision(), a.Table().Len(), a.Revision())
	}
	// A fresh director loads the snapshot and the log after it.
	c := openTest(t, p, affinity.Options{})
	defer c.Close()
	if !reflect.DeepEqual(a.Table().Snapshot(), c.Table().Snapshot()) {
		t.Fatal("a fresh director's table differs")
	}
	r, err := c.Check()
	if err != nil || !r.OK() {
		t.Fatalf("check: %+v %v", r, err)
	}
}

// TestRequestLimits: etcd's default limits (1.5 MiB a request, 128
// operations a transaction) are what the lab member runs with. A change
// written inline beyond them is refused by etcd; staged, the same change
// commits as one transaction.
func TestRequestLimits(t *testing.T) {
	p := newPrefix()
	// Between etcd's request limit (1.5 MiB) and the client's own
	// (2 MiB), so that the server's refusal is what is seen.
	big := tabletest.Tunnels(0, 30_000)
	if n := len(affinity.MarshalChanges(big)); n < 3<<19 || n > 2<<20 {
		t.Fatalf("test batch is %d bytes", n)
	}
	inline := openTest(t, p, affinity.Options{}, func(o *Options) { o.InlineBytes = 64 << 20 })
	commit(t, inline, tabletest.Nodes(3))
	if _, err := inline.Do(func(*affinity.Table) ([]affinity.Change, error) { return big, nil }); err == nil || !strings.Contains(err.Error(), "request is too large") {
		t.Fatalf("an inline change above etcd's request limit: %v", err)
	}
	inline.Close()
	s := openTest(t, p, affinity.Options{}, func(o *Options) { o.InlineBytes, o.ChunkBytes = 0, 0 })
	defer s.Close()
	a := commit(t, s, big)
	if len(a.Changes) != 30_000 {
		t.Fatalf("staged: %d changes", len(a.Changes))
	}
	keys, _ := s.keysUnder(context.Background(), dirStage)
	if len(keys) < 2 {
		t.Fatalf("stage chunks: %v", keys)
	}
}

// TestWrongCertificates names the TLS problem: a server certificate of
// another CA, no client certificate where one is required, a key that is
// not the certificate's.
func TestWrongCertificates(t *testing.T) {
	dir := t.TempDir()
	good := etcdlab.MakeCerts(t, dir, "farm")
	other := etcdlab.MakeCerts(t, dir, "other")
	ports := etcdlab.FreePorts(t, 2)
	e, err := etcdlab.Start(etcdlab.Member{Name: "tls", Dir: t.TempDir(), Client: ports[0], Peer: ports[1],
		TLS: transport.TLSInfo{CertFile: good.ServerCert, KeyFile: good.ServerKey, TrustedCAFile: good.CA, ClientCertAuth: true}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	open := func(c Config) error {
		tc, err := c.TLS()
		if err != nil {
			return err
		}
		s, err := Open(Options{Location: Location{Endpoints: []string{ports[0]}, Prefix: "/td/"}, TLS: tc, DialTimeout: time.Second, RequestTimeout: time.Second,
			Logger: slog.New(slog.DiscardHandler), NoElection: true})
		if err == nil {
			s.Close()
		}
		return err
	}
	if err := open(Config{CAFile: good.CA, CertFile: good.ClientCert, KeyFile: good.ClientKey}); err != nil {
		t.Fatalf("good certificates: %v", err)
	}
	for _, c := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"server of another CA", Config{CAFile: other.CA, CertFile: good.ClientCert, KeyFile: good.ClientKey}, "certificate signed by unknown authority"},
		{"no client certificate", Config{CAFile: good.CA}, "certificate required"},
		{"client certificate of another CA", Config{CAFile: good.CA, CertFile: other.ClientCert, KeyFile: other.ClientKey}, "certificate required"},
		{"key of another certificate", Config{CAFile: good.CA, CertFile: good.ClientCert, KeyFile: other.ClientKey}, "private key does not match public key"},
	} {
		err := open(c.cfg)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v (want %q)", c.name, err, c.want)
		}
	}
}

// TestLearnRequests: a director that is not elected asks the elected one
// to pin a peer; the elected one's handler gets it once.
func TestLearnRequests(t *testing.T) {
	p := newPrefix()
	a := openTest(t, p, affinity.Options{})
	defer a.Close()
	b := openTest(t, p, affinity.Options{})
	defer b.Close()
	got := make(chan string, 10)
	for _, s := range []*Store{a, b} {
		s.OnLearnRequest(func(peer netipAddr, mark uint16) error { got <- peer.String(); return nil })
	}
	deadline := time.Now().Add(10 * time.Second)
	for !a.IsLeader() && !b.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("nobody elected")
		}
		time.Sleep(20 * time.Millisecond)
	}
	follower := a
	if a.IsLeader() {
		follower = b
	}
	if err := follower.RequestLearn(mustAddr("192.0.2.77"), 2); err != nil {
		t.Fatal(err)
	}
	select {
	case peer := <-got:
		if peer != "192.0.2.77" {
			t.Fatalf("handled %s", peer)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the elected director did not get the request")
	}
	select {
	case peer := <-got:
		t.Fatalf("request handled twice (%s)", peer)
	case <-time.After(300 * time.Millisecond):
	}
	if keys, _ := a.keysUnder(context.Background(), dirLearn); len(keys) != 0 {
		t.Fatalf("handled requests left: %v", keys)
	}
	_ = store.ErrCompacted
}

type netipAddr = netip.Addr

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

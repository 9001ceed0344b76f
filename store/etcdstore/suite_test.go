package etcdstore

import (
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/etcdlab"
	"github.com/tunneldirector/tunneldirector/store"
	"github.com/tunneldirector/tunneldirector/store/storetest"
)

// One embedded member serves every test of the package, each under its
// own prefix: starting a member costs about a second.
var (
	labEndpoint string
	prefixN     atomic.Int64
)

func endpoint(t testing.TB) string {
	t.Helper()
	if labEndpoint == "" {
		labEndpoint = etcdlab.Single(&keepAlive{t})
	}
	return labEndpoint
}

// keepAlive lets the package's member outlive the first test that asked
// for it (it ends with the test binary).
type keepAlive struct{ testing.TB }

func (k *keepAlive) Cleanup(func()) {}
func (k *keepAlive) TempDir() string {
	return must(osMkdirTemp())
}

func newPrefix() string { return fmt.Sprintf("/td-test/%d-%d/", time.Now().UnixNano(), prefixN.Add(1)) }

// openTest opens a store on the lab member with small chunk sizes, so the
// suite's large batch goes through the staged path.
func openTest(t testing.TB, prefix string, o affinity.Options, mod ...func(*Options)) *Store {
	t.Helper()
	opts := Options{Location: Location{Endpoints: []string{endpoint(t)}, Prefix: prefix}, Table: o,
		InlineBytes: 16 << 10, ChunkBytes: 128 << 10, ElectionTTL: 2,
		Logger: slog.New(slog.DiscardHandler)}
	for _, m := range mod {
		m(&opts)
	}
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// settle waits until s holds revision rev.
func settle(t *testing.T, b store.Backend, rev uint64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for b.Revision() < rev {
		if time.Now().After(deadline) {
			t.Fatalf("store at revision %d, want %d", b.Revision(), rev)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestBackendSuite runs the suite every store.Backend passes on etcd.
func TestBackendSuite(t *testing.T) {
	storetest.Run(t, storetest.Backend{
		New: func(t *testing.T) func(*testing.T, affinity.Options) store.Backend {
			p := newPrefix()
			return func(t *testing.T, o affinity.Options) store.Backend { return openTest(t, p, o) }
		},
		Shared: true,
		Settle: settle,
	})
}

func osMkdirTemp() (string, error) { return os.MkdirTemp("", "td-etcdlab-") }

func must(s string, err error) string {
	if err != nil {
		panic(err)
	}
	return s
}

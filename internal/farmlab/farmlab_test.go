package farmlab

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

var (
	buildOnce sync.Once
	binDir    string
	bin       string
	binErr    error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// buildBinary builds cmd/tunneldirector once for the package's tests.
func buildBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		if binDir, binErr = os.MkdirTemp("", "td-farmlab-"); binErr == nil {
			bin, binErr = BuildBinary(binDir)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return bin
}

// TestLabEveryPacketAtItsOwner runs the demo's farm, small: every round
// (after the import, a node failure, a pinned move, a director failover)
// must deliver all four packets of every tunnel to its owner and nowhere
// else, with the failed node owning nothing.
func TestLabEveryPacketAtItsOwner(t *testing.T) {
	netlab.RequireRoot(t)
	netlab.Require(t, "the lab's kernel features", Preflight())
	var out bytes.Buffer
	res, err := Run(t.Context(), Options{Binary: buildBinary(t), Dir: t.TempDir(), Nodes: 3, PeerHosts: 3, TunnelsPerHost: 10, Out: &out})
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if res.Tunnels != 30 || len(res.Rounds) != 4 {
		t.Fatalf("%d tunnels, %d rounds\n%s", res.Tunnels, len(res.Rounds), out.String())
	}
	for i, r := range res.Rounds {
		if r.Sent != 4*res.Tunnels || r.AtOwner != r.Sent || r.Elsewhere != 0 || r.Lost != 0 {
			t.Errorf("round %q: sent %d, at owner %d, elsewhere %d, lost %d", r.Event, r.Sent, r.AtOwner, r.Elsewhere, r.Lost)
		}
		total := 0
		for _, n := range r.Nodes {
			total += n.Tunnels
			if n.Name == "node1" && i > 0 && (n.Tunnels != 0 || n.State != "down") {
				t.Errorf("round %q: failed node1 is %s with %d tunnels", r.Event, n.State, n.Tunnels)
			}
			for _, k := range kinds {
				if n.Arrived[k] != n.Tunnels {
					t.Errorf("round %q: %s owns %d tunnels, got %d %s packets", r.Event, n.Name, n.Tunnels, n.Arrived[k], k)
				}
			}
		}
		if total != res.Tunnels {
			t.Errorf("round %q: nodes own %d tunnels, want %d", r.Event, total, res.Tunnels)
		}
	}
	if before, after := res.Rounds[1].Nodes[2].Tunnels, res.Rounds[2].Nodes[2].Tunnels; after != before+1 {
		t.Errorf("the pinned move left node2 with %d tunnels (had %d)", after, before)
	}
	if t.Failed() {
		t.Logf("lab output:\n%s", out.String())
	}
}

// cancelOn cancels a context when the narration mentions a text: Ctrl-C
// in the middle of the run.
type cancelOn struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	text   string
	cancel func()
}

func (c *cancelOn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(b)
	if strings.Contains(c.buf.String(), c.text) {
		c.cancel()
	}
	return len(b), nil
}

// TestLabInterruptedLeavesNothing interrupts the lab after its first table
// (Ctrl-C): it returns the cancellation, and no daemon it started is left
// running.
func TestLabInterruptedLeavesNothing(t *testing.T) {
	netlab.RequireRoot(t)
	netlab.Require(t, "the lab's kernel features", Preflight())
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	w := &cancelOn{text: "== packets per node after the import", cancel: cancel}
	_, err := Run(ctx, Options{Binary: buildBinary(t), Dir: dir, Nodes: 3, PeerHosts: 1, TunnelsPerHost: 4, Out: w})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("interrupted run returned %v\n%s", err, w.buf.String())
	}
	// Every process whose command line names the lab's directory (the
	// daemons run with --config DIR/...) is gone.
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(dir)) {
			t.Errorf("left running: %s %q", p, bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
		}
	}
}

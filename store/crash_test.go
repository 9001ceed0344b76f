package store

import (
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// crashBatch is the large change the child process commits while the
// parent kills it: it replaces the first 5,000 tunnels' subnets and adds
// 60,000 more.
func crashBatch() []affinity.Change {
	b := tunnels(5000, 60000)
	for _, c := range tunnels(0, 5000) {
		c.Tunnel.Comment = "changed"
		b = append(b, c)
	}
	return b
}

// digest sums what a table holds, ignoring times (the child's clock).
func digest(t *affinity.Table) string {
	h := sha256.New()
	for _, tu := range t.Tunnels() {
		fmt.Fprintf(h, "%s %s %v %s %v %s %d\n", tu.ID, tu.Peer, tu.Subnets, tu.Node, tu.Pinned, tu.Comment, tu.Revision)
	}
	fmt.Fprintf(h, "rev %d", t.Revision())
	return fmt.Sprintf("%x", h.Sum(nil))
}

// TestMain runs the crash test's child process when asked to, instead of
// the tests.
func TestMain(m *testing.M) {
	if path := os.Getenv("TD_CRASH_CHILD"); path != "" {
		crashChild(path)
		return
	}
	os.Exit(m.Run())
}

func crashChild(path string) {
	s, err := Open(Options{Path: path})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	batch := crashBatch()
	fmt.Println("committing")
	start := time.Now()
	if _, err := s.Commit(batch); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	s.Close()
	fmt.Fprintf(os.Stderr, "committed in %s\n", time.Since(start))
}

// TestCrashDuringImport kills a process in the middle of committing a large
// import, many times at random instants, and checks that the store then
// holds exactly the old or exactly the new table. The import is journaled,
// so its records are written by the fold of the child's Close: later
// kills land in that fold, and the reopened store replays the journal.
func TestCrashDuringImport(t *testing.T) {
	if testing.Short() {
		t.Skip("kills child processes; skipped with -short")
	}
	dir := t.TempDir()
	pristine := filepath.Join(dir, "pristine.db")
	s := open(t, pristine)
	s.Commit(nodes(5))
	s.Commit(tunnels(0, 5000))
	oldDigest := digest(s.Table())
	s.Close()

	// The new table, computed in memory from the same start.
	mem := open(t, filepath.Join(dir, "mem.db"))
	mem.Commit(nodes(5))
	mem.Commit(tunnels(0, 5000))
	if _, err := mem.Commit(crashBatch()); err != nil {
		t.Fatal(err)
	}
	newDigest := digest(mem.Table())
	mem.Close()

	// Calibrate: one child runs to completion, which also proves that an
	// uninterrupted commit gives the new table.
	work := filepath.Join(dir, "work.db")
	d := runChild(t, work, -1)
	if got := reopenDigest(t, work); got != newDigest {
		t.Fatal("an uninterrupted commit did not give the new table")
	}

	// Kill children at instants spread over the commit's duration and a
	// little past it.
	const runs = 12
	var sawOld, sawNew int
	for i := 0; i < runs; i++ {
		at := time.Duration(float64(d) * 1.5 * (float64(i) + 0.5) / runs)
		runChild(t, work, at)
		switch reopenDigest(t, work) {
		case oldDigest:
			sawOld++
		case newDigest:
			sawNew++
		default:
			t.Fatalf("kill %d at %s: store holds neither the old nor the new table", i, at)
		}
	}
	t.Logf("commit takes %s; after %d kills: %d old tables, %d new tables, 0 torn", d, runs, sawOld, sawNew)
	if sawOld == 0 {
		t.Error("no kill landed inside the commit: the test did not exercise a crash")
	}
}

// runChild copies the pristine store to work and starts a child that
// commits crashBatch into it; it kills the child after killAt (or lets it
// finish when killAt < 0) and returns how long the child ran after it
// started committing.
func runChild(t *testing.T, work string, killAt time.Duration) time.Duration {
	t.Helper()
	copyFile(t, filepath.Join(filepath.Dir(work), "pristine.db"), work)
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "TD_CRASH_CHILD="+work)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len("committing\n"))
	if _, err := io.ReadFull(out, buf); err != nil {
		t.Fatalf("child did not start committing: %v", err)
	}
	start := time.Now()
	if killAt >= 0 {
		time.Sleep(killAt)
		cmd.Process.Kill()
		cmd.Wait()
		return time.Since(start)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v", err)
	}
	return time.Since(start)
}

func reopenDigest(t *testing.T, path string) string {
	t.Helper()
	s, err := Open(Options{Path: path})
	if err != nil {
		t.Fatalf("store unreadable after kill: %v", err)
	}
	defer s.Close()
	if rep, err := s.Check(); err != nil || !rep.OK() {
		t.Fatalf("check after kill: %v %v", err, rep.Problems)
	}
	return digest(s.Table())
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

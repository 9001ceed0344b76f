package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/cputime"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// TestPairScale measures a replicated pair at scale, with real daemons in
// namespaces on the host kernel: an import of TD_PAIR_SCALE tunnels on
// the master until both kernels hold it, during which the backup must
// never find the master silent; then, three times, a fresh backup (empty
// store, empty kernel) from its start until its kernel holds the
// master's revision, with the backup process's CPU time. It is a
// measurement (about ten minutes at 1,000,000 on the shared 2-core
// machine), run on demand: TD_PAIR_SCALE=1 (1,000,000 tunnels) or
// TD_PAIR_SCALE=N. CI keeps the small-scale proofs: TestPairReplicatesAndTakesOver
// and the replication package's TestHeartbeat* tests.
func TestPairScale(t *testing.T) {
	n := onDemandScale(t, "TD_PAIR_SCALE", 1_000_000, 1<<22)
	netlab.RequireRoot(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 2, Nodes: 3})
	dir := t.TempDir()
	ds := startPairWith(t, top, dir, pairOptions{edit: atScale}, "master", "backup")
	waitPairAPI(t, ds)
	waitPair(t, ds, "the backup in sync", time.Minute, func() bool {
		s := ds[1].status(t)
		return s.Replication != nil && s.Replication.Ready
	})

	// One peer and one /27 each: peers in 100.64.0.0/10, subnets from
	// 12.0.0.0 up (a million /27s fill 12.0.0.0/7).
	var b strings.Builder
	b.WriteString("id,peer,subnets\n")
	for i := range n {
		p, s := 0x64400000+uint32(i), 0x0c000000+uint32(i)*32
		fmt.Fprintf(&b, "t%d,%d.%d.%d.%d,%d.%d.%d.%d/27\n", i, p>>24, p>>16&255, p>>8&255, p&255, s>>24, s>>16&255, s>>8&255, s&255)
	}
	f := filepath.Join(dir, "tunnels.csv")
	if err := os.WriteFile(f, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	b.Reset()

	// The import on the master; the backup follows by snapshot (the
	// batch is larger than the journal) and must hear the master all
	// along.
	load := loadAvg()
	start := time.Now()
	if out, err := ds[0].cli(t, "import", f); err != nil {
		t.Fatalf("import on the master: %v %s", err, out)
	}
	committed := time.Since(start)
	silent := false
	waitPair(t, ds, "both kernels at the master's revision", 10*time.Minute, func() bool {
		s0, err0 := apiStatus(ds[0].socket)
		s1, err1 := apiStatus(ds[1].socket)
		if err0 != nil || err1 != nil {
			daemonAlive(t, ds[0].cmd, err0, ds[0].log)
			daemonAlive(t, ds[1].cmd, err1, ds[1].log)
			return false
		}
		if r := s1.Replication; r != nil && strings.HasPrefix(r.Reason, "no word from the master") {
			silent = true
		}
		return s1.Revision == s0.Revision && s1.KernelRevision == s0.Revision && s0.KernelRevision == s0.Revision
	})
	t.Logf("import of %d tunnels on the master: committed in %s, in both kernels after %s (load average before: %s)",
		n, committed.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), load)
	if log, _ := os.ReadFile(ds[1].log); silent || strings.Contains(string(log), "no word from the master") {
		t.Errorf("the backup found the master silent during the import (status said so: %v); its log:\n%s", silent, grepLines(string(log), "master"))
	}

	// A fresh backup, three times: empty store, state and kernel.
	var walls, cpus []time.Duration
	for run := range 3 {
		bk := ds[1]
		// Stopped, not killed: TD_DAEMON_PROFILE's profile is written
		// on a clean stop (everything it leaves is wiped below).
		bk.cmd.Process.Signal(syscall.SIGTERM)
		bk.cmd.Wait()
		for _, p := range []string{bk.db, filepath.Join(dir, "d1.state"), filepath.Join(dir, "d1.ready")} {
			os.Remove(p)
		}
		// The kernel's state goes with the director: the namespace's
		// table is deleted, as on a new machine.
		conn, err := bk.host.Nft()
		if err != nil {
			t.Fatal(err)
		}
		conn.FlushRuleset()
		if err := conn.Flush(); err != nil {
			t.Fatalf("flush the backup's nftables ruleset: %v", err)
		}
		master := ds[0].status(t).Revision
		load := loadAvg()
		start := time.Now()
		stopPerf := perfRecord(t, fmt.Sprintf("freshbackup-%d", run))
		bk.start(t)
		// The store first (the snapshot received and applied), then
		// the kernel.
		var stored, storedCPU time.Duration
		// The master's revision may move meanwhile (a step of its
		// unknown-peer buckets): the backup is there when it holds the
		// master's current one.
		waitPair(t, ds, "the fresh backup's kernel at the master's revision", 10*time.Minute, func() bool {
			s, err := apiStatus(bk.socket)
			if err != nil {
				daemonAlive(t, bk.cmd, err, bk.log)
				return false
			}
			if s.Revision < master {
				return false
			}
			if stored == 0 {
				stored, storedCPU = time.Since(start), procCPU(t, bk.cmd.Process.Pid)
			}
			if s.KernelRevision != s.Revision {
				return false
			}
			if s.Revision == master {
				return true
			}
			m, err := apiStatus(ds[0].socket)
			if err != nil {
				daemonAlive(t, ds[0].cmd, err, ds[0].log)
				return false
			}
			return s.Revision == m.Revision
		})
		wall := time.Since(start)
		stopPerf()
		user, sys := procCPUSplit(t, bk.cmd.Process.Pid)
		cpu := user + sys
		walls, cpus = append(walls, wall), append(cpus, cpu)
		t.Logf("fresh backup %d: kernel at revision %d after %s wall, the backup process %s CPU (%s user, %s system); its store there after %s wall, %s CPU (load average before: %s)",
			run+1, master, wall.Round(time.Millisecond), cpu.Round(time.Millisecond), user.Round(time.Millisecond), sys.Round(time.Millisecond),
			stored.Round(time.Millisecond), storedCPU.Round(time.Millisecond), load)
		t.Logf("its log:\n%s", grepLines(readFile(bk.log), "transfer", "kernel synced", "kernel updated", "no word"))
		os.Truncate(bk.log, 0)
	}
	slices.Sort(walls)
	slices.Sort(cpus)
	t.Logf("fresh backup at %d tunnels: median %s wall, %s CPU", n, walls[1].Round(time.Millisecond), cpus[1].Round(time.Millisecond))
}

// onDemandScale is the tunnel count of a measurement run on demand: t is
// skipped unless env is set, env=1 runs it with def tunnels, and env=N
// with N (from 100 to max).
func onDemandScale(t *testing.T, env string, def, max int) int {
	t.Helper()
	v := os.Getenv(env)
	switch v {
	case "":
		t.Skipf("a measurement: %s=1 runs it (%d tunnels), %s=N with N tunnels", env, def, env)
	case "1":
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 100 || n > max {
		t.Fatalf("%s=%q: want 1 or a number of tunnels from 100 to %d", env, v, max)
	}
	return n
}

// procCPU is a process's user+system CPU time so far, from /proc.
func procCPU(t *testing.T, pid int) time.Duration {
	u, s := procCPUSplit(t, pid)
	return u + s
}

// procCPUSplit is a process's user and system CPU time so far, apart:
// the system part of programming the kernel is mostly the kernel's own
// work on the transaction.
func procCPUSplit(t testing.TB, pid int) (user, sys time.Duration) {
	t.Helper()
	user, sys, err := cputime.OfPID(pid)
	if err != nil {
		t.Fatal(err)
	}
	return user, sys
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

// grepLines returns the lines of s that contain any of the words.
func grepLines(s string, words ...string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		for _, w := range words {
			if strings.Contains(l, w) {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

package e2e

import (
	"encoding/csv"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// BenchmarkDaemonScale runs the real daemon in a director namespace with
// 16 nodes (route-only, the host kernel) and measures what a farm of
// TD_BENCH_TUNNELS tunnels (default 100,000; 1 to TD_BENCH_SUBNETS
// subnets each, default 4, from `tunneldirector gen`) costs the daemon:
//
//	TD_BENCH_TUNNELS=1000000 go test -run '^$' -bench DaemonScale -benchtime 1x -count 3 -timeout 60m ./internal/e2e/
//
// Reported per run: import-s (the import through the API until the kernel
// holds it), rss-MB and hwm-MB (the daemon's resident and peak resident
// memory once the kernel holds the import, after the garbage collector
// ran), nodedown-s (`node down` of one of the 16 nodes until the kernel
// holds the moves), nodedown2-s (a second node down right after),
// restart-api-s (SIGTERM, start, until the API answers),
// restart-kernel-s (until the restarted daemon has adopted and
// confirmed the kernel's state) and restart-change-s (until the kernel
// holds a new tunnel imported as soon as the API answered: a table
// change applied after a restart), restart-rss-MB (resident memory then).
// The -cpu-s figures are the daemon's own CPU time (user and system) over
// the same spans: on a shared machine, wall time grows with the load and
// CPU time hardly.
func BenchmarkDaemonScale(b *testing.B) {
	n := 100_000
	if v := os.Getenv("TD_BENCH_TUNNELS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n <= 0 {
			b.Fatalf("TD_BENCH_TUNNELS=%q: want a positive count", v)
		}
	}
	maxSubnets := "4"
	if v := os.Getenv("TD_BENCH_SUBNETS"); v != "" {
		if k, err := strconv.Atoi(v); err != nil || k <= 0 {
			b.Fatalf("TD_BENCH_SUBNETS=%q: want a positive count", v)
		}
		maxSubnets = v
	}
	const nodes = 16
	e := newE2EWith(b, netlab.TopologyOptions{Peers: 1, Directors: 1, Nodes: nodes, VIPOnDirectors: true}, atScale)
	if out, err := runArgs(b, "gen", "--dir", e.dir, "--tunnels", strconv.Itoa(n), "--nodes", strconv.Itoa(nodes), "--pinned", "0", "--max-subnets", maxSubnets); err != nil {
		b.Fatalf("gen: %v\n%s", err, out)
	}
	file := filepath.Join(e.dir, "tunnels.csv")
	bits := farmSubnetBits(b, file)
	long := time.Duration(n/1000+60) * time.Second
	e.apiWait = long
	var imp, rss, hwm, down, down2, api, restart, change, rrss, impCPU, downCPU, down2CPU, apiCPU, restartCPU []float64
	b.ResetTimer()
	for iter := range b.N {
		b.StopTimer()
		os.Remove(e.db)
		e.start()
		t0, c0 := time.Now(), e.daemonCPU()
		e.cli("import", file)
		e.waitFor("the kernel to hold the import", long, e.kernelCaughtUp)
		imp, impCPU = append(imp, time.Since(t0).Seconds()), append(impCPU, e.daemonCPU()-c0)
		// The import's aftermath (the daemon hands the heap it
		// freed back to the system) is not the next step's cost.
		e.waitIdle()
		r, h := e.daemonMemory()
		rss, hwm = append(rss, r), append(hwm, h)

		victim := fmt.Sprintf("node%d", iter%nodes)
		stopPerf := perfRecord(b, fmt.Sprintf("nodedown-%d", iter))
		t0, c0 = time.Now(), e.daemonCPU()
		e.cli("node", "down", victim)
		e.waitFor("the kernel to hold the node's moves", long, e.kernelCaughtUp)
		down, downCPU = append(down, time.Since(t0).Seconds()), append(downCPU, e.daemonCPU()-c0)
		e.waitIdle()
		stopPerf()
		// A second node down: on a heap the first one warmed (the
		// import's release handed its pages back to the system).
		stopPerf = perfRecord(b, fmt.Sprintf("nodedown2-%d", iter))
		t0, c0 = time.Now(), e.daemonCPU()
		e.cli("node", "down", fmt.Sprintf("node%d", (iter+1)%nodes))
		e.waitFor("the kernel to hold the second node's moves", long, e.kernelCaughtUp)
		down2, down2CPU = append(down2, time.Since(t0).Seconds()), append(down2CPU, e.daemonCPU()-c0)
		e.waitIdle()
		stopPerf()

		e.stop()
		stopPerf = perfRecord(b, fmt.Sprintf("restart-%d", iter))
		probe := filepath.Join(e.dir, fmt.Sprintf("probe-%d.csv", iter))
		// A tunnel gen never makes (its peers are in 100.64.0.0/10, its
		// subnets in 10.0.0.0/8), of the farm's prefix length: a new
		// length rebuilds the classifier chain, which costs the kernel a
		// walk of every map element (0.7-0.9 s of CPU at a million
		// tunnels).
		if err := os.WriteFile(probe, []byte(fmt.Sprintf("id,peer,subnets\nrestart-probe-%d,198.18.0.%d,198.19.%d.0/%d\n", iter, iter+1, iter, bits)), 0o600); err != nil {
			b.Fatal(err)
		}
		t0 = time.Now()
		e.start()
		api, apiCPU = append(api, time.Since(t0).Seconds()), append(apiCPU, e.daemonCPU())
		// The import waits for the start's kernel sync (the daemon's
		// gate on API writes), while this goroutine sees that sync end.
		imported := make(chan error, 1)
		go func() {
			out, err := runArgs(b, "--socket", e.socket, "import", probe)
			if err != nil {
				err = fmt.Errorf("import the probe: %v\n%s", err, out)
			}
			imported <- err
		}()
		var confirmed float64
		var probed uint64 // the revision of the probe's import, once done
		e.waitFor("the restarted daemon to confirm the kernel and apply the change", long, func() bool {
			s, err := apiStatus(e.socket)
			if err != nil {
				daemonAlive(b, e.daemon, err, e.logPath)
				return false
			}
			if s.KernelRevision > 0 && confirmed == 0 {
				// The first sync: the kernel as the restart found it.
				confirmed = time.Since(t0).Seconds()
				restartCPU = append(restartCPU, e.daemonCPU())
			}
			if probed == 0 {
				select {
				case err := <-imported:
					if err != nil {
						b.Fatal(err)
					}
					// The import's commit is in the revision now.
					if s, err = apiStatus(e.socket); err != nil {
						b.Fatal(err)
					}
					probed = s.Revision
				default:
					return false
				}
			}
			return s.KernelRevision >= probed
		})
		restart, change = append(restart, confirmed), append(change, time.Since(t0).Seconds())
		stopPerf()
		r, _ = e.daemonMemory()
		rrss = append(rrss, r)
		e.stop() // a clean stop: TD_DAEMON_PROFILE's profile is written
	}
	for _, m := range []struct {
		v    []float64
		unit string
	}{{imp, "import-s"}, {impCPU, "import-cpu-s"}, {rss, "rss-MB"}, {hwm, "hwm-MB"}, {down, "nodedown-s"}, {downCPU, "nodedown-cpu-s"}, {down2, "nodedown2-s"}, {down2CPU, "nodedown2-cpu-s"},
		{api, "restart-api-s"}, {apiCPU, "restart-api-cpu-s"}, {restart, "restart-kernel-s"}, {restartCPU, "restart-kernel-cpu-s"}, {change, "restart-change-s"}, {rrss, "restart-rss-MB"}} {
		b.ReportMetric(median(m.v), m.unit)
	}
}

// farmSubnetBits is the length of the first IPv4 subnet in gen's tunnels
// file: gen picks it by the farm's size (/27 at 100,000 tunnels, /29 at a
// million).
func farmSubnetBits(t testing.TB, file string) int {
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := csv.NewReader(f)
	r.FieldsPerRecord = -1
	for {
		rec, err := r.Read()
		if err != nil {
			t.Fatalf("%s: no IPv4 subnet found: %v", file, err)
		}
		for _, f := range rec {
			for _, w := range strings.Fields(f) {
				if p, err := netip.ParsePrefix(w); err == nil && p.Addr().Is4() {
					return p.Bits()
				}
			}
		}
	}
}

// atScale rewrites the base configuration for a measurement at scale:
// the import goes through the API, so the body limit is lifted for the
// generated file; verify runs at the default interval (the base
// configuration's 1 s would verify all the time at this size), and the
// log at info.
func atScale(cfg string) string {
	for _, r := range [][2]string{{"verify_interval: 1s\n", "verify_interval: 30s\n"}, {"log_level: debug\n", "log_level: info\n"},
		{"api: {socket: ", "api: {max_body: 4294967296, socket: "}} {
		if !strings.Contains(cfg, r[0]) {
			panic(fmt.Sprintf("atScale: the base configuration has no %q any more", r[0]))
		}
		cfg = strings.Replace(cfg, r[0], r[1], 1)
	}
	return cfg
}

// perfRecord, when TD_BENCH_PERF names a directory, records the machine
// with perf(1) (call graphs, kernel included) into DIR/name.data until
// the returned function is called: one phase's profile, where the
// daemon's --cpuprofile covers its whole life and not the kernel.
func perfRecord(t testing.TB, name string) (stop func()) {
	dir := os.Getenv("TD_BENCH_PERF")
	if dir == "" {
		return func() {}
	}
	// System-wide, so that the kernel threads working for it show too.
	cmd := exec.Command("perf", "record", "-a", "-g", "-o", filepath.Join(dir, name+".data"))
	if err := cmd.Start(); err != nil {
		t.Fatalf("TD_BENCH_PERF: %v", err)
	}
	time.Sleep(300 * time.Millisecond) // perf attaches
	return func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}
}

// kernelCaughtUp says whether the daemon has applied the table's revision
// to the kernel (and has one: a restarted daemon reports 0 until its first
// sync).
func (e *e2e) kernelCaughtUp() bool {
	e.t.Helper()
	s, err := apiStatus(e.socket)
	if err != nil {
		daemonAlive(e.t, e.daemon, err, e.logPath)
		return false
	}
	return s.KernelRevision == s.Revision && s.KernelRevision > 0
}

// daemonAlive fails the test when the daemon cmd, whose API just failed to
// answer with err, has exited (a poll would otherwise spin until its
// deadline).
func daemonAlive(t testing.TB, cmd *exec.Cmd, err error, log string) {
	t.Helper()
	b, rerr := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
	// The state follows the command name in parentheses; Z: exited, not
	// yet reaped.
	if _, after, ok := strings.Cut(string(b), ") "); rerr != nil || !ok || strings.HasPrefix(after, "Z") {
		t.Fatalf("the daemon exited (its API: %v); its log:\n%s", err, readFile(log))
	}
}

var (
	apiClientsMu sync.Mutex
	apiClients   = map[string]*director.Client{}
)

// apiStatus asks the daemon at socket for its status through an API client
// in this process. The scale measurements poll it every 20 ms: a CLI
// process per poll (a Go program started, its flags, HTTP, JSON) took
// about 0.4 of one of the machine's two cores from the daemons being
// measured (perf, during a fresh backup at a million tunnels).
func apiStatus(socket string) (director.Status, error) {
	apiClientsMu.Lock()
	c, ok := apiClients[socket]
	if !ok {
		c = director.NewUnixClient(socket)
		apiClients[socket] = c
	}
	apiClientsMu.Unlock()
	s, err := c.Status()
	if err != nil {
		return director.Status{}, err
	}
	return *s, nil
}

// daemonMemory returns the daemon's resident and peak resident memory in
// MB, read from /proc after a moment for the collector to return what the
// last sync freed.
func (e *e2e) daemonMemory() (rss, hwm float64) {
	e.t.Helper()
	time.Sleep(2 * time.Second)
	st := procStatus(e.t, e.daemon.Process.Pid)
	r, h := st["VmRSS"], st["VmHWM"]
	// The split tells the heap from the store's file pages the daemon
	// read through bbolt's mapping.
	e.t.Logf("daemon memory: VmRSS %.0f MB (RssAnon %.0f MB, RssFile %.0f MB)", r/(1<<20), st["RssAnon"]/(1<<20), st["RssFile"]/(1<<20))
	return r / (1 << 20), h / (1 << 20)
}

// procMemory returns a process's resident and peak resident memory in
// bytes (VmRSS and VmHWM of /proc/PID/status).
func procMemory(t testing.TB, pid int) (rss, hwm float64) {
	st := procStatus(t, pid)
	return st["VmRSS"], st["VmHWM"]
}

// procStatus returns the sizes /proc/PID/status gives in kB, in bytes, by
// name.
func procStatus(t testing.TB, pid int) map[string]float64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		v = strings.TrimSpace(v)
		if !strings.HasSuffix(v, " kB") {
			continue
		}
		if kb, err := strconv.ParseFloat(strings.TrimSuffix(v, " kB"), 64); err == nil {
			out[k] = kb * 1024
		}
	}
	return out
}

// waitIdle waits (up to 30 s) until the daemon used under 20 ms of CPU in
// the last half second.
func (e *e2e) waitIdle() {
	last := e.daemonCPU()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		time.Sleep(500 * time.Millisecond)
		now := e.daemonCPU()
		if now-last < 0.02 {
			return
		}
		last = now
	}
}

// daemonCPU is the daemon's CPU time so far in seconds (user and system,
// from /proc/PID/stat; the status command's own work is not in it).
func (e *e2e) daemonCPU() float64 {
	e.t.Helper()
	u, s := procCPUSplit(e.t, e.daemon.Process.Pid)
	return (u + s).Seconds()
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// The side-by-side measurement of issue 14: tunneldirector's conntrack
// replication and conntrackd 1.4.7 (FTFW over UDP), in the same two
// director namespaces, with the same 100,000 flows created in the
// master's kernel, median of three rounds each, interleaved:
//
//	scripts/bench-conntrack.sh   (go test -run '^$' -bench ConntrackVsConntrackd -benchtime 1x ./internal/e2e/)
//
// Measured per round: the time from the first flow created on the master
// until all are in the backup's cache; the commit of the cached flows
// into the backup's kernel (wall time of `ctl conntrack commit` and
// `conntrackd -c`, until the kernel's nf_conntrack_count says they are
// there); the bytes on the sync link per flow (both directions, from the
// veth counters); the backup's resident memory per cached flow.

const benchFlows = 100_000

type ctRound struct {
	sync, commit time.Duration
	bytesPerFlow float64
	rssPerFlow   float64
}

func BenchmarkConntrackVsConntrackd(b *testing.B) {
	netlab.RequireRoot(b)
	ctd, err := exec.LookPath("conntrackd")
	netlab.Require(b, "conntrackd (apt-get install conntrackd; scripts/lab-deps.sh does)", err)
	rounds := 3
	if v, err := strconv.Atoi(os.Getenv("TD_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	for b.Loop() {
		var td, cd []ctRound
		for r := range rounds {
			td = append(td, benchTunneldirector(b))
			cd = append(cd, benchConntrackd(b, ctd))
			b.Logf("round %d: tunneldirector %+v; conntrackd %+v", r+1, td[r], cd[r])
		}
		med := func(rs []ctRound, f func(ctRound) float64) float64 {
			v := make([]float64, len(rs))
			for i, r := range rs {
				v[i] = f(r)
			}
			slices.Sort(v)
			return v[len(v)/2]
		}
		rows := []struct {
			name string
			f    func(ctRound) float64
			unit string
		}{
			{"100k new flows until all in the backup's cache", func(r ctRound) float64 { return r.sync.Seconds() }, "s"},
			{"commit of 100k cached flows", func(r ctRound) float64 { return r.commit.Seconds() }, "s"},
			{"sync traffic per flow", func(r ctRound) float64 { return r.bytesPerFlow }, "bytes"},
			{"backup memory per cached flow (RSS)", func(r ctRound) float64 { return r.rssPerFlow }, "bytes"},
		}
		b.Logf("median of %d rounds (2-core shared machine, load %s):", rounds, loadAvg())
		for _, row := range rows {
			t, c := med(td, row.f), med(cd, row.f)
			b.Logf("  %-48s tunneldirector %8.3f %s   conntrackd %8.3f %s   ratio %.2f", row.name, t, row.unit, c, row.unit, t/c)
			b.ReportMetric(t, strings.ReplaceAll(row.unit+"/"+row.name, " ", "_")+"_td")
			b.ReportMetric(c, strings.ReplaceAll(row.unit+"/"+row.name, " ", "_")+"_ctd")
		}
	}
}

// benchTop is two directors joined by the sync link.
func benchTop(b *testing.B) *netlab.Topology {
	return netlab.BuildTopology(b, netlab.TopologyOptions{Peers: 1, Directors: 2, Nodes: 1})
}

// syncBytes is what both directors sent on the sync link so far.
func syncBytes(b *testing.B, top *netlab.Topology) uint64 {
	var n uint64
	for _, d := range top.Directors {
		l, err := d.Link(netlab.IfSync)
		if err != nil {
			b.Fatal(err)
		}
		n += l.Attrs().Statistics.TxBytes
	}
	return n
}

// ctCount is the number of entries in a namespace's conntrack table.
func ctCount(b *testing.B, h *netlab.Host) int {
	var n int
	err := h.Do(func() error {
		v, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
		if err == nil {
			n, err = strconv.Atoi(strings.TrimSpace(string(v)))
		}
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	return n
}

func poll(b *testing.B, what string, limit time.Duration, cond func() bool) {
	b.Helper()
	for deadline := time.Now().Add(limit); ; time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("timed out waiting for %s", what)
		}
	}
}

// createFlows creates the benchmark's flows in the master's kernel.
func createFlows(b *testing.B, top *netlab.Topology) {
	k, err := conntrack.Open(top.Directors[0].NsHandle())
	if err != nil {
		b.Fatal(err)
	}
	defer k.Close()
	fs := ctFlows(top.Target.If(netlab.IfTarget).Addr4, 0, benchFlows)
	if res, err := k.Commit(context.Background(), fs, conntrack.CommitOptions{}); err != nil || res.Failed != 0 {
		b.Fatalf("create flows: %+v %v", res, err)
	}
}

func benchTunneldirector(b *testing.B) ctRound {
	top := benchTop(b)
	dir := b.TempDir()
	ds := startPairWith(b, top, dir, pairOptions{extra: "  conntrack: {include: [10.80.0.0/16]}\n"}, "master", "backup")
	cl := director.NewUnixClient(ds[1].socket)
	poll(b, "the backup in sync", 30*time.Second, func() bool {
		s, err := cl.Status()
		return err == nil && s.Replication != nil && s.Replication.Ready && s.Conntrack != nil && !s.Conntrack.Resyncing
	})
	rss0, _ := procMemory(b, ds[1].cmd.Process.Pid)
	bytes0 := syncBytes(b, top)
	start := time.Now()
	createFlows(b, top)
	poll(b, "100k flows in the backup's cache", 60*time.Second, func() bool {
		s, err := cl.Status()
		return err == nil && s.Conntrack.Cached == benchFlows
	})
	var r ctRound
	r.sync = time.Since(start)
	time.Sleep(200 * time.Millisecond) // the last acknowledgements
	r.bytesPerFlow = float64(syncBytes(b, top)-bytes0) / benchFlows
	rss1, _ := procMemory(b, ds[1].cmd.Process.Pid)
	r.rssPerFlow = (rss1 - rss0) / benchFlows
	base := ctCount(b, top.Directors[1])
	start = time.Now()
	rep, err := cl.ConntrackCommit()
	if err != nil || rep.Failed != 0 || rep.Entries != benchFlows {
		b.Fatalf("commit: %+v %v", rep, err)
	}
	poll(b, "the committed flows in the backup's kernel", 60*time.Second, func() bool { return ctCount(b, top.Directors[1]) >= base+benchFlows })
	r.commit = time.Since(start)
	return r
}

// conntrackdConf is conntrackd 1.4.7's FTFW over UDP on the sync link,
// with generous buffers, syncing TCP flows except the directors' own.
const conntrackdConf = `Sync {
	Mode FTFW {
		DisableExternalCache Off
		CommitTimeout 1800
		PurgeTimeout 5
	}
	UDP {
		IPv4_address %s
		IPv4_Destination_Address %s
		Port 3780
		Interface sync0
		SndSocketBuffer 8388608
		RcvSocketBuffer 8388608
		Checksum on
	}
}
General {
	HashSize 262144
	HashLimit 524288
	LogFile %s
	Syslog off
	LockFile %s
	UNIX {
		Path %s
	}
	NetlinkBufferSize 8388608
	NetlinkBufferSizeMaxGrowth 33554432
	Filter From Userspace {
		Protocol Accept {
			TCP
		}
		Address Ignore {
			IPv4_address 127.0.0.1
			IPv4_address %s
			IPv4_address %s
		}
	}
}
`

// externalRe reads the external cache's entries from `conntrackd -s`.
var externalRe = regexp.MustCompile(`(?s)cache external:\s*current active connections:\s*(\d+)`)

func benchConntrackd(b *testing.B, bin string) ctRound {
	top := benchTop(b)
	dir := b.TempDir()
	var confs [2]string
	var procs [2]*exec.Cmd
	for i, d := range top.Directors {
		local, peer := d.If(netlab.IfSync).Addr4, top.Directors[1-i].If(netlab.IfSync).Addr4
		confs[i] = filepath.Join(dir, fmt.Sprintf("ctd%d.conf", i))
		sock := filepath.Join(dir, fmt.Sprintf("ctd%d.sock", i))
		os.WriteFile(confs[i], []byte(fmt.Sprintf(conntrackdConf, local, peer, filepath.Join(dir, fmt.Sprintf("ctd%d.log", i)),
			filepath.Join(dir, fmt.Sprintf("ctd%d.lock", i)), sock, local, peer)), 0o600)
		cmd := exec.Command(bin, "-C", confs[i])
		logf, _ := os.Create(filepath.Join(dir, fmt.Sprintf("ctd%d.out", i)))
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := d.Start(cmd); err != nil {
			b.Fatal(err)
		}
		procs[i] = cmd
		b.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
			if b.Failed() {
				out, _ := os.ReadFile(filepath.Join(dir, fmt.Sprintf("ctd%d.log", i)))
				b.Logf("conntrackd %d log:\n%s", i, out)
			}
		})
		poll(b, "conntrackd's socket", 10*time.Second, func() bool { _, err := os.Stat(sock); return err == nil })
	}
	ctl := func(i int, args ...string) string {
		out, err := top.Directors[i].Run(context.Background(), bin, append([]string{"-C", confs[i]}, args...)...)
		if err != nil {
			b.Fatalf("conntrackd %s: %v %s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	external := func() int {
		m := externalRe.FindStringSubmatch(ctl(1, "-s", "cache"))
		if m == nil {
			m = externalRe.FindStringSubmatch(ctl(1, "-s"))
		}
		if m == nil {
			b.Fatalf("no external cache count in conntrackd -s:\n%s", ctl(1, "-s"))
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	time.Sleep(500 * time.Millisecond) // both up and talking
	rss0, _ := procMemory(b, procs[1].Process.Pid)
	bytes0 := syncBytes(b, top)
	start := time.Now()
	createFlows(b, top)
	poll(b, "100k flows in conntrackd's external cache", 60*time.Second, func() bool { return external() >= benchFlows })
	var r ctRound
	r.sync = time.Since(start)
	time.Sleep(200 * time.Millisecond)
	r.bytesPerFlow = float64(syncBytes(b, top)-bytes0) / benchFlows
	rss1, _ := procMemory(b, procs[1].Process.Pid)
	r.rssPerFlow = (rss1 - rss0) / benchFlows
	base := ctCount(b, top.Directors[1])
	start = time.Now()
	ctl(1, "-c")
	poll(b, "conntrackd's committed flows in the backup's kernel", 60*time.Second, func() bool { return ctCount(b, top.Directors[1]) >= base+benchFlows })
	r.commit = time.Since(start)
	return r
}

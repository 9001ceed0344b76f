package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/ipvs"
)

// fastBuckets steps the unknown-peer buckets every second, up to 1,024 at
// a time, so a test sees them follow the load in seconds.
const fastBuckets = "unknown_peers: {interval: 1s, max_changes: 1024, quiet: 1s}\n"

// skewedLoad is a CSV of n tunnels alternating between node0 and node1
// (node2 gets none), after the given lines.
func skewedLoad(n int, lines ...string) string {
	var b strings.Builder
	b.WriteString("id,peer,subnets,node\n")
	for _, l := range lines {
		b.WriteString(l + "\n")
	}
	for i := range n {
		fmt.Fprintf(&b, "load-%d,100.64.%d.%d,11.%d.%d.0/24,node%d\n", i, i/250, i%250+1, i/250, i%250, i%2)
	}
	return b.String()
}

// bucketsPerNode counts a bucket map by node index (mark - 1; -1: none).
func bucketsPerNode(buckets []uint16) map[int]int {
	out := map[int]int{}
	for _, m := range buckets {
		out[int(m)-1]++
	}
	return out
}

func waitUntil(t *testing.T, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(limit); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out after %s waiting for %s", limit, what)
}

// TestDaemonBucketsFillTheEmptiestNode runs the daemon in a director
// namespace (route-only) with real packets: when two nodes hold every
// tunnel, the master's steps give the empty node the unknown-peer
// buckets, in the kernel as in the table; first packets of unknown peers
// then land where the kernel's bucket map says (BucketPick agrees), on
// the empty node, and are pinned there; a pinned tunnel whose bucket
// moved stays on its node.
func TestDaemonBucketsFillTheEmptiestNode(t *testing.T) {
	e := newE2E(t)
	f, err := os.OpenFile(e.config, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(fastBuckets)
	f.Close()
	e.start()
	if s := e.status().UnknownPeers; s == nil || s.Buckets != 4096 || len(s.Nodes) != 3 {
		t.Fatalf("buckets at start: %+v", s)
	}
	p0 := e.top.Peers[0].If(netlab.IfOutside)
	e.importTunnels(skewedLoad(600, fmt.Sprintf("pinned,%s,10.70.0.0/24,node0", p0.Addr4)))
	start := time.Now()
	waitUntil(t, "node2 to hold every bucket", 30*time.Second, func() bool { return e.status().UnknownPeers.Nodes["node2"] == 4096 })
	t.Logf("node2 took every bucket %s after the import", time.Since(start).Round(100*time.Millisecond))
	e.waitKernel()
	seed := director.DefaultConfig().HashSeed
	buckets := readKernel(t, e.top.Directors[0], e.config).Buckets
	if got := bucketsPerNode(buckets); got[2] != 4096 {
		t.Fatalf("the kernel's buckets by node: %v", got)
	}
	// The pinned peer's bucket is node2's now; the peer stays on node0.
	if ipvs.BucketPick(p0.Addr4, seed, buckets) != 3 {
		t.Fatal("the pinned peer's bucket is not node2's: nothing to prove")
	}
	e.expectAt(0, "pinned-esp", func(tag string) error { return e.top.Peers[0].SendESP(p0.Addr4, e.top.VIP4, 0x7001, 1, tag) })
	e.expectAt(0, "pinned-ike", func(tag string) error {
		return e.top.Peers[0].SendUDP(netip.AddrPortFrom(p0.Addr4, 500), netip.AddrPortFrom(e.top.VIP4, 500), []byte(tag))
	})
	// Unknown peers: their first packets follow the kernel's bucket map
	// to node2, and the daemon pins them there.
	peer := e.top.Peers[2]
	var srcs []netip.Addr
	for i := range 12 {
		a := netip.AddrFrom4([4]byte{198, 51, 100, byte(150 + i)})
		if err := peer.AddAddr(netlab.IfOutside, netip.PrefixFrom(a, 32)); err != nil {
			t.Fatal(err)
		}
		srcs = append(srcs, a)
	}
	for i, src := range srcs {
		want := int(ipvs.BucketPick(src, seed, buckets)) - 1
		if i%2 == 0 {
			e.expectAt(want, "unknown-ike", func(tag string) error {
				return peer.SendUDP(netip.AddrPortFrom(src, 500), netip.AddrPortFrom(e.top.VIP4, 500), []byte(tag))
			})
		} else {
			e.expectAt(want, "unknown-esp", func(tag string) error { return peer.SendESP(src, e.top.VIP4, 0x7100+uint32(i), 1, tag) })
		}
	}
	t.Logf("first packets of %d unknown peers at the nodes BucketPick named, %s after the import", len(srcs), time.Since(start).Round(100*time.Millisecond))
	for _, src := range srcs {
		waitUntil(t, "the unknown peers pinned on node2", 10*time.Second, func() bool {
			out, err := runArgs(t, "--socket", e.socket, "show", "tunnel", "learned-"+src.String())
			return err == nil && strings.Contains(out, "node2")
		})
	}
	t.Logf("all pinned %s after the import", time.Since(start).Round(100*time.Millisecond))
}

// TestPairBucketsReplicated: a replicated pair (real binaries, namespaces)
// programs the same unknown-peer bucket map in both kernels, the master's,
// before and after its steps follow a load change; the backup never
// steps; a takeover keeps the map.
func TestPairBucketsReplicated(t *testing.T) {
	netlab.RequireRoot(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 2, Directors: 2, Nodes: 3, VIPOnDirectors: true})
	dir := t.TempDir()
	ds := startPairWith(t, top, dir, pairOptions{extra: fastBuckets}, "master", "backup")
	for _, d := range ds {
		waitUntil(t, "daemon API", 30*time.Second, func() bool { _, err := apiStatus(d.socket); return err == nil })
	}
	inSync := func() bool {
		s0, s1 := ds[0].status(t), ds[1].status(t)
		return s0.UnknownPeers != nil && s0.UnknownPeers.Buckets == 4096 && s1.Revision == s0.Revision &&
			s1.KernelRevision == s0.Revision && s0.KernelRevision == s0.Revision
	}
	same := func(what string) []uint16 {
		t.Helper()
		m := readKernel(t, ds[0].host, ds[0].config).Buckets
		b := readKernel(t, ds[1].host, ds[1].config).Buckets
		if len(m) != 4096 || !slices.Equal(m, b) {
			t.Fatalf("%s: the kernels' bucket maps differ: master %v, backup %v", what, bucketsPerNode(m), bucketsPerNode(b))
		}
		t.Logf("%s: both kernels hold the same 4096 buckets, by node %v", what, bucketsPerNode(m))
		return m
	}
	waitUntil(t, "the master's first buckets on both", 30*time.Second, inSync)
	first := same("at start")

	f := filepath.Join(dir, "load.csv")
	os.WriteFile(f, []byte(skewedLoad(600)), 0o600)
	if out, err := ds[0].cli(t, "import", f); err != nil {
		t.Fatalf("import: %v %s", err, out)
	}
	waitUntil(t, "the master's steps to give node2 every bucket, on both", 60*time.Second, func() bool {
		return ds[0].status(t).UnknownPeers.Nodes["node2"] == 4096 && inSync()
	})
	moved := same("after the load change")
	if slices.Equal(first, moved) {
		t.Fatal("the buckets did not move")
	}
	if s := ds[1].status(t).UnknownPeers; s.Steps != 0 {
		t.Fatalf("the backup stepped: %+v", s)
	}

	// Takeover: the new master keeps the map (nothing to balance).
	rev := ds[0].status(t).Revision
	if _, err := ds[0].cli(t, "ctl", "role", "backup"); err != nil {
		t.Fatal(err)
	}
	if _, err := ds[1].cli(t, "ctl", "role", "master"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // three intervals
	if s := ds[1].status(t); s.Revision != rev || s.UnknownPeers.Moved != 0 {
		t.Fatalf("the takeover changed the buckets: revision %d -> %d, %+v", rev, s.Revision, s.UnknownPeers)
	}
	if !slices.Equal(readKernel(t, ds[1].host, ds[1].config).Buckets, moved) {
		t.Fatal("the new master's kernel changed its bucket map")
	}
}

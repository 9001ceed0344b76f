package ipvs

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/cputime"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/ipvs/nft"
)

// benchLab is one director namespace with an inside link, enough for the
// node routes; benchmarks measure programming, not forwarding.
func benchLab(b *testing.B) (*netlab.NS, func()) {
	b.Helper()
	netlab.RequireRoot(b)
	l := netlab.NewLab()
	d, _ := l.Pair(b, "dir", "nodes", "in0")
	for _, p := range []string{"192.0.2.1/24", "2001:db8:2::1/64"} {
		if err := d.AddAddr("in0", netip.MustParsePrefix(p)); err != nil {
			b.Fatal(err)
		}
	}
	return d, func() { l.Close() }
}

func bigDesired(n int) *Desired { return bigDesiredNodes(n, 3) }

// bigDesiredNodes is n tunnels (a peer and a /27 each) spread round-robin
// over nodes nodes.
func bigDesiredNodes(n, nodes int) *Desired {
	d := &Desired{
		VIPs:     []netip.Addr{netip.MustParseAddr("203.0.113.1"), netip.MustParseAddr("2001:db8:ffff::1")},
		Peers:    make(map[netip.Addr]uint16, n),
		Subnets:  make(map[netip.Prefix]uint16, n),
		HashSeed: 42,
	}
	for i := 1; i <= nodes; i++ {
		d.Nodes = append(d.Nodes, Node{Mark: uint16(i), Name: fmt.Sprintf("node%d", i),
			Addr: netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}), Addr6: netip.MustParseAddr(fmt.Sprintf("2001:db8:2::%x", 10+i)), Active: true})
	}
	for i := 0; i < n; i++ {
		m := uint16(i%nodes + 1)
		p := uint32(100<<24|64<<16) + uint32(i)
		d.Peers[netip.AddrFrom4([4]byte{byte(p >> 24), byte(p >> 16), byte(p >> 8), byte(p)})] = m
		s := uint32(10<<24) + uint32(i)*32
		d.Subnets[netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(s >> 24), byte(s >> 16), byte(s >> 8), byte(s)}), 27)] = m
	}
	return d
}

// nftFile writes the same table as nft(8) input: the peer map, and for the
// subnets what the director loads too, one exact-match map per prefix
// length looked up with the masked destination (an interval map would be
// a different, slower structure to load).
func nftFile(b *testing.B, d *Desired, cfg Config) string {
	cfg, _ = cfg.withDefaults()
	var s strings.Builder
	s.WriteString("table inet tunneldirector {\n")
	// Sized as the director sizes its maps (nft.MapSize), so both get
	// the kernel's fixed-size hash.
	fmt.Fprintf(&s, "map peers4 { type ipv4_addr : mark; size %d; elements = {\n", nft.MapSize(len(d.Peers)))
	first := true
	for a, m := range d.Peers {
		if !first {
			s.WriteString(",\n")
		}
		first = false
		fmt.Fprintf(&s, "%s : %#x", a, cfg.Fwmark(m))
	}
	s.WriteString("} }\n")
	byLen := map[int][]netip.Prefix{}
	for p := range d.Subnets {
		if !p.Addr().Is4() {
			b.Fatalf("nftFile writes IPv4 subnets only, not %s", p)
		}
		byLen[p.Bits()] = append(byLen[p.Bits()], p)
	}
	lens := slices.Sorted(maps.Keys(byLen))
	for _, l := range lens {
		fmt.Fprintf(&s, "map sub4_%d { type ipv4_addr : mark; size %d; elements = {\n", l, nft.MapSize(len(byLen[l])))
		for i, p := range byLen[l] {
			if i > 0 {
				s.WriteString(",\n")
			}
			fmt.Fprintf(&s, "%s : %#x", p.Addr(), cfg.Fwmark(d.Subnets[p]))
		}
		s.WriteString("} }\n")
	}
	s.WriteString("set vips4 { type ipv4_addr; elements = { 203.0.113.1 } }\n")
	s.WriteString("chain prerouting { type filter hook prerouting priority mangle;\n")
	for _, sel := range []string{"meta l4proto esp", "meta l4proto ah", "udp dport 500", "udp dport 4500"} {
		fmt.Fprintf(&s, "%s ip daddr @vips4 meta mark set ip saddr map @peers4\n", sel)
	}
	for i := len(lens) - 1; i >= 0; i-- {
		mask := netip.PrefixFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), lens[i]).Masked().Addr()
		fmt.Fprintf(&s, "meta mark set ip daddr & %s map @sub4_%d\n", mask, lens[i])
	}
	s.WriteString("}\n}\n")
	f := filepath.Join(b.TempDir(), "ruleset.nft")
	if err := os.WriteFile(f, []byte(s.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	return f
}

const benchTunnels = 100000

// BenchmarkFullSync100k loads 100,000 tunnels (peer + /27 each; another
// count with TD_BENCH_TUNNELS) into an empty kernel with one Sync, and
// times nft -f of an equivalent file in the same namespace for comparison
// (metric nft-f-s and ratio); sync-user-s and sync-sys-s split the sync's
// CPU time between the director's code and the kernel's insertion.
func BenchmarkFullSync100k(b *testing.B) {
	n := benchSize(b, benchTunnels)
	ns, done := benchLab(b)
	defer done()
	d := bigDesired(n)
	file := nftFile(b, d, Config{})
	ctx := context.Background()
	var nftTotal, syncTotal, syncUser, syncSys time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		dp, err := newIn(Config{}, ns.NsHandle())
		if err != nil {
			b.Fatal(err)
		}
		if err := dp.Teardown(ctx); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		if out, err := ns.Run(ctx, "nft", "-f", file); err != nil {
			netlab.Require(b, "nft binary", fmt.Errorf("%v: %s", err, out))
		}
		nftTotal += time.Since(t0)
		if err := dp.Teardown(ctx); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		t0 = time.Now()
		u0, s0 := cputime.Split()
		st, err := dp.Sync(ctx, d)
		syncTotal += time.Since(t0)
		u1, s1 := cputime.Split()
		syncUser, syncSys = syncUser+u1-u0, syncSys+s1-s0
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if st.Added < 2*n {
			b.Fatalf("sync added %d", st.Added)
		}
		dp.Close()
		b.StartTimer()
	}
	b.ReportMetric(nftTotal.Seconds()/float64(b.N), "nft-f-s")
	b.ReportMetric(syncTotal.Seconds()/float64(b.N), "sync-s")
	b.ReportMetric(syncTotal.Seconds()/nftTotal.Seconds(), "sync/nft-f")
	b.ReportMetric(syncUser.Seconds()/float64(b.N), "sync-user-s")
	b.ReportMetric(syncSys.Seconds()/float64(b.N), "sync-sys-s")
}

func loaded(b *testing.B) (*dataplane, *Desired, func()) {
	ns, done := benchLab(b)
	d := bigDesired(benchTunnels)
	dp := synced(b, ns, d)
	return dp, d, func() { dp.Close(); done() }
}

// synced is a dataplane in ns with the default Config, synced to d.
func synced(b *testing.B, ns *netlab.NS, d *Desired) *dataplane {
	b.Helper()
	dp, err := newIn(Config{}, ns.NsHandle())
	if err != nil {
		b.Fatal(err)
	}
	if _, err := dp.Sync(context.Background(), d); err != nil {
		b.Fatal(err)
	}
	return dp
}

// syncedBig is a dataplane in a namespace of its own with TD_BENCH_TUNNELS
// (default 100,000) tunnels of bigDesired synced, both gone with b.
func syncedBig(b *testing.B) (*Desired, *dataplane) {
	ns, done := benchLab(b)
	b.Cleanup(done)
	d := bigDesired(benchSize(b, benchTunnels))
	dp := synced(b, ns, d)
	b.Cleanup(func() { dp.Close() })
	return d, dp
}

// BenchmarkUpdateMove100k moves one tunnel (peer and subnet) per Update
// with 100,000 loaded; reports p50 and p99.
func BenchmarkUpdateMove100k(b *testing.B) { benchMove(b, true) }

// BenchmarkUpdateMovePeer100k moves only the peer (hash map), to separate
// the interval map's cost.
func BenchmarkUpdateMovePeer100k(b *testing.B) { benchMove(b, false) }

func benchMove(b *testing.B, withSubnet bool) {
	dp, d, done := loaded(b)
	defer done()
	peers := make([]netip.Addr, 0, len(d.Peers))
	for a := range d.Peers {
		peers = append(peers, a)
	}
	subs := make([]netip.Prefix, 0, len(d.Subnets))
	for p := range d.Subnets {
		subs = append(subs, p)
	}
	ctx := context.Background()
	var lat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		a, p := peers[i%len(peers)], subs[i%len(subs)]
		m := d.Peers[a]%3 + 1
		d.Peers[a] = m
		t0 := time.Now()
		delta := &Delta{SetPeers: map[netip.Addr]uint16{a: m}}
		if withSubnet {
			delta.SetSubnets = map[netip.Prefix]uint16{p: m}
		}
		st, err := dp.Update(ctx, delta)
		lat = append(lat, time.Since(t0))
		if err != nil {
			b.Fatal(err)
		}
		if st.Changed+st.Added == 0 {
			b.Fatalf("update did nothing: %+v", st)
		}
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-us")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-us")
}

// BenchmarkNoChangeSync100k is a Sync that finds nothing to do.
func BenchmarkNoChangeSync100k(b *testing.B) {
	dp, d, done := loaded(b)
	defer done()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		st, err := dp.Sync(context.Background(), d)
		if err != nil || st.Added+st.Changed+st.Removed != 0 {
			b.Fatalf("%+v %v", st, err)
		}
	}
}

// BenchmarkVerify100k verifies with 100,000 tunnels loaded: "generation"
// as Verify runs while nobody else changed nftables (routes and services
// read back, the maps trusted by the ruleset generation), "full" reading
// the whole table back and comparing (every fullVerifyEvery-th Verify,
// and whenever the generation moved).
func BenchmarkVerify100k(b *testing.B) {
	dp, _, done := loaded(b)
	defer done()
	for _, full := range []bool{false, true} {
		b.Run(map[bool]string{false: "generation", true: "full"}[full], func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if full {
					dp.genKnown = false
				}
				st, err := dp.Verify(context.Background())
				if err != nil || st.Added+st.Changed+st.Removed != 0 {
					b.Fatalf("%+v %v", st, err)
				}
			}
		})
	}
}

// benchSize is TD_BENCH_TUNNELS, or def.
func benchSize(b *testing.B, def int) int { return benchEnv(b, "TD_BENCH_TUNNELS", def) }

// benchEnv reads a positive number from the environment variable name,
// def when it is not set.
func benchEnv(b *testing.B, name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("%s=%q: want a positive number", name, v)
		}
		return n
	}
	return def
}

// BenchmarkNodeDown takes one of TD_BENCH_NODES (default 16) nodes down
// with TD_BENCH_TUNNELS (default 100,000) tunnels loaded (40,000 and 4
// nodes: the health failover benchmark's 10,000 moves): one Update carrying the node's
// tunnels' moves (1/16 of them: 62,500 at a million) and the new nodes,
// as the reconciler sends it. The node comes back by a full Sync of the
// table before (what a node change cost before deltas carried nodes), so
// both are measured in the same run: metrics update-s, sync-s and their
// ratio.
func BenchmarkNodeDown(b *testing.B) {
	n := benchSize(b, benchTunnels)
	nn := benchEnv(b, "TD_BENCH_NODES", 16)
	ns, done := benchLab(b)
	defer done()
	d := bigDesiredNodes(n, nn)
	// Buckets as the daemon has them (4,096 by default): the hash keeps
	// its bucket count when a node goes, so the chain stays as it is.
	d.Buckets = make([]uint16, 4096)
	for i := range d.Buckets {
		d.Buckets[i] = uint16(i%nn + 1)
	}
	dp := synced(b, ns, d)
	defer dp.Close()
	ctx := context.Background()
	var updTotal, updUser, updSys, syncTotal time.Duration
	moved := 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		down := uint16(i%nn + 1)
		nodes := slices.Clone(d.Nodes)
		nodes[down-1].Active, nodes[down-1].Down = false, true
		dl := &Delta{SetPeers: map[netip.Addr]uint16{}, SetSubnets: map[netip.Prefix]uint16{}, Buckets: map[int]uint16{}, Nodes: nodes}
		to := down%uint16(nn) + 1
		for i, m := range d.Buckets {
			if m == down {
				dl.Buckets[i] = to
			}
		}
		for a, m := range d.Peers {
			if m == down {
				dl.SetPeers[a] = to
			}
		}
		for p, m := range d.Subnets {
			if m == down {
				dl.SetSubnets[p] = to
			}
		}
		moved = len(dl.SetPeers)
		b.StartTimer()
		t0 := time.Now()
		u0, s0 := cputime.Split()
		st, err := dp.Update(ctx, dl)
		updTotal += time.Since(t0)
		u1, s1 := cputime.Split()
		updUser += u1 - u0
		updSys += s1 - s0
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if st.Changed < 2*moved {
			b.Fatalf("node down changed %d elements, want at least %d", st.Changed, 2*moved)
		}
		t0 = time.Now()
		if _, err := dp.Sync(ctx, d); err != nil {
			b.Fatal(err)
		}
		syncTotal += time.Since(t0)
		b.StartTimer()
	}
	b.ReportMetric(float64(moved), "tunnels-moved")
	b.ReportMetric(updTotal.Seconds()/float64(b.N), "update-s")
	b.ReportMetric((updUser+updSys).Seconds()/float64(b.N), "update-cpu-s")
	b.ReportMetric(updUser.Seconds()/float64(b.N), "update-user-s")
	b.ReportMetric(updSys.Seconds()/float64(b.N), "update-sys-s")
	b.ReportMetric(syncTotal.Seconds()/float64(b.N), "sync-s")
	b.ReportMetric(updTotal.Seconds()/syncTotal.Seconds(), "update/sync")
}

// BenchmarkNewLength times one-tunnel Updates with TD_BENCH_TUNNELS
// (default 100,000) tunnels loaded, each of a peer and a /27: the first
// subnet of a prefix length no tunnel has (its map and rule appear), the
// last one going (they go), and for comparison a subnet of the length the
// table has. Reported per Update: newlen-s, gonelen-s and samelen-s, with
// the director's CPU time (user and system: the kernel's work is system
// time of the director's sendmsg).
func BenchmarkNewLength(b *testing.B) {
	_, dp := syncedBig(b)
	ctx := context.Background()
	peer := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}) }
	var wall, cpu [3]time.Duration
	var count [3]int
	// timed runs one Update as kind k and checks what it changed.
	timed := func(k int, dl *Delta, added, removed int) {
		b.StartTimer()
		t0 := time.Now()
		u0, s0 := cputime.Split()
		st, err := dp.Update(ctx, dl)
		u1, s1 := cputime.Split()
		wall[k] += time.Since(t0)
		cpu[k] += u1 - u0 + s1 - s0
		count[k]++
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		if st.Added != added || st.Removed != removed {
			b.Fatalf("update %d: %+v, want +%d -%d", k, st, added, removed)
		}
	}
	b.ResetTimer()
	b.StopTimer()
	for i := 0; i < b.N; i++ {
		a := peer(i)
		p30 := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(i >> 6), byte(i << 2)}), 30)
		p27 := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 20, byte(i >> 3), byte(i << 5)}), 27)
		timed(0, &Delta{SetPeers: map[netip.Addr]uint16{a: 1}, SetSubnets: map[netip.Prefix]uint16{p30: 1}}, 2, 0)
		timed(1, &Delta{DeletePeers: []netip.Addr{a}, DeleteSubnets: []netip.Prefix{p30}}, 0, 2)
		timed(2, &Delta{SetPeers: map[netip.Addr]uint16{a: 1}, SetSubnets: map[netip.Prefix]uint16{p27: 1}}, 2, 0)
		timed(2, &Delta{DeletePeers: []netip.Addr{a}, DeleteSubnets: []netip.Prefix{p27}}, 0, 2)
	}
	for k, name := range []string{"newlen", "gonelen", "samelen"} {
		b.ReportMetric(wall[k].Seconds()/float64(count[k]), name+"-s")
		b.ReportMetric(cpu[k].Seconds()/float64(count[k]), name+"-cpu-s")
	}
}

// BenchmarkBucketStep100k times the nftables transaction of one step of
// the unknown-peer buckets with 100,000 tunnels and 4,096 buckets loaded:
// a balancing step of max_changes (256, the default) buckets with one
// pending pin in the same transaction, and a step that reassigns all
// 4,096 (the first assignment, or every bucket of a failed node at
// once); reports p50 and p99.
func BenchmarkBucketStep100k(b *testing.B) {
	for _, changes := range []int{256, 4096} {
		b.Run(fmt.Sprintf("changes=%d", changes), func(b *testing.B) {
			ns, done := benchLab(b)
			defer done()
			d := bigDesired(benchTunnels)
			d.Buckets = make([]uint16, 4096)
			for i := range d.Buckets {
				d.Buckets[i] = uint16(i%3 + 1)
			}
			dp := synced(b, ns, d)
			defer dp.Close()
			ctx := context.Background()
			var lat []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				delta := &Delta{Buckets: make(map[int]uint16, changes)}
				for k := range changes {
					j := (i*changes + k) % len(d.Buckets)
					d.Buckets[j] = d.Buckets[j]%3 + 1
					delta.Buckets[j] = d.Buckets[j]
				}
				pin := netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)})
				delta.SetPeers = map[netip.Addr]uint16{pin: 1}
				t0 := time.Now()
				st, err := dp.Update(ctx, delta)
				lat = append(lat, time.Since(t0))
				if err != nil {
					b.Fatal(err)
				}
				if st.Changed+st.Added < changes {
					b.Fatalf("step of %d buckets changed %+v", changes, st)
				}
			}
			b.StopTimer()
			if got, err := dp.Read(ctx); err != nil || !slices.Equal(got.Buckets, d.Buckets) {
				b.Fatalf("the kernel's buckets differ from the last step's (%v)", err)
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-us")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-us")
		})
	}
}

// BenchmarkMoveDuringVerify measures moves (one tunnel's peer and subnet
// per Update) issued while Verify's background read of the whole table
// runs, against the same moves with no read running, and the read's own
// duration; TD_BENCH_TUNNELS sets the table (default 100,000):
//
//	TD_BENCH_TUNNELS=1000000 go test -run '^$' -bench MoveDuringVerify -benchtime 1x ./ipvs/
//
// The read, taken when it arrives, must repair nothing: the moves made
// during it are taken from the model.
func BenchmarkMoveDuringVerify(b *testing.B) {
	d, dp := syncedBig(b)
	ctx := context.Background()
	var peers []netip.Addr
	for a := range d.Peers {
		if peers = append(peers, a); len(peers) == 1000 {
			break
		}
	}
	i := 0
	move := func() time.Duration {
		a := peers[i%len(peers)]
		i++
		m := d.Peers[a]%3 + 1
		d.Peers[a] = m
		t0 := time.Now()
		if _, err := dp.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{a: m}}); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	var quiet, during []time.Duration
	var reads []float64
	b.ResetTimer()
	for range b.N {
		for range 200 {
			quiet = append(quiet, move())
		}
		t0 := time.Now()
		dp.startRead()
		for len(dp.pending) == 0 {
			during = append(during, move())
			time.Sleep(5 * time.Millisecond)
		}
		reads = append(reads, time.Since(t0).Seconds())
		st, err := dp.Verify(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if st.Added+st.Changed+st.Removed != 0 {
			b.Fatalf("the read taken after %d moves during it repaired %+v", len(during), st)
		}
	}
	pct := func(v []time.Duration, p float64) float64 {
		s := slices.Clone(v)
		slices.Sort(s)
		return s[min(len(s)-1, int(float64(len(s))*p))].Seconds() * 1000
	}
	b.ReportMetric(slices.Max(reads), "read-s")
	b.ReportMetric(float64(len(during)), "moves-during")
	b.ReportMetric(pct(quiet, 0.5), "quiet-p50-ms")
	b.ReportMetric(pct(quiet, 0.99), "quiet-p99-ms")
	b.ReportMetric(pct(during, 0.5), "during-p50-ms")
	b.ReportMetric(pct(during, 0.99), "during-p99-ms")
}

// BenchmarkTargetMemory measures the heap a target (the kernel state the
// dataplane keeps; its model of the kernel shares the maps) holds for
// TD_BENCH_TUNNELS tunnels (default 1,000,000; a peer and a /27 each),
// and one garbage collection with it alive:
//
//	go test -run '^$' -bench TargetMemory -benchtime 1x ./ipvs/
func BenchmarkTargetMemory(b *testing.B) {
	n := benchSize(b, 1_000_000)
	d := bigDesiredNodes(n, 16)
	c, err := Config{}.withDefaults()
	if err != nil {
		b.Fatal(err)
	}
	var m0, m1 runtime.MemStats
	var gc time.Duration
	for range b.N {
		runtime.GC()
		runtime.ReadMemStats(&m0)
		k, err := c.target(ModeRouteOnly, d)
		if err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		runtime.ReadMemStats(&m1)
		t0 := time.Now()
		runtime.GC()
		gc += time.Since(t0)
		runtime.KeepAlive(k)
	}
	b.ReportMetric(float64(m1.HeapAlloc-m0.HeapAlloc)/(1<<20), "target-MB")
	b.ReportMetric(gc.Seconds()*1000/float64(b.N), "gc-ms")
}

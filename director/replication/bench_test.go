package replication

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/store"
)

func benchNodes(n int) []affinity.Change {
	var cs []affinity.Change
	for i := range n {
		cs = append(cs, nodeChange(i, affinity.NodeActive, 100))
	}
	return cs
}

// benchTunnels returns n new tunnels from id on: one peer and one /27 each.
func benchTunnels(from, n int) []affinity.Change {
	cs := make([]affinity.Change, 0, n)
	for id := from; id < from+n; id++ {
		var a, s [4]byte
		binary.BigEndian.PutUint32(a[:], 0x64400000+uint32(id))
		binary.BigEndian.PutUint32(s[:], 0x0a000000+uint32(id)*32)
		cs = append(cs, affinity.Change{Kind: affinity.PutTunnel, Reason: "import", Tunnel: &affinity.Tunnel{
			ID: fmt.Sprintf("tun-%07d", id), Peer: netip.AddrFrom4(a),
			Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4(s), 27)}}})
	}
	return cs
}

// lagMeter records when the master committed each revision and when the
// backup's store reached it.
type lagMeter struct {
	mu     sync.Mutex
	commit []struct {
		rev uint64
		at  time.Time
	}
	next int
	max  time.Duration
}

// watch follows both stores' change logs, each through its own cursor,
// until stop is called.
func (m *lagMeter) watch(b *testing.B, master, backup *store.Store) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	follow := func(s *store.Store, fn func(rev uint64, at time.Time)) {
		cur, err := s.Changes(s.Revision())
		if err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer cur.Close()
			for {
				select {
				case <-done:
					return
				case <-cur.Notify():
				}
				now := time.Now()
				for {
					bt, ok, err := cur.Next()
					if err != nil || !ok {
						break
					}
					m.mu.Lock()
					fn(bt.Revision, now)
					m.mu.Unlock()
				}
			}
		}()
	}
	follow(master, func(rev uint64, at time.Time) {
		m.commit = append(m.commit, struct {
			rev uint64
			at  time.Time
		}{rev, at})
	})
	follow(backup, func(rev uint64, at time.Time) {
		for m.next < len(m.commit) && m.commit[m.next].rev <= rev {
			m.max = max(m.max, at.Sub(m.commit[m.next].at))
			m.next++
		}
	})
	return func() { close(done); wg.Wait() }
}

const sustainedChanges = 100_000

// batchSizes are the commit sizes the sustained benchmarks try: an
// operator's import commits thousands at once, learned tunnels come a few
// at a time but the store caps how many commits a second it makes.
var batchSizes = []int{500, 5000}

// BenchmarkSustainedFake: the master commits 100,000 new tunnels in
// batches of 500 while the backup follows over the in-memory transport,
// both stepped in one goroutine (so master and backup commits do not
// overlap: a lower bound).
func BenchmarkSustainedFake(b *testing.B) {
	for _, sustainedBatch := range batchSizes {
		b.Run(fmt.Sprintf("batch=%d", sustainedBatch), func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				p := newPair(b, FakeConfig{Seed: 1}, nil)
				p.startBoth()
				commit(p.st[0], benchNodes(16))
				p.settle(time.Second)
				var lm lagMeter
				stopLag := lm.watch(b, p.st[0], p.st[1])
				b.StartTimer()
				start := time.Now()
				for i := 0; i < sustainedChanges; i += sustainedBatch {
					if !commit(p.st[0], benchTunnels(i, sustainedBatch)) {
						b.Fatal("commit failed")
					}
					p.step()
				}
				for p.st[1].Revision() != p.st[0].Revision() {
					p.step()
				}
				el := time.Since(start)
				b.StopTimer()
				stopLag()
				b.ReportMetric(float64(sustainedChanges)/el.Seconds(), "changes/s")
				b.ReportMetric(float64(lm.max.Milliseconds()), "max-lag-ms")
				b.StartTimer()
			}
		})
	}
}

// udpPair wires two replicators over loopback UDP, running on real time.
func udpPair(tb testing.TB, s0, s1 *store.Store, mod func(*Config)) (r0, r1 *Replicator, stop func()) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	u0, err := ListenUDP(UDPConfig{Local: lo, Peer: netip.MustParseAddrPort("127.0.0.1:9")})
	if err != nil {
		tb.Fatal(err)
	}
	u1, err := ListenUDP(UDPConfig{Local: lo, Peer: u0.LocalAddr()})
	if err != nil {
		tb.Fatal(err)
	}
	u0.SetPeer(u1.LocalAddr())
	c0 := Config{ID: 1, Key: testKey, Store: s0, Transport: u0}
	c1 := Config{ID: 2, Key: testKey, Store: s1, Transport: u1}
	if mod != nil {
		mod(&c0)
		mod(&c1)
	}
	if r0, err = New(c0); err != nil {
		tb.Fatal(err)
	}
	if r1, err = New(c1); err != nil {
		tb.Fatal(err)
	}
	r0.SetRole(RoleMaster)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, r := range []*Replicator{r0, r1} {
		wg.Add(1)
		go func() { defer wg.Done(); r.Run(ctx) }()
	}
	return r0, r1, func() { cancel(); wg.Wait(); u0.Close(); u1.Close() }
}

// BenchmarkSustainedUDP: the same load over loopback UDP with both
// replicators running concurrently, as in production.
func BenchmarkSustainedUDP(b *testing.B) {
	for _, sustainedBatch := range batchSizes {
		b.Run(fmt.Sprintf("batch=%d", sustainedBatch), func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				dir := b.TempDir()
				s0 := openStore(b, filepath.Join(dir, "m.db"), 0)
				s1 := openStore(b, filepath.Join(dir, "b.db"), 0)
				commit(s0, benchNodes(16))
				_, r1, stop := udpPair(b, s0, s1, nil)
				for !r1.Ready() {
					time.Sleep(time.Millisecond)
				}
				var lm lagMeter
				stopLag := lm.watch(b, s0, s1)
				b.StartTimer()
				start := time.Now()
				for i := 0; i < sustainedChanges; i += sustainedBatch {
					if !commit(s0, benchTunnels(i, sustainedBatch)) {
						b.Fatal("commit failed")
					}
				}
				for s1.Revision() != s0.Revision() {
					time.Sleep(100 * time.Microsecond)
				}
				el := time.Since(start)
				b.StopTimer()
				stop()
				stopLag()
				b.ReportMetric(float64(sustainedChanges)/el.Seconds(), "changes/s")
				b.ReportMetric(float64(lm.max.Milliseconds()), "max-lag-ms")
				b.StartTimer()
			}
		})
	}
}

var (
	master100kOnce sync.Once
	master100kPath string
)

// master100k builds, once, a store of 100,000 tunnels over 16 nodes.
func master100k(b *testing.B) string {
	master100kOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tdrepl-bench")
		if err != nil {
			b.Fatal(err)
		}
		master100kPath = filepath.Join(dir, "m100k.db")
		s, err := store.Open(store.Options{Path: master100kPath})
		if err != nil {
			b.Fatal(err)
		}
		commit(s, benchNodes(16))
		if !commit(s, benchTunnels(0, 100_000)) {
			b.Fatal("commit 100k failed")
		}
		s.Close()
	})
	return master100kPath
}

func benchCatchup(b *testing.B, loss float64) {
	path := master100k(b)
	for b.Loop() {
		b.StopTimer()
		p := newPair(b, FakeConfig{Seed: 5, Drop: loss}, nil)
		p.st[0].Close()
		p.st[0] = openStore(b, path, 0)
		p.start(0)
		p.start(1)
		b.StartTimer()
		start := time.Now()
		for p.st[1].Revision() != p.st[0].Revision() {
			p.step()
		}
		el := time.Since(start)
		b.StopTimer()
		if !p.equal() {
			b.Fatal(p.describeDiff())
		}
		if p.r[1].Status().Counters.SnapshotsApplied == 0 {
			b.Fatal("no snapshot")
		}
		b.ReportMetric(el.Seconds(), "catchup-s")
		p.st[0].Close()
		b.StartTimer()
	}
}

// BenchmarkCatchup100k: a fresh backup reaches a master of 100,000
// tunnels by snapshot over the in-memory transport.
func BenchmarkCatchup100k(b *testing.B) { benchCatchup(b, 0) }

// BenchmarkCatchup100kLoss5: the same with 5 percent of datagrams lost.
func BenchmarkCatchup100kLoss5(b *testing.B) { benchCatchup(b, 0.05) }

// BenchmarkCatchup100kUDP: the same over loopback UDP on real time, with
// the default snapshot pacing.
func BenchmarkCatchup100kUDP(b *testing.B) {
	path := master100k(b)
	for b.Loop() {
		b.StopTimer()
		dir := b.TempDir()
		s0, err := store.Open(store.Options{Path: path})
		if err != nil {
			b.Fatal(err)
		}
		s1 := openStore(b, filepath.Join(dir, "b.db"), 0)
		b.StartTimer()
		start := time.Now()
		_, r1, stop := udpPair(b, s0, s1, nil)
		for s1.Revision() != s0.Revision() {
			time.Sleep(time.Millisecond)
		}
		el := time.Since(start)
		b.StopTimer()
		stop()
		if r1.Status().Counters.SnapshotsApplied == 0 {
			b.Fatal("no snapshot")
		}
		s0.Close()
		b.ReportMetric(el.Seconds(), "catchup-s")
		b.StartTimer()
	}
}

// BenchmarkCommitOnly is the baseline: the same commits with no
// replication, to show what the store alone allows.
func BenchmarkCommitOnly(b *testing.B) {
	for _, sustainedBatch := range batchSizes {
		b.Run(fmt.Sprintf("batch=%d", sustainedBatch), func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				s := openStore(b, filepath.Join(b.TempDir(), "m.db"), 0)
				commit(s, benchNodes(16))
				b.StartTimer()
				start := time.Now()
				for i := 0; i < sustainedChanges; i += sustainedBatch {
					if !commit(s, benchTunnels(i, sustainedBatch)) {
						b.Fatal("commit failed")
					}
				}
				b.ReportMetric(float64(sustainedChanges)/time.Since(start).Seconds(), "changes/s")
			}
		})
	}
}

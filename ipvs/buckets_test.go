package ipvs

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/ipvs/nft"
)

// TestBucketsDiff: a Sync programs the bucket map (a bucket without a node,
// or with a mark no node has, holds no element); an Update applies bucket
// changes and pins in one nftables transaction; a bucket outside the
// synced count, or a bucket change after a Sync without buckets, is
// refused and changes nothing.
func TestBucketsDiff(t *testing.T) {
	dp, k := fakeDataplane(t, false)
	d := unitDesired()
	d.Buckets = []uint16{1, 2, 0, 7, 2, 1, 1, 2}
	mustSync(t, dp, d)
	k.take()
	if k.nft.Sig.HashN != 8 || len(k.nft.Hash) != 6 || k.nft.Hash[3] != 0 || k.nft.Hash[1] != dp.cfg.Fwmark(2) {
		t.Fatalf("bucket map after sync: n=%d %v", k.nft.Sig.HashN, k.nft.Hash)
	}
	ctx := context.Background()
	st, err := dp.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{netip.MustParseAddr("192.0.2.200"): 1},
		Buckets: map[int]uint16{0: 2, 2: 1, 5: 0}})
	if err != nil {
		t.Fatal(err)
	}
	if ops := k.take(); len(ops) != 1 || st.Added != 2 || st.Changed != 1 || st.Removed != 1 {
		t.Fatalf("a pin and three bucket changes: %+v in %v, want one transaction", st, ops)
	}
	want := map[uint32]uint32{0: dp.cfg.Fwmark(2), 1: dp.cfg.Fwmark(2), 2: dp.cfg.Fwmark(1), 4: dp.cfg.Fwmark(2), 6: dp.cfg.Fwmark(1), 7: dp.cfg.Fwmark(2)}
	if !maps.Equal(k.nft.Hash, want) {
		t.Fatalf("bucket map after the update: %v, want %v", k.nft.Hash, want)
	}
	// What Update applied is what a Sync of the same table wants.
	d.Buckets[0], d.Buckets[2], d.Buckets[5] = 2, 1, 0
	d.Peers[netip.MustParseAddr("192.0.2.200")] = 1
	if st := mustSync(t, dp, d); st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("sync after the update changed %+v", st)
	}
	if _, err := dp.Update(ctx, &Delta{Buckets: map[int]uint16{8: 1}}); err == nil || !strings.Contains(err.Error(), "bucket 8") {
		t.Fatalf("bucket beyond the count: %v", err)
	}
	got, err := dp.Read(ctx)
	if err != nil || !slices.Equal(got.Buckets, []uint16{2, 2, 1, 0, 2, 0, 1, 2}) {
		t.Fatalf("read back: %v %v", got.Buckets, err)
	}
	d.Buckets = nil
	mustSync(t, dp, d)
	if k.nft.Sig.HashN != 2 || len(k.nft.Hash) != 2 {
		t.Fatalf("without buckets: one per active node, got n=%d %v", k.nft.Sig.HashN, k.nft.Hash)
	}
	if _, err := dp.Update(ctx, &Delta{Buckets: map[int]uint16{0: 2}}); err == nil {
		t.Fatal("a bucket change after a sync without buckets was applied")
	}
	d.Buckets = make([]uint16, nft.MaxHash+1)
	if _, err := dp.Sync(ctx, d); err == nil {
		t.Fatal("more buckets than the map holds")
	}
}

func TestBucketPick(t *testing.T) {
	a := netip.MustParseAddr("198.51.100.7")
	if BucketPick(a, 1, nil) != 0 {
		t.Fatal("no buckets, no node")
	}
	buckets := []uint16{3, 1, 2}
	if HashPick(a, 1, []uint16{2, 3, 1, 3}) != BucketPick(a, 1, []uint16{1, 2, 3}) {
		t.Fatal("HashPick is BucketPick over the sorted active marks")
	}
	if got := BucketPick(a, 1, buckets); got != buckets[Bucket(a, 1, 3)] {
		t.Fatalf("BucketPick %d", got)
	}
	// 4,096 buckets spread addresses evenly: the kernel's jhash is no
	// worse than uniform for the balancing to work on.
	counts := make([]int, 4096)
	for i := range 1 << 20 {
		counts[Bucket(netip.AddrFrom4([4]byte{100, byte(i >> 16), byte(i >> 8), byte(i)}), 0x7d1e5eed, 4096)]++
	}
	if lo, hi := slices.Min(counts), slices.Max(counts); lo < 256*2/3 || hi > 256*4/3 {
		t.Errorf("2^20 addresses over 4,096 buckets: %d to %d per bucket", lo, hi)
	}
}

// bucketLab is the steering lab with a bucket map: 4,096 buckets spread
// over the three nodes, a few without a node.
func bucketLab(t *testing.T) *lab {
	l := newLab(t, Config{})
	l.des.Buckets = make([]uint16, 4096)
	for i := range l.des.Buckets {
		l.des.Buckets[i] = uint16((i*7)%4 + 0) // 0..3: a quarter without a node
	}
	if _, err := l.dp.Sync(context.Background(), l.des); err != nil {
		t.Fatal(err)
	}
	return l
}

// sendUnknown sends one packet (IKE or ESP by address parity) from src
// and expects it at node index want (-1: at no node).
func (l *lab) sendUnknown(t *testing.T, src netip.Addr, tag string, want int) {
	t.Helper()
	kind := "esp"
	if b := src.AsSlice(); b[len(b)-1]%2 == 0 {
		kind = "ike"
	}
	tag = fmt.Sprintf("%s-%s-%s", tag, kind, src)
	if err := send(l.peers[3], kind, src, l.vip(src.Is6()), tag); err != nil {
		t.Fatal(err)
	}
	if want >= 0 {
		l.expectAt(t, want, tag)
		return
	}
	time.Sleep(50 * time.Millisecond)
	for i, c := range l.caps {
		if c.Count(netlab.Tagged(tag)) > 0 {
			t.Fatalf("packet %q of a bucket without a node reached %s", tag, l.top.Nodes[i].Name)
		}
	}
}

// TestNSBucketsMatchKernel: with 4,096 buckets programmed, every unknown
// peer's first packet lands on the node BucketPick computes in Go (the
// kernel's jhash, bucket and map agree with it bit for bit); a bucket
// without a node steers nowhere. After an Update that moves buckets, new
// unknown peers of those buckets land on their new node.
func TestNSBucketsMatchKernel(t *testing.T) {
	l := bucketLab(t)
	srcs := unknownSources(t, l.peers[3], 48, 0)
	hits := map[uint16]int{}
	for _, src := range srcs {
		m := BucketPick(src, l.des.HashSeed, l.des.Buckets)
		hits[m]++
		l.sendUnknown(t, src, "first", int(m)-1)
	}
	t.Logf("%d unknown peers agreed with BucketPick: %v (0: no node)", len(srcs), hits)
	if len(hits) < 4 {
		t.Fatalf("the sample did not reach every kind of bucket: %v", hits)
	}
	// Give every bucket of the next sources another node.
	next := unknownSources(t, l.peers[3], 48, 1)
	delta := &Delta{Buckets: map[int]uint16{}}
	for _, src := range next {
		b := Bucket(src, l.des.HashSeed, len(l.des.Buckets))
		l.des.Buckets[b] = l.des.Buckets[b]%3 + 1
		delta.Buckets[b] = l.des.Buckets[b]
	}
	if _, err := l.dp.Update(context.Background(), delta); err != nil {
		t.Fatal(err)
	}
	for _, src := range next {
		l.sendUnknown(t, src, "moved", int(BucketPick(src, l.des.HashSeed, l.des.Buckets))-1)
	}
	got, err := l.dp.Read(context.Background())
	if err != nil || !slices.Equal(got.Buckets, l.des.Buckets) {
		t.Fatalf("the kernel's bucket map read back differs: %v", err)
	}
}

// TestNSBucketWindow: a bucket change never moves a pinned peer, and a
// peer between its first packet and its pin (its pin window) keeps the
// node its first packet reached when its bucket changes: the classifier
// keeps the first packet's mark for LearnInterval. Without that window
// (flushed by hand) the same peer's next packet would go to the new node:
// its tunnel would be split.
func TestNSBucketWindow(t *testing.T) {
	l := bucketLab(t)
	ctx := context.Background()
	srcs := unknownSources(t, l.peers[3], 8, 0)
	var pinned, waiting []netip.Addr
	first := map[netip.Addr]uint16{}
	for _, src := range srcs {
		m := BucketPick(src, l.des.HashSeed, l.des.Buckets)
		if m == 0 {
			continue
		}
		first[src] = m
		if len(pinned) <= len(waiting) {
			// Pinned before its bucket changes.
			pinned = append(pinned, src)
			l.des.Peers[src] = m
			if _, err := l.dp.Update(ctx, &Delta{SetPeers: map[netip.Addr]uint16{src: m}}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		// First packet now, pin later.
		l.sendUnknown(t, src, "first", int(m)-1)
		waiting = append(waiting, src)
	}
	if len(pinned) == 0 || len(waiting) == 0 {
		t.Fatalf("pinned %v, waiting %v", pinned, waiting)
	}
	// Every bucket of these peers moves to another node, in one
	// transaction with nothing else.
	delta := &Delta{Buckets: map[int]uint16{}}
	for src, m := range first {
		b := Bucket(src, l.des.HashSeed, len(l.des.Buckets))
		l.des.Buckets[b] = m%3 + 1
		delta.Buckets[b] = m%3 + 1
	}
	if _, err := l.dp.Update(ctx, delta); err != nil {
		t.Fatal(err)
	}
	for _, src := range pinned {
		l.sendUnknown(t, src, "pinned", int(first[src])-1)
	}
	for _, src := range waiting {
		l.sendUnknown(t, src, "window", int(first[src])-1)
	}
	// The learner pins the mark the first packet got: the window hands
	// over to the peer map without a packet going elsewhere.
	pins := &Delta{SetPeers: map[netip.Addr]uint16{}}
	for _, src := range waiting[1:] {
		pins.SetPeers[src] = first[src]
	}
	if _, err := l.dp.Update(ctx, pins); err != nil {
		t.Fatal(err)
	}
	c, err := l.dir.Nft()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"window4", "window6"} {
		c.FlushSet(&nftables.Set{Table: &nftables.Table{Family: nftables.TableFamilyINet, Name: "tunneldirector"}, Name: name})
	}
	if err := c.Flush(); err != nil {
		t.Fatalf("flush the window maps: %v", err)
	}
	for _, src := range waiting[1:] {
		l.sendUnknown(t, src, "pinned-after-window", int(first[src])-1)
	}
	// The one left unpinned: with its window gone, its bucket's new node.
	// This is the split the window prevents.
	src := waiting[0]
	l.sendUnknown(t, src, "no-window", int(first[src]%3+1)-1)
}

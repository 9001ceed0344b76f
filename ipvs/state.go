package ipvs

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/tunneldirector/tunneldirector/ipvs/nft"
	"github.com/tunneldirector/tunneldirector/ipvs/route"
)

// kstate is everything the director programs, one part per kernel
// facility.
type kstate struct {
	nft  *nft.State
	rt   *route.State
	svcs map[svcKey]svcDest
}

type svcKey struct {
	v6   bool
	mark uint32
}

// svcDest is a fwmark service's one destination and how it is made.
type svcDest struct {
	addr netip.Addr
	fwd  Forward
	// ops is one-packet scheduling (see ipvs/lvs): on for dr and tunnel,
	// so every datagram follows the peer's current mark; off for masq,
	// whose replies need the connection entries to be translated.
	ops bool
}

func (s *kstate) clone() *kstate {
	return &kstate{nft: s.nft.Clone(), rt: s.rt.Clone(), svcs: maps.Clone(s.svcs)}
}

// routeConfig is the routing part of the configuration.
func (c Config) routeConfig() route.Config {
	return route.Config{TableBase: c.TableBase, RulePriority: c.RulePriority, LocalRulePriority: c.LocalRulePriority,
		MarkBase: c.MarkBase, MarkMask: c.MarkMask, NodeBits: NodeBits, Protocol: c.Protocol}
}

// signature is the classifier chain a target wants (its lengths are added
// from the subnets).
func (c Config) signature(mode Mode, seed uint32, hashN int) nft.Signature {
	sig := nft.Signature{Version: nft.Layout, Seed: seed, HashN: hashN,
		MarkBase: c.MarkBase, RangeMask: c.MarkMask &^ NodeBits, LogGroup: c.LogGroup}
	if mode == ModeIPVS {
		sig.IKEBit = IKEBit
	}
	return sig
}

func nodeAddr(n Node, v6 bool) netip.Addr {
	if v6 {
		if n.Addr6.IsValid() {
			return n.Addr6
		}
		if n.Addr.Is6() {
			return n.Addr
		}
		return netip.Addr{}
	}
	if n.Addr.Is4() {
		return n.Addr
	}
	return netip.Addr{}
}

// target turns the desired state into the kernel state to hold.
func (c Config) target(mode Mode, d *Desired) (*kstate, error) {
	t := &kstate{nft: nft.NewState(), svcs: map[svcKey]svcDest{}}
	t.nft.Table = true
	t.nft.Peers, t.nft.Subnets = nft.NewPeerMap(max(len(d.Peers), d.MarksPeers)), nft.NewSubnetMap(max(len(d.Subnets), d.MarksSubnets))
	known := map[uint16]bool{}
	var active []uint16
	var rnodes []route.Node
	for _, n := range d.Nodes {
		if n.Mark == 0 || n.Mark > MaxMark {
			return nil, fmt.Errorf("node %s: mark %d outside 1..%d", n.Name, n.Mark, MaxMark)
		}
		if known[n.Mark] {
			return nil, fmt.Errorf("node %s: mark %d used twice", n.Name, n.Mark)
		}
		known[n.Mark] = true
		if n.Active {
			active = append(active, n.Mark)
		}
		rnodes = append(rnodes, route.Node{Mark: n.Mark, Fwmark: c.Fwmark(n.Mark), Addr4: nodeAddr(n, false), Addr6: nodeAddr(n, true)})
		for _, v6 := range []bool{false, true} {
			a := nodeAddr(n, v6)
			// A down node gets no service: a peer's entries still
			// pointing at it then lose their destination and the
			// peer's next packet is scheduled by its new mark.
			if a.IsValid() && mode == ModeIPVS && !n.Down {
				t.svcs[svcKey{v6, c.IKEMark(n.Mark)}] = svcDest{a, n.Forward, n.Forward != ForwardMasq}
			}
		}
	}
	t.rt = c.routeConfig().Want(rnodes)
	buckets := d.Buckets
	if buckets == nil {
		slices.Sort(active)
		buckets = active
	}
	if len(buckets) > nft.MaxHash {
		return nil, fmt.Errorf("%d unknown-peer buckets, at most %d", len(buckets), nft.MaxHash)
	}
	for i, m := range buckets {
		// A bucket whose node is gone steers nowhere until the
		// buckets follow (the table does not tie them to nodes).
		if m != 0 && known[m] {
			t.nft.Hash[uint32(i)] = c.Fwmark(m)
		}
	}
	t.nft.Sig = c.signature(mode, d.HashSeed, len(buckets))
	for _, v := range d.VIPs {
		t.nft.VIPs[v.Unmap()] = struct{}{}
	}
	var bad error
	// Above parallelPeers the peer and subnet maps fill on goroutines of
	// their own while this one walks the table: at a million tunnels the
	// maps were 3 of a sync's 13 CPU seconds, one after the other.
	// Each goroutine notes a key met twice (two spellings of one peer
	// or subnet in a Desired's maps; never from the table) for its map's
	// sum to be recounted.
	n := max(len(d.Peers), d.MarksPeers)
	var peerTwice, subnetTwice bool
	peers := newFiller(n, func(a netip.Addr, m uint16) {
		if !t.nft.Peers.Fill(a, c.Fwmark(m)) {
			peerTwice = true
		}
	})
	subnets := newFiller(n, func(p netip.Prefix, m uint16) {
		if !t.nft.FillSubnet(p, c.Fwmark(m)) {
			subnetTwice = true
		}
	})
	d.Each(func(a netip.Addr, m uint16) {
		if bad == nil && !known[m] {
			bad = fmt.Errorf("peer %s: owner mark %d is not a node", a, m)
		}
		peers.add(a.Unmap(), m)
	}, func(p netip.Prefix, m uint16) {
		if bad == nil && !known[m] {
			bad = fmt.Errorf("subnet %s: owner mark %d is not a node", p, m)
		}
		subnets.add(p.Masked(), m)
	})
	peers.wait()
	subnets.wait()
	if bad != nil {
		return nil, bad
	}
	if peerTwice {
		t.nft.Peers.Resum()
	}
	if subnetTwice {
		t.nft.Subnets.Resum()
	}
	t.nft.SyncLens()
	return t, nil
}

// parallelPeers is the peer count from which a target fills its maps on
// goroutines of their own.
const parallelPeers = 65536

// fillBatch is how many keys go to a filler at a time.
const fillBatch = 4096

type keyMark[K any] struct {
	k K
	m uint16
}

// filler calls set for every key added, on a goroutine of its own when
// made for n keys and more (parallelPeers), in batches; wait returns
// when every added key is set.
type filler[K any] struct {
	set   func(K, uint16)
	batch []keyMark[K]
	full  chan []keyMark[K] // to the goroutine
	free  chan []keyMark[K] // back, for reuse
	done  chan struct{}
}

func newFiller[K any](n int, set func(K, uint16)) *filler[K] {
	f := &filler[K]{set: set}
	if n < parallelPeers {
		return f
	}
	f.full, f.free, f.done = make(chan []keyMark[K], 4), make(chan []keyMark[K], 4), make(chan struct{})
	for range 4 {
		f.free <- make([]keyMark[K], 0, fillBatch)
	}
	f.batch = <-f.free
	go func() {
		defer close(f.done)
		for b := range f.full {
			for _, e := range b {
				set(e.k, e.m)
			}
			f.free <- b[:0]
		}
	}()
	return f
}

func (f *filler[K]) add(k K, m uint16) {
	if f.full == nil {
		f.set(k, m)
		return
	}
	if f.batch = append(f.batch, keyMark[K]{k, m}); len(f.batch) == fillBatch {
		f.full <- f.batch
		f.batch = <-f.free
	}
}

func (f *filler[K]) wait() {
	if f.full == nil {
		return
	}
	f.full <- f.batch
	close(f.full)
	<-f.done
}

func svcKeyCmp(a, b svcKey) int {
	return cmp.Or(cmp.Compare(a.mark, b.mark), cmp.Compare(b2i(a.v6), b2i(b.v6)))
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func sortedAddrs(m map[netip.Addr]struct{}) []netip.Addr {
	return slices.SortedFunc(maps.Keys(m), func(a, b netip.Addr) int { return a.Compare(b) })
}

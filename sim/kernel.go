package sim

import (
	"net/netip"
	"slices"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// unknownPeers models how the kernel steers a peer that is not in the
// table's peer map: a hash of its source address picks a bucket, and a map
// bucket -> node mark gives the node. Two dataplanes are modelled:
//   - buckets != nil: affinity.Buckets, stepped on the virtual clock from
//     the table's loads (what the director programs now);
//   - buckets == nil: the hash over the active nodes in mark order, one
//     bucket per node, as the dataplane did before (ipvs.HashPick): every
//     change of the active nodes remaps nearly every unknown peer.
//
// The hash is the simulator's own (peerHash), not the kernel's jhash: the
// model needs a uniform hash, not the kernel's bit for bit.
type unknownPeers struct {
	buckets *affinity.Buckets
	active  []uint16
	changes int // buckets (or active-node maps) changed so far
	steps   int
}

func newUnknownPeers(u UnknownSpec) (*unknownPeers, error) {
	k := &unknownPeers{}
	if u.Buckets == 0 {
		return k, nil
	}
	b, err := affinity.NewBuckets(u.bucketOptions())
	if err != nil {
		return nil, err
	}
	k.buckets = b
	return k, nil
}

// name describes the modelled dataplane for reports.
func (k *unknownPeers) name() string {
	if k.buckets == nil {
		return "hash over the active nodes"
	}
	return "buckets following headroom"
}

func hash32(peer netip.Addr) uint32 { return uint32(peerHash(peer) >> 32) }

// bucket returns the peer's bucket; with the old hash, the index into the
// active nodes.
func (k *unknownPeers) bucket(peer netip.Addr) int {
	if k.buckets != nil {
		return k.buckets.Index(hash32(peer))
	}
	return int(uint64(hash32(peer)) * uint64(len(k.active)) >> 32)
}

// mark returns the node mark the kernel gives the peer now (0: none).
func (k *unknownPeers) mark(peer netip.Addr) uint16 {
	if k.buckets != nil {
		return k.buckets.Mark(k.bucket(peer))
	}
	if len(k.active) == 0 {
		return 0
	}
	return k.active[k.bucket(peer)]
}

// seen records an unknown peer's first packet: its bucket keeps its node
// for the quiet window.
func (k *unknownPeers) seen(peer netip.Addr, now time.Duration) {
	if k.buckets != nil {
		k.buckets.Seen(k.bucket(peer), Epoch.Add(now))
	}
}

// update follows the nodes' loads and states at now and reports whether
// any peer's node may have changed.
func (k *unknownPeers) update(now time.Duration, nodes []affinity.NodeLoad) bool {
	if k.buckets != nil {
		ch := k.buckets.Step(Epoch.Add(now), nodes)
		k.steps++
		k.changes += len(ch)
		return len(ch) > 0
	}
	var active []uint16
	for _, n := range nodes {
		if n.State == affinity.NodeActive {
			active = append(active, n.Mark)
		}
	}
	slices.Sort(active)
	if slices.Equal(active, k.active) {
		return false
	}
	k.active = active
	k.steps++
	k.changes++
	return true
}

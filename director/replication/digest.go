package replication

import (
	"crypto/sha256"
	"encoding/binary"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// NumBuckets is how many hash ranges anti-entropy splits the table into.
const NumBuckets = 256

// bucketSet is a set of buckets, as sent in a tBitmap TLV.
type bucketSet [NumBuckets / 8]byte

func (s *bucketSet) add(b int)      { s[b/8] |= 1 << (b % 8) }
func (s *bucketSet) has(b int) bool { return s[b/8]&(1<<(b%8)) != 0 }
func (s *bucketSet) count() int {
	n := 0
	for b := range NumBuckets {
		if s.has(b) {
			n++
		}
	}
	return n
}

func allBuckets() bucketSet {
	var s bucketSet
	for i := range s {
		s[i] = 0xff
	}
	return s
}

// bucketOf places a tunnel id in a hash range (FNV-1a, so both directors
// agree whatever their Go version or seed).
func bucketOf(id string) int {
	h := uint32(2166136261)
	for i := 0; i < len(id); i++ {
		h = (h ^ uint32(id[i])) * 16777619
	}
	return int(h % NumBuckets)
}

func recordHash(b []byte) uint64 {
	s := sha256.Sum256(b)
	return binary.BigEndian.Uint64(s[:8])
}

func tunnelHash(t *affinity.Tunnel) uint64 { return recordHash(affinity.MarshalTunnel(t)) }
func nodeHash(n *affinity.Node) uint64     { return recordHash(affinity.MarshalNode(n)) }

// digest keeps, per bucket, the sum of a hash of every encoded tunnel in
// it, and a sum over the nodes. Sums (not a hash of a sorted list) let one
// change update its bucket in constant time and make the result
// independent of order, so two directors holding the same records agree.
type digest struct {
	sums   [NumBuckets]uint64
	nodes  uint64
	tunnel map[string]uint64
	node   map[string]uint64
}

func newDigest() *digest {
	return &digest{tunnel: make(map[string]uint64), node: make(map[string]uint64)}
}

func (d *digest) putTunnel(t *affinity.Tunnel) {
	h := tunnelHash(t)
	b := bucketOf(t.ID)
	d.sums[b] += h - d.tunnel[t.ID]
	d.tunnel[t.ID] = h
}

func (d *digest) deleteTunnel(id string) {
	d.sums[bucketOf(id)] -= d.tunnel[id]
	delete(d.tunnel, id)
}

func (d *digest) putNode(n *affinity.Node) {
	h := nodeHash(n)
	d.nodes += h - d.node[n.Name]
	d.node[n.Name] = h
}

func (d *digest) deleteNode(name string) {
	d.nodes -= d.node[name]
	delete(d.node, name)
}

func (d *digest) apply(cs []affinity.Change) {
	for i := range cs {
		c := &cs[i]
		switch c.Kind {
		case affinity.PutTunnel:
			d.putTunnel(c.Tunnel)
		case affinity.DeleteTunnel:
			d.deleteTunnel(c.Name)
		case affinity.PutNode:
			d.putNode(c.Node)
		case affinity.DeleteNode:
			d.deleteNode(c.Name)
		}
	}
}

// digestSums are the sums of a digest at one revision: what a backup
// sends and a master compares (see Replicator.digestAt).
type digestSums struct {
	nodes uint64
	sums  [NumBuckets]uint64
}

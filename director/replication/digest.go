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

func tunnelHash(t *affinity.Tunnel) uint64 { var b []byte; return tunnelHashIn(&b, t) }

// tunnelHashIn encodes t into *buf (reused) to hash it: a digest of a
// million-tunnel snapshot allocated a record per tunnel, a tenth of a
// fresh backup's garbage.
func tunnelHashIn(buf *[]byte, t *affinity.Tunnel) uint64 {
	*buf = affinity.AppendTunnel((*buf)[:0], t)
	return recordHash(*buf)
}

func nodeHash(n *affinity.Node) uint64 { return recordHash(affinity.MarshalNode(n)) }

// digest keeps, per bucket, the sum of a hash of every encoded tunnel in
// it, and a sum over the nodes and the unknown-peer buckets (the table's
// records that are not tunnels: they travel with every repair). Sums (not
// a hash of a sorted list) let one change update its bucket in constant
// time and make the result independent of order, so two directors holding
// the same records agree.
type digest struct {
	sums   [NumBuckets]uint64
	nodes  uint64
	tunnel map[string]uint64
	node   map[string]uint64
	// unknown holds each unknown-peer bucket's share of nodes.
	unknown []uint64
	// scratch is putTunnel's encoding buffer.
	scratch []byte
}

func newDigest() *digest {
	return &digest{tunnel: make(map[string]uint64), node: make(map[string]uint64)}
}

func (d *digest) putTunnel(t *affinity.Tunnel) {
	h := tunnelHashIn(&d.scratch, t)
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

// unknownCountHash and unknownHash are the shares of the unknown-peer
// bucket count and of one bucket in the nodes sum; a table without
// buckets (and a bucket without a node) adds nothing, so its digest is
// what it was before buckets existed.
func unknownCountHash(n int) uint64 {
	if n == 0 {
		return 0
	}
	return recordHash(binary.BigEndian.AppendUint32([]byte("buckets"), uint32(n)))
}

func unknownHash(i int, mark uint16) uint64 {
	if mark == 0 {
		return 0
	}
	return recordHash(binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint32([]byte("bucket"), uint32(i)), mark))
}

// putBucket follows one unknown-peer bucket; a change of count (a
// resize) first takes every old bucket out.
func (d *digest) putBucket(b *affinity.BucketMark) {
	if b.Count != len(d.unknown) {
		for _, h := range d.unknown {
			d.nodes -= h
		}
		d.nodes += unknownCountHash(b.Count) - unknownCountHash(len(d.unknown))
		d.unknown = make([]uint64, b.Count)
	}
	if b.Count == 0 {
		return
	}
	h := unknownHash(b.Index, b.Mark)
	d.nodes += h - d.unknown[b.Index]
	d.unknown[b.Index] = h
}

// putBuckets follows a whole assignment (a table read at once).
func (d *digest) putBuckets(marks []uint16) {
	d.putBucket(&affinity.BucketMark{Count: len(marks)})
	for i, m := range marks {
		d.putBucket(&affinity.BucketMark{Count: len(marks), Index: i, Mark: m})
	}
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
		case affinity.PutBucket:
			d.putBucket(c.Bucket)
		}
	}
}

// digestSums are the sums of a digest at one revision: what a backup
// sends and a master compares (see Replicator.digestAt).
type digestSums struct {
	nodes uint64
	sums  [NumBuckets]uint64
}

package store

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	bolt "go.etcd.io/bbolt"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// keyIndexDigest holds the digest of the table's index keys (schema 2):
// the tunnel count and an order-independent sum of a hash of every
// (peer or subnet key, tunnel id) pair, updated in every commit from the
// changes' old and new records.
var keyIndexDigest = []byte("index_digest")

const indexDigestLen = 32

// indexDigest sums a hash of every (key, tunnel id) pair, so two sets of
// pairs compare equal whatever order they were read in, and a pair can be
// taken out again (the sum subtracts, the xor is its own inverse).
type indexDigest struct {
	tunnels uint64
	n       uint64
	sum     uint64
	xor     uint64
}

func pairHash(k, v []byte) uint64 {
	// FNV-1a over key, a separator and value, inline: this runs for
	// every peer and subnet at startup.
	x := uint64(14695981039346656037)
	for _, c := range k {
		x = (x ^ uint64(c)) * 1099511628211
	}
	x *= 1099511628211
	for _, c := range v {
		x = (x ^ uint64(c)) * 1099511628211
	}
	return x
}

// add counts one (key, id) pair in; sign -1 takes it out.
func (d *indexDigest) pair(k, v []byte, sign int) {
	x := pairHash(k, v)
	if sign < 0 {
		d.n--
		d.sum -= x
	} else {
		d.n++
		d.sum += x
	}
	d.xor ^= x * 0x9E3779B97F4A7C15
}

func (d *indexDigest) add(k, v []byte) { d.pair(k, v, +1) }

// keys counts a tunnel's peer and subnet keys in (sign +1) or out (-1).
func (d *indexDigest) keys(id string, peer netip.Addr, subnets []netip.Prefix, sign int) {
	var buf [24]byte
	v := []byte(id)
	d.pair(appendPeerKey(buf[:0], peer), v, sign)
	for _, p := range subnets {
		d.pair(appendSubnetKey(buf[:0], p), v, sign)
	}
	if sign < 0 {
		d.tunnels--
	} else {
		d.tunnels++
	}
}

func (d *indexDigest) tunnel(t *affinity.Tunnel, sign int) { d.keys(t.ID, t.Peer, t.Subnets, sign) }

// tableDigest is the digest of a loaded table's keys.
func tableDigest(t *affinity.Table) indexDigest {
	var d indexDigest
	t.EachKey(func(id string, peer netip.Addr, subnets []netip.Prefix) { d.keys(id, peer, subnets, +1) })
	return d
}

func (d *indexDigest) encode() []byte {
	b := make([]byte, 0, indexDigestLen)
	for _, v := range []uint64{d.tunnels, d.n, d.sum, d.xor} {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	return b
}

func decodeIndexDigest(b []byte) (indexDigest, error) {
	if len(b) != indexDigestLen {
		return indexDigest{}, fmt.Errorf("index digest of %d bytes, want %d", len(b), indexDigestLen)
	}
	u := func(i int) uint64 { return binary.BigEndian.Uint64(b[8*i:]) }
	return indexDigest{u(0), u(1), u(2), u(3)}, nil
}

// migrate turns a schema-1 store, whose index buckets were just checked
// against the loaded table, into schema 2: the buckets go, their digest
// stays. One transaction: a crash leaves the old schema or the new.
func (s *Store) migrate() error {
	d := tableDigest(s.table)
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketPeers, bucketSubnets} {
			if err := tx.DeleteBucket(b); err != nil {
				return fmt.Errorf("delete bucket %s: %w", b, err)
			}
		}
		m := tx.Bucket(bucketMeta)
		if err := m.Put(keyIndexDigest, d.encode()); err != nil {
			return err
		}
		return m.Put(keySchema, be32(2))
	})
	if err != nil {
		return fmt.Errorf("migrate store %s to schema 2: %w", s.path, err)
	}
	s.schema = 2
	return nil
}

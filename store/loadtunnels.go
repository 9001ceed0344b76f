package store

import (
	"sync"

	bolt "go.etcd.io/bbolt"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// A daemon's restart is bounded by Open, and Open by loading the tunnels:
// at a million tunnels, decoding the records and summing their index
// digest took a third of the CPU time, indexing them in the table the
// rest. tunnelDecoder runs the first part in its own goroutine, a batch
// ahead of the table, so the two share the machine's cores; and it sums
// the digest from the records as it decodes them, instead of walking the
// loaded table a second time (the table holds exactly the records it was
// loaded from, or Load fails).
type tunnelDecoder struct {
	full     chan []affinity.Tunnel // decoded batches, in key order
	free     chan []affinity.Tunnel // batches the table is done with
	quit     chan struct{}
	done     chan struct{}
	stopOnce sync.Once

	// Written by the goroutine, read after done is closed.
	err    error
	digest indexDigest
}

const (
	// decodeBatch is the number of tunnels handed over at a time: a
	// channel operation per tunnel would cost more than decoding it.
	decodeBatch = 1024
	// decodeAhead is the number of batches decoded ahead of the table.
	decodeAhead = 4
)

// decodeTunnels starts decoding the tunnels bucket of tx. The caller
// ranges over seq, then calls stop before it uses tx again, and reads err
// (a damaged record, or a fault reading the file) and digest after stop.
func (s *Store) decodeTunnels(tx *bolt.Tx) *tunnelDecoder {
	d := &tunnelDecoder{
		full: make(chan []affinity.Tunnel, decodeAhead),
		free: make(chan []affinity.Tunnel, decodeAhead+1),
		quit: make(chan struct{}),
		done: make(chan struct{}),
	}
	for range decodeAhead + 1 {
		d.free <- make([]affinity.Tunnel, 0, decodeBatch)
	}
	c := tx.Bucket(bucketTunnels).Cursor()
	go func() {
		defer close(d.done)
		defer close(d.full)
		// guard is per goroutine: a fault reading a damaged file here
		// becomes this error, as it does on the loading goroutine.
		d.err = guard(s.path, "loading the table", func() error { return d.run(s.path, c) })
	}()
	return d
}

func (d *tunnelDecoder) run(path string, c *bolt.Cursor) error {
	batch := <-d.free
	for k, v := c.First(); k != nil; k, v = c.Next() {
		tu, err := affinity.UnmarshalTunnel(v)
		if err != nil {
			return damaged(path, "bucket tunnels: record %q: %v", shortKey(k), err)
		}
		if tu.ID != string(k) {
			return damaged(path, "bucket tunnels: record %q holds id %q", shortKey(k), shortKey([]byte(tu.ID)))
		}
		d.digest.tunnel(&tu, +1)
		batch = append(batch, tu)
		if len(batch) < cap(batch) {
			continue
		}
		select {
		case d.full <- batch:
		case <-d.quit:
			return nil
		}
		select {
		case batch = <-d.free:
		case <-d.quit:
			return nil
		}
	}
	if len(batch) > 0 {
		select {
		case d.full <- batch:
		case <-d.quit:
		}
	}
	return nil
}

// seq yields the decoded tunnels in key order; each pointer is valid
// only until the next.
func (d *tunnelDecoder) seq(yield func(*affinity.Tunnel) bool) {
	for b := range d.full {
		for i := range b {
			if !yield(&b[i]) {
				return
			}
		}
		// Drop the batch's references before it is reused, so a
		// recycled slot never keeps a tunnel the table refused alive.
		clear(b)
		d.free <- b[:0]
	}
}

// stop ends the decoding (if the table stopped early) and waits for the
// goroutine: tx is the caller's again.
func (d *tunnelDecoder) stop() {
	d.stopOnce.Do(func() { close(d.quit) })
	<-d.done
}

package replication

import (
	"slices"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Work too large for the replicator's event loop.
//
// HandleDatagram and Tick run under the replicator's lock, one event at a
// time; a status (the heartbeat and the backup's acknowledgement) is sent
// from Tick. Three pieces of work grow with the table and would hold the
// lock for seconds at a million tunnels, so that no status leaves while
// they run and the peer declares this director silent (or, on a master,
// sees no acknowledgement): the digest's update for a large batch (an
// import of a million tunnels hashes every record), the encoding of a
// snapshot on the master, and its commit on the backup. Above
// Replicator.bigWork changes (or tunnels) each runs on a goroutine of its
// own, without the lock, and hands its result back to the event loop,
// which goes on sending statuses and answering the peer meanwhile.
// Smaller work stays inline, so that tests stepping a clock.Manual see
// the same order of events as before.

// defaultBigWork is the size from which digest updates and snapshot
// encodes leave the event loop.
const defaultBigWork = 50_000

// digestJob is the digest's share of one batch or snapshot: it changes
// the digest it is given, or returns a new one.
type digestJob func(*digest) *digest

// digestWorker runs digest jobs off the event loop. While it is busy the
// digest (Replicator.dig) belongs to it: the loop neither reads nor
// changes it, and the jobs of batches read meanwhile wait in queue, in
// order.
type digestWorker struct {
	busy  bool
	stale bool // the digest was rebuilt (follow) while busy: drop the result
	queue []digestJob
	done  chan *digest
}

// digestLater queues a job; it starts at once unless one is running.
func (r *Replicator) digestLater(j digestJob) {
	r.dw.queue = append(r.dw.queue, j)
	if !r.dw.busy {
		r.startDigestWork()
	}
}

func (r *Replicator) startDigestWork() {
	jobs, from := r.dw.queue, r.dig
	r.dw.queue, r.dw.busy = nil, true
	go func() {
		if r.testBigWork != nil {
			r.testBigWork("digest")
		}
		d := from
		for _, j := range jobs {
			d = j(d)
		}
		r.dw.done <- d
		r.kick()
	}()
}

// digestReady takes a finished job's digest, starts the jobs queued
// behind it, and reports whether the digest is the loop's to read.
func (r *Replicator) digestReady() bool {
	if !r.dw.busy {
		return true
	}
	select {
	case d := <-r.dw.done:
		r.dw.busy = false
		if !r.dw.stale {
			r.dig = d
		}
		r.dw.stale = false
		if len(r.dw.queue) > 0 {
			r.startDigestWork()
			return false
		}
		return true
	default:
		return false
	}
}

// applyDigest follows one batch read from the change log: inline when it
// is small and nothing is queued, else on the worker.
func (r *Replicator) applyDigest(cs []affinity.Change) {
	if len(cs) < r.bigWork && r.digestReady() {
		r.dig.apply(cs)
		return
	}
	r.digestLater(func(d *digest) *digest { d.apply(cs); return d })
}

// targetDigest is the digest of a table equal to a full transfer.
func targetDigest(t *target) *digest {
	d := &digest{tunnel: make(map[string]uint64, len(t.tunnels)), node: make(map[string]uint64, len(t.nodes))}
	for i := range t.nodes {
		d.putNode(&t.nodes[i])
	}
	for i := range t.tunnels {
		d.putTunnel(&t.tunnels[i])
	}
	d.putBuckets(t.unknown)
	return d
}

// kick wakes Run: a worker finished.
func (r *Replicator) kick() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// encoded is a snapshot encoded off the event loop.
type encoded struct {
	blob []byte
	rev  uint64
}

// encodeLater encodes a transfer on a goroutine; the transfer sends
// nothing until takeEncoded finds the result.
func (r *Replicator) encodeLater(o *outXfer, full bool) {
	h, tab := slices.Clone(r.history), r.st.Table()
	o.enc = make(chan encoded, 1)
	go func() {
		if r.testBigWork != nil {
			r.testBigWork("encode")
		}
		blob, rev := encodeTarget(h, tab, o.buckets, full)
		o.enc <- encoded{blob, rev}
		r.kick()
	}()
}

// takeEncoded reports whether the transfer is encoded, taking the
// worker's result when it arrived.
func (r *Replicator) takeEncoded(o *outXfer, now time.Time) bool {
	if o.enc == nil {
		return true
	}
	select {
	case e := <-o.enc:
		o.enc = nil
		r.encoded(o, e.blob, e.rev, now)
		return true
	default:
		return false
	}
}

// install is a large full snapshot being committed off the event loop:
// a million tunnels take seconds to apply to the table and write, while
// the backup goes on exchanging statuses with the master (reporting the
// snapshot's revision as its base, so that the master neither sends it
// again nor resends what it carries) and buffering the revisions that
// follow it.
type install struct {
	t    *target
	done chan installDone
}

type installDone struct {
	a   *affinity.Applied
	err error
}

// installLater commits a full snapshot above the table's revision on a
// goroutine. The batch is registered as the replicator's own (ownSnap)
// before it exists, so that drain, reading it whenever it lands, neither
// takes it for a local write nor hashes it change by change.
func (r *Replicator) installLater(t *target) {
	r.b.ready = nil
	r.ownSnap, r.ownSnapAt = t, [2]uint64{r.st.Revision(), t.rev}
	in := &install{t: t, done: make(chan installDone, 1)}
	r.b.installing = in
	go func() {
		if r.testBigWork != nil {
			r.testBigWork("install")
		}
		a, err := r.st.CommitAt(t.rev, r.targetOps(t))
		in.done <- installDone{a, err}
		r.kick()
	}()
}

// installed reports whether the snapshot being installed is done, and
// then finishes it on the event loop (finishTarget, as applyTarget does).
func (r *Replicator) installed() bool {
	in := r.b.installing
	select {
	case d := <-in.done:
		r.b.installing = nil
		if d.err != nil {
			r.ownSnap = nil
			r.applyFailed(in.t.rev, d.err)
			return true
		}
		r.drain()
		r.ownSnap = nil              // read by drain, or no batch (nothing differed)
		r.rev = max(r.rev, in.t.rev) // nothing differed: follow the master's number
		r.finishTarget(in.t, d.a)
		return true
	default:
		return false
	}
}

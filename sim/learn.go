package sim

import (
	"cmp"
	"slices"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// The unknown-peer side of the engine: a peer the table does not hold
// reaches the node of its bucket, makes its SAs there at once, and is
// pinned into the table LearnDelay later with the mark its first packet
// got (the learner reads the packet's mark, it does not recompute it).
// Until the pin its packets follow the bucket: a bucket change in that
// window sends them to another node, a violation.

// arrive brings up an unknown peer's tunnel where the kernel steers it.
func (e *engine) arrive(x *tunnel, tu affinity.Tunnel) {
	e.rep.Totals.Arrivals++
	m := e.kernel.mark(tu.Peer)
	if m == 0 {
		e.rep.Totals.Refused++
		e.rep.addRefusal(e.now, tu.ID, "unknown peer: no node takes new tunnels")
		return
	}
	e.tunnels[tu.ID] = x
	e.live = append(e.live, x)
	x.pending = false
	x.sa, x.saNode = m, e.names[m]
	x.unpinned = true
	x.pinAt = e.now + e.s.Unknown.LearnDelay
	if e.s.Dataplane.ConnectionEntries {
		x.conn = m
	}
	e.kernel.seen(tu.Peer, e.now)
	x.wait = len(e.waiting)
	e.waiting = append(e.waiting, x)
	e.learnTu[tu.ID] = tu
	e.After(e.s.Unknown.LearnDelay, e.learnDue)
}

// unwait takes a peer off the waiting list (pinned, or gone before).
func (e *engine) unwait(x *tunnel) {
	last := e.waiting[len(e.waiting)-1]
	e.waiting[x.wait] = last
	last.wait = x.wait
	e.waiting = e.waiting[:len(e.waiting)-1]
	x.unpinned = false
	delete(e.learnTu, x.id)
}

// learnDue pins the waiting peers whose time has come, on the node their
// first packet reached, in one commit with whatever else is pending.
func (e *engine) learnDue() {
	var due []*tunnel
	for _, x := range e.waiting {
		if x.pinAt <= e.now {
			due = append(due, x)
		}
	}
	if len(due) == 0 {
		return
	}
	// In id order (arrival order), whatever unwait did to the list.
	slices.SortFunc(due, func(a, b *tunnel) int { return cmp.Compare(a.id, b.id) })
	t := e.master().Table()
	for _, x := range due {
		tu := e.learnTu[x.id]
		tu.Node = x.saNode
		if n, ok := t.Node(x.saNode); !ok || n.State == affinity.NodeDown {
			tu.Node = "" // its node died meanwhile: the scheduler places it
		}
		e.unwait(x)
		x.pending = true
		e.pendingUp = append(e.pendingUp, x)
		e.pendingUpTu[x.id] = tu
		e.rep.Unknown.Learned++
	}
	e.commitPending()
}

// updateKernel steps the unknown-peer steering on the master's loads
// (the tunnels it holds plus the peers waiting for their pin) and checks
// the waiting peers against it.
func (e *engine) updateKernel() {
	if !e.unknownOn {
		return
	}
	loads := e.master().Table().Loads()
	for _, x := range e.waiting {
		for i := range loads {
			if loads[i].Mark == x.sa {
				loads[i].Tunnels++
			}
		}
	}
	changed := e.kernel.update(e.now, loads)
	e.kernelDirty = changed
	if !changed {
		return
	}
	for _, x := range e.waiting {
		e.check(x)
	}
}

// displaceWaiting handles the waiting peers of a node that went down or
// left: their SAs are gone with it, and they come back where their bucket
// points once the kernel has followed the event, a move of the event's.
func (e *engine) displaceWaiting(node string) {
	var gone []*tunnel
	for _, x := range e.waiting {
		if x.saNode == node {
			e.moved(x)
			gone = append(gone, x)
		}
	}
	e.updateKernel()
	for _, x := range gone {
		if m := e.kernel.mark(x.peer); m != 0 {
			x.sa, x.saNode = m, e.names[m]
			x.conn = 0
		}
	}
}

// waitingOn counts the waiting peers on a node.
func (e *engine) waitingOn(node string) int {
	n := 0
	for _, x := range e.waiting {
		if x.saNode == node {
			n++
		}
	}
	return n
}

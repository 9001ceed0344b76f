package replication

import (
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// holdWork makes r's off-loop work (what is "digest" or "encode") wait
// until the returned release is called, and reports whether such work is
// running. Work still running inline on the event loop cannot be waited
// for by the test stepping that loop: it is let go after 10 s of wall
// time, and the test then finds it finished when it should be running.
func holdWork(r *Replicator, what string, bigWork int) (running *atomic.Bool, started *atomic.Bool, release func()) {
	running, started = new(atomic.Bool), new(atomic.Bool)
	ch := make(chan struct{})
	r.mu.Lock()
	defer r.mu.Unlock()
	r.bigWork = bigWork
	r.testBigWork = func(w string) {
		if w != what {
			return
		}
		running.Store(true)
		started.Store(true)
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
		}
		running.Store(false)
	}
	return running, started, func() { close(ch) }
}

// stepsWhileHeld steps the pair through more than the peer timeout of
// clock time while the held work runs, and fails the test when the work
// was not running beside the loop, when the backup found the master
// silent, or when a status did not arrive within a few intervals.
func stepsWhileHeld(t *testing.T, p *pair, running *atomic.Bool, what string) {
	t.Helper()
	timeout := 3 * time.Second // the default PeerTimeout
	for d := time.Duration(0); d < timeout+time.Second; d += p.step_ {
		p.step()
		if !running.Load() {
			t.Fatalf("after %s of clock the %s work is not running beside the event loop: it ran inline, and no status left meanwhile", d, what)
		}
		st := p.r[1].Status()
		if strings.HasPrefix(st.Reason, silentReason) {
			t.Fatalf("after %s of clock, with the master's %s work running, the backup finds the master silent: %s", d, what, st.Reason)
		}
		if since := p.clk.Now().Sub(st.Peer.LastHeard); since > 5*p.r[0].cfg.StatusInterval {
			t.Fatalf("after %s of clock, with the master's %s work running, the backup last heard the master %s ago", d, what, since)
		}
	}
}

// TestHeartbeatDuringLargeBatch: a master commits a batch large enough
// to move its digest's update off the event loop (an import of a million
// tunnels hashes for seconds). While that update runs, the master goes
// on sending statuses, so the backup never finds it silent; once it
// ends, the digests agree.
func TestHeartbeatDuringLargeBatch(t *testing.T) {
	p := newPair(t, FakeConfig{Seed: 1}, nil)
	p.startBoth()
	commit(p.st[0], benchNodes(3))
	if !p.settle(5 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	running, started, release := holdWork(p.r[0], "digest", 100)
	if !commit(p.st[0], benchTunnels(0, 1000)) {
		t.Fatal("commit failed")
	}
	p.step() // the master reads the batch: its digest update starts
	if !waitTrue(started) {
		t.Fatal("a batch of 1,000 changes did not start the digest worker (bigWork 100)")
	}
	stepsWhileHeld(t, p, running, "digest")
	release()
	waitIdle(t, p)
	if !p.settle(10 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	waitDigestMatch(t, p)
}

// TestHeartbeatDuringSnapshotEncode: a fresh backup needs a snapshot of
// a table large enough to be encoded off the master's event loop. While
// the encoding runs, statuses flow both ways; the snapshot then arrives,
// is applied (its digest made from the snapshot), and the digests agree.
func TestHeartbeatDuringSnapshotEncode(t *testing.T) {
	// A window of 10 changes: the backup catches up by snapshot, not
	// by resends of the master's journal.
	p := newPair(t, FakeConfig{Seed: 2}, func(_ int, c *Config) { c.WindowChanges = 10 })
	p.start(0)
	commit(p.st[0], benchNodes(3))
	commit(p.st[0], benchTunnels(0, 500))
	running, started, release := holdWork(p.r[0], "encode", 100)
	p.start(1)
	p.r[1].mu.Lock()
	p.r[1].bigWork = 100 // the backup makes the snapshot's digest on its worker too
	p.r[1].mu.Unlock()
	for range 1000 {
		p.r[0].mu.Lock()
		launched := p.r[0].out != nil
		p.r[0].mu.Unlock()
		if launched {
			break
		}
		p.step()
	}
	if !waitTrue(started) {
		t.Fatal("no snapshot encode started for a fresh backup")
	}
	stepsWhileHeld(t, p, running, "encode")
	if s := p.r[1].Status(); s.Counters.SnapshotsApplied != 0 || s.Ready {
		t.Fatalf("the backup applied a snapshot or says ready before it was encoded: %+v", s)
	}
	release()
	waitIdle(t, p)
	if !p.settle(10 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	if n := p.r[1].Status().Counters.SnapshotsApplied; n != 1 {
		t.Fatalf("snapshots applied: %d, want 1", n)
	}
	waitDigestMatch(t, p)
}

// waitDigestMatch steps until the master confirmed a digest of the whole
// table, and fails on any mismatch: a digest made off the loop (or from
// a snapshot) must equal the one made change by change.
func waitDigestMatch(t *testing.T, p *pair) {
	t.Helper()
	for range 5000 {
		waitIdle(t, p)
		p.step()
		c := p.r[0].Status().Counters
		if c.DigestMismatches > 0 {
			t.Fatalf("digest mismatch: %+v", c)
		}
		if st := p.r[0].Status(); st.TablesEqual && st.LastMatchRevision == p.st[0].Revision() {
			return
		}
	}
	t.Fatalf("no digest match at revision %d: %+v", p.st[0].Revision(), p.r[0].Status())
}

// TestFreshTargetOps: a full snapshot for an empty table gives the same
// changes as the table's diff, without building its maps.
func TestFreshTargetOps(t *testing.T) {
	p := newPair(t, FakeConfig{Seed: 3}, nil)
	p.start(0)
	commit(p.st[0], benchNodes(3))
	commit(p.st[0], benchTunnels(0, 50))
	blob, rev := encodeTarget(nil, p.st[0].Table(), allBuckets(), true)
	tg := &target{kind: xSnapshot, full: true, rev: rev}
	if err := decodeTarget(tg, blob); err != nil {
		t.Fatal(err)
	}
	p.start(1)
	got := p.r[1].targetOps(tg)
	s := affinity.Snapshot{Revision: tg.rev, Nodes: tg.nodes, Tunnels: tg.tunnels, Buckets: tg.unknown}
	want := p.st[1].Table().DiffTo(&s, nil)
	if len(got) != 53 || !reflect.DeepEqual(got, want) {
		t.Fatalf("fresh-table changes (%d) differ from the diff's (%d)", len(got), len(want))
	}
}

// TestNotSilentAfterLongApply: a fresh backup applying a large snapshot
// is busy for longer than the peer timeout (here the clock jumps 10 s
// inside the apply) and hears nothing meanwhile. Right after, before any
// of the master's statuses is read, it must not call the master silent:
// the silence is its own.
func TestNotSilentAfterLongApply(t *testing.T) {
	p := newPair(t, FakeConfig{Seed: 4}, func(_ int, c *Config) { c.WindowChanges = 10 })
	p.start(0)
	commit(p.st[0], benchNodes(3))
	commit(p.st[0], benchTunnels(0, 200))
	p.start(1)
	applied := false
	p.r[1].testBigWork = func(w string) {
		if w == "apply" {
			p.clk.Advance(10 * time.Second)
			applied = true
		}
	}
	var after Status
	for range 2000 {
		p.clk.Advance(p.step_)
		p.net.Settle(64, func(i int, b []byte) {
			p.r[i].HandleDatagram(b)
			if i == 1 && applied && after.ID == 0 {
				p.r[1].Tick() // the backup's timers, right after the apply
				after = p.r[1].Status()
			}
		})
		p.r[0].Tick()
		p.r[1].Tick()
		if after.ID != 0 {
			break
		}
	}
	if after.ID == 0 {
		t.Fatal("no snapshot applied")
	}
	if strings.HasPrefix(after.Reason, silentReason) {
		t.Fatalf("right after its own 10 s apply, the backup calls the master silent: %s", after.Reason)
	}
	if !p.settle(10 * time.Second) {
		t.Fatal(p.describeDiff())
	}
}

// waitTrue waits up to 10 s of wall time for a flag a worker goroutine
// sets: on the shared machine a goroutine may get no CPU while the test
// steps the clock many times.
func waitTrue(f *atomic.Bool) bool {
	for deadline := time.Now().Add(10 * time.Second); !f.Load() && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	return f.Load()
}

// waitIdle waits (wall time) until neither replicator has work running
// off its event loop, so that the clock steps that follow see its result
// as they would see inline work's.
func waitIdle(t *testing.T, p *pair) {
	t.Helper()
	for _, r := range p.r {
		for deadline := time.Now().Add(10 * time.Second); ; {
			r.mu.Lock()
			idle := r.digestReady() && (r.out == nil || r.out.enc == nil || len(r.out.enc) > 0)
			r.mu.Unlock()
			if idle {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("off-loop work still running after 10 s")
			}
			time.Sleep(time.Millisecond)
		}
	}
}

// TestHeartbeatDuringSnapshotInstall: a fresh backup commits a snapshot
// large enough to be installed off its event loop. While the install
// runs, the backup keeps hearing the master and the master keeps hearing
// the backup, which reports the snapshot's revision, so the master sends
// no second snapshot; a revision committed meanwhile waits and is
// applied after it; the digests then agree.
func TestHeartbeatDuringSnapshotInstall(t *testing.T) {
	p := newPair(t, FakeConfig{Seed: 5}, func(_ int, c *Config) { c.WindowChanges = 10 })
	p.start(0)
	commit(p.st[0], benchNodes(3))
	commit(p.st[0], benchTunnels(0, 500))
	p.start(1)
	p.r[0].mu.Lock()
	p.r[0].bigWork = 100
	p.r[0].mu.Unlock()
	running, started, release := holdWork(p.r[1], "install", 100)
	for range 2000 {
		p.r[1].mu.Lock()
		launched := p.r[1].b.installing != nil
		p.r[1].mu.Unlock()
		if launched {
			break
		}
		waitIdle(t, p) // the master's encode
		p.step()
	}
	if !waitTrue(started) {
		t.Fatalf("no snapshot install started on the fresh backup: %+v; master %+v", p.r[1].Status(), p.r[0].Status())
	}
	commit(p.st[0], benchTunnels(500, 5)) // a revision after the snapshot
	timeout := p.r[1].cfg.PeerTimeout
	for d := time.Duration(0); d < timeout+time.Second; d += p.step_ {
		p.step()
		if !running.Load() {
			t.Fatalf("after %s of clock the install is not running beside the backup's event loop", d)
		}
		b, m := p.r[1].Status(), p.r[0].Status()
		if strings.HasPrefix(b.Reason, silentReason) {
			t.Fatalf("after %s of clock, during the install, the backup finds the master silent: %s", d, b.Reason)
		}
		if since := p.clk.Now().Sub(m.Peer.LastHeard); since > 5*p.r[0].cfg.StatusInterval {
			t.Fatalf("after %s of clock, during the install, the master last heard the backup %s ago", d, since)
		}
		if b.Ready || b.State == StateInSync {
			t.Fatalf("the backup says ready or in sync during the install: %+v", b)
		}
		p.r[0].mu.Lock()
		second := p.r[0].out != nil && p.r[0].out.kind == xSnapshot
		p.r[0].mu.Unlock()
		if second {
			t.Fatalf("after %s of clock, during the install, the master sends a second snapshot", d)
		}
	}
	release()
	waitInstalled(t, p.r[1])
	if !p.settle(10 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	if c := p.r[1].Status().Counters; c.SnapshotsApplied != 1 || c.RevisionsApplied == 0 || c.LocalWrites != 0 {
		t.Fatalf("snapshots applied %d (want 1), revisions applied after it %d (want some), local writes %d (want 0: the install is the replicator's own)",
			c.SnapshotsApplied, c.RevisionsApplied, c.LocalWrites)
	}
	waitDigestMatch(t, p)
}

// waitInstalled waits (wall time) until a snapshot install finished.
func waitInstalled(t *testing.T, r *Replicator) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		r.mu.Lock()
		done := r.b.installing == nil || len(r.b.installing.done) > 0
		r.mu.Unlock()
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("snapshot install still running after 10 s")
		}
	}
}

// TestIsMasterTakesNoLock: the daemon asks IsMaster under the store's
// lock, and a backup's replicator waits for that lock while holding its
// own (committing its master's batch): IsMaster must answer while the
// replicator's lock is held, and follow SetRole.
func TestIsMasterTakesNoLock(t *testing.T) {
	p := newPair(t, FakeConfig{}, nil)
	p.startBoth()
	if !p.r[0].IsMaster() || p.r[1].IsMaster() {
		t.Fatalf("IsMaster: %v %v, want true false", p.r[0].IsMaster(), p.r[1].IsMaster())
	}
	r := p.r[0]
	r.mu.Lock()
	done := make(chan bool)
	go func() { done <- r.IsMaster() }()
	select {
	case m := <-done:
		r.mu.Unlock()
		if !m {
			t.Fatal("IsMaster said false on the master")
		}
	case <-time.After(10 * time.Second):
		r.mu.Unlock()
		t.Fatal("IsMaster waited for the replicator's lock")
	}
	r.SetRole(RoleBackup)
	if r.IsMaster() {
		t.Fatal("IsMaster after SetRole(RoleBackup)")
	}
}

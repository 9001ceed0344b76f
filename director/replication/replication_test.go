package replication

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/replication/wire"
	"github.com/tunneldirector/tunneldirector/store"
)

func lossy(loss float64, seed uint64) FakeConfig {
	return FakeConfig{Seed: seed, Drop: loss, Duplicate: loss / 2, Reorder: 0.1, Delay: time.Millisecond, MaxDelay: 5 * time.Millisecond}
}

func runScenario(t *testing.T, fc FakeConfig, seed uint64, rounds int) *pair {
	p := newPair(t, fc, nil)
	p.startBoth()
	o := newOps(seed)
	commit(p.st[0], o.init())
	for range rounds {
		commit(p.st[0], o.batch(p.st[0].Table()))
		p.steps(1 + int(seed%3))
	}
	if !p.settle(60 * time.Second) {
		t.Fatalf("seed %d: tables did not converge: %s", seed, p.describeDiff())
	}
	return p
}

func TestConvergeUnderLoss(t *testing.T) {
	for _, loss := range []float64{0, 0.05, 0.10, 0.30} {
		t.Run(fmt.Sprintf("loss%.0f%%", loss*100), func(t *testing.T) {
			p := runScenario(t, lossy(loss, 42), 42, 300)
			st := p.r[1].Status()
			// Anti-entropy proves equality within a few digest rounds.
			for i := 0; i < 40 && !st.TablesEqual; i++ {
				p.steps(500)
				st = p.r[1].Status()
			}
			if !st.TablesEqual {
				t.Errorf("tables not proven equal: %+v", st)
			}
			t.Logf("loss %.0f%%: revision %d, %d tunnels; network %+v; backup %+v", loss*100, st.Revision,
				p.st[1].Table().Len(), p.net.Stats, st.Counters)
			if loss > 0 && st.Counters.Nacks == 0 {
				t.Errorf("no NACK under %.0f%% loss", loss*100)
			}
		})
	}
}

// TestProperty runs random operation sequences over random fault mixes:
// whatever happens, the backup ends equal to the master.
func TestProperty(t *testing.T) {
	seeds := 24
	if testing.Short() {
		seeds = 6
	}
	for seed := uint64(1); seed <= uint64(seeds); seed++ {
		loss := []float64{0, 0.02, 0.1, 0.2, 0.3}[seed%5]
		fc := lossy(loss, seed)
		fc.MTU = []int{DefaultMTU, 576, 1200}[seed%3]
		runScenario(t, fc, seed, 60+int(seed%4)*30)
	}
}

// TestLateBackupCatchesUpBySnapshot: a backup further behind than the
// resend window (the master's change log reaches back to revision 0, but
// resending 900 changes is more than WindowChanges allows) gets a
// snapshot.
func TestLateBackupCatchesUpBySnapshot(t *testing.T) {
	p := newPair(t, lossy(0.05, 3), func(i int, c *Config) { c.WindowChanges = 100 })
	o := newOps(3)
	commit(p.st[0], o.init())
	for range 100 {
		commit(p.st[0], o.batch(p.st[0].Table()))
	}
	p.start(0)
	p.steps(50)
	p.start(1) // late
	if !p.settle(30 * time.Second) {
		t.Fatalf("late backup did not catch up: %s", p.describeDiff())
	}
	if c := p.r[1].Status().Counters; c.SnapshotsApplied == 0 {
		t.Errorf("caught up without a snapshot: %+v", c)
	}
	// Live changes follow the snapshot.
	for range 20 {
		commit(p.st[0], o.batch(p.st[0].Table()))
		p.step()
	}
	if !p.settle(30 * time.Second) {
		t.Fatalf("live stream after snapshot: %s", p.describeDiff())
	}
}

func TestGapOlderThanWindowTriggersSnapshot(t *testing.T) {
	p := newPair(t, lossy(0, 4), func(i int, c *Config) { c.WindowChanges = 50 })
	p.startBoth()
	o := newOps(4)
	commit(p.st[0], o.init())
	p.settle(10 * time.Second)
	p.net.Partition(true)
	for range 40 {
		commit(p.st[0], o.batch(p.st[0].Table()))
		p.step()
	}
	p.net.Partition(false)
	if !p.settle(30 * time.Second) {
		t.Fatalf("no convergence after gap: %s", p.describeDiff())
	}
	if c := p.r[1].Status().Counters; c.SnapshotsApplied == 0 {
		t.Errorf("gap beyond the window healed without a snapshot: %+v", c)
	}
}

func TestAuthFailureAndReplayDropped(t *testing.T) {
	p := newPair(t, lossy(0, 5), nil)
	var captured [][]byte
	p.net.SetTap(func(from int, b []byte) {
		if from == 0 && len(captured) < 50 {
			captured = append(captured, b)
		}
	})
	p.startBoth()
	o := newOps(5)
	commit(p.st[0], o.init())
	commit(p.st[0], o.batch(p.st[0].Table()))
	if !p.settle(10 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	before := p.r[1].Status().Counters

	// A datagram sealed with another key.
	p.net.Inject(1, seal(p.r[1], []byte("another-key-of-sixteen-bytes"), wire.Header{Type: wire.MsgStatus, Sender: 1, Epoch: 1, Seq: 1 << 62}, func(w *wire.Builder) {
		w.U8(wire.TRole, uint8(RoleMaster))
		w.U64(wire.TRev, 999)
	}))
	// Replays of everything captured so far.
	captured = captured[:len(captured):len(captured)]
	p.net.SetTap(nil)
	for _, b := range captured {
		p.net.Inject(1, b)
	}
	p.steps(20) // originals still in flight count as replays too
	after := p.r[1].Status()
	if got := after.Counters.AuthFailures - before.AuthFailures; got != 1 {
		t.Errorf("auth failures counted %d, want 1", got)
	}
	// The first datagrams went out before the master knew the backup's
	// session: those count as stale, the rest as replays.
	replays, stale := after.Counters.Replays-before.Replays, after.Counters.StaleSession-before.StaleSession
	if replays+stale != uint64(len(captured)) || replays == 0 {
		t.Errorf("replays %d + stale %d counted, want %d in all; before %+v after %+v net %+v", replays, stale, len(captured), before, after.Counters, p.net.Stats)
	}
	if after.MasterRevision == 999 {
		t.Error("forged status believed")
	}
	if !p.equal() {
		t.Error(p.describeDiff())
	}
}

func TestNewerVersionRefused(t *testing.T) {
	p := newPair(t, lossy(0, 6), nil)
	p.startBoth()
	c := wire.NewCodec(testKey)
	b := seal(p.r[1], testKey, wire.Header{Type: wire.MsgStatus, Sender: 1, Epoch: 1, Seq: 1 << 62}, func(w *wire.Builder) {
		w.U64(wire.TRev, 5)
	})
	b[4] = wire.Version + 1
	copy(b[len(b)-wire.TagLen:], c.Tag(b[:len(b)-wire.TagLen]))
	p.net.Inject(1, b)
	p.step()
	st := p.r[1].Status()
	if st.Counters.BadVersion != 1 {
		t.Errorf("bad version counted %d", st.Counters.BadVersion)
	}
	if e := p.r[1].LastError(); !strings.Contains(e, "unsupported wire version 3") {
		t.Errorf("last error %q does not name the version", e)
	}
}

func TestUnknownTLVSkippedCriticalRefused(t *testing.T) {
	p := newPair(t, lossy(0, 7), nil)
	p.startBoth()
	mk := func(extra uint16, seq uint64) []byte {
		return seal(p.r[1], testKey, wire.Header{Type: wire.MsgStatus, Sender: 1, Epoch: 99, Seq: seq}, func(w *wire.Builder) {
			w.U8(wire.TRole, uint8(RoleMaster))
			w.U64(wire.TRev, 0)
			w.Bytes(extra, []byte("from the future"))
		})
	}
	p.net.Inject(1, mk(200, 1<<62))
	p.net.Inject(1, mk(200|wire.Critical, 1<<62+1))
	p.step()
	st := p.r[1].Status()
	if st.Counters.Malformed != 1 {
		t.Errorf("malformed %d, want 1 (the critical one)", st.Counters.Malformed)
	}
	if st.Peer.Epoch != 99 {
		t.Errorf("status with an unknown TLV not taken: %+v", st.Peer)
	}
}

// TestAntiEntropyRepairs makes the backup lose changes silently; the
// digest exchange finds the buckets and the master repairs only those.
func TestAntiEntropyRepairs(t *testing.T) {
	p := newPair(t, lossy(0, 8), func(i int, c *Config) { c.DigestInterval = 200 * time.Millisecond })
	p.startBoth()
	o := newOps(8)
	commit(p.st[0], o.init())
	for range 30 {
		commit(p.st[0], o.batch(p.st[0].Table()))
	}
	if !p.settle(10 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	lost := 0
	p.r[1].mu.Lock()
	p.r[1].testDrop = func(rev uint64, cs []affinity.Change) []affinity.Change {
		var keep []affinity.Change
		for _, c := range cs {
			if c.Kind == affinity.PutTunnel && lost < 3 {
				lost++
				continue
			}
			keep = append(keep, c)
		}
		return keep
	}
	p.r[1].mu.Unlock()
	for range 3 {
		commit(p.st[0], o.batch(p.st[0].Table()))
		p.step()
	}
	p.steps(20)
	p.r[1].mu.Lock()
	p.r[1].testDrop = nil
	p.r[1].mu.Unlock()
	if lost == 0 {
		t.Fatal("nothing lost")
	}
	// The master stays idle: the repair applies at the backup's own
	// revision (store.CommitReset), without waiting for a next change.
	for i := 0; i < 200 && !p.equal(); i++ {
		p.steps(50)
	}
	if !p.settle(10 * time.Second) {
		t.Fatalf("not repaired: %s", p.describeDiff())
	}
	c := p.r[1].Status().Counters
	if c.RepairsApplied == 0 || c.DigestMismatches == 0 {
		t.Errorf("no repair: %+v", c)
	}
	if c.BucketsRepaired > 3 {
		t.Errorf("repaired %d buckets for %d lost changes", c.BucketsRepaired, lost)
	}
	if c.SnapshotsApplied > 0 {
		t.Errorf("fell back to a snapshot: %+v", c)
	}
}

func TestLocalWriteOnBackupReported(t *testing.T) {
	p := newPair(t, lossy(0, 9), nil)
	p.startBoth()
	o := newOps(9)
	commit(p.st[0], o.init())
	p.settle(5 * time.Second)
	commit(p.st[1], []affinity.Change{nodeChange(50, affinity.NodeActive, 1)})
	p.step()
	st := p.r[1].Status()
	if st.State != StateOutOfSync || !strings.Contains(st.Reason, "written locally") || p.r[1].Ready() {
		t.Errorf("local write not reported: %s %q", st.State, st.Reason)
	}
}

// TestEqualLocalWriteHeals: both directors of a pair commit the same change
// at the same revision, as when two keepalived at equal priority (their
// readiness checks failing at start) both make their director master for a
// moment and both directors assign the same unknown-peer buckets. The
// backup reports its local write, and once the digests prove the tables
// equal at that revision it is in sync and ready again: nothing is left to
// repair, and a backup that stayed out of sync could never take over. With
// an MTU that splits the digest over several messages a match speaks for
// some buckets only, and the local write stays reported.
func TestEqualLocalWriteHeals(t *testing.T) {
	for _, mtu := range []int{0, 1000} {
		t.Run(fmt.Sprintf("mtu %d", mtu), func(t *testing.T) {
			p := newPair(t, lossy(0, 9), func(i int, c *Config) {
				c.DigestInterval = 200 * time.Millisecond
				if mtu > 0 {
					c.MTU = mtu
				}
			})
			p.startBoth()
			o := newOps(9)
			commit(p.st[0], o.init())
			if !p.settle(5 * time.Second) {
				t.Fatal(p.describeDiff())
			}
			ch := []affinity.Change{nodeChange(50, affinity.NodeActive, 1)}
			commit(p.st[1], ch)
			commit(p.st[0], ch)
			p.step()
			if st := p.r[1].Status(); !strings.Contains(st.Reason, "written locally") || p.r[1].Ready() {
				t.Fatalf("local write not reported: %s %q", st.State, st.Reason)
			}
			healed := p.settle(5 * time.Second)
			if st := p.r[1].Status(); healed != (mtu == 0) || st.Counters.DigestMatches == 0 {
				t.Fatalf("in sync again %v, want %v: %+v; %s", healed, mtu == 0, st, p.describeDiff())
			}
			if c := p.r[1].Status().Counters; c.LocalWrites != 1 || c.SnapshotsApplied > 1 {
				t.Errorf("counters %+v, want one local write and no snapshot beyond the first", c)
			}
		})
	}
}

// TestBigRevisionSpansDatagrams: one import of 5,000 tunnels is one
// revision of hundreds of datagrams; under loss the backup NACKs the
// missing parts and applies the revision whole.
func TestBigRevisionSpansDatagrams(t *testing.T) {
	p := newPair(t, lossy(0.10, 12), nil)
	p.startBoth()
	commit(p.st[0], benchNodes(4))
	if !p.settle(5 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	var revs []uint64
	cur, err := p.st[1].Changes(p.st[1].Revision())
	if err != nil {
		t.Fatal(err)
	}
	if !commit(p.st[0], benchTunnels(0, 5000)) {
		t.Fatal("import failed")
	}
	if !p.settle(30 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	bs, err := store.ReadAll(cur)
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range bs {
		revs = append(revs, b.Revision)
	}
	if len(revs) != 1 || p.st[1].Table().Len() != 5000 {
		t.Errorf("backup commits %v, %d tunnels: want one commit of 5000", revs, p.st[1].Table().Len())
	}
	if c := p.r[0].Status().Counters; c.Resends == 0 {
		t.Errorf("no resends under 10%% loss: %+v", c)
	}
}

// TestBackupRestartNoMerge: a backup restarted on its store (with its
// state file) resumes as a lagging backup; nothing is merged.
func TestBackupRestartNoMerge(t *testing.T) {
	for _, withState := range []bool{true, false} {
		t.Run(fmt.Sprintf("state=%v", withState), func(t *testing.T) {
			var dir string
			p := newPair(t, lossy(0.05, 13), func(i int, c *Config) {
				if withState {
					c.StatePath = dir + fmt.Sprintf("/state%d.json", i)
				}
			})
			dir = p.dir
			p.startBoth()
			o := newOps(13)
			p.churn(o, 50)
			p.r[1] = nil // the backup process stops
			for range 30 {
				commit(p.st[0], o.batch(p.st[0].Table()))
				p.step()
			}
			p.start(1) // and starts again on the same store
			for range 30 {
				commit(p.st[0], o.batch(p.st[0].Table()))
				p.step()
			}
			if !p.settle(20 * time.Second) {
				t.Fatal(p.describeDiff())
			}
			if c := p.r[0].Status().Counters; c.Merges != 0 {
				t.Errorf("restart of a backup merged: %+v", c)
			}
		})
	}
}

// TestSnapshotPacedLiveFlows: a snapshot is paced at SnapshotRate, and
// revisions committed while it runs reach the backup after it.
func TestSnapshotPacedLiveFlows(t *testing.T) {
	p := newPair(t, lossy(0, 14), func(i int, c *Config) { c.SnapshotRate, c.WindowChanges = 1<<20, 1000 })
	commit(p.st[0], benchNodes(4))
	commit(p.st[0], benchTunnels(0, 3000))
	p.startBoth()
	start := p.clk.Now()
	for i := range 50 {
		commit(p.st[0], benchTunnels(10000+i*10, 10))
		p.steps(5)
	}
	if !p.settle(30 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	took := p.clk.Now().Sub(start)
	size := 3000 * 60 // bytes, at the least
	if min := time.Duration(float64(size) / float64(1<<20) * float64(time.Second)); took < min {
		t.Errorf("snapshot of >= %d bytes at 1 MiB/s took %s", size, took)
	}
	c := p.r[1].Status().Counters
	if c.SnapshotsApplied != 1 || c.RevisionsApplied == 0 {
		t.Errorf("want one snapshot then live revisions: %+v", c)
	}
	t.Logf("caught up in %s of link time; %+v", took, c)
}

// TestUnjournaledImportBySnapshot: a batch larger than the master's
// journal is not journaled (store.journal), so it is never streamed as
// DATA: the backup, finding it outside the resend window, gets a
// snapshot, and live changes follow.
func TestUnjournaledImportBySnapshot(t *testing.T) {
	p := newPair(t, lossy(0.02, 21), nil)
	p.st[0] = openStore(t, filepath.Join(p.dir, "small-journal.db"), 1000)
	p.startBoth()
	commit(p.st[0], benchNodes(4))
	if !p.settle(5 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	if !commit(p.st[0], benchTunnels(0, 5000)) {
		t.Fatal("import failed")
	}
	if !p.settle(30 * time.Second) {
		t.Fatal(p.describeDiff())
	}
	c := p.r[1].Status().Counters
	if c.SnapshotsApplied == 0 || c.ApplyFailures != 0 || p.st[1].Table().Len() != 5000 {
		t.Errorf("backup holds %d tunnels, counters %+v: want the import by snapshot", p.st[1].Table().Len(), c)
	}
	if !commit(p.st[0], benchTunnels(5000, 10)) {
		t.Fatal("commit failed")
	}
	if !p.settle(30 * time.Second) {
		t.Fatalf("live stream after the snapshot: %s", p.describeDiff())
	}
}

// TestBucketsReplicated: the master's unknown-peer buckets reach the
// backup with the live stream (4,096 at once, then steps), with a
// snapshot to a late backup, and after the backup silently lost a bucket
// change, with a repair the digest asks for.
func TestBucketsReplicated(t *testing.T) {
	p := newPair(t, lossy(0.05, 11), func(i int, c *Config) { c.DigestInterval, c.WindowChanges = 200*time.Millisecond, 1000 })
	o := newOps(11)
	commit(p.st[0], o.init())
	marks := make([]uint16, affinity.DefaultBuckets)
	for i := range marks {
		marks[i] = uint16(i%4 + 1)
	}
	commit(p.st[0], affinity.BucketChanges(nil, marks, "first step"))
	p.start(0)
	p.steps(20)
	p.start(1) // late: a snapshot carries the buckets
	if !p.settle(30 * time.Second) {
		t.Fatalf("late backup: %s", p.describeDiff())
	}
	if got := p.st[1].Table().Buckets(); !slices.Equal(got, marks) || p.r[1].Status().Counters.SnapshotsApplied != 1 {
		t.Fatalf("backup holds %d buckets after catching up (%d snapshots), want the master's %d by a snapshot", len(got), p.r[1].Status().Counters.SnapshotsApplied, len(marks))
	}
	step := func(n int) {
		cur := p.st[0].Table().Buckets()
		next := slices.Clone(cur)
		for i := range n {
			next[(i*97)%len(next)] = next[(i*97)%len(next)]%4 + 1
		}
		commit(p.st[0], affinity.BucketChanges(cur, next, "step"))
	}
	step(256)
	if !p.settle(30*time.Second) || !slices.Equal(p.st[1].Table().Buckets(), p.st[0].Table().Buckets()) {
		t.Fatalf("a live step: %s", p.describeDiff())
	}
	// The backup loses one bucket change; the digest finds it.
	lost := 0
	p.r[1].mu.Lock()
	p.r[1].testDrop = func(rev uint64, cs []affinity.Change) []affinity.Change {
		var keep []affinity.Change
		for _, c := range cs {
			if c.Kind == affinity.PutBucket && lost == 0 {
				lost++
				continue
			}
			keep = append(keep, c)
		}
		return keep
	}
	p.r[1].mu.Unlock()
	step(3)
	p.steps(20)
	p.r[1].mu.Lock()
	p.r[1].testDrop = nil
	p.r[1].mu.Unlock()
	if lost == 0 || p.equal() {
		t.Fatal("no bucket change lost")
	}
	for i := 0; i < 200 && !p.equal(); i++ {
		p.steps(50)
	}
	if !p.settle(10*time.Second) || !slices.Equal(p.st[1].Table().Buckets(), p.st[0].Table().Buckets()) {
		t.Fatalf("lost bucket not repaired: %s", p.describeDiff())
	}
	c := p.r[1].Status().Counters
	if c.RepairsApplied == 0 || c.SnapshotsApplied > 1 || c.LocalWrites > 0 {
		t.Errorf("want a repair, no new snapshot, no local write: %+v", c)
	}
	t.Logf("backup counters: %+v", c)
}

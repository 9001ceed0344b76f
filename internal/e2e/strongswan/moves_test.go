package strongswan

import (
	"slices"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/e2e/ikelab"
)

// moveMargin separates "before the move" from "after": the kernel holds the
// new revision when WaitKernel returns; packets captured a little later may
// have been on their way before.
const moveMargin = 300 * time.Millisecond

// TestGuestMoves: tunnels move while peers keep their IKE_SAs, rekey and
// run DPD: `rebalance --apply` and a re-import that moves a pinned tunnel
// (both nodes alive), a re-import followed at once by a SIGKILL of the
// daemon and its restart, then a node dies (`node down`). After each move
// every packet of a moved tunnel (IKE rekey and DPD, ESP) must reach the
// new owner only, and the peer re-establishes there. In both modes; the time
// from the command to the first ESP of the new SA at the new owner is
// logged as MEASURE lines.
func TestGuestMoves(t *testing.T) {
	for _, mode := range ikelab.Modes {
		t.Run(string(mode), func(t *testing.T) { moveScenarios(t, mode) })
	}
}

func moveScenarios(t *testing.T, mode ikelab.Mode) {
	f := ikelab.New(t, ikelab.Options{Mode: mode, Peers: 5, NATPeers: 1})
	tunnels := []ikelab.Tunnel{
		{ID: "pinned-a", Peer: f.Peers[0], Node: "node0", Pinned: true},
		{ID: "pinned-b", Peer: f.Peers[1], Node: "node1", Pinned: true},
	}
	for _, p := range f.Peers[2:] {
		tunnels = append(tunnels, ikelab.Tunnel{ID: "sched-" + p.Name, Peer: p})
	}
	f.Import(tunnels...)
	f.BringUp(bringUpWithin, f.Peers...)
	f.WaitOnOwners(establishWithin, f.Peers...)
	tr := f.StartTraffic(200*time.Millisecond, f.Peers...)
	for _, p := range f.Peers {
		if _, ok := tr.WaitFlowing(p, time.Now(), pingWithin); !ok {
			t.Fatalf("%s: no traffic before the moves: %s", p.Name, f.Seen(p, time.Time{}))
		}
	}

	// moved checks one moved tunnel: from the move on, its packets reach
	// only the new owner (a rekey forces an IKE exchange at once, DPD
	// follows), and it comes back there.
	moved := func(t *testing.T, what string, p *ikelab.Peer, from, to string, cmdAt, kernelAt time.Time, old []uint32) {
		t.Helper()
		if err := p.Charon.RekeyIKE("farm"); err != nil {
			t.Errorf("%s: rekey: %v", p.Name, err)
		}
		checkRecovered(t, f, tr, mode, what, p, from, to, cmdAt, kernelAt, old)
		if n := len(f.Node(to).From(p, kernelAt.Add(moveMargin), ikelab.IsIKE)); n == 0 {
			t.Errorf("%s: no IKE from the peer reached its new owner %s after the move (rekey, DPD)", p.Name, to)
		}
	}
	owner := func(p *ikelab.Peer) string {
		o, _, err := f.Director.Owner(p.Addr)
		if err != nil || o == "" {
			f.T.Fatalf("%s: lookup: %q %v", p.Name, o, err) // f.T: the running subtest
		}
		return o
	}

	t.Run("rebalance", func(t *testing.T) {
		defer f.Use(t)()
		// Drain the node of the first scheduled tunnel: rebalance moves it
		// to a live node while its old node stays up.
		from := owner(f.Peers[2])
		f.Director.MustCLI("node", "drain", from)
		old := map[*ikelab.Peer][]uint32{}
		for _, p := range f.Peers {
			old[p] = f.SPIs(p)
		}
		cmdAt := time.Now()
		res, err := f.Director.Rebalance(1)
		if err != nil {
			t.Fatal(err)
		}
		kernelAt := f.Director.WaitKernel()
		if len(res.Plan.Moves) != 1 {
			t.Fatalf("rebalance moved %d tunnels, want 1: %+v", len(res.Plan.Moves), res.Plan)
		}
		m := res.Plan.Moves[0]
		p := peerByAddr(f, m.Peer.String())
		if p == nil || m.From != from {
			t.Fatalf("rebalance moved %s (%s) from %s, want a tunnel of the draining %s", m.Tunnel, m.Peer, m.From, from)
		}
		moved(t, "rebalance", p, m.From, m.To, cmdAt, kernelAt, old[p])
		f.Director.MustCLI("node", "undrain", from)
	})

	t.Run("reimport-pinned", func(t *testing.T) {
		defer f.Use(t)()
		// The NMS re-pins pinned-b from node1 to node2.
		p := f.Peers[1]
		old := f.SPIs(p)
		re := slices.Clone(tunnels)
		re[1].Node = "node2"
		cmdAt := time.Now()
		kernelAt := f.Import(re...)
		if o := owner(p); o != "node2" {
			t.Fatalf("re-import: pinned-b on %s, want node2", o)
		}
		moved(t, "reimport-pinned", p, "node1", "node2", cmdAt, kernelAt, old)
	})

	t.Run("kill-after-move", func(t *testing.T) {
		defer f.Use(t)()
		// The NMS re-pins pinned-a from node0 to node2, and the daemon is
		// killed (SIGKILL, as an OOM kill or a crash ends it) as soon as
		// the kernel has the move: a small batch's records are written by
		// a fold seconds after its commit, so the move is in the store's
		// journal only. The restarted daemon must replay it: the kernel
		// keeps sending pinned-a to node2, where it re-establishes, and
		// no other tunnel loses a ping or its SAs.
		p := f.Peers[0]
		owners, bad := f.Settled(60*time.Second, f.Peers...)
		for _, why := range bad {
			t.Logf("left out (not healthy before the move, see the earlier failures): %s", why)
		}
		var others []*ikelab.Peer
		olds := map[*ikelab.Peer][]uint32{}
		for q := range owners {
			if q != p {
				others = append(others, q)
				olds[q] = f.SPIs(q)
			}
		}
		old := f.SPIs(p)
		before := snapshot(tr, others)
		re := slices.Clone(tunnels)
		re[0].Node = "node2"
		re[1].Node = owner(f.Peers[1]) // pinned-b stays where it is
		st, err := f.Director.Status()
		if err != nil {
			t.Fatal(err)
		}
		cmdAt := time.Now()
		kernelAt := f.Import(re...)
		f.Director.Kill()
		killed := time.Since(cmdAt)
		r, err := f.Director.StoreCheck()
		if err != nil {
			t.Fatal(err)
		}
		if !r.OK() {
			t.Fatalf("store damaged by the kill: %v", r.Problems)
		}
		// The import committed after st.Revision: its records are
		// unwritten when the records stop at or before it.
		if r.Folded > st.Revision {
			t.Fatalf("the kill (%.1f s after the import) came after the fold (records written up to revision %d, the import after %d): the restart below would not replay the move", killed.Seconds(), r.Folded, st.Revision)
		}
		t.Logf("killed %.1f s after the import: records written up to revision %d, the store at %d, %d change(s) pending", killed.Seconds(), r.Folded, r.Revision, r.Pending)
		f.Director.Start()
		f.Director.WaitKernel()
		if o := owner(p); o != "node2" {
			t.Fatalf("after the kill and restart pinned-a is on %s, want node2: the move was lost", o)
		}
		moved(t, "kill-after-move", p, "node0", "node2", cmdAt, kernelAt, old)
		for q, n := range lostSince(tr, others, before) {
			t.Errorf("%s: %d pings lost across the kill and restart", q.Name, n)
		}
		for _, q := range others {
			if !slices.Equal(f.SPIs(q), olds[q]) {
				t.Errorf("%s (on %s) re-established across the kill and restart", q.Name, owners[q])
			}
		}
	})

	t.Run("node-down", func(t *testing.T) {
		defer f.Use(t)()
		// The node with the most tunnels dies: its charon is killed and its
		// link goes down, then the operator says `node down`.
		// After a failed move the moved peer may still be dark: the node
		// failure is judged on the tunnels that are healthy now.
		owners, bad := f.Settled(60*time.Second, f.Peers...)
		for _, why := range bad {
			t.Logf("left out (not healthy before the node failure, see the earlier failures): %s", why)
		}
		if len(owners) == 0 {
			t.Fatal("no healthy tunnel left to fail a node under")
		}
		count := map[string]int{}
		for _, o := range owners {
			count[o]++
		}
		victim := "node0"
		for _, n := range f.Nodes {
			if count[n.Name] > count[victim] {
				victim = n.Name
			}
		}
		old := map[*ikelab.Peer][]uint32{}
		for p := range owners {
			old[p] = f.SPIs(p)
		}
		vn := f.Node(victim)
		if err := vn.Charon.Kill(); err != nil {
			t.Fatal(err)
		}
		l, err := vn.Host.Link("in0")
		if err != nil {
			t.Fatal(err)
		}
		if err := vn.Host.Handle().LinkSetDown(l); err != nil {
			t.Fatal(err)
		}
		cmdAt := time.Now()
		f.Director.MustCLI("node", "down", victim)
		kernelAt := f.Director.WaitKernel()
		var movedPeers []*ikelab.Peer
		for _, p := range f.Peers {
			if o, ok := owners[p]; ok && o == victim {
				movedPeers = append(movedPeers, p)
			}
		}
		t.Logf("%s down with %d tunnels (%d healthy in the farm)", victim, len(movedPeers), len(owners))
		for _, p := range movedPeers {
			to := owner(p)
			if to == victim {
				t.Fatalf("%s still owned by %s after node down", p.Name, victim)
			}
			checkRecovered(t, f, tr, mode, "node-down", p, victim, to, cmdAt, kernelAt, old[p])
		}
		checkUntouched(t, f, owners, victim, old)
	})
}

func peerByAddr(f *ikelab.Farm, a string) *ikelab.Peer {
	for _, p := range f.Peers {
		if p.Addr.String() == a {
			return p
		}
	}
	return nil
}

// checkRecovered waits until p's tunnel, moved from one node to another
// at at, is back up on to (old: its SPIs before), logs the two MEASURE
// figures of what, and checks that from kernelAt on its packets reach
// only to.
func checkRecovered(t *testing.T, f *ikelab.Farm, tr *ikelab.Traffic, mode ikelab.Mode, what string, p *ikelab.Peer, from, to string, at, kernelAt time.Time, old []uint32) {
	t.Helper()
	r, err := f.WaitRecovered(p, from, to, at, old, tr, recoverWithin)
	if err != nil {
		t.Error(err)
	} else {
		t.Logf("MEASURE mode=%s what=%s-to-first-new-ESP peer=%s seconds=%.1f", mode, what, p.Name, r.FirstESP.Seconds())
		t.Logf("MEASURE mode=%s what=%s-to-flowing peer=%s seconds=%.1f", mode, what, p.Name, r.Flowing.Seconds())
	}
	if err := f.OnlyAt(p, to, kernelAt.Add(moveMargin)); err != nil {
		t.Error(err)
	}
}

// checkUntouched checks that every tunnel whose owner was not victim kept
// its SAs (old: the SPIs before).
func checkUntouched(t *testing.T, f *ikelab.Farm, owners map[*ikelab.Peer]string, victim string, old map[*ikelab.Peer][]uint32) {
	t.Helper()
	for p, o := range owners {
		if o != victim && !slices.Equal(f.SPIs(p), old[p]) {
			t.Errorf("%s (on %s) re-established although its node is alive", p.Name, o)
		}
	}
}

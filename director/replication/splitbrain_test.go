package replication

import (
	"slices"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// TestSplitBrainConverges: the link breaks, both directors are master and
// both change the table; when it heals and keepalived demotes one, the
// pair converges by the documented rule, loses no tunnel either side
// learned, and reports each conflict.
func TestSplitBrainConverges(t *testing.T) {
	for _, demote := range []int{0, 1} {
		t.Run([]string{"old-master-demoted", "new-master-demoted"}[demote], func(t *testing.T) {
			p := newPair(t, lossy(0.05, 11), nil)
			p.startBoth()
			o := newOps(11)
			commit(p.st[0], o.init())
			var base []affinity.Change
			for i := range 20 {
				base = append(base, affinity.Change{Kind: affinity.PutTunnel, Tunnel: o.tunnel(i)})
			}
			commit(p.st[0], base)
			o.next = 20
			if !p.settle(10 * time.Second) {
				t.Fatal(p.describeDiff())
			}

			p.net.Partition(true)
			p.steps(4000) // the backup notices the master is gone
			// It says so, but stays ready: it holds the master's last
			// table, so it must be able to win the election now.
			if st := p.r[1].Status(); st.State != StateOutOfSync || !p.r[1].Ready() {
				t.Errorf("backup cut off from its master says %s %q, ready %v", st.State, st.Reason, p.r[1].Ready())
			}
			p.r[1].SetRole(RoleMaster) // keepalived on the backup takes over

			put := func(side int, tu *affinity.Tunnel) {
				t.Helper()
				if _, err := p.st[side].Commit([]affinity.Change{{Kind: affinity.PutTunnel, Tunnel: tu}}); err != nil {
					t.Fatal(err)
				}
			}
			edit := func(side int, id, comment string) {
				tu, _ := p.st[side].Table().Tunnel(id)
				tu.Comment = comment
				put(side, &tu)
			}
			// Side 0 (old master, epoch 1) learns a0, a1; edits t1 and t2.
			put(0, o.tunnel(100))
			put(0, o.tunnel(101))
			edit(0, "t1", "edited by old master")
			edit(0, "t2", "edited by old master")
			// Side 1 (new master, epoch 2) learns b0; edits t1, t3;
			// deletes t4.
			put(1, o.tunnel(200))
			edit(1, "t1", "edited by new master")
			edit(1, "t3", "edited by new master")
			if _, err := p.st[1].Commit([]affinity.Change{{Kind: affinity.DeleteTunnel, Name: "t4"}}); err != nil {
				t.Fatal(err)
			}
			p.steps(10)

			p.net.Partition(false)
			p.steps(300)
			if st := p.r[0].Status(); st.State != StateOutOfSync {
				t.Errorf("both masters, yet %s %q", st.State, st.Reason)
			}
			p.r[demote].SetRole(RoleBackup)
			m, b := 1-demote, demote
			ok := false
			for range 30000 {
				p.step()
				if p.equal() && p.r[b].Status().State == StateInSync {
					ok = true
					break
				}
			}
			if !ok {
				t.Fatalf("no convergence: master %+v\nbackup %+v", p.r[m].Status(), p.r[b].Status())
			}
			tab := p.st[m].Table()
			for _, id := range []string{"t100", "t101", "t200", "t4", "t2", "t3"} {
				if _, ok := tab.Tunnel(id); !ok {
					t.Errorf("tunnel %s lost", id)
				}
			}
			want := map[string]string{"t1": "edited by new master", "t2": "edited by old master", "t3": "edited by new master"}
			for id, c := range want {
				if tu, _ := tab.Tunnel(id); tu.Comment != c {
					t.Errorf("%s comment %q, want %q", id, tu.Comment, c)
				}
			}
			reps := p.r[m].Conflicts()
			if len(reps) != 1 {
				t.Fatalf("%d merge reports", len(reps))
			}
			rep := reps[0]
			t.Logf("merge report: fork %d, kept %v, adopted %v, %d conflict(s)", rep.Fork, rep.KeptFromPeer, rep.AdoptedFromPeer, len(rep.Conflicts))
			for _, c := range rep.Conflicts {
				t.Logf("  %s %s: winner %s: %s", c.Kind, c.Key, c.Winner, c.Why)
			}
			if len(rep.Conflicts) != 1 || rep.Conflicts[0].Key != "t1" {
				t.Fatalf("conflicts %+v, want exactly t1", rep.Conflicts)
			}
			wantWinner := map[int]string{0: "local", 1: "peer"}[demote]
			if c := rep.Conflicts[0]; c.Winner != wantWinner || c.Local == nil || c.Peer == nil {
				t.Errorf("t1 conflict %+v, want winner %s (the newer epoch's version)", c, wantWinner)
			}
			var kept []string
			if demote == 0 {
				kept = []string{"t100", "t101", "t4"} // t4: deleted by the new master only
			} else {
				kept = []string{"t200"}
			}
			if !slices.Equal(rep.KeptFromPeer, kept) {
				t.Errorf("kept from peer %v, want %v", rep.KeptFromPeer, kept)
			}
			if p.r[m].Epoch() <= p.r[b].Epoch() || p.r[m].Epoch() < 2 {
				t.Errorf("master epoch %d not above the merged side's %d", p.r[m].Epoch(), p.r[b].Epoch())
			}
		})
	}
}

package ctsync

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

func lossy(loss float64, seed uint64) replication.FakeConfig {
	return replication.FakeConfig{Seed: seed, Drop: loss, Duplicate: loss / 2, Reorder: 0.1, Delay: time.Millisecond, MaxDelay: 5 * time.Millisecond}
}

// churn runs random events on the master: new flows, state changes,
// destroys, flows outside the scope (filtered), handshakes held back.
func churn(p *pair, rng *rand.Rand, rounds int) {
	live := map[int]conntrack.Flow{}
	next := 0
	for range rounds {
		for range 1 + rng.IntN(20) {
			switch k := rng.IntN(100); {
			case k < 50 || len(live) == 0:
				f := flowN(next)
				if rng.IntN(10) == 0 { // a handshake: held back
					f.TCP.State = conntrack.TCPSynSent
					f.Status = conntrack.StatusConfirmed
				}
				if rng.IntN(10) == 0 { // not the director's traffic
					f.Orig = conntrack.MakeTuple(conntrack.ProtoUDP, netip.MustParseAddr("192.0.2.9"), netip.MustParseAddr("192.0.2.10"), uint16(next), 53)
					f.Reply, f.TCP = f.Orig.Inverse(), conntrack.TCPInfo{}
				}
				live[next] = f
				p.event(conntrack.EventNew, f)
				next++
			case k < 80:
				for id, f := range live {
					f.TCP.State = conntrack.TCPEstablished + uint8(rng.IntN(5))
					f.Status |= conntrack.StatusSeenReply | conntrack.StatusAssured
					f.Mark = uint32(rng.IntN(3))
					live[id] = f
					p.event(conntrack.EventUpdate, f)
					break
				}
			default:
				for id, f := range live {
					delete(live, id)
					p.event(conntrack.EventDestroy, f)
					break
				}
			}
		}
		p.step()
	}
}

// TestStreamUnderLoss: the conntrack stream under 0-30 % loss (with
// duplicates and reordering) leaves the backup's cache holding exactly
// the master's synced flows, with their state.
func TestStreamUnderLoss(t *testing.T) {
	for _, loss := range []float64{0, 0.05, 0.10, 0.30} {
		t.Run(fmt.Sprintf("loss%.0f%%", loss*100), func(t *testing.T) {
			p := newPair(t, lossy(loss, 7), nil)
			churn(p, rand.New(rand.NewPCG(7, 1)), 400)
			if err := p.settle(1, 0, 30*time.Second); err != nil {
				t.Fatalf("after recovery: %v\nmaster %+v\nbackup %+v", err, p.s[0].Status(), p.s[1].Status())
			}
			st := p.s[1].Status()
			t.Logf("loss %.0f%%: %d flows cached; backup %+v; stream %+v", loss*100, st.Cached, st.Counters, st.Stream)
			if loss > 0 && p.s[0].Status().Stream.Resent == 0 {
				t.Errorf("nothing resent under %.0f%% loss", loss*100)
			}
			if st.Cached == 0 {
				t.Fatal("nothing cached")
			}
		})
	}
}

// TestResyncSweeps: a backup that missed destroys (a partition longer
// than the window holds) is reset, resynced, and ends with exactly the
// master's flows: what the resync did not carry is swept.
func TestResyncSweeps(t *testing.T) {
	p := newPair(t, lossy(0, 3), func(c *Config, rc *replication.Config) { rc.CTWindowBytes = 4 << 10 })
	for i := range 500 {
		p.event(conntrack.EventNew, flowN(i))
	}
	if err := p.settle(1, 0, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	p.net.Partition(true)
	for i := range 400 { // destroys and new flows the backup never sees
		p.event(conntrack.EventDestroy, flowN(i))
		p.event(conntrack.EventNew, flowN(1000+i))
		p.step()
	}
	p.net.Partition(false)
	if err := p.settle(1, 0, 20*time.Second); err != nil {
		t.Fatalf("after the partition: %v\nbackup %+v", err, p.s[1].Status())
	}
	st := p.s[1].Status()
	if st.Stream.Lost == 0 || st.Cache.Swept == 0 || st.ResyncsReceived == 0 {
		t.Fatalf("healed without a reset and a sweeping resync: %+v", st)
	}
	t.Logf("lost %d datagrams, resynced, swept %d stale flows: %+v", st.Stream.Lost, st.Cache.Swept, st.Counters)
}

// TestTakeover: the backup becoming master commits its cache into its
// kernel (with the flows' state and remaining timeouts), then streams its
// own flows; the old master, now backup, shortens its synced entries'
// timers and asks for a resync, and ends caching the new master's flows.
func TestTakeover(t *testing.T) {
	p := newPair(t, lossy(0.05, 11), nil)
	for i := range 300 {
		p.event(conntrack.EventNew, flowN(i))
	}
	if err := p.settle(1, 0, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	p.clk.Advance(100 * time.Second) // time passes: timeouts run down
	p.setRoles(replication.RoleBackup, replication.RoleMaster)
	rep := p.s[1].Status().LastCommit
	if rep == nil || rep.Entries != 300 || rep.Failed != 0 {
		t.Fatalf("takeover commit: %+v", rep)
	}
	for i := range 300 {
		w := flowN(i)
		g, ok := p.tab[1].flows[keyOf(&w)]
		if !ok || g.TCP != w.TCP || g.Status != w.Status {
			t.Fatalf("committed %v, want %v", &g, &w)
		}
		if g.Timeout > w.Timeout-99 || g.Timeout < w.Timeout-102 {
			t.Fatalf("committed timeout %d, want about %d", g.Timeout, w.Timeout-100)
		}
	}
	// The old master's synced entries were left to run out.
	if n := len(p.tab[0].timeouts); n != 300 {
		t.Fatalf("old master shortened %d entries' timers, want 300", n)
	}
	// The new master streams its own flows; the old one caches them.
	for i := 300; i < 400; i++ {
		p.event2(1, conntrack.EventNew, flowN(i))
	}
	if err := p.settle(0, 1, 10*time.Second); err != nil {
		t.Fatalf("old master after takeover: %v\n%+v", err, p.s[0].Status())
	}
}

// event2 is event on director i.
func (p *pair) event2(i int, typ conntrack.EventType, f conntrack.Flow) {
	if typ == conntrack.EventDestroy {
		p.tab[i].del(f)
	} else {
		p.tab[i].put(f)
	}
	p.s[i].handleEvent(&conntrack.Event{Type: typ, Flow: f}, &p.buf)
}

// TestSplitBrainCachesReconcile: both directors master, each with flows of
// its own; when one goes back to backup, its cache ends equal to the
// remaining master's flows and nothing of its own.
func TestSplitBrainCachesReconcile(t *testing.T) {
	p := newPair(t, lossy(0, 5), nil)
	p.net.Partition(true)
	p.setRoles(replication.RoleMaster, replication.RoleMaster)
	for i := range 200 {
		p.event2(0, conntrack.EventNew, flowN(i))
		p.event2(1, conntrack.EventNew, flowN(5000+i))
	}
	p.steps(100)
	p.net.Partition(false)
	p.steps(100)
	p.setRoles(replication.RoleMaster, replication.RoleBackup)
	if err := p.settle(1, 0, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

func (p *pair) steps(n int) {
	for range n {
		p.step()
	}
}

// TestForgedConntrackData: datagrams sealed with another key, replayed,
// or carrying records that do not decode are refused and counted, and
// nothing of them reaches the cache.
func TestForgedConntrackData(t *testing.T) {
	p := newPair(t, lossy(0, 9), nil)
	var captured [][]byte
	p.net.SetTap(func(from int, b []byte) {
		if from == 0 {
			captured = append(captured, b)
		}
	})
	for i := range 50 {
		p.event(conntrack.EventNew, flowN(i))
	}
	if err := p.settle(1, 0, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	before := p.r[1].Status().Counters
	for _, b := range captured {
		p.net.Inject(1, b) // replayed
	}
	p.steps(10)
	after := p.r[1].Status().Counters
	// Refused as replays, or (those sealed before the master learned
	// the backup's session) as bound to another session.
	if n := after.Replays - before.Replays + after.StaleSession - before.StaleSession; n != uint64(len(captured)) {
		t.Fatalf("%d datagrams replayed, %d refused", len(captured), n)
	}
	// A datagram sealed with another key.
	forged := append([]byte(nil), captured[len(captured)-1]...)
	forged[len(forged)-1] ^= 1
	p.net.Inject(1, forged)
	p.steps(2)
	if got := p.r[1].Status().Counters.AuthFailures; got != after.AuthFailures+1 {
		t.Fatalf("forged datagram: auth failures %d, was %d", got, after.AuthFailures)
	}
	if err := p.cacheMatches(1, 0); err != nil {
		t.Fatal(err)
	}
	// Records that do not decode (from an authentic but broken master).
	if err := p.s[1].CTRecords([]byte{recPut, 0xff, 6}); err == nil || p.s[1].Status().Malformed != 1 {
		t.Fatalf("malformed record: %v %+v", err, p.s[1].Status())
	}
}

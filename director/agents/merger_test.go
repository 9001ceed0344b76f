package agents

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

var t0 = time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)

// farm is a table of three nodes, a merger, and the agents' sessions,
// on a clock the test moves.
type farm struct {
	t   *testing.T
	tab *affinity.Table
	m   *Merger
	now time.Time
	seq map[string]uint64
	sum map[string]xfrm.Summary // the agents' last summaries, which heartbeats repeat
}

func newFarm(t *testing.T, mut func(*Config)) *farm {
	t.Helper()
	f := &farm{t: t, now: t0, seq: map[string]uint64{}, sum: map[string]xfrm.Summary{}}
	tab, err := affinity.New(affinity.Options{VIPs: []netip.Addr{addr("192.0.2.1")}, Now: func() time.Time { return f.now }})
	if err != nil {
		t.Fatal(err)
	}
	f.tab = tab
	for i, n := range []string{"n1", "n2", "n3"} {
		f.apply(affinity.Change{Kind: affinity.PutNode, Node: &affinity.Node{Name: n, Addr: addr(fmt.Sprintf("172.16.0.%d", i+1))}})
	}
	cfg := DefaultConfig()
	cfg.TokenDir = "unused"
	if mut != nil {
		mut(&cfg)
	}
	f.m = NewMerger(cfg)
	return f
}

func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }
func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func pfxs(ss ...string) []netip.Prefix {
	out := []netip.Prefix{}
	for _, s := range ss {
		out = append(out, pfx(s))
	}
	return out
}

// sa is a node's facts of one peer: one CHILD_SA with these subnets.
func sa(peer string, subnets ...string) xfrm.Tunnel {
	return xfrm.Tunnel{Peer: addr(peer), Subnets: pfxs(subnets...), SAs: 2, LastUse: t0.Unix(),
		SPIs: []xfrm.SPI{{SPI: 0xc0000001, Reqid: 1, Dir: xfrm.In, Proto: "esp"}, {SPI: 0xc0000002, Reqid: 1, Dir: xfrm.Out, Proto: "esp"}}}
}

func (f *farm) apply(cs ...affinity.Change) {
	f.t.Helper()
	if _, err := f.tab.Apply(cs); err != nil {
		f.t.Fatal(err)
	}
}

// full sends a node's full report (a new session).
func (f *farm) full(node string, ts ...xfrm.Tunnel) report.Ack {
	f.t.Helper()
	f.seq[node] = 1
	r := &report.Report{Version: report.Version, Kind: report.KindFull, Node: node, Session: "s-" + node, Seq: 1, Tunnels: ts}
	for _, tu := range ts {
		r.Summary.SAs += tu.SAs
	}
	r.Summary.Tunnels = len(ts)
	f.sum[node] = r.Summary
	ack, err := f.m.Accept(node, r, f.now)
	if err != nil {
		f.t.Fatal(err)
	}
	return ack
}

// delta sends the next delta of a node's session.
func (f *farm) delta(node string, upserts []xfrm.Tunnel, removed ...string) report.Ack {
	f.t.Helper()
	f.seq[node]++
	r := &report.Report{Version: report.Version, Kind: report.KindDelta, Node: node, Session: "s-" + node, Seq: f.seq[node], Tunnels: upserts}
	for _, p := range removed {
		r.Removed = append(r.Removed, addr(p))
	}
	ack, err := f.m.Accept(node, r, f.now)
	if err != nil {
		f.t.Fatal(err)
	}
	return ack
}

func (f *farm) heartbeat(node string) report.Ack {
	f.t.Helper()
	r := &report.Report{Version: report.Version, Kind: report.KindHeartbeat, Node: node, Session: "s-" + node, Seq: f.seq[node], Summary: f.sum[node]}
	ack, err := f.m.Accept(node, r, f.now)
	if err != nil {
		f.t.Fatal(err)
	}
	return ack
}

// merge plans (a sweep when asked) and commits; it returns the plan.
func (f *farm) merge(sweep bool) *Plan {
	f.t.Helper()
	p := f.m.Plan(f.tab, f.now, sweep)
	_, err := f.tab.Apply(p.Changes)
	f.m.Done(p, 0, err)
	if err != nil {
		f.t.Fatalf("the merge's batch was refused: %v", err)
	}
	return p
}

func (f *farm) tunnel(peer string) affinity.Tunnel {
	f.t.Helper()
	tu, ok := f.tab.LookupPeer(addr(peer))
	if !ok {
		f.t.Fatalf("peer %s not in the table", peer)
	}
	return tu
}

func (f *farm) nms(id, peer, node string, pinned bool, subnets ...string) {
	f.apply(affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: id, Peer: addr(peer), Node: node, Pinned: pinned, Subnets: pfxs(subnets...)}})
}

func (f *farm) learnedByPacket(peer, node string) {
	f.apply(affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: "learned-" + peer, Peer: addr(peer), Node: node, Learned: true}})
}

func unappliedFor(m *Merger, peer string) []Unapplied {
	var out []Unapplied
	for _, u := range m.Unapplied() {
		if u.Peer == addr(peer) {
			out = append(out, u)
		}
	}
	return out
}

func TestUnknownPeerLearnedWithItsSubnets(t *testing.T) {
	f := newFarm(t, nil)
	f.full("n2", sa("198.51.100.7", "10.7.0.0/24", "10.7.1.0/24"))
	p := f.merge(false)
	if p.Learned != 1 || len(p.Changes) != 1 {
		t.Fatalf("plan %+v", p)
	}
	tu := f.tunnel("198.51.100.7")
	if tu.ID != "learned-198.51.100.7" || tu.Node != "n2" || !tu.Learned || !tu.Seen.Equal(t0) ||
		!slices.Equal(tu.Subnets, pfxs("10.7.0.0/24", "10.7.1.0/24")) {
		t.Fatalf("learned %+v", tu)
	}
	if m, ok := f.tab.Lookup(addr("10.7.1.9")); !ok || m.Node.Name != "n2" {
		t.Fatalf("return traffic to the negotiated subnet: %+v %v", m, ok)
	}
	// Nothing new: nothing to do, also on a sweep.
	f.heartbeat("n2")
	if p := f.merge(true); len(p.Changes) != 0 {
		t.Fatalf("a quiet farm changed the table: %+v", p.Changes)
	}
}

func TestLearnedTunnelTakesItsOwnersSubnets(t *testing.T) {
	f := newFarm(t, nil)
	f.learnedByPacket("198.51.100.7", "n1")
	f.full("n1", sa("198.51.100.7", "10.7.0.0/24"))
	// Another node's facts never give a tunnel subnets.
	f.full("n3", sa("198.51.100.7", "10.99.0.0/16"))
	p := f.merge(false)
	if p.Subnets != 1 {
		t.Fatalf("plan %+v", p)
	}
	tu := f.tunnel("198.51.100.7")
	if tu.Node != "n1" || !slices.Equal(tu.Subnets, pfxs("10.7.0.0/24")) || !tu.Learned {
		t.Fatalf("tunnel %+v", tu)
	}
	// A new CHILD_SA's subnet is added at once.
	f.delta("n1", []xfrm.Tunnel{sa("198.51.100.7", "10.7.0.0/24", "10.8.0.0/24")})
	f.merge(false)
	if tu := f.tunnel("198.51.100.7"); !slices.Equal(tu.Subnets, pfxs("10.7.0.0/24", "10.8.0.0/24")) {
		t.Fatalf("subnets %v", tu.Subnets)
	}
}

// TestTunnelStoredBeforeTheLearnedFlag: a learned tunnel of an older store
// (no flag, no subnets) is recognised and marked.
func TestTunnelStoredBeforeTheLearnedFlag(t *testing.T) {
	f := newFarm(t, nil)
	f.apply(affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: "learned-198.51.100.7", Peer: addr("198.51.100.7"), Node: "n1"}})
	f.full("n1", sa("198.51.100.7", "10.7.0.0/24"))
	f.merge(false)
	if tu := f.tunnel("198.51.100.7"); !tu.Learned || len(tu.Subnets) != 1 {
		t.Fatalf("tunnel %+v", tu)
	}
}

func TestConflictingSubnetsReportedNotApplied(t *testing.T) {
	f := newFarm(t, func(c *Config) { c.Subnets = pfxs("10.0.0.0/8", "192.0.2.0/24") })
	f.nms("hq", "198.51.100.1", "n1", false, "10.1.0.0/16")
	f.learnedByPacket("198.51.100.7", "n2")
	f.full("n2", sa("198.51.100.7", "10.1.2.0/24", "10.9.0.0/24", "172.31.0.0/24", "192.0.2.0/24"))
	f.merge(false)
	if tu := f.tunnel("198.51.100.7"); !slices.Equal(tu.Subnets, pfxs("10.9.0.0/24")) {
		t.Fatalf("applied %v, want only 10.9.0.0/24", tu.Subnets)
	}
	got := unappliedFor(f.m, "198.51.100.7")
	want := map[netip.Prefix]string{
		pfx("10.1.2.0/24"):   "lies inside subnet 10.1.0.0/16 of tunnel hq",
		pfx("172.31.0.0/24"): "outside agents.subnets",
		pfx("192.0.2.0/24"):  "contains director VIP 192.0.2.1",
	}
	if len(got) != len(want) {
		t.Fatalf("unapplied %+v", got)
	}
	for _, u := range got {
		if !strings.Contains(u.Reason, want[u.Subnet]) || u.Node != "n2" || u.Tunnel != "learned-198.51.100.7" {
			t.Errorf("unapplied %+v: want reason %q", u, want[u.Subnet])
		}
	}
	if s := f.m.Status(); s.Unapplied != 3 {
		t.Fatalf("status counts %d unapplied", s.Unapplied)
	}
	// The other tunnel is untouched.
	if tu, _ := f.tab.Tunnel("hq"); !slices.Equal(tu.Subnets, pfxs("10.1.0.0/16")) {
		t.Fatalf("hq %+v", tu)
	}
	// Once hq is gone, the next sweep applies the freed subnet.
	f.apply(affinity.Change{Kind: affinity.DeleteTunnel, Name: "hq"})
	f.merge(true)
	if tu := f.tunnel("198.51.100.7"); !slices.Equal(tu.Subnets, pfxs("10.1.2.0/24", "10.9.0.0/24")) {
		t.Fatalf("after hq left: %v", tu.Subnets)
	}
}

// TestOverlapsWithinOneMerge: two unknown peers negotiating overlapping
// subnets in the same batch: the first gets it, the second is reported,
// and the batch commits.
func TestOverlapsWithinOneMerge(t *testing.T) {
	f := newFarm(t, nil)
	f.full("n1", sa("198.51.100.1", "10.5.0.0/16"))
	f.full("n2", sa("198.51.100.2", "10.5.1.0/24", "10.6.0.0/24"))
	f.merge(false)
	a, b := f.tunnel("198.51.100.1"), f.tunnel("198.51.100.2")
	if !slices.Equal(a.Subnets, pfxs("10.5.0.0/16")) || !slices.Equal(b.Subnets, pfxs("10.6.0.0/24")) {
		t.Fatalf("a %v b %v", a.Subnets, b.Subnets)
	}
	if u := unappliedFor(f.m, "198.51.100.2"); len(u) != 1 || !strings.Contains(u[0].Reason, "198.51.100.1") {
		t.Fatalf("unapplied %+v", u)
	}
}

func TestNMSSubnetsStayAuthoritative(t *testing.T) {
	f := newFarm(t, nil)
	f.nms("site", "198.51.100.1", "n1", false, "10.1.0.0/24")
	f.full("n1", sa("198.51.100.1", "10.1.0.0/25", "10.7.0.0/24"))
	if p := f.merge(false); len(p.Changes) != 0 {
		t.Fatalf("an NMS tunnel changed: %+v", p.Changes)
	}
	u := unappliedFor(f.m, "198.51.100.1")
	if len(u) != 1 || u[0].Subnet != pfx("10.7.0.0/24") || !strings.Contains(u[0].Reason, "NMS") {
		t.Fatalf("mismatch report %+v (10.1.0.0/25 lies inside the NMS subnet: not a mismatch)", u)
	}
}

// TestFlappingSubnetDoesNotChurn: a subnet the owner stops negotiating
// stays for Hold, so a CHILD_SA that comes and goes changes nothing; one
// that stays away is dropped after Hold.
func TestFlappingSubnetDoesNotChurn(t *testing.T) {
	f := newFarm(t, func(c *Config) { c.Hold = 30 * time.Second })
	f.full("n1", sa("198.51.100.7", "10.7.0.0/24", "10.8.0.0/24"))
	f.merge(false)
	rev := f.tab.Revision()
	for i := range 20 {
		f.now = f.now.Add(time.Second)
		if i%2 == 0 {
			f.delta("n1", []xfrm.Tunnel{sa("198.51.100.7", "10.7.0.0/24")})
		} else {
			f.delta("n1", []xfrm.Tunnel{sa("198.51.100.7", "10.7.0.0/24", "10.8.0.0/24")})
		}
		f.merge(i%5 == 0)
	}
	if f.tab.Revision() != rev {
		t.Fatalf("a flapping CHILD_SA changed the table %d times", f.tab.Revision()-rev)
	}
	// Gone for good: dropped Hold after it left (a sweep notices).
	f.delta("n1", []xfrm.Tunnel{sa("198.51.100.7", "10.7.0.0/24")})
	f.merge(false)
	f.now = f.now.Add(29 * time.Second)
	f.merge(true)
	if tu := f.tunnel("198.51.100.7"); len(tu.Subnets) != 2 {
		t.Fatalf("dropped before Hold: %v", tu.Subnets)
	}
	f.now = f.now.Add(2 * time.Second)
	f.merge(true)
	if tu := f.tunnel("198.51.100.7"); !slices.Equal(tu.Subnets, pfxs("10.7.0.0/24")) {
		t.Fatalf("after Hold: %v", tu.Subnets)
	}
}

// misplacedFarm: tunnel "site" (peer .1) owned by n1 while its SA is on n2.
func misplacedFarm(t *testing.T, adopt Adopt, pinned bool) *farm {
	f := newFarm(t, func(c *Config) { c.Adopt = adopt; c.Hold = 20 * time.Second })
	f.nms("site", "198.51.100.1", "n1", pinned, "10.1.0.0/24")
	f.full("n1")
	f.full("n2", sa("198.51.100.1", "10.1.0.0/24"))
	return f
}

// run steps the farm: heartbeats of every agent each second, a sweep
// every five.
func (f *farm) run(d time.Duration) {
	for end := f.now.Add(d); f.now.Before(end); {
		f.now = f.now.Add(time.Second)
		for _, n := range f.m.inbox.Nodes() {
			f.heartbeat(n)
		}
		f.merge(f.now.Unix()%5 == 0)
	}
}

func TestMisplacedReported(t *testing.T) {
	f := misplacedFarm(t, AdoptReport, false)
	f.merge(true)
	f.run(2 * time.Minute)
	if tu := f.tunnel("198.51.100.1"); tu.Node != "n1" {
		t.Fatalf("adopt: report moved the tunnel to %s", tu.Node)
	}
	ms := f.m.Misplaced(f.tab)
	if len(ms) != 1 || ms[0].Tunnel != "site" || ms[0].Owner != "n1" || !slices.Equal(ms[0].HeldOn, []string{"n2"}) ||
		!strings.Contains(ms[0].Action, "adopt: report") || !ms[0].Since.Equal(t0) {
		t.Fatalf("misplaced %+v", ms)
	}
	if s := f.m.Status(); s.Misplaced != 1 {
		t.Fatalf("status: %d misplaced", s.Misplaced)
	}
	if v, ok := f.m.Node("n2"); !ok || v.Misplaced != 1 || v.SAs != 2 || v.Tunnels != 1 {
		t.Fatalf("node view %+v", v)
	}
}

func TestFollowSA(t *testing.T) {
	f := misplacedFarm(t, AdoptFollowSA, false)
	f.merge(true)
	f.run(19 * time.Second)
	if tu := f.tunnel("198.51.100.1"); tu.Node != "n1" {
		t.Fatalf("followed before Hold: %s", tu.Node)
	}
	if ms := f.m.Misplaced(f.tab); len(ms) != 1 || !strings.Contains(ms[0].Action, "follow-sa to n2 at") {
		t.Fatalf("misplaced %+v", ms)
	}
	f.run(2 * time.Second)
	tu := f.tunnel("198.51.100.1")
	if tu.Node != "n2" || !slices.Equal(tu.Subnets, pfxs("10.1.0.0/24")) {
		t.Fatalf("after Hold: %+v", tu)
	}
	if s := f.m.Status(); s.Followed != 1 {
		t.Fatalf("followed counted %d", s.Followed)
	}
	if ms := f.m.Misplaced(f.tab); len(ms) != 0 {
		t.Fatalf("still misplaced: %+v", ms)
	}
}

// TestFollowSARefusals: each condition of follow-sa, broken, keeps the
// tunnel where it is.
func TestFollowSARefusals(t *testing.T) {
	cases := []struct {
		name   string
		pinned bool
		setup  func(f *farm)
		action string
	}{
		{"pinned", true, nil, "pinned by the NMS"},
		{"owner holds an SA too", false, func(f *farm) { f.full("n1", sa("198.51.100.1", "10.1.0.0/24")) }, "owner holds an SA too"},
		{"two other nodes", false, func(f *farm) { f.full("n3", sa("198.51.100.1", "10.1.0.0/24")) }, "several other nodes"},
		{"owner's agent never reported", false, func(f *farm) { f.m.inbox.Forget("n1") }, "not reporting"},
		{"holder down", false, func(f *farm) {
			n, _ := f.tab.Node("n2")
			n.State = affinity.NodeDown
			f.apply(affinity.Change{Kind: affinity.PutNode, Node: &n})
		}, "n2 is down"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := misplacedFarm(t, AdoptFollowSA, c.pinned)
			if c.setup != nil {
				c.setup(f)
			}
			f.merge(true)
			f.run(time.Minute)
			if tu := f.tunnel("198.51.100.1"); tu.Node != "n1" {
				t.Fatalf("moved to %s", tu.Node)
			}
			ms := f.m.Misplaced(f.tab)
			if len(ms) != 1 || !strings.Contains(ms[0].Action, c.action) {
				t.Fatalf("misplaced %+v, want action %q", ms, c.action)
			}
		})
	}
}

// TestFollowSAWaitsForASilentOwner: an owner whose agent stopped
// reporting gives no evidence that it holds no SA.
func TestFollowSAWaitsForASilentOwner(t *testing.T) {
	f := misplacedFarm(t, AdoptFollowSA, false)
	for range 60 {
		f.now = f.now.Add(time.Second)
		f.heartbeat("n2") // n1's agent is silent
		f.merge(f.now.Unix()%5 == 0)
	}
	if tu := f.tunnel("198.51.100.1"); tu.Node != "n1" {
		t.Fatalf("followed while the owner's agent was silent: %s", tu.Node)
	}
	if ms := f.m.Misplaced(f.tab); len(ms) != 1 || !strings.Contains(ms[0].Action, "silent") {
		t.Fatalf("misplaced %+v", ms)
	}
}

// TestTableMoveIsNotUndoneAtOnce: a rebalance moves a tunnel off the node
// that holds its SA; the peer has Hold to re-establish on its new owner
// before follow-sa would pull it back, and once it has, nothing moves.
func TestTableMoveIsNotUndoneAtOnce(t *testing.T) {
	f := newFarm(t, func(c *Config) { c.Adopt = AdoptFollowSA; c.Hold = 20 * time.Second })
	f.nms("site", "198.51.100.1", "n2", false, "10.1.0.0/24")
	f.full("n1")
	f.full("n2", sa("198.51.100.1", "10.1.0.0/24"))
	f.run(time.Minute)
	// The operator moves it to n1; n2's SA lingers for 10 s, then the
	// peer re-establishes on n1.
	f.nms("site", "198.51.100.1", "n1", false, "10.1.0.0/24")
	f.run(10 * time.Second)
	f.delta("n2", nil, "198.51.100.1")
	f.delta("n1", []xfrm.Tunnel{sa("198.51.100.1", "10.1.0.0/24")})
	f.run(time.Minute)
	if tu := f.tunnel("198.51.100.1"); tu.Node != "n1" {
		t.Fatalf("the move was undone: %s", tu.Node)
	}
}

// TestLyingAgent: an agent claiming another node's peer changes nothing
// of that tunnel (subnets, owner), also under follow-sa while the owner
// holds it; what it can claim is a peer nobody owns, within
// agents.subnets.
func TestLyingAgent(t *testing.T) {
	f := newFarm(t, func(c *Config) { c.Adopt = AdoptFollowSA; c.Hold = 5 * time.Second; c.Subnets = pfxs("10.0.0.0/8") })
	f.learnedByPacket("198.51.100.1", "n1")
	f.full("n1", sa("198.51.100.1", "10.1.0.0/24"))
	f.merge(false)
	f.full("n3", sa("198.51.100.1", "10.1.0.0/16", "10.200.0.0/16"), sa("198.51.100.66", "0.0.0.0/0", "10.1.0.0/25", "10.66.0.0/16"))
	f.run(time.Minute)
	tu := f.tunnel("198.51.100.1")
	if tu.Node != "n1" || !slices.Equal(tu.Subnets, pfxs("10.1.0.0/24")) {
		t.Fatalf("the liar changed n1's tunnel: %+v", tu)
	}
	// The unknown peer it claims is learned onto the liar, with only what
	// is free and inside agents.subnets.
	if tu := f.tunnel("198.51.100.66"); tu.Node != "n3" || !slices.Equal(tu.Subnets, pfxs("10.66.0.0/16")) {
		t.Fatalf("claimed peer %+v", tu)
	}
	if m, _ := f.tab.Lookup(addr("10.1.0.9")); m.Tunnel.ID != "learned-198.51.100.1" {
		t.Fatalf("10.1.0.9 steered by %+v", m)
	}
}

func TestLearnedTTL(t *testing.T) {
	f := newFarm(t, func(c *Config) { c.LearnedTTL = time.Hour })
	f.nms("site", "198.51.100.1", "n1", false, "10.1.0.0/24")
	f.learnedByPacket("198.51.100.7", "n1") // never established
	f.full("n2", sa("198.51.100.8", "10.8.0.0/24"))
	f.merge(true)
	// n1's agent is not reporting yet: no evidence, nothing expires.
	f.now = f.now.Add(2 * time.Hour)
	f.merge(true)
	if _, ok := f.tab.Tunnel("learned-198.51.100.7"); !ok {
		t.Fatal("expired although its owner's agent never reported")
	}
	f.full("n1")
	// The next expiry pass: .7 goes (no SA anywhere for its whole life),
	// .8 stays (held, Seen refreshed), the NMS tunnel stays.
	f.now = f.now.Add(10 * time.Minute)
	f.heartbeat("n2")
	p := f.merge(true)
	if p.Expired != 1 {
		t.Fatalf("plan %+v", p)
	}
	if _, ok := f.tab.Tunnel("learned-198.51.100.7"); ok {
		t.Fatal("not expired")
	}
	if tu := f.tunnel("198.51.100.8"); !tu.Seen.After(t0) {
		t.Fatalf("seen not refreshed: %+v", tu)
	}
	// .8's SA goes; it expires learned_ttl after it was last seen.
	f.delta("n2", nil, "198.51.100.8")
	seen := f.tunnel("198.51.100.8").Seen
	for f.now.Before(seen.Add(time.Hour - time.Minute)) {
		f.now = f.now.Add(time.Minute)
		f.heartbeat("n1")
		f.heartbeat("n2")
		f.merge(true)
	}
	if _, ok := f.tab.Tunnel("learned-198.51.100.8"); !ok {
		t.Fatal("expired before learned_ttl")
	}
	f.now = f.now.Add(10 * time.Minute)
	f.merge(true)
	if _, ok := f.tab.Tunnel("learned-198.51.100.8"); ok {
		t.Fatal("not expired after learned_ttl")
	}
	if _, ok := f.tab.Tunnel("site"); !ok {
		t.Fatal("an NMS tunnel expired")
	}
}

// TestSeenIsCoarse: a held learned tunnel's Seen is written a few times
// per learned_ttl, not at every report.
func TestSeenIsCoarse(t *testing.T) {
	f := newFarm(t, func(c *Config) { c.LearnedTTL = 80 * time.Minute }) // step 10 min
	f.full("n1", sa("198.51.100.7", "10.7.0.0/24"))
	f.merge(false)
	rev := f.tab.Revision()
	f.run(30 * time.Minute)
	if n := f.tab.Revision() - rev; n < 2 || n > 3 {
		t.Fatalf("%d writes in 30 minutes with a 10-minute step", n)
	}
}

func TestResetForgetsSessions(t *testing.T) {
	f := newFarm(t, nil)
	f.full("n1", sa("198.51.100.7", "10.7.0.0/24"))
	f.m.Reset()
	if ack := f.heartbeat("n1"); !ack.NeedFull {
		t.Fatal("a heartbeat after the reset was not asked for a full report")
	}
	if s := f.m.Status(); s.Nodes != 0 {
		t.Fatalf("status after reset %+v", s)
	}
	if p := f.merge(true); len(p.Changes) != 0 {
		t.Fatalf("merged forgotten facts: %+v", p.Changes)
	}
}

// TestFailedCommitIsRetried: the peers of a plan whose commit failed are
// examined again.
func TestFailedCommitIsRetried(t *testing.T) {
	f := newFarm(t, nil)
	f.full("n1", sa("198.51.100.7", "10.7.0.0/24"))
	p := f.m.Plan(f.tab, f.now, false)
	f.m.Done(p, 0, fmt.Errorf("disk full"))
	if s := f.m.Status(); s.MergeErrors != 1 || s.LastError != "disk full" {
		t.Fatalf("status %+v", s)
	}
	if p := f.merge(false); p.Learned != 1 {
		t.Fatalf("retry plan %+v", p)
	}
}

func TestRemovedNodeForgotten(t *testing.T) {
	f := newFarm(t, nil)
	f.full("n3", sa("198.51.100.7", "10.7.0.0/24"))
	f.merge(false)
	f.apply(affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: "learned-198.51.100.7", Peer: addr("198.51.100.7"), Node: "n1", Learned: true, Subnets: pfxs("10.7.0.0/24")}},
		affinity.Change{Kind: affinity.DeleteNode, Name: "n3"})
	f.merge(true)
	if nodes := f.m.inbox.Nodes(); slices.Contains(nodes, "n3") {
		t.Fatalf("facts of a removed node kept: %v", nodes)
	}
}

// TestDropRefusedChanges: a change the table refuses (the merge checks
// what it proposes, so this is the safety net) is dropped and reported,
// and the rest of the batch commits.
func TestDropRefusedChanges(t *testing.T) {
	f := newFarm(t, nil)
	f.full("n1", sa("198.51.100.7", "10.7.0.0/24"), sa("198.51.100.8", "10.8.0.0/24"))
	p := f.m.Plan(f.tab, f.now, false)
	if len(p.Changes) != 2 {
		t.Fatalf("plan %+v", p.Changes)
	}
	// Someone else takes .8's subnet between the plan and the commit.
	f.nms("other", "198.51.100.99", "n2", false, "10.8.0.0/16")
	_, err := f.tab.Apply(p.Changes)
	var be *affinity.BatchError
	if !errors.As(err, &be) {
		t.Fatalf("the stale batch committed: %v", err)
	}
	q := f.m.Drop(p, be)
	if _, err := f.tab.Apply(q.Changes); err != nil || len(q.Changes) != 1 {
		t.Fatalf("after the drop: %d changes, %v", len(q.Changes), err)
	}
	u := unappliedFor(f.m, "198.51.100.8")
	if len(u) != 1 || !strings.Contains(u[0].Reason, "refused by the table") {
		t.Fatalf("unapplied %+v", u)
	}
}

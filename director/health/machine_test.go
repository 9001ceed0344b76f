package health

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// manualClock is a clock the test moves by hand.
type manualClock struct{ t time.Time }

func (c *manualClock) Now() time.Time          { return c.t }
func (c *manualClock) advance(d time.Duration) { c.t = c.t.Add(d) }

// fixture is a machine over a manual clock that records its decisions
// and, like the daemon, feeds them back as the table's state.
type fixture struct {
	t       *testing.T
	clock   *manualClock
	m       *Machine
	got     []Decision
	fail    error // apply's answer
	nodes   map[string]Node
	order   []string
	rev     uint64
	applied func(Decision) // the daemon: commit, then SetNodes
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func testConfig() Config {
	c := DefaultConfig()
	c.Flap = Flap{Count: 2, Window: time.Minute, Hold: 30 * time.Second, HoldMax: 2 * time.Minute}
	return c
}

func newFixture(t *testing.T, cfg Config, names ...string) *fixture {
	f := &fixture{t: t, clock: &manualClock{t: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)}, nodes: map[string]Node{}}
	f.m = NewMachine(cfg, f.clock, func(d Decision) error {
		if f.fail != nil {
			return f.fail
		}
		f.got = append(f.got, d)
		n := f.nodes[d.Node]
		n.State, n.Record = d.State, d.Record
		f.nodes[d.Node] = n
		return nil
	}, quiet())
	for i, name := range names {
		f.nodes[name] = Node{Name: name, Addr: netip.AddrFrom4([4]byte{192, 0, 2, byte(11 + i)}), State: affinity.NodeActive}
		f.order = append(f.order, name)
	}
	f.push()
	f.m.Role(true)
	return f
}

// push gives the machine the table's nodes, as the daemon does after a
// commit.
func (f *fixture) push() {
	f.rev++
	var ns []Node
	for _, name := range f.order {
		ns = append(ns, f.nodes[name])
	}
	f.m.SetNodes(f.rev, ns)
}

// operator applies a node action by hand, as the daemon would.
func (f *fixture) operator(name, action string) {
	n := f.nodes[name]
	switch action {
	case "up", "undrain":
		n.State = affinity.NodeActive
	case "down":
		n.State = affinity.NodeDown
	case "drain":
		n.State = affinity.NodeDraining
	}
	n.Record = n.Record.AfterOperator(action)
	f.nodes[name] = n
	f.push()
}

func (f *fixture) round(name string, ok bool) {
	f.t.Helper()
	c := CheckResult{Kind: CheckIKE, OK: ok, Detail: "INVALID_KE_PAYLOAD (group 31)", Latency: time.Millisecond}
	if !ok {
		c.Detail, c.Err = "", "timeout (4 requests, no answer)"
	}
	start := f.clock.Now()
	f.clock.advance(10 * time.Millisecond)
	f.m.Round(Round{Node: name, Start: start, End: f.clock.Now(), Checks: []CheckResult{c}})
}

// tick advances to the next interval.
func (f *fixture) tick() { f.clock.advance(time.Second - 10*time.Millisecond) }

// rounds runs n rounds of name's checks (passing when ok), a tick after
// each.
func (f *fixture) rounds(n int, name string, ok bool) {
	for range n {
		f.round(name, ok)
		f.tick()
	}
}

// take returns and clears the decisions so far.
func (f *fixture) take() []string {
	var out []string
	for _, d := range f.got {
		out = append(out, fmt.Sprintf("%s %s", d.Node, d.State))
	}
	f.got = nil
	return out
}

func (f *fixture) want(what string, want ...string) {
	f.t.Helper()
	got := f.take()
	if strings.Join(got, ",") != strings.Join(want, ",") {
		f.t.Fatalf("%s: decisions %q, want %q", what, got, want)
	}
}

func (f *fixture) view(name string) NodeView { return viewOf(f.t, f.m.Status(), name) }

// viewOf returns name's view in a status, failing the test when it has
// none.
func viewOf(t *testing.T, st Status, name string) NodeView {
	t.Helper()
	v, ok := st.Node(name)
	if !ok {
		t.Fatalf("no node %s in status", name)
	}
	return v
}

func TestRiseAndFall(t *testing.T) {
	f := newFixture(t, testConfig(), "n1", "n2", "n3")
	f.round("n1", false)
	f.want("one failed round of fall 2")
	if h := f.view("n1").Health(); !strings.HasPrefix(h, "failing 1/2 (ike: timeout") {
		t.Fatalf("health column %q", h)
	}
	f.tick()
	f.round("n1", true)
	f.tick()
	f.round("n1", false)
	f.want("a passing round between two failures resets the count")
	f.tick()
	f.round("n1", false)
	f.want("second failure in a row", "n1 down")
	if d := f.nodes["n1"]; !d.Record.Down || d.Record.Reason != "health: ike: timeout (4 requests, no answer) 2/2" {
		t.Fatalf("record after down: %+v", d.Record)
	}
	f.tick()
	f.round("n1", false)
	f.tick()
	f.round("n1", true)
	f.want("one passing round of rise 2")
	if h := f.view("n1").Health(); !strings.HasPrefix(h, "down since Dec  1 12:00:0") || !strings.Contains(h, "rising 1/2") {
		t.Fatalf("health column %q", h)
	}
	f.tick()
	f.round("n1", true)
	f.want("second passing round", "n1 active")
	if d := f.nodes["n1"]; d.Record.Down || len(d.Record.Downs) != 1 {
		t.Fatalf("record after up: %+v", d.Record)
	}
	if c := f.m.Status().Counters; c.Downs != 1 || c.Ups != 1 {
		t.Fatalf("counters %+v", c)
	}
}

func TestFlapDampingHoldsDownExponentially(t *testing.T) {
	cfg := testConfig() // flap: more than 2 downs in 10m: hold 30s, doubling to 2m
	cfg.Flap.Window = 10 * time.Minute
	f := newFixture(t, cfg, "n1", "n2", "n3")
	flap := func() {
		t.Helper()
		f.round("n1", false)
		f.tick()
		f.round("n1", false)
		f.tick()
		f.want("flap down", "n1 down")
	}
	rise := func() {
		t.Helper()
		f.round("n1", true)
		f.tick()
		f.round("n1", true)
		f.tick()
		f.want("flap up", "n1 active")
	}
	flap()
	rise()
	flap()
	rise()
	heldAt := f.clock.Now()
	flap() // the third down within a minute: held
	rec := f.nodes["n1"].Record
	if rec.Holds != 1 || rec.HoldUntil.Sub(heldAt) < 29*time.Second || rec.HoldUntil.Sub(heldAt) > 32*time.Second {
		t.Fatalf("first hold: %+v (held at %s)", rec, heldAt)
	}
	// Rounds are evaluated 10ms after the clock's whole second.
	for f.clock.Now().Add(10 * time.Millisecond).Before(rec.HoldUntil) {
		f.round("n1", true)
		if v := f.view("n1"); v.HeldUntil != rec.HoldUntil || (v.Rising >= v.Rise && !strings.HasPrefix(v.Pending, "up due, held down until")) {
			t.Fatalf("during the hold: held until %s, pending %q", v.HeldUntil, v.Pending)
		}
		f.tick()
	}
	f.want("passing rounds during the hold move nothing")
	f.round("n1", true)
	f.want("the first round after the hold", "n1 active")
	if c := f.m.Status().Counters; c.Holds != 1 || c.HeldUps == 0 {
		t.Fatalf("counters %+v", c)
	}

	// Flapping on: every further hold doubles, capped at hold_max.
	for i, want := range []time.Duration{time.Minute, 2 * time.Minute, 2 * time.Minute} {
		f.tick()
		at := f.clock.Now()
		flap()
		rec := f.nodes["n1"].Record
		if got := rec.HoldUntil.Sub(at); got < want-time.Second || got > want+2*time.Second {
			t.Fatalf("hold %d: %s, want about %s", i+2, got, want)
		}
		f.clock.t = rec.HoldUntil
		rise()
	}
	// Quiet for longer than hold_max and the window: the next flaps
	// start over from flap.hold.
	f.clock.advance(11 * time.Minute)
	flap()
	rise()
	flap()
	rise()
	at := f.clock.Now()
	flap()
	if rec := f.nodes["n1"].Record; rec.HoldUntil.Sub(at) > 32*time.Second || rec.Holds != 1 {
		t.Fatalf("after a quiet period: hold until %s (%s), holds %d", rec.HoldUntil, rec.HoldUntil.Sub(at), rec.Holds)
	}
}

func TestHeldNodeShowsHold(t *testing.T) {
	cfg := testConfig()
	cfg.Flap.Count = 1
	f := newFixture(t, cfg, "n1", "n2", "n3")
	f.rounds(2, "n1", false)
	f.want("down", "n1 down")
	f.rounds(2, "n1", true)
	f.want("up", "n1 active")
	f.rounds(2, "n1", false)
	f.want("down again: held", "n1 down")
	f.rounds(3, "n1", true)
	v := f.view("n1")
	if v.HeldUntil.IsZero() || !strings.HasPrefix(v.Health(), "held down until ") || !strings.Contains(v.Pending, "held down until") {
		t.Fatalf("held node: health %q pending %q", v.Health(), v.Pending)
	}
}

func TestPanicMovesNothing(t *testing.T) {
	f := newFixture(t, testConfig(), "n1", "n2", "n3", "n4")
	// Three of four fail at once: their rounds interleave.
	for range 4 {
		for _, n := range []string{"n1", "n2", "n3"} {
			f.round(n, false)
		}
		f.round("n4", true)
		f.tick()
	}
	f.want("3 of 4 failing")
	st := f.m.Status()
	if !strings.Contains(st.Panic, "3 of 4 nodes failing") || st.Counters.PanicDowns != 3 || st.Counters.Panics != 1 {
		t.Fatalf("status: panic %q counters %+v", st.Panic, st.Counters)
	}
	if v := f.view("n2"); v.Pending != "down due, not moved: panic" || !strings.Contains(v.Health(), "not moved: panic") {
		t.Fatalf("n2: %q", v.Health())
	}
	// One recovers: 2 of 4 failing is not more than half. The others
	// are not moved at once: they may be recovering too. Counts start
	// afresh after settle.
	f.round("n2", true)
	f.want("the panic ends; counts start afresh")
	if st := f.m.Status(); st.Panic != "" {
		t.Fatalf("panic still set: %q", st.Panic)
	}
	f.tick()
	f.round("n1", false)
	f.round("n3", true)
	f.want("n1 failing within settle, n3 recovered")
	f.clock.advance(testConfig().Settle)
	f.round("n1", false)
	f.tick()
	f.round("n1", false)
	f.want("n1 still failing after settle", "n1 down")
}

func TestPanicCountsNodesAlreadyDownByHealth(t *testing.T) {
	f := newFixture(t, testConfig(), "n1", "n2", "n3", "n4")
	fall := func(n string) {
		f.round(n, false)
		f.tick()
		f.round(n, false)
		f.tick()
	}
	fall("n1")
	f.want("1 of 4", "n1 down")
	fall("n2")
	f.want("2 of 4 is not more than half", "n2 down")
	fall("n3")
	f.want("3 of 4 is: health never takes down more than max_down_fraction of the farm")
	// The operator takes n1 down by hand: it leaves health's count (3
	// managed nodes, n2 down and n3 failing: still more than half).
	f.operator("n1", "down")
	f.round("n3", false)
	f.want("2 of 3 still panics")
	if v := f.view("n1"); !v.Operator || v.Health() != "down (operator)" {
		t.Fatalf("n1 after the operator's down: %q operator=%v", v.Health(), v.Operator)
	}
}

func TestInsideLinkDownMovesNothing(t *testing.T) {
	f := newFixture(t, testConfig(), "n1", "n2", "n3")
	f.round("n1", false)
	f.m.Link(false)
	f.tick()
	f.rounds(3, "n1", false)
	f.want("link down")
	if v := f.view("n1"); v.Failing != 0 {
		t.Fatalf("rounds counted while the link was down: failing %d", v.Failing)
	}
	if st := f.m.Status(); !strings.Contains(st.Panic, "inside link down") || st.LinkUp {
		t.Fatalf("status: %+v", st)
	}
	// A round that started before the link came back is not counted.
	start := f.clock.Now()
	f.clock.advance(5 * time.Millisecond)
	f.m.Link(true)
	f.clock.advance(5 * time.Millisecond)
	f.m.Round(Round{Node: "n1", Start: start, End: f.clock.Now(), Checks: []CheckResult{{Kind: CheckIKE, Err: "timeout"}}})
	f.tick()
	f.round("n1", false)
	f.tick()
	f.round("n1", false)
	f.want("failures within link_settle after the link came back are not counted")
	f.clock.advance(testConfig().Settle)
	f.round("n1", false)
	f.want("one counted failure after the link settled")
	f.tick()
	f.round("n1", false)
	f.want("two", "n1 down")
	if c := f.m.Status().Counters; c.NotCounted != 6 {
		t.Fatalf("not counted %d, want 6", c.NotCounted)
	}
}

func TestLinkDownDropsDueDecision(t *testing.T) {
	// A down that was due (its apply failed) when the link went down is
	// not taken: counts start afresh, and rounds are not counted while
	// the link is down.
	f := newFixture(t, testConfig(), "n1", "n2", "n3")
	f.fail = errors.New("store busy")
	f.round("n1", false)
	f.tick()
	f.round("n1", false)
	f.want("apply failed")
	f.m.Link(false)
	f.fail = nil
	f.tick()
	f.round("n1", false)
	f.want("link down: the failed decision is not retried")
}

func TestOperatorStatesWin(t *testing.T) {
	f := newFixture(t, testConfig(), "n1", "n2", "n3")
	f.operator("n1", "drain")
	f.rounds(3, "n1", false)
	f.want("a drained node failing is not taken down")
	f.operator("n2", "down")
	f.rounds(3, "n2", true)
	f.want("a node down by hand is not brought up")
	if v := f.view("n1"); !v.Operator || !strings.HasPrefix(v.Health(), "draining (operator)") {
		t.Fatalf("n1: %q", v.Health())
	}

	// A node held down by health; `node up` by hand clears the hold.
	cfg := testConfig()
	cfg.Flap.Count = 0 // every down holds
	cfg.Flap.Hold = time.Hour
	cfg.Flap.HoldMax = time.Hour
	g := newFixture(t, cfg, "n1", "n2", "n3")
	g.rounds(2, "n1", false)
	g.want("down and held", "n1 down")
	if g.nodes["n1"].Record.HoldUntil.IsZero() {
		t.Fatal("no hold")
	}
	g.operator("n1", "up")
	if v := g.view("n1"); v.State != affinity.NodeActive || v.Record.Down || !v.Record.HoldUntil.IsZero() || v.Failing != 0 {
		t.Fatalf("after node up by hand: %+v", v)
	}
	g.round("n1", false)
	g.want("counts start afresh after the operator's up")
	g.tick()
	g.round("n1", false)
	g.want("and health takes it down again when it keeps failing", "n1 down")
}

func TestBackupDecidesNothingAndNewMasterActs(t *testing.T) {
	f := newFixture(t, testConfig(), "n1", "n2", "n3")
	f.m.Role(false)
	f.rounds(3, "n1", false)
	f.want("backup")
	if v := f.view("n1"); v.Pending != "down due: the master decides" {
		t.Fatalf("backup view: %q", v.Pending)
	}
	f.m.Role(true)
	f.want("new master decides on its own checks at once", "n1 down")
}

func TestTakeoverContinuesHold(t *testing.T) {
	cfg := testConfig()
	cfg.Flap.Count = 0
	master := newFixture(t, cfg, "n1", "n2", "n3")
	master.rounds(2, "n1", false)
	master.want("down and held", "n1 down")
	rec := master.nodes["n1"].Record

	// The backup has the table and the records by replication, and runs
	// its own checks.
	backup := newFixture(t, cfg, "n1", "n2", "n3")
	backup.m.Role(false)
	backup.clock.t = master.clock.t
	backup.nodes = master.nodes
	backup.push()
	backup.rounds(3, "n1", true)
	backup.m.Role(true) // takeover
	backup.want("the hold carries over: nothing before it ends")
	backup.clock.t = rec.HoldUntil
	backup.round("n1", true)
	backup.want("after the hold the new master brings it up", "n1 active")
}

func TestApplyFailureIsRetried(t *testing.T) {
	f := newFixture(t, testConfig(), "n1", "n2", "n3")
	f.fail = errors.New("not master any more")
	f.round("n1", false)
	f.tick()
	f.round("n1", false)
	f.want("apply failed")
	if v := f.view("n1"); v.State != affinity.NodeActive || !strings.Contains(v.Pending, "not master any more") {
		t.Fatalf("after failed apply: %+v", v)
	}
	f.fail = nil
	f.tick()
	f.round("n1", false)
	f.want("retried at the next round", "n1 down")
	if c := f.m.Status().Counters; c.ApplyErrors != 1 {
		t.Fatalf("counters %+v", c)
	}
}

func TestDisabledDecidesNothing(t *testing.T) {
	f := newFixture(t, testConfig(), "n1", "n2", "n3")
	f.fail = errors.New("busy")
	f.round("n1", false)
	f.tick()
	f.round("n1", false)
	f.want("apply failed")
	f.fail = nil
	cfg := testConfig()
	cfg.Enabled = false
	f.m.SetConfig(cfg)
	f.push()
	f.want("health switched off by a reload: the due down is not taken")
}

func TestStaleNodeListIgnored(t *testing.T) {
	f := newFixture(t, testConfig(), "n1", "n2", "n3")
	f.m.SetNodes(f.rev-1, nil)
	if len(f.m.Status().Nodes) != 3 {
		t.Fatal("a node list older than the last one was applied")
	}
	f.m.SetNodes(f.rev+1, []Node{{Name: "n9", Addr: netip.MustParseAddr("192.0.2.99"), State: affinity.NodeActive}})
	if st := f.m.Status(); len(st.Nodes) != 1 || st.Nodes[0].Name != "n9" {
		t.Fatalf("nodes %+v", st.Nodes)
	}
	f.round("n1", false) // a round of a removed node is dropped
}

func TestHeartbeatCheck(t *testing.T) {
	cfg := testConfig()
	cfg.Checks = []string{CheckIKE, CheckHeartbeat}
	cfg.Heartbeat.MaxAge = 3 * time.Second
	f := newFixture(t, cfg, "n1", "n2", "n3")
	f.round("n1", true)
	if v := f.view("n1"); v.Failing != 0 || !strings.Contains(summary(v.Checks), "waiting for the first heartbeat") {
		t.Fatalf("grace: %+v", v.Checks)
	}
	for range 4 {
		f.tick()
		f.m.Heartbeat("n1")
		f.round("n1", true)
	}
	f.want("heartbeats keep it up")
	f.clock.advance(4 * time.Second)
	f.round("n1", true)
	f.tick()
	f.round("n1", true)
	f.want("IKE passes but the agent is silent", "n1 down")
	if r := f.nodes["n1"].Record.Reason; !strings.Contains(r, "heartbeat: last heartbeat") {
		t.Fatalf("reason %q", r)
	}
}

func TestDecisionReasonNamesCheckAndCount(t *testing.T) {
	cfg := testConfig()
	cfg.Fall = 3
	f := newFixture(t, cfg, "n1", "n2", "n3")
	for range 3 {
		f.m.Round(Round{Node: "n1", Start: f.clock.Now(), End: f.clock.Now(), Checks: []CheckResult{{Kind: CheckIKE, Err: "timeout"}}})
		f.tick()
	}
	if len(f.got) != 1 || f.got[0].Reason != "health: ike: timeout 3/3" {
		t.Fatalf("decisions %+v", f.got)
	}
}

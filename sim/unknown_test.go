package sim

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// unknownScenario is a smaller small() with every arriving peer unknown and a slow
// learner, so that node events and bucket changes find peers waiting for
// their pin.
func unknownScenario(seed uint64, learn time.Duration) *Scenario {
	s := small(seed)
	s.Tunnels.Count, s.Duration = 800, 2*24*time.Hour
	s.Events = StandardEvents(s.Duration, s.Nodes)
	s.Unknown.Share = 1
	s.Unknown.LearnDelay = learn
	// Fewer buckets, stepped less often: the same rules at a fraction
	// of the cost under -race.
	s.Unknown.Buckets, s.Unknown.MaxChanges, s.Unknown.Interval = 1024, 64, time.Minute
	return s
}

// TestPinWindow: the peers the kernel steered and the director has not
// pinned yet follow their bucket. The dataplane before buckets (the hash
// over the active nodes) remaps them at every node event: violations. The
// buckets never move a bucket with an unpinned first packet younger than
// the quiet window, so with a learner faster than that window there are
// none, though the buckets change all the time; with a learner slower
// than the window the guard no longer covers it, and violations show.
func TestPinWindow(t *testing.T) {
	old := unknownScenario(11, 30*time.Minute)
	old.Unknown.Buckets = 0
	r, _ := run(t, old, nil, false)
	t.Logf("hash over the active nodes: %d pin-window violations, %d learned", r.Traffic.PinWindow, r.Unknown.Learned)
	if r.Traffic.PinWindow == 0 || r.Unknown == nil || r.Unknown.Learned == 0 {
		t.Errorf("hash over the active nodes, learner 30m: %d pin-window violations (want some), unknown %+v", r.Traffic.PinWindow, r.Unknown)
	}

	fixed := unknownScenario(11, 30*time.Minute)
	fixed.Unknown.Quiet = 31 * time.Minute
	r, _ = run(t, fixed, nil, false)
	t.Logf("buckets, quiet 31m: %d violations, %d bucket changes, %d learned", r.Traffic.Violations, r.Unknown.Changes, r.Unknown.Learned)
	if r.Traffic.Violations != 0 || r.Unknown.Changes < 100 {
		t.Errorf("buckets with a quiet window longer than the learner: %d violations (want 0, e.g. %+v), %d bucket changes (want many)",
			r.Traffic.Violations, r.Traffic.Examples, r.Unknown.Changes)
	}
	if r.Totals.UnattributedMoves != 0 || r.Totals.Refused != 0 {
		t.Errorf("unattributed moves %d, refused %d", r.Totals.UnattributedMoves, r.Totals.Refused)
	}
	for _, e := range r.Events {
		if e.Kind == EvNodeDown && (e.Ideal == nil || e.Moves != *e.Ideal) {
			t.Errorf("node down moved %d, ideal %v", e.Moves, e.Ideal)
		}
	}

	short := unknownScenario(11, 30*time.Minute)
	short.Unknown.Quiet = time.Second
	r, _ = run(t, short, nil, false)
	t.Logf("buckets, quiet 1s: %d pin-window violations", r.Traffic.PinWindow)
	if r.Traffic.PinWindow == 0 {
		t.Error("buckets with a quiet window shorter than the learner: no pin-window violation; the guard is not what the test exercises")
	}
}

// TestConnectionEntries: with IPVS connection entries (no one-packet
// scheduling) a moved peer's IKE keeps reaching the node it left; with
// one-packet scheduling (or route-only) it follows the move.
func TestConnectionEntries(t *testing.T) {
	s := small(12)
	s.Tunnels.Count, s.Duration = 800, 2*24*time.Hour
	s.Events = StandardEvents(s.Duration, s.Nodes)
	s.Dataplane.ConnectionEntries = true
	r, _ := run(t, s, nil, false)
	if r.Traffic.ConnEntry == 0 || r.Traffic.Violations != r.Traffic.ConnEntry {
		t.Errorf("connection entries: %d violations, %d by an entry; want some, all by entries", r.Traffic.Violations, r.Traffic.ConnEntry)
	}
	if len(r.Traffic.Examples) == 0 || !strings.Contains(r.Traffic.Examples[0].Packet, "IPVS connection entry") {
		t.Errorf("examples %+v", r.Traffic.Examples)
	}
	s.Dataplane.ConnectionEntries = false
	r, _ = run(t, s, nil, false)
	if r.Traffic.Violations != 0 {
		t.Errorf("one-packet scheduling: %d violations, e.g. %+v", r.Traffic.Violations, r.Traffic.Examples)
	}
}

// TestSchedulerGoals replays the standard scenario without its rebalance
// (0, 50 and 100 % unknown peers; only 0 % with -short) and checks the
// issue's goals for the new scheduler: mean max/mean <= 1.05, mean CV no
// worse than Maglev's, moves on failure = the ideal, none on addition or
// recovery, and the added and recovered nodes filled to 90 % of their
// share by arrivals alone.
func TestSchedulerGoals(t *testing.T) {
	shares := []float64{0, 0.5, 1}
	if testing.Short() {
		shares = shares[:1]
	}
	for _, share := range shares {
		s := DefaultScenario()
		s.Unknown.Share = share
		s.Events = slicesDeleteKind(s.Events, EvRebalance)
		steps, err := Workload(s)
		if err != nil {
			t.Fatal(err)
		}
		c, err := Compare(steps, s)
		if err != nil {
			t.Fatal(err)
		}
		newer, maglev := c.Strategies[0], c.Strategies[4]
		if !strings.HasPrefix(newer.Name, "new") || maglev.Name != "maglev" {
			t.Fatalf("strategies %s, %s", newer.Name, maglev.Name)
		}
		if newer.MaxOverMean.Mean > 1.05 || newer.CV.Mean > maglev.CV.Mean {
			t.Errorf("unknown %g: max/mean %.3f (goal <= 1.05), CV %.3f (Maglev %.3f)", share, newer.MaxOverMean.Mean, newer.CV.Mean, maglev.CV.Mean)
		}
		if newer.MovesOnFailure != newer.IdealOnFailure || newer.MovesOnAddition != 0 || newer.MovesOnRecovery != 0 {
			t.Errorf("unknown %g: moves %+v", share, newer)
		}
		for _, f := range []string{newer.FillAdded, newer.FillRecovered} {
			if _, err := ParseDuration(f); err != nil {
				t.Errorf("unknown %g: an added or recovered node not filled to 90%%: %q", share, f)
			}
		}
		if share > 0 && (newer.Learned == nil || *newer.Learned == 0) {
			t.Errorf("unknown %g: nothing learned", share)
		}
	}
}

func slicesDeleteKind(evs []Event, kind string) []Event {
	var out []Event
	for _, e := range evs {
		if e.Kind != kind {
			out = append(out, e)
		}
	}
	return out
}

func TestUnknownScenarioErrors(t *testing.T) {
	in := `director: {choices: -1}
unknown: {share: 2, buckets: 70000, interval: 0s, max_changes: 0, quiet: 2h, horizon: 3, learn_delay: 2h}
dataplane: {connection_entries: maybe}
`
	_, err := ParseScenario("s.yaml", []byte(in))
	var se *ScenarioError
	if !errors.As(err, &se) {
		t.Fatalf("got %v, want a ScenarioError", err)
	}
	for _, want := range []string{
		`s.yaml: dataplane.connection_entries: "maybe": want true or false`,
		`s.yaml: director.choices: -1 out of range 0..4095`,
		`s.yaml: unknown.share: 2: want a share`,
		`s.yaml: unknown.buckets: 70000 out of range 1..65536`,
		`s.yaml: unknown.interval: 0s: must be positive`,
		`s.yaml: unknown.max_changes: 0: want 1..70000`,
		`s.yaml: unknown.quiet: 2h0m0s out of range 1s..1h`,
		`s.yaml: unknown.horizon: 3 out of range (0, 1]`,
		`s.yaml: unknown.learn_delay: 2h0m0s: want 0..1h`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("errors lack %q:\n%v", want, err)
		}
	}
	s, err := ParseScenario("ok.yaml", []byte("unknown: {share: 0.5, buckets: 0}\ndirector: {choices: 2}\n"))
	if err != nil || s.Unknown.Buckets != 0 || s.Choices != 2 || s.Unknown.Share != 0.5 {
		t.Fatalf("old dataplane and d=2: %+v, %v", s, err)
	}
}

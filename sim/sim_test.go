package sim

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
)

// small is a scenario small enough for -race: 1,500 tunnels over 4 days
// with the standard events.
func small(seed uint64) *Scenario {
	s := DefaultScenario()
	s.Seed = seed
	s.Tunnels.Count = 1500
	s.Duration = 4 * 24 * time.Hour
	s.Events = StandardEvents(s.Duration, s.Nodes)
	return s
}

func run(t *testing.T, s *Scenario, steps []Step, compare bool) (*Report, []byte) {
	t.Helper()
	r, err := Run(s, steps, Options{NoCompare: !compare})
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	var b bytes.Buffer
	if err := r.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	return r, b.Bytes()
}

func TestDeterministic(t *testing.T) {
	_, a := run(t, small(3), nil, true)
	_, b := run(t, small(3), nil, true)
	if !bytes.Equal(a, b) {
		t.Fatalf("same seed, different reports:\n%s", firstDiff(a, b))
	}
	_, c := run(t, small(4), nil, false)
	if bytes.Equal(a, c) {
		t.Fatal("different seeds gave the same report")
	}
}

func firstDiff(a, b []byte) string {
	la, lb := strings.Split(string(a), "\n"), strings.Split(string(b), "\n")
	for i := range min(len(la), len(lb)) {
		if la[i] != lb[i] {
			return fmt.Sprintf("line %d:\n  %s\n  %s", i+1, la[i], lb[i])
		}
	}
	return "lengths differ"
}

// TestStandardScenario checks the standard life of a farm: no violation,
// a failure moves exactly the failed node's tunnels and nothing else, an
// addition, a recovery and a switchover move nothing, and the two
// directors end with equal tables.
func TestStandardScenario(t *testing.T) {
	r, _ := run(t, small(1), nil, false)
	if r.Traffic.Violations != 0 {
		t.Errorf("%d violations, for example %+v", r.Traffic.Violations, r.Traffic.Examples)
	}
	if r.Traffic.Packets < 100000 {
		t.Errorf("only %d packets checked", r.Traffic.Packets)
	}
	if r.Totals.UnattributedMoves != 0 {
		t.Errorf("%d tunnels moved outside events", r.Totals.UnattributedMoves)
	}
	kinds := map[string]bool{}
	for _, e := range r.Events {
		kinds[e.Kind] = true
		if e.Error != "" {
			t.Errorf("event %d %s: %s", e.Index, e.Kind, e.Error)
		}
		switch e.Kind {
		case EvNodeDown:
			if e.Ideal == nil || *e.Ideal == 0 || e.Moves != *e.Ideal {
				t.Errorf("node failure moved %d, ideal %v", e.Moves, e.Ideal)
			}
			want := []NodeCount{{Node: e.Node, Tunnels: *e.Ideal}}
			if !reflect.DeepEqual(e.MovedFrom, want) {
				t.Errorf("node failure moved tunnels from %+v, want only %+v", e.MovedFrom, want)
			}
		case EvNodeAdd, EvNodeUp, EvFailover:
			if e.Moves != 0 {
				t.Errorf("%s moved %d tunnels, want 0", e.Kind, e.Moves)
			}
		case EvRebalance:
			if e.Moves == 0 || e.Moves > e.Budget {
				t.Errorf("rebalance moved %d with budget %d", e.Moves, e.Budget)
			}
		}
	}
	for _, k := range []string{EvNodeDown, EvNodeAdd, EvNodeUp, EvRebalance, EvFailover} {
		if !kinds[k] {
			t.Errorf("standard scenario lacks %s", k)
		}
	}
	if !r.Replication.Equal {
		t.Errorf("directors' tables differ at the end: revisions %d/%d", r.Replication.FinalMaster, r.Replication.FinalBackup)
	}
	if r.Totals.Refused != 0 {
		t.Errorf("%d tunnels refused", r.Totals.Refused)
	}
}

// TestDrainRemoveAndLoss runs the other events: a drain emptied by a
// rebalance, a removal, a lossy link. Still no violation, and the removal
// of an emptied node moves nothing.
func TestDrainRemoveAndLoss(t *testing.T) {
	s := small(5)
	s.Replication.Loss = 0.3
	s.Events = []Event{
		{At: 12 * time.Hour, Kind: EvNodeDrain, Node: "vpn-02"},
		{At: 13 * time.Hour, Kind: EvRebalance, Budget: 100000},
		{At: 24 * time.Hour, Kind: EvNodeRemove, Node: "vpn-02"},
		{At: 30 * time.Hour, Kind: EvNodeRemove, Node: "vpn-04"},
		{At: 40 * time.Hour, Kind: EvFailover},
		{At: 50 * time.Hour, Kind: EvFailover, Mode: Switchover},
	}
	r, _ := run(t, s, nil, false)
	if r.Traffic.Violations != 0 {
		t.Errorf("%d violations, for example %+v", r.Traffic.Violations, r.Traffic.Examples)
	}
	ev := r.Events
	if ev[1].Moves == 0 || ev[2].Moves != 0 {
		t.Errorf("rebalance after drain moved %d, removal of the drained node moved %d", ev[1].Moves, ev[2].Moves)
	}
	if ev[3].Ideal == nil || ev[3].Moves != *ev[3].Ideal {
		t.Errorf("removal moved %d, ideal %v", ev[3].Moves, ev[3].Ideal)
	}
	if ev[4].Moves != 0 || ev[5].Moves != 0 {
		t.Errorf("failovers moved %d and %d", ev[4].Moves, ev[5].Moves)
	}
	if r.Replication.Link.Lost == 0 || !r.Replication.Equal {
		t.Errorf("lossy link: %+v, equal %v", r.Replication.Link, r.Replication.Equal)
	}
}

// TestCrashLosesWhatTheBackupLacks cuts the sync link and crashes the
// master: the traffic check must see the lost tunnels, and the old master
// must come back equal through a snapshot.
func TestCrashLosesWhatTheBackupLacks(t *testing.T) {
	s := small(6)
	s.Events = []Event{
		{At: 24 * time.Hour, Kind: EvLinkLoss, Loss: 1},
		{At: 26 * time.Hour, Kind: EvFailover, Mode: Crash},
		{At: 27 * time.Hour, Kind: EvLinkLoss, Loss: 0},
	}
	r, _ := run(t, s, nil, false)
	crash := r.Events[1]
	if crash.Lost == 0 || crash.Violations == 0 || r.Traffic.Violations == 0 {
		t.Errorf("crash with the link down: lost %d, violations %d/%d; want some", crash.Lost, crash.Violations, r.Traffic.Violations)
	}
	if r.Replication.Link.Snapshots == 0 || !r.Replication.Equal {
		t.Errorf("after the crash: %d snapshots, tables equal %v", r.Replication.Link.Snapshots, r.Replication.Equal)
	}
	// Once relearned, nothing more goes wrong.
	if r.Traffic.Violations != crash.Violations {
		t.Errorf("%d violations in all, %d at the crash", r.Traffic.Violations, crash.Violations)
	}
}

func TestTraceRoundTrip(t *testing.T) {
	s := small(2)
	s.Unknown.Share = 0.3
	s.Events = append(s.Events, Event{At: 80 * time.Hour, Kind: EvLinkLoss, Loss: 0.5}, Event{At: 81 * time.Hour, Kind: EvRebalance, Budget: 7})
	steps, err := Workload(s)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := WriteTrace(&b, steps); err != nil {
		t.Fatal(err)
	}
	back, err := ReadTrace("trace.csv", bytes.NewReader(b.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(steps, back) {
		for i := range min(len(steps), len(back)) {
			if !reflect.DeepEqual(steps[i], back[i]) {
				t.Fatalf("step %d: wrote %+v, read %+v", i, steps[i], back[i])
			}
		}
		t.Fatalf("wrote %d steps, read %d", len(steps), len(back))
	}
	_, generated := run(t, s, nil, true)
	// A replay runs as long as the trace says, whatever the scenario's
	// duration.
	s.Duration = time.Hour
	_, replayed := run(t, s, back, true)
	if !bytes.Equal(generated, replayed) {
		t.Fatalf("replay differs:\n%s", firstDiff(generated, replayed))
	}
}

func TestReadTraceErrors(t *testing.T) {
	in := "at,kind,tunnel,peer,subnets\n" +
		"0,tunnel-up,t1,10.0.0.1,192.0.2.0/24\n" +
		"x,tunnel-up,t2,nope,192.0.2.0/33\n" +
		"5,explode,,,\n"
	_, err := ReadTrace("t.csv", strings.NewReader(in))
	if err == nil {
		t.Fatal("bad trace accepted")
	}
	for _, want := range []string{"t.csv:3: at:", "t.csv:3: peer:", "t.csv:3: subnets:", "t.csv:4: kind:"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

func TestScenarioErrors(t *testing.T) {
	in := `seed: 1
duration: 7d
colour: blue
nodes:
  list: [{name: a}, {name: b, weight: -3}]
tunnels:
  count: 100
  pinned_share: 1.5
churn:
  lifetime: gamma
director:
  commit_every: soon
health: {interval: 1s, timeout: 2s, rise: 0, speed: 3}
events:
  - {at: 1d, kind: node-down, node: vpn-01}
  - {at: 2d, kind: rebalance}
  - {at: 3d, kind: node-up}
  - {at: 3x, kind: node-up, node: vpn-01}
  - {at: 4d, kind: meteor}
  - {at: 5d, kind: failover, mode: graceful, size: 3}
`
	_, err := ParseScenario("scenario.yaml", []byte(in))
	var se *ScenarioError
	if !errors.As(err, &se) {
		t.Fatalf("got %v, want a ScenarioError", err)
	}
	for _, want := range []string{
		`scenario.yaml: colour: unknown key`,
		`scenario.yaml: nodes.list[1].weight: weight -3 out of range`,
		`scenario.yaml: tunnels.pinned_share: 1.5`,
		`scenario.yaml: churn.lifetime: "gamma"`,
		`scenario.yaml: director.commit_every: "soon": not a duration`,
		`scenario.yaml: events[1].budget:`,
		`scenario.yaml: events[2].node: missing`,
		`scenario.yaml: events[3].at: "3x": not a duration`,
		`scenario.yaml: events[4].kind: "meteor"`,
		`scenario.yaml: events[5].mode: "graceful"`,
		`scenario.yaml: events[5].size: unknown key`,
		`scenario.yaml: events[0].node: "vpn-01": no such node at 1d`,
		`scenario.yaml: health.speed: unknown key`,
		`scenario.yaml: health.timeout: 2s is not below interval 1s`,
		`scenario.yaml: health.rise: 0: must be at least 1`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("errors lack %q:\n%v", want, err)
		}
	}
}

func TestScenarioNodeCountErrors(t *testing.T) {
	for in, want := range map[string]string{
		"nodes: {count: -2}":                                 "s.yaml: nodes.count: -2 nodes: want 1..1000",
		"nodes: {count: 2, list: [{name: a}]}":               "s.yaml: nodes: give count or list, not both",
		"nodes: [1, 2]":                                      "s.yaml: nodes: want a mapping",
		"tunnels: {count: many}":                             `s.yaml: tunnels.count: "many": not an integer`,
		"events: [{kind: failover, at: 1d, mode: graceful}]": `s.yaml: events[0].mode: "graceful": want switchover or crash`,
	} {
		_, err := ParseScenario("s.yaml", []byte(in))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want %q", in, err, want)
		}
	}
}

func TestExampleScenarioParses(t *testing.T) {
	s, err := LoadScenario("examples/scenario.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Nodes) != 10 || s.Nodes[7].Weight != 200 || s.Nodes[9].Capacity != 900 || len(s.Events) != 11 {
		t.Fatalf("example scenario read as %+v", s)
	}
}

// TestCompare: hash-mod-N moves most tunnels when a node is added, Maglev
// few, the project's schedulers (new and old) none; on a failure they move
// exactly the failed node's tunnels, and the new one balances better.
func TestCompare(t *testing.T) {
	r, _ := run(t, small(1), nil, true)
	c := r.Compare
	if c == nil || len(c.Strategies) != 5 {
		t.Fatalf("comparison: %+v", c)
	}
	by := map[string]StrategyResult{}
	for _, s := range c.Strategies {
		by[strings.Fields(s.Name)[0]] = s
		if len(s.Series) != len(c.AtHours) || len(s.Series) == 0 {
			t.Errorf("%s: %d balance samples, %d sample times", s.Name, len(s.Series), len(c.AtHours))
		}
	}
	newer, older, hm, mg := by["new"], by["old"], by["hash-mod-n"], by["maglev"]
	for _, sched := range []StrategyResult{newer, older} {
		if sched.MovesOnAddition != 0 || sched.MovesOnRecovery != 0 || sched.MovesOnFailure != sched.IdealOnFailure || sched.Learned == nil {
			t.Errorf("%s: %+v", sched.Name, sched)
		}
	}
	if newer.CV.Mean >= older.CV.Mean || newer.MaxOverMean.Mean >= older.MaxOverMean.Mean {
		t.Errorf("new scheduler balances no better than the old: CV %.3f vs %.3f, max/mean %.3f vs %.3f",
			newer.CV.Mean, older.CV.Mean, newer.MaxOverMean.Mean, older.MaxOverMean.Mean)
	}
	if hm.MovesOnAddition < r.InitialTunnels/2 {
		t.Errorf("hash-mod-n moved only %d of about %d tunnels on an addition", hm.MovesOnAddition, r.InitialTunnels)
	}
	if mg.MovesOnAddition == 0 || mg.MovesOnAddition > hm.MovesOnAddition/3 {
		t.Errorf("maglev moved %d on an addition, hash-mod-n %d", mg.MovesOnAddition, hm.MovesOnAddition)
	}
	if hm.FillAdded != "0s" || mg.Learned != nil {
		t.Errorf("hash-mod-n fills an added node at once (got %q); maglev learns nothing (got %v)", hm.FillAdded, mg.Learned)
	}
}

func TestMaglevTable(t *testing.T) {
	var m maglev
	nodes := []string{"a", "b", "c", "d", "e", "f", "g"}
	m.reset(nodes)
	before := append([]int32(nil), m.table...)
	per := map[int32]int{}
	for _, v := range m.table {
		if v < 0 {
			t.Fatal("empty slot")
		}
		per[v]++
	}
	for i, n := range per {
		if d := n - MaglevSize/len(nodes); d < -1 || d > 1 {
			t.Errorf("node %d holds %d slots", i, n)
		}
	}
	// Removing "d" (index 3) must mostly disturb only its own slots.
	m.reset([]string{"a", "b", "c", "e", "f", "g"})
	changed := 0
	for i, v := range m.table {
		old := nodes[before[i]]
		if old != "d" && m.active[v] != old {
			changed++
		}
	}
	if changed > MaglevSize/50 {
		t.Errorf("removing a node remapped %d other slots", changed)
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"30d": 30 * 24 * time.Hour, "1d12h": 36 * time.Hour, "2w": 14 * 24 * time.Hour,
		"90m": 90 * time.Minute, "1.5d": 36 * time.Hour, "250ms": 250 * time.Millisecond,
	} {
		got, err := ParseDuration(in)
		if err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
		if back, err := ParseDuration(FormatDuration(got)); err != nil || back != got {
			t.Errorf("FormatDuration(%v) = %q does not read back", got, FormatDuration(got))
		}
	}
	for _, in := range []string{"", "3x", "d", "1d-", "abc"} {
		if _, err := ParseDuration(in); err == nil {
			t.Errorf("ParseDuration(%q) accepted", in)
		}
	}
}

func TestWriteSVGs(t *testing.T) {
	r, _ := run(t, small(1), nil, true)
	files, err := WriteSVGs(r, t.TempDir())
	if err != nil || len(files) != 3 {
		t.Fatalf("WriteSVGs: %v, %v", files, err)
	}
	var txt bytes.Buffer
	if err := r.WriteText(&txt); err != nil || !strings.Contains(txt.String(), "hash-mod-n") {
		t.Fatalf("text report: %v\n%s", err, txt.String())
	}
}

// BenchmarkStandard30d runs the standard scenario: 10,000 tunnels, 30
// days, a failure, an addition, a recovery, a rebalance and a failover.
func BenchmarkStandard30d(b *testing.B) {
	for range b.N {
		if _, err := Run(DefaultScenario(), nil, Options{NoCompare: true}); err != nil {
			b.Fatal(err)
		}
	}
}

// TestJournalLink runs the simulator's own link, with a journal so short
// that a cut link forces a snapshot.
func TestJournalLink(t *testing.T) {
	s := small(8)
	s.Replication.Impl = ReplJournal
	s.Replication.JournalChanges = 50
	s.Events = append(s.Events,
		Event{At: 10 * time.Hour, Kind: EvLinkLoss, Loss: 1},
		Event{At: 14 * time.Hour, Kind: EvLinkLoss, Loss: 0.2})
	r, _ := run(t, s, nil, false)
	if r.Traffic.Violations != 0 {
		t.Errorf("%d violations, for example %+v", r.Traffic.Violations, r.Traffic.Examples)
	}
	if !strings.Contains(r.Replication.Mode, "journal") || r.Replication.Link.Snapshots == 0 || !r.Replication.Equal {
		t.Errorf("journal link: %+v", r.Replication)
	}
	for _, e := range r.Events {
		if e.Kind == EvFailover && e.Moves != 0 {
			t.Errorf("switchover moved %d", e.Moves)
		}
	}
}

// TestHealthScenario plays sim/examples/health.yaml: the director's real
// health state machine on the virtual clock takes a dead node down
// within (fall-1) x interval + timeout .. fall x interval + timeout of
// its death and moves exactly its tunnels; its tunnels are dark for the
// detection plus the re-establishment; a revived node comes up and
// nothing moves back; a flapping node is held; five of eight dying at
// once move nothing (panic). Times are virtual: the same every run.
func TestHealthScenario(t *testing.T) {
	s, err := LoadScenario("examples/health.yaml")
	if err != nil {
		t.Fatal(err)
	}
	s.Tunnels.Count = 2000
	r, _ := run(t, s, nil, false)
	if r.Traffic.Violations != 0 || r.Totals.UnattributedMoves != 0 {
		t.Fatalf("%d violations, %d unattributed moves", r.Traffic.Violations, r.Totals.UnattributedMoves)
	}
	hc := s.Health.Config()
	lo, hi := time.Duration(hc.Fall-1)*hc.Interval+hc.Timeout, time.Duration(hc.Fall)*hc.Interval+hc.Timeout
	die := r.Events[0]
	if die.Kind != EvNodeDies || die.DetectedMs == nil {
		t.Fatalf("first event %+v", die)
	}
	detect := time.Duration(*die.DetectedMs * float64(time.Millisecond))
	if detect < lo || detect > hi {
		t.Fatalf("detected after %s, want %s..%s", detect, lo, hi)
	}
	if die.Ideal == nil || die.Moves != *die.Ideal || die.Moves == 0 || len(die.MovedFrom) != 1 || die.MovedFrom[0].Node != "vpn-03" {
		t.Fatalf("node-dies moved %d (ideal %v) from %+v", die.Moves, die.Ideal, die.MovedFrom)
	}
	want := (detect + s.Reestablish).Seconds()
	if d := die.Dark; d == nil || d.Tunnels != die.Moves || math.Abs(d.MeanS-want) > 0.002 || math.Abs(d.MaxS-want) > 0.002 {
		t.Fatalf("dark %+v, want %d tunnels dark %.3fs", die.Dark, die.Moves, want)
	}
	if up := r.Events[1]; up.Kind != EvNodeRevives || up.DetectedMs == nil || up.Moves != 0 ||
		*up.DetectedMs > float64(time.Duration(hc.Rise)*hc.Interval+time.Millisecond)/float64(time.Millisecond) {
		t.Fatalf("revival %+v", up)
	}
	h := r.Health
	if h == nil || h.Held != 1 || h.Panics != 1 {
		t.Fatalf("health summary %+v: want one hold and one panic", h)
	}
	for _, ev := range r.Events[10:15] {
		if ev.Kind != EvNodeDies || ev.Moves != 0 || ev.DetectedMs != nil || ev.Dark == nil || ev.Dark.Tunnels == 0 {
			t.Fatalf("during the panic: %+v", ev)
		}
	}
	// The held node's last revival waits for the hold (1 minute).
	if held := r.Events[9]; held.DetectedMs == nil || *held.DetectedMs < float64(30*time.Second/time.Millisecond) {
		t.Fatalf("flapping node's last revival %+v: not held", held)
	}
}

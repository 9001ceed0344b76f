package affinity

import (
	"errors"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func loads(counts ...int) []NodeLoad {
	out := make([]NodeLoad, len(counts))
	for i, c := range counts {
		out[i] = NodeLoad{Name: string(rune('a' + i)), Mark: uint16(i + 1), Weight: 100, Tunnels: c}
	}
	return out
}

func perNode(b *Buckets) map[uint16]int {
	out := map[uint16]int{}
	for i := 0; i < b.Len(); i++ {
		out[b.Mark(i)]++
	}
	return out
}

func newBuckets(t *testing.T, o BucketOptions) *Buckets {
	t.Helper()
	b, err := NewBuckets(o)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// settle steps until nothing changes, one Interval apart.
func settle(t *testing.T, b *Buckets, now time.Time, nodes []NodeLoad) time.Time {
	t.Helper()
	for range 1000 {
		if len(b.Step(now, nodes)) == 0 {
			return now
		}
		now = now.Add(b.Options().Interval)
	}
	t.Fatal("buckets never settle")
	return now
}

func TestBucketsFollowHeadroom(t *testing.T) {
	b := newBuckets(t, BucketOptions{})
	// Balanced: split by weight (equal here), every bucket assigned at once.
	ch := b.Step(t0, loads(1000, 1000, 1000, 1000))
	if len(ch) != DefaultBuckets {
		t.Fatalf("first step changed %d buckets, want all %d", len(ch), DefaultBuckets)
	}
	for m, n := range perNode(b) {
		if n != DefaultBuckets/4 {
			t.Fatalf("balanced farm: node %d holds %d buckets, want %d", m, n, DefaultBuckets/4)
		}
	}
	// An empty node joins: it takes nearly every bucket.
	nodes := loads(1000, 1000, 1000, 1000, 0)
	settle(t, b, t0.Add(time.Hour), nodes)
	if got := perNode(b)[5]; got < DefaultBuckets*9/10 {
		t.Fatalf("empty node holds %d of %d buckets, want most", got, DefaultBuckets)
	}
	// A node far above the others gets none.
	nodes = loads(1000, 1000, 1000, 1200)
	settle(t, b, t0.Add(2*time.Hour), nodes)
	if got := perNode(b); got[4] != 0 || got[5] != 0 {
		t.Fatalf("overloaded node 4 holds %d buckets, departed node 5 %d; want 0 and 0", got[4], got[5])
	}
	// Weights: a double-weight node at the same load per weight gets twice
	// the buckets.
	nodes = loads(1000, 2000)
	nodes[1].Weight = 200
	settle(t, b, t0.Add(3*time.Hour), nodes)
	got := perNode(b)
	if d := got[2] - 2*got[1]; d < -2 || d > 2 {
		t.Fatalf("weights 100 and 200 at equal load: %d and %d buckets", got[1], got[2])
	}
}

func TestBucketsRateLimitAndMinimalMoves(t *testing.T) {
	b := newBuckets(t, BucketOptions{Count: 1024, MaxChanges: 50, Interval: time.Minute})
	b.Step(t0, loads(100, 100, 100))
	before := b.Marks()
	nodes := loads(100, 100, 100, 0)
	ch := b.Step(t0.Add(time.Second), nodes)
	if ch != nil {
		t.Fatalf("a step within the interval moved %d buckets", len(ch))
	}
	now := t0.Add(time.Minute)
	ch = b.Step(now, nodes)
	if len(ch) != 50 {
		t.Fatalf("a balancing step moved %d buckets, want the limit 50", len(ch))
	}
	for _, c := range ch {
		if c.To != 4 || before[c.Bucket] != c.From {
			t.Fatalf("change %+v: want a move from the bucket's old node to the new node 4", c)
		}
	}
	now = settle(t, b, now.Add(time.Minute), nodes)
	tg := b.Targets(nodes)
	if got := perNode(b); !mapsEqual(got, tg) {
		t.Fatalf("settled at %v, targets %v", got, tg)
	}
	// Settled buckets stay put while loads do not change.
	if ch := b.Step(now.Add(time.Hour), nodes); len(ch) != 0 {
		t.Fatalf("settled buckets moved again: %d", len(ch))
	}
}

func mapsEqual(a, b map[uint16]int) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}

func TestBucketsQuietWindow(t *testing.T) {
	b := newBuckets(t, BucketOptions{Count: 256, Interval: time.Second, Quiet: 30 * time.Second, MaxChanges: 256})
	b.Step(t0, loads(100, 100))
	// First packets seen in every bucket of node 1: a balancing step must
	// leave them all, and so must a drain of node 1.
	now := t0.Add(time.Minute)
	for i := 0; i < b.Len(); i++ {
		if b.Mark(i) == 1 {
			b.Seen(i, now)
		}
	}
	snapshot := b.Marks()
	nodes := loads(100, 100, 0)
	nodes[2].Weight = 1 // a small node: it asks for few buckets
	b.Step(now.Add(time.Second), nodes)
	nodes[0].State = NodeDraining
	b.Step(now.Add(2*time.Second), nodes)
	for i, m := range b.Marks() {
		if snapshot[i] == 1 && m != 1 {
			t.Fatalf("bucket %d of node 1 moved to %d within the quiet window", i, m)
		}
	}
	// After the window the drain takes effect.
	nodes[2].Weight = 100
	nodes[2].Tunnels = 100
	b.Step(now.Add(31*time.Second), nodes)
	if got := perNode(b)[1]; got != 0 {
		t.Fatalf("draining node 1 still holds %d buckets after the quiet window", got)
	}
	// A node that goes down loses its buckets at once, seen or not.
	for i := 0; i < b.Len(); i++ {
		if b.Mark(i) == 2 {
			b.Seen(i, now.Add(40*time.Second))
		}
	}
	nodes[1].State = NodeDown
	ch := b.Step(now.Add(41*time.Second), nodes)
	if got := perNode(b); got[2] != 0 || len(ch) == 0 {
		t.Fatalf("down node 2 keeps %d buckets (%d changes)", got[2], len(ch))
	}
	for _, c := range ch {
		if c.To != 3 {
			t.Fatalf("change %+v: the only node taking tunnels is 3", c)
		}
	}
}

func TestBucketsCapacityAndNoNode(t *testing.T) {
	b := newBuckets(t, BucketOptions{Count: 64})
	nodes := loads(10, 5)
	nodes[0].Capacity = 10
	b.Step(t0, nodes)
	if got := perNode(b); got[1] != 0 || got[2] != 64 {
		t.Fatalf("full node holds buckets: %v", got)
	}
	nodes[1].State = NodeDown
	b.Step(t0.Add(time.Second), nodes)
	if got := perNode(b); got[0] != 64 {
		t.Fatalf("no node takes tunnels, buckets %v: want every bucket on no node (0)", got)
	}
}

// TestBucketsDeterministic: two directors stepping the same buckets with
// the same loads and times hold the same assignment.
func TestBucketsDeterministic(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	a, b := newBuckets(t, BucketOptions{Count: 512}), newBuckets(t, BucketOptions{Count: 512})
	now := t0
	nodes := loads(500, 400, 300, 200, 100)
	for range 200 {
		for i := range nodes {
			nodes[i].Tunnels = max(0, nodes[i].Tunnels+r.IntN(21)-10)
		}
		if r.IntN(20) == 0 {
			nodes[r.IntN(len(nodes))].State = NodeState(r.IntN(3))
		}
		i := r.IntN(512)
		a.Seen(i, now)
		b.Seen(i, now)
		now = now.Add(time.Duration(r.IntN(20)) * time.Second)
		ca, cb := a.Step(now, slices.Clone(nodes)), b.Step(now, slices.Clone(nodes))
		if !slices.Equal(ca, cb) || !slices.Equal(a.Marks(), b.Marks()) {
			t.Fatal("two buckets stepped alike differ")
		}
		for _, c := range ca {
			if c.To != 0 && !slices.ContainsFunc(nodes, func(n NodeLoad) bool { return n.Mark == c.To && n.takes() }) {
				t.Fatalf("bucket %d given to node %d, which takes no tunnels", c.Bucket, c.To)
			}
		}
	}
}

func TestBucketOptionsValidate(t *testing.T) {
	err := BucketOptions{Count: 70000, Interval: time.Millisecond, MaxChanges: -1, Quiet: 2 * time.Hour, Horizon: 2}.Validate()
	var oe OptionErrors
	if !errors.As(err, &oe) {
		t.Fatalf("error %v is not OptionErrors", err)
	}
	var keys []string
	for _, e := range oe {
		keys = append(keys, e.Key)
	}
	want := []string{"buckets", "interval", "quiet", "horizon", "max_changes"}
	if !slices.Equal(keys, want) {
		t.Fatalf("keys %v, want %v (%v)", keys, want, err)
	}
	if err := (BucketOptions{Count: 16, MaxChanges: 17}).Validate(); err == nil || !strings.Contains(err.Error(), "max_changes: 17 out of range 1..16") {
		t.Fatalf("max_changes above the count: %v", err)
	}
	if err := (BucketOptions{}).Validate(); err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	if _, err := NewBuckets(BucketOptions{Count: -1}); err == nil {
		t.Fatal("NewBuckets took a negative count")
	}
}

// TestBucketsDefer: restored buckets wait an interval before balancing,
// but still leave a node that went down at once.
func TestBucketsDefer(t *testing.T) {
	b := newBuckets(t, BucketOptions{Count: 64, MaxChanges: 64})
	b.Step(t0, loads(0, 0, 0))
	made := b.Marks()
	r := newBuckets(t, BucketOptions{Count: 64, MaxChanges: 64})
	if err := r.Restore(made); err != nil {
		t.Fatal(err)
	}
	now := t0.Add(time.Hour)
	r.Defer(now)
	if ch := r.Step(now, loads(500, 0, 0)); len(ch) != 0 {
		t.Fatalf("a deferred step moved %d buckets", len(ch))
	}
	down := loads(500, 0, 0)
	down[1].State = NodeDown
	if ch := r.Step(now.Add(time.Second), down); len(ch) == 0 || perNode(r)[2] != 0 {
		t.Fatalf("a down node kept its buckets: %v", perNode(r))
	}
	if ch := r.Step(now.Add(DefaultBucketInterval), down); len(ch) == 0 || perNode(r)[3] <= perNode(r)[1] {
		t.Fatalf("no balancing an interval later: %v", perNode(r))
	}
}

// TestBucketsStepUsesItsBudget: a balancing step moves as many buckets as
// the targets ask, up to MaxChanges, wherever they lie (a cursor moving
// inside the scan once skipped ever more buckets: five steps of 1,024
// moved 2,425 of the 2,731 owed).
func TestBucketsStepUsesItsBudget(t *testing.T) {
	b := newBuckets(t, BucketOptions{Count: 4096, MaxChanges: 1024, Interval: time.Second})
	now := t0
	b.Step(now, loads(0, 0, 0))
	owed := 4096 - perNode(b)[3]
	for step := 0; owed > 0; step++ {
		now = now.Add(time.Second)
		ch := b.Step(now, loads(301, 300, 0))
		if want := min(owed, 1024); len(ch) != want {
			t.Fatalf("step %d moved %d buckets, want %d", step, len(ch), want)
		}
		owed -= len(ch)
	}
	if perNode(b)[3] != 4096 {
		t.Fatalf("after the steps: %v", perNode(b))
	}
}

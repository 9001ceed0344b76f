package clock

import (
	"slices"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func TestManualFiresInDeadlineThenCreationOrder(t *testing.T) {
	m := NewManual(t0)
	var got []string
	var at []time.Duration
	add := func(name string, d time.Duration) {
		m.AfterFunc(d, func() { got = append(got, name); at = append(at, m.Since(t0)) })
	}
	add("c", 3*time.Second)
	add("a", time.Second)
	add("b", time.Second)
	stopped := m.AfterFunc(2*time.Second, func() { got = append(got, "stopped") })
	if !stopped.Stop() {
		t.Fatal("Stop of a pending timer reported false")
	}
	m.Advance(2 * time.Second)
	if want := []string{"a", "b"}; !slices.Equal(got, want) {
		t.Fatalf("after 2s fired %v, want %v", got, want)
	}
	m.Advance(10 * time.Second)
	if want := []string{"a", "b", "c"}; !slices.Equal(got, want) {
		t.Fatalf("fired %v, want %v", got, want)
	}
	if at[2] != 3*time.Second {
		t.Errorf("c ran with the clock at %s, want its deadline 3s", at[2])
	}
	if d := m.Since(t0); d != 12*time.Second {
		t.Errorf("clock at %s, want 12s", d)
	}
}

func TestManualTickerAndTimer(t *testing.T) {
	m := NewManual(t0)
	tk, tc := m.NewTicker(100 * time.Millisecond)
	tm, c := m.NewTimer(250 * time.Millisecond)
	ticks := 0
	for range 5 {
		m.Advance(100 * time.Millisecond)
		select {
		case <-tc:
			ticks++
		default:
		}
	}
	if ticks != 5 {
		t.Errorf("%d ticks in 500ms of a 100ms ticker, want 5", ticks)
	}
	select {
	case v := <-c:
		if v != t0.Add(250*time.Millisecond) {
			t.Errorf("timer fired at %s", v.Sub(t0))
		}
	default:
		t.Error("timer did not fire")
	}
	if tm.Stop() {
		t.Error("Stop of a fired timer reported true")
	}
	tk.Stop()
	m.Advance(time.Second)
	select {
	case <-tc:
		t.Error("stopped ticker ticked")
	default:
	}
	if _, ok := m.Next(); ok {
		t.Error("timers pending after everything stopped")
	}
}

func TestManualStepRunsOneAtATime(t *testing.T) {
	m := NewManual(t0)
	n := 0
	var tick func()
	tick = func() { n++; m.AfterFunc(time.Minute, tick) }
	m.AfterFunc(0, tick)
	for range 3 {
		if !m.Step() {
			t.Fatal("nothing to step")
		}
	}
	if n != 3 || m.Since(t0) != 2*time.Minute {
		t.Errorf("after 3 steps: %d runs at %s, want 3 at 2m", n, m.Since(t0))
	}
}

func TestRealClock(t *testing.T) {
	c := Or(nil)
	tm, ch := c.NewTimer(time.Millisecond)
	defer tm.Stop()
	<-ch
	if c.Since(c.Now()) < 0 {
		t.Error("real clock runs backwards")
	}
}

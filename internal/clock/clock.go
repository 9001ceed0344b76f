// Package clock is the project's one injectable clock. Every package that
// reads the time or waits for it takes a Clock: the daemon, the
// replication and the simulator. Real is the wall clock; Manual moves only
// when told to, for tests and for the simulator's virtual time.
//
// The interface is shaped like tailscale's tstime.Clock (Now, Since,
// NewTimer, NewTicker, AfterFunc). Manual is written here rather than
// taken from a fake-clock library because the simulator needs what those
// do not give: callbacks run synchronously, in the caller's goroutine, in
// (deadline, creation) order, one at a time (Step), so that a run is
// deterministic byte for byte.
package clock

import (
	"container/heap"
	"sync"
	"time"
)

// Clock tells the time and makes timers.
type Clock interface {
	// Now returns the current time.
	Now() time.Time
	// Since returns the time elapsed since t.
	Since(t time.Time) time.Duration
	// NewTimer returns a timer that sends the time on its channel once,
	// after d.
	NewTimer(d time.Duration) (Timer, <-chan time.Time)
	// NewTicker returns a ticker that sends the time on its channel
	// every d (dropping ticks a slow reader misses, as time.Ticker does).
	NewTicker(d time.Duration) (Ticker, <-chan time.Time)
	// AfterFunc runs f once after d (on the real clock in its own
	// goroutine; on a Manual clock in the goroutine that advances it).
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is a pending single event.
type Timer interface {
	// Stop prevents the timer from firing; it reports whether it was
	// pending.
	Stop() bool
	// Reset makes the timer fire d from now; it reports whether it was
	// pending.
	Reset(d time.Duration) bool
}

// Ticker is a periodic event.
type Ticker interface {
	// Stop turns the ticker off.
	Stop()
	// Reset changes the period and restarts it from now.
	Reset(d time.Duration)
}

// Real returns the wall clock.
func Real() Clock { return realClock{} }

// Or returns c, or the wall clock when c is nil: the default of every
// optional clock setting.
func Or(c Clock) Clock {
	if c == nil {
		return realClock{}
	}
	return c
}

type realClock struct{}

func (realClock) Now() time.Time                  { return time.Now() }
func (realClock) Since(t time.Time) time.Duration { return time.Since(t) }

func (realClock) NewTimer(d time.Duration) (Timer, <-chan time.Time) {
	t := time.NewTimer(d)
	return t, t.C
}

func (realClock) NewTicker(d time.Duration) (Ticker, <-chan time.Time) {
	t := time.NewTicker(d)
	return t, t.C
}

func (realClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }

// Manual is a Clock that moves only when Advance, AdvanceTo or Step is
// called. Timers, tickers and AfterFunc callbacks whose time has come fire
// during that call, in order of their deadline and, for equal deadlines,
// of their creation. Callbacks run without the clock's lock held, so they
// may read the clock and make new timers.
type Manual struct {
	mu    sync.Mutex
	now   time.Time
	seq   uint64
	queue waiters
}

// NewManual returns a clock stopped at start.
func NewManual(start time.Time) *Manual { return &Manual{now: start} }

// Now returns the clock's time.
func (m *Manual) Now() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.now
}

// Since returns the clock's time elapsed since t.
func (m *Manual) Since(t time.Time) time.Duration { return m.Now().Sub(t) }

// NewTimer returns a timer firing d after the clock's now.
func (m *Manual) NewTimer(d time.Duration) (Timer, <-chan time.Time) {
	ch := make(chan time.Time, 1)
	w := &waiter{m: m, ch: ch}
	m.arm(w, d)
	return w, ch
}

// NewTicker returns a ticker firing every d of the clock's time.
func (m *Manual) NewTicker(d time.Duration) (Ticker, <-chan time.Time) {
	if d <= 0 {
		panic("clock: non-positive ticker period")
	}
	ch := make(chan time.Time, 1)
	w := &waiter{m: m, ch: ch, period: d}
	m.arm(w, d)
	return manualTicker{w}, ch
}

// manualTicker gives a periodic waiter the Ticker method set.
type manualTicker struct{ w *waiter }

func (t manualTicker) Stop()                 { t.w.Stop() }
func (t manualTicker) Reset(d time.Duration) { t.w.Reset(d) }

// AfterFunc runs f when the clock reaches d after its now.
func (m *Manual) AfterFunc(d time.Duration, f func()) Timer {
	w := &waiter{m: m, fn: f}
	m.arm(w, d)
	return w
}

func (m *Manual) arm(w *waiter, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.armLocked(w, m.now.Add(max(d, 0)))
}

func (m *Manual) armLocked(w *waiter, at time.Time) {
	if w.queued {
		heap.Remove(&m.queue, w.index)
	}
	m.seq++
	w.at, w.seq, w.queued = at, m.seq, true
	heap.Push(&m.queue, w)
}

// Next returns the deadline of the earliest pending timer.
func (m *Manual) Next() (time.Time, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.queue) == 0 {
		return time.Time{}, false
	}
	return m.queue[0].at, true
}

// Step moves the clock to the earliest pending deadline (never backwards)
// and fires that one timer. It reports false when nothing is pending.
func (m *Manual) Step() bool {
	m.mu.Lock()
	if len(m.queue) == 0 {
		m.mu.Unlock()
		return false
	}
	w := heap.Pop(&m.queue).(*waiter)
	w.queued = false
	if w.at.After(m.now) {
		m.now = w.at
	}
	now := m.now
	if w.period > 0 {
		m.armLocked(w, w.at.Add(w.period))
	}
	m.mu.Unlock()
	w.fire(now)
	return true
}

// Advance moves the clock forward by d, firing everything due on the way.
func (m *Manual) Advance(d time.Duration) { m.AdvanceTo(m.Now().Add(d)) }

// AdvanceTo moves the clock to t (never backwards), firing every timer
// due by t in order; each fires with the clock at its own deadline.
func (m *Manual) AdvanceTo(t time.Time) {
	for {
		at, ok := m.Next()
		if !ok || at.After(t) {
			break
		}
		m.Step()
	}
	m.mu.Lock()
	if t.After(m.now) {
		m.now = t
	}
	m.mu.Unlock()
}

// Set moves the clock to t (never backwards) without firing anything:
// for an event loop that interleaves its own inputs with the clock's
// timers and has already run every timer due before t. Timers due by t
// fire at the next Step or Advance.
func (m *Manual) Set(t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if t.After(m.now) {
		m.now = t
	}
}

// waiter is a Manual timer, ticker or callback.
type waiter struct {
	m      *Manual
	at     time.Time
	seq    uint64
	index  int
	queued bool
	period time.Duration
	ch     chan time.Time
	fn     func()
}

func (w *waiter) fire(now time.Time) {
	if w.fn != nil {
		w.fn()
		return
	}
	select {
	case w.ch <- now:
	default: // a reader that missed a tick loses it, as with time.Ticker
	}
}

// Stop removes the waiter from the clock.
func (w *waiter) Stop() bool {
	w.m.mu.Lock()
	defer w.m.mu.Unlock()
	if !w.queued {
		return false
	}
	heap.Remove(&w.m.queue, w.index)
	w.queued = false
	return true
}

// Reset re-arms the waiter d from the clock's now (for a ticker, d becomes
// its period).
func (w *waiter) Reset(d time.Duration) bool {
	w.m.mu.Lock()
	defer w.m.mu.Unlock()
	was := w.queued
	if w.period > 0 {
		w.period = d
	}
	w.m.armLocked(w, w.m.now.Add(max(d, 0)))
	return was
}

// waiters is a min-heap by (deadline, creation).
type waiters []*waiter

func (q waiters) Len() int { return len(q) }
func (q waiters) Less(i, j int) bool {
	if !q[i].at.Equal(q[j].at) {
		return q[i].at.Before(q[j].at)
	}
	return q[i].seq < q[j].seq
}
func (q waiters) Swap(i, j int) {
	q[i], q[j] = q[j], q[i]
	q[i].index, q[j].index = i, j
}
func (q *waiters) Push(x any) {
	w := x.(*waiter)
	w.index = len(*q)
	*q = append(*q, w)
}
func (q *waiters) Pop() any {
	old := *q
	w := old[len(old)-1]
	old[len(old)-1] = nil
	*q = old[:len(old)-1]
	w.index = -1
	return w
}

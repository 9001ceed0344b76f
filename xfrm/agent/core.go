// Package agent is the node side of the director's facts: it watches the
// node's XFRM database (package xfrm), keeps the current tunnel facts and
// reports them to the master director over HTTP (package report): a full
// report at start and after every reconnect, debounced deltas after it, a
// heartbeat when nothing else was sent for a while.
//
// The decisions (what to send when, to which director, after which
// backoff) are a state machine, core, stepped one event at a time on an
// injected clock; Agent.Run drives it with the real kernel, timers and
// HTTP.
package agent

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// Config configures an agent. Zero durations take the defaults.
type Config struct {
	// Node is this node's name as the director knows it.
	Node string
	// Endpoints are the directors' API base URLs (one, or the two of a
	// pair): http(s)://host:port. Reports go to whichever is master.
	Endpoints []string
	// Token is this node's API token (sent as a bearer token).
	Token string
	// Heartbeat: a heartbeat is sent when nothing else was for this long
	// (default 5 s).
	Heartbeat time.Duration
	// Debounce: a change is sent once the kernel was quiet this long
	// (default 100 ms)...
	Debounce time.Duration
	// MaxDelay: ...or at the latest this long after the first unsent
	// change (default 500 ms).
	MaxDelay time.Duration
	// RemoveHold: a peer whose SAs are all gone is reported removed only
	// after staying gone this long (default 3 s), so a tunnel that is torn
	// down and re-established (IKEv2 reauthentication, a flapping SA) does
	// not churn the director's table.
	RemoveHold time.Duration
	// Resync: the whole database is read again this often, healing missed
	// events (default 60 s).
	Resync time.Duration
	// Stats: tunnels whose only change is their traffic counters are sent
	// this often (default 60 s).
	Stats time.Duration
	// Timeout bounds one request (default 10 s).
	Timeout time.Duration
	// BackoffMin and BackoffMax bound the wait after every director
	// failed (defaults 500 ms and 30 s; doubled per round, with jitter).
	BackoffMin, BackoffMax time.Duration
}

func (c Config) withDefaults() Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.Heartbeat, 5*time.Second)
	def(&c.Debounce, 100*time.Millisecond)
	def(&c.MaxDelay, 500*time.Millisecond)
	def(&c.RemoveHold, 3*time.Second)
	def(&c.Resync, time.Minute)
	def(&c.Stats, time.Minute)
	def(&c.Timeout, 10*time.Second)
	def(&c.BackoffMin, 500*time.Millisecond)
	def(&c.BackoffMax, 30*time.Second)
	return c
}

func (c Config) validate() error {
	var errs []error
	if c.Node == "" {
		errs = append(errs, errors.New("node name is empty"))
	}
	if len(c.Endpoints) < 1 || len(c.Endpoints) > 2 {
		errs = append(errs, fmt.Errorf("%d director endpoints: want one, or the two of a pair", len(c.Endpoints)))
	}
	if c.Token == "" {
		errs = append(errs, errors.New("token is empty"))
	}
	return errors.Join(errs...)
}

// result is the outcome of one POST.
type result struct {
	status int // HTTP status, 0 when no answer came
	ack    report.Ack
	err    error
}

// core decides what to send. It is not safe for concurrent use: Run calls
// it from one goroutine.
type core struct {
	cfg    Config
	mirror *xfrm.Mirror
	jitter func(time.Duration) time.Duration
	newID  func() string

	// What the current director holds, as acknowledged.
	session  string
	seq      uint64
	needFull bool
	sent     map[netip.Addr]xfrm.Tunnel

	// Changes not yet sent.
	pending     map[netip.Addr]struct{}
	firstChange time.Time
	lastChange  time.Time
	goneSince   map[netip.Addr]time.Time

	lastSent  time.Time // last acknowledged report of any kind
	lastStats time.Time

	// The report in flight, and where it goes.
	inflight  *report.Report
	endpoint  int
	failures  int // endpoints failed in a row
	backoff   time.Duration
	notBefore time.Time
	lastErr   error
}

func newCore(cfg Config, m *xfrm.Mirror) *core {
	return &core{
		cfg: cfg.withDefaults(), mirror: m, needFull: true,
		sent: map[netip.Addr]xfrm.Tunnel{}, pending: map[netip.Addr]struct{}{}, goneSince: map[netip.Addr]time.Time{},
		jitter: func(d time.Duration) time.Duration { return d },
		newID:  randomSession,
	}
}

func randomSession() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand panics instead)
	return hex.EncodeToString(b[:])
}

// changed records that the mirror's facts of these peers changed at now.
func (c *core) changed(peers []netip.Addr, now time.Time) {
	if len(peers) == 0 {
		return
	}
	if len(c.pending) == 0 {
		c.firstChange = now
	}
	c.lastChange = now
	for _, p := range peers {
		c.pending[p] = struct{}{}
	}
}

// settle drops pending peers whose current facts the director already
// has in shape (counters wait for the stats round).
func (c *core) settle() {
	for p := range c.pending {
		cur, ok := c.mirror.Tunnel(p)
		prev, had := c.sent[p]
		if ok == had && (!ok || cur.SameShape(&prev)) {
			delete(c.pending, p)
			delete(c.goneSince, p)
		}
	}
}

// next returns the report to send now, if any, and when to call next
// again at the latest (zero: no deadline; wait for an event or a result).
func (c *core) next(now time.Time) (*report.Report, time.Time) {
	if c.inflight != nil {
		return nil, time.Time{}
	}
	if now.Before(c.notBefore) {
		return nil, c.notBefore
	}
	if c.needFull {
		return c.start(c.fullReport(now), now), time.Time{}
	}
	c.settle()
	var wake time.Time
	soon := func(t time.Time) {
		if wake.IsZero() || t.Before(wake) {
			wake = t
		}
	}
	var upserts []xfrm.Tunnel
	var removed []netip.Addr
	if len(c.pending) > 0 {
		due := c.lastChange.Add(c.cfg.Debounce)
		if latest := c.firstChange.Add(c.cfg.MaxDelay); latest.Before(due) {
			due = latest
		}
		if now.Before(due) {
			soon(due)
		} else {
			for p := range c.pending {
				cur, ok := c.mirror.Tunnel(p)
				if ok {
					delete(c.goneSince, p)
					upserts = append(upserts, cur)
					continue
				}
				since, held := c.goneSince[p]
				if !held {
					since = now
					c.goneSince[p] = now
				}
				if gone := since.Add(c.cfg.RemoveHold); now.Before(gone) {
					soon(gone)
				} else {
					removed = append(removed, p)
				}
			}
		}
	}
	if statsDue := c.lastStats.Add(c.cfg.Stats); !now.Before(statsDue) {
		c.lastStats = now
		for p, prev := range c.sent {
			if _, busy := c.pending[p]; busy {
				continue
			}
			if cur, ok := c.mirror.Tunnel(p); ok && !cur.Equal(&prev) {
				upserts = append(upserts, cur)
			}
		}
	} else {
		soon(statsDue)
	}
	if len(upserts) > 0 || len(removed) > 0 {
		sortTunnels(upserts)
		sortAddrs(removed)
		return c.start(&report.Report{Kind: report.KindDelta, Seq: c.seq + 1, Tunnels: upserts, Removed: removed,
			Summary: c.mirror.Summary()}, now), time.Time{}
	}
	hb := c.lastSent.Add(c.cfg.Heartbeat)
	if !now.Before(hb) {
		return c.start(&report.Report{Kind: report.KindHeartbeat, Seq: c.seq, Summary: c.mirror.Summary()}, now), time.Time{}
	}
	soon(hb)
	return nil, wake
}

func (c *core) fullReport(now time.Time) *report.Report {
	f := c.mirror.Facts()
	c.session = c.newID()
	c.lastStats = now
	return &report.Report{Kind: report.KindFull, Seq: 1, Tunnels: f.Tunnels, Summary: f.Summary}
}

// start fills the common fields and marks the report in flight.
func (c *core) start(r *report.Report, now time.Time) *report.Report {
	r.Version, r.Node, r.Session, r.Sent = report.Version, c.cfg.Node, c.session, now
	c.inflight = r
	return r
}

// done records the outcome of the report in flight.
func (c *core) done(res result, now time.Time) {
	r := c.inflight
	c.inflight = nil
	if r == nil {
		return
	}
	if res.err == nil && res.status == 200 {
		c.failures, c.backoff, c.lastErr = 0, 0, nil
		c.lastSent = now
		if res.ack.NeedFull {
			c.needFull = true
			return
		}
		switch r.Kind {
		case report.KindFull:
			c.needFull = false
			c.sent = make(map[netip.Addr]xfrm.Tunnel, len(r.Tunnels))
			for _, t := range r.Tunnels {
				c.sent[t.Peer] = t
			}
			clear(c.goneSince)
		case report.KindDelta:
			for _, t := range r.Tunnels {
				c.sent[t.Peer] = t
			}
			for _, p := range r.Removed {
				delete(c.sent, p)
				delete(c.goneSince, p)
			}
		}
		c.seq = r.Seq
		c.settle()
		return
	}
	// Whatever failed, the next director (or this one again) gets a full
	// report: a reconnect starts a new session.
	c.needFull = true
	c.lastErr = res.err
	if res.err == nil {
		c.lastErr = fmt.Errorf("HTTP %d", res.status)
	}
	c.endpoint = (c.endpoint + 1) % len(c.cfg.Endpoints)
	c.failures++
	if c.failures < len(c.cfg.Endpoints) && (res.status == 409 || res.status == 0 || res.status >= 500) {
		return // try the other director at once
	}
	// A round of failures: back off before the next.
	c.failures = 0
	if c.backoff == 0 {
		c.backoff = c.cfg.BackoffMin
	} else {
		c.backoff = min(2*c.backoff, c.cfg.BackoffMax)
	}
	c.notBefore = now.Add(c.jitter(c.backoff))
}

// Status is what an agent can say about itself (for logs and tests).
type Status struct {
	Endpoint string
	Session  string
	Seq      uint64
	Tunnels  int // as the director holds them
	LastSent time.Time
	LastErr  error
	Summary  xfrm.Summary
}

func (c *core) status() Status {
	return Status{Endpoint: c.cfg.Endpoints[c.endpoint], Session: c.session, Seq: c.seq, Tunnels: len(c.sent),
		LastSent: c.lastSent, LastErr: c.lastErr, Summary: c.mirror.Summary()}
}

func sortTunnels(ts []xfrm.Tunnel) {
	slices.SortFunc(ts, func(a, b xfrm.Tunnel) int { return a.Peer.Compare(b.Peer) })
}

func sortAddrs(as []netip.Addr) { slices.SortFunc(as, netip.Addr.Compare) }

package ctsync

import (
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// key identifies a conntrack entry: its original tuple and zone.
type key struct {
	orig conntrack.Tuple
	zone uint16
}

func keyOf(f *conntrack.Flow) key { return key{f.Orig, f.Zone} }

// entry is what the cache keeps of a flow besides its key: 28 bytes, no
// pointer (the map of a million costs the collector nothing to scan).
// A NAT flow's reply tuple lives in a map of its own: most flows have
// none.
type entry struct {
	at      uint32 // when last put, in seconds since the cache's epoch
	timeout uint32 // the flow's timeout then
	status  uint32
	mark    uint32
	gen     uint32 // the resync generation it was last put in
	tcp     conntrack.TCPInfo
	nat     bool
}

// CacheCounters count what the cache did.
type CacheCounters struct {
	Puts     uint64 `json:"puts"`
	Destroys uint64 `json:"destroys"`
	// Expired entries outlived their flow's own timeout without a word
	// from the master.
	Expired uint64 `json:"expired"`
	// Evicted entries were dropped, oldest first, because the cache was
	// at its bound.
	Evicted uint64 `json:"evicted"`
	// Swept entries were absent from a full resync: the master no
	// longer has them.
	Swept uint64 `json:"swept"`
}

// Cache is the backup's external cache: the master's flows, bounded, each
// expiring with its own timeout (but never sooner than hold after the
// master last sent it, since refreshes come every RefreshInterval), a
// destroy removing it, a full resync replacing it. Safe for concurrent
// use.
type Cache struct {
	mu    sync.Mutex
	m     map[key]entry
	nat   map[key]conntrack.Tuple
	max   int
	hold  uint32
	clk   clock.Clock
	epoch time.Time
	gen   uint32
	last  uint32 // last expiry sweep
	log   *slog.Logger
	c     CacheCounters

	evictLog time.Time
}

// NewCache returns an empty cache of at most max entries; hold is the
// least time an entry lives after its last put.
func NewCache(max int, hold time.Duration, clk clock.Clock, log *slog.Logger) *Cache {
	clk = clock.Or(clk)
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Cache{m: map[key]entry{}, nat: map[key]conntrack.Tuple{}, max: max, hold: uint32(hold / time.Second),
		clk: clk, epoch: clk.Now(), log: log}
}

func (c *Cache) now() uint32 { return uint32(c.clk.Now().Sub(c.epoch) / time.Second) }

// expired says whether an entry's flow is over at now.
func (c *Cache) expired(e *entry, now uint32) bool {
	return now-e.at > max(e.timeout, c.hold)
}

// Put adds or replaces a flow.
func (c *Cache) Put(f *conntrack.Flow) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.put(f, c.now())
}

func (c *Cache) put(f *conntrack.Flow, now uint32) {
	k := keyOf(f)
	old, had := c.m[k]
	if !had && len(c.m) >= c.max {
		c.makeRoom(now)
	}
	e := entry{at: now, timeout: f.Timeout, status: f.Status, mark: f.Mark, gen: c.gen, tcp: f.TCP, nat: f.NAT()}
	c.m[k] = e
	switch {
	case e.nat:
		c.nat[k] = f.Reply
	case had && old.nat:
		delete(c.nat, k)
	}
	c.c.Puts++
}

// Delete removes a flow (a destroy); unknown flows are ignored.
func (c *Cache) Delete(f *conntrack.Flow) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.delete(keyOf(f))
}

func (c *Cache) delete(k key) {
	if e, ok := c.m[k]; ok {
		if e.nat {
			delete(c.nat, k)
		}
		delete(c.m, k)
		c.c.Destroys++
	}
}

// Begin starts a full resync of generation gen: entries put from now on
// belong to it.
func (c *Cache) Begin(gen uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen = gen
}

// End ends the resync of generation gen: every entry it did not put (and
// no event put since it began) is gone from the master and is dropped.
// An end without its begin (lost to a reset) sweeps nothing.
func (c *Cache) End(gen uint32) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen == 0 || gen != c.gen {
		return 0
	}
	n := c.dropIf(func(e *entry) bool { return e.gen != gen }, len(c.m))
	c.c.Swept += uint64(n)
	return n
}

// Expire drops the entries whose flows' timeouts ran out.
func (c *Cache) Expire() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.expire(c.now())
}

func (c *Cache) expire(now uint32) int {
	c.last = now
	n := c.dropIf(func(e *entry) bool { return c.expired(e, now) }, len(c.m))
	c.c.Expired += uint64(n)
	return n
}

// dropIf drops up to most entries for which drop is true and reports how
// many it dropped.
func (c *Cache) dropIf(drop func(*entry) bool, most int) int {
	n := 0
	for k, e := range c.m {
		if n >= most {
			break
		}
		if drop(&e) {
			if e.nat {
				delete(c.nat, k)
			}
			delete(c.m, k)
			n++
		}
	}
	return n
}

// evictShare is the part of the bound one eviction frees: the cost of
// finding the oldest is spread over that many puts.
const evictShare = 100

// makeRoom frees room for a new entry: the expired ones first, then the
// oldest (least recently put) hundredth of the bound.
func (c *Cache) makeRoom(now uint32) {
	if now != c.last && c.expire(now) > 0 && len(c.m) < c.max {
		return
	}
	want := max(1, c.max/evictShare)
	// The threshold comes from a sample (map iteration starts at a
	// random place): the "at" below which about want entries lie.
	sample := make([]uint32, 0, 1024)
	for _, e := range c.m {
		if len(sample) == cap(sample) {
			break
		}
		sample = append(sample, e.at)
	}
	slices.Sort(sample)
	idx := min(len(sample)-1, len(sample)*want/max(1, len(c.m)))
	threshold := sample[idx]
	n := c.dropIf(func(e *entry) bool { return e.at <= threshold }, want)
	c.c.Evicted += uint64(n)
	if t := c.clk.Now(); t.Sub(c.evictLog) >= time.Minute {
		c.evictLog = t
		c.log.Warn("conntrack cache full: dropped the oldest entries", "max", c.max, "dropped", n, "dropped_total", c.c.Evicted)
	}
}

// Len returns the number of entries.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}

// Counters returns what the cache did.
func (c *Cache) Counters() CacheCounters {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.c
}

// Flows returns the live flows, each with the timeout it has left
// (estimated from when the master last sent it) but at least minTimeout:
// what a commit writes into the kernel.
func (c *Cache) Flows(minTimeout time.Duration) []conntrack.Flow {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	floor := uint32(minTimeout / time.Second)
	out := make([]conntrack.Flow, 0, len(c.m))
	for k, e := range c.m {
		if c.expired(&e, now) {
			continue
		}
		left := uint32(0)
		if age := now - e.at; age < e.timeout {
			left = e.timeout - age
		}
		f := conntrack.Flow{Orig: k.orig, Zone: k.zone, Status: e.status, Mark: e.mark, TCP: e.tcp, Timeout: max(left, floor)}
		if e.nat {
			f.Reply = c.nat[k]
		} else {
			f.Reply = k.orig.Inverse()
		}
		out = append(out, f)
	}
	return out
}

// Clear empties the cache.
func (c *Cache) Clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	// New maps: a cleared map keeps the memory of its largest size.
	c.m, c.nat = map[key]entry{}, map[key]conntrack.Tuple{}
	c.gen = 0
}

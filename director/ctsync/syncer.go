package ctsync

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// Table is the kernel's conntrack table as the syncer uses it; the real
// one is *conntrack.Kernel.
type Table interface {
	Events(ctx context.Context, fn func(*conntrack.Event)) error
	Dump(ctx context.Context, fn func(*conntrack.Flow) error) error
	Commit(ctx context.Context, flows []conntrack.Flow, o conntrack.CommitOptions) (conntrack.CommitResult, error)
	SetTimeout(ctx context.Context, flows []conntrack.Flow, timeout uint32) (int, error)
}

// Link is the replication link's conntrack stream; the real one is
// *replication.Replicator.
type Link interface {
	CTPush(rec []byte) bool
	CTRoom() (<-chan struct{}, bool)
	CTRequestResync()
	CTStatus() replication.CTStreamCounters
}

var _ Link = (*replication.Replicator)(nil)

// Options wire a Syncer.
type Options struct {
	Config Config
	Table  Table
	Scope  Scope
	Clock  clock.Clock
	Logger *slog.Logger
	// PurgeTimeout is the timeout the synced entries get when the
	// director stops being master (0: 60 s).
	PurgeTimeout time.Duration
}

// Counters count what the syncer did. Records are flows (puts and
// destroys) and resync markers.
type Counters struct {
	// Sent records (master): events and resyncs, put on the link.
	Sent uint64 `json:"sent"`
	// Filtered events were not the director's traffic (or held back
	// by their TCP state).
	Filtered uint64 `json:"filtered"`
	// EventsLost counts the times the kernel's event socket overflowed
	// (each followed by a full resync).
	EventsLost uint64 `json:"events_lost"`
	// QueueFull counts records the link refused (its queue was full).
	QueueFull uint64 `json:"queue_full"`
	// Received records (backup).
	Received uint64 `json:"received"`
	// Malformed datagrams of records that did not decode.
	Malformed uint64 `json:"malformed"`
	// ResyncsSent and ResyncsReceived count full resyncs.
	ResyncsSent     uint64 `json:"resyncs_sent"`
	ResyncsReceived uint64 `json:"resyncs_received"`
	// Refreshes count the master's periodic refresh rounds.
	Refreshes uint64 `json:"refreshes"`
	// Commits, Committed and CommitFailed count commits of the cache
	// into the kernel and their entries.
	Commits      uint64 `json:"commits"`
	Committed    uint64 `json:"committed"`
	CommitFailed uint64 `json:"commit_failed"`
	// Purged counts entries whose timers were shortened when the
	// director stopped being master (or by `ctl conntrack flush`).
	Purged uint64 `json:"purged"`
}

// CommitReport is what one commit did.
type CommitReport struct {
	At      time.Time     `json:"at"`
	Entries int           `json:"entries"`
	Failed  int           `json:"failed"`
	Took    time.Duration `json:"took_ns"`
	Error   string        `json:"error,omitempty"`
	// Errors counts the refused entries by the kernel's error.
	Errors map[string]int `json:"errors,omitempty"`
}

// Status is the conntrack replication's part of `tunneldirector status`.
type Status struct {
	Enabled  bool   `json:"enabled"`
	Role     string `json:"role"`
	Cached   int    `json:"cached"`
	CacheMax int    `json:"cache_max"`
	Counters
	Cache CacheCounters `json:"cache"`
	// Stream counts the link's conntrack datagrams: sent, received,
	// resent, lost.
	Stream     replication.CTStreamCounters `json:"stream"`
	LastCommit *CommitReport                `json:"last_commit,omitempty"`
	// Resyncing says a full resync is asked for or under way.
	Resyncing bool   `json:"resyncing"`
	LastError string `json:"last_error,omitempty"`
}

// Syncer replicates conntrack state between the pair, as conntrackd does
// with keepalived, in the daemon: while master it streams the kernel's
// events for the flows that matter (and a full dump when the peer asks,
// and periodic refreshes); while backup it keeps them in its Cache; on
// becoming master it commits the cache into its kernel before the role
// change returns, then streams its own; on becoming backup it shortens
// the timers of the synced entries in its kernel and asks the new master
// for everything.
type Syncer struct {
	cfg   Config
	tab   Table
	filt  *Filter
	cache *Cache
	clk   clock.Clock
	log   *slog.Logger
	purge time.Duration
	link  Link
	seed  maphash.Seed

	roleMu  sync.Mutex // one role change (and commit, flush) at a time
	role    replication.Role
	stop    context.CancelFunc // the master side's goroutines
	stopped chan struct{}
	dumpReq chan struct{}
	runCtx  context.Context

	mu         sync.Mutex
	c          Counters
	gen        uint32
	last       *CommitReport
	lastErr    string
	wantResync bool
	askedAt    time.Time
	askEvery   time.Duration
}

var _ replication.CTHandler = (*Syncer)(nil)

// New returns a syncer in the backup role. Attach the replication link,
// then Run it.
func New(o Options) *Syncer {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	clk := clock.Or(o.Clock)
	purge := o.PurgeTimeout
	if purge <= 0 {
		purge = 60 * time.Second
	}
	return &Syncer{cfg: o.Config, tab: o.Table, filt: NewFilter(&o.Config, o.Scope), clk: clk, log: log, purge: purge,
		cache:   NewCache(o.Config.CacheMax, 3*o.Config.RefreshInterval, clk, log),
		dumpReq: make(chan struct{}, 1), seed: maphash.MakeSeed()}
}

// Attach sets the replication link the syncer streams over.
func (s *Syncer) Attach(l Link) { s.link = l }

// Filter returns the syncer's filter (the daemon sets its own addresses).
func (s *Syncer) Filter() *Filter { return s.filt }

// Cache returns the backup's cache.
func (s *Syncer) Cache() *Cache { return s.cache }

// Run keeps the cache and the resync requests until ctx ends; the master
// side's goroutines run under ctx too.
func (s *Syncer) Run(ctx context.Context) error {
	s.roleMu.Lock()
	s.runCtx = ctx
	if s.role == replication.RoleMaster && s.stop == nil {
		s.startMaster()
	}
	s.roleMu.Unlock()
	tick, tc := s.clk.NewTicker(time.Second)
	defer tick.Stop()
	sweep := 0
	for {
		select {
		case <-ctx.Done():
			s.roleMu.Lock()
			s.stopMaster()
			s.roleMu.Unlock()
			return ctx.Err()
		case <-tc:
		}
		if sweep++; sweep >= 10 {
			sweep = 0
			s.cache.Expire()
		}
		s.askResync(false)
	}
}

// askResync sends the resync request a backup wants, again with backoff
// (1 s doubling to 30 s) until a resync begins.
func (s *Syncer) askResync(now bool) {
	s.mu.Lock()
	want := s.wantResync && s.role == replication.RoleBackup
	t := s.clk.Now()
	if now {
		s.askEvery = time.Second
	} else if want && t.Sub(s.askedAt) < s.askEvery {
		want = false
	}
	if want {
		s.askedAt = t
		s.askEvery = min(2*max(s.askEvery, time.Second/2), 30*time.Second)
	}
	s.mu.Unlock()
	if want && s.link != nil {
		s.link.CTRequestResync()
	}
}

// SetRole follows the director's role. Becoming master commits the cache
// into the kernel first (bounded by CommitTimeout) and returns the report;
// becoming backup or fault stops streaming, lets the synced entries run
// out (their timers shortened to the purge timeout) and, as backup, asks
// the new master for a full resync.
func (s *Syncer) SetRole(ctx context.Context, role replication.Role) *CommitReport {
	s.roleMu.Lock()
	defer s.roleMu.Unlock()
	if role == s.role {
		return nil
	}
	prev := s.role
	s.mu.Lock()
	s.role = role
	s.wantResync = role == replication.RoleBackup
	s.mu.Unlock()
	var rep *CommitReport
	switch role {
	case replication.RoleMaster:
		rep = s.commit(ctx)
		s.cache.Clear() // in the kernel now; the new backup takes over the caching
		s.startMaster()
		s.requestDump()
	default:
		s.stopMaster()
		if prev == replication.RoleMaster {
			s.purgeKernel(ctx)
		}
		s.askResync(true)
	}
	s.log.Info("conntrack sync role", "role", role.String(), "cached", s.cache.Len())
	return rep
}

// Role returns the role the syncer follows.
func (s *Syncer) Role() replication.Role {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.role
}

// Commit writes the cache into the kernel now (`ctl conntrack commit`).
func (s *Syncer) Commit(ctx context.Context) *CommitReport {
	s.roleMu.Lock()
	defer s.roleMu.Unlock()
	return s.commit(ctx)
}

func (s *Syncer) commit(ctx context.Context) *CommitReport {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.CommitTimeout)
	defer cancel()
	flows := s.cache.Flows(s.cfg.CommitMinTimeout)
	rep := &CommitReport{At: s.clk.Now(), Entries: len(flows)}
	res, err := s.tab.Commit(ctx, flows, conntrack.CommitOptions{Liberal: s.cfg.TCPLiberal})
	rep.Took, rep.Failed = res.Took, res.Failed
	if err != nil {
		// What was not sent in time (or at all) failed too.
		rep.Error = err.Error()
		rep.Failed = len(flows) - min(len(flows), res.Committed)
		if errors.Is(err, context.DeadlineExceeded) {
			rep.Error = fmt.Sprintf("commit_timeout %s reached: %v", s.cfg.CommitTimeout, err)
		}
	}
	if len(res.Errors) > 0 {
		rep.Errors = map[string]int{}
		for code, n := range res.Errors {
			rep.Errors[syscall.Errno(code).Error()] += n
		}
	}
	s.mu.Lock()
	s.c.Commits++
	s.c.Committed += uint64(rep.Entries - rep.Failed)
	s.c.CommitFailed += uint64(rep.Failed)
	s.last = rep
	if rep.Error != "" {
		s.lastErr = rep.Error
	}
	s.mu.Unlock()
	lvl := slog.LevelInfo
	if rep.Failed > 0 {
		lvl = slog.LevelWarn
	}
	s.log.Log(ctx, lvl, "conntrack cache committed to the kernel", "entries", rep.Entries, "failed", rep.Failed, "took", rep.Took, "errors", rep.Errors, "err", rep.Error)
	return rep
}

// Flush shortens the timers of the synced entries in the kernel to the
// purge timeout, as becoming backup does, and with cache also empties the
// cache (`ctl conntrack flush`). It reports the entries shortened.
func (s *Syncer) Flush(ctx context.Context, cache bool) int {
	s.roleMu.Lock()
	defer s.roleMu.Unlock()
	n := s.purgeKernel(ctx)
	if cache {
		s.cache.Clear()
	}
	return n
}

// purgeKernel shortens the timers of the kernel's synced entries: the
// ones committed at the last takeover and the ones made while master are
// the new master's business now. Entries still carrying packets (in
// flight through this director during the switch) refresh their timers
// with their next packet; the rest run out.
func (s *Syncer) purgeKernel(ctx context.Context) int {
	limit := uint32(s.purge / time.Second)
	var fs []conntrack.Flow
	err := s.tab.Dump(ctx, func(f *conntrack.Flow) error {
		if f.Timeout > limit && s.filt.Addresses(f) {
			fs = append(fs, *f)
		}
		return nil
	})
	if err == nil && len(fs) > 0 {
		var n int
		n, err = s.tab.SetTimeout(ctx, fs, limit)
		s.mu.Lock()
		s.c.Purged += uint64(n)
		s.mu.Unlock()
		s.log.Info("conntrack entries of synced flows left to run out", "entries", n, "timeout", s.purge)
		return n
	}
	if err != nil {
		s.setErr(fmt.Errorf("purge synced conntrack entries: %w", err))
	}
	return 0
}

// Resync asks for a full resync (`ctl conntrack resync`): a backup asks
// the master for everything; a master sends everything to the backup.
func (s *Syncer) Resync() {
	if s.Role() == replication.RoleMaster {
		s.requestDump()
		return
	}
	s.mu.Lock()
	s.wantResync = true
	s.mu.Unlock()
	s.askResync(true)
}

func (s *Syncer) setErr(err error) {
	s.mu.Lock()
	s.lastErr = err.Error()
	s.mu.Unlock()
	s.log.Warn("conntrack sync", "err", err)
}

// Status reports the counters and the cache.
func (s *Syncer) Status() Status {
	s.mu.Lock()
	st := Status{Enabled: true, Role: s.role.String(), Counters: s.c, LastError: s.lastErr, CacheMax: s.cfg.CacheMax,
		Resyncing: s.wantResync || len(s.dumpReq) > 0}
	if s.last != nil {
		c := *s.last
		st.LastCommit = &c
	}
	s.mu.Unlock()
	st.Cached = s.cache.Len()
	st.Cache = s.cache.Counters()
	if s.link != nil {
		st.Stream = s.link.CTStatus()
	}
	return st
}

// ---- master side ----

// startMaster starts streaming the kernel's events and answering resync
// requests. Called with roleMu held; before Run it waits for Run.
func (s *Syncer) startMaster() {
	if s.stop != nil || s.runCtx == nil {
		return
	}
	ctx, cancel := context.WithCancel(s.runCtx)
	s.stop = cancel
	done := make(chan struct{})
	s.stopped = done
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); s.events(ctx) }()
	go func() { defer wg.Done(); s.dumper(ctx) }()
	go func() { wg.Wait(); close(done) }()
}

// stopMaster stops the master side and waits for it. Called with roleMu
// held.
func (s *Syncer) stopMaster() {
	if s.stop == nil {
		return
	}
	s.stop()
	<-s.stopped
	s.stop, s.stopped = nil, nil
}

// requestDump asks the dumper for a full resync; requests coalesce.
func (s *Syncer) requestDump() {
	select {
	case s.dumpReq <- struct{}{}:
	default:
	}
}

// events streams the kernel's events for as long as ctx lives, starting
// again after a socket error (with a resync: events were missed).
func (s *Syncer) events(ctx context.Context) {
	var buf []byte
	for {
		err := s.tab.Events(ctx, func(ev *conntrack.Event) { s.handleEvent(ev, &buf) })
		if ctx.Err() != nil {
			return
		}
		s.setErr(fmt.Errorf("conntrack events: %w (resubscribing and resyncing)", err))
		s.requestDump()
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

// handleEvent streams one kernel event the filter lets through; buf is
// the caller's scratch space.
func (s *Syncer) handleEvent(ev *conntrack.Event, buf *[]byte) {
	b := (*buf)[:0]
	switch ev.Type {
	case conntrack.EventLost:
		s.mu.Lock()
		s.c.EventsLost++
		s.mu.Unlock()
		s.log.Warn("conntrack events lost (the kernel's socket overflowed): resyncing the backup")
		s.requestDump()
		return
	case conntrack.EventDestroy:
		if !s.filt.Addresses(&ev.Flow) {
			s.filtered()
			return
		}
		b = appendDestroy(b, &ev.Flow)
	default:
		if !s.filt.Match(&ev.Flow) {
			s.filtered()
			return
		}
		b = appendPut(b, &ev.Flow)
	}
	*buf = b
	s.push(b)
}

func (s *Syncer) filtered() {
	s.mu.Lock()
	s.c.Filtered++
	s.mu.Unlock()
}

// push puts an event's record on the link without waiting: a full queue
// drops it (counted) and a resync repairs what was dropped.
func (s *Syncer) push(rec []byte) {
	ok := s.link != nil && s.link.CTPush(rec)
	s.mu.Lock()
	if ok {
		s.c.Sent++
	} else {
		s.c.QueueFull++
	}
	s.mu.Unlock()
	if !ok {
		s.requestDump()
	}
}

// pushWait puts a dump's record on the link, waiting for room.
func (s *Syncer) pushWait(ctx context.Context, rec []byte) error {
	for {
		room, ok := s.link.CTRoom()
		if ok && s.link.CTPush(rec) {
			s.mu.Lock()
			s.c.Sent++
			s.mu.Unlock()
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-room:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// longTimeout separates flows refreshed every round (a shorter timeout:
// UDP, ICMP, ESP, TCP closing or opening) from the others (established
// TCP: five days), refreshed once per longTimeout in turn.
const longTimeout = 3600

// dumper runs full resyncs when asked and the periodic refresh.
func (s *Syncer) dumper(ctx context.Context) {
	var refresh <-chan time.Time
	if s.cfg.RefreshInterval > 0 {
		t, c := s.clk.NewTicker(s.cfg.RefreshInterval)
		defer t.Stop()
		refresh = c
	}
	round := uint64(0)
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.dumpReq:
			if err := s.fullResync(ctx); err != nil && ctx.Err() == nil {
				s.setErr(fmt.Errorf("conntrack resync: %w", err))
			}
		case <-refresh:
			round++
			if err := s.refresh(ctx, round); err != nil && ctx.Err() == nil {
				s.setErr(fmt.Errorf("conntrack refresh: %w", err))
			}
		}
	}
}

// fullResync sends every synced flow between a begin and an end marker:
// the backup drops what the resync did not carry.
func (s *Syncer) fullResync(ctx context.Context) error {
	if s.link == nil {
		return nil
	}
	s.mu.Lock()
	s.gen++
	if s.gen == 0 {
		s.gen = 1
	}
	gen := s.gen
	s.mu.Unlock()
	start := s.clk.Now()
	if err := s.pushWait(ctx, appendMarker(nil, recBegin, gen)); err != nil {
		return err
	}
	var buf []byte
	n := 0
	err := s.tab.Dump(ctx, func(f *conntrack.Flow) error {
		if !s.filt.Match(f) {
			return nil
		}
		n++
		buf = appendPut(buf[:0], f)
		return s.pushWait(ctx, buf)
	})
	if err != nil {
		return err
	}
	if err := s.pushWait(ctx, appendMarker(nil, recEnd, gen)); err != nil {
		return err
	}
	s.mu.Lock()
	s.c.ResyncsSent++
	s.mu.Unlock()
	s.log.Info("conntrack full resync sent", "generation", gen, "flows", n, "took", s.clk.Now().Sub(start).Round(time.Millisecond))
	return nil
}

// refresh sends again the synced flows the backup would otherwise expire:
// those with a short timeout every round, the others once per
// longTimeout (a share of them each round, by a hash of their key).
func (s *Syncer) refresh(ctx context.Context, round uint64) error {
	if s.link == nil {
		return nil
	}
	share := uint64(max(1, longTimeout/int(s.cfg.RefreshInterval/time.Second)))
	var buf []byte
	err := s.tab.Dump(ctx, func(f *conntrack.Flow) error {
		if !s.filt.Match(f) {
			return nil
		}
		if f.Timeout > longTimeout {
			k := keyOf(f)
			h := maphash.Comparable(s.seed, k)
			if h%share != round%share {
				return nil
			}
		}
		buf = appendPut(buf[:0], f)
		return s.pushWait(ctx, buf)
	})
	s.mu.Lock()
	s.c.Refreshes++
	s.mu.Unlock()
	return err
}

// CTResyncAsked is the replication link asking this master for a full
// resync (the backup asked, or lost records).
func (s *Syncer) CTResyncAsked() { s.requestDump() }

// ---- backup side ----

// CTRecords applies one datagram's records to the cache (on a backup).
func (s *Syncer) CTRecords(b []byte) error {
	r := reader{b: b}
	var rec record
	n := uint64(0)
	for r.next(&rec) {
		n++
		switch rec.kind {
		case recPut:
			s.cache.Put(&rec.flow)
		case recDestroy:
			s.cache.Delete(&rec.flow)
		case recBegin:
			s.cache.Begin(rec.gen)
			s.mu.Lock()
			s.wantResync = false
			s.mu.Unlock()
		case recEnd:
			swept := s.cache.End(rec.gen)
			s.mu.Lock()
			s.c.ResyncsReceived++
			s.mu.Unlock()
			s.log.Info("conntrack full resync received", "generation", rec.gen, "cached", s.cache.Len(), "swept", swept)
		}
	}
	s.mu.Lock()
	s.c.Received += n
	if r.err != nil {
		s.c.Malformed++
	}
	s.mu.Unlock()
	return r.err
}

// CTReset notes records lost for good; the master sends a full resync.
func (s *Syncer) CTReset() {
	s.mu.Lock()
	s.wantResync = true
	s.mu.Unlock()
}

// Flows returns up to limit cached flows (0: all), for `ctl conntrack
// show`, sorted by their original tuple.
func (s *Syncer) Flows(limit int) []conntrack.Flow {
	fs := s.cache.Flows(0)
	slices.SortFunc(fs, func(a, b conntrack.Flow) int { return compareTuple(&a.Orig, &b.Orig) })
	if limit > 0 && len(fs) > limit {
		fs = fs[:limit]
	}
	return fs
}

func compareTuple(a, b *conntrack.Tuple) int {
	if c := slices.Compare(a.Src[:], b.Src[:]); c != 0 {
		return c
	}
	if c := slices.Compare(a.Dst[:], b.Dst[:]); c != 0 {
		return c
	}
	if a.Proto != b.Proto {
		return int(a.Proto) - int(b.Proto)
	}
	if a.SrcPort != b.SrcPort {
		return int(a.SrcPort) - int(b.SrcPort)
	}
	return int(a.DstPort) - int(b.DstPort)
}

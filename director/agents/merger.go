package agents

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/gaissmai/bart"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// AgentFresh is how recently an owner's agent must have reported for its
// silence about a peer to count as "no SA there" (three of the agent's
// default 5 s heartbeats).
const AgentFresh = 15 * time.Second

// Merger merges the agents' reports into the table on the master. Accept
// takes a report (from any goroutine); Plan, called under the store's
// lock, returns the changes that bring the table in line with what the
// agents hold; Done records the commit's outcome. The daemon drives it:
// one Plan per MergeDelay after a change, and a sweep every few seconds.
type Merger struct {
	inbox *report.Inbox

	cfgMu sync.Mutex
	cfg   Config

	dirtyMu sync.Mutex
	dirty   map[netip.Addr]struct{}
	wake    chan struct{}

	// Plan state, under mu.
	mu        sync.Mutex
	misplaced map[netip.Addr]*misplacedState
	dropping  map[netip.Addr]map[netip.Prefix]time.Time // subnets a learned tunnel's owner no longer negotiates, since
	unapplied map[netip.Addr][]Unapplied
	nodeMis   map[string]int // per node: peers it holds that the table gives to another node (last sweep)
	nextTTL   time.Time
	stats     Counters
}

type misplacedState struct {
	owner   string
	holders []string
	first   time.Time // misplaced with this owner and holders since
	cond    time.Time // follow-sa's conditions hold since (zero: they do not)
	action  string
}

// NewMerger returns a merger with an empty inbox.
func NewMerger(cfg Config) *Merger {
	m := &Merger{inbox: report.NewInbox(), cfg: cfg, wake: make(chan struct{}, 1)}
	m.stats.Reports = map[report.Kind]uint64{}
	m.stats.Refused = map[string]uint64{}
	m.resetLocked()
	return m
}

func (m *Merger) resetLocked() {
	m.dirty = map[netip.Addr]struct{}{}
	m.misplaced = map[netip.Addr]*misplacedState{}
	m.dropping = map[netip.Addr]map[netip.Prefix]time.Time{}
	m.unapplied = map[netip.Addr][]Unapplied{}
	m.nodeMis = map[string]int{}
}

// SetConfig replaces the configuration (a reload).
func (m *Merger) SetConfig(c Config) {
	m.cfgMu.Lock()
	m.cfg = c
	m.cfgMu.Unlock()
}

// Config returns the configuration in force.
func (m *Merger) Config() Config {
	m.cfgMu.Lock()
	defer m.cfgMu.Unlock()
	return m.cfg
}

// Wake is signalled when an accepted report changed a node's facts: the
// daemon merges MergeDelay later, so a burst of reports is one commit.
func (m *Merger) Wake() <-chan struct{} { return m.wake }

// Accept applies a decoded report of the node its token belongs to (the
// caller checked that this director is master and the node is in the
// table) at the director's time now.
func (m *Merger) Accept(node string, r *report.Report, now time.Time) (report.Ack, error) {
	ack, ch, err := m.inbox.Accept(node, r, now)
	if err != nil {
		return ack, err
	}
	m.mu.Lock()
	m.stats.Reports[r.Kind]++
	m.mu.Unlock()
	if ch.Empty() {
		return ack, nil
	}
	m.dirtyMu.Lock()
	for i := range ch.Upserts {
		m.dirty[ch.Upserts[i].Peer] = struct{}{}
	}
	for _, p := range ch.Removed {
		m.dirty[p] = struct{}{}
	}
	m.dirtyMu.Unlock()
	select {
	case m.wake <- struct{}{}:
	default:
	}
	return ack, nil
}

// Reset forgets every agent's facts and the merge's bookkeeping: this
// director stopped (or started) being master, and the agents start over
// with a full report at the master.
func (m *Merger) Reset() {
	m.inbox.Reset()
	m.dirtyMu.Lock()
	m.dirty = map[netip.Addr]struct{}{}
	m.dirtyMu.Unlock()
	m.mu.Lock()
	m.resetLocked()
	m.nextTTL = time.Time{}
	m.mu.Unlock()
}

// Forget drops one node's facts (a node removed from the table).
func (m *Merger) Forget(node string) { m.inbox.Forget(node) }

// Plan is what one merge decided.
type Plan struct {
	// Changes is the batch to commit, in one transaction.
	Changes []affinity.Change
	// Peers were examined; they are examined again when the commit fails.
	Peers []netip.Addr
	// What the changes do.
	Learned, Subnets, Seen, Followed, Expired int
	// Again says that the batch frees subnets (dropped from a learned
	// tunnel, or an expired one's) while it refused others for a
	// conflict with the table: once it is committed, plan again at once,
	// since a refused subnet may be among the freed ones.
	Again bool

	at time.Time // the plan's time
}

// planState is one Plan's working set.
type planState struct {
	t       *affinity.Table
	now     time.Time
	cfg     Config
	claimed bart.Table[netip.Addr] // subnets given to a peer in this batch
	plan    *Plan
	touched map[string]bool // tunnel ids changed in this batch
	// released and refused: the batch frees subnets, and it refused one
	// for a conflict with the table (see Plan.Again).
	released, refused bool
}

// Plan examines the peers reported since the last plan (and with sweep,
// every peer any node holds, so that table changes made elsewhere are
// seen too) and returns the changes that merge the agents' facts into t.
// Call it with the table locked against other writers (inside
// store.Store.Do) and commit the changes, then call Done.
func (m *Merger) Plan(t *affinity.Table, now time.Time, sweep bool) *Plan {
	m.dirtyMu.Lock()
	peers := m.dirty
	m.dirty = map[netip.Addr]struct{}{}
	m.dirtyMu.Unlock()

	m.mu.Lock()
	defer m.mu.Unlock()
	st := &planState{t: t, now: now, cfg: m.Config(), plan: &Plan{at: now}, touched: map[string]bool{}}
	if sweep {
		m.sweepLocked(t, st.cfg, now, peers)
	}
	st.plan.Peers = make([]netip.Addr, 0, len(peers))
	for p := range peers {
		st.plan.Peers = append(st.plan.Peers, p)
	}
	// A stable order: the same reports give the same batch.
	slices.SortFunc(st.plan.Peers, netip.Addr.Compare)
	for _, p := range st.plan.Peers {
		m.evalPeer(st, p)
	}
	if !now.Before(m.nextTTL) {
		m.expireLocked(st)
		m.nextTTL = now.Add(min(max(st.cfg.LearnedTTL/16, time.Second), 10*time.Minute))
	}
	st.plan.Again = st.released && st.refused
	return st.plan
}

// Done records a plan's commit: counted when it succeeded, its peers
// examined again at the next plan when it failed.
func (m *Merger) Done(p *Plan, took time.Duration, err error) {
	m.mu.Lock()
	c := &m.stats
	c.Merges++
	c.LastMergeTook = took
	if err != nil {
		c.MergeErrors++
		c.LastError = err.Error()
	} else {
		c.LastError = ""
		c.Changes += uint64(len(p.Changes))
		c.Learned += uint64(p.Learned)
		c.SubnetsApplied += uint64(p.Subnets)
		c.Followed += uint64(p.Followed)
		c.Expired += uint64(p.Expired)
	}
	m.mu.Unlock()
	if err == nil {
		return
	}
	m.dirtyMu.Lock()
	for _, a := range p.Peers {
		m.dirty[a] = struct{}{}
	}
	m.dirtyMu.Unlock()
}

// Drop removes from a plan the changes the table refused (it should not
// refuse any: the merge checks what it proposes) and records each as
// unapplied with the table's reason, so a bad change cannot block every
// later merge.
func (m *Merger) Drop(p *Plan, be *affinity.BatchError) *Plan {
	bad := map[int]*affinity.ChangeError{}
	for _, ce := range be.Errors {
		bad[ce.Index] = ce
	}
	if len(bad) == 0 {
		// Nothing says which: drop the whole batch.
		for i := range p.Changes {
			bad[i] = &affinity.ChangeError{Index: i, Err: be}
		}
	}
	q := *p
	q.Changes = nil
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, c := range p.Changes {
		ce, refused := bad[i]
		if !refused {
			q.Changes = append(q.Changes, c)
			continue
		}
		if c.Tunnel != nil {
			u := Unapplied{Peer: c.Tunnel.Peer, Tunnel: c.Tunnel.ID, Node: c.Tunnel.Node, Reason: "refused by the table: " + ce.Err.Error(), Since: p.at}
			m.unapplied[u.Peer] = append(m.unapplied[u.Peer], u)
		}
	}
	return &q
}

// CountRefusal counts a refused report by reason (see RefusalReason).
func (m *Merger) CountRefusal(reason string) {
	m.mu.Lock()
	m.stats.Refused[reason]++
	m.mu.Unlock()
}

// RefusalReasons are every reason RefusalReason returns.
var RefusalReasons = []string{"unauthorized", "unknown_node", "wrong_node", "off", "method", "not_master", "too_large", "invalid", "error"}

// RefusalReason names why the endpoint refused a report, for counting.
func RefusalReason(status int, err error) string {
	switch {
	case status == 401:
		return "unauthorized"
	case status == 403 && errors.Is(err, report.ErrUnknownNode):
		return "unknown_node"
	case status == 403:
		return "wrong_node"
	case status == 404:
		return "off"
	case status == 405:
		return "method"
	case status == 409:
		return "not_master"
	case status == 413:
		return "too_large"
	case status == 422:
		return "invalid"
	}
	return "error"
}

// sweepLocked adds to peers every peer that needs a look although no
// report named it: held by a node the table does not give it to, learned
// with a stale Seen, no longer in the table, or with a pending subnet
// drop, refused subnet or misplacement. It also forgets nodes the table
// no longer has and counts each node's misplaced peers.
func (m *Merger) sweepLocked(t *affinity.Table, cfg Config, now time.Time, peers map[netip.Addr]struct{}) {
	clear(m.nodeMis)
	step := cfg.seenStep()
	for _, name := range m.inbox.Nodes() {
		if _, ok := t.Node(name); !ok {
			m.inbox.Forget(name)
			continue
		}
		for _, p := range m.inbox.Peers(name) {
			tu, ok := t.LookupPeer(p)
			switch {
			case !ok:
			case tu.Node != name:
				m.nodeMis[name]++
			case isLearned(&tu) && now.Sub(tu.Seen) >= step:
			default:
				continue
			}
			peers[p] = struct{}{}
		}
	}
	for p := range m.misplaced {
		peers[p] = struct{}{}
	}
	for p := range m.dropping {
		peers[p] = struct{}{}
	}
	for p := range m.unapplied {
		peers[p] = struct{}{}
	}
}

// isLearned: a tunnel without subnets can only have been learned (NMS
// files list at least one), also one stored before the Learned flag.
func isLearned(tu *affinity.Tunnel) bool { return tu.Learned || len(tu.Subnets) == 0 }

// holders returns the nodes holding the peer that the table has.
func (st *planState) holders(in *report.Inbox, p netip.Addr) []report.Held {
	hs := in.Holders(p)
	return slices.DeleteFunc(hs, func(h report.Held) bool { _, ok := st.t.Node(h.Node); return !ok })
}

func (m *Merger) evalPeer(st *planState, p netip.Addr) {
	hs := st.holders(m.inbox, p)
	tu, known := st.t.LookupPeer(p)
	if !known {
		delete(m.misplaced, p)
		delete(m.dropping, p)
		delete(m.unapplied, p)
		if len(hs) > 0 {
			m.learn(st, p, hs)
		}
		return
	}
	if st.touched[tu.ID] {
		return
	}
	learned := isLearned(&tu)
	want := tu
	var why []string
	var own *report.Held
	var others []report.Held
	for i := range hs {
		if hs[i].Node == tu.Node {
			own = &hs[i]
		} else {
			others = append(others, hs[i])
		}
	}
	if len(others) > 0 {
		if to, ok := m.follow(st, &tu, own, others); ok {
			want.Node, want.Pinned = to.Node, false
			own = to
			why = append(why, fmt.Sprintf("follow-sa: its SAs are on %s, none on %s for %s", to.Node, tu.Node, st.cfg.Hold))
			st.plan.Followed++
			delete(m.misplaced, p)
		}
	} else {
		delete(m.misplaced, p)
	}
	switch {
	case own == nil:
		// The owner holds no SA (yet, or any more): its subnets stay
		// until learned_ttl; nothing it negotiated is refused now.
		delete(m.unapplied, p)
	case learned:
		subnets := m.learnedSubnets(st, &want, own)
		if !slices.Equal(subnets, tu.Subnets) {
			want.Subnets = subnets
			why = append(why, "subnets negotiated on "+own.Node)
			st.plan.Subnets++
		}
	default:
		m.nmsMismatch(st, &tu, own)
	}
	if learned {
		want.Learned = true
		if len(hs) > 0 && st.now.Sub(tu.Seen) >= st.cfg.seenStep() {
			want.Seen = st.now.Truncate(time.Second)
			if len(why) == 0 {
				st.plan.Seen++
				why = append(why, "SAs seen")
			}
		}
	}
	if want.SameContent(&tu) {
		return
	}
	st.touched[tu.ID] = true
	st.plan.Changes = append(st.plan.Changes, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &want, Reason: "agents: " + strings.Join(why, "; ")})
}

// learn adds a peer the table does not know, held by at least one node.
func (m *Merger) learn(st *planState, p netip.Addr, hs []report.Held) {
	// The holder whose SAs carried traffic last (a stale SA elsewhere
	// lost the peer), then by name; never a down node.
	hs = slices.DeleteFunc(slices.Clone(hs), func(h report.Held) bool {
		n, _ := st.t.Node(h.Node)
		return n.State == affinity.NodeDown
	})
	if len(hs) == 0 || st.t.IsVIP(p) || affinity.ValidateAddr(p) != nil {
		return
	}
	own := slices.MaxFunc(hs, func(a, b report.Held) int {
		return cmp.Or(cmp.Compare(a.Tunnel.LastUse, b.Tunnel.LastUse), strings.Compare(b.Node, a.Node))
	})
	id := affinity.LearnedPrefix + p.String()
	if o, taken := st.t.Tunnel(id); taken || st.touched[id] {
		m.unapplied[p] = []Unapplied{{Peer: p, Tunnel: id, Node: own.Node, Since: st.now,
			Reason: fmt.Sprintf("not learned: tunnel id %s is taken (by peer %s)", id, o.Peer)}}
		return
	}
	tu := affinity.Tunnel{ID: id, Peer: p, Node: own.Node, Learned: true, Seen: st.now.Truncate(time.Second)}
	tu.Subnets = m.learnedSubnets(st, &tu, &own)
	st.touched[id] = true
	st.plan.Learned++
	st.plan.Changes = append(st.plan.Changes, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &tu,
		Reason: fmt.Sprintf("agents: learned from the SAs on %s", own.Node)})
}

// learnedSubnets returns a learned tunnel's subnets given what its owner
// negotiated: every negotiated subnet that fits (new ones at once), plus
// the tunnel's current subnets its owner stopped negotiating less than
// Hold ago. What does not fit is recorded as unapplied.
func (m *Merger) learnedSubnets(st *planState, tu *affinity.Tunnel, own *report.Held) []netip.Prefix {
	p := tu.Peer
	var out []netip.Prefix
	var refused []Unapplied
	for _, s := range own.Tunnel.Subnets {
		reason := ""
		switch {
		case slices.ContainsFunc(out, func(q netip.Prefix) bool { return q.Overlaps(s) }):
			continue // inside one already taken: the same node steers it
		case !st.cfg.allowed(s):
			reason = "outside agents.subnets"
		case len(out) >= 64:
			reason = "more than 64 subnets"
		}
		if reason == "" {
			if err := st.t.SubnetFree(s, tu.ID); err != nil {
				reason, st.refused = err.Error(), true
			}
		}
		if reason == "" {
			reason = st.claim(s, p)
		}
		if reason != "" {
			refused = append(refused, Unapplied{Peer: p, Tunnel: tu.ID, Node: own.Node, Subnet: s, Reason: reason, Since: st.now})
			continue
		}
		out = append(out, s)
	}
	m.setUnapplied(p, refused)
	// Current subnets no longer negotiated wait for Hold.
	drops := m.dropping[p]
	for s := range drops {
		if slices.Contains(out, s) || !slices.Contains(tu.Subnets, s) {
			delete(drops, s)
		}
	}
	for _, s := range tu.Subnets {
		if slices.Contains(out, s) || slices.ContainsFunc(out, func(q netip.Prefix) bool { return q.Overlaps(s) }) {
			continue
		}
		if drops == nil {
			drops = map[netip.Prefix]time.Time{}
			m.dropping[p] = drops
		}
		since, ok := drops[s]
		if !ok {
			drops[s], since = st.now, st.now
		}
		if st.now.Sub(since) < st.cfg.Hold && len(out) < 64 {
			out = append(out, s)
		} else {
			delete(drops, s)
			st.released = true
		}
	}
	if len(drops) == 0 {
		delete(m.dropping, p)
	}
	slices.SortFunc(out, affinity.ComparePrefix)
	return out
}

// claim records s as given to peer p in this batch, or says which peer
// of the batch has it.
func (st *planState) claim(s netip.Prefix, p netip.Addr) string {
	for q, o := range st.claimed.Supernets(s) {
		if o != p {
			return fmt.Sprintf("overlaps %s negotiated by peer %s in the same merge", q, o)
		}
	}
	for q, o := range st.claimed.Subnets(s) {
		if o != p {
			return fmt.Sprintf("overlaps %s negotiated by peer %s in the same merge", q, o)
		}
	}
	st.claimed.Insert(s, p)
	return ""
}

// nmsMismatch reports the subnets an NMS tunnel's owner negotiated that
// its NMS subnets do not cover: the NMS's stay authoritative.
func (m *Merger) nmsMismatch(st *planState, tu *affinity.Tunnel, own *report.Held) {
	var out []Unapplied
	for _, s := range own.Tunnel.Subnets {
		if !slices.ContainsFunc(tu.Subnets, func(q netip.Prefix) bool { return q.Bits() <= s.Bits() && q.Contains(s.Addr()) }) {
			out = append(out, Unapplied{Peer: tu.Peer, Tunnel: tu.ID, Node: own.Node, Subnet: s, Since: st.now,
				Reason: "negotiated outside the tunnel's NMS subnets (the NMS's are authoritative)"})
		}
	}
	m.setUnapplied(tu.Peer, out)
}

// setUnapplied replaces a peer's unapplied list, keeping the time each
// entry was first reported.
func (m *Merger) setUnapplied(p netip.Addr, list []Unapplied) {
	if len(list) == 0 {
		delete(m.unapplied, p)
		return
	}
	for i := range list {
		for _, o := range m.unapplied[p] {
			if o.Subnet == list[i].Subnet && o.Reason == list[i].Reason {
				list[i].Since = o.Since
			}
		}
	}
	m.unapplied[p] = list
}

// follow records a misplaced tunnel and decides whether follow-sa moves
// it now; it returns the node to move it to.
func (m *Merger) follow(st *planState, tu *affinity.Tunnel, own *report.Held, others []report.Held) (*report.Held, bool) {
	names := make([]string, len(others))
	for i := range others {
		names[i] = others[i].Node
	}
	ms := m.misplaced[tu.Peer]
	if ms == nil || ms.owner != tu.Node || !slices.Equal(ms.holders, names) {
		// New, or the table moved it, or other nodes hold it now: the
		// clocks start again.
		ms = &misplacedState{owner: tu.Node, holders: names, first: st.now}
		m.misplaced[tu.Peer] = ms
	}
	why := func(s string) (*report.Held, bool) {
		ms.action, ms.cond = s, time.Time{}
		return nil, false
	}
	if st.cfg.Adopt != AdoptFollowSA {
		return why("reported (adopt: report)")
	}
	if tu.Pinned {
		return why("reported: pinned by the NMS")
	}
	if own != nil {
		return why("reported: the owner holds an SA too")
	}
	if len(others) > 1 {
		return why("reported: several other nodes hold it")
	}
	f, ok := m.inbox.Summary(tu.Node)
	if !ok || f.LastFull.IsZero() {
		return why("waiting: the owner's agent is not reporting")
	}
	if age := st.now.Sub(f.LastSeen); age > AgentFresh {
		return why(fmt.Sprintf("waiting: the owner's agent is silent for %s", age.Round(time.Second)))
	}
	to := &others[0]
	if n, _ := st.t.Node(to.Node); n.State == affinity.NodeDown {
		return why("reported: " + to.Node + " is down")
	}
	if ms.cond.IsZero() {
		ms.cond = st.now
	}
	at := ms.cond.Add(st.cfg.Hold)
	if st.now.Before(at) {
		ms.action = fmt.Sprintf("follow-sa to %s at %s", to.Node, at.UTC().Format(time.RFC3339))
		return nil, false
	}
	return to, true
}

// expireLocked removes learned tunnels without an SA on any node for
// learned_ttl, once their owner's agent reports (a node without one gives
// no evidence of absence).
func (m *Merger) expireLocked(st *planState) {
	ttl := st.cfg.LearnedTTL
	for _, tu := range st.t.Filter(isLearned) {
		last := tu.Created
		if tu.Seen.After(last) {
			last = tu.Seen
		}
		if st.now.Sub(last) < ttl || st.touched[tu.ID] || len(st.holders(m.inbox, tu.Peer)) > 0 {
			continue
		}
		if f, ok := m.inbox.Summary(tu.Node); !ok || f.LastFull.IsZero() {
			continue
		}
		st.touched[tu.ID] = true
		st.released = st.released || len(tu.Subnets) > 0
		st.plan.Expired++
		st.plan.Changes = append(st.plan.Changes, affinity.Change{Kind: affinity.DeleteTunnel, Name: tu.ID,
			Reason: fmt.Sprintf("agents: learned, no SA on any node since %s (learned_ttl %s)", last.UTC().Format(time.RFC3339), ttl)})
	}
}

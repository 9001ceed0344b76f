package agents

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// Counters count what the merge did since the director started (or
// became master).
type Counters struct {
	// Reports accepted, by kind (full, delta, heartbeat).
	Reports map[report.Kind]uint64 `json:"reports"`
	// Refused reports by reason: unauthorized, wrong_node, unknown_node,
	// not_master, too_large, invalid, method, off, error.
	Refused map[string]uint64 `json:"refused"`
	// Merges committed (or failed), and what they changed.
	Merges         uint64        `json:"merges"`
	MergeErrors    uint64        `json:"merge_errors"`
	Changes        uint64        `json:"changes"`
	Learned        uint64        `json:"learned"`
	SubnetsApplied uint64        `json:"subnets_applied"`
	Followed       uint64        `json:"followed"`
	Expired        uint64        `json:"expired"`
	LastMergeTook  time.Duration `json:"last_merge_ns"`
	LastError      string        `json:"last_error,omitempty"`
}

// Status is the agents' part of the director's status.
type Status struct {
	Adopt Adopt `json:"adopt"`
	// Nodes whose agent is reporting (has a session with a full report).
	Nodes int `json:"nodes"`
	// SAs and Tunnels add up the reporting nodes' summaries.
	SAs     int `json:"sas"`
	Tunnels int `json:"tunnels"`
	// Misplaced counts peers held by a node the table does not give them
	// to (at the last sweep).
	Misplaced int `json:"misplaced"`
	// Unapplied counts negotiated subnets reported and not applied.
	Unapplied int `json:"unapplied"`
	Counters
}

// NodeView is one node's agent as the master sees it.
type NodeView struct {
	SAs          int `json:"sas"`
	Tunnels      int `json:"tunnels"`
	Unattributed int `json:"unattributed,omitempty"`
	// Misplaced counts the peers this node holds that the table gives to
	// another node (at the last sweep).
	Misplaced  int       `json:"misplaced"`
	LastReport time.Time `json:"last_report"`
	LastFull   time.Time `json:"last_full"`
}

// Misplaced is a tunnel whose SAs are on a node other than its owner.
type Misplaced struct {
	Peer   netip.Addr `json:"peer"`
	Tunnel string     `json:"tunnel"`
	Owner  string     `json:"owner"`
	// HeldOn lists the nodes holding SAs of the peer, the owner too when
	// it holds some.
	HeldOn []string  `json:"held_on"`
	Pinned bool      `json:"pinned,omitempty"`
	Since  time.Time `json:"since"`
	// Action says what the director does about it (follow-sa when, or
	// why it only reports).
	Action string `json:"action"`
}

// Unapplied is a negotiated subnet (or a learned peer) reported and not
// applied, with the reason.
type Unapplied struct {
	Peer   netip.Addr   `json:"peer"`
	Tunnel string       `json:"tunnel"`
	Node   string       `json:"node"`
	Subnet netip.Prefix `json:"subnet,omitzero"`
	Reason string       `json:"reason"`
	Since  time.Time    `json:"since"`
}

// Status returns the agents' status.
func (m *Merger) Status() Status {
	s := Status{Adopt: m.Config().Adopt}
	for _, name := range m.inbox.Nodes() {
		f, ok := m.inbox.Summary(name)
		if !ok || f.LastFull.IsZero() {
			continue
		}
		s.Nodes++
		s.SAs += f.Summary.SAs
		s.Tunnels += f.Summary.Tunnels
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, n := range m.nodeMis {
		s.Misplaced += n
	}
	for _, l := range m.unapplied {
		s.Unapplied += len(l)
	}
	s.Counters = m.stats
	s.Reports = maps.Clone(m.stats.Reports)
	s.Refused = maps.Clone(m.stats.Refused)
	return s
}

// Node returns a node's agent view; false when its agent has not
// reported to this director (since it became master).
func (m *Merger) Node(name string) (NodeView, bool) {
	f, ok := m.inbox.Summary(name)
	if !ok {
		return NodeView{}, false
	}
	m.mu.Lock()
	mis := m.nodeMis[name]
	m.mu.Unlock()
	return NodeView{SAs: f.Summary.SAs, Tunnels: f.Summary.Tunnels, Unattributed: f.Summary.Unattributed,
		Misplaced: mis, LastReport: f.LastSeen, LastFull: f.LastFull}, true
}

// Misplaced lists, from the agents' current facts, every tunnel held by a
// node other than its owner, sorted by tunnel id, with what the director
// does about each.
func (m *Merger) Misplaced(t *affinity.Table) []Misplaced {
	byPeer := map[netip.Addr]*Misplaced{}
	for _, name := range m.inbox.Nodes() {
		for _, p := range m.inbox.Peers(name) {
			tu, ok := t.LookupPeer(p)
			if !ok || tu.Node == name {
				continue
			}
			if byPeer[p] == nil {
				mp := &Misplaced{Peer: p, Tunnel: tu.ID, Owner: tu.Node, Pinned: tu.Pinned}
				for _, h := range m.inbox.Holders(p) {
					mp.HeldOn = append(mp.HeldOn, h.Node)
				}
				byPeer[p] = mp
			}
		}
	}
	m.mu.Lock()
	out := make([]Misplaced, 0, len(byPeer))
	for p, mp := range byPeer {
		if ms := m.misplaced[p]; ms != nil && ms.owner == mp.Owner {
			mp.Since, mp.Action = ms.first, ms.action
		} else {
			mp.Action = "not examined yet"
		}
		out = append(out, *mp)
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b Misplaced) int { return strings.Compare(a.Tunnel, b.Tunnel) })
	return out
}

// Unapplied lists what the agents reported and the merge did not apply,
// sorted by tunnel id and subnet.
func (m *Merger) Unapplied() []Unapplied {
	m.mu.Lock()
	var out []Unapplied
	for _, l := range m.unapplied {
		out = append(out, l...)
	}
	m.mu.Unlock()
	slices.SortFunc(out, func(a, b Unapplied) int {
		return cmp.Or(strings.Compare(a.Tunnel, b.Tunnel), affinity.ComparePrefix(a.Subnet, b.Subnet))
	})
	return out
}

// Holders returns the nodes whose agents report SAs of the peer, with
// their facts, sorted by node.
func (m *Merger) Holders(peer netip.Addr) []report.Held { return m.inbox.Holders(peer) }

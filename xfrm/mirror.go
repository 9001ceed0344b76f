package xfrm

import (
	"net/netip"
	"slices"
)

// Mirror holds a node's states and policies as last read or heard and the
// tunnel facts grouped from them. Events change it one at a time; only the
// peers an event touches are grouped again, so the cost of an event does
// not grow with the number of SAs on the node. Its facts always equal
// Group's on the same states and policies (a fuzz test holds it to that).
// A Mirror is not safe for concurrent use.
type Mirror struct {
	local    Local
	states   map[stateKey]*SA
	policies map[policyKey]*Policy
	// Per peer, its SAs and the policies pointing at it: short slices
	// (a few entries per peer), cheaper than a map each.
	peerSAs  map[netip.Addr][]peerSA
	peerPols map[netip.Addr][]policyKey
	count    [3]int // states per class
	tunnels  map[netip.Addr]*Tunnel
	dirty    map[netip.Addr]struct{}
	changed  map[netip.Addr]struct{}
}

// NewMirror returns an empty mirror (no local addresses: every SA is
// unattributed until Reset gives them).
func NewMirror() *Mirror {
	m := &Mirror{changed: map[netip.Addr]struct{}{}}
	m.Reset(Snapshot{})
	return m
}

// Reset replaces the mirror's content with a full read. Peers whose facts
// differ from before are reported by the next Changed.
func (m *Mirror) Reset(s Snapshot) {
	old := m.tunnels
	m.local = NewLocal(s.Local...)
	m.states = make(map[stateKey]*SA, len(s.States))
	m.policies = make(map[policyKey]*Policy, len(s.Policies))
	m.peerSAs = make(map[netip.Addr][]peerSA, len(s.States)/2)
	m.peerPols = make(map[netip.Addr][]policyKey, len(s.States)/2)
	m.count = [3]int{}
	m.tunnels = make(map[netip.Addr]*Tunnel, len(old))
	m.dirty = map[netip.Addr]struct{}{}
	for i := range s.States {
		m.putState(s.States[i])
	}
	for i := range s.Policies {
		m.putPolicy(s.Policies[i])
	}
	// Regroup everything, then compare with what was there: a full read
	// heals whatever events were missed, and reports only real changes.
	prev := m.changed
	m.changed = map[netip.Addr]struct{}{}
	m.regroup()
	m.changed = prev
	for peer, t := range old {
		if n, ok := m.tunnels[peer]; !ok || !n.Equal(t) {
			m.changed[peer] = struct{}{}
		}
	}
	for peer := range m.tunnels {
		if _, ok := old[peer]; !ok {
			m.changed[peer] = struct{}{}
		}
	}
}

// Apply applies one event. It returns false for EventResync (and unknown
// kinds): the caller must read everything again and Reset.
func (m *Mirror) Apply(e Event) bool {
	switch e.Kind {
	case EventState:
		m.putState(e.SA)
	case EventStateGone:
		m.dropState(e.SA.key())
	case EventPolicy:
		m.putPolicy(e.Policy)
	case EventPolicyGone:
		m.dropPolicy(e.Policy.key())
	default:
		return false
	}
	return true
}

func (m *Mirror) putState(sa SA) {
	k := sa.key()
	m.dropState(k)
	p := &sa
	m.states[k] = p
	c, peer, dir := m.local.classify(p)
	m.count[c]++
	if c != classSA {
		return
	}
	m.peerSAs[peer] = append(m.peerSAs[peer], peerSA{key: k, dir: dir})
	m.dirty[peer] = struct{}{}
}

func (m *Mirror) dropState(k stateKey) {
	old, ok := m.states[k]
	if !ok {
		return
	}
	delete(m.states, k)
	c, peer, _ := m.local.classify(old)
	m.count[c]--
	if c != classSA {
		return
	}
	dropFrom(m.peerSAs, peer, func(x peerSA) bool { return x.key == k })
	m.dirty[peer] = struct{}{}
}

// dropFrom deletes what drop matches from a peer's list, and the list
// when nothing is left in it.
func dropFrom[V any](lists map[netip.Addr][]V, peer netip.Addr, drop func(V) bool) {
	if set := slices.DeleteFunc(lists[peer], drop); len(set) > 0 {
		lists[peer] = set
	} else {
		delete(lists, peer)
	}
}

func (m *Mirror) putPolicy(p Policy) {
	k := p.key()
	m.dropPolicy(k)
	pp := &p
	m.policies[k] = pp
	for _, peer := range policyPeers(pp) {
		m.peerPols[peer] = append(m.peerPols[peer], k)
		m.dirty[peer] = struct{}{}
	}
}

func (m *Mirror) dropPolicy(k policyKey) {
	old, ok := m.policies[k]
	if !ok {
		return
	}
	delete(m.policies, k)
	for _, peer := range policyPeers(old) {
		dropFrom(m.peerPols, peer, func(x policyKey) bool { return x == k })
		m.dirty[peer] = struct{}{}
	}
}

// peerSA is one SA of a peer and its direction.
type peerSA struct {
	key stateKey
	dir string
}

// regroup rebuilds the facts of the peers events touched.
func (m *Mirror) regroup() {
	if len(m.dirty) == 0 {
		return
	}
	dirty := m.dirty
	// A fresh set rather than deletes: iterating a Go map costs its
	// capacity, and after a Reset the set held every peer.
	m.dirty = map[netip.Addr]struct{}{}
	for peer := range dirty {
		set := m.peerSAs[peer]
		old := m.tunnels[peer]
		if len(set) == 0 {
			if old != nil {
				delete(m.tunnels, peer)
				m.changed[peer] = struct{}{}
			}
			continue
		}
		sas := make([]*SA, 0, len(set))
		dirs := make([]string, 0, len(set))
		for _, x := range set {
			sas = append(sas, m.states[x.key])
			dirs = append(dirs, x.dir)
		}
		keys := m.peerPols[peer]
		pols := make([]*Policy, 0, len(keys))
		for _, k := range keys {
			pols = append(pols, m.policies[k])
		}
		t := buildTunnel(peer, sas, dirs, pols)
		if old == nil || !old.Equal(&t) {
			m.tunnels[peer] = &t
			m.changed[peer] = struct{}{}
		}
	}
}

// Changed returns the peers whose facts changed (appeared, went, or
// differ in any field) since the last call, sorted.
func (m *Mirror) Changed() []netip.Addr {
	m.regroup()
	out := make([]netip.Addr, 0, len(m.changed))
	for p := range m.changed {
		out = append(out, p)
	}
	m.changed = map[netip.Addr]struct{}{} // not clear(): see regroup
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// Tunnel returns the current facts of one peer.
func (m *Mirror) Tunnel(peer netip.Addr) (Tunnel, bool) {
	m.regroup()
	t, ok := m.tunnels[peer]
	if !ok {
		return Tunnel{}, false
	}
	return *t, true
}

// Summary returns the current counts.
func (m *Mirror) Summary() Summary {
	m.regroup()
	return Summary{SAs: m.count[classSA], Tunnels: len(m.tunnels),
		Unattributed: m.count[classUnattributed], Ignored: m.count[classIgnored]}
}

// Facts returns all current facts, sorted by peer.
func (m *Mirror) Facts() Facts {
	m.regroup()
	f := Facts{Tunnels: make([]Tunnel, 0, len(m.tunnels)), Summary: m.Summary()}
	for _, t := range m.tunnels {
		f.Tunnels = append(f.Tunnels, *t)
	}
	slices.SortFunc(f.Tunnels, func(a, b Tunnel) int { return a.Peer.Compare(b.Peer) })
	return f
}

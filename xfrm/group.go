package xfrm

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Tunnel is what one node holds for one peer: the facts the director
// merges into its table.
type Tunnel struct {
	// Peer is the remote address of the peer's SAs: for a peer behind NAT,
	// the NAT's public address, which is also the address the director
	// steers by.
	Peer netip.Addr `json:"peer"`
	// NATT lists the UDP encapsulations of the peer's SAs (NAT-T), one per
	// distinct port pair; empty when the SAs are plain ESP.
	NATT []NATT `json:"natt,omitempty"`
	// Subnets are the remote selectors of the tunnel-mode policies whose
	// template points at the peer: the subnets negotiated for the peer's
	// CHILD_SAs, sorted and without duplicates.
	Subnets []netip.Prefix `json:"subnets"`
	// SAs counts the peer's ESP and AH states, both directions: one
	// CHILD_SA is two, a rekey overlap four.
	SAs int `json:"sas"`
	// Bytes and Packets add up the SAs present now (an SA's counters go
	// with it when a rekey replaces it).
	Bytes   uint64 `json:"bytes"`
	Packets uint64 `json:"packets"`
	// LastUse is the newest use of any of the SAs (Unix seconds), 0 when
	// none has carried a packet.
	LastUse int64 `json:"last_use"`
	// SPIs lists every SA: one entry per state, sorted.
	SPIs []SPI `json:"spis"`
}

// NATT is one UDP encapsulation of a peer's SAs.
type NATT struct {
	// Port is the peer's UDP port as the node sees it (after NAT).
	Port uint16 `json:"port"`
	// LocalPort is the node's port (4500 unless configured otherwise).
	LocalPort uint16 `json:"local_port"`
	// OriginalAddress is the NAT-OA, when the IKE daemon set one.
	OriginalAddress netip.Addr `json:"original_address,omitzero"`
}

// SA directions in SPI.Dir.
const (
	In  = "in"
	Out = "out"
)

// SPI identifies one SA of a tunnel.
type SPI struct {
	SPI   uint32 `json:"spi"`
	Reqid uint32 `json:"reqid"`
	Dir   string `json:"dir"`   // In: the peer sends on it; Out: the node does
	Proto string `json:"proto"` // "esp" or "ah"
}

// Summary counts a node's states.
type Summary struct {
	// SAs is the number of states attributed to tunnels.
	SAs int `json:"sas"`
	// Tunnels is the number of peers with at least one SA.
	Tunnels int `json:"tunnels"`
	// Unattributed counts ESP/AH states of which neither end, or both
	// ends, are addresses of the node: no peer can be told.
	Unattributed int `json:"unattributed"`
	// Ignored counts states that are no SA of a tunnel: larval ones (an
	// SPI reserved for a negotiation in progress) and protocols other than
	// ESP and AH (IPComp and its IP-in-IP helper states).
	Ignored int `json:"ignored"`
}

// Facts is everything a node holds, grouped by peer.
type Facts struct {
	Tunnels []Tunnel // sorted by peer
	Summary Summary
}

// SameShape reports whether two facts of a peer agree in everything but
// the traffic counters, which change with every packet: the agent reports
// a change of shape at once and counters only now and then.
func (t *Tunnel) SameShape(o *Tunnel) bool {
	return t.Peer == o.Peer && t.SAs == o.SAs && slices.Equal(t.NATT, o.NATT) &&
		slices.Equal(t.Subnets, o.Subnets) && slices.Equal(t.SPIs, o.SPIs)
}

// Equal reports whether two facts are identical, counters included.
func (t *Tunnel) Equal(o *Tunnel) bool {
	return t.SameShape(o) && t.Bytes == o.Bytes && t.Packets == o.Packets && t.LastUse == o.LastUse
}

// Local is the set of a node's own addresses: an SA whose destination is
// one of them is inbound and its source is the peer; outbound the other
// way round.
type Local map[netip.Addr]struct{}

// NewLocal returns the set of the given addresses.
func NewLocal(addrs ...netip.Addr) Local {
	l := make(Local, len(addrs))
	for _, a := range addrs {
		l[a.Unmap()] = struct{}{}
	}
	return l
}

// class says how a state counts.
type class uint8

const (
	classSA class = iota
	classUnattributed
	classIgnored
)

// classify returns a state's class and, for an SA, its peer and direction.
func (l Local) classify(sa *SA) (class, netip.Addr, string) {
	if sa.Larval || (sa.Proto != ProtoESP && sa.Proto != ProtoAH) {
		return classIgnored, netip.Addr{}, ""
	}
	_, srcLocal := l[sa.Src]
	_, dstLocal := l[sa.Dst]
	switch {
	case dstLocal && !srcLocal:
		return classSA, sa.Src, In
	case srcLocal && !dstLocal:
		return classSA, sa.Dst, Out
	}
	return classUnattributed, netip.Addr{}, ""
}

// policyPeers returns the peers a policy's tunnel-mode templates point at
// (the template's remote end: its destination for an outbound policy, its
// source for inbound and forward ones). Block policies, socket policies
// and transport-mode templates point at none.
func policyPeers(p *Policy) []netip.Addr {
	if p.Action != 0 || p.Dir > DirFwd {
		return nil
	}
	var peers []netip.Addr
	for _, t := range p.Tmpls {
		if t.Mode != ModeTunnel {
			continue
		}
		r := t.Src
		if p.Dir == DirOut {
			r = t.Dst
		}
		if r.IsValid() && !r.IsUnspecified() && !slices.Contains(peers, r) {
			peers = append(peers, r)
		}
	}
	return peers
}

// remoteSelector is a policy's remote side: the destination of outbound
// traffic, the source of inbound and forwarded traffic.
func remoteSelector(p *Policy) netip.Prefix {
	if p.Dir == DirOut {
		return p.Dst
	}
	return p.Src
}

// buildTunnel groups one peer's SAs and the policies pointing at it. It is
// the single place where a Tunnel is made, for Group and Mirror alike.
func buildTunnel(peer netip.Addr, sas []*SA, dirs []string, pols []*Policy) Tunnel {
	t := Tunnel{Peer: peer, SAs: len(sas), Subnets: []netip.Prefix{}, SPIs: make([]SPI, 0, len(sas))}
	for i, sa := range sas {
		t.Bytes += sa.Bytes
		t.Packets += sa.Packets
		t.LastUse = max(t.LastUse, int64(min(sa.UseTime, 1<<62)))
		t.SPIs = append(t.SPIs, SPI{SPI: sa.SPI, Reqid: sa.Reqid, Dir: dirs[i], Proto: sa.Proto.String()})
		if sa.Encap.Type != 0 {
			n := NATT{Port: sa.Encap.SrcPort, LocalPort: sa.Encap.DstPort, OriginalAddress: sa.Encap.OriginalAddress}
			if dirs[i] == Out {
				n.Port, n.LocalPort = sa.Encap.DstPort, sa.Encap.SrcPort
			}
			t.NATT = append(t.NATT, n)
		}
	}
	for _, p := range pols {
		if slices.Contains(policyPeers(p), peer) {
			if s := remoteSelector(p); s.IsValid() {
				t.Subnets = append(t.Subnets, s)
			}
		}
	}
	slices.SortFunc(t.SPIs, func(a, b SPI) int {
		return cmp.Or(cmp.Compare(a.Reqid, b.Reqid), cmp.Compare(a.Dir, b.Dir), cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.SPI, b.SPI))
	})
	slices.SortFunc(t.NATT, func(a, b NATT) int {
		return cmp.Or(cmp.Compare(a.Port, b.Port), cmp.Compare(a.LocalPort, b.LocalPort), a.OriginalAddress.Compare(b.OriginalAddress))
	})
	t.NATT = slices.Compact(t.NATT)
	slices.SortFunc(t.Subnets, affinity.ComparePrefix)
	t.Subnets = slices.Compact(t.Subnets)
	return t
}

// Group turns a node's states and policies into tunnel facts. Every state
// counts exactly once (as an SA of one tunnel, unattributed or ignored); a
// subnet belongs to a peer only through a policy whose template points at
// it; a peer without SAs is no tunnel (a trap policy alone is not one:
// every node of a farm may carry the same ones). The result does not
// depend on the order of the input.
func Group(local Local, states []SA, policies []Policy) Facts {
	type acc struct {
		sas  []*SA
		dirs []string
		pols []*Policy
	}
	var sum Summary
	peers := map[netip.Addr]*acc{}
	for i := range states {
		c, peer, dir := local.classify(&states[i])
		switch c {
		case classIgnored:
			sum.Ignored++
			continue
		case classUnattributed:
			sum.Unattributed++
			continue
		}
		a := peers[peer]
		if a == nil {
			a = &acc{}
			peers[peer] = a
		}
		a.sas = append(a.sas, &states[i])
		a.dirs = append(a.dirs, dir)
	}
	for i := range policies {
		for _, peer := range policyPeers(&policies[i]) {
			if a := peers[peer]; a != nil {
				a.pols = append(a.pols, &policies[i])
			}
		}
	}
	f := Facts{Tunnels: make([]Tunnel, 0, len(peers))}
	for peer, a := range peers {
		t := buildTunnel(peer, a.sas, a.dirs, a.pols)
		sum.SAs += t.SAs
		f.Tunnels = append(f.Tunnels, t)
	}
	slices.SortFunc(f.Tunnels, func(a, b Tunnel) int { return a.Peer.Compare(b.Peer) })
	sum.Tunnels = len(f.Tunnels)
	f.Summary = sum
	return f
}

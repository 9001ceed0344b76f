package ikelab

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// SPIs returns the SPIs of p's installed CHILD_SAs as the peer holds them
// (the ESP it sends carries one of them): a move is over for p when ESP
// with another SPI (a new SA's) reaches the new owner.
func (f *Farm) SPIs(p *Peer) []uint32 {
	f.T.Helper()
	sa, ok, err := p.PeerSA()
	if err != nil || !ok {
		f.T.Fatalf("%s: no established SA (%v): %s", p.Name, err, f.peerSAs(p))
	}
	return sa.InstalledSPIs()
}

// Seen says, per node, how many IKE and ESP packets from p arrived since t
// (and with which SPIs): where a peer's packets went after a move.
func (f *Farm) Seen(p *Peer, since time.Time) string {
	var parts []string
	for _, n := range f.Nodes {
		ike := len(n.From(p, since, IsIKE))
		spis := map[uint32]int{}
		for _, pk := range n.From(p, since, nil) {
			if spi, ok := ESPSPI(pk); ok {
				spis[spi]++
			}
		}
		var esp []string
		for _, spi := range slices.Sorted(func(yield func(uint32) bool) {
			for k := range spis {
				if !yield(k) {
					return
				}
			}
		}) {
			esp = append(esp, fmt.Sprintf("%08x×%d", spi, spis[spi]))
		}
		parts = append(parts, fmt.Sprintf("%s: %d IKE, ESP %v", n.Name, ike, esp))
	}
	return strings.Join(parts, "; ")
}

// Recovery is how a moved tunnel came back on its new owner, measured from
// the move (the command that made it).
type Recovery struct {
	Peer     *Peer
	From, To string
	// FirstESP: the first ESP packet of a new SA from the peer at the new owner.
	FirstESP time.Duration
	// Flowing: pings both ways answered again.
	Flowing time.Duration
}

func (r Recovery) String() string {
	return fmt.Sprintf("%s %s->%s: first new-SA ESP at the new owner after %.1fs, pings both ways after %.1fs",
		r.Peer.Name, r.From, r.To, r.FirstESP.Seconds(), r.Flowing.Seconds())
}

// WaitRecovered waits until p, whose tunnel moved from node from to node
// to at time at, sends ESP of a new SA (SPI not in old) to the new owner,
// holds that SA there, and its traffic flows both ways again.
func (f *Farm) WaitRecovered(p *Peer, from, to string, at time.Time, old []uint32, tr *Traffic, timeout time.Duration) (Recovery, error) {
	r := Recovery{Peer: p, From: from, To: to}
	deadline := at.Add(timeout)
	pk, ok := f.Node(to).WaitESP(p, at, old, time.Until(deadline))
	if !ok {
		return r, fmt.Errorf("%s: no ESP of a new SA at its new owner %s within %v of the move (old SPIs %08x); since the move: %s; peer's SAs: %s",
			p.Name, to, timeout, old, f.Seen(p, at), f.peerSAs(p))
	}
	r.FirstESP = pk.Time.Sub(at)
	for {
		holders, err := f.Holders(p)
		if err == nil && slices.ContainsFunc(holders[to], func(sa IKESA) bool { return !overlaps(sa.InstalledSPIs(), old) }) {
			break
		}
		if time.Now().After(deadline) {
			return r, fmt.Errorf("%s: new ESP reached %s but no new SA established there within %v: held on %v (%v)", p.Name, to, timeout, keys(holders), err)
		}
		time.Sleep(pollEvery)
	}
	if tr != nil {
		// Pings answered before the new SA's first packet went the old
		// way (in flight during the move): count from that packet on.
		t, ok := tr.WaitFlowing(p, pk.Time, time.Until(deadline))
		if !ok {
			return r, fmt.Errorf("%s: re-established on %s, but pings do not pass both ways within %v of the move; since the move: %s", p.Name, to, timeout, f.Seen(p, at))
		}
		r.Flowing = t.Sub(at)
	}
	return r, nil
}

func overlaps(a, b []uint32) bool {
	for _, x := range a {
		if slices.Contains(b, x) {
			return true
		}
	}
	return false
}

// OnlyAt checks that, since t, packets from p reached node to and no other
// node: the move took effect for every packet of the tunnel. It returns an
// error naming where they went otherwise.
func (f *Farm) OnlyAt(p *Peer, to string, since time.Time) error {
	var wrong []string
	for _, n := range f.Nodes {
		if n.Name == to {
			continue
		}
		if pk := n.From(p, since, nil); len(pk) > 0 {
			wrong = append(wrong, fmt.Sprintf("%s got %d (first: %s)", n.Name, len(pk), describe(pk[0])))
		}
	}
	if len(wrong) > 0 {
		return fmt.Errorf("%s: after the move to %s, packets still reached %s; since the move: %s", p.Name, to, strings.Join(wrong, ", "), f.Seen(p, since))
	}
	return nil
}

func describe(p netlab.Packet) string {
	switch {
	case IsIKE(p):
		return fmt.Sprintf("IKE %s:%d -> %s:%d", p.Src, p.SrcPort, p.Dst, p.DstPort)
	default:
		if spi, ok := ESPSPI(p); ok {
			return fmt.Sprintf("ESP spi %08x", spi)
		}
	}
	return p.String()
}

// describeFull is describe with the packet's addresses and ports.
func describeFull(p netlab.Packet) string {
	if spi, ok := ESPSPI(p); ok && !IsIKE(p) {
		return fmt.Sprintf("%s ESP %s:%d -> %s:%d spi %08x", p.Iface, p.Src, p.SrcPort, p.Dst, p.DstPort, spi)
	}
	if IsIKE(p) {
		return fmt.Sprintf("%s IKE %s:%d -> %s:%d", p.Iface, p.Src, p.SrcPort, p.Dst, p.DstPort)
	}
	return p.String()
}

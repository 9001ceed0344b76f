package ikelab

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// ESPSPI returns the SPI of an ESP packet: native (IP protocol 50) or
// encapsulated in UDP 4500 (NAT-T; IKE on 4500 starts with four zero
// bytes, keepalives are one byte).
func ESPSPI(p netlab.Packet) (uint32, bool) {
	switch {
	case p.Proto == netlab.ProtoESP:
		return p.SPI, true
	case p.Proto == netlab.ProtoUDP && (p.DstPort == 4500 || p.SrcPort == 4500) && len(p.Tag) >= 8:
		spi := binary.BigEndian.Uint32([]byte(p.Tag[:4]))
		return spi, spi != 0
	}
	return 0, false
}

// IsIKE reports whether p is an IKE message: UDP to port 500, or to 4500
// with the non-ESP marker.
func IsIKE(p netlab.Packet) bool {
	if p.Proto != netlab.ProtoUDP {
		return false
	}
	if p.DstPort == 500 {
		return true
	}
	return p.DstPort == 4500 && len(p.Tag) >= 8 && binary.BigEndian.Uint32([]byte(p.Tag[:4])) == 0
}

// From returns the packets from p that n captured at or after since and
// that match (nil: all).
func (n *Node) From(p *Peer, since time.Time, match func(netlab.Packet) bool) []netlab.Packet {
	var out []netlab.Packet
	for _, pk := range n.Cap.Packets() {
		if pk.Src == p.Addr && !pk.Time.Before(since) && (match == nil || match(pk)) {
			out = append(out, pk)
		}
	}
	return out
}

// WaitESP waits up to timeout for an ESP packet from p at n, captured at or
// after since, whose SPI is not in old (a new SA's), and returns it.
func (n *Node) WaitESP(p *Peer, since time.Time, old []uint32, timeout time.Duration) (netlab.Packet, bool) {
	return n.Cap.Wait(timeout, func(pk netlab.Packet) bool {
		spi, ok := ESPSPI(pk)
		return ok && pk.Src == p.Addr && !pk.Time.Before(since) && !slices.Contains(old, spi)
	})
}

var pingID atomic.Uint32

// pinger sends ICMP echo requests from src to dst inside a namespace and
// records the replies.
type pinger struct {
	conn    *icmp.PacketConn
	src     netip.Addr
	dst     netip.Addr
	id      int
	mu      sync.Mutex
	seq     int
	sent    map[int]time.Time
	replies []time.Time // when each reply arrived
	done    chan struct{}
}

func newPinger(ns *netlab.NS, src, dst netip.Addr) (*pinger, error) {
	var c *icmp.PacketConn
	err := ns.Do(func() (err error) {
		// A raw ICMP socket bound to src: the replies to src reach it.
		c, err = icmp.ListenPacket("ip4:icmp", src.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("ping %s -> %s in %s: %w", src, dst, ns.Name, err)
	}
	p := &pinger{conn: c, src: src, dst: dst, id: int(pingID.Add(1) & 0xffff), sent: map[int]time.Time{}, done: make(chan struct{})}
	go p.read()
	return p, nil
}

func (p *pinger) read() {
	defer close(p.done)
	buf := make([]byte, 1500)
	for {
		n, from, err := p.conn.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
			continue
		}
		e, ok := m.Body.(*icmp.Echo)
		if !ok || e.ID != p.id || from.String() != p.dst.String() {
			continue
		}
		p.mu.Lock()
		if _, ok := p.sent[e.Seq]; ok {
			delete(p.sent, e.Seq)
			p.replies = append(p.replies, time.Now())
		}
		p.mu.Unlock()
	}
}

func (p *pinger) send() error {
	p.mu.Lock()
	p.seq++
	seq := p.seq & 0xffff
	p.sent[seq] = time.Now()
	p.mu.Unlock()
	b, err := (&icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: p.id, Seq: seq, Data: []byte("ikelab")}}).Marshal(nil)
	if err != nil {
		return err
	}
	_, err = p.conn.WriteTo(b, &net.IPAddr{IP: p.dst.AsSlice()})
	return err
}

// stats returns the requests sent and the replies received so far.
func (p *pinger) stats() (sent, received int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seq, len(p.replies)
}

// firstReplyAfter returns the first reply that arrived after t.
func (p *pinger) firstReplyAfter(t time.Time) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.replies {
		if r.After(t) {
			return r, true
		}
	}
	return time.Time{}, false
}

func (p *pinger) close() {
	p.conn.Close()
	<-p.done
}

// Ping checks both directions through p's tunnel: from the peer's subnet
// to the target behind the director, and from the target to the peer's
// subnet. It sends an echo every 200 ms until each direction had a reply,
// or fails after timeout.
func (f *Farm) Ping(p *Peer, timeout time.Duration) error {
	out, err := newPinger(p.NS, p.Host(), f.Target)
	if err != nil {
		return err
	}
	defer out.close()
	back, err := newPinger(f.Top.Target.NS, f.Target, p.Host())
	if err != nil {
		return err
	}
	defer back.close()
	deadline := time.Now().Add(timeout)
	for {
		_, okOut := out.firstReplyAfter(time.Time{})
		_, okBack := back.firstReplyAfter(time.Time{})
		if okOut && okBack {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: ping %s -> %s answered: %v; %s -> %s answered: %v (within %v)", p.Name, p.Host(), f.Target, okOut, f.Target, p.Host(), okBack, timeout)
		}
		if !okOut {
			out.send()
		}
		if !okBack {
			back.send()
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Traffic is continuous ICMP echo both ways through the tunnels of some
// peers: what an outage is measured with.
type Traffic struct {
	out, back map[*Peer]*pinger
	stop      chan struct{}
	wg        sync.WaitGroup
}

// StartTraffic pings both ways through each peer's tunnel every interval
// until Stop.
func (f *Farm) StartTraffic(interval time.Duration, ps ...*Peer) *Traffic {
	f.T.Helper()
	tr := &Traffic{out: map[*Peer]*pinger{}, back: map[*Peer]*pinger{}, stop: make(chan struct{})}
	for _, p := range ps {
		o, err := newPinger(p.NS, p.Host(), f.Target)
		if err != nil {
			f.T.Fatal(err)
		}
		b, err := newPinger(f.Top.Target.NS, f.Target, p.Host())
		if err != nil {
			o.close()
			f.T.Fatal(err)
		}
		tr.out[p], tr.back[p] = o, b
	}
	tr.wg.Add(1)
	go func() {
		defer tr.wg.Done()
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			for _, p := range ps {
				tr.out[p].send()
				tr.back[p].send()
			}
			select {
			case <-tr.stop:
				return
			case <-tick.C:
			}
		}
	}()
	f.T.Cleanup(tr.Stop)
	return tr
}

// Stop ends the traffic; it is safe to call more than once.
func (tr *Traffic) Stop() {
	select {
	case <-tr.stop:
		return
	default:
	}
	close(tr.stop)
	tr.wg.Wait()
	for _, p := range tr.out {
		p.close()
	}
	for _, p := range tr.back {
		p.close()
	}
}

// Stats returns the echo requests sent and answered for p, out (from the
// peer's subnet) and back (from the target).
func (tr *Traffic) Stats(p *Peer) (sentOut, gotOut, sentBack, gotBack int) {
	sentOut, gotOut = tr.out[p].stats()
	sentBack, gotBack = tr.back[p].stats()
	return
}

// FlowingSince returns when both directions of p's traffic had been
// answered again after t (the later of the two first replies).
func (tr *Traffic) FlowingSince(p *Peer, t time.Time) (time.Time, bool) {
	a, ok1 := tr.out[p].firstReplyAfter(t)
	b, ok2 := tr.back[p].firstReplyAfter(t)
	if !ok1 || !ok2 {
		return time.Time{}, false
	}
	if b.After(a) {
		return b, true
	}
	return a, true
}

// WaitFlowing waits up to timeout for FlowingSince(p, t).
func (tr *Traffic) WaitFlowing(p *Peer, t time.Time, timeout time.Duration) (time.Time, bool) {
	for deadline := time.Now().Add(timeout); ; time.Sleep(50 * time.Millisecond) {
		if at, ok := tr.FlowingSince(p, t); ok {
			return at, true
		}
		if time.Now().After(deadline) {
			return time.Time{}, false
		}
	}
}

package replication

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tunneldirector/tunneldirector/internal/clock"
)

// DefaultMTU is the UDP payload a datagram may fill unless configured:
// below a 1500-byte Ethernet MTU with room for IP, UDP and a VLAN or
// tunnel header on the sync link.
const DefaultMTU = 1400

// Transport carries datagrams between the two directors. Send must not
// block for long; Recv delivers whole datagrams, each owned by the receiver.
type Transport interface {
	Send(b []byte) error
	Recv() <-chan []byte
	// MTU is the largest datagram Send accepts.
	MTU() int
	Close() error
}

// ---- in-memory fake ----

// FakeConfig sets the faults a FakeNetwork injects, each a probability
// per datagram, drawn from one seeded generator so that a test replays the
// same faults every run.
type FakeConfig struct {
	Seed      uint64
	Drop      float64
	Duplicate float64
	// Reorder delays a datagram by a random extra of up to MaxDelay, so
	// later ones overtake it.
	Reorder float64
	// Delay is added to every datagram; MaxDelay bounds the reorder extra.
	Delay, MaxDelay time.Duration
	// MTU of both endpoints (0: DefaultMTU).
	MTU int
}

// FakeNetwork joins two FakeEndpoints through a lossy, delaying, reordering
// medium driven by a Clock. Datagrams become receivable when Deliver is
// called at or after their due time; a test steps the clock and calls
// Deliver, so everything happens in one goroutine in a fixed order.
type FakeNetwork struct {
	mu      sync.Mutex
	cfg     FakeConfig
	clock   clock.Clock
	rng     *rand.Rand
	ep      [2]*FakeEndpoint
	flight  []inflight
	n       uint64
	partred bool
	tap     func(from int, b []byte)
	// Stats counts what the medium did.
	Stats FakeStats
}

// FakeStats counts the faults a FakeNetwork injected.
type FakeStats struct{ Sent, Dropped, Duplicated, Reordered, Delivered int }

type inflight struct {
	due time.Time
	n   uint64 // tie-break: send order
	to  int
	b   []byte
}

// FakeEndpoint is one side of a FakeNetwork.
type FakeEndpoint struct {
	net    *FakeNetwork
	side   int
	ch     chan []byte
	closed bool
}

// NewFakeNetwork returns a medium and its two endpoints.
func NewFakeNetwork(cfg FakeConfig, clk clock.Clock) (*FakeNetwork, *FakeEndpoint, *FakeEndpoint) {
	if cfg.MTU == 0 {
		cfg.MTU = DefaultMTU
	}
	n := &FakeNetwork{cfg: cfg, clock: clk, rng: rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15))}
	for i := range n.ep {
		n.ep[i] = &FakeEndpoint{net: n, side: i, ch: make(chan []byte, 1<<16)}
	}
	return n, n.ep[0], n.ep[1]
}

// SetFaults changes the fault probabilities from now on.
func (n *FakeNetwork) SetFaults(drop, dup, reorder float64) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.cfg.Drop, n.cfg.Duplicate, n.cfg.Reorder = drop, dup, reorder
}

// Partition drops everything while on: the link is cut.
func (n *FakeNetwork) Partition(on bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.partred = on
}

// Inject puts a raw datagram on the medium towards side (0 or 1), as an
// attacker on the link would.
func (n *FakeNetwork) Inject(side int, b []byte) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.n++
	n.flight = append(n.flight, inflight{due: n.clock.Now(), n: n.n, to: side, b: append([]byte(nil), b...)})
}

// SetTap makes fn see every datagram sent, before faults apply, as a
// capture on the link would.
func (n *FakeNetwork) SetTap(fn func(from int, b []byte)) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.tap = fn
}

func (n *FakeNetwork) send(from int, b []byte) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.Stats.Sent++
	if n.tap != nil {
		n.tap(from, append([]byte(nil), b...))
	}
	if n.partred || n.rng.Float64() < n.cfg.Drop {
		n.Stats.Dropped++
		return
	}
	copies := 1
	if n.rng.Float64() < n.cfg.Duplicate {
		copies = 2
		n.Stats.Duplicated++
	}
	for range copies {
		due := n.clock.Now().Add(n.cfg.Delay)
		if n.cfg.MaxDelay > 0 && n.rng.Float64() < n.cfg.Reorder {
			due = due.Add(time.Duration(n.rng.Int64N(int64(n.cfg.MaxDelay))))
			n.Stats.Reordered++
		}
		n.n++
		n.flight = append(n.flight, inflight{due: due, n: n.n, to: 1 - from, b: append([]byte(nil), b...)})
	}
}

// Deliver hands every datagram due by the clock's now to its endpoint and
// reports how many it delivered.
func (n *FakeNetwork) Deliver() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	now := n.clock.Now()
	sort.SliceStable(n.flight, func(i, j int) bool {
		if !n.flight[i].due.Equal(n.flight[j].due) {
			return n.flight[i].due.Before(n.flight[j].due)
		}
		return n.flight[i].n < n.flight[j].n
	})
	k := 0
	for k < len(n.flight) && !n.flight[k].due.After(now) {
		f := n.flight[k]
		ep := n.ep[f.to]
		if !ep.closed {
			select {
			case ep.ch <- f.b:
				n.Stats.Delivered++
			default:
				n.Stats.Dropped++ // receive buffer full, as a socket would
			}
		}
		k++
	}
	n.flight = append(n.flight[:0], n.flight[k:]...)
	return k
}

// Settle delivers what is due and hands every datagram waiting at
// endpoint i to handle(i, datagram), side 0 first, and repeats while
// datagrams moved, at most rounds times: replies due at once go out in
// the same step. It is the single-goroutine driver of tests and the
// simulator; handle runs without the medium's lock, so it may send.
func (n *FakeNetwork) Settle(rounds int, handle func(side int, b []byte)) {
	for range rounds {
		n.Deliver()
		moved := false
		for i, ep := range n.ep {
			for done := false; !done; {
				select {
				case b := <-ep.ch:
					handle(i, b)
					moved = true
				default:
					done = true
				}
			}
		}
		if !moved {
			return
		}
	}
}

// Pending reports how many datagrams are in flight.
func (n *FakeNetwork) Pending() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.flight)
}

// Send puts a datagram on the medium.
func (e *FakeEndpoint) Send(b []byte) error {
	if len(b) > e.net.cfg.MTU {
		return fmt.Errorf("send %d-byte datagram on fake link: above MTU %d", len(b), e.net.cfg.MTU)
	}
	e.net.send(e.side, b)
	return nil
}

// Recv returns the endpoint's receive queue.
func (e *FakeEndpoint) Recv() <-chan []byte { return e.ch }

// MTU returns the medium's MTU.
func (e *FakeEndpoint) MTU() int { return e.net.cfg.MTU }

// Close stops delivery to this endpoint.
func (e *FakeEndpoint) Close() error {
	e.net.mu.Lock()
	defer e.net.mu.Unlock()
	e.closed = true
	return nil
}

// ---- UDP ----

// UDPConfig configures a UDP transport on the sync link.
type UDPConfig struct {
	// Local is the address to bind, for example 192.0.2.1:7788.
	Local netip.AddrPort
	// Peer is the other director's address (unicast), or the multicast
	// group to send to when Group is set.
	Peer netip.AddrPort
	// Group, when true, joins Peer's multicast group on Interface and
	// sends to it; datagrams from this director itself are ignored by
	// sender id.
	Group bool
	// Interface names the sync link (needed for multicast; optional
	// otherwise).
	Interface string
	// MTU is the UDP payload size of a datagram (0: DefaultMTU).
	MTU int
	// ReadBuffer sizes the socket's receive buffer (0: 4 MiB), so a
	// snapshot burst does not overflow it.
	ReadBuffer int
}

// UDP is a Transport over a UDP socket.
type UDP struct {
	conn *net.UDPConn
	peer atomic.Pointer[net.UDPAddr]
	mtu  int
	ch   chan []byte
	done chan struct{}
	once sync.Once
}

// ListenUDP opens the sync link socket and starts reading from it.
func ListenUDP(cfg UDPConfig) (*UDP, error) {
	if !cfg.Peer.IsValid() {
		return nil, errors.New("listen udp: no peer address")
	}
	if cfg.MTU != 0 {
		if err := CheckMTU(cfg.MTU); err != nil {
			return nil, fmt.Errorf("listen udp %s: %w", cfg.Local, err)
		}
	}
	var (
		conn *net.UDPConn
		err  error
	)
	if cfg.Group {
		var ifi *net.Interface
		if cfg.Interface != "" {
			if ifi, err = net.InterfaceByName(cfg.Interface); err != nil {
				return nil, fmt.Errorf("listen udp group %s: interface %s: %w", cfg.Peer, cfg.Interface, err)
			}
		}
		conn, err = net.ListenMulticastUDP("udp", ifi, net.UDPAddrFromAddrPort(cfg.Peer))
	} else {
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(cfg.Local))
	}
	if err != nil {
		return nil, fmt.Errorf("listen udp %s (peer %s): %w", cfg.Local, cfg.Peer, err)
	}
	rb := cfg.ReadBuffer
	if rb == 0 {
		rb = 4 << 20
	}
	setBuffers(conn, rb)
	u := &UDP{conn: conn, mtu: cfg.MTU, ch: make(chan []byte, 1<<14), done: make(chan struct{})}
	if u.mtu == 0 {
		u.mtu = DefaultMTU
	}
	u.peer.Store(net.UDPAddrFromAddrPort(cfg.Peer))
	go u.read()
	return u, nil
}

// setBuffers sizes the socket's buffers. SO_RCVBUFFORCE (root, as the
// daemon runs) is not capped by net.core.rmem_max (212,992 bytes by
// default): a burst of conntrack datagrams or a snapshot's chunks would
// overflow that and cost NACK rounds. Without the privilege the plain
// option is the best effort.
func setBuffers(conn *net.UDPConn, size int) {
	raw, err := conn.SyscallConn()
	if err == nil {
		raw.Control(func(fd uintptr) {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size) != nil {
				_ = conn.SetReadBuffer(size)
			}
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, size) != nil {
				_ = conn.SetWriteBuffer(size)
			}
		})
	}
}

// SetPeer changes the address datagrams go to (for example once the
// peer's ephemeral port is known).
func (u *UDP) SetPeer(p netip.AddrPort) { u.peer.Store(net.UDPAddrFromAddrPort(p)) }

// LocalAddr returns the bound address.
func (u *UDP) LocalAddr() netip.AddrPort { return u.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

func (u *UDP) read() {
	defer close(u.ch)
	buf := make([]byte, 65536)
	for {
		n, _, err := u.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			select {
			case <-u.done:
				return
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		b := append([]byte(nil), buf[:n]...)
		select {
		case u.ch <- b:
		case <-u.done:
			return
		}
	}
}

// Send writes a datagram to the peer (or group).
func (u *UDP) Send(b []byte) error {
	peer := u.peer.Load()
	if len(b) > u.mtu {
		return fmt.Errorf("send %d-byte datagram to %s: above MTU %d", len(b), peer, u.mtu)
	}
	if _, err := u.conn.WriteToUDP(b, peer); err != nil {
		return fmt.Errorf("send datagram to %s: %w", peer, err)
	}
	return nil
}

// Recv returns received datagrams; it is closed when the socket closes.
func (u *UDP) Recv() <-chan []byte { return u.ch }

// MTU returns the configured datagram size.
func (u *UDP) MTU() int { return u.mtu }

// Close closes the socket.
func (u *UDP) Close() error {
	var err error
	u.once.Do(func() { close(u.done); err = u.conn.Close() })
	return err
}

package netlab

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// IP protocol numbers used by the helpers.
const (
	ProtoICMP   = 1
	ProtoTCP    = 6
	ProtoUDP    = 17
	ProtoESP    = 50
	ProtoAH     = 51
	ProtoICMPv6 = 58
)

// SendUDP sends one UDP datagram from src (address and source port; the
// address must be local to the namespace) to dst.
func (n *NS) SendUDP(src, dst netip.AddrPort, payload []byte) error {
	var c *net.UDPConn
	err := n.Do(func() (err error) {
		c, err = net.ListenUDP(udpNet(dst.Addr()), net.UDPAddrFromAddrPort(src))
		return err
	})
	if err != nil {
		return fmt.Errorf("netns %s: udp bind %s: %w", n.Name, src, err)
	}
	defer c.Close()
	if _, err := c.WriteToUDPAddrPort(payload, dst); err != nil {
		return fmt.Errorf("netns %s: udp send %s -> %s: %w", n.Name, src, dst, err)
	}
	return nil
}

// UDPSocket opens a UDP socket bound to src in the namespace, for sending
// many datagrams or receiving. The receive buffer is enlarged (as root,
// past rmem_max) so bursts in tests are not lost in the socket.
func (n *NS) UDPSocket(src netip.AddrPort) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := n.Do(func() (err error) {
		c, err = net.ListenUDP(udpNet(src.Addr()), net.UDPAddrFromAddrPort(src))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netns %s: udp bind %s: %w", n.Name, src, err)
	}
	if rc, err := c.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
		})
	}
	return c, nil
}

func udpNet(a netip.Addr) string {
	if a.Is4() {
		return "udp4"
	}
	return "udp6"
}

// ESPPayload builds an ESP header (SPI, sequence number) followed by tag,
// which is all a capture needs to tell packets apart.
func ESPPayload(spi, seq uint32, tag string) []byte {
	b := make([]byte, 8+len(tag))
	binary.BigEndian.PutUint32(b[0:4], spi)
	binary.BigEndian.PutUint32(b[4:8], seq)
	copy(b[8:], tag)
	return b
}

// SendESP sends one raw IP packet of protocol 50 (ESP) from src to dst whose
// payload starts with spi and seq and carries tag. It needs no esp4/esp6
// module: the kernel only builds the IP header.
func (n *NS) SendESP(src, dst netip.Addr, spi, seq uint32, tag string) error {
	return n.SendRaw(ProtoESP, src, dst, ESPPayload(spi, seq, tag))
}

// SendRaw sends payload as a raw IP packet of protocol proto from src to dst.
func (n *NS) SendRaw(proto int, src, dst netip.Addr, payload []byte) error {
	network := fmt.Sprintf("ip4:%d", proto)
	if dst.Is6() {
		network = fmt.Sprintf("ip6:%d", proto)
	}
	var c *net.IPConn
	err := n.Do(func() (err error) {
		c, err = net.ListenIP(network, &net.IPAddr{IP: src.AsSlice()})
		return err
	})
	if err != nil {
		return fmt.Errorf("netns %s: raw socket %s bound to %s: %w", n.Name, network, src, err)
	}
	defer c.Close()
	if _, err := c.WriteToIP(payload, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return fmt.Errorf("netns %s: raw send proto %d %s -> %s: %w", n.Name, proto, src, dst, err)
	}
	return nil
}

// DialTCP connects from src (port 0 picks one) to dst inside the namespace.
func (n *NS) DialTCP(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
	network := "tcp4"
	if dst.Addr().Is6() {
		network = "tcp6"
	}
	var c net.Conn
	// The socket is created (and bound to the namespace) inside Do, and the
	// connect runs there too, on the locked thread.
	err := n.Do(func() (err error) {
		c, err = d.DialContext(ctx, network, dst.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netns %s: tcp connect %s -> %s: %w", n.Name, src, dst, err)
	}
	return c, nil
}

// ListenTCP listens on addr inside the namespace.
func (n *NS) ListenTCP(addr netip.AddrPort) (*net.TCPListener, error) {
	var l *net.TCPListener
	err := n.Do(func() (err error) {
		network := "tcp4"
		if addr.Addr().Is6() {
			network = "tcp6"
		}
		l, err = net.ListenTCP(network, net.TCPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netns %s: tcp listen %s: %w", n.Name, addr, err)
	}
	return l, nil
}

// Packet is one IP packet seen by a Capture.
type Packet struct {
	Time     time.Time
	Iface    string
	Proto    uint8
	Src      netip.Addr
	Dst      netip.Addr
	SrcPort  uint16 // UDP and TCP
	DstPort  uint16 // UDP and TCP
	SPI      uint32 // ESP
	Seq      uint32 // ESP
	TCPFlags uint8
	// Tag is the payload after the UDP header or the 8-byte ESP header,
	// cut at 64 bytes: the helpers send a test-chosen tag there.
	Tag string
}

// String formats the packet for test logs.
func (p Packet) String() string {
	switch p.Proto {
	case ProtoESP:
		return fmt.Sprintf("%s esp %s -> %s spi=%#x seq=%d tag=%q", p.Iface, p.Src, p.Dst, p.SPI, p.Seq, p.Tag)
	case ProtoUDP, ProtoTCP:
		return fmt.Sprintf("%s proto=%d %s -> %s tag=%q", p.Iface, p.Proto,
			netip.AddrPortFrom(p.Src, p.SrcPort), netip.AddrPortFrom(p.Dst, p.DstPort), p.Tag)
	}
	return fmt.Sprintf("%s proto=%d %s -> %s", p.Iface, p.Proto, p.Src, p.Dst)
}

// Capture records the IP packets that arrive on a namespace's interfaces
// through an AF_PACKET socket, so it sees packets whether or not anything
// listens for them (and before the kernel answers with ICMP errors).
// Packets the namespace itself sends are not recorded.
type Capture struct {
	ns   *NS
	f    *os.File
	mu   sync.Mutex
	cond *sync.Cond
	pkts []Packet
	err  error
	done chan struct{}
}

// Capture starts capturing on ifname, or on all interfaces when ifname is "".
func (n *NS) Capture(ifname string) (*Capture, error) {
	ifindex := 0
	if ifname != "" {
		l, err := n.Link(ifname)
		if err != nil {
			return nil, err
		}
		ifindex = l.Attrs().Index
	}
	var fd int
	err := n.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netns %s: capture %q: AF_PACKET socket: %w", n.Name, ifname, err)
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifindex}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netns %s: capture %q: bind: %w", n.Name, ifname, err)
	}
	c := &Capture{ns: n, f: os.NewFile(uintptr(fd), "packet:"+n.Name), done: make(chan struct{})}
	c.cond = sync.NewCond(&c.mu)
	go c.loop()
	return c, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *Capture) loop() {
	defer close(c.done)
	rc, err := c.f.SyscallConn()
	if err != nil {
		c.finish(err)
		return
	}
	names := map[int]string{}
	buf := make([]byte, 65536)
	for {
		var n int
		var from unix.Sockaddr
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, 0)
			return rerr != unix.EAGAIN
		})
		if err != nil {
			c.finish(err)
			return
		}
		if rerr != nil {
			if errors.Is(rerr, syscall.EINTR) {
				continue
			}
			c.finish(rerr)
			return
		}
		ll, ok := from.(*unix.SockaddrLinklayer)
		if !ok || ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		data := buf[:n]
		if ll.Hatype == unix.ARPHRD_ETHER || ll.Hatype == unix.ARPHRD_LOOPBACK {
			if len(data) < 14 {
				continue
			}
			data = data[14:]
		}
		p, ok := parseIP(data)
		if !ok {
			continue
		}
		name, ok := names[ll.Ifindex]
		if !ok {
			name = c.ns.ifName(ll.Ifindex)
			names[ll.Ifindex] = name
		}
		p.Iface = name
		p.Time = time.Now()
		c.mu.Lock()
		c.pkts = append(c.pkts, p)
		c.cond.Broadcast()
		c.mu.Unlock()
	}
}

func (c *Capture) finish(err error) {
	c.mu.Lock()
	if !errors.Is(err, os.ErrClosed) {
		c.err = err
	}
	c.cond.Broadcast()
	c.mu.Unlock()
}

// parseIP decodes an IPv4 or IPv6 packet (no extension headers) far enough
// to fill a Packet.
func parseIP(b []byte) (Packet, bool) {
	var p Packet
	if len(b) < 1 {
		return p, false
	}
	var l4 []byte
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return p, false
		}
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 || len(b) < ihl {
			return p, false
		}
		p.Proto = b[9]
		p.Src = netip.AddrFrom4([4]byte(b[12:16]))
		p.Dst = netip.AddrFrom4([4]byte(b[16:20]))
		total := int(binary.BigEndian.Uint16(b[2:4]))
		if total > len(b) || total < ihl {
			total = len(b)
		}
		l4 = b[ihl:total]
	case 6:
		if len(b) < 40 {
			return p, false
		}
		p.Proto = b[6]
		p.Src = netip.AddrFrom16([16]byte(b[8:24]))
		p.Dst = netip.AddrFrom16([16]byte(b[24:40]))
		plen := int(binary.BigEndian.Uint16(b[4:6]))
		end := 40 + plen
		if end > len(b) {
			end = len(b)
		}
		l4 = b[40:end]
	default:
		return p, false
	}
	tag := func(x []byte) string {
		if len(x) > 64 {
			x = x[:64]
		}
		return string(x)
	}
	switch p.Proto {
	case ProtoUDP:
		if len(l4) >= 8 {
			p.SrcPort = binary.BigEndian.Uint16(l4[0:2])
			p.DstPort = binary.BigEndian.Uint16(l4[2:4])
			p.Tag = tag(l4[8:])
		}
	case ProtoTCP:
		if len(l4) >= 20 {
			p.SrcPort = binary.BigEndian.Uint16(l4[0:2])
			p.DstPort = binary.BigEndian.Uint16(l4[2:4])
			p.TCPFlags = l4[13]
			off := int(l4[12]>>4) * 4
			if off >= 20 && off <= len(l4) {
				p.Tag = tag(l4[off:])
			}
		}
	case ProtoESP:
		if len(l4) >= 8 {
			p.SPI = binary.BigEndian.Uint32(l4[0:4])
			p.Seq = binary.BigEndian.Uint32(l4[4:8])
			p.Tag = tag(l4[8:])
		}
	}
	return p, true
}

// Packets returns a copy of what was captured so far.
func (c *Capture) Packets() []Packet {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Packet(nil), c.pkts...)
}

// Count returns how many captured packets match.
func (c *Capture) Count(match func(Packet) bool) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := 0
	for _, p := range c.pkts {
		if match(p) {
			k++
		}
	}
	return k
}

// Wait waits up to timeout for a packet that matches and returns the first
// one. It returns false on timeout or when the capture failed (see Err).
func (c *Capture) Wait(timeout time.Duration, match func(Packet) bool) (Packet, bool) {
	deadline := time.Now().Add(timeout)
	timer := time.AfterFunc(timeout, func() {
		c.mu.Lock()
		c.cond.Broadcast()
		c.mu.Unlock()
	})
	defer timer.Stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	seen := 0
	for {
		for ; seen < len(c.pkts); seen++ {
			if match(c.pkts[seen]) {
				return c.pkts[seen], true
			}
		}
		if c.err != nil || !time.Now().Before(deadline) {
			return Packet{}, false
		}
		c.cond.Wait()
	}
}

// Err reports why the capture stopped early, if it did.
func (c *Capture) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close stops the capture.
func (c *Capture) Close() error {
	err := c.f.Close()
	<-c.done
	return err
}

// Tagged matches packets that carry tag.
func Tagged(tag string) func(Packet) bool {
	return func(p Packet) bool { return p.Tag == tag }
}

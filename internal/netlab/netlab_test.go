package netlab_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

type probe struct {
	name  string
	proto uint8
	port  uint16
}

var probes = []probe{{"udp500", netlab.ProtoUDP, 500}, {"udp4500", netlab.ProtoUDP, 4500}, {"esp", netlab.ProtoESP, 0}}

// send sends one probe packet from peer to the VIP with a unique tag.
func send(t *testing.T, peer *netlab.Host, vip netip.Addr, v6 bool, pr probe, tag string) {
	t.Helper()
	src := peer.If(netlab.IfOutside).Addr(v6)
	var err error
	if pr.proto == netlab.ProtoESP {
		err = peer.SendESP(src, vip, 0xc0ffee01, 1, tag)
	} else {
		// A source port other than 500 on purpose: steering must not
		// depend on the peer's IKE source port.
		err = peer.SendUDP(netip.AddrPortFrom(src, 40123), netip.AddrPortFrom(vip, pr.port), []byte(tag))
	}
	if err != nil {
		t.Fatal(err)
	}
}

func captureAll(t *testing.T, hosts []*netlab.Host) []*netlab.Capture {
	t.Helper()
	var cs []*netlab.Capture
	for _, h := range hosts {
		c, err := h.Capture("")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		cs = append(cs, c)
	}
	return cs
}

// TestSteeringByPeerAddress proves with real packets that the map
// peer -> mark plus fwmark policy routes deliver UDP 500, UDP 4500 and ESP
// from each peer to its owner node only, over IPv4 and IPv6, both with the
// VIP absent from the director and with the VIP local on the director (local
// rule moved behind the fwmark rules). A control case shows that without
// moving the local rule the director swallows the packets.
func TestSteeringByPeerAddress(t *testing.T) {
	for _, mode := range []struct {
		name      string
		vipLocal  bool
		moveLocal bool
		delivered bool
	}{
		{"vip-remote", false, false, true},
		{"vip-local-rule-moved", true, true, true},
		{"vip-local-control-not-moved", true, false, false},
	} {
		t.Run(mode.name, func(t *testing.T) {
			top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 2, Directors: 2, Nodes: 3, VIPOnDirectors: mode.vipLocal})
			dir := top.Directors[0]
			// Not the identity, so a wrong lookup shows.
			owners := []int{2, 0}
			owner := map[netip.Addr]int{}
			for i, p := range top.Peers {
				owner[p.If(netlab.IfOutside).Addr4] = owners[i]
				owner[p.If(netlab.IfOutside).Addr6] = owners[i]
			}
			installSteering(t, top, dir, owner)
			if mode.moveLocal {
				if err := dir.MoveLocalRule(500); err != nil {
					t.Fatal(err)
				}
			}
			caps := captureAll(t, top.Nodes)
			dcap := captureAll(t, []*netlab.Host{dir})[0]
			for _, v6 := range []bool{false, true} {
				vip := top.VIP4
				if v6 {
					vip = top.VIP6
				}
				for _, pr := range probes {
					for pi, peer := range top.Peers {
						tag := fmt.Sprintf("%s/%s/v6=%v/%s", mode.name, pr.name, v6, peer.Name)
						send(t, peer, vip, v6, pr, tag)
						match := func(p netlab.Packet) bool {
							return p.Tag == tag && p.Proto == pr.proto && p.Dst == vip &&
								p.Src == peer.If(netlab.IfOutside).Addr(v6) && (pr.proto != netlab.ProtoUDP || p.DstPort == pr.port)
						}
						want := owners[pi]
						if mode.delivered {
							p, ok := caps[want].Wait(2*time.Second, match)
							if !ok {
								t.Fatalf("%s: not captured at owner node%d; director saw %d matching", tag, want, dcap.Count(match))
							}
							if p.Proto == netlab.ProtoESP && p.SPI != 0xc0ffee01 {
								t.Errorf("%s: SPI %#x, want 0xc0ffee01", tag, p.SPI)
							}
						} else if _, ok := dcap.Wait(2*time.Second, match); !ok {
							t.Fatalf("%s: control: not even seen at the director", tag)
						}
						// Give a stray copy time to arrive elsewhere.
						time.Sleep(20 * time.Millisecond)
						for ni, c := range caps {
							if (ni != want || !mode.delivered) && c.Count(match) != 0 {
								t.Errorf("%s: captured at node%d (owner node%d, delivered=%v)", tag, ni, want, mode.delivered)
							}
						}
					}
				}
			}
		})
	}
}

// TestLossInjection proves that SetLoss drops about the configured share.
func TestLossInjection(t *testing.T) {
	l := netlab.New(t)
	a, b := l.Pair(t, "a", "b", "eth0")
	for i, n := range []*netlab.NS{a, b} {
		if err := n.AddAddr("eth0", netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(1 + i)}), 24)); err != nil {
			t.Fatal(err)
		}
	}
	dst := netip.MustParseAddrPort("198.51.100.2:4500")
	rx, err := b.UDPSocket(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	tx, err := a.UDPSocket(netip.MustParseAddrPort("198.51.100.1:4500"))
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	// First a datagram must get through: until the pair's link is up and
	// the neighbour resolved, datagrams are dropped or held, and in the
	// emulated VM that can outlast a whole burst (0 of 1000 arrived).
	warm := false
	buf := make([]byte, 64)
	for i := 0; i < 50 && !warm; i++ {
		if _, err := tx.WriteToUDPAddrPort([]byte("warm"), dst); err != nil {
			t.Fatalf("send warm-up datagram: %v", err)
		}
		rx.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		_, _, err := rx.ReadFromUDPAddrPort(buf)
		warm = err == nil
	}
	if !warm {
		t.Fatal("no datagram got through in 50 tries without loss")
	}
	// burst sends n datagrams and counts what arrives (late warm-up
	// datagrams aside).
	burst := func(n int) int {
		got := make(chan int)
		go func() {
			k := 0
			buf := make([]byte, 64)
			for {
				rx.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
				m, _, err := rx.ReadFromUDPAddrPort(buf)
				if err != nil {
					got <- k
					return
				}
				if strings.HasPrefix(string(buf[:m]), "p") {
					k++
				}
			}
		}()
		for i := 0; i < n; i++ {
			if _, err := tx.WriteToUDPAddrPort([]byte(fmt.Sprintf("p%d", i)), dst); err != nil {
				t.Errorf("send %d: %v", i, err)
			}
		}
		return <-got
	}
	const n = 1000
	if k := burst(n); k != n {
		t.Fatalf("without loss %d of %d arrived", k, n)
	}
	for _, pct := range []int{30, 100, 0} {
		if err := b.SetLoss("eth0", pct); err != nil {
			t.Fatal(err)
		}
		k := burst(n)
		lost := 100 * float64(n-k) / n
		t.Logf("loss %d%%: %d of %d arrived (%.1f%% lost)", pct, k, n, lost)
		lo, hi := float64(pct)-10, float64(pct)+10
		if lost < lo || lost > hi {
			t.Errorf("loss %d%%: measured %.1f%%, want %.0f..%.0f", pct, lost, lo, hi)
		}
	}
}

// TestTCPThroughDirector connects from a peer to the target host through
// director 0, over IPv4 and IPv6.
func TestTCPThroughDirector(t *testing.T) {
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 1, Nodes: 1})
	for _, v6 := range []bool{false, true} {
		addr := netip.AddrPortFrom(top.Target.If(netlab.IfTarget).Addr(v6), 8443)
		ln, err := top.Target.ListenTCP(addr)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			c, err := ln.Accept()
			if err == nil {
				io.WriteString(c, "hello")
				c.Close()
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := top.Peers[0].DialTCP(ctx, top.Peers[0].If(netlab.IfOutside).Addr(v6), addr)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(c)
		c.Close()
		ln.Close()
		if string(b) != "hello" {
			t.Fatalf("v6=%v: got %q", v6, b)
		}
	}
}

// TestRunInNamespace shows that a started process and a Go func both see
// the namespace's interfaces, not the host's.
func TestRunInNamespace(t *testing.T) {
	l := netlab.New(t)
	a, err := l.AddNS("a")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Veth(a, "marker0", a, "marker1"); err != nil {
		t.Fatal(err)
	}
	out, err := a.Run(context.Background(), "cat", "/proc/net/dev")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "marker0") {
		t.Fatalf("process did not run in the namespace: /proc/net/dev = %s", out)
	}
	var names []string
	err = a.Do(func() error {
		ifs, err := netInterfaces()
		names = ifs
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	// Tunnel fallback devices (tunl0, ip6tnl0) appear in every namespace
	// when ipip/ip6_tunnel are loaded (the VM guest), so look for ours.
	got := "," + strings.Join(names, ",") + ","
	if !strings.Contains(got, ",marker0,") || !strings.Contains(got, ",marker1,") {
		t.Fatalf("Do saw interfaces %v, want marker0 and marker1 among them", names)
	}
	if _, err := net.InterfaceByName("marker0"); err == nil {
		t.Fatal("marker0 is visible in the test's own namespace: Do leaked the namespace")
	}
}

// TestTopologyBuildTime measures a 2-director, 3-node topology.
func TestTopologyBuildTime(t *testing.T) {
	netlab.RequireRoot(t)
	start := time.Now()
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 2, Directors: 2, Nodes: 3})
	d := time.Since(start)
	t.Logf("built %d namespaces in %v", len(top.Lab.Namespaces()), d)
	if d > 2*time.Second {
		t.Errorf("topology took %v, budget 2s", d)
	}
}

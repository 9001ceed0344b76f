package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// statefulRuleset is what operators run on directors: established and
// related flows pass, invalid ones are dropped, and new ones only where
// allowed (here: the server's sessions to the protected subnets).
const statefulRuleset = `table inet td_e2e_fw {
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		ct state invalid counter drop
		ip saddr 198.18.1.0/24 ip daddr 10.70.0.0/16 tcp dport 9000 ct state new accept
	}
}
`

// Gateways keepalived moves with the VIP: the nodes' and the target
// network's routes follow the master.
var (
	insideGW = netip.MustParseAddr("192.0.2.254")
	targetGW = netip.MustParseAddr("198.18.1.254")
)

// statefulDirectors puts the stateful ruleset on both directors, with
// strict TCP tracking (nf_conntrack_tcp_loose=0: a mid-stream packet
// without an entry is invalid), and routes the nodes and the target
// network through the gateways keepalived moves.
func statefulDirectors(t *testing.T, top *netlab.Topology, dir string) {
	t.Helper()
	rules := filepath.Join(dir, "stateful.nft")
	os.WriteFile(rules, []byte(statefulRuleset), 0o600)
	for _, d := range top.Directors {
		if out, err := d.Run(context.Background(), "nft", "-f", rules); err != nil {
			t.Fatalf("stateful ruleset on %s: %v %s", d.Name, err, out)
		}
		for k, v := range map[string]string{
			"net/netfilter/nf_conntrack_tcp_loose": "0",
			"net/ipv4/conf/all/rp_filter":          "0",
			"net/ipv4/conf/default/rp_filter":      "0",
		} {
			if err := d.Sysctl(k, v); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, n := range top.Nodes {
		if err := n.ReplaceRoute(netlab.Route{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: insideGW}); err != nil {
			t.Fatal(err)
		}
	}
	if err := top.Target.ReplaceRoute(netlab.Route{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: targetGW}); err != nil {
		t.Fatal(err)
	}
}

// session is a TCP session sending one byte every 10 ms, each byte the
// next of a counter, with every byte's arrival time recorded.
type session struct {
	mu       sync.Mutex
	sent     int
	got      int
	arrivals []time.Time
	sendErr  error
	recvErr  error
	badByte  string
	stop     chan struct{}
	stopOnce sync.Once
	done     sync.WaitGroup
	conns    []net.Conn
}

// finish stops sending and closes the stream, waits up to limit for the
// receiver to read the rest, then closes both ends.
func (s *session) finish(limit time.Duration) {
	s.stopOnce.Do(func() { close(s.stop) })
	read := make(chan struct{})
	go func() { s.done.Wait(); close(read) }()
	select {
	case <-read:
	case <-time.After(limit):
	}
	for _, c := range s.conns {
		c.Close()
	}
	<-read
}

func startSession(t *testing.T, client *netlab.Host, src netip.Addr, server *netlab.Host, dst netip.AddrPort) *session {
	t.Helper()
	ln, err := server.ListenTCP(dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.DialTCP(ctx, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	r, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	s := &session{stop: make(chan struct{}), conns: []net.Conn{c, r}}
	s.done.Add(2)
	go func() {
		defer s.done.Done()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-s.stop:
				c.(*net.TCPConn).CloseWrite()
				return
			case <-tick.C:
			}
			if _, err := c.Write([]byte{byte(i)}); err != nil {
				s.mu.Lock()
				s.sendErr = err
				s.mu.Unlock()
				return
			}
			s.mu.Lock()
			s.sent++
			s.mu.Unlock()
		}
	}()
	go func() {
		defer s.done.Done()
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			now := time.Now()
			s.mu.Lock()
			for _, b := range buf[:n] {
				if b != byte(s.got) && s.badByte == "" {
					s.badByte = fmt.Sprintf("byte %d is %d, want %d", s.got, b, byte(s.got))
				}
				s.got++
				s.arrivals = append(s.arrivals, now)
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					s.recvErr = err
				}
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
		}
	}()
	return s
}

// since reports how many bytes arrived after t and the longest silence
// between arrivals after t.
func (s *session) since(t time.Time) (n int, gap time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	last := t
	for _, a := range s.arrivals {
		if a.Before(t) {
			continue
		}
		n++
		gap = max(gap, a.Sub(last))
		last = a
	}
	return n, max(gap, time.Since(last))
}

// TestConntrackFailover runs the pair with real keepalived (roles through
// its notify_fifo and `ctl notify-fifo`), a stateful forward ruleset and
// strict TCP tracking on both directors, and a TCP session from a server
// in the target network to a host in a peer's protected subnet (through
// the director and the owning node) sending a byte every 10 ms. The
// master's keepalived stops. With conntrack replication the new master
// commits the session's entry and the session goes on: no reset, no byte
// lost. Without it, the new master drops the session's packets as invalid
// and the session is dead: the test shows both, which is why the feature
// exists.
func TestConntrackFailover(t *testing.T) {
	t.Run("replicated", func(t *testing.T) { conntrackFailover(t, true) })
	t.Run("not-replicated", func(t *testing.T) { conntrackFailover(t, false) })
}

func conntrackFailover(t *testing.T, replicate bool) {
	netlab.RequireRoot(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 2, Nodes: 2})
	dir := t.TempDir()
	statefulDirectors(t, top, dir)
	extra := ""
	if !replicate {
		extra = "  conntrack: {enabled: false}\n"
	}
	ds := startPairWith(t, top, dir, pairOptions{extra: extra}, "backup", "backup")
	waitPairAPI(t, ds)
	gws := []string{insideGW.String() + "/24 dev " + netlab.IfInside, targetGW.String() + "/24 dev " + netlab.IfTarget}
	kas := []*keepalived{
		startKeepalivedWith(t, ds[0], dir, 0, 150, kaOptions{fifo: true, vips: gws}),
		startKeepalivedWith(t, ds[1], dir, 1, 100, kaOptions{fifo: true, vips: gws}),
	}
	waitElected(t, ds, "keepalived (through notify_fifo) to make director 0 master")

	csv := filepath.Join(dir, "t.csv")
	os.WriteFile(csv, []byte(fmt.Sprintf("id,peer,subnets,node\nsite-1,%s,10.70.0.0/24,node0\n", top.Peers[0].If(netlab.IfOutside).Addr4)), 0o600)
	if out, err := ds[0].cli(t, "import", csv); err != nil {
		t.Fatalf("import on the master: %v %s", err, out)
	}
	rev := ds[0].status(t).Revision
	waitPair(t, ds, "both kernels programmed", 10*time.Second, func() bool {
		return ds[0].status(t).KernelRevision == rev && ds[1].status(t).KernelRevision == rev
	})
	waitPair(t, ds, "the backup to be ready", 20*time.Second, func() bool { _, err := ds[1].cli(t, "ctl", "ready"); return err == nil })
	time.Sleep(1500 * time.Millisecond) // keepalived reads the track file once a second

	// The host in the protected subnet sits behind node0.
	hostAddr := netip.MustParseAddr("10.70.0.1")
	if err := top.Nodes[0].AddAddr("lo", netip.PrefixFrom(hostAddr, 32)); err != nil {
		t.Fatal(err)
	}
	server := top.Target.If(netlab.IfTarget).Addr4
	s := startSession(t, top.Target, server, top.Nodes[0], netip.AddrPortFrom(hostAddr, 9000))
	defer s.finish(0)
	time.Sleep(time.Second)
	if n, _ := s.since(time.Now().Add(-time.Second)); n < 50 {
		t.Fatalf("only %d bytes in the session's first second through the master", n)
	}
	if replicate {
		waitPair(t, ds, "the backup to cache the session", 10*time.Second, func() bool {
			out, _ := ds[1].cli(t, "ctl", "conntrack", "show")
			return strings.Contains(out, "10.70.0.1:9000") && strings.Contains(out, "established")
		})
	}

	kas[0].cmd.Process.Signal(syscall.SIGTERM)
	waitPair(t, ds, "director 1 to become master", 10*time.Second, func() bool { return ds[1].role(t) == "master" })
	// From here on every packet of the session goes through the new
	// master (a few in flight before may still arrive).
	tookOver := time.Now().Add(300 * time.Millisecond)
	waitPair(t, ds, "director 0 to go to fault (keepalived's STOP through notify_fifo)", 10*time.Second, func() bool { return ds[0].role(t) == "fault" })
	time.Sleep(time.Until(tookOver.Add(6 * time.Second)))
	n, gap := s.since(tookOver)
	s.mu.Lock()
	sendErr, recvErr, bad, sent, got := s.sendErr, s.recvErr, s.badByte, s.sent, s.got
	s.mu.Unlock()
	st1 := ds[1].status(t)
	if replicate {
		c := st1.Conntrack
		if c == nil || c.LastCommit == nil || c.LastCommit.Entries == 0 {
			t.Fatalf("the new master committed nothing: %+v", c)
		}
		t.Logf("takeover: committed %d entries in %s; %d bytes arrived in the 6 s after the takeover, longest silence %s",
			c.LastCommit.Entries, c.LastCommit.Took, n, gap.Round(time.Millisecond))
		if sendErr != nil || recvErr != nil || bad != "" {
			t.Fatalf("session broken: send %v, receive %v, %s", sendErr, recvErr, bad)
		}
		if n < 300 || gap > 3*time.Second {
			t.Fatalf("session stalled after the takeover: %d bytes, longest silence %s", n, gap)
		}
		// No lost byte: everything sent arrives, in order.
		s.finish(10 * time.Second)
		s.mu.Lock()
		sent, got = s.sent, s.got
		s.mu.Unlock()
		if got != sent || s.badByte != "" {
			t.Fatalf("sent %d bytes, received %d (%s)", sent, got, s.badByte)
		}
		t.Logf("all %d bytes arrived in order; backup status %+v", got, ds[0].status(t).Conntrack)
		return
	}
	// Without replication the new master has never seen the session:
	// with strict tracking every packet of it is invalid and dropped.
	drops, _ := top.Directors[1].Run(context.Background(), "nft", "list", "chain", "inet", "td_e2e_fw", "forward")
	t.Logf("without conntrack replication: %d bytes in the 6 s after the takeover (sent %d, received %d, longest silence %s)\n%s", n, sent, got, gap.Round(time.Millisecond), drops)
	if n > 0 || gap < 5*time.Second {
		t.Fatalf("the session survived without conntrack replication (%d bytes after the takeover): the test does not show what replication is for", n)
	}
	if !strings.Contains(string(drops), "invalid counter packets") || strings.Contains(string(drops), "invalid counter packets 0 ") {
		t.Fatalf("the new master did not drop the session's packets as invalid:\n%s", drops)
	}
}

package vmtest

import (
	"bytes"
	"context"
	"net"
	"net/http/httptest"
	"net/netip"
	"os"
	"reflect"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tunneldirector/tunneldirector/internal/cputime"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/internal/vmlab"
	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/agent"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// The agent's guest tests: real ESP states (the host kernel has no esp4)
// with tunnel-mode policies as an IKE daemon installs them on a responder
// whose local address is the VIP.

var (
	agentVIP  = netip.MustParseAddr("192.0.2.10")
	agentVIP6 = netip.MustParseAddr("2001:db8:f::10")
	agentLAN  = netip.MustParsePrefix("10.0.0.0/16")
	agentLAN6 = netip.MustParsePrefix("2001:db8:aaaa::/48")
)

func pnet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// espChild describes one CHILD_SA as the node holds it.
type espChild struct {
	peer     netip.Addr
	reqid    int
	spiIn    int
	spiOut   int
	natPort  int // peer's NAT-T port, 0 for plain ESP
	remote   []netip.Prefix
	noPolicy bool // a rekeyed pair reuses the policies already there
}

func (c espChild) local() netip.Addr {
	if c.peer.Is4() {
		return agentVIP
	}
	return agentVIP6
}

func (c espChild) states() []*netlink.XfrmState {
	gcm := &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: bytes.Repeat([]byte{byte(c.spiIn)}, 20), ICVLen: 128}
	mk := func(src, dst netip.Addr, spi int, encap *netlink.XfrmStateEncap) *netlink.XfrmState {
		return &netlink.XfrmState{Src: src.AsSlice(), Dst: dst.AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
			Mode: netlink.XFRM_MODE_TUNNEL, Spi: spi, Reqid: c.reqid, Aead: gcm, Encap: encap}
	}
	var in, out *netlink.XfrmStateEncap
	if c.natPort != 0 {
		in = &netlink.XfrmStateEncap{Type: netlink.XFRM_ENCAP_ESPINUDP, SrcPort: c.natPort, DstPort: 4500, OriginalAddress: net.IPv4zero}
		out = &netlink.XfrmStateEncap{Type: netlink.XFRM_ENCAP_ESPINUDP, SrcPort: 4500, DstPort: c.natPort, OriginalAddress: net.IPv4zero}
	}
	return []*netlink.XfrmState{mk(c.peer, c.local(), c.spiIn, in), mk(c.local(), c.peer, c.spiOut, out)}
}

func (c espChild) policies() []*netlink.XfrmPolicy {
	if c.noPolicy {
		return nil
	}
	lan := agentLAN
	if c.peer.Is6() {
		lan = agentLAN6
	}
	in := netlink.XfrmPolicyTmpl{Src: c.peer.AsSlice(), Dst: c.local().AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: c.reqid}
	out := netlink.XfrmPolicyTmpl{Src: c.local().AsSlice(), Dst: c.peer.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: c.reqid}
	var ps []*netlink.XfrmPolicy
	for _, r := range c.remote {
		ps = append(ps,
			&netlink.XfrmPolicy{Src: pnet(r), Dst: pnet(lan), Dir: netlink.XFRM_DIR_IN, Tmpls: []netlink.XfrmPolicyTmpl{in}},
			&netlink.XfrmPolicy{Src: pnet(r), Dst: pnet(lan), Dir: netlink.XFRM_DIR_FWD, Tmpls: []netlink.XfrmPolicyTmpl{in}},
			&netlink.XfrmPolicy{Src: pnet(lan), Dst: pnet(r), Dir: netlink.XFRM_DIR_OUT, Tmpls: []netlink.XfrmPolicyTmpl{out}})
	}
	return ps
}

// install adds a child's policies, then its SAs (inbound first), as
// strongSwan does.
func (c espChild) install(t testing.TB, h *netlink.Handle) {
	t.Helper()
	for _, p := range c.policies() {
		if err := h.XfrmPolicyAdd(p); err != nil {
			t.Fatalf("add policy %v: %v", p, err)
		}
	}
	for _, s := range c.states() {
		if err := h.XfrmStateAdd(s); err != nil {
			t.Fatalf("add ESP state spi %#x: %v", s.Spi, err)
		}
	}
}

func (c espChild) remove(t testing.TB, h *netlink.Handle) {
	t.Helper()
	for _, s := range c.states() {
		if err := h.XfrmStateDel(s); err != nil {
			t.Fatalf("delete ESP state spi %#x: %v", s.Spi, err)
		}
	}
}

// agentNode makes the node namespace: the VIPs and the LAN address on lo,
// eth0 towards a peer namespace that holds the peers' outer addresses.
func agentNode(t *testing.T) (node, peer *netlab.NS) {
	t.Helper()
	l := netlab.New(t)
	node, peer = l.Pair(t, "node", "peer", "eth0")
	for _, p := range []string{"192.0.2.10/32", "2001:db8:f::10/128", "10.0.0.1/32"} {
		if err := node.AddAddr("lo", netip.MustParsePrefix(p)); err != nil {
			t.Fatal(err)
		}
	}
	if err := node.AddAddr("eth0", netip.MustParsePrefix("198.51.100.254/24")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"198.51.100.1/24", "198.51.100.2/24"} {
		if err := peer.AddAddr("eth0", netip.MustParsePrefix(p)); err != nil {
			t.Fatal(err)
		}
	}
	if err := node.AddRoute(netlab.Route{Dst: netip.MustParsePrefix("172.16.0.0/12"), Via: netip.MustParseAddr("198.51.100.1")}); err != nil {
		t.Fatal(err)
	}
	return node, peer
}

// TestGuestXfrmReaderAndMonitor installs real ESP states and tunnel-mode
// policies (IPv4, IPv6, NAT-T, two CHILD_SAs of one peer, a rekey
// overlap), sends traffic through one SA, and checks the reader, the
// monitor's events and the grouping against what was installed.
func TestGuestXfrmReaderAndMonitor(t *testing.T) {
	vmlab.RequireGuest(t)
	node, _ := agentNode(t)
	h := node.Handle()
	k, err := xfrm.New(xfrm.Options{Netns: node.NsHandle()})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := k.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p1, nat, p6 := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("203.0.113.5"), netip.MustParseAddr("2001:db8:100::1")
	children := []espChild{
		{peer: p1, reqid: 1, spiIn: 0xc0000101, spiOut: 0xc0000102, remote: []netip.Prefix{netip.MustParsePrefix("172.16.1.0/24")}},
		{peer: p1, reqid: 2, spiIn: 0xc0000201, spiOut: 0xc0000202, remote: []netip.Prefix{netip.MustParsePrefix("172.16.2.0/24")}},
		{peer: p1, reqid: 1, spiIn: 0xc0000103, spiOut: 0xc0000104, noPolicy: true}, // rekey overlap of reqid 1
		{peer: nat, reqid: 3, spiIn: 0xc0000301, spiOut: 0xc0000302, natPort: 31337, remote: []netip.Prefix{netip.MustParsePrefix("192.168.7.0/24")}},
		{peer: p6, reqid: 4, spiIn: 0xc0000401, spiOut: 0xc0000402, remote: []netip.Prefix{netip.MustParsePrefix("fd00::/8"), netip.MustParsePrefix("2001:db8::/32")}},
	}
	for _, c := range children {
		c.install(t, h)
	}
	mirror := xfrm.NewMirror()
	mirror.Reset(xfrm.Snapshot{Local: []netip.Addr{agentVIP, agentVIP6, netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("198.51.100.254")}})
	wantStates := 2 * len(children)
	gotStates, gotPols := 0, 0
	deadline := time.After(10 * time.Second)
	for gotStates < wantStates || gotPols < 15 {
		select {
		case e := <-events:
			switch e.Kind {
			case xfrm.EventState:
				gotStates++
			case xfrm.EventPolicy:
				gotPols++
			}
			mirror.Apply(e)
		case <-deadline:
			t.Fatalf("events: %d states and %d policies of %d and 15", gotStates, gotPols, wantStates)
		}
	}
	snap, err := k.Read()
	if err != nil {
		t.Fatal(err)
	}
	f := xfrm.Group(xfrm.NewLocal(snap.Local...), snap.States, snap.Policies)
	if f.Summary != (xfrm.Summary{SAs: wantStates, Tunnels: 3}) {
		t.Fatalf("summary %+v, want %d SAs in 3 tunnels; states %v", f.Summary, wantStates, snap.States)
	}
	if ev := mirror.Facts(); !reflect.DeepEqual(ev, f) {
		t.Fatalf("facts from events differ from a full read:\n%+v\n%+v", ev, f)
	}
	byPeer := map[netip.Addr]xfrm.Tunnel{}
	for _, tn := range f.Tunnels {
		byPeer[tn.Peer] = tn
	}
	if tn := byPeer[p1]; tn.SAs != 6 || !slices.Equal(tn.Subnets, []netip.Prefix{netip.MustParsePrefix("172.16.1.0/24"), netip.MustParsePrefix("172.16.2.0/24")}) || len(tn.NATT) != 0 {
		t.Errorf("two children, one rekeying: %+v", tn)
	}
	if tn := byPeer[nat]; tn.SAs != 2 || !slices.Equal(tn.NATT, []xfrm.NATT{{Port: 31337, LocalPort: 4500}}) {
		t.Errorf("NAT-T peer: %+v", tn)
	}
	if tn := byPeer[p6]; tn.SAs != 2 || !slices.Equal(tn.Subnets, []netip.Prefix{netip.MustParsePrefix("2001:db8::/32"), netip.MustParsePrefix("fd00::/8")}) {
		t.Errorf("IPv6 peer: %+v", tn)
	}

	// Traffic from the LAN to 172.16.1.5 leaves through the outbound SA of
	// reqid 1 (the newest of the rekeyed pair): its counters and last use
	// (XFRMA_LASTUSED) move.
	before := time.Now().Unix()
	for i := 0; i < 3; i++ {
		if err := node.SendUDP(netip.MustParseAddrPort("10.0.0.1:7001"), netip.MustParseAddrPort("172.16.1.5:9"), []byte("through the tunnel")); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	snap, err = k.Read()
	if err != nil {
		t.Fatal(err)
	}
	f = xfrm.Group(xfrm.NewLocal(snap.Local...), snap.States, snap.Policies)
	for _, tn := range f.Tunnels {
		if tn.Peer == p1 && (tn.Packets < 3 || tn.Bytes == 0 || tn.LastUse < before) {
			t.Errorf("after 3 packets: packets %d bytes %d last use %d (want >= %d)", tn.Packets, tn.Bytes, tn.LastUse, before)
		}
	}

	// The old SAs of the rekey go: a delete event each, keyed right.
	for _, s := range children[0].states() {
		if err := h.XfrmStateDel(s); err != nil {
			t.Fatal(err)
		}
	}
	gone := 0
	for gone < 2 {
		select {
		case e := <-events:
			if e.Kind == xfrm.EventStateGone {
				gone++
			}
			mirror.Apply(e)
		case <-time.After(5 * time.Second):
			t.Fatalf("%d delete events of 2", gone)
		}
	}
	snap, _ = k.Read()
	if ev, rd := mirror.Facts().Summary, xfrm.Group(xfrm.NewLocal(snap.Local...), snap.States, snap.Policies).Summary; ev.SAs != wantStates-2 || ev.SAs != rd.SAs {
		t.Fatalf("after the rekey's deletes: events say %+v, a read %+v", ev, rd)
	}
}

// TestGuestAgentReportsSAs runs the agent on the node namespace against a
// test director (httptest in the guest): the full report carries what is
// there, a new CHILD_SA arrives as a delta (the time from the last SA's
// install to the report's arrival is logged), a NAT-T peer's port is
// reported, and a removed tunnel is reported gone after the hold.
func TestGuestAgentReportsSAs(t *testing.T) {
	vmlab.RequireGuest(t)
	node, _ := agentNode(t)
	h := node.Handle()
	(espChild{peer: netip.MustParseAddr("198.51.100.1"), reqid: 1, spiIn: 0x1001, spiOut: 0x1002,
		remote: []netip.Prefix{netip.MustParsePrefix("172.16.1.0/24")}}).install(t, h)

	inbox := report.NewInbox()
	type arrival struct {
		r  *report.Report
		at time.Time
	}
	arrived := make(chan arrival, 1000)
	srv := httptest.NewServer(report.Handler(report.HandlerOptions{
		Authenticate: report.Tokens(map[string]string{"node-1": "tok"}),
		Accept: func(n string, r *report.Report) (report.Ack, error) {
			at := time.Now()
			ack, _, err := inbox.Accept(n, r, at)
			arrived <- arrival{r, at}
			return ack, err
		},
	}))
	defer srv.Close()
	a, err := agent.New(agent.Config{Node: "node-1", Endpoints: []string{srv.URL}, Token: "tok", RemoveHold: 500 * time.Millisecond},
		agent.Options{Kernel: xfrm.Options{Netns: node.NsHandle()}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	wait := func(what string, match func(*report.Report) bool) arrival {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case x := <-arrived:
				if match(x.r) {
					return x
				}
			case <-deadline:
				t.Fatalf("%s: not reported within 10 s", what)
			}
		}
	}
	full := wait("full report", func(r *report.Report) bool { return r.Kind == report.KindFull })
	if len(full.r.Tunnels) != 1 || full.r.Summary.SAs != 2 {
		t.Fatalf("full report %+v", full.r)
	}
	// Install → report latency, one new tunnel at a time.
	var lat []time.Duration
	for i := 0; i < 7; i++ {
		c := espChild{peer: netip.AddrFrom4([4]byte{203, 0, 113, byte(10 + i)}), reqid: 10 + i, spiIn: 0x2000 + 2*i, spiOut: 0x2001 + 2*i,
			natPort: 40000 + i, remote: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 17, byte(i), 0}), 24)}}
		c.install(t, h)
		start := time.Now()
		x := wait("delta of "+c.peer.String(), func(r *report.Report) bool {
			return r.Kind == report.KindDelta && slices.ContainsFunc(r.Tunnels, func(tn xfrm.Tunnel) bool { return tn.Peer == c.peer && tn.SAs == 2 })
		})
		lat = append(lat, x.at.Sub(start))
		tn := x.r.Tunnels[slices.IndexFunc(x.r.Tunnels, func(tn xfrm.Tunnel) bool { return tn.Peer == c.peer })]
		if !slices.Equal(tn.NATT, []xfrm.NATT{{Port: uint16(c.natPort), LocalPort: 4500}}) || tn.Subnets[0] != c.remote[0] {
			t.Fatalf("reported %+v for %+v", tn, c)
		}
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	t.Logf("SA install -> report at the director (debounce 100 ms, TCG guest): min %v, median %v, max %v over %d tunnels",
		lat[0].Round(time.Millisecond), lat[len(lat)/2].Round(time.Millisecond), lat[len(lat)-1].Round(time.Millisecond), len(lat))
	// A tunnel goes: reported removed after the hold.
	gone := espChild{peer: netip.MustParseAddr("198.51.100.1"), reqid: 1, spiIn: 0x1001, spiOut: 0x1002}
	gone.remove(t, h)
	wait("removal", func(r *report.Report) bool {
		return r.Kind == report.KindDelta && slices.Contains(r.Removed, gone.peer)
	})
	n, _ := inbox.Node("node-1")
	if len(n.Tunnels) != 7 || n.Summary.SAs != 14 {
		t.Fatalf("the director holds %d tunnels (%+v), want 7 with 14 SAs", len(n.Tunnels), n.Summary)
	}
}

// BenchmarkVMAgentScale boots the VM for TestScaleGuestAgent only: a
// measurement, not part of the suite (installing 10,000 SAs and policies
// under TCG takes about two minutes). Run it with
//
//	go test -run '^$' -bench VMAgentScale -benchtime 1x ./internal/vmlab/vmtest/
//
// TD_XFRM_SCALE_SAS sets the number of SAs (default 10,000).
func BenchmarkVMAgentScale(b *testing.B) {
	if vmlab.InGuest() {
		b.Skip("host side")
	}
	n := os.Getenv("TD_XFRM_SCALE_SAS")
	if n == "" {
		n = "10000"
	}
	for b.Loop() {
		vmlab.Run(b, vmlab.Options{Package: ".", Run: "^TestScaleGuestAgent$", Timeout: 10 * time.Minute,
			Env: map[string]string{"TD_XFRM_SCALE_SAS": n}})
	}
}

// TestScaleGuestAgent measures the agent with many SAs on a node, inside
// the guest (started by BenchmarkVMAgentScale; TestVM does not select
// it): the time and CPU of a full kernel read and of grouping, the size
// and encoding time of the full report, the heap the facts hold, and the
// CPU the running agent spends in quiet operation (heartbeats and full
// resyncs at 30 times the default rate, then scaled to it). The timings
// are TCG's, many times slower than a real CPU; the host benchmarks in
// package xfrm time the same pure-Go steps natively.
func TestScaleGuestAgent(t *testing.T) {
	vmlab.RequireGuest(t)
	n, _ := strconv.Atoi(os.Getenv("TD_XFRM_SCALE_SAS"))
	if n <= 0 {
		t.Skip("a measurement: BenchmarkVMAgentScale starts it with TD_XFRM_SCALE_SAS")
	}
	node, _ := agentNode(t)
	h := node.Handle()
	start := time.Now()
	gcm := &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: bytes.Repeat([]byte{7}, 20), ICVLen: 128}
	for i := 0; i < n/2; i++ {
		peer := netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)})
		for j, sd := range [][2]netip.Addr{{peer, agentVIP}, {agentVIP, peer}} {
			s := &netlink.XfrmState{Src: sd[0].AsSlice(), Dst: sd[1].AsSlice(), Proto: netlink.XFRM_PROTO_ESP,
				Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x10000 + 2*i + j, Reqid: i + 1, Aead: gcm}
			if err := h.XfrmStateAdd(s); err != nil {
				t.Fatalf("add SA %d: %v", 2*i+j, err)
			}
		}
		v := uint32(10<<24|128<<16) + uint32(i)*32 // one /27 per peer from 10.128.0.0
		remote := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), 27)
		tin := netlink.XfrmPolicyTmpl{Src: peer.AsSlice(), Dst: agentVIP.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: i + 1}
		tout := netlink.XfrmPolicyTmpl{Src: agentVIP.AsSlice(), Dst: peer.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: i + 1}
		for _, p := range []*netlink.XfrmPolicy{
			{Src: pnet(remote), Dst: pnet(agentLAN), Dir: netlink.XFRM_DIR_IN, Tmpls: []netlink.XfrmPolicyTmpl{tin}},
			{Src: pnet(agentLAN), Dst: pnet(remote), Dir: netlink.XFRM_DIR_OUT, Tmpls: []netlink.XfrmPolicyTmpl{tout}},
		} {
			if err := h.XfrmPolicyAdd(p); err != nil {
				t.Fatalf("add policy for %v: %v", remote, err)
			}
		}
	}
	t.Logf("scale: installed %d SAs and %d policies in %v", n, n, time.Since(start).Round(time.Millisecond))

	k, err := xfrm.New(xfrm.Options{Netns: node.NsHandle()})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	cpu0, t0 := cputime.Process(), time.Now()
	snap, err := k.Read()
	if err != nil {
		t.Fatal(err)
	}
	cpu1, t1 := cputime.Process(), time.Now()
	m := xfrm.NewMirror()
	m.Reset(snap)
	f := m.Facts()
	cpu2, t2 := cputime.Process(), time.Now()
	if f.Summary.SAs != n || f.Summary.Tunnels != n/2 {
		t.Fatalf("summary %+v", f.Summary)
	}
	r := &report.Report{Version: report.Version, Kind: report.KindFull, Node: "n", Session: "0123456789abcdef0123456789abcdef", Seq: 1,
		Sent: time.Now(), Tunnels: f.Tunnels, Summary: f.Summary}
	body, err := report.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	t3 := time.Now()
	if _, err := report.Decode(bytes.NewReader(body), report.Limits{}); err != nil {
		t.Fatal(err)
	}
	t4 := time.Now()
	snap = xfrm.Snapshot{}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heapWithFacts := ms.HeapAlloc
	runtime.KeepAlive(m)
	t.Logf("scale: %d SAs: kernel read %v (cpu %v), group %v (cpu %v), full report %d bytes encoded in %v, decoded (strict) in %v; heap with the mirror %.1f MiB",
		n, t1.Sub(t0).Round(time.Millisecond), (cpu1 - cpu0).Round(time.Millisecond), t2.Sub(t1).Round(time.Millisecond), (cpu2 - cpu1).Round(time.Millisecond),
		len(body), t3.Sub(t2).Round(time.Millisecond), t4.Sub(t3).Round(time.Millisecond), float64(heapWithFacts)/(1<<20))

	// The running agent: start-up, then quiet operation with a resync
	// every 2 s (30x the default rate) for 6 s.
	var mu sync.Mutex
	reports := map[report.Kind]int{}
	srv := httptest.NewServer(report.Handler(report.HandlerOptions{
		Authenticate: report.Tokens(map[string]string{"n": "tok"}),
		Accept: func(_ string, r *report.Report) (report.Ack, error) {
			mu.Lock()
			reports[r.Kind]++
			mu.Unlock()
			return report.Ack{}, nil
		},
	}))
	defer srv.Close()
	a, err := agent.New(agent.Config{Node: "n", Endpoints: []string{srv.URL}, Token: "tok", Resync: 2 * time.Second, Heartbeat: time.Second},
		agent.Options{Kernel: xfrm.Options{Netns: node.NsHandle()}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	c0 := cputime.Process()
	go func() { a.Run(ctx); close(done) }()
	for a.Status().Seq == 0 {
		time.Sleep(50 * time.Millisecond)
	}
	c1, q0 := cputime.Process(), time.Now()
	time.Sleep(6 * time.Second)
	c2, q1 := cputime.Process(), time.Now()
	cancel()
	<-done
	runtime.ReadMemStats(&ms)
	mu.Lock()
	defer mu.Unlock()
	perResync := (c2 - c1) / time.Duration(q1.Sub(q0)/(2*time.Second))
	t.Logf("scale: agent start to acknowledged full report: cpu %v (test director included); quiet 6 s with 3 resyncs: cpu %v, i.e. about %v per resync: %.2f %% of a core at the default 1/min; Go heap sys %.1f MiB; reports %v",
		(c1 - c0).Round(time.Millisecond), (c2 - c1).Round(time.Millisecond), perResync.Round(time.Millisecond),
		100*perResync.Seconds()/60, float64(ms.HeapSys)/(1<<20), reports)
	if reports[report.KindFull] != 1 || reports[report.KindDelta] != 0 {
		t.Errorf("a quiet node's resyncs sent reports: %v (want one full, no deltas)", reports)
	}
}

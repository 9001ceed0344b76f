package agent

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

var (
	vip  = netip.MustParseAddr("192.0.2.10")
	lan  = netip.MustParsePrefix("10.0.0.0/16")
	peer = netip.MustParseAddr("198.51.100.1")
)

// childSAs returns the two SAs and three policies of one CHILD_SA.
func childSAs(p netip.Addr, spi uint32, remote string) ([]xfrm.SA, []xfrm.Policy) {
	r := netip.MustParsePrefix(remote)
	in := []xfrm.Template{{Src: p, Dst: vip, Proto: xfrm.ProtoESP, Mode: xfrm.ModeTunnel, Reqid: spi}}
	out := []xfrm.Template{{Src: vip, Dst: p, Proto: xfrm.ProtoESP, Mode: xfrm.ModeTunnel, Reqid: spi}}
	return []xfrm.SA{
			{Src: p, Dst: vip, Proto: xfrm.ProtoESP, SPI: spi, Reqid: spi, Mode: xfrm.ModeTunnel},
			{Src: vip, Dst: p, Proto: xfrm.ProtoESP, SPI: spi + 1, Reqid: spi, Mode: xfrm.ModeTunnel},
		}, []xfrm.Policy{
			{Index: spi * 8, Dir: xfrm.DirIn, Src: r, Dst: lan, Tmpls: in},
			{Index: spi*8 + 1, Dir: xfrm.DirOut, Src: lan, Dst: r, Tmpls: out},
		}
}

// harness steps a core on a fake clock.
type harness struct {
	t   *testing.T
	c   *core
	now time.Time
}

func newHarness(t *testing.T, endpoints ...string) *harness {
	if len(endpoints) == 0 {
		endpoints = []string{"http://a"}
	}
	m := xfrm.NewMirror()
	m.Reset(xfrm.Snapshot{Local: []netip.Addr{vip}})
	c := newCore(Config{Node: "n1", Endpoints: endpoints, Token: "t"}, m)
	n := 0
	c.newID = func() string { n++; return fmt.Sprintf("%032x", n) }
	return &harness{t: t, c: c, now: time.Unix(1_000_000, 0)}
}

func (h *harness) at(d time.Duration) { h.now = h.now.Add(d) }

// kernel applies events to the mirror as Run does.
func (h *harness) kernel(evs ...xfrm.Event) {
	for _, e := range evs {
		h.c.mirror.Apply(e)
	}
	h.c.changed(h.c.mirror.Changed(), h.now)
}

func (h *harness) add(p netip.Addr, spi uint32, remote string) {
	sas, pols := childSAs(p, spi, remote)
	for _, pol := range pols {
		h.kernel(xfrm.Event{Kind: xfrm.EventPolicy, Policy: pol})
	}
	for _, sa := range sas {
		h.kernel(xfrm.Event{Kind: xfrm.EventState, SA: sa})
	}
}

func (h *harness) del(p netip.Addr, spi uint32) {
	sas, _ := childSAs(p, spi, "0.0.0.0/0")
	for _, sa := range sas {
		h.kernel(xfrm.Event{Kind: xfrm.EventStateGone, SA: sa})
	}
}

// send expects a report of kind now, answers it with res, and returns it.
func (h *harness) send(kind report.Kind, res result) *report.Report {
	h.t.Helper()
	r, _ := h.c.next(h.now)
	if r == nil || r.Kind != kind {
		h.t.Fatalf("at +%v: got %+v, want a %s report", h.now.Sub(time.Unix(1_000_000, 0)), r, kind)
	}
	if err := report.Validate(r, report.Limits{}); err != nil {
		h.t.Fatalf("agent built an invalid %s report: %v", kind, err)
	}
	h.c.done(res, h.now)
	return r
}

// quiet expects nothing to send now and returns the wake-up time.
func (h *harness) quiet() time.Time {
	h.t.Helper()
	r, wake := h.c.next(h.now)
	if r != nil {
		h.t.Fatalf("at +%v: unexpected %s report %+v", h.now.Sub(time.Unix(1_000_000, 0)), r.Kind, r)
	}
	return wake
}

var ok = result{status: 200}

func TestCoreFullThenDeltasThenHeartbeat(t *testing.T) {
	h := newHarness(t)
	h.add(peer, 0x100, "172.16.1.0/24")
	full := h.send(report.KindFull, ok)
	if len(full.Tunnels) != 1 || full.Seq != 1 {
		t.Fatalf("full report %+v", full)
	}
	// A new peer: sent after the debounce, not before.
	other := netip.MustParseAddr("198.51.100.2")
	h.add(other, 0x200, "172.16.2.0/24")
	if wake := h.quiet(); !wake.Equal(h.now.Add(100 * time.Millisecond)) {
		t.Fatalf("wake %v, want debounce", wake.Sub(h.now))
	}
	h.at(100 * time.Millisecond)
	d := h.send(report.KindDelta, ok)
	if d.Seq != 2 || len(d.Tunnels) != 1 || d.Tunnels[0].Peer != other || d.Tunnels[0].Subnets[0] != netip.MustParsePrefix("172.16.2.0/24") {
		t.Fatalf("delta %+v", d)
	}
	// Nothing for a while: a heartbeat with the last sequence number.
	wake := h.quiet()
	h.now = wake
	hb := h.send(report.KindHeartbeat, ok)
	if hb.Seq != 2 || hb.Summary.Tunnels != 2 || hb.Summary.SAs != 4 {
		t.Fatalf("heartbeat %+v", hb)
	}
}

func TestCoreDebounceCapsAtMaxDelay(t *testing.T) {
	h := newHarness(t)
	h.send(report.KindFull, ok)
	// A change every 60 ms: the quiet time never comes, MaxDelay does.
	for i := 0; i < 9; i++ {
		h.add(netip.AddrFrom4([4]byte{198, 51, 100, byte(10 + i)}), uint32(0x10*(i+1)), "172.16.9.0/24")
		h.quiet()
		h.at(60 * time.Millisecond)
	}
	d := h.send(report.KindDelta, ok)
	if len(d.Tunnels) != 9 {
		t.Fatalf("delta after MaxDelay carries %d tunnels, want 9", len(d.Tunnels))
	}
}

func TestCoreFlapAndRemoveHold(t *testing.T) {
	h := newHarness(t)
	h.add(peer, 0x100, "172.16.1.0/24")
	h.send(report.KindFull, ok)
	// Torn down and set up again within the debounce: nothing to send.
	h.del(peer, 0x100)
	h.at(50 * time.Millisecond)
	h.add(peer, 0x100, "172.16.1.0/24")
	h.at(time.Second)
	h.quiet()
	// Gone across the debounce, back within the hold: still nothing.
	h.del(peer, 0x100)
	h.at(200 * time.Millisecond)
	if wake := h.quiet(); !wake.Equal(h.now.Add(3 * time.Second)) {
		t.Fatalf("wake in %v, want the remove hold (3 s)", wake.Sub(h.now))
	}
	h.at(2 * time.Second)
	h.add(peer, 0x300, "172.16.1.0/24") // reauthenticated: new SPIs, same subnet
	h.at(200 * time.Millisecond)
	d := h.send(report.KindDelta, ok)
	if len(d.Removed) != 0 || len(d.Tunnels) != 1 || d.Tunnels[0].SPIs[0].SPI != 0x300 {
		t.Fatalf("after reauthentication: %+v (want the new SPIs, no removal)", d)
	}
	// Gone for good: removed once the hold has passed.
	h.del(peer, 0x300)
	h.at(200 * time.Millisecond)
	h.quiet()
	h.at(3 * time.Second)
	d = h.send(report.KindDelta, ok)
	if len(d.Removed) != 1 || d.Removed[0] != peer || len(d.Tunnels) != 0 {
		t.Fatalf("removal %+v", d)
	}
}

func TestCoreCountersWaitForStats(t *testing.T) {
	h := newHarness(t)
	h.add(peer, 0x100, "172.16.1.0/24")
	h.send(report.KindFull, ok)
	sas, _ := childSAs(peer, 0x100, "172.16.1.0/24")
	sas[0].Bytes, sas[0].UseTime = 99999, 1764410400
	h.kernel(xfrm.Event{Kind: xfrm.EventState, SA: sas[0]})
	h.at(time.Second)
	h.quiet()
	h.at(4 * time.Second)
	h.send(report.KindHeartbeat, ok)
	h.at(56 * time.Second)
	d := h.send(report.KindDelta, ok)
	if len(d.Tunnels) != 1 || d.Tunnels[0].Bytes != 99999 || d.Tunnels[0].LastUse != 1764410400 {
		t.Fatalf("stats delta %+v", d)
	}
}

func TestCoreFailover(t *testing.T) {
	h := newHarness(t, "http://a", "http://b")
	h.add(peer, 0x100, "172.16.1.0/24")
	// a is the backup: 409, b at once, with a full report.
	f1 := h.send(report.KindFull, result{status: 409})
	if h.c.status().Endpoint != "http://b" {
		t.Fatalf("after 409 the endpoint is %s", h.c.status().Endpoint)
	}
	f2 := h.send(report.KindFull, ok)
	if f2.Session == f1.Session {
		t.Fatal("the second director got the first one's session")
	}
	// b dies: a takes over; the agent fails over, full again.
	h.at(5 * time.Second)
	h.send(report.KindHeartbeat, result{err: errTest})
	f3 := h.send(report.KindFull, ok)
	if h.c.status().Endpoint != "http://a" || f3.Session == f2.Session {
		t.Fatalf("after b failed: endpoint %s", h.c.status().Endpoint)
	}
	// a restarts and has forgotten us: need_full.
	h.at(5 * time.Second)
	h.send(report.KindHeartbeat, result{status: 200, ack: report.Ack{NeedFull: true}})
	h.send(report.KindFull, ok)
	// Both down: a round of failures, then back off, doubling.
	h.at(5 * time.Second)
	h.send(report.KindHeartbeat, result{err: errTest})
	h.send(report.KindFull, result{err: errTest})
	if wake := h.quiet(); !wake.Equal(h.now.Add(500 * time.Millisecond)) {
		t.Fatalf("first backoff %v", wake.Sub(h.now))
	}
	h.at(500 * time.Millisecond)
	h.send(report.KindFull, result{status: 503})
	h.send(report.KindFull, result{status: 503})
	if wake := h.quiet(); !wake.Equal(h.now.Add(time.Second)) {
		t.Fatalf("second backoff %v", wake.Sub(h.now))
	}
	// A refusal (bad token, invalid report) backs off at once: the other
	// director would say the same.
	h.at(time.Second)
	h.send(report.KindFull, result{status: 401, err: errTest})
	if wake := h.quiet(); !wake.Equal(h.now.Add(2 * time.Second)) {
		t.Fatalf("backoff after 401: %v", wake.Sub(h.now))
	}
	h.at(2 * time.Second)
	h.send(report.KindFull, ok)
	if st := h.c.status(); st.LastErr != nil || st.Seq != 1 || st.Tunnels != 1 {
		t.Fatalf("after recovery: %+v", st)
	}
}

type testErr string

func (e testErr) Error() string { return string(e) }

const errTest = testErr("connection refused")

package conntrack

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	ct "github.com/ti-mo/conntrack"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// testFlows returns n flows of several kinds: established TCP over IPv4
// and IPv6 with window scaling, UDP, ICMP echo, ESP (no ports), marked
// and zoned entries.
func testFlows(n int) []Flow {
	fs := make([]Flow, 0, n)
	for i := range n {
		var f Flow
		switch i % 6 {
		case 0, 1:
			f.Orig = MakeTuple(ProtoTCP, netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), netip.MustParseAddr("198.18.1.100"), uint16(1024+i%60000), 443)
			f.Status = StatusSeenReply | StatusAssured | StatusConfirmed
			f.TCP = TCPInfo{Set: true, State: TCPEstablished, WScaleOrig: 7, WScaleReply: 9, FlagsOrig: TCPFlagWindowScale | TCPFlagSackPerm, FlagsReply: TCPFlagWindowScale}
			f.Timeout = 432000
		case 2:
			f.Orig = MakeTuple(ProtoTCP, netip.AddrFrom16([16]byte{0xfd, 0x70, 14: byte(i >> 8), 15: byte(i)}), netip.MustParseAddr("2001:db8:1::64"), uint16(2000+i%60000), 22)
			f.Status = StatusSeenReply | StatusConfirmed
			f.TCP = TCPInfo{Set: true, State: TCPSynRecv}
			f.Timeout = 60
		case 3:
			f.Orig = MakeTuple(ProtoUDP, netip.AddrFrom4([4]byte{10, 200, byte(i >> 8), byte(i)}), netip.MustParseAddr("203.0.113.1"), 4500, 4500)
			f.Status = StatusSeenReply | StatusConfirmed
			f.Timeout = 120
			f.Mark = 0x7d000003
		case 4:
			f.Orig = MakeTuple(ProtoICMP, netip.AddrFrom4([4]byte{10, 201, byte(i >> 8), byte(i)}), netip.MustParseAddr("198.18.1.100"), uint16(i), 8<<8)
			f.Status = StatusConfirmed
			f.Timeout = 30
		case 5:
			f.Orig = MakeTuple(ProtoESP, netip.AddrFrom4([4]byte{10, 202, byte(i >> 8), byte(i)}), netip.MustParseAddr("203.0.113.1"), 0, 0)
			f.Status = StatusConfirmed
			f.Timeout = 600
			f.Zone = 7
		}
		f.Reply = f.Orig.Inverse()
		fs = append(fs, f)
	}
	return fs
}

// dumpAll reads the table with this package's Dump.
func dumpAll(t testing.TB, k *Kernel) map[Tuple]Flow {
	t.Helper()
	got := map[Tuple]Flow{}
	if err := k.Dump(context.Background(), func(f *Flow) error { got[f.Orig] = *f; return nil }); err != nil {
		t.Fatal(err)
	}
	return got
}

// sameFlow compares what a commit restores; the timeout only roughly
// (the kernel counts it down).
func sameFlow(want, got Flow) error {
	if got.Orig != want.Orig || got.Reply != want.Reply {
		return fmt.Errorf("tuples %v / %v, want %v / %v", got.Orig, got.Reply, want.Orig, want.Reply)
	}
	if got.Status&commitStatus != want.Status&commitStatus || got.Status&StatusConfirmed == 0 {
		return fmt.Errorf("%v: status %#x, want %#x", want.Orig, got.Status, want.Status)
	}
	if got.Mark != want.Mark || got.Zone != want.Zone {
		return fmt.Errorf("%v: mark %#x zone %d, want %#x %d", want.Orig, got.Mark, got.Zone, want.Mark, want.Zone)
	}
	if got.Timeout > want.Timeout || got.Timeout+5 < want.Timeout {
		return fmt.Errorf("%v: timeout %d, want about %d", want.Orig, got.Timeout, want.Timeout)
	}
	if want.TCP.Set && (got.TCP.State != want.TCP.State || got.TCP.FlagsOrig&tcpFlagMask != want.TCP.FlagsOrig || got.TCP.FlagsReply&tcpFlagMask != want.TCP.FlagsReply) {
		return fmt.Errorf("%v: TCP %+v, want %+v", want.Orig, got.TCP, want.TCP)
	}
	if want.TCP.Set && want.TCP.FlagsOrig&TCPFlagWindowScale != 0 && want.TCP.FlagsReply&TCPFlagWindowScale != 0 &&
		(got.TCP.WScaleOrig != want.TCP.WScaleOrig || got.TCP.WScaleReply != want.TCP.WScaleReply) {
		return fmt.Errorf("%v: window scale %d/%d, want %d/%d", want.Orig, got.TCP.WScaleOrig, got.TCP.WScaleReply, want.TCP.WScaleOrig, want.TCP.WScaleReply)
	}
	return nil
}

// TestNSCommitDumpDelete commits flows of every kind into a fresh
// namespace's table, reads them back with this package's Dump and with
// ti-mo/conntrack's (the reference decoder), commits them again with new
// timeouts (updated in place, not duplicated), and deletes them.
func TestNSCommitDumpDelete(t *testing.T) {
	ns, k := openNS(t, "ct")
	ctx := context.Background()
	flows := testFlows(3000)
	res, err := k.Commit(ctx, flows, CommitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Committed != len(flows) || res.Failed != 0 {
		t.Fatalf("commit: %+v", res)
	}
	got := dumpAll(t, k)
	if len(got) != len(flows) {
		t.Fatalf("dump holds %d entries, committed %d", len(got), len(flows))
	}
	for _, f := range flows {
		if err := sameFlow(f, got[f.Orig]); err != nil {
			t.Fatal(err)
		}
	}
	// The reference decoder reads the same entries.
	var ref []ct.Flow
	err = ns.Do(func() error {
		c, err := ct.Dial(nil)
		if err != nil {
			return err
		}
		defer c.Close()
		ref, err = c.Dump(nil)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(ref) != len(flows) {
		t.Fatalf("ti-mo dump: %d entries", len(ref))
	}
	for _, r := range ref {
		o := r.TupleOrig
		tu := MakeTuple(o.Proto.Protocol, o.IP.SourceAddress, o.IP.DestinationAddress, o.Proto.SourcePort, o.Proto.DestinationPort)
		if o.Proto.Protocol == ProtoICMP {
			tu.SrcPort, tu.DstPort = o.Proto.ICMPID, uint16(o.Proto.ICMPType)<<8|uint16(o.Proto.ICMPCode)
		}
		f, ok := got[tu]
		if !ok {
			t.Fatalf("ti-mo sees %v, this decoder does not", r.TupleOrig)
		}
		if uint32(r.Status) != f.Status || r.Mark != f.Mark || r.Zone != f.Zone || r.TupleReply.IP.SourceAddress != f.Reply.SrcAddr() {
			t.Fatalf("decoders differ on %v: ti-mo %+v, here %+v", tu, r, f)
		}
		if r.ProtoInfo.TCP != nil && (r.ProtoInfo.TCP.State != f.TCP.State || r.ProtoInfo.TCP.OriginalWindowScale != f.TCP.WScaleOrig) {
			t.Fatalf("decoders differ on %v TCP: ti-mo %+v, here %+v", tu, *r.ProtoInfo.TCP, f.TCP)
		}
	}

	// Again, with other timeouts and a later TCP state: updated in place.
	for i := range flows {
		flows[i].Timeout += 1000
		if flows[i].Orig.Proto == ProtoTCP && flows[i].TCP.State == TCPSynRecv {
			flows[i].TCP.State = TCPEstablished
			flows[i].Status |= StatusAssured
		}
	}
	if res, err := k.Commit(ctx, flows, CommitOptions{}); err != nil || res.Failed != 0 {
		t.Fatalf("second commit: %+v %v", res, err)
	}
	got = dumpAll(t, k)
	if len(got) != len(flows) {
		t.Fatalf("after the second commit the table holds %d entries, want %d (updated, not duplicated)", len(got), len(flows))
	}
	for _, f := range flows {
		if err := sameFlow(f, got[f.Orig]); err != nil {
			t.Fatal("after update: ", err)
		}
	}
	// A commit that would clear ASSURED cannot be a create: the entry is
	// updated in a second pass, keeping the bits the kernel will not clear.
	back := flows[:6]
	for i := range back {
		back[i].Status &^= StatusAssured
		back[i].Timeout = 77
	}
	res, err = k.Commit(ctx, back, CommitOptions{})
	if err != nil || res.Failed != 0 || res.Retried == 0 {
		t.Fatalf("commit clearing ASSURED: %+v %v", res, err)
	}
	if g := dumpAll(t, k)[back[0].Orig]; g.Timeout > 77 || g.Timeout < 70 {
		t.Fatalf("retried update did not set the timeout: %+v", g)
	}

	n, err := k.Delete(ctx, flows[:1000])
	if err != nil || n != 1000 {
		t.Fatalf("delete: %d %v", n, err)
	}
	if n, err := k.Delete(ctx, flows[:10]); err != nil || n != 0 {
		t.Fatalf("delete of deleted entries: %d %v", n, err)
	}
	if got := dumpAll(t, k); len(got) != len(flows)-1000 {
		t.Fatalf("after deleting 1000 the table holds %d", len(got))
	}
}

// TestNSCommitNAT commits a source-NAT flow: the kernel sets up the
// translation from CTA_NAT_SRC, so the entry reads back with SRC_NAT and
// the reply tuple the master had.
func TestNSCommitNAT(t *testing.T) {
	_, k := openNS(t, "nat")
	var f Flow
	f.Orig = MakeTuple(ProtoTCP, netip.MustParseAddr("10.70.0.5"), netip.MustParseAddr("198.18.1.100"), 40000, 443)
	f.Reply = MakeTuple(ProtoTCP, netip.MustParseAddr("198.18.1.100"), netip.MustParseAddr("198.18.1.1"), 443, 61000)
	f.Status = StatusSeenReply | StatusAssured | StatusConfirmed | StatusSrcNAT | StatusSrcNATDone
	f.TCP = TCPInfo{Set: true, State: TCPEstablished}
	f.Timeout = 3600
	if !f.NAT() {
		t.Fatal("test flow is not NAT")
	}
	res, err := k.Commit(context.Background(), []Flow{f}, CommitOptions{})
	if err != nil || res.Failed != 0 {
		t.Fatalf("commit NAT flow: %+v %v", res, err)
	}
	g := dumpAll(t, k)[f.Orig]
	if g.Reply != f.Reply || g.Status&StatusSrcNAT == 0 {
		t.Fatalf("NAT flow read back as %v (status %#x), want reply %v with SRC_NAT", &g, g.Status, f.Reply)
	}
	// Committed again (the entry exists): updated without the NAT setup.
	f.Timeout = 1800
	res, err = k.Commit(context.Background(), []Flow{f}, CommitOptions{})
	if err != nil || res.Failed != 0 || res.Retried != 1 {
		t.Fatalf("recommit NAT flow: %+v %v", res, err)
	}
}

// TestNSEvents: committing, updating and deleting entries produces NEW,
// UPDATE and DESTROY events with the flows' tuples.
func TestNSEvents(t *testing.T) {
	_, k := openNS(t, "ev")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	count := map[EventType]int{}
	done := make(chan error, 1)
	go func() {
		done <- k.Events(ctx, func(ev *Event) {
			mu.Lock()
			count[ev.Type]++
			mu.Unlock()
		})
	}()
	time.Sleep(100 * time.Millisecond) // subscribed
	flows := testFlows(600)
	if _, err := k.Commit(ctx, flows, CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	for i := range flows {
		flows[i].Mark = 42 // a change the kernel reports
	}
	if _, err := k.Commit(ctx, flows, CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Delete(ctx, flows); err != nil {
		t.Fatal(err)
	}
	want := map[EventType]int{EventNew: 600, EventUpdate: 600, EventDestroy: 600}
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		ok := count[EventNew] >= 600 && count[EventUpdate] >= 600 && count[EventDestroy] >= 600
		got := fmt.Sprint(count)
		mu.Unlock()
		if ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("events %s, want %v", got, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("events ended with %v", err)
	}
}

// openNS opens the conntrack table of a fresh namespace, closed when the
// test ends.
func openNS(t *testing.T, name string) (*netlab.NS, *Kernel) {
	t.Helper()
	ns, err := netlab.New(t).AddNS(name)
	if err != nil {
		t.Fatal(err)
	}
	k, err := Open(ns.NsHandle())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return ns, k
}

// TestNSDumpCancelled stops a dump of a table larger than one read
// (its context ends at the first entry) and dumps again: the kernel
// keeps a dump open on its socket until its last message is read, so
// the second dump must not go out on the same socket.
func TestNSDumpCancelled(t *testing.T) {
	_, k := openNS(t, "ct")
	flows := testFlows(5000)
	if _, err := k.Commit(context.Background(), flows, CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	seen := 0
	err := k.Dump(ctx, func(*Flow) error {
		if seen++; seen == 1 {
			cancel()
			time.Sleep(50 * time.Millisecond) // the read deadline is set meanwhile
		}
		return nil
	})
	if err != context.Canceled || seen >= len(flows) {
		t.Fatalf("cancelled dump: %v after %d of %d entries", err, seen, len(flows))
	}
	if got := dumpAll(t, k); len(got) != len(flows) {
		t.Fatalf("the dump after a cancelled one read %d entries, want %d", len(got), len(flows))
	}
}

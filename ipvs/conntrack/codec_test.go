package conntrack

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
)

// TestCodecRoundTrip encodes every kind of flow as the commit request the
// kernel gets and decodes it as the event the kernel would send: the
// tuples, TCP state and the rest come back.
func TestCodecRoundTrip(t *testing.T) {
	for _, f := range testFlows(12) {
		var e encoder
		e.commitMsg(&f, 7, false, false)
		var ev Event
		if err := DecodeEvent(e.b, &ev); err != nil {
			t.Fatalf("%v: %v", &f, err)
		}
		if ev.Type != EventNew { // NLM_F_CREATE reads as a new entry
			t.Fatalf("event type %v", ev.Type)
		}
		want := f
		want.Status = f.Status&commitStatus | StatusConfirmed
		if want.TCP.Set {
			want.TCP.FlagsOrig &= tcpFlagMask
			want.TCP.FlagsReply &= tcpFlagMask
		}
		if ev.Flow != want {
			t.Fatalf("round trip:\n got %+v\nwant %+v", ev.Flow, want)
		}
		var d encoder
		d.deleteMsg(&f, 8)
		if err := DecodeEvent(d.b, &ev); err != nil || ev.Type != EventDestroy || ev.Flow.Orig != f.Orig || ev.Flow.Zone != f.Zone {
			t.Fatalf("delete round trip: %+v %v", ev, err)
		}
	}
}

// TestDecodeRefuses: truncated and inconsistent messages are errors, not
// flows.
func TestDecodeRefuses(t *testing.T) {
	f := testFlows(1)[0]
	var e encoder
	e.commitMsg(&f, 1, false, false)
	good := e.b
	cases := map[string][]byte{
		"empty":            nil,
		"header only":      good[:nlmsgHdrLen],
		"truncated":        good[:len(good)-3],
		"not conntrack":    append([]byte{}, good...),
		"no original":      nil,
		"mixed families":   nil,
		"short attribute ": nil,
	}
	cases["not conntrack"][4] = 0x55
	{
		var e encoder
		s := e.msg(msgCTNew, nlmFRequest, 1, afInet)
		e.u32(ctaTimeout, 5)
		e.end(s)
		cases["no original"] = e.b
	}
	{
		var e encoder
		s := e.msg(msgCTNew, nlmFRequest, 1, afInet)
		e.open(ctaTupleOrig)
		e.open(ctaTupleIP)
		a4, a6 := netip.MustParseAddr("10.0.0.1").As16(), netip.MustParseAddr("2001:db8::1").As16()
		e.addr(ctaIPv4Src, &a4, false)
		e.addr(ctaIPv6Dst, &a6, true)
		e.close()
		e.open(ctaTupleProto)
		e.attr(ctaProtoNum, 50)
		e.close()
		e.close()
		e.end(s)
		cases["mixed families"] = e.b
	}
	{
		var e encoder
		s := e.msg(msgCTNew, nlmFRequest, 1, afInet)
		e.tuple(ctaTupleOrig, &f.Orig)
		e.attr(ctaTimeout, 1, 2) // two bytes of a u32
		e.end(s)
		cases["short attribute "] = e.b
	}
	for name, b := range cases {
		var ev Event
		if err := DecodeEvent(b, &ev); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: decoded as %+v, err %v", name, ev, err)
		}
	}
}

// FuzzDecodeEvent: whatever the kernel (or a corrupted buffer) hands the
// decoder, it returns a flow or ErrMalformed, never panics, and a flow it
// returns has a complete original tuple.
func FuzzDecodeEvent(f *testing.F) {
	for _, fl := range testFlows(6) {
		var e encoder
		e.commitMsg(&fl, 1, true, false)
		f.Add(e.b)
		var d encoder
		d.deleteMsg(&fl, 2)
		f.Add(d.b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var ev Event
		err := DecodeEvent(b, &ev)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error not ErrMalformed: %v", err)
			}
			return
		}
		if ev.Flow.Orig.V6 != ev.Flow.Reply.V6 {
			t.Fatalf("decoded flow mixes families: %+v", ev.Flow)
		}
		_ = ev.Flow.String()
	})
}

// BenchmarkDecodeFlowReference decodes the same message as
// BenchmarkDecodeFlow through ti-mo/conntrack (Event.Unmarshal), the
// reference decoder this package's tests compare against: the reason the
// replication's hot path has its own codec.
//
//	go test -run '^$' -bench 'DecodeFlow' -count 5 ./ipvs/conntrack/
func BenchmarkDecodeFlowReference(b *testing.B) {
	fl := testFlows(1)[0]
	var e encoder
	e.commitMsg(&fl, 1, false, false)
	m := netlink.Message{Header: netlink.Header{Length: binary.NativeEndian.Uint32(e.b), Type: netlink.HeaderType(binary.NativeEndian.Uint16(e.b[4:])),
		Flags: netlink.HeaderFlags(binary.NativeEndian.Uint16(e.b[6:]))}, Data: e.b[16:]}
	var ev ct.Event
	if err := ev.Unmarshal(m); err != nil || ev.Flow == nil || ev.Flow.TupleOrig.Proto.Protocol != fl.Orig.Proto {
		b.Fatalf("reference decoder: %v %+v", err, ev.Flow)
	}
	b.ReportAllocs()
	for b.Loop() {
		var ev ct.Event // it refuses to decode into a used Event
		if err := ev.Unmarshal(m); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecodeFlow(b *testing.B) {
	fl := testFlows(1)[0]
	var e encoder
	e.commitMsg(&fl, 1, false, false)
	var ev Event
	b.ReportAllocs()
	for b.Loop() {
		if err := DecodeEvent(e.b, &ev); err != nil {
			b.Fatal(err)
		}
	}
}

package report

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/cputime"
	"github.com/tunneldirector/tunneldirector/xfrm"
)

// nodeReport is a full report of a node with n tunnels of one CHILD_SA
// (two SAs) and one /27 each.
func nodeReport(node string, n int) *Report {
	ts := make([]xfrm.Tunnel, n)
	for i := range ts {
		v := uint32(10<<24|128<<16) + uint32(i)*32
		ts[i] = xfrm.Tunnel{
			Peer:    netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)}),
			Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), 27)},
			SAs:     2, Bytes: 123456789, Packets: 98765, LastUse: 1764410400,
			SPIs: []xfrm.SPI{{SPI: 0xc0000000 + uint32(2*i), Reqid: uint32(i + 1), Dir: xfrm.In, Proto: "esp"},
				{SPI: 0xc0000001 + uint32(2*i), Reqid: uint32(i + 1), Dir: xfrm.Out, Proto: "esp"}},
		}
	}
	return &Report{Version: Version, Kind: KindFull, Node: node, Session: session, Seq: 1, Sent: time.Unix(1764410400, 0),
		Tunnels: ts, Summary: xfrm.Summary{SAs: 2 * n, Tunnels: n}}
}

func BenchmarkMarshalFull(b *testing.B) {
	r := nodeReport("n", 5000) // 10,000 SAs
	body, _ := Marshal(r)
	b.SetBytes(int64(len(body)))
	b.ReportMetric(float64(len(body)), "bytes/report")
	defer cputime.PerOp(b)()
	for b.Loop() {
		if _, err := Marshal(r); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeFull is the director's strict decoding of a full report
// of a node with 10,000 SAs.
func BenchmarkDecodeFull(b *testing.B) {
	body, _ := Marshal(nodeReport("n", 5000))
	b.SetBytes(int64(len(body)))
	defer cputime.PerOp(b)()
	for b.Loop() {
		if _, err := Decode(bytes.NewReader(body), Limits{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkInboxFarm is the director's side of a takeover: 64 nodes with
// 2,000 SAs each send their full reports, which are decoded and applied.
// (The director's merge into its table comes on top.)
func BenchmarkInboxFarm(b *testing.B) {
	bodies := make([][]byte, 64)
	for i := range bodies {
		bodies[i], _ = Marshal(nodeReport(fmt.Sprintf("node-%d", i), 1000))
	}
	defer cputime.PerOp(b)()
	for b.Loop() {
		in := NewInbox()
		for i, body := range bodies {
			r, err := Decode(bytes.NewReader(body), Limits{})
			if err != nil {
				b.Fatal(err)
			}
			if _, _, err := in.Accept(fmt.Sprintf("node-%d", i), r, time.Now()); err != nil {
				b.Fatal(err)
			}
		}
	}
}

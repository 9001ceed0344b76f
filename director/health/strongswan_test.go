package health

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/director/health/ike"
	"github.com/tunneldirector/tunneldirector/internal/charon"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// exchange sends req from namespace ns to dst and returns the first
// answer (nil after timeout).
func exchange(t *testing.T, ns *netlab.NS, dst netip.AddrPort, req []byte) []byte {
	t.Helper()
	conn, err := dialIn(ns)(context.Background(), "udp", netip.Addr{}, dst)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write(req); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	if err != nil {
		return nil
	}
	return buf[:n]
}

// acceptableRequest is the control: a request whose KE is in the group
// charon wants (curve25519), which it accepts.
func acceptableRequest(t *testing.T) ([]byte, uint64) {
	var b [72]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	spi := binary.BigEndian.Uint64(b[:8]) | 1
	m, err := ike.Parse(ike.ProbeRequest(spi, b[8:40], b[40:]))
	if err != nil {
		t.Fatal(err)
	}
	m.Payloads[1].Body = ike.KE{Group: ike.DHCurve25519, Data: b[8:40]}.Marshal()
	return m.Marshal(), spi
}

// TestIKEProbeStrongSwan probes a real charon (DESIGN.md's settings) in a
// node namespace on the host kernel: without a connection for the
// director's address it answers NO_PROPOSAL_CHOSEN, with one
// INVALID_KE_PAYLOAD, and in both cases destroys the IKE_SA at once: no
// half-open SA remains, however many probes come. The control shows why
// the probe offers its KE in a group nobody uses: a request charon
// accepts leaves a half-open IKE_SA behind for each, and after three of
// them from one address charon demands cookies (of real peers too).
//
// With TD_IKE_CAPTURE=1 it writes charon's answers to ike/testdata, the
// seed corpus of the decoder's fuzz tests.
func TestIKEProbeStrongSwan(t *testing.T) {
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 1, Nodes: 1})
	dir, node := top.Directors[0].NS, top.Nodes[0].NS
	dirAddr, nodeAddr := top.Directors[0].If(netlab.IfInside).Addr4, top.Nodes[0].If(netlab.IfInside).Addr4
	ch := charon.Start(t, node, charon.Options{})
	chk := &checker{dial: dialIn(dir), source4: dirAddr}
	dst := netip.AddrPortFrom(nodeAddr, 500)
	capture := map[string][]byte{}
	spiOf := func(b []byte) uint64 { return binary.BigEndian.Uint64(b) }

	r := ikeOnce(t, chk, dst)
	if !r.OK || r.Detail != "NO_PROPOSAL_CHOSEN" {
		t.Fatalf("charon without a connection: %+v%s", r, ch.LogTail())
	}
	req := ike.ProbeRequest(0x1111222233334444, make([]byte, 32), make([]byte, 32))
	capture["no-proposal"] = exchange(t, dir, dst, req)

	ch.LoadConnection()
	// Probes come far faster than in service (1 s apart per director):
	// on a loaded machine charon may still be tearing down the last
	// ones' IKE_SAs when the next arrives and ask for a COOKIE (it does
	// from 3 half-open SAs of one address on): also an answer, counted.
	const probes = 20
	invalidKE, cookies := 0, 0
	for i := 0; i < probes; i++ {
		r := ikeOnce(t, chk, dst)
		switch {
		case r.OK && r.Detail == "INVALID_KE_PAYLOAD (group 31)":
			invalidKE++
		case r.OK && r.Detail == "COOKIE":
			cookies++
		default:
			t.Fatalf("probe %d: %+v%s", i, r, ch.LogTail())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if invalidKE < probes/2 {
		t.Fatalf("%d INVALID_KE_PAYLOAD and %d COOKIE answers of %d probes%s", invalidKE, cookies, probes, ch.LogTail())
	}
	// charon logs asynchronously: give it a moment for the last lines.
	time.Sleep(100 * time.Millisecond)
	capture["invalid-ke"] = exchange(t, dir, dst, req)
	if sas := ch.Swanctl("--list-sas"); strings.Contains(sas, "IKEv2") {
		t.Fatalf("probes left IKE_SAs on the node:\n%s", sas)
	}
	log := ch.Log()
	if n := strings.Count(log, fmt.Sprintf("DH group (%d) unacceptable, requesting CURVE_25519", ike.ProbeGroup)); n < invalidKE {
		t.Fatalf("charon logged %d rejections of the probe group, want %d or more%s", n, invalidKE, ch.LogTail())
	}
	if n := strings.Count(log, "CONNECTING => DESTROYING"); n < invalidKE {
		t.Fatalf("charon destroyed %d IKE_SAs at once, want %d or more%s", n, invalidKE, ch.LogTail())
	}

	// The control: acceptable requests leave half-open SAs, then cookies.
	kinds := map[ike.AnswerKind]int{}
	for i := 0; i < 6; i++ {
		req, spi := acceptableRequest(t)
		b := exchange(t, dir, dst, req)
		a, err := ike.CheckResponse(b, spi)
		if err != nil {
			t.Fatalf("control %d: %v", i, err)
		}
		kinds[a.Kind]++
		switch a.Kind {
		case ike.Accepted:
			capture["accepted"] = b
		case ike.CookieRequested:
			capture["cookie"] = b
		}
	}
	sas := ch.Swanctl("--list-sas")
	t.Logf("control: %d accepted, %d cookie requests; half-open SAs left: %d", kinds[ike.Accepted], kinds[ike.CookieRequested], strings.Count(sas, "CONNECTING"))
	if kinds[ike.Accepted] == 0 || strings.Count(sas, "CONNECTING") != kinds[ike.Accepted] {
		t.Fatalf("control: accepted %d, SAs:\n%s", kinds[ike.Accepted], sas)
	}
	if kinds[ike.CookieRequested] == 0 {
		t.Fatalf("control: charon never asked for a cookie after %d half-open SAs", kinds[ike.Accepted])
	}
	// Under cookie pressure the probe still gets an answer: alive.
	if r := ikeOnce(t, chk, dst); !r.OK {
		t.Fatalf("probe under cookie pressure: %+v", r)
	}

	for name, b := range capture {
		a, err := ike.CheckResponse(b, spiOf(b))
		if err != nil {
			t.Fatalf("captured %s: %v", name, err)
		}
		t.Logf("captured %s: %d bytes, %s", name, len(b), a)
	}
	if os.Getenv("TD_IKE_CAPTURE") == "1" {
		for name, b := range capture {
			if err := os.WriteFile(filepath.Join("ike", "testdata", "strongswan-"+name+".bin"), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

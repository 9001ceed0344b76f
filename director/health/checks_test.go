package health

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/ikeresponder"
)

func ikeOnce(t *testing.T, c *checker, dst netip.AddrPort) CheckResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 800*time.Millisecond)
	defer cancel()
	return c.ike(ctx, dst, 250*time.Millisecond)
}

// startResponder starts a Go IKE responder on addr, closed when the test
// ends.
func startResponder(tb testing.TB, addr string) *ikeresponder.Responder {
	tb.Helper()
	r, err := ikeresponder.Listen(netip.MustParseAddrPort(addr))
	if err != nil {
		tb.Fatal(err)
	}
	r.Start()
	tb.Cleanup(func() { r.Close() })
	return r
}

// The IKE check on loopback against the test responder in every mode: only
// a well-formed response with the probe's SPI from the probed address and
// port counts.
func TestIKECheckAgainstResponder(t *testing.T) {
	r := startResponder(t, "127.0.0.1:0")
	other, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	r.SetOther(other)
	c := &checker{dial: dialKernel}
	for _, tc := range []struct {
		mode   ikeresponder.Mode
		ok     bool
		detail string // substring of Detail or Err
	}{
		{ikeresponder.LikeStrongSwan, true, "INVALID_KE_PAYLOAD (group 31)"},
		{ikeresponder.NoProposal, true, "NO_PROPOSAL_CHOSEN"},
		{ikeresponder.Cookie, true, "COOKIE"},
		{ikeresponder.Silent, false, "requests, no answer)"},
		{ikeresponder.WrongSPI, false, "not the answer to this probe"},
		{ikeresponder.Truncated, false, "malformed IKE message"},
		{ikeresponder.AsRequest, false, "not a responder's response"},
		{ikeresponder.FromOther, false, "timeout"},
	} {
		r.SetMode(tc.mode)
		before := r.Requests()
		res := ikeOnce(t, c, r.Addr())
		text := res.Detail + res.Err
		if res.OK != tc.ok || !strings.Contains(text, tc.detail) {
			t.Errorf("mode %d: ok=%v %q, want ok=%v %q", tc.mode, res.OK, text, tc.ok, tc.detail)
		}
		if tc.ok && (res.Latency <= 0 || r.Requests()-before != 1) {
			t.Errorf("mode %d: latency %s, %d requests", tc.mode, res.Latency, r.Requests()-before)
		}
		// Sent at 0, 250, 500 and 750 ms; a loaded machine may miss the
		// last one, but the request must have been resent.
		if n := r.Requests() - before; !tc.ok && (n < 2 || n > 4) {
			t.Errorf("mode %d: %d requests within the timeout, want 2 to 4 (resent every 250 ms)", tc.mode, n)
		}
	}
	// IPv6.
	r6 := startResponder(t, "[::1]:0")
	if res := ikeOnce(t, c, r6.Addr()); !res.OK || res.Detail != "INVALID_KE_PAYLOAD (group 31)" {
		t.Errorf("IPv6: %+v", res)
	}
	// Nobody listening: the kernel's port unreachable is named.
	addr := r.Addr()
	r.Close()
	res := ikeOnce(t, c, addr)
	if res.OK || !strings.Contains(res.Err, "unreachable") {
		t.Errorf("closed port: %+v", res)
	}
}

func TestTCPAndExecChecks(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	c := &checker{dial: dialKernel}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if r := c.tcp(ctx, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)); !r.OK {
		t.Fatalf("tcp to a listener: %+v", r)
	}
	l.Close()
	if r := c.tcp(ctx, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)); r.OK || !strings.Contains(r.Err, "refused") {
		t.Fatalf("tcp to a closed port: %+v", r)
	}

	dir := t.TempDir()
	script := filepath.Join(dir, "check")
	if err := os.WriteFile(script, []byte("#!/bin/sh\n[ \"$NODE_NAME\" = n1 ] && [ \"$NODE_ADDRESS\" = 192.0.2.11 ] && exit 0\necho \"bad node $NODE_NAME\" >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("192.0.2.11")
	if r := runExec(ctx, "n1", a, []string{script}); !r.OK {
		t.Fatalf("exec passing: %+v", r)
	}
	if r := runExec(ctx, "n2", a, []string{script}); r.OK || r.Err != "exit status 3: bad node n2" {
		t.Fatalf("exec failing: %+v", r)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	if r := runExec(short, "n1", a, []string{"/bin/sleep", "5"}); r.OK || !strings.HasPrefix(r.Err, "timeout, killed") {
		t.Fatalf("exec hanging: %+v", r)
	}
}

// A round runs all of a node's checks and passes only when all do.
func TestRoundRunsAllChecks(t *testing.T) {
	r := startResponder(t, "127.0.0.1:0")
	p := DefaultConfig().Params
	p.Checks = []string{CheckIKE, CheckExec, CheckHeartbeat}
	p.IKE.Port = r.Addr().Port()
	p.Exec.Command = []string{"/bin/false"}
	c := &checker{dial: dialKernel}
	res := c.round(context.Background(), "n1", netip.MustParseAddr("127.0.0.1"), p)
	if len(res) != 2 || res[0].Kind != CheckIKE || !res[0].OK || res[1].Kind != CheckExec || res[1].OK {
		t.Fatalf("round: %+v", res)
	}
}

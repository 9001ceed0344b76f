package health

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/tunneldirector/tunneldirector/director/health/ike"
)

// dialFunc opens a connected socket from local (invalid: the kernel
// chooses) to remote. The namespace tests replace it to open sockets in
// the director's namespace.
type dialFunc func(ctx context.Context, network string, local netip.Addr, remote netip.AddrPort) (net.Conn, error)

func dialKernel(ctx context.Context, network string, local netip.Addr, remote netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	if local.IsValid() {
		switch network {
		case "udp":
			d.LocalAddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(local, 0))
		case "tcp":
			d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(local, 0))
		}
	}
	return d.DialContext(ctx, network, remote.String())
}

// checker runs the checks of one round.
type checker struct {
	dial             dialFunc
	source4, source6 netip.Addr
}

func (c *checker) source(dst netip.Addr) netip.Addr {
	if dst.Is4() || dst.Is4In6() {
		return c.source4
	}
	return c.source6
}

// round runs the node's checks (except heartbeat, which the machine
// evaluates) concurrently, each bounded by p.Timeout.
func (c *checker) round(ctx context.Context, name string, addr netip.Addr, p Params) []CheckResult {
	ctx, cancel := context.WithTimeout(ctx, p.Timeout)
	defer cancel()
	type indexed struct {
		i int
		r CheckResult
	}
	var kinds []string
	for _, k := range p.Checks {
		if k != CheckHeartbeat {
			kinds = append(kinds, k)
		}
	}
	run := func(k string) CheckResult {
		switch k {
		case CheckIKE:
			return c.ike(ctx, netip.AddrPortFrom(addr, p.IKE.Port), p.DelayBeforeRetry)
		case CheckTCP:
			return c.tcp(ctx, netip.AddrPortFrom(addr, p.TCP.Port))
		}
		return runExec(ctx, name, addr, p.Exec.Command)
	}
	if len(kinds) == 1 { // the usual case: no goroutine
		return []CheckResult{run(kinds[0])}
	}
	out := make([]CheckResult, len(kinds))
	ch := make(chan indexed, len(kinds))
	for i, k := range kinds {
		go func() { ch <- indexed{i, run(k)} }()
	}
	for range kinds {
		x := <-ch
		out[x.i] = x.r
	}
	return out
}

// ike sends an IKE_SA_INIT probe (ike.ProbeRequest) with a fresh random
// SPI to dst and waits for a well-formed response carrying that SPI,
// resending the same request every retry (when not zero) until ctx ends.
// The socket is connected, so the kernel delivers only datagrams from
// dst; the response is still checked in full (ike.CheckResponse). An ICMP
// port unreachable is remembered for the error but does not end the
// probe: a daemon restarting may still answer a retransmission.
func (c *checker) ike(ctx context.Context, dst netip.AddrPort, retry time.Duration) CheckResult {
	r := CheckResult{Kind: CheckIKE}
	var rnd [8 + 32 + 32]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		r.Err = "random: " + err.Error()
		return r
	}
	spi := binary.BigEndian.Uint64(rnd[:8])
	if spi == 0 {
		spi = 1
	}
	req := ike.ProbeRequest(spi, rnd[8:40], rnd[40:])
	conn, err := c.dial(ctx, "udp", c.source(dst.Addr()), dst)
	if err != nil {
		r.Err = "socket: " + err.Error()
		return r
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	start := time.Now()
	buf := make([]byte, 2048)
	var sent int
	var refused bool
	var ignored, other error
	for {
		if _, err := conn.Write(req); err != nil {
			if !errors.Is(err, syscall.ECONNREFUSED) {
				r.Err = "send: " + err.Error()
				return r
			}
			refused = true
		}
		sent++
		wait := deadline
		if retry > 0 && time.Until(deadline) > retry {
			wait = time.Now().Add(retry)
		}
		_ = conn.SetReadDeadline(wait)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				var ne net.Error
				switch {
				case errors.As(err, &ne) && ne.Timeout():
				case errors.Is(err, syscall.ECONNREFUSED):
					// An ICMP error is reported once; read on.
					refused = true
					continue
				case errors.Is(err, net.ErrClosed):
				default:
					other = err
					continue
				}
				break // deadline: resend or give up
			}
			a, err := ike.CheckResponse(buf[:n], spi)
			if err != nil {
				ignored = err
				continue
			}
			r.OK, r.Detail, r.Latency = true, a.String(), time.Since(start)
			return r
		}
		if ctx.Err() != nil || !time.Now().Before(deadline) {
			break
		}
	}
	switch {
	case ignored != nil:
		r.Err = fmt.Sprintf("no valid answer to %d requests (ignored: %v)", sent, ignored)
	case refused:
		r.Err = fmt.Sprintf("port %d unreachable", dst.Port())
	case other != nil:
		r.Err = fmt.Sprintf("no answer to %d requests: %v", sent, other)
	default:
		r.Err = fmt.Sprintf("timeout (%d requests, no answer)", sent)
	}
	return r
}

func (c *checker) tcp(ctx context.Context, dst netip.AddrPort) CheckResult {
	r := CheckResult{Kind: CheckTCP}
	start := time.Now()
	conn, err := c.dial(ctx, "tcp", c.source(dst.Addr()), dst)
	if err != nil {
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			r.Err = fmt.Sprintf("port %d refused", dst.Port())
		case ctx.Err() != nil:
			r.Err = fmt.Sprintf("connect to port %d: timeout", dst.Port())
		default:
			r.Err = "connect: " + err.Error()
		}
		return r
	}
	conn.Close()
	r.OK, r.Detail, r.Latency = true, fmt.Sprintf("port %d connected", dst.Port()), time.Since(start)
	return r
}

// runExec runs the exec check's command; exit status 0 passes. The
// command gets NODE_NAME and NODE_ADDRESS, and is killed at the round's
// timeout.
func runExec(ctx context.Context, name string, addr netip.Addr, argv []string) CheckResult {
	r := CheckResult{Kind: CheckExec}
	start := time.Now()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "NODE_NAME="+name, "NODE_ADDRESS="+addr.String())
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// A child that keeps the pipes open must not hold the round.
	cmd.WaitDelay = 100 * time.Millisecond
	err := cmd.Run()
	r.Latency = time.Since(start)
	if err == nil {
		r.OK, r.Detail = true, "exit status 0"
		return r
	}
	msg := err.Error()
	if ctx.Err() != nil {
		msg = "timeout, killed"
	}
	if line, _, _ := strings.Cut(strings.TrimSpace(out.String()), "\n"); line != "" {
		if len(line) > 200 {
			line = line[:200]
		}
		msg += ": " + line
	}
	r.Err = msg
	return r
}

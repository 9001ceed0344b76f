package health

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/tunneldirector/tunneldirector/internal/ikeresponder"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// dialIn opens the checks' sockets in namespace ns.
func dialIn(ns *netlab.NS) dialFunc {
	return func(ctx context.Context, network string, local netip.Addr, remote netip.AddrPort) (net.Conn, error) {
		var c net.Conn
		err := ns.Do(func() error {
			var err error
			c, err = dialKernel(ctx, network, local, remote)
			return err
		})
		return c, err
	}
}

// responderNode is an IKE responder of either kind in a node namespace,
// which a test kills and restarts.
type responderNode interface {
	Kill()
	Restart()
}

type goResponder struct {
	t    testing.TB
	ns   *netlab.NS
	addr netip.AddrPort
	r    *ikeresponder.Responder
}

func newGoResponder(t testing.TB, ns *netlab.NS, addr netip.AddrPort) *goResponder {
	g := &goResponder{t: t, ns: ns, addr: addr}
	g.Restart()
	t.Cleanup(g.Kill)
	return g
}

// Restart listens again, in the node's namespace (nil: the current one).
func (g *goResponder) Restart() {
	g.t.Helper()
	listen := func() error {
		r, err := ikeresponder.Listen(g.addr)
		g.r = r
		return err
	}
	var err error
	if g.ns != nil {
		err = g.ns.Do(listen)
	} else {
		err = listen()
	}
	if err != nil {
		g.t.Fatalf("responder on %s: %v", g.addr, err)
	}
	g.r.Start()
}

// Kill closes the responder.
func (g *goResponder) Kill() {
	if g.r != nil {
		if err := g.r.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			g.t.Errorf("close responder: %v", err)
		}
		g.r = nil
	}
}

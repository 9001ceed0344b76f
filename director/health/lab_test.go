package health

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

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

const (
	charonBin  = "/usr/lib/ipsec/charon"
	swanctlBin = "/usr/sbin/swanctl"
)

// requireStrongSwan stops the test (skip, or fail in CI) when charon or
// swanctl is missing.
func requireStrongSwan(t testing.TB) {
	t.Helper()
	for _, p := range []string{charonBin, swanctlBin} {
		if _, err := os.Stat(p); err != nil {
			netlab.Require(t, "strongSwan's charon and swanctl (apt-get install strongswan-charon strongswan-swanctl; scripts/lab-deps.sh installs them)", err)
		}
	}
}

// charon is a strongSwan IKE daemon in a node namespace, with its own
// configuration, vici socket and log, and its own tmpfs on /run (a mount
// namespace) so that several run side by side with their pid files. The
// settings are DESIGN.md's.
type charon struct {
	t      testing.TB
	ns     *netlab.NS
	dir    string
	cmd    *exec.Cmd
	exited chan error
	// conn loads a connection accepting any address (IKE proposal
	// aes128-sha256-x25519): the probe then gets INVALID_KE_PAYLOAD
	// instead of NO_PROPOSAL_CHOSEN.
	conn bool
}

func newCharon(t testing.TB, ns *netlab.NS, conn bool) *charon {
	t.Helper()
	requireStrongSwan(t)
	dir, err := os.MkdirTemp("", "td-charon-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c := &charon{t: t, ns: ns, dir: dir, conn: conn}
	conf := fmt.Sprintf(`charon {
	load_modular = no
	load = random nonce openssl aes sha1 sha2 hmac gcm kdf kernel-netlink socket-default vici
	install_routes = no
	filelog {
		log {
			path = %[1]s/charon.log
			default = 1
			ike = 2
			cfg = 2
			flush_line = yes
		}
	}
	plugins {
		vici {
			socket = unix://%[1]s/charon.vici
		}
	}
}
swanctl {
	load = pem pkcs1 x509 revocation constraints pubkey openssl random
}
`, dir)
	swan := `connections {
	node {
		local_addrs = %any
		proposals = aes128-sha256-x25519
		local {
			auth = psk
			id = node
		}
		remote {
			auth = psk
		}
		children {
			c {
				esp_proposals = aes128gcm16
			}
		}
	}
}
secrets {
	ike-1 {
		secret = "health-test-secret-0123456789"
	}
}
`
	for name, body := range map[string]string{"strongswan.conf": conf, "swanctl.conf": swan} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c.start()
	t.Cleanup(c.stop)
	return c
}

func (c *charon) start() {
	c.t.Helper()
	sock := filepath.Join(c.dir, "charon.vici")
	os.Remove(sock)
	cmd := exec.Command("/bin/sh", "-c", "mount -t tmpfs tmpfs /run && exec "+charonBin)
	cmd.Env = append(os.Environ(), "STRONGSWAN_CONF="+filepath.Join(c.dir, "strongswan.conf"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := os.OpenFile(filepath.Join(c.dir, "stdout"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		c.t.Fatal(err)
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	if err := c.ns.Start(cmd); err != nil {
		c.t.Fatal(err)
	}
	c.cmd = cmd
	c.exited = make(chan error, 1)
	go func() { c.exited <- cmd.Wait() }()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-c.exited:
			b, _ := os.ReadFile(filepath.Join(c.dir, "stdout"))
			c.cmd = nil
			c.t.Fatalf("charon in %s exited at start: %v: %s%s", c.ns.Name, err, b, c.logTail())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("charon in %s: no vici socket after 15s%s", c.ns.Name, c.logTail())
		}
	}
	if c.conn {
		c.swanctl("--load-all", "--file", filepath.Join(c.dir, "swanctl.conf"))
	}
}

// kill kills charon with SIGKILL: the node's IKE daemon dies.
func (c *charon) kill() {
	if c.cmd == nil {
		return
	}
	_ = c.cmd.Process.Kill()
	select {
	case <-c.exited:
	case <-time.After(10 * time.Second):
		c.t.Errorf("charon in %s did not exit after SIGKILL", c.ns.Name)
	}
	c.cmd = nil
}

func (c *charon) stop() { c.kill() }

func (c *charon) swanctl(args ...string) string {
	c.t.Helper()
	args = append(args, "--uri", "unix://"+filepath.Join(c.dir, "charon.vici"))
	cmd := exec.Command(swanctlBin, args...)
	cmd.Env = append(os.Environ(), "STRONGSWAN_CONF="+filepath.Join(c.dir, "strongswan.conf"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		c.t.Fatalf("swanctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func (c *charon) log() string {
	b, _ := os.ReadFile(filepath.Join(c.dir, "charon.log"))
	return string(b)
}

func (c *charon) logTail() string {
	l := c.log()
	if len(l) > 3000 {
		l = l[len(l)-3000:]
	}
	return "\ncharon.log:\n" + l
}

// responderNode is an IKE responder of either kind in a node namespace,
// which a test kills and restarts.
type responderNode interface {
	kill()
	restart()
}

type goResponder struct {
	t    testing.TB
	ns   *netlab.NS
	addr netip.AddrPort
	r    *ikeresponder.Responder
}

func newGoResponder(t testing.TB, ns *netlab.NS, addr netip.AddrPort) *goResponder {
	g := &goResponder{t: t, ns: ns, addr: addr}
	g.restart()
	t.Cleanup(g.kill)
	return g
}

// restart listens again, in the node's namespace (nil: the current one).
func (g *goResponder) restart() {
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

func (g *goResponder) kill() {
	if g.r != nil {
		if err := g.r.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			g.t.Errorf("close responder: %v", err)
		}
		g.r = nil
	}
}

func (c *charon) restart() { c.start() }

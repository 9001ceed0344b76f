// Package charon is a test helper: strongSwan's IKE daemon (charon) in a
// network namespace of the test lab, with its own configuration, vici
// socket and log, and its own tmpfs on /run (a mount namespace) so that
// several run side by side with their pid files. The settings are
// DESIGN.md's (strongSwan 5.9.8, load_modular = no, install_routes = no).
// The health checks' tests probe it, and the end-to-end tests kill and
// restart it as a node's IKE daemon dies and comes back.
package charon

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// Where Debian's strongswan-charon and strongswan-swanctl put them.
const (
	Bin        = "/usr/lib/ipsec/charon"
	SwanctlBin = "/usr/sbin/swanctl"
)

// Require stops the test (skip, or fail in CI) when charon or swanctl is
// missing.
func Require(t testing.TB) {
	t.Helper()
	for _, p := range []string{Bin, SwanctlBin} {
		if _, err := os.Stat(p); err != nil {
			netlab.Require(t, "strongSwan's charon and swanctl (apt-get install strongswan-charon strongswan-swanctl; scripts/lab-deps.sh installs them)", err)
		}
	}
}

// Options configure a charon.
type Options struct {
	// Connection loads a connection accepting any address (IKE proposal
	// aes128-sha256-x25519, PSK): a probe then gets INVALID_KE_PAYLOAD
	// instead of NO_PROPOSAL_CHOSEN.
	Connection bool
}

// Daemon is one charon in a namespace.
type Daemon struct {
	t      testing.TB
	ns     *netlab.NS
	dir    string
	opts   Options
	cmd    *exec.Cmd
	exited chan error
}

// Start runs charon in ns until the test ends (or Kill).
func Start(t testing.TB, ns *netlab.NS, o Options) *Daemon {
	t.Helper()
	Require(t)
	dir, err := os.MkdirTemp("", "td-charon-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	c := &Daemon{t: t, ns: ns, dir: dir, opts: o}
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
	c.Restart()
	t.Cleanup(c.Kill)
	return c
}

// Restart starts charon again (after Kill) and waits for its vici socket.
func (c *Daemon) Restart() {
	c.t.Helper()
	if c.cmd != nil {
		return
	}
	sock := filepath.Join(c.dir, "charon.vici")
	os.Remove(sock)
	cmd := exec.Command("/bin/sh", "-c", "mount -t tmpfs tmpfs /run && exec "+Bin)
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
			c.t.Fatalf("charon in %s exited at start: %v: %s%s", c.ns.Name, err, b, c.LogTail())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("charon in %s: no vici socket after 15s%s", c.ns.Name, c.LogTail())
		}
	}
	if c.opts.Connection {
		c.LoadConnection()
	}
}

// LoadConnection loads the connection of Options.Connection.
func (c *Daemon) LoadConnection() {
	c.t.Helper()
	c.Swanctl("--load-all", "--file", filepath.Join(c.dir, "swanctl.conf"))
}

// Kill kills charon with SIGKILL: the node's IKE daemon dies.
func (c *Daemon) Kill() {
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

// Swanctl runs swanctl against this charon and returns its output.
func (c *Daemon) Swanctl(args ...string) string {
	c.t.Helper()
	args = append(args, "--uri", "unix://"+filepath.Join(c.dir, "charon.vici"))
	cmd := exec.Command(SwanctlBin, args...)
	cmd.Env = append(os.Environ(), "STRONGSWAN_CONF="+filepath.Join(c.dir, "strongswan.conf"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		c.t.Fatalf("swanctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Log returns charon's log.
func (c *Daemon) Log() string {
	b, _ := os.ReadFile(filepath.Join(c.dir, "charon.log"))
	return string(b)
}

// LogTail returns the end of charon's log, for a failure message.
func (c *Daemon) LogTail() string {
	l := c.Log()
	if len(l) > 3000 {
		l = l[len(l)-3000:]
	}
	return "\ncharon.log:\n" + l
}

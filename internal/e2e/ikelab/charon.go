package ikelab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/strongswan/govici/vici"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

const charonPath = "/usr/lib/ipsec/charon"

// charonConf is each charon's own strongswan.conf. The plugin list is the
// smallest that does PSK with aes128-sha256-x25519 and ESP aes128gcm16
// (fewer plugins start faster under emulation); routes are left alone
// because the lab routes by itself (pings name their source address).
// The example's failover timers are included as they are.
const charonConf = `charon {
	load_modular = no
	load = random nonce openssl aes sha1 sha2 hmac gcm kdf kernel-netlink socket-default vici
	install_routes = no
	plugins {
		vici {
			socket = unix://%[1]s/charon.vici
		}
	}
	filelog {
		lab {
			path = %[1]s/charon.log
			time_format = %%H:%%M:%%S
			default = 1
			cfg = 2
			flush_line = yes
		}
	}
}
swanctl {
	load = random openssl pem pkcs1 x509 revocation constraints pubkey
}
include %[2]s
`

// Charon is one strongSwan IKE daemon in a namespace.
type Charon struct {
	Name string
	ns   *netlab.NS
	// Dir holds its strongswan.conf, swanctl.conf, log and vici socket.
	Dir string
	process
}

func newCharon(name string, ns *netlab.NS, dir string, swanctl []byte, failover string) (*Charon, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("charon %s: %w", name, err)
	}
	c := &Charon{Name: name, ns: ns, Dir: dir}
	if err := os.WriteFile(c.path("strongswan.conf"), []byte(fmt.Sprintf(charonConf, dir, failover)), 0o600); err != nil {
		return nil, fmt.Errorf("charon %s: %w", name, err)
	}
	if err := os.WriteFile(c.path("swanctl.conf"), swanctl, 0o600); err != nil {
		return nil, fmt.Errorf("charon %s: %w", name, err)
	}
	return c, nil
}

func (c *Charon) path(f string) string { return filepath.Join(c.Dir, f) }

func (c *Charon) uri() string { return "unix://" + c.path("charon.vici") }

// Start starts charon in its namespace with a private /run (its pid file
// would clash with the other instances'), waits for its vici socket and
// loads swanctl.conf with swanctl, as an operator would.
func (c *Charon) Start() error {
	if c.Running() {
		return fmt.Errorf("charon %s: already running", c.Name)
	}
	os.Remove(c.path("charon.vici"))
	out, err := os.OpenFile(c.path("charon.out"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("charon %s: %w", c.Name, err)
	}
	defer out.Close()
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "--",
		"/bin/sh", "-c", "mount -t tmpfs tmpfs /run && exec "+charonPath)
	cmd.Env = append(os.Environ(), "STRONGSWAN_CONF="+c.path("strongswan.conf"))
	cmd.Stdout, cmd.Stderr = out, out
	if err := c.ns.Start(cmd); err != nil {
		return fmt.Errorf("charon %s: %w", c.Name, err)
	}
	c.started(cmd)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := c.call("version", nil); err == nil {
			break
		} else if !c.Running() || time.Now().After(deadline) {
			return fmt.Errorf("charon %s: vici did not answer (%v); log:\n%s", c.Name, err, c.LogTail(30))
		}
		time.Sleep(50 * time.Millisecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b, err := exec.CommandContext(ctx, "swanctl", "--load-all", "--noprompt", "--uri", c.uri(), "--file", c.path("swanctl.conf")).CombinedOutput()
	if err != nil {
		return fmt.Errorf("charon %s: swanctl --load-all: %v\n%s", c.Name, err, b)
	}
	return nil
}

// Kill kills charon at once (SIGKILL): no DELETE is sent to its peers, as
// when a node dies. The SAs it installed stay in the kernel.
func (c *Charon) Kill() error {
	if !c.Running() {
		return nil
	}
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("charon %s: kill: %w", c.Name, err)
	}
	select {
	case <-c.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("charon %s: still running 10 s after SIGKILL", c.Name)
	}
}

// LogTail returns the last n lines of charon's log.
func (c *Charon) LogTail(n int) string {
	b, _ := os.ReadFile(c.path("charon.log"))
	o, _ := os.ReadFile(c.path("charon.out"))
	return tail(string(b), n) + tail(string(o), 5)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n") + "\n"
}

func (c *Charon) session() (*vici.Session, error) {
	return vici.NewSession(vici.WithSocketPath(c.path("charon.vici")))
}

func (c *Charon) call(cmd string, in *vici.Message) (*vici.Message, error) {
	s, err := c.session()
	if err != nil {
		return nil, err
	}
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	m, err := s.Call(ctx, cmd, in)
	if err != nil {
		return nil, fmt.Errorf("charon %s: vici %s: %w", c.Name, cmd, err)
	}
	return m, nil
}

// IKESA is an IKE_SA as charon lists it.
type IKESA struct {
	Name         string // the connection's name
	UniqueID     string
	State        string // ESTABLISHED, CONNECTING, DELETING, ...
	LocalHost    string
	RemoteHost   string
	RemotePort   string
	InitiatorSPI string
	ResponderSPI string
	Children     []ChildSA
}

// ChildSA is a CHILD_SA of an IKESA.
type ChildSA struct {
	Name     string
	UniqueID string
	State    string // INSTALLED, REKEYED, ...
	Encap    bool   // ESP in UDP (NAT-T)
	SPIIn    uint32 // the SPI of the ESP this side receives
	SPIOut   uint32 // the SPI of the ESP this side sends
	LocalTS  []string
	RemoteTS []string
}

// Established reports whether the IKE_SA is up with an installed CHILD_SA.
func (s IKESA) Established() bool {
	if s.State != "ESTABLISHED" {
		return false
	}
	for _, ch := range s.Children {
		if ch.State == "INSTALLED" {
			return true
		}
	}
	return false
}

// InstalledSPIs returns the SPIs (in and out) of the installed CHILD_SAs.
func (s IKESA) InstalledSPIs() []uint32 {
	var out []uint32
	for _, ch := range s.Children {
		if ch.State == "INSTALLED" {
			out = append(out, ch.SPIIn, ch.SPIOut)
		}
	}
	return out
}

// The vici messages of list-sas (see strongSwan's vici README).
type viciChild struct {
	Name     string   `vici:"name"`
	UniqueID string   `vici:"uniqueid"`
	State    string   `vici:"state"`
	Encap    string   `vici:"encap"`
	SPIIn    string   `vici:"spi-in"`
	SPIOut   string   `vici:"spi-out"`
	LocalTS  []string `vici:"local-ts"`
	RemoteTS []string `vici:"remote-ts"`
}

type viciIKE struct {
	UniqueID     string               `vici:"uniqueid"`
	State        string               `vici:"state"`
	LocalHost    string               `vici:"local-host"`
	RemoteHost   string               `vici:"remote-host"`
	RemotePort   string               `vici:"remote-port"`
	InitiatorSPI string               `vici:"initiator-spi"`
	ResponderSPI string               `vici:"responder-spi"`
	Children     map[string]viciChild `vici:"child-sas"`
}

// SAs lists charon's IKE_SAs.
//
// Not through govici's CallStreaming: in v0.8.0 it waits on the event and
// the response channel in one select, so when the command's response is
// already queued behind unread events it may pick the response first and
// end the listing early (seen here: 3 of 8 SAs listed under load). Events
// of a subscription are delivered in order before the response instead.
func (c *Charon) SAs() ([]IKESA, error) {
	s, err := c.session()
	if err != nil {
		return nil, fmt.Errorf("charon %s: vici: %w", c.Name, err)
	}
	defer s.Close()
	if err := s.Subscribe("list-sa"); err != nil {
		return nil, fmt.Errorf("charon %s: vici subscribe list-sa: %w", c.Name, err)
	}
	events := make(chan vici.Event, 4096)
	s.NotifyEvents(events)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.Call(ctx, "list-sas", nil); err != nil {
		return nil, fmt.Errorf("charon %s: vici list-sas: %w", c.Name, err)
	}
	var out []IKESA
	for {
		var ev vici.Event
		select {
		case ev = <-events:
		default:
			sort.Slice(out, func(i, j int) bool { return out[i].UniqueID < out[j].UniqueID })
			return out, nil
		}
		m := ev.Message
		// Each list-sa event is one section named after the connection.
		for _, name := range m.Keys() {
			sec, ok := m.Get(name).(*vici.Message)
			if !ok {
				continue
			}
			var v viciIKE
			if err := vici.UnmarshalMessage(sec, &v); err != nil {
				return nil, fmt.Errorf("charon %s: vici list-sas: %s: %w", c.Name, name, err)
			}
			sa := IKESA{Name: name, UniqueID: v.UniqueID, State: v.State, LocalHost: v.LocalHost,
				RemoteHost: v.RemoteHost, RemotePort: v.RemotePort, InitiatorSPI: v.InitiatorSPI, ResponderSPI: v.ResponderSPI}
			for _, ch := range v.Children {
				in, err1 := parseSPI(ch.SPIIn)
				outSPI, err2 := parseSPI(ch.SPIOut)
				if err := errors.Join(err1, err2); err != nil {
					return nil, fmt.Errorf("charon %s: CHILD_SA %s: %w", c.Name, ch.Name, err)
				}
				sa.Children = append(sa.Children, ChildSA{Name: ch.Name, UniqueID: ch.UniqueID, State: ch.State,
					Encap: ch.Encap == "yes", SPIIn: in, SPIOut: outSPI, LocalTS: ch.LocalTS, RemoteTS: ch.RemoteTS})
			}
			sort.Slice(sa.Children, func(i, j int) bool { return sa.Children[i].UniqueID < sa.Children[j].UniqueID })
			out = append(out, sa)
		}
	}
}

// parseSPI reads vici's hex SPI ("c1a2b3d4"); empty is 0 (not yet set).
func parseSPI(s string) (uint32, error) {
	if s == "" {
		return 0, nil
	}
	v, err := strconv.ParseUint(s, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("SPI %q: %w", s, err)
	}
	return uint32(v), nil
}

// RekeyIKE asks charon to rekey the IKE_SA of connection ike: it sends a
// CREATE_CHILD_SA request to the peer (the farm, for a peer's charon).
func (c *Charon) RekeyIKE(ike string) error {
	m := vici.NewMessage()
	if err := m.Set("ike", ike); err != nil {
		return err
	}
	_, err := c.call("rekey", m)
	return err
}

// String formats the SA for logs.
func (s IKESA) String() string {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s#%s %s %s<->%s:%s", s.Name, s.UniqueID, s.State, s.LocalHost, s.RemoteHost, s.RemotePort)
	for _, ch := range s.Children {
		fmt.Fprintf(&b, " [%s#%s %s in=%08x out=%08x encap=%v %v<->%v]", ch.Name, ch.UniqueID, ch.State, ch.SPIIn, ch.SPIOut, ch.Encap, ch.LocalTS, ch.RemoteTS)
	}
	return b.String()
}

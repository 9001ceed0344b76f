package e2e

import (
	"cmp"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/ipvs"
)

// e2e is a farm in namespaces with a real daemon on the director.
type e2e struct {
	t       testing.TB
	top     *netlab.Topology
	dir     string
	config  string
	db      string
	socket  string
	daemon  *exec.Cmd
	logPath string
	caps    []*netlab.Capture
	// apiWait bounds how long start waits for the API (default 20 s).
	apiWait time.Duration
}

func newE2E(t *testing.T) *e2e {
	return newE2EWith(t, netlab.TopologyOptions{Peers: 3, Directors: 1, Nodes: 3, VIPOnDirectors: true}, nil)
}

// newE2EWith builds the farm of o; edit, when set, changes the daemon's
// configuration (baseConfig's text).
func newE2EWith(t testing.TB, o netlab.TopologyOptions, edit func(string) string) *e2e {
	netlab.RequireRoot(t)
	top := netlab.BuildTopology(t, o)
	e := &e2e{t: t, top: top, dir: t.TempDir()}
	e.db = filepath.Join(e.dir, "td.db")
	e.socket = filepath.Join(e.dir, "run", "api.sock")
	e.config = filepath.Join(e.dir, "config.yaml")
	cfg := baseConfig(top, e.db, e.socket)
	if edit != nil {
		cfg = edit(cfg)
	}
	if err := os.WriteFile(e.config, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	e.captureNodes()
	return e
}

// captureNodes starts a packet capture on every node, closed at cleanup.
func (e *e2e) captureNodes() {
	for _, n := range e.top.Nodes {
		c, err := n.Capture("")
		if err != nil {
			e.t.Fatal(err)
		}
		e.t.Cleanup(func() { c.Close() })
		e.caps = append(e.caps, c)
	}
}

// cli runs a CLI command against the running daemon (through its socket).
func (e *e2e) cli(args ...string) string {
	e.t.Helper()
	out, err := runArgs(e.t, append([]string{"--socket", e.socket}, args...)...)
	if err != nil {
		e.t.Fatalf("tunneldirector %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func (e *e2e) status() director.Status {
	e.t.Helper()
	var s director.Status
	if err := json.Unmarshal([]byte(e.cli("--json", "status")), &s); err != nil {
		e.t.Fatal(err)
	}
	return s
}

// start runs the daemon in the director's namespace and waits for its API.
func (e *e2e) start() {
	e.t.Helper()
	e.logPath = filepath.Join(e.dir, fmt.Sprintf("daemon-%d.log", time.Now().UnixNano()))
	logf, err := os.Create(e.logPath)
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := daemonCmd(e.t, e.config)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := e.top.Directors[0].Start(cmd); err != nil {
		e.t.Fatal(err)
	}
	e.daemon = cmd
	e.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
		if e.t.Failed() {
			b, _ := os.ReadFile(e.logPath)
			e.t.Logf("daemon log %s:\n%s", e.logPath, b)
		}
	})
	// Polled in this process (apiStatus): a CLI process per poll cost
	// about 65 ms of CPU (its packages' init), so polling every 20 ms
	// kept more than one of the machine's two cores from the daemon
	// starting up, the start that BenchmarkDaemonScale measures.
	wait := cmp.Or(e.apiWait, 20*time.Second)
	for deadline := time.Now().Add(wait); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if _, err := apiStatus(e.socket); err == nil {
			return
		}
		if cmd.ProcessState != nil {
			break
		}
	}
	b, _ := os.ReadFile(e.logPath)
	e.t.Fatalf("daemon did not come up:\n%s", b)
}

// stop sends SIGTERM and waits: the kernel stays programmed.
func (e *e2e) stop() {
	e.t.Helper()
	e.daemon.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- e.daemon.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			b, _ := os.ReadFile(e.logPath)
			e.t.Fatalf("daemon exited with %v:\n%s", err, b)
		}
	case <-time.After(10 * time.Second):
		e.t.Fatal("daemon did not stop on SIGTERM")
	}
}

var tagSeq atomic.Int64

func newTag(what string) string { return fmt.Sprintf("%s-%d", what, tagSeq.Add(1)) }

// expectAt sends a packet with send(tag) and checks it reaches node want
// and no other node.
func (e *e2e) expectAt(want int, what string, send func(tag string) error) {
	e.t.Helper()
	tag := newTag(what)
	if err := send(tag); err != nil {
		e.t.Fatalf("%s: send: %v", what, err)
	}
	if _, ok := e.caps[want].Wait(3*time.Second, netlab.Tagged(tag)); !ok {
		e.t.Fatalf("%s (tag %s) did not reach node%d", what, tag, want)
	}
	time.Sleep(20 * time.Millisecond)
	for i, c := range e.caps {
		if i != want && c.Count(netlab.Tagged(tag)) > 0 {
			e.t.Fatalf("%s (tag %s) reached node%d too (owner node%d)", what, tag, i, want)
		}
	}
}

// tunnelTraffic checks IKE, NAT-T and ESP from a peer, and return traffic
// to its subnet, all at node want.
func (e *e2e) tunnelTraffic(peer int, subnetHost netip.Addr, want int, v6 bool) {
	e.t.Helper()
	p := e.top.Peers[peer]
	src := p.If(netlab.IfOutside).Addr(v6)
	vip := e.top.VIP4
	if v6 {
		vip = e.top.VIP6
	}
	fam := map[bool]string{false: "v4", true: "v6"}[v6]
	e.expectAt(want, "ike-"+fam, func(tag string) error {
		return p.SendUDP(netip.AddrPortFrom(src, 500), netip.AddrPortFrom(vip, 500), []byte(tag))
	})
	e.expectAt(want, "natt-"+fam, func(tag string) error {
		return p.SendUDP(netip.AddrPortFrom(src, 4500), netip.AddrPortFrom(vip, 4500), []byte(tag))
	})
	e.expectAt(want, "esp-"+fam, func(tag string) error { return p.SendESP(src, vip, 0xc0de0000+uint32(peer), 1, tag) })
	tg := e.top.Target
	e.expectAt(want, "return-"+fam, func(tag string) error {
		return tg.SendUDP(netip.AddrPortFrom(tg.If(netlab.IfTarget).Addr(v6), 40000), netip.AddrPortFrom(subnetHost, 9999), []byte(tag))
	})
}

func (e *e2e) importTunnels(csv string) {
	e.t.Helper()
	f := filepath.Join(e.dir, newTag("tunnels")+".csv")
	os.WriteFile(f, []byte(csv), 0o600)
	e.cli("import", f)
	e.waitKernel()
}

// waitKernel waits until the daemon has applied the table's revision to
// the kernel: reconciling is asynchronous to the commit.
func (e *e2e) waitKernel() {
	e.t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		s, err := apiStatus(e.socket)
		if err != nil {
			daemonAlive(e.t, e.daemon, err, e.logPath)
			e.t.Fatalf("status: %v", err)
		}
		if s.KernelRevision == s.Revision {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("kernel stuck at revision %d, table at %d: %s", s.KernelRevision, s.Revision, s.LastError)
		}
	}
}

// TestDaemonSteersRealPackets runs the daemon in a director namespace on
// the host kernel (route-only mode) and checks with real packets: each
// tunnel's IKE, NAT-T, ESP and return traffic reach its owner node only;
// a move through the CLI redirects the next packets; a restart does not
// lose or misdeliver a packet; a deleted nftables table is repaired.
func TestDaemonSteersRealPackets(t *testing.T) {
	e := newE2E(t)
	e.start()
	p0 := e.top.Peers[0].If(netlab.IfOutside)
	p1 := e.top.Peers[1].If(netlab.IfOutside)
	e.importTunnels(fmt.Sprintf(`id,peer,subnets,node
t0-v4,%s,10.70.0.0/24,node0
t1-v4,%s,10.71.0.0/24,node1
t0-v6,%s,fd70::/64,node2
`, p0.Addr4, p1.Addr4, p0.Addr6))

	e.tunnelTraffic(0, netip.MustParseAddr("10.70.0.9"), 0, false)
	e.tunnelTraffic(1, netip.MustParseAddr("10.71.0.9"), 1, false)
	e.tunnelTraffic(0, netip.MustParseAddr("fd70::9"), 2, true)

	// An unknown peer lands on the node of its bucket in the kernel's
	// bucket map, which BucketPick computes in Go; the daemon then pins
	// it into the table.
	p2 := e.top.Peers[2].If(netlab.IfOutside)
	buckets := readKernel(t, e.top.Directors[0], e.config).Buckets
	if len(buckets) != 4096 {
		t.Fatalf("the kernel holds %d unknown-peer buckets, want the default 4096", len(buckets))
	}
	want := int(ipvs.BucketPick(p2.Addr4, director.DefaultConfig().HashSeed, buckets)) - 1
	e.expectAt(want, "unknown-ike", func(tag string) error {
		return e.top.Peers[2].SendUDP(netip.AddrPortFrom(p2.Addr4, 500), netip.AddrPortFrom(e.top.VIP4, 500), []byte(tag))
	})
	learned := "learned-" + p2.Addr4.String()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := runArgs(t, "--socket", e.socket, "show", "tunnel", learned)
		if err == nil && strings.Contains(out, fmt.Sprintf("node%d", want)) {
			e.waitKernel()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("unknown peer %s not pinned to node%d: %v %s", p2.Addr4, want, err, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.expectAt(want, "learned-esp", func(tag string) error { return e.top.Peers[2].SendESP(p2.Addr4, e.top.VIP4, 0x5150, 1, tag) })

	// Move t0-v4 to node2 through the CLI: the next packets follow.
	e.importTunnels(fmt.Sprintf("id,peer,subnets,node\nt0-v4,%s,10.70.0.0/24,node2\n", p0.Addr4))
	e.tunnelTraffic(0, netip.MustParseAddr("10.70.0.9"), 2, false)

	// Restart: peer1 sends ESP every 5 ms while the daemon stops and a
	// new one starts; every packet must reach node1, none elsewhere.
	stopESP := streamESP(func(seq uint32) error {
		return e.top.Peers[1].SendESP(p1.Addr4, e.top.VIP4, 0xfeed, seq, "restart")
	})
	time.Sleep(100 * time.Millisecond)
	e.stop()
	e.start()
	time.Sleep(200 * time.Millisecond)
	sent := stopESP()
	time.Sleep(100 * time.Millisecond)
	restart := func(p netlab.Packet) bool { return p.Tag == "restart" }
	got := e.caps[1].Count(restart)
	if got != int(sent) || e.caps[0].Count(restart)+e.caps[2].Count(restart) != 0 {
		t.Fatalf("across the restart: sent %d, node1 got %d, other nodes %d", sent, got, e.caps[0].Count(restart)+e.caps[2].Count(restart))
	}
	t.Logf("restart: %d ESP packets sent during stop and start, all %d at the owner", sent, got)

	// Drift: delete the director's nftables table behind its back.
	err := e.top.Directors[0].Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		c.DelTable(&nftables.Table{Name: "tunneldirector", Family: nftables.TableFamilyINet})
		return c.Flush()
	})
	if err != nil {
		t.Fatalf("delete the table: %v", err)
	}
	deadline = time.Now().Add(5 * time.Second)
	for e.status().DriftRepairs == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("drift not repaired within 5 s (verify_interval 1s):\n%s", e.cli("status"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.tunnelTraffic(1, netip.MustParseAddr("10.71.0.9"), 1, false)

	// SIGHUP reloads the configuration: a node added to it joins the table.
	b, _ := os.ReadFile(e.config)
	os.WriteFile(e.config, []byte(strings.Replace(string(b), "api:", "  - {name: node-extra, address: 192.0.2.99}\napi:", 1)), 0o600)
	e.daemon.Process.Signal(syscall.SIGHUP)
	for deadline := time.Now().Add(5 * time.Second); e.status().Nodes != 4; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("SIGHUP did not add the configured node: %+v", e.status())
		}
	}
	e.waitKernel()
	e.tunnelTraffic(1, netip.MustParseAddr("10.71.0.9"), 1, false)
	e.stop()
}

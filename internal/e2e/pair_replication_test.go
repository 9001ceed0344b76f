package e2e

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/ipvs"
)

// pairDirector is one daemon of a replicated pair.
type pairDirector struct {
	host   *netlab.Host
	config string
	socket string
	db     string
	log    string
	cmd    *exec.Cmd
}

func (p *pairDirector) cli(t *testing.T, args ...string) (string, error) {
	t.Helper()
	return runArgs(t, append([]string{"--socket", p.socket}, args...)...)
}

func (p *pairDirector) status(t *testing.T) director.Status {
	t.Helper()
	out, err := p.cli(t, "--json", "status")
	if err != nil {
		t.Fatalf("status: %v %s", err, out)
	}
	var s director.Status
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("status: %v %s", err, out)
	}
	return s
}

// role is the director's pair role as its status reports it ("" when it
// runs without replication).
func (p *pairDirector) role(t *testing.T) string {
	t.Helper()
	if s := p.status(t); s.Replication != nil {
		return s.Replication.Role.String()
	}
	return ""
}

// kernelMaps reads the director's programmed peer and subnet maps.
func (p *pairDirector) kernelMaps(t *testing.T) (map[netip.Addr]uint16, map[netip.Prefix]uint16) {
	t.Helper()
	d := readKernel(t, p.host, p.config)
	return d.Peers, d.Subnets
}

// readKernel reads what the director in host, configured by the file
// config, programmed into its kernel.
func readKernel(t *testing.T, host *netlab.Host, config string) *ipvs.Desired {
	t.Helper()
	cfg, err := director.LoadConfig(config)
	if err != nil {
		t.Fatal(err)
	}
	var d *ipvs.Desired
	err = host.Do(func() error {
		dp, err := ipvs.New(cfg.Dataplane())
		if err != nil {
			return err
		}
		defer dp.Close()
		d, err = dp.Read(t.Context())
		return err
	})
	if err != nil {
		t.Fatalf("read kernel of %s: %v", host.Name, err)
	}
	return d
}

// startPair starts one daemon in each director namespace, replicating
// over the sync link, with the given initial roles.
func startPair(t *testing.T, top *netlab.Topology, dir string, roles ...string) []*pairDirector {
	return startPairWith(t, top, dir, pairOptions{}, roles...)
}

// pairOptions vary the pair's configuration.
type pairOptions struct {
	// extra is appended to both directors' files, after the replication
	// section: keys of that section indented by two spaces, or other
	// top-level sections.
	extra string
	// group, when valid, is the multicast group both directors send to
	// and join on the sync link, instead of unicast to each other.
	group netip.AddrPort
	// edit, when set, rewrites both directors' files last.
	edit func(string) string
}

// startPairWith is startPair with options.
func startPairWith(t testing.TB, top *netlab.Topology, dir string, o pairOptions, roles ...string) []*pairDirector {
	t.Helper()
	key := filepath.Join(dir, "sync.key")
	os.WriteFile(key, []byte("0123456789abcdef0123456789abcdef-test-key\n"), 0o600)
	var ds []*pairDirector
	for i, h := range top.Directors {
		d := &pairDirector{host: h, db: filepath.Join(dir, fmt.Sprintf("d%d.db", i)), socket: filepath.Join(dir, fmt.Sprintf("d%d", i), "api.sock"),
			config: filepath.Join(dir, fmt.Sprintf("d%d.yaml", i)), log: filepath.Join(dir, fmt.Sprintf("d%d.log", i))}
		peer := fmt.Sprintf("%s:7788", top.Directors[1-i].If(netlab.IfSync).Addr4)
		if o.group.IsValid() {
			peer = fmt.Sprintf("%s\n  multicast: true\n  interface: %s", o.group, netlab.IfSync)
		}
		cfg := baseConfig(top, d.db, d.socket) + fmt.Sprintf(`replication:
  id: %d
  local: "%s:7788"
  peer: %s
  key_file: %s
  state_path: %s
  ready_file: %s
  initial_role: %s
`, i+1,
			h.If(netlab.IfSync).Addr4, peer, key,
			filepath.Join(dir, fmt.Sprintf("d%d.state", i)), filepath.Join(dir, fmt.Sprintf("d%d.ready", i)), roles[i])
		cfg += o.extra
		if o.edit != nil {
			cfg = o.edit(cfg)
		}
		os.WriteFile(d.config, []byte(cfg), 0o600)
		d.start(t)
		ds = append(ds, d)
	}
	return ds
}

// waitPair waits until cond holds, for at most limit; then it fails the
// test with what both directors say of themselves.
func waitPair(t testing.TB, ds []*pairDirector, what string, limit time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(limit); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	for _, d := range ds {
		out, err := runArgs(t, "--socket", d.socket, "status")
		t.Logf("%s status: %v\n%s", d.host.Name, err, out)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// waitPairAPI waits up to 20 s for each daemon of the pair to answer on
// its API socket.
func waitPairAPI(t *testing.T, ds []*pairDirector) {
	t.Helper()
	for _, d := range ds {
		waitPair(t, ds, "daemon API", 20*time.Second, func() bool { _, err := apiStatus(d.socket); return err == nil })
	}
}

// start runs the daemon in its namespace; t's cleanup kills it.
func (d *pairDirector) start(t testing.TB) {
	t.Helper()
	logf, _ := os.OpenFile(d.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	cmd := daemonCmd(t, d.config)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := d.host.Start(cmd); err != nil {
		t.Fatal(err)
	}
	d.cmd = cmd
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(d.log)
			t.Logf("%s log:\n%s", d.host.Name, b)
		}
	})
}

// TestPairReplicatesAndTakesOver runs two daemons in two director
// namespaces, replicating over the sync link: an import on the master
// reaches the backup's table and kernel; the backup refuses writes naming
// the master; after the roles swap (as keepalived's notify would), the
// peers' traffic through the new master reaches the same nodes.
func TestPairReplicatesAndTakesOver(t *testing.T) {
	netlab.RequireRoot(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 2, Directors: 2, Nodes: 3, VIPOnDirectors: true})
	dir := t.TempDir()
	ds := startPair(t, top, dir, "master", "backup")
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			if cond() {
				return
			}
		}
		for _, d := range ds {
			out, err := d.cli(t, "status")
			t.Logf("%s: exited %v; status: %v %s", d.host.Name, d.cmd.ProcessState, err, out)
		}
		t.Fatalf("timed out waiting for %s", what)
	}
	for _, d := range ds {
		waitFor("daemon API", func() bool { _, err := apiStatus(d.socket); return err == nil })
	}

	// Import 2,000 tunnels on the master.
	farm := filepath.Join(dir, "farm")
	os.MkdirAll(farm, 0o700)
	mustRun(t, filepath.Join(dir, "scratch.db"), "gen", "--dir", farm, "--nodes", "3", "--tunnels", "2000")
	if out, err := ds[0].cli(t, "import", filepath.Join(farm, "tunnels.csv")); err == nil || !strings.Contains(err.Error(), "vpn-") {
		// The generated file pins to vpn-NN nodes the pair does not
		// have: a refused import must say so and change nothing.
		t.Fatalf("import naming unknown nodes: %v %s", err, out)
	}
	p0 := top.Peers[0].If(netlab.IfOutside)
	p1 := top.Peers[1].If(netlab.IfOutside)
	var b strings.Builder
	fmt.Fprintf(&b, "id,peer,subnets,node\nt0,%s,10.70.0.0/24,node0\nt1,%s,10.71.0.0/24,node2\nt0v6,%s,fd70::/64,node1\n", p0.Addr4, p1.Addr4, p0.Addr6)
	bulk := 100_000
	if testing.Short() {
		bulk = 10_000 // the race detector makes 100k slow
	}
	for i := 0; i < bulk; i++ {
		fmt.Fprintf(&b, "bulk-%d,100.%d.%d.%d,11.%d.%d.%d/27,\n", i, 64+i>>16, i>>8&255, i&255, i>>11, i>>3&255, i&7<<5)
	}
	f := filepath.Join(dir, "tunnels.csv")
	os.WriteFile(f, []byte(b.String()), 0o600)
	// 5% loss on the sync link, both ways.
	for _, h := range top.Directors {
		if err := h.SetLoss(netlab.IfSync, 5); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	if out, err := ds[0].cli(t, "import", f); err != nil {
		t.Fatalf("import on the master: %v %s", err, out)
	}
	// The master's own revision: a bucket step may follow the import.
	waitFor("both kernels at the master's revision", func() bool {
		s0, s1 := ds[0].status(t), ds[1].status(t)
		return s1.Revision == s0.Revision && s1.KernelRevision == s0.Revision && s0.KernelRevision == s0.Revision
	})
	t.Logf("%d tunnels imported on the master, replicated over a link losing 5%% and programmed into both kernels in %s",
		bulk+3, time.Since(start).Round(time.Millisecond))
	if n := ds[1].status(t).Tunnels; n != bulk+3 {
		t.Fatalf("backup holds %d tunnels", n)
	}
	mp, ms := ds[0].kernelMaps(t)
	bp, bs := ds[1].kernelMaps(t)
	if len(mp) != bulk+3 || !maps.Equal(mp, bp) || !maps.Equal(ms, bs) {
		t.Fatalf("kernel maps differ: master %d peers %d subnets, backup %d peers %d subnets", len(mp), len(ms), len(bp), len(bs))
	}

	// The backup refuses writes and names the master.
	if out, err := ds[1].cli(t, "node", "drain", "node0"); err == nil || !strings.Contains(err.Error(), "is backup") || !strings.Contains(err.Error(), "director id 1") {
		t.Fatalf("write on the backup: %v %s", err, out)
	}

	// Takeover: the roles swap, the peers now reach the VIP through the
	// new master; every tunnel's traffic still reaches its node.
	if _, err := ds[0].cli(t, "ctl", "role", "backup"); err != nil {
		t.Fatal(err)
	}
	// Demoted, the old master writes nothing more (no bucket step):
	// the backup takes over at its last revision.
	master := ds[0].status(t)
	waitFor("the backup at the old master's last revision", func() bool { return ds[1].status(t).KernelRevision == master.Revision })
	if _, err := ds[1].cli(t, "ctl", "role", "master"); err != nil {
		t.Fatal(err)
	}
	// Becoming master merges the configured nodes: nothing changes, so
	// the kernel stays where replication put it.
	if s := ds[1].status(t); s.Revision != master.Revision || s.KernelRevision != master.Revision {
		t.Fatalf("takeover changed the table: revision %d (kernel %d), was %d", s.Revision, s.KernelRevision, master.Revision)
	}
	newGW := top.Directors[1].If(netlab.IfOutside)
	for _, p := range top.Peers {
		for _, r := range []netlab.Route{
			{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: newGW.Addr4},
			{Dst: netip.MustParsePrefix("::/0"), Via: newGW.Addr6},
		} {
			if err := p.ReplaceRoute(r); err != nil {
				t.Fatal(err)
			}
		}
	}
	e := &e2e{t: t, top: &netlab.Topology{Peers: top.Peers, Nodes: top.Nodes, Target: top.Target, Directors: []*netlab.Host{top.Directors[1]}, VIP4: top.VIP4, VIP6: top.VIP6}}
	e.captureNodes()
	start = time.Now()
	e.expectAt(0, "after-takeover", func(tag string) error { return top.Peers[0].SendESP(p0.Addr4, top.VIP4, 0xabc, 1, tag) })
	t.Logf("first ESP packet through the new master delivered %s after the role change", time.Since(start).Round(time.Millisecond))
	e.expectAt(2, "after-takeover-ike", func(tag string) error {
		return top.Peers[1].SendUDP(netip.AddrPortFrom(p1.Addr4, 500), netip.AddrPortFrom(top.VIP4, 500), []byte(tag))
	})
	e.expectAt(1, "after-takeover-v6", func(tag string) error { return top.Peers[0].SendESP(p0.Addr6, top.VIP6, 0xabd, 1, tag) })

	// The new master writes, and the old one follows.
	os.WriteFile(f, []byte(fmt.Sprintf("id,peer,subnets,node\nt-new,192.0.2.200,10.72.0.0/24,node1\n")), 0o600)
	if out, err := ds[1].cli(t, "import", f); err != nil {
		t.Fatalf("import on the new master: %v %s", err, out)
	}
	waitFor("the old master to follow the new one", func() bool {
		s0, s1 := ds[0].status(t), ds[1].status(t)
		return s0.Tunnels == bulk+4 && s0.Revision == s1.Revision
	})
}

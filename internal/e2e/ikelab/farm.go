package ikelab

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/internal/vmlab"
)

// Mode is the director's forwarding mode (the daemon's `mode`).
type Mode string

// The modes every scenario runs in.
const (
	RouteOnly Mode = "route-only"
	IPVS      Mode = "ipvs"
)

// Modes lists both, in the order scenarios run them.
var Modes = []Mode{RouteOnly, IPVS}

// Options size a farm.
type Options struct {
	Mode Mode
	// Peers are peers directly on the outside segment.
	Peers int
	// NATPeers are peers behind a masquerading NAT namespace each: their
	// IKE and ESP arrive from the NAT's address in UDP 4500 (NAT-T).
	NATPeers int
	// Nodes is the number of terminator nodes (default 3).
	Nodes int
	// Agents, when set, runs the node agent on every node and has the
	// director merge their reports.
	Agents *AgentOptions
	// Health is the daemon's health: section (a YAML flow mapping, e.g.
	// "{fall: 3}"); empty turns the health checks off, so that nodes go
	// down only by the scenario's commands.
	Health string
}

// The lab's addresses beyond netlab's.
var (
	// upstream is the director's default gateway on the outside segment,
	// as in production (an absent router here): loose reverse-path
	// filtering accepts the decrypted traffic of the peers' subnets through it.
	upstream = netip.MustParseAddr("198.51.100.254")
	// natOutside is the first NAT's address on the outside segment.
	natOutside = netip.MustParseAddr("198.51.100.201")
)

// Farm is one scenario's world: peers, the director running the real
// daemon, nodes, the target, and captures on every node's inside link.
type Farm struct {
	T        *testing.T
	Opts     Options
	Top      *netlab.Topology
	Work     string // configuration and logs of everything in the farm
	Director *Director
	Nodes    []*Node
	Peers    []*Peer
	// Target is the server behind the director that pings reach.
	Target netip.Addr
	// Caps capture, for the artifacts of a failed scenario, what arrives
	// on the director's links and on every NAT's outside link.
	Caps       map[string]*netlab.Capture
	examples   string
	failover   string
	ctx        context.Context
	cancelWork context.CancelFunc
}

// Node is a terminator node: its charon answers as the VIP.
type Node struct {
	Name   string
	Host   *netlab.Host
	Addr   netip.Addr // inside address: where the director forwards to
	Charon *Charon
	// Cap captures what arrives on the node's inside link since the farm
	// was built: what the director sent it.
	Cap *netlab.Capture
	// Agent is the node's agent (Options.Agents), else nil.
	Agent *Agent
}

// Peer is a site gateway running charon with the peer example.
type Peer struct {
	Name string
	NS   *netlab.NS
	// Addr is the address the director sees: the peer's own, or its NAT's.
	Addr netip.Addr
	// Local is charon's local address (behind a NAT: the private one).
	Local   netip.Addr
	NAT     bool
	Subnets []netip.Prefix
	Charon  *Charon
}

// Host returns the peer's address inside its first protected subnet, the
// source and destination of its pings.
func (p *Peer) Host() netip.Addr { return p.Subnets[0].Addr().Next() }

// New builds a farm inside the vmlab guest (it skips elsewhere): topology,
// sysctls from the examples, the nodes' charons with the node example
// loaded, and the director daemon running with the nodes configured. The
// peers' charons are configured but not started (StartPeers), and no
// tunnel is imported (Import).
func New(t *testing.T, o Options) *Farm {
	t.Helper()
	vmlab.RequireGuest(t)
	RequirePrograms(t)
	if o.Nodes == 0 {
		o.Nodes = 3
	}
	if o.Mode != RouteOnly && o.Mode != IPVS {
		t.Fatalf("ikelab: mode %q: want %q or %q", o.Mode, RouteOnly, IPVS)
	}
	ex, err := ExamplesDir()
	if err != nil {
		t.Fatal(err)
	}
	work, err := os.MkdirTemp("", "ikelab-")
	if err != nil {
		t.Fatal(err)
	}
	// Registered before the lab, so it runs after the lab has killed the
	// processes that write here.
	t.Cleanup(func() { os.RemoveAll(work) })
	start := time.Now()
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: max(o.Peers, 1), Directors: 1, Nodes: o.Nodes, VIPOnDirectors: true})
	f := &Farm{T: t, Opts: o, Top: top, Work: work, Target: top.Target.If(netlab.IfTarget).Addr4,
		examples: ex, failover: filepath.Join(ex, FailoverExample)}
	f.ctx, f.cancelWork = context.WithCancel(context.Background())
	t.Cleanup(f.cancelWork)
	if err := f.build(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.dumpOnFailure)
	f.Director.Start()
	if o.Agents != nil {
		f.startAgents()
	}
	t.Logf("farm (%s): %d nodes, %d peers, %d behind NAT, built in %.1fs", o.Mode, o.Nodes, o.Peers, o.NATPeers, time.Since(start).Seconds())
	return f
}

func (f *Farm) build() error {
	top := f.Top
	dir := top.Directors[0]
	f.Caps = map[string]*netlab.Capture{}
	if err := f.capture("director", dir.NS, ""); err != nil {
		return err
	}
	if err := f.applySysctl(dir.NS, DirectorSysctl, map[string]string{exampleInsideIf: netlab.IfInside}); err != nil {
		return err
	}
	if err := dir.AddRoute(netlab.Route{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: upstream}); err != nil {
		return err
	}
	behind := netlab.TargetNet4.String()
	nodeConf, err := readExample(f.examples, NodeSwanctlExample, nodeSubst(top.VIP4.String(), behind))
	if err != nil {
		return err
	}
	for i, h := range top.Nodes {
		if err := f.applySysctl(h.NS, NodeSysctl, nil); err != nil {
			return err
		}
		c, err := h.Capture(netlab.IfInside)
		if err != nil {
			return err
		}
		f.T.Cleanup(func() { c.Close() })
		n := &Node{Name: fmt.Sprintf("node%d", i), Host: h, Addr: h.If(netlab.IfInside).Addr4, Cap: c}
		if n.Charon, err = newCharon(n.Name, h.NS, filepath.Join(f.Work, n.Name), nodeConf, f.failover); err != nil {
			return err
		}
		f.Nodes = append(f.Nodes, n)
	}
	for i := 0; i < f.Opts.Peers; i++ {
		h := top.Peers[i]
		a := h.If(netlab.IfOutside).Addr4
		p := &Peer{Name: h.Name, NS: h.NS, Addr: a, Local: a, Subnets: []netip.Prefix{
			netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 70, byte(i), 0}), 24),
			netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 71, byte(i), 0}), 24)}}
		if err := f.addPeer(p); err != nil {
			return err
		}
	}
	for j := 0; j < f.Opts.NATPeers; j++ {
		p, err := f.buildNAT(j)
		if err != nil {
			return err
		}
		if err := f.addPeer(p); err != nil {
			return err
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, len(f.Nodes))
	for i, n := range f.Nodes {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = n.Charon.Start() }()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	f.Director, err = newDirector(f)
	return err
}

func nodeSubst(vip, behind string) map[string]string {
	return map[string]string{exampleVIP: vip, exampleBehind: behind}
}

func peerSubst(local, vip string, subnets []string, behind string) map[string]string {
	return map[string]string{examplePeer: local, exampleVIP: vip, exampleSubnetA: subnets[0], exampleSubnetB: subnets[1], exampleBehind: behind}
}

// addPeer puts the peer's subnet hosts on its lo and configures its charon.
func (f *Farm) addPeer(p *Peer) error {
	for _, s := range p.Subnets {
		if err := p.NS.AddAddr("lo", netip.PrefixFrom(s.Addr().Next(), 32)); err != nil {
			return err
		}
	}
	conf, err := readExample(f.examples, PeerSwanctlExample,
		peerSubst(p.Local.String(), f.Top.VIP4.String(), []string{p.Subnets[0].String(), p.Subnets[1].String()}, netlab.TargetNet4.String()))
	if err != nil {
		return err
	}
	if p.Charon, err = newCharon(p.Name, p.NS, filepath.Join(f.Work, p.Name), conf, f.failover); err != nil {
		return err
	}
	f.Peers = append(f.Peers, p)
	return nil
}

// natRules masquerade everything the NAT sends out to the outside segment,
// with random source ports, as a home router or carrier-grade NAT would.
const natRules = `table ip nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "%s" masquerade random
	}
}
`

// buildNAT builds NAT namespace j on the outside segment and a peer
// behind it on a private link.
func (f *Farm) buildNAT(j int) (*Peer, error) {
	l := f.Top.Lab
	nat, err := l.AddNS(fmt.Sprintf("nat%d", j))
	if err != nil {
		return nil, err
	}
	inner, err := l.AddNS(fmt.Sprintf("natpeer%d", j))
	if err != nil {
		return nil, err
	}
	public := natOutside
	for k := 0; k < j; k++ {
		public = public.Next()
	}
	priv := netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, byte(j), 0}), 24)
	gw, local := priv.Addr().Next(), priv.Addr().Next().Next()
	steps := []func() error{
		func() error { return f.Top.OutsideSwitch.Attach(nat, netlab.IfOutside) },
		func() error {
			return nat.AddAddr(netlab.IfOutside, netip.PrefixFrom(public, netlab.OutsideNet4.Bits()))
		},
		func() error {
			return nat.AddRoute(netlab.Route{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: f.Top.Directors[0].If(netlab.IfOutside).Addr4})
		},
		func() error { return l.Veth(nat, "lan0", inner, "wan0") },
		func() error { return nat.AddAddr("lan0", netip.PrefixFrom(gw, priv.Bits())) },
		func() error { return inner.AddAddr("wan0", netip.PrefixFrom(local, priv.Bits())) },
		func() error { return inner.AddRoute(netlab.Route{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: gw}) },
		func() error { return nat.Sysctl("net.ipv4.ip_forward", "1") },
		func() error { return f.capture(nat.Name, nat, netlab.IfOutside) },
		func() error {
			rules := filepath.Join(f.Work, nat.Name+".nft")
			if err := os.WriteFile(rules, []byte(fmt.Sprintf(natRules, netlab.IfOutside)), 0o600); err != nil {
				return err
			}
			_, err := nat.Run(context.Background(), "nft", "-f", rules)
			return err
		},
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, fmt.Errorf("NAT %d: %w", j, err)
		}
	}
	return &Peer{Name: inner.Name, NS: inner, Addr: public, Local: local, NAT: true, Subnets: []netip.Prefix{
		netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 72, byte(j), 0}), 24),
		netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 73, byte(j), 0}), 24)}}, nil
}

// capture starts a capture kept in f.Caps under name.
func (f *Farm) capture(name string, ns *netlab.NS, ifname string) error {
	c, err := ns.Capture(ifname)
	if err != nil {
		return err
	}
	f.T.Cleanup(func() { c.Close() })
	f.Caps[name] = c
	return nil
}

// applySysctl applies an example sysctl file in ns, with interface names
// renamed by ifaces (every name in ifaces must occur in the file).
func (f *Farm) applySysctl(ns *netlab.NS, name string, ifaces map[string]string) error {
	b, err := os.ReadFile(filepath.Join(f.examples, name))
	if err != nil {
		return fmt.Errorf("read example: %w", err)
	}
	settings, err := ParseSysctl(name, b)
	if err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, s := range settings {
		parts := strings.Split(s.Key, ".")
		for i, p := range parts {
			if r, ok := ifaces[p]; ok {
				parts[i], seen[p] = r, true
			}
		}
		// netlab's Sysctl takes the /proc/sys path with dots or slashes.
		if err := ns.Sysctl(strings.Join(parts, "/"), s.Value); err != nil {
			return fmt.Errorf("%s:%d: %w", name, s.Line, err)
		}
	}
	for k := range ifaces {
		if !seen[k] {
			return fmt.Errorf("example %s: no setting for interface %s, which the lab renames", name, k)
		}
	}
	return nil
}

// Use makes t, a subtest, the test the farm's helpers report to (their
// Fatal must stop the subtest's goroutine, not the farm's), until the
// returned function restores the farm's own:
//
//	t.Run("node-down", func(t *testing.T) { defer f.Use(t)(); ... })
//
// Subtests of one farm run one after the other.
func (f *Farm) Use(t *testing.T) (restore func()) {
	prev := f.T
	f.T = t
	return func() { f.T = prev }
}

// Node returns the node called name.
func (f *Farm) Node(name string) *Node {
	for _, n := range f.Nodes {
		if n.Name == name {
			return n
		}
	}
	f.T.Fatalf("ikelab: no node %q", name)
	return nil
}

// StartPeers starts the peers' charons (concurrently); each loads the peer
// example and initiates its tunnel to the VIP.
func (f *Farm) StartPeers(ps ...*Peer) {
	f.T.Helper()
	var wg sync.WaitGroup
	errs := make([]error, len(ps))
	for i, p := range ps {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = p.Charon.Start() }()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			f.T.Fatal(err)
		}
	}
}

// BringUp starts the peers' charons a few at a time, each batch once the
// previous one is established: sites come up spread out, and a dozen IKE
// daemons initiating in the same second through an emulated CPU would make
// the nodes answer later than the peers' 1-second retransmits (the
// example's), so half-open SAs pile up, the nodes ask for cookies and stale
// answers to old retransmits fail authentication.
func (f *Farm) BringUp(timeout time.Duration, ps ...*Peer) {
	f.T.Helper()
	const batch = 4
	deadline := time.Now().Add(timeout)
	for i := 0; i < len(ps); i += batch {
		b := ps[i:min(i+batch, len(ps))]
		f.StartPeers(b...)
		for _, p := range b {
			for {
				if _, ok, err := p.PeerSA(); err == nil && ok {
					break
				}
				if time.Now().After(deadline) {
					f.T.Fatalf("%s (%s): no established SA %v after its charon started: %s", p.Name, p.Addr, timeout, f.peerSAs(p))
				}
				time.Sleep(pollEvery)
			}
		}
	}
}

// Tunnel is one line of an NMS import.
type Tunnel struct {
	ID   string
	Peer *Peer
	// Node is the owner the NMS gives; empty: the scheduler places it.
	Node   string
	Pinned bool
}

// Import imports the tunnels as an NMS CSV file through the CLI and waits
// until the kernel has them.
func (f *Farm) Import(ts ...Tunnel) time.Time {
	f.T.Helper()
	var b strings.Builder
	b.WriteString("id,peer,subnets,node,pinned\n")
	for _, t := range ts {
		var subnets []string
		for _, s := range t.Peer.Subnets {
			subnets = append(subnets, s.String())
		}
		pinned := ""
		if t.Node != "" {
			pinned = fmt.Sprint(t.Pinned)
		}
		fmt.Fprintf(&b, "%s,%s,%s,%s,%s\n", t.ID, t.Peer.Addr, strings.Join(subnets, " "), t.Node, pinned)
	}
	file := filepath.Join(f.Work, fmt.Sprintf("tunnels-%d.csv", time.Now().UnixNano()))
	if err := os.WriteFile(file, []byte(b.String()), 0o600); err != nil {
		f.T.Fatal(err)
	}
	f.Director.MustCLI("import", file)
	return f.Director.WaitKernel()
}

// NodeSAs lists the established IKE_SAs (with an installed CHILD_SA) of
// every running node's charon.
func (f *Farm) NodeSAs() (map[string][]IKESA, error) {
	out := map[string][]IKESA{}
	for _, n := range f.Nodes {
		if !n.Charon.Running() {
			continue
		}
		sas, err := n.Charon.SAs()
		if err != nil {
			return nil, err
		}
		for _, sa := range sas {
			if sa.Established() {
				out[n.Name] = append(out[n.Name], sa)
			}
		}
	}
	return out, nil
}

// holders picks p's SAs out of NodeSAs' result, per node.
func holders(all map[string][]IKESA, p *Peer) map[string][]IKESA {
	out := map[string][]IKESA{}
	for node, sas := range all {
		for _, sa := range sas {
			if sa.RemoteHost == p.Addr.String() {
				out[node] = append(out[node], sa)
			}
		}
	}
	return out
}

// Holders returns, per node, the established IKE_SAs (with an installed
// CHILD_SA) that the node's charon holds with p.
func (f *Farm) Holders(p *Peer) (map[string][]IKESA, error) {
	all, err := f.NodeSAs()
	if err != nil {
		return nil, err
	}
	return holders(all, p), nil
}

// PeerSA returns the peer's own established IKE_SA with the farm.
func (p *Peer) PeerSA() (IKESA, bool, error) {
	sas, err := p.Charon.SAs()
	if err != nil {
		return IKESA{}, false, err
	}
	for _, sa := range sas {
		if sa.Established() {
			return sa, true, nil
		}
	}
	return IKESA{}, false, nil
}

// pollEvery paces the waits that ask charon over vici: listing SAs checks
// every IKE_SA out and queries the kernel for each CHILD_SA, which delays
// charon's own work under emulation when asked too often.
const pollEvery = time.Second

// WaitOnOwners waits until every peer's tunnel is established on the node
// the director's table names for it (`tunneldirector lookup`), as one
// IKE_SA, and on no other node, and returns the owners.
func (f *Farm) WaitOnOwners(timeout time.Duration, ps ...*Peer) map[*Peer]string {
	f.T.Helper()
	deadline := time.Now().Add(timeout)
	for {
		owners, why := f.onOwners(ps)
		if why == "" {
			return owners
		}
		if time.Now().After(deadline) {
			f.T.Fatalf("tunnels not established on their owners after %v: %s", timeout, why)
		}
		time.Sleep(pollEvery)
	}
}

// Settled waits up to timeout for every peer to be established on its
// owner alone, and returns the owners of those that are, with why the
// others are not: a scenario that follows a failed one runs on the tunnels
// that are still healthy instead of failing for the earlier reason.
func (f *Farm) Settled(timeout time.Duration, ps ...*Peer) (map[*Peer]string, []string) {
	f.T.Helper()
	deadline := time.Now().Add(timeout)
	for {
		owners, why := f.onOwners(ps)
		if why == "" {
			return owners, nil
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(pollEvery)
	}
	owners := map[*Peer]string{}
	var bad []string
	for _, p := range ps {
		o, why := f.onOwners([]*Peer{p})
		if why != "" {
			bad = append(bad, why)
			continue
		}
		owners[p] = o[p]
	}
	return owners, bad
}

// onOwners returns the owners when every peer is established on its owner
// alone, or why not. The peers' own charons are asked first: the nodes
// and the director only once all peers are up.
func (f *Farm) onOwners(ps []*Peer) (map[*Peer]string, string) {
	for _, p := range ps {
		if _, ok, err := p.PeerSA(); err != nil || !ok {
			return nil, fmt.Sprintf("%s (%s) has no established SA (%v): %s", p.Name, p.Addr, err, f.peerSAs(p))
		}
	}
	all, err := f.NodeSAs()
	if err != nil {
		return nil, err.Error()
	}
	owners := map[*Peer]string{}
	for _, p := range ps {
		owner, _, err := f.Director.Owner(p.Addr)
		if err != nil {
			return nil, err.Error()
		}
		h := holders(all, p)
		if owner == "" || len(h) != 1 || len(h[owner]) != 1 {
			return nil, fmt.Sprintf("%s (%s): table owner %q, IKE_SAs held on the nodes: %v; peer's SAs: %s", p.Name, p.Addr, owner, h, f.peerSAs(p))
		}
		owners[p] = owner
	}
	return owners, ""
}

func (f *Farm) peerSAs(p *Peer) string {
	sas, err := p.Charon.SAs()
	if err != nil {
		return err.Error()
	}
	return fmt.Sprint(sas)
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// dumpOnFailure logs what explains a failed scenario: the daemon's log,
// the IPVS connection table, every charon's SAs and log tail.
func (f *Farm) dumpOnFailure() {
	if !f.T.Failed() {
		return
	}
	t := f.T
	f.saveArtifacts()
	t.Logf("--- director daemon log (tail):\n%s", f.Director.LogTail(60))
	t.Logf("--- director IPVS connections:\n%s", f.Director.IPVSConns())
	for _, n := range f.Nodes {
		sas, err := n.Charon.SAs()
		t.Logf("--- %s (running=%v) SAs %v %v; charon log (tail):\n%s", n.Name, n.Charon.Running(), sas, err, n.Charon.LogTail(15))
		if n.Agent != nil {
			t.Logf("--- %s agent (running=%v) log (tail):\n%s", n.Name, n.Agent.Running(), n.Agent.LogTail(15))
		}
	}
	for _, p := range f.Peers {
		sas, err := p.Charon.SAs()
		t.Logf("--- %s (%s) SAs %v %v; charon log (tail):\n%s", p.Name, p.Addr, sas, err, p.Charon.LogTail(10))
	}
}

// saveArtifacts copies the farm's work directory (configurations, charon and
// daemon logs) and every node's capture into the host's output directory
// (vmlab.OutputDir), under the test's name.
func (f *Farm) saveArtifacts() {
	out := vmlab.OutputDir()
	if out == "" {
		return
	}
	dst := filepath.Join(out, strings.NewReplacer("/", "_", " ", "_").Replace(f.T.Name()))
	if err := os.MkdirAll(dst, 0o755); err != nil {
		f.T.Logf("save artifacts: %v", err)
		return
	}
	// Sockets do not copy; everything else does.
	exec.Command("cp", "-a", f.Work+"/.", dst).Run()
	caps := maps.Clone(f.Caps)
	for _, n := range f.Nodes {
		caps[n.Name] = n.Cap
	}
	for name, c := range caps {
		var b strings.Builder
		for _, p := range c.Packets() {
			fmt.Fprintf(&b, "%s %s\n", p.Time.Format("15:04:05.000000"), describeFull(p))
		}
		os.WriteFile(filepath.Join(dst, name+".packets.txt"), []byte(b.String()), 0o644)
	}
	f.T.Logf("artifacts of %s saved in %s (on the host)", f.T.Name(), dst)
}

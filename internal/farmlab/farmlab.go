// Package farmlab runs a tunnel termination farm in network namespaces on
// the local kernel, with the real tunneldirector daemon on a replicated
// director pair, and shows the director at work: it imports a generated NMS
// file, sends IKE, NAT-T, ESP and return traffic for every tunnel, and
// counts, per node, the packets that arrived against the tunnels the node
// owns; then it fails a node, moves a tunnel and fails the director over,
// counting again after each event. `tunneldirector lab` (scripts/demo.sh)
// is the command behind it.
//
// Everything lives in namespaces that only this process holds (netlab):
// the host's own namespace is never touched, and the kernel frees the
// namespaces when the process ends, however it ends. The daemons run in
// route-only mode (the host kernel has no IPVS).
package farmlab

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/google/nftables"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// Options sizes the farm and says where the daemon binary is.
type Options struct {
	// Binary is the tunneldirector executable the directors run.
	Binary string
	// Dir holds the stores, configurations, sockets, logs and the NMS
	// file; empty: a temporary directory removed at the end.
	Dir string
	// Nodes is the number of terminator nodes (default 4).
	Nodes int
	// PeerHosts is the number of peer namespaces (default 8); each holds
	// TunnelsPerHost tunnel endpoint addresses (default 32).
	PeerHosts      int
	TunnelsPerHost int
	// Out receives the narration and the tables.
	Out io.Writer
	// Hold keeps the farm up after the events until ctx ends, for an
	// operator to look around.
	Hold bool
}

// check refuses sizes the lab cannot build: the events need three nodes,
// a peer namespace holds at most 250 endpoints of its /24.
func (o *Options) check() error {
	switch {
	case o.Nodes < 3 || o.Nodes > 64:
		return &director.RequestError{Param: "--nodes", Value: fmt.Sprint(o.Nodes), Msg: "want 3..64 (the events fail one node and move a tunnel between two others)"}
	case o.PeerHosts < 1 || o.PeerHosts > 200:
		return &director.RequestError{Param: "--peer-hosts", Value: fmt.Sprint(o.PeerHosts), Msg: "want 1..200"}
	case o.TunnelsPerHost < 1 || o.TunnelsPerHost > 250:
		return &director.RequestError{Param: "--tunnels-per-host", Value: fmt.Sprint(o.TunnelsPerHost), Msg: "want 1..250"}
	}
	return nil
}

func (o *Options) defaults() {
	o.Nodes = cmp.Or(o.Nodes, 4)
	o.PeerHosts = cmp.Or(o.PeerHosts, 8)
	o.TunnelsPerHost = cmp.Or(o.TunnelsPerHost, 32)
	if o.Out == nil {
		o.Out = io.Discard
	}
}

// Round is one pass of traffic: every tunnel's IKE, NAT-T, ESP and return
// packet, counted where they arrived.
type Round struct {
	Event string
	// Sent packets; AtOwner arrived at the node owning their tunnel
	// (and only there), Elsewhere at another node, Lost nowhere.
	Sent, AtOwner, Elsewhere, Lost int
	Nodes                          []NodeRow
}

// NodeRow is one node's line of a round's table.
type NodeRow struct {
	Name, State string
	Tunnels     int
	// Arrived counts packets by kind (ike, natt, esp, return) of the
	// tunnels this node owns; Foreign those of tunnels it does not own.
	Arrived map[string]int
	Foreign int
}

// Result is what a run showed.
type Result struct {
	Tunnels int
	Rounds  []Round
}

// ErrCannotRun wraps what the machine lacks for the lab (root, network
// namespaces, nf_tables).
var ErrCannotRun = errors.New("the lab cannot run here")

// Preflight says what the lab needs and this machine lacks: root, network
// namespaces, nf_tables. It creates and drops one scratch namespace.
func Preflight() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: it needs root to create network namespaces (run: sudo scripts/demo.sh)", ErrCannotRun)
	}
	l := netlab.NewLab()
	defer l.Close()
	ns, err := l.AddNS("preflight")
	if err != nil {
		return fmt.Errorf("%w: cannot create a network namespace (%v): it needs CAP_SYS_ADMIN and a kernel with network namespaces", ErrCannotRun, err)
	}
	c, err := ns.Nft()
	if err == nil {
		c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "preflight"})
		err = c.Flush()
	}
	if err != nil {
		return fmt.Errorf("%w: the kernel has no nf_tables (%v): load it with 'modprobe nf_tables' (package kmod) or use a kernel with CONFIG_NF_TABLES", ErrCannotRun, err)
	}
	return nil
}

// kinds are the packets sent for every tunnel, in table order.
var kinds = []string{"ike", "natt", "esp", "return"}

// Run builds the farm, runs the events and tears everything down when it
// returns (also when ctx is cancelled: Ctrl-C).
func Run(ctx context.Context, o Options) (*Result, error) {
	o.defaults()
	if err := o.check(); err != nil {
		return nil, err
	}
	if o.Binary == "" {
		return nil, errors.New("farmlab: no daemon binary")
	}
	if err := Preflight(); err != nil {
		return nil, err
	}
	if o.Dir == "" {
		d, err := os.MkdirTemp("", "tunneldirector-lab-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		o.Dir = d
	}
	f := &farm{o: o, out: o.Out}
	defer f.close()
	if err := f.build(); err != nil {
		return nil, err
	}
	res := &Result{Tunnels: len(f.tunnels)}
	step := func(event string, do func() error) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if do != nil {
			if err := do(); err != nil {
				return fmt.Errorf("%s: %w", event, err)
			}
		}
		r, err := f.round(ctx, event)
		if err != nil {
			return fmt.Errorf("%s: %w", event, err)
		}
		res.Rounds = append(res.Rounds, *r)
		f.print(r)
		return nil
	}
	if err := step("after the import", f.importFarm); err != nil {
		return res, err
	}
	if err := step("after node node1 failed", f.failNode); err != nil {
		return res, err
	}
	if err := step("after a tunnel was moved", f.moveTunnel); err != nil {
		return res, err
	}
	if err := step("after the director failed over", f.failover); err != nil {
		return res, err
	}
	for _, r := range res.Rounds {
		if r.AtOwner != r.Sent {
			return res, fmt.Errorf("%s: %d of %d packets reached the node owning their tunnel", r.Event, r.AtOwner, r.Sent)
		}
	}
	if o.Hold {
		fmt.Fprintf(f.out, "\nThe farm stays up until Ctrl-C. Directors' sockets: %s and %s; namespaces under /proc/%d/fd (nsenter --net=PATH).\n",
			f.dirs[0].socket, f.dirs[1].socket, os.Getpid())
		<-ctx.Done()
	}
	return res, nil
}

// farm is the running lab.
type farm struct {
	o       Options
	out     io.Writer
	lab     *netlab.Lab
	top     *netlab.Topology
	dirs    []*pairDirector
	master  int
	tunnels []tunnel
	caps    []*netlab.Capture
	round0  int
	failed  map[int]bool // nodes taken off the network
}

// tunnel is one generated tunnel and where its packets come from.
type tunnel struct {
	id     string
	host   int        // peer namespace
	peer   netip.Addr // the endpoint address, on the peer namespace
	subnet netip.Prefix
}

// pairDirector is one director's daemon.
type pairDirector struct {
	host   *netlab.Host
	config string
	socket string
	log    string
	cmd    *exec.Cmd
}

func (d *pairDirector) client() *director.Client { return director.NewUnixClient(d.socket) }

func (f *farm) close() {
	for _, c := range f.caps {
		c.Close()
	}
	if f.lab != nil {
		// Kills the daemons started in the namespaces, drops the
		// namespaces: nothing stays.
		f.lab.Close()
	}
	for _, d := range f.dirs {
		if d.cmd != nil && d.cmd.ProcessState == nil {
			d.cmd.Wait()
		}
	}
}

// build makes the namespaces, the peer addresses and routes, and starts
// both daemons.
func (f *farm) build() error {
	start := time.Now()
	f.lab = netlab.NewLab()
	top, err := f.lab.BuildTopology(netlab.TopologyOptions{Peers: f.o.PeerHosts, Directors: 2, Nodes: f.o.Nodes, VIPOnDirectors: true})
	if err != nil {
		return err
	}
	f.top = top
	// Every peer namespace holds the endpoint addresses of its tunnels;
	// both directors route them back to it. Every fifth tunnel is IPv6.
	for h, p := range top.Peers {
		out := p.If(netlab.IfOutside)
		net4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 64, byte(h), 0}), 24)
		net6 := netip.MustParsePrefix(fmt.Sprintf("2001:db8:64:%x::/64", h))
		for k := 0; k < f.o.TunnelsPerHost; k++ {
			i := len(f.tunnels)
			t := tunnel{id: fmt.Sprintf("site-%02d-%03d", h, k), host: h}
			if i%5 == 4 {
				t.peer = nthAddr(net6.Addr(), k+1)
				t.subnet = netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 0x70, byte(h), 0, byte(k)}), 64)
			} else {
				t.peer = nthAddr(net4.Addr(), k+1)
				t.subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(64 + h), byte(k), 0}), 24)
			}
			if err := p.AddAddr(netlab.IfOutside, netip.PrefixFrom(t.peer, t.peer.BitLen())); err != nil {
				return err
			}
			f.tunnels = append(f.tunnels, t)
		}
		for _, d := range top.Directors {
			for _, r := range []netlab.Route{{Dst: net4, Via: out.Addr4}, {Dst: net6, Via: out.Addr6}} {
				if err := d.AddRoute(r); err != nil {
					return err
				}
			}
		}
	}
	for _, n := range top.Nodes {
		c, err := n.Capture("")
		if err != nil {
			return err
		}
		f.caps = append(f.caps, c)
	}
	fmt.Fprintf(f.out, "# a farm in %d network namespaces on this kernel: %d peer hosts holding %d tunnel endpoints, a director pair, %d nodes, a target network (built in %s)\n",
		len(f.lab.Namespaces()), len(top.Peers), len(f.tunnels), len(top.Nodes), time.Since(start).Round(time.Millisecond))
	fmt.Fprintf(f.out, "# VIPs %s and %s; route-only mode (this kernel has no IPVS); working in %s\n", top.VIP4, top.VIP6, f.o.Dir)
	if err := f.startPair(); err != nil {
		return err
	}
	return nil
}

func nthAddr(a netip.Addr, n int) netip.Addr {
	for ; n > 0; n-- {
		a = a.Next()
	}
	return a
}

// startPair writes both directors' configurations and starts the daemons,
// director 0 as master, and waits for their APIs.
func (f *farm) startPair() error {
	key := filepath.Join(f.o.Dir, "sync.key")
	if err := os.WriteFile(key, []byte("farmlab-demo-key-0123456789abcdef0123456789\n"), 0o600); err != nil {
		return err
	}
	for i, h := range f.top.Directors {
		d := &pairDirector{host: h,
			config: filepath.Join(f.o.Dir, fmt.Sprintf("director%d.yaml", i)),
			socket: filepath.Join(f.o.Dir, fmt.Sprintf("director%d", i), "api.sock"),
			log:    filepath.Join(f.o.Dir, fmt.Sprintf("director%d.log", i))}
		role := "backup"
		if i == 0 {
			role = "master"
		}
		cfg := DirectorConfig(f.top, filepath.Join(f.o.Dir, fmt.Sprintf("director%d.db", i)), d.socket) + fmt.Sprintf(`replication:
  id: %d
  local: "%s:7788"
  peer: "%s:7788"
  key_file: %s
  state_path: %s
  initial_role: %s
`, i+1, h.If(netlab.IfSync).Addr4, f.top.Directors[1-i].If(netlab.IfSync).Addr4, key,
			filepath.Join(f.o.Dir, fmt.Sprintf("director%d.state", i)), role)
		if err := os.WriteFile(d.config, []byte(cfg), 0o600); err != nil {
			return err
		}
		logf, err := os.Create(d.log)
		if err != nil {
			return err
		}
		cmd := exec.Command(f.o.Binary, "run", "--config", d.config)
		cmd.Stdout, cmd.Stderr = logf, logf
		// Killed with this process, whatever ends it.
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		err = h.Start(cmd)
		logf.Close()
		if err != nil {
			return err
		}
		d.cmd = cmd
		f.dirs = append(f.dirs, d)
	}
	for i, d := range f.dirs {
		if err := waitFor(20*time.Second, func() bool { _, err := d.client().Status(); return err == nil }); err != nil {
			b, _ := os.ReadFile(d.log)
			return fmt.Errorf("director %d did not answer on %s: %s", i, d.socket, b)
		}
	}
	fmt.Fprintf(f.out, "# directors: dir0 (master) and dir1 (backup) run 'tunneldirector run', replicating over their sync link; logs in %s\n", f.o.Dir)
	return nil
}

// BuildBinary compiles cmd/tunneldirector into dir and returns its path:
// tests run the daemon as a process, as the lab does.
func BuildBinary(dir string) (string, error) {
	bin := filepath.Join(dir, "tunneldirector")
	cmd := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "build", "-o", bin, "github.com/tunneldirector/tunneldirector/cmd/tunneldirector")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build tunneldirector: %v\n%s", err, out)
	}
	return bin, nil
}

// DirectorConfig is the daemon configuration of a lab director: route-only,
// the topology's VIPs and nodes, the inside interface, verify every second.
// The node health checks are off: the lab's nodes run no IKE daemon, and
// their captures must hold only the farm's packets (internal/e2e's health
// tests replace the last line to turn them on).
func DirectorConfig(top *netlab.Topology, db, socket string) string {
	var nodes []string
	for i, n := range top.Nodes {
		in := n.If(netlab.IfInside)
		nodes = append(nodes, fmt.Sprintf("  - {name: node%d, address: %s, address6: %q}", i, in.Addr4, in.Addr6.String()))
	}
	return fmt.Sprintf(`store: %s
vips: [%s, %q]
mode: route-only
nodes:
%s
api: {socket: %s}
verify_interval: 1s
log_level: debug
health: {enabled: false}
`, db, top.VIP4, top.VIP6.String(), strings.Join(nodes, "\n"), socket)
}

// cli runs a tunneldirector command against a director and shows it.
func (f *farm) cli(d *pairDirector, args ...string) error {
	fmt.Fprintf(f.out, "\n$ tunneldirector %s\n", strings.Join(args, " "))
	cmd := exec.Command(f.o.Binary, append([]string{"--socket", d.socket}, args...)...)
	cmd.Stdout, cmd.Stderr = f.out, f.out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("tunneldirector %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

// importFarm writes the generated NMS file and imports it on the master,
// then waits until both directors' kernels hold its revision.
func (f *farm) importFarm() error {
	var b strings.Builder
	b.WriteString("id,peer,subnets,comment\n")
	for _, t := range f.tunnels {
		fmt.Fprintf(&b, "%s,%s,%s,peer host %d\n", t.id, t.peer, t.subnet, t.host)
	}
	p := filepath.Join(f.o.Dir, "tunnels.csv")
	if err := os.WriteFile(p, []byte(b.String()), 0o600); err != nil {
		return err
	}
	if err := f.cli(f.dirs[f.master], "import", p); err != nil {
		return err
	}
	return f.waitSynced()
}

// waitSynced waits until every running director's kernel holds the
// master's revision.
func (f *farm) waitSynced() error {
	ms, err := f.dirs[f.master].client().Status()
	if err != nil {
		return err
	}
	for i, d := range f.dirs {
		if d.cmd == nil {
			continue // killed by the failover
		}
		var last *director.Status
		err := waitFor(20*time.Second, func() bool {
			s, err := d.client().Status()
			last = s
			// At least: the master may commit a bucket step meanwhile.
			return err == nil && s.Revision >= ms.Revision && s.KernelRevision >= ms.Revision
		})
		if err != nil {
			return fmt.Errorf("director %d did not reach revision %d in its kernel (last status %+v)", i, ms.Revision, last)
		}
	}
	return nil
}

// failNode takes node1 off the network, as a crash would, and tells the
// master (node down moves its tunnels, and only those).
func (f *farm) failNode() error {
	n := f.top.Nodes[1]
	l, err := n.Link(netlab.IfInside)
	if err != nil {
		return err
	}
	fmt.Fprintf(f.out, "\n# node1 fails: its link goes down\n")
	if err := n.Handle().LinkSetDown(l); err != nil {
		return fmt.Errorf("set node1's link down: %w", err)
	}
	f.failed = map[int]bool{1: true}
	if err := f.cli(f.dirs[f.master], "node", "down", "node1"); err != nil {
		return err
	}
	return f.waitSynced()
}

// moveTunnel pins the first tunnel of node0 to node2 by an NMS import of
// one line: a move of a live tunnel the operator asked for.
func (f *farm) moveTunnel() error {
	ts, err := f.dirs[f.master].client().Tunnels("node0", 1)
	if err != nil {
		return err
	}
	if len(ts.Tunnels) == 0 {
		return errors.New("node0 owns no tunnel to move")
	}
	t := ts.Tunnels[0]
	var subnets []string
	for _, s := range t.Subnets {
		subnets = append(subnets, s.String())
	}
	p := filepath.Join(f.o.Dir, "move.csv")
	body := fmt.Sprintf("id,peer,subnets,node,pinned\n%s,%s,%s,node2,true\n", t.ID, t.Peer, strings.Join(subnets, " "))
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		return err
	}
	fmt.Fprintf(f.out, "\n# the NMS pins tunnel %s (on node0) to node2\n", t.ID)
	if err := f.cli(f.dirs[f.master], "import", p); err != nil {
		return err
	}
	return f.waitSynced()
}

// failover kills the master's daemon, makes the backup master (what
// keepalived's notify_master does) and moves the farm's gateway to it
// (what VRRP moving the VIPs and gateway addresses does).
func (f *farm) failover() error {
	old, nw := f.master, 1-f.master
	fmt.Fprintf(f.out, "\n# director dir%d fails: its daemon is killed; dir%d becomes master and the farm's routes move to it (keepalived's part)\n", old, nw)
	d := f.dirs[old]
	d.cmd.Process.Kill()
	d.cmd.Wait()
	d.cmd = nil
	if err := f.cli(f.dirs[nw], "ctl", "role", "master"); err != nil {
		return err
	}
	gw := f.top.Directors[nw]
	move := func(h *netlab.Host, ifname string) error {
		ifc := gw.If(ifname)
		for _, r := range []netlab.Route{
			{Dst: netip.MustParsePrefix("0.0.0.0/0"), Via: ifc.Addr4},
			{Dst: netip.MustParsePrefix("::/0"), Via: ifc.Addr6},
		} {
			if err := h.ReplaceRoute(r); err != nil {
				return err
			}
		}
		return nil
	}
	for _, p := range f.top.Peers {
		if err := move(p, netlab.IfOutside); err != nil {
			return err
		}
	}
	for i, n := range f.top.Nodes {
		if f.failed[i] {
			continue // off the network
		}
		if err := move(n, netlab.IfInside); err != nil {
			return err
		}
	}
	if err := move(f.top.Target, netlab.IfTarget); err != nil {
		return err
	}
	f.master = nw
	return f.cli(f.dirs[nw], "status")
}

// round sends every tunnel's four packets and counts where they arrived.
func (f *farm) round(ctx context.Context, event string) (*Round, error) {
	f.round0++
	m := f.dirs[f.master].client()
	ts, err := m.Tunnels("", 0)
	if err != nil {
		return nil, err
	}
	owner := make(map[string]string, len(ts.Tunnels))
	for _, t := range ts.Tunnels {
		owner[t.ID] = t.Node
	}
	nodes, err := m.Nodes()
	if err != nil {
		return nil, err
	}
	target := f.top.Target.If(netlab.IfTarget)
	prefix := fmt.Sprintf("r%d|", f.round0)
	sent := 0
	for i, t := range f.tunnels {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		p := f.top.Peers[t.host]
		vip := f.top.VIP4
		if t.peer.Is6() {
			vip = f.top.VIP6
		}
		tag := func(kind string) string { return prefix + t.id + "|" + kind }
		errs := []error{
			p.SendUDP(netip.AddrPortFrom(t.peer, 500), netip.AddrPortFrom(vip, 500), []byte(tag("ike"))),
			p.SendUDP(netip.AddrPortFrom(t.peer, 4500), netip.AddrPortFrom(vip, 4500), []byte(tag("natt"))),
			p.SendESP(t.peer, vip, 0xc0000000|uint32(i), uint32(f.round0), tag("esp")),
			f.top.Target.SendUDP(netip.AddrPortFrom(target.Addr(t.peer.Is6()), 40000), netip.AddrPortFrom(t.subnet.Addr().Next(), 9999), []byte(tag("return"))),
		}
		if err := errors.Join(errs...); err != nil {
			return nil, err
		}
		sent += len(kinds)
	}
	ours := func(p netlab.Packet) bool { return strings.HasPrefix(p.Tag, prefix) }
	// Wait until every packet arrived somewhere, or nothing new for 1 s.
	count := func() int {
		n := 0
		for _, c := range f.caps {
			n += c.Count(ours)
		}
		return n
	}
	last, lastChange := -1, time.Now()
	for {
		n := count()
		if n >= sent || time.Since(lastChange) > time.Second {
			break
		}
		if n != last {
			last, lastChange = n, time.Now()
		}
		time.Sleep(20 * time.Millisecond)
	}
	r := &Round{Event: event, Sent: sent}
	state := map[string]string{}
	load := map[string]int{}
	for _, n := range nodes.Nodes {
		state[n.Name], load[n.Name] = n.State, n.Tunnels
	}
	for i, c := range f.caps {
		row := NodeRow{Name: fmt.Sprintf("node%d", i), Arrived: map[string]int{}}
		row.State, row.Tunnels = state[row.Name], load[row.Name]
		for _, p := range c.Packets() {
			if !ours(p) {
				continue
			}
			parts := strings.Split(p.Tag, "|")
			if len(parts) != 3 {
				continue
			}
			if owner[parts[1]] == row.Name {
				row.Arrived[parts[2]]++
				r.AtOwner++
			} else {
				row.Foreign++
				r.Elsewhere++
			}
		}
		r.Nodes = append(r.Nodes, row)
	}
	r.Lost = r.Sent - r.AtOwner - r.Elsewhere
	return r, nil
}

// print shows a round as a table.
func (f *farm) print(r *Round) {
	rev := uint64(0)
	if s, err := f.dirs[f.master].client().Status(); err == nil {
		rev = s.Revision
	}
	fmt.Fprintf(f.out, "\n== packets per node %s (table revision %d, master dir%d) ==\n", r.Event, rev, f.master)
	fmt.Fprintf(f.out, "%-6s %-8s %7s %6s %6s %6s %6s %9s %9s\n", "node", "state", "tunnels", "IKE", "NAT-T", "ESP", "return", "at owner", "elsewhere")
	for _, n := range r.Nodes {
		at := 0
		for _, k := range kinds {
			at += n.Arrived[k]
		}
		fmt.Fprintf(f.out, "%-6s %-8s %7d %6d %6d %6d %6d %9d %9d\n", n.Name, n.State, n.Tunnels,
			n.Arrived["ike"], n.Arrived["natt"], n.Arrived["esp"], n.Arrived["return"], at, n.Foreign)
	}
	verdict := "every packet reached the node that owns its tunnel"
	if r.AtOwner != r.Sent {
		verdict = "NOT every packet reached its owner"
	}
	fmt.Fprintf(f.out, "%d packets sent (IKE, NAT-T, ESP from every peer, return traffic to every subnet): %d at their owner, %d elsewhere, %d lost: %s\n",
		r.Sent, r.AtOwner, r.Elsewhere, r.Lost, verdict)
}

func waitFor(timeout time.Duration, cond func() bool) error {
	for deadline := time.Now().Add(timeout); ; time.Sleep(20 * time.Millisecond) {
		if cond() {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("timed out")
		}
	}
}

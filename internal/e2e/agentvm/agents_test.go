// Package agentvm proves the node agents with real strongSwan: the real
// `tunneldirector agent` on every node of an ikelab farm (Debian's kernel
// in the VM: real ESP states), the real daemon merging their reports.
// TestVM boots the guest once for every TestGuest* scenario here.
package agentvm

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/e2e/ikelab"
	"github.com/tunneldirector/tunneldirector/xfrm"
)

// TestVM is the host side: one boot for all guest scenarios.
func TestVM(t *testing.T) {
	ikelab.RunVM(t, ikelab.VMOptions{Timeout: 12 * time.Minute})
}

// Deadlines bound waits only (the guest is emulated on a shared machine);
// what matters is measured and logged as MEASURE lines.
const (
	establishWithin = 120 * time.Second
	learnWithin     = 30 * time.Second
	pingWithin      = 20 * time.Second
)

// saWatch records, per peer address, when the first ESP state with that
// peer appeared on each node: the CHILD_SA's install in the node's kernel,
// seen through the same XFRM multicast group the agent reads.
type saWatch struct {
	mu    sync.Mutex
	first map[netip.Addr]map[string]time.Time
	// policy: per peer and node, when the last policy whose template
	// points at the peer was installed (charon installs a CHILD_SA's
	// policies after its SAs: the install is complete then).
	policy map[netip.Addr]map[string]time.Time
}

func watchSAs(t *testing.T, f *ikelab.Farm) *saWatch {
	w := &saWatch{first: map[netip.Addr]map[string]time.Time{}, policy: map[netip.Addr]map[string]time.Time{}}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for _, n := range f.Nodes {
		k, err := xfrm.New(xfrm.Options{Netns: n.Host.NsHandle()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { k.Close() })
		ev, err := k.Watch(ctx)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for e := range ev {
				at := time.Now()
				if e.Kind == xfrm.EventPolicy {
					w.mu.Lock()
					for _, tm := range e.Policy.Tmpls {
						for _, a := range []netip.Addr{tm.Src, tm.Dst} {
							if w.policy[a] == nil {
								w.policy[a] = map[string]time.Time{}
							}
							w.policy[a][n.Name] = at
						}
					}
					w.mu.Unlock()
					continue
				}
				if e.Kind != xfrm.EventState || e.SA.Larval || e.SA.Proto != xfrm.ProtoESP {
					continue
				}
				w.mu.Lock()
				for _, a := range []netip.Addr{e.SA.Src, e.SA.Dst} {
					if w.first[a] == nil {
						w.first[a] = map[string]time.Time{}
					}
					if _, ok := w.first[a][n.Name]; !ok {
						w.first[a][n.Name] = at
					}
				}
				w.mu.Unlock()
			}
		}()
	}
	return w
}

func (w *saWatch) installed(peer netip.Addr, node string) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	at, ok := w.first[peer][node]
	return at, ok
}

// policiesDone returns when the last policy of the peer was installed on
// the node.
func (w *saWatch) policiesDone(peer netip.Addr, node string) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	at, ok := w.policy[peer][node]
	return at, ok
}

// kernelKnows polls the daemon's API (every 10 ms) until the table gives
// addr (inside a protected subnet) to a node and the kernel holds that
// revision; it returns the node, the tunnel and when that was first seen.
func kernelKnows(t *testing.T, api *director.Client, addr netip.Addr, timeout time.Duration) (string, string, time.Time) {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(10 * time.Millisecond) {
		res, err := api.Lookup(addr)
		if err == nil && res.Found && res.Match.By == "subnet" {
			if st, err := api.Status(); err == nil && st.KernelRevision >= res.Match.Tunnel.Revision {
				return res.Match.Node.Name, res.Match.Tunnel.ID, time.Now()
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not steered by the table and kernel within %v (lookup %+v, %v)", addr, timeout, res, err)
		}
	}
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// TestGuestAgents: route-only, three nodes with agents, adopt follow-sa
// with a 1 s hold.
//   - nat-t: a peer behind NAT is reported with the NAT's address and the
//     UDP ports of its ESP;
//   - unknown-peer: peers the NMS never listed are pinned by their first
//     IKE packet, their negotiated subnets then arrive from the agent, and
//     the server behind the director reaches their subnets (without the
//     agent it cannot: nothing steers the return traffic); measured from
//     the CHILD_SA's install on the node to table and kernel;
//   - misplaced: a tunnel moved in the table while its SA stays up on the
//     old node is followed back there (follow-sa) and traffic works again;
//   - charon-killed: a node's charon killed, its SAs gone from the kernel
//     and from its agent's reports, its heartbeat continues; the agent
//     killed, its heartbeat stops.
func TestGuestAgents(t *testing.T) {
	f := ikelab.New(t, ikelab.Options{Mode: ikelab.RouteOnly, Peers: 3, NATPeers: 1,
		Agents: &ikelab.AgentOptions{Section: "adopt: follow-sa, hold: 1s, merge_delay: 50ms", Args: []string{"--heartbeat", "1s"}}})
	api := f.Director.API()
	watch := watchSAs(t, f)
	known, nat := f.Peers[0], f.Peers[3]
	unknown := f.Peers[1:3]
	f.Import(ikelab.Tunnel{ID: "site-known", Peer: known}, ikelab.Tunnel{ID: "site-nat", Peer: nat})
	f.BringUp(establishWithin, known, nat)
	owners := f.WaitOnOwners(establishWithin, known, nat)

	t.Run("nat-t", func(t *testing.T) {
		defer f.Use(t)()
		var facts []director.PeerFacts
		for deadline := time.Now().Add(learnWithin); ; time.Sleep(200 * time.Millisecond) {
			var err error
			if facts, err = api.PeerFacts(nat.Addr); err == nil && len(facts) > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no agent reports %s (%v)", nat.Addr, err)
			}
		}
		if len(facts) != 1 || facts[0].Node != owners[nat] {
			t.Fatalf("facts of %s: %+v; want its owner %s only", nat.Addr, facts, owners[nat])
		}
		tu := facts[0].Tunnel
		sa, _, _ := nat.PeerSA()
		if tu.Peer != nat.Addr || len(tu.NATT) != 1 || tu.NATT[0].Port == 0 || tu.NATT[0].LocalPort != 4500 {
			t.Fatalf("NAT-T facts of %s: %+v", nat.Addr, tu)
		}
		held, _ := f.Holders(nat)
		port := ""
		for _, s := range held[owners[nat]] {
			port = s.RemotePort
		}
		if fmt.Sprint(tu.NATT[0].Port) != port {
			t.Errorf("agent reports the NAT's port %d, the node's charon sees %s", tu.NATT[0].Port, port)
		}
		t.Logf("NAT-T peer %s (charon %s behind it, %v) reported by %s's agent: %s port %d -> %d, subnets %v",
			nat.Addr, nat.Local, sa.Children, facts[0].Node, tu.Peer, tu.NATT[0].Port, tu.NATT[0].LocalPort, tu.Subnets)
	})

	t.Run("unknown-peer", func(t *testing.T) {
		defer f.Use(t)()
		var lat []time.Duration
		for _, p := range unknown {
			start := time.Now()
			f.StartPeers(p)
			node, id, at := kernelKnows(t, api, p.Host(), establishWithin)
			inst, ok := watch.installed(p.Addr, node)
			if !ok {
				t.Fatalf("%s: the table steers %s to %s (tunnel %s) but no ESP state of the peer appeared there", p.Name, p.Host(), node, id)
			}
			lat = append(lat, at.Sub(inst))
			pol, _ := watch.policiesDone(p.Addr, node)
			t.Logf("%s: charon started %s, first ESP state on %s after %.1fs, its last policy %s after that, subnet in table and kernel %s after the state (tunnel %s)",
				p.Name, start.Format("15:04:05.000"), node, inst.Sub(start).Seconds(), pol.Sub(inst).Round(time.Millisecond), at.Sub(inst).Round(time.Millisecond), id)
			tu, err := api.Tunnel(id)
			if err != nil || !tu.Learned || !slices.Equal(tu.Subnets, p.Subnets) {
				t.Fatalf("%s: tunnel %+v %v; want learned with %v", p.Name, tu, err, p.Subnets)
			}
			if got := f.WaitOnOwners(establishWithin, p); got[p] != node {
				t.Fatalf("%s established on %s, the table says %s", p.Name, got[p], node)
			}
			// The server behind the director reaches the peer's subnet.
			if err := f.Ping(p, pingWithin); err != nil {
				t.Fatal(err)
			}
		}
		for _, d := range lat {
			t.Logf("MEASURE what=child-sa-installed-to-table-and-kernel ms=%d", d.Milliseconds())
		}
		t.Logf("MEASURE what=child-sa-installed-to-table-and-kernel-median ms=%d samples=%d", median(lat).Milliseconds(), len(lat))
	})

	t.Run("misplaced", func(t *testing.T) {
		defer f.Use(t)()
		from := owners[known]
		to := f.Nodes[0].Name
		if to == from {
			to = f.Nodes[1].Name
		}
		spis := f.SPIs(known)
		st, _ := api.Status()
		followed := st.Agents.Followed
		// The table moves the tunnel; its SA stays up on the old node.
		f.Import(ikelab.Tunnel{ID: "site-known", Peer: known, Node: to})
		moved := time.Now()
		for deadline := time.Now().Add(learnWithin); ; time.Sleep(100 * time.Millisecond) {
			owner, _, err := f.Director.Owner(known.Addr)
			if err == nil && owner == from {
				break
			}
			if time.Now().After(deadline) {
				out, _ := f.Director.CLI("show", "tunnels", "--misplaced")
				t.Fatalf("%s moved to %s, SA on %s: not followed within %v (owner %q %v)\n%s", known.Name, to, from, learnWithin, owner, err, out)
			}
		}
		back := time.Since(moved)
		f.Director.WaitKernel()
		if err := f.Ping(known, pingWithin); err != nil {
			t.Fatal(err)
		}
		// follow-sa moved it back (without it the table keeps the new
		// owner, where the peer re-establishes after its DPD gives up).
		if st, _ := api.Status(); st.Agents.Followed != followed+1 {
			t.Errorf("followed counted %d, want %d", st.Agents.Followed, followed+1)
		}
		if got := f.WaitOnOwners(establishWithin, known); got[known] != from {
			t.Errorf("%s established on %s after the follow, want %s", known.Name, got[known], from)
		}
		// Usually on the same SA: the table followed before the peer's
		// dead-peer detection (7 s of retransmits after 2 s of silence)
		// gave up; under emulation on a loaded machine it may lose that
		// race and re-establish, on the followed node.
		if got := f.SPIs(known); slices.Equal(got, spis) {
			t.Logf("%s: the same SA carries the traffic after the follow (SPIs %08x)", known.Name, got)
		} else {
			t.Logf("%s: re-established after the follow, on %s (SPIs %08x -> %08x)", known.Name, from, spis, got)
		}
		t.Logf("MEASURE what=table-move-to-followed-back seconds=%.1f hold=1s", back.Seconds())
	})

	t.Run("install-to-kernel", func(t *testing.T) {
		defer f.Use(t)()
		// More samples of the same path, cheaper than a charon each: a
		// CHILD_SA installed on node2 as charon installs one (policies,
		// then the inbound and outbound ESP states) for a peer the
		// director never saw, through the real agent and daemon.
		n := f.Nodes[2]
		var lat []time.Duration
		for k := range 8 {
			peer := netip.AddrFrom4([4]byte{100, 100, 0, byte(10 + k)})
			subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 90, byte(k), 0}), 24)
			installChild(t, n.Host.Handle(), f.Top.VIP4, peer, subnet, netip.MustParsePrefix("198.18.1.0/24"), 100+k)
			node, id, at := kernelKnows(t, api, subnet.Addr().Next(), learnWithin)
			inst, ok := watch.installed(peer, n.Name)
			if node != n.Name || !ok {
				t.Fatalf("%s: steered to %s (tunnel %s), SA event seen: %v", subnet, node, id, ok)
			}
			lat = append(lat, at.Sub(inst))
		}
		slices.Sort(lat)
		t.Logf("MEASURE what=esp-state-installed-to-table-and-kernel samples=%d min_ms=%d median_ms=%d max_ms=%d",
			len(lat), lat[0].Milliseconds(), median(lat).Milliseconds(), lat[len(lat)-1].Milliseconds())
	})

	t.Run("charon-killed", func(t *testing.T) {
		defer f.Use(t)()
		n := f.Node(owners[nat])
		nodeView := func() director.NodeInfo {
			res, err := api.Nodes()
			if err != nil {
				t.Fatal(err)
			}
			for _, ni := range res.Nodes {
				if ni.Name == n.Name && ni.Agent != nil {
					return ni
				}
			}
			t.Fatalf("no agent view of %s", n.Name)
			return director.NodeInfo{}
		}
		before := nodeView().Agent
		if before.SAs == 0 {
			t.Fatalf("%s's agent reports no SA before the kill: %+v", n.Name, before)
		}
		if err := n.Charon.Kill(); err != nil {
			t.Fatal(err)
		}
		killed := time.Now()
		// A killed charon leaves its SAs in the kernel until they expire;
		// remove them as the kernel's hard expiry (or an operator's
		// `ip xfrm state flush`) would.
		if err := n.Host.Handle().XfrmStateFlush(0); err != nil {
			t.Fatal(err)
		}
		// The agent's summary drops at once; the peers themselves are
		// reported gone after its --remove-hold (3 s).
		var after director.NodeInfo
		for deadline := time.Now().Add(learnWithin); ; time.Sleep(200 * time.Millisecond) {
			after = nodeView()
			facts, err := api.PeerFacts(nat.Addr)
			if after.Agent.SAs == 0 && after.Agent.Tunnels == 0 && err == nil && len(facts) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s's SAs still reported %v after its charon was killed: %+v, facts of %s: %+v %v", n.Name, learnWithin, after.Agent, nat.Addr, facts, err)
			}
		}
		t.Logf("MEASURE what=charon-killed-to-sas-gone-in-reports seconds=%.1f (agent --remove-hold 3s)", time.Since(killed).Seconds())
		time.Sleep(2500 * time.Millisecond)
		if hb := nodeView().Agent.LastReport; !hb.After(after.Agent.LastReport) {
			t.Errorf("%s's heartbeat stopped with its charon: last report %s", n.Name, hb)
		}
		n.Agent.Kill()
		time.Sleep(1500 * time.Millisecond)
		last := nodeView().Agent.LastReport
		time.Sleep(2500 * time.Millisecond)
		if hb := nodeView().Agent.LastReport; !hb.Equal(last) {
			t.Errorf("%s's heartbeat went on after its agent was killed: %s then %s", n.Name, last, hb)
		}
	})
}

// installChild installs one CHILD_SA between the node's VIP and peer as
// charon does: the tunnel-mode policies for remote <-> local, then the
// inbound and the outbound ESP state (AES-GCM).
func installChild(t *testing.T, h *netlink.Handle, vip, peer netip.Addr, remote, local netip.Prefix, reqid int) {
	t.Helper()
	ipn := func(p netip.Prefix) *net.IPNet {
		return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	in := netlink.XfrmPolicyTmpl{Src: peer.AsSlice(), Dst: vip.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: reqid}
	out := netlink.XfrmPolicyTmpl{Src: vip.AsSlice(), Dst: peer.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: reqid}
	for _, p := range []*netlink.XfrmPolicy{
		{Src: ipn(remote), Dst: ipn(local), Dir: netlink.XFRM_DIR_IN, Tmpls: []netlink.XfrmPolicyTmpl{in}},
		{Src: ipn(remote), Dst: ipn(local), Dir: netlink.XFRM_DIR_FWD, Tmpls: []netlink.XfrmPolicyTmpl{in}},
		{Src: ipn(local), Dst: ipn(remote), Dir: netlink.XFRM_DIR_OUT, Tmpls: []netlink.XfrmPolicyTmpl{out}},
	} {
		if err := h.XfrmPolicyAdd(p); err != nil {
			t.Fatalf("add policy: %v", err)
		}
	}
	gcm := &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: bytes.Repeat([]byte{byte(reqid)}, 20), ICVLen: 128}
	for i, st := range []*netlink.XfrmState{
		{Src: peer.AsSlice(), Dst: vip.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0xc9000000 + 2*reqid, Reqid: reqid, Aead: gcm},
		{Src: vip.AsSlice(), Dst: peer.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0xc9000001 + 2*reqid, Reqid: reqid, Aead: gcm},
	} {
		if err := h.XfrmStateAdd(st); err != nil {
			t.Fatalf("add ESP state %d: %v", i, err)
		}
	}
}

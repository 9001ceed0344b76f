package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// The node agents with the real daemon on the host kernel: the real
// `tunneldirector agent` on every node namespace, reading real XFRM
// policies (the host kernel has no esp4, so no SA: the agents' tunnels
// come from the VM tests; see internal/vmlab/vmtest), and reports of SAs
// posted from a node namespace over the same TCP endpoint, each merged
// by the real daemon and checked with real packets.

const agentAPIPort = 9400

// agentFarm is the e2e farm with agent reports on.
type agentFarm struct {
	*e2e
	api      netip.AddrPort
	tokens   map[string]string // node -> token file
	agents   map[string]*exec.Cmd
	agentLog map[string]string
}

func newAgentFarm(t *testing.T, agentsYAML string) *agentFarm {
	e := newE2E(t)
	f := &agentFarm{e2e: e, tokens: map[string]string{}, agents: map[string]*exec.Cmd{}, agentLog: map[string]string{}}
	f.api = netip.AddrPortFrom(e.top.Directors[0].If(netlab.IfInside).Addr4, agentAPIPort)
	dir := filepath.Join(e.dir, "agent-tokens")
	os.Mkdir(dir, 0o700)
	for i := range e.top.Nodes {
		name := fmt.Sprintf("node%d", i)
		tok := fmt.Sprintf("%s-token-%032x", name, time.Now().UnixNano()+int64(i))
		if err := os.WriteFile(filepath.Join(dir, name), []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		f.tokens[name] = filepath.Join(dir, name)
	}
	opTok := filepath.Join(e.dir, "api.token")
	os.WriteFile(opTok, []byte("operator-token-0123456789abcdef\n"), 0o600)
	cfg, _ := os.ReadFile(e.config)
	c := strings.Replace(string(cfg), "api: {socket: "+e.socket+"}",
		fmt.Sprintf("api: {socket: %s, tcp: %q, token_file: %s}\nagents: {token_dir: %s, %s}", e.socket, f.api, opTok, dir, agentsYAML), 1)
	if err := os.WriteFile(e.config, []byte(c), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// startAgent runs the real agent on node i, as node `as` with the token
// of node `tokenOf`.
func (f *agentFarm) startAgent(i int, as, tokenOf string) {
	f.t.Helper()
	logPath := filepath.Join(f.dir, fmt.Sprintf("agent-%d-%s.log", i, as))
	logf, err := os.Create(logPath)
	if err != nil {
		f.t.Fatal(err)
	}
	cmd := exec.Command(tdBinary(f.t), "agent", "--node", as, "--director", "http://"+f.api.String(),
		"--token-file", f.tokens[tokenOf], "--heartbeat", "300ms", "--debounce", "20ms", "--resync", "5s")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := f.top.Nodes[i].Start(cmd); err != nil {
		f.t.Fatal(err)
	}
	key := fmt.Sprintf("%d/%s", i, as)
	f.agents[key], f.agentLog[key] = cmd, logPath
	f.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
		if f.t.Failed() {
			b, _ := os.ReadFile(logPath)
			f.t.Logf("agent %s log:\n%s", key, b)
		}
	})
}

func (f *agentFarm) stopAgent(key string) {
	cmd := f.agents[key]
	cmd.Process.Kill()
	cmd.Wait()
}

func (f *agentFarm) nodes() map[string]director.NodeInfo {
	f.t.Helper()
	var rows []director.NodeInfo
	if err := json.Unmarshal([]byte(f.cli("--json", "show", "nodes")), &rows); err != nil {
		f.t.Fatal(err)
	}
	out := map[string]director.NodeInfo{}
	for _, r := range rows {
		out[r.Name] = r
	}
	return out
}

func (f *agentFarm) waitFor(what string, timeout time.Duration, cond func() bool) {
	f.t.Helper()
	for deadline := time.Now().Add(timeout); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			f.t.Fatalf("timed out after %s waiting for %s\nstatus:\n%s\nmisplaced:\n%s", timeout, what, f.cli("status"), f.cli("show", "tunnels", "--misplaced"))
		}
	}
}

// post sends a report from node i's namespace over TCP with the node's
// token, as an agent would: a facts report this lab's kernel cannot
// produce (no SAs on the host).
func (f *agentFarm) post(i int, tokenOf string, r *report.Report) (int, string) {
	f.t.Helper()
	body, err := report.Marshal(r)
	if err != nil {
		f.t.Fatal(err)
	}
	node := f.top.Nodes[i]
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return node.DialTCP(ctx, node.If(netlab.IfInside).Addr4, f.api)
	}}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest("POST", "http://"+f.api.String()+report.Path, bytes.NewReader(body))
	tok, _ := os.ReadFile(f.tokens[tokenOf])
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func facts(peer netip.Addr, subnets ...string) xfrm.Tunnel {
	tu := xfrm.Tunnel{Peer: peer, SAs: 2, Subnets: []netip.Prefix{},
		SPIs: []xfrm.SPI{{SPI: 0xc1000001, Reqid: 1, Dir: xfrm.In, Proto: "esp"}, {SPI: 0xc1000002, Reqid: 1, Dir: xfrm.Out, Proto: "esp"}}}
	for _, s := range subnets {
		tu.Subnets = append(tu.Subnets, netip.MustParsePrefix(s))
	}
	return tu
}

func fullOf(node string, ts ...xfrm.Tunnel) *report.Report {
	r := &report.Report{Version: report.Version, Kind: report.KindFull, Node: node, Session: fmt.Sprintf("%032x", time.Now().UnixNano()), Seq: 1, Sent: time.Now(), Tunnels: ts}
	for _, tu := range ts {
		r.Summary.SAs += tu.SAs
	}
	r.Summary.Tunnels = len(ts)
	return r
}

// addPolicies installs the XFRM policies strongSwan would for one CHILD_SA
// of peer on node i (no states: the host kernel has no esp4).
func (f *agentFarm) addPolicies(i int, peer netip.Addr, remote string) {
	f.t.Helper()
	node := f.top.Nodes[i]
	vip := f.top.VIP4.AsSlice()
	rem := netip.MustParsePrefix(remote)
	ipn := func(p netip.Prefix) *net.IPNet {
		return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	local := ipn(netip.MustParsePrefix("198.18.1.0/24"))
	in := netlink.XfrmPolicyTmpl{Src: peer.AsSlice(), Dst: vip, Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 7}
	out := netlink.XfrmPolicyTmpl{Src: vip, Dst: peer.AsSlice(), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 7}
	for _, p := range []*netlink.XfrmPolicy{
		{Src: ipn(rem), Dst: local, Dir: netlink.XFRM_DIR_IN, Tmpls: []netlink.XfrmPolicyTmpl{in}},
		{Src: ipn(rem), Dst: local, Dir: netlink.XFRM_DIR_FWD, Tmpls: []netlink.XfrmPolicyTmpl{in}},
		{Src: local, Dst: ipn(rem), Dir: netlink.XFRM_DIR_OUT, Tmpls: []netlink.XfrmPolicyTmpl{out}},
	} {
		if err := node.Handle().XfrmPolicyAdd(p); err != nil {
			f.t.Fatalf("node%d: add XFRM policy: %v", i, err)
		}
	}
}

// TestAgentsWithTheRealDaemon: the real agent on every node namespace
// reports to the real daemon over TCP with its node's token; its
// heartbeat lives and dies with it; an agent with another node's token is
// refused and counted; SAs reported from a node are merged and steer real
// packets: an unknown peer's negotiated subnet reaches that node, and
// with follow-sa a tunnel whose SA is on another node follows it.
func TestAgentsWithTheRealDaemon(t *testing.T) {
	f := newAgentFarm(t, "adopt: follow-sa, hold: 2s, merge_delay: 20ms")
	f.start()
	p0 := f.top.Peers[0].If(netlab.IfOutside).Addr4
	p2 := f.top.Peers[2].If(netlab.IfOutside).Addr4
	f.importTunnels(fmt.Sprintf("id,peer,subnets,node,pinned\nt0,%s,10.70.0.0/24,node0,false\n", p0))
	// node0 carries the policies strongSwan installs (trap-less, as for
	// an established CHILD_SA): the agent reads them, but without states
	// there is no tunnel to report.
	f.addPolicies(0, p0, "10.70.0.0/24")
	for i := range f.top.Nodes {
		f.startAgent(i, fmt.Sprintf("node%d", i), fmt.Sprintf("node%d", i))
	}
	f.waitFor("three agents reporting", 10*time.Second, func() bool {
		s := f.status().Agents
		return s != nil && s.Nodes == 3
	})

	// Heartbeats: every agent's last report moves; a killed agent's stops.
	before := f.nodes()
	time.Sleep(time.Second)
	after := f.nodes()
	for i := range f.top.Nodes {
		n := fmt.Sprintf("node%d", i)
		if before[n].Agent == nil || !after[n].Agent.LastReport.After(before[n].Agent.LastReport) {
			t.Fatalf("%s: heartbeat did not advance: %+v then %+v", n, before[n].Agent, after[n].Agent)
		}
	}
	f.stopAgent("1/node1")
	time.Sleep(300 * time.Millisecond)
	stopped := f.nodes()["node1"].Agent.LastReport
	time.Sleep(time.Second)
	now := f.nodes()
	if !now["node1"].Agent.LastReport.Equal(stopped) || !now["node0"].Agent.LastReport.After(stopped) {
		t.Fatalf("after node1's agent died: node1 last %s (was %s), node0 last %s", now["node1"].Agent.LastReport, stopped, now["node0"].Agent.LastReport)
	}

	// An agent posing as node2 with node0's token: refused, counted.
	f.startAgent(2, "node2", "node0")
	f.waitFor("the forged agent refused", 10*time.Second, func() bool { return f.status().Agents.Refused["wrong_node"] > 0 })

	// An unknown peer's SAs on node1 (its agent is gone; these are the
	// facts it would send): learned onto node1 with its negotiated
	// subnet; the target's traffic to that subnet and the peer's IKE now
	// reach node1 only.
	start := time.Now()
	if status, body := f.post(1, "node1", fullOf("node1", facts(p2, "10.72.0.0/24"))); status != 200 {
		t.Fatalf("report: %d %s", status, body)
	}
	f.waitFor("the learned subnet in the kernel", 5*time.Second, func() bool {
		s := f.status()
		out, err := runArgs(t, "--socket", f.socket, "lookup", "10.72.0.9")
		return err == nil && strings.Contains(out, "node1") && s.KernelRevision == s.Revision
	})
	t.Logf("report posted -> learned subnet in table and kernel (polled): %s", time.Since(start).Round(time.Millisecond))
	f.expectAt(1, "learned-return", func(tag string) error {
		tg := f.top.Target
		return tg.SendUDP(netip.AddrPortFrom(tg.If(netlab.IfTarget).Addr4, 40000), netip.AddrPortFrom(netip.MustParseAddr("10.72.0.9"), 9999), []byte(tag))
	})
	f.expectAt(1, "learned-ike", func(tag string) error {
		return f.top.Peers[2].SendUDP(netip.AddrPortFrom(p2, 500), netip.AddrPortFrom(f.top.VIP4, 500), []byte(tag))
	})

	// t0 is node0's in the table, and node0's real agent reports no SA
	// for it; node1 reports one: misplaced, and after hold (2 s) the
	// table follows the SA, so IKE and return traffic reach node1.
	f.tunnelTraffic(0, netip.MustParseAddr("10.70.0.9"), 0, false)
	if status, body := f.post(1, "node1", fullOf("node1", facts(p2, "10.72.0.0/24"), facts(p0, "10.70.0.0/24"))); status != 200 {
		t.Fatalf("report: %d %s", status, body)
	}
	var misplaced string
	f.waitFor("t0 listed as misplaced", 10*time.Second, func() bool {
		misplaced = f.cli("show", "tunnels", "--misplaced")
		return strings.Contains(misplaced, "follow-sa to node1")
	})
	t.Logf("show tunnels --misplaced:\n%s", misplaced)
	f.waitFor("t0 following its SA to node1", 10*time.Second, func() bool {
		var tu affinity.Tunnel
		return json.Unmarshal([]byte(f.cli("--json", "show", "tunnel", "t0")), &tu) == nil && tu.Node == "node1"
	})
	f.waitKernel()
	f.tunnelTraffic(0, netip.MustParseAddr("10.70.0.9"), 1, false)
	s := f.status().Agents
	if s.Learned != 1 || s.Followed != 1 {
		t.Fatalf("agents status %+v", s)
	}
	if out := f.cli("status"); !strings.Contains(out, "agents") || !strings.Contains(out, "wrong_node") {
		t.Fatalf("status output lacks the agents: %s", out)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"show", "nodes"}, "SA-TUNNELS"},
		{[]string{"show", "agents"}, "followed 1"},
		{[]string{"show", "tunnel", "t0"}, "SAs on node1\t"},
		{[]string{"show", "tunnel", "learned-" + p2.String()}, "learned"},
	} {
		if out := f.cli(c.args...); !strings.Contains(strings.ReplaceAll(out, "  ", "\t"), strings.TrimSuffix(c.want, "\t")) {
			t.Errorf("%s: no %q in\n%s", strings.Join(c.args, " "), c.want, out)
		}
	}
	f.stop()
}

package ikelab

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// AgentOptions turn the node agents on in a farm: the director accepts
// their reports (api.tcp on its inside address, one token per node) and
// the real `tunneldirector agent` runs on every node once the director is
// up.
type AgentOptions struct {
	// Section is the director's agents section besides token_dir, as
	// YAML flow-map items ("adopt: follow-sa, hold: 3s").
	Section string
	// Args are extra flags of every agent ("--heartbeat", "1s").
	Args []string
}

// AgentPort is the director's TCP API port in a farm with agents.
const AgentPort = 9400

// Agent is the real node agent on one node.
type Agent struct {
	node    *Node
	f       *Farm
	token   string // the node's token file
	logPath string
	process
}

// agentAPI is the director's TCP API address the agents report to.
func (f *Farm) agentAPI() netip.AddrPort {
	return netip.AddrPortFrom(f.Top.Directors[0].If(netlab.IfInside).Addr4, AgentPort)
}

// agentConfig adds the TCP API and the agents section to the daemon's
// configuration and writes a token per node.
func (f *Farm) agentConfig(d *Director, cfg string) (string, error) {
	dir := filepath.Join(filepath.Dir(d.Config), "agent-tokens")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	for i, n := range f.Nodes {
		tok := filepath.Join(dir, n.Name)
		if err := os.WriteFile(tok, []byte(fmt.Sprintf("%s-agent-token-%016x%04d\n", n.Name, time.Now().UnixNano(), i)), 0o600); err != nil {
			return "", err
		}
		n.Agent = &Agent{node: n, f: f, token: tok, logPath: filepath.Join(f.Work, n.Name, "agent.log")}
	}
	opTok := filepath.Join(filepath.Dir(d.Config), "api.token")
	if err := os.WriteFile(opTok, []byte("operator-token-of-the-farm-0123456789\n"), 0o600); err != nil {
		return "", err
	}
	api := fmt.Sprintf("api: {socket: %s}", d.Socket)
	if !strings.Contains(cfg, api) {
		return "", fmt.Errorf("ikelab: the director's configuration has no %q line to extend", api)
	}
	section := "token_dir: " + dir
	if f.Opts.Agents.Section != "" {
		section += ", " + f.Opts.Agents.Section
	}
	cfg = strings.Replace(cfg, api, fmt.Sprintf("api: {socket: %s, tcp: %q, token_file: %s}\nagents: {%s}", d.Socket, f.agentAPI(), opTok, section), 1)
	// The default verify interval, not the farm's 1 s: under emulation a
	// verify (the kernel read back) takes about a second, and the
	// reconcile loop that runs it would hold back the changes the agents
	// scenarios time.
	return strings.Replace(cfg, "verify_interval: 1s", "verify_interval: 30s", 1), nil
}

// startAgents starts every node's agent.
func (f *Farm) startAgents() {
	f.T.Helper()
	for _, n := range f.Nodes {
		n.Agent.Start()
	}
}

// Start runs `tunneldirector agent` in the node's namespace, reporting to
// the farm's director with the node's token.
func (a *Agent) Start() {
	t := a.f.T
	t.Helper()
	if a.Running() {
		t.Fatalf("agent of %s: already running", a.node.Name)
	}
	logf, err := os.OpenFile(a.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	args := append([]string{"agent", "--node", a.node.Name, "--director", "http://" + a.f.agentAPI().String(), "--token-file", a.token}, a.f.Opts.Agents.Args...)
	cmd := exec.Command(a.f.Director.Bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := a.node.Host.Start(cmd); err != nil {
		t.Fatal(err)
	}
	a.started(cmd)
}

// Kill kills the agent (SIGKILL) and waits for it.
func (a *Agent) Kill() {
	if !a.Running() {
		return
	}
	a.cmd.Process.Signal(syscall.SIGKILL)
	<-a.done
}

// LogTail returns the last n lines of the agent's log.
func (a *Agent) LogTail(n int) string {
	b, _ := os.ReadFile(a.logPath)
	return tail(string(b), n)
}

// API returns a client of the daemon's API socket: cheaper to poll than
// the CLI (no process per question, which costs under emulation).
func (d *Director) API() *director.Client { return director.NewUnixClient(d.Socket) }

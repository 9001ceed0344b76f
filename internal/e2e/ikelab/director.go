package ikelab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tunneldirector/tunneldirector/director"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/store"
)

// Director is the real tunneldirector daemon (the binary RunVM built) in
// the director's namespace, and its CLI.
type Director struct {
	f *Farm
	// Bin is the tunneldirector binary; Config, DB and Socket the daemon's
	// configuration file, store and API socket.
	Bin, Config, DB, Socket string
	logPath                 string
	process
}

// directorConfig is the daemon's configuration: the lab's VIP and
// nodes, a short verify interval so drift repair shows within a scenario.
const directorConfig = `store: %s
vips: [%s]
interfaces: {outside: %s, inside: %s}
mode: %s
nodes:
%s
api: {socket: %s}
verify_interval: 1s
log_level: debug
health: %s
`

func newDirector(f *Farm) (*Director, error) {
	bin := os.Getenv(DirectorEnv)
	if bin == "" {
		return nil, fmt.Errorf("ikelab: %s is not set: the host side (ikelab.RunVM) builds the daemon and passes its path", DirectorEnv)
	}
	dir := filepath.Join(f.Work, "director")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	d := &Director{f: f, Bin: bin, Config: filepath.Join(dir, "config.yaml"), DB: filepath.Join(dir, "td.db"), Socket: filepath.Join(dir, "run", "api.sock")}
	var nodes []string
	for _, n := range f.Nodes {
		nodes = append(nodes, fmt.Sprintf("  - {name: %s, address: %s}", n.Name, n.Addr))
	}
	health := f.Opts.Health
	if health == "" {
		health = "{enabled: false}"
	}
	cfg := fmt.Sprintf(directorConfig, d.DB, f.Top.VIP4, netlab.IfOutside, netlab.IfInside, f.Opts.Mode, strings.Join(nodes, "\n"), d.Socket, health)
	if f.Opts.Agents != nil {
		var err error
		if cfg, err = f.agentConfig(d, cfg); err != nil {
			return nil, err
		}
	}
	return d, os.WriteFile(d.Config, []byte(cfg), 0o600)
}

// Start runs `tunneldirector run` in the director's namespace and waits
// for its API.
func (d *Director) Start() {
	t := d.f.T
	t.Helper()
	d.logPath = filepath.Join(filepath.Dir(d.Config), fmt.Sprintf("daemon-%d.log", time.Now().UnixNano()))
	logf, err := os.Create(d.logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(d.Bin, "run", "--config", d.Config)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := d.f.Top.Directors[0].Start(cmd); err != nil {
		t.Fatal(err)
	}
	d.started(cmd)
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if _, err := d.CLI("status"); err == nil {
			return
		}
		if !d.Running() {
			break
		}
	}
	t.Fatalf("director daemon did not come up:\n%s", d.LogTail(40))
}

// process is a started child of the lab (the daemon, an agent, charon), reaped
// in the background so that Running never blocks.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
}

// started records a command that was started and reaps it when it exits.
func (p *process) started(cmd *exec.Cmd) {
	p.cmd, p.done = cmd, make(chan struct{})
	go func(done chan struct{}) { cmd.Wait(); close(done) }(p.done)
}

// Running reports whether the process is alive.
func (p *process) Running() bool {
	if p.done == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Stop sends SIGTERM and waits for the daemon to exit: it leaves the
// kernel programmed.
func (d *Director) Stop() {
	t := d.f.T
	t.Helper()
	if !d.Running() {
		return
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		if st := d.cmd.ProcessState; st != nil && !st.Success() {
			t.Fatalf("director daemon exited with %v:\n%s", st, d.LogTail(40))
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("director daemon did not stop within 30 s of SIGTERM:\n%s", d.LogTail(40))
	}
}

// Kill sends SIGKILL and waits for the daemon to die, as a crash or an
// OOM kill would end it: no fold, no cleanup. The kernel stays programmed.
func (d *Director) Kill() {
	t := d.f.T
	t.Helper()
	if !d.Running() {
		t.Fatal("director daemon is not running: nothing to kill")
	}
	d.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		t.Fatal("director daemon did not die within 30 s of SIGKILL")
	}
}

// StoreCheck runs `store check` on the store file itself (the daemon must
// not be running: it holds the file's lock).
func (d *Director) StoreCheck() (store.CheckReport, error) {
	var r store.CheckReport
	return r, d.JSON(&r, "--db", d.DB, "store", "check")
}

// LogTail returns the last n lines of the current daemon's log.
func (d *Director) LogTail(n int) string {
	b, _ := os.ReadFile(d.logPath)
	return tail(string(b), n)
}

// CLI runs a tunneldirector command against the running daemon.
func (d *Director) CLI(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b, err := exec.CommandContext(ctx, d.Bin, append([]string{"--socket", d.Socket}, args...)...).CombinedOutput()
	if err != nil {
		return string(b), fmt.Errorf("tunneldirector %s: %w: %s", strings.Join(args, " "), err, b)
	}
	return string(b), nil
}

// MustCLI is CLI that fails the test on error.
func (d *Director) MustCLI(args ...string) string {
	d.f.T.Helper()
	out, err := d.CLI(args...)
	if err != nil {
		d.f.T.Fatal(err)
	}
	return out
}

// JSON runs a command with --json and decodes its output into v.
func (d *Director) JSON(v any, args ...string) error {
	out, err := d.CLI(append([]string{"--json"}, args...)...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		return fmt.Errorf("tunneldirector %s: decode JSON: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// Status returns the daemon's status.
func (d *Director) Status() (director.Status, error) {
	var s director.Status
	return s, d.JSON(&s, "status")
}

// WaitKernel waits until the daemon has programmed the table's revision
// into the kernel (reconciling is asynchronous to a commit) and returns
// when that was seen.
func (d *Director) WaitKernel() time.Time {
	t := d.f.T
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		s, err := d.Status()
		if err == nil && s.KernelRevision == s.Revision {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("kernel not at the table's revision after 30 s: %+v %v", s, err)
		}
	}
}

// Owner returns the node that the table says owns address a (a peer
// address or one inside a protected subnet), and the tunnel's id.
func (d *Director) Owner(a fmt.Stringer) (node, tunnel string, err error) {
	var res director.LookupResult
	if err := d.JSON(&res, "lookup", a.String()); err != nil {
		return "", "", err
	}
	if !res.Found || res.Match == nil {
		return "", "", nil
	}
	return res.Match.Node.Name, res.Match.Tunnel.ID, nil
}

// Rebalance runs `rebalance --max-moves n --apply` and returns its result.
func (d *Director) Rebalance(n int) (*director.RebalanceResult, error) {
	var res director.RebalanceResult
	return &res, d.JSON(&res, "rebalance", "--max-moves", fmt.Sprint(n), "--apply")
}

// IPVSConns returns the director's IPVS connection table
// (/proc/net/ip_vs_conn of its namespace, addresses decoded), or a note
// when there is none (route-only mode).
func (d *Director) IPVSConns() string {
	var b []byte
	err := d.f.Top.Directors[0].Do(func() (err error) {
		// /proc/thread-self/net is the netns of this (locked) thread.
		b, err = os.ReadFile("/proc/thread-self/net/ip_vs_conn")
		return err
	})
	if err != nil {
		return fmt.Sprintf("(no IPVS connection table: %v)", err)
	}
	return decodeIPVSConns(string(b))
}

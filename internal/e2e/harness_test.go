// Package e2e holds the end-to-end tests of the director: the real
// tunneldirector binary, built once per run, in network namespaces on the
// host kernel with real packets, a replicated pair, and keepalived moving
// the VIPs. They need root; without it they skip with the reason.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/farmlab"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

var (
	buildOnce sync.Once
	binary    string
	buildErr  error
	buildDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// tdBinary builds cmd/tunneldirector once and returns its path.
func tdBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "td-e2e-")
		if buildErr != nil {
			return
		}
		binary, buildErr = farmlab.BuildBinary(buildDir)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binary
}

// runArgs runs the CLI with exactly these arguments and returns its
// standard output; the error carries the standard error.
func runArgs(t testing.TB, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := exec.Command(tdBinary(t), args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("tunneldirector %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errOut.String()))
	}
	return out.String(), nil
}

// mustRun runs the CLI on a store file and fails the test on an error.
func mustRun(t testing.TB, db string, args ...string) string {
	t.Helper()
	out, err := runArgs(t, append([]string{"--db", db}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// daemonCmd is the daemon as a process that can be killed and restarted.
func daemonCmd(t testing.TB, config string) *exec.Cmd {
	args := []string{"run", "--config", config}
	// TD_DAEMON_PROFILE=DIR profiles every daemon a test starts (CPU,
	// written when it stops), for the scale benchmarks.
	if dir := os.Getenv("TD_DAEMON_PROFILE"); dir != "" {
		args = append(args, "--cpuprofile", filepath.Join(dir, fmt.Sprintf("daemon-%d.prof", time.Now().UnixNano())))
	}
	return exec.Command(tdBinary(t), args...)
}

// baseConfig is the daemon configuration every end-to-end director
// starts from: route-only, the topology's VIPs and nodes, verify every
// second (the lab's, so the demo and these tests run the same daemon).
func baseConfig(top *netlab.Topology, db, socket string) string {
	return farmlab.DirectorConfig(top, db, socket)
}

// streamESP calls send with sequence numbers 1, 2, ... every 5 ms until
// the returned stop is called: the steady ESP flow that tests keep up
// across a restart or a failure. stop waits for the sender and returns how
// many sends succeeded, the packets the owner must have received.
func streamESP(send func(seq uint32) error) (stop func() int64) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var sent atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for seq := uint32(1); ctx.Err() == nil; seq++ {
			if err := send(seq); err == nil {
				sent.Add(1)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return func() int64 {
		cancel()
		wg.Wait()
		return sent.Load()
	}
}

package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/tunneldirector/tunneldirector/director"
)

// TestMain runs the CLI itself when a test starts this binary as another
// user (TD_CLI_ARGS holds the arguments, one per line).
func TestMain(m *testing.M) {
	if args := os.Getenv("TD_CLI_ARGS"); args != "" {
		root := newRoot(&globals{out: os.Stdout, errOut: os.Stderr})
		root.SetArgs(strings.Split(args, "\n"))
		if err := root.Execute(); err != nil {
			fmt.Fprintln(os.Stderr, "tunneldirector:", err)
			os.Exit(director.ExitCode(err))
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestExitStatuses: refused input exits 2, a damaged store 1 (the review
// saw damaged stores exit 2, the status the README keeps for refused
// input).
func TestExitStatuses(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "td.db")
	mustRun(t, db, "import", "../../examples/nodes.csv")
	b, _ := os.ReadFile(db)
	damaged := filepath.Join(dir, "damaged.db")
	os.WriteFile(damaged, b[:12288], 0o600)
	empty := filepath.Join(dir, "empty.db")
	os.WriteFile(empty, nil, 0o600)
	tests := []struct {
		name string
		args []string
		code int
		want string
	}{
		{"damaged store", []string{"--db", damaged, "show", "nodes"}, 1, "restore it from a backup"},
		{"damaged store check", []string{"--db", damaged, "store", "check"}, 1, "is damaged"},
		{"empty store", []string{"--db", empty, "show", "nodes"}, 1, "the file is empty (zero length), not a store"},
		{"unknown flag", []string{"--db", db, "show", "nodes", "--colour"}, 2, "unknown flag"},
		{"bad lookup", []string{"--db", db, "lookup", "10.0.0.300"}, 2, "not an IP address"},
		{"negative max-moves", []string{"--db", db, "rebalance", "--max-moves", "-5"}, 2, "must not be negative"},
		{"backup onto the live store", []string{"--db", db, "store", "backup", db}, 2, "it is the live store itself"},
		{"export over the store", []string{"--db", db, "export", "-o", db}, 2, "refusing to overwrite it with an export"},
		{"node comment with an escape", []string{"--db", db, "node", "add", "vpn-x", "10.9.9.9", "--comment", "a\u009b2J"}, 2, "control character"},
		{"backup over a file", []string{"--db", db, "store", "backup", "../../examples/nodes.csv"}, 2, "the file exists; overwrite it with --force"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runArgs(t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) || director.ExitCode(err) != tc.code {
				t.Fatalf("error %v (exit %d), want exit %d with %q", err, director.ExitCode(err), tc.code, tc.want)
			}
		})
	}
	if _, err := os.Stat(db); err != nil {
		t.Fatal(err)
	}
	if out := mustRun(t, db, "show", "nodes"); !strings.Contains(out, "vpn-e") {
		t.Fatalf("the store lost its nodes: %s", out)
	}
}

// TestNonRootToldPermissionDenied: a user who cannot reach the root-only
// socket is told so, not "no daemon answers".
func TestNonRootToldPermissionDenied(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the CLI as another user")
	}
	dir, err := os.MkdirTemp("", "td-nonroot-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	sockDir := filepath.Join(dir, "run")
	os.Mkdir(sockDir, 0o700)
	// The test binary's own directory is root-only: run a copy.
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "td.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "TD_CLI_ARGS=--socket\n"+filepath.Join(sockDir, "api.sock")+"\nstatus")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Dir = "/"
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "permission denied: the daemon's API is root-only") {
		t.Fatalf("non-root status: %v\n%s", err, out)
	}
}

package ikelab

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/internal/vmlab"
)

// DirectorEnv names the guest's environment variable that holds the path
// (on the host's root, which the guest mounts) of the tunneldirector binary
// RunVM built.
const DirectorEnv = "TD_IKELAB_DIRECTOR"

// RunEnv, when set on the host, replaces VMOptions.Run: the guest tests to
// run, e.g. TD_IKELAB_RUN='^TestGuestMoves$/route-only'.
const RunEnv = "TD_IKELAB_RUN"

// SlowEnv, when set on the host (to anything), is passed to the guest and
// enables the scenarios that RequireSlow guards: they cost minutes of the
// emulated guest's time each, more than the suite's budget allows, and
// their transition is proven in CI some other way.
const SlowEnv = "TD_IKELAB_SLOW"

// RequireSlow skips t, saying how to run it, unless SlowEnv is set.
func RequireSlow(t testing.TB) {
	t.Helper()
	if os.Getenv(SlowEnv) == "" {
		t.Skipf("a slow scenario, not in the default run: set %s=1 (and %s to select it)", SlowEnv, RunEnv)
	}
}

// Modules are the guest kernel modules the farm needs beyond
// vmlab.DefaultModules: conntrack events for the daemon's learner, NAT for
// the NAT-T peers, and nftables logging for classifiers that report first
// packets through a log group.
var Modules = []string{"nf_conntrack_netlink", "nft_masq", "nft_nat", "nft_reject_inet", "nfnetlink_log", "nft_log", "nft_limit"}

// hostPrograms are run from the host's root inside the guest, with the
// Debian package that installs each (scripts/lab-deps.sh installs them).
var hostPrograms = []struct{ path, pkg string }{
	{charonPath, "strongswan-charon"},
	{"/usr/sbin/swanctl", "strongswan-swanctl"},
	{"/usr/lib/ipsec/plugins/libstrongswan-openssl.so", "libstrongswan-standard-plugins"},
	{"/usr/lib/ipsec/plugins/libstrongswan-gcm.so", "libstrongswan-standard-plugins"},
	{"/usr/sbin/nft", "nftables"},
	{"/usr/bin/unshare", "util-linux"},
}

// RequirePrograms stops t (a failure in CI, a skip elsewhere) when a
// program the farm runs is not installed.
func RequirePrograms(t testing.TB) {
	t.Helper()
	for _, p := range hostPrograms {
		if _, err := os.Stat(p.path); err != nil {
			netlab.Require(t, fmt.Sprintf("%s (apt-get install %s, or scripts/lab-deps.sh)", p.path, p.pkg), err)
		}
	}
}

// VMOptions select what RunVM runs.
type VMOptions struct {
	// Run is the -test.run regexp of the guest tests (default ^TestGuest;
	// RunEnv overrides it).
	Run string
	// Timeout bounds the whole guest run (default 18 minutes: under the 20
	// minutes scripts/test.sh gives a package).
	Timeout time.Duration
}

// RunVM is the host side of a scenario package: it builds the
// tunneldirector binary, boots the vmlab guest on the host's root with the
// farm's modules and runs the calling package's guest tests in it (one
// boot for all of them). Not in -short.
func RunVM(t *testing.T, o VMOptions) *vmlab.Result {
	t.Helper()
	if vmlab.InGuest() {
		t.Skip("host-side test")
	}
	if testing.Short() {
		t.Skip("boots a VM with real strongSwan tunnels (minutes); not in -short")
	}
	RequirePrograms(t)
	if r := os.Getenv(RunEnv); r != "" {
		o.Run = r
	}
	if o.Run == "" {
		o.Run = "^TestGuest"
	}
	if o.Timeout == 0 {
		o.Timeout = 18 * time.Minute
	}
	bin := filepath.Join(t.TempDir(), "tunneldirector")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	if err := vmlab.BuildBinary(ctx, "github.com/tunneldirector/tunneldirector/cmd/tunneldirector", bin); err != nil {
		t.Fatal(err)
	}
	t.Logf("built %s in %.1fs", bin, time.Since(start).Seconds())
	// The guest copies a failed farm's logs, configurations and captures
	// here; kept only when something failed.
	out, err := os.MkdirTemp("", "ikelab-artifacts-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("guest artifacts (logs, configurations, captures) kept in %s", out)
			return
		}
		os.RemoveAll(out)
	})
	return vmlab.Run(t, vmlab.Options{
		OutputDir: out,
		Package:   ".",
		Run:       o.Run,
		HostRoot:  true,
		Timeout:   o.Timeout,
		MemoryMB:  2048,
		Modules:   Modules,
		Env:       map[string]string{DirectorEnv: bin, SlowEnv: os.Getenv(SlowEnv)},
	})
}

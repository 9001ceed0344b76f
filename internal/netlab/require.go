// Package netlab builds throw-away network topologies out of Linux network
// namespaces, veth pairs and bridges, and sends and captures real packets in
// them. It is a test helper: every namespace it makes is held only by file
// descriptors of the test process, so the kernel frees the namespaces (and the
// links in them) even when the test binary is killed, and nothing is ever
// created in the host's own namespace.
//
// All link, address, route and rule work goes through netlink (no iproute2),
// so the package works unchanged inside the vmlab guest, which has no ip(8).
package netlab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"testing"

	"github.com/vishvananda/netns"
)

// InCI reports whether the tests run in CI (env CI=true). In CI a missing
// capability is a failure, because a skipped real-kernel test would look
// like a passing one.
func InCI() bool {
	v := os.Getenv("CI")
	return v == "true" || v == "1"
}

// Require stops the test when err is not nil: it fails the test in CI (see
// InCI) and skips it elsewhere. what names the missing capability and how to
// get it, e.g. "root (run: sudo -E go test ./internal/netlab/...)".
func Require(t testing.TB, what string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if InCI() {
		t.Fatalf("missing %s: %v (CI=true: real-kernel tests must not skip)", what, err)
	}
	t.Skipf("skipping: missing %s: %v", what, err)
}

// RequireTool stops the test when a command the test runs is missing: a
// skip, or with CI=true a failure (Require). Any other error of the
// command (it ran and failed, or crashed) fails the test: only a missing
// binary is a reason not to test.
func RequireTool(t testing.TB, what string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if errors.Is(err, exec.ErrNotFound) {
		Require(t, what, err)
		return
	}
	t.Fatalf("%s: %v", what, err)
}

var (
	probeOnce sync.Once
	probeErr  error
)

// RequireRoot checks that the process is root and can create a network
// namespace, and stops the test through Require otherwise.
func RequireRoot(t testing.TB) {
	t.Helper()
	probeOnce.Do(func() { probeErr = probeNetns() })
	Require(t, "root with CAP_NET_ADMIN and network namespaces (run the tests as root: sudo -E env PATH=$PATH go test ...)", probeErr)
}

func probeNetns() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("effective uid is %d, not 0", os.Geteuid())
	}
	h, err := newNetns()
	if err != nil {
		return err
	}
	return h.Close()
}

// newNetns creates a fresh, unnamed network namespace and returns a handle to
// it, leaving the calling thread in the namespace it was in. The namespace
// lives as long as a handle (or a process inside) refers to it.
func newNetns() (netns.NsHandle, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return netns.None(), fmt.Errorf("get current netns: %w", err)
	}
	defer orig.Close()
	h, err := netns.New()
	if err != nil {
		runtime.UnlockOSThread()
		return netns.None(), fmt.Errorf("create netns (unshare CLONE_NEWNET): %w", err)
	}
	if err := netns.Set(orig); err != nil {
		// The thread is stuck in the new namespace: keep it locked so the
		// runtime destroys it when this goroutine ends, instead of reusing it.
		h.Close()
		return netns.None(), fmt.Errorf("restore netns after create: %w", err)
	}
	runtime.UnlockOSThread()
	return h, nil
}

// errNotFound is wrapped by lookups of unknown namespaces or interfaces.
var errNotFound = errors.New("not found")

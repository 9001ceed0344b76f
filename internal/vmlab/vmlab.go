// Package vmlab runs Go tests inside a real Debian kernel under qemu, for
// the kernel features the build machines' own kernel lacks (IPVS, ESP
// states). The host side builds the test package as a static binary, packs
// it with busybox and the needed kernel modules into an initramfs, boots
// Debian's linux-image-amd64 with it and turns the guest's test result into
// the calling test's result. The guest side is plain Go tests that call
// RequireGuest.
//
// One boot runs all selected guest tests of a package: boot once per
// package, not once per test.
package vmlab

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// GuestEnv is set to "1" in the guest's environment.
const GuestEnv = "TD_IN_VM"

// InGuest reports whether the code runs inside a vmlab guest.
func InGuest() bool { return os.Getenv(GuestEnv) == "1" }

// RequireGuest skips the test unless it runs inside a vmlab guest. Guest
// tests are run by a host test that calls Run for their package.
func RequireGuest(t testing.TB) {
	t.Helper()
	if !InGuest() {
		t.Skipf("guest-only test: runs inside the vmlab VM (%s=1), started by the package's host test through vmlab.Run", GuestEnv)
	}
}

// Options select what a guest run executes.
type Options struct {
	// Package is the Go package whose tests run in the guest, as given to
	// go test -c: "." for the calling test's own package, or a path
	// relative to the calling package's directory, or an import path.
	Package string
	// Run is the -test.run regexp of the guest tests (all tests if empty).
	Run string
	// Timeout bounds the whole guest run, boot included (default 3 min).
	Timeout time.Duration
	// MemoryMB is the guest memory (default 1024).
	MemoryMB int
	// Modules are loaded in addition to DefaultModules.
	Modules []string
	// Env is added to the guest test binary's environment.
	Env map[string]string
	// Args are extra test binary flags, e.g. "-test.count=1".
	Args []string
	// HostRoot boots the guest on the host's root filesystem instead of
	// the bare initramfs: qemu shares "/" read-only over 9p, the guest
	// mounts it under a tmpfs overlay (writes stay in guest memory) and
	// switches to it, so the host's installed programs (strongSwan,
	// iproute2, nft, ...) run inside the guest on the guest's kernel. The
	// test binary runs from its path on the host. Modules still load from
	// the initramfs (HostRootModules are added). Programs run from the
	// host must be built for this architecture and use the host's libraries.
	HostRoot bool
	// OutputDir, in HostRoot mode, is a host directory the guest can write
	// to: shared read-write over 9p and mounted at the same path in the
	// guest, which finds it in $TD_VMLAB_OUTPUT. Tests leave logs and
	// captures there for the host (the guest's own files vanish with it).
	OutputDir string
}

// OutputEnv names the guest's environment variable holding
// Options.OutputDir.
const OutputEnv = "TD_VMLAB_OUTPUT"

// OutputDir returns the directory the host shared for the guest's output
// (Options.OutputDir), or "" when there is none.
func OutputDir() string { return os.Getenv(OutputEnv) }

// HostRootTag is the 9p mount tag of the host's root in HostRoot mode.
const HostRootTag = "hostroot"

// HostRootModules are loaded in addition to DefaultModules in HostRoot
// mode: the virtio transport, 9p and overlayfs.
var HostRootModules = []string{"virtio_pci", "9pnet_virtio", "9p", "overlay"}

// hostRootQemuArgs shares the host's root with the guest, read-only.
// multidevs=remap keeps inode numbers unique across the host's mounts,
// which the guest's 9p cache relies on.
func hostRootQemuArgs(output string) []string {
	args := []string{"-virtfs", "local,path=/,mount_tag=" + HostRootTag + ",security_model=none,readonly=on,multidevs=remap"}
	if output != "" {
		args = append(args, "-virtfs", "local,path="+output+",mount_tag="+outputTag+",security_model=none,multidevs=remap")
	}
	return args
}

// outputTag is the 9p mount tag of Options.OutputDir.
const outputTag = "vmlabout"

// Run boots the guest, runs the selected guest tests of opts.Package in it,
// streams the guest's console to t.Log and fails t when the guest tests
// fail, the guest hangs past the timeout, or the guest cannot be prepared
// (a missing tool, kernel package or module stops t through netlab.Require:
// a failure in CI, a skip elsewhere). It returns the run's result (exit
// status, timings, console tail) when the guest ran.
func Run(t testing.TB, opts Options) *Result {
	t.Helper()
	if InGuest() {
		t.Skip("vmlab.Run called inside the guest: nested VMs are not supported")
		return nil
	}
	r, err := newRunner(t, opts)
	if err != nil {
		var m *MissingError
		if asMissing(err, &m) {
			netlab.Require(t, m.What, m.Err)
		}
		t.Fatalf("vmlab: prepare guest: %v", err)
		return nil
	}
	res, err := r.run()
	if res != nil {
		t.Logf("vmlab: timings: %s", res.Timings)
	}
	if err != nil {
		var m *MissingError
		if asMissing(err, &m) {
			netlab.Require(t, m.What, m.Err)
		}
		tail := ""
		if res != nil {
			tail = res.Tail()
		}
		t.Fatalf("vmlab: %v\n--- guest console (last lines) ---\n%s", err, tail)
		return res
	}
	if res.ExitCode != 0 {
		mods := ""
		if len(res.Modfail) > 0 {
			mods = fmt.Sprintf(" (and these modules failed to load: %v)", res.Modfail)
		}
		t.Fatalf("vmlab: guest tests failed (exit status %d)%s\n--- guest console (last lines) ---\n%s", res.ExitCode, mods, res.Tail())
	}
	return res
}

// MissingError says that something the VM layer needs is not on this
// machine, and how to get it.
type MissingError struct {
	What string // what is missing and how to get it
	Err  error
}

func (e *MissingError) Error() string { return fmt.Sprintf("missing %s: %v", e.What, e.Err) }
func (e *MissingError) Unwrap() error { return e.Err }

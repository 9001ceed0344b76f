// Package vmtest holds the proof tests that need a real Debian kernel (IPVS,
// ESP states): TestVM boots the vmlab guest once and runs every TestGuest*
// test of this package inside it.
package vmtest

import (
	"os"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/vmlab"
)

// TestVM is the host side: one boot for all guest tests of this package.
func TestVM(t *testing.T) {
	if vmlab.InGuest() {
		t.Skip("host-side test")
	}
	if testing.Short() {
		t.Skip("boots a VM (about 10-60 s); not in -short")
	}
	vmlab.Run(t, vmlab.Options{Package: ".", Run: "^TestGuest", Timeout: 3 * time.Minute})
}

func TestGuestSmoke(t *testing.T) {
	vmlab.RequireGuest(t)
	b, err := os.ReadFile("/proc/version")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest kernel: %s", b)
}

// TestNetlabInGuest runs internal/netlab's own real-packet tests on the
// Debian guest kernel too (second boot: another package), which shows that
// netlab needs no iproute2 and works on the kernel the VM tests use.
func TestNetlabInGuest(t *testing.T) {
	if vmlab.InGuest() {
		t.Skip("host-side test")
	}
	if testing.Short() {
		t.Skip("boots a VM; not in -short")
	}
	vmlab.Run(t, vmlab.Options{Package: "../../netlab", Timeout: 3 * time.Minute})
}

// Package strongswan proves the director's transitions with real strongSwan
// tunnels: peers and nodes run Debian's charon with the repository's
// example configuration, the director runs the real daemon, all inside the
// vmlab guest (Debian's kernel: ESP, IPVS), in route-only and IPVS mode.
// TestVM boots the guest once for every TestGuest* scenario here.
package strongswan

import (
	"testing"

	"github.com/tunneldirector/tunneldirector/internal/e2e/ikelab"
)

// TestVM is the host side: one boot for all guest scenarios.
func TestVM(t *testing.T) {
	ikelab.RunVM(t, ikelab.VMOptions{})
}

package store

import (
	"errors"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// TestOfflineImportKnowsTheVIPs: a subnet containing a VIP is refused on
// the offline path too (the review imported 198.51.100.0/24 with --db, and
// the daemon then refused to start on that store).
func TestOfflineImportKnowsTheVIPs(t *testing.T) {
	path := filepath.Join(t.TempDir(), "td.db")
	vip := netip.MustParseAddr("198.51.100.10")
	s, err := Open(Options{Path: path, Table: affinity.Options{VIPs: []netip.Addr{vip}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetVIPs([]netip.Addr{vip}); err != nil {
		t.Fatal(err)
	}
	s.Commit(nodes(1))
	s.Close()

	off, err := Open(Options{Path: path}) // the CLI with --db: no configuration
	if err != nil {
		t.Fatal(err)
	}
	defer off.Close()
	if got := off.Table().VIPs(); len(got) != 1 || got[0] != vip {
		t.Fatalf("offline VIPs %v", got)
	}
	_, err = off.Commit([]affinity.Change{{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: "t", Peer: netip.MustParseAddr("203.0.113.5"),
		Subnets: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}}}})
	var be *affinity.BatchError
	if !errors.As(err, &be) || !strings.Contains(err.Error(), "contains director VIP 198.51.100.10") {
		t.Fatalf("subnet containing the VIP: %v", err)
	}
}

package ikelab

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRenderWholeTokens(t *testing.T) {
	in := []byte("local_addrs = 192.0.2.10\nother = 192.0.2.101, 10.1.0.0/24\n")
	out, err := Render("x", in, map[string]string{"192.0.2.10": "198.51.100.101", "10.1.0.0/24": "10.70.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	want := "local_addrs = 198.51.100.101\nother = 192.0.2.101, 10.70.0.0/24\n"
	if string(out) != want {
		t.Fatalf("got %q, want %q", out, want)
	}
	if _, err := Render("x", in, map[string]string{"203.0.113.9": "1.2.3.4"}); err == nil || !strings.Contains(err.Error(), "203.0.113.9") {
		t.Fatalf("a replacement the example lacks: err = %v, want one naming it", err)
	}
}

func TestParseSysctl(t *testing.T) {
	got, err := ParseSysctl("f", []byte("# c\n; c\n\nnet.ipv4.ip_forward = 1\n net.ipv4.conf.eth1.accept_local=1 \n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0] != (Sysctl{"net.ipv4.ip_forward", "1", 4}) || got[1] != (Sysctl{"net.ipv4.conf.eth1.accept_local", "1", 5}) {
		t.Fatalf("got %+v", got)
	}
	for _, bad := range []string{"net.ipv4.ip_forward\n", "= 1\n", "a b = 1\n", "k =\n"} {
		if _, err := ParseSysctl("f", []byte(bad)); err == nil || !strings.Contains(err.Error(), "f:1:") {
			t.Errorf("%q: err = %v, want one naming f:1", bad, err)
		}
	}
}

// TestExamplesRender checks, without a VM, that the examples still contain
// everything the farm replaces and that the sysctl files parse.
func TestExamplesRender(t *testing.T) {
	dir, err := ExamplesDir()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := readExample(dir, PeerSwanctlExample, peerSubst(examplePeer, "203.0.113.1", []string{"10.70.0.0/24", "10.71.0.0/24"}, "198.18.1.0/24")); err != nil {
		t.Error(err)
	}
	if _, err := readExample(dir, NodeSwanctlExample, nodeSubst("203.0.113.1", "198.18.1.0/24")); err != nil {
		t.Error(err)
	}
	for _, f := range []string{DirectorSysctl, NodeSysctl} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		s, err := ParseSysctl(f, b)
		if err != nil || len(s) == 0 {
			t.Errorf("%s: %d settings, %v", f, len(s), err)
		}
	}
}

func TestDecodeIPVSConns(t *testing.T) {
	in := "Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\nUDP C6336465 01F4 CB007101 01F4 C000020C 01F4 UDP             290\n"
	got := decodeIPVSConns(in)
	want := "UDP 198.51.100.101:500 -> 203.0.113.1:500 -> 192.0.2.12:500 UDP expires 290s"
	if !strings.Contains(got, want) {
		t.Fatalf("got\n%s\nwant a line %q", got, want)
	}
}

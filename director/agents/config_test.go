package agents

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func tokenDir(t *testing.T, files map[string]string, mode os.FileMode) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestLoadTokens(t *testing.T) {
	dir := tokenDir(t, map[string]string{"vpn-a": "aaaaaaaaaaaaaaaaaaaa\n", "vpn-b": "  bbbbbbbbbbbbbbbbbbbb ", ".vpn-a.swp": "x"}, 0o600)
	toks, err := LoadTokens(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(toks) != 2 || toks["vpn-a"] != strings.Repeat("a", 20) || toks["vpn-b"] != strings.Repeat("b", 20) {
		t.Fatalf("tokens %v", toks)
	}
	bad := tokenDir(t, map[string]string{"empty": "\n", "short": "abc", "one": "cccccccccccccccccccc", "two": "cccccccccccccccccccc", "bad\u202ename": "dddddddddddddddddddd"}, 0o600)
	_, err = LoadTokens(bad)
	for _, want := range []string{"empty is empty", "short: token shorter than 16 bytes", "holds the same token as", "the file name must be the node's name"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("LoadTokens: %v; want %q", err, want)
		}
	}
}

func TestConfigValidateAndWarnings(t *testing.T) {
	c := DefaultConfig()
	if err := c.Validate("agents"); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	c.TokenDir = tokenDir(t, map[string]string{"vpn-a": "aaaaaaaaaaaaaaaaaaaa"}, 0o644)
	if err := c.Validate("agents"); err != nil {
		t.Fatal(err)
	}
	w := strings.Join(c.Warnings("agents"), "\n")
	if !strings.Contains(w, "vpn-a has mode 0644") {
		t.Fatalf("warnings %q", w)
	}
	c.Adopt = "follow"
	c.LearnedTTL = 0
	err := c.Validate("agents")
	for _, want := range []string{`agents.adopt: "follow"`, "agents.learned_ttl: 0s is below 1s"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate: %v; want %q", err, want)
		}
	}
}

func TestAllowedSubnets(t *testing.T) {
	c := Config{Subnets: pfxs("10.0.0.0/8", "2001:db8::/32")}
	for s, want := range map[string]bool{"10.1.0.0/16": true, "10.0.0.0/8": true, "0.0.0.0/0": false, "11.0.0.0/24": false, "2001:db8:1::/48": true, "2001:db9::/48": false} {
		if got := c.allowed(pfx(s)); got != want {
			t.Errorf("allowed(%s) = %v", s, got)
		}
	}
	if !(Config{}).allowed(pfx("0.0.0.0/0")) {
		t.Error("no agents.subnets must allow everything")
	}
}

package director

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigExampleIsValid(t *testing.T) {
	b, err := os.ReadFile("../examples/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// The example names interfaces this machine may lack.
	body := strings.NewReplacer("outside: eth0", "outside: lo", "inside: eth1", "inside: lo").Replace(string(b))
	c, err := LoadConfig(writeConfig(t, body))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Nodes) != 3 || c.Nodes[2].Forward != "tunnel" || c.Marks.Base != 0x7d000000 {
		t.Fatalf("parsed %+v", c)
	}
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	tests := []struct{ body, want string }{
		{"vips: [192.0.2.1]\nvipz: []\n", "field vipz not found"},
		{"vips: [192.0.2.300]\n", "vips[0]: \"192.0.2.300\" is not an IP address"},
		{"vips: []\n", "vips: no VIP"},
		{"vips: [192.0.2.1]\nmode: fast\n", "mode: \"fast\""},
		{"vips: [192.0.2.1]\nnodes: [{name: a, address: 10.0.0.1}, {name: a, address: 10.0.0.2}]\n", "nodes[1].name: \"a\" already at nodes[0]"},
		{"vips: [192.0.2.1]\nnodes: [{name: a, address: nope}]\n", "nodes[0].address"},
		{"vips: [192.0.2.1]\ninterfaces: {inside: no-such-if0}\n", "interfaces.inside: interface \"no-such-if0\" does not exist"},
		{"vips: [192.0.2.1]\nmarks: {base: 0x7d000001}\n", "marks: base 0x7d000001"},
		{"vips: [192.0.2.1]\napi: {tcp: \"192.0.2.1:7410\"}\n", "api.token_file: required"},
		{"vips: [192.0.2.1]\nverify_interval: soon\n", "not a duration"},
	}
	for _, tc := range tests {
		_, err := LoadConfig(writeConfig(t, tc.body))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %q: error %v, want %q", tc.body, err, tc.want)
		}
	}
}

func FuzzLoadConfig(f *testing.F) {
	if b, err := os.ReadFile("../examples/config.yaml"); err == nil {
		f.Add(b)
	}
	f.Add([]byte("vips: [192.0.2.1]\n"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(dir, "c.yaml")
		os.WriteFile(p, b, 0o600)
		c, err := LoadConfig(p)
		if err == nil {
			if vips, verr := c.ParsedVIPs(); verr != nil || len(vips) == 0 {
				t.Fatalf("accepted a configuration without usable VIPs: %v", verr)
			}
		}
	})
}

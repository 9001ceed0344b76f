package ikelab

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
)

// Example files the farm loads, relative to the repository's examples/.
const (
	PeerSwanctlExample = "strongswan/peer.swanctl.conf"
	NodeSwanctlExample = "strongswan/node.swanctl.conf"
	FailoverExample    = "strongswan/failover.conf"
	DirectorSysctl     = "sysctl.d/90-tunneldirector.conf"
	NodeSysctl         = "sysctl.d/90-tunneldirector-node.conf"
)

// The addresses and interface names the examples are written with; the
// farm replaces them with its own.
const (
	exampleVIP      = "198.51.100.10"
	examplePeer     = "192.0.2.10"
	exampleSubnetA  = "10.1.0.0/24"
	exampleSubnetB  = "10.1.1.0/24"
	exampleBehind   = "172.20.0.0/16" // the networks behind the director
	exampleInsideIf = "eth1"
)

// ExamplesDir returns the repository's examples directory. The test binary
// runs elsewhere (in the guest, from /tmp), so it is found from this
// source file's path, which the guest sees on the host's root.
func ExamplesDir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("ikelab: cannot locate the repository (no caller information)")
	}
	dir := filepath.Join(filepath.Dir(file), "..", "..", "..", "examples")
	if _, err := os.Stat(filepath.Join(dir, PeerSwanctlExample)); err != nil {
		return "", fmt.Errorf("ikelab: examples not found next to the source: %w", err)
	}
	return filepath.Clean(dir), nil
}

// token matches what an address, prefix or interface name in a config file
// can be made of; replacements apply to whole tokens only, so 192.0.2.10
// never rewrites a part of 192.0.2.101.
var token = regexp.MustCompile(`[0-9A-Za-z.:/_-]+`)

// Render returns the example with every whole token that is a key of subst
// replaced by its value. Every key must occur in the example: a key that
// does not means the example changed and the lab would silently test
// something else.
func Render(name string, example []byte, subst map[string]string) ([]byte, error) {
	seen := map[string]bool{}
	out := token.ReplaceAllFunc(example, func(tok []byte) []byte {
		if v, ok := subst[string(tok)]; ok {
			seen[string(tok)] = true
			return []byte(v)
		}
		return tok
	})
	var missing []string
	for k := range subst {
		if !seen[k] {
			missing = append(missing, k)
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return nil, fmt.Errorf("example %s: does not contain %s, which the lab replaces: update internal/e2e/ikelab with the example", name, strings.Join(missing, ", "))
	}
	return out, nil
}

// Sysctl is one "key = value" line of a sysctl.d file.
type Sysctl struct {
	Key, Value string
	Line       int
}

// ParseSysctl reads a sysctl.d file: "key = value" lines, # and ; comments,
// blank lines. Anything else is an error naming the line.
func ParseSysctl(name string, b []byte) ([]Sysctl, error) {
	var out []Sysctl
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		l := strings.TrimSpace(sc.Text())
		if l == "" || l[0] == '#' || l[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || k == "" || v == "" || strings.ContainsAny(k, " \t") {
			return nil, fmt.Errorf("%s:%d: want \"key = value\", got %q", name, n, l)
		}
		out = append(out, Sysctl{Key: k, Value: v, Line: n})
	}
	return out, sc.Err()
}

// readExample reads and renders an example file.
func readExample(dir, name string, subst map[string]string) ([]byte, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return nil, fmt.Errorf("read example: %w", err)
	}
	return Render(name, b, subst)
}

package health

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// load decodes a director configuration's health section the way
// director.LoadConfig decodes the file: defaults first, strict keys.
func load(t *testing.T, text string) (Config, error) {
	t.Helper()
	var doc struct {
		Health Config `yaml:"health"`
	}
	doc.Health = DefaultConfig()
	dec := yaml.NewDecoder(bytes.NewReader([]byte(text)))
	dec.KnownFields(true)
	err := dec.Decode(&doc)
	return doc.Health, err
}

func TestDefaultsAreValid(t *testing.T) {
	c := DefaultConfig()
	if err := c.Validate("health"); err != nil {
		t.Fatal(err)
	}
	// Detection: fall rounds, interval apart, each ending by timeout.
	worst := time.Duration(c.Fall)*c.Interval + c.Timeout
	if worst > 3*time.Second {
		t.Fatalf("default worst-case detection %s exceeds the 3s goal", worst)
	}
}

func TestConfigPerNodeOverrides(t *testing.T) {
	c, err := load(t, `
health:
  interval: 2s
  timeout: 1s
  nodes:
    n2:
      fall: 5
      checks: [ike, tcp]
      tcp: {port: 22}
    n3:
      interval: 500ms
      timeout: 200ms
  max_down_fraction: 0.3
  flap: {count: 5}
`)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate("health"); err != nil {
		t.Fatal(err)
	}
	n1, n2, n3 := c.For("n1"), c.For("n2"), c.For("n3")
	if n1.Interval != 2*time.Second || n1.Fall != 2 || n1.Has(CheckTCP) {
		t.Fatalf("n1 (top level): %+v", n1)
	}
	if n2.Interval != 2*time.Second || n2.Timeout != time.Second || n2.Fall != 5 || !n2.Has(CheckTCP) || n2.TCP.Port != 22 || n2.Rise != 2 {
		t.Fatalf("n2 (override over the top level, not over the defaults): %+v", n2)
	}
	if n3.Interval != 500*time.Millisecond || n3.Fall != 2 || !n3.Has(CheckIKE) || n3.Has(CheckTCP) {
		t.Fatalf("n3: %+v", n3)
	}
	if c.MaxDownFraction != 0.3 || c.Flap.Count != 5 || c.Flap.Window != 10*time.Minute {
		t.Fatalf("farm: %+v", c.Global)
	}
}

func TestConfigRefusesImpossibleValues(t *testing.T) {
	for _, tc := range []struct {
		yaml, want string
	}{
		{"health: {interval: 1s, timeout: 1s}", "health.timeout: 1s is not below interval 1s"},
		{"health: {rise: 0}", "health.rise: 0: must be at least 1"},
		{"health: {fall: 0}", "health.fall: 0: must be at least 1"},
		{"health: {checks: []}", "health.checks: empty"},
		{"health: {checks: [ike, ping]}", `health.checks[1]: "ping" is not a check`},
		{"health: {checks: [ike, ike]}", `health.checks[1]: "ike" listed twice`},
		{"health: {checks: [tcp]}", "health.tcp.port: 0: the tcp check needs a port"},
		{"health: {checks: [exec]}", "health.exec.command: empty"},
		{"health: {checks: [exec], exec: {command: [check-node]}}", `health.exec.command[0]: "check-node" is not an absolute path`},
		{"health: {delay_before_retry: -1s}", "health.delay_before_retry: -1s is negative"},
		{"health: {max_down_fraction: 0}", "health.max_down_fraction: 0 out of range"},
		{"health: {max_down_fraction: 1.5}", "health.max_down_fraction: 1.5 out of range"},
		{"health: {flap: {hold: 10m, hold_max: 1m}}", "health.flap.hold_max: 1m0s is below flap.hold 10m0s"},
		{"health: {nodes: {n2: {timeout: 5s}}}", "health.nodes.n2.timeout: 5s is not below interval 1s"},
		{"health: {nodes: {n2: {rise: 0}}}", "health.nodes.n2.rise: 0"},
	} {
		c, err := load(t, tc.yaml)
		if err == nil {
			err = c.Validate("health")
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.yaml, err, tc.want)
		}
	}
}

func TestConfigUnknownKeysNamePathAndLine(t *testing.T) {
	for _, tc := range []struct {
		yaml, want string
	}{
		{"health:\n  intervall: 1s\n", "health.intervall (line 2): unknown key"},
		{"health:\n  flap:\n    cnt: 3\n", "health.flap.cnt (line 3): unknown key"},
		{"health:\n  nodes:\n    n2:\n      tcp: {prot: 22}\n", "health.nodes.n2.tcp.prot (line 4): unknown key"},
		{"health:\n  interval: 5\n", `health.interval (line 2): "5" is not a duration (like 1s or 500ms)`},
		{"health:\n  nodes:\n    n2:\n      fall: many\n", "health.nodes.n2.fall (line 4): cannot decode !!str `many` into int"},
		{"health:\n  checks: ike\n", "health.checks (line 2): want a list of strings"},
		{"health:\n  flap: 3\n", "health.flap (line 2): want a mapping of keys"},
	} {
		_, err := load(t, tc.yaml)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.yaml, err, tc.want)
		}
	}
}

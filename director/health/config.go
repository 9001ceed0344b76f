package health

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Check kinds, as named in the configuration's checks list.
const (
	CheckIKE       = "ike"
	CheckTCP       = "tcp"
	CheckExec      = "exec"
	CheckHeartbeat = "heartbeat"
)

var checkKinds = []string{CheckIKE, CheckTCP, CheckExec, CheckHeartbeat}

// Params are the settings of one node's checks: the health section's
// top-level values, or those values overlaid with a node's entry under
// nodes. Names follow keepalived's where it has one (rise, fall,
// delay_before_retry; keepalived's delay_loop and connect_timeout are
// interval and timeout here).
type Params struct {
	// Checks lists the checks that run every interval; a round passes
	// when all of them pass.
	Checks []string `yaml:"checks"`
	// Interval is the time between the starts of two rounds.
	Interval time.Duration `yaml:"interval"`
	// Timeout bounds one round; it must be below Interval.
	Timeout time.Duration `yaml:"timeout"`
	// Rise is how many passing rounds in a row bring a node up.
	Rise int `yaml:"rise"`
	// Fall is how many failing rounds in a row take a node down.
	Fall int `yaml:"fall"`
	// DelayBeforeRetry: an IKE probe without an answer after this long
	// is sent again (as an IKE initiator retransmits), until Timeout;
	// 0 (or a value not below Timeout) sends it once.
	DelayBeforeRetry time.Duration `yaml:"delay_before_retry"`
	// IKE is the IKE probe's target port.
	IKE struct {
		Port uint16 `yaml:"port"`
	} `yaml:"ike"`
	// TCP connects to the node's address on Port.
	TCP struct {
		Port uint16 `yaml:"port"`
	} `yaml:"tcp"`
	// Exec runs Command (argv; NODE_NAME and NODE_ADDRESS in its
	// environment); exit status 0 passes, like keepalived's MISC_CHECK.
	Exec struct {
		Command []string `yaml:"command"`
	} `yaml:"exec"`
	// Heartbeat passes while the node agent's last heartbeat is at most
	// MaxAge old.
	Heartbeat struct {
		MaxAge time.Duration `yaml:"max_age"`
	} `yaml:"heartbeat"`
}

// Has reports whether the check kind is enabled.
func (p *Params) Has(kind string) bool { return slices.Contains(p.Checks, kind) }

// Flap is the flap damping of the health section.
type Flap struct {
	// Count: a node taken down by health more than Count times within
	// Window is held down.
	Count int `yaml:"count"`
	// Window is the time over which downs are counted.
	Window time.Duration `yaml:"window"`
	// Hold is the first hold time; every further hold doubles it, up to
	// HoldMax. A node quiet for HoldMax after its last hold starts over.
	Hold    time.Duration `yaml:"hold"`
	HoldMax time.Duration `yaml:"hold_max"`
}

// Config is the health section of the director's configuration.
type Config struct {
	Global `yaml:",inline"`
	// Nodes overrides Params per node name: each entry is the top-level
	// Params with the entry's keys laid over them.
	Nodes map[string]Params `yaml:"nodes"`
}

// Global is the health section without its per-node entries.
type Global struct {
	// Enabled turns health checking on (default true).
	Enabled bool `yaml:"enabled"`
	// Params are the checks of every node unless overridden.
	Params `yaml:",inline"`
	// MaxDownFraction: when more than this fraction of the nodes health
	// manages are failing or down by health, the director assumes its own
	// view is broken and moves nothing.
	MaxDownFraction float64 `yaml:"max_down_fraction"`
	// Flap is the flap damping.
	Flap Flap `yaml:"flap"`
	// Settle: after the inside interface comes back or a panic ends,
	// counts start afresh, and failed rounds that start within this time
	// are not counted (passing ones are). Neighbour resolution and switch
	// ports take a moment after a link comes up (the namespace test saw
	// the first ARP solicitations lost and two nodes fail for a second),
	// and nodes failing together recover one by one: the last ones must
	// not be moved because the first ones ended the panic.
	Settle time.Duration `yaml:"settle"`
}

// DefaultConfig returns the defaults. They work with strongSwan and
// libreswan as they come: both answer the IKE probe on UDP 500 and keep no
// state for it (charon 5.9.8: INVALID_KE_PAYLOAD or NO_PROPOSAL_CHOSEN;
// pluto 4.10: INVALID_SYNTAX, refusing the probe's KE group). A
// dead node is detected in 1.8 to 2.8 s: two failed rounds of 800 ms, one
// second apart; a single lost datagram costs nothing because the probe is
// resent after 250 ms.
func DefaultConfig() Config {
	c := Config{Global: Global{Enabled: true, MaxDownFraction: 0.5}}
	c.Checks = []string{CheckIKE}
	c.Interval = time.Second
	c.Timeout = 800 * time.Millisecond
	c.Rise = 2
	c.Fall = 2
	c.DelayBeforeRetry = 250 * time.Millisecond
	c.IKE.Port = 500
	c.Heartbeat.MaxAge = 15 * time.Second
	c.Flap = Flap{Count: 3, Window: 10 * time.Minute, Hold: time.Minute, HoldMax: 30 * time.Minute}
	c.Settle = 3 * time.Second
	return c
}

// For returns the parameters of the named node: its override, or the
// top-level ones.
func (c *Config) For(node string) Params {
	if p, ok := c.Nodes[node]; ok {
		return p
	}
	return c.Params
}

// UnmarshalYAML decodes the section over the values already in c (the
// defaults), then resolves every per-node entry over the top-level values,
// so a node's entry only names what differs. Unknown keys and values of
// the wrong type are reported as the rest of the configuration's are, by
// key path and line ("health.intervall (line 7): unknown key"), all of
// them, in a *yaml.TypeError so that the decoder goes on with the rest of
// the file; a bad value keeps its default.
func (c *Config) UnmarshalYAML(n *yaml.Node) error {
	var bad []string
	checkKeys(n, reflect.TypeOf(Config{}), "health", &bad)
	raw := struct {
		Global `yaml:",inline"`
		Nodes  map[string]yaml.Node `yaml:"nodes"`
	}{Global: c.Global}
	if err := n.Decode(&raw); err != nil {
		return err
	}
	c.Global = raw.Global
	c.Nodes = nil
	if len(raw.Nodes) > 0 {
		c.Nodes = make(map[string]Params, len(raw.Nodes))
		for name, nn := range raw.Nodes {
			p := c.Params
			p.Checks = slices.Clone(p.Checks)
			p.Exec.Command = slices.Clone(p.Exec.Command)
			if err := nn.Decode(&p); err != nil {
				return fmt.Errorf("health.nodes.%s: %w", name, err)
			}
			c.Nodes[name] = p
		}
	}
	if len(bad) > 0 {
		return &yaml.TypeError{Errors: bad}
	}
	return nil
}

// checkKeys walks a YAML mapping against the yaml tags of t. It reports
// keys t does not have (a typo in the health section must not fall back
// to a default silently; yaml.v3 does not carry KnownFields into a custom
// unmarshaler's Decode) and values that do not decode into their field,
// which it then nulls so that the field keeps its default and decoding
// goes on.
func checkKeys(n *yaml.Node, t reflect.Type, path string, bad *[]string) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			*bad = append(*bad, fmt.Sprintf("%s (line %d): want a mapping of keys", path, n.Line))
			nullNode(n)
			return
		}
		fields := map[string]reflect.Type{}
		collectFields(t, fields)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			ft, ok := fields[k.Value]
			if !ok {
				*bad = append(*bad, fmt.Sprintf("%s.%s (line %d): unknown key (known: %s)", path, k.Value, k.Line, strings.Join(sortedKeys(fields), ", ")))
				continue
			}
			checkKeys(v, ft, path+"."+k.Value, bad)
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			*bad = append(*bad, fmt.Sprintf("%s (line %d): want a mapping of node names", path, n.Line))
			nullNode(n)
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			checkKeys(n.Content[i+1], t.Elem(), path+"."+n.Content[i].Value, bad)
		}
	default:
		if err := n.Decode(reflect.New(t).Interface()); err != nil {
			*bad = append(*bad, fmt.Sprintf("%s (line %d): %s", path, n.Line, valueMessage(t, n, err)))
			nullNode(n)
		}
	}
}

// valueMessage words a value that does not decode by what was wanted.
func valueMessage(t reflect.Type, n *yaml.Node, err error) string {
	v := n.Value
	if len(v) > 64 {
		v = v[:64] + "..."
	}
	switch {
	case t == reflect.TypeFor[time.Duration]():
		return fmt.Sprintf("%q is not a duration (like 1s or 500ms)", v)
	case t.Kind() == reflect.Slice:
		return "want a list of " + t.Elem().Kind().String() + "s"
	case n.Kind != yaml.ScalarNode:
		return "want a " + t.Kind().String()
	}
	msg := err.Error()
	if _, after, ok := strings.Cut(msg, "cannot unmarshal "); ok {
		msg = "cannot decode " + after
	}
	return msg
}

func nullNode(n *yaml.Node) {
	n.Kind, n.Tag, n.Value, n.Style, n.Content, n.Alias = yaml.ScalarNode, "!!null", "", 0, nil, nil
}

func collectFields(t reflect.Type, into map[string]reflect.Type) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("yaml")
		name, opts, _ := strings.Cut(tag, ",")
		if opts == "inline" {
			collectFields(f.Type, into)
			continue
		}
		if name == "" || name == "-" {
			continue
		}
		into[name] = f.Type
	}
}

func sortedKeys(m map[string]reflect.Type) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Validate checks the section and names every impossible value by its key
// path under prefix (the section's own key, e.g. "health"), for `config
// check`. Nothing of a refused configuration is applied.
func (c *Config) Validate(prefix string) error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", prefix, key, fmt.Sprintf(format, args...)))
	}
	c.Params.validate("", bad)
	names := make([]string, 0, len(c.Nodes))
	for name := range c.Nodes {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		p := c.Nodes[name]
		p.validate("nodes."+name+".", bad)
	}
	if !(c.MaxDownFraction > 0 && c.MaxDownFraction <= 1) {
		bad("max_down_fraction", "%g out of range (0, 1]: the share of the farm health may take down", c.MaxDownFraction)
	}
	f := c.Flap
	if f.Count < 1 {
		bad("flap.count", "%d: must be at least 1", f.Count)
	}
	if f.Window <= 0 {
		bad("flap.window", "%s: must be positive", f.Window)
	}
	if f.Hold <= 0 {
		bad("flap.hold", "%s: must be positive", f.Hold)
	}
	if f.HoldMax < f.Hold {
		bad("flap.hold_max", "%s is below flap.hold %s", f.HoldMax, f.Hold)
	}
	if c.Settle < 0 {
		bad("settle", "%s is negative", c.Settle)
	}
	return errors.Join(errs...)
}

func (p *Params) validate(at string, bad func(key, format string, args ...any)) {
	if len(p.Checks) == 0 {
		bad(at+"checks", "empty: list at least one of %s", strings.Join(checkKinds, ", "))
	}
	seen := map[string]bool{}
	for i, k := range p.Checks {
		if !slices.Contains(checkKinds, k) {
			bad(fmt.Sprintf("%schecks[%d]", at, i), "%q is not a check (want %s)", k, strings.Join(checkKinds, ", "))
		} else if seen[k] {
			bad(fmt.Sprintf("%schecks[%d]", at, i), "%q listed twice", k)
		}
		seen[k] = true
	}
	if p.Interval < 10*time.Millisecond {
		bad(at+"interval", "%s is below 10ms", p.Interval)
	}
	if p.Timeout <= 0 {
		bad(at+"timeout", "%s: must be positive", p.Timeout)
	} else if p.Timeout >= p.Interval {
		bad(at+"timeout", "%s is not below interval %s: a round must end before the next starts", p.Timeout, p.Interval)
	}
	if p.Rise < 1 {
		bad(at+"rise", "%d: must be at least 1", p.Rise)
	}
	if p.Fall < 1 {
		bad(at+"fall", "%d: must be at least 1", p.Fall)
	}
	// A delay_before_retry at or above timeout is allowed: the probe is
	// then sent once (a node's shorter timeout need not repeat it).
	if p.DelayBeforeRetry < 0 {
		bad(at+"delay_before_retry", "%s is negative", p.DelayBeforeRetry)
	}
	if p.Has(CheckIKE) && p.IKE.Port == 0 {
		bad(at+"ike.port", "0: the ike check needs a port (500)")
	}
	if p.Has(CheckTCP) && p.TCP.Port == 0 {
		bad(at+"tcp.port", "0: the tcp check needs a port")
	}
	if p.Has(CheckExec) {
		if len(p.Exec.Command) == 0 || p.Exec.Command[0] == "" {
			bad(at+"exec.command", "empty: the exec check needs a command")
		} else if !strings.HasPrefix(p.Exec.Command[0], "/") {
			bad(at+"exec.command[0]", "%q is not an absolute path (the daemon's PATH and directory are not the shell's)", p.Exec.Command[0])
		}
	}
	if p.Has(CheckHeartbeat) && p.Heartbeat.MaxAge <= 0 {
		bad(at+"heartbeat.max_age", "%s: must be positive", p.Heartbeat.MaxAge)
	}
}

package director

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/ipvs"
)

// Config is the daemon's configuration file (YAML). Every key, its default
// and its meaning are listed in README.md; Check explains errors by key
// path.
type Config struct {
	// Store is the bbolt file.
	Store string `yaml:"store"`
	// VIPs are the director's virtual addresses (keepalived moves them).
	VIPs []string `yaml:"vips"`
	// Interfaces name the director's links.
	Interfaces struct {
		Outside string `yaml:"outside"` // towards the peers
		Inside  string `yaml:"inside"`  // towards the nodes and the target network
	} `yaml:"interfaces"`
	// Mode: auto (IPVS when the kernel has it), ipvs, or route-only.
	Mode string `yaml:"mode"`
	// Forward is the default IPVS forwarding method: dr, tunnel, masq.
	Forward string `yaml:"forward"`
	// Nodes are merged into the table at start and on reload; more can
	// come from imports.
	Nodes []NodeConfig `yaml:"nodes"`
	// Marks is the packet mark range the director owns.
	Marks struct {
		Base uint32 `yaml:"base"`
		Mask uint32 `yaml:"mask"`
	} `yaml:"marks"`
	// Routing is the policy-routing range the director owns.
	Routing struct {
		TableBase    int `yaml:"table_base"`
		RulePriority int `yaml:"rule_priority"`
	} `yaml:"routing"`
	// HashSeed seeds the kernel's hash of unknown peers; both directors
	// of a pair must use the same.
	HashSeed uint32 `yaml:"hash_seed"`
	// Learn pins unknown peers into the table from conntrack NEW events.
	Learn *bool `yaml:"learn"`
	// Epsilon is the scheduler's bounded-load slack.
	Epsilon float64 `yaml:"epsilon"`
	// API is the local API.
	API struct {
		Socket    string `yaml:"socket"`
		TCP       string `yaml:"tcp"`
		TokenFile string `yaml:"token_file"`
	} `yaml:"api"`
	// Replication pairs this director with another (optional).
	Replication ReplicationConfig `yaml:"replication"`
	// VerifyInterval is how often the kernel is read back and repaired.
	VerifyInterval Duration `yaml:"verify_interval"`
	// LogLevel: debug, info, warn, error.
	LogLevel string `yaml:"log_level"`
}

// ReplicationConfig pairs the director with its peer over the sync link.
type ReplicationConfig struct {
	// ID is this director's id (1..2^32-1), different on the two.
	ID uint32 `yaml:"id"`
	// Local is the address:port to bind on the sync link.
	Local string `yaml:"local"`
	// Peer is the other director's address:port, or the multicast group.
	Peer string `yaml:"peer"`
	// Multicast sends to Peer as a group joined on Interface.
	Multicast bool `yaml:"multicast"`
	// Interface is the sync link.
	Interface string `yaml:"interface"`
	// KeyFile holds the shared key (at least 32 bytes) that authenticates
	// every datagram.
	KeyFile string `yaml:"key_file"`
	// StatePath keeps the epoch history across restarts.
	StatePath string `yaml:"state_path"`
	// MTU is the datagram payload size (0: 1400).
	MTU int `yaml:"mtu"`
	// ReadyFile is written "0" when this director is in sync and "1"
	// when not, for keepalived's track_file (weight -N): a director that
	// is not in sync never wins the election.
	ReadyFile string `yaml:"ready_file"`
	// InitialRole is the role until keepalived says otherwise: backup.
	InitialRole string `yaml:"initial_role"`
}

// Enabled reports whether replication is configured.
func (r *ReplicationConfig) Enabled() bool { return r.Peer != "" }

// NodeConfig is a node listed in the configuration.
type NodeConfig struct {
	Name     string `yaml:"name"`
	Address  string `yaml:"address"`
	Address6 string `yaml:"address6"`
	Weight   uint32 `yaml:"weight"`
	Capacity int    `yaml:"capacity"`
	Forward  string `yaml:"forward"`
}

// Duration is a time.Duration written as "30s" in YAML.
type Duration time.Duration

// UnmarshalYAML parses "30s", "5m".
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (like 30s or 5m)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// Defaults of the configuration.
const (
	DefaultSocket         = "/run/tunneldirector/api.sock"
	DefaultMarkBase       = 0x7d000000
	DefaultMarkMask       = 0xff001fff
	DefaultTableBase      = 20000
	DefaultRulePriority   = 100
	DefaultVerifyInterval = 30 * time.Second
)

// DefaultConfig returns the configuration with every default filled in.
func DefaultConfig() Config {
	var c Config
	c.Store = "/var/lib/tunneldirector/tunneldirector.db"
	c.Mode = "auto"
	c.Forward = "dr"
	c.Marks.Base = DefaultMarkBase
	c.Marks.Mask = DefaultMarkMask
	c.Routing.TableBase = DefaultTableBase
	c.Routing.RulePriority = DefaultRulePriority
	c.HashSeed = 0x7d1e5eed
	c.Epsilon = affinity.DefaultEpsilon
	c.API.Socket = DefaultSocket
	c.VerifyInterval = Duration(DefaultVerifyInterval)
	c.LogLevel = "info"
	return c
}

// LoadConfig reads and checks a configuration file. Unknown keys are
// errors (a typo must not silently fall back to a default); every problem
// is reported with its key path.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	c := DefaultConfig()
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	// An empty file decodes to io.EOF: all defaults.
	if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("config %s: %s", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	if err := c.Check(); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return &c, nil
}

// Check validates the configuration and names every problem by key path.
func (c *Config) Check() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if c.Store == "" {
		bad("store", "empty")
	}
	vips, err := c.ParsedVIPs()
	if err != nil {
		errs = append(errs, err)
	}
	if len(vips) == 0 && err == nil {
		bad("vips", "no VIP: the director needs at least one address to steer")
	}
	for k, name := range map[string]string{"interfaces.outside": c.Interfaces.Outside, "interfaces.inside": c.Interfaces.Inside} {
		if name == "" {
			continue
		}
		if _, err := net.InterfaceByName(name); err != nil {
			bad(k, "interface %q does not exist", name)
		}
	}
	if _, err := c.ParsedMode(); err != nil {
		bad("mode", "%v", err)
	}
	if _, err := parseForward(c.Forward); err != nil {
		bad("forward", "%v", err)
	}
	seen := map[string]int{}
	for i, n := range c.Nodes {
		key := fmt.Sprintf("nodes[%d]", i)
		if err := affinity.ValidateID("node name", n.Name); err != nil {
			bad(key+".name", "%v", err)
		} else if j, dup := seen[n.Name]; dup {
			bad(key+".name", "%q already at nodes[%d]", n.Name, j)
		} else {
			seen[n.Name] = i
		}
		a, err := netip.ParseAddr(n.Address)
		if err != nil {
			bad(key+".address", "%q is not an IP address", n.Address)
		} else if err := affinity.ValidateAddr(a); err != nil {
			bad(key+".address", "%v", err)
		}
		if n.Address6 != "" {
			if a6, err := netip.ParseAddr(n.Address6); err != nil || !a6.Is6() {
				bad(key+".address6", "%q is not an IPv6 address", n.Address6)
			} else if a.Is6() {
				bad(key+".address6", "address is already IPv6: address6 is for a node whose address is IPv4")
			}
		}
		if n.Weight > 10000 {
			bad(key+".weight", "%d above 10000", n.Weight)
		}
		if n.Capacity < 0 {
			bad(key+".capacity", "%d is negative", n.Capacity)
		}
		if n.Forward != "" {
			if _, err := parseForward(n.Forward); err != nil {
				bad(key+".forward", "%v", err)
			}
		}
	}
	if c.Marks.Base&^c.Marks.Mask != 0 || c.Marks.Base&0x1fff != 0 || c.Marks.Mask&0x1fff != 0x1fff {
		bad("marks", "base %#x and mask %#x: the mask must cover the base and the low 13 bits (0x1fff: the node mark and the IKE bit), the base must leave those bits clear", c.Marks.Base, c.Marks.Mask)
	}
	if c.Routing.TableBase < 256 || c.Routing.TableBase > 1<<31-affinity.MaxMark-1 {
		bad("routing.table_base", "%d out of range (256 .. 2^31 - 4096): the director uses table_base+mark for each node", c.Routing.TableBase)
	}
	if c.Routing.RulePriority < 1 || c.Routing.RulePriority >= 1000 {
		bad("routing.rule_priority", "%d out of range 1..999 (the kernel's local rule moves to 1000, after the director's rules)", c.Routing.RulePriority)
	}
	if c.Epsilon <= 0 || c.Epsilon > 10 {
		bad("epsilon", "%g out of range (0, 10]", c.Epsilon)
	}
	if c.API.Socket == "" {
		bad("api.socket", "empty")
	}
	if c.API.TCP != "" {
		if _, err := netip.ParseAddrPort(c.API.TCP); err != nil {
			bad("api.tcp", "%q is not address:port", c.API.TCP)
		}
		if c.API.TokenFile == "" {
			bad("api.token_file", "required with api.tcp: TCP access needs a token")
		}
	}
	if r := &c.Replication; r.Enabled() || r.Local != "" {
		if r.ID == 0 {
			bad("replication.id", "required and not 0: each director of the pair has its own")
		}
		if _, err := netip.ParseAddrPort(r.Local); err != nil {
			bad("replication.local", "%q is not address:port", r.Local)
		}
		if _, err := netip.ParseAddrPort(r.Peer); err != nil {
			bad("replication.peer", "%q is not address:port", r.Peer)
		}
		if r.KeyFile == "" {
			bad("replication.key_file", "required: replication traffic is authenticated")
		} else if b, err := os.ReadFile(r.KeyFile); err != nil {
			bad("replication.key_file", "%v", err)
		} else if len(strings.TrimSpace(string(b))) < 32 {
			bad("replication.key_file", "key shorter than 32 bytes")
		}
		switch r.InitialRole {
		case "", "backup", "master", "fault":
		default:
			bad("replication.initial_role", "%q (want backup, master or fault)", r.InitialRole)
		}
	}
	if c.VerifyInterval < Duration(time.Second) {
		bad("verify_interval", "%s is below 1s", time.Duration(c.VerifyInterval))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("log_level", "%q (want debug, info, warn or error)", c.LogLevel)
	}
	return errors.Join(errs...)
}

// ParsedVIPs returns the VIPs as addresses.
func (c *Config) ParsedVIPs() ([]netip.Addr, error) {
	var out []netip.Addr
	var errs []error
	for i, v := range c.VIPs {
		a, err := netip.ParseAddr(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("vips[%d]: %q is not an IP address", i, v))
			continue
		}
		if err := affinity.ValidateAddr(a); err != nil {
			errs = append(errs, fmt.Errorf("vips[%d]: %v", i, err))
			continue
		}
		out = append(out, a)
	}
	return out, errors.Join(errs...)
}

// Dataplane returns the dataplane configuration.
func (c *Config) Dataplane() ipvs.Config {
	mode, _ := c.ParsedMode()
	return ipvs.Config{
		Mode:         mode,
		MarkBase:     c.Marks.Base,
		MarkMask:     c.Marks.Mask,
		TableBase:    c.Routing.TableBase,
		RulePriority: c.Routing.RulePriority,
		InsideIface:  c.Interfaces.Inside,
	}
}

// ParsedMode returns the dataplane mode.
func (c *Config) ParsedMode() (ipvs.Mode, error) {
	switch c.Mode {
	case "", "auto":
		return ipvs.ModeAuto, nil
	case "ipvs":
		return ipvs.ModeIPVS, nil
	case "route-only":
		return ipvs.ModeRouteOnly, nil
	}
	return 0, fmt.Errorf("%q (want auto, ipvs or route-only)", c.Mode)
}

func parseForward(s string) (ipvs.Forward, error) {
	switch s {
	case "", "dr":
		return ipvs.ForwardDR, nil
	case "tunnel":
		return ipvs.ForwardTunnel, nil
	case "masq":
		return ipvs.ForwardMasq, nil
	}
	return 0, fmt.Errorf("%q (want dr, tunnel or masq)", s)
}

// nodeChanges returns the configured nodes as PutNode changes, keeping the
// state (active, draining, down) the table holds for nodes it knows: the
// configuration says which nodes exist, the operator's actions say how
// they are.
func (c *Config) nodeChanges(t *affinity.Table) []affinity.Change {
	var out []affinity.Change
	for _, nc := range c.Nodes {
		a, _ := netip.ParseAddr(nc.Address)
		a6, _ := netip.ParseAddr(nc.Address6)
		n := affinity.Node{Name: nc.Name, Addr: a, Addr6: a6, Weight: nc.Weight, Capacity: nc.Capacity}
		if cur, ok := t.Node(nc.Name); ok {
			n.State, n.Mark, n.Comment = cur.State, cur.Mark, cur.Comment
		}
		out = append(out, affinity.Change{Kind: affinity.PutNode, Node: &n, Reason: "configuration"})
	}
	return out
}

package director

import (
	"bytes"
	"encoding"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/agents"
	"github.com/tunneldirector/tunneldirector/director/ctsync"
	"github.com/tunneldirector/tunneldirector/director/health"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/ipvs"
	"github.com/tunneldirector/tunneldirector/store/etcdstore"
)

// Config is the daemon's configuration file (YAML), decoded once into
// typed values: addresses are netip values, the mode and forwarding
// methods ipvs types, the log level a slog.Level. Every key, its default
// and its meaning are listed in README.md; LoadConfig names every problem
// by key path.
type Config struct {
	// Store is the bbolt file, or etcd://HOST:PORT,.../PREFIX for a
	// table shared by N active directors.
	Store string `yaml:"store"`
	// Etcd configures the etcd store (TLS, cache, election).
	Etcd etcdstore.Config `yaml:"etcd"`
	// BackupDir is where backups made through the daemon's API go; a
	// backup path outside it is refused.
	BackupDir string `yaml:"backup_dir"`
	// VIPs are the director's virtual addresses (keepalived moves them).
	VIPs []netip.Addr `yaml:"vips"`
	// Interfaces name the director's links.
	Interfaces struct {
		Outside string `yaml:"outside"` // towards the peers
		Inside  string `yaml:"inside"`  // towards the nodes and the target network
	} `yaml:"interfaces"`
	// Mode: auto (IPVS when the kernel has it), ipvs, or route-only.
	Mode ipvs.Mode `yaml:"mode"`
	// Forward is the default IPVS forwarding method: dr, tunnel, masq.
	Forward ipvs.Forward `yaml:"forward"`
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
	// Scheduler tunes placement; UnknownPeers the buckets that steer
	// peers the table does not know yet (buckets.go).
	Scheduler    SchedulerConfig    `yaml:"scheduler"`
	UnknownPeers UnknownPeersConfig `yaml:"unknown_peers"`
	// API is the local API.
	API struct {
		Socket    string         `yaml:"socket"`
		TCP       netip.AddrPort `yaml:"tcp"`
		TokenFile string         `yaml:"token_file"`
		// MaxBody bounds an import's request body in bytes; larger
		// bodies are refused with 413. Other requests are bounded by
		// maxSmallBody.
		MaxBody int64 `yaml:"max_body"`
	} `yaml:"api"`
	// Metrics is the Prometheus endpoint (director/metrics).
	Metrics struct {
		// Listen is the address:port serving /metrics; unset: off.
		Listen netip.AddrPort `yaml:"listen"`
	} `yaml:"metrics"`
	// Replication pairs this director with another (optional).
	Replication ReplicationConfig `yaml:"replication"`
	// Agents accepts the node agents' reports (optional).
	Agents agents.Config `yaml:"agents"`
	// Health checks the nodes and takes dead ones down (package
	// director/health).
	Health health.Config `yaml:"health"`
	// VerifyInterval is how often the kernel is read back and repaired.
	VerifyInterval Duration `yaml:"verify_interval"`
	// LogLevel: debug, info, warn, error.
	LogLevel slog.Level `yaml:"log_level"`
}

// ReplicationConfig pairs the director with its peer over the sync link.
type ReplicationConfig struct {
	// ID is this director's id (1..2^32-1), different on the two.
	ID uint32 `yaml:"id"`
	// Local is the address:port to bind on the sync link.
	Local netip.AddrPort `yaml:"local"`
	// Peer is the other director's address:port, or the multicast group.
	Peer netip.AddrPort `yaml:"peer"`
	// Multicast sends to Peer as a group joined on Interface.
	Multicast bool `yaml:"multicast"`
	// Interface is the sync link.
	Interface string `yaml:"interface"`
	// KeyFile holds the shared key (at least 32 bytes) that authenticates
	// every datagram.
	KeyFile string `yaml:"key_file"`
	// StatePath keeps the epoch history across restarts.
	StatePath string `yaml:"state_path"`
	// MTU is the datagram payload size (0: 1400), replication.MinMTU to
	// replication.MaxMTU.
	MTU int `yaml:"mtu"`
	// ReadyFile is written "0" when this director is in sync and "1"
	// when not, for keepalived's track_file (weight -N): a director that
	// is not in sync never wins the election.
	ReadyFile string `yaml:"ready_file"`
	// InitialRole is the role until keepalived says otherwise: backup,
	// master or fault (replication.ParseRole).
	InitialRole string `yaml:"initial_role"`
	// Conntrack replicates conntrack state over the same link.
	Conntrack ctsync.Config `yaml:"conntrack"`
}

// Enabled reports whether replication is configured.
func (r *ReplicationConfig) Enabled() bool { return r.Peer.IsValid() }

// NodeConfig is a node listed in the configuration.
type NodeConfig struct {
	Name     string     `yaml:"name"`
	Address  netip.Addr `yaml:"address"`
	Address6 netip.Addr `yaml:"address6"`
	Weight   uint32     `yaml:"weight"`
	Capacity int        `yaml:"capacity"`
	// Forward overrides the default forwarding method; nil keeps it.
	Forward *ipvs.Forward `yaml:"forward"`
}

// Duration is a time.Duration written as "30s" in YAML.
type Duration time.Duration

// UnmarshalText parses "30s", "5m".
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration (like 30s or 5m)", shortValue(string(b)))
	}
	*d = Duration(v)
	return nil
}

// MarshalText writes the duration as "30s".
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// Defaults and bounds of the configuration.
const (
	DefaultStore          = "/var/lib/tunneldirector/tunneldirector.db"
	DefaultBackupDir      = "/var/lib/tunneldirector/backups"
	DefaultSocket         = "/run/tunneldirector/api.sock"
	DefaultMarkBase       = 0x7d000000
	DefaultMarkMask       = 0xff001fff
	DefaultTableBase      = 20000
	DefaultRulePriority   = 100
	DefaultVerifyInterval = 30 * time.Second
	// DefaultMaxBody bounds an import sent to the API: a 2,000,000-tunnel
	// JSON file (the default record limit) fits.
	DefaultMaxBody = 512 << 20
	// maxVerifyInterval is where a verify interval stops being a
	// safeguard: drift would go unrepaired for more than a day.
	maxVerifyInterval = 24 * time.Hour
)

// DefaultConfig returns the configuration with every default filled in.
func DefaultConfig() Config {
	var c Config
	c.Store = DefaultStore
	c.BackupDir = DefaultBackupDir
	c.Mode = ipvs.ModeAuto
	c.Forward = ipvs.ForwardDR
	c.Marks.Base = DefaultMarkBase
	c.Marks.Mask = DefaultMarkMask
	c.Routing.TableBase = DefaultTableBase
	c.Routing.RulePriority = DefaultRulePriority
	c.HashSeed = 0x7d1e5eed
	c.Epsilon = affinity.DefaultEpsilon
	c.API.Socket = DefaultSocket
	c.API.MaxBody = DefaultMaxBody
	c.VerifyInterval = Duration(DefaultVerifyInterval)
	c.LogLevel = slog.LevelInfo
	c.Agents = agents.DefaultConfig()
	c.Health = health.DefaultConfig()
	c.Replication.Conntrack = ctsync.DefaultConfig()
	return c
}

// ConfigError is a configuration file that was refused: every problem,
// each named by key path. It is refused input (exit status 2).
type ConfigError struct {
	Path string
	Errs []error
}

func (e *ConfigError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "config %s: ", e.Path)
	for i, err := range e.Errs {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(err.Error())
	}
	return b.String()
}

// Unwrap returns the problems.
func (e *ConfigError) Unwrap() []error { return e.Errs }

// maxConfigSize bounds a configuration file: a real one is a few KiB, and
// YAML decoding costs many times the input.
const maxConfigSize = 1 << 20

// LoadConfig reads and checks a configuration file. Unknown keys are
// errors (a typo must not silently fall back to a default); every problem
// is reported with its key path. `config check` and `run` both call it,
// so a file that passes the check is not refused at start for anything
// the file alone decides.
func LoadConfig(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if len(b) > maxConfigSize {
		return nil, &ConfigError{Path: path, Errs: []error{fmt.Errorf("larger than %d bytes: not a configuration file", maxConfigSize)}}
	}
	c, err := ParseConfig(b)
	if err != nil {
		var ce *ConfigError
		if errors.As(err, &ce) {
			ce.Path = path
			return nil, ce
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// ParseConfig decodes and checks a configuration (LoadConfig without the
// file).
func ParseConfig(b []byte) (*Config, error) {
	c := DefaultConfig()
	var root yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&root); err != nil && !errors.Is(err, io.EOF) {
		// An empty file decodes to io.EOF: all defaults.
		return nil, &ConfigError{Errs: []error{errors.New(strings.TrimPrefix(err.Error(), "yaml: "))}}
	}
	var errs []error
	var walked []error
	if root.Kind != 0 {
		// Keys and typed values are checked first, so each bad one is
		// named by its key path; the decoder then leaves them at their
		// defaults.
		walkConfig(&root, reflect.TypeOf(c), "", &walked)
		errs = append(errs, walked...)
		var te *yaml.TypeError
		if err := root.Decode(&c); errors.As(err, &te) {
			// One error per problem, as the walk reports them (the
			// health section words its own by key path).
			for _, m := range te.Errors {
				errs = append(errs, errors.New(m))
			}
		} else if err != nil {
			errs = append(errs, errors.New(strings.TrimPrefix(err.Error(), "yaml: ")))
		}
	}
	if err := c.Check(); err != nil {
		// A value already refused by key path is not refused again
		// for being missing ("vips: no VIP" after "vips[0]: ...").
		for _, e := range unjoin(err) {
			if !sameKey(e, walked) {
				errs = append(errs, e)
			}
		}
	}
	if len(errs) > 0 {
		return nil, &ConfigError{Errs: errs}
	}
	return &c, nil
}

var (
	textUnmarshaler = reflect.TypeFor[encoding.TextUnmarshaler]()
	yamlUnmarshaler = reflect.TypeFor[yaml.Unmarshaler]()
)

// walkConfig walks a YAML tree along the Go type it decodes into. It
// reports keys the type does not have (a typo must not silently fall back
// to a default) and tries every scalar bound for a TextUnmarshaler
// (addresses, modes, durations, the log level). A value that does not
// parse is reported with its key path and line, and nulled so that the
// decoder, which would stop at the first such error without saying
// where, goes on.
func walkConfig(n *yaml.Node, t reflect.Type, path string, errs *[]error) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch {
	case n.Kind == yaml.DocumentNode:
		for _, c := range n.Content {
			walkConfig(c, t, path, errs)
		}
		return
	case reflect.PointerTo(t).Implements(yamlUnmarshaler):
		// A section with its own decoder (health) checks its own keys.
		return
	case n.Kind == yaml.ScalarNode && n.Tag != "!!null" && reflect.PointerTo(t).Implements(textUnmarshaler):
		v := reflect.New(t).Interface().(encoding.TextUnmarshaler)
		if err := v.UnmarshalText([]byte(n.Value)); err != nil {
			*errs = append(*errs, fmt.Errorf("%s (line %d): %s", path, n.Line, textMessage(t, n.Value, err)))
			n.Tag, n.Value, n.Style = "!!null", "", 0
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k := n.Content[i]
			known := false
			for j := 0; j < t.NumField(); j++ {
				f := t.Field(j)
				if name, _, _ := strings.Cut(f.Tag.Get("yaml"), ","); name == k.Value {
					known = true
					walkConfig(n.Content[i+1], f.Type, joinKey(path, k.Value), errs)
				}
			}
			if !known {
				*errs = append(*errs, fmt.Errorf("%s (line %d): unknown key", joinKey(path, shortValue(k.Value)), k.Line))
			}
		}
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return
		}
		for i, c := range n.Content {
			walkConfig(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i), errs)
		}
	}
}

func joinKey(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// textMessage words a parse error by what was wanted, quoting at most a
// short prefix of the value.
func textMessage(t reflect.Type, value string, err error) string {
	switch t {
	case reflect.TypeFor[netip.Addr]():
		return fmt.Sprintf("%q is not an IP address", shortValue(value))
	case reflect.TypeFor[netip.AddrPort]():
		return fmt.Sprintf("%q is not address:port (IPv6: [address]:port)", shortValue(value))
	case reflect.TypeFor[slog.Level]():
		return fmt.Sprintf("%q (want debug, info, warn or error)", shortValue(value))
	}
	return err.Error()
}

// maxShown bounds how much of a value an error message quotes.
const maxShown = 64

// shortValue cuts a value for quoting in a message.
func shortValue(s string) string {
	if len(s) <= maxShown {
		return s
	}
	return s[:maxShown] + "..."
}

// sameKey reports whether err's key path lies on the path of one of
// the errors in prior (one is a prefix of the other).
func sameKey(err error, prior []error) bool {
	key, _, _ := strings.Cut(err.Error(), ":")
	for _, p := range prior {
		pk, _, _ := strings.Cut(p.Error(), " ")
		if strings.HasPrefix(pk, key) || strings.HasPrefix(key, pk) {
			return true
		}
	}
	return false
}

// unjoin lists the errors of an errors.Join.
func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// Check validates the configuration and names every problem by key path.
// It includes the checks the table makes when the daemon applies the
// configuration (VIPs against nodes, node addresses unique), on an empty
// table: what the stored table adds is CheckAgainst's.
func (c *Config) Check() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if c.Store == "" {
		bad("store", "empty")
	}
	errs = append(errs, c.Etcd.Validate(c.Store)...)
	if etcdstore.IsURL(c.Store) && c.Replication.Enabled() {
		bad("replication", "a pair's replication and an etcd store exclude each other (etcd shares the table among all directors)")
	}
	if c.BackupDir == "" {
		bad("backup_dir", "empty")
	} else if !filepath.IsAbs(c.BackupDir) {
		bad("backup_dir", "%q is not an absolute path", shortValue(c.BackupDir))
	}
	if len(c.VIPs) == 0 {
		bad("vips", "no VIP: the director needs at least one address to steer")
	}
	vipAt := map[netip.Addr]int{}
	for i, v := range c.VIPs {
		if !v.IsValid() {
			continue // reported by the decoder
		}
		if err := affinity.ValidateAddr(v); err != nil {
			bad(fmt.Sprintf("vips[%d]", i), "%v", err)
		} else if j, dup := vipAt[v]; dup {
			bad(fmt.Sprintf("vips[%d]", i), "%s already at vips[%d]", v, j)
		} else {
			vipAt[v] = i
		}
	}
	for _, k := range []struct{ key, name string }{{"interfaces.outside", c.Interfaces.Outside}, {"interfaces.inside", c.Interfaces.Inside}} {
		if k.name == "" {
			continue
		}
		if _, err := net.InterfaceByName(k.name); err != nil {
			bad(k.key, "interface %q does not exist", shortValue(k.name))
		}
	}
	seen := map[string]int{}
	addrAt := map[netip.Addr]int{}
	for i, n := range c.Nodes {
		key := fmt.Sprintf("nodes[%d]", i)
		if err := affinity.ValidateID("node name", n.Name); err != nil {
			bad(key+".name", "%v", err)
		} else if j, dup := seen[n.Name]; dup {
			bad(key+".name", "%q already at nodes[%d]", n.Name, j)
		} else {
			seen[n.Name] = i
		}
		switch a := n.Address; {
		case !a.IsValid():
			bad(key+".address", "missing: the node's inside address")
		case affinity.ValidateAddr(a) != nil:
			bad(key+".address", "%v", affinity.ValidateAddr(a))
		default:
			if j, dup := addrAt[a]; dup {
				bad(key+".address", "%s is already the address of nodes[%d]", a, j)
			} else if j, vip := vipAt[a]; vip {
				bad(key+".address", "%s is a director VIP (vips[%d])", a, j)
			} else {
				addrAt[a] = i
			}
		}
		if a6 := n.Address6; a6.IsValid() {
			switch {
			case !a6.Is6() || affinity.ValidateAddr(a6) != nil:
				bad(key+".address6", "%s is not a unicast IPv6 address", a6)
			case n.Address.Is6():
				bad(key+".address6", "address is already IPv6: address6 is for a node whose address is IPv4")
			}
		}
		if n.Weight > 10000 {
			bad(key+".weight", "%d above 10000", n.Weight)
		}
		if n.Capacity < 0 {
			bad(key+".capacity", "%d is negative", n.Capacity)
		}
	}
	if len(errs) == 0 {
		// The table's own rules, exactly as the daemon applies them.
		if err := c.CheckAgainst(nil); err != nil {
			errs = append(errs, err)
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
	if !(c.Epsilon > 0 && c.Epsilon <= 10) {
		bad("epsilon", "%g out of range (0, 10]", c.Epsilon)
	}
	for _, err := range []error{c.Scheduler.Validate(), c.UnknownPeers.Validate()} {
		if err != nil {
			errs = append(errs, unjoin(err)...)
		}
	}
	if c.API.Socket == "" {
		bad("api.socket", "empty")
	} else if !filepath.IsAbs(c.API.Socket) {
		bad("api.socket", "%q is not an absolute path", shortValue(c.API.Socket))
	}
	apiToken := ""
	if c.API.TCP.IsValid() {
		if c.API.TokenFile == "" {
			bad("api.token_file", "required with api.tcp: TCP access needs a token")
		} else if b, err := os.ReadFile(c.API.TokenFile); err != nil {
			bad("api.token_file", "%v", err)
		} else if apiToken = string(bytes.TrimSpace(b)); apiToken == "" {
			bad("api.token_file", "%s is empty", c.API.TokenFile)
		}
	}
	if l := c.Metrics.Listen; l.IsValid() && l.Port() == 0 {
		bad("metrics.listen", "%s has no port (the example uses 127.0.0.1:9410)", l)
	}
	if c.API.MaxBody < 1<<20 {
		bad("api.max_body", "%d below 1 MiB (1048576)", c.API.MaxBody)
	}
	if r := &c.Replication; r.Enabled() || r.Local.IsValid() {
		if r.ID == 0 {
			bad("replication.id", "required and not 0: each director of the pair has its own")
		}
		if !r.Local.IsValid() {
			bad("replication.local", "required: address:port on the sync link")
		}
		if !r.Peer.IsValid() {
			bad("replication.peer", "required: the other director's address:port")
		}
		if r.Multicast && r.Peer.IsValid() && !r.Peer.Addr().IsMulticast() {
			bad("replication.peer", "%s is not a multicast group (replication.multicast is true)", r.Peer)
		}
		if r.KeyFile == "" {
			bad("replication.key_file", "required: replication traffic is authenticated")
		} else if b, err := os.ReadFile(r.KeyFile); err != nil {
			bad("replication.key_file", "%v", err)
		} else if len(bytes.TrimSpace(b)) < 32 {
			bad("replication.key_file", "key shorter than 32 bytes")
		}
		if r.MTU != 0 && (r.MTU < replication.MinMTU || r.MTU > replication.MaxMTU) {
			bad("replication.mtu", "%d out of range %d..%d (the largest UDP payload; 0: 1400)", r.MTU, replication.MinMTU, replication.MaxMTU)
		}
		switch r.InitialRole {
		case "", "backup", "master", "fault":
		default:
			bad("replication.initial_role", "%q (want backup, master or fault)", shortValue(r.InitialRole))
		}
		if r.Conntrack.Enabled {
			if err := r.Conntrack.Validate("replication.conntrack"); err != nil {
				errs = append(errs, unjoin(err)...)
			}
		}
	}
	if err := c.Agents.Validate("agents"); err != nil {
		errs = append(errs, unjoin(err)...)
	}
	if c.Agents.Enabled() && !c.API.TCP.IsValid() {
		bad("agents.token_dir", "needs api.tcp: the agents report over TCP")
	}
	if toks, err := agents.LoadTokens(c.Agents.TokenDir); c.Agents.Enabled() && err == nil && apiToken != "" {
		for node, tok := range toks {
			if tok == apiToken {
				bad("agents.token_dir", "node %s's token is the operator API token (api.token_file): a node's token must never open the operator API", node)
			}
		}
	}
	if err := c.Health.Validate("health"); err != nil {
		errs = append(errs, unjoin(err)...)
	}
	if c.VerifyInterval < Duration(time.Second) {
		bad("verify_interval", "%s is below 1s", time.Duration(c.VerifyInterval))
	}
	switch c.LogLevel {
	case slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError:
	default:
		bad("log_level", "%q (want debug, info, warn or error)", c.LogLevel.String())
	}
	return errors.Join(errs...)
}

// CheckAgainst checks that the daemon can apply the configuration to a
// table: the VIPs against its tunnels and nodes, the configured nodes as
// the PutNode changes the daemon commits. A nil table is an empty one
// (the check every configuration gets); `config check` also passes the
// stored table when it can open the store. Nothing is changed.
func (c *Config) CheckAgainst(t *affinity.Table) error {
	if t == nil {
		var err error
		if t, err = affinity.New(affinity.Options{}); err != nil {
			return err
		}
	}
	old := t.VIPs()
	if err := t.SetVIPs(c.VIPs); err != nil {
		return fmt.Errorf("vips: %w", err)
	}
	defer t.SetVIPs(old)
	if err := t.Check(c.nodeChanges(t)); err != nil {
		return fmt.Errorf("nodes: %w", err)
	}
	return nil
}

// Warnings lists what is legal but probably wrong: secrets others can
// read, a pair whose two ends are the same, intervals nobody means.
func (c *Config) Warnings() []string {
	var w []string
	for _, f := range []struct{ key, path string }{{"api.token_file", c.API.TokenFile}, {"replication.key_file", c.Replication.KeyFile}} {
		if f.path == "" {
			continue
		}
		if fi, err := os.Stat(f.path); err == nil && fi.Mode().Perm()&0o077 != 0 {
			w = append(w, fmt.Sprintf("%s: %s has mode %04o: a secret should be readable by its owner only (chmod 600)", f.key, f.path, fi.Mode().Perm()))
		}
	}
	if r := c.Replication; r.Enabled() && r.Peer == r.Local {
		w = append(w, fmt.Sprintf("replication.peer: %s is replication.local: this director would pair with itself", r.Peer))
	} else if r.Enabled() && r.Peer.Addr() == r.Local.Addr() {
		w = append(w, fmt.Sprintf("replication.peer: %s is on this director's own sync address %s", r.Peer, r.Local.Addr()))
	}
	w = append(w, c.Agents.Warnings("agents")...)
	if time.Duration(c.VerifyInterval) > maxVerifyInterval {
		w = append(w, fmt.Sprintf("verify_interval: %s: drift someone else causes stays unrepaired that long (the default is %s)", time.Duration(c.VerifyInterval), DefaultVerifyInterval))
	}
	return w
}

// SelfInSubnets warns about the director's own addresses that lie inside
// a protected subnet of t: the configured sync and API addresses, and
// local (this machine's addresses, when checking this machine). The
// classifier never steers packets to a local address, but the subnet's
// hosts cannot be reached through the director at that address either,
// and on a machine where the address is not (yet) configured the
// director's traffic to it would be steered to the subnet's node. VIPs
// are meant to be the director's and are checked as errors elsewhere.
func (c *Config) SelfInSubnets(t *affinity.Table, local []netip.Addr) []string {
	if t == nil {
		return nil
	}
	type own struct {
		key  string
		addr netip.Addr
	}
	var addrs []own
	if c.Replication.Local.IsValid() {
		addrs = append(addrs, own{"replication.local", c.Replication.Local.Addr()})
	}
	if c.API.TCP.IsValid() {
		addrs = append(addrs, own{"api.tcp", c.API.TCP.Addr()})
	}
	for _, a := range local {
		addrs = append(addrs, own{"local address", a})
	}
	var w []string
	seen := map[netip.Addr]bool{}
	for _, a := range addrs {
		ip := a.addr.Unmap()
		if seen[ip] || slices.Contains(c.VIPs, ip) || ip.IsLoopback() || ip.IsUnspecified() {
			continue
		}
		seen[ip] = true
		if tu, p, ok := t.LookupSubnet(ip); ok {
			w = append(w, fmt.Sprintf("%s: %s lies inside protected subnet %s of tunnel %s: the director keeps its own traffic (it never steers packets to its own addresses), but hosts of that subnet are not reachable at this address through the director", a.key, ip, p, tu.ID))
		}
	}
	return w
}

// TableOptions returns the options of the daemon's table.
func (c *Config) TableOptions() affinity.Options {
	return affinity.Options{VIPs: c.VIPs, Epsilon: c.Epsilon, Choices: c.Scheduler.Choices}
}

// Dataplane returns the dataplane configuration.
func (c *Config) Dataplane() ipvs.Config {
	return ipvs.Config{
		Mode:         c.Mode,
		MarkBase:     c.Marks.Base,
		MarkMask:     c.Marks.Mask,
		TableBase:    c.Routing.TableBase,
		RulePriority: c.Routing.RulePriority,
		InsideIface:  c.Interfaces.Inside,
	}
}

// nodeForward returns the forwarding methods nodes set for themselves,
// by name; the others use Forward.
func (c *Config) nodeForward() map[string]ipvs.Forward {
	fwd := make(map[string]ipvs.Forward, len(c.Nodes))
	for _, n := range c.Nodes {
		if n.Forward != nil {
			fwd[n.Name] = *n.Forward
		}
	}
	return fwd
}

// nodeChanges returns the configured nodes as PutNode changes, keeping the
// state (active, draining, down) and health record the table holds for
// nodes it knows: the configuration says which nodes exist, the
// operator's actions and the health checks say how they are.
func (c *Config) nodeChanges(t *affinity.Table) []affinity.Change {
	var out []affinity.Change
	for _, nc := range c.Nodes {
		n := affinity.Node{Name: nc.Name, Addr: nc.Address, Addr6: nc.Address6, Weight: nc.Weight, Capacity: nc.Capacity}
		if cur, ok := t.Node(nc.Name); ok {
			n.State, n.Mark, n.Comment, n.Health = cur.State, cur.Mark, cur.Comment, cur.Health
		}
		out = append(out, affinity.Change{Kind: affinity.PutNode, Node: &n, Reason: "configuration"})
	}
	return out
}

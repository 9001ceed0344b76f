package ctsync

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// Config is the `replication.conntrack` section of the director's
// configuration. Every key, its default and its meaning are listed in
// README.md ("Director pairs").
type Config struct {
	// Enabled replicates conntrack state between the pair (default
	// true; it needs the replication section).
	Enabled bool `yaml:"enabled"`
	// IgnoreProtocols are protocols whose flows are never synced
	// (conntrackd's IgnoreProtocol): names (tcp, udp, icmp, esp, ...) or
	// numbers.
	IgnoreProtocols []Proto `yaml:"ignore_protocols"`
	// TCPStates are the TCP states worth syncing: a flow in another
	// state is held back until it reaches one of them (conntrackd's
	// State filter). Default: every state but syn_sent, so a handshake
	// that never completes costs nothing, and one caught by a takeover
	// costs the client one SYN retransmission.
	TCPStates []TCPState `yaml:"tcp_states"`
	// Ignore lists addresses (as /32 or /128 prefixes) and prefixes
	// whose flows are never synced, besides the directors' own
	// addresses, which are always ignored (conntrackd's
	// IgnoreTrafficFor).
	Ignore []netip.Prefix `yaml:"ignore"`
	// Include lists prefixes whose flows are synced besides the
	// default: flows to or from the VIPs, the protected subnets and the
	// nodes.
	Include []netip.Prefix `yaml:"include"`
	// CacheMax bounds the backup's cache of the master's flows; beyond
	// it the oldest are dropped, counted and logged.
	CacheMax int `yaml:"cache_max"`
	// CommitTimeout bounds the commit of the cache into the kernel when
	// the director becomes master (conntrackd's CommitTimeout); what
	// was not committed by then is counted as failed.
	CommitTimeout time.Duration `yaml:"commit_timeout"`
	// CommitMinTimeout is the least timeout a committed entry gets: the
	// cache only estimates what is left of a flow's timeout, and a flow
	// still alive refreshes it with its next packet.
	CommitMinTimeout time.Duration `yaml:"commit_min_timeout"`
	// RefreshInterval is how often the master sends again the flows
	// whose timeout is short (UDP, ICMP, ESP, closing TCP) and a share
	// of the others, so the backup's cache, which expires entries with
	// their own timeouts, keeps every live flow. 0 turns it off.
	RefreshInterval time.Duration `yaml:"refresh_interval"`
	// TCPLiberal commits TCP entries with the "be liberal" flag
	// (conntrackd's TCPWindowTracking off): the new master then does
	// not judge sequence numbers against a window it never saw.
	TCPLiberal bool `yaml:"tcp_liberal"`
	// Rate paces the conntrack stream, in bytes per second.
	Rate int `yaml:"rate"`
}

// Defaults.
const (
	DefaultCacheMax         = 2_000_000
	DefaultCommitTimeout    = 10 * time.Second
	DefaultCommitMinTimeout = 60 * time.Second
	DefaultRefreshInterval  = 30 * time.Second
	DefaultRate             = 64 << 20
)

// DefaultConfig returns the section's defaults.
func DefaultConfig() Config {
	c := Config{Enabled: true, CacheMax: DefaultCacheMax, CommitTimeout: DefaultCommitTimeout,
		CommitMinTimeout: DefaultCommitMinTimeout, RefreshInterval: DefaultRefreshInterval, Rate: DefaultRate}
	for s := range uint8(conntrack.TCPSynSent2 + 1) {
		if s != conntrack.TCPSynSent && s != conntrack.TCPNone {
			c.TCPStates = append(c.TCPStates, TCPState(s))
		}
	}
	return c
}

// Validate names every impossible value by its key path under prefix.
func (c *Config) Validate(prefix string) error {
	var errs []error
	bad := func(key, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", prefix, key, fmt.Sprintf(format, a...)))
	}
	if c.CacheMax < 1000 {
		bad("cache_max", "%d below 1000", c.CacheMax)
	}
	if c.CommitTimeout <= 0 {
		bad("commit_timeout", "%s: must be positive", c.CommitTimeout)
	}
	if c.CommitMinTimeout < time.Second {
		bad("commit_min_timeout", "%s below 1s", c.CommitMinTimeout)
	}
	if c.RefreshInterval != 0 && c.RefreshInterval < time.Second {
		bad("refresh_interval", "%s below 1s (0 turns refreshing off)", c.RefreshInterval)
	}
	if c.Rate < 1<<16 {
		bad("rate", "%d bytes/s below 64 KiB/s", c.Rate)
	}
	if len(c.TCPStates) == 0 {
		bad("tcp_states", "empty: no TCP flow would ever be synced (leave the key out for the default)")
	}
	for i, p := range c.Ignore {
		if !p.IsValid() {
			bad(fmt.Sprintf("ignore[%d]", i), "not a prefix")
		}
	}
	for i, p := range c.Include {
		if !p.IsValid() {
			bad(fmt.Sprintf("include[%d]", i), "not a prefix")
		}
	}
	return errors.Join(errs...)
}

// Proto is a protocol in the configuration: a name or a number.
type Proto uint8

// UnmarshalText parses "tcp", "esp" or "47".
func (p *Proto) UnmarshalText(b []byte) error {
	v, err := conntrack.ParseProto(string(b))
	*p = Proto(v)
	return err
}

// MarshalText writes the protocol's name.
func (p Proto) MarshalText() ([]byte, error) { return []byte(conntrack.ProtoName(uint8(p))), nil }

// TCPState is a TCP state in the configuration ("established").
type TCPState uint8

// UnmarshalText parses a state name.
func (s *TCPState) UnmarshalText(b []byte) error {
	v, err := conntrack.ParseTCPState(string(b))
	*s = TCPState(v)
	return err
}

// MarshalText writes the state's name.
func (s TCPState) MarshalText() ([]byte, error) { return []byte(conntrack.TCPStateName(uint8(s))), nil }

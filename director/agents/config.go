package agents

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// Adopt says what the director does with a misplaced tunnel: one whose SAs
// live on a node other than its owner in the table.
type Adopt string

// The adopt modes.
const (
	// AdoptReport lists misplaced tunnels and counts them; the table does
	// not change.
	AdoptReport Adopt = "report"
	// AdoptFollowSA moves a misplaced tunnel to the node that holds its SA
	// when its owner's agent reports none for Hold (see the package doc).
	AdoptFollowSA Adopt = "follow-sa"
)

// UnmarshalText parses report or follow-sa.
func (a *Adopt) UnmarshalText(b []byte) error {
	switch v := Adopt(b); v {
	case AdoptReport, AdoptFollowSA:
		*a = v
		return nil
	}
	return fmt.Errorf("%q (want report or follow-sa)", shortValue(string(b)))
}

// MarshalText writes the mode's name.
func (a Adopt) MarshalText() ([]byte, error) { return []byte(a), nil }

// Config is the agents section of the director's configuration: the node
// agents' tokens and the rules of merging their reports into the table.
type Config struct {
	// TokenDir holds one file per node, named as the node, with its
	// agent's token (at least MinTokenLen bytes, readable by root only).
	// Empty: agent reports are off.
	TokenDir string `yaml:"token_dir"`
	// Adopt is report (default) or follow-sa.
	Adopt Adopt `yaml:"adopt"`
	// Hold is how long the director waits before it acts on something
	// taken away: a tunnel must stay misplaced (its owner's agent
	// reporting no SA for it, exactly one other node holding one) this
	// long before follow-sa moves it there, which also gives a peer that
	// a rebalance or a node action moved the time to re-establish on its
	// new owner before the old node's SA could pull it back; and a
	// subnet a learned tunnel's owner stopped negotiating is dropped
	// after this long.
	Hold time.Duration `yaml:"hold"`
	// LearnedTTL: a learned tunnel with no SA on any node for this long
	// is removed (NMS tunnels never are).
	LearnedTTL time.Duration `yaml:"learned_ttl"`
	// MergeDelay: what the agents report within this window after a
	// change is merged into the table in one transaction.
	MergeDelay time.Duration `yaml:"merge_delay"`
	// MaxReportBytes bounds a report's body (413 above).
	MaxReportBytes int64 `yaml:"max_report_bytes"`
	// Subnets, when given, are the only address space negotiated subnets
	// may lie in: others are reported and never applied (a node must not
	// steer the data centre's own ranges by negotiating them).
	Subnets []netip.Prefix `yaml:"subnets"`
}

// Defaults of the agents section.
const (
	DefaultHold       = time.Minute
	DefaultLearnedTTL = 7 * 24 * time.Hour
	DefaultMergeDelay = 100 * time.Millisecond
	// MinTokenLen is the shortest agent token accepted: a token opens
	// the node's facts, which steer its tunnels.
	MinTokenLen = 16
)

// DefaultConfig returns the section's defaults (reports off until
// TokenDir is set).
func DefaultConfig() Config {
	return Config{
		Adopt:          AdoptReport,
		Hold:           DefaultHold,
		LearnedTTL:     DefaultLearnedTTL,
		MergeDelay:     DefaultMergeDelay,
		MaxReportBytes: report.DefaultLimits.MaxBytes,
	}
}

// Enabled reports whether agent reports are accepted.
func (c Config) Enabled() bool { return c.TokenDir != "" }

// Limits returns the report limits the endpoint enforces.
func (c Config) Limits() report.Limits { return report.Limits{MaxBytes: c.MaxReportBytes} }

// Validate checks the section and, when reports are on, reads the token
// files; every problem is named by its key path under prefix.
func (c *Config) Validate(prefix string) error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", prefix, key, fmt.Sprintf(format, args...)))
	}
	switch c.Adopt {
	case AdoptReport, AdoptFollowSA:
	default:
		bad("adopt", "%q (want report or follow-sa)", shortValue(string(c.Adopt)))
	}
	if c.Hold < time.Second {
		bad("hold", "%s is below 1s: a moved peer needs time to re-establish on its new owner", c.Hold)
	}
	if c.LearnedTTL < time.Second {
		bad("learned_ttl", "%s is below 1s", c.LearnedTTL)
	}
	if c.MergeDelay <= 0 || c.MergeDelay > 10*time.Second {
		bad("merge_delay", "%s out of range (0, 10s]", c.MergeDelay)
	}
	if c.MaxReportBytes < 1<<20 {
		bad("max_report_bytes", "%d below 1 MiB (1048576)", c.MaxReportBytes)
	}
	for i, p := range c.Subnets {
		if err := affinity.ValidatePrefix(p); err != nil {
			bad(fmt.Sprintf("subnets[%d]", i), "%v", err)
		}
	}
	if c.Enabled() {
		if _, err := LoadTokens(c.TokenDir); err != nil {
			for _, e := range unjoin(err) {
				bad("token_dir", "%v", e)
			}
		}
	}
	return errors.Join(errs...)
}

// Warnings lists what is legal but probably wrong: token files or their
// directory readable by others.
func (c *Config) Warnings(prefix string) []string {
	if !c.Enabled() {
		return nil
	}
	var w []string
	if fi, err := os.Stat(c.TokenDir); err == nil && fi.Mode().Perm()&0o077 != 0 {
		w = append(w, fmt.Sprintf("%s.token_dir: %s has mode %04o: the agents' tokens should be readable by root only (chmod 700)", prefix, c.TokenDir, fi.Mode().Perm()))
	}
	for _, f := range tokenFiles(c.TokenDir) {
		if fi, err := os.Stat(f); err == nil && fi.Mode().Perm()&0o077 != 0 {
			w = append(w, fmt.Sprintf("%s.token_dir: %s has mode %04o: a secret should be readable by its owner only (chmod 600)", prefix, f, fi.Mode().Perm()))
		}
	}
	return w
}

// tokenFiles lists the regular files of a token directory (names starting
// with a dot are skipped: editors' and tools' leftovers).
func tokenFiles(dir string) []string {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || !e.Type().IsRegular() {
			continue
		}
		out = append(out, filepath.Join(dir, e.Name()))
	}
	return out
}

// LoadTokens reads a token directory: node name -> token. Every file is a
// node's (its name is the node's name, a valid node name); its content,
// without surrounding white space, is the token. Empty or short tokens and
// a token shared by two nodes are refused, naming the files.
func LoadTokens(dir string) (map[string]string, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("%s is not a directory", dir)
	}
	var errs []error
	out := map[string]string{}
	owner := map[string]string{}
	for _, f := range tokenFiles(dir) {
		name := filepath.Base(f)
		if err := affinity.ValidateID("node name", name); err != nil {
			errs = append(errs, fmt.Errorf("%s: the file name must be the node's name: %v", f, err))
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		tok := string(bytes.TrimSpace(b))
		switch {
		case tok == "":
			errs = append(errs, fmt.Errorf("%s is empty", f))
		case len(tok) < MinTokenLen:
			errs = append(errs, fmt.Errorf("%s: token shorter than %d bytes", f, MinTokenLen))
		case owner[tok] != "":
			errs = append(errs, fmt.Errorf("%s holds the same token as %s: each node needs its own", f, filepath.Join(dir, owner[tok])))
		default:
			owner[tok] = name
			out[name] = tok
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return out, nil
}

// allowed reports whether a negotiated subnet lies inside the configured
// address space (any, when none is configured).
func (c Config) allowed(p netip.Prefix) bool {
	if len(c.Subnets) == 0 {
		return true
	}
	return slices.ContainsFunc(c.Subnets, func(q netip.Prefix) bool { return q.Bits() <= p.Bits() && q.Contains(p.Addr()) })
}

// SweepEvery returns how often the daemon sweeps (Plan with sweep): it
// bounds how long a table change made elsewhere (a move, a removed
// tunnel) goes unnoticed by the misplaced and seen bookkeeping: 5 s, or
// half of Hold when that is shorter, so that follow-sa acts within 1.5 x
// Hold of a move.
func (c Config) SweepEvery() time.Duration { return min(5*time.Second, c.Hold/2) }

// seenStep is how stale a learned tunnel's stored Seen may get before the
// merge refreshes it: a few writes per learned_ttl, not one per report.
func (c Config) seenStep() time.Duration {
	return min(max(c.LearnedTTL/8, time.Second), time.Hour)
}

// maxShown bounds how much of a value an error message quotes.
const maxShown = 64

func shortValue(s string) string {
	if len(s) <= maxShown {
		return s
	}
	return s[:maxShown] + "..."
}

func unjoin(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

package affinity

import (
	"fmt"
	"strings"
	"time"
)

// Scheduling defaults and limits. DefaultChoices (every active node is a
// candidate) was chosen by measuring d = 1..4, d = all and alternatives in
// the simulator (README, "Scheduling"): once balanced every d >= 2 holds
// the farm within 0.2 % of the mean, but only d = all fills an added or
// recovered node as fast as arrivals allow.
const (
	DefaultChoices = 0
	MaxChoices     = MaxMark
	MaxEpsilon     = 10
)

// OptionError is one option out of range, named by its key as the
// options' owner spells it ("choices", "max_changes"); the configuration
// puts its section in front ("scheduler.choices").
type OptionError struct {
	Key     string
	Problem string
}

func (e OptionError) Error() string { return e.Key + ": " + e.Problem }

// OptionErrors lists every option out of range; Validate methods return
// it so that a configuration can report each under its own key path.
type OptionErrors []OptionError

func (e OptionErrors) Error() string {
	s := make([]string, len(e))
	for i, x := range e {
		s[i] = x.Error()
	}
	return strings.Join(s, "; ")
}

func (e *OptionErrors) add(key, format string, args ...any) {
	*e = append(*e, OptionError{Key: key, Problem: fmt.Sprintf(format, args...)})
}

func (e OptionErrors) err() error {
	if len(e) == 0 {
		return nil
	}
	return e
}

// Validate checks the scheduling options (zero values mean the defaults)
// and returns OptionErrors naming the keys "epsilon" and "choices".
func (o Options) Validate() error {
	var errs OptionErrors
	if o.Epsilon < 0 || o.Epsilon > MaxEpsilon {
		errs.add("epsilon", "%g out of range (0, %d]", o.Epsilon, MaxEpsilon)
	}
	if o.Choices < 0 || o.Choices > MaxChoices {
		errs.add("choices", "%d out of range 0..%d (0: every active node)", o.Choices, MaxChoices)
	}
	return errs.err()
}

func (o Options) withDefaults() Options {
	if o.Epsilon == 0 {
		o.Epsilon = DefaultEpsilon
	}
	return o
}

// Unknown-peer bucket defaults and limits.
const (
	DefaultBuckets        = 4096
	MaxBuckets            = 65536
	DefaultBucketInterval = 10 * time.Second
	DefaultBucketQuiet    = 30 * time.Second
	DefaultBucketHorizon  = 0.005
)

// BucketOptions configures the hash buckets that steer unknown peers
// (Buckets). Zero values mean the defaults.
type BucketOptions struct {
	// Count is the number of buckets: the modulus of the kernel's hash
	// of an unknown peer's address (1..65536, default 4096).
	Count int
	// Interval is the least time between two balancing steps; moves off
	// a node that stopped taking tunnels do not wait for it (default 10s).
	Interval time.Duration
	// MaxChanges is the most buckets one balancing step reassigns
	// (default Count/16).
	MaxChanges int
	// Quiet keeps a bucket on its node while an unpinned first packet
	// seen in it is younger than this: longer than the learner takes to
	// pin a peer (default 30s).
	Quiet time.Duration
	// Horizon is the share of the current tunnels that the next arrivals
	// are planned for: the buckets are split so that this many arrivals
	// would lift the emptiest nodes to a common load (0 < h <= 1,
	// default 0.005, chosen in the simulator). Small: buckets follow the
	// headroom closely and change more often; large: closer to a split
	// by weight.
	Horizon float64
}

// Validate checks the options and returns OptionErrors naming the keys
// "buckets", "interval", "max_changes", "quiet" and "horizon".
func (o BucketOptions) Validate() error {
	var errs OptionErrors
	if o.Count < 0 || o.Count > MaxBuckets {
		errs.add("buckets", "%d out of range 1..%d (0: the default %d)", o.Count, MaxBuckets, DefaultBuckets)
	}
	if o.Interval != 0 && (o.Interval < 100*time.Millisecond || o.Interval > 24*time.Hour) {
		errs.add("interval", "%s out of range 100ms..24h", o.Interval)
	}
	if o.Quiet != 0 && (o.Quiet < time.Second || o.Quiet > time.Hour) {
		errs.add("quiet", "%s out of range 1s..1h", o.Quiet)
	}
	if o.Horizon < 0 || o.Horizon > 1 {
		errs.add("horizon", "%g out of range (0, 1]", o.Horizon)
	}
	count := o.Count
	if count == 0 {
		count = DefaultBuckets
	}
	if o.MaxChanges < 0 || o.MaxChanges > count {
		errs.add("max_changes", "%d out of range 1..%d (the bucket count; 0: the default %d)", o.MaxChanges, count, max(1, count/16))
	}
	return errs.err()
}

// WithDefaults returns the options with every zero value replaced by its
// default.
func (o BucketOptions) WithDefaults() BucketOptions { return o.withDefaults() }

func (o BucketOptions) withDefaults() BucketOptions {
	if o.Count == 0 {
		o.Count = DefaultBuckets
	}
	if o.Interval == 0 {
		o.Interval = DefaultBucketInterval
	}
	if o.MaxChanges == 0 {
		o.MaxChanges = max(1, o.Count/16)
	}
	if o.Quiet == 0 {
		o.Quiet = DefaultBucketQuiet
	}
	if o.Horizon == 0 {
		o.Horizon = DefaultBucketHorizon
	}
	return o
}

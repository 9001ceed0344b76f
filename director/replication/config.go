package replication

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/tunneldirector/tunneldirector/director/replication/wire"
	"github.com/tunneldirector/tunneldirector/internal/clock"
	"github.com/tunneldirector/tunneldirector/internal/enum"
	"github.com/tunneldirector/tunneldirector/store"
)

// Role is the director's VRRP role, set from outside (keepalived's notify).
type Role uint8

// Roles.
const (
	RoleBackup Role = iota
	RoleMaster
	RoleFault
)

var roleNames = [...]string{"backup", "master", "fault"}

// String returns "backup", "master" or "fault".
func (r Role) String() string { return enum.String(roleNames[:], "Role", r) }

// MarshalText makes a role read as its name in JSON status.
func (r Role) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText parses the role's name, for API clients.
func (r *Role) UnmarshalText(b []byte) error {
	v, err := ParseRole(string(b))
	*r = v
	return err
}

// ParseRole parses "master", "backup" or "fault".
func ParseRole(s string) (Role, error) {
	if v, ok := enum.Parse[Role](roleNames[:], s, false); ok {
		return v, nil
	}
	return 0, fmt.Errorf("unknown role %q (want master, backup or fault)", s)
}

// SyncState says whether this director's table is known to equal the
// master's.
type SyncState uint8

// Sync states.
const (
	// StateSyncing: catching up (snapshot in progress, or behind).
	StateSyncing SyncState = iota
	// StateInSync: at the master's revision, nothing pending.
	StateInSync
	// StateOutOfSync: something could not be delivered or applied, or
	// the tables are proven different; Status.Reason says what.
	StateOutOfSync
)

var stateNames = [...]string{"syncing", "in-sync", "out-of-sync"}

// String returns "syncing", "in-sync" or "out-of-sync".
func (s SyncState) String() string { return enum.String(stateNames[:], "SyncState", s) }

// MarshalText makes a state read as its name in JSON status.
func (s SyncState) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText parses the state's name, for API clients.
func (s *SyncState) UnmarshalText(b []byte) error {
	if v, ok := enum.Parse[SyncState](stateNames[:], string(b), false); ok {
		*s = v
		return nil
	}
	return fmt.Errorf("unknown sync state %q", b)
}

// MinMTU and MaxMTU bound replication.mtu: the datagram payload size on
// the sync link. The upper bound is the largest UDP payload (65,507
// bytes); above it no datagram can be sent and replication never
// converges.
const (
	MinMTU = wire.MinDatagram
	MaxMTU = wire.MaxDatagram
)

// CheckMTU says whether a configured datagram size is one the link can
// carry; configuration validation calls it.
func CheckMTU(mtu int) error {
	if err := wire.CheckSize(mtu); err != nil {
		return fmt.Errorf("mtu: %w", err)
	}
	return nil
}

// Config configures a Replicator. Zero durations and sizes take defaults.
type Config struct {
	// ID names this director on the wire; the two of a pair differ and
	// neither is zero.
	ID uint32
	// Key is the shared secret (at least 16 bytes).
	Key []byte
	// Store is this director's store; on a backup only the replicator
	// writes it.
	Store *store.Store
	// Transport carries the datagrams.
	Transport Transport
	// Clock drives every timer (nil: the real clock).
	Clock clock.Clock
	// MTU bounds a datagram (0: the transport's); it must lie within
	// what the link can carry (see CheckMTU).
	MTU int
	// Epoch is the epoch to start from, as persisted by the caller
	// (the replicator raises it above any epoch it sees).
	Epoch uint64
	// StatePath, when set, is a small file where the epoch and the epoch
	// history are kept across restarts (next to the store, say). Without
	// it a restarted director's history is unknown: a lagging peer is
	// then told from a diverged one by the digests alone.
	StatePath string

	// WindowChanges bounds how far behind a backup may be to be caught
	// up by resending revisions from the store's change log (0: 65536
	// changes); one further behind gets a snapshot. It also bounds the
	// log a master reads back to compare a lagging backup's digest.
	WindowChanges int
	// ResendBudget bounds the datagrams one NACK makes the master resend
	// (0: 1024), so a far-behind backup does not flood the link.
	ResendBudget int
	// MaxPendingBytes bounds what a backup buffers ahead of its applied
	// revision (0: 64 MiB); beyond it datagrams are dropped and NACKed
	// later.
	MaxPendingBytes int
	// MaxApplyChanges bounds the changes one backup commit coalesces
	// (0: 200,000).
	MaxApplyChanges int
	// SnapshotRate paces transfers in bytes per second (0: 64 MiB/s), so
	// live traffic keeps flowing during a snapshot.
	SnapshotRate int

	StatusInterval time.Duration // 0: 100ms
	NackInterval   time.Duration // 0: 20ms
	DigestInterval time.Duration // 0: 2s
	XferIdle       time.Duration // 0: 50ms: receiver asks for missing chunks after this silence
	PeerTimeout    time.Duration // 0: 3s
	// ReadyMaxLag is the most revisions a ready backup may lag (0: 100),
	// and ReadyMaxLagTime how long it may stay behind (0: 1s).
	ReadyMaxLag     uint64
	ReadyMaxLagTime time.Duration

	// Logger receives notable events, with attributes (nil: discarded).
	// States are logged when they change; a condition that lasts (the
	// master silent) is logged again with backoff.
	Logger *slog.Logger
	// OnConflict, when set, receives the report of every split-brain
	// merge. It runs with the replicator's lock held: hand it off.
	OnConflict func(MergeReport)

	// CT, when set, carries the conntrack stream (director/ctsync):
	// its records are sent beside the table stream while master and
	// handed to it while backup. Nil: no conntrack stream (datagrams of
	// one are dropped).
	CT CTHandler
	// CTRate paces the conntrack stream in bytes per second (0: 64 MiB/s),
	// with a burst of 10 ms of it.
	CTRate int
	// CTQueueBytes bounds the records waiting to be sent (0: 16 MiB);
	// beyond it CTPush refuses records.
	CTQueueBytes int
	// CTWindowBytes bounds the datagrams kept for resends (0: 16 MiB);
	// a backup further behind is reset and resynced.
	CTWindowBytes int
	// CTFlushDelay is how long records wait for a datagram to fill
	// (0: 2ms).
	CTFlushDelay time.Duration
}

func (c *Config) defaults() error {
	if c.ID == 0 {
		return errors.New("replication config: director id is zero")
	}
	if len(c.Key) < 16 {
		return fmt.Errorf("replication config: key of %d bytes, need at least 16", len(c.Key))
	}
	if c.Store == nil || c.Transport == nil {
		return errors.New("replication config: store and transport are required")
	}
	c.Clock = clock.Or(c.Clock)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.MTU == 0 {
		c.MTU = c.Transport.MTU()
	}
	if err := CheckMTU(c.MTU); err != nil {
		return fmt.Errorf("replication config: %w", err)
	}
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.WindowChanges, 65536)
	def(&c.ResendBudget, 1024)
	def(&c.MaxPendingBytes, 64<<20)
	def(&c.MaxApplyChanges, 200_000)
	def(&c.SnapshotRate, 64<<20)
	def(&c.CTRate, 64<<20)
	def(&c.CTQueueBytes, 16<<20)
	def(&c.CTWindowBytes, 16<<20)
	dur := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	dur(&c.StatusInterval, 100*time.Millisecond)
	dur(&c.NackInterval, 20*time.Millisecond)
	dur(&c.DigestInterval, 2*time.Second)
	dur(&c.XferIdle, 50*time.Millisecond)
	dur(&c.PeerTimeout, 3*time.Second)
	dur(&c.CTFlushDelay, 2*time.Millisecond)
	dur(&c.ReadyMaxLagTime, time.Second)
	if c.ReadyMaxLag == 0 {
		c.ReadyMaxLag = 100
	}
	return nil
}

// Counters count what the replicator did and refused.
type Counters struct {
	DatagramsSent     uint64 `json:"datagrams_sent"`
	DatagramsReceived uint64 `json:"datagrams_received"`
	SendErrors        uint64 `json:"send_errors"`
	AuthFailures      uint64 `json:"auth_failures"`
	Replays           uint64 `json:"replays"`
	BadVersion        uint64 `json:"bad_version"`
	Malformed         uint64 `json:"malformed"`
	StaleSession      uint64 `json:"stale_session"`
	Resends           uint64 `json:"resends"`
	Nacks             uint64 `json:"nacks"`
	PendingDropped    uint64 `json:"pending_dropped"`
	SnapshotsSent     uint64 `json:"snapshots_sent"`
	SnapshotsApplied  uint64 `json:"snapshots_applied"`
	RepairsSent       uint64 `json:"repairs_sent"`
	RepairsApplied    uint64 `json:"repairs_applied"`
	BucketsRepaired   uint64 `json:"buckets_repaired"`
	DigestMatches     uint64 `json:"digest_matches"`
	DigestMismatches  uint64 `json:"digest_mismatches"`
	Merges            uint64 `json:"merges"`
	Conflicts         uint64 `json:"conflicts"`
	LocalWrites       uint64 `json:"local_writes_on_backup"`
	ApplyFailures     uint64 `json:"apply_failures"`
	RevisionsApplied  uint64 `json:"revisions_applied"`
	ChangesApplied    uint64 `json:"changes_applied"`
}

// PeerStatus is what this director knows of the other one.
type PeerStatus struct {
	ID        uint32    `json:"id"`
	Role      Role      `json:"role"`
	Epoch     uint64    `json:"epoch"`
	Revision  uint64    `json:"revision"`
	LastHeard time.Time `json:"last_heard"`
	Alive     bool      `json:"alive"`
}

// Status is a report for `tunneldirector status`.
type Status struct {
	ID       uint32     `json:"id"`
	Role     Role       `json:"role"`
	Epoch    uint64     `json:"epoch"`
	Revision uint64     `json:"revision"`
	Peer     PeerStatus `json:"peer"`
	// MasterRevision is the master's revision as last heard (on the
	// master: its own).
	MasterRevision uint64 `json:"master_revision"`
	// LagRevisions and LagSeconds: how far the backup is behind (on the
	// master: how far its peer is).
	LagRevisions uint64    `json:"lag_revisions"`
	LagSeconds   float64   `json:"lag_seconds"`
	State        SyncState `json:"state"`
	Reason       string    `json:"reason,omitempty"`
	// TablesEqual is true when the last digest exchange proved both
	// tables equal at LastMatchRevision and nothing changed since.
	TablesEqual       bool      `json:"tables_equal"`
	LastDigestMatch   time.Time `json:"last_digest_match"`
	LastMatchRevision uint64    `json:"last_match_revision"`
	Ready             bool      `json:"ready"`
	Counters          Counters  `json:"counters"`
}

// epochStart says that epoch wrote the revisions from first on.
type epochStart struct{ epoch, first uint64 }

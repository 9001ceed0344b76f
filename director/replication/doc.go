// Package replication keeps the backup director's affinity table equal to
// the master's, so that a VRRP takeover moves no tunnel.
//
// # Model
//
// Each director runs one Replicator over its own store.Store and a
// Transport (UDP on the sync link, unicast or multicast; an in-memory
// FakeNetwork in tests). keepalived's notify scripts set the role with
// SetRole: the master streams every revision its store commits, read
// through the replicator's own cursor on the store's change log
// (store.Changes); the backup's store is written only by its replicator,
// with store.CommitAt at the master's revision numbers, so both stores
// hold the same table at the same revision. All timers read an injectable
// clock (internal/clock); HandleDatagram and Tick process one event each,
// so tests and the simulator step two directors deterministically.
//
// The code is split by role: the state both roles share is in
// Replicator, what only a master keeps in masterSide (master.go), what
// only a backup keeps in backupSide (backup.go); a role change makes both
// new. The datagram format and the replay window are package wire.
// Events are logged through a *slog.Logger with attributes; a state is
// logged when it changes, and a condition that lasts (the master silent)
// again with backoff, doubling up to every 10 minutes.
//
// # Wire format (version 2)
//
// Every datagram:
//
//	offset  size  field
//	0       4     magic "TDR1"
//	4       1     version (1)
//	5       1     type: 1 status, 2 data, 3 nack, 4 digest, 5 verdict,
//	              6 chunk, 7 transfer request
//	6       1     flags (none defined; ignored)
//	7       4     sender director id
//	11      8     sender's epoch
//	19      8     sender's datagram sequence number
//	27      ...   TLVs: type u16, length u16, value (big-endian integers);
//	              every datagram carries TLV 28 (the sender's session)
//	              and TLV 29 (the receiver's session as the sender knows
//	              it), then the message's own
//	end-16  16    HMAC-SHA256 over everything before it, truncated
//
// A datagram is at most 65,507 bytes (the largest UDP payload):
// Config.MTU and UDPConfig.MTU are refused above it and below 576
// (CheckMTU; configuration validation calls it).
//
// Unknown TLV types are skipped, so a newer director can add fields; a
// TLV type with the high bit (0x8000) set is critical, and a datagram
// carrying an unknown critical TLV is refused. Unknown message types are
// ignored. A datagram of another version is refused before anything else
// is read, counted (Counters.BadVersion), and the error names both
// versions. HMAC was chosen over an AEAD: the link needs integrity and
// authenticity, not secrecy; an HMAC has no nonce to keep unique across
// restarts, and datagrams stay readable in a capture.
//
// Replay protection: a 1024-packet sliding window per (sender, epoch), as
// IPsec's. The sequence number starts at the sender's boot time in
// nanoseconds, so a restarted sender is ahead of its old datagrams.
// Duplicates, datagrams older than the window, and datagrams of an epoch
// whose window was already forgotten are dropped (Counters.Replays);
// datagrams failing the tag are dropped (Counters.AuthFailures). A
// restarted receiver's windows start empty, so every datagram is also
// bound to the receiver's session, a random number drawn at each start:
// a datagram whose TLV 29 is not the receiver's current session (one
// captured before a restart, or sent before the peer learned the new
// session) is never processed (Counters.StaleSession); the receiver only
// learns the sender's session from it and answers with a status, so the
// pair finds each other's sessions within a status interval.
//
// # Live stream
//
// A revision travels as one or more DATA datagrams: the encoded batch
// (affinity.MarshalChanges) cut to the MTU, each part carrying the
// revision, the revision before it on the master, the epochs that wrote
// both, and its part number. The backup assembles parts and applies a
// revision only when it has all of them and it follows the backup's
// revision on the same history (number and epoch); several complete
// revisions are coalesced into one store commit. The backup sends a NACK
// when behind: its revision, the complete revisions it holds, and the
// parts missing from partial ones; the master resends them read back
// from its store's change log (the in-memory ring, or the journal on disk
// after a restart) while the backup is at most Config.WindowChanges
// changes behind. Status datagrams, sent every
// StatusInterval by both sides, carry each side's revision: the master's
// lets a backup detect a lost tail; the backup's acts as a cumulative ACK.
//
// # Snapshots and repairs
//
// When the backup's revision is older than the window (or than the change
// log reaches), or its history is not the master's, the master sends a
// snapshot: its whole table at one
// revision, encoded and cut into chunks, paced by a token bucket
// (Config.SnapshotRate) so live datagrams keep flowing. The receiver asks
// for the chunk ranges it lacks after XferIdle of silence, so a transfer
// resumes where it stopped. The backup applies a snapshot as one commit
// of the differences (affinity.Table.DiffTo: deletes first, then nodes,
// then tunnels, then the unknown-peer buckets) at the snapshot's revision,
// then applies the live revisions that follow it. A snapshot of a large
// table is encoded, committed and hashed off the event loop, so statuses
// keep flowing both ways meanwhile (work.go). Every transfer carries
// the table's unknown-peer bucket assignment (the map the kernel hashes
// unknown peers through, decided on the master) as one record, so the
// backup programs the same map and a takeover keeps it.
//
// Anti-entropy: the backup, when caught up, sends every DigestInterval a
// digest of its table: per bucket (256 buckets over an FNV-1a hash of the
// tunnel id) the sum of SHA-256 hashes of the encoded tunnels, plus a sum
// over the nodes and the unknown-peer buckets. The master compares it with its own digest at the same
// revision (its current digest with the batches since undone, read back
// from the change log, at most WindowChanges changes; not across a change
// of the unknown-peer bucket count), answers with a
// verdict, and on a
// mismatch sends a repair: the nodes, the unknown-peer buckets and the tunnels of just the differing
// buckets. A repair at revision R is applied together with the master's
// next revision after R (see Limitations). Both sides record when the
// tables were last proven equal.
//
// Never a silent drop: whatever cannot be delivered or applied puts the
// backup in StateOutOfSync with a reason (a commit refused, the master
// silent, a digest mismatch, a local write on the backup, both directors
// master); Ready is false until it is resolved.
//
// # Epochs and split brain
//
// A director becoming master raises its epoch above every epoch it has
// seen. Each director keeps the history of which epoch wrote which range
// of revisions. A backup reports (revision, epoch that wrote it); if that
// is not on the master's history (a split brain: both were master and both
// committed), the master pulls the backup's whole table and merges it:
//
//   - A tunnel (or node) that exists on only one side is kept: the pair
//     loses no tunnel either side learned. (A tunnel one side deleted
//     during the partition therefore comes back.)
//   - A tunnel both sides hold differently is decided by its version
//     (epoch that wrote it, its revision, director id), compared in that
//     order; the higher wins. The epoch is derived from the side's epoch
//     history and the tunnel's Revision: affinity.Tunnel has no epoch or
//     director field (adding Tunnel.Epoch would make the rule exact
//     across restarts).
//   - A node both sides hold differently: nodes carry no revision, so the
//     side whose latest revision has the higher version wins; a node's
//     mark is kept from the master side (marks are for life).
//   - A peer's tunnel the table refuses (its peer address or subnet now
//     belongs to another tunnel) is dropped and reported.
//
// The merge is committed on the master as one revision above both sides'
// and written in an epoch above both, then sent to the backup as a
// snapshot. Every record both sides changed since the fork is listed in
// a MergeReport (Conflicts), with both versions, the winner and why;
// Replicator.Conflicts returns the reports.
//
// # Limitations
//
// A snapshot or repair at a revision not above the backup's is applied
// with store.CommitReset, which sets the store to exactly that revision
// and empties its journal (the revisions the backup had past it belonged
// to a history the master does not share). The epoch
// and epoch history survive a restart only through Config.StatePath; a
// director without it reports epoch 0 ("unknown") for its old revisions,
// which is taken to agree with any epoch: a restarted backup then simply
// catches up (its content is still checked by the digests), but the
// changes a restarted ex-master made during a split brain are overwritten
// instead of merged.
package replication

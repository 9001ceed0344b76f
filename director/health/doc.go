// Package health decides, from checks of every terminator node, when the
// director takes a node down (its tunnels move, as with `node down`) and
// when it brings it back (nothing moves back).
//
// # Checks
//
// Every interval, a round runs the node's checks concurrently and passes
// when all pass:
//   - ike (the default): an IKEv2 IKE_SA_INIT request (package ike) from the
//     director's inside address to the node's inside address, UDP 500, with
//     a fresh random initiator SPI, on a socket connected to the node (the
//     kernel drops datagrams from any other address or port). Any
//     well-formed IKE_SA_INIT response carrying that SPI counts as alive;
//     malformed, truncated or foreign datagrams never do. The request's KE
//     payload is in a private-use group that no configuration accepts, so
//     the node answers INVALID_KE_PAYLOAD (or NO_PROPOSAL_CHOSEN when it
//     has no connection for the director's address, which is the usual
//     case when nodes bind their connections to the VIP) and keeps no
//     state: charon 5.9.8 logs "DH group (65021) unacceptable, requesting
//     CURVE_25519" and "IKE_SA (unnamed)[n] state change: CONNECTING =>
//     DESTROYING" for each probe, and `swanctl --list-sas` stays empty (see
//     TestIKEProbeStrongSwan). libreswan 4.10 answers INVALID_SYNTAX before
//     creating any state (and logs "malformed payload in packet" for each
//     probe: expected, harmless). A request the node accepted would leave a
//     half-open IKE_SA for 30 s; charon asks every initiator for cookies
//     after three of those from one address and ignores it after five.
//     The probe is resent after delay_before_retry without an answer, until
//     timeout, so one lost datagram does not fail a round.
//   - tcp: a TCP connect to a port of the node.
//   - exec: a command whose exit status decides, like keepalived's
//     MISC_CHECK (NODE_NAME and NODE_ADDRESS in its environment).
//   - heartbeat: the node agent's last heartbeat is at most max_age old
//     (the agent's report handler calls Monitor.Heartbeat).
//
// # Decisions
//
// The Machine steps one event at a time on an injectable Clock. fall
// failing rounds in a row take an active node down, rise passing rounds
// bring a node that health took down back up. Safety first, because moving
// tunnels is disruptive:
//   - flap damping: a node taken down more than flap.count times within
//     flap.window is held down for flap.hold, doubled for every further
//     hold up to flap.hold_max (a node quiet for hold_max starts over);
//   - panic threshold: when more than max_down_fraction of the nodes health
//     manages are failing or down by health, nothing more is taken down
//     (ups still happen), the log says so at error level and Status.Panic
//     says why. When it ends, counts start afresh;
//   - the director's own inside interface down: nothing moves, rounds are
//     not counted, and after it returns counts start afresh; failures that
//     start within settle after the link returns or a panic ends are not
//     counted;
//   - operator states win: a node the operator drained or took down by
//     hand is not changed by health (Record.Down tells health's downs from
//     the operator's); any state set by hand clears health's record,
//     holds included (Record.AfterOperator);
//   - only the master decides; a backup runs the same checks, shows them,
//     and says what it would do. Record, stored and replicated with the
//     node, carries downs, holds and flap history to a new master, which
//     decides at once on its own checks.
//
// Decisions go to a Sink the daemon implements; Status feeds `show nodes`
// (NodeView.Health is the HEALTH column), `status` and the API.
//
// # What the daemon does (the integration)
//
//   - Config: a `health:` section of type Config; DefaultConfig before
//     decoding; Config.Validate("health") in `config check`.
//   - Start: New(Options{Interface: the inside interface, Source4/6: its
//     addresses, Sink: the daemon, Clock: the project clock}) and Run; then
//     SetNodes with the table's nodes and stored records, again after every
//     committed change of nodes or records (replicated ones too, on the
//     backup), SetRole on every role change (true when running alone),
//     SetConfig on reload, Heartbeat from the agents' reports.
//   - Apply(d): refuse (return an error) unless master and writable;
//     otherwise commit, in one transaction, what `node down` / `node up`
//     commits (affinity's PlanNodeState plan), with d.Reason as the changes'
//     reason, and d.Record stored with the node.
//   - Operator actions on a node's state store Record.AfterOperator(action)
//     with the change.
package health

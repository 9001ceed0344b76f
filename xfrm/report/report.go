// Package report is the wire format between a node's agent and the
// director: a versioned JSON document POSTed to Path, in three kinds —
// a full report (at the agent's start and after every reconnect), deltas
// after it, and a heartbeat every few seconds — plus the director's side:
// strict decoding with size and count limits, the validation rules, and an
// Inbox that applies a node's reports in order and says what changed.
//
// Example of a delta (one tunnel changed, one gone):
//
//	{"version":1,"kind":"delta","node":"node-1","session":"5f0c...","seq":8,
//	 "sent":"2026-11-29T10:00:00.5Z",
//	 "summary":{"sas":4,"tunnels":2,"unattributed":0,"ignored":0},
//	 "tunnels":[{"peer":"198.51.100.7","subnets":["172.16.7.0/24"],"sas":2,
//	   "bytes":1200,"packets":14,"last_use":1764410400,
//	   "spis":[{"spi":3221225473,"reqid":1,"dir":"in","proto":"esp"},
//	           {"spi":3405643777,"reqid":1,"dir":"out","proto":"esp"}]}],
//	 "removed":["203.0.113.9"]}
//
// The director answers 200 with an Ack ({"need_full":false}); need_full
// asks the agent for a full report (the director lost or never had the
// agent's session: a restart, a takeover). Errors answer
// {"error":"...","refused":true} with 401 (no or unknown token),
// 403 (a report for another node than the token's), 409 (this director is
// not the master: report to the other one), 413 (too large) or 422
// (malformed or invalid; the message names the field and its position).
package report

import (
	"net/netip"
	"time"

	"github.com/tunneldirector/tunneldirector/xfrm"
)

// Version is the wire format's version; a decoder refuses any other.
const Version = 1

// Path is the director's HTTP endpoint for agent reports (POST, JSON body,
// Authorization: Bearer <the node's token>).
const Path = "/v1/agent/report"

// Kind is a report's kind.
type Kind string

// Report kinds.
const (
	// KindFull carries every tunnel of the node and replaces what the
	// director held for it.
	KindFull Kind = "full"
	// KindDelta carries the tunnels added or changed since the previous
	// report of the session and the peers gone.
	KindDelta Kind = "delta"
	// KindHeartbeat carries no tunnels: the agent and its node are alive,
	// and Seq says which facts report was the last.
	KindHeartbeat Kind = "heartbeat"
)

// Report is one message from an agent.
type Report struct {
	Version int
	Kind    Kind
	// Node is the reporting node's name as the director knows it; the
	// director refuses a report whose node is not its token's.
	Node string
	// Session is chosen at random by the agent at its start and after every
	// reconnect (32 hex digits); it begins with a full report.
	Session string
	// Seq numbers the facts reports of a session from 1 (the full report)
	// up, by one; a heartbeat repeats the last one sent.
	Seq uint64
	// Sent is the agent's clock when the report was made (information
	// only: the director uses its own clock).
	Sent    time.Time
	Summary xfrm.Summary
	// Tunnels: every tunnel (full) or those added or changed (delta).
	Tunnels []xfrm.Tunnel
	// Removed lists the peers whose tunnels are gone (delta only).
	Removed []netip.Addr
}

// Ack is the director's answer to an accepted report.
type Ack struct {
	// NeedFull asks for a full report: the director does not hold the
	// session's facts up to the report's sequence number.
	NeedFull bool `json:"need_full"`
}

// Limits bound what a director accepts. The zero value means the
// defaults; see DefaultLimits.
type Limits struct {
	MaxBytes   int64 // body size
	MaxTunnels int   // tunnels (or removed peers) in one report
	MaxSubnets int   // subnets of one tunnel
	MaxSAs     int   // SAs (SPIs) of one tunnel
	MaxNATT    int   // NAT-T port pairs of one tunnel
}

// DefaultLimits fit a node with 250,000 tunnels (a full report of that
// size is about 90 MB of JSON: the body limit is 128 MiB).
var DefaultLimits = Limits{MaxBytes: 128 << 20, MaxTunnels: 250_000, MaxSubnets: 1024, MaxSAs: 1024, MaxNATT: 64}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits
	if l.MaxBytes > 0 {
		d.MaxBytes = l.MaxBytes
	}
	if l.MaxTunnels > 0 {
		d.MaxTunnels = l.MaxTunnels
	}
	if l.MaxSubnets > 0 {
		d.MaxSubnets = l.MaxSubnets
	}
	if l.MaxSAs > 0 {
		d.MaxSAs = l.MaxSAs
	}
	if l.MaxNATT > 0 {
		d.MaxNATT = l.MaxNATT
	}
	return d
}

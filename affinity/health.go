package affinity

import (
	"fmt"
	"slices"
	"time"
)

// NodeHealth is the durable part of a node's health, stored with the node
// (Node.Health) so that it is journaled and replicated with the table: a
// restarted director or a new master continues a hold-down where the old
// one left it. The director's health checks (package director/health,
// which calls it Record) write it with their decisions; the operator's
// state changes clear it (AfterOperator).
type NodeHealth struct {
	// Down: health took the node down. A node down in the table without
	// it was taken down by the operator, and health leaves it alone.
	Down bool `json:"down,omitempty"`
	// Since is the time of health's last transition of the node.
	Since time.Time `json:"since,omitzero"`
	// Reason is the reason of the last down.
	Reason string `json:"reason,omitempty"`
	// Downs are the times health took the node down within the flap
	// window.
	Downs []time.Time `json:"downs,omitempty"`
	// HoldUntil: a node down by health stays down until then, however
	// well it answers.
	HoldUntil time.Time `json:"hold_until,omitzero"`
	// Holds counts the holds in a row; each doubles the hold time.
	Holds int `json:"holds,omitempty"`
}

// Bounds of a health record, so that every stored record decodes.
const (
	// MaxHealthReason is the longest reason a record keeps.
	MaxHealthReason = 1024
	// MaxHealthDowns is the most down times a record keeps (the newest).
	MaxHealthDowns = 256
	// maxHealthHolds bounds the hold counter.
	maxHealthHolds = 1 << 20
)

// IsZero reports whether the record is empty: health never acted on the
// node, or the operator set its state since.
func (h *NodeHealth) IsZero() bool {
	return !h.Down && h.Since.IsZero() && h.Reason == "" && len(h.Downs) == 0 && h.HoldUntil.IsZero() && h.Holds == 0
}

// Equal reports whether two records hold the same facts (times compare as
// instants, whatever their location).
func (h *NodeHealth) Equal(o *NodeHealth) bool {
	return h.Down == o.Down && h.Since.Equal(o.Since) && h.Reason == o.Reason &&
		h.HoldUntil.Equal(o.HoldUntil) && h.Holds == o.Holds &&
		slices.EqualFunc(h.Downs, o.Downs, time.Time.Equal)
}

// Clip returns the record within the stored bounds: the reason cut to
// MaxHealthReason bytes (at a character boundary), the newest
// MaxHealthDowns down times, times in UTC without a monotonic reading (as
// the codec gives them back).
func (h NodeHealth) Clip() NodeHealth {
	if len(h.Reason) > MaxHealthReason {
		cut := MaxHealthReason
		for cut > 0 && h.Reason[cut]&0xc0 == 0x80 {
			cut--
		}
		h.Reason = h.Reason[:cut]
	}
	if len(h.Downs) > MaxHealthDowns {
		h.Downs = h.Downs[len(h.Downs)-MaxHealthDowns:]
	}
	h.Downs = slices.Clone(h.Downs)
	for i := range h.Downs {
		h.Downs[i] = storedTime(h.Downs[i])
	}
	h.Since, h.HoldUntil = storedTime(h.Since), storedTime(h.HoldUntil)
	h.Holds = min(max(h.Holds, 0), maxHealthHolds)
	return h
}

// storedTime is t as the codec stores it: UTC, nanoseconds, no monotonic
// reading; the zero time stays zero.
func storedTime(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return time.Unix(0, t.UnixNano()).UTC()
}

func (h *NodeHealth) validate() error {
	switch {
	case len(h.Reason) > MaxHealthReason:
		return fmt.Errorf("health reason longer than %d bytes", MaxHealthReason)
	case len(h.Downs) > MaxHealthDowns:
		return fmt.Errorf("health record holds %d down times, more than %d", len(h.Downs), MaxHealthDowns)
	case h.Holds < 0 || h.Holds > maxHealthHolds:
		return fmt.Errorf("health record hold count %d out of range", h.Holds)
	}
	return nil
}

// Operator actions that set a node's state by hand, for AfterOperator:
// the actions of `tunneldirector node`, and ActionSetState for a state an
// import or the configuration sets.
const ActionSetState = "set-state"

// AfterOperator returns the record after an operator's node action (the
// actions of `tunneldirector node`: "up", "down", "drain", "undrain", or
// ActionSetState for a state a nodes file sets): any state the operator
// sets by hand is the operator's, so health no longer owns a down, and a
// hold or the flap history no longer applies ("node up by hand clears a
// hold"). Other actions (weight, capacity) leave the record as it is.
func (h NodeHealth) AfterOperator(action string) NodeHealth {
	switch action {
	case "up", "down", "drain", "undrain", ActionSetState:
		return NodeHealth{}
	}
	return h
}

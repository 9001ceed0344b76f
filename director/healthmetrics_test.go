package director

import (
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/health"
)

// TestHealthStateLabel: every node view maps to exactly one state label
// of tunneldirector_health_node_state, the operator's state first (health
// leaves it alone), then a hold, then a down, then a failing round.
func TestHealthStateLabel(t *testing.T) {
	until := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		v    health.NodeView
		want string
	}{
		{health.NodeView{State: affinity.NodeActive}, "up"},
		{health.NodeView{State: affinity.NodeActive, Failing: 1, Fall: 2}, "failing"},
		{health.NodeView{State: affinity.NodeDown, Record: health.Record{Down: true}}, "down"},
		{health.NodeView{State: affinity.NodeDown, Record: health.Record{Down: true}, HeldUntil: until, Failing: 3}, "held"},
		{health.NodeView{State: affinity.NodeDraining, Operator: true, Failing: 5}, "operator"},
		{health.NodeView{State: affinity.NodeDown, Operator: true}, "operator"},
	} {
		if got := healthState(tc.v); got != tc.want {
			t.Errorf("%+v: %s, want %s", tc.v, got, tc.want)
		}
	}
}

package director

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/agents"
	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// The director's side of the node agents: their endpoint (report.Path,
// mounted beside the API but outside its operator token: a node token
// never opens the operator API, nor the operator token the agents'
// endpoint), the merge of their facts into the table on the master
// (package agents), and the heartbeat hook for the health checks.

// AgentHeartbeats receives a heartbeat for every report an agent gets
// accepted, of any kind (the agent is alive and reaching the master).
// health.Monitor satisfies it.
type AgentHeartbeats interface {
	Heartbeat(node string)
}

// agentSide is the daemon's agent state.
type agentSide struct {
	merger     *agents.Merger
	auth       atomic.Pointer[func(token string) (string, bool)]
	heartbeats atomic.Pointer[AgentHeartbeats]

	logMu     sync.Mutex
	lastLog   map[string]time.Time // per node and reason: refusals are logged at most every refusalLogEvery
	suppresed map[string]int
}

// refusalLogEvery bounds the log lines a misbehaving agent (or a scanner
// with a bad token) can cause.
const refusalLogEvery = 10 * time.Second

// SetAgentHeartbeats wires the health checks' heartbeat (nil: none).
func (d *Daemon) SetAgentHeartbeats(h AgentHeartbeats) {
	if h == nil {
		d.agent.heartbeats.Store(nil)
		return
	}
	d.agent.heartbeats.Store(&h)
}

// configureAgents applies the agents section: tokens and merge rules.
func (d *Daemon) configureAgents(c *Config) error {
	auth := func(string) (string, bool) { return "", false }
	if c.Agents.Enabled() {
		toks, err := agents.LoadTokens(c.Agents.TokenDir)
		if err != nil {
			return fmt.Errorf("agents.token_dir: %w", err)
		}
		auth = report.Tokens(toks)
	}
	if d.agent.merger == nil {
		d.agent.merger = agents.NewMerger(c.Agents)
	} else {
		d.agent.merger.SetConfig(c.Agents)
	}
	d.agent.auth.Store(&auth)
	return nil
}

// agentHandler serves report.Path with the configuration in force (a
// reload changes tokens and limits for the next request).
func (d *Daemon) agentHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := d.config().Agents
		if !c.Enabled() {
			err := errors.New("agent reports are off on this director (agents.token_dir is not set)")
			d.agentRefused("", http.StatusNotFound, err)
			writeJSON(w, http.StatusNotFound, apiError{Error: err.Error(), Missing: true})
			return
		}
		report.Handler(report.HandlerOptions{
			Authenticate: *d.agent.auth.Load(),
			Accept:       d.acceptReport,
			Limits:       c.Limits(),
			Refused:      d.agentRefused,
		}).ServeHTTP(w, r)
	})
}

// acceptReport takes a decoded report of the node its token belongs to.
func (d *Daemon) acceptReport(node string, r *report.Report) (report.Ack, error) {
	if err := d.writable(); err != nil {
		return report.Ack{}, fmt.Errorf("agent report of %s: %w (%v)", node, report.ErrNotMaster, err)
	}
	if _, ok := d.st.Table().Node(node); !ok {
		return report.Ack{}, fmt.Errorf("agent report of %s: %w: add the node, or remove its token from agents.token_dir", node, report.ErrUnknownNode)
	}
	ack, err := d.agent.merger.Accept(node, r, d.clk.Now())
	if err != nil {
		return ack, err
	}
	if h := d.agent.heartbeats.Load(); h != nil {
		(*h).Heartbeat(node)
	}
	return ack, nil
}

// agentRefused counts and logs a refused report.
func (d *Daemon) agentRefused(node string, status int, err error) {
	reason := agents.RefusalReason(status, err)
	d.agent.merger.CountRefusal(reason)
	level := "warn"
	if status == http.StatusConflict {
		level = "debug" // an agent probing the backup: normal
	}
	key := node + " " + reason
	now := d.clk.Now()
	a := &d.agent
	a.logMu.Lock()
	if a.lastLog == nil {
		a.lastLog, a.suppresed = map[string]time.Time{}, map[string]int{}
	}
	last, seen := a.lastLog[key]
	if seen && now.Sub(last) < refusalLogEvery {
		a.suppresed[key]++
		a.logMu.Unlock()
		return
	}
	n := a.suppresed[key]
	a.lastLog[key], a.suppresed[key] = now, 0
	a.logMu.Unlock()
	args := []any{"node", node, "status", status, "reason", reason, "err", err}
	if n > 0 {
		args = append(args, "suppressed", n)
	}
	if level == "debug" {
		d.log.Debug("agent report refused", args...)
	} else {
		d.log.Warn("agent report refused", args...)
	}
}

// runAgents merges the agents' facts into the table while ctx lasts: one
// transaction MergeDelay after a report changed something (a burst of
// reports is one commit), and a sweep every few seconds for what changed
// in the table itself and for learned_ttl.
func (d *Daemon) runAgents(ctx context.Context) {
	m := d.agent.merger
	every := m.Config().SweepEvery()
	sweep, sweepC := d.clk.NewTicker(every)
	defer sweep.Stop()
	for {
		if e := m.Config().SweepEvery(); e != every {
			every = e
			sweep.Reset(every) // a reload changed hold
		}
		select {
		case <-ctx.Done():
			return
		case <-m.Wake():
			t, c := d.clk.NewTimer(m.Config().MergeDelay)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-c:
			}
			d.MergeAgents(false)
		case <-sweepC:
			d.MergeAgents(true)
		}
	}
}

// MergeAgents merges what the agents reported into the table in one
// transaction, when this director is master (sweep: also re-examine every
// peer the agents hold, for table changes made elsewhere, and expire
// learned tunnels). The daemon calls it itself; it is exported for tests
// and benchmarks.
func (d *Daemon) MergeAgents(sweep bool) { d.mergeAgents(sweep, 0) }

func (d *Daemon) mergeAgents(sweep bool, again int) {
	m := d.agent.merger
	if !m.Config().Enabled() || d.writable() != nil {
		return
	}
	start := time.Now()
	var p *agents.Plan
	var err error
	// A change the table refuses although the merge checked it (it
	// should not happen) is dropped and reported, not retried forever.
	for try := 0; try < 5; try++ {
		_, err = d.st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
			if err := d.mayCommit(); err != nil {
				return nil, err
			}
			if p == nil {
				p = m.Plan(t, d.clk.Now(), sweep)
			}
			return p.Changes, nil
		})
		var be *affinity.BatchError
		if p == nil || !errors.As(err, &be) {
			break
		}
		d.log.Error("agents: the table refused merged changes; dropping them", "err", err)
		p = m.Drop(p, be)
	}
	if p == nil {
		return
	}
	m.Done(p, time.Since(start), err)
	switch {
	case err != nil:
		d.log.Error("agents: merge failed; retrying at the next merge", "err", err)
	case len(p.Changes) > 0:
		d.log.Info("agents: merged", "changes", len(p.Changes), "learned", p.Learned, "subnets", p.Subnets,
			"followed", p.Followed, "expired", p.Expired, "seen", p.Seen, "took", time.Since(start))
	}
	if err == nil && p.Again && again < 2 {
		// The batch freed subnets it refused to others: they may take
		// them now, without waiting for the next sweep.
		d.mergeAgents(sweep, again+1)
	}
}

// AgentsResult is what `show agents` shows: the merge's status, every
// node's agent, and what the agents reported that was not applied.
type AgentsResult struct {
	Status    agents.Status              `json:"status"`
	Nodes     map[string]agents.NodeView `json:"nodes"`
	Unapplied []agents.Unapplied         `json:"unapplied"`
}

// Agents returns the agents' view of the farm.
func (d *Daemon) Agents() (*AgentsResult, error) {
	m := d.agent.merger
	res := &AgentsResult{Status: m.Status(), Nodes: map[string]agents.NodeView{}, Unapplied: m.Unapplied()}
	for _, n := range d.st.Table().Nodes() {
		if v, ok := m.Node(n.Name); ok {
			res.Nodes[n.Name] = v
		}
	}
	if res.Unapplied == nil {
		res.Unapplied = []agents.Unapplied{}
	}
	return res, nil
}

// MisplacedResult lists the misplaced tunnels.
type MisplacedResult struct {
	Adopt     agents.Adopt       `json:"adopt"`
	Misplaced []agents.Misplaced `json:"misplaced"`
}

// Misplaced lists the tunnels whose SAs the agents report on a node other
// than their owner.
func (d *Daemon) Misplaced() (*MisplacedResult, error) {
	m := d.agent.merger
	return &MisplacedResult{Adopt: m.Config().Adopt, Misplaced: m.Misplaced(d.st.Table())}, nil
}

// PeerFacts is what one node's agent reports of a peer.
type PeerFacts struct {
	Node   string      `json:"node"`
	Tunnel xfrm.Tunnel `json:"facts"`
}

// PeerFacts returns what the agents report of a peer: per node that holds
// SAs of it, the SAs, negotiated subnets, NAT-T ports and traffic.
func (d *Daemon) PeerFacts(peer netip.Addr) ([]PeerFacts, error) {
	out := []PeerFacts{}
	for _, h := range d.agent.merger.Holders(peer) {
		out = append(out, PeerFacts{Node: h.Node, Tunnel: h.Tunnel})
	}
	return out, nil
}

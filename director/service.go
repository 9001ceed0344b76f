// Package director is the daemon's core: it wires the affinity table, the
// store, the dataplane and replication together and carries out the
// operator's requests. Service holds the requests the CLI makes; the CLI
// runs them on a store file directly or, through the API, on a running
// daemon.
package director

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/director/agents"
	"github.com/tunneldirector/tunneldirector/director/health"
	"github.com/tunneldirector/tunneldirector/store"
)

// Service carries out operator requests against a store. Every request
// that changes the table is one store transaction, planned and committed
// under the store's lock.
type Service struct {
	st store.Backend
	// gate, when set, refuses writes (a backup director).
	gate func() error
	// agentNode, when set (a daemon with agents), gives a node's agent
	// counts for Nodes.
	agentNode func(name string) (agents.NodeView, bool)
	// health, on a running daemon, is the health checks' view.
	health func() health.Status
	// m, when set (a daemon's service), counts imports.
	m *daemonMetrics
}

// writable says whether the service may change the table.
func (s *Service) writable() error {
	if s.gate == nil {
		return nil
	}
	return s.gate()
}

// NewService returns a service over an open store.
func NewService(st store.Backend) *Service { return &Service{st: st} }

// Store returns the service's store.
func (s *Service) Store() store.Backend { return s.st }

// ImportRequest says how to import a file.
type ImportRequest struct {
	// Name is the file's name, for messages and format detection.
	Name string
	// Kind and Format override detection.
	Kind   nms.Kind
	Format nms.Format
	// DryRun plans and reports without changing anything.
	DryRun bool
	// Replace makes the table equal to the file; the default merges.
	Replace bool
	// MaxRecords bounds the file (0: nms.DefaultMaxRecords).
	MaxRecords int
	// Progress is called with the bytes read so far.
	Progress func(int64)
}

// ImportResult is what an import did, or would do.
type ImportResult struct {
	Diff     *nms.Diff `json:"diff"`
	DryRun   bool      `json:"dry_run"`
	Revision uint64    `json:"revision"` // after the import
	Changed  bool      `json:"changed"`
}

// Import reads a tunnels or nodes file and commits its difference from the
// table as one transaction: all of it, or nothing when any record is
// refused (the error then names the file's lines).
func (s *Service) Import(r io.Reader, req ImportRequest) (res *ImportResult, err error) {
	kind := "tunnels"
	if s.m != nil {
		defer func() { s.m.imported(kind, res, err) }()
	}
	f, readErr := nms.Read(r, nms.Options{Name: req.Name, Kind: req.Kind, Format: req.Format, MaxRecords: req.MaxRecords, Progress: req.Progress})
	if req.Kind == nms.KindNodes || f != nil && f.Kind == nms.KindNodes {
		kind = "nodes"
	}
	plan := func(t *affinity.Table) *nms.Diff {
		var d *nms.Diff
		if f.Kind == nms.KindNodes {
			d = nms.PlanNodes(t, f.Nodes, req.Replace)
		} else {
			d = nms.Plan(t, f.Tunnels, req.Replace)
		}
		if d.File == "" {
			d.File = req.Name
		}
		return d
	}
	if readErr != nil {
		return nil, s.alsoCheckTable(readErr, f, plan)
	}
	res = &ImportResult{DryRun: req.DryRun}
	if req.DryRun {
		res.Diff = plan(s.st.Table())
		res.Revision = s.st.Revision()
		return res, nil
	}
	if err := s.writable(); err != nil {
		return nil, fmt.Errorf("import %s: %w", req.Name, err)
	}
	a, err := s.st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
		res.Diff = plan(t)
		// From here the batch is the only way to the file's records:
		// the store lets go of it once the table applied it, so a
		// large import frees them before the commit writes its pages.
		batch := res.Diff.Batch
		res.Diff.Batch, f = nil, nil
		return batch, nil
	})
	if err != nil {
		return nil, res.Diff.MapError(err)
	}
	res.Revision = a.Revision
	res.Changed = len(a.Changes) > 0
	return res, nil
}

// alsoCheckTable adds, to a file's own errors, the conflicts its valid
// records have with the table (an overlap with an existing tunnel, an
// unknown node), so one run reports every problem of the file. Nothing is
// committed.
func (s *Service) alsoCheckTable(readErr error, f *nms.File, plan func(*affinity.Table) *nms.Diff) error {
	var fe *nms.Errors
	if !errors.As(readErr, &fe) || f == nil || len(f.Tunnels) == 0 {
		return readErr
	}
	var d *nms.Diff
	err := s.st.Try(func(t *affinity.Table) ([]affinity.Change, error) {
		d = plan(t)
		return d.Batch, nil
	})
	var more *nms.Errors
	if err == nil || !errors.As(d.MapError(err), &more) {
		return readErr
	}
	merged := &nms.Errors{Total: fe.Total + more.Total, List: append(slices.Clone(fe.List), more.List...)}
	slices.SortStableFunc(merged.List, func(a, b *nms.FieldError) int {
		return cmp.Or(cmp.Compare(a.Pos.Line, b.Pos.Line), cmp.Compare(a.Pos.Index, b.Pos.Index))
	})
	if len(merged.List) > nms.DefaultMaxErrors {
		merged.List = merged.List[:nms.DefaultMaxErrors]
	}
	return merged
}

// Export writes the tunnels or the nodes in the given format.
func (s *Service) Export(w io.Writer, kind nms.Kind, format nms.Format) error {
	t := s.st.Table()
	if kind == nms.KindNodes {
		return nms.WriteNodes(w, format, t.Nodes())
	}
	return nms.WriteTunnels(w, format, t.Tunnels())
}

// NodeRequest is a node action.
type NodeRequest struct {
	Action   string     `json:"action"` // add, remove, drain, undrain, down, up, set-weight, set-capacity
	Name     string     `json:"name"`
	Addr     netip.Addr `json:"addr,omitzero"`
	Weight   uint32     `json:"weight,omitempty"`
	Capacity int        `json:"capacity,omitempty"`
	Comment  string     `json:"comment,omitempty"`
	// MovesLimit, when above 0, is the most moves the result lists (its
	// plan's first ones; MovesOmitted counts the rest; the unplaced
	// tunnels are all listed). A node down at a million tunnels moves
	// 62,500: the CLI prints 20 of them, and sending and decoding them
	// all cost 0.6 s of CPU beside the reconcile that carries them to
	// the kernel. The API takes it as the query parameter moves_limit,
	// which a daemon from before it ignores (its body decoder refuses
	// unknown fields).
	MovesLimit int `json:"-"`
}

// nodeActions are the node actions NodeAction carries out.
var nodeActions = []string{"add", "remove", "drain", "undrain", "down", "up", "set-weight", "set-capacity"}

// NodeResult is what a node action did.
type NodeResult struct {
	Node     affinity.Node  `json:"node"`
	Plan     *affinity.Plan `json:"plan,omitempty"`
	Revision uint64         `json:"revision"`
	Changed  bool           `json:"changed"`
	// MovesOmitted is how many of the plan's moves the result leaves out
	// (NodeRequest.MovesLimit).
	MovesOmitted int `json:"moves_omitted,omitempty"`
}

// NodeAction adds, removes or changes a node. Taking a node down moves its
// tunnels (and only those); draining moves nothing until a rebalance.
func (s *Service) NodeAction(req NodeRequest) (*NodeResult, error) {
	if !slices.Contains(nodeActions, req.Action) {
		return nil, badRequest("node action", req.Action, "unknown (want %s)", strings.Join(nodeActions, ", "))
	}
	if req.MovesLimit < 0 {
		return nil, badRequest("moves_limit", strconv.Itoa(req.MovesLimit), "want a whole number, 0 or more")
	}
	if err := s.writable(); err != nil {
		return nil, fmt.Errorf("node %s %s: %w", req.Action, req.Name, err)
	}
	res := &NodeResult{}
	a, err := s.st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
		cur, exists := t.Node(req.Name)
		if !exists && req.Action != "add" {
			return nil, fmt.Errorf("node %s: %w", req.Name, affinity.ErrNotFound)
		}
		put := func(n affinity.Node) ([]affinity.Change, error) {
			return []affinity.Change{{Kind: affinity.PutNode, Node: &n, Reason: "node " + req.Action}}, nil
		}
		switch req.Action {
		case "add":
			if exists {
				return nil, fmt.Errorf("add node %s: %w: it exists (address %s)", req.Name, affinity.ErrConflict, cur.Addr)
			}
			return put(affinity.Node{Name: req.Name, Addr: req.Addr, Weight: req.Weight, Capacity: req.Capacity, Comment: req.Comment})
		case "set-weight":
			cur.Weight = req.Weight
			return put(cur)
		case "set-capacity":
			cur.Capacity = req.Capacity
			return put(cur)
		case "remove":
			p, err := t.PlanRemoveNode(req.Name)
			res.Plan = p
			if err != nil {
				return nil, err
			}
			return p.Batch(), nil
		case "drain", "undrain", "down", "up":
			state := map[string]affinity.NodeState{"drain": affinity.NodeDraining, "undrain": affinity.NodeActive, "down": affinity.NodeDown, "up": affinity.NodeActive}[req.Action]
			p, err := t.PlanNodeState(req.Name, state)
			if err != nil {
				return nil, err
			}
			res.Plan = p
			return p.Batch(), nil
		}
		return nil, badRequest("node action", req.Action, "unknown (want %s)", strings.Join(nodeActions, ", "))
	})
	if err != nil {
		return nil, err
	}
	res.Revision = a.Revision
	res.Changed = len(a.Changes) > 0
	res.Node, _ = s.st.Table().Node(req.Name)
	if p := res.Plan; p != nil && req.MovesLimit > 0 && len(p.Moves) > req.MovesLimit {
		res.MovesOmitted = len(p.Moves) - req.MovesLimit
		p.Moves = p.Moves[:req.MovesLimit:req.MovesLimit]
	}
	return res, nil
}

// RebalanceResult is a rebalance plan and whether it was applied.
type RebalanceResult struct {
	Plan     *affinity.Plan `json:"plan"`
	Applied  bool           `json:"applied"`
	Revision uint64         `json:"revision"`
}

// Rebalance plans at most maxMoves moves and applies them when apply is set.
func (s *Service) Rebalance(maxMoves int, apply bool) (*RebalanceResult, error) {
	if maxMoves < 0 {
		return nil, badRequest("max-moves", strconv.Itoa(maxMoves), "must not be negative")
	}
	res := &RebalanceResult{}
	if !apply {
		res.Plan = s.st.Table().Rebalance(maxMoves)
		res.Revision = s.st.Revision()
		return res, nil
	}
	if err := s.writable(); err != nil {
		return nil, fmt.Errorf("rebalance: %w", err)
	}
	a, err := s.st.Do(func(t *affinity.Table) ([]affinity.Change, error) {
		res.Plan = t.Rebalance(maxMoves)
		return res.Plan.Batch(), nil
	})
	if err != nil {
		return nil, err
	}
	res.Applied = true
	res.Revision = a.Revision
	return res, nil
}

// LookupResult answers who owns an address.
type LookupResult struct {
	Addr  netip.Addr      `json:"addr"`
	Found bool            `json:"found"`
	Match *affinity.Match `json:"match,omitempty"`
}

// Lookup says which tunnel and node own an address, and why.
func (s *Service) Lookup(a netip.Addr) (*LookupResult, error) {
	m, ok := s.st.Table().Lookup(a)
	res := &LookupResult{Addr: a, Found: ok}
	if ok {
		res.Match = &m
	}
	return res, nil
}

// NodeInfo is a node with its load and health.
type NodeInfo struct {
	affinity.Node
	State   string `json:"state"`
	Tunnels int    `json:"tunnels"`
	Bound   int    `json:"bound,omitempty"` // bounded-load limit for the next placement; 0 when not active
	// Agent is what the node's agent reports (SAs, tunnels, misplaced
	// peers), when it reports to this director.
	Agent *agents.NodeView `json:"agent,omitempty"`
	// HealthSummary is the HEALTH column of `show nodes`: up, failing
	// 1/2, down since, held down until, the operator's state, the last
	// error (health.NodeView.Health). Without a daemon only what the
	// store holds (health's downs and holds) is known; "-" otherwise.
	HealthSummary string `json:"health_summary"`
	// Check is the health checks' current view of the node, with the
	// last round's results (from a running daemon).
	Check *health.NodeView `json:"check,omitempty"`
}

// NodesResult lists the nodes and the table's totals.
type NodesResult struct {
	Nodes    []NodeInfo `json:"nodes"`
	Tunnels  int        `json:"tunnels"`
	Revision uint64     `json:"revision"`
}

// Nodes lists the nodes with their tunnel counts, load bounds and health.
func (s *Service) Nodes() (*NodesResult, error) {
	t := s.st.Table()
	counts, bounds := t.Counts(), t.Bound()
	res := &NodesResult{Tunnels: t.Len(), Revision: t.Revision()}
	var views map[string]health.NodeView
	if s.health != nil {
		hs := s.health()
		views = make(map[string]health.NodeView, len(hs.Nodes))
		for _, v := range hs.Nodes {
			views[v.Name] = v
		}
	}
	now := time.Now()
	for _, n := range t.Nodes() {
		ni := NodeInfo{Node: n, State: n.State.String(), Tunnels: counts[n.Name], Bound: bounds[n.Name], HealthSummary: "-"}
		if s.agentNode != nil {
			if v, ok := s.agentNode(n.Name); ok {
				ni.Agent = &v
			}
		}
		if v, ok := views[n.Name]; ok && v.State == n.State {
			ni.Check = &v
			ni.HealthSummary = v.Health()
		} else if n.State == affinity.NodeDown && n.Health.Down {
			// No checks yet (or their view is a commit behind): what
			// the store says.
			ni.HealthSummary = health.StoredView(health.Node{Name: n.Name, Addr: n.Addr, State: n.State, Record: n.Health}, now).Health()
		}
		res.Nodes = append(res.Nodes, ni)
	}
	return res, nil
}

// TunnelsResult is a page of tunnels.
type TunnelsResult struct {
	Tunnels []affinity.Tunnel `json:"tunnels"`
	Total   int               `json:"total"`
}

// Tunnels lists tunnels by id, all or one node's, at most limit (0: all).
func (s *Service) Tunnels(node string, limit int) (*TunnelsResult, error) {
	t := s.st.Table()
	var list []affinity.Tunnel
	if node != "" {
		if _, ok := t.Node(node); !ok {
			return nil, fmt.Errorf("node %s: %w", node, affinity.ErrNotFound)
		}
		list = t.TunnelsOfNode(node)
	} else {
		list = t.Tunnels()
	}
	res := &TunnelsResult{Total: len(list), Tunnels: list}
	if limit > 0 && len(list) > limit {
		res.Tunnels = list[:limit]
	}
	return res, nil
}

// Tunnel returns one tunnel.
func (s *Service) Tunnel(id string) (affinity.Tunnel, error) {
	tu, ok := s.st.Table().Tunnel(id)
	if !ok {
		return tu, fmt.Errorf("tunnel %s: %w", id, affinity.ErrNotFound)
	}
	return tu, nil
}

// Backup writes a consistent copy of the store to path; an existing file
// is overwritten only with force, and never the live store itself.
func (s *Service) Backup(path string, force bool) (uint64, int64, error) {
	rev := s.st.Revision()
	n, err := s.st.Backup(path, store.BackupOptions{Force: force})
	return rev, n, err
}

// Check checks the store.
func (s *Service) Check() (*store.CheckReport, error) { return s.st.Check() }

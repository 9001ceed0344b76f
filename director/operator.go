package director

import (
	"io"
	"net/netip"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/store"
)

// Operator is what the CLI asks of a director: Service answers it from a
// store file, Client from a running daemon's API, with the same results.
type Operator interface {
	Import(r io.Reader, req ImportRequest) (*ImportResult, error)
	Export(w io.Writer, kind nms.Kind, format nms.Format) error
	NodeAction(req NodeRequest) (*NodeResult, error)
	Rebalance(maxMoves int, apply bool) (*RebalanceResult, error)
	Lookup(a netip.Addr) (*LookupResult, error)
	Nodes() (*NodesResult, error)
	Tunnels(node string, limit int) (*TunnelsResult, error)
	Tunnel(id string) (affinity.Tunnel, error)
	Backup(path string, force bool) (revision uint64, bytes int64, err error)
	Check() (*store.CheckReport, error)
}

var (
	_ Operator = (*Service)(nil)
	_ Operator = (*Client)(nil)
)

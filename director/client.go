package director

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/director/ctsync"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/store"
)

// Client talks to a running daemon's API; it answers the CLI's requests
// like Service does on a store file.
type Client struct {
	http   *http.Client
	base   string
	token  string
	socket string // the unix socket, for messages
}

// maxErrorBody bounds an error answer the client reads: the daemon's are
// at most 50 short lines.
const maxErrorBody = 1 << 20

// NewUnixClient returns a client for the daemon's unix socket.
func NewUnixClient(socket string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	return &Client{http: &http.Client{Transport: tr, Timeout: 10 * time.Minute}, base: "http://tunneldirector", socket: socket}
}

// NewTCPClient returns a client for the daemon's TCP API with its token.
func NewTCPClient(addr, token string) *Client {
	return &Client{http: &http.Client{Timeout: 10 * time.Minute}, base: "http://" + addr, token: token}
}

func (c *Client) do(method, path string, q url.Values, body io.Reader, out any) error {
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequest(method, u, body)
	if err != nil {
		return err
	}
	if sb, ok := body.(sizedBody); ok {
		req.ContentLength = sb.n
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, os.ErrPermission) && c.socket != "" {
			return fmt.Errorf("daemon API on %s: permission denied: the API socket is root-only (run as root)", c.socket)
		}
		return fmt.Errorf("daemon API %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e apiError
		if json.NewDecoder(io.LimitReader(resp.Body, maxErrorBody)).Decode(&e) != nil || e.Error == "" {
			return fmt.Errorf("daemon API %s %s: %s", method, path, resp.Status)
		}
		switch {
		case e.Refused:
			return fmt.Errorf("%w: %s", ErrRefused, e.Error)
		case e.Missing:
			return fmt.Errorf("%s (%w)", e.Error, affinity.ErrNotFound)
		}
		return errors.New(e.Error)
	}
	if w, ok := out.(io.Writer); ok {
		_, err = io.Copy(w, resp.Body)
		return err
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Status returns the daemon's status.
func (c *Client) Status() (*Status, error) {
	var s Status
	return &s, c.do("GET", "/v1/status", nil, nil, &s)
}

// SetRole tells the daemon its pair role (keepalived's notify).
func (c *Client) SetRole(role string) (*Status, error) {
	var s Status
	return &s, c.do("POST", "/v1/role/"+url.PathEscape(role), nil, nil, &s)
}

// Ready reports whether the daemon is in sync with its peer (nil) or not.
func (c *Client) Ready() error {
	var ok map[string]bool
	return c.do("GET", "/v1/ready", nil, nil, &ok)
}

// Conflicts returns the daemon's split-brain merge reports.
func (c *Client) Conflicts() ([]replication.MergeReport, error) {
	var r []replication.MergeReport
	return r, c.do("GET", "/v1/replication/conflicts", nil, nil, &r)
}

// ConntrackCommit asks the daemon to commit its conntrack cache into its
// kernel now.
func (c *Client) ConntrackCommit() (*ctsync.CommitReport, error) {
	var r ctsync.CommitReport
	return &r, c.do("POST", "/v1/conntrack/commit", nil, nil, &r)
}

// ConntrackFlush asks the daemon to let its synced conntrack entries run
// out, and with cache to empty its cache.
func (c *Client) ConntrackFlush(cache bool) (*FlushResult, error) {
	var r FlushResult
	q := url.Values{}
	if cache {
		q.Set("cache", "1")
	}
	return &r, c.do("POST", "/v1/conntrack/flush", q, nil, &r)
}

// ConntrackResync asks the daemon for a full conntrack resync.
func (c *Client) ConntrackResync() (*ctsync.Status, error) {
	var r ctsync.Status
	return &r, c.do("POST", "/v1/conntrack/resync", nil, nil, &r)
}

// ConntrackFlows lists up to limit flows of the daemon's conntrack cache.
func (c *Client) ConntrackFlows(limit int) ([]FlowInfo, error) {
	var r []FlowInfo
	return r, c.do("GET", "/v1/conntrack/flows", url.Values{"limit": {strconv.Itoa(limit)}}, nil, &r)
}

// Import sends a file to the daemon.
func (c *Client) Import(r io.Reader, req ImportRequest) (*ImportResult, error) {
	q := url.Values{"name": {req.Name}, "kind": {req.Kind.String()}, "format": {req.Format.String()}, "max_records": {strconv.Itoa(req.MaxRecords)}}
	if req.DryRun {
		q.Set("dry_run", "1")
	}
	if req.Replace {
		q.Set("replace", "1")
	}
	// A file's size goes along as the Content-Length: the daemon sizes
	// its duplicate indexes from it instead of growing them (at a million
	// records, seconds of rehashing). It is what is left from the current
	// offset (standard input redirected from a file may have been read
	// from already), and the body is cut there, so a file that grows
	// meanwhile does not fail the request.
	size := int64(-1)
	if f, ok := r.(interface {
		Stat() (fs.FileInfo, error)
		io.Seeker
	}); ok {
		fi, err := f.Stat()
		off, serr := f.Seek(0, io.SeekCurrent)
		if err == nil && serr == nil && fi.Mode().IsRegular() {
			size = fi.Size() - off
		}
	}
	if req.Progress != nil {
		r = &progressReader{r: r, fn: req.Progress}
	}
	if size > 0 {
		r = sizedBody{io.LimitReader(r, size), size}
	}
	var res ImportResult
	return &res, c.do("POST", "/v1/import", q, r, &res)
}

// sizedBody is a request body of known length.
type sizedBody struct {
	io.Reader
	n int64
}

type progressReader struct {
	r  io.Reader
	n  int64
	fn func(int64)
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.n += int64(n)
	p.fn(p.n)
	return n, err
}

// Export streams the daemon's export.
func (c *Client) Export(w io.Writer, kind nms.Kind, format nms.Format) error {
	return c.do("GET", "/v1/export", url.Values{"kind": {kind.String()}, "format": {format.String()}}, nil, w)
}

// NodeAction asks the daemon for a node action.
func (c *Client) NodeAction(req NodeRequest) (*NodeResult, error) {
	b, _ := json.Marshal(req)
	var q url.Values
	if req.MovesLimit > 0 {
		q = url.Values{"moves_limit": {strconv.Itoa(req.MovesLimit)}}
	}
	var res NodeResult
	return &res, c.do("POST", "/v1/nodes/"+url.PathEscape(req.Name)+"/"+url.PathEscape(req.Action), q, bytesReader(b), &res)
}

// Rebalance asks the daemon for a rebalance plan, applied or not.
func (c *Client) Rebalance(maxMoves int, apply bool) (*RebalanceResult, error) {
	q := url.Values{"max_moves": {strconv.Itoa(maxMoves)}}
	if apply {
		q.Set("apply", "1")
	}
	var res RebalanceResult
	return &res, c.do("POST", "/v1/rebalance", q, nil, &res)
}

// Lookup asks who owns an address.
func (c *Client) Lookup(a netip.Addr) (*LookupResult, error) {
	var res LookupResult
	return &res, c.do("GET", "/v1/lookup/"+a.String(), nil, nil, &res)
}

// Nodes lists the nodes.
func (c *Client) Nodes() (*NodesResult, error) {
	var res NodesResult
	return &res, c.do("GET", "/v1/nodes", nil, nil, &res)
}

// Tunnels lists tunnels.
func (c *Client) Tunnels(node string, limit int) (*TunnelsResult, error) {
	var res TunnelsResult
	return &res, c.do("GET", "/v1/tunnels", url.Values{"node": {node}, "limit": {strconv.Itoa(limit)}}, nil, &res)
}

// Tunnel returns one tunnel.
func (c *Client) Tunnel(id string) (affinity.Tunnel, error) {
	var tu affinity.Tunnel
	return tu, c.do("GET", "/v1/tunnels/"+url.PathEscape(id), nil, nil, &tu)
}

// Backup asks the daemon to back its store up to path, inside its
// backup_dir (a relative path is taken there).
func (c *Client) Backup(path string, force bool) (uint64, int64, error) {
	var res BackupResult
	q := url.Values{"path": {path}}
	if force {
		q.Set("force", "1")
	}
	err := c.do("POST", "/v1/store/backup", q, nil, &res)
	return res.Revision, res.Bytes, err
}

// Check asks the daemon to check its store.
func (c *Client) Check() (*store.CheckReport, error) {
	var r store.CheckReport
	return &r, c.do("GET", "/v1/store/check", nil, nil, &r)
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

// Agents returns the node agents' view of the farm.
func (c *Client) Agents() (*AgentsResult, error) {
	var res AgentsResult
	return &res, c.do("GET", "/v1/agents", nil, nil, &res)
}

// Misplaced lists the tunnels whose SAs the agents report on a node other
// than their owner.
func (c *Client) Misplaced() (*MisplacedResult, error) {
	var res MisplacedResult
	return &res, c.do("GET", "/v1/misplaced", nil, nil, &res)
}

// PeerFacts returns what the agents report of a peer, per node.
func (c *Client) PeerFacts(peer netip.Addr) ([]PeerFacts, error) {
	var res []PeerFacts
	return res, c.do("GET", "/v1/agents/peer/"+peer.String(), nil, nil, &res)
}

package director

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// The API is HTTP with JSON bodies, on a unix socket only root can open
// and, optionally, on TCP where every request must carry the token
// (Authorization: Bearer TOKEN). Refused input answers 422 with the
// error's text, so the CLI prints the same message either way.

// apiError is the body of every error answer.
type apiError struct {
	Error   string `json:"error"`
	Refused bool   `json:"refused,omitempty"` // the input was refused: exit status 2
	Missing bool   `json:"missing,omitempty"` // the object does not exist
}

// maxSmallBody bounds the body of every request but an import (a node
// action is a few hundred bytes).
const maxSmallBody = 64 << 10

// maxNameLen bounds an import's file name, which every error line quotes.
const maxNameLen = 256

// maxHeaderBytes bounds a request's header lines.
const maxHeaderBytes = 64 << 10

// Handler serves the API for a daemon. token, when not empty, is required
// on every request.
func (d *Daemon) Handler(token string) http.Handler {
	mux := http.NewServeMux()
	s := d.svc
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { reply(d.Status(), nil)(w) })
	mux.HandleFunc("GET /v1/nodes", func(w http.ResponseWriter, r *http.Request) { reply(s.Nodes())(w) })
	mux.HandleFunc("GET /v1/agents", func(w http.ResponseWriter, r *http.Request) { reply(d.Agents())(w) })
	mux.HandleFunc("GET /v1/misplaced", func(w http.ResponseWriter, r *http.Request) { reply(d.Misplaced())(w) })
	mux.HandleFunc("GET /v1/agents/peer/{addr}", func(w http.ResponseWriter, r *http.Request) {
		a, err := addrPath(r, "peer")
		if err != nil {
			reply[any](nil, err)(w)
			return
		}
		reply(d.PeerFacts(a))(w)
	})
	mux.HandleFunc("GET /v1/tunnels", func(w http.ResponseWriter, r *http.Request) {
		limit, err := intParam(r.URL.Query(), "limit", 0)
		if err != nil {
			reply[any](nil, err)(w)
			return
		}
		reply(s.Tunnels(r.URL.Query().Get("node"), limit))(w)
	})
	mux.HandleFunc("GET /v1/tunnels/{id}", func(w http.ResponseWriter, r *http.Request) { reply(s.Tunnel(r.PathValue("id")))(w) })
	mux.HandleFunc("GET /v1/lookup/{addr}", func(w http.ResponseWriter, r *http.Request) {
		a, err := addrPath(r, "lookup")
		if err != nil {
			reply[any](nil, err)(w)
			return
		}
		reply(s.Lookup(a))(w)
	})
	mux.HandleFunc("POST /v1/import", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		var req ImportRequest
		var errs []error
		var err error
		if req.Kind, err = nms.ParseKind(q.Get("kind")); err != nil {
			errs = append(errs, badRequest("kind", q.Get("kind"), "want tunnels, nodes or auto"))
		}
		if req.Format, err = nms.ParseFormat(q.Get("format")); err != nil {
			errs = append(errs, badRequest("format", q.Get("format"), "want csv, json or auto"))
		}
		if req.MaxRecords, err = intParam(q, "max_records", 0); err != nil {
			errs = append(errs, err)
		}
		// The name prefixes every error line of the answer.
		if len(q.Get("name")) > maxNameLen {
			errs = append(errs, badRequest("name", q.Get("name"), "longer than %d bytes", maxNameLen))
		}
		if len(errs) > 0 {
			reply[any](nil, errors.Join(errs...))(w)
			return
		}
		req.Name, req.DryRun, req.Replace = q.Get("name"), q.Get("dry_run") == "1", q.Get("replace") == "1"
		// A body above the limit is refused while it is read: the
		// reader fails, the import stops, and the answer is 413.
		limit := d.config().API.MaxBody
		body := &bodyLimit{r: http.MaxBytesReader(w, r.Body, limit), limit: limit, size: r.ContentLength}
		res, err := s.Import(body, req)
		if body.over {
			err = fmt.Errorf("import %s: %w: above api.max_body (%d bytes)", shortValue(req.Name), ErrTooLarge, limit)
		}
		reply(res, err)(w)
	})
	mux.HandleFunc("GET /v1/export", func(w http.ResponseWriter, r *http.Request) {
		kind, err := nms.ParseKind(r.URL.Query().Get("kind"))
		if err != nil {
			reply[any](nil, badRequest("kind", r.URL.Query().Get("kind"), "want tunnels or nodes"))(w)
			return
		}
		format, err := nms.ParseFormat(r.URL.Query().Get("format"))
		if err != nil || format == nms.FormatAuto {
			reply[any](nil, badRequest("format", r.URL.Query().Get("format"), "want csv or json"))(w)
			return
		}
		if kind == nms.KindAuto {
			kind = nms.KindTunnels
		}
		w.Header().Set("Content-Type", "text/plain")
		if err := s.Export(w, kind, format); err != nil {
			slog.Error("api export", "err", err)
		}
	})
	mux.HandleFunc("POST /v1/nodes/{name}/{action}", func(w http.ResponseWriter, r *http.Request) {
		var req NodeRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxSmallBody))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil && !errors.Is(err, io.EOF) {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				reply[any](nil, fmt.Errorf("node request: %w (%d bytes at most)", ErrTooLarge, maxSmallBody))(w)
				return
			}
			reply[any](nil, badRequest("node request body", "", "%v", err))(w)
			return
		}
		req.Name, req.Action = r.PathValue("name"), r.PathValue("action")
		var err error
		if req.MovesLimit, err = intParam(r.URL.Query(), "moves_limit", 0); err != nil {
			reply[any](nil, err)(w)
			return
		}
		reply(s.NodeAction(req))(w)
	})
	mux.HandleFunc("POST /v1/rebalance", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if !q.Has("max_moves") {
			reply[any](nil, badRequest("max_moves", "", "required: the most tunnels to move"))(w)
			return
		}
		n, err := intParam(q, "max_moves", 0)
		if err != nil {
			reply[any](nil, err)(w)
			return
		}
		reply(s.Rebalance(n, q.Get("apply") == "1"))(w)
	})
	mux.HandleFunc("POST /v1/store/backup", func(w http.ResponseWriter, r *http.Request) {
		path, err := d.backupPath(r.URL.Query().Get("path"))
		if err != nil {
			reply[any](nil, err)(w)
			return
		}
		rev, n, err := s.Backup(path, r.URL.Query().Get("force") == "1")
		reply(BackupResult{Path: path, Revision: rev, Bytes: n}, err)(w)
	})
	mux.HandleFunc("POST /v1/role/{role}", func(w http.ResponseWriter, r *http.Request) {
		role, err := replication.ParseRole(r.PathValue("role"))
		if err != nil {
			reply[any](nil, badRequest("role", r.PathValue("role"), "want master, backup or fault"))(w)
			return
		}
		reply(d.Status(), d.SetRole(role))(w)
	})
	mux.HandleFunc("GET /v1/ready", func(w http.ResponseWriter, r *http.Request) {
		if !d.Ready() {
			writeJSON(w, http.StatusServiceUnavailable, apiError{Error: "not in sync with the peer director"})
			return
		}
		reply(map[string]bool{"ready": true}, nil)(w)
	})
	mux.HandleFunc("GET /v1/store/check", func(w http.ResponseWriter, r *http.Request) { reply(s.Check())(w) })
	mux.HandleFunc("GET /v1/replication/conflicts", func(w http.ResponseWriter, r *http.Request) { reply(d.Conflicts())(w) })
	mux.HandleFunc("POST /v1/conntrack/commit", func(w http.ResponseWriter, r *http.Request) { reply(d.ConntrackCommit(r.Context()))(w) })
	mux.HandleFunc("POST /v1/conntrack/flush", func(w http.ResponseWriter, r *http.Request) {
		reply(d.ConntrackFlush(r.Context(), r.URL.Query().Get("cache") == "1"))(w)
	})
	mux.HandleFunc("POST /v1/conntrack/resync", func(w http.ResponseWriter, r *http.Request) { reply(d.ConntrackResync())(w) })
	mux.HandleFunc("GET /v1/conntrack/flows", func(w http.ResponseWriter, r *http.Request) {
		limit, err := intParam(r.URL.Query(), "limit", 100)
		if err != nil {
			reply[any](nil, err)(w)
			return
		}
		reply(d.ConntrackFlows(limit))(w)
	})
	// Requests without a body of their own still get a bounded one.
	limited := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/import" {
			r.Body = http.MaxBytesReader(w, r.Body, maxSmallBody)
		}
		mux.ServeHTTP(w, r)
	})
	// The agents' endpoint has its own tokens and body limit: it is
	// served before the operator token is looked at, so a node's token
	// opens nothing else, and the operator's opens no node's facts.
	agentReports := d.agentHandler()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == report.Path {
			agentReports.ServeHTTP(w, r)
			return
		}
		if token == "" {
			limited.ServeHTTP(w, r)
			return
		}
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(token)) != 1 {
			w.Header().Set("WWW-Authenticate", "Bearer")
			writeJSON(w, http.StatusUnauthorized, apiError{Error: "missing or wrong API token"})
			return
		}
		limited.ServeHTTP(w, r)
	})
}

// addrPath parses the request's {addr} path value as an address
// (unmapped); param names it in the error.
func addrPath(r *http.Request, param string) (netip.Addr, error) {
	a, err := netip.ParseAddr(r.PathValue("addr"))
	if err != nil {
		return netip.Addr{}, badRequest(param, r.PathValue("addr"), "not an IP address")
	}
	return a.Unmap(), nil
}

// intParam parses an optional non-negative integer query parameter (absent:
// def).
func intParam(q url.Values, name string, def int) (int, error) {
	v := q.Get(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, badRequest(name, v, "want a whole number, 0 or more")
	}
	return n, nil
}

// bodyLimit notes when a request body passed its limit, whatever the
// reader above it made of the error.
type bodyLimit struct {
	r     io.Reader
	limit int64
	over  bool
	size  int64 // the request's Content-Length, -1 when unknown
}

// Size tells the file reader the body's length (see nms's sizeOf), when
// the client sent it and it is within the limit.
func (b *bodyLimit) Size() int64 {
	if b.size <= 0 || b.size > b.limit {
		return -1
	}
	return b.size
}

func (b *bodyLimit) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		b.over = true
	}
	return n, err
}

// BackupResult is what a backup wrote.
type BackupResult struct {
	Path     string `json:"path"`
	Revision uint64 `json:"revision"`
	Bytes    int64  `json:"bytes"`
}

// backupPath places a backup asked for through the API under the
// configured backup_dir: a relative path is taken inside it, an absolute
// one must lie inside it once symbolic links are resolved. Whoever holds
// the TCP token must not be able to write anywhere else as root.
func (d *Daemon) backupPath(p string) (string, error) {
	dir := d.config().BackupDir
	if p == "" {
		return "", badRequest("path", "", "required: a file name inside backup_dir %s", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("backup_dir %s: %w", dir, err)
	}
	realDir, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return "", fmt.Errorf("backup_dir %s: %w", dir, err)
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(dir, p)
	}
	p = filepath.Clean(p)
	parent, err := filepath.EvalSymlinks(filepath.Dir(p))
	if err != nil {
		return "", badRequest("path", p, "its directory does not exist inside backup_dir %s", dir)
	}
	rel, err := filepath.Rel(realDir, parent)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", badRequest("path", p, "outside backup_dir %s: backups through the daemon go there", dir)
	}
	return filepath.Join(parent, filepath.Base(p)), nil
}

// reply curries a result and its error into a writer, so handlers read
// reply(s.Nodes())(w).
func reply[T any](v T, err error) func(http.ResponseWriter) {
	return func(w http.ResponseWriter) {
		if err == nil {
			writeJSON(w, http.StatusOK, v)
			return
		}
		status := httpStatus(err)
		e := apiError{Error: err.Error()}
		switch status {
		case http.StatusNotFound:
			e.Missing = true
		case http.StatusUnprocessableEntity, http.StatusRequestEntityTooLarge:
			e.Refused = true
		}
		writeJSON(w, status, e)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// ServeAPI serves the API on the unix socket (mode 0600, in a directory
// only root can enter) and, when tcpAddr is set, on TCP with the token,
// until ctx ends.
func (d *Daemon) ServeAPI(ctx context.Context, socket string, tcpAddr netip.AddrPort, token string) error {
	if err := secureSocketDir(filepath.Dir(socket), filepath.Base(socket)); err != nil {
		return fmt.Errorf("api socket %s: %w", socket, err)
	}
	// A socket left by a killed daemon would make Listen fail; one
	// still answering belongs to a running daemon.
	if c, err := net.DialTimeout("unix", socket, 200*time.Millisecond); err == nil {
		c.Close()
		return fmt.Errorf("api socket %s: another daemon is listening on it", socket)
	}
	// Only a socket is removed: a mistyped api.socket naming the store
	// or any other file must not delete it.
	if fi, err := os.Lstat(socket); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("api socket %s: the path exists and is not a socket: refusing to remove it", socket)
		}
		os.Remove(socket)
	}
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("api socket %s: %w", socket, err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("api socket %s: %w", socket, err)
	}
	servers := []*http.Server{{Handler: d.Handler(""), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: maxHeaderBytes}}
	listeners := []net.Listener{ln}
	if tcpAddr.IsValid() {
		if token == "" {
			ln.Close()
			return errors.New("api tcp: a token is required")
		}
		tl, err := net.Listen("tcp", tcpAddr.String())
		if err != nil {
			ln.Close()
			return fmt.Errorf("api tcp %s: %w", tcpAddr, err)
		}
		servers = append(servers, &http.Server{Handler: d.Handler(token), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: maxHeaderBytes})
		listeners = append(listeners, tl)
	}
	errc := make(chan error, len(servers))
	for i := range servers {
		go func() { errc <- servers[i].Serve(listeners[i]) }()
	}
	select {
	case <-ctx.Done():
	case err := <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("api: %w", err)
		}
	}
	shut, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, s := range servers {
		s.Shutdown(shut)
	}
	os.Remove(socket)
	return nil
}

// secureSocketDir makes the socket's directory one only root can enter:
// created 0700, or an existing one of root's that holds nothing else
// tightened to 0700 (the socket is root-only because the directory is; a
// 0777 directory would let anyone replace the socket). A directory
// another user owns, a symbolic link, or a shared directory that is not
// 0700 (/run, /tmp) is refused.
func secureSocketDir(dir, socket string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory (a symbolic link?): refusing to put the root-only socket there", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("directory %s belongs to uid %d, not to this daemon's uid %d: refusing to put the root-only socket there", dir, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm() != 0o700 {
		// Only a directory of the socket's own is tightened: chmod of
		// /run or /tmp would break everything else in them.
		if others := otherEntries(dir, socket); others != "" {
			return fmt.Errorf("directory %s has mode %04o and holds other files (%s): the root-only API socket needs a directory of its own, mode 0700 (the default is %s)", dir, fi.Mode().Perm(), others, filepath.Dir(DefaultSocket))
		}
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("tighten %s from %04o to 0700: %w", dir, fi.Mode().Perm(), err)
		}
		slog.Warn("api socket directory was open to others: tightened to 0700", "dir", dir, "was", fmt.Sprintf("%04o", fi.Mode().Perm()))
	}
	return nil
}

// otherEntries names a few entries of dir other than the socket and its
// leftovers, "" when there are none.
func otherEntries(dir, socket string) string {
	f, err := os.Open(dir)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	names, _ := f.Readdirnames(16)
	var others []string
	for _, n := range names {
		if n != socket {
			others = append(others, n)
		}
	}
	if len(others) > 3 {
		others = append(others[:3], "...")
	}
	return strings.Join(others, ", ")
}

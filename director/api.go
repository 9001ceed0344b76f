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
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/affinity/nms"
	"github.com/tunneldirector/tunneldirector/director/replication"
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

// Handler serves the API for a daemon. token, when not empty, is required
// on every request.
func (d *Daemon) Handler(token string) http.Handler {
	mux := http.NewServeMux()
	s := d.svc
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) { reply(d.Status(), nil)(w) })
	mux.HandleFunc("GET /v1/nodes", func(w http.ResponseWriter, r *http.Request) { reply(s.Nodes())(w) })
	mux.HandleFunc("GET /v1/tunnels", func(w http.ResponseWriter, r *http.Request) {
		limit, _ := strconv.Atoi(r.URL.Query().Get("limit"))
		reply(s.Tunnels(r.URL.Query().Get("node"), limit))(w)
	})
	mux.HandleFunc("GET /v1/tunnels/{id}", func(w http.ResponseWriter, r *http.Request) { reply(s.Tunnel(r.PathValue("id")))(w) })
	mux.HandleFunc("GET /v1/lookup/{addr}", func(w http.ResponseWriter, r *http.Request) {
		a, err := netip.ParseAddr(r.PathValue("addr"))
		if err != nil {
			reply[any](nil, fmt.Errorf("lookup %q: not an IP address: %w", r.PathValue("addr"), affinity.ErrInvalid))(w)
			return
		}
		reply(s.Lookup(a.Unmap()))(w)
	})
	mux.HandleFunc("POST /v1/import", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		kind, err := nms.ParseKind(q.Get("kind"))
		if err != nil {
			reply[any](nil, fmt.Errorf("%w: %v", affinity.ErrInvalid, err))(w)
			return
		}
		format := nms.FormatAuto
		if f := q.Get("format"); f != "" && f != "auto" {
			if format, err = nms.ParseFormat(f); err != nil {
				reply[any](nil, fmt.Errorf("%w: %v", affinity.ErrInvalid, err))(w)
				return
			}
		}
		maxRecords, _ := strconv.Atoi(q.Get("max_records"))
		reply(s.Import(r.Body, ImportRequest{Name: q.Get("name"), Kind: kind, Format: format,
			DryRun: q.Get("dry_run") == "1", Replace: q.Get("replace") == "1", MaxRecords: maxRecords}))(w)
	})
	mux.HandleFunc("GET /v1/export", func(w http.ResponseWriter, r *http.Request) {
		kind, err := nms.ParseKind(r.URL.Query().Get("kind"))
		format, ferr := nms.ParseFormat(r.URL.Query().Get("format"))
		if err != nil || ferr != nil {
			reply[any](nil, fmt.Errorf("%w: export: %v", affinity.ErrInvalid, errors.Join(err, ferr)))(w)
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
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil && !errors.Is(err, io.EOF) {
			reply[any](nil, fmt.Errorf("%w: node request: %v", affinity.ErrInvalid, err))(w)
			return
		}
		req.Name, req.Action = r.PathValue("name"), r.PathValue("action")
		reply(s.NodeAction(req))(w)
	})
	mux.HandleFunc("POST /v1/rebalance", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.Atoi(r.URL.Query().Get("max_moves"))
		if err != nil {
			reply[any](nil, fmt.Errorf("%w: rebalance: max_moves %q", affinity.ErrInvalid, r.URL.Query().Get("max_moves")))(w)
			return
		}
		reply(s.Rebalance(n, r.URL.Query().Get("apply") == "1"))(w)
	})
	mux.HandleFunc("POST /v1/store/backup", func(w http.ResponseWriter, r *http.Request) {
		rev, n, err := s.Backup(r.URL.Query().Get("path"))
		reply(map[string]any{"revision": rev, "bytes": n}, err)(w)
	})
	mux.HandleFunc("POST /v1/role/{role}", func(w http.ResponseWriter, r *http.Request) {
		role, err := replication.ParseRole(r.PathValue("role"))
		if err != nil {
			reply[any](nil, fmt.Errorf("%w: role: %v", affinity.ErrInvalid, err))(w)
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
	if token == "" {
		return mux
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(token)) != 1 {
			w.Header().Set("WWW-Authenticate", "Bearer")
			writeJSON(w, http.StatusUnauthorized, apiError{Error: "missing or wrong API token"})
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// reply curries a result and its error into a writer, so handlers read
// reply(s.Nodes())(w).
func reply[T any](v T, err error) func(http.ResponseWriter) {
	return func(w http.ResponseWriter) {
		if err == nil {
			writeJSON(w, http.StatusOK, v)
			return
		}
		e := apiError{Error: err.Error()}
		status := http.StatusInternalServerError
		var be *affinity.BatchError
		var fe *nms.Errors
		switch {
		case errors.Is(err, ErrNotMaster):
			status = http.StatusConflict
		case errors.Is(err, affinity.ErrNotFound):
			status, e.Missing = http.StatusNotFound, true
		case errors.As(err, &be), errors.As(err, &fe), errors.Is(err, affinity.ErrConflict), errors.Is(err, affinity.ErrInvalid), errors.Is(err, affinity.ErrUnknownNode):
			status, e.Refused = http.StatusUnprocessableEntity, true
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
func (d *Daemon) ServeAPI(ctx context.Context, socket, tcpAddr, token string) error {
	if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
		return fmt.Errorf("api socket %s: %w", socket, err)
	}
	// A socket left by a killed daemon would make Listen fail; one
	// still answering belongs to a running daemon.
	if c, err := net.DialTimeout("unix", socket, 200*time.Millisecond); err == nil {
		c.Close()
		return fmt.Errorf("api socket %s: another daemon is listening on it", socket)
	}
	os.Remove(socket)
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("api socket %s: %w", socket, err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("api socket %s: %w", socket, err)
	}
	servers := []*http.Server{{Handler: d.Handler(""), ReadHeaderTimeout: 10 * time.Second}}
	listeners := []net.Listener{ln}
	if tcpAddr != "" {
		if token == "" {
			ln.Close()
			return errors.New("api tcp: a token is required")
		}
		tl, err := net.Listen("tcp", tcpAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("api tcp %s: %w", tcpAddr, err)
		}
		servers = append(servers, &http.Server{Handler: d.Handler(token), ReadHeaderTimeout: 10 * time.Second})
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

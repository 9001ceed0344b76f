package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/tunneldirector/tunneldirector/xfrm"
	"github.com/tunneldirector/tunneldirector/xfrm/report"
)

// Agent reports one node's tunnel facts to its directors.
type Agent struct {
	k    xfrm.Kernel
	post poster
	log  *slog.Logger
	now  func() time.Time

	mu   sync.Mutex // guards core for Status
	core *core
}

// poster sends one encoded report to an endpoint.
type poster interface {
	post(ctx context.Context, endpoint string, body []byte) result
}

// Options are the real agent's wiring beyond Config.
type Options struct {
	// TLS configures https endpoints (nil: Go's defaults, the system's
	// roots).
	TLS *tls.Config
	// Netns selects the network namespace whose XFRM database is read
	// (zero value: the agent's own).
	Kernel xfrm.Options
	Logger *slog.Logger
}

// New returns an agent for the real kernel.
func New(cfg Config, o Options) (*Agent, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	k, err := xfrm.New(o.Kernel)
	if err != nil {
		return nil, err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = o.TLS
	hp := &httpPoster{client: &http.Client{Transport: tr, Timeout: cfg.withDefaults().Timeout}, token: cfg.Token}
	return newAgent(cfg, k, hp, time.Now, o.Logger), nil
}

// newAgent wires an agent from its seams: the kernel, the transport and
// the clock.
func newAgent(cfg Config, k xfrm.Kernel, p poster, now func() time.Time, log *slog.Logger) *Agent {
	if log == nil {
		log = slog.Default()
	}
	c := newCore(cfg, xfrm.NewMirror())
	c.jitter = func(d time.Duration) time.Duration { return d - d/5 + rand.N(2*d/5+1) } // ±20 %
	return &Agent{k: k, post: p, log: log, now: now, core: c}
}

// Status returns the agent's view of its reporting.
func (a *Agent) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.core.status()
}

// Close releases the kernel.
func (a *Agent) Close() error { return a.k.Close() }

// Run watches the kernel and reports until ctx ends. It returns nil then;
// kernel and director failures are retried, never returned.
func (a *Agent) Run(ctx context.Context) error {
	backoff := a.core.cfg.BackoffMin
	for ctx.Err() == nil {
		err := a.session(ctx)
		if ctx.Err() != nil {
			break
		}
		a.log.Warn("agent: kernel watch ended; starting over", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, a.core.cfg.BackoffMax)
	}
	return nil
}

// session runs one kernel subscription: subscribe, read everything, then
// apply events and report until the subscription or ctx ends.
func (a *Agent) session(ctx context.Context) error {
	var inflight sync.WaitGroup
	defer inflight.Wait() // runs after cancel: a POST in flight ends at once
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events, err := a.k.Watch(wctx)
	if err != nil {
		return err
	}
	if err := a.read(); err != nil {
		return err
	}
	results := make(chan result, 1)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	resync := time.NewTicker(a.core.cfg.Resync)
	defer resync.Stop()
	for {
		a.mu.Lock()
		now := a.now()
		rep, wake := a.core.next(now)
		endpoint := a.core.cfg.Endpoints[a.core.endpoint]
		a.mu.Unlock()
		if rep != nil {
			body, err := report.Marshal(rep)
			if err != nil {
				return fmt.Errorf("agent: encode %s report: %w", rep.Kind, err) // a bug: start over
			}
			inflight.Add(1)
			go func() {
				defer inflight.Done()
				results <- a.post.post(wctx, endpoint, body)
			}()
			a.log.Debug("agent: report", "kind", rep.Kind, "seq", rep.Seq, "tunnels", len(rep.Tunnels), "removed", len(rep.Removed), "bytes", len(body), "to", endpoint)
		}
		if !wake.IsZero() {
			timer.Reset(max(wake.Sub(now), 0))
		}
		needRead := false
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				return errors.New("event channel closed")
			}
			needRead = a.apply(ev, events)
		case res := <-results:
			a.mu.Lock()
			kind := a.core.inflight.Kind
			a.core.done(res, a.now())
			st := a.core.status()
			a.mu.Unlock()
			if res.err != nil || res.status != http.StatusOK {
				a.log.Warn("agent: report refused or failed", "kind", kind, "err", st.LastErr, "next endpoint", st.Endpoint)
			}
		case <-timer.C:
		case <-resync.C:
			needRead = true
		}
		if needRead {
			if err := a.read(); err != nil {
				return err
			}
		}
		a.mu.Lock()
		a.core.changed(a.core.mirror.Changed(), a.now())
		a.mu.Unlock()
	}
}

// apply applies an event and every event already queued behind it, so a
// burst costs one pass of the loop. It reports whether a full read is
// needed.
func (a *Agent) apply(ev xfrm.Event, events <-chan xfrm.Event) (needRead bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for {
		if !a.core.mirror.Apply(ev) {
			if !needRead {
				a.log.Info("agent: full read", "reason", ev.Reason)
			}
			needRead = true
		}
		select {
		case next, ok := <-events:
			if !ok {
				return needRead
			}
			ev = next
		default:
			return needRead
		}
	}
}

func (a *Agent) read() error {
	snap, err := a.k.Read()
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.core.mirror.Reset(snap)
	a.mu.Unlock()
	return nil
}

// httpPoster POSTs reports to report.Path on the endpoints.
type httpPoster struct {
	client *http.Client
	token  string
}

func (h *httpPoster) post(ctx context.Context, endpoint string, body []byte) result {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(endpoint, "/")+report.Path, bytes.NewReader(body))
	if err != nil {
		return result{err: err}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+h.token)
	resp, err := h.client.Do(req)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	res := result{status: resp.StatusCode}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(b))
		}
		res.err = fmt.Errorf("%s: HTTP %d: %s", endpoint, resp.StatusCode, e.Error)
		return res
	}
	if err := json.Unmarshal(b, &res.ack); err != nil {
		res.err = fmt.Errorf("%s: undecodable answer %.100q: %w", endpoint, b, err)
		res.status = 0
	}
	return res
}

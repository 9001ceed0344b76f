package director

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/store"
)

// apiDaemon is a daemon with its API on an httptest server, backups under
// a temporary backup_dir and a 1 MiB import limit.
func apiDaemon(t *testing.T) (*Daemon, *httptest.Server, string) {
	d, _, _, cancel := startDaemon(t)
	t.Cleanup(cancel)
	backups := filepath.Join(t.TempDir(), "backups")
	d.cfgMu.Lock()
	c := *d.cfg
	c.BackupDir, c.API.MaxBody = backups, 1<<20
	d.cfg = &c
	d.cfgMu.Unlock()
	srv := httptest.NewServer(d.Handler(""))
	t.Cleanup(srv.Close)
	return d, srv, backups
}

func post(t *testing.T, url, body string) (int, apiError, int) {
	t.Helper()
	resp, err := http.Post(url, "application/octet-stream", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e apiError
	json.Unmarshal(b, &e)
	return resp.StatusCode, e, len(b)
}

// TestAPIRefusesBadRequests: bad parameters are refused input (422, the
// CLI's exit status 2), not server errors (the review saw 500 for an
// unknown node action and max_moves=-5).
func TestAPIRefusesBadRequests(t *testing.T) {
	_, srv, _ := apiDaemon(t)
	tests := []struct {
		name, path, body, want string
		status                 int
	}{
		{"unknown node action", "/v1/nodes/vpn-a/explode", "", "node action \"explode\": unknown", 422},
		{"negative max_moves", "/v1/rebalance?max_moves=-5", "", "max_moves \"-5\": want a whole number", 422},
		{"max_moves not a number", "/v1/rebalance?max_moves=many", "", "max_moves \"many\"", 422},
		{"max_moves missing", "/v1/rebalance", "", "max_moves: required", 422},
		{"bad import kind", "/v1/import?kind=routers", "", "kind \"routers\"", 422},
		{"bad max_records", "/v1/import?max_records=x", "", "max_records \"x\"", 422},
		{"node body with unknown field", "/v1/nodes/vpn-z/add", `{"adress":"10.0.0.1"}`, "unknown field", 422},
		{"negative moves_limit", "/v1/nodes/vpn-a/down?moves_limit=-1", "", "moves_limit \"-1\": want a whole number", 422},
		{"moves_limit in the body", "/v1/nodes/vpn-a/down", `{"moves_limit":3}`, "unknown field", 422},
		{"bad role", "/v1/role/king", "", "role \"king\"", 422},
		{"backup without path", "/v1/store/backup", "", "path: required", 422},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, e, _ := post(t, srv.URL+tc.path, tc.body)
			if status != tc.status || !strings.Contains(e.Error, tc.want) || !e.Refused {
				t.Fatalf("status %d %+v, want %d with %q", status, e, tc.status, tc.want)
			}
		})
	}
	resp, err := http.Get(srv.URL + "/v1/tunnels?limit=-1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 422 {
		t.Errorf("limit=-1: %d", resp.StatusCode)
	}
}

// TestAPIBodyLimits: an import above api.max_body is refused with 413
// after reading about the limit, and the answer stays small; other
// requests are bounded at 64 KiB.
func TestAPIBodyLimits(t *testing.T) {
	_, srv, _ := apiDaemon(t)
	big := "id,peer,subnets\n" + strings.Repeat("t,192.0.2.1,10.0.0.0/24\n", (2<<20)/24)
	status, e, n := post(t, srv.URL+"/v1/import?name=big.csv", big)
	if status != http.StatusRequestEntityTooLarge || !strings.Contains(e.Error, "above api.max_body (1048576 bytes)") || !e.Refused {
		t.Fatalf("2 MiB import: %d %+v", status, e)
	}
	if n > 4096 {
		t.Errorf("answer is %d bytes", n)
	}
	// The review's 20 MB header-only file: under the limit here, so it is
	// read, refused, and answered in a few hundred bytes.
	header := strings.Repeat("x", 900<<10)
	status, e, n = post(t, srv.URL+"/v1/import?name=h.csv", "id,"+header+"\n")
	if status != 422 || n > 4096 {
		t.Errorf("huge header: %d, %d-byte answer: %.200s", status, n, e.Error)
	}
	status, e, _ = post(t, srv.URL+"/v1/nodes/vpn-z/add", `{"comment":"`+strings.Repeat("c", 100<<10)+`"}`)
	if status != http.StatusRequestEntityTooLarge {
		t.Errorf("100 KiB node request: %d %+v", status, e)
	}
}

// TestAPIHeaderLimit: the server refuses header lines beyond 64 KiB.
func TestAPIHeaderLimit(t *testing.T) {
	d, _, _, cancel := startDaemon(t)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "run", "api.sock")
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.ServeAPI(ctx, sock, netip.AddrPort{}, "") }()
	defer func() { stop(); <-done }()
	var c net.Conn
	var err error
	for i := 0; i < 100; i++ {
		if c, err = net.Dial("unix", sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n", strings.Repeat("h", 200<<10))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("200 KiB header: %d", resp.StatusCode)
	}
}

// TestAPIBackupRefusals: backups through the API go under backup_dir and
// never over the live store (the review's backup onto the daemon's own
// file lost every later change at the next restart).
func TestAPIBackupRefusals(t *testing.T) {
	d, srv, backups := apiDaemon(t)
	live := d.st.(*store.Store).Path()
	tests := []struct {
		name, path, want string
		status           int
	}{
		{"the live store", live, "outside backup_dir", 422},
		{"outside backup_dir", "/etc/passwd", "outside backup_dir", 422},
		{"escaping with ..", "../../x.db", "outside backup_dir", 422},
		{"a relative name", "first.db", "", 200},
		{"the same name again", "first.db", "the file exists; overwrite it with --force", 422},
	}
	for _, tc := range tests {
		status, e, _ := post(t, srv.URL+"/v1/store/backup?path="+tc.path, "")
		if status != tc.status || !strings.Contains(e.Error, tc.want) {
			t.Errorf("%s: %d %+v, want %d %q", tc.name, status, e, tc.status, tc.want)
		}
	}
	if status, e, _ := post(t, srv.URL+"/v1/store/backup?force=1&path=first.db", ""); status != 200 {
		t.Errorf("forced: %d %+v", status, e)
	}
	// A link inside backup_dir pointing at the live store.
	os.Symlink(live, filepath.Join(backups, "link.db"))
	if status, e, _ := post(t, srv.URL+"/v1/store/backup?force=1&path=link.db", ""); status != 422 || !strings.Contains(e.Error, "it is the live store itself") {
		t.Errorf("link to the live store: %d %+v", status, e)
	}
	if _, err := os.Stat(filepath.Join(backups, "first.db")); err != nil {
		t.Error(err)
	}
}

// TestAPISocketPlaces: the socket's directory is made root-only or
// refused, and a mistyped socket path never deletes the file it names.
func TestAPISocketPlaces(t *testing.T) {
	d, _, st, cancel := startDaemon(t)
	defer cancel()
	serve := func(sock string) error {
		ctx, stop := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- d.ServeAPI(ctx, sock, netip.AddrPort{}, "") }()
		select {
		case err := <-done:
			stop()
			return err
		case <-time.After(300 * time.Millisecond):
			stop()
			return <-done
		}
	}
	base := t.TempDir()
	open := filepath.Join(base, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if err := serve(filepath.Join(open, "api.sock")); err != nil {
		t.Fatalf("own 0777 directory: %v", err)
	}
	if fi, _ := os.Stat(open); fi.Mode().Perm() != 0o700 {
		t.Errorf("0777 socket directory left at %04o", fi.Mode().Perm())
	}
	shared := filepath.Join(base, "shared")
	os.Mkdir(shared, 0o777)
	os.Chmod(shared, 0o777)
	os.WriteFile(filepath.Join(shared, "other"), nil, 0o600)
	if err := serve(filepath.Join(shared, "api.sock")); err == nil || !strings.Contains(err.Error(), "holds other files") {
		t.Errorf("shared 0777 directory: %v", err)
	}
	if fi, _ := os.Stat(shared); fi.Mode().Perm() != 0o777 {
		t.Errorf("a shared directory was changed to %04o", fi.Mode().Perm())
	}
	if err := serve(st.Path()); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Errorf("socket path naming the store: %v", err)
	}
	if _, err := os.Stat(st.Path()); err != nil {
		t.Fatalf("the store is gone: %v", err)
	}
}

// TestImportSendsFileSize: the client sends a file's size as the
// Content-Length (the daemon sizes its indexes from it); a stream of
// unknown length goes chunked, and the body the API reads tells its size
// only when it is known and within the limit.
func TestImportSendsFileSize(t *testing.T) {
	var got []int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.ContentLength)
		io.Copy(io.Discard, r.Body)
		w.Write([]byte(`{"diff":{}}`))
	}))
	defer srv.Close()
	c := NewTCPClient(strings.TrimPrefix(srv.URL, "http://"), "")
	path := filepath.Join(t.TempDir(), "t.csv")
	content := "id,peer,subnets\nsite-1,192.0.2.1,10.1.0.0/24\n"
	os.WriteFile(path, []byte(content), 0o600)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := c.Import(f, ImportRequest{Name: "t.csv", Progress: func(int64) {}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Import(io.MultiReader(strings.NewReader(content)), ImportRequest{Name: "t.csv"}); err != nil {
		t.Fatal(err)
	}
	// A file read from already (standard input from a file): what is left.
	f.Seek(5, io.SeekStart)
	if _, err := c.Import(f, ImportRequest{Name: "t.csv"}); err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got[0] != int64(len(content)) || got[1] != -1 || got[2] != int64(len(content)-5) {
		t.Fatalf("Content-Length sent: %v, want [%d -1 %d]", got, len(content), len(content)-5)
	}
	for _, c := range []struct{ size, limit, want int64 }{{100, 1000, 100}, {-1, 1000, -1}, {0, 1000, -1}, {2000, 1000, -1}} {
		if b := (&bodyLimit{size: c.size, limit: c.limit}); b.Size() != c.want {
			t.Errorf("body of %d bytes, limit %d: Size %d, want %d", c.size, c.limit, b.Size(), c.want)
		}
	}
}

// TestNodeActionMovesLimit: a node down's result lists at most
// moves_limit moves (a query parameter, which a daemon from before it
// ignores) and counts the rest; without a limit it lists all.
func TestNodeActionMovesLimit(t *testing.T) {
	d, srv, _ := apiDaemon(t)
	var b strings.Builder
	b.WriteString("id,peer,subnets\n")
	for i := range 60 {
		fmt.Fprintf(&b, "t%d,100.64.0.%d,10.%d.0.0/24\n", i, i+1, i)
	}
	if _, err := d.Service().Import(strings.NewReader(b.String()), ImportRequest{Name: "t.csv"}); err != nil {
		t.Fatal(err)
	}
	counts := d.st.Table().Counts()
	down := func(node, query string) NodeResult {
		t.Helper()
		resp, err := http.Post(srv.URL+"/v1/nodes/"+node+"/down"+query, "application/json", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var res NodeResult
		if err := json.NewDecoder(resp.Body).Decode(&res); err != nil || resp.StatusCode != 200 {
			t.Fatalf("node %s down: %d %v", node, resp.StatusCode, err)
		}
		return res
	}
	if res := down("vpn-a", "?moves_limit=3"); len(res.Plan.Moves) != 3 || res.MovesOmitted != counts["vpn-a"]-3 {
		t.Fatalf("moves_limit 3: %d moves listed, %d omitted; vpn-a had %d tunnels", len(res.Plan.Moves), res.MovesOmitted, counts["vpn-a"])
	}
	nb := d.st.Table().Counts()["vpn-b"]
	if res := down("vpn-b", ""); nb == 0 || len(res.Plan.Moves) != nb || res.MovesOmitted != 0 {
		t.Fatalf("no limit: %d moves listed, %d omitted; vpn-b had %d tunnels", len(res.Plan.Moves), res.MovesOmitted, nb)
	}
	// The CLI's client sends the limit it is given.
	c := &Client{http: srv.Client(), base: srv.URL}
	if _, err := c.NodeAction(NodeRequest{Action: "up", Name: "vpn-a"}); err != nil {
		t.Fatal(err)
	}
	res, err := c.NodeAction(NodeRequest{Action: "down", Name: "vpn-c", MovesLimit: 1})
	if err != nil || len(res.Plan.Moves) != 1 || res.MovesOmitted == 0 {
		t.Fatalf("through the client, limit 1: %+v %v", res, err)
	}
}

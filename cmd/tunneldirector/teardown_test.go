package main

import (
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tunneldirector/tunneldirector/store"
)

// teardownConfig writes a configuration whose store and API socket live in
// a temporary directory.
func teardownConfig(t *testing.T) (cfg, db, sock string) {
	t.Helper()
	dir := t.TempDir()
	db, sock = filepath.Join(dir, "td.db"), filepath.Join(dir, "api.sock")
	cfg = filepath.Join(dir, "config.yaml")
	y := "store: " + db + "\nvips: [198.51.100.10]\napi:\n  socket: " + sock + "\n"
	if err := os.WriteFile(cfg, []byte(y), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg, db, sock
}

// Teardown must refuse while a daemon owns the kernel objects. These cases
// never reach the kernel: each is refused before the dataplane opens.
func TestTeardownRefusedWhileADaemonRuns(t *testing.T) {
	t.Run("store locked", func(t *testing.T) {
		cfg, db, _ := teardownConfig(t)
		st, err := store.Open(store.Options{Path: db})
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		_, err = runArgs(t, "teardown", "--config", cfg)
		if err == nil || !strings.Contains(err.Error(), "teardown refused") || !strings.Contains(err.Error(), "locked") || !strings.Contains(err.Error(), "--force") {
			t.Fatalf("teardown with the store locked: %v", err)
		}
	})
	t.Run("API answers", func(t *testing.T) {
		cfg, _, sock := teardownConfig(t)
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			json.NewEncoder(w).Encode(map[string]any{"mode": "ipvs", "revision": 42})
		})}
		go srv.Serve(l)
		defer srv.Close()
		_, err = runArgs(t, "teardown", "--config", cfg)
		if err == nil || !strings.Contains(err.Error(), "answers on "+sock) || !strings.Contains(err.Error(), "revision 42") {
			t.Fatalf("teardown with a daemon answering: %v", err)
		}
	})
}

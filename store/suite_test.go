package store_test

import (
	"path/filepath"
	"testing"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/store"
	"github.com/tunneldirector/tunneldirector/store/storetest"
)

// TestBackendSuite runs the suite every store.Backend passes on bbolt.
func TestBackendSuite(t *testing.T) {
	storetest.Run(t, storetest.Backend{
		New: func(t *testing.T) func(*testing.T, affinity.Options) store.Backend {
			path := filepath.Join(t.TempDir(), "td.db")
			return func(t *testing.T, o affinity.Options) store.Backend {
				s, err := store.Open(store.Options{Path: path, Table: o})
				if err != nil {
					t.Fatal(err)
				}
				return s
			}
		},
	})
}

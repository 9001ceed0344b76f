package replication

import (
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// TestUDPLoopback runs two replicators on 127.0.0.1 with real sockets and
// real time.
func TestUDPLoopback(t *testing.T) {
	dir := t.TempDir()
	s0 := openStore(t, filepath.Join(dir, "a.db"), 0)
	s1 := openStore(t, filepath.Join(dir, "b.db"), 0)
	o := newOps(21)
	commit(s0, o.init())
	for range 50 {
		commit(s0, o.batch(s0.Table())) // before start: the backup needs a snapshot
	}
	r0, r1, stop := udpPair(t, s0, s1, nil)
	defer stop()
	for range 200 {
		commit(s0, o.batch(s0.Table()))
	}
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if reflect.DeepEqual(s0.Table().Snapshot(), s1.Table().Snapshot()) && r1.Ready() {
			st := r1.Status()
			t.Logf("backup over UDP: revision %d, %d tunnels, %s, counters %+v", st.Revision, s1.Table().Len(), st.State, st.Counters)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no convergence over UDP: master %+v\nbackup %+v", r0.Status(), r1.Status())
}

package replication

import (
	"context"
	"net/netip"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// TestUDPLoopback runs two replicators on 127.0.0.1 with real sockets and
// real time.
func TestUDPLoopback(t *testing.T) {
	lo := netip.MustParseAddrPort("127.0.0.1:0")
	u0, err := ListenUDP(UDPConfig{Local: lo, Peer: netip.MustParseAddrPort("127.0.0.1:9")})
	if err != nil {
		t.Fatal(err)
	}
	u1, err := ListenUDP(UDPConfig{Local: lo, Peer: u0.LocalAddr()})
	if err != nil {
		t.Fatal(err)
	}
	u0.SetPeer(u1.LocalAddr())
	defer u0.Close()
	defer u1.Close()
	dir := t.TempDir()
	s0 := openStore(t, filepath.Join(dir, "a.db"), 0)
	s1 := openStore(t, filepath.Join(dir, "b.db"), 0)
	o := newOps(21)
	commit(s0, o.init())
	for range 50 {
		commit(s0, o.batch(s0.Table())) // before start: the backup needs a snapshot
	}
	r0, err := New(Config{ID: 1, Key: testKey, Store: s0, Transport: u0})
	if err != nil {
		t.Fatal(err)
	}
	r1, err := New(Config{ID: 2, Key: testKey, Store: s1, Transport: u1})
	if err != nil {
		t.Fatal(err)
	}
	r0.SetRole(RoleMaster)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	for _, r := range []*Replicator{r0, r1} {
		go func() { r.Run(ctx); done <- struct{}{} }()
	}
	defer func() { cancel(); <-done; <-done }()
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

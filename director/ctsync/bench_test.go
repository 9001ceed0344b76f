package ctsync

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
	"github.com/tunneldirector/tunneldirector/store"
)

// BenchmarkStream100k streams 100,000 new flows from a master's syncer to
// a backup's over two replicators on UDP loopback (real sockets, real
// time), until the backup's cache holds them all: the replication and
// cache part of the side-by-side measurement, without the kernel.
//
//	go test -run '^$' -bench Stream100k -benchtime 3x ./director/ctsync/
func BenchmarkStream100k(b *testing.B) {
	const n = 100_000
	flows := make([]conntrack.Event, n)
	for i := range flows {
		f := flowN(i)
		f.Orig.Src = netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}).As16()
		f.Reply = f.Orig.Inverse()
		flows[i] = conntrack.Event{Type: conntrack.EventNew, Flow: f}
	}
	for b.Loop() {
		b.StopTimer()
		dir := b.TempDir()
		var syncers [2]*Syncer
		var reps [2]*replication.Replicator
		u0, err := replication.ListenUDP(replication.UDPConfig{Local: netip.MustParseAddrPort("127.0.0.1:0"), Peer: netip.MustParseAddrPort("127.0.0.1:9")})
		if err != nil {
			b.Fatal(err)
		}
		u1, err := replication.ListenUDP(replication.UDPConfig{Local: netip.MustParseAddrPort("127.0.0.1:0"), Peer: u0.LocalAddr()})
		if err != nil {
			b.Fatal(err)
		}
		u0.SetPeer(u1.LocalAddr())
		ctx, cancel := context.WithCancel(context.Background())
		for i, u := range []*replication.UDP{u0, u1} {
			st, err := store.Open(store.Options{Path: filepath.Join(dir, fmt.Sprint(i)), Table: affinity.Options{}})
			if err != nil {
				b.Fatal(err)
			}
			syncers[i] = New(Options{Config: DefaultConfig(), Table: newFakeTable(), Scope: testScope})
			r, err := replication.New(replication.Config{ID: uint32(i + 1), Key: testKey, Store: st, Transport: u, CT: syncers[i]})
			if err != nil {
				b.Fatal(err)
			}
			syncers[i].Attach(r)
			reps[i] = r
			go r.Run(ctx)
			go syncers[i].Run(ctx)
			defer st.Close()
			defer u.Close()
		}
		reps[0].SetRole(replication.RoleMaster)
		syncers[0].SetRole(ctx, replication.RoleMaster)
		for syncers[1].Status().ResyncsReceived == 0 {
			time.Sleep(time.Millisecond)
		}
		b.StartTimer()
		start := time.Now()
		var buf []byte
		for i := range flows {
			syncers[0].handleEvent(&flows[i], &buf)
		}
		pushed := time.Since(start)
		var half time.Duration
		for syncers[1].cache.Len() < n {
			if half == 0 && syncers[1].cache.Len() >= n/2 {
				half = time.Since(start)
			}
			time.Sleep(time.Millisecond)
		}
		b.Logf("pushed in %s, half cached at %s", pushed, half)
		b.ReportMetric(time.Since(start).Seconds(), "s/100k")
		b.StopTimer()
		b.Logf("master stream %+v; backup stream %+v", syncers[0].Status().Stream, syncers[1].Status().Stream)
		cancel()
		b.StartTimer()
	}
}

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// ctFlows returns n established TCP flows from the target server into
// the protected subnet 10.80.0.0/16, numbered from first.
func ctFlows(server netip.Addr, first, n int) []conntrack.Flow {
	fs := make([]conntrack.Flow, n)
	for i := range fs {
		id := first + i
		f := &fs[i]
		f.Orig = conntrack.MakeTuple(conntrack.ProtoTCP, server, netip.AddrFrom4([4]byte{10, 80, byte(id >> 8), byte(id)}), uint16(1024+id%60000), 22)
		f.Reply = f.Orig.Inverse()
		f.Status = conntrack.StatusSeenReply | conntrack.StatusAssured | conntrack.StatusConfirmed
		f.TCP = conntrack.TCPInfo{Set: true, State: conntrack.TCPEstablished, FlagsOrig: 3, FlagsReply: 3}
		f.Timeout = 432000
	}
	return fs
}

// kernelOf opens a director's conntrack table.
func kernelOf(t *testing.T, h *netlab.Host) *conntrack.Kernel {
	t.Helper()
	k, err := conntrack.Open(h.NsHandle())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.Close() })
	return k
}

// cachedFlows lists a daemon's conntrack cache.
func cachedFlows(t *testing.T, d *pairDirector) map[string]bool {
	t.Helper()
	out, err := d.cli(t, "--json", "ctl", "conntrack", "show", "--limit", "0")
	if err != nil {
		t.Fatalf("ctl conntrack show: %v", err)
	}
	var fs []struct{ Flow string }
	if err := json.Unmarshal([]byte(out), &fs); err != nil {
		t.Fatal(err)
	}
	m := map[string]bool{}
	for _, f := range fs {
		m[f.Flow] = true
	}
	return m
}

// TestConntrackPairLoss runs the real pair with the sync link losing 0,
// 10 and 30 % of its packets both ways: flows created in the master's
// kernel reach the backup's cache, destroyed ones leave it, and the
// counts are equal after recovery (the conntrack stream's counterpart of
// the table stream's loss tests).
func TestConntrackPairLoss(t *testing.T) {
	netlab.RequireRoot(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 2, Nodes: 1})
	dir := t.TempDir()
	ds := startPair(t, top, dir, "master", "backup")
	waitPairAPI(t, ds)
	csv := filepath.Join(dir, "t.csv")
	os.WriteFile(csv, []byte("id,peer,subnets,node\nsite-1,192.0.2.200,10.80.0.0/16,node0\n"), 0o600)
	if out, err := ds[0].cli(t, "import", csv); err != nil {
		t.Fatalf("import: %v %s", err, out)
	}
	waitPair(t, ds, "the backup at the master's revision", 10*time.Second, func() bool { return ds[1].status(t).Revision == ds[0].status(t).Revision })
	cached := func() int {
		if c := ds[1].status(t).Conntrack; c != nil {
			return c.Cached
		}
		return -1
	}
	k := kernelOf(t, top.Directors[0])
	server := top.Target.If(netlab.IfTarget).Addr4
	n := 20_000
	if testing.Short() {
		n = 5_000
	}
	ctx := context.Background()
	for round, loss := range []int{0, 10, 30} {
		for _, d := range top.Directors {
			if err := d.SetLoss(netlab.IfSync, loss); err != nil {
				t.Fatal(err)
			}
		}
		base := cached()
		fs := ctFlows(server, round*n, n)
		start := time.Now()
		if res, err := k.Commit(ctx, fs, conntrack.CommitOptions{}); err != nil || res.Failed != 0 {
			t.Fatalf("create flows on the master: %+v %v", res, err)
		}
		waitPair(t, ds, fmt.Sprintf("%d new flows in the backup's cache at %d%% loss", n, loss), 60*time.Second, func() bool { return cached() == base+n })
		took := time.Since(start)
		if _, err := k.Delete(ctx, fs[:n/2]); err != nil {
			t.Fatal(err)
		}
		waitPair(t, ds, fmt.Sprintf("%d destroyed flows gone from the cache at %d%% loss", n/2, loss), 60*time.Second, func() bool { return cached() == base+n/2 })
		m, b := ds[0].status(t).Conntrack, ds[1].status(t).Conntrack
		t.Logf("loss %d%%: %d flows cached %s after they were created; master sent %d records in %d datagrams, resent %d; backup: %d received, %d NACKs, %d lost",
			loss, n, took.Round(time.Millisecond), m.Sent, m.Stream.DatagramsSent, m.Stream.Resent, b.Received, b.Stream.Nacks, b.Stream.Lost)
		if loss > 0 && m.Stream.Resent == 0 {
			t.Errorf("nothing resent at %d%% loss", loss)
		}
	}
	// Equal by content, not only by count.
	want := map[string]bool{}
	for round := range 3 {
		for _, f := range ctFlows(server, round*n+n/2, n/2) {
			want[f.Orig.String()] = true
		}
	}
	got := map[string]bool{}
	for g := range cachedFlows(t, ds[1]) {
		tuple, _, _ := strings.Cut(g, " established")
		got[tuple] = true
	}
	if len(got) != len(want) {
		t.Fatalf("the backup caches %d flows, want %d", len(got), len(want))
	}
	for w := range want {
		if !got[w] {
			t.Fatalf("the backup's cache lacks %s", w)
		}
	}
}

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// TestSplitBrain runs two real daemons with real keepalived, cuts the
// sync link and the VRRP link so that both become master, writes on both
// (a tunnel each, and the same tunnel differently), creates flows in both
// kernels, and heals the links: keepalived makes the lower-priority
// director backup again, the master pulls its table and merges it
// (deterministically, with a conflict report naming the tunnel both
// changed and the winner), both tables and kernels end equal, and the
// backup's conntrack cache ends holding exactly the master's flows.
func TestSplitBrain(t *testing.T) {
	netlab.RequireRoot(t)
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 2, Nodes: 2})
	dir := t.TempDir()
	ds := startPair(t, top, dir, "backup", "backup")
	waitPairAPI(t, ds)
	startKeepalived(t, ds[0], dir, 0, 150)
	startKeepalived(t, ds[1], dir, 1, 100)
	waitPair(t, ds, "director 0 master", 20*time.Second, func() bool { return ds[0].role(t) == "master" && ds[1].role(t) == "backup" })
	importOn := func(d *pairDirector, csv string) {
		t.Helper()
		f := filepath.Join(dir, fmt.Sprintf("import-%d.csv", time.Now().UnixNano()))
		os.WriteFile(f, []byte("id,peer,subnets,node,comment\n"+csv), 0o600)
		if out, err := d.cli(t, "import", f); err != nil {
			t.Fatalf("import on %s: %v %s", d.host.Name, err, out)
		}
	}
	importOn(ds[0], "base,192.0.2.200,10.80.0.0/16,node0,\nshared,192.0.2.201,10.81.0.0/24,node0,before\n")
	waitPair(t, ds, "the backup in sync", 10*time.Second, func() bool { return ds[1].status(t).Revision == ds[0].status(t).Revision })

	server := top.Target.If(netlab.IfTarget).Addr4
	ctx := context.Background()
	k0, k1 := kernelOf(t, top.Directors[0]), kernelOf(t, top.Directors[1])
	before := ctFlows(server, 0, 500)
	if _, err := k0.Commit(ctx, before, conntrack.CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPair(t, ds, "the backup caching the master's flows", 10*time.Second, func() bool { return ds[1].status(t).Conntrack.Cached == 500 })

	// Cut the sync link and the VRRP link (the outside segment): both
	// directors become master.
	for _, ifname := range []string{netlab.IfSync, netlab.IfOutside} {
		if err := top.Directors[1].SetLoss(ifname, 100); err != nil {
			t.Fatal(err)
		}
	}
	waitPair(t, ds, "both directors master", 20*time.Second, func() bool { return ds[0].role(t) == "master" && ds[1].role(t) == "master" })
	if c := ds[1].status(t).Conntrack; c.LastCommit == nil || c.LastCommit.Entries != 500 {
		t.Fatalf("director 1 becoming master committed %+v, want the 500 cached flows", c.LastCommit)
	}
	importOn(ds[0], "only-a,192.0.2.210,10.82.0.0/24,node0,\nshared,192.0.2.201,10.81.0.0/24,node0,written on a\n")
	importOn(ds[1], "only-b,192.0.2.211,10.83.0.0/24,node1,\nshared,192.0.2.201,10.81.0.0/24,node1,written on b\n")
	during0, during1 := ctFlows(server, 1000, 300), ctFlows(server, 2000, 300)
	if _, err := k0.Commit(ctx, during0, conntrack.CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := k1.Commit(ctx, during1, conntrack.CommitOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)

	// Heal: keepalived hears the higher priority again and makes
	// director 1 backup; replication merges.
	for _, ifname := range []string{netlab.IfSync, netlab.IfOutside} {
		if err := top.Directors[1].SetLoss(ifname, 0); err != nil {
			t.Fatal(err)
		}
	}
	waitPair(t, ds, "director 1 backup again", 20*time.Second, func() bool { return ds[1].role(t) == "backup" })
	waitPair(t, ds, "the merge, and the backup in sync with it", 30*time.Second, func() bool {
		s0, s1 := ds[0].status(t), ds[1].status(t)
		return s0.Replication.Counters.Merges > 0 && s1.Revision == s0.Revision && s1.KernelRevision == s0.Revision && s0.KernelRevision == s0.Revision
	})
	out, err := ds[0].cli(t, "--json", "ctl", "conflicts")
	if err != nil {
		t.Fatal(err)
	}
	var reps []replication.MergeReport
	if err := json.Unmarshal([]byte(out), &reps); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range reps {
		for _, c := range r.Conflicts {
			if c.Kind == "tunnel" && c.Key == "shared" && c.Winner != "" && c.Why != "" {
				found = true
				t.Logf("conflict on %s: %s wins: %s", c.Key, c.Winner, c.Why)
			}
		}
	}
	if !found {
		t.Fatalf("no conflict report for the tunnel both wrote: %s", out)
	}
	text, _ := ds[0].cli(t, "ctl", "conflicts")
	if !strings.Contains(text, "tunnel shared:") {
		t.Fatalf("ctl conflicts does not name the tunnel:\n%s", text)
	}
	// Both tables hold both sides' tunnels and the same winner; both
	// kernels are programmed alike.
	for _, d := range ds {
		for _, id := range []string{"base", "only-a", "only-b", "shared"} {
			if _, err := d.cli(t, "show", "tunnel", id); err != nil {
				t.Fatalf("%s lacks %s after the merge: %v", d.host.Name, id, err)
			}
		}
	}
	s0, _ := ds[0].cli(t, "--json", "show", "tunnel", "shared")
	s1, _ := ds[1].cli(t, "--json", "show", "tunnel", "shared")
	if s0 != s1 {
		t.Fatalf("the merged tunnel differs:\n%s\n%s", s0, s1)
	}
	mp, ms := ds[0].kernelMaps(t)
	bp, bs := ds[1].kernelMaps(t)
	if len(mp) != 4 || !maps.Equal(mp, bp) || !maps.Equal(ms, bs) {
		t.Fatalf("kernels differ after the merge: %v %v / %v %v", mp, ms, bp, bs)
	}
	// The backup's cache ends with exactly the master's flows: its own
	// flows of the split are not there, and their kernel timers run out.
	want := map[string]bool{}
	for _, f := range append(before, during0...) {
		want[f.Orig.String()] = true
	}
	waitPair(t, ds, "the backup's conntrack cache reconciled with the master's flows", 20*time.Second, func() bool {
		got := map[string]bool{}
		for g := range cachedFlows(t, ds[1]) {
			tuple, _, _ := strings.Cut(g, " established")
			got[tuple] = true
		}
		return maps.Equal(got, want)
	})
	purged := 0
	k1.Dump(ctx, func(f *conntrack.Flow) error {
		if f.Orig.DstAddr().As4()[1] == 80 && f.Timeout <= 60 {
			purged++
		}
		return nil
	})
	if purged < 300 {
		t.Fatalf("director 1 going back to backup left %d synced entries to run out, want its 800", purged)
	}
}

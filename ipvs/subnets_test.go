package ipvs

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// TestNSSubnetLengths programs protected subnets of several prefix lengths
// in both families (one exact-match map and rule per length) and checks
// with real packets that return traffic reaches each owner, also after an
// Update removes the last subnet of a length and opens new ones (adding
// and deleting those lengths' rules alone, the other rules untouched), and
// after a length's rule and map are deleted behind the director's back.
func TestNSSubnetLengths(t *testing.T) {
	l := newLab(t, Config{})
	ctx := context.Background()
	P := netip.MustParsePrefix
	l.des.Subnets = map[netip.Prefix]uint16{
		P("10.30.0.0/24"):         1,
		P("10.31.0.32/27"):        2,
		P("10.32.0.4/30"):         3,
		P("2001:db8:bb00::/48"):   1,
		P("2001:db8:cc00:1::/64"): 2,
		P("2001:db8:cc00:2::/64"): 3,
	}
	if _, err := l.dp.Sync(ctx, l.des); err != nil {
		t.Fatal(err)
	}
	tg := l.top.Target
	n := 0
	// check sends one return packet to each address and expects it at the
	// node of mark want (0: at no node).
	check := func(round string, cases map[string]uint16) {
		t.Helper()
		for dst, want := range cases {
			a := netip.MustParseAddr(dst)
			n++
			tag := fmt.Sprintf("%s-len-%d", round, n)
			src := tg.If(netlab.IfTarget).Addr(a.Is6())
			if err := tg.SendUDP(netip.AddrPortFrom(src, 40000), netip.AddrPortFrom(a, 8080), []byte(tag)); err != nil {
				t.Fatal(err)
			}
			if want > 0 {
				l.expectAt(t, int(want-1), tag)
				continue
			}
			time.Sleep(200 * time.Millisecond)
			for i, c := range l.caps {
				if c.Count(netlab.Tagged(tag)) > 0 {
					t.Fatalf("%s: packet to %s (no subnet) reached %s", round, a, l.top.Nodes[i].Name)
				}
			}
		}
	}
	check("r1", map[string]uint16{
		"10.30.0.1": 1, "10.30.0.254": 1, "10.31.0.33": 2, "10.31.0.62": 2, "10.32.0.5": 3, "10.32.0.7": 3,
		"2001:db8:bb00:ffff::1": 1, "2001:db8:cc00:1::9": 2, "2001:db8:cc00:2::9": 3,
		"10.31.0.64": 0, "10.32.0.8": 0,
	})
	list := func() string {
		out, err := l.dir.Run(ctx, "nft", "list", "table", "inet", "tunneldirector")
		if err != nil {
			netlab.RequireTool(t, "nft binary (scripts/lab-deps.sh)", err)
		}
		return string(out)
	}
	out := list()
	for _, want := range []string{"map sub4_24", "map sub4_27", "map sub4_30", "map sub6_48", "map sub6_64",
		"10.32.0.4 : 0x7d000003", "2001:db8:cc00:2:: : 0x7d000003"} {
		if !strings.Contains(out, want) {
			t.Errorf("nft list table lacks %q:\n%s", want, out)
		}
	}

	// handles lists the classifier's rules by handle, each with its line;
	// the chain's last rule under "last".
	handles := func() map[string]string {
		out, err := l.dir.Run(ctx, "nft", "-a", "list", "chain", "inet", "tunneldirector", "prerouting")
		if err != nil {
			t.Fatalf("nft -a list chain: %v: %s", err, out)
		}
		hs := map[string]string{}
		for _, line := range strings.Split(string(out), "\n") {
			if i := strings.LastIndex(line, "# handle "); i >= 0 {
				hs[line[i+len("# handle "):]] = line
				hs["last"] = line
			}
		}
		return hs
	}
	// lastIsCtCopy checks that the chain ends with the copy of a new
	// flow's mark to its ct mark: packets a rule accepts do not reach it.
	lastIsCtCopy := func(hs map[string]string) {
		t.Helper()
		for h, line := range hs {
			if h != "last" && strings.Contains(line, "ct mark set meta mark") != (line == hs["last"]) {
				t.Fatalf("rule %s, the last: %v: %s", h, line == hs["last"], line)
			}
		}
	}
	before := handles()
	lastIsCtCopy(before)

	// The last /30 and the last /64s go, /28 and /60 appear, the /24 moves:
	// one transaction.
	delta := &Delta{
		DeleteSubnets: []netip.Prefix{P("10.32.0.4/30"), P("2001:db8:cc00:1::/64"), P("2001:db8:cc00:2::/64")},
		SetSubnets: map[netip.Prefix]uint16{
			P("10.33.0.16/28"):      3,
			P("2001:db8:dd00::/60"): 3,
			P("10.30.0.0/24"):       2,
		},
	}
	st, err := l.dp.Update(ctx, delta)
	if err != nil {
		t.Fatal(err)
	}
	if st.Added != 2 || st.Changed != 1 || st.Removed != 3 {
		t.Fatalf("update stats %+v, want +2 ~1 -3", st)
	}
	check("r2", map[string]uint16{
		"10.30.0.1": 2, "10.31.0.33": 2, "10.33.0.17": 3, "10.33.0.30": 3,
		"2001:db8:bb00::1": 1, "2001:db8:dd00:f::1": 3,
		"10.32.0.5": 0, "2001:db8:cc00:1::9": 0, "10.33.0.32": 0,
	})
	out = list()
	for _, gone := range []string{"sub4_30", "sub6_64"} {
		if strings.Contains(out, gone) {
			t.Errorf("map %s still present after its last subnet went:\n%s", gone, out)
		}
	}
	if !strings.Contains(out, "map sub4_28") || !strings.Contains(out, "map sub6_60") {
		t.Errorf("new length maps missing:\n%s", out)
	}
	// The chain was not rebuilt (a rebuild binds every rule to its map
	// again, which walks every element): every rule but the gone lengths'
	// kept its handle, and the new lengths have a rule each.
	after := handles()
	for h, line := range before {
		if h == "last" {
			continue
		}
		gone := strings.Contains(line, "@sub4_30") || strings.Contains(line, "@sub6_64")
		if _, kept := after[h]; kept == gone {
			t.Errorf("rule %s (gone length: %v) kept: %v\nbefore: %v\nafter: %v", h, gone, kept, before, after)
		}
	}
	lastIsCtCopy(after)
	if len(after) != len(before) {
		t.Errorf("%d rules after the update, want %d (2 lengths gone, 2 new): %v", len(after), len(before), after)
	}
	if st, err := verifySettled(ctx, l.dp); err != nil || st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("verify after update: %+v, %v", st, err)
	}
	// A Sync of the same table as the Updates built changes nothing.
	delete(l.des.Subnets, P("10.32.0.4/30"))
	delete(l.des.Subnets, P("2001:db8:cc00:1::/64"))
	delete(l.des.Subnets, P("2001:db8:cc00:2::/64"))
	for p, m := range delta.SetSubnets {
		l.des.Subnets[p] = m
	}
	if st, err := l.dp.Sync(ctx, l.des); err != nil || st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("sync after update: %+v, %v", st, err)
	}

	// Drift: a length's rule (the whole chain) and map deleted.
	if _, err := l.dir.Run(ctx, "nft", "flush", "chain", "inet", "tunneldirector", "prerouting"); err != nil {
		t.Fatal(err)
	}
	if out, err := l.dir.Run(ctx, "nft", "delete", "map", "inet", "tunneldirector", "sub4_28"); err != nil {
		t.Fatalf("delete map: %v: %s", err, out)
	}
	st, err = verifySettled(ctx, l.dp)
	if err != nil || st.Added < 1 || st.Changed < 1 {
		t.Fatalf("verify after deleting a length's map: %+v, %v", st, err)
	}
	t.Logf("map and chain deleted: verify repaired %+v", st)
	lastIsCtCopy(handles())
	if st, err := verifySettled(ctx, l.dp); err != nil || st.Added+st.Changed+st.Removed != 0 {
		t.Fatalf("second verify: %+v, %v", st, err)
	}
	check("r3", map[string]uint16{"10.33.0.17": 3, "10.30.0.1": 2, "2001:db8:dd00::1": 3, "2001:db8:bb00::1": 1})

	// Read returns the subnets with their lengths.
	got, err := l.dp.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got.Subnets) != fmt.Sprint(l.des.Subnets) {
		t.Fatalf("read back subnets %v, want %v", got.Subnets, l.des.Subnets)
	}
}

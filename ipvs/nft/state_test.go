package nft

import (
	"fmt"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
)

func TestLenNamesAndMasks(t *testing.T) {
	for _, l := range []Len{{false, 0}, {false, 27}, {false, 32}, {true, 48}, {true, 64}, {true, 128}} {
		got, ok := parseLen(l.SetName())
		if !ok || got != l {
			t.Fatalf("parseLen(%q) = %v %v", l.SetName(), got, ok)
		}
	}
	for _, bad := range []string{"sub4_33", "sub6_129", "sub5_8", "sub4_08", "sub4_8x", "subnets4", "peers4"} {
		if l, ok := parseLen(bad); ok {
			t.Fatalf("parseLen(%q) accepted: %v", bad, l)
		}
	}
	if m := prefixMask(Len{false, 27}); fmt.Sprint(m) != "[255 255 255 224]" {
		t.Fatalf("mask /27 %v", m)
	}
	if m := prefixMask(Len{true, 52}); fmt.Sprintf("%x", m) != "fffffffffffff0000000000000000000" {
		t.Fatalf("mask /52 %x", m)
	}
}

func rulesWith(tags ...string) []*nftables.Rule {
	var out []*nftables.Rule
	for _, tg := range tags {
		out = append(out, &nftables.Rule{UserData: userdata.AppendString(nil, userdata.TypeComment, tg)})
	}
	return out
}

// TestChainSignature reads the typed signature back from rule comments and
// refuses every chain that is not wholly one signature's.
func TestChainSignature(t *testing.T) {
	sig := Signature{Version: Layout, IKEBit: 0x1000, Seed: 7, HashN: 3, MarkBase: 0x7d000000, RangeMask: 0xff000000, LogGroup: 9,
		Lens: []Len{{false, 27}, {true, 64}}}
	other := sig
	other.Seed = 8
	tag := func(s Signature, i, n int) string { return ruleTag{Sig: s, I: i, N: n}.encode() }
	if got := chainSignature(rulesWith(tag(sig, 0, 2), tag(sig, 1, 2))); !got.Equal(sig) {
		t.Fatalf("read back %+v, want %+v", got, sig)
	}
	for name, rules := range map[string][]*nftables.Rule{
		"a rule missing":       rulesWith(tag(sig, 0, 3), tag(sig, 1, 3)),
		"two signatures":       rulesWith(tag(sig, 0, 2), tag(other, 1, 2)),
		"a rule twice":         rulesWith(tag(sig, 0, 2), tag(sig, 0, 2)),
		"a foreign rule":       append(rulesWith(tag(sig, 0, 2), tag(sig, 1, 2)), &nftables.Rule{}),
		"an older layout":      rulesWith(`td3 mode=ipvs seed=0x7 n=3|0|1`),
		"not this layout":      rulesWith(tag(Signature{Version: Layout + 1}, 0, 1)),
		"index outside n":      rulesWith(tag(sig, 1, 1)),
		"comment not json":     rulesWith("{"),
		"no rule, no chain ok": nil,
	} {
		if got := chainSignature(rules); got.Version != 0 {
			t.Errorf("%s: accepted %+v", name, got)
		}
	}
}

func FuzzDecodeTag(f *testing.F) {
	f.Add(ruleTag{Sig: Signature{Version: Layout, Lens: []Len{{true, 64}}}, I: 0, N: 1}.encode())
	f.Add(`{"sig":{"v":4},"i":-1,"n":1}`)
	f.Fuzz(func(t *testing.T, s string) {
		tg, err := decodeTag(s)
		if err == nil && (tg.Sig.Version != Layout || tg.I < 0 || tg.I >= tg.N) {
			t.Fatalf("accepted %q as %+v", s, tg)
		}
	})
}

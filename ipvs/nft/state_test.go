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

// TestChainSignature reads the typed signature back from rule comments:
// the rules built from it carry it without lengths, each subnet rule its
// length, and the last rule built from it (the ct mark copy) ends the
// chain; every chain that is not wholly one signature's is refused.
func TestChainSignature(t *testing.T) {
	sig := Signature{Version: Layout, IKEBit: 0x1000, Seed: 7, HashN: 3, MarkBase: 0x7d000000, RangeMask: 0xff000000, LogGroup: 9}
	other := sig
	other.Seed = 8
	tag := func(s Signature, i, n int) string { return ruleTag{Sig: s, I: i, N: n}.encode() }
	lenTag := func(l Len) string { return ruleTag{Sig: Signature{Version: Layout}, Len: &l}.encode() }
	want := sig
	want.Lens = []Len{{false, 27}, {true, 64}}
	// Subnet rules in any order, anywhere before the last rule.
	if got := chainSignature(rulesWith(lenTag(Len{true, 64}), tag(sig, 0, 2), lenTag(Len{false, 27}), tag(sig, 1, 2))); !got.Equal(want) {
		t.Fatalf("read back %+v, want %+v", got, want)
	}
	if got := chainSignature(rulesWith(tag(sig, 0, 2), tag(sig, 1, 2))); !got.Equal(sig) || len(got.Lens) != 0 {
		t.Fatalf("read back %+v, want %+v", got, sig)
	}
	withLens := sig
	withLens.Lens = want.Lens
	for name, rules := range map[string][]*nftables.Rule{
		"a rule missing":          rulesWith(tag(sig, 0, 3), tag(sig, 1, 3)),
		"two signatures":          rulesWith(tag(sig, 0, 2), tag(other, 1, 2)),
		"a rule twice":            rulesWith(tag(sig, 0, 2), tag(sig, 0, 2)),
		"a length twice":          rulesWith(lenTag(Len{false, 27}), lenTag(Len{false, 27}), tag(sig, 0, 1)),
		"the last rule not last":  rulesWith(tag(sig, 1, 2), tag(sig, 0, 2)),
		"a subnet rule after it":  rulesWith(tag(sig, 0, 2), tag(sig, 1, 2), lenTag(Len{false, 27})),
		"subnet rules alone":      rulesWith(lenTag(Len{false, 27})),
		"lengths in a fixed rule": rulesWith(tag(withLens, 0, 1)),
		"a foreign rule":          append(rulesWith(tag(sig, 0, 2), tag(sig, 1, 2)), &nftables.Rule{}),
		"an older layout":         rulesWith(`td3 mode=ipvs seed=0x7 n=3|0|1`),
		"not this layout":         rulesWith(tag(Signature{Version: Layout + 1}, 0, 1)),
		"index outside n":         rulesWith(tag(sig, 1, 1)),
		"comment not json":        rulesWith("{"),
		"no rule, no chain ok":    nil,
	} {
		if got := chainSignature(rules); got.Version != 0 {
			t.Errorf("%s: accepted %+v", name, got)
		}
	}
}

func FuzzDecodeTag(f *testing.F) {
	f.Add(ruleTag{Sig: Signature{Version: Layout}, I: 0, N: 1}.encode())
	f.Add(ruleTag{Sig: Signature{Version: Layout}, Len: &Len{true, 64}}.encode())
	f.Add(`{"sig":{"v":4},"i":-1,"n":1}`)
	f.Add(`{"sig":{"v":9},"len":{"v6":false,"bits":33}}`)
	f.Fuzz(func(t *testing.T, s string) {
		tg, err := decodeTag(s)
		if err != nil {
			return
		}
		ok := tg.Sig.Version == Layout && len(tg.Sig.Lens) == 0
		if tg.Len != nil {
			ok = ok && tg.I == 0 && tg.N == 0 && tg.Len.valid()
		} else {
			ok = ok && tg.I >= 0 && tg.I < tg.N
		}
		if !ok {
			t.Fatalf("accepted %q as %+v", s, tg)
		}
	})
}

// TestChainHandlesUsable: a plan adds or deletes lengths' rules alone only
// with a chain wholly the director's, a last rule to insert before, a rule
// for every length that goes and none yet for one that appears; anything
// else rebuilds the chain.
func TestChainHandlesUsable(t *testing.T) {
	sig := Signature{Version: Layout, HashN: 3}
	l27, l64 := Len{false, 27}, Len{true, 64}
	tag := func(i, n int) string { return ruleTag{Sig: sig, I: i, N: n}.encode() }
	lenTag := func(l Len) string { return ruleTag{Sig: Signature{Version: Layout}, Len: &l}.encode() }
	rules := rulesWith(tag(0, 2), lenTag(l27), tag(1, 2))
	for i, r := range rules {
		r.Handle = uint64(10 + i)
	}
	h := handlesOf(rules)
	if !h.ok || h.last != 12 || h.lens[l27] != 11 {
		t.Fatalf("handles %+v", h)
	}
	for name, c := range map[string]struct {
		h    *chainHandles
		p    Plan
		want bool
	}{
		"add a length":               {h, Plan{AddLens: []Len{l64}}, true},
		"delete a length":            {h, Plan{DelLens: []Len{l27}}, true},
		"no handles":                 {nil, Plan{AddLens: []Len{l64}}, false},
		"a length with a rule added": {h, Plan{AddLens: []Len{l27}}, false},
		"a length without a rule":    {h, Plan{DelLens: []Len{l64}}, false},
		"not the director's chain":   {handlesOf(rulesWith(lenTag(l27))), Plan{DelLens: []Len{l27}}, false},
		"no last rule":               {&chainHandles{ok: true}, Plan{AddLens: []Len{l64}}, false},
	} {
		if got := c.h.usable(&c.p); got != c.want {
			t.Errorf("%s: usable %v, want %v", name, got, c.want)
		}
	}
}

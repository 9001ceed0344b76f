package nft

import (
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/userdata"
)

// read dumps the table; without withMaps it leaves out the elements of the
// peer and subnet maps (their Digest, in Stored, stands for them). A table
// with a missing set or chain, or with keys the director cannot have
// written, is reported Broken.
func read(c *nftables.Conn, table string, withMaps bool, elems func(*nftables.Set) ([]nftables.SetElement, error)) (*State, error) {
	s := NewState()
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	found := false
	for _, t := range tables {
		if t.Name == table {
			found = true
		}
	}
	if !found {
		return s, nil
	}
	s.Table = true
	n := newNames(table)
	sets, err := c.GetSets(n.table)
	if err != nil {
		return nil, fmt.Errorf("list sets: %w", err)
	}
	have := map[string]bool{}
	for _, st := range sets {
		have[st.Name] = true
		l, isSub := parseLen(st.Name)
		if isSub {
			s.Lens[l] = struct{}{}
		}
		if st.Size > 0 && (isSub || st.Name == peerSetName(false) || st.Name == peerSetName(true)) {
			s.Sizes[st.Name] = st.Size
		}
	}
	for _, name := range legacySets {
		if have[name] {
			s.Broken = true
			return s, nil
		}
	}
	for _, st := range n.allSets() {
		if !have[st.Name] {
			s.Broken = true
			return s, nil
		}
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, fmt.Errorf("list chains: %w", err)
	}
	hasChain := false
	for _, ch := range chains {
		if ch.Table.Name == table && ch.Name == chainName {
			hasChain = true
		}
	}
	if !hasChain {
		s.Broken = true
		return s, nil
	}
	rules, err := c.GetRules(n.table, n.chain)
	if err != nil {
		return nil, fmt.Errorf("list rules of chain %s: %w", chainName, err)
	}
	s.Sig = chainSignature(rules)
	for _, f := range n.fams {
		els, err := elems(f.vips)
		if err != nil {
			return nil, fmt.Errorf("list set %s: %w", f.vips.Name, err)
		}
		for _, e := range els {
			if a, ok := netip.AddrFromSlice(e.Key); ok {
				s.VIPs[a] = struct{}{}
			}
		}
		if !withMaps {
			continue
		}
		els, err = elems(f.peers)
		if err != nil {
			return nil, fmt.Errorf("list map %s: %w", f.peers.Name, err)
		}
		for _, e := range els {
			if a, ok := netip.AddrFromSlice(e.Key); ok {
				s.Peers.Set(a, markOf(e.Val))
			}
		}
	}
	for _, l := range SortedLens(s.Lens) {
		if !withMaps {
			break
		}
		st := n.subnetSet(l)
		els, err := elems(st)
		if err != nil {
			return nil, fmt.Errorf("list map %s: %w", st.Name, err)
		}
		for _, e := range els {
			a, ok := netip.AddrFromSlice(e.Key)
			if !ok || a.Is6() != l.V6 {
				s.Broken = true
				continue
			}
			p := netip.PrefixFrom(a, l.Bits)
			if p.Masked() != p {
				// A key with host bits never matches a masked
				// destination: the map is not the director's.
				s.Broken = true
				continue
			}
			s.Subnets.Set(p, markOf(e.Val))
		}
	}
	els, err := elems(n.hash)
	if err != nil {
		return nil, fmt.Errorf("list map %s: %w", hashMapName, err)
	}
	for _, e := range els {
		if len(e.Key) == 4 {
			s.Hash[binaryutil.NativeEndian.Uint32(e.Key)] = markOf(e.Val)
		}
	}
	if els, err = elems(n.digest); err != nil {
		return nil, fmt.Errorf("list set %s: %w", digestSetName, err)
	}
	if len(els) == 1 {
		s.Stored, s.HasStored = digestOf(els[0].Key)
	}
	return s, nil
}

// chainSignature returns the signature the chain's rules carry: the one
// every rule built from it carries, with the lengths of the subnet rules.
// It returns the zero Signature when a rule is missing, foreign, from
// another layout or another signature, a length has two rules, or the last
// rule built from the signature (the ct mark copy) is not the chain's
// last: the chain is then rebuilt.
func chainSignature(rules []*nftables.Rule) Signature {
	var sig Signature
	seen := map[int]bool{}
	lens := map[Len]struct{}{}
	total, fixed, last := -1, 0, -1
	for _, r := range rules {
		t, ok := ruleTagOf(r)
		if !ok {
			return Signature{}
		}
		if t.Len != nil {
			if _, dup := lens[*t.Len]; dup {
				return Signature{}
			}
			lens[*t.Len] = struct{}{}
			last = -1
			continue
		}
		if (total >= 0 && (t.N != total || !t.Sig.Equal(sig))) || seen[t.I] {
			return Signature{}
		}
		sig, total, seen[t.I], last = t.Sig, t.N, true, t.I
		fixed++
	}
	if total < 0 || total != fixed || last != total-1 {
		return Signature{}
	}
	if len(lens) > 0 {
		sig.Lens = SortedLens(lens)
	}
	return sig
}

// ruleTagOf decodes r's tag; false for a rule without a valid one.
func ruleTagOf(r *nftables.Rule) (ruleTag, bool) {
	cm, ok := userdata.GetString(r.UserData, userdata.TypeComment)
	if !ok {
		return ruleTag{}, false
	}
	t, err := decodeTag(cm)
	return t, err == nil
}

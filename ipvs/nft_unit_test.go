package ipvs

import (
	"net/netip"

	"github.com/google/nftables"
)

func intervalElemsFor(m map[netip.Prefix]uint32) []nftables.SetElement {
	var out []nftables.SetElement
	for _, p := range sortedPrefixes(m) {
		out = append(out, intervalElems(p, m[p], true)...)
	}
	return out
}

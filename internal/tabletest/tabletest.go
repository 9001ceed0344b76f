// Package tabletest generates table changes for tests: numbered nodes and
// tunnels with distinct peers and subnets, the same in every store test
// (the bbolt store's own tests, the backend suite, the etcd store's).
package tabletest

import (
	"fmt"
	"net/netip"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// Nodes returns n node puts.
func Nodes(n int) []affinity.Change {
	var b []affinity.Change
	for i := range n {
		b = append(b, affinity.Change{Kind: affinity.PutNode, Node: &affinity.Node{Name: fmt.Sprintf("vpn-%d", i), Addr: netip.AddrFrom4([4]byte{172, 16, 0, byte(i + 1)})}})
	}
	return b
}

// Tunnels returns n tunnel puts from index from, one /27 each.
func Tunnels(from, n int) []affinity.Change {
	var b []affinity.Change
	for i := from; i < from+n; i++ {
		b = append(b, affinity.Change{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{
			ID:      fmt.Sprintf("t%06d", i),
			Peer:    netip.AddrFrom4([4]byte{100, byte(i >> 16), byte(i >> 8), byte(i)}),
			Subnets: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(10 + i>>19), byte(i >> 11), byte(i >> 3), byte(i << 5)}), 27)},
			Comment: fmt.Sprintf("site %d", i),
		}})
	}
	return b
}

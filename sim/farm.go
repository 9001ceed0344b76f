package sim

import (
	"fmt"
	"math/rand/v2"
	"net/netip"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// FarmSpec describes a generated farm.
type FarmSpec struct {
	Seed    uint64
	Nodes   int
	Tunnels int
	// MaxSubnets is the most protected subnets per tunnel (at least 1);
	// each tunnel gets 1..MaxSubnets /27s.
	MaxSubnets int
	// IPv6Share is the share of tunnels (0..1) with an IPv6 peer and IPv6
	// subnets.
	IPv6Share float64
	// PinnedShare is the share of tunnels (0..1) the NMS pinned to a node.
	PinnedShare float64
	// Subnet4Bits is the length of the IPv4 subnets; 0 picks /27 when
	// every tunnel's MaxSubnets fit in 10.0.0.0/7, else the shortest
	// length that fits them (a million tunnels of up to 4 subnets: /29).
	// Longer prefixes fit more: /27 holds a million subnets, /29 four
	// million.
	Subnet4Bits int
}

// Farm is a generated set of nodes and tunnels, ready to write as NMS
// files or to apply to a table.
type Farm struct {
	Nodes   []affinity.Node
	Tunnels []affinity.Tunnel
}

// subnet4Space is the IPv4 space subnets are carved from: 10.0.0.0/7.
const subnet4Space = 1 << 25

// autoSubnet4Bits is the shortest IPv4 subnet length from /27 on at which
// tunnels x maxSubnets subnets (the most the generator may draw) fit in
// 10.0.0.0/7.
func autoSubnet4Bits(tunnels, maxSubnets int) int {
	need := uint64(tunnels) * uint64(maxSubnets)
	for bits := 27; bits < 32; bits++ {
		if need<<(32-bits) <= subnet4Space {
			return bits
		}
	}
	return 32
}

// GenerateFarm builds a farm deterministically from the spec: node i is
// vpn-NN at 172.16.x.y; tunnel i has peer 100.64.0.0/10 + i (IPv4) or
// 2001:db8:1::i (IPv6) and /27 (or /64) subnets carved in order from
// 10.0.0.0/8 and 11.0.0.0/8 (or fd00::/16), so no two overlap.
func GenerateFarm(spec FarmSpec) (*Farm, error) {
	if spec.Nodes < 1 || spec.Nodes > affinity.MaxMark {
		return nil, fmt.Errorf("generate farm: %d nodes (want 1..%d)", spec.Nodes, affinity.MaxMark)
	}
	if spec.Tunnels < 0 || spec.Tunnels > 4_000_000 {
		return nil, fmt.Errorf("generate farm: %d tunnels (want 0..4000000)", spec.Tunnels)
	}
	if spec.MaxSubnets < 1 {
		spec.MaxSubnets = 1
	}
	if spec.Subnet4Bits == 0 {
		spec.Subnet4Bits = autoSubnet4Bits(spec.Tunnels, spec.MaxSubnets)
	}
	if spec.Subnet4Bits < 8 || spec.Subnet4Bits > 32 {
		return nil, fmt.Errorf("generate farm: IPv4 subnet length /%d (want 8..32)", spec.Subnet4Bits)
	}
	host := uint(32 - spec.Subnet4Bits)
	r := rand.New(rand.NewPCG(spec.Seed, 0x7d))
	f := &Farm{}
	for i := 0; i < spec.Nodes; i++ {
		f.Nodes = append(f.Nodes, affinity.Node{
			Name:   fmt.Sprintf("vpn-%02d", i+1),
			Addr:   netip.AddrFrom4([4]byte{172, 16, byte((i + 1) >> 8), byte(i + 1)}),
			Weight: affinity.DefaultWeight,
		})
	}
	var next4, next6 uint64 // next free /27 (IPv4) and /64 (IPv6) index
	for i := 0; i < spec.Tunnels; i++ {
		tu := affinity.Tunnel{ID: fmt.Sprintf("site-%07d", i+1)}
		v6 := r.Float64() < spec.IPv6Share
		n := 1 + r.IntN(spec.MaxSubnets)
		if v6 {
			tu.Peer = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
			for k := 0; k < n; k++ {
				x := next6
				next6++
				tu.Subnets = append(tu.Subnets, netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, 0, 0, 0, byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)}), 64))
			}
		} else {
			p := 100<<24 | 64<<16 + uint32(i) // 100.64.0.0/10 holds 4M peers
			tu.Peer = netip.AddrFrom4([4]byte{byte(p >> 24), byte(p >> 16), byte(p >> 8), byte(p)})
			for k := 0; k < n; k++ {
				x := next4 << host
				next4++
				a := uint32(10<<24) + uint32(x)
				tu.Subnets = append(tu.Subnets, netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a >> 24), byte(a >> 16), byte(a >> 8), byte(a)}), spec.Subnet4Bits))
			}
		}
		if r.Float64() < spec.PinnedShare {
			tu.Node = f.Nodes[r.IntN(len(f.Nodes))].Name
			tu.Pinned = true
		}
		f.Tunnels = append(f.Tunnels, tu)
	}
	if next4<<host > subnet4Space { // 10.0.0.0/8 and 11.0.0.0/8
		return nil, fmt.Errorf("generate farm: %d IPv4 /%d subnets do not fit in 10.0.0.0/7 (use longer subnets)", next4, spec.Subnet4Bits)
	}
	return f, nil
}

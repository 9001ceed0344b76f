package ipvs

import (
	"net"
	"net/netip"
)

// kernel is the seam between the diff logic and the real kernel's
// nftables, rules and routes: the Dataplane decides what to change, a
// kernel applies it. The netlink wire work lives behind it so unit tests
// can record calls instead. IPVS is behind lvs.Kernel.
type kernel interface {
	readNft() (*nftState, error)
	// applyNft runs p as one nftables transaction.
	applyNft(p *nftPlan) error
	deleteTable() error
	listRules() ([]kRule, error)
	addRule(r kRule) error
	delRule(r kRule) error
	// listRoutes returns the routes of every table.
	listRoutes() ([]kRoute, error)
	replaceRoute(r kRoute) error
	delRoute(r kRoute) error
	close() error
}

// kRule is a policy routing rule as the director sees it.
type kRule struct {
	v6    bool
	prio  int
	mark  uint32
	mask  uint32
	table int
	proto uint8
}

// kRoute is a route as the director sees it.
type kRoute struct {
	v6    bool
	table int
	dst   netip.Prefix
	gw    netip.Addr
	proto uint8
}

const rtTableLocal = 255

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

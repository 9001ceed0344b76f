// Package ipvs will hold everything that talks to the kernel dataplane:
// the nftables classifier (peer and subnet maps to node marks), one IPVS
// fwmark service per node for IKE and NAT-T, and the fwmark policy routes
// that carry ESP, AH and return traffic. See ../shared/DESIGN.md.
package ipvs

// Package xfrm reads a terminator node's XFRM database (IPsec states and
// policies) over netlink and groups it into tunnel facts for the director:
// per peer, the SAs the node holds, the subnets negotiated for them, NAT-T
// ports and traffic counters.
//
// The kernel is behind one narrow interface, Kernel: New wires the real
// netlink one (dumps and the XFRM multicast groups over
// vishvananda/netlink's sockets and wire structs, decoded here: see
// decode.go for why not its XfrmStateList); the agent's unit tests use
// their own.
// Group turns a set of states and policies into Facts; Mirror keeps the
// same result up to date one kernel event at a time and says which peers
// changed, so a node with 100k SAs does not regroup everything per event.
package xfrm

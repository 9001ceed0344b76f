// Package ikelab runs real strongSwan tunnels through the real tunneldirector
// daemon, inside the vmlab guest (Debian's kernel: ESP, XFRM, IPVS) booted on
// the host's root filesystem (vmlab.Options.HostRoot), so Debian's charon and
// swanctl installed on the host run there unchanged.
//
// A Farm is one scenario's world, built in network namespaces on the netlab
// topology:
//
//	peers (charon each; NAT-T peers behind a masquerading namespace)
//	   │ outside segment
//	director: the `tunneldirector run` binary built on the host, in route-only or IPVS mode
//	   │ inside segment                      │ target segment
//	nodes (charon each, VIP on lo)        target host (the servers behind the director)
//
// Peers and nodes load the repository's example configuration
// (examples/strongswan/*.swanctl.conf and failover.conf, with the example's
// addresses replaced by the lab's), and the director and nodes get the
// example sysctl files (examples/sysctl.d/), so the README's examples are
// what the tests prove. Each charon runs in its namespace with its own
// strongswan.conf (STRONGSWAN_CONF: plugins, vici socket, log file) and a
// private /run (its pid file). The harness queries charon over vici
// (github.com/strongswan/govici), captures packets on every node's inside
// link from the farm's start, and drives ICMP echo both ways through the
// tunnels.
//
// Host side: a test package calls RunVM from its host test; its guest tests
// (named TestGuest*) call New. Scenarios wait on conditions with generous
// deadlines (the guest is emulated, on a shared 2-core machine) and log what
// they measure as "MEASURE ..." lines.
package ikelab

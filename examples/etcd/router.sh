#!/bin/sh
# The upstream router of three active directors (README.md, "N active
# directors through etcd"): one route to the VIP with a next hop per
# director, hashed on source and destination address (ESP has no ports).
# Which director a packet takes does not matter: every one of them sends a
# tunnel's packets to the same node.
set -e
VIP=198.51.100.10
sysctl -w net.ipv4.fib_multipath_hash_policy=0   # L3: source and destination address
ip route replace "$VIP/32" \
	nexthop via 10.253.0.1 dev eth1 weight 1 \
	nexthop via 10.253.0.2 dev eth1 weight 1 \
	nexthop via 10.253.0.3 dev eth1 weight 1
# A director that dies must leave the route: with static routes, a
# health check removes its next hop (ip route replace without it); with
# BGP (README), its session drops and the route goes with it.

// Package agents is the director's side of the node agents (package
// xfrm/agent): their configuration (tokens, adopt mode, learned_ttl) and
// the Merger, which turns what the agents report into table changes on
// the master.
//
// The rules (issue 12), applied one peer at a time:
//
//   - A peer the table does not know, held by a node, is learned onto that
//     node (with several holders: the one with the newest SA use), with
//     the subnets it negotiated.
//   - A learned tunnel takes the subnets its OWNER negotiated: a new one at
//     once, one no longer negotiated only after it stayed away for Hold (a
//     flapping CHILD_SA does not churn the table). A subnet that conflicts
//     with another tunnel's, contains a director VIP or lies outside
//     agents.subnets is reported, not applied.
//   - An NMS tunnel keeps its subnets: negotiated ones outside them are
//     only reported.
//   - A tunnel whose SAs are on a node other than its owner is misplaced:
//     listed and counted. With adopt: follow-sa the table follows the SA
//     when, for Hold without a break, the owner's agent reported (fresh)
//     no SA for it, exactly one other node held one, that node is not
//     down and the tunnel is not pinned by the NMS.
//   - A learned tunnel with no SA on any node for learned_ttl is removed,
//     once its owner's agent is reporting; NMS tunnels never are.
//
// Security: a report changes only its own node's facts (the token names
// the node), and another node's facts never change a tunnel's subnets —
// only the owner's do. A lying agent can therefore claim peers nobody owns
// (restrict the address space it may steer with agents.subnets), and take
// a tunnel from another node only under follow-sa, only when that node's
// own agent says it holds no SA for it for Hold, and never a pinned one.
package agents

// Package nms imports and exports the affinity table's tunnels and nodes
// in the files a network management system (NMS) exchanges with the
// director, CSV and JSON, and plans what importing a file changes.
//
// Reading validates everything the table would refuse, record by record
// and across records, and reports every problem with the file name, the
// line (and, for JSON, the array index), the field and the offending
// value:
//
//	tunnels.csv:17: field subnets: "10.0.0.1/24": host bits set (0.0.0.1 beyond /24; did you mean 10.0.0.0/24?)
//
// Reading streams: memory grows with the records kept, never with the
// file, and Options.MaxRecords stops a runaway file as soon as it is
// exceeded. Plan and PlanNodes turn the records into an affinity batch;
// Diff.MapError turns a refused batch back into file lines.
//
// # Tunnels CSV
//
// A header line names the columns, in any order and any case:
//
//	id,peer,subnets,node,pinned,comment
//	ipsec-berlin-01,192.0.2.10,10.1.0.0/24 10.1.1.0/24,vpn-a,true,Berlin office
//	ipsec-paris-01,2001:db8:100::1,fd00:1::/48,,,
//
// The columns:
//
//   - id (required): the tunnel's name; printable, no white space, comma,
//     semicolon or quote, at most 128 bytes.
//   - peer (required): the peer's IPv4 or IPv6 endpoint address, without
//     port or zone; IPv4-mapped IPv6 is refused (write it as IPv4).
//   - subnets (required): one to 64 protected prefixes separated by spaces
//     and/or semicolons (commas too, in a quoted field), host bits clear. No subnet may equal, contain or
//     lie inside another in the file.
//   - node (optional): the owner node. Empty leaves the choice to the
//     scheduler; a tunnel already in the table keeps its owner.
//   - pinned (optional): true/false, yes/no, 1/0 or empty. A node with
//     pinned empty means pinned: the NMS chose the owner. A node with
//     pinned false means "scheduled, currently on this node", which is
//     what export writes for the scheduler's choices, so an export
//     imported again restores every owner. pinned true without a node is
//     an error.
//   - comment (optional): free text up to 1024 bytes; tab and newline are
//     the only control characters allowed.
//
// Ids and peers must be unique in the file. Columns outside this list are an
// error (a typo must not drop data silently), and so is a column given
// twice. Lines starting with '#' and blank lines are skipped; fields are
// trimmed of surrounding white space; a field with a comma, quote or
// newline is double-quoted as in RFC 4180. A UTF-8 byte order mark is
// ignored. A header with no records is valid: with replace it empties the
// table, and the caller decides whether to allow that.
//
// # Tunnels JSON
//
// An array of objects with the same fields; subnets is an array of
// strings (a single string of prefixes separated as in CSV is accepted),
// pinned a boolean, and a number is accepted where a string is expected:
//
//	[
//	{"id":"ipsec-berlin-01","peer":"192.0.2.10","subnets":["10.1.0.0/24","10.1.1.0/24"],"node":"vpn-a","pinned":true,"comment":"Berlin office"},
//	{"id":"ipsec-paris-01","peer":"2001:db8:100::1","subnets":["fd00:1::/48"]}
//	]
//
// Unknown fields are an error. Export writes one object per line, so that
// exports diff well.
//
// # Nodes CSV and JSON
//
//	name,address,address6,weight,capacity,state,mark,comment
//	vpn-a,10.255.0.11,100,0,active,1,rack 1
//
// The columns, or the keys of each JSON object:
//
//   - name (required): the node's name, the same rules as a tunnel id.
//   - address (required): the node's inside IPv4 or IPv6 address.
//   - weight (optional): 1 to 10000, default 100; a node's share of
//     scheduled tunnels grows with it.
//   - capacity (optional): the most tunnels the node may hold; 0 or empty
//     is no limit.
//   - state (optional): active, draining or down; default active.
//   - mark (optional): the node's mark, 1 to 4095, fixed for the node's
//     life. Export writes it; on import 0 or empty keeps the current mark
//     or has a new node assigned one.
//   - comment (optional): as for tunnels.
//
// Names, addresses and non-zero marks must be unique in the file. JSON is
// an array of objects with these keys; numbers may be quoted.
//
// # Detection
//
// The format is told by the file name's extension (.csv, .json) or else
// by the first byte that is not white space ('[' means JSON). The kind is
// told by the header or the first object's keys: tunnels have peer, nodes
// address. Callers may override both (Options.Format, Options.Kind). A
// binary file (NUL bytes or invalid UTF-8 in the first 64 KiB, such as the
// director's own bbolt store given by mistake) is refused before parsing.
package nms

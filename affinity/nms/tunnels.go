package nms

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"

	"github.com/gaissmai/bart"
	"github.com/tunneldirector/tunneldirector/affinity"
)

// TunnelRecord is one tunnel read from a file, with where it came from.
// Node is empty when the file leaves the owner to the scheduler; Pinned is
// set when the file names a node and does not say pinned=false.
type TunnelRecord struct {
	affinity.Tunnel
	Pos Pos
}

// The tunnel columns, in export order.
const (
	tcID = iota
	tcPeer
	tcSubnets
	tcNode
	tcPinned
	tcComment
	tcCount
)

var tunnelColumns = [tcCount]string{"id", "peer", "subnets", "node", "pinned", "comment"}
var tunnelRequired = [tcCount]bool{tcID: true, tcPeer: true, tcSubnets: true}

// rawTunnel is a tunnel's fields as text, whichever format they came from.
type rawTunnel struct {
	f       [tcCount]string
	subnets []string // JSON array items; CSV puts the field in f[tcSubnets]
	bad     [tcCount]string
}

// tunnelSet validates tunnels one by one and checks them against each
// other: ids, peers and subnets must be unique across the file.
type tunnelSet struct {
	c       *collector
	recs    chunks[TunnelRecord]
	ids     map[string]int32
	peers   peerSet
	subnets bart.Table[int32]
	prefBuf []netip.Prefix
	// prefixes holds the records' subnets, each record's a clipped
	// window: one allocation per few thousand records instead of one per
	// record (the records live only as long as the import).
	prefixes []netip.Prefix
	bad      map[int32]bool // records that drew an error
	nodes    map[string]string
}

// nodeName returns the file's node name as one string per name: a CSV
// field shares its string with the whole line, which every record naming
// a node would otherwise keep until the import ends.
func (s *tunnelSet) nodeName(name string) string {
	if n, ok := s.nodes[name]; ok {
		return n
	}
	if s.nodes == nil {
		s.nodes = map[string]string{}
	}
	n := strings.Clone(name)
	s.nodes[n] = n
	return n
}

// peerSet maps the file's peers to their records: IPv4 peers keyed by the
// address as a number (an eighth of a netip.Addr key's slot), IPv6 peers
// by the address.
type peerSet struct {
	v4 map[uint32]int32
	v6 map[netip.Addr]int32
}

// claim records a for record idx, or returns the record that has it.
func (p *peerSet) claim(a netip.Addr, idx int32) (int32, bool) {
	if a.Is4() {
		b := a.As4()
		k := binary.BigEndian.Uint32(b[:])
		if j, dup := p.v4[k]; dup {
			return j, true
		}
		p.v4[k] = idx
		return 0, false
	}
	if j, dup := p.v6[a]; dup {
		return j, true
	}
	p.v6[a] = idx
	return 0, false
}

func newTunnelSet(c *collector, hint int) *tunnelSet {
	s := &tunnelSet{
		c:     c,
		ids:   make(map[string]int32, hint),
		peers: peerSet{v4: make(map[uint32]int32, hint), v6: map[netip.Addr]int32{}},
	}
	s.recs.reserve(hint)
	return s
}

// where names another record in a message: its line, or its element
// index and line for JSON.
func where(p Pos) string {
	if p.Index >= 0 {
		return fmt.Sprintf("element %d (line %d)", p.Index, p.Line)
	}
	return fmt.Sprintf("line %d", p.Line)
}

// add validates one record and keeps it. Fields are trimmed here so that
// both formats treat white space alike.
func (s *tunnelSet) add(pos Pos, raw *rawTunnel) {
	c := s.c
	before := c.total
	var f [tcCount]string
	for i := range f {
		f[i] = strings.TrimSpace(raw.f[i])
		if raw.bad[i] != "" {
			c.addf(pos, tunnelColumns[i], raw.bad[i], "want a string, not an object or array")
			return
		}
	}
	missingSubnets := false
	for i, req := range tunnelRequired {
		if req && f[i] == "" && !(i == tcSubnets && len(raw.subnets) > 0) {
			c.addf(pos, tunnelColumns[i], "", "missing")
			missingSubnets = missingSubnets || i == tcSubnets
		}
	}
	idx := int32(s.recs.len())
	t := TunnelRecord{Pos: pos}

	if f[tcID] != "" {
		if err := affinity.ValidateID("tunnel id", f[tcID]); err != nil {
			c.addf(pos, "id", f[tcID], "%v", err)
		} else {
			// A CSV field shares one string with its whole line: the
			// table keeps the id for the tunnel's life, not the line.
			t.ID = strings.Clone(f[tcID])
		}
	}
	if f[tcPeer] != "" {
		a, msg := parseAddr(f[tcPeer])
		if msg != "" {
			c.addf(pos, "peer", f[tcPeer], "%s", msg)
		}
		t.Peer = a
	}
	t.Subnets = s.parseSubnets(pos, f[tcSubnets], raw.subnets, missingSubnets)
	if f[tcNode] != "" {
		if err := affinity.ValidateID("node name", f[tcNode]); err != nil {
			c.addf(pos, "node", f[tcNode], "%v", err)
		}
		t.Node = s.nodeName(f[tcNode])
	}
	switch p, valid := parseBool(f[tcPinned]); {
	case f[tcPinned] == "":
		// The NMS naming a node is the NMS choosing it.
		t.Pinned = t.Node != ""
	case !valid:
		c.addf(pos, "pinned", f[tcPinned], "want true or false (or yes/no, 1/0, empty)")
	case p && f[tcNode] == "":
		c.addf(pos, "pinned", f[tcPinned], "pinned without a node: name the node, or leave pinned empty for the scheduler to choose")
	default:
		t.Pinned = p
	}
	if f[tcComment] != "" {
		if msg := checkComment(f[tcComment]); msg != "" {
			c.addf(pos, "comment", f[tcComment], "%s", msg)
		}
		t.Comment = strings.Clone(f[tcComment])
	}

	// Cross-record checks, for the fields that are valid on their own.
	if t.ID != "" {
		if j, dup := s.ids[t.ID]; dup {
			c.addf(pos, "id", t.ID, "duplicate tunnel id, first at %s", where(s.recs.at(int(j)).Pos))
		} else {
			s.ids[t.ID] = idx
		}
	}
	if t.Peer.IsValid() {
		if j, dup := s.peers.claim(t.Peer, idx); dup {
			o := s.recs.at(int(j))
			c.addf(pos, "peer", f[tcPeer], "peer of tunnel %s is already the peer of tunnel %s at %s", t.ID, o.ID, where(o.Pos))
		}
	}
	for _, p := range t.Subnets {
		s.subnetFree(pos, t.ID, p, idx)
	}
	// Records with problems are kept too: later duplicates name them.
	s.recs.add(t)
	if c.total > before {
		if s.bad == nil {
			s.bad = map[int32]bool{}
		}
		s.bad[idx] = true
	}
}

// valid returns the records that drew no error, for checking against the
// table when the file as a whole was refused.
func (s *tunnelSet) valid() []TunnelRecord {
	all := s.recs.flatten()
	out := make([]TunnelRecord, 0, len(all)-len(s.bad))
	for i := range all {
		if !s.bad[int32(i)] {
			out = append(out, all[i])
		}
	}
	return out
}

// parseSubnets parses the subnets field, sorted the way the table keeps
// them. missing says the field was already reported as missing.
func (s *tunnelSet) parseSubnets(pos Pos, field string, items []string, missing bool) []netip.Prefix {
	buf := s.prefBuf[:0]
	bad := false
	each := func(item string) {
		p, msg := parsePrefix(item)
		if msg != "" {
			s.c.addf(pos, "subnets", item, "%s", msg)
			bad = true
			return
		}
		buf = append(buf, p)
	}
	if items != nil {
		for _, it := range items {
			splitSubnets(it, each)
		}
	} else {
		splitSubnets(field, each)
	}
	s.prefBuf = buf
	switch {
	case len(buf) > maxSubnets:
		s.c.addf(pos, "subnets", "", "%d subnets, at most %d per tunnel", len(buf), maxSubnets)
		return nil
	case len(buf) == 0:
		if !missing && !bad {
			s.c.addf(pos, "subnets", field, "no subnet given")
		}
		return nil
	}
	if cap(s.prefixes)-len(s.prefixes) < len(buf) {
		s.prefixes = make([]netip.Prefix, 0, max(prefixChunk, len(buf)))
	}
	n := len(s.prefixes)
	s.prefixes = append(s.prefixes, buf...)
	out := s.prefixes[n:len(s.prefixes):len(s.prefixes)]
	slices.SortFunc(out, affinity.ComparePrefix)
	return out
}

// prefixChunk is the number of subnets per allocation of the records'
// subnets (128 KiB).
const prefixChunk = 4096

// subnetFree reports when p equals, contains or lies inside a subnet
// already read, and otherwise claims it for record idx.
func (s *tunnelSet) subnetFree(pos Pos, id string, p netip.Prefix, idx int32) {
	if !s.subnets.OverlapsPrefix(p) {
		s.subnets.Insert(p, idx)
		return
	}
	// Rare: find which subnet it overlaps, for the message.
	q, j, found := netip.Prefix{}, int32(0), false
	for q, j = range s.subnets.Supernets(p) {
		found = true
		break
	}
	if !found {
		for q, j = range s.subnets.Subnets(p) {
			found = true
			break
		}
	}
	if !found {
		return
	}
	if j == idx {
		s.c.addf(pos, "subnets", p.String(), "overlaps %s of the same tunnel %s", q, id)
		return
	}
	o := s.recs.at(int(j))
	var rel string
	switch {
	case q == p:
		rel = "is also"
	case q.Bits() < p.Bits():
		rel = "lies inside " + q.String() + ","
	default:
		rel = "contains " + q.String() + ","
	}
	s.c.addf(pos, "subnets", p.String(), "subnet of tunnel %s %s a subnet of tunnel %s at %s", id, rel, o.ID, where(o.Pos))
}

// ReadTunnels reads a tunnels file in CSV or JSON (see the package
// documentation for the formats), validating every record and checking
// them against each other. On any problem it returns nil and an *Errors
// listing them; a file with a header and no records is no problem.
func ReadTunnels(r io.Reader, opts Options) ([]TunnelRecord, error) {
	in, err := open(r, &opts)
	if err != nil {
		return nil, err
	}
	defer in.cr.finish()
	recs, err := readTunnels(in, &opts)
	if err != nil {
		return nil, err
	}
	return recs, nil
}

func readTunnels(in *input, opts *Options) ([]TunnelRecord, error) {
	c := &collector{max: opts.maxErrors()}
	s := newTunnelSet(c, in.recordHint(opts.maxRecords()))
	if in.format == FormatJSON {
		readJSON(in, opts, c, KindTunnels, func(pos Pos, dec decodeFunc) bool {
			var el struct {
				ID, Peer, Node, Pinned, Comment jsonScalar
				Subnets                         jsonList
			}
			if !dec(tunnelColumns[:], []json.Unmarshaler{&el.ID, &el.Peer, &el.Subnets, &el.Node, &el.Pinned, &el.Comment}) {
				return false
			}
			raw := rawTunnel{
				f:   [tcCount]string{el.ID.s, el.Peer.s, "", el.Node.s, el.Pinned.s, el.Comment.s},
				bad: [tcCount]string{el.ID.bad, el.Peer.bad, el.Subnets.bad, el.Node.bad, el.Pinned.bad, el.Comment.bad},
			}
			raw.subnets = el.Subnets.items
			s.add(pos, &raw)
			return true
		})
	} else {
		readCSV(in, opts, c, KindTunnels, tunnelColumns[:], tunnelRequired[:], func(pos Pos, cols []int, rec []string) {
			var raw rawTunnel
			for i, ci := range cols {
				if ci >= 0 {
					raw.f[i] = rec[ci]
				}
			}
			s.add(pos, &raw)
		})
	}
	if err := c.err(); err != nil {
		if c.aborted {
			return nil, err
		}
		return s.valid(), err
	}
	return s.recs.flatten(), nil
}

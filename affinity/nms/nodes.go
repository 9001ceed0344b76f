package nms

import (
	"encoding/json"
	"io"
	"net/netip"
	"strings"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// NodeRecord is one node read from a file, with where it came from.
// Weight is DefaultWeight when the file leaves it out; Mark is 0 when the
// file leaves it to the table.
type NodeRecord struct {
	affinity.Node
	Pos Pos
}

// The node columns, in export order.
const (
	ncName = iota
	ncAddress
	ncAddress6
	ncWeight
	ncCapacity
	ncState
	ncMark
	ncComment
	ncCount
)

var nodeColumns = [ncCount]string{"name", "address", "address6", "weight", "capacity", "state", "mark", "comment"}
var nodeRequired = [ncCount]bool{ncName: true, ncAddress: true}

// Limits of the numeric node fields, as the table and its store accept
// them.
const (
	maxWeight   = 10000
	maxCapacity = 1<<31 - 1
)

type nodeSet struct {
	c     *collector
	recs  chunks[NodeRecord]
	names map[string]int
	addrs map[netip.Addr]int
	marks map[uint16]int
}

func (s *nodeSet) add(pos Pos, raw *[ncCount]string, bad *[ncCount]string) {
	c := s.c
	var f [ncCount]string
	for i := range f {
		f[i] = strings.TrimSpace(raw[i])
		if bad != nil && bad[i] != "" {
			c.addf(pos, nodeColumns[i], bad[i], "want a string or number, not an object or array")
			return
		}
	}
	for i, req := range nodeRequired {
		if req && f[i] == "" {
			c.addf(pos, nodeColumns[i], "", "missing")
		}
	}
	idx := s.recs.len()
	n := NodeRecord{Pos: pos, Node: affinity.Node{Weight: affinity.DefaultWeight}}
	if f[ncName] != "" {
		if err := affinity.ValidateID("node name", f[ncName]); err != nil {
			c.addf(pos, "name", f[ncName], "%v", err)
		} else {
			n.Name = f[ncName]
		}
	}
	if f[ncAddress] != "" {
		a, msg := parseAddr(f[ncAddress])
		if msg != "" {
			c.addf(pos, "address", f[ncAddress], "%s", msg)
		}
		n.Addr = a
	}
	if f[ncAddress6] != "" {
		a, msg := parseAddr(f[ncAddress6])
		switch {
		case msg != "":
			c.addf(pos, "address6", f[ncAddress6], "%s", msg)
		case !a.Is6():
			c.addf(pos, "address6", f[ncAddress6], "not an IPv6 address (address6 is the node's IPv6 inside address, for dual-stack nodes)")
		case n.Addr.Is6():
			c.addf(pos, "address6", f[ncAddress6], "address is already IPv6: address6 is for a node whose address is IPv4")
		}
		n.Addr6 = a
	}
	if f[ncWeight] != "" {
		w, msg := parseUint(f[ncWeight], maxWeight)
		switch {
		case msg != "":
			c.addf(pos, "weight", f[ncWeight], "%s (want 1 to %d)", msg, maxWeight)
		case w == 0:
			c.addf(pos, "weight", f[ncWeight], "zero weight (want 1 to %d; drain the node to stop scheduling onto it)", maxWeight)
		default:
			n.Weight = uint32(w)
		}
	}
	if f[ncCapacity] != "" {
		v, msg := parseUint(f[ncCapacity], maxCapacity)
		if msg != "" {
			c.addf(pos, "capacity", f[ncCapacity], "%s (want 0 for no limit, or the most tunnels the node may hold)", msg)
		}
		n.Capacity = int(v)
	}
	if f[ncState] != "" {
		st, err := affinity.ParseNodeState(f[ncState])
		if err != nil {
			c.addf(pos, "state", f[ncState], "%v", err)
		}
		n.State = st
	}
	if f[ncMark] != "" {
		v, msg := parseUint(f[ncMark], affinity.MaxMark)
		if msg != "" {
			c.addf(pos, "mark", f[ncMark], "%s (want 1 to %d, or 0 or empty to have one assigned)", msg, affinity.MaxMark)
		}
		n.Mark = uint16(v)
	}
	if f[ncComment] != "" {
		if msg := checkComment(f[ncComment]); msg != "" {
			c.addf(pos, "comment", f[ncComment], "%s", msg)
		}
		n.Comment = f[ncComment]
	}

	if n.Name != "" {
		if j, dup := s.names[n.Name]; dup {
			c.addf(pos, "name", n.Name, "duplicate node name, first at %s", where(s.recs.at(j).Pos))
		} else {
			s.names[n.Name] = idx
		}
	}
	if n.Addr.IsValid() {
		if j, dup := s.addrs[n.Addr]; dup {
			o := s.recs.at(j)
			c.addf(pos, "address", f[ncAddress], "address of node %s is already the address of node %s at %s", n.Name, o.Name, where(o.Pos))
		} else {
			s.addrs[n.Addr] = idx
		}
	}
	if n.Mark != 0 {
		if j, dup := s.marks[n.Mark]; dup {
			o := s.recs.at(j)
			c.addf(pos, "mark", f[ncMark], "mark of node %s is already the mark of node %s at %s", n.Name, o.Name, where(o.Pos))
		} else {
			s.marks[n.Mark] = idx
		}
	}
	s.recs.add(n)
}

// ReadNodes reads a nodes file in CSV or JSON (see the package
// documentation for the formats), validating every record and checking
// names, addresses and marks are unique. On any problem it returns nil
// and an *Errors listing them.
func ReadNodes(r io.Reader, opts Options) ([]NodeRecord, error) {
	in, err := open(r, &opts)
	if err != nil {
		return nil, err
	}
	defer in.cr.finish()
	return readNodes(in, &opts)
}

func readNodes(in *input, opts *Options) ([]NodeRecord, error) {
	c := &collector{max: opts.maxErrors()}
	s := &nodeSet{
		c:     c,
		names: make(map[string]int, min(in.recordHint(opts.maxRecords()), affinity.MaxMark)),
		addrs: make(map[netip.Addr]int, min(in.recordHint(opts.maxRecords()), affinity.MaxMark)),
		marks: make(map[uint16]int),
	}
	if in.format == FormatJSON {
		readJSON(in, opts, c, KindNodes, func(pos Pos, dec decodeFunc) bool {
			var el [ncCount]jsonScalar
			into := make([]json.Unmarshaler, ncCount)
			for i := range el {
				into[i] = &el[i]
			}
			if !dec(nodeColumns[:], into) {
				return false
			}
			var raw, bad [ncCount]string
			for i, j := range el {
				raw[i], bad[i] = j.s, j.bad
			}
			s.add(pos, &raw, &bad)
			return true
		})
	} else {
		readCSV(in, opts, c, KindNodes, nodeColumns[:], nodeRequired[:], func(pos Pos, cols []int, rec []string) {
			var raw [ncCount]string
			for i, ci := range cols {
				if ci >= 0 {
					raw[i] = rec[ci]
				}
			}
			s.add(pos, &raw, nil)
		})
	}
	if err := c.err(); err != nil {
		return nil, err
	}
	return s.recs.flatten(), nil
}

package affinity

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// The binary encoding of nodes, tunnels and changes, used by the store and
// by replication. It is compact (a million tunnels load in about a second)
// and versioned by a leading byte so that a newer director can refuse what
// it cannot read. Strings and lists carry a uvarint length; addresses carry
// a length byte (4 or 16) and their bytes; times are Unix nanoseconds.
//
// Versions: 1 is the original; 2 adds the node's health record after its
// IPv6 address. A record (or batch) is written in the lowest version that
// holds it: version 1 while no node in it has a health record, so stores
// and pairs that never used health checks read and write what they always
// did, and a director of the previous release still reads them.

const (
	codecV1 = 1
	// codecHealth adds NodeHealth to nodes.
	codecHealth = 2
	// codecVersion is the newest version this director reads.
	codecVersion = codecHealth
)

// ErrCodec is wrapped by every decoding error.
var ErrCodec = errors.New("malformed record")

type encoder struct {
	b []byte
	v byte // the version written
}

func (e *encoder) byte(v byte)      { e.b = append(e.b, v) }
func (e *encoder) uvarint(v uint64) { e.b = binary.AppendUvarint(e.b, v) }
func (e *encoder) varint(v int64)   { e.b = binary.AppendVarint(e.b, v) }
func (e *encoder) str(s string)     { e.uvarint(uint64(len(s))); e.b = append(e.b, s...) }
func (e *encoder) addr(a netip.Addr) {
	switch {
	case a.Is4():
		b := a.As4()
		e.byte(4)
		e.b = append(e.b, b[:]...)
	case a.Is6():
		b := a.As16()
		e.byte(16)
		e.b = append(e.b, b[:]...)
	default:
		e.byte(0)
	}
}

type decoder struct {
	b   []byte
	v   byte // the version read
	err error
}

// version reads the leading version byte of a record of the given kind.
func (d *decoder) version(kind string) error {
	v := d.byte("version")
	if d.err != nil {
		return d.err
	}
	if v < codecV1 || v > codecVersion {
		return fmt.Errorf("%w: %s record version %d, this director reads %d to %d", ErrCodec, kind, v, codecV1, codecVersion)
	}
	d.v = v
	return nil
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: truncated or bad %s", ErrCodec, what)
	}
}

func (d *decoder) byte(what string) byte {
	if d.err != nil || len(d.b) < 1 {
		d.fail(what)
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint(what string) int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail(what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) str(what string, max int) string {
	n := d.uvarint(what)
	if d.err != nil || n > uint64(max) || n > uint64(len(d.b)) {
		d.fail(what)
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

func (d *decoder) addr(what string) netip.Addr {
	switch d.byte(what) {
	case 0:
		return netip.Addr{}
	case 4:
		if len(d.b) < 4 {
			d.fail(what)
			return netip.Addr{}
		}
		a := netip.AddrFrom4([4]byte(d.b[:4]))
		d.b = d.b[4:]
		return a
	case 16:
		if len(d.b) < 16 {
			d.fail(what)
			return netip.Addr{}
		}
		a := netip.AddrFrom16([16]byte(d.b[:16]))
		d.b = d.b[16:]
		return a
	default:
		d.fail(what)
		return netip.Addr{}
	}
}

func (d *decoder) count(what string, max int) int {
	n := d.uvarint(what)
	if d.err != nil || n > uint64(max) {
		d.fail(what)
		return 0
	}
	return int(n)
}

func (e *encoder) node(n *Node) {
	e.str(n.Name)
	e.addr(n.Addr)
	e.uvarint(uint64(n.Weight))
	e.uvarint(uint64(n.Capacity))
	e.byte(byte(n.State))
	e.uvarint(uint64(n.Mark))
	e.str(n.Comment)
	e.addr(n.Addr6)
	if e.v >= codecHealth {
		e.health(&n.Health)
	}
}

// time writes t as Unix nanoseconds, the zero time as 0.
func (e *encoder) time(t time.Time) {
	if t.IsZero() {
		e.varint(0)
		return
	}
	e.varint(t.UnixNano())
}

func (e *encoder) health(h *NodeHealth) {
	var flags byte
	if h.Down {
		flags |= 1
	}
	e.byte(flags)
	e.time(h.Since)
	e.str(h.Reason)
	e.uvarint(uint64(len(h.Downs)))
	for _, t := range h.Downs {
		e.time(t)
	}
	e.time(h.HoldUntil)
	e.uvarint(uint64(h.Holds))
}

func (d *decoder) time(what string) time.Time {
	v := d.varint(what)
	if v == 0 {
		return time.Time{}
	}
	return time.Unix(0, v).UTC()
}

func (d *decoder) health() NodeHealth {
	var h NodeHealth
	flags := d.byte("health flags")
	if flags&^1 != 0 {
		d.fail("health flags")
	}
	h.Down = flags&1 != 0
	h.Since = d.time("health since")
	h.Reason = d.str("health reason", MaxHealthReason)
	n := d.count("health downs", MaxHealthDowns)
	if n > 0 {
		h.Downs = make([]time.Time, 0, n)
	}
	for i := 0; i < n && d.err == nil; i++ {
		h.Downs = append(h.Downs, d.time("health down time"))
	}
	h.HoldUntil = d.time("health hold")
	holds := d.uvarint("health holds")
	if holds > maxHealthHolds {
		d.fail("health holds")
	}
	h.Holds = int(holds)
	return h
}

// nodeVersion is the lowest version that holds the node.
func nodeVersion(n *Node) byte {
	if n.Health.IsZero() {
		return codecV1
	}
	return codecHealth
}

func (d *decoder) node() Node {
	var n Node
	n.Name = d.str("node name", 128)
	n.Addr = d.addr("node address")
	w := d.uvarint("node weight")
	c := d.uvarint("node capacity")
	n.State = NodeState(d.byte("node state"))
	m := d.uvarint("node mark")
	n.Comment = d.str("node comment", 1024)
	n.Addr6 = d.addr("node IPv6 address")
	if d.v >= codecHealth {
		n.Health = d.health()
	}
	if w > 1<<32-1 || c > 1<<31 || m > MaxMark || n.State > NodeDown {
		d.fail("node fields")
	}
	n.Weight, n.Capacity, n.Mark = uint32(w), int(c), uint16(m)
	return n
}

func (e *encoder) tunnel(t *Tunnel) {
	e.str(t.ID)
	e.addr(t.Peer)
	e.uvarint(uint64(len(t.Subnets)))
	for _, p := range t.Subnets {
		e.addr(p.Addr())
		e.byte(byte(p.Bits()))
	}
	e.str(t.Node)
	var flags byte
	if t.Pinned {
		flags |= flagPinned
	}
	if t.Learned {
		flags |= flagLearned
	}
	if !t.Seen.IsZero() {
		flags |= flagSeen
	}
	e.byte(flags)
	e.str(t.Comment)
	e.varint(t.Created.UnixNano())
	e.varint(t.Updated.UnixNano())
	e.uvarint(t.Revision)
	if flags&flagSeen != 0 {
		e.varint(t.Seen.UnixNano())
	}
}

// Tunnel flags. A field added after version 1 is announced by a flag and
// follows the record's version-1 fields, so records written before it
// (flag clear) still decode.
const (
	flagPinned  = 1 << 0
	flagLearned = 1 << 1
	flagSeen    = 1 << 2 // Seen follows Revision
	tunnelFlags = flagPinned | flagLearned | flagSeen
)

func (d *decoder) tunnel() Tunnel {
	var t Tunnel
	t.ID = d.str("tunnel id", 128)
	t.Peer = d.addr("tunnel peer")
	n := d.count("subnet count", 64)
	if n > 0 {
		t.Subnets = make([]netip.Prefix, 0, n)
	}
	for i := 0; i < n && d.err == nil; i++ {
		a := d.addr("subnet address")
		bits := int(d.byte("subnet length"))
		p := netip.PrefixFrom(a, bits)
		if d.err == nil && !p.IsValid() {
			d.fail("subnet")
		}
		t.Subnets = append(t.Subnets, p)
	}
	t.Node = d.str("tunnel node", 128)
	flags := d.byte("tunnel flags")
	if flags&^tunnelFlags != 0 {
		d.fail("tunnel flags")
	}
	t.Pinned = flags&flagPinned != 0
	t.Learned = flags&flagLearned != 0
	t.Comment = d.str("tunnel comment", 1024)
	t.Created = time.Unix(0, d.varint("created")).UTC()
	t.Updated = time.Unix(0, d.varint("updated")).UTC()
	t.Revision = d.uvarint("revision")
	if flags&flagSeen != 0 {
		t.Seen = time.Unix(0, d.varint("seen")).UTC()
	}
	return t
}

// MarshalNode encodes a node.
func MarshalNode(n *Node) []byte {
	e := encoder{b: make([]byte, 0, 64), v: nodeVersion(n)}
	e.byte(e.v)
	e.node(n)
	return e.b
}

// UnmarshalNode decodes a node.
func UnmarshalNode(b []byte) (Node, error) {
	d := decoder{b: b}
	if err := d.version("node"); err != nil {
		return Node{}, err
	}
	n := d.node()
	return n, d.finish()
}

// MarshalTunnel encodes a tunnel.
func MarshalTunnel(t *Tunnel) []byte { return AppendTunnel(make([]byte, 0, 96), t) }

// AppendTunnel appends the encoding MarshalTunnel returns to b: a bulk
// writer encodes a million records into a few large buffers instead of a
// million small ones.
func AppendTunnel(b []byte, t *Tunnel) []byte {
	e := encoder{b: b, v: codecV1}
	e.byte(e.v)
	e.tunnel(t)
	return e.b
}

// UnmarshalTunnel decodes a tunnel.
func UnmarshalTunnel(b []byte) (Tunnel, error) {
	d := decoder{b: b}
	if err := d.version("tunnel"); err != nil {
		return Tunnel{}, err
	}
	t := d.tunnel()
	return t, d.finish()
}

func (d *decoder) finish() error {
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%w: %d trailing bytes", ErrCodec, len(d.b))
	}
	return d.err
}

// MarshalChanges encodes a batch of resolved changes.
func MarshalChanges(cs []Change) []byte {
	e := encoder{b: make([]byte, 0, 16+96*len(cs)), v: codecV1}
	for i := range cs {
		if cs[i].Kind == PutNode && cs[i].Node != nil {
			e.v = max(e.v, nodeVersion(cs[i].Node))
		}
	}
	e.byte(e.v)
	e.uvarint(uint64(len(cs)))
	for i := range cs {
		c := &cs[i]
		e.byte(byte(c.Kind))
		e.str(c.Reason)
		switch c.Kind {
		case PutNode:
			e.node(c.Node)
		case PutTunnel:
			e.tunnel(c.Tunnel)
		case PutBucket:
			e.uvarint(uint64(c.Bucket.Count))
			e.uvarint(uint64(c.Bucket.Index))
			e.uvarint(uint64(c.Bucket.Mark))
		default:
			e.str(c.Name)
		}
	}
	return e.b
}

// UnmarshalChanges decodes a batch of changes.
func UnmarshalChanges(b []byte) ([]Change, error) {
	d := decoder{b: b}
	if err := d.version("change"); err != nil {
		return nil, err
	}
	// Each change takes at least 3 bytes, which bounds the count before
	// anything is allocated for it.
	n := d.count("change count", len(b)/3)
	out := make([]Change, 0, n)
	for i := 0; i < n && d.err == nil; i++ {
		c := Change{Kind: ChangeKind(d.byte("change kind"))}
		c.Reason = d.str("change reason", 4096)
		switch c.Kind {
		case PutNode:
			c.Node = ptr(d.node())
		case PutTunnel:
			c.Tunnel = ptr(d.tunnel())
		case DeleteNode, DeleteTunnel:
			c.Name = d.str("change name", 128)
		case PutBucket:
			b := BucketMark{Count: d.count("bucket count", MaxBuckets), Index: d.count("bucket index", MaxBuckets), Mark: uint16(d.count("bucket mark", MaxMark))}
			if d.err == nil && b.validate() != nil {
				d.fail("bucket")
			}
			c.Bucket = &b
		default:
			d.fail("change kind")
		}
		out = append(out, c)
	}
	if err := d.finish(); err != nil {
		return nil, err
	}
	return out, nil
}

// MarshalBuckets encodes a bucket assignment as the store keeps it: one
// record, two bytes per bucket (8 KiB at 4,096 buckets).
func MarshalBuckets(marks []uint16) []byte {
	e := encoder{b: make([]byte, 0, 4+2*len(marks))}
	// Its layout has not changed since version 1: a director of the
	// previous release still reads it.
	e.byte(codecV1)
	e.uvarint(uint64(len(marks)))
	for _, m := range marks {
		e.b = binary.BigEndian.AppendUint16(e.b, m)
	}
	return e.b
}

// UnmarshalBuckets decodes MarshalBuckets' record (nil for no buckets).
func UnmarshalBuckets(b []byte) ([]uint16, error) {
	d := decoder{b: b}
	if v := d.byte("version"); d.err == nil && v != codecV1 {
		return nil, fmt.Errorf("%w: bucket record version %d, this director reads %d", ErrCodec, v, codecV1)
	}
	n := d.count("bucket count", MaxBuckets)
	if d.err == nil && len(d.b) != 2*n {
		return nil, fmt.Errorf("%w: %d buckets in %d bytes", ErrCodec, n, len(d.b))
	}
	if d.err != nil || n == 0 {
		return nil, d.finish()
	}
	out := make([]uint16, n)
	for i := range out {
		out[i] = binary.BigEndian.Uint16(d.b[2*i:])
		if out[i] > MaxMark {
			return nil, fmt.Errorf("%w: bucket %d: mark %d above %d", ErrCodec, i, out[i], MaxMark)
		}
	}
	return out, nil
}

package ctsync

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/tunneldirector/tunneldirector/ipvs/conntrack"
)

// Records are what the conntrack stream carries (the replication link
// frames, sequences and authenticates them; see package replication).
// A record is self-delimiting, so a datagram holds whole records, back to
// back:
//
//	put      1, flags, proto, orig src, orig dst, [orig ports],
//	         [reply src, reply dst, [reply ports]]   (flags&fNAT)
//	         status uvarint, timeout uvarint,
//	         [TCP state, wscale orig, wscale reply, flags orig, flags reply] (flags&fTCP)
//	         [mark u32] (flags&fMark), [zone u16] (flags&fZone)
//	destroy  2, flags, proto, orig src, orig dst, [orig ports], [zone u16]
//	begin    3, generation uvarint   a full resync starts
//	end      4, generation uvarint   it ended: what it did not carry is gone
//
// Addresses are 4 bytes (IPv4) or 16 (flags&fV6); ports are two
// big-endian u16 for the protocols whose tuples have them (ICMP's echo id
// and type/code included). A put of an established IPv4 TCP flow without
// NAT is 24 bytes.
const (
	recPut     = 1
	recDestroy = 2
	recBegin   = 3
	recEnd     = 4
)

// Record flags.
const (
	fV6   = 1 << 0
	fNAT  = 1 << 1
	fTCP  = 1 << 2
	fMark = 1 << 3
	fZone = 1 << 4
	fAll  = fV6 | fNAT | fTCP | fMark | fZone
)

// maxRecord is the longest record: an IPv6 NAT put with every option.
const maxRecord = 3 + 4*16 + 2*4 + 2*binary.MaxVarintLen32 + 5 + 4 + 2

// errRecord is wrapped by every decoding error.
var errRecord = errors.New("malformed conntrack record")

func recErr(format string, a ...any) error {
	return fmt.Errorf("%w: %s", errRecord, fmt.Sprintf(format, a...))
}

// ports says whether a protocol's tuple carries the two 16-bit fields.
func ports(proto uint8) bool { return conntrack.TupleHasPorts(proto) }

func appendTuple(b []byte, t *conntrack.Tuple) []byte {
	if t.V6 {
		b = append(b, t.Src[:]...)
		b = append(b, t.Dst[:]...)
	} else {
		b = append(b, t.Src[12:]...)
		b = append(b, t.Dst[12:]...)
	}
	if ports(t.Proto) {
		b = binary.BigEndian.AppendUint16(b, t.SrcPort)
		b = binary.BigEndian.AppendUint16(b, t.DstPort)
	}
	return b
}

// keyFlags are the flags of what both a put and a destroy record carry:
// the family and the zone.
func keyFlags(f *conntrack.Flow) byte {
	flags := byte(0)
	if f.Orig.V6 {
		flags |= fV6
	}
	if f.Zone != 0 {
		flags |= fZone
	}
	return flags
}

// appendPut encodes a flow's put record.
func appendPut(b []byte, f *conntrack.Flow) []byte {
	flags := keyFlags(f)
	nat := f.NAT()
	if nat {
		flags |= fNAT
	}
	if f.TCP.Set {
		flags |= fTCP
	}
	if f.Mark != 0 {
		flags |= fMark
	}
	b = append(b, recPut, flags, f.Orig.Proto)
	b = appendTuple(b, &f.Orig)
	if nat {
		b = appendTuple(b, &f.Reply)
	}
	b = binary.AppendUvarint(b, uint64(f.Status))
	b = binary.AppendUvarint(b, uint64(f.Timeout))
	if f.TCP.Set {
		b = append(b, f.TCP.State, f.TCP.WScaleOrig, f.TCP.WScaleReply, f.TCP.FlagsOrig, f.TCP.FlagsReply)
	}
	if f.Mark != 0 {
		b = binary.BigEndian.AppendUint32(b, f.Mark)
	}
	if f.Zone != 0 {
		b = binary.BigEndian.AppendUint16(b, f.Zone)
	}
	return b
}

// appendDestroy encodes the destroy record of a flow's key.
func appendDestroy(b []byte, f *conntrack.Flow) []byte {
	b = append(b, recDestroy, keyFlags(f), f.Orig.Proto)
	b = appendTuple(b, &f.Orig)
	if f.Zone != 0 {
		b = binary.BigEndian.AppendUint16(b, f.Zone)
	}
	return b
}

func appendMarker(b []byte, kind byte, gen uint32) []byte {
	return binary.AppendUvarint(append(b, kind), uint64(gen))
}

// reader decodes records one after the other.
type reader struct {
	b   []byte
	err error
}

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if len(r.b) < n {
		r.err = recErr("truncated: %d bytes left, %d needed", len(r.b), n)
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() uint8 {
	if v := r.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if v := r.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if v := r.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (r *reader) uvarint32(what string) uint32 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 || v > 1<<32-1 {
		r.err = recErr("%s: bad varint", what)
		return 0
	}
	r.b = r.b[n:]
	return uint32(v)
}

func (r *reader) tuple(t *conntrack.Tuple, proto uint8, v6 bool) {
	t.Proto, t.V6 = proto, v6
	if v6 {
		copy(t.Src[:], r.take(16))
		copy(t.Dst[:], r.take(16))
	} else {
		t.Src = [16]byte{10: 0xff, 11: 0xff}
		t.Dst = t.Src
		copy(t.Src[12:], r.take(4))
		copy(t.Dst[12:], r.take(4))
	}
	if ports(proto) {
		t.SrcPort, t.DstPort = r.u16(), r.u16()
	}
}

// record is one decoded record.
type record struct {
	kind byte
	flow conntrack.Flow
	gen  uint32
}

// next decodes the next record into rec; false at the end or on an error
// (then r.err is set).
func (r *reader) next(rec *record) bool {
	if len(r.b) == 0 || r.err != nil {
		return false
	}
	rec.kind = r.u8()
	switch rec.kind {
	case recBegin, recEnd:
		rec.gen = r.uvarint32("generation")
		return r.err == nil
	case recPut, recDestroy:
	default:
		r.err = recErr("unknown kind %d", rec.kind)
		return false
	}
	flags, proto := r.u8(), r.u8()
	if flags&^fAll != 0 || (rec.kind == recDestroy && flags&(fNAT|fTCP|fMark) != 0) {
		r.err = recErr("kind %d with flags %#x", rec.kind, flags)
		return false
	}
	f := &rec.flow
	*f = conntrack.Flow{}
	v6 := flags&fV6 != 0
	r.tuple(&f.Orig, proto, v6)
	if flags&fNAT != 0 {
		r.tuple(&f.Reply, proto, v6)
	} else {
		f.Reply = f.Orig.Inverse()
	}
	if rec.kind == recPut {
		f.Status = r.uvarint32("status")
		f.Timeout = r.uvarint32("timeout")
		if flags&fTCP != 0 {
			v := r.take(5)
			if v != nil {
				f.TCP = conntrack.TCPInfo{Set: true, State: v[0], WScaleOrig: v[1], WScaleReply: v[2], FlagsOrig: v[3], FlagsReply: v[4]}
			}
		}
		if flags&fMark != 0 {
			f.Mark = r.u32()
		}
	}
	if flags&fZone != 0 {
		f.Zone = r.u16()
	}
	return r.err == nil
}

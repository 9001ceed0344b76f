package replication

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
)

// Wire format constants. See the package documentation for the layout.
const (
	// Magic opens every datagram.
	Magic = "TDR1"
	// Version is the wire version this director speaks.
	Version = 1
	// HeaderLen is the fixed header: magic, version, type, flags, sender,
	// epoch, sequence number.
	HeaderLen = 4 + 1 + 1 + 1 + 4 + 8 + 8
	// TagLen is the truncated HMAC-SHA256 tag closing every datagram.
	TagLen = 16
	// tlvHead is the type and length in front of every TLV value.
	tlvHead = 4
	// Critical marks a TLV type the receiver must understand: a datagram
	// with an unknown critical TLV is refused instead of half-read.
	Critical = 0x8000
)

// MsgType is the datagram type.
type MsgType uint8

// Datagram types.
const (
	MsgStatus  MsgType = 1 // role, revision and epoch; the backup's doubles as ACK
	MsgData    MsgType = 2 // one part of one committed revision
	MsgNack    MsgType = 3 // backup asks for revisions or parts it lacks
	MsgDigest  MsgType = 4 // backup's per-bucket digest at a revision
	MsgVerdict MsgType = 5 // master's answer to a digest
	MsgChunk   MsgType = 6 // one chunk of a snapshot, repair or pull transfer
	MsgXferReq MsgType = 7 // receiver asks for a transfer or the chunks it lacks
)

var msgNames = map[MsgType]string{MsgStatus: "status", MsgData: "data", MsgNack: "nack",
	MsgDigest: "digest", MsgVerdict: "verdict", MsgChunk: "chunk", MsgXferReq: "xfer-request"}

// String names the type for logs.
func (t MsgType) String() string {
	if n, ok := msgNames[t]; ok {
		return n
	}
	return fmt.Sprintf("MsgType(%d)", uint8(t))
}

// TLV types. Values are big-endian integers or opaque bytes.
const (
	tRole      = 1  // u8
	tRev       = 2  // u64
	tRevEpoch  = 3  // u64: epoch of the master that wrote tRev
	tPrev      = 4  // u64: revision before tRev on the master
	tPart      = 5  // u32
	tParts     = 6  // u32
	tBlob      = 7  // bytes: a slice of an encoded change batch or transfer
	tFrom      = 8  // u64
	tHave      = 9  // u64, repeated: complete revisions held but not applied
	tPartial   = 10 // u64 rev then u32 missing part indices, repeated
	tNodesHash = 11 // u64
	tBuckets   = 12 // u16 first bucket then u32 sums
	tMatch     = 13 // u8
	tBitmap    = 14 // 32 bytes: a set of buckets
	tXferID    = 15 // u64
	tKind      = 16 // u8
	tChunk     = 17 // u32
	tChunks    = 18 // u32
	tRange     = 21 // u32 start, u32 end (exclusive), repeated
	tHistory   = 22 // u64 epoch, u64 first revision, repeated
	tTime      = 23 // i64 Unix nanoseconds
	tState     = 25 // u8 sync state
	tMasterRev = 26 // u64: the sender's view of the master's revision
	tPrevEpoch = 27 // u64: epoch that wrote tPrev
)

// Errors the decoder returns; the replicator counts each kind.
var (
	ErrShort     = errors.New("datagram too short")
	ErrMagic     = errors.New("not a tunneldirector replication datagram (bad magic)")
	ErrVersion   = errors.New("unsupported wire version")
	ErrAuth      = errors.New("authentication failed")
	ErrMalformed = errors.New("malformed datagram")
)

// Header is the fixed part of a datagram.
type Header struct {
	Type   MsgType
	Flags  uint8
	Sender uint32
	Epoch  uint64
	Seq    uint64
}

// TLV is one type-length-value field; Value aliases the datagram.
type TLV struct {
	Type  uint16
	Value []byte
}

// Packet is an authenticated, parsed datagram.
type Packet struct {
	Header
	Fields []TLV
}

// codec seals and opens datagrams with one shared key. HMAC-SHA256 was
// chosen over an AEAD: the design asks for integrity and authenticity, not
// secrecy, of a dedicated link; an HMAC has no nonce to manage across
// restarts (a repeated AES-GCM nonce under one key leaks the key stream
// and the authentication key), and clear-text datagrams stay readable in a
// packet capture when debugging a pair. Truncation to 128 bits keeps the
// forgery bound at 2^-128 per try. A codec is not safe for concurrent use.
type codec struct {
	mac hash.Hash
	sum []byte
}

func newCodec(key []byte) *codec {
	return &codec{mac: hmac.New(sha256.New, key), sum: make([]byte, 0, sha256.Size)}
}

func (c *codec) tag(b []byte) []byte {
	c.mac.Reset()
	c.mac.Write(b)
	c.sum = c.mac.Sum(c.sum[:0])
	return c.sum[:TagLen]
}

// builder assembles one datagram.
type builder struct{ b []byte }

func (w *builder) start(buf []byte, h Header) {
	w.b = append(buf[:0], Magic...)
	w.b = append(w.b, Version, byte(h.Type), h.Flags)
	w.b = binary.BigEndian.AppendUint32(w.b, h.Sender)
	w.b = binary.BigEndian.AppendUint64(w.b, h.Epoch)
	w.b = binary.BigEndian.AppendUint64(w.b, h.Seq)
}

func (w *builder) bytes(t uint16, v []byte) {
	w.b = binary.BigEndian.AppendUint16(w.b, t)
	w.b = binary.BigEndian.AppendUint16(w.b, uint16(len(v)))
	w.b = append(w.b, v...)
}

func (w *builder) u8(t uint16, v uint8) { w.bytes(t, []byte{v}) }
func (w *builder) u32(t uint16, v uint32) {
	w.bytes(t, binary.BigEndian.AppendUint32(nil, v))
}
func (w *builder) u64(t uint16, v uint64) {
	w.b = binary.BigEndian.AppendUint16(w.b, t)
	w.b = binary.BigEndian.AppendUint16(w.b, 8)
	w.b = binary.BigEndian.AppendUint64(w.b, v)
}

// raw appends already-encoded TLVs (a message body kept for resending).
func (w *builder) raw(body []byte) { w.b = append(w.b, body...) }

func (w *builder) seal(c *codec) []byte {
	w.b = append(w.b, c.tag(w.b)...)
	return w.b
}

// decode checks and parses a datagram: length, magic, version, tag, TLV
// framing. Replay protection is the caller's, since it needs state.
func (c *codec) decode(b []byte) (Packet, error) {
	var p Packet
	if len(b) < HeaderLen+TagLen {
		return p, fmt.Errorf("%w: %d bytes", ErrShort, len(b))
	}
	if string(b[:4]) != Magic {
		return p, ErrMagic
	}
	if b[4] != Version {
		return p, fmt.Errorf("%w %d: this director speaks version %d; upgrade it or its peer", ErrVersion, b[4], Version)
	}
	body, tag := b[:len(b)-TagLen], b[len(b)-TagLen:]
	if !hmac.Equal(c.tag(body), tag) {
		return p, ErrAuth
	}
	p.Type = MsgType(b[5])
	p.Flags = b[6]
	p.Sender = binary.BigEndian.Uint32(b[7:])
	p.Epoch = binary.BigEndian.Uint64(b[11:])
	p.Seq = binary.BigEndian.Uint64(b[19:])
	rest := body[HeaderLen:]
	for len(rest) > 0 {
		if len(rest) < tlvHead {
			return p, fmt.Errorf("%w: truncated TLV header", ErrMalformed)
		}
		t := binary.BigEndian.Uint16(rest)
		n := int(binary.BigEndian.Uint16(rest[2:]))
		if len(rest) < tlvHead+n {
			return p, fmt.Errorf("%w: TLV %d of %d bytes overruns the datagram", ErrMalformed, t, n)
		}
		p.Fields = append(p.Fields, TLV{Type: t, Value: rest[tlvHead : tlvHead+n]})
		rest = rest[tlvHead+n:]
	}
	return p, nil
}

// fields reads typed values out of a packet's TLVs. Unknown TLVs are
// skipped unless critical; a known TLV of the wrong size is an error.
type fields struct {
	p   *Packet
	err error
}

func (f *fields) fail(format string, a ...any) {
	if f.err == nil {
		f.err = fmt.Errorf("%w: %s %s", ErrMalformed, f.p.Type, fmt.Sprintf(format, a...))
	}
}

func (f *fields) get(t uint16) []byte {
	for _, v := range f.p.Fields {
		if v.Type == t {
			return v.Value
		}
	}
	return nil
}

func (f *fields) has(t uint16) bool {
	for _, v := range f.p.Fields {
		if v.Type == t {
			return true
		}
	}
	return false
}

func (f *fields) u64(t uint16) uint64 {
	v := f.get(t)
	if v == nil {
		return 0
	}
	if len(v) != 8 {
		f.fail("TLV %d: %d bytes, want 8", t, len(v))
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

func (f *fields) u32(t uint16) uint32 {
	v := f.get(t)
	if v == nil {
		return 0
	}
	if len(v) != 4 {
		f.fail("TLV %d: %d bytes, want 4", t, len(v))
		return 0
	}
	return binary.BigEndian.Uint32(v)
}

func (f *fields) u8(t uint16) uint8 {
	v := f.get(t)
	if v == nil {
		return 0
	}
	if len(v) != 1 {
		f.fail("TLV %d: %d bytes, want 1", t, len(v))
		return 0
	}
	return v[0]
}

func (f *fields) need(ts ...uint16) {
	for _, t := range ts {
		if !f.has(t) {
			f.fail("lacks TLV %d", t)
		}
	}
}

// checkCritical refuses a packet carrying a critical TLV this version does
// not know.
func checkCritical(p *Packet, known func(uint16) bool) error {
	for _, v := range p.Fields {
		if v.Type&Critical != 0 && !known(v.Type&^Critical) {
			return fmt.Errorf("%w: %s carries unknown critical TLV %d", ErrMalformed, p.Type, v.Type&^Critical)
		}
	}
	return nil
}

func knownTLV(t uint16) bool { return t >= tRole && t <= tPrevEpoch }

// Replay protection: a sliding window of the last windowBits sequence
// numbers per (sender, epoch), as IPsec's anti-replay window (RFC 4303
// section 3.4.3). Senders start their sequence at the boot time in
// nanoseconds, so a restarted sender is ahead of everything it sent before.

const windowBits = 1024

type replayKey struct {
	sender uint32
	epoch  uint64
}

type replayWindow struct {
	top  uint64
	bits [windowBits / 64]uint64
}

// check reports whether seq is new, and records it if so.
func (w *replayWindow) check(seq uint64) bool {
	if seq == 0 {
		return false
	}
	if seq > w.top {
		shift := seq - w.top
		if shift >= windowBits {
			w.bits = [windowBits / 64]uint64{}
		} else {
			for i := w.top + 1; i <= seq; i++ {
				w.bits[(i%windowBits)/64] &^= 1 << (i % 64)
			}
		}
		w.top = seq
		w.bits[(seq%windowBits)/64] |= 1 << (seq % 64)
		return true
	}
	if w.top-seq >= windowBits {
		return false
	}
	word, bit := (seq%windowBits)/64, uint64(1)<<(seq%64)
	if w.bits[word]&bit != 0 {
		return false
	}
	w.bits[word] |= bit
	return true
}

// replayTable holds the windows of the few (sender, epoch) pairs alive at
// once; the oldest epochs are forgotten first.
type replayTable struct {
	m map[replayKey]*replayWindow
	// floor is, per sender, the highest epoch whose window was
	// forgotten: datagrams of that epoch or older are refused rather than
	// given a fresh window an old capture could replay into.
	floor map[uint32]uint64
}

const maxReplayWindows = 16

func (t *replayTable) check(sender uint32, epoch, seq uint64) bool {
	if t.m == nil {
		t.m = make(map[replayKey]*replayWindow)
		t.floor = make(map[uint32]uint64)
	}
	if f, ok := t.floor[sender]; ok && epoch <= f {
		return false
	}
	k := replayKey{sender, epoch}
	w := t.m[k]
	if w == nil {
		if len(t.m) >= maxReplayWindows {
			var oldest replayKey
			first := true
			for kk := range t.m {
				if first || kk.epoch < oldest.epoch || (kk.epoch == oldest.epoch && kk.sender < oldest.sender) {
					oldest, first = kk, false
				}
			}
			delete(t.m, oldest)
			if oldest.epoch > t.floor[oldest.sender] || t.floor[oldest.sender] == 0 {
				t.floor[oldest.sender] = oldest.epoch
			}
		}
		w = &replayWindow{}
		t.m[k] = w
	}
	return w.check(seq)
}

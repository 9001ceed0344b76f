package ike

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// ErrMalformed is wrapped by every decoding error.
var ErrMalformed = errors.New("malformed IKE message")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
}

// Header is the fixed IKE header.
type Header struct {
	SPIi, SPIr uint64
	// Next is the type of the first payload.
	Next      PayloadType
	Version   uint8
	Exchange  ExchangeType
	Flags     uint8
	MessageID uint32
	// Length is the whole message's length, header included.
	Length uint32
}

// IsResponse reports whether the Response flag is set.
func (h *Header) IsResponse() bool { return h.Flags&FlagResponse != 0 }

// FromInitiator reports whether the Initiator flag is set.
func (h *Header) FromInitiator() bool { return h.Flags&FlagInitiator != 0 }

// Payload is one payload of the chain, with its body undecoded.
type Payload struct {
	Type     PayloadType
	Critical bool
	// Body is the payload without its generic header; it aliases the
	// parsed buffer.
	Body []byte
}

// Message is a decoded IKE message.
type Message struct {
	Header
	Payloads []Payload
}

// Parse decodes one IKE message (as carried on UDP 500, without the
// non-ESP marker of port 4500). It checks the header, that the header's
// length equals len(b), and the payload chain to its end; an SK or SKF
// payload must be the last. Payload bodies alias b.
func Parse(b []byte) (*Message, error) {
	if len(b) < HeaderLen {
		return nil, malformed("%d bytes, shorter than the %d-byte header", len(b), HeaderLen)
	}
	if len(b) > MaxMessageLen {
		return nil, malformed("%d bytes, longer than %d", len(b), MaxMessageLen)
	}
	m := &Message{Header: Header{
		SPIi:      binary.BigEndian.Uint64(b[0:8]),
		SPIr:      binary.BigEndian.Uint64(b[8:16]),
		Next:      PayloadType(b[16]),
		Version:   b[17],
		Exchange:  ExchangeType(b[18]),
		Flags:     b[19],
		MessageID: binary.BigEndian.Uint32(b[20:24]),
		Length:    binary.BigEndian.Uint32(b[24:28]),
	}}
	if m.Version>>4 != 2 {
		return nil, malformed("major version %d, not 2", m.Version>>4)
	}
	if int64(m.Length) != int64(len(b)) {
		return nil, malformed("header length %d but %d bytes received", m.Length, len(b))
	}
	if m.SPIi == 0 {
		return nil, malformed("initiator SPI is zero")
	}
	next := m.Next
	rest := b[HeaderLen:]
	for next != PayloadNone {
		if len(m.Payloads) > 0 && (m.Payloads[len(m.Payloads)-1].Type == PayloadSK || m.Payloads[len(m.Payloads)-1].Type == PayloadSKF) {
			return nil, malformed("payload %s after an encrypted payload", next)
		}
		if len(rest) < payloadHeaderLen {
			return nil, malformed("payload %s (#%d): %d bytes left, shorter than a payload header", next, len(m.Payloads)+1, len(rest))
		}
		plen := int(binary.BigEndian.Uint16(rest[2:4]))
		if plen < payloadHeaderLen || plen > len(rest) {
			return nil, malformed("payload %s (#%d): length %d does not fit the %d bytes left", next, len(m.Payloads)+1, plen, len(rest))
		}
		p := Payload{Type: next, Critical: rest[1]&0x80 != 0, Body: rest[payloadHeaderLen:plen:plen]}
		m.Payloads = append(m.Payloads, p)
		if next == PayloadSK || next == PayloadSKF {
			// The SK payload's Next Payload names the first payload
			// inside the encryption; nothing follows it outside.
			rest = rest[plen:]
			break
		}
		next = PayloadType(rest[0])
		rest = rest[plen:]
	}
	if len(rest) != 0 {
		return nil, malformed("%d bytes after the last payload", len(rest))
	}
	return m, nil
}

// Marshal encodes the message. The header's Next and Length are computed
// from the payloads; Critical is kept. (An SK payload's Next Payload, the
// type of the first encrypted payload, is written as zero: the health
// checks never build one.)
func (m *Message) Marshal() []byte {
	n := HeaderLen
	for _, p := range m.Payloads {
		n += payloadHeaderLen + len(p.Body)
	}
	b := make([]byte, HeaderLen, n)
	binary.BigEndian.PutUint64(b[0:8], m.SPIi)
	binary.BigEndian.PutUint64(b[8:16], m.SPIr)
	if len(m.Payloads) > 0 {
		b[16] = byte(m.Payloads[0].Type)
	}
	b[17] = m.Version
	b[18] = byte(m.Exchange)
	b[19] = m.Flags
	binary.BigEndian.PutUint32(b[20:24], m.MessageID)
	binary.BigEndian.PutUint32(b[24:28], uint32(n))
	for i, p := range m.Payloads {
		var next byte
		if i+1 < len(m.Payloads) {
			next = byte(m.Payloads[i+1].Type)
		}
		var flags byte
		if p.Critical {
			flags = 0x80
		}
		b = append(b, next, flags, 0, 0)
		binary.BigEndian.PutUint16(b[len(b)-2:], uint16(payloadHeaderLen+len(p.Body)))
		b = append(b, p.Body...)
	}
	return b
}

// Find returns the first payload of type t.
func (m *Message) Find(t PayloadType) (Payload, bool) {
	for _, p := range m.Payloads {
		if p.Type == t {
			return p, true
		}
	}
	return Payload{}, false
}

// Notify is a decoded Notify payload body.
type Notify struct {
	Protocol uint8
	SPI      []byte
	Type     NotifyType
	Data     []byte
}

// ParseNotify decodes a Notify payload body.
func ParseNotify(b []byte) (Notify, error) {
	if len(b) < 4 {
		return Notify{}, malformed("notify: %d bytes, shorter than 4", len(b))
	}
	spiSize := int(b[1])
	if 4+spiSize > len(b) {
		return Notify{}, malformed("notify: SPI size %d does not fit %d bytes", spiSize, len(b))
	}
	return Notify{
		Protocol: b[0],
		Type:     NotifyType(binary.BigEndian.Uint16(b[2:4])),
		SPI:      b[4 : 4+spiSize],
		Data:     b[4+spiSize:],
	}, nil
}

// Marshal encodes the notify as a payload body.
func (n Notify) Marshal() []byte {
	b := []byte{n.Protocol, byte(len(n.SPI)), 0, 0}
	binary.BigEndian.PutUint16(b[2:4], uint16(n.Type))
	b = append(b, n.SPI...)
	return append(b, n.Data...)
}

// Notifies decodes every Notify payload of the message.
func (m *Message) Notifies() ([]Notify, error) {
	var out []Notify
	for _, p := range m.Payloads {
		if p.Type != PayloadNotify {
			continue
		}
		n, err := ParseNotify(p.Body)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

// KE is a decoded Key Exchange payload body.
type KE struct {
	Group uint16
	Data  []byte
}

// ParseKE decodes a KE payload body.
func ParseKE(b []byte) (KE, error) {
	if len(b) < 4 {
		return KE{}, malformed("KE: %d bytes, shorter than 4", len(b))
	}
	return KE{Group: binary.BigEndian.Uint16(b[0:2]), Data: b[4:]}, nil
}

// Marshal encodes the KE payload body.
func (k KE) Marshal() []byte {
	b := []byte{0, 0, 0, 0}
	binary.BigEndian.PutUint16(b[0:2], k.Group)
	return append(b, k.Data...)
}

// Transform is one transform of a proposal. KeyLength is the key length
// attribute (0: none); other attributes are not kept.
type Transform struct {
	Type      uint8
	ID        uint16
	KeyLength uint16
}

// Proposal is one proposal of an SA payload.
type Proposal struct {
	Number     uint8
	Protocol   uint8
	SPI        []byte
	Transforms []Transform
}

// Has reports whether the proposal contains transform type/id.
func (p *Proposal) Has(typ uint8, id uint16) bool {
	for _, t := range p.Transforms {
		if t.Type == typ && t.ID == id {
			return true
		}
	}
	return false
}

// ParseSA decodes an SA payload body into its proposals.
func ParseSA(b []byte) ([]Proposal, error) {
	var out []Proposal
	for len(b) > 0 {
		if len(b) < 8 {
			return nil, malformed("SA: proposal %d: %d bytes, shorter than 8", len(out)+1, len(b))
		}
		last := b[0]
		plen := int(binary.BigEndian.Uint16(b[2:4]))
		if plen < 8 || plen > len(b) {
			return nil, malformed("SA: proposal %d: length %d does not fit %d bytes", len(out)+1, plen, len(b))
		}
		if last != 0 && last != 2 {
			return nil, malformed("SA: proposal %d: last-substructure %d, want 0 or 2", len(out)+1, last)
		}
		if (last == 0) != (plen == len(b)) {
			return nil, malformed("SA: proposal %d: last-substructure %d disagrees with the %d bytes left", len(out)+1, last, len(b)-plen)
		}
		p := Proposal{Number: b[4], Protocol: b[5]}
		spiSize, nt := int(b[6]), int(b[7])
		body := b[8:plen]
		if spiSize > len(body) {
			return nil, malformed("SA: proposal %d: SPI size %d does not fit", len(out)+1, spiSize)
		}
		if spiSize > 0 {
			p.SPI = body[:spiSize]
		}
		body = body[spiSize:]
		for i := 0; i < nt; i++ {
			t, n, err := parseTransform(body, i+1 == nt)
			if err != nil {
				return nil, fmt.Errorf("SA: proposal %d: transform %d: %w", len(out)+1, i+1, err)
			}
			p.Transforms = append(p.Transforms, t)
			body = body[n:]
		}
		if len(body) != 0 {
			return nil, malformed("SA: proposal %d: %d bytes after %d transforms", len(out)+1, len(body), nt)
		}
		out = append(out, p)
		b = b[plen:]
	}
	if len(out) == 0 {
		return nil, malformed("SA: no proposal")
	}
	return out, nil
}

func parseTransform(b []byte, wantLast bool) (Transform, int, error) {
	if len(b) < 8 {
		return Transform{}, 0, malformed("%d bytes, shorter than 8", len(b))
	}
	last := b[0]
	tlen := int(binary.BigEndian.Uint16(b[2:4]))
	if tlen < 8 || tlen > len(b) {
		return Transform{}, 0, malformed("length %d does not fit %d bytes", tlen, len(b))
	}
	if (last == 0) != wantLast || (last != 0 && last != 3) {
		return Transform{}, 0, malformed("last-substructure %d disagrees with the transform count", last)
	}
	t := Transform{Type: b[4], ID: binary.BigEndian.Uint16(b[6:8])}
	attrs := b[8:tlen]
	for len(attrs) > 0 {
		if len(attrs) < 4 {
			return Transform{}, 0, malformed("attribute: %d bytes, shorter than 4", len(attrs))
		}
		typ := binary.BigEndian.Uint16(attrs[0:2])
		if typ&0x8000 != 0 { // TV: the value is the 2 bytes after the type
			if typ&0x7fff == AttrKeyLength {
				t.KeyLength = binary.BigEndian.Uint16(attrs[2:4])
			}
			attrs = attrs[4:]
			continue
		}
		alen := int(binary.BigEndian.Uint16(attrs[2:4]))
		if 4+alen > len(attrs) {
			return Transform{}, 0, malformed("attribute length %d does not fit %d bytes", alen, len(attrs)-4)
		}
		attrs = attrs[4+alen:]
	}
	return t, tlen, nil
}

// MarshalSA encodes proposals as an SA payload body. Proposal numbers are
// taken as given (RFC 7296: the first is 1, then consecutive).
func MarshalSA(props []Proposal) []byte {
	var b []byte
	for i, p := range props {
		start := len(b)
		last := byte(2)
		if i+1 == len(props) {
			last = 0
		}
		b = append(b, last, 0, 0, 0, p.Number, p.Protocol, byte(len(p.SPI)), byte(len(p.Transforms)))
		b = append(b, p.SPI...)
		for j, t := range p.Transforms {
			tl := byte(3)
			if j+1 == len(p.Transforms) {
				tl = 0
			}
			n := 8
			if t.KeyLength != 0 {
				n += 4
			}
			b = append(b, tl, 0, byte(n>>8), byte(n), t.Type, 0, byte(t.ID>>8), byte(t.ID))
			if t.KeyLength != 0 {
				b = append(b, 0x80, byte(AttrKeyLength), byte(t.KeyLength>>8), byte(t.KeyLength))
			}
		}
		binary.BigEndian.PutUint16(b[start+2:start+4], uint16(len(b)-start))
	}
	return b
}

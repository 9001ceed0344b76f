package ike

import (
	"errors"
	"fmt"
	"strings"
)

// ProbeGroup is the key exchange group of a probe's KE payload: a number
// from the private-use range (RFC 7296 section 3.3.2: 1024-65535) that no
// implementation is configured for. It is listed first in every proposal
// (the KE group must be one the SA payload offers), followed by the groups
// real configurations use. A responder therefore selects a real group and
// answers INVALID_KE_PAYLOAD naming it (or NO_PROPOSAL_CHOSEN when nothing
// matches or no connection is configured for the director's address), and
// keeps no state: it never computes a key exchange or creates a half-open
// IKE_SA. (libreswan 4.10 refuses the unknown group while parsing and
// answers INVALID_SYNTAX, before any state; it logs "malformed payload in
// packet" for each probe.) An accepted probe would: strongSwan keeps a
// half-open IKE_SA for 30 s, asks every initiator for cookies after three
// of them from one address (charon.cookie_threshold_ip) and ignores it
// after five (charon.block_threshold), which would turn a health check
// into the failure it looks for.
const ProbeGroup uint16 = 0xfdfd

// probeDH lists the real groups offered after ProbeGroup, strongest
// common ones first.
var probeDH = []uint16{ProbeGroup, DHCurve25519, DHEcp256, DHEcp384, DHModp3072, DHModp2048}

// ProbeProposals returns the probe's SA proposals: an AEAD proposal
// (AES-GCM-16) and a classic one (AES-CBC with HMAC-SHA2/SHA1), each with
// ProbeGroup and the common real groups.
func ProbeProposals() []Proposal {
	dh := func() []Transform {
		var t []Transform
		for _, g := range probeDH {
			t = append(t, Transform{Type: TransformDH, ID: g})
		}
		return t
	}
	aead := Proposal{Number: 1, Protocol: ProtocolIKE, Transforms: append([]Transform{
		{Type: TransformENCR, ID: EncrAESGCM16, KeyLength: 256},
		{Type: TransformENCR, ID: EncrAESGCM16, KeyLength: 128},
		{Type: TransformPRF, ID: PRFSHA384},
		{Type: TransformPRF, ID: PRFSHA256},
	}, dh()...)}
	cbc := Proposal{Number: 2, Protocol: ProtocolIKE, Transforms: append([]Transform{
		{Type: TransformENCR, ID: EncrAESCBC, KeyLength: 256},
		{Type: TransformENCR, ID: EncrAESCBC, KeyLength: 128},
		{Type: TransformINTEG, ID: IntegSHA256},
		{Type: TransformINTEG, ID: IntegSHA384},
		{Type: TransformINTEG, ID: IntegSHA1},
		{Type: TransformPRF, ID: PRFSHA256},
		{Type: TransformPRF, ID: PRFSHA384},
		{Type: TransformPRF, ID: PRFSHA1},
	}, dh()...)}
	return []Proposal{aead, cbc}
}

// ProbeRequest returns a well-formed IKE_SA_INIT request (HDR, SAi1, KEi,
// Ni) with initiator SPI spi, the probe proposals, a KE payload of
// ProbeGroup carrying keData, and the nonce (16 to 256 bytes).
func ProbeRequest(spi uint64, keData, nonce []byte) []byte {
	m := Message{
		Header: Header{SPIi: spi, Version: Version2, Exchange: IKESAInit, Flags: FlagInitiator},
		Payloads: []Payload{
			{Type: PayloadSA, Body: MarshalSA(ProbeProposals())},
			{Type: PayloadKE, Body: KE{Group: ProbeGroup, Data: keData}.Marshal()},
			{Type: PayloadNonce, Body: nonce},
		},
	}
	return m.Marshal()
}

// AnswerKind says how a responder answered a probe.
type AnswerKind uint8

// Kinds of answers. Every one of them proves a live IKE daemon.
const (
	// Rejected: an error notify (NO_PROPOSAL_CHOSEN, INVALID_KE_PAYLOAD,
	// INVALID_SYNTAX, ...): the responder keeps no state.
	Rejected AnswerKind = iota + 1
	// CookieRequested: the responder is under load (or always asks) and
	// wants the request repeated with its COOKIE.
	CookieRequested
	// Accepted: SA, KE and Nonce: the responder created a half-open SA.
	Accepted
	// OtherAnswer: a well-formed response of none of the shapes above.
	OtherAnswer
)

// Answer is a classified response to a probe.
type Answer struct {
	Kind AnswerKind
	// Notify is the error notify of a rejection.
	Notify NotifyType
	// Group is the group an INVALID_KE_PAYLOAD asks for.
	Group uint16
	// SPIr is the responder's SPI (zero in rejections and cookie requests).
	SPIr uint64
}

func (a Answer) String() string {
	switch a.Kind {
	case Rejected:
		if a.Notify == InvalidKEPayload {
			return fmt.Sprintf("%s (group %d)", a.Notify, a.Group)
		}
		return a.Notify.String()
	case CookieRequested:
		return "COOKIE"
	case Accepted:
		return "accepted"
	}
	return "answered"
}

// ErrNotOurs is wrapped when a datagram is a well-formed IKE message that is
// not the answer to this probe (another SPI, not a response, another
// exchange).
var ErrNotOurs = errors.New("not the answer to this probe")

// CheckResponse decides whether b is a well-formed IKE_SA_INIT response to
// the probe with initiator SPI spi, and classifies it. Any error means the
// datagram proves nothing about the node.
func CheckResponse(b []byte, spi uint64) (Answer, error) {
	m, err := Parse(b)
	if err != nil {
		return Answer{}, err
	}
	switch {
	case m.SPIi != spi:
		return Answer{}, fmt.Errorf("%w: initiator SPI %016x, probe sent %016x", ErrNotOurs, m.SPIi, spi)
	case m.Exchange != IKESAInit:
		return Answer{}, fmt.Errorf("%w: exchange %s", ErrNotOurs, m.Exchange)
	case !m.IsResponse() || m.FromInitiator():
		return Answer{}, fmt.Errorf("%w: flags %#02x are not a responder's response", ErrNotOurs, m.Flags)
	case m.MessageID != 0:
		return Answer{}, fmt.Errorf("%w: message ID %d in IKE_SA_INIT", ErrNotOurs, m.MessageID)
	}
	a := Answer{Kind: OtherAnswer, SPIr: m.SPIr}
	var cookie bool
	var haveSA, haveKE, haveNonce bool
	for _, p := range m.Payloads {
		switch p.Type {
		case PayloadNotify:
			n, err := ParseNotify(p.Body)
			if err != nil {
				return Answer{}, err
			}
			if n.Type.IsError() && a.Kind != Rejected {
				a.Kind, a.Notify = Rejected, n.Type
				if n.Type == InvalidKEPayload && len(n.Data) == 2 {
					a.Group = uint16(n.Data[0])<<8 | uint16(n.Data[1])
				}
			}
			if n.Type == Cookie {
				cookie = true
			}
		case PayloadSA:
			if _, err := ParseSA(p.Body); err != nil {
				return Answer{}, err
			}
			haveSA = true
		case PayloadKE:
			if _, err := ParseKE(p.Body); err != nil {
				return Answer{}, err
			}
			haveKE = true
		case PayloadNonce:
			haveNonce = true
		case PayloadSK, PayloadSKF:
			return Answer{}, malformed("encrypted payload in IKE_SA_INIT")
		}
	}
	switch {
	case a.Kind == Rejected:
	case cookie:
		a.Kind = CookieRequested
	case haveSA && haveKE && haveNonce && m.SPIr != 0:
		a.Kind = Accepted
	}
	return a, nil
}

// Describe returns a one-line summary of a message (for logs and tests):
// exchange, flags and payload types, with notify types spelled out.
func Describe(m *Message) string {
	var parts []string
	for _, p := range m.Payloads {
		s := p.Type.String()
		if p.Type == PayloadNotify {
			if n, err := ParseNotify(p.Body); err == nil {
				s = "N(" + n.Type.String() + ")"
			}
		}
		parts = append(parts, s)
	}
	dir := "request"
	if m.IsResponse() {
		dir = "response"
	}
	return fmt.Sprintf("%s %s [%s]", m.Exchange, dir, strings.Join(parts, " "))
}

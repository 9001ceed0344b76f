// Package ikeresponder is a test helper: a small IKEv2 responder that
// answers IKE_SA_INIT requests the way strongSwan's charon does (checked
// against charon 5.9.8): a KE payload in a group it does not want gets
// INVALID_KE_PAYLOAD naming the group it wants, a proposal without that
// group NO_PROPOSAL_CHOSEN, and a KE in its group an SA, KE and Nonce
// (with random key material: it does no cryptography). Other modes answer
// wrongly on purpose (another SPI, truncated, from another address) or not
// at all, for the health checks' negative tests.
//
// A Responder listens on the socket it is given, so a namespace test opens
// the socket inside the node's namespace (netlab's NS.Do) and serves from
// any goroutine.
package ikeresponder

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/tunneldirector/tunneldirector/director/health/ike"
)

// Mode says how the responder answers.
type Mode int32

// Modes.
const (
	// LikeStrongSwan answers as charon with proposals
	// aes128-sha256-x25519 (the default).
	LikeStrongSwan Mode = iota
	// NoProposal always answers NO_PROPOSAL_CHOSEN (charon without a
	// connection for the director's address).
	NoProposal
	// Cookie always asks for a COOKIE (charon under load).
	Cookie
	// Silent reads requests and never answers (a hung daemon).
	Silent
	// WrongSPI answers with another initiator SPI.
	WrongSPI
	// Truncated answers with the last byte of a valid answer cut off.
	Truncated
	// AsRequest answers with the Initiator flag set and no Response flag.
	AsRequest
	// FromOther sends the valid answer from the socket given to
	// SetOther (another port or address).
	FromOther
)

// Group is the key exchange group the responder wants (curve25519, as in
// the project's strongSwan settings).
const Group = ike.DHCurve25519

// Responder answers IKE_SA_INIT on one UDP socket.
type Responder struct {
	conn     *net.UDPConn
	mode     atomic.Int32
	requests atomic.Int64
	answers  atomic.Int64
	mu       sync.Mutex
	other    *net.UDPConn
	done     chan struct{}
}

// Listen opens a UDP socket on addr (in the calling thread's network
// namespace) and returns a responder for it; Serve answers.
func Listen(addr netip.AddrPort) (*Responder, error) {
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
	if err != nil {
		return nil, err
	}
	return &Responder{conn: c, done: make(chan struct{})}, nil
}

// Addr is the socket's address.
func (r *Responder) Addr() netip.AddrPort {
	return r.conn.LocalAddr().(*net.UDPAddr).AddrPort()
}

// SetMode changes how the responder answers from the next request on.
func (r *Responder) SetMode(m Mode) { r.mode.Store(int32(m)) }

// SetOther gives the socket FromOther answers from.
func (r *Responder) SetOther(c *net.UDPConn) {
	r.mu.Lock()
	r.other = c
	r.mu.Unlock()
}

// Requests is how many IKE_SA_INIT requests arrived; Answers how many got
// an answer.
func (r *Responder) Requests() int64 { return r.requests.Load() }

// Answers is how many answers were sent.
func (r *Responder) Answers() int64 { return r.answers.Load() }

// Start serves on a new goroutine until Close.
func (r *Responder) Start() *Responder {
	go r.serve()
	return r
}

// Close stops answering and closes the socket: the node is dead to IKE.
func (r *Responder) Close() error {
	err := r.conn.Close()
	<-r.done
	return err
}

func (r *Responder) serve() {
	defer close(r.done)
	buf := make([]byte, 65536)
	for {
		n, from, err := r.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		out := r.answer(buf[:n])
		if out == nil {
			continue
		}
		c := r.conn
		if Mode(r.mode.Load()) == FromOther {
			r.mu.Lock()
			c = r.other
			r.mu.Unlock()
		}
		if c != nil {
			if _, err := c.WriteToUDPAddrPort(out, from); err == nil {
				r.answers.Add(1)
			}
		}
	}
}

// answer returns the response to a request, or nil to stay silent (a
// malformed request or not an IKE_SA_INIT request: charon drops those).
func (r *Responder) answer(b []byte) []byte {
	req, err := ike.Parse(b)
	if err != nil || req.Exchange != ike.IKESAInit || !req.FromInitiator() || req.IsResponse() || req.MessageID != 0 || req.SPIr != 0 {
		return nil
	}
	r.requests.Add(1)
	mode := Mode(r.mode.Load())
	if mode == Silent {
		return nil
	}
	resp := ike.Message{Header: ike.Header{SPIi: req.SPIi, Version: ike.Version2, Exchange: ike.IKESAInit, Flags: ike.FlagResponse}}
	notify := func(t ike.NotifyType, data []byte) {
		resp.Payloads = []ike.Payload{{Type: ike.PayloadNotify, Body: ike.Notify{Type: t, Data: data}.Marshal()}}
	}
	switch mode {
	case NoProposal:
		notify(ike.NoProposalChosen, nil)
	case Cookie:
		notify(ike.Cookie, random(32))
	default:
		r.likeStrongSwan(req, &resp, notify)
	}
	switch mode {
	case WrongSPI:
		resp.SPIi ^= 1
	case AsRequest:
		resp.Flags = ike.FlagInitiator
	}
	out := resp.Marshal()
	if mode == Truncated {
		out = out[:len(out)-1]
	}
	return out
}

func (r *Responder) likeStrongSwan(req *ike.Message, resp *ike.Message, notify func(ike.NotifyType, []byte)) {
	saP, okSA := req.Find(ike.PayloadSA)
	keP, okKE := req.Find(ike.PayloadKE)
	if _, ok := req.Find(ike.PayloadNonce); !ok || !okSA || !okKE {
		notify(ike.InvalidSyntax, nil)
		return
	}
	props, err1 := ike.ParseSA(saP.Body)
	ke, err2 := ike.ParseKE(keP.Body)
	if err1 != nil || err2 != nil {
		notify(ike.InvalidSyntax, nil)
		return
	}
	// Choose the first proposal offering aes128 (CBC), sha256 and the
	// group, as charon configured with aes128-sha256-x25519 does.
	var chosen *ike.Proposal
	for i := range props {
		p := &props[i]
		if p.Protocol == ike.ProtocolIKE && p.Has(ike.TransformENCR, ike.EncrAESCBC) && p.Has(ike.TransformINTEG, ike.IntegSHA256) &&
			p.Has(ike.TransformPRF, ike.PRFSHA256) && p.Has(ike.TransformDH, Group) {
			chosen = p
			break
		}
	}
	switch {
	case chosen == nil:
		notify(ike.NoProposalChosen, nil)
	case ke.Group != Group:
		notify(ike.InvalidKEPayload, []byte{byte(Group >> 8), byte(Group)})
	default:
		resp.SPIr = binary.BigEndian.Uint64(random(8)) | 1
		sel := ike.Proposal{Number: chosen.Number, Protocol: ike.ProtocolIKE, Transforms: []ike.Transform{
			{Type: ike.TransformENCR, ID: ike.EncrAESCBC, KeyLength: 128},
			{Type: ike.TransformINTEG, ID: ike.IntegSHA256},
			{Type: ike.TransformPRF, ID: ike.PRFSHA256},
			{Type: ike.TransformDH, ID: Group},
		}}
		resp.Payloads = []ike.Payload{
			{Type: ike.PayloadSA, Body: ike.MarshalSA([]ike.Proposal{sel})},
			{Type: ike.PayloadKE, Body: ike.KE{Group: Group, Data: random(32)}.Marshal()},
			{Type: ike.PayloadNonce, Body: random(32)},
		}
	}
}

func random(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

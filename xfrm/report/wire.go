package report

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	jsonv2 "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/xfrm"
)

// The wire structs carry addresses and prefixes as strings so that a bad
// one is reported with its field path by validate, instead of as a bare
// parse error from inside encoding/json.

type wireReport struct {
	Version int           `json:"version"`
	Kind    string        `json:"kind"`
	Node    string        `json:"node"`
	Session string        `json:"session"`
	Seq     uint64        `json:"seq"`
	Sent    string        `json:"sent"`
	Summary xfrm.Summary  `json:"summary"`
	Tunnels *[]wireTunnel `json:"tunnels,omitempty"`
	Removed *[]string     `json:"removed,omitempty"`
}

type wireTunnel struct {
	Peer    string     `json:"peer"`
	NATT    []wireNATT `json:"natt,omitempty"`
	Subnets []string   `json:"subnets"`
	SAs     int        `json:"sas"`
	Bytes   uint64     `json:"bytes"`
	Packets uint64     `json:"packets"`
	LastUse int64      `json:"last_use"`
	SPIs    []xfrm.SPI `json:"spis"`
}

type wireNATT struct {
	Port            uint16 `json:"port"`
	LocalPort       uint16 `json:"local_port"`
	OriginalAddress string `json:"original_address,omitempty"`
}

// Marshal encodes a report. It does not validate: the agent builds reports
// from grouped facts, and its tests hold them to Decode's rules.
func Marshal(r *Report) ([]byte, error) {
	w := wireReport{Version: r.Version, Kind: string(r.Kind), Node: r.Node, Session: r.Session, Seq: r.Seq,
		Sent: r.Sent.UTC().Format(time.RFC3339Nano), Summary: r.Summary}
	if r.Kind == KindFull || len(r.Tunnels) > 0 {
		ts := make([]wireTunnel, len(r.Tunnels))
		for i, t := range r.Tunnels {
			wt := wireTunnel{Peer: t.Peer.String(), Subnets: make([]string, len(t.Subnets)), SAs: t.SAs,
				Bytes: t.Bytes, Packets: t.Packets, LastUse: t.LastUse, SPIs: t.SPIs}
			if wt.SPIs == nil {
				wt.SPIs = []xfrm.SPI{}
			}
			for j, s := range t.Subnets {
				wt.Subnets[j] = s.String()
			}
			for _, n := range t.NATT {
				wn := wireNATT{Port: n.Port, LocalPort: n.LocalPort}
				if n.OriginalAddress.IsValid() {
					wn.OriginalAddress = n.OriginalAddress.String()
				}
				wt.NATT = append(wt.NATT, wn)
			}
			ts[i] = wt
		}
		w.Tunnels = &ts
	}
	if len(r.Removed) > 0 {
		rs := make([]string, len(r.Removed))
		for i, a := range r.Removed {
			rs[i] = a.String()
		}
		w.Removed = &rs
	}
	return json.Marshal(&w)
}

// Error is a refused report: the field (a path such as
// "tunnels[3].subnets[1]") and the byte offset in the body where the
// problem is, when known, and what is wrong.
type Error struct {
	Field  string
	Offset int64 // -1 when not known
	Msg    string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("agent report")
	if e.Field != "" {
		b.WriteString(": " + e.Field)
	}
	if e.Offset >= 0 {
		fmt.Fprintf(&b, " (byte %d)", e.Offset)
	}
	b.WriteString(": " + e.Msg)
	return b.String()
}

// ErrTooLarge is wrapped by the error for a body over Limits.MaxBytes.
var ErrTooLarge = errors.New("agent report too large")

func errAt(field string, off int64, format string, args ...any) *Error {
	return &Error{Field: field, Offset: off, Msg: fmt.Sprintf(format, args...)}
}

// Decode reads and checks one report: at most lim.MaxBytes, one JSON
// object, exactly the known keys (no unknown, duplicate, missing or null
// ones), the count limits, and the validation rules of Validate. Nothing
// of a refused report is returned.
func Decode(r io.Reader, lim Limits) (*Report, error) {
	lim = lim.withDefaults()
	body, err := io.ReadAll(io.LimitReader(r, lim.MaxBytes+1))
	if err != nil {
		return nil, fmt.Errorf("agent report: read body: %w", err)
	}
	if int64(len(body)) > lim.MaxBytes {
		return nil, fmt.Errorf("%w: more than %d bytes", ErrTooLarge, lim.MaxBytes)
	}
	if err := scan(body, lim); err != nil {
		return nil, err
	}
	// The scan checked every key, type and range: what is left can fail
	// only on a bug, still reported with its place.
	var w wireReport
	if err := jsonv2.Unmarshal(body, &w); err != nil {
		var se *jsonv2.SemanticError
		if errors.As(err, &se) {
			return nil, errAt(pointerPath(se.JSONPointer), se.ByteOffset, "%v", se.Err)
		}
		return nil, errAt("", -1, "%v", err)
	}
	return fromWire(&w, lim)
}

// field describes one key's value in the schema that scan enforces.
type field struct {
	kind     byte // 'n' unsigned integer, 's' string, 'o' object, 'a' array
	bits     int  // of a number: it must be below 1<<bits
	obj      map[string]field
	elem     *field
	limit    func(Limits) int
	optional bool
}

var (
	u16, u31, u32, u63, u64 = unsigned(16), unsigned(31), unsigned(32), unsigned(63), unsigned(64)
	str                     = field{kind: 's'}

	spiSchema  = map[string]field{"spi": u32, "reqid": u32, "dir": str, "proto": str}
	nattSchema = map[string]field{"port": u16, "local_port": u16, "original_address": {kind: 's', optional: true}}

	tunnelSchema = map[string]field{
		"peer":     str,
		"natt":     {kind: 'a', elem: &field{kind: 'o', obj: nattSchema}, limit: func(l Limits) int { return l.MaxNATT }, optional: true},
		"subnets":  {kind: 'a', elem: &str, limit: func(l Limits) int { return l.MaxSubnets }},
		"sas":      u31,
		"bytes":    u64,
		"packets":  u64,
		"last_use": u63,
		"spis":     {kind: 'a', elem: &field{kind: 'o', obj: spiSchema}, limit: func(l Limits) int { return l.MaxSAs }},
	}
	summarySchema = map[string]field{"sas": u31, "tunnels": u31, "unattributed": u31, "ignored": u31}
	reportSchema  = field{kind: 'o', obj: map[string]field{
		"version": u31, "kind": str, "node": str, "session": str, "seq": u64, "sent": str,
		"summary": {kind: 'o', obj: summarySchema},
		"tunnels": {kind: 'a', elem: &field{kind: 'o', obj: tunnelSchema}, limit: func(l Limits) int { return l.MaxTunnels }, optional: true},
		"removed": {kind: 'a', elem: &str, limit: func(l Limits) int { return l.MaxTunnels }, optional: true},
	}}
)

// unsigned returns the schema of an unsigned integer of the given bits.
func unsigned(bits int) field { return field{kind: 'n', bits: bits} }

var kindNames = map[byte]string{'n': "a number", 's': "a string", 'o': "an object", 'a': "an array"}

// scan walks the body's tokens once against the schema, so that unknown,
// duplicate, missing and null keys, numbers out of range and oversized
// arrays are refused with their path and offset before anything is
// allocated for them. The tokenizer is encoding/json/v2's (jsontext, from
// its module): it rejects duplicate names and invalid UTF-8 itself, and
// is an order of magnitude faster than encoding/json's Token.
func scan(body []byte, lim Limits) error {
	s := &scanner{dec: jsontext.NewDecoder(bytes.NewReader(body)), lim: lim, body: body}
	if err := s.value(reportSchema, ""); err != nil {
		return err
	}
	off := s.dec.InputOffset()
	if _, err := s.dec.ReadToken(); err != io.EOF {
		return errAt("", s.skip(off), "data after the report's closing brace")
	}
	return nil
}

type scanner struct {
	dec  *jsontext.Decoder
	lim  Limits
	body []byte // what dec reads: offsets index it
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// pointerPath turns a JSON pointer (/tunnels/3/peer) into this package's
// field paths (tunnels[3].peer).
func pointerPath(p jsontext.Pointer) string {
	var b strings.Builder
	for tok := range p.Tokens() {
		if _, err := strconv.Atoi(tok); err == nil {
			b.WriteString("[" + tok + "]")
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('.')
		}
		b.WriteString(tok)
	}
	return b.String()
}

// fail turns a tokenizer error into an *Error at the right place.
func (s *scanner) fail(path string, err error) error {
	off := s.skip(s.dec.InputOffset())
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return errAt(path, int64(len(s.body)), "the report ends too early (truncated?)")
	}
	var se *jsontext.SyntacticError
	if errors.As(err, &se) {
		if p := pointerPath(se.JSONPointer); p != "" {
			path = p
		}
		if errors.Is(se.Err, jsontext.ErrDuplicateName) {
			return errAt(path, se.ByteOffset, "duplicate key")
		}
		return errAt(path, se.ByteOffset, "malformed JSON: %v", se.Err)
	}
	return errAt(path, off, "malformed JSON: %v", err)
}

// skip moves an offset from the end of the previous token (what
// InputOffset says) past separators, to the start of the next value.
func (s *scanner) skip(off int64) int64 {
	for off < int64(len(s.body)) && strings.IndexByte(" \t\r\n:,", s.body[off]) >= 0 {
		off++
	}
	return off
}

var wantKind = map[byte]jsontext.Kind{'n': '0', 's': '"', 'a': '[', 'o': '{'}

var kindOf = map[jsontext.Kind]string{'n': "null", 'f': "a boolean", 't': "a boolean", '"': "a string", '0': "a number",
	'{': "an object", '[': "an array"}

func (s *scanner) value(f field, path string) error {
	off := s.skip(s.dec.InputOffset())
	k := s.dec.PeekKind()
	if k == jsontext.KindInvalid {
		_, err := s.dec.ReadToken()
		return s.fail(path, err)
	}
	want := wantKind[f.kind]
	if k != want {
		return errAt(path, off, "want %s, got %s", kindNames[f.kind], kindOf[k])
	}
	switch f.kind {
	case 'n', 's':
		v, err := s.dec.ReadValue()
		if err != nil {
			return s.fail(path, err)
		}
		if f.kind == 'n' {
			if _, err := strconv.ParseUint(string(v), 10, f.bits); err != nil {
				return errAt(path, off, "%s is not an integer from 0 to %d", v, uint64(1)<<f.bits-1)
			}
		}
		return nil
	case 'a':
		if _, err := s.dec.ReadToken(); err != nil {
			return s.fail(path, err)
		}
		limit := f.limit(s.lim)
		for i := 0; ; i++ {
			ep := fmt.Sprintf("%s[%d]", path, i)
			switch s.dec.PeekKind() {
			case ']':
				_, err := s.dec.ReadToken()
				return err
			case jsontext.KindInvalid:
				_, err := s.dec.ReadToken()
				return s.fail(ep, err)
			}
			if i >= limit {
				return errAt(ep, s.skip(s.dec.InputOffset()), "more than %d elements", limit)
			}
			if err := s.value(*f.elem, ep); err != nil {
				return err
			}
		}
	}
	// An object.
	if _, err := s.dec.ReadToken(); err != nil {
		return s.fail(path, err)
	}
	seen := make(map[string]bool, len(f.obj))
	for {
		switch s.dec.PeekKind() {
		case '}':
			if _, err := s.dec.ReadToken(); err != nil {
				return s.fail(path, err)
			}
			var missing []string
			for k, sub := range f.obj {
				if !sub.optional && !seen[k] {
					missing = append(missing, k)
				}
			}
			if len(missing) > 0 {
				sort.Strings(missing)
				return errAt(path, off, "missing key %q", missing[0])
			}
			return nil
		case jsontext.KindInvalid:
			_, err := s.dec.ReadToken()
			return s.fail(path, err)
		}
		koff := s.skip(s.dec.InputOffset())
		kt, err := s.dec.ReadToken()
		if err != nil {
			return s.fail(path, err)
		}
		key := kt.String()
		kp := join(path, key)
		sub, ok := f.obj[key]
		if !ok {
			return errAt(kp, koff, "unknown key %q", key)
		}
		seen[key] = true // the tokenizer refuses duplicates
		if err := s.value(sub, kp); err != nil {
			return err
		}
	}
}

// fromWire converts and validates a decoded report.
func fromWire(w *wireReport, lim Limits) (*Report, error) {
	r := &Report{Version: w.Version, Kind: Kind(w.Kind), Node: w.Node, Session: w.Session, Seq: w.Seq, Summary: w.Summary}
	var err error
	if r.Sent, err = time.Parse(time.RFC3339Nano, w.Sent); err != nil {
		return nil, errAt("sent", -1, "%q is not an RFC 3339 time", w.Sent)
	}
	if w.Tunnels != nil {
		r.Tunnels = make([]xfrm.Tunnel, len(*w.Tunnels))
		for i, wt := range *w.Tunnels {
			p := fmt.Sprintf("tunnels[%d]", i)
			t := &r.Tunnels[i]
			if t.Peer, err = netip.ParseAddr(wt.Peer); err != nil {
				return nil, errAt(p+".peer", -1, "%q is not an IP address", wt.Peer)
			}
			t.SAs, t.Bytes, t.Packets, t.LastUse, t.SPIs = wt.SAs, wt.Bytes, wt.Packets, wt.LastUse, wt.SPIs
			t.Subnets = make([]netip.Prefix, len(wt.Subnets))
			for j, s := range wt.Subnets {
				if t.Subnets[j], err = netip.ParsePrefix(s); err != nil {
					return nil, errAt(fmt.Sprintf("%s.subnets[%d]", p, j), -1, "%q is not a prefix", s)
				}
			}
			for j, n := range wt.NATT {
				nt := xfrm.NATT{Port: n.Port, LocalPort: n.LocalPort}
				if n.OriginalAddress != "" {
					if nt.OriginalAddress, err = netip.ParseAddr(n.OriginalAddress); err != nil {
						return nil, errAt(fmt.Sprintf("%s.natt[%d].original_address", p, j), -1, "%q is not an IP address", n.OriginalAddress)
					}
				}
				t.NATT = append(t.NATT, nt)
			}
		}
	}
	if w.Removed != nil {
		r.Removed = make([]netip.Addr, len(*w.Removed))
		for i, s := range *w.Removed {
			if r.Removed[i], err = netip.ParseAddr(s); err != nil {
				return nil, errAt(fmt.Sprintf("removed[%d]", i), -1, "%q is not an IP address", s)
			}
		}
	}
	if err := validate(r, w.Tunnels != nil, w.Removed != nil, lim); err != nil {
		return nil, err
	}
	return r, nil
}

// Validate checks a report against the rules a director applies (Decode
// applies them too): the version, kind, node name, session and sequence,
// the keys each kind must or must not carry, each tunnel's addresses,
// prefixes, counts and SPIs, no peer twice, and a full report's summary
// agreeing with its tunnels. It does not know which node may send: that
// is Inbox.Accept's check against the token.
func Validate(r *Report, lim Limits) error {
	return validate(r, r.Kind == KindFull || len(r.Tunnels) > 0, len(r.Removed) > 0, lim.withDefaults())
}

func validate(r *Report, hasTunnels, hasRemoved bool, lim Limits) error {
	if r.Version != Version {
		return errAt("version", -1, "version %d is not supported (this side speaks %d)", r.Version, Version)
	}
	switch r.Kind {
	case KindFull:
		if !hasTunnels {
			return errAt("tunnels", -1, "a full report must carry tunnels (an empty list for none)")
		}
		if hasRemoved {
			return errAt("removed", -1, "a full report carries no removed peers: it replaces everything")
		}
	case KindDelta:
		if len(r.Tunnels) == 0 && len(r.Removed) == 0 {
			return errAt("tunnels", -1, "an empty delta (neither tunnels nor removed peers)")
		}
	case KindHeartbeat:
		if hasTunnels || hasRemoved {
			return errAt("tunnels", -1, "a heartbeat carries no tunnels and no removed peers")
		}
	default:
		return errAt("kind", -1, "kind %q is not full, delta or heartbeat", r.Kind)
	}
	if err := affinity.ValidateID("node", r.Node); err != nil {
		return errAt("node", -1, "%v", err)
	}
	if len(r.Session) != 32 || strings.Trim(r.Session, "0123456789abcdef") != "" {
		return errAt("session", -1, "session %.40q is not 32 lower-case hex digits", r.Session)
	}
	if r.Seq == 0 {
		return errAt("seq", -1, "sequence numbers start at 1")
	}
	s := r.Summary
	if s.SAs < 0 || s.Tunnels < 0 || s.Unattributed < 0 || s.Ignored < 0 {
		return errAt("summary", -1, "negative count in %+v", s)
	}
	if len(r.Tunnels) > lim.MaxTunnels || len(r.Removed) > lim.MaxTunnels {
		return errAt("tunnels", -1, "more than %d tunnels", lim.MaxTunnels)
	}
	peers := make(map[netip.Addr]struct{}, len(r.Tunnels)+len(r.Removed))
	sas := 0
	for i := range r.Tunnels {
		p := fmt.Sprintf("tunnels[%d]", i)
		if err := validateTunnel(&r.Tunnels[i], p, lim); err != nil {
			return err
		}
		if _, dup := peers[r.Tunnels[i].Peer]; dup {
			return errAt(p+".peer", -1, "peer %s appears twice", r.Tunnels[i].Peer)
		}
		peers[r.Tunnels[i].Peer] = struct{}{}
		sas += r.Tunnels[i].SAs
	}
	for i, a := range r.Removed {
		p := fmt.Sprintf("removed[%d]", i)
		if err := affinity.ValidateAddr(a); err != nil {
			return errAt(p, -1, "%v", err)
		}
		if _, dup := peers[a]; dup {
			return errAt(p, -1, "peer %s appears twice", a)
		}
		peers[a] = struct{}{}
	}
	if r.Kind == KindFull && (s.Tunnels != len(r.Tunnels) || s.SAs != sas) {
		return errAt("summary", -1, "says %d tunnels with %d SAs, the report carries %d with %d", s.Tunnels, s.SAs, len(r.Tunnels), sas)
	}
	return nil
}

func validateTunnel(t *xfrm.Tunnel, p string, lim Limits) error {
	if err := affinity.ValidateAddr(t.Peer); err != nil {
		return errAt(p+".peer", -1, "%v", err)
	}
	if len(t.Subnets) > lim.MaxSubnets {
		return errAt(p+".subnets", -1, "more than %d subnets", lim.MaxSubnets)
	}
	seen := make(map[netip.Prefix]struct{}, len(t.Subnets))
	for j, s := range t.Subnets {
		sp := fmt.Sprintf("%s.subnets[%d]", p, j)
		if err := affinity.ValidatePrefix(s); err != nil {
			return errAt(sp, -1, "%v", err)
		}
		if _, dup := seen[s]; dup {
			return errAt(sp, -1, "subnet %s appears twice", s)
		}
		seen[s] = struct{}{}
	}
	if len(t.NATT) > lim.MaxNATT {
		return errAt(p+".natt", -1, "more than %d port pairs", lim.MaxNATT)
	}
	for j, n := range t.NATT {
		np := fmt.Sprintf("%s.natt[%d]", p, j)
		if n.Port == 0 || n.LocalPort == 0 {
			return errAt(np, -1, "port 0")
		}
		if n.OriginalAddress.IsValid() {
			if err := affinity.ValidateAddr(n.OriginalAddress); err != nil {
				return errAt(np+".original_address", -1, "%v", err)
			}
		}
	}
	if t.SAs < 1 || t.SAs > lim.MaxSAs {
		return errAt(p+".sas", -1, "%d SAs (a tunnel has 1 to %d)", t.SAs, lim.MaxSAs)
	}
	if len(t.SPIs) != t.SAs {
		return errAt(p+".spis", -1, "%d SPIs for %d SAs (one per SA)", len(t.SPIs), t.SAs)
	}
	if t.LastUse < 0 {
		return errAt(p+".last_use", -1, "negative time %d", t.LastUse)
	}
	for j, s := range t.SPIs {
		sp := fmt.Sprintf("%s.spis[%d]", p, j)
		if s.SPI == 0 {
			return errAt(sp+".spi", -1, "SPI 0")
		}
		if s.Dir != xfrm.In && s.Dir != xfrm.Out {
			return errAt(sp+".dir", -1, "direction %q is not in or out", s.Dir)
		}
		if s.Proto != "esp" && s.Proto != "ah" {
			return errAt(sp+".proto", -1, "protocol %q is not esp or ah", s.Proto)
		}
	}
	return nil
}

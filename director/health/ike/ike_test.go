package ike

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const testSPI = 0x0123456789abcdef

func probe() []byte {
	return ProbeRequest(testSPI, bytes.Repeat([]byte{7}, 32), bytes.Repeat([]byte{9}, 32))
}

func TestProbeRequestIsWellFormed(t *testing.T) {
	m, err := Parse(probe())
	if err != nil {
		t.Fatal(err)
	}
	if m.SPIi != testSPI || m.SPIr != 0 || m.Exchange != IKESAInit || m.Flags != FlagInitiator || m.MessageID != 0 || m.Version != 0x20 {
		t.Fatalf("header %+v", m.Header)
	}
	if got := Describe(m); got != "IKE_SA_INIT request [SA KE No]" {
		t.Fatalf("payloads %q", got)
	}
	sa, _ := m.Find(PayloadSA)
	props, err := ParseSA(sa.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(props, ProbeProposals()) {
		t.Fatalf("proposals do not round-trip:\n%+v\n%+v", props, ProbeProposals())
	}
	kp, _ := m.Find(PayloadKE)
	ke, err := ParseKE(kp.Body)
	if err != nil || ke.Group != ProbeGroup || len(ke.Data) != 32 {
		t.Fatalf("KE %+v %v", ke, err)
	}
	// RFC 7296 3.4: the KE group must be offered in the SA payload, and
	// should be the first group of the first proposal.
	for i, p := range props {
		var groups []uint16
		for _, tr := range p.Transforms {
			if tr.Type == TransformDH {
				groups = append(groups, tr.ID)
			}
		}
		if len(groups) < 2 || groups[0] != ProbeGroup {
			t.Fatalf("proposal %d groups %v: the probe group must come first, then real ones", i+1, groups)
		}
		if p.Has(TransformENCR, EncrAESGCM16) && p.Transforms[2].Type == TransformINTEG {
			t.Fatalf("proposal %d: an AEAD proposal must not carry an integrity transform", i+1)
		}
	}
	if no, _ := m.Find(PayloadNonce); len(no.Body) < 16 || len(no.Body) > 256 {
		t.Fatalf("nonce of %d bytes", len(no.Body))
	}
}

// response builds an answer to the probe with the given payloads.
func response(spi uint64, payloads ...Payload) []byte {
	m := Message{Header: Header{SPIi: spi, Version: Version2, Exchange: IKESAInit, Flags: FlagResponse}, Payloads: payloads}
	return m.Marshal()
}

func notify(t NotifyType, data []byte) Payload {
	return Payload{Type: PayloadNotify, Body: Notify{Type: t, Data: data}.Marshal()}
}

// Real answers: strongSwan's, captured from charon 5.9.8 in a namespace by
// TestIKEProbeStrongSwan (TD_IKE_CAPTURE=1), and libreswan's (see
// testdata/README.md).
func captured(t testing.TB) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob("testdata/*.bin")
	if err != nil || len(files) == 0 {
		t.Fatalf("no captured answers in testdata (%v)", err)
	}
	out := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[strings.TrimSuffix(filepath.Base(f), ".bin")] = b
	}
	return out
}

func TestCheckResponseOnCapturedAnswers(t *testing.T) {
	want := map[string]string{
		"strongswan-no-proposal":   "NO_PROPOSAL_CHOSEN",
		"strongswan-invalid-ke":    "INVALID_KE_PAYLOAD (group 31)",
		"strongswan-accepted":      "accepted",
		"strongswan-cookie":        "COOKIE",
		"libreswan-invalid-syntax": "INVALID_SYNTAX",
		"libreswan-no-proposal":    "NO_PROPOSAL_CHOSEN",
	}
	caps := captured(t)
	for name, w := range want {
		b, ok := caps[name]
		if !ok {
			t.Fatalf("testdata/%s.bin missing", name)
		}
		spi := binary.BigEndian.Uint64(b)
		a, err := CheckResponse(b, spi)
		if err != nil || a.String() != w {
			t.Errorf("%s: %v %v, want %s", name, a, err, w)
		}
		if _, err := CheckResponse(b, spi^1); !errors.Is(err, ErrNotOurs) {
			t.Errorf("%s with another SPI: %v, want ErrNotOurs", name, err)
		}
		for n := 0; n < len(b); n++ {
			if _, err := CheckResponse(b[:n], spi); err == nil {
				t.Fatalf("%s truncated to %d bytes accepted", name, n)
			}
		}
		if _, err := CheckResponse(append(append([]byte(nil), b...), 0), spi); err == nil {
			t.Errorf("%s with a trailing byte accepted", name)
		}
	}
}

func TestCheckResponseRefuses(t *testing.T) {
	good := response(testSPI, notify(InvalidKEPayload, []byte{0, 31}))
	if a, err := CheckResponse(good, testSPI); err != nil || a.Kind != Rejected || a.Group != 31 {
		t.Fatalf("good answer: %+v %v", a, err)
	}
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := map[string][]byte{
		"empty":                   nil,
		"header only, short":      good[:27],
		"another SPI":             response(testSPI+1, notify(NoProposalChosen, nil)),
		"request flags":           mut(func(b []byte) []byte { b[19] = FlagInitiator; return b }),
		"response from initiator": mut(func(b []byte) []byte { b[19] = FlagResponse | FlagInitiator; return b }),
		"IKE_AUTH":                mut(func(b []byte) []byte { b[18] = byte(IKEAuth); return b }),
		"message ID 1":            mut(func(b []byte) []byte { b[23] = 1; return b }),
		"IKEv1":                   mut(func(b []byte) []byte { b[17] = 0x10; return b }),
		"length too long":         mut(func(b []byte) []byte { b[27]++; return b }),
		"length too short":        mut(func(b []byte) []byte { b[27]--; return b }),
		"payload too long":        mut(func(b []byte) []byte { b[31]++; return b }),
		"payload too short":       mut(func(b []byte) []byte { b[31] = 3; return b }),
		"chain goes on":           mut(func(b []byte) []byte { b[28] = byte(PayloadNonce); return b }),
		"notify SPI size":         mut(func(b []byte) []byte { b[33] = 9; return b }),
		"zero SPI":                response(0, notify(NoProposalChosen, nil)),
		"encrypted payload":       response(testSPI, Payload{Type: PayloadSK, Body: make([]byte, 32)}),
		"bad SA":                  response(testSPI, Payload{Type: PayloadSA, Body: []byte{0, 0, 0, 9, 1, 1, 0, 0}}, Payload{Type: PayloadKE, Body: []byte{0, 31, 0, 0}}, Payload{Type: PayloadNonce, Body: make([]byte, 16)}),
	}
	for name, b := range cases {
		if a, err := CheckResponse(b, testSPI); err == nil {
			t.Errorf("%s: accepted as %v", name, a)
		}
	}
}

func TestCheckResponseKinds(t *testing.T) {
	for _, c := range []struct {
		b    []byte
		want string
	}{
		{response(testSPI, notify(NoProposalChosen, nil)), "NO_PROPOSAL_CHOSEN"},
		{response(testSPI, notify(Cookie, make([]byte, 20))), "COOKIE"},
		{response(testSPI, notify(FragmentationSupported, nil), notify(TemporaryFailure, nil)), "TEMPORARY_FAILURE"},
		{response(testSPI), "answered"},
	} {
		a, err := CheckResponse(c.b, testSPI)
		if err != nil || a.String() != c.want {
			t.Errorf("%s: %v %v", c.want, a, err)
		}
	}
}

func TestMarshalParseRoundTrip(t *testing.T) {
	m := &Message{Header: Header{SPIi: 1, SPIr: 2, Version: Version2, Exchange: Informational, Flags: FlagResponse, MessageID: 7},
		Payloads: []Payload{{Type: PayloadVendor, Critical: true, Body: []byte("x")}, {Type: PayloadSK, Body: make([]byte, 40)}}}
	b := m.Marshal()
	got, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	m.Next, m.Length = PayloadVendor, uint32(len(b))
	if !reflect.DeepEqual(got, m) {
		t.Fatalf("round trip:\n%+v\n%+v", got, m)
	}
	if !bytes.Equal(got.Marshal(), b) {
		t.Fatal("re-marshal differs")
	}
}

// FuzzParse: Parse never panics, and whatever it accepts re-encodes to a
// message that parses to the same thing.
func FuzzParse(f *testing.F) {
	for _, b := range captured(f) {
		f.Add(b)
	}
	f.Add(probe())
	f.Add(response(testSPI, notify(InvalidKEPayload, []byte{0, 31})))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Parse(b)
		if err != nil {
			return
		}
		again, err := Parse(m.Marshal())
		if err != nil {
			t.Fatalf("re-encoded message does not parse: %v", err)
		}
		if again.Header != m.Header || len(again.Payloads) != len(m.Payloads) {
			t.Fatalf("round trip changed the header or chain: %+v vs %+v", m.Header, again.Header)
		}
		for i, p := range m.Payloads {
			q := again.Payloads[i]
			if p.Type != q.Type || p.Critical != q.Critical || !bytes.Equal(p.Body, q.Body) {
				t.Fatalf("payload %d changed: %+v vs %+v", i, p, q)
			}
		}
		_, _ = m.Notifies()
		for _, p := range m.Payloads {
			_, _ = ParseSA(p.Body)
			_, _ = ParseKE(p.Body)
		}
	})
}

// FuzzCheckResponse: nothing counts as an answer unless it is a
// well-formed IKE_SA_INIT response from a responder carrying the probe's
// SPI, with a header length equal to the datagram's.
func FuzzCheckResponse(f *testing.F) {
	for _, b := range captured(f) {
		f.Add(b, binary.BigEndian.Uint64(b))
	}
	f.Add(response(testSPI, notify(Cookie, []byte{1, 2, 3})), uint64(testSPI))
	f.Fuzz(func(t *testing.T, b []byte, spi uint64) {
		a, err := CheckResponse(b, spi)
		if err != nil {
			return
		}
		switch {
		case len(b) < HeaderLen:
			t.Fatal("short datagram accepted")
		case binary.BigEndian.Uint64(b) != spi || spi == 0:
			t.Fatalf("SPI %x accepted for probe %x", binary.BigEndian.Uint64(b), spi)
		case b[19]&FlagResponse == 0 || b[19]&FlagInitiator != 0:
			t.Fatalf("flags %#x accepted", b[19])
		case ExchangeType(b[18]) != IKESAInit || binary.BigEndian.Uint32(b[20:24]) != 0:
			t.Fatal("not an IKE_SA_INIT response accepted")
		case int(binary.BigEndian.Uint32(b[24:28])) != len(b):
			t.Fatal("length mismatch accepted")
		case a.Kind < Rejected || a.Kind > OtherAnswer:
			t.Fatalf("kind %d", a.Kind)
		}
	})
}

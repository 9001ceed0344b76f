package nms

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// maxSubnets is the most protected subnets the table accepts per tunnel.
const maxSubnets = 64

// netipDetail strips the `ParseAddr("..."): ` prefix of a net/netip error:
// the message already quotes the value.
func netipDetail(err error) string {
	s := err.Error()
	if i := strings.Index(s, "): "); i >= 0 {
		return s[i+3:]
	}
	return s
}

// parseAddr parses a peer or node address and explains the common ways of
// getting one wrong. The message is empty when the address is fine.
func parseAddr(s string) (netip.Addr, string) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		if ap, err2 := netip.ParseAddrPort(s); err2 == nil {
			return netip.Addr{}, fmt.Sprintf("address with a port: write the address alone (%s); IKE and NAT-T ports are not part of the peer", ap.Addr())
		}
		if strings.IndexByte(s, '/') >= 0 {
			return netip.Addr{}, "a prefix where a single address is expected"
		}
		return netip.Addr{}, "invalid IP address: " + netipDetail(err)
	}
	if err := affinity.ValidateAddr(a); err != nil {
		return netip.Addr{}, err.Error()
	}
	return a, ""
}

// parsePrefix parses one protected subnet. It does the work of
// netip.ParsePrefix itself so it can say which part is wrong; the masking
// and family rules are affinity.ValidatePrefix's.
func parsePrefix(s string) (netip.Prefix, string) {
	slash := strings.LastIndexByte(s, '/')
	if slash < 0 {
		if a, err := netip.ParseAddr(s); err == nil {
			return netip.Prefix{}, fmt.Sprintf("missing prefix length (write %s/%d for a single host)", a.WithZone(""), a.BitLen())
		}
		return netip.Prefix{}, "invalid prefix: want address/length"
	}
	a, err := netip.ParseAddr(s[:slash])
	if err != nil {
		if _, err2 := netip.ParseAddrPort(s[:slash]); err2 == nil {
			return netip.Prefix{}, "invalid prefix: the address part has a port"
		}
		return netip.Prefix{}, "invalid prefix address: " + netipDetail(err)
	}
	if a.Zone() != "" {
		return netip.Prefix{}, "invalid prefix: the address has a zone"
	}
	lenText := s[slash+1:]
	bits, ok := atoiStrict(lenText)
	if !ok {
		return netip.Prefix{}, fmt.Sprintf("invalid prefix length %q", lenText)
	}
	if a.Is4() && bits > 32 {
		return netip.Prefix{}, fmt.Sprintf("IPv4 prefix length %d above 32", bits)
	}
	if bits > 128 {
		return netip.Prefix{}, fmt.Sprintf("IPv6 prefix length %d above 128", bits)
	}
	p := netip.PrefixFrom(a, bits)
	if err := affinity.ValidatePrefix(p); err != nil {
		if !a.Is4In6() && p.Masked() != p {
			return netip.Prefix{}, hostBitsMsg(p)
		}
		return netip.Prefix{}, err.Error()
	}
	return p, ""
}

// hostBitsMsg says which host bits are set and what the prefix probably
// meant.
func hostBitsMsg(p netip.Prefix) string {
	m := p.Masked()
	var host netip.Addr
	if p.Addr().Is4() {
		a, b := p.Addr().As4(), m.Addr().As4()
		for i := range a {
			a[i] ^= b[i]
		}
		host = netip.AddrFrom4(a)
	} else {
		a, b := p.Addr().As16(), m.Addr().As16()
		for i := range a {
			a[i] ^= b[i]
		}
		host = netip.AddrFrom16(a)
	}
	return fmt.Sprintf("host bits set (%s beyond /%d; did you mean %s?)", host, p.Bits(), m)
}

// atoiStrict parses a small decimal number: digits only, no sign, no
// leading zeros, which netip also insists on.
func atoiStrict(s string) (int, bool) {
	if s == "" || len(s) > 9 || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	n := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

// parseUint parses an optional non-negative integer up to max; leading
// zeros are tolerated because spreadsheets pad numbers.
func parseUint(s string, max uint64) (uint64, string) {
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		if strings.HasPrefix(s, "-") {
			return 0, "negative number"
		}
		return 0, "not a whole number"
	}
	if v > max {
		return 0, fmt.Sprintf("above %d", max)
	}
	return v, ""
}

// parseBool parses true/false/yes/no/1/0 in any case.
func parseBool(s string) (bool, bool) {
	switch strings.ToLower(s) {
	case "true", "yes", "1", "y", "t":
		return true, true
	case "false", "no", "0", "n", "f":
		return false, true
	}
	return false, false
}

// checkComment keeps comments printable (affinity.ValidateComment's
// rule), saying what is wrong.
func checkComment(s string) string {
	if err := affinity.ValidateComment(s); err != nil {
		return strings.TrimPrefix(err.Error(), "comment ")
	}
	return ""
}

// splitSubnets splits a subnets field at spaces, tabs, semicolons and
// commas, calling fn for each non-empty item.
func splitSubnets(s string, fn func(string)) {
	start := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case ' ', ';', '\t', '\n', '\r', ',':
			if i > start {
				fn(s[start:i])
			}
			start = i + 1
		}
	}
	if start < len(s) {
		fn(s[start:])
	}
}

// jsonScalar takes a JSON string, number, boolean or null as text, so that
// ids may be numbers and numbers may be quoted, and so that a wrongly typed
// value is reported with the field's name instead of Go's type names.
type jsonScalar struct {
	s   string
	bad string // the raw value when it is an object or array
}

// UnmarshalJSON keeps the value's text; it never fails so that one bad
// field does not hide the others.
func (j *jsonScalar) UnmarshalJSON(b []byte) error {
	switch {
	case len(b) == 0:
	case b[0] == '"':
		j.s = jsonString(b)
	case b[0] == '{' || b[0] == '[':
		j.bad = string(b)
	case string(b) == "null":
		j.s = ""
	default:
		j.s = string(b)
	}
	return nil
}

// jsonString decodes a JSON string literal, quickly when it is plain.
func jsonString(b []byte) string {
	plain := true
	for _, c := range b[1 : len(b)-1] {
		if c == '\\' || c >= 0x80 {
			plain = false
			break
		}
	}
	if plain {
		return string(b[1 : len(b)-1])
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return string(b)
	}
	return s
}

// jsonList takes the subnets field: an array of strings or a single
// string of prefixes.
type jsonList struct {
	items []string
	bad   string
}

// UnmarshalJSON keeps the items' text; like jsonScalar it never fails.
func (j *jsonList) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	switch {
	case len(b) == 0 || string(b) == "null":
	case b[0] == '"':
		j.items = []string{jsonString(b)}
	case b[0] == '[':
		// The decoder has checked the syntax; only the item types are
		// left to check, which a hand scan does without allocating per
		// item.
		items, ok := scanStringArray(b)
		if !ok {
			j.bad = string(b)
			return nil
		}
		j.items = items
	default:
		j.bad = string(b)
	}
	return nil
}

// scanStringArray splits a syntactically valid JSON array whose items
// should all be strings; ok is false when one is not.
func scanStringArray(b []byte) (items []string, ok bool) {
	i := 1 // past '['
	items = []string{}
	for {
		for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r' || b[i] == ',') {
			i++
		}
		if i >= len(b) {
			return nil, false
		}
		switch b[i] {
		case ']':
			return items, true
		case '"':
			start := i
			i++
			for i < len(b) && b[i] != '"' {
				if b[i] == '\\' {
					i++
				}
				i++
			}
			if i >= len(b) {
				return nil, false
			}
			i++
			items = append(items, jsonString(b[start:i]))
		default:
			return nil, false
		}
	}
}

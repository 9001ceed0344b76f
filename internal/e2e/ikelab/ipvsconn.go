package ikelab

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// decodeIPVSConns rewrites /proc/net/ip_vs_conn (IPv4 addresses and ports
// in hex) as "UDP 198.51.100.101:500 -> 203.0.113.1:500 -> 192.0.2.12:500
// UDP expires 290s" lines. Lines it does not understand are kept as they are.
func decodeIPVSConns(s string) string {
	var out []string
	for i, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		f := strings.Fields(l)
		if i == 0 || len(f) < 9 {
			out = append(out, l)
			continue
		}
		ep := func(a, p string) string {
			ip, err1 := hexAddr(a)
			port, err2 := strconv.ParseUint(p, 16, 16)
			if err1 != nil || err2 != nil {
				return a + ":" + p
			}
			return netip.AddrPortFrom(ip, uint16(port)).String()
		}
		out = append(out, fmt.Sprintf("%s %s -> %s -> %s %s expires %ss", f[0], ep(f[1], f[2]), ep(f[3], f[4]), ep(f[5], f[6]), f[7], f[8]))
	}
	return strings.Join(out, "\n")
}

func hexAddr(s string) (netip.Addr, error) {
	if len(s) == 8 {
		b, err := hex.DecodeString(s)
		if err != nil {
			return netip.Addr{}, err
		}
		var a [4]byte
		binary.BigEndian.PutUint32(a[:], binary.BigEndian.Uint32(b))
		return netip.AddrFrom4(a), nil
	}
	return netip.ParseAddr(s) // IPv6 entries are printed with colons
}

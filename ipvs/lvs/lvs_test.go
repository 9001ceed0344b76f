package lvs

import (
	"bufio"
	"net/netip"
	"strings"
	"testing"
)

// The layout of /proc/net/ip_vs_conn (kernel's ip_vs_conn_seq_show), as
// read in the VM.
const procConns = `Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData
UDP C6336465 01F4 CB007101 01F4 C000020B 01F4 UDP         299
UDP 2001:0db8:0100:0000:0000:0000:0000:0065 1194 2001:0db8:ffff:0000:0000:0000:0000:0001 1194 2001:0db8:0002:0000:0000:0000:0000:000b 1194 UDP         12
`

func TestParseConns(t *testing.T) {
	got, err := ParseConns(bufio.NewScanner(strings.NewReader(procConns)))
	if err != nil || len(got) != 2 {
		t.Fatalf("%+v %v", got, err)
	}
	if got[0].Client != netip.MustParseAddrPort("198.51.100.101:500") || got[0].Dest != netip.MustParseAddrPort("192.0.2.11:500") || got[0].ExpiresInSeconds != 299 {
		t.Fatalf("v4 entry %+v", got[0])
	}
	if got[1].Dest != netip.MustParseAddrPort("[2001:db8:2::b]:4500") || got[1].Virtual.Addr() != netip.MustParseAddr("2001:db8:ffff::1") {
		t.Fatalf("v6 entry %+v", got[1])
	}
	for _, bad := range []string{"UDP C633 01F4\n", "UDP ZZZZZZZZ 01F4 CB007101 01F4 C000020B 01F4 UDP 1\n", "UDP C6336465 01F4 CB007101 01F4 C000020B 01F4 UDP x\n"} {
		if c, err := ParseConns(bufio.NewScanner(strings.NewReader(bad))); err == nil {
			t.Fatalf("accepted %q: %+v", bad, c)
		}
	}
}

func FuzzParseConns(f *testing.F) {
	f.Add(procConns)
	f.Fuzz(func(t *testing.T, s string) {
		cs, err := ParseConns(bufio.NewScanner(strings.NewReader(s)))
		if err != nil {
			return
		}
		for _, c := range cs {
			if !c.Client.IsValid() || !c.Dest.IsValid() {
				t.Fatalf("accepted an entry without addresses: %+v", c)
			}
		}
	})
}

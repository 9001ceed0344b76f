package ipvs

import (
	"errors"
	"strings"
	"testing"
)

func TestCheckKernel(t *testing.T) {
	good := map[string]string{
		"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
		"net.ipv4.conf.all.accept_local": "0", "net.ipv4.conf.in0.accept_local": "1",
		"net.ipv4.conf.all.rp_filter": "2", "net.ipv4.conf.in0.rp_filter": "0",
	}
	for _, c := range []struct {
		name   string
		set    map[string]string
		s      KernelSettings
		want   []string // sysctl of each finding, in order
		refuse bool
	}{
		{"all good", nil, KernelSettings{IPv6: true, Inside: "in0"}, nil, false},
		{"no forwarding", map[string]string{"net.ipv4.ip_forward": "0"}, KernelSettings{Inside: "in0"}, []string{"net.ipv4.ip_forward"}, true},
		{"no v6 forwarding, v6 used", map[string]string{"net.ipv6.conf.all.forwarding": "0"}, KernelSettings{IPv6: true, Inside: "in0"}, []string{"net.ipv6.conf.all.forwarding"}, true},
		{"no v6 forwarding, v6 unused", map[string]string{"net.ipv6.conf.all.forwarding": "0"}, KernelSettings{Inside: "in0"}, nil, false},
		{"no accept_local", map[string]string{"net.ipv4.conf.in0.accept_local": "0"}, KernelSettings{Inside: "in0"}, []string{"net.ipv4.conf.in0.accept_local"}, false},
		{"accept_local on all", map[string]string{"net.ipv4.conf.in0.accept_local": "0", "net.ipv4.conf.all.accept_local": "1"}, KernelSettings{Inside: "in0"}, nil, false},
		{"strict rp_filter on inside, and no forwarding", map[string]string{"net.ipv4.conf.in0.rp_filter": "1", "net.ipv4.ip_forward": "0"}, KernelSettings{Inside: "in0"},
			[]string{"net.ipv4.ip_forward", "net.ipv4.conf.in0.rp_filter"}, true},
		{"no inside configured", map[string]string{"net.ipv4.conf.all.rp_filter": "1"}, KernelSettings{},
			[]string{"net.ipv4.conf.all.accept_local", "net.ipv4.conf.all.rp_filter"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			read := func(k string) (string, error) {
				if v, ok := c.set[k]; ok {
					return v, nil
				}
				if v, ok := good[k]; ok {
					return v, nil
				}
				return "", errors.New("no such sysctl")
			}
			got := checkKernel(c.s, read)
			var keys []string
			refuse := false
			for _, f := range got {
				keys = append(keys, f.Sysctl)
				refuse = refuse || f.Severity == Refuse
				if !strings.Contains(f.String(), "sysctl -w "+f.Sysctl+"=") {
					t.Errorf("finding does not say what to set: %s", f)
				}
			}
			if strings.Join(keys, ",") != strings.Join(c.want, ",") || refuse != c.refuse {
				t.Fatalf("findings %v (refuse %v), want %v (refuse %v)", got, refuse, c.want, c.refuse)
			}
		})
	}
}

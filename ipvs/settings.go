package ipvs

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// KernelSettings says what the director's kernel settings are checked for.
type KernelSettings struct {
	// IPv6 is set when the director steers IPv6 (an IPv6 VIP or node).
	IPv6 bool
	// Inside is the link towards the nodes ("" when not configured: the
	// per-interface checks then look at the "all" settings only).
	Inside string
}

// Severity of a Finding.
type Severity uint8

const (
	// Warn: the director runs, but traffic breaks in a setup the director
	// cannot see from here (nodes whose replies come back through it).
	Warn Severity = iota + 1
	// Refuse: the director would program the kernel and steer nothing.
	Refuse
)

func (s Severity) String() string {
	if s == Refuse {
		return "refuse"
	}
	return "warn"
}

// Finding is one kernel setting that is not what the director needs.
type Finding struct {
	Severity Severity
	Sysctl   string // e.g. net.ipv4.ip_forward
	Have     string
	Want     string
	Why      string
}

func (f Finding) String() string {
	return fmt.Sprintf("%s: %s is %s, want %s (sysctl -w %s=%s; persist it in /etc/sysctl.d/): %s",
		f.Severity, f.Sysctl, f.Have, f.Want, f.Sysctl, f.Want, f.Why)
}

// CheckKernel reads the sysctls of the current network namespace that the
// director depends on and returns what is wrong, most severe first.
func CheckKernel(s KernelSettings) []Finding {
	return checkKernel(s, readSysctl)
}

func readSysctl(key string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/")))
	return strings.TrimSpace(string(b)), err
}

// checkKernel is CheckKernel over a sysctl reader (a test seam).
//
// Why each is what it is:
//   - ip_forward (and IPv6 forwarding when IPv6 is steered) refuse: ESP, AH
//     and return traffic are forwarded by the fwmark routes in both modes
//     (and everything in route-only mode); without forwarding the director
//     would take the VIPs and black-hole every tunnel.
//   - accept_local on the inside link, and a strict rp_filter there, warn:
//     nodes answer from the VIP, and when their replies route back through
//     the director, a packet whose source is a local address (the VIP) is
//     dropped as a martian without accept_local=1, and strict reverse-path
//     filtering drops it even then (the VIP's reverse path is lo, not the
//     inside link). Whether the nodes' replies come back this way is the
//     network's design, which the director cannot see.
func checkKernel(s KernelSettings, read func(string) (string, error)) []Finding {
	var out []Finding
	get := func(key string) string {
		v, err := read(key)
		if err != nil {
			return "unreadable (" + err.Error() + ")"
		}
		return v
	}
	if v := get("net.ipv4.ip_forward"); v != "1" {
		out = append(out, Finding{Refuse, "net.ipv4.ip_forward", v, "1",
			"ESP, AH and return traffic (and in route-only mode IKE too) are forwarded by fwmark routes: without it every tunnel is black-holed"})
	}
	if s.IPv6 {
		if v := get("net.ipv6.conf.all.forwarding"); v != "1" {
			out = append(out, Finding{Refuse, "net.ipv6.conf.all.forwarding", v, "1",
				"IPv6 VIPs or nodes are configured and IPv6 ESP, AH and return traffic are forwarded by fwmark routes"})
		}
	}
	ifs := []string{"all"}
	if s.Inside != "" {
		ifs = append(ifs, s.Inside)
	}
	// accept_local is on when "all" or the interface has it (the kernel
	// ORs the two).
	acceptLocal := false
	for _, i := range ifs {
		if get("net.ipv4.conf."+i+".accept_local") == "1" {
			acceptLocal = true
		}
	}
	if !acceptLocal {
		key := "net.ipv4.conf." + ifs[len(ifs)-1] + ".accept_local"
		out = append(out, Finding{Warn, key, get(key), "1",
			"nodes answer from the VIP, a local address of the director: when their replies route back through the director they are dropped as martians without it"})
	}
	// The effective rp_filter is the larger of "all" and the interface's.
	for _, i := range ifs {
		key := "net.ipv4.conf." + i + ".rp_filter"
		if v := get(key); v == "1" {
			out = append(out, Finding{Warn, key, v, "2 (loose) or 0",
				"strict reverse-path filtering drops the nodes' VIP-sourced replies that come back through the director (the VIP's reverse path is lo, not the inside link)"})
		}
	}
	// Most severe first.
	for i := 1; i < len(out); i++ {
		for j := i; j > 0 && out[j].Severity > out[j-1].Severity; j-- {
			out[j], out[j-1] = out[j-1], out[j]
		}
	}
	return out
}

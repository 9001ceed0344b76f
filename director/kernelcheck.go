package director

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/tunneldirector/tunneldirector/ipvs"
)

// KernelFindings checks the kernel settings of the current network
// namespace that the configuration depends on (ipvs.CheckKernel says which
// and why).
func KernelFindings(c *Config) []ipvs.Finding {
	s := ipvs.KernelSettings{Inside: c.Interfaces.Inside}
	for _, v := range c.VIPs {
		s.IPv6 = s.IPv6 || v.Is6()
	}
	for _, n := range c.Nodes {
		s.IPv6 = s.IPv6 || n.Address6.IsValid()
	}
	return ipvs.CheckKernel(s)
}

// CheckKernel logs every finding (warn and refuse alike) and returns an
// error naming the settings when one of them refuses the start: `run` calls
// it before it touches the kernel, `config check` too.
func CheckKernel(c *Config, log *slog.Logger) error {
	var refuse []error
	for _, f := range KernelFindings(c) {
		if f.Severity == ipvs.Refuse {
			refuse = append(refuse, errors.New(f.String()))
			continue
		}
		if log != nil {
			log.Warn("kernel setting", "finding", f.String())
		}
	}
	if len(refuse) > 0 {
		return fmt.Errorf("kernel settings refuse the start:\n%w", errors.Join(refuse...))
	}
	return nil
}

// LocalAddrs returns the addresses of this network namespace's interfaces
// (none when they cannot be read: what uses them only warns).
func LocalAddrs() []netip.Addr {
	as, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range as {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out
}

package ipvs

import "fmt"

// Text forms of Mode and Forward, so a configuration file decodes them
// once into typed values (YAML and JSON use these methods).

// MarshalText writes the mode's name: auto, ipvs or route-only.
func (m Mode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText parses auto (or empty), ipvs or route-only.
func (m *Mode) UnmarshalText(b []byte) error {
	switch string(b) {
	case "", "auto":
		*m = ModeAuto
	case "ipvs":
		*m = ModeIPVS
	case "route-only":
		*m = ModeRouteOnly
	default:
		return fmt.Errorf("%q (want auto, ipvs or route-only)", shortText(b))
	}
	return nil
}

// MarshalText writes the forwarding method's name: dr, tunnel or masq.
func (f Forward) MarshalText() ([]byte, error) { return []byte(f.String()), nil }

// UnmarshalText parses dr (or empty), tunnel or masq.
func (f *Forward) UnmarshalText(b []byte) error {
	switch string(b) {
	case "", "dr":
		*f = ForwardDR
	case "tunnel":
		*f = ForwardTunnel
	case "masq":
		*f = ForwardMasq
	default:
		return fmt.Errorf("%q (want dr, tunnel or masq)", shortText(b))
	}
	return nil
}

// shortText bounds how much of a bad value an error quotes.
func shortText(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "..."
	}
	return string(b)
}

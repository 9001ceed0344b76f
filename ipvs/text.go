package ipvs

import (
	"fmt"

	"github.com/tunneldirector/tunneldirector/internal/enum"
)

// Text forms of Mode and Forward, so a configuration file decodes them
// once into typed values (YAML and JSON use these methods).

// The names of the modes and forwarding methods, by value: String writes
// them and UnmarshalText reads them; an empty text is the first.
var (
	modeNames    = []string{ModeAuto: "auto", ModeIPVS: "ipvs", ModeRouteOnly: "route-only"}
	forwardNames = []string{ForwardDR: "dr", ForwardTunnel: "tunnel", ForwardMasq: "masq"}
)

// MarshalText writes the mode's name: auto, ipvs or route-only.
func (m Mode) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText parses auto (or empty), ipvs or route-only.
func (m *Mode) UnmarshalText(b []byte) error { return parseName(modeNames, b, m) }

// MarshalText writes the forwarding method's name: dr, tunnel or masq.
func (f Forward) MarshalText() ([]byte, error) { return []byte(f.String()), nil }

// UnmarshalText parses dr (or empty), tunnel or masq.
func (f *Forward) UnmarshalText(b []byte) error { return parseName(forwardNames, b, f) }

// nameOf is v's name; a value without one is written as the first.
func nameOf[T ~uint8](names []string, v T) string {
	if int(v) < len(names) {
		return names[v]
	}
	return names[0]
}

// parseName sets *v to the value b names (empty: the first).
func parseName[T ~uint8](names []string, b []byte, v *T) error {
	if len(b) == 0 {
		*v = 0
		return nil
	}
	x, ok := enum.Parse[T](names, string(b), false)
	if !ok {
		return fmt.Errorf("%q (want %s)", shortText(b), enum.Want(names))
	}
	*v = x
	return nil
}

// shortText bounds how much of a bad value an error quotes.
func shortText(b []byte) string {
	if len(b) > 40 {
		return string(b[:40]) + "..."
	}
	return string(b)
}

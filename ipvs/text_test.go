package ipvs

import (
	"strings"
	"testing"
)

func TestModeAndForwardText(t *testing.T) {
	for _, m := range []Mode{ModeAuto, ModeIPVS, ModeRouteOnly} {
		b, _ := m.MarshalText()
		var got Mode
		if err := got.UnmarshalText(b); err != nil || got != m {
			t.Errorf("mode %v: round trip gave %v, %v", m, got, err)
		}
	}
	for _, f := range []Forward{ForwardDR, ForwardTunnel, ForwardMasq} {
		b, _ := f.MarshalText()
		var got Forward
		if err := got.UnmarshalText(b); err != nil || got != f {
			t.Errorf("forward %v: round trip gave %v, %v", f, got, err)
		}
	}
	var m Mode
	if err := m.UnmarshalText([]byte("IPVS" + strings.Repeat("x", 1000))); err == nil || len(err.Error()) > 100 {
		t.Errorf("bad mode: %v", err)
	}
	var f Forward
	if err := f.UnmarshalText([]byte("nat")); err == nil || !strings.Contains(err.Error(), "want dr, tunnel or masq") {
		t.Errorf("bad forward: %v", err)
	}
}

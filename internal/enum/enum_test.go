package enum

import "testing"

type color uint8

var colorNames = []string{"", "red", "green", "blue"}

func TestString(t *testing.T) {
	for v, want := range map[color]string{1: "red", 3: "blue", 0: "color(0)", 4: "color(4)", 255: "color(255)"} {
		if got := String(colorNames, "color", v); got != want {
			t.Errorf("String(%d) = %q, want %q", v, got, want)
		}
	}
}

func TestParse(t *testing.T) {
	cases := []struct {
		s    string
		fold bool
		want color
		ok   bool
	}{
		{"green", false, 2, true},
		{"Green", false, 0, false},
		{"Green", true, 2, true},
		{"", true, 0, false}, // the empty name is no value's
		{"purple", true, 0, false},
	}
	for _, c := range cases {
		if v, ok := Parse[color](colorNames, c.s, c.fold); v != c.want || ok != c.ok {
			t.Errorf("Parse(%q, fold %v) = %d, %v; want %d, %v", c.s, c.fold, v, ok, c.want, c.ok)
		}
	}
}

func TestWant(t *testing.T) {
	for _, c := range []struct {
		names []string
		want  string
	}{
		{colorNames, "red, green or blue"},
		{[]string{"dr", "tunnel"}, "dr or tunnel"},
		{[]string{"one"}, "one"},
	} {
		if got := Want(c.names); got != c.want {
			t.Errorf("Want(%q) = %q, want %q", c.names, got, c.want)
		}
	}
}

// Package enum names the values of small enumerations: a uint8 type whose
// values index a list of names, so that each type spells its names once
// and String, MarshalText and UnmarshalText all read them from there.
package enum

import (
	"fmt"
	"strings"
)

// String returns v's name, or typ(v) for a value without one (beyond the
// list, or named "").
func String[T ~uint8](names []string, typ string, v T) string {
	if int(v) < len(names) && names[v] != "" {
		return names[v]
	}
	return fmt.Sprintf("%s(%d)", typ, uint8(v))
}

// Parse returns the value named s, ignoring case when fold is set; ok is
// false when no value has that name.
func Parse[T ~uint8](names []string, s string, fold bool) (v T, ok bool) {
	for i, n := range names {
		if n != "" && (n == s || fold && strings.EqualFold(n, s)) {
			return T(i), true
		}
	}
	return 0, false
}

// Want lists the names for an error message: "a, b or c".
func Want(names []string) string {
	var ns []string
	for _, n := range names {
		if n != "" {
			ns = append(ns, n)
		}
	}
	if len(ns) < 2 {
		return strings.Join(ns, "")
	}
	return strings.Join(ns[:len(ns)-1], ", ") + " or " + ns[len(ns)-1]
}

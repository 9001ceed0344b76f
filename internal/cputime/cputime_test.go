package cputime

import "testing"

// TestProcessAdvances burns CPU and checks the reading grows: a stub
// returning a constant fails.
func TestProcessAdvances(t *testing.T) {
	start := Process()
	if start <= 0 {
		t.Fatalf("Process() = %v, want the CPU time used so far", start)
	}
	x := 0
	for Process() == start {
		for i := range 1_000_000 {
			x += i
		}
	}
	_ = x
}

package cputime

import (
	"os"
	"testing"
)

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

// TestOfPIDReadsThisProcess: /proc's figure for this process grows with
// the CPU it burns, as getrusage's does.
func TestOfPIDReadsThisProcess(t *testing.T) {
	u0, s0, err := OfPID(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	start := Process()
	x := 0
	for Process()-start < 50_000_000 { // 50 ms: several clock ticks
		for i := range 1_000_000 {
			x += i
		}
	}
	_ = x
	u1, s1, err := OfPID(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if u1+s1 <= u0+s0 {
		t.Fatalf("OfPID did not advance: %v+%v, then %v+%v", u0, s0, u1, s1)
	}
	if _, _, err := OfPID(-1); err == nil {
		t.Fatal("OfPID(-1) read something")
	}
}

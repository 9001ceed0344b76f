// Package cputime reads the process's CPU time for benchmarks and scale
// tests. On the shared build machine other work steals the cores, which
// moves the wall time far more than the CPU time, so benchmarks report
// both.
package cputime

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Process is the process's user+system CPU time so far (0 if the kernel
// does not say).
func Process() time.Duration {
	u, s := Split()
	return u + s
}

// Split is the process's user and system CPU time so far, apart: the
// system part of a kernel-programming benchmark is mostly the kernel
// applying the transaction.
func Split() (user, sys time.Duration) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, 0
	}
	return time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())
}

// OfPID is another process's user and system CPU time so far, from
// /proc/PID/stat (a daemon a scale test started).
func OfPID(pid int) (user, sys time.Duration, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// The fields after the command, which is in brackets and may hold
	// spaces: the state is the first, utime and stime the 12th and 13th,
	// in clock ticks (USER_HZ, 100 on Linux).
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 13 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %q: too few fields", pid, b)
	}
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("/proc/%d/stat: utime %q, stime %q", pid, f[11], f[12])
	}
	const tick = 10 * time.Millisecond
	return time.Duration(u) * tick, time.Duration(s) * tick, nil
}

// PerOp reports the process's CPU time per iteration beside the wall
// time, as the metric cpu-ns/op. Call it as defer cputime.PerOp(b)().
func PerOp(b *testing.B) func() {
	start := Process()
	return func() { b.ReportMetric(float64(Process()-start)/float64(b.N), "cpu-ns/op") }
}

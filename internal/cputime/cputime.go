// Package cputime reads the process's CPU time for benchmarks and scale
// tests. On the shared build machine other work steals the cores, which
// moves the wall time far more than the CPU time, so benchmarks report
// both.
package cputime

import (
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

// PerOp reports the process's CPU time per iteration beside the wall
// time, as the metric cpu-ns/op. Call it as defer cputime.PerOp(b)().
func PerOp(b *testing.B) func() {
	start := Process()
	return func() { b.ReportMetric(float64(Process()-start)/float64(b.N), "cpu-ns/op") }
}

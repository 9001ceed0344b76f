package vmlab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// QemuBinary is the emulator vmlab runs.
const QemuBinary = "qemu-system-x86_64"

type runner struct {
	t       testing.TB
	opts    Options
	kernel  *Kernel
	initrd  string
	qemu    string
	timings []string
}

// Result is the outcome of one guest run.
type Result struct {
	ExitCode int
	Timings  string
	Modfail  []string
	tail     []string
}

// Tail returns the last console lines.
func (r *Result) Tail() string { return strings.Join(r.tail, "\n") }

func (r *runner) mark(what string, since time.Time) {
	r.timings = append(r.timings, fmt.Sprintf("%s %.2fs", what, time.Since(since).Seconds()))
}

func newRunner(t testing.TB, opts Options) (*runner, error) {
	if opts.Package == "" {
		opts.Package = "."
	}
	if opts.Timeout == 0 {
		opts.Timeout = 3 * time.Minute
	}
	if opts.MemoryMB == 0 {
		opts.MemoryMB = 1024
	}
	r := &runner{t: t, opts: opts}
	q, err := exec.LookPath(QemuBinary)
	if err != nil {
		return nil, &MissingError{What: QemuBinary + " (apt-get install qemu-system-x86)", Err: err}
	}
	r.qemu = q
	ctx, cancel := context.WithTimeout(context.Background(), opts.Timeout)
	defer cancel()

	start := time.Now()
	if r.kernel, err = EnsureKernel(ctx); err != nil {
		return nil, err
	}
	want := append(append([]string(nil), DefaultModules...), opts.Modules...)
	if opts.HostRoot {
		want = append(want, HostRootModules...)
	}
	mods, err := r.kernel.ResolveModules(want)
	if err != nil {
		return nil, err
	}
	cache, unlock, err := lockCache()
	if err != nil {
		return nil, err
	}
	base, err := baseInitramfs(cache, r.kernel, mods)
	unlock()
	if err != nil {
		return nil, err
	}
	r.mark("kernel+initramfs", start)

	start = time.Now()
	dir := t.TempDir()
	bin := filepath.Join(dir, "td.test")
	if err := buildTest(ctx, opts.Package, bin); err != nil {
		return nil, err
	}
	r.mark("go test -c", start)

	start = time.Now()
	args := []string{"-test.v"}
	if opts.Run != "" {
		args = append(args, "-test.run="+opts.Run)
	}
	// Let the guest's own test timeout fire first, so a hang prints the
	// goroutine dump on the console before the host kills qemu.
	gt := opts.Timeout - 30*time.Second
	if gt < 20*time.Second {
		gt = opts.Timeout * 2 / 3
	}
	args = append(args, "-test.timeout="+gt.String())
	args = append(args, opts.Args...)
	tcpio := filepath.Join(dir, "test.cpio")
	env := map[string]string{}
	for k, v := range opts.Env {
		env[k] = v
	}
	if netlab.InCI() {
		env["CI"] = "true"
	}
	if opts.OutputDir != "" {
		if !opts.HostRoot || !filepath.IsAbs(opts.OutputDir) || strings.ContainsAny(opts.OutputDir, ", '\"") {
			return nil, fmt.Errorf("vmlab: OutputDir %q: needs HostRoot and an absolute path without commas, spaces or quotes", opts.OutputDir)
		}
		env[OutputEnv] = opts.OutputDir
	}
	if err := testInitramfs(tcpio, bin, env, args, opts.HostRoot); err != nil {
		return nil, err
	}
	r.initrd = filepath.Join(dir, "initrd.cpio")
	if err := concat(r.initrd, base, tcpio); err != nil {
		return nil, err
	}
	r.mark("initrd", start)
	return r, nil
}

// goCommand returns the go command: from PATH, else from the running
// toolchain's GOROOT.
func goCommand() (string, error) {
	gobin, err := exec.LookPath("go")
	if err == nil {
		return gobin, nil
	}
	gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, serr := os.Stat(gobin); serr != nil {
		return "", &MissingError{What: "the go command (put Go's bin directory on PATH)", Err: err}
	}
	return gobin, nil
}

// buildTest compiles the package's tests as one static binary.
func buildTest(ctx context.Context, pkg, out string) error {
	gobin, err := goCommand()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, gobin, "test", "-c", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build guest test binary: go test -c %s: %v\n%s", pkg, err, b)
	}
	if _, err := os.Stat(out); err != nil {
		return fmt.Errorf("build guest test binary: package %s has no test files: %w", pkg, err)
	}
	return nil
}

// BuildBinary builds the main package pkg (an import path, or a path
// relative to the calling test's directory) as a static binary at out, for
// a guest to run from the host's root (Options.HostRoot).
func BuildBinary(ctx context.Context, pkg, out string) error {
	gobin, err := goCommand()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, gobin, "build", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build %s for the guest: go build: %v\n%s", pkg, err, b)
	}
	return nil
}

func concat(dst string, srcs ...string) error {
	f, err := os.Create(dst)
	if err != nil {
		return fmt.Errorf("create %s: %w", dst, err)
	}
	for _, s := range srcs {
		in, err := os.Open(s)
		if err != nil {
			f.Close()
			return fmt.Errorf("open %s: %w", s, err)
		}
		_, err = io.Copy(f, in)
		in.Close()
		if err != nil {
			f.Close()
			return fmt.Errorf("append %s to %s: %w", s, dst, err)
		}
	}
	return f.Close()
}

// Accel returns the qemu accelerator: $TD_VMLAB_ACCEL if set, else "tcg".
// KVM is not the default even when /dev/kvm opens: on the project's
// machines (nested, sandboxed) qemu with -accel kvm aborts on an MSR write
// with -cpu host/max and hangs at boot with -cpu kvm64, while TCG boots the
// guest in about 3 s. Set TD_VMLAB_ACCEL=kvm where KVM really works.
func Accel() string {
	if a := os.Getenv("TD_VMLAB_ACCEL"); a != "" {
		return a
	}
	return "tcg"
}

// QemuArgs returns the qemu command line for a kernel and initrd.
func QemuArgs(accel, vmlinuz, initrd string, memMB int) []string {
	cpu := "max"
	if accel == "kvm" {
		cpu = "host"
	}
	return []string{
		"-accel", accel, "-cpu", cpu, "-smp", "2", "-m", strconv.Itoa(memMB),
		// No default devices (VGA, NIC, monitor): fewer to probe at boot.
		"-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio",
		"-kernel", vmlinuz, "-initrd", initrd,
		// panic=-1 turns a guest panic into a reboot, which -no-reboot turns
		// into a qemu exit instead of a hang until the timeout.
		"-append", "console=ttyS0 quiet panic=-1 mitigations=off rdinit=/init",
	}
}

func (r *runner) run() (*Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), r.opts.Timeout)
	defer cancel()
	accel := Accel()
	qargs := QemuArgs(accel, r.kernel.Vmlinuz, r.initrd, r.opts.MemoryMB)
	if r.opts.HostRoot {
		qargs = append(qargs, hostRootQemuArgs(r.opts.OutputDir)...)
	}
	cmd := exec.CommandContext(ctx, r.qemu, qargs...)
	cmd.Stdin = nil
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("qemu stdout pipe: %w", err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	cmd.WaitDelay = 2 * time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", r.qemu, err)
	}
	res := &Result{ExitCode: -1}
	const tailN = 80
	var mu sync.Mutex
	var firstLine, testStart time.Duration
	stages := []string{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			el := time.Since(start)
			mu.Lock()
			if firstLine == 0 {
				firstLine = el
			}
			res.tail = append(res.tail, line)
			if len(res.tail) > tailN {
				res.tail = res.tail[len(res.tail)-tailN:]
			}
			switch {
			case strings.HasPrefix(line, "VMLAB-EXIT="):
				if n, err := strconv.Atoi(strings.TrimPrefix(line, "VMLAB-EXIT=")); err == nil {
					res.ExitCode = n
				}
			case strings.HasPrefix(line, "VMLAB-MODFAIL="):
				res.Modfail = append(res.Modfail, strings.TrimPrefix(line, "VMLAB-MODFAIL="))
			case strings.HasPrefix(line, "VMLAB-STAGE="):
				f := strings.Fields(strings.TrimPrefix(line, "VMLAB-STAGE="))
				if len(f) == 2 {
					stages = append(stages, fmt.Sprintf("%s@%ss(guest)/%.2fs(host)", f[0], f[1], el.Seconds()))
					if f[0] == "modules" {
						testStart = el
					}
				}
			}
			mu.Unlock()
			r.t.Log("guest| " + line)
		}
	}()
	<-done
	werr := cmd.Wait()
	total := time.Since(start)
	mu.Lock()
	defer mu.Unlock()
	res.Timings = fmt.Sprintf("accel=%s; prepare: %s; first console line %.2fs; stages %s; tests %.2fs; qemu total %.2fs",
		accel, strings.Join(r.timings, ", "), firstLine.Seconds(), strings.Join(stages, " "), (total - testStart).Seconds(), total.Seconds())
	if ctx.Err() != nil {
		return res, fmt.Errorf("guest timed out after %v (killed qemu)", r.opts.Timeout)
	}
	if res.ExitCode < 0 {
		return res, fmt.Errorf("guest reported no VMLAB-EXIT status (qemu: %v; stderr: %s)", werr, strings.TrimSpace(stderr.String()))
	}
	if len(res.Modfail) > 0 && res.ExitCode == 0 {
		// The tests passed, but not on the kernel setup they asked for.
		return res, &MissingError{What: "kernel modules in the guest: " + strings.Join(res.Modfail, ", "), Err: errors.New("insmod failed in the guest (see console)")}
	}
	if werr != nil {
		r.t.Logf("vmlab: qemu exited with %v after the guest reported status %d (stderr: %s)", werr, res.ExitCode, strings.TrimSpace(stderr.String()))
	}
	return res, nil
}

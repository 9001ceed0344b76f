package vmlab

import (
	"bufio"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// initScript is the guest's /init. It prints VMLAB-STAGE lines with the
// guest uptime so the host can report where boot time goes, loads the
// modules in the host-computed order with busybox insmod (no modprobe, no
// modules.dep needed), runs the test binary through run.sh and reports its
// exit status as a VMLAB-EXIT line before powering off.
const initScript = `#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec 0</dev/console 1>/dev/console 2>&1
echo "VMLAB-STAGE=booted $(cut -d' ' -f1 /proc/uptime)"
while read -r m; do
	insmod "/lib/modules/$(uname -r)/vmlab/$m.ko" || echo "VMLAB-MODFAIL=$m"
done < /etc/vmlab/modules
echo "VMLAB-STAGE=modules $(cut -d' ' -f1 /proc/uptime)"
ip link set lo up
# Host-root mode: hostroot.sh (from the per-run archive) mounts the host's
# root and switches to it; it must replace this shell to keep PID 1.
if [ -e /etc/vmlab/hostroot.sh ]; then exec sh /etc/vmlab/hostroot.sh; fi
sh /etc/vmlab/run.sh
echo "VMLAB-EXIT=$?"
echo "VMLAB-STAGE=done $(cut -d' ' -f1 /proc/uptime)"
poweroff -f
`

// cpioWriter writes the "newc" cpio format that the kernel unpacks as an
// initramfs. Written here rather than by cpio(1) so the lab needs one tool
// fewer and the archive is byte-for-byte reproducible (mtime 0).
type cpioWriter struct {
	w   *bufio.Writer
	ino int
	err error
}

func newCpio(w io.Writer) *cpioWriter { return &cpioWriter{w: bufio.NewWriterSize(w, 1<<20)} }

func (c *cpioWriter) header(name string, mode uint32, size int, rmaj, rmin int) {
	if c.err != nil {
		return
	}
	c.ino++
	_, c.err = fmt.Fprintf(c.w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, 1, 0, size, 0, 0, rmaj, rmin, len(name)+1, 0)
	if c.err == nil {
		_, c.err = io.WriteString(c.w, name+"\x00")
	}
	c.pad(110 + len(name) + 1)
}

func (c *cpioWriter) pad(n int) {
	if c.err != nil {
		return
	}
	if r := n % 4; r != 0 {
		_, c.err = c.w.Write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) dir(name string) { c.header(name, 0o040755, 0, 0, 0) }

func (c *cpioWriter) charDev(name string, maj, min int) { c.header(name, 0o020600, 0, maj, min) }

func (c *cpioWriter) bytes(name string, mode uint32, data []byte) {
	c.header(name, 0o100000|mode, len(data), 0, 0)
	if c.err == nil {
		_, c.err = c.w.Write(data)
	}
	c.pad(len(data))
}

func (c *cpioWriter) file(name string, mode uint32, src string) {
	if c.err != nil {
		return
	}
	f, err := os.Open(src)
	if err != nil {
		c.err = fmt.Errorf("initramfs: add %s: %w", src, err)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		c.err = fmt.Errorf("initramfs: stat %s: %w", src, err)
		return
	}
	c.header(name, 0o100000|mode, int(st.Size()), 0, 0)
	if c.err == nil {
		if _, err := io.Copy(c.w, f); err != nil {
			c.err = fmt.Errorf("initramfs: copy %s: %w", src, err)
		}
	}
	c.pad(int(st.Size()))
}

func (c *cpioWriter) close() error {
	c.header("TRAILER!!!", 0, 0, 0, 0)
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}

// findBusybox returns a statically linked busybox: the initramfs has no
// libc for a dynamic one.
func findBusybox() (string, error) {
	cands := []string{os.Getenv("TD_VMLAB_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox"}
	if p, err := exec.LookPath("busybox"); err == nil {
		cands = append(cands, p)
	}
	for _, p := range cands {
		if p == "" {
			continue
		}
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		static := true
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				static = false
			}
		}
		f.Close()
		if static {
			return p, nil
		}
	}
	return "", &MissingError{What: "statically linked busybox (apt-get install busybox-static)", Err: fmt.Errorf("none of %v is a static busybox", cands)}
}

// baseInitramfs returns the cached archive with /init, busybox and the
// modules, building it when the inputs changed.
func baseInitramfs(cache string, k *Kernel, mods []Module) (string, error) {
	bb, err := findBusybox()
	if err != nil {
		return "", err
	}
	st, err := os.Stat(bb)
	if err != nil {
		return "", fmt.Errorf("stat busybox %s: %w", bb, err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "v2\n%s\n%s\n%d %d\n%s\n", k.Package, bb, st.Size(), st.ModTime().UnixNano(), initScript)
	names := make([]string, 0, len(mods))
	for _, m := range mods {
		names = append(names, m.Name)
	}
	fmt.Fprintln(h, strings.Join(names, ","))
	out := filepath.Join(cache, "initramfs", "base-"+hex.EncodeToString(h.Sum(nil))[:16]+".cpio")
	if _, err := os.Stat(out); err == nil {
		// The mtime says when a base was last used (see the clean-up below).
		now := time.Now()
		_ = os.Chtimes(out, now, now)
		return out, nil
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", filepath.Dir(out), err)
	}
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return "", fmt.Errorf("create initramfs %s: %w", tmp, err)
	}
	defer os.Remove(tmp)
	c := newCpio(f)
	for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc", "etc/vmlab", "lib", "lib/modules", "lib/modules/" + k.Release, "lib/modules/" + k.Release + "/vmlab"} {
		c.dir(d)
	}
	// The kernel opens /dev/console for init before /init can mount
	// devtmpfs; without this node init would start with no stdio.
	c.charDev("dev/console", 5, 1)
	c.bytes("init", 0o755, []byte(initScript))
	c.file("bin/busybox", 0o755, bb)
	// A modules.dep for the loaded set lets busybox modprobe (which
	// libraries such as cloudflare/ipvs run) find them already loaded instead of
	// failing.
	var dep strings.Builder
	for _, m := range mods {
		c.file("lib/modules/"+k.Release+"/vmlab/"+m.Name+".ko", 0o644, m.Path)
		dep.WriteString("vmlab/" + m.Name + ".ko:")
		for _, d := range m.Deps {
			dep.WriteString(" vmlab/" + d + ".ko")
		}
		dep.WriteString("\n")
	}
	c.bytes("lib/modules/"+k.Release+"/modules.dep", 0o644, []byte(dep.String()))
	c.bytes("etc/vmlab/modules", 0o644, []byte(strings.Join(names, "\n")+"\n"))
	if err := c.close(); err != nil {
		f.Close()
		return "", fmt.Errorf("write initramfs %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("write initramfs %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", fmt.Errorf("install initramfs %s: %w", out, err)
	}
	// Bases of another kernel or init are dead weight, but packages with
	// other module lists (run by go test in parallel) may be about to read
	// theirs: remove only bases unused for a day.
	old, _ := filepath.Glob(filepath.Join(filepath.Dir(out), "base-*.cpio"))
	for _, o := range old {
		if st, err := os.Stat(o); err == nil && o != out && time.Since(st.ModTime()) > 24*time.Hour {
			os.Remove(o)
		}
	}
	return out, nil
}

func shQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// hostRootScript mounts the host's root filesystem, shared read-only by
// qemu over 9p (mount tag HostRootTag), under a tmpfs overlay that makes it
// writable for the guest alone, moves the initramfs's proc, sys, dev and run
// mounts into it, and switches to it. The kernel modules stay loaded from the
// initramfs (loading them over 9p is slow). switch_root must be run by PID 1:
// /init execs this script. Failures power off with a VMLAB-EXIT status so
// the host reports them instead of waiting for its timeout.
const hostRootScript = `fail() { echo "vmlab: host root: $*"; echo "VMLAB-EXIT=125"; poweroff -f; }
mkdir -p /mnt/host /mnt/rw /newroot
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose ` + HostRootTag + ` /mnt/host || fail "mount 9p ` + HostRootTag + `"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw || fail "mount tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot || fail "mount overlay"
mkdir -p /newroot/.vmlab || fail "mkdir /.vmlab"
cp /bin/busybox /etc/vmlab/run.sh /etc/vmlab/stage2.sh /newroot/.vmlab/ || fail "copy stage 2"
# The loaded modules, where the host's modprobe (run by programs such as
# ipvsadm or a netlink library) finds them already loaded.
mkdir -p /newroot/lib/modules && cp -a /lib/modules/$(uname -r) /newroot/lib/modules/ || fail "copy modules"
echo "VMLAB-STAGE=hostroot $(cut -d' ' -f1 /proc/uptime)"
if [ -n "$` + OutputEnv + `" ]; then
	mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 ` + outputTag + ` "/newroot$` + OutputEnv + `" || fail "mount the output directory"
fi
for d in proc sys dev run; do mount --move /$d /newroot/$d || fail "move /$d"; done
exec switch_root /newroot /.vmlab/busybox sh /.vmlab/stage2.sh
`

// hostRootStage2 runs on the host's root (as the overlay): it completes the
// usual mounts, runs the tests with the host's tools on PATH and powers off
// with busybox (the host's poweroff would need systemd).
const hostRootStage2 = `export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mkdir -p /dev/pts /dev/shm
/.vmlab/busybox mount -t devpts devpts /dev/pts
/.vmlab/busybox mount -t tmpfs tmpfs /dev/shm
# busybox sh runs its own applets first: the host's (kmod) depmod by path, so
# that the host's modprobe finds the loaded modules in its index.
/sbin/depmod "$(uname -r)" 2>/dev/null
/.vmlab/busybox sh /.vmlab/run.sh
echo "VMLAB-EXIT=$?"
echo "VMLAB-STAGE=done $(cut -d' ' -f1 /proc/uptime)"
/.vmlab/busybox poweroff -f
`

// runScript is run.sh: the guest environment and the test binary's command
// line.
func runScript(testBin string, env map[string]string, args []string) string {
	var sb strings.Builder
	sb.WriteString("export " + GuestEnv + "=1\n")
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		sb.WriteString("export " + k + "=" + shQuote(env[k]) + "\n")
	}
	sb.WriteString("cd /tmp\nexec " + shQuote(testBin))
	for _, a := range args {
		sb.WriteString(" " + shQuote(a))
	}
	sb.WriteString("\n")
	return sb.String()
}

// testInitramfs writes the per-run archive: run.sh and the test binary,
// or, with hostRoot, the scripts that switch to the host's root, where the
// guest runs the test binary from its host path (it is not copied).
func testInitramfs(path, testBin string, env map[string]string, args []string, hostRoot bool) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create test initramfs %s: %w", path, err)
	}
	c := newCpio(f)
	if hostRoot {
		c.bytes("etc/vmlab/run.sh", 0o644, []byte(runScript(testBin, env, args)))
		// hostroot.sh runs before run.sh's exports: it gets the output
		// directory (or an empty one) as a shell variable of its own.
		c.bytes("etc/vmlab/hostroot.sh", 0o644, []byte(OutputEnv+"="+shQuote(env[OutputEnv])+"\n"+hostRootScript))
		c.bytes("etc/vmlab/stage2.sh", 0o644, []byte(hostRootStage2))
	} else {
		c.file("td.test", 0o755, testBin)
		c.bytes("etc/vmlab/run.sh", 0o644, []byte(runScript("/td.test", env, args)))
	}
	if err := c.close(); err != nil {
		f.Close()
		return fmt.Errorf("write test initramfs %s: %w", path, err)
	}
	return f.Close()
}

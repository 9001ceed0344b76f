package vmlab

import (
	"bufio"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
)

// DefaultModules are loaded in the guest, in this order (each after its
// dependencies). crc32c_generic comes first because libcrc32c (needed by
// ip_vs) asks for "crc32c" only through a soft dependency, which busybox
// modprobe ignores; with no modprobe in the guest the crypto API cannot load
// ESP's algorithms on demand either, so they are all listed.
var DefaultModules = []string{
	"crc32c_generic", "libcrc32c",
	"nf_defrag_ipv4", "nf_defrag_ipv6", "nf_conntrack", "nf_nat",
	"ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_mh", "ip_vs_lc", "ip_vs_wlc",
	"nf_tables", "nft_ct", "nft_hash", "nft_numgen", "nft_chain_nat",
	// The classifier leaves packets to the director's own addresses alone
	// (fib daddr type local).
	"nft_fib", "nft_fib_ipv4", "nft_fib_ipv6", "nft_fib_inet",
	"veth", "bridge", "dummy",
	"tunnel4", "tunnel6", "ipip", "ip6_tunnel",
	"xfrm_algo", "xfrm_user", "esp4", "esp6", "ah4", "ah6",
	"authenc", "authencesn", "echainiv", "seqiv", "ctr", "ghash_generic", "gcm",
	"aes_generic", "cbc", "sha256_generic", "sha512_generic", "hmac",
	// seqiv and echainiv (ESP's IV generators) need the default RNG
	// "stdrng", which drbg provides; without it adding an ESP state fails
	// with ENOENT. (jitterentropy_rng does not load in this guest: unknown
	// symbol; drbg works without it.)
	"drbg",
}

// DefaultKernelMeta is the Debian metapackage whose dependency names the
// kernel image package to boot.
const DefaultKernelMeta = "linux-image-amd64"

// CacheDir returns the vmlab cache: $TD_VMLAB_CACHE, or
// <user cache dir>/tunneldirector/vmlab. Kernel packages and initramfs
// pieces live there, never in the repository.
func CacheDir() (string, error) {
	if d := os.Getenv("TD_VMLAB_CACHE"); d != "" {
		return d, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("vmlab cache dir: %w (set TD_VMLAB_CACHE)", err)
	}
	return filepath.Join(d, "tunneldirector", "vmlab"), nil
}

// Kernel is an extracted Debian kernel image package in the cache.
type Kernel struct {
	Package string // e.g. linux-image-6.1.0-56-amd64
	Release string // e.g. 6.1.0-56-amd64
	Vmlinuz string // path of the bootable image
	ModDir  string // path of lib/modules/<release>
}

// lockCache returns the cache directory, created and locked: the lock
// serialises cache fills across concurrently running test binaries (go
// test runs packages in parallel).
func lockCache() (dir string, unlock func(), err error) {
	dir, err = CacheDir()
	if err != nil {
		return "", nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", nil, fmt.Errorf("create cache dir %s: %w", dir, err)
	}
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", nil, fmt.Errorf("open cache lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return "", nil, fmt.Errorf("lock cache %s: %w", dir, err)
	}
	return dir, func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

// KernelPackage names the kernel image package to use: $TD_VMLAB_KERNEL_PKG,
// else the dependency of linux-image-amd64 that apt-cache reports.
func KernelPackage(ctx context.Context) (string, error) {
	if p := os.Getenv("TD_VMLAB_KERNEL_PKG"); p != "" {
		return p, nil
	}
	if _, err := exec.LookPath("apt-cache"); err != nil {
		return "", &MissingError{What: "apt-cache (a Debian machine) to resolve " + DefaultKernelMeta + "; or set TD_VMLAB_KERNEL_PKG", Err: err}
	}
	out, err := exec.CommandContext(ctx, "apt-cache", "depends", DefaultKernelMeta).CombinedOutput()
	if err != nil {
		return "", &MissingError{What: "kernel package list (run: apt-get update, or scripts/lab-deps.sh)", Err: fmt.Errorf("apt-cache depends %s: %v: %s", DefaultKernelMeta, err, bytes.TrimSpace(out))}
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
			return f[1], nil
		}
	}
	return "", &MissingError{What: "kernel package list (run: apt-get update, or scripts/lab-deps.sh)", Err: fmt.Errorf("apt-cache depends %s names no linux-image-* package: %s", DefaultKernelMeta, bytes.TrimSpace(out))}
}

// EnsureKernel returns the kernel to boot, downloading (apt-get download)
// and extracting (dpkg-deb -x) its package into the cache when needed.
// Nothing is installed on the host. Without apt, a kernel already in the
// cache is used.
func EnsureKernel(ctx context.Context) (*Kernel, error) {
	cache, unlock, err := lockCache()
	if err != nil {
		return nil, err
	}
	defer unlock()
	kdir := filepath.Join(cache, "kernel")
	pkg, perr := KernelPackage(ctx)
	if perr != nil {
		// Offline or not Debian: fall back to the newest cached kernel.
		ents, _ := os.ReadDir(kdir)
		var names []string
		for _, e := range ents {
			if e.IsDir() && !strings.HasSuffix(e.Name(), ".tmp") {
				names = append(names, e.Name())
			}
		}
		if len(names) == 0 {
			return nil, perr
		}
		sort.Strings(names)
		pkg = names[len(names)-1]
	}
	dst := filepath.Join(kdir, pkg)
	if _, err := os.Stat(dst); err != nil {
		if err := fetchKernel(ctx, cache, pkg, dst); err != nil {
			return nil, err
		}
	}
	return openKernel(pkg, dst)
}

func fetchKernel(ctx context.Context, cache, pkg, dst string) error {
	debs := filepath.Join(cache, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", debs, err)
	}
	deb, err := findDeb(debs, pkg)
	if err != nil {
		for _, tool := range []string{"apt-get", "dpkg-deb"} {
			if _, lerr := exec.LookPath(tool); lerr != nil {
				return &MissingError{What: tool + " to fetch kernel package " + pkg + " (a Debian machine; or run scripts/lab-deps.sh)", Err: lerr}
			}
		}
		cmd := exec.CommandContext(ctx, "apt-get", "download", pkg)
		cmd.Dir = debs
		if out, err := cmd.CombinedOutput(); err != nil {
			return &MissingError{What: "kernel package " + pkg + " (run: apt-get update; scripts/lab-deps.sh)", Err: fmt.Errorf("apt-get download %s: %v: %s", pkg, err, bytes.TrimSpace(out))}
		}
		if deb, err = findDeb(debs, pkg); err != nil {
			return err
		}
	}
	tmp := dst + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(dst), err)
	}
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, tmp).CombinedOutput(); err != nil {
		return fmt.Errorf("extract kernel package %s: dpkg-deb -x: %v: %s", deb, err, bytes.TrimSpace(out))
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("install kernel %s into cache: %w", pkg, err)
	}
	return nil
}

func findDeb(dir, pkg string) (string, error) {
	m, _ := filepath.Glob(filepath.Join(dir, pkg+"_*_amd64.deb"))
	if len(m) == 0 {
		return "", fmt.Errorf("kernel package %s: no %s_*_amd64.deb in %s", pkg, pkg, dir)
	}
	sort.Strings(m)
	return m[len(m)-1], nil
}

func openKernel(pkg, dir string) (*Kernel, error) {
	vm, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*"))
	if len(vm) != 1 {
		return nil, fmt.Errorf("kernel package %s in %s: want one boot/vmlinuz-*, found %d", pkg, dir, len(vm))
	}
	rel := strings.TrimPrefix(filepath.Base(vm[0]), "vmlinuz-")
	mod := filepath.Join(dir, "lib", "modules", rel)
	if _, err := os.Stat(mod); err != nil {
		return nil, fmt.Errorf("kernel package %s: modules of %s: %w", pkg, rel, err)
	}
	return &Kernel{Package: pkg, Release: rel, Vmlinuz: vm[0], ModDir: mod}, nil
}

// Module is a kernel module file to load in the guest.
type Module struct {
	Name string
	Path string
	Deps []string // direct hard dependencies (module names)
}

func modName(s string) string {
	s = strings.TrimSuffix(filepath.Base(s), ".ko")
	return strings.ReplaceAll(s, "-", "_")
}

// ResolveModules returns the module files for names in load order, each
// after its dependencies, which it reads from the modules' own .modinfo
// (the kernel package ships no modules.dep: depmod makes it on install).
// Names built into the kernel are skipped. A name that is neither is an
// error naming it.
func (k *Kernel) ResolveModules(names []string) ([]Module, error) {
	index := map[string]string{}
	err := filepath.WalkDir(filepath.Join(k.ModDir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.HasSuffix(p, ".ko") {
			index[modName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules of %s: %w", k.Release, err)
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(k.ModDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			builtin[modName(l)] = true
		}
	}
	var order []Module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name, from string) error
	visit = func(name, from string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("kernel module %s: dependency cycle via %s", name, from)
		case 2:
			return nil
		}
		p, ok := index[name]
		if !ok {
			if builtin[name] {
				state[name] = 2
				return nil
			}
			what := fmt.Sprintf("kernel module %s in %s", name, k.Package)
			if from != "" {
				what += " (needed by " + from + ")"
			}
			return &MissingError{What: what, Err: errors.New("neither a module file nor built in")}
		}
		state[name] = 1
		deps, soft, err := modinfoDeps(p)
		if err != nil {
			return err
		}
		for _, d := range soft {
			// Soft dependencies that name real modules are honoured; ones
			// that name aliases (e.g. "crc32c") are covered by the list.
			if _, ok := index[d]; ok {
				if err := visit(d, name); err != nil {
					return err
				}
			}
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, Module{Name: name, Path: p, Deps: deps})
		return nil
	}
	for _, n := range names {
		if err := visit(modName(n), ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// modinfoDeps reads "depends=" and the "pre:" part of "softdep=" from a
// module's .modinfo section.
func modinfoDeps(path string) (deps, softPre []string, err error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("kernel module %s: %w", path, err)
	}
	defer f.Close()
	s := f.Section(".modinfo")
	if s == nil {
		return nil, nil, fmt.Errorf("kernel module %s: no .modinfo section", path)
	}
	data, err := s.Data()
	if err != nil {
		return nil, nil, fmt.Errorf("kernel module %s: read .modinfo: %w", path, err)
	}
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d != "" {
					deps = append(deps, modName(d))
				}
			}
		case "softdep":
			pre := false
			for _, w := range strings.Fields(v) {
				switch w {
				case "pre:":
					pre = true
				case "post:":
					pre = false
				default:
					if pre {
						softPre = append(softPre, modName(w))
					}
				}
			}
		}
	}
	return deps, softPre, nil
}

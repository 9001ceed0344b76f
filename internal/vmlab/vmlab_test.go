package vmlab

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

func TestShQuote(t *testing.T) {
	for in, want := range map[string]string{"a": "'a'", "^Test(A|B)$": "'^Test(A|B)$'", "it's": `'it'\''s'`} {
		if got := shQuote(in); got != want {
			t.Errorf("shQuote(%q) = %s, want %s", in, got, want)
		}
	}
}

// TestCpioReadableByCpio checks the newc writer against cpio(1).
func TestCpioReadableByCpio(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		netlab.Require(t, "cpio (apt-get install cpio)", err)
	}
	var buf bytes.Buffer
	c := newCpio(&buf)
	c.dir("etc")
	c.bytes("etc/hello", 0o644, []byte("hello world"))
	c.charDev("console", 5, 1)
	if err := c.close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d not 4-aligned (archives are concatenated)", buf.Len())
	}
	dir := t.TempDir()
	cmd := exec.Command("cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "--nonmatching", "console")
	cmd.Dir = dir
	cmd.Stdin = &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v: %s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, "etc", "hello"))
	if err != nil || string(b) != "hello world" {
		t.Fatalf("extracted %q, %v", b, err)
	}
}

// TestResolveModulesOrder checks dependency order on the real kernel
// package (fetched into the cache if needed).
func TestResolveModulesOrder(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the kernel package")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	k, err := EnsureKernel(ctx)
	if err != nil {
		netlab.Require(t, "vmlab kernel (run scripts/lab-deps.sh)", err)
	}
	mods, err := k.ResolveModules(DefaultModules)
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		pos[m.Name] = i
		for _, d := range m.Deps {
			if p, ok := pos[d]; !ok || p > i {
				t.Errorf("module %s loaded before its dependency %s", m.Name, d)
			}
		}
	}
	for _, pair := range [][2]string{{"crc32c_generic", "ip_vs"}, {"nf_conntrack", "ip_vs"}, {"xfrm_algo", "esp4"}} {
		if pos[pair[0]] > pos[pair[1]] {
			t.Errorf("%s must load before %s", pair[0], pair[1])
		}
	}
	if _, err := k.ResolveModules([]string{"no_such_module_xyz"}); err == nil || !strings.Contains(err.Error(), "no_such_module_xyz") {
		t.Errorf("unknown module: err = %v, want one naming it", err)
	}
	t.Logf("%d modules for %s", len(mods), k.Package)
}

// TestLockCache: the lock creates $TD_VMLAB_CACHE and answers with it, and
// unlock releases it (a second lock would otherwise wait for ever).
func TestLockCache(t *testing.T) {
	want := filepath.Join(t.TempDir(), "cache")
	t.Setenv("TD_VMLAB_CACHE", want)
	for range 2 {
		dir, unlock, err := lockCache()
		if err != nil {
			t.Fatal(err)
		}
		if dir != want {
			t.Fatalf("lockCache dir %q, want %q", dir, want)
		}
		if _, err := os.Stat(filepath.Join(dir, ".lock")); err != nil {
			t.Fatal(err)
		}
		unlock()
	}
}

package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/goreleaser/nfpm/v2"
	"github.com/goreleaser/nfpm/v2/deb"

	"github.com/tunneldirector/tunneldirector/internal/atomicfile"
)

// module is the repository's Go module, used to find its root.
const module = "github.com/tunneldirector/tunneldirector"

// defaultVersion is the upstream version until releases are tagged.
const defaultVersion = "0.1.0"

// specPath is the nfpm configuration, relative to the repository root.
const specPath = "packaging/nfpm.yaml"

// Options says what to build and where.
type Options struct {
	// OutDir receives the .deb (created if missing).
	OutDir string
	// Version is the package's upstream version; empty: defaultVersion
	// with the git commit.
	Version string
	// Arch is the Go (and Debian) architecture; empty: this machine's.
	Arch string
	// Root is the repository; empty: found upwards from the working
	// directory.
	Root string
}

// Build compiles the binary and writes the package, returning its path.
func Build(o Options) (string, error) {
	var err error
	if o.Root == "" {
		if o.Root, err = findRoot(); err != nil {
			return "", err
		}
	}
	if o.Arch == "" {
		o.Arch = runtime.GOARCH
	}
	if o.Version == "" {
		o.Version = defaultVersion
		if c := git(o.Root, "rev-parse", "--short=12", "HEAD"); c != "" {
			o.Version += "+git" + c
		}
	}
	if o.OutDir == "" {
		o.OutDir = "."
	}
	tmp, err := os.MkdirTemp("", "td-pkgbuild-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, "tunneldirector")
	if err := buildBinary(o.Root, o.Arch, bin); err != nil {
		return "", err
	}
	info, err := loadSpec(o.Root, map[string]string{"BINARY": bin, "VERSION": o.Version, "ARCH": o.Arch})
	if err != nil {
		return "", err
	}
	// The same commit gives the same package: file times are the
	// commit's, not the build's.
	if ct, err := strconv.ParseInt(git(o.Root, "log", "-1", "--format=%ct"), 10, 64); err == nil {
		info.MTime = time.Unix(ct, 0).UTC()
	}
	if err := nfpm.PrepareForPackager(info, "deb"); err != nil {
		return "", fmt.Errorf("package %s: %w", specPath, err)
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return "", err
	}
	out := filepath.Join(o.OutDir, deb.Default.ConventionalFileName(info))
	err = atomicfile.Write(out, 0o644, func(w io.Writer) error { return deb.Default.Package(info, w) })
	if err != nil {
		return "", fmt.Errorf("write package %s: %w", out, err)
	}
	return out, nil
}

// loadSpec reads packaging/nfpm.yaml with the build's variables (a
// variable the build does not define is an error, not an empty string) and
// resolves its relative sources and scripts against the repository root.
func loadSpec(root string, vars map[string]string) (*nfpm.Info, error) {
	path := filepath.Join(root, specPath)
	var unknown []string
	cfg, err := nfpm.ParseFileWithEnvMapping(path, func(k string) string {
		v, ok := vars[k]
		// nfpm itself asks for its signing passphrases (NFPM_*): the
		// package is not signed.
		if !ok && !strings.HasPrefix(k, "NFPM_") && !slices.Contains(unknown, k) {
			unknown = append(unknown, k)
		}
		return v
	})
	if err != nil {
		return nil, fmt.Errorf("package spec %s: %w", path, err)
	}
	if len(unknown) > 0 {
		return nil, fmt.Errorf("package spec %s: unknown variables %s (the build defines BINARY, VERSION, ARCH)", path, strings.Join(unknown, ", "))
	}
	abs := func(p *string) {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(root, *p)
		}
	}
	for _, c := range cfg.Contents {
		abs(&c.Source)
	}
	for _, p := range []*string{&cfg.Scripts.PreInstall, &cfg.Scripts.PostInstall, &cfg.Scripts.PreRemove, &cfg.Scripts.PostRemove} {
		abs(p)
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("package spec %s: %w", path, err)
	}
	return cfg.Get("deb")
}

// buildBinary builds a static, stripped cmd/tunneldirector for linux/arch.
func buildBinary(root, arch, out string) error {
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	cmd := exec.Command(goBin, "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./cmd/tunneldirector")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/tunneldirector (GOARCH=%s): %w\n%s", arch, err, b)
	}
	return nil
}

// findRoot walks up from the working directory to the module's go.mod.
func findRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(bytes.TrimSpace(b), []byte("module "+module)) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repository root not found: run inside the tunneldirector repository or pass -root")
		}
		dir = parent
	}
}

// git returns a git command's trimmed output, or "" when git or the
// repository is not there (a source tarball).
func git(root string, args ...string) string {
	cmd := exec.Command("git", append([]string{"-C", root}, args...)...)
	b, err := cmd.Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

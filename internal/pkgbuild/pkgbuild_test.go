package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// installed are the paths the package puts on the machine.
var installed = []string{
	"/usr/bin/tunneldirector",
	"/lib/systemd/system/tunneldirector.service",
	"/lib/systemd/system/tunneldirector-agent.service",
	"/etc/tunneldirector/config.yaml",
	"/usr/share/doc/tunneldirector/examples/keepalived/keepalived.conf",
	"/usr/share/doc/tunneldirector/examples/keepalived/td-notify.sh",
	"/var/lib/tunneldirector/backups",
}

const confPath = "/etc/tunneldirector/config.yaml"

// TestPackageInstallUpgradePurge builds the package, installs it with dpkg
// on this machine, checks the installed example configuration with the
// installed binary and the units with systemd-analyze, upgrades it over an
// operator's edit of the configuration (a conffile: the edit stays), and
// purges it, leaving nothing behind. It changes the machine, so it runs
// only as root and not with -short.
func TestPackageInstallUpgradePurge(t *testing.T) {
	if testing.Short() {
		t.Skip("installs a package on this machine: not with -short")
	}
	if os.Geteuid() != 0 {
		netlab.Require(t, "root (dpkg -i installs on this machine)", errors.New("not root"))
	}
	for _, tool := range []string{"dpkg", "dpkg-query", "systemd-analyze"} {
		_, err := exec.LookPath(tool)
		netlab.Require(t, tool+" (Debian package dpkg or systemd; scripts/lab-deps.sh installs it)", err)
	}
	if out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", "tunneldirector").Output(); err == nil && strings.Contains(string(out), "installed") {
		t.Fatalf("a tunneldirector package is already installed here (%s): this test installs and purges its own; remove it first", out)
	}
	dir := t.TempDir()
	v1, err := Build(Options{OutDir: filepath.Join(dir, "v1"), Version: "0.0.1+test1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exec.Command("dpkg", "--purge", "tunneldirector").Run() })
	run(t, "dpkg", "-i", v1)
	for _, p := range installed {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("after install: %v", err)
		}
	}
	if conf := run(t, "dpkg-query", "-W", "-f=${Conffiles}", "tunneldirector"); !strings.Contains(conf, confPath) {
		t.Errorf("conffiles %q do not list %s", conf, confPath)
	}
	// Installing starts and enables nothing: the example is not this
	// machine's configuration yet.
	if _, err := os.Stat("/etc/systemd/system/multi-user.target.wants/tunneldirector.service"); err == nil {
		t.Error("the package enabled the director before it was configured")
	}

	// The installed binary accepts the installed example (as a file: this
	// machine's kernel settings are not a director's).
	if out := run(t, "/usr/bin/tunneldirector", "config", "check", "--kernel=false", confPath); !strings.Contains(out, ": ok (") {
		t.Errorf("config check: %s", out)
	}
	// systemd-analyze verify exits 0 on unknown keys and bad values and
	// only says so: any output is a failure. A broken copy proves it speaks.
	units := []string{"/lib/systemd/system/tunneldirector.service", "/lib/systemd/system/tunneldirector-agent.service"}
	if out := verify(t, units...); out != "" {
		t.Errorf("systemd-analyze verify:\n%s", out)
	}
	b, _ := os.ReadFile(units[0])
	broken := filepath.Join(dir, "tunneldirector.service")
	os.WriteFile(broken, bytes.Replace(b, []byte("NoNewPrivileges=yes"), []byte("NoNewPrivilegez=yes"), 1), 0o644)
	if out := verify(t, broken); !strings.Contains(out, "NoNewPrivilegez") {
		t.Errorf("systemd-analyze verify of a unit with an unknown key said %q: the check above proves nothing", out)
	}

	// The operator edits the configuration; an upgrade keeps the edit.
	edited := append(readFile(t, confPath), "# edited by the operator\n"...)
	if err := os.WriteFile(confPath, edited, 0o640); err != nil {
		t.Fatal(err)
	}
	v2, err := Build(Options{OutDir: filepath.Join(dir, "v2"), Version: "0.0.2+test2"})
	if err != nil {
		t.Fatal(err)
	}
	run(t, "dpkg", "-i", v2)
	if v := run(t, "dpkg-query", "-W", "-f=${Version}", "tunneldirector"); !strings.HasPrefix(v, "0.0.2") {
		t.Errorf("after upgrade: version %s", v)
	}
	if got := readFile(t, confPath); !bytes.Equal(got, edited) {
		t.Errorf("the upgrade replaced the operator's %s", confPath)
	}

	run(t, "dpkg", "--purge", "tunneldirector")
	for _, p := range append(installed, "/etc/tunneldirector", "/var/lib/tunneldirector", "/usr/share/doc/tunneldirector") {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("after purge: %s is still there (%v)", p, err)
		}
	}
	if out, _ := exec.Command("dpkg-query", "-W", "-f=${Status}", "tunneldirector").Output(); strings.Contains(string(out), "installed") || strings.Contains(string(out), "config-files") {
		t.Errorf("after purge: dpkg status %q", out)
	}
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func verify(t *testing.T, units ...string) string {
	t.Helper()
	out, err := exec.Command("systemd-analyze", append([]string{"verify"}, units...)...).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze verify %s: %v", strings.Join(units, " "), err)
	}
	return strings.TrimSpace(string(out))
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Command pkgbuild builds the tunneldirector Debian package: a static
// binary of cmd/tunneldirector and the files packaging/nfpm.yaml lists (the
// systemd units, the example configuration as a conffile, the keepalived
// examples), packed by nfpm used as a library. scripts/package.sh runs it:
//
//	go run ./internal/pkgbuild -o dist
//
// It prints the path of the .deb it wrote.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

func main() {
	var o Options
	flag.StringVar(&o.OutDir, "o", "dist", "directory to write the .deb into")
	flag.StringVar(&o.Version, "version", "", "package version (default: "+defaultVersion+"+git<commit>, or "+defaultVersion+" outside git)")
	flag.StringVar(&o.Arch, "arch", "", "Debian architecture (default: this machine's Go architecture)")
	flag.StringVar(&o.Root, "root", "", "repository root (default: found from the working directory)")
	flag.Parse()
	if flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "pkgbuild: no arguments expected (flags only)")
		os.Exit(2)
	}
	deb, err := Build(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "pkgbuild:", err)
		os.Exit(1)
	}
	if abs, err := filepath.Abs(deb); err == nil {
		deb = abs
	}
	fmt.Println(deb)
}

#!/usr/bin/env bash
# package.sh: build the Debian package (dist/tunneldirector_<version>_<arch>.deb):
# a static binary, the systemd units of the director and the node agent, the
# example configuration as a conffile in /etc/tunneldirector, the keepalived
# examples under /usr/share/doc/tunneldirector. packaging/nfpm.yaml lists
# the contents; internal/pkgbuild packs them with nfpm. Extra arguments go
# to it (-version, -arch, -o). Install with: dpkg -i dist/tunneldirector_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
exec go run ./internal/pkgbuild -o dist "$@"

#!/usr/bin/env bash
# lab-deps.sh: install what the kernel test lab needs on a Debian machine, and
# fetch the guest kernel for internal/vmlab into its cache. Idempotent: what
# is already there is left alone. Run as root (or it uses sudo).
#
#   Debian packages: qemu-system-x86 (the VM, TCG), busybox-static (guest
#   userland), cpio, kmod (debugging of initramfs/modules), nftables and
#   iproute2 (inspecting namespaces by hand; the tests themselves use netlink),
#   systemd (systemd-analyze verify of the package's units), prometheus
#   (promtool check metrics and rules; its service is not started: there is
#   no init here, and invoke-rc.d's policy refuses),
#   keepalived (pair failover tests), strongswan-charon, strongswan-swanctl and
#   libstrongswan-standard-plugins (openssl, gcm: real IKE daemons for the
#   strongSwan VM tests, internal/e2e/strongswan, which run the host's charon
#   inside the VM; installing them starts no service: there is no init here,
#   and on a systemd machine strongswan-starter's service starts a charon with
#   no connections, which the tests do not use)
#   Kernel: the linux-image-<version>-amd64 package that linux-image-amd64
#   depends on, downloaded with `apt-get download` and extracted with
#   `dpkg-deb -x` into the vmlab cache (nothing is installed into /boot or
#   /lib/modules):
#     ${TD_VMLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunneldirector/vmlab}
set -euo pipefail

say() { printf 'lab-deps: %s\n' "$*"; }
SUDO=""
if [ "$(id -u)" != 0 ]; then
	if command -v sudo >/dev/null; then SUDO="sudo"; else
		say "must run as root (no sudo found)"; exit 1
	fi
fi
export DEBIAN_FRONTEND=noninteractive

PKGS="qemu-system-x86 busybox-static cpio kmod nftables iproute2 keepalived"
PKGS="$PKGS systemd prometheus" # internal/pkgbuild: systemd-analyze verify; internal/e2e: promtool check metrics and rules
PKGS="$PKGS strongswan-charon strongswan-swanctl libstrongswan-standard-plugins" # real IKE daemons: health probes in namespaces, the strongSwan VM layer
PKGS="$PKGS time" # scripts/bench-import.sh: CPU time and peak RSS of an import
PKGS="$PKGS conntrackd conntrack" # conntrack replication: the reference measured side by side (scripts/bench-conntrack.sh)
missing=""
for p in $PKGS; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing="$missing $p"
	fi
done

# apt-get update only when the package lists are missing or lack the kernel.
updated=0
apt_update() {
	if [ "$updated" = 0 ]; then
		say "apt-get update"
		$SUDO apt-get update -qq
		updated=1
	fi
}
if ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-'; then
	apt_update
fi

if [ -n "$missing" ]; then
	say "installing:$missing"
	if ! $SUDO apt-get install -y -qq --no-install-recommends $missing; then
		apt_update
		$SUDO apt-get install -y -qq --no-install-recommends $missing
	fi
else
	say "packages already installed: $PKGS"
fi

KPKG="${TD_VMLAB_KERNEL_PKG:-}"
if [ -z "$KPKG" ]; then
	KPKG=$(apt-cache depends linux-image-amd64 | awk '$1=="Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
fi
if [ -z "$KPKG" ]; then
	say "cannot resolve the kernel package of linux-image-amd64 (apt-cache depends)"; exit 1
fi
CACHE="${TD_VMLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tunneldirector/vmlab}"
mkdir -p "$CACHE/debs" "$CACHE/kernel"
if ls "$CACHE/debs/${KPKG}"_*_amd64.deb >/dev/null 2>&1; then
	say "kernel package $KPKG already in $CACHE/debs"
else
	say "downloading $KPKG into $CACHE/debs"
	(cd "$CACHE/debs" && apt-get download -q -o APT::Sandbox::User=root "$KPKG")
fi
if [ -d "$CACHE/kernel/$KPKG" ]; then
	say "kernel $KPKG already extracted in $CACHE/kernel/$KPKG"
else
	deb=$(ls "$CACHE/debs/${KPKG}"_*_amd64.deb | sort | tail -n 1)
	say "extracting $deb into $CACHE/kernel/$KPKG"
	rm -rf "$CACHE/kernel/$KPKG.tmp"
	dpkg-deb -x "$deb" "$CACHE/kernel/$KPKG.tmp"
	mv "$CACHE/kernel/$KPKG.tmp" "$CACHE/kernel/$KPKG"
fi
say "done: qemu=$(command -v qemu-system-x86_64) busybox=$(command -v busybox) kernel=$KPKG cache=$CACHE"

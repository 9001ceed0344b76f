#!/bin/sh
# prerm of the tunneldirector package: on removal, stop the units (an upgrade
# restarts them in postinst instead). A stopped director leaves the kernel
# programmed, so the farm stays steered; 'tunneldirector teardown' removes
# what the director owns.
set -e

case "$1" in
remove)
	if [ -d /run/systemd/system ]; then
		for u in tunneldirector-agent.service tunneldirector.service; do
			deb-systemd-invoke stop "$u" >/dev/null || true
		done
	fi
	;;
esac
exit 0

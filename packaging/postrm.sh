#!/bin/sh
# postrm of the tunneldirector package. Purge removes the configuration
# directory, the store, its backups and the runtime directory: purging is
# the operator's explicit request to forget the farm (take a backup first:
# 'tunneldirector store backup FILE').
set -e

case "$1" in
purge)
	rm -rf /etc/tunneldirector /var/lib/tunneldirector /run/tunneldirector
	if command -v deb-systemd-helper >/dev/null; then
		deb-systemd-helper purge tunneldirector.service tunneldirector-agent.service >/dev/null || true
	fi
	;;
esac
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
exit 0

#!/bin/sh
# postinst of the tunneldirector package. It never enables or starts the
# director: the shipped /etc/tunneldirector/config.yaml is an example until
# the operator has set the VIPs and nodes. On an upgrade it restarts what
# was running (a restart does not interrupt traffic: the daemon leaves the
# kernel programmed on SIGTERM and adopts it at start).
set -e

case "$1" in
configure)
	# The store's home, for the CLI on a store file before any daemon ran.
	install -d -m 0700 /var/lib/tunneldirector /var/lib/tunneldirector/backups
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then
			# Upgrade: restart only the units that run now.
			for u in tunneldirector.service tunneldirector-agent.service; do
				deb-systemd-invoke try-restart "$u" >/dev/null || true
			done
		fi
	fi
	if [ -z "$2" ]; then
		echo "tunneldirector: installed, not started. Edit /etc/tunneldirector/config.yaml,"
		echo "  check it with 'tunneldirector config check /etc/tunneldirector/config.yaml',"
		echo "  then 'systemctl enable --now tunneldirector'."
	fi
	;;
esac
exit 0

#!/bin/sh
# keepalived notify script for a tunneldirector pair: tells the daemon its
# role. Both directors keep their dataplane programmed at all times, so this
# only decides which one accepts writes (imports, node actions, learned
# tunnels) and leads replication.
set -eu
case "${1:-}" in
master|backup|fault) exec /usr/bin/tunneldirector ctl role "$1" ;;
*) echo "usage: $0 master|backup|fault" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# demo.sh: the main job. Builds tunneldirector and runs `tunneldirector lab`:
# a farm in network namespaces on this machine's kernel (peer hosts, a
# director pair running the real daemon with replication, terminator nodes,
# a target network), a generated NMS file imported on the master, IKE, NAT-T,
# ESP and return traffic sent for every tunnel and counted per node against
# the tunnels it owns; then a node fails, a tunnel is moved and the director
# fails over, with the same table after each event. Everything is torn down
# on exit and on Ctrl-C; the host's own network namespace is never touched.
# Then `tunneldirector sim` replays 30 days of a 10,000-tunnel farm and
# compares the scheduler with round-robin, hash mod N and Maglev.
#
# The lab needs root and nf_tables; without them the script says what is
# missing and shows the table on a store file instead (`tunneldirector
# demo`). Extra arguments go to `tunneldirector lab` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
go build -o bin/tunneldirector ./cmd/tunneldirector
if reason=$(bin/tunneldirector lab --preflight 2>&1); then
	printf '$ tunneldirector lab %s\n' "$*"
	bin/tunneldirector lab "$@"
else
	printf 'demo: %s\n' "${reason#tunneldirector: }"
	printf 'demo: showing the table on a store file instead\n\n$ tunneldirector demo\n'
	bin/tunneldirector demo
fi
printf '\n$ tunneldirector sim --compare --no-progress\n'
exec bin/tunneldirector sim --compare --no-progress

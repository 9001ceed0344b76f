#!/usr/bin/env bash
# demo.sh: the main job on an embedded default. Builds tunneldirector and
# runs `tunneldirector demo`: a generated farm (8 nodes, 10,000 tunnels) is
# imported into a store in a temporary folder, shown, looked up, and put
# through a node failure, a re-import, a node addition and a rebalance plan.
# Then `tunneldirector sim` replays 30 days of that farm's life (a node
# failure, a node addition, a rebalance, a director failover over the real
# replication code) and compares the scheduler with round-robin, hash mod N
# and Maglev. Extra arguments go to `tunneldirector demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
go build -o bin/tunneldirector ./cmd/tunneldirector
bin/tunneldirector demo "$@"
printf '\n$ tunneldirector sim --compare --no-progress\n'
exec bin/tunneldirector sim --compare --no-progress

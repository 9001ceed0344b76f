#!/usr/bin/env bash
# demo.sh: the main job on an embedded default. Builds tunneldirector and
# runs `tunneldirector demo`: a generated farm (8 nodes, 10,000 tunnels) is
# imported into a store in a temporary folder, shown, looked up, and put
# through a node failure, a re-import, a node addition and a rebalance plan.
# Extra arguments go to `tunneldirector demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
go build -o bin/tunneldirector ./cmd/tunneldirector
exec bin/tunneldirector demo "$@"

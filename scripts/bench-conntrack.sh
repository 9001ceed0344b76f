#!/usr/bin/env bash
# bench-conntrack.sh: tunneldirector's conntrack replication side by side
# with conntrackd 1.4.7 (FTFW over UDP), in the same two director
# namespaces, with the same 100,000 flows created in the master's kernel;
# median of ROUNDS (default 3) interleaved rounds of each. Prints, with
# the ratio tunneldirector/conntrackd:
#   - time from the first new flow until all are in the backup's cache
#   - commit of the 100,000 cached flows into the backup's kernel
#   - bytes on the sync link per flow (both directions)
#   - the backup's resident memory per cached flow
# Root; installs conntrackd through lab-deps.sh. The cache's memory at
# 1,000,000 flows (the kernel table of a namespace holds at most
# nf_conntrack_max = 262,144) is measured apart:
#   go test -run TestCacheMemory -v ./director/ctsync/
#
#   scripts/bench-conntrack.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
scripts/lab-deps.sh >/dev/null
TD_BENCH_ROUNDS="${1:-3}" go test -run '^$' -bench ConntrackVsConntrackd -benchtime 1x -timeout 30m ./internal/e2e/ 2>&1 |
	grep -E 'round [0-9]|median|tunneldirector .* conntrackd|^ok|FAIL'

#!/usr/bin/env bash
# bench-import.sh: end-to-end CLI import of N tunnels (1 to 4 subnets each)
# from CSV into an empty store, validated and committed; prints each run's
# wall time, CPU time (user+sys: the machine is shared, wall time mostly
# measures the other work) and peak RSS, and the medians of RUNS.
# Usage: scripts/bench-import.sh [N] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
n=${1:-100000}
runs=${2:-5}
go build -o bin/tunneldirector ./cmd/tunneldirector
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
bin/tunneldirector gen --dir "$dir" --nodes 16 --tunnels "$n" --max-subnets 4 >/dev/null
echo "file: $(wc -l < "$dir/tunnels.csv") lines, $(du -h "$dir/tunnels.csv" | cut -f1)"
times=()
cpus=()
rss=()
for i in $(seq "$runs"); do
	rm -f "$dir/td.db"
	bin/tunneldirector --db "$dir/td.db" import "$dir/nodes.csv" >/dev/null
	/usr/bin/time -o "$dir/time" -f '%e %U %S %M' bin/tunneldirector --db "$dir/td.db" import "$dir/tunnels.csv" >/dev/null
	read -r wall user sys kb < "$dir/time"
	cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN {printf "%.2f", u + s}')
	mb=$((kb / 1024))
	echo "run $i: ${wall}s wall, ${cpu}s CPU, ${mb} MB peak RSS"
	times+=("$wall")
	cpus+=("$cpu")
	rss+=("$mb")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "median over $runs runs: $(median "${times[@]}")s wall, $(median "${cpus[@]}")s CPU, $(median "${rss[@]}") MB peak RSS"

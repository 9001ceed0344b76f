#!/usr/bin/env bash
# bench-import.sh: end-to-end CLI import of N tunnels (1 to 4 /27s each)
# from CSV into an empty store, validated and committed; prints each run and
# the median of RUNS. Usage: scripts/bench-import.sh [N] [RUNS]
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
for i in $(seq "$runs"); do
	rm -f "$dir/td.db"
	bin/tunneldirector --db "$dir/td.db" import "$dir/nodes.csv" >/dev/null
	start=$(date +%s.%N)
	bin/tunneldirector --db "$dir/td.db" import "$dir/tunnels.csv" >/dev/null
	end=$(date +%s.%N)
	t=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}')
	echo "run $i: ${t}s"
	times+=("$t")
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print "median: " a[int((NR+1)/2)] "s over " NR " runs"}'

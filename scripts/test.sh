#!/usr/bin/env bash
# test.sh: the whole test suite, from a fresh Debian machine. Installs what
# the kernel lab needs (scripts/lab-deps.sh: qemu, busybox-static, nftables,
# iproute2, the Debian kernel package for the VM), then runs, in one go:
#   - static checks: gofmt, go vet
#   - unit, property and fuzz-seed tests with the race detector
#   - namespace tests on the host kernel (root) and VM tests under qemu
#   - every test again without -race and -short: the heavy ones too
# With CI=true a missing tool or kernel module fails the run instead of
# skipping. Takes about 13 minutes on a quiet 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

step() { printf '\n=== %s\n' "$*"; }

step "dependencies"
scripts/lab-deps.sh

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
	echo "not gofmt-formatted:"; echo "$unformatted"; exit 1
fi

step "go vet"
go vet ./...

step "tests with -race (unit, namespace, VM)"
go test -race -short -count=1 -timeout 20m ./...

# -short skips what is too slow under the race detector (the million-tunnel
# table, the crash test, the VM boots); the second pass runs everything.
step "all tests without -race, heavy ones included (million-tunnel table, crash during import, VM)"
go test -count=1 -timeout 20m ./...

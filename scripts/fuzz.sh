#!/bin/bash
# Run every go fuzz target for the given time (default 5s): scripts/fuzz.sh 60s
set -euo pipefail
t=${1:-5s}
cd "$(dirname "$0")/.."
grep -rl --include='*_test.go' '^func Fuzz' . | grep -v '/integration/' | while read -r f; do
  pkg=./$(dirname "${f#./}")
  for fn in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | sed 's/^func //'); do
    echo "== $pkg $fn ($t)"
    go test -run '^$' -fuzz "^${fn}\$" -fuzztime "$t" "$pkg" >/tmp/vtpmd-fuzz.log 2>&1 || { cat /tmp/vtpmd-fuzz.log; exit 1; }
  done
done

#!/usr/bin/env bash
# Counts the instructions of a fixed batch of requests through the sidecar's request path
# (bench/hot_path.rs, under callgrind) and fails when the count grows more than 20% over the
# number recorded in bench/hot_path.instructions. `bench/count.sh --record` records a new number.
#
# Instructions, not time: the count is the same on a busy or a quiet machine. Only the thread
# that serves requests is counted; the ledger's writer thread commits on a timer, so its count
# depends on timing.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet --profile hotpath --example hot_path
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out/callgrind" \
  "${CARGO_TARGET_DIR:-target}/hotpath/examples/hot_path" >"$out/log" 2>&1 || { cat "$out/log"; exit 1; }
count=$(awk '/^summary:/ {print $2}' "$out/callgrind-01")

if [ "${1:-}" = "--record" ]; then
  echo "$count" >bench/hot_path.instructions
  echo "recorded: $count instructions"
  exit 0
fi
recorded=$(cat bench/hot_path.instructions)
limit=$((recorded * 12 / 10))
echo "hot path: $count instructions for 2000 requests ($((count / 2000)) per request); recorded $recorded, limit $limit"
if [ "$count" -gt "$limit" ]; then
  echo "the request path costs more than 20% more than recorded: find out why, or record the new cost with bench/count.sh --record" >&2
  exit 1
fi

#!/usr/bin/env bash
# The configuration stream at scale (bench/push.rs): N simulated sidecars on one operator process
# against a fake API server, route changes timed from the watch event to every stream's frame.
# Prints a Markdown table for docs/benchmarks.md. Arguments go to bench/push.rs:
#   bench/push.sh                          # 100 and 1,000 sidecars, 20 changes each
#   bench/push.sh --sidecars 1000 --changes 50
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --quiet --release --bin sideyard --example push
# A thousand streams are a thousand sockets on each side.
ulimit -n "$(ulimit -Hn)"
"${CARGO_TARGET_DIR:-target}/release/examples/push" "${CARGO_TARGET_DIR:-target}/release/sideyard" "$@"

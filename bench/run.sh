#!/usr/bin/env bash
# Runs the load benchmark (bench/bench.py): installs what it needs, builds the release binary, and
# writes the results into docs/benchmarks.md. Arguments go to bench.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
tools="$PWD/bench/.tools"
export PATH="$tools/bin:$PATH"

if ! command -v nginx >/dev/null 2>&1; then
  as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light
fi
if ! command -v taskset >/dev/null 2>&1; then
  as_root apt-get install -y -q util-linux
fi
if ! command -v oha >/dev/null 2>&1; then
  # oha: an HTTP load generator with open-loop rates (-q) and coordinated-omission correction.
  cargo install oha --locked --version 1.16.0 --root "$tools"
fi
if [ "$(nproc)" -lt 2 ]; then
  echo "the benchmark pins the proxy and the load generator to separate CPUs: it needs 2" >&2
  exit 1
fi

cargo build --release --locked
python3 bench/bench.py --report docs/benchmarks.md "$@"

#!/usr/bin/env bash
# Counts the instructions of a fixed batch of requests through the sidecar's request path
# (bench/hot_path.rs, under callgrind) and fails when the count grows more than 20% over the
# number recorded in bench/hot_path.instructions. `bench/count.sh --record` records a new number.
#
# Instructions, not time: the count is the same on a busy or a quiet machine. Only the thread
# that serves requests is counted; the ledger's writer thread commits on a timer, so its count
# depends on timing.
#
# It also counts translated requests (see below), and the same requests with the budget leased from the operator's ledger (cluster
# mode) and fails when they cost more than 5% over standalone's in the same run: outside state
# Low the request path must not call the ledger (the lease keeper shares the thread and runs on a
# timer, which moves that count by a fraction of a percent). `--fleet` also runs state Low (every request
# reserves with the ledger; about a minute) and prints the ledger's instructions per call.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --quiet --profile hotpath --example hot_path
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# Counts MODE under callgrind; thread 01 serves the requests, 02 is the ledger (cluster modes).
run() {
  mkdir -p "$out/$1"
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out/$1/callgrind" \
    "${CARGO_TARGET_DIR:-target}/hotpath/examples/hot_path" "$1" >"$out/$1/log" 2>&1 || { cat "$out/$1/log"; exit 1; }
}
thread() { awk '/^summary:/ {print $2}' "$out/$1/callgrind-$2"; }
run standalone
count=$(thread standalone 01)

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

run leased
leased=$(thread leased 01)
echo "leased budget: $leased instructions ($((leased / 2000)) per request, $(( (leased - count) * 1000 / count ))‰ over standalone); ledger thread $(thread leased 02) for: $(grep -o 'call="[a-z]*",result="ok"} [0-9]*' "$out/leased/log" | tr '\n' ' ')"
if [ "$leased" -gt $((count * 105 / 100)) ]; then
  echo "with a leased budget the request path costs more than 5% over standalone: it must not wait on the ledger outside state Low" >&2
  exit 1
fi

# Translation: chat completions to Anthropic targets against chat passthrough, and /v1/messages
# to OpenAI-compatible targets against /v1/messages passthrough. Instructions leave out the kernel
# time every request also costs, so they overstate the CPU ratio that docs/benchmarks.md reports
# (bench/run.sh --translation); this guard catches a translation that starts re-reading or
# copying what it should not.
run to-anthropic
run messages
run messages-to-openai
to_anthropic=$(thread to-anthropic 01)
messages=$(thread messages 01)
to_openai=$(thread messages-to-openai 01)
echo "translation: chat to Anthropic $((to_anthropic / 2000)) per request ($((to_anthropic * 100 / count))% of chat passthrough); /v1/messages passthrough $((messages / 2000)); to OpenAI $((to_openai / 2000)) ($((to_openai * 100 / messages))% of messages passthrough)"
if [ "$to_anthropic" -gt $((count * 2)) ] || [ "$to_openai" -gt $((messages * 2)) ]; then
  echo "a translated request costs more than twice the instructions of a passthrough one" >&2
  exit 1
fi

# The Responses API: translated to chat completions against passed through; embeddings beside chat.
run responses
run responses-to-chat
run embeddings
responses=$(thread responses 01)
to_chat=$(thread responses-to-chat 01)
embeddings=$(thread embeddings 01)
echo "responses: passthrough $((responses / 2000)) per request; to chat $((to_chat / 2000)) ($((to_chat * 100 / responses))% of passthrough); embeddings $((embeddings / 2000)) ($((embeddings * 100 / count))% of chat passthrough)"
if [ "$to_chat" -gt $((responses * 2)) ]; then
  echo "a translated Responses request costs more than twice the instructions of a passthrough one" >&2
  exit 1
fi

# Observing requests (docs/benchmarks.md, "What observing costs"): the access log and the
# generation store, then traces exported over OTLP; each against the same requests unobserved.
run observed
run traced
observed=$(thread observed 01)
traced=$(thread traced 01)
echo "observed: access log and generation store $((observed / 2000)) per request (+$(( (observed - count) / 2000 )), $(( (observed - count) * 1000 / count ))‰); traced $((traced / 2000)) per request (+$(( (traced - count) / 2000 )), $(( (traced - count) * 1000 / count ))‰), export included"

if [ "${1:-}" = "--fleet" ]; then
  run low
  low=$(thread low 01)
  ledger=$(thread low 02)
  calls=$(grep -o 'result="ok"} [0-9]*' "$out/low/log" | awk '{s += $2} END {print s}')
  echo "state Low: $low instructions ($((low / 2000)) per request) in the sidecar; the ledger $ledger for $calls calls ($((ledger / calls)) per call)"
fi

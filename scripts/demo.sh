#!/usr/bin/env bash
# The live demo behind `make demo`: the processor on the local stack, a few thousand intents
# from concurrent producers, then what came out (read_committed) and how fast.
# Expects the stack to be up (`make up`) and a release build (`make release`).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/causal-commit
COUNT=${DEMO_COUNT:-5000}
CONTACTS=${DEMO_CONTACTS:-500}
PRODUCERS=${DEMO_PRODUCERS:-4}
RUN_DIR=.stack/demo
PREFIX="demo$(date +%s)"
mkdir -p "$RUN_DIR"
LOG=$RUN_DIR/processor-$PREFIX.log

say() { printf '\n== %s\n' "$*"; }

say "migrating PostgreSQL"
$BIN migrate

say "starting the processor (JSON logs in $LOG, metrics on http://127.0.0.1:9464/metrics)"
$BIN run >"$LOG" 2>&1 &
PROC=$!
trap 'kill -TERM $PROC 2>/dev/null || true' EXIT

say "producing $COUNT intents for $CONTACTS contacts from $PRODUCERS concurrent producers"
START=$(date +%s.%N)
$BIN produce --count "$COUNT" --contacts "$CONTACTS" --producers "$PRODUCERS" --prefix "$PREFIX"

say "waiting until the processor has committed everything"
$BIN wait-caught-up --timeout 5m
END=$(date +%s.%N)

say "stopping the processor (SIGTERM drains the batch in hand)"
kill -TERM $PROC
wait $PROC || true
trap - EXIT

say "what the output topics hold for this run (read_committed)"
$BIN summary --prefix "$PREFIX" | tee "$RUN_DIR/summary-$PREFIX.json"

awk -v n="$COUNT" -v s="$START" -v e="$END" 'BEGIN {
  printf "\nintents in: %d (+ duplicates and invalid records), elapsed: %.1f s, throughput: %.0f intents/s\n", n, e - s, n / (e - s) }'
printf 'log lines per state: '
grep -o '"state":"[a-z_]*"' "$LOG" | sort | uniq -c | tr '\n' ' '
echo

say "verifying the contract for this run (no duplicate, gap, reorder or lost intent)"
$BIN verify --prefix "$PREFIX" | tee "$RUN_DIR/verify-$PREFIX.json"

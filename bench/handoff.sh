#!/usr/bin/env bash
# Hinted handoff timing: a 3-node cluster (N=3, R=2, W=2, sync), node 3 killed, HINTS
# distinct keys written through nodes 1 and 2 (each leaves a hint for node 3), node 3
# restarted with its own command line; prints the time from its restart to the moment
# no node holds a hint any more.
#
#   bench/handoff.sh [HINTS]        (default 10000; needs a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
HINTS=${1:-10000}
BIN=target/release/ringkv
BENCH=target/release/ringkv-bench
[ -x "$BIN" ] && [ -x "$BENCH" ] || cargo build --release -p ringkv-tools -p ringkv-bench
DIR=$(mktemp -d /tmp/ringkv-handoff.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT

node_args() { # id
  local port=$((7500 + 10 * ($1 - 1)))
  echo "server --node-id $1 --listen 127.0.0.1:$port --shard-port-base $((port + 1)) --data-dir $DIR/node-$1"
  [ "$1" -gt 1 ] && echo "--seeds 127.0.0.1:7500"
  return 0
}
start() { # id
  # shellcheck disable=SC2046
  RUST_LOG=warn $BIN $(node_args "$1") >/dev/null 2>>"$DIR/node-$1.log" &
  PIDS[$1]=$!
}
pending() { # total hints held by nodes 1 and 2
  local total=0 n
  for a in 127.0.0.1:7500 127.0.0.1:7510; do
    n=$($BIN status --addr "$a" --json | sed -n 's/.*"hints_pending":\([0-9]*\).*/\1/p')
    total=$((total + ${n:-999999999}))
  done
  echo "$total"
}
valid_members() { # addr
  $BIN status --addr "$1" --json 2>/dev/null | grep -o '"status":"valid"' | wc -l
}

start 1; sleep 1; start 2; start 3
for _ in $(seq 1 300); do
  [ "$(valid_members 127.0.0.1:7520)" = 3 ] && [ "$(valid_members 127.0.0.1:7500)" = 3 ] && break
  sleep 0.2
done
kill -9 "${PIDS[3]}"; wait "${PIDS[3]}" 2>/dev/null || true
echo "node 3 killed; writing $HINTS keys through nodes 1 and 2"
$BENCH run --addr 127.0.0.1:7500,127.0.0.1:7510 --workload put-only --records "$HINTS" \
  --operations 1 --connections 50 --no-progress --label hinted >/dev/null
for _ in $(seq 1 20); do [ "$(pending)" -ge "$HINTS" ] && break; sleep 0.5; done
echo "hints held: $(pending)"
t0=$(date +%s.%N)
start 3
while [ "$(pending)" -gt 0 ]; do
  sleep 0.1
  if (( $(echo "$(date +%s.%N) - $t0 > 600" | bc) )); then echo "not delivered within 600 s"; exit 1; fi
done
t1=$(date +%s.%N)
printf 'all %d hints delivered %.2f s after node 3 restarted\n' "$HINTS" "$(echo "$t1 - $t0" | bc)"

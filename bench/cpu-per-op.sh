#!/usr/bin/env bash
# CPU time per request, of the server and of the load generator, for ringkv (one node,
# `sync`, shard-aware load) and Redis (appendonly, appendfsync always) in one run:
# each process's user and system time from /proc/PID/stat over the run, divided by
# the requests it served; also the rescheduling interrupts (cross-CPU wakeups and
# kicks) and the server's voluntary (it slept) and involuntary (it was preempted)
# context switches per request. On a machine where the load generator shares the CPUs
# with the server, this says where the time goes when the throughputs differ.
#
#   bench/cpu-per-op.sh [SHARDS] [PIPELINE] [WORKLOAD] [SECONDS]
#   RINGKV_BIN=path/to/ringkv RINGKV_BENCH_BIN=path/to/ringkv-bench bench/cpu-per-op.sh ...
#   (other builds of the server and of the load generator)
#   (defaults: 1 shard, pipeline 1, workload C, 8 s after a 2 s warm-up; every run
#   stops by itself; needs redis-server: apt-get install redis-server)
set -euo pipefail
# other builds named relative to where the script was started
[ -n "${RINGKV_BIN:-}" ] && RINGKV_BIN=$(realpath "$RINGKV_BIN")
[ -n "${RINGKV_BENCH_BIN:-}" ] && RINGKV_BENCH_BIN=$(realpath "$RINGKV_BENCH_BIN")
cd "$(dirname "$0")/.."
SHARDS=${1:-1}
PIPELINE=${2:-1}
WORKLOAD=${3:-C}
SECONDS_RUN=${4:-8}
BIN=${RINGKV_BIN:-target/release/ringkv}
BENCH=${RINGKV_BENCH_BIN:-target/release/ringkv-bench}
for tool in redis-server redis-cli; do
  command -v "$tool" >/dev/null || {
    echo "missing $tool: apt-get install redis-server" >&2
    exit 1
  }
done
if [ -z "${RINGKV_BIN:-}" ] || [ -z "${RINGKV_BENCH_BIN:-}" ]; then
  cargo build -q --release -p ringkv-tools -p ringkv-bench
fi
DIR=$(mktemp -d /tmp/ringkv-cpu.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
HZ=$(getconf CLK_TCK)

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
# voluntary and involuntary context switches, summed over the process's threads
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { n += $2 } END { print v + 0, n + 0 }'; }
# rescheduling interrupts (cross-CPU wakeups and kicks), summed over the CPUs
# (%.0f: mawk prints a bigger sum than 2^31 in exponent form)
resched() { awk '$1 == "RES:" { n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; printf "%.0f\n", n }' /proc/interrupts; }

measure() { # NAME SERVER_PID BENCH_ARGS...
  local name=$1 server=$2
  shift 2
  "$BENCH" run "$@" --duration 2s --no-progress >/dev/null
  "$BENCH" run "$@" --duration "${SECONDS_RUN}s" --skip-load --no-progress \
    --json "$DIR/$name.json" >/dev/null &
  local load=$!
  local s0 c0 s1 c1 r0 r1 w0 w1 window
  # the run's first and last half seconds (connecting, the last replies) stay outside
  window=$(awk -v s="$SECONDS_RUN" 'BEGIN { print s - 1 }')
  sleep 0.5
  s0=$(ticks "$server")
  c0=$(ticks "$load")
  r0=$(resched)
  w0=$(switches "$server")
  sleep "$window"
  s1=$(ticks "$server")
  c1=$(ticks "$load")
  r1=$(resched)
  w1=$(switches "$server")
  wait "$load"
  python3 - "$DIR/$name.json" "$name" "$HZ" "$window" \
    "$s0" "$s1" "$c0" "$c1" "$((r1 - r0))" "$w0" "$w1" <<'EOF'
import json, sys
path, name, hz, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s0, s1, c0, c1 = (list(map(int, a.split())) for a in sys.argv[5:9])
resched = int(sys.argv[9])
w0, w1 = (list(map(int, a.split())) for a in sys.argv[10:12])
ops = json.load(open(path))["throughput_ops_s"]
n = ops * secs
us = lambda a, b, i: (b[i] - a[i]) / hz * 1e6 / n
print(f"{name:<8} {ops:>10,.0f} ops/s   server µs/op user {us(s0, s1, 0):.2f} system "
      f"{us(s0, s1, 1):.2f}   load generator µs/op user {us(c0, c1, 0):.2f} system "
      f"{us(c0, c1, 1):.2f}   rescheduling interrupts/op {resched / n:.2f}   server context "
      f"switches/op voluntary {(w1[0] - w0[0]) / n:.2f} involuntary {(w1[1] - w0[1]) / n:.2f}")
EOF
}

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores; ringkv $(git rev-parse --short HEAD 2>/dev/null || echo '?') --shards $SHARDS; workload $WORKLOAD, pipeline $PIPELINE, 50 connections, ${SECONDS_RUN} s"
# below the kernel's ephemeral ports (32768 and up), so no client socket holds them
PORT=$((20000 + RANDOM % 12000))
RPORT=$((PORT + 1 + SHARDS))

up() { # PID NAME LOG CHECK...: waits (10 s at most) until CHECK succeeds
  local pid=$1 name=$2 log=$3
  shift 3
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { echo "$name exited at start:" >&2; cat "$log" >&2; exit 1; }
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$name did not answer within 10 s:" >&2
  cat "$log" >&2
  exit 1
}

"$BIN" server --data-dir "$DIR/ringkv" --listen "127.0.0.1:$PORT" \
  --shard-port-base "$((PORT + 1))" --shards "$SHARDS" --durability sync >"$DIR/ringkv.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
up "$SERVER" ringkv "$DIR/ringkv.log" "$BIN" ping --addr "127.0.0.1:$PORT"
measure ringkv "$SERVER" --addr "127.0.0.1:$PORT" --workload "$WORKLOAD" --shard-aware \
  --pipeline "$PIPELINE"
kill -INT "$SERVER"
wait "$SERVER" || true
PIDS=()

mkdir -p "$DIR/redis"
redis-server --port "$RPORT" --dir "$DIR/redis" --appendonly yes --appendfsync always \
  --save "" --daemonize no >"$DIR/redis.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
up "$SERVER" redis-server "$DIR/redis.log" redis-cli -p "$RPORT" ping
measure redis "$SERVER" --driver redis --addr "127.0.0.1:$RPORT" --workload "$WORKLOAD" \
  --pipeline "$PIPELINE"

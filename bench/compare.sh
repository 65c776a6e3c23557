#!/usr/bin/env bash
# Measures ringkv, Redis and memcached with the same load generator in one run, on
# this machine's loopback: GET and PUT, 100-byte values, 50 connections, pipeline 1
# and 16. Redis runs with appendonly + appendfsync always for the durable comparison.
# Needs: apt-get install redis-server memcached (the script says so if missing).
# Usage: bench/compare.sh [SECONDS]   (default 10 per run; every run stops by itself)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
for tool in redis-server memcached; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install redis-server memcached" >&2; exit 1; }
done
cargo build --release -p ringkv-tools -p ringkv-bench >/dev/null
work=$(mktemp -d /tmp/ringkv-compare.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || true

./target/release/ringkv server --data-dir "$work/ringkv" --listen 127.0.0.1:17379 --shard-port-base 17380 \
  --durability sync >"$work/ringkv.out" 2>"$work/ringkv.err" & pids+=($!)
redis-server --port 16379 --bind 127.0.0.1 --save '' --appendonly yes --appendfsync always \
  --dir "$work" --daemonize no >"$work/redis.log" 2>&1 & pids+=($!)
memcached -l 127.0.0.1 -p 11311 -U 0 -t 2 -m 1024 -u root >"$work/memcached.log" 2>&1 & pids+=($!)
for i in $(seq 1 100); do
  grep -q "listening" "$work/ringkv.out" 2>/dev/null && redis-cli -p 16379 ping >/dev/null 2>&1 && break
  sleep 0.1
done

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores; ringkv $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(redis-server --version | cut -d' ' -f3), memcached $(memcached -V | cut -d' ' -f2)"
echo "# 100-byte values, 100,000 keys, 50 connections, ${seconds}s per run"
for pipeline in 1 16; do
  for op in get put; do
    ./target/release/ringkv-bench load --target ringkv --addr 127.0.0.1:17379 --op $op \
      --connections 50 --pipeline $pipeline --seconds "$seconds"
    ./target/release/ringkv-bench load --target ringkv --addr 127.0.0.1:17379 --op $op \
      --connections 50 --pipeline $pipeline --seconds "$seconds" --shard-aware --no-preload
    ./target/release/ringkv-bench load --target redis --addr 127.0.0.1:16379 --op $op \
      --connections 50 --pipeline $pipeline --seconds "$seconds"
    ./target/release/ringkv-bench load --target memcached --addr 127.0.0.1:11311 --op $op \
      --connections 50 --pipeline $pipeline --seconds "$seconds"
  done
done

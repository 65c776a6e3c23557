#!/usr/bin/env bash
# Measures an io_uring echo server (the round-trip reference), ringkv, Redis and
# memcached with the same load generator in one run, on this machine's loopback:
# `ringkv-bench compare` starts each on a free 127.0.0.1 port (ringkv with `sync`
# durability, Redis with appendonly + appendfsync always), runs workloads C (read
# only) and put-only at pipeline 1 and 16 with 50 connections and 100-byte values,
# and writes bench/results/table.md, one overlay plot per workload and depth
# (bench/results/latency-*.svg), the JSON results and the .hgrm files.
# Installs nothing: if Redis or memcached is missing it says which Debian package.
# Usage: bench/compare.sh [SECONDS] [more ringkv-bench compare options]
#        (default 10 s per run; every run stops by itself)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
shift || true
for tool in redis-server memcached; do
  command -v "$tool" >/dev/null || {
    echo "missing $tool: install it with apt-get install $tool (Debian package $tool)" >&2
    exit 1
  }
done
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p ringkv-tools -p ringkv-bench >/dev/null
ulimit -n 20000 2>/dev/null || true
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores; ringkv $(git rev-parse --short HEAD 2>/dev/null || echo '?'), Redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), memcached $(memcached -V | cut -d' ' -f2)"
exec "$target/release/ringkv-bench" compare --seconds "$seconds" \
  --ringkv-bin "$target/release/ringkv" --echo-bin "$target/release/ringkv-echo" \
  --out bench/results "$@"

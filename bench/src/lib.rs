//! ringkv-bench: measurement tools for ringkv.
//!
//! **What this crate is.** The load generator that measures ringkv and its peers with
//! the same code (YCSB-style workloads, closed and open loop, drivers written against
//! each wire protocol), the io_uring echo server that is the round-trip reference, the
//! storage engine bench, and criterion micro-benchmarks. **What it is not.** A test of
//! correctness: nothing here asserts a time; figures are printed.
//!
//! Modules:
//! - [`workload`]: core workloads A, B, C, D, F and put-only; uniform, zipfian and
//!   latest key distributions.
//! - [`driver`]: ringkv (protocol v1, R/W, shard-aware), Redis (RESP), memcached
//!   (text) and echo connections.
//! - [`runner`]: the load phase, and the run phase in closed or open loop
//!   (coordinated omission corrected), with a progress bar.
//! - [`report`]: summary table, `.hgrm` export, JSON, SVG percentile plots.
//! - [`echo`]: the io_uring echo server (`ringkv-echo`).
//! - [`servers`]: start Redis, memcached, echo and ringkv on free local ports.
//! - [`app`]: what `ringkv-bench run` and `ringkv-bench compare` do.
//! - [`load`]: the earlier single-operation load generator (`ringkv-bench load`).
//!
//! The binary (`src/main.rs`) also has `ringkv-bench storage`; `benches/` has the
//! criterion benches.

pub mod app;
pub mod driver;
pub mod echo;
pub mod load;
pub mod report;
pub mod runner;
pub mod servers;
pub mod workload;

use hdrhistogram::Histogram;

/// A latency histogram in nanoseconds, 1 ns .. 60 s, 3 significant digits (the same
/// as the node's, so the two can be compared and merged).
pub use ringkv_net::stats::latency_histogram;

/// One line: `name  ops  ops/s  p50 p99 p999 max` (latencies in microseconds).
pub fn report_line(name: &str, ops: u64, seconds: f64, h: &Histogram<u64>) -> String {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "{name:<34} {ops:>9} ops {:>11.0} ops/s  p50 {:>8.1} us  p99 {:>8.1} us  p999 {:>8.1} us  max {:>9.1} us",
        ops as f64 / seconds,
        us(0.50),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    )
}

//! ringkv-bench: measurement tools for ringkv.
//!
//! - `ringkv-bench storage ...` (this crate's binary): the storage engine's throughput
//!   and latency on real files, and the keydir's memory per key.
//! - `ringkv-bench load ...` ([`load`]): one closed-loop load generator for ringkv,
//!   Redis and memcached.
//! - `benches/engine.rs`: criterion micro-benchmarks of the hot functions.
//!
//! Figures are printed with HdrHistogram percentiles; nothing here asserts a time.

pub mod load;

use hdrhistogram::Histogram;

/// A latency histogram in nanoseconds, 1 ns .. 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

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

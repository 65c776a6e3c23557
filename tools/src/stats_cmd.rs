//! `ringkv stats`: a node's counters and latency percentiles (HdrHistograms kept by
//! each shard, summed by the node on request), as a table, as JSON, or as `.hgrm`
//! percentile distributions for capacity planning.

use crate::cluster_cmd::admin_frame;
use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use ringkv_net::peer::ClusterRequest;
use ringkv_net::stats::NodeStats;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub const USAGE: &str = "usage: ringkv stats [--addr HOST:PORT] [--shard] [--json] [--hgrm DIR]

A node's counters (requests, errors, connections, commit-log syncs, hints, read
repairs), what it holds (keys, versions, log bytes, dead bytes), and its request
latencies since it started, summed over its shards: get, put, delete, replica_get,
replica_put (from the frame taken off the socket to the reply ready to send; a sync
write after its group commit), commit_log_sync and compaction.
  --shard      the figures of the one shard that reads the request (with --addr on a
               shard port: that shard)
  --json       one JSON object: shards, counters, latency_us (count, mean, p50, p90,
               p99, p999, max per operation)
  --hgrm DIR   also write each operation's percentile distribution (microseconds) as
               DIR/OPERATION.hgrm, HdrHistogram's text format
(default address 127.0.0.1:7379)
";

struct Args {
    addr: String,
    shard_only: bool,
    json: bool,
    hgrm: Option<PathBuf>,
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let mut out = Args {
        addr: "127.0.0.1:7379".into(),
        shard_only: false,
        json: false,
        hgrm: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--addr" => out.addr = it.next().context("--addr needs HOST:PORT")?.clone(),
            "--shard" => out.shard_only = true,
            "--json" => out.json = true,
            "--hgrm" => out.hgrm = Some(it.next().context("--hgrm needs a directory")?.into()),
            other => bail!("unexpected argument {other}"),
        }
    }
    Ok(out)
}

/// Asks the node at `addr` for its figures.
pub fn fetch(addr: &str, shard_only: bool) -> anyhow::Result<NodeStats> {
    let frame = admin_frame(
        addr,
        &ClusterRequest::Stats { shard_only },
        // longer than the node's own wait for a shard (the slow-client timeout, 10 s by
        // default), so that a stuck shard is reported by name
        Duration::from_secs(15),
    )?;
    NodeStats::parse_reply(&frame).map_err(anyhow::Error::msg)
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let args = match crate::parse_or_usage("stats", USAGE, args, parse) {
        Ok(args) => args,
        Err(code) => return Ok(code),
    };
    let stats = fetch(&args.addr, args.shard_only)?;
    if let Some(dir) = &args.hgrm {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
        for (name, h) in &stats.latencies {
            let path = dir.join(format!("{name}.hgrm"));
            std::fs::write(&path, ringkv_net::stats::hgrm(h))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    if args.json {
        let counters: serde_json::Map<String, serde_json::Value> = stats
            .counters
            .iter()
            .map(|(n, v)| (n.clone(), (*v).into()))
            .collect();
        let latencies: serde_json::Map<String, serde_json::Value> = stats
            .latencies
            .iter()
            .map(|(n, h)| {
                let summary = serde_json::json!({
                    "count": h.len(),
                    "mean": h.mean() / 1000.0,
                    "p50": us(h, 0.5),
                    "p90": us(h, 0.9),
                    "p99": us(h, 0.99),
                    "p999": us(h, 0.999),
                    "max": h.max() as f64 / 1000.0,
                });
                (n.clone(), summary)
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "shards": stats.shards,
                "counters": counters,
                "latency_us": latencies,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} at {} ({} shard{})",
        if args.shard_only { "shard" } else { "node" },
        args.addr,
        stats.shards,
        if stats.shards == 1 { "" } else { "s" }
    );
    // names are up to 32 characters (`is_stats_name`): each name column fits its longest
    let width = |names: &mut dyn Iterator<Item = &String>, least: usize| {
        names.map(String::len).max().unwrap_or(0).max(least)
    };
    let width_c = width(&mut stats.counters.iter().map(|(n, _)| n), 0);
    let width = width(
        &mut stats.latencies.iter().map(|(n, _)| n),
        "latency (us)".len(),
    );
    for (name, value) in &stats.counters {
        println!("  {name:<width_c$} {value:>14}");
    }
    println!(
        "{:<width$} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "latency (us)", "count", "p50", "p90", "p99", "p999", "max"
    );
    for (name, h) in &stats.latencies {
        if h.is_empty() {
            println!("{name:<width$} {:>12}", 0);
            continue;
        }
        println!(
            "{name:<width$} {:>12} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            h.len(),
            us(h, 0.5),
            us(h, 0.9),
            us(h, 0.99),
            us(h, 0.999),
            h.max() as f64 / 1000.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

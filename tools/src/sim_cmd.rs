//! `ringkv sim`: runs the deterministic cluster simulator (`ringkv_engine::cluster::sim`)
//! for a range of seeds, one line per run and a summary; exits 1 naming the failing
//! seeds. A failing seed is reproduced exactly by running it again.

use std::process::ExitCode;

use anyhow::{bail, Context};
use ringkv_engine::cluster::sim::{self, SimConfig, SimReport};

const USAGE: &str = "usage: ringkv sim [options]

Runs whole simulated clusters (3 to 7 nodes by default) of the real coordinator,
replica, hinted-handoff, gossip and failure-detector logic over a faulty network
(delay, loss, reordering, duplication, splits) and crashing disks, each from one seed,
then checks: no acknowledged write lost, home replicas converge after heal, no get
returns a sibling dominated by another. The same seed gives the identical run (digest).

options:
  --seed S        first seed (default 0)
  --runs K        run seeds S..S+K (default 1)
  --nodes N       nodes per run (default 3 + seed % 5)
  --ops M         client operations per run (default 1000)
  --partitions Q  partitions, a power of two (default 16)
  --n N --r R --w W   replicas and quorums (default 3, 2, 2)
  --loss P --dup P    per-message loss and duplication probability (default 0.02)
  --crash P       per-tick (50 ms) chance of a node crash (default 0.01)
  --split P       per-tick chance of a network split (default 0.01)
  --sync-interval MS  interval durability (sync every MS) instead of sync per write
  --tombstone-grace MS  reap tombstones MS after their delete (default: 24 h, never
                  within a run); the checkers then accept a write gone with a reaped
                  delete while nothing that delete superseded is back
  --no-hints      disable hinted handoff (to watch the checkers catch lost writes)
  --json          one JSON object per run, then a summary object
  --help          print this help
";

/// The parsed command line.
#[derive(Debug)]
struct Args {
    seed: u64,
    runs: u64,
    nodes: Option<usize>,
    base: SimConfig,
    json: bool,
}

/// Bounds that keep one invocation finite.
const RUNS_MAX: u64 = 1_000_000;
const NODES_MAX: usize = 64;
const OPS_MAX: usize = 10_000_000;

pub fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let args = match crate::parse_or_usage("sim", USAGE, args, parse) {
        Ok(args) => args,
        Err(code) => return Ok(code),
    };
    let mut failed: Vec<u64> = Vec::new();
    let mut total = SimReport::default();
    let started = std::time::Instant::now();
    for seed in args.seed..args.seed.saturating_add(args.runs) {
        let config = SimConfig {
            seed,
            nodes: args.nodes.unwrap_or(3 + (seed % 5) as usize),
            ..args.base.clone()
        };
        match sim::run(&config) {
            Ok(report) => {
                if args.json {
                    println!("{}", report_json(&report));
                } else {
                    println!(
                        "seed {seed} nodes {} acked {} digest {:016x} {}",
                        report.nodes,
                        report.acked_puts + report.acked_deletes,
                        report.digest,
                        report.counters_line()
                    );
                }
                total.add(&report);
            }
            Err(failure) => {
                if args.json {
                    let line = serde_json::json!({
                        "seed": seed,
                        "nodes": config.nodes,
                        "ok": false,
                        "checker": failure.checker,
                        "key": failure.key,
                        "detail": failure.detail,
                    });
                    println!("{line}");
                } else {
                    println!("seed {seed} nodes {} FAILED: {failure}", config.nodes);
                }
                failed.push(seed);
            }
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if args.json {
        let summary = serde_json::json!({
            "summary": true,
            "runs": args.runs,
            "passed": args.runs - failed.len() as u64,
            "failed_seeds": failed,
            "acked": total.acked_puts + total.acked_deletes,
            "crashes": total.crashes,
            "partitions": total.partitions,
            "hints_delivered": total.hints_delivered,
            "read_repairs": total.read_repairs,
            "elapsed_ms": elapsed_ms,
        });
        println!("{summary}");
    } else {
        println!(
            "{} runs, {} passed, {} failed{} in {elapsed_ms} ms; totals: {}",
            args.runs,
            args.runs - failed.len() as u64,
            failed.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(" (seeds {failed:?})")
            },
            total.counters_line()
        );
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "ringkv sim: failing seed {}; rerun it with --seed {} --runs 1",
            failed[0], failed[0]
        );
        Ok(ExitCode::from(1))
    }
}

fn report_json(r: &SimReport) -> serde_json::Value {
    serde_json::json!({
        "seed": r.seed,
        "nodes": r.nodes,
        "ok": true,
        "digest": format!("{:016x}", r.digest),
        "acked_puts": r.acked_puts,
        "acked_deletes": r.acked_deletes,
        "not_confirmed": r.not_confirmed,
        "gets_ok": r.gets_ok,
        "gets_failed": r.gets_failed,
        "client_timeouts": r.client_timeouts,
        "forwarded": r.forwarded,
        "crashes": r.crashes,
        "partitions": r.partitions,
        "hints_stored": r.hints_stored,
        "hints_delivered": r.hints_delivered,
        "read_repairs": r.read_repairs,
        "messages_sent": r.messages_sent,
        "messages_dropped": r.messages_dropped,
        "messages_duplicated": r.messages_duplicated,
        "store_errors": r.store_errors,
        "compactions": r.compactions,
        "fallback_copies": r.fallback_copies,
        "failed_copy_hints": r.failed_copy_hints,
        "tombstones_reaped": r.tombstones_reaped,
        "tombstones_held": r.tombstones_held,
        "sim_ms": r.sim_ms,
    })
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let mut parsed = Args {
        seed: 0,
        runs: 1,
        nodes: None,
        base: SimConfig::default(),
        json: false,
    };
    let mut rest = args.iter();
    // Bounded by the argument count: every iteration consumes at least one argument.
    while let Some(flag) = rest.next() {
        let mut value = |name: &str| {
            rest.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        let b = &mut parsed.base;
        match flag.as_str() {
            "--seed" => parsed.seed = number(&value("--seed")?, "--seed")?,
            "--runs" => parsed.runs = number(&value("--runs")?, "--runs")?,
            "--nodes" => parsed.nodes = Some(number(&value("--nodes")?, "--nodes")?),
            "--ops" => b.client_ops = number(&value("--ops")?, "--ops")?,
            "--partitions" => b.partitions = number(&value("--partitions")?, "--partitions")?,
            "--n" => b.n = number(&value("--n")?, "--n")?,
            "--r" => b.r = number(&value("--r")?, "--r")?,
            "--w" => b.w = number(&value("--w")?, "--w")?,
            "--loss" => b.loss = probability(&value("--loss")?, "--loss")?,
            "--dup" => b.dup = probability(&value("--dup")?, "--dup")?,
            "--crash" => b.crash_prob = probability(&value("--crash")?, "--crash")?,
            "--split" => b.partition_prob = probability(&value("--split")?, "--split")?,
            "--no-hints" => b.hints = false,
            "--sync-interval" => {
                let ms: u64 = number(&value("--sync-interval")?, "--sync-interval")?;
                if ms == 0 {
                    bail!("--sync-interval must be at least 1 ms");
                }
                b.sync_interval_ms = Some(ms);
            }
            "--tombstone-grace" => {
                let ms: u64 = number(&value("--tombstone-grace")?, "--tombstone-grace")?;
                b.tombstone_grace_ms = Some(ms);
            }
            "--json" => parsed.json = true,
            other => bail!("unknown argument '{other}'"),
        }
    }
    if parsed.runs == 0 || parsed.runs > RUNS_MAX {
        bail!("--runs must be between 1 and {RUNS_MAX}");
    }
    if let Some(nodes) = parsed.nodes {
        if nodes == 0 || nodes > NODES_MAX {
            bail!("--nodes must be between 1 and {NODES_MAX}");
        }
    }
    let b = &parsed.base;
    if b.client_ops > OPS_MAX {
        bail!("--ops must be at most {OPS_MAX}");
    }
    if !ringkv_ring::hash::is_valid_partition_count(b.partitions) || b.partitions > 4096 {
        bail!("--partitions must be a power of two up to 4096");
    }
    if b.n == 0 || b.r == 0 || b.w == 0 || b.n > NODES_MAX {
        bail!("--n, --r and --w must be at least 1 (and --n at most {NODES_MAX})");
    }
    Ok(parsed)
}

fn number<T: std::str::FromStr>(text: &str, name: &str) -> anyhow::Result<T> {
    text.parse()
        .map_err(|_| anyhow::anyhow!("{name}: '{text}' is not a valid number"))
}

fn probability(text: &str, name: &str) -> anyhow::Result<f64> {
    let p: f64 = number(text, name)?;
    if !(0.0..=1.0).contains(&p) {
        bail!("{name}: {p} is not a probability between 0 and 1");
    }
    Ok(p)
}

//! What the `run` and `compare` subcommands do with the pieces: load, run, print the
//! summary, write the `.hgrm` files, the JSON result and the plot.

use crate::driver::{DriverKind, Target};
use crate::report::{self, Curve, Row};
use crate::runner::{self, RunConfig, Stop};
use crate::servers::{self, Server, TempDir};
use crate::workload::{OpKind, Workload};
use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A run and where its results go.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub config: RunConfig,
    pub label: String,
    pub skip_load: bool,
    pub json: Option<PathBuf>,
    pub hgrm_dir: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    /// Earlier JSON results to overlay on the plot.
    pub plot_with: Vec<PathBuf>,
    /// Print the summary table.
    pub print: bool,
}

/// A file-name-safe form of a label.
pub fn slug(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// Loads (unless skipped), runs, reports; returns the JSON result.
pub fn execute(spec: &RunSpec) -> anyhow::Result<Value> {
    let c = &spec.config;
    let load = if spec.skip_load {
        None
    } else {
        let (seconds, rate) = runner::load(c)?;
        if spec.print {
            println!(
                "# {}: loaded {} records in {seconds:.2} s ({} puts/s)",
                spec.label,
                report::fmt_count(c.records as f64),
                report::fmt_count(rate)
            );
        }
        Some(json!({"seconds": seconds, "throughput_ops_s": rate}))
    };
    let result = runner::run(c)?;
    let all = result.all();
    let mut rows: Vec<Row> = OpKind::ALL
        .iter()
        .filter(|op| !result.histograms[op.index()].is_empty())
        .map(|op| {
            let h = &result.histograms[op.index()];
            Row {
                label: spec.label.clone(),
                op: op.name().into(),
                count: h.len(),
                ops_s: h.len() as f64 / result.elapsed_s,
                hist: h.clone(),
            }
        })
        .collect();
    if rows.len() > 1 {
        rows.push(Row {
            label: spec.label.clone(),
            op: "all".into(),
            count: all.len(),
            ops_s: result.throughput_ops_s(),
            hist: all.clone(),
        });
    }
    if spec.print {
        print!("{}", report::summary_table(&rows));
        if result.errors > 0 || result.not_found > 0 {
            println!(
                "# {} errors (first: {}), {} reads found nothing",
                result.errors,
                result.first_error.as_deref().unwrap_or("-"),
                result.not_found
            );
        }
    }
    let value = json!({
        "label": spec.label,
        "driver": c.target.driver.name(),
        "addr": c.target.addr,
        "shard_aware": c.target.shard_aware,
        "r": c.target.r,
        "w": c.target.w,
        "workload": c.workload.name,
        "distribution": c.workload.distribution.name(),
        "mode": if c.rate.is_some() { "open" } else { "closed" },
        "rate_ops_s": c.rate,
        "connections": c.connections,
        "pipeline": c.pipeline,
        "records": c.records,
        "value_bytes_min": c.value_bytes_min,
        "value_bytes_max": c.value_bytes_max,
        "seed": c.seed,
        "load": load,
        "elapsed_s": result.elapsed_s,
        "operations": result.operations,
        "errors": result.errors,
        "not_found": result.not_found,
        "throughput_ops_s": result.throughput_ops_s(),
        "ops": report::ops_json(&result.histograms, &all, result.elapsed_s),
    });
    if let Some(dir) = &spec.hgrm_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for row in &rows {
            let path = dir.join(format!("{}-{}.hgrm", slug(&spec.label), row.op));
            std::fs::write(&path, report::hgrm(&row.hist))
                .with_context(|| format!("write {}", path.display()))?;
        }
    }
    if let Some(path) = &spec.json {
        write_json(path, &value)?;
    }
    if let Some(path) = &spec.plot {
        let mut curves = Vec::new();
        for other in &spec.plot_with {
            curves.push(report::curve_from_json(&read_json(other)?, "all")?);
        }
        curves.push(report::curve_from_json(&value, "all")?);
        report::plot(
            path,
            &format!("latency by percentile, workload {}", c.workload.name),
            &curves,
        )?;
    }
    Ok(value)
}

pub fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("write {}", path.display()))
}

pub fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

/// Options of `compare`.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub seconds: f64,
    pub workloads: Vec<String>,
    pub pipelines: Vec<usize>,
    pub connections: usize,
    pub records: u64,
    pub value_bytes: usize,
    pub out_dir: PathBuf,
    pub ringkv_bin: Option<PathBuf>,
    pub echo_bin: Option<PathBuf>,
    pub shards: usize,
    pub progress: bool,
}

fn require(program: &str) -> anyhow::Result<()> {
    if !servers::on_path(program) {
        bail!(
            "{program} is not installed (not on PATH); install it with: apt-get install {}\n\
             (nothing is installed automatically)",
            servers::debian_package(program)
        );
    }
    Ok(())
}

/// Starts Redis, memcached, the echo server and a ringkv node, runs every workload at
/// every pipeline depth against each, and writes the table, the JSON results and one
/// overlay plot per workload and pipeline depth into `out_dir`.
pub fn compare(o: &CompareOptions) -> anyhow::Result<()> {
    require("redis-server")?;
    require("memcached")?;
    let ringkv_bin = o
        .ringkv_bin
        .clone()
        .or_else(|| servers::sibling_binary("ringkv"))
        .context("no ringkv binary next to ringkv-bench: build it (cargo build --release -p ringkv-tools) or pass --ringkv-bin")?;
    let echo_bin = o
        .echo_bin
        .clone()
        .or_else(|| servers::sibling_binary("ringkv-echo"))
        .context("no ringkv-echo binary next to ringkv-bench: pass --echo-bin")?;
    std::fs::create_dir_all(&o.out_dir)?;
    let work = TempDir::new("ringkv-compare")?;
    let echo = servers::start_echo_process(&echo_bin, &work.0)?;
    let node = servers::start_ringkv_process(&ringkv_bin, &work.0, o.shards)?;
    let redis = servers::start_redis(&work.0, true)?;
    let memcached = servers::start_memcached(&work.0, 2)?;
    let systems: Vec<(&str, &Server, DriverKind, bool)> = vec![
        ("echo (io_uring)", &echo, DriverKind::Echo, false),
        ("ringkv", &node, DriverKind::Ringkv, false),
        ("ringkv shard-aware", &node, DriverKind::Ringkv, true),
        (
            "Redis (appendfsync always)",
            &redis,
            DriverKind::Redis,
            false,
        ),
        ("memcached", &memcached, DriverKind::Memcached, false),
    ];
    let mut table = String::new();
    let mut rows_md = String::from(
        "| system | workload | pipeline | ops/s | p50 | p90 | p99 | p999 | max |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut results = Vec::new();
    // every workload uses the same records: each server is loaded once
    let mut loaded = std::collections::HashSet::new();
    // and every run against a server remembers the contexts of the runs before it (the
    // load included), as one long-lived client would: an update then never starts a
    // sibling just because a new run did not know the key's context yet
    let mut contexts: std::collections::HashMap<
        std::net::SocketAddr,
        std::sync::Arc<crate::driver::ContextCache>,
    > = std::collections::HashMap::new();
    for workload in &o.workloads {
        let w = Workload::core(workload, None)?;
        for &pipeline in &o.pipelines {
            let mut curves: Vec<Curve> = Vec::new();
            for &(name, server, driver, shard_aware) in &systems {
                let label = format!("{name} {} p{pipeline}", w.name);
                let spec = RunSpec {
                    config: RunConfig {
                        target: Target {
                            driver,
                            addr: server.addr.to_string(),
                            r: 0,
                            w: 0,
                            shard_aware,
                            timeout: Duration::from_secs(30),
                            contexts: contexts.entry(server.addr).or_default().clone(),
                        },
                        workload: w.clone(),
                        records: o.records,
                        stop: Stop::Duration(Duration::from_secs_f64(o.seconds)),
                        connections: o.connections,
                        pipeline,
                        rate: None,
                        value_bytes_min: o.value_bytes,
                        value_bytes_max: o.value_bytes,
                        seed: 1,
                        errors_max: 0,
                        progress: o.progress,
                    },
                    label: label.clone(),
                    skip_load: !loaded.insert(server.addr),
                    json: Some(o.out_dir.join(format!("{}.json", slug(&label)))),
                    hgrm_dir: Some(o.out_dir.join("hgrm")),
                    plot: None,
                    plot_with: Vec::new(),
                    print: false,
                };
                eprintln!("# running {label} ({} s)", o.seconds);
                let value = execute(&spec).with_context(|| format!("run {label}"))?;
                let a = &value["ops"]["all"];
                let us = |k: &str| report::fmt_us(a[k].as_f64().unwrap_or(0.0));
                let line = format!(
                    "| {name} | {} | {pipeline} | {} | {} | {} | {} | {} | {} |\n",
                    w.name,
                    report::fmt_count(value["throughput_ops_s"].as_f64().unwrap_or(0.0)),
                    us("p50_us"),
                    us("p90_us"),
                    us("p99_us"),
                    us("p999_us"),
                    us("max_us"),
                );
                print!("{line}");
                rows_md.push_str(&line);
                let mut curve = report::curve_from_json(&value, "all")?;
                curve.label = name.to_string();
                curves.push(curve);
                results.push(value);
            }
            let plot = o
                .out_dir
                .join(format!("latency-{}-p{pipeline}.svg", slug(&w.name)));
            report::plot(
                &plot,
                &format!(
                    "workload {}, {} connections, pipeline {pipeline}, {}-byte values",
                    w.name, o.connections, o.value_bytes
                ),
                &curves,
            )?;
            eprintln!("# plot: {}", plot.display());
        }
    }
    table.push_str(&rows_md);
    std::fs::write(o.out_dir.join("table.md"), &table)?;
    write_json(&o.out_dir.join("results.json"), &Value::Array(results))?;
    eprintln!("# table: {}", o.out_dir.join("table.md").display());
    Ok(())
}

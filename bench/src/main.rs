//! `ringkv-bench`: the load generator (`run`, the default), the side-by-side
//! comparison (`compare`), plots of earlier results (`plot`), the storage engine bench
//! (`storage`) and the single-operation load generator of before (`load`).
//!
//! `ringkv-bench storage`: the storage engine on real files (one shard, one partition).
//!
//! ```text
//! ringkv-bench storage [--dir DIR] [--seconds S] [--value-bytes B]
//!                      [--writers 1,128] [--keys 1000000] [--readers 128]
//!                      [--only put|get|memory|compact]
//! ```
//! - put: `sync` durability, each writer task puts fresh keys in a loop; every put is
//!   acknowledged only after the group-commit fdatasync that covers it.
//! - get: loads `--keys` keys, then random gets from `--readers` concurrent tasks.
//! - compact: 32 writers overwrite 10,000 keys, without and then with the background
//!   compactor in its low-priority task queue, to see what compaction costs foreground
//!   latency.
//! - memory: bytes per key of a keydir holding `--keys` 16-byte keys, measured with a
//!   counting global allocator.

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use ringkv_bench::{latency_histogram, report_line};
use ringkv_engine::keydir::{KeyDir, Loc};
use ringkv_engine::runtime::run_local;
use ringkv_engine::storage::dma::DmaStorage;
use ringkv_engine::{Durability, Partition, PartitionConfig, WriteOp};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct CountingAlloc;
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[derive(Debug, Clone)]
struct Options {
    dir: PathBuf,
    seconds: f64,
    value_bytes: usize,
    writers: Vec<usize>,
    keys: usize,
    readers: usize,
    only: Option<String>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn storage(o: Options) -> anyhow::Result<()> {
    let want = |what: &str| o.only.as_deref().is_none_or(|only| only == what);
    println!(
        "# ringkv storage bench: one shard, one partition, {}-byte values, dir {}",
        o.value_bytes,
        o.dir.display()
    );
    if want("put") {
        let mut rates = Vec::new();
        for &writers in &o.writers {
            let rate = bench_put(&o, writers)?;
            rates.push((writers, rate));
        }
        if let (Some(first), Some(last)) = (rates.first(), rates.last()) {
            if first.0 == 1 && last.0 > 1 {
                println!(
                    "group commit: {} writers reach {:.1}x the rate of 1 writer",
                    last.0,
                    last.1 / first.1
                );
            }
        }
    }
    if want("get") {
        bench_get(&o)?;
    }
    if want("memory") {
        bench_keydir_memory(o.keys);
    }
    if want("compact") {
        bench_overwrite(&o, false)?;
        bench_overwrite(&o, true)?;
    }
    Ok(())
}

fn fresh_dir(o: &Options, name: &str) -> anyhow::Result<PathBuf> {
    let dir = o.dir.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&o.dir)?;
    Ok(dir)
}

/// `writers` tasks put fresh keys in `sync` mode for `seconds`; returns puts/s.
fn bench_put(o: &Options, writers: usize) -> anyhow::Result<f64> {
    let dir = fresh_dir(o, &format!("put-{writers}"))?;
    let (seconds, value_bytes) = (o.seconds, o.value_bytes);
    let (ops, elapsed, hist, syncs) = run_local(move || async move {
        let storage = DmaStorage::open(&dir).await.expect("open folder");
        let config = PartitionConfig {
            durability: Durability::Sync,
            ..PartitionConfig::default()
        };
        let (p, _) = Partition::open(storage, config, now_ms())
            .await
            .expect("open partition");
        let p = Rc::new(p);
        let hist = Rc::new(RefCell::new(latency_histogram()));
        let value = Rc::new(vec![0xABu8; value_bytes]);
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (p, hist, value) = (p.clone(), hist.clone(), value.clone());
            tasks.push(glommio::spawn_local(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let key = format!("w{w:04}-{n:012}");
                    let t = Instant::now();
                    p.write(
                        &[WriteOp {
                            key: key.as_bytes(),
                            version: b"bench",
                            value: Some(&value),
                            replaces: &[],
                        }],
                        now_ms(),
                    )
                    .await
                    .expect("durable put");
                    hist.borrow_mut()
                        .record(t.elapsed().as_nanos() as u64)
                        .expect("in range");
                    n += 1;
                }
                n
            }));
        }
        let mut ops = 0;
        for t in tasks {
            ops += t.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let syncs = p.stats().syncs;
        p.close().await.expect("close");
        let hist = hist.borrow().clone();
        (ops, elapsed, hist, syncs)
    });
    println!(
        "{}  ({:.1} puts per fdatasync)",
        report_line(&format!("put sync, {writers} writers"), ops, elapsed, &hist),
        ops as f64 / syncs.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(o.dir.join(format!("put-{writers}")));
    Ok(ops as f64 / elapsed)
}

fn bench_get(o: &Options) -> anyhow::Result<()> {
    let dir = fresh_dir(o, "get")?;
    let (keys, readers, seconds, value_bytes) = (o.keys, o.readers, o.seconds, o.value_bytes);
    let (load_s, ops, elapsed, hist, stats) = run_local(move || async move {
        let storage = DmaStorage::open(&dir).await.expect("open folder");
        let config = PartitionConfig {
            durability: Durability::None,
            ..PartitionConfig::default()
        };
        let (p, _) = Partition::open(storage, config, now_ms())
            .await
            .expect("open partition");
        let value = vec![0xCDu8; value_bytes];
        let load = Instant::now();
        for i in 0..keys {
            let key = format!("key-{i:012}");
            p.write(
                &[WriteOp {
                    key: key.as_bytes(),
                    version: b"bench",
                    value: Some(&value),
                    replaces: &[],
                }],
                now_ms(),
            )
            .await
            .expect("load");
            if i % 4096 == 0 {
                glommio::yield_if_needed().await;
            }
        }
        p.sync().await.expect("sync");
        let load_s = load.elapsed().as_secs_f64();
        let p = Rc::new(p);
        let hist = Rc::new(RefCell::new(latency_histogram()));
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for r in 0..readers {
            let (p, hist) = (p.clone(), hist.clone());
            tasks.push(glommio::spawn_local(async move {
                let mut rng = ringkv_engine::storage::mem::SplitMix(r as u64 + 1);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let i = rng.next_u64() % keys as u64;
                    let key = format!("key-{i:012}");
                    let t = Instant::now();
                    let got = p.get(key.as_bytes()).await.expect("get");
                    assert_eq!(got.len(), 1, "every loaded key reads back");
                    assert_eq!(got[0].value.as_ref().map(Vec::len), Some(value_bytes));
                    hist.borrow_mut()
                        .record(t.elapsed().as_nanos() as u64)
                        .expect("in range");
                    n += 1;
                }
                n
            }));
        }
        let mut ops = 0;
        for t in tasks {
            ops += t.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let stats = p.stats();
        let hist = hist.borrow().clone();
        (load_s, ops, elapsed, hist, stats)
    });
    println!(
        "load {keys} keys (durability none, then one sync): {load_s:.1} s, {:.0} puts/s",
        keys as f64 / load_s
    );
    println!(
        "{}",
        report_line(
            &format!("get random, {readers} readers"),
            ops,
            elapsed,
            &hist
        )
    );
    println!(
        "keydir for {} keys: {} bytes of heap by its own count ({:.1} bytes/key incl. key bytes)",
        stats.keys,
        stats.keydir_heap_bytes,
        stats.keydir_heap_bytes as f64 / stats.keys.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(o.dir.join("get"));
    Ok(())
}

/// 32 writers overwrite 10,000 keys in `sync` mode with small segments, with and
/// without the background compactor (low-priority task queue) running beside them.
fn bench_overwrite(o: &Options, compactor: bool) -> anyhow::Result<()> {
    let name = if compactor {
        "overwrite-compacting"
    } else {
        "overwrite"
    };
    let dir = fresh_dir(o, name)?;
    let (seconds, value_bytes) = (o.seconds, o.value_bytes);
    let (ops, elapsed, hist, compactions, bytes) = run_local(move || async move {
        let storage = DmaStorage::open(&dir).await.expect("open folder");
        let config = PartitionConfig {
            durability: Durability::Sync,
            segment_bytes_max: 4 << 20,
            ..PartitionConfig::default()
        };
        let (p, _) = Partition::open(storage, config, now_ms())
            .await
            .expect("open partition");
        let p = Rc::new(p);
        let background = compactor.then(|| {
            ringkv_engine::runtime::spawn_compactor(
                p.clone(),
                ringkv_engine::runtime::background_queue(),
                0.5,
                Duration::from_millis(10),
                1_000_000,
                now_ms,
                |_| {},
            )
        });
        let hist = Rc::new(RefCell::new(latency_histogram()));
        let value = Rc::new(vec![0x5Au8; value_bytes]);
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for w in 0..32u64 {
            let (p, hist, value) = (p.clone(), hist.clone(), value.clone());
            tasks.push(glommio::spawn_local(async move {
                let mut rng = ringkv_engine::storage::mem::SplitMix(w + 1);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let key = format!("key-{:06}", rng.next_u64() % 10_000);
                    let t = Instant::now();
                    let old: Vec<u64> = p.versions(key.as_bytes()).iter().map(|l| l.seq).collect();
                    p.write(
                        &[WriteOp {
                            key: key.as_bytes(),
                            version: b"bench",
                            value: Some(&value),
                            replaces: &old,
                        }],
                        now_ms(),
                    )
                    .await
                    .expect("durable put");
                    hist.borrow_mut()
                        .record(t.elapsed().as_nanos() as u64)
                        .expect("in range");
                    n += 1;
                }
                n
            }));
        }
        let mut ops = 0;
        for t in tasks {
            ops += t.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        p.close().await.expect("close");
        let compactions = match background {
            Some(task) => task.await.expect("compactor"),
            None => 0,
        };
        let bytes = p.stats().bytes;
        let hist = hist.borrow().clone();
        (ops, elapsed, hist, compactions, bytes)
    });
    println!(
        "{}  ({compactions} compactions, {:.1} MiB on disk at the end)",
        report_line(
            &format!(
                "overwrite sync, 32 writers{}",
                if compactor { ", compacting" } else { "" }
            ),
            ops,
            elapsed,
            &hist
        ),
        bytes as f64 / (1 << 20) as f64
    );
    let _ = std::fs::remove_dir_all(o.dir.join(name));
    Ok(())
}

fn bench_keydir_memory(keys: usize) {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let mut kd = KeyDir::new();
    for i in 0..keys as u64 {
        // 16-byte keys
        let key = format!("{i:016x}");
        kd.insert(
            key.as_bytes(),
            Loc {
                seq: i + 1,
                segment: 0,
                offset: (i * 160) as u32,
                len: 160,
                flags: 0,
            },
        );
    }
    let bytes = ALLOCATED.load(Ordering::Relaxed) - before;
    let per_key = bytes as f64 / keys as f64;
    println!(
        "keydir memory: {keys} keys of 16 bytes take {bytes} bytes (allocator count): {per_key:.1} bytes/key, {:.1} bytes/key beyond the key",
        per_key - 16.0
    );
    drop(kd);
}

/// Load generator and benchmarks for ringkv and its peers (Redis, memcached) and an
/// io_uring echo server, all measured by the same code.
///
/// With no subcommand, runs one workload (the options below; same as `run`). A run
/// loads its records first unless --skip-load, then runs for --duration or
/// --operations, and prints ops/s, p50, p90, p99, p999 and max per operation.
#[derive(Parser, Debug)]
#[command(name = "ringkv-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one YCSB-style workload against one target (the default command).
    Run(RunArgs),
    /// Start Redis, memcached, the echo server and a ringkv node on free 127.0.0.1
    /// ports, run the same workloads against each, write the side-by-side table
    /// (table.md), JSON results, .hgrm files and overlay plots into --out.
    Compare(CompareArgs),
    /// Overlay the latency curves of earlier --json results in one SVG plot.
    Plot(PlotArgs),
    /// The storage engine on real files: one shard, one partition.
    Storage(StorageArgs),
    /// The single-operation closed-loop load generator of before (GET or PUT only).
    Load(LoadArgs),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let seconds = number
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("bad duration {s:?} (e.g. 10s, 500ms, 2m)"))?
        * scale;
    if !(seconds > 0.0 && seconds <= ringkv_bench::runner::RUN_SECONDS_MAX as f64) {
        return Err(format!(
            "duration must be in (0, {} s]",
            ringkv_bench::runner::RUN_SECONDS_MAX
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_value_size(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("bad value size {s:?} (e.g. 100, or 100..1000)");
    let (min, max) = match s.split_once("..").or_else(|| s.split_once('-')) {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim()
                .trim_start_matches('=')
                .parse()
                .map_err(|_| bad())?,
        ),
        None => {
            let n = s.trim().parse().map_err(|_| bad())?;
            (n, n)
        }
    };
    if min > max || max > 4 << 20 {
        return Err(format!("value size {min}..{max}: need min <= max <= 4 MiB"));
    }
    Ok((min, max))
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Protocol to speak: ringkv (native v1), redis (RESP), memcached (text), echo
    /// (the io_uring echo server `ringkv-echo`: the round-trip reference).
    #[arg(long, default_value = "ringkv", value_parser = ["ringkv", "redis", "memcached", "echo"])]
    driver: String,
    /// Target address [default: 127.0.0.1:7379 ringkv, :6379 redis, :11211 memcached,
    /// :7399 echo]. ringkv: a comma-separated list of nodes spreads the connections
    /// over a cluster.
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<String>,
    /// YCSB core workload: A (50% read, 50% update), B (95/5), C (read only),
    /// D (95% read latest, 5% insert), F (50% read, 50% read-modify-write), or
    /// put-only (100% update).
    #[arg(long, default_value = "A", value_name = "A|B|C|D|F|put-only")]
    workload: String,
    /// Records written by the load phase (and the key space of the run).
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// How long the run phase lasts (e.g. 10s, 500ms, 2m) [default: 10s unless
    /// --operations].
    #[arg(long, value_parser = parse_duration, conflicts_with = "operations")]
    duration: Option<Duration>,
    /// Operations of the run phase, over all connections (instead of --duration).
    #[arg(long)]
    operations: Option<u64>,
    /// Concurrent connections (one thread each).
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Requests in flight per connection: a batch of this many is written, then its
    /// replies read.
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Open loop: target operations per second over all connections; latency is
    /// measured from each request's intended send time (coordinated omission
    /// corrected). Without it the run is closed loop.
    #[arg(long, value_name = "OPS")]
    rate: Option<f64>,
    /// Value bytes: fixed (100) or a uniform range (100..1000).
    #[arg(long, default_value = "100", value_parser = parse_value_size, value_name = "N|MIN..MAX")]
    value_size: (usize, usize),
    /// Key distribution [default: the workload's: zipfian, D latest, put-only uniform].
    #[arg(long, value_parser = ["uniform", "zipfian", "latest"])]
    distribution: Option<String>,
    /// Zipfian constant of the zipfian and latest distributions (YCSB: 0.99).
    #[arg(long, default_value_t = 0.99)]
    zipf_theta: f64,
    /// ringkv: replies to wait for on a get (0: the node's default).
    #[arg(long, default_value_t = 0)]
    r: u8,
    /// ringkv: acknowledgements to wait for on a put (0: the node's default).
    #[arg(long, default_value_t = 0)]
    w: u8,
    /// ringkv: send each connection to one shard's own port with keys that shard owns
    /// (what the shard-aware client does).
    #[arg(long)]
    shard_aware: bool,
    /// Skip the load phase (the records are already there).
    #[arg(long)]
    skip_load: bool,
    /// Seed of the key and operation choices (a run is repeatable).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fail (exit 1) once more than this many operations got an error reply.
    #[arg(long, default_value_t = 0)]
    max_errors: u64,
    /// Socket connect/read/write timeout (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Name of this run in the table, the files and the plot [default: the driver].
    #[arg(long)]
    label: Option<String>,
    /// Write the result as JSON (throughput_ops_s; per operation p50_us, p90_us,
    /// p99_us, p999_us, max_us and the percentile curve).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write each operation's full percentile distribution as HdrHistogram .hgrm
    /// files into DIR (LABEL-OP.hgrm, values in microseconds).
    #[arg(long, value_name = "DIR")]
    hgrm: Option<PathBuf>,
    /// Write a latency-by-percentile plot (SVG) of this run, overlaid on --plot-with.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Earlier --json results to overlay on --plot (comma-separated or repeated).
    #[arg(long, value_name = "FILE", value_delimiter = ',')]
    plot_with: Vec<PathBuf>,
    /// Progress bar with live throughput on stderr [default: when stderr is a terminal].
    #[arg(long, overrides_with = "no_progress")]
    progress: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

impl RunArgs {
    fn spec(&self) -> anyhow::Result<ringkv_bench::app::RunSpec> {
        use ringkv_bench::driver::{DriverKind, Target};
        use ringkv_bench::runner::{RunConfig, Stop};
        use ringkv_bench::workload::{Distribution, Workload};
        let driver = DriverKind::parse(&self.driver)?;
        let addr = self.addr.clone().unwrap_or_else(|| {
            match driver {
                DriverKind::Ringkv => "127.0.0.1:7379",
                DriverKind::Redis => "127.0.0.1:6379",
                DriverKind::Memcached => "127.0.0.1:11211",
                DriverKind::Echo => "127.0.0.1:7399",
            }
            .to_string()
        });
        let distribution = self
            .distribution
            .as_deref()
            .map(|d| Distribution::parse(d, self.zipf_theta))
            .transpose()?;
        let mut workload = Workload::core(&self.workload, distribution)?;
        if distribution.is_none() {
            // the workload's own distribution, with this constant
            workload.distribution = match workload.distribution {
                Distribution::Zipfian { .. } => Distribution::parse("zipfian", self.zipf_theta)?,
                Distribution::Latest { .. } => Distribution::parse("latest", self.zipf_theta)?,
                other => other,
            };
        }
        if !(1..=10_000).contains(&self.connections) || !(1..=4096).contains(&self.pipeline) {
            bail!("--connections must be 1..=10000 and --pipeline 1..=4096");
        }
        if self.records == 0 {
            bail!("--records must be at least 1");
        }
        if let Some(rate) = self.rate {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be a positive number of operations per second");
            }
        }
        let stop = match (self.operations, self.duration) {
            (Some(n), _) => Stop::Operations(n),
            (None, Some(d)) => Stop::Duration(d),
            (None, None) => Stop::Duration(Duration::from_secs(10)),
        };
        let label = self.label.clone().unwrap_or_else(|| {
            format!(
                "{}{}",
                driver.name(),
                if self.shard_aware { " shard-aware" } else { "" }
            )
        });
        let progress =
            !self.no_progress && (self.progress || ringkv_bench::runner::stderr_is_terminal());
        Ok(ringkv_bench::app::RunSpec {
            config: RunConfig {
                target: Target {
                    driver,
                    addr,
                    r: self.r,
                    w: self.w,
                    shard_aware: self.shard_aware,
                    timeout: self.timeout,
                    contexts: Default::default(),
                },
                workload,
                records: self.records,
                stop,
                connections: self.connections,
                pipeline: self.pipeline,
                rate: self.rate,
                value_bytes_min: self.value_size.0,
                value_bytes_max: self.value_size.1,
                seed: self.seed,
                errors_max: self.max_errors,
                progress,
            },
            label,
            skip_load: self.skip_load,
            json: self.json.clone(),
            hgrm_dir: self.hgrm.clone(),
            plot: self.plot.clone(),
            plot_with: self.plot_with.clone(),
            print: true,
        })
    }
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Seconds per run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Workloads to run against every system (comma-separated).
    #[arg(long, default_value = "C,put-only", value_delimiter = ',')]
    workloads: Vec<String>,
    /// Pipeline depths to run each workload at (comma-separated).
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    pipelines: Vec<usize>,
    #[arg(long, default_value_t = 50)]
    connections: usize,
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Shards of the ringkv node.
    #[arg(long, default_value_t = 2)]
    shards: usize,
    /// Where the table, JSON results, .hgrm files and plots go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The ringkv binary [default: `ringkv` next to this executable].
    #[arg(long)]
    ringkv_bin: Option<PathBuf>,
    /// The echo server binary [default: `ringkv-echo` next to this executable].
    #[arg(long)]
    echo_bin: Option<PathBuf>,
    /// Progress bar on stderr during each run.
    #[arg(long)]
    progress: bool,
}

#[derive(Args, Debug)]
struct PlotArgs {
    /// Output SVG file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Operation whose curve to draw (all, read, update, insert, rmw).
    #[arg(long, default_value = "all")]
    op: String,
    #[arg(long, default_value = "latency by percentile")]
    title: String,
    /// JSON results written by --json.
    #[arg(required = true)]
    results: Vec<PathBuf>,
}

#[derive(Args, Debug)]
struct StorageArgs {
    /// Folder for the partition files.
    #[arg(long, default_value = "ringkv-bench-data")]
    dir: PathBuf,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Writer counts of the put runs (comma-separated).
    #[arg(long, default_value = "1,128", value_delimiter = ',')]
    writers: Vec<usize>,
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    #[arg(long, default_value_t = 128)]
    readers: usize,
    /// Only one part.
    #[arg(long, value_parser = ["put", "get", "memory", "compact"])]
    only: Option<String>,
}

#[derive(Args, Debug)]
struct LoadArgs {
    #[arg(long, default_value = "ringkv", value_parser = ["ringkv", "redis", "memcached"])]
    target: String,
    #[arg(long, default_value = "127.0.0.1:7379")]
    addr: String,
    #[arg(long, default_value = "get", value_parser = ["get", "put", "set"])]
    op: String,
    #[arg(long, default_value_t = 50)]
    connections: usize,
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Do not put every key before a GET run.
    #[arg(long)]
    no_preload: bool,
    /// ringkv: each connection to one shard's port with keys that shard owns.
    #[arg(long)]
    shard_aware: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run_command(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // one clear line (with its causes), no backtrace
            eprintln!("ringkv-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => ringkv_bench::app::execute(&cli.run.spec()?).map(drop),
        Some(Command::Run(args)) => ringkv_bench::app::execute(&args.spec()?).map(drop),
        Some(Command::Compare(a)) => {
            if !(a.seconds > 0.0 && a.seconds <= 600.0) {
                bail!("--seconds must be in (0, 600]");
            }
            ringkv_bench::app::compare(&ringkv_bench::app::CompareOptions {
                seconds: a.seconds,
                workloads: a.workloads,
                pipelines: a.pipelines,
                connections: a.connections,
                records: a.records,
                value_bytes: a.value_size,
                out_dir: a.out,
                ringkv_bin: a.ringkv_bin,
                echo_bin: a.echo_bin,
                shards: a.shards,
                progress: a.progress,
            })
        }
        Some(Command::Plot(a)) => {
            let mut curves = Vec::new();
            for path in &a.results {
                let value = ringkv_bench::app::read_json(path)?;
                curves.push(ringkv_bench::report::curve_from_json(&value, &a.op)?);
            }
            ringkv_bench::report::plot(&a.out, &a.title, &curves)
        }
        Some(Command::Storage(a)) => {
            if !(a.seconds > 0.0 && a.seconds <= 600.0) {
                bail!("--seconds must be in (0, 600]");
            }
            storage(Options {
                dir: a.dir,
                seconds: a.seconds,
                value_bytes: a.value_bytes,
                writers: a.writers,
                keys: a.keys,
                readers: a.readers,
                only: a.only,
            })
        }
        Some(Command::Load(a)) => {
            use ringkv_bench::load::{LoadOptions, Op, Target};
            ringkv_bench::load::main(LoadOptions {
                target: match a.target.as_str() {
                    "redis" => Target::Redis,
                    "memcached" => Target::Memcached,
                    _ => Target::Ringkv,
                },
                addr: a.addr,
                op: if a.op == "get" { Op::Get } else { Op::Put },
                connections: a.connections,
                pipeline: a.pipeline,
                seconds: a.seconds,
                value_bytes: a.value_bytes,
                keys: a.keys,
                preload: !a.no_preload,
                shard_aware: a.shard_aware,
            })
        }
    }
}

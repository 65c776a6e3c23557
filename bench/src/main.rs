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

use anyhow::{bail, Context as _};
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

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        dir: PathBuf::from("ringkv-bench-data"),
        seconds: 5.0,
        value_bytes: 100,
        writers: vec![1, 128],
        keys: 1_000_000,
        readers: 128,
        only: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => o.dir = PathBuf::from(value()?),
            "--seconds" => o.seconds = value()?.parse()?,
            "--value-bytes" => o.value_bytes = value()?.parse()?,
            "--writers" => {
                o.writers = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--keys" => o.keys = value()?.parse()?,
            "--readers" => o.readers = value()?.parse()?,
            "--only" => o.only = Some(value()?.clone()),
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    if !(o.seconds > 0.0 && o.seconds <= 600.0) {
        bail!("--seconds must be in (0, 600]");
    }
    Ok(o)
}

const USAGE: &str = "usage: ringkv-bench load ... (see ringkv-bench load --help)\n       ringkv-bench storage [--dir DIR] [--seconds S] [--value-bytes B] \
[--writers 1,128] [--keys N] [--readers R] [--only put|get|memory|compact]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("storage") => storage(parse(&args[1..])?),
        Some("load") => ringkv_bench::load::main(&args[1..]),
        _ => bail!("{USAGE}"),
    }
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

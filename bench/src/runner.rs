//! The load and run phases: one thread per connection, closed loop (C connections,
//! pipeline depth P) or open loop (a target rate; latency from the intended send time).

use crate::driver::{self, Connection, Outcome, Target};
use crate::latency_histogram;
use crate::workload::{key_of, OpGenerator, OpKind, Workload};
use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When the run phase stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    Duration(Duration),
    /// Total operations over all connections (bounded in time by `RUN_SECONDS_MAX`).
    Operations(u64),
}

/// A run never lasts longer than this, whatever its stop condition.
pub const RUN_SECONDS_MAX: u64 = 3600;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: Target,
    pub workload: Workload,
    pub records: u64,
    pub stop: Stop,
    pub connections: usize,
    pub pipeline: usize,
    /// Open loop: operations per second over all connections.
    pub rate: Option<f64>,
    pub value_bytes_min: usize,
    pub value_bytes_max: usize,
    pub seed: u64,
    /// The run fails once more than this many operations failed.
    pub errors_max: u64,
    pub progress: bool,
}

/// What a run measured; histograms in nanoseconds, indexed by [`OpKind::index`].
#[derive(Debug, Clone)]
pub struct RunResult {
    pub elapsed_s: f64,
    pub operations: u64,
    pub errors: u64,
    /// Reads that found nothing (a sign the load phase was skipped or differs).
    pub not_found: u64,
    pub histograms: Vec<Histogram<u64>>,
    pub first_error: Option<String>,
}

impl RunResult {
    pub fn throughput_ops_s(&self) -> f64 {
        self.operations as f64 / self.elapsed_s.max(1e-9)
    }

    /// Every operation's latency in one histogram.
    pub fn all(&self) -> Histogram<u64> {
        let mut h = latency_histogram();
        for x in &self.histograms {
            h.add(x).expect("same bounds");
        }
        h
    }
}

/// Open-loop schedule of one connection: operation `i` is meant to be sent at
/// `start + phase + i * interval`, whether or not earlier replies have come back; a
/// request's latency is measured from that intended time, so a stalled server is
/// charged for every request it kept waiting (coordinated omission corrected).
#[derive(Debug, Clone)]
pub struct OpenLoopSchedule {
    interval_ns: f64,
    phase_ns: f64,
    issued: u64,
}

impl OpenLoopSchedule {
    pub fn new(rate_per_s: f64, phase_ns: f64) -> Self {
        assert!(rate_per_s > 0.0, "a positive rate");
        OpenLoopSchedule {
            interval_ns: 1e9 / rate_per_s,
            phase_ns,
            issued: 0,
        }
    }

    /// Intended send time of operation `i`, in ns after the start.
    pub fn intended_ns(&self, i: u64) -> u64 {
        (self.phase_ns + i as f64 * self.interval_ns) as u64
    }

    /// Intended time of the next operation not yet taken.
    pub fn next_ns(&self) -> u64 {
        self.intended_ns(self.issued)
    }

    /// Takes up to `max` operations whose intended time is at or before `now_ns`;
    /// returns their intended times.
    pub fn take_due(&mut self, now_ns: u64, max: usize, out: &mut Vec<u64>) {
        out.clear();
        while out.len() < max && self.next_ns() <= now_ns {
            out.push(self.next_ns());
            self.issued += 1;
        }
    }

    pub fn issued(&self) -> u64 {
        self.issued
    }
}

/// The latency charged to a request: from its intended send time to its reply.
pub fn latency_ns(intended_ns: u64, done_ns: u64) -> u64 {
    done_ns.saturating_sub(intended_ns).max(1)
}

fn check_reachable(target: &Target) -> anyhow::Result<()> {
    driver::connect(target, 0).map(drop).with_context(|| {
        format!(
            "cannot reach the {} target at {}: is it running?",
            target.driver.name(),
            target.addr
        )
    })
}

/// Writes every record once (`records` puts, pipelined 64 deep over up to 8
/// connections); returns (seconds, puts/s).
pub fn load(config: &RunConfig) -> anyhow::Result<(f64, f64)> {
    check_reachable(&config.target)?;
    let connections = config.connections.clamp(1, 8) as u64;
    let target = driver::Target {
        shard_aware: false,
        ..config.target.clone()
    };
    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..connections)
        .map(|t| {
            let (target, config, done, stop) =
                (target.clone(), config.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut c = driver::connect(&target, t as usize)?;
                let mut gen = OpGenerator::new(
                    &config.workload,
                    Arc::new(AtomicU64::new(1)),
                    config.seed ^ 0x10AD ^ t,
                );
                let value = vec![b'v'; config.value_bytes_max];
                let (mut out, mut key) = (Vec::new(), Vec::new());
                let mut i = t;
                let deadline = Instant::now() + Duration::from_secs(RUN_SECONDS_MAX);
                while i < config.records && !stop.load(Ordering::Relaxed) {
                    if Instant::now() > deadline {
                        bail!("load phase took longer than {RUN_SECONDS_MAX} s");
                    }
                    out.clear();
                    let mut n = 0;
                    while n < 64 && i < config.records {
                        key_of(i, &mut key);
                        let len = gen.value_len(config.value_bytes_min, config.value_bytes_max);
                        c.encode_put(&key, &value[..len], b"", &mut out);
                        i += connections;
                        n += 1;
                    }
                    c.send(&out)?;
                    for _ in 0..n {
                        if let Outcome::Error(e) = c.read_reply(false)? {
                            bail!("load phase: the server refused a put: {e}");
                        }
                    }
                    done.fetch_add(n, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let progress = Progress::new(config.progress, "load", None, Some(config.records));
    join_all(threads, &stop, &done, &AtomicU64::new(0), progress)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok((seconds, config.records as f64 / seconds.max(1e-9)))
}

struct Counters {
    ops: AtomicU64,
    errors: AtomicU64,
    not_found: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

/// One connection's run phase.
fn connection_loop(
    c: usize,
    config: &RunConfig,
    mut conn: Box<dyn Connection>,
    records: Arc<AtomicU64>,
    counters: &Counters,
    stop: &AtomicBool,
    start: Instant,
) -> anyhow::Result<Vec<Histogram<u64>>> {
    let mut hist: Vec<Histogram<u64>> = OpKind::ALL.iter().map(|_| latency_histogram()).collect();
    let mut gen = OpGenerator::new(
        &config.workload,
        records,
        config.seed.wrapping_mul(1000).wrapping_add(c as u64),
    );
    let value = vec![b'x'; config.value_bytes_max];
    let mut schedule = config.rate.map(|rate| {
        let per_connection = rate / config.connections as f64;
        OpenLoopSchedule::new(per_connection, 1e9 / rate * c as f64)
    });
    let (quota, deadline) = match config.stop {
        Stop::Duration(d) => (u64::MAX, start + d),
        Stop::Operations(n) => {
            let k = config.connections as u64;
            let quota = n / k + u64::from((c as u64) < n % k);
            (quota, start + Duration::from_secs(RUN_SECONDS_MAX))
        }
    };
    let deadline_ns = deadline.duration_since(start).as_nanos() as u64;
    let mut done_ops = 0u64;
    let mut out = Vec::with_capacity(config.pipeline * (config.value_bytes_max + 64));
    let mut key = Vec::new();
    // (kind, record, intended ns, context of the read of a read-modify-write)
    let mut batch: Vec<(OpKind, u64, u64, Option<Vec<u8>>)> = Vec::with_capacity(config.pipeline);
    let mut due = Vec::with_capacity(config.pipeline);
    while done_ops < quota && !stop.load(Ordering::Relaxed) {
        let now_ns = start.elapsed().as_nanos() as u64;
        if now_ns >= deadline_ns {
            break;
        }
        let room = config
            .pipeline
            .min((quota - done_ops).min(usize::MAX as u64) as usize);
        due.clear();
        match schedule.as_mut() {
            None => due.resize(room, now_ns),
            Some(s) => {
                let next = s.next_ns();
                if next >= deadline_ns {
                    break;
                }
                if next > now_ns {
                    // sleep until the next intended send (at most 10 ms, then re-check)
                    std::thread::sleep(Duration::from_nanos((next - now_ns).min(10_000_000)));
                    continue;
                }
                s.take_due(now_ns, room, &mut due);
            }
        }
        batch.clear();
        out.clear();
        for &intended in &due {
            let (mut op, mut record) = gen.next_op();
            // shard-aware: redraw until the key belongs to this connection's shard
            for _ in 0..10_000 {
                key_of(record, &mut key);
                if conn.accepts(&key) {
                    break;
                }
                (op, record) = gen.next_op();
            }
            match op {
                OpKind::Read => conn.encode_get(&key, false, &mut out),
                OpKind::ReadModifyWrite => conn.encode_get(&key, true, &mut out),
                OpKind::Update | OpKind::Insert => {
                    let len = gen.value_len(config.value_bytes_min, config.value_bytes_max);
                    conn.encode_put(&key, &value[..len], b"", &mut out)
                }
            }
            batch.push((op, record, intended, None));
        }
        let send_ns = start.elapsed().as_nanos() as u64;
        conn.send(&out)?;
        let mut writes_after_reads = 0;
        for entry in batch.iter_mut() {
            let is_get = matches!(entry.0, OpKind::Read | OpKind::ReadModifyWrite);
            let outcome = conn.read_reply(is_get)?;
            let done_ns = start.elapsed().as_nanos() as u64;
            let intended = if schedule.is_some() { entry.2 } else { send_ns };
            match outcome {
                Outcome::Error(e) => {
                    count_error(counters, config, stop, e)?;
                    entry.0 = OpKind::Read; // not followed by a write
                    continue;
                }
                Outcome::NotFound => {
                    counters.not_found.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Found { context } if entry.0 == OpKind::ReadModifyWrite => {
                    entry.3 = Some(context);
                }
                _ => {}
            }
            entry.2 = intended;
            if entry.0 == OpKind::ReadModifyWrite {
                writes_after_reads += 1;
                entry.3.get_or_insert_with(Vec::new);
            } else {
                hist[entry.0.index()].record(latency_ns(intended, done_ns))?;
            }
        }
        if writes_after_reads > 0 {
            out.clear();
            for (op, record, _, context) in batch.iter() {
                if *op == OpKind::ReadModifyWrite {
                    key_of(*record, &mut key);
                    let len = gen.value_len(config.value_bytes_min, config.value_bytes_max);
                    let context = context.as_deref().unwrap_or(b"");
                    conn.encode_put(&key, &value[..len], context, &mut out);
                }
            }
            conn.send(&out)?;
            for (op, _, intended, _) in batch.iter() {
                if *op != OpKind::ReadModifyWrite {
                    continue;
                }
                let outcome = conn.read_reply(false)?;
                let done_ns = start.elapsed().as_nanos() as u64;
                if let Outcome::Error(e) = outcome {
                    count_error(counters, config, stop, e)?;
                    continue;
                }
                hist[OpKind::ReadModifyWrite.index()].record(latency_ns(*intended, done_ns))?;
            }
        }
        done_ops += batch.len() as u64;
        counters
            .ops
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    Ok(hist)
}

fn count_error(
    counters: &Counters,
    config: &RunConfig,
    stop: &AtomicBool,
    message: String,
) -> anyhow::Result<()> {
    let errors = counters.errors.fetch_add(1, Ordering::Relaxed) + 1;
    let mut first = counters.first_error.lock().expect("not poisoned");
    if first.is_none() {
        *first = Some(message.clone());
    }
    if errors > config.errors_max {
        stop.store(true, Ordering::Relaxed);
        bail!(
            "{errors} operations failed, more than --max-errors {} (first: {})",
            config.errors_max,
            first.as_deref().unwrap_or(&message)
        );
    }
    Ok(())
}

/// Runs the run phase (the load phase is [`load`]).
pub fn run(config: &RunConfig) -> anyhow::Result<RunResult> {
    if config.connections == 0 || config.pipeline == 0 {
        bail!("--connections and --pipeline must be at least 1");
    }
    check_reachable(&config.target)?;
    // connect everything before the clock starts
    let mut conns = Vec::with_capacity(config.connections);
    // a run that never writes an existing key has no use for the contexts reads return
    let writes = config.workload.update > 0.0 || config.workload.read_modify_write > 0.0;
    for c in 0..config.connections {
        let mut conn = driver::connect(&config.target, c)?;
        conn.remember_read_contexts(writes);
        conns.push(conn);
    }
    let records = Arc::new(AtomicU64::new(config.records.max(1)));
    let counters = Arc::new(Counters {
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        not_found: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, conn)| {
            let (config, records, counters, stop) = (
                config.clone(),
                records.clone(),
                counters.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let r = connection_loop(c, &config, conn, records, &counters, &stop, start);
                if r.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                r
            })
        })
        .collect();
    let (seconds, total) = match config.stop {
        Stop::Duration(d) => (Some(d.as_secs_f64()), None),
        Stop::Operations(n) => (None, Some(n)),
    };
    let progress = Progress::new(config.progress, "run", seconds, total);
    let hists = join_all(threads, &stop, &counters.ops, &counters.errors, progress)?;
    let elapsed_s = start.elapsed().as_secs_f64();
    let mut histograms: Vec<Histogram<u64>> =
        OpKind::ALL.iter().map(|_| latency_histogram()).collect();
    for per_connection in hists {
        for (sum, h) in histograms.iter_mut().zip(per_connection) {
            sum.add(&h)?;
        }
    }
    let first_error = counters.first_error.lock().expect("not poisoned").clone();
    Ok(RunResult {
        elapsed_s,
        operations: counters.ops.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        not_found: counters.not_found.load(Ordering::Relaxed),
        histograms,
        first_error,
    })
}

/// Waits for the threads, showing progress; the first error wins.
fn join_all<T>(
    threads: Vec<std::thread::JoinHandle<anyhow::Result<T>>>,
    stop: &AtomicBool,
    ops: &AtomicU64,
    errors: &AtomicU64,
    mut progress: Progress,
) -> anyhow::Result<Vec<T>> {
    let running = AtomicUsize::new(threads.len());
    // poll until every thread is done (each is bounded by its own deadline and its
    // socket timeouts), drawing the progress bar meanwhile
    let poll_deadline = Instant::now() + Duration::from_secs(RUN_SECONDS_MAX + 120);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < poll_deadline {
        progress.draw(ops.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_millis(100));
    }
    progress.finish();
    let mut results = Vec::with_capacity(threads.len());
    let mut failure = None;
    for t in threads {
        match t.join() {
            Ok(Ok(x)) => results.push(x),
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert(anyhow::anyhow!("a load thread panicked"));
            }
        }
        running.fetch_sub(1, Ordering::Relaxed);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(results),
    }
}

/// A one-line progress bar with live throughput on stderr (only on a terminal, or
/// when forced with `--progress`).
struct Progress {
    enabled: bool,
    label: &'static str,
    seconds: Option<f64>,
    total: Option<u64>,
    start: Instant,
    last: (Instant, u64),
    last_draw: Instant,
    rate: f64,
}

impl Progress {
    fn new(wanted: bool, label: &'static str, seconds: Option<f64>, total: Option<u64>) -> Self {
        let now = Instant::now();
        Progress {
            enabled: wanted,
            label,
            seconds,
            total,
            start: now,
            last: (now, 0),
            last_draw: now,
            rate: 0.0,
        }
    }

    fn draw(&mut self, ops: u64, errors: u64) {
        if !self.enabled || self.last_draw.elapsed() < Duration::from_millis(500) {
            return;
        }
        let now = Instant::now();
        let dt = now.duration_since(self.last.0).as_secs_f64();
        if dt > 0.0 {
            self.rate = (ops - self.last.1) as f64 / dt;
        }
        self.last = (now, ops);
        self.last_draw = now;
        let elapsed = self.start.elapsed().as_secs_f64();
        let fraction = match (self.seconds, self.total) {
            (Some(s), _) => elapsed / s,
            (None, Some(t)) => ops as f64 / t.max(1) as f64,
            _ => 0.0,
        }
        .clamp(0.0, 1.0);
        let filled = (fraction * 30.0) as usize;
        eprint!(
            "\r{:>4} [{}{}] {:5.1}% {:7.1} s {:>12} ops {:>11.0} ops/s  errors {errors}   ",
            self.label,
            "#".repeat(filled),
            ".".repeat(30 - filled),
            fraction * 100.0,
            elapsed,
            ops,
            self.rate,
        );
    }

    fn finish(&mut self) {
        if self.enabled && self.start.elapsed() >= Duration::from_millis(500) {
            eprintln!();
        }
    }
}

/// Whether to draw a progress bar by default.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_schedule_keeps_intended_times_through_a_stall() {
        // 1000 ops/s: one every ms. The first request is sent at 0 and the server
        // stalls for 500 ms; the requests meant for 1..=500 ms are then due at once,
        // and each is charged from its own intended time, not from when it went out.
        let mut s = OpenLoopSchedule::new(1000.0, 0.0);
        let mut due = Vec::new();
        s.take_due(0, 16, &mut due);
        assert_eq!(due, vec![0]);
        let reply_ns = 500_000_000;
        assert_eq!(latency_ns(due[0], reply_ns), 500_000_000);
        let mut charged = Vec::new();
        let mut now = reply_ns;
        for _ in 0..100 {
            s.take_due(now, 16, &mut due);
            if due.is_empty() {
                break;
            }
            now += 10_000; // each batch answered 10 us later
            charged.extend(due.iter().map(|&i| latency_ns(i, now)));
        }
        // every op intended in (0, 500 ms] went out in the catch-up, none skipped
        assert_eq!(s.issued(), 501);
        assert_eq!(charged.len(), 500);
        // the op meant for 1 ms waited almost the whole stall
        assert!(charged[0] > 499_000_000, "{}", charged[0]);
        // and the wait falls off linearly to the last one
        assert!(*charged.last().unwrap() < 1_000_000);
        // a closed loop would have charged only the 10 us service time
        let mean = charged.iter().sum::<u64>() / charged.len() as u64;
        assert!(mean > 240_000_000, "mean {mean}");
    }

    #[test]
    fn open_loop_schedule_does_not_run_ahead() {
        let mut s = OpenLoopSchedule::new(100.0, 5_000_000.0);
        let mut due = Vec::new();
        s.take_due(4_000_000, 8, &mut due);
        assert!(due.is_empty(), "nothing is due before the phase");
        s.take_due(5_000_000, 8, &mut due);
        assert_eq!(due, vec![5_000_000]);
        assert_eq!(s.next_ns(), 15_000_000);
        // a long gap: at most `max` at a time, in order
        s.take_due(1_000_000_000, 8, &mut due);
        assert_eq!(due.len(), 8);
        assert!(due.windows(2).all(|w| w[1] - w[0] == 10_000_000));
    }
}

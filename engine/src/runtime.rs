//! The runtime layer's small helpers: the one place that starts glommio executors.
//!
//! glommio locks memory for its io_uring rings; the default `RLIMIT_MEMLOCK` of many
//! machines (8 MiB) is too small for several executors, so the limit is raised first.

use std::future::Future;

/// Raises `RLIMIT_MEMLOCK` to at least `bytes` (as far as the hard limit allows, or
/// further when running as root). Returns the soft limit in force afterwards.
pub fn raise_memlock_limit(bytes: u64) -> u64 {
    raise_limit(libc::RLIMIT_MEMLOCK, bytes)
}

/// Raises `RLIMIT_NOFILE` (open files, so sockets) to at least `files`, as far as the
/// hard limit allows (further when running as root). Returns the soft limit after.
pub fn raise_nofile_limit(files: u64) -> u64 {
    raise_limit(libc::RLIMIT_NOFILE, files)
}

fn raise_limit(resource: libc::__rlimit_resource_t, wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(resource, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur >= wanted {
            return limit.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max.max(wanted),
        };
        if libc::setrlimit(resource, &raised) == 0 {
            return wanted;
        }
        let capped = libc::rlimit {
            rlim_cur: limit.rlim_max.min(wanted),
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(resource, &capped) == 0 {
            return capped.rlim_cur;
        }
        limit.rlim_cur
    }
}

/// The CPUs this process may run on, in order (its affinity mask: `taskset`, a
/// container's cpuset); every CPU the machine reports if the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into the
    // zeroed set we own; CPU_ISSET reads it.
    let allowed: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
                .collect()
        } else {
            Vec::new()
        }
    };
    if allowed.is_empty() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..cores).collect();
    }
    allowed
}

/// Runs `make()` to completion on a fresh glommio executor in its own thread.
pub fn run_local<T, Fut>(make: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T> + 'static,
{
    raise_memlock_limit(512 << 20);
    glommio::LocalExecutorBuilder::default()
        .name("ringkv-local")
        .spawn(make)
        .expect("start a glommio executor (is RLIMIT_MEMLOCK large enough?)")
        .join()
        .expect("glommio executor thread")
}

use crate::partition::{Durability, Partition, StoreError};
use crate::storage::Storage;
use glommio::{Latency, Shares, TaskQueueHandle};
use std::rc::Rc;
use std::time::Duration;

/// Shares of the background task queue; the default foreground queue has 1000, so
/// background work (compaction) gets about 1 part in 11 of a busy core and all of an
/// idle one.
pub const BACKGROUND_SHARES: usize = 100;

/// Creates the shard's low-priority task queue for background work.
pub fn background_queue() -> TaskQueueHandle {
    glommio::executor().create_task_queue(
        Shares::Static(BACKGROUND_SHARES),
        Latency::NotImportant,
        "ringkv-background",
    )
}

/// Writes pending hint files of newly sealed segments and compacts `partition` in the
/// low-priority `queue` whenever at least `min_dead_ratio` of its sealed bytes are dead,
/// checking every `check_every`; stops when the partition is closed or failed (that
/// error is returned), or after `rounds_max` checks. A round that fails without failing
/// the partition (a compaction out of space, a damaged sealed segment) is logged and
/// tried again next time. `compacted` is told how long each compaction that succeeded
/// took.
pub fn spawn_compactor<S: Storage + 'static>(
    partition: Rc<Partition<S>>,
    queue: TaskQueueHandle,
    min_dead_ratio: f64,
    check_every: Duration,
    rounds_max: u64,
    now_ms: impl Fn() -> u64 + 'static,
    compacted: impl Fn(Duration) + 'static,
) -> glommio::Task<Result<u64, StoreError>> {
    let schedule = CompactionSchedule {
        min_dead_ratio,
        check_every,
        rounds_max,
    };
    spawn_compactor_keeping(partition, queue, schedule, now_ms, compacted, |_| false)
}

/// When [`spawn_compactor_keeping`] compacts: once at least `min_dead_ratio` of the
/// sealed bytes are dead, looking every `check_every`, for at most `rounds_max` looks.
#[derive(Clone, Copy, Debug)]
pub struct CompactionSchedule {
    pub min_dead_ratio: f64,
    pub check_every: Duration,
    pub rounds_max: u64,
}

/// [`spawn_compactor`] whose compactions keep the expired tombstones of the keys `keep`
/// names ([`Partition::compact_keeping`]).
pub fn spawn_compactor_keeping<S: Storage + 'static>(
    partition: Rc<Partition<S>>,
    queue: TaskQueueHandle,
    schedule: CompactionSchedule,
    now_ms: impl Fn() -> u64 + 'static,
    compacted: impl Fn(Duration) + 'static,
    keep: impl Fn(&[u8]) -> bool + 'static,
) -> glommio::Task<Result<u64, StoreError>> {
    let CompactionSchedule {
        min_dead_ratio,
        check_every,
        rounds_max,
    } = schedule;
    glommio::spawn_local_into(
        async move {
            let mut compactions = 0;
            let mut failed_rounds = 0u32;
            for _ in 0..rounds_max {
                if partition.failure().is_some() || partition.is_closed() {
                    break;
                }
                // the partition may close while a round runs: that ends the loop
                let round = async {
                    partition.write_pending_hints().await?;
                    if partition.compaction_due_keeping(min_dead_ratio, &keep) {
                        let started = std::time::Instant::now();
                        partition.compact_keeping(now_ms(), &keep).await?;
                        compactions += 1;
                        compacted(started.elapsed());
                    }
                    Ok::<(), StoreError>(())
                };
                let mut wait = check_every;
                match round.await {
                    Ok(()) => failed_rounds = 0,
                    Err(StoreError::Closed) => break,
                    Err(e) if partition.failure().is_some() => return Err(e),
                    Err(e) => {
                        // a compaction reads every sealed segment: one that keeps
                        // failing is retried less and less often (up to 1,024 checks)
                        failed_rounds += 1;
                        wait = check_every * (1u32 << failed_rounds.min(10));
                        tracing::warn!(error = %e, retry_in = ?wait, "background compaction round failed");
                    }
                }
                glommio::timer::sleep(wait).await;
            }
            Ok(compactions)
        },
        queue,
    )
    .expect("spawn into the background queue")
}

/// For `Durability::Interval { ms }`: syncs `partition` every `ms` until it is closed
/// or failed (or after `rounds_max` rounds). Returns the number of syncs that ran.
pub fn spawn_interval_syncer<S: Storage + 'static>(
    partition: Rc<Partition<S>>,
    rounds_max: u64,
) -> glommio::Task<Result<u64, StoreError>> {
    let ms = match partition.config().durability {
        Durability::Interval { ms } => ms.max(1),
        _ => 1000,
    };
    glommio::spawn_local(async move {
        let mut syncs = 0;
        for _ in 0..rounds_max {
            glommio::timer::sleep(Duration::from_millis(ms)).await;
            if partition.failure().is_some() || partition.is_closed() {
                break;
            }
            partition.sync().await?;
            syncs += 1;
        }
        Ok(syncs)
    })
}

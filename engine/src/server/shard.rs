//! A shard: the partitions it owns, request execution, and the mesh link to the other
//! shards. Requests for a partition another shard owns are forwarded whole over the
//! glommio channel mesh; the owner executes them and sends the reply frame back.

#[path = "cluster.rs"]
mod cluster;

use super::{conn, ServerConfig, ShardExit, Shutdown};
use crate::commit_log::{CommitLog, LogRecovery};
use crate::notify::Notify;
use crate::partition::{Partition, PartitionConfig, ReplayOutcome, StoreError};
use crate::record;
use crate::runtime;
use crate::storage::dma::DmaStorage;
use crate::version::{context_of, context_of_one, Context, VClock, Version, VersionDecodeError};
use crate::versioned::PutOutcome;
pub use cluster::NodeCounters;
pub(crate) use cluster::{load_membership, persist_membership};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use ringkv_net::protocol::{self, encode, ErrorCode, HelloOk, Request};
use ringkv_net::stats::NodeStats;
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// What travels between shards.
#[derive(Debug)]
pub(crate) enum ShardMsg {
    /// Whole request frames, back to back, for partitions the receiver owns: what one
    /// pass over a connection's buffer found for it, or one forwarded request.
    Requests {
        from: usize,
        token: u64,
        frames: Vec<u8>,
    },
    /// Reply frames, back to back, to some of a [`ShardMsg::Requests`] batch (the
    /// owner sends what it answered at once, then the rest as they finish), and the
    /// batch's buffer when the replies are not in it (dropped by the receiver, whose
    /// thread allocated it).
    Replies {
        token: u64,
        frames: Vec<u8>,
        returned: Vec<u8>,
    },
    /// Shard 0 changed the membership (encoded; its `seq`-th change); every other shard
    /// installs it.
    Membership { seq: u64, bytes: Vec<u8> },
}

/// Counters a shard keeps (merged by the caller across shards).
#[derive(Debug, Clone, Default)]
pub struct ShardStats {
    pub requests: u64,
    pub forwarded: u64,
    pub errors: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
}

pub(crate) struct Shard {
    pub id: usize,
    pub config: ServerConfig,
    partitions: HashMap<u32, Rc<Partition<DmaStorage>>>,
    senders: Option<Senders<ShardMsg>>,
    pending: RefCell<HashMap<u64, Rc<Slot>>>,
    next_token: Cell<u64>,
    pub stats: RefCell<ShardStats>,
    pub connections: Cell<usize>,
    /// Requests being executed on this shard (local or forwarded in).
    pub in_flight: Cell<usize>,
    pub in_flight_done: Notify,
    pub stopping: Cell<bool>,
    pub stop: Notify,
    cluster: cluster::ClusterState,
    counters: std::sync::Arc<NodeCounters>,
    /// `sync` mode: the log every partition of this shard commits through.
    commit_log: Option<Rc<CommitLog<DmaStorage>>>,
    /// Where a reply's context is encoded before it is copied into the reply (reused:
    /// no allocation per reply).
    context_scratch: RefCell<Vec<u8>>,
    /// How long the requests this shard read took, by operation (STATS).
    pub latencies: RefCell<super::stats::Latencies>,
    /// Its connections' idle and slow-client deadlines.
    pub sweeper: Rc<super::deadline::Sweeper>,
    /// The memory its connections may hold past their fixed buffers.
    pub conn_budget: Rc<super::conn::ConnBudget>,
}

/// Where the replies to a forwarded batch land, as they arrive.
#[derive(Default)]
struct Slot {
    replies: RefCell<Vec<u8>>,
    arrived: Notify,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds on a clock that never steps (since the process's first call, from 1):
/// for deadlines, the failure detector and gossip rounds. The wall clock (`now_ms`) is
/// for times stored with data; a step back of it would hold a probe "in flight" and a
/// peer down for as long as the step, and a step forward expire every request at once.
pub(crate) fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

pub(crate) async fn shard_main(
    shard_id: usize,
    config: ServerConfig,
    shutdown: Shutdown,
    mesh: MeshBuilder<ShardMsg, Full>,
    membership: Option<Vec<u8>>,
    counters: std::sync::Arc<NodeCounters>,
    ready: std::sync::mpsc::Sender<Result<(), super::StartError>>,
) -> Result<ShardExit, String> {
    match start(
        shard_id,
        config,
        shutdown,
        mesh,
        membership,
        counters.clone(),
    )
    .await
    {
        Ok((shard, tasks)) => {
            let _ = ready.send(Ok(()));
            Ok(serve_until_shutdown(shard, tasks).await)
        }
        Err(e) => {
            // the shards that started do not wait for this one at their shutdown
            counters.shard_failed(shard_id);
            let _ = ready.send(Err(super::StartError::Shard(e.clone())));
            Err(e)
        }
    }
}

type Started = (Rc<Shard>, Vec<glommio::Task<()>>);

/// Shard 0 of a node that is in no cluster yet: asks each seed in turn until one admits
/// it (a refusal is logged and retried: the operator may fix the cause).
async fn join_through_seeds(shard: Rc<Shard>) {
    let mut attempt = 0u32;
    loop {
        for seed in shard.config.seeds.clone() {
            match shard.join_via(&seed).await {
                Ok(membership) => {
                    tracing::info!(seed, members = membership.len(), "joined the cluster");
                    return;
                }
                Err(e) => {
                    if attempt % 10 == 0 {
                        tracing::warn!(seed, error = %e, "join through seed failed; retrying");
                    }
                }
            }
        }
        attempt += 1;
        glommio::timer::sleep(Duration::from_millis(500)).await;
    }
}

async fn start(
    shard_id: usize,
    config: ServerConfig,
    shutdown: Shutdown,
    mesh: MeshBuilder<ShardMsg, Full>,
    membership: Option<Vec<u8>>,
    counters: std::sync::Arc<NodeCounters>,
) -> Result<Started, String> {
    // This shard's own port is bound before the mesh join, which every shard must reach
    // before any gets past it, and the shared client port only at the end: so once the
    // client port answers (a HELLO_OK names the shard ports), every shard's own port
    // takes connections (queued until that shard serves them). A failed bind is
    // reported after the join, as before, so the other shards are not left waiting.
    let own_listener = (config.shard_port_base != 0).then(|| {
        let mut own = config.listen;
        own.set_port(config.shard_port_base + shard_id as u16);
        listen_reusing(own).map_err(|e| format!("shard {shard_id}: cannot listen on {own}: {e}"))
    });
    let (senders, receivers) = if config.shards > 1 {
        let (s, r) = mesh
            .join()
            .await
            .map_err(|e| format!("cannot join the shard mesh: {e}"))?;
        (Some(s), Some(r))
    } else {
        (None, None)
    };
    let mut partitions = HashMap::new();
    let sync_group = Rc::new(crate::sync_group::SyncGroup::new());
    // the commit log is read before the partitions open and replayed after; in other
    // durability modes a log left by an earlier `sync` run is still replayed
    let log_path = config
        .data_dir
        .join("commitlog")
        .join(format!("shard-{shard_id:03}"));
    let use_log = config.durability == crate::Durability::Sync;
    let log = if use_log || log_path.exists() {
        let storage = DmaStorage::open(&log_path)
            .await
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let (log, recovery) = CommitLog::open(storage, config.commit_log_bytes_max)
            .await
            .map_err(|e| format!("commit log {}: {e}", log_path.display()))?;
        Some((Rc::new(log), recovery))
    } else {
        None
    };
    // a log left by an earlier `sync` run holds what that run acknowledged
    let replays = log.as_ref().is_some_and(|(_, recovery)| recovery.files > 0);
    for p in (0..config.partitions).filter(|p| *p as usize % config.shards == shard_id) {
        let path = config.data_dir.join("partitions").join(format!("{p:05}"));
        let storage = DmaStorage::open(&path)
            .await
            .map_err(|e| format!("partition {p}: cannot open {}: {e}", path.display()))?;
        let pconfig = PartitionConfig {
            partition: p as u64,
            durability: config.durability,
            segment_bytes_max: config.segment_bytes_max,
            tombstone_grace_ms: config.tombstone_grace.as_millis() as u64,
            key_bytes_max: config.key_bytes_max,
            value_bytes_max: config.value_bytes_max,
            cache_bytes_max: config.cache_bytes_max / config.partitions as usize,
            siblings_max: config.siblings_max,
            commit_log: log.is_some(),
            ..PartitionConfig::default()
        };
        let (partition, report) = Partition::open(storage, pconfig, now_ms())
            .await
            .map_err(|e| format!("partition {p}: recovery failed: {e}"))?;
        if !report.corruption.is_empty() || (report.truncated_tail_bytes > 0 && !replays) {
            tracing::warn!(partition = p, ?report, "partition recovered with losses");
        } else if report.truncated_tail_bytes > 0 {
            // bytes written but never synced (a crash, or a write that failed): what was
            // acknowledged of them is in the commit log, replayed below
            tracing::info!(
                partition = p,
                truncated_tail_bytes = report.truncated_tail_bytes,
                "partition cut an unsynced tail; the commit log puts back its acknowledged writes"
            );
        } else {
            tracing::debug!(partition = p, keys = report.keys, "partition opened");
        }
        partition.set_sync_group(sync_group.clone());
        partitions.insert(p, Rc::new(partition));
    }
    // this shard's hint store: a partition of its own (delivered hints are tombstones
    // that compaction drops at once)
    let hints_path = config
        .data_dir
        .join("hints")
        .join(format!("shard-{shard_id:03}"));
    let hints_storage = DmaStorage::open(&hints_path)
        .await
        .map_err(|e| format!("cannot open {}: {e}", hints_path.display()))?;
    let hints_config = PartitionConfig {
        partition: u64::from(u32::MAX) + shard_id as u64,
        durability: config.durability,
        segment_bytes_max: config.segment_bytes_max,
        tombstone_grace_ms: 0,
        key_bytes_max: config.key_bytes_max + 16,
        value_bytes_max: 16,
        cache_bytes_max: 1 << 20,
        commit_log: log.is_some(),
        ..PartitionConfig::default()
    };
    let (hints, _) = Partition::open(hints_storage, hints_config.clone(), now_ms())
        .await
        .map_err(|e| format!("hint store of shard {shard_id}: recovery failed: {e}"))?;
    hints.set_sync_group(sync_group.clone());
    let hints = Rc::new(hints);
    let log = match log {
        Some((log, recovery)) => {
            replay_commit_log(shard_id, &log, recovery, &partitions, &hints).await?;
            Some(log)
        }
        None => None,
    };
    // after replay (which appends at the segments' ends), before the log takes writes
    adopt_orphan_hint_stores(&config, shard_id, &hints, &hints_config).await?;
    let log = match log {
        Some(log) => {
            if use_log {
                for p in partitions.values().chain(std::iter::once(&hints)) {
                    p.set_commit_log(log.clone());
                }
                Some(log)
            } else {
                log.remove_all()
                    .await
                    .map_err(|e| format!("commit log {}: {e}", log_path.display()))?;
                drop(log);
                let _ = std::fs::remove_dir(&log_path);
                None
            }
        }
        None => None,
    };
    let shard = Rc::new(Shard {
        id: shard_id,
        config: config.clone(),
        partitions,
        senders,
        pending: RefCell::default(),
        next_token: Cell::new(1),
        stats: RefCell::default(),
        connections: Cell::new(0),
        in_flight: Cell::new(0),
        in_flight_done: Notify::default(),
        stopping: Cell::new(false),
        stop: Notify::default(),
        cluster: cluster::ClusterState::new(ringkv_ring::NodeId(config.node_id), hints.clone()),
        counters,
        commit_log: log,
        context_scratch: RefCell::new(Vec::with_capacity(crate::version::CONTEXT_BYTES_MAX)),
        latencies: RefCell::default(),
        sweeper: Rc::new(super::deadline::Sweeper::new(&[
            config.idle_timeout,
            config.slow_client_timeout,
        ])),
        conn_budget: Rc::new(super::conn::ConnBudget::new(
            config.connection_bytes_per_shard_max,
        )),
    });
    let mut tasks = vec![glommio::spawn_local(shard.sweeper.clone().run())];
    if let Some(bytes) = &membership {
        let membership =
            ringkv_ring::Membership::decode(bytes).map_err(|e| format!("bad membership: {e}"))?;
        if shard_id == 0 {
            shard.start_gossip(membership);
        } else {
            shard.set_view(membership);
        }
    } else if shard_id == 0 {
        // not in a cluster yet: ask the seeds until one admits this node
        let joiner = shard.clone();
        tasks.push(glommio::spawn_local(async move {
            join_through_seeds(joiner).await;
        }));
    }
    tasks.extend(shard.spawn_cluster_tasks());
    if let Some(log) = shard.commit_log.clone() {
        let checkpointer = shard.clone();
        let spare_log = log.clone();
        tasks.push(glommio::spawn_local(async move {
            checkpoint_loop(checkpointer, log).await;
        }));
        tasks.push(glommio::spawn_local(spare_loop(shard_id, spare_log)));
    }
    // background work: compaction (low priority) and interval syncs
    let background = runtime::background_queue();
    let schedule = runtime::CompactionSchedule {
        min_dead_ratio: config.compaction_dead_ratio,
        check_every: Duration::from_secs(1),
        rounds_max: u64::MAX,
    };
    let data = shard.partitions.iter().map(|(&id, p)| (Some(id), p));
    for (id, p) in data.chain(std::iter::once((None, &hints))) {
        // a data partition keeps the deletes its pending hints still have to deliver
        let keeper = shard.clone();
        let keep = move |key: &[u8]| id.is_some_and(|id| keeper.cluster.hint_pending_for(id, key));
        let compactor = runtime::spawn_compactor_keeping(
            p.clone(),
            background,
            schedule,
            now_ms,
            {
                let shard = shard.clone();
                move |took| shard.latencies.borrow_mut().record_compaction(took)
            },
            keep,
        );
        tasks.push(glommio::spawn_local(async move {
            if let Err(e) = compactor.await {
                tracing::error!(error = %e, "compaction stopped");
            }
        }));
        if matches!(config.durability, crate::Durability::Interval { .. }) {
            let syncer = runtime::spawn_interval_syncer(p.clone(), u64::MAX);
            tasks.push(glommio::spawn_local(async move {
                let _ = syncer.await;
            }));
        }
    }
    if let Some(mut receivers) = receivers {
        for (_, rx) in receivers.streams() {
            let shard = shard.clone();
            tasks.push(glommio::spawn_local(async move {
                while let Some(msg) = rx.recv().await {
                    shard.clone().on_mesh_message(msg);
                }
            }));
        }
    }
    // listeners: this shard's own port (bound at the start), then the shared client port
    let mut listeners = Vec::new();
    if let Some(own) = own_listener {
        listeners.push(own?);
    }
    let addr = config.listen;
    listeners.push(
        listen_reusing(addr)
            .map_err(|e| format!("shard {shard_id}: cannot listen on {addr}: {e}"))?,
    );
    for listener in listeners {
        let shard = shard.clone();
        tasks.push(glommio::spawn_local(accept_loop(listener, shard)));
    }
    if let (0, Some(addr)) = (shard_id, config.metrics_listen) {
        let listener = glommio::net::TcpListener::bind(addr)
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        tasks.push(glommio::spawn_local(super::metrics::serve(
            listener,
            shard.clone(),
        )));
    }
    let watcher_shard = shard.clone();
    tasks.push(glommio::spawn_local(async move {
        while !shutdown.is_triggered() {
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        watcher_shard.stopping.set(true);
        watcher_shard.stop.notify_all();
    }));
    Ok((shard, tasks))
}

/// A listener with SO_REUSEPORT (every shard accepts on the client port) and
/// SO_REUSEADDR (a restarted node binds its port again while connections of the
/// previous process are still in TIME_WAIT).
fn listen_reusing(addr: std::net::SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    let listener = bind_reusing(addr)?;
    // SAFETY: the descriptor comes from a listener we own and give up here.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) })
}

/// A listening socket with SO_REUSEADDR and SO_REUSEPORT set before the bind, so it
/// shares the port with the other shards and with sockets a killed predecessor left
/// behind (TIME_WAIT, or FIN_WAIT2 towards clients still connected).
pub(crate) fn bind_reusing(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = bound_reusing(addr)?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A socket bound as [`bind_reusing`] binds it, not listening: it shows whether the
/// address can be bound (and which port 0 picks) without taking connections, which
/// would be reset when it closes.
pub(crate) fn bound_reusing(addr: std::net::SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    // socket2 sets close-on-exec itself
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

async fn accept_loop(listener: glommio::net::TcpListener, shard: Rc<Shard>) {
    accept_until_stopped(&listener, &shard, "accept failed", |stream| {
        if shard.connections.get() >= shard.config.connections_per_shard_max {
            shard.stats.borrow_mut().connections_refused += 1;
            glommio::spawn_local(conn::refuse(stream)).detach();
            return;
        }
        shard.stats.borrow_mut().connections_accepted += 1;
        shard.connections.set(shard.connections.get() + 1);
        let s = shard.clone();
        glommio::spawn_local(async move {
            conn::serve(stream, s.clone()).await;
            s.connections.set(s.connections.get() - 1);
        })
        .detach();
    })
    .await
}

/// Accepts on `listener` until `shard` stops, handing each connection to `take`. A
/// failed accept (out of file descriptors and the like) is logged as `what` and backed
/// off, from 1 ms up to 1 s; serving goes on.
pub(crate) async fn accept_until_stopped(
    listener: &glommio::net::TcpListener,
    shard: &Shard,
    what: &str,
    mut take: impl FnMut(glommio::net::TcpStream),
) {
    let mut backoff_ms = 1u64;
    loop {
        if shard.stopping.get() {
            return;
        }
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.stop.wait().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                backoff_ms = 1;
                take(stream);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "{what}");
                glommio::timer::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(1000);
            }
        }
    }
}

/// Takes over the hint stores of shards this start does not have (the node got fewer
/// `--shards`; their commit logs were empty, or the node refused to start): shard `s`
/// records the pending hints of shards `s + shards`, `s + 2 * shards`, ... in its own
/// store, makes them durable, then removes the old store. Returns how many hints moved.
async fn adopt_orphan_hint_stores(
    config: &ServerConfig,
    shard_id: usize,
    hints: &Partition<DmaStorage>,
    hints_config: &PartitionConfig,
) -> Result<usize, String> {
    let mut moved = 0;
    let orphans = super::orphan_shard_folders(&config.data_dir.join("hints"), config.shards);
    for (old, path) in orphans {
        if old % config.shards != shard_id {
            continue;
        }
        let what = |e: &dyn std::fmt::Display| format!("hint store {}: {e}", path.display());
        let storage = DmaStorage::open(&path).await.map_err(|e| what(&e))?;
        let old_config = PartitionConfig {
            partition: u64::from(u32::MAX) + old as u64,
            commit_log: false,
            ..hints_config.clone()
        };
        let (store, _) = Partition::open(storage, old_config, now_ms())
            .await
            .map_err(|e| what(&e))?;
        let pending = crate::cluster::replica::pending_hints(&store, usize::MAX, |_| true);
        for hint in &pending {
            crate::cluster::replica::record_hint(
                hints,
                hint.target,
                hint.partition,
                &hint.key,
                now_ms(),
            )
            .await
            .map_err(|e| what(&e))?;
        }
        hints.sync().await.map_err(|e| what(&e))?;
        store.destroy().await.map_err(|e| what(&e))?;
        let _ = std::fs::remove_dir(&path);
        tracing::info!(
            shard = shard_id,
            from_shard = old,
            hints = pending.len(),
            "took over the hint store of a shard this start does not have"
        );
        moved += pending.len();
    }
    Ok(moved)
}

/// Puts back, at startup, the writes the commit log holds and the segments may have
/// lost, then retires the log's old files.
async fn replay_commit_log(
    shard_id: usize,
    log: &CommitLog<DmaStorage>,
    recovery: LogRecovery,
    partitions: &HashMap<u32, Rc<Partition<DmaStorage>>>,
    hints: &Rc<Partition<DmaStorage>>,
) -> Result<(), String> {
    let hints_id = hints.config().partition;
    if recovery.corrupt_bytes > 0 {
        // which partitions the damaged entries belonged to is unknown: all of them
        tracing::error!(
            shard = shard_id,
            corrupt_bytes = recovery.corrupt_bytes,
            corrupt_regions = recovery.corrupt_regions,
            "commit log has invalid bytes before valid entries (damaged synced entries, \
             or a last write that a power loss tore out of order): writes in them are \
             lost unless their segments hold them; every partition of this shard is \
             marked for repair"
        );
        for p in partitions.values().chain(std::iter::once(hints)) {
            p.mark_needs_repair();
        }
    }
    let (mut applied, mut present, mut gone, mut mismatched) = (0usize, 0usize, 0usize, 0usize);
    for e in &recovery.entries {
        let partition = if e.log_id == hints_id {
            hints
        } else {
            match u32::try_from(e.log_id)
                .ok()
                .and_then(|id| partitions.get(&id))
            {
                Some(p) => p,
                None => {
                    return Err(format!(
                        "the commit log of shard {shard_id} holds writes for partition {}, \
                         which this shard does not own: start the node once with the \
                         --shards it last ran with, so that they are replayed",
                        e.log_id
                    ))
                }
            }
        };
        match partition.replay(e.segment, e.offset, &e.bytes) {
            ReplayOutcome::Applied { records } => applied += records,
            ReplayOutcome::Present => present += 1,
            ReplayOutcome::SegmentGone => gone += 1,
            ReplayOutcome::Mismatch { segment_len } => {
                mismatched += 1;
                tracing::error!(
                    partition = e.log_id,
                    segment = e.segment,
                    offset = e.offset,
                    segment_len,
                    "commit log entry does not fit its segment: partition needs repair"
                );
            }
        }
    }
    for p in partitions.values().chain(std::iter::once(hints)) {
        p.finish_replay()
            .await
            .map_err(|e| format!("partition {}: replay: {e}", p.config().partition))?;
    }
    // what was read back is on the device but maybe only in its cache: one file-system
    // sync, then the old files go
    log.checkpoint(|| log.sync_filesystem())
        .await
        .map_err(|e| format!("commit log of shard {shard_id}: checkpoint: {e}"))?;
    if recovery.files > 0 {
        tracing::info!(
            shard = shard_id,
            files = recovery.files,
            records_replayed = applied,
            entries_present = present,
            entries_of_removed_segments = gone,
            entries_mismatched = mismatched,
            torn_bytes = recovery.torn_bytes,
            corrupt_bytes = recovery.corrupt_bytes,
            "commit log replayed"
        );
    }
    Ok(())
}

/// Retires full commit log files (sync every partition of the shard, then remove
/// them) and writes segment buffers that have filled to the device (off the writers'
/// path).
async fn checkpoint_loop(shard: Rc<Shard>, log: Rc<CommitLog<DmaStorage>>) {
    let mut failed_note = Throttle::default();
    let mut checkpoint_note = Throttle::default();
    loop {
        glommio::timer::sleep(Duration::from_millis(20)).await;
        let mut failed = 0usize;
        for p in shard.partitions_and_hints() {
            if p.failure().is_some() {
                failed += 1;
                continue;
            }
            if let Err(e) = p.flush_if_buffered().await {
                tracing::error!(partition = p.config().partition, error = %e, "segment flush failed");
            }
        }
        if !log.checkpoint_due() {
            continue;
        }
        if failed > 0 {
            // its syncs cannot succeed (and would sync the healthy partitions every
            // time): the log keeps its files, with every acknowledged entry, until the
            // node restarts and replays them
            if let Some(suppressed) = failed_note.due() {
                tracing::error!(
                    shard = shard.id,
                    partitions_failed = failed,
                    suppressed,
                    "commit log checkpoint waits for a restart: a failed partition cannot \
                     sync, so the log keeps its files"
                );
            }
            continue;
        }
        if let Err(e) = log.checkpoint(|| shard.sync_all_partitions()).await {
            if let Some(suppressed) = checkpoint_note.due() {
                tracing::error!(shard = shard.id, error = %e, suppressed, "commit log checkpoint failed");
            }
        }
    }
}

/// Lets a message repeated by a loop through once a minute; counts the others.
#[derive(Default)]
struct Throttle {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(60);

    /// `Some(messages suppressed since the last one)` when this one should be logged.
    fn due(&mut self) -> Option<u64> {
        if self.last.is_some_and(|at| at.elapsed() < Self::EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Makes the commit log's next file ahead of time, in a task of its own so that a long
/// checkpoint never leaves a rotation to zero-fill a file while writers wait. After a
/// failure (a full disk, say) it tries again less and less often, up to every
/// [`SPARE_RETRY_MAX`], and logs the failure once a minute, not on every try. It stops
/// once the log has failed (nothing writes to it again).
async fn spare_loop(shard_id: usize, log: Rc<CommitLog<DmaStorage>>) {
    const TICK: Duration = Duration::from_millis(20);
    let mut pause = TICK;
    let mut failing_since: Option<(std::time::Instant, u32)> = None;
    let mut note = Throttle::default();
    loop {
        glommio::timer::sleep(pause).await;
        if log.failure().is_some() {
            return;
        }
        match log.prepare_spare().await {
            // none due, one ready, or a rotation making it: nothing learnt
            Ok(false) => {}
            Ok(true) => {
                if let Some((since, tries)) = failing_since.take() {
                    tracing::info!(
                        shard = shard_id,
                        failed_tries = tries,
                        failing_for_ms = since.elapsed().as_millis() as u64,
                        "the next commit log file could be made again"
                    );
                }
                pause = TICK;
                note = Throttle::default();
            }
            Err(e) => {
                let (since, tries) = failing_since.get_or_insert((std::time::Instant::now(), 0));
                *tries += 1;
                if note.due().is_some() {
                    tracing::warn!(
                        shard = shard_id,
                        error = %e,
                        failed_tries = *tries,
                        failing_for_ms = since.elapsed().as_millis() as u64,
                        "cannot make the next commit log file: if it still cannot be made \
                         when the current one is full, the log fails and writes fail until \
                         the node restarts"
                    );
                }
                pause = (pause * 2).min(SPARE_RETRY_MAX);
            }
        }
    }
}

/// The longest pause between tries to make the commit log's next file after a failure.
const SPARE_RETRY_MAX: Duration = Duration::from_secs(2);

impl Shard {
    /// The shard's partitions, then its hint store (a partition of its own).
    fn partitions_and_hints(&self) -> impl Iterator<Item = &Rc<Partition<DmaStorage>>> {
        self.partitions
            .values()
            .chain(std::iter::once(self.cluster.hints.partition()))
    }

    /// Syncs every partition of the shard and its hint store, one after another, each
    /// with its own `fdatasync`s (see [`Partition::sync_own`]).
    async fn sync_all_partitions(&self) -> std::io::Result<()> {
        for p in self.partitions_and_hints() {
            p.sync_own()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(())
    }
}

async fn serve_until_shutdown(shard: Rc<Shard>, tasks: Vec<glommio::Task<()>>) -> ShardExit {
    while !shard.stopping.get() {
        shard.stop.wait().await;
    }
    // listeners stop; connections stop reading, let their requests answer and close;
    // requests already running finish (all bounded by the drain timeout)
    let deadline = std::time::Instant::now() + shard.config.drain_timeout;
    let wait_a_little = || async {
        let _ = glommio::timer::timeout(Duration::from_millis(5), async {
            shard.in_flight_done.wait().await;
            Ok(())
        })
        .await;
    };
    while (shard.in_flight.get() > 0 || shard.connections.get() > 0)
        && std::time::Instant::now() < deadline
    {
        wait_a_little().await;
    }
    // requests the other shards read before their own stop (each shard sees the
    // signal on its own) and forwarded here still run: the mesh stays served, and the
    // partitions open, until every shard has drained its own
    shard.counters.shard_drained(shard.id);
    while (!shard.counters.all_shards_drained() || shard.in_flight.get() > 0)
        && std::time::Instant::now() < deadline
    {
        wait_a_little().await;
    }
    // background work stops before the partitions close
    drop(tasks);
    let mut all_closed = true;
    for (p, partition) in &shard.partitions {
        if let Err(e) = partition.close().await {
            tracing::error!(partition = p, error = %e, "close failed");
            all_closed = false;
        }
    }
    if let Err(e) = shard.cluster.hints.partition().close().await {
        tracing::error!(error = %e, "closing the hint store failed");
        all_closed = false;
    }
    let mut clean = all_closed;
    if let Some(log) = &shard.commit_log {
        // every segment is synced: nothing is left to replay (if a close failed, the
        // log stays and the next start replays it)
        if all_closed {
            if let Err(e) = log.remove_all().await {
                tracing::error!(error = %e, "removing the commit log failed");
                clean = false;
            }
        }
    }
    ShardExit {
        shard: shard.id,
        stats: shard.stats.borrow().clone(),
        clean,
    }
}

impl Shard {
    /// The shard that runs a request: the owner of its key's or its partition, shard 0
    /// for membership messages, `None` for anything any shard answers.
    fn route(&self, frame: &[u8]) -> Option<usize> {
        let opcode = protocol::header(frame).opcode;
        if ringkv_net::peer::is_cluster_opcode(opcode) {
            return match ringkv_net::peer::ClusterRequest::parse(frame) {
                // any shard answers: its own figures, or the node's gathered over the mesh
                Ok((_, ringkv_net::peer::ClusterRequest::Stats { .. })) => None,
                Ok((_, req)) => Some(match req.partition() {
                    Some(p) => p as usize % self.config.shards,
                    None => 0,
                }),
                Err(_) => None,
            };
        }
        match Request::parse(frame) {
            Ok((_, req)) => req.key().map(|k| self.owner_of(k).1),
            Err(_) => None,
        }
    }

    fn owner_of(&self, key: &[u8]) -> (u32, usize) {
        let p = ringkv_ring::partition_for_key(key, self.config.partitions);
        (p, p as usize % self.config.shards)
    }

    fn on_mesh_message(self: Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Requests {
                from,
                token,
                frames,
            } => {
                glommio::spawn_local(self.answer_forwarded(from, token, frames)).detach();
            }
            ShardMsg::Replies {
                token,
                frames,
                returned,
            } => {
                drop(returned);
                if frames.is_empty() {
                    return;
                }
                if let Some(slot) = self.pending.borrow().get(&token) {
                    slot.replies.borrow_mut().extend_from_slice(&frames);
                    slot.arrived.notify_all();
                }
            }
            ShardMsg::Membership { seq, bytes } => match ringkv_ring::Membership::decode(&bytes) {
                Ok(membership) => self.on_membership(seq, membership),
                Err(e) => tracing::error!(error = %e, "shard 0 sent a bad membership"),
            },
        }
    }

    /// Answers a batch of forwarded requests: what can run in this step at once (one
    /// reply message for all of them), writes held for the commit log once it covers
    /// them (one more message), and each of the rest as its own task with its own
    /// reply message, so a slow request does not hold back the others.
    ///
    /// The batch's own buffer goes back to the sender with one of these messages
    /// (holding replies when they fit, else beside them), so it is freed on the shard
    /// that allocated it and never grown here: frees and reallocations across threads
    /// contend on the allocator's locks.
    async fn answer_forwarded(self: Rc<Self>, from: usize, token: u64, frames: Vec<u8>) {
        let out = RefCell::new(Vec::new());
        let mut held_bytes = Vec::new();
        // (partition, position, request id, where its reply ends in held_bytes)
        let mut held = Vec::new();
        let mut later = Vec::new();
        // the sender checked every frame whole when it read it
        // run even when this shard is stopping: the sender read them before its own
        // stop, and this shard's partitions stay open until every shard has drained;
        // but no membership change starts (it waits on peers, and would go on after
        // the node closed)
        for frame in protocol::frames(&frames) {
            if self.stopping.get() && changes_membership(protocol::header(frame).opcode) {
                encode::error(
                    &mut out.borrow_mut(),
                    protocol::header(frame).request_id,
                    ErrorCode::ShuttingDown,
                    "the node is shutting down",
                );
                continue;
            }
            match self.try_execute_now(frame, &out, &mut held_bytes) {
                Now::Answered => {}
                Now::Held {
                    partition,
                    position,
                } => held.push((
                    partition,
                    position,
                    protocol::header(frame).request_id,
                    held_bytes.len(),
                )),
                Now::Later => later.push(frame.to_vec()),
            }
        }
        // shutdown waits for the held writes like for any request running here,
        // counted before the first wait
        let count = held.len();
        self.in_flight.set(self.in_flight.get() + count);
        for frame in later {
            let shard = self.clone();
            glommio::spawn_local(async move {
                let out = RefCell::new(Vec::new());
                shard.execute_local(&frame, &out).await;
                shard
                    .send_replies(from, token, out.into_inner(), Vec::new())
                    .await;
            })
            .detach();
        }
        let out = out.into_inner();
        if held.is_empty() {
            self.send_replies_returning(from, token, out, frames).await;
            return;
        }
        self.send_replies(from, token, out, Vec::new()).await;
        let mut replies = Vec::with_capacity(held_bytes.len());
        let mut start = 0;
        for (partition, position, request_id, end) in held {
            match partition.wait_logged(position).await {
                Ok(()) => replies.extend_from_slice(&held_bytes[start..end]),
                Err(e) => self.reply_held_failed(&mut replies, request_id, e),
            }
            start = end;
        }
        self.in_flight.set(self.in_flight.get() - count);
        self.in_flight_done.notify_all();
        self.send_replies_returning(from, token, replies, frames)
            .await;
    }

    /// Sends `replies` and gives the batch's buffer back: the replies travel in it
    /// when they fit (it is not grown on this thread), else beside it.
    async fn send_replies_returning(
        &self,
        to: usize,
        token: u64,
        replies: Vec<u8>,
        mut buffer: Vec<u8>,
    ) {
        if replies.len() <= buffer.capacity() {
            buffer.clear();
            buffer.extend_from_slice(&replies);
            self.send_replies(to, token, buffer, Vec::new()).await;
        } else {
            self.send_replies(to, token, replies, buffer).await;
        }
    }

    /// Sends reply frames to a forwarded batch's sender, and a buffer of its to free
    /// there; nothing when there are no frames and no buffer to give back.
    async fn send_replies(&self, to: usize, token: u64, frames: Vec<u8>, returned: Vec<u8>) {
        if frames.capacity() == 0 && returned.capacity() == 0 {
            return;
        }
        if let Some(senders) = &self.senders {
            let message = ShardMsg::Replies {
                token,
                frames,
                returned,
            };
            let _ = senders.send_to(to, message).await;
        }
    }

    /// The shard another shard must run `frame` on, if not this one (the frame is
    /// then forwarded; see [`Shard::forward_batch`]).
    pub(crate) fn forward_target(&self, frame: &[u8]) -> Option<usize> {
        self.route(frame).filter(|&owner| owner != self.id)
    }

    /// Sends whole request frames (back to back, each for a partition `owner` owns)
    /// to shard `owner` as one message, then hands each arriving run of reply frames
    /// to `take` until it returns true (every request answered). Sending and waiting
    /// share one deadline, so a stalled shard cannot hold the requests forever; on
    /// an error the caller answers the requests `take` has not seen.
    pub(crate) async fn forward_batch(
        &self,
        owner: usize,
        frames: Vec<u8>,
        requests: usize,
        mut take: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), (ErrorCode, &'static str)> {
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let slot = Rc::new(Slot::default());
        self.pending.borrow_mut().insert(token, slot.clone());
        self.in_flight.set(self.in_flight.get() + requests);
        // given back when this ends, also by cancellation (a caller that drops this
        // future, e.g. node_stats returning early or a timed-out metrics scrape):
        // otherwise the slot stays pending and `in_flight` never drains at shutdown
        let _forwarding = Forwarding {
            shard: self,
            token,
            requests,
        };
        let answered = glommio::timer::timeout(self.config.slow_client_timeout, async {
            let Some(senders) = &self.senders else {
                return Ok(false);
            };
            if self.counters.is_failed(owner) {
                return Ok(false);
            }
            let message = ShardMsg::Requests {
                from: self.id,
                token,
                frames,
            };
            if senders.send_to(owner, message).await.is_err() {
                return Ok(false);
            }
            loop {
                let replies = std::mem::take(&mut *slot.replies.borrow_mut());
                if !replies.is_empty() && take(&replies) {
                    return Ok(true);
                }
                slot.arrived.wait().await;
            }
        })
        .await;
        drop(_forwarding);
        match answered {
            Ok(true) => Ok(()),
            Ok(false) => Err((ErrorCode::Unavailable, "owning shard is gone or has failed")),
            Err(_) => Err((
                ErrorCode::Timeout,
                "owning shard did not answer in time; it may still run the request \
                 (a write may or may not be applied)",
            )),
        }
    }

    /// Counts requests read here and forwarded to their owners in a batch.
    pub(crate) fn count_forwarded(&self, requests: usize) {
        let mut stats = self.stats.borrow_mut();
        stats.requests += requests as u64;
        stats.forwarded += requests as u64;
    }

    /// Executes one whole request frame that this shard runs and appends the reply frame
    /// to `out`: the connection reader forwards a frame for another shard's partition
    /// itself ([`Shard::forward_target`], [`Shard::forward_batch`]), so it is not routed
    /// (parsed) again here.
    pub(crate) async fn execute(self: &Rc<Self>, frame: &[u8], out: &RefCell<Vec<u8>>) {
        self.stats.borrow_mut().requests += 1;
        self.execute_local(frame, out).await
    }

    /// Forwards one request frame to shard `owner` (a batch of one; STATS gathers the
    /// node's figures this way) and returns the reply frame, or an error reply when the
    /// owner is gone or too slow.
    async fn forward(&self, owner: usize, frame: &[u8]) -> Vec<u8> {
        let mut reply = Vec::new();
        let forwarded = self
            .forward_batch(owner, frame.to_vec(), 1, |replies| {
                reply.extend_from_slice(replies);
                true
            })
            .await;
        if let Err((code, message)) = forwarded {
            reply.clear();
            encode::error(
                &mut reply,
                protocol::header(frame).request_id,
                code,
                message,
            );
        }
        reply
    }

    /// Executes a request whose partition is on this shard (or that has no key).
    async fn execute_local(self: &Rc<Self>, frame: &[u8], out: &RefCell<Vec<u8>>) {
        let _counted = self.count_in_flight();
        let request_id = protocol::header(frame).request_id;
        let result = self.run_request(frame, request_id, out).await;
        if let Err((code, message)) = result {
            self.stats.borrow_mut().errors += 1;
            encode::error(&mut out.borrow_mut(), request_id, code, &message);
        }
    }

    async fn run_request(
        self: &Rc<Self>,
        frame: &[u8],
        request_id: u64,
        out: &RefCell<Vec<u8>>,
    ) -> Result<(), (ErrorCode, String)> {
        if ringkv_net::peer::is_cluster_opcode(protocol::header(frame).opcode) {
            return self.run_cluster_request(frame, request_id, out).await;
        }
        let (_, request) = Request::parse(frame).map_err(|e| (e.code(), e.to_string()))?;
        if let Some(key) = request.key() {
            self.check_key(key)?;
        }
        match request {
            Request::Hello {
                min_version,
                max_version,
            } => {
                if !(min_version..=max_version).contains(&protocol::PROTOCOL_VERSION) {
                    return Err((
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "server speaks protocol version {}, client {min_version}..={max_version}",
                            protocol::PROTOCOL_VERSION
                        ),
                    ));
                }
                encode::hello_ok(
                    &mut out.borrow_mut(),
                    request_id,
                    &HelloOk {
                        version: protocol::PROTOCOL_VERSION,
                        node_id: self.config.node_id,
                        partitions: self.config.partitions,
                        shards: self.config.shards as u16,
                        shard: self.id as u16,
                        shard_port_base: self.config.shard_port_base,
                        frame_bytes_max: self.config.frame_bytes_max as u32,
                        in_flight_max: self.config.in_flight_per_connection_max as u32,
                    },
                );
            }
            Request::Ping => encode::pong(&mut out.borrow_mut(), request_id),
            Request::Get { r, key } => {
                // siblings far over the frame limit are refused before they are read
                // (100 siblings of 4 MiB would be read whole, 400 MB, for an error)
                if let Some((count, record_bytes)) = self.stored_value_records(key) {
                    let overhead = count
                        * (record::RECORD_HEADER_BYTES
                            + key.len()
                            + record::REPLACED_COUNT_MAX * 8
                            + record::VERSION_BYTES_MAX);
                    self.check_versions_fit(count, record_bytes.saturating_sub(overhead))?;
                }
                let (versions, context) = self.cluster_get(key, r).await?;
                let values: SmallVec<[&[u8]; 2]> =
                    versions.iter().filter_map(|s| s.value.as_deref()).collect();
                let partition = self.partition_for(key).ok();
                self.reply_get(partition, &values, &context, request_id, out)?;
            }
            Request::Put {
                w,
                key,
                context,
                value,
            } => {
                if value.len() > self.config.value_bytes_max {
                    return Err((
                        ErrorCode::ValueTooLarge,
                        format!(
                            "value is {} bytes, the limit is {}",
                            value.len(),
                            self.config.value_bytes_max
                        ),
                    ));
                }
                let context = decode_context(context)?;
                self.cluster_put(frame, key, &context, Some(value), w, request_id, out)
                    .await?;
            }
            Request::Delete { w, key, context } => {
                let context = decode_context(context)?;
                self.cluster_put(frame, key, &context, None, w, request_id, out)
                    .await?;
            }
        }
        Ok(())
    }

    /// `clock` as a client context, in the shard's reused buffer; and how many clock
    /// entries were truncated to fit.
    fn encode_context(&self, clock: &VClock) -> (std::cell::RefMut<'_, Vec<u8>>, usize) {
        let mut encoded = self.context_scratch.borrow_mut();
        encoded.clear();
        let truncated_entries = Context::encode_into(clock, &mut encoded);
        (encoded, truncated_entries)
    }

    /// A reply carrying `count` versions of one key in `reply_bytes` must fit one frame
    /// (and a u16 count): otherwise `FrameTooLarge`, with the way out. The key's other
    /// requests, and the connection, go on.
    pub(crate) fn check_versions_fit(
        &self,
        count: usize,
        reply_bytes: usize,
    ) -> Result<(), (ErrorCode, String)> {
        if reply_bytes > self.config.frame_bytes_max || count > u16::MAX as usize {
            return Err((
                ErrorCode::FrameTooLarge,
                format!(
                    "{count} siblings take {reply_bytes} bytes, over the {}-byte frame limit; \
                     resolve them with a put that carries the context",
                    self.config.frame_bytes_max
                ),
            ));
        }
        Ok(())
    }

    /// Encodes the reply to a get: the values of the siblings that are not tombstones
    /// and the context covering them all (truncations are counted on `partition`).
    fn reply_get(
        &self,
        partition: Option<&Rc<Partition<DmaStorage>>>,
        values: &[&[u8]],
        context: &VClock,
        request_id: u64,
        out: &RefCell<Vec<u8>>,
    ) -> Result<(), (ErrorCode, String)> {
        let (encoded, truncated_entries) = self.encode_context(context);
        if let Some(partition) = partition {
            partition.record_clock_truncation(truncated_entries);
        }
        let reply_bytes: usize = protocol::HEADER_BYTES
            + 4
            + encoded.len()
            + values.iter().map(|v| 4 + v.len()).sum::<usize>();
        self.check_versions_fit(values.len(), reply_bytes)?;
        encode::get_ok(
            &mut out.borrow_mut(),
            request_id,
            &encoded,
            values.iter().copied(),
        );
        Ok(())
    }

    /// Runs at once, in the caller's step and without a task, a request that needs no
    /// waiting, when this node's replica alone answers it ([`Shard::answers_alone`]:
    /// a cluster of one, or N = 1) and the key is on this shard:
    /// - a get whose versions are all in the record cache
    ///   ([`Partition::read_cached`]): the reply is encoded straight from the cached
    ///   records into `out`;
    /// - a put or delete that [`Partition::try_coordinate_put_now`] can do in one step:
    ///   it is appended, and its reply encoded into `held`, to go out once the commit
    ///   log is durable up to the position returned ([`Now::Held`]); into `out` when
    ///   the durability mode does not wait.
    ///
    /// Returns [`Now::Later`], having done nothing, for anything else: the caller then
    /// runs [`Shard::execute`] as a task.
    pub(crate) fn try_execute_now(
        &self,
        frame: &[u8],
        out: &RefCell<Vec<u8>>,
        held: &mut Vec<u8>,
    ) -> Now {
        let header = protocol::header(frame);
        // before parsing and hashing: in a cluster with replicas this path never applies
        let write = match header.opcode {
            protocol::opcode::GET => false,
            protocol::opcode::PUT | protocol::opcode::DELETE => true,
            _ => return Now::Later,
        };
        if !self.single_replica() {
            return Now::Later;
        }
        if write {
            return self.try_put_now(frame, header.request_id, out, held);
        }
        let Ok((_, Request::Get { r, key })) = Request::parse(frame) else {
            return Now::Later;
        };
        // a refused key or R gets its error from the full path
        if r > 1 || self.check_key(key).is_err() {
            return Now::Later;
        }
        let Some(partition) = self.owned_alone(key) else {
            return Now::Later;
        };
        let Some(answered) = partition.read_cached(key, |records| {
            let bad = |e: VersionDecodeError| store_error(StoreError::BadVersion(e.to_string()));
            // one version (the common case): its clock becomes the context in place
            let context = match records {
                [one] => context_of_one(Version::decode(one.version).map_err(bad)?),
                _ => context_of(
                    &records
                        .iter()
                        .map(|r| Version::decode(r.version))
                        .collect::<Result<SmallVec<[Version; 2]>, _>>()
                        .map_err(bad)?,
                ),
            };
            let values: SmallVec<[&[u8]; 2]> = records.iter().filter_map(|r| r.value).collect();
            self.reply_get(Some(partition), &values, &context, header.request_id, out)
        }) else {
            return Now::Later;
        };
        if let Err((code, message)) = answered.map_err(store_error).and_then(|r| r) {
            self.stats.borrow_mut().errors += 1;
            encode::error(&mut out.borrow_mut(), header.request_id, code, &message);
        }
        Now::Answered
    }

    /// The put and delete half of [`Shard::try_execute_now`].
    fn try_put_now(
        &self,
        frame: &[u8],
        request_id: u64,
        out: &RefCell<Vec<u8>>,
        held: &mut Vec<u8>,
    ) -> Now {
        let (w, key, context, value) = match Request::parse(frame) {
            Ok((
                _,
                Request::Put {
                    w,
                    key,
                    context,
                    value,
                },
            )) => (w, key, context, Some(value)),
            Ok((_, Request::Delete { w, key, context })) => (w, key, context, None),
            _ => return Now::Later,
        };
        // refusals (key, value size, W, context) get their errors from the full path
        if w > 1
            || self.check_key(key).is_err()
            || value.is_some_and(|v| v.len() > self.config.value_bytes_max)
        {
            return Now::Later;
        }
        let Ok(context) = decode_context(context) else {
            return Now::Later;
        };
        let Some(partition) = self.owned_alone(key) else {
            return Now::Later;
        };
        let Some(done) = partition.try_coordinate_put_now(
            self.config.node_id,
            key,
            &context,
            value,
            now_ms(),
            self.config.clock_entries_max,
        ) else {
            return Now::Later;
        };
        match done {
            Err(e) => {
                self.stats.borrow_mut().errors += 1;
                let (code, message) = store_error(e);
                encode::error(&mut out.borrow_mut(), request_id, code, &message);
                Now::Answered
            }
            Ok((outcome, None)) => {
                self.reply_put(&mut out.borrow_mut(), request_id, value.is_some(), &outcome);
                Now::Answered
            }
            Ok((outcome, Some(position))) => {
                self.reply_put(held, request_id, value.is_some(), &outcome);
                Now::Held {
                    partition: partition.clone(),
                    position,
                }
            }
        }
    }

    /// The partition of `key` when it is on this shard and this node's replica alone
    /// answers for it.
    fn owned_alone(&self, key: &[u8]) -> Option<&Rc<Partition<DmaStorage>>> {
        let (p, owner) = self.owner_of(key);
        if owner != self.id || !self.answers_alone(p) {
            return None;
        }
        self.partitions.get(&p)
    }

    /// This shard's counters and latency histograms (STATS with `shard_only`).
    pub(crate) fn shard_stats(&self) -> NodeStats {
        let s = self.stats.borrow();
        let mut counters: Vec<(String, u64)> = [
            ("requests", s.requests),
            ("forwarded", s.forwarded),
            ("errors", s.errors),
            ("connections_accepted", s.connections_accepted),
            ("connections_refused", s.connections_refused),
            ("connections_open", self.connections.get() as u64),
            ("connection_bytes", self.conn_budget.held() as u64),
            ("connection_budget_waits", self.conn_budget.waits()),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        // what the shard's partitions hold now (O(segments) each), summed
        let held = |p: &crate::partition::PartitionStats| {
            [
                ("keys", p.keys as u64),
                ("versions", p.versions as u64),
                ("segments", p.segments as u64),
                ("log_bytes", p.bytes),
                ("log_dead_bytes", p.dead_bytes),
                ("clock_truncations", p.clock_truncations),
                ("clock_entries_truncated", p.clock_entries_truncated),
                ("partitions_needing_repair", u64::from(p.needs_repair)),
            ]
        };
        let mut sums = held(&Default::default());
        for p in self.partitions.values() {
            for (sum, (_, v)) in sums.iter_mut().zip(held(&p.stats_without_memory())) {
                sum.1 += v;
            }
        }
        counters.extend(sums.iter().map(|&(n, v)| (n.to_string(), v)));
        let mut latencies: Vec<(String, hdrhistogram::Histogram<u64>)> = self
            .latencies
            .borrow()
            .iter()
            .map(|(n, h)| (n.to_string(), h.clone()))
            .collect();
        // storage that refuses writes until the node restarts (a failed write or sync:
        // a full disk, an I/O error); the hint store counts as a partition
        let failed = self
            .partitions_and_hints()
            .filter(|p| p.failure().is_some())
            .count();
        counters.push(("partitions_failed".into(), failed as u64));
        if let Some(log) = &self.commit_log {
            counters.push(("commit_log_syncs".into(), log.syncs()));
            counters.push((
                "commit_log_failed".into(),
                u64::from(log.failure().is_some()),
            ));
            latencies.push(("commit_log_sync".into(), log.sync_latency()));
        }
        NodeStats {
            shards: 1,
            counters,
            latencies,
        }
    }

    /// The whole node's figures: this shard's and every other shard's (asked over the
    /// mesh, all at once: a shard that does not answer fails the request after the
    /// slow-client timeout), summed, and the node's own counters.
    pub(crate) async fn node_stats(
        self: &Rc<Self>,
        request_id: u64,
    ) -> Result<NodeStats, (ErrorCode, String)> {
        let mut stats = self.shard_stats();
        let mut frame = Vec::new();
        ringkv_net::peer::ClusterRequest::Stats { shard_only: true }.encode(request_id, &mut frame);
        let frame = Rc::new(frame);
        let asked: Vec<_> = (0..self.config.shards)
            .filter(|&s| s != self.id)
            .map(|other| {
                let (shard, frame) = (self.clone(), frame.clone());
                (
                    other,
                    glommio::spawn_local(async move { shard.forward(other, &frame).await }),
                )
            })
            .collect();
        let mut answers = Vec::with_capacity(asked.len());
        for (other, answer) in asked {
            answers.push((other, answer.await));
        }
        for (other, answer) in answers {
            let theirs = NodeStats::parse_reply(&answer)
                .map_err(|why| (ErrorCode::Unavailable, format!("shard {other}: {why}")))?;
            stats.merge(&theirs);
        }
        let c = &self.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        stats.counters.extend(
            [
                ("hints_pending", c.hints_pending.iter().map(load).sum()),
                ("hints_stored", load(&c.hints_stored)),
                ("hints_delivered", load(&c.hints_delivered)),
                ("read_repairs", load(&c.read_repairs)),
            ]
            .into_iter()
            .map(|(n, v)| (n.to_string(), v)),
        );
        Ok(stats)
    }

    /// Encodes the reply to a put (`put: true`) or delete that succeeded.
    pub(crate) fn reply_put(
        &self,
        out: &mut Vec<u8>,
        request_id: u64,
        put: bool,
        outcome: &PutOutcome,
    ) {
        if outcome.siblings * 2 > self.config.siblings_max {
            tracing::warn!(
                siblings = outcome.siblings,
                "key has many siblings: clients should put with the context they read"
            );
        }
        if put {
            let (encoded, _) = self.encode_context(&outcome.context);
            encode::put_ok(
                out,
                request_id,
                &encoded,
                outcome.siblings.min(u16::MAX as usize) as u16,
            );
        } else {
            encode::delete_ok(out, request_id);
        }
    }

    /// Encodes the error reply to a write held by the connection ([`Now::Held`]) whose
    /// commit-log sync failed.
    pub(crate) fn reply_held_failed(&self, out: &mut Vec<u8>, request_id: u64, err: StoreError) {
        self.stats.borrow_mut().errors += 1;
        let (code, message) = store_error(err);
        encode::error(out, request_id, code, &message);
    }

    /// The key limits, for client and replica requests alike.
    fn check_key(&self, key: &[u8]) -> Result<(), (ErrorCode, String)> {
        if key.is_empty() {
            return Err((ErrorCode::BadRequest, "empty key".into()));
        }
        if key.len() > self.config.key_bytes_max {
            return Err((
                ErrorCode::KeyTooLong,
                format!(
                    "key is {} bytes, the limit is {}",
                    key.len(),
                    self.config.key_bytes_max
                ),
            ));
        }
        Ok(())
    }

    /// The live (not tombstone) versions this node's replica holds for `key`, and the
    /// bytes of their records, from the keydir alone (no read): `None` when the key's
    /// partition is not on this shard. The records hold the values, so their bytes bound
    /// what a get of the key reads here.
    /// Only when this node's replica alone answers (N = 1): in a cluster the reply
    /// merges other replicas' versions, and this node may hold none of the key's.
    pub(crate) fn stored_value_records(&self, key: &[u8]) -> Option<(usize, usize)> {
        let (p, _) = self.owner_of(key);
        if !self.answers_alone(p) {
            return None;
        }
        self.local_value_records(p, key)
    }

    /// [`Shard::stored_value_records`] of this node's own copy in partition `p`,
    /// whatever the replication: what a REPLICA_GET of the key reads here.
    pub(crate) fn local_value_records(&self, p: u32, key: &[u8]) -> Option<(usize, usize)> {
        let partition = self.partitions.get(&p)?;
        let versions = partition.versions(key);
        let live = versions.iter().filter(|l| !l.is_tombstone());
        Some(live.fold((0, 0), |(n, bytes), l| (n + 1, bytes + l.len as usize)))
    }

    fn partition_for(&self, key: &[u8]) -> Result<&Rc<Partition<DmaStorage>>, (ErrorCode, String)> {
        let (p, _) = self.owner_of(key);
        // ok_or_else: the message is formatted only when it is needed (this runs on
        // every request)
        self.partitions.get(&p).ok_or_else(|| {
            (
                ErrorCode::Internal,
                format!("partition {p} is not on shard {}", self.id),
            )
        })
    }
}

/// What [`Shard::try_execute_now`] did with a request.
pub(crate) enum Now {
    /// Nothing: run it as a task ([`Shard::execute`]).
    Later,
    /// Answered into the output buffer.
    Answered,
    /// A write is appended and its reply encoded into the held buffer: the reply may
    /// go out once `partition.wait_logged(position)` returns, and an error reply
    /// ([`Shard::reply_held_failed`]) instead if that fails.
    Held {
        partition: Rc<Partition<DmaStorage>>,
        position: u64,
    },
}

fn decode_context(bytes: &[u8]) -> Result<VClock, (ErrorCode, String)> {
    if bytes.is_empty() {
        return Ok(VClock::new());
    }
    Context::decode(bytes).map_err(|e| (ErrorCode::BadContext, e.to_string()))
}

pub(crate) fn store_error(e: StoreError) -> (ErrorCode, String) {
    let code = match &e {
        StoreError::KeyTooLong { .. } => ErrorCode::KeyTooLong,
        StoreError::TooManySiblings { .. } => ErrorCode::TooManySiblings,
        StoreError::ValueTooLarge { .. } => ErrorCode::ValueTooLarge,
        StoreError::EmptyKey | StoreError::EmptyBatch | StoreError::VersionTooLarge { .. } => {
            ErrorCode::BadRequest
        }
        StoreError::Failed(_)
        | StoreError::Closed
        | StoreError::SegmentFull
        | StoreError::Contended { .. }
        | StoreError::EpochMovesLimited { .. } => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    (code, e.to_string())
}

/// Whether a request with this opcode changes the cluster's membership.
fn changes_membership(opcode: u8) -> bool {
    use ringkv_net::peer::opcode;
    matches!(opcode, opcode::JOIN | opcode::LEAVE | opcode::JOIN_REQUEST)
}

impl Shard {
    /// Counts work in [`Shard::in_flight`], which shutdown waits for (bounded by the
    /// drain timeout), until the returned guard is dropped.
    pub(crate) fn count_in_flight(self: &Rc<Self>) -> InFlight {
        self.in_flight.set(self.in_flight.get() + 1);
        InFlight(self.clone())
    }
}

/// See [`Shard::count_in_flight`].
pub(crate) struct InFlight(Rc<Shard>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.set(self.0.in_flight.get() - 1);
        self.0.in_flight_done.notify_all();
    }
}

/// A forwarded batch in progress ([`Shard::forward_batch`]): its pending slot and its
/// requests' share of the shard's in-flight count, given back when dropped.
struct Forwarding<'a> {
    shard: &'a Shard,
    token: u64,
    requests: usize,
}

impl Drop for Forwarding<'_> {
    fn drop(&mut self) {
        self.shard.pending.borrow_mut().remove(&self.token);
        self.shard
            .in_flight
            .set(self.shard.in_flight.get() - self.requests);
        self.shard.in_flight_done.notify_all();
    }
}

//! The node: one glommio executor per shard, each owning the partitions `p` with
//! `p % shards == shard`, serving protocol v1 on the shared client port
//! (`SO_REUSEPORT`) and on its own shard port. A request that reaches the wrong shard
//! travels to its owner over the glommio channel mesh, never through a lock.
//!
//! - [`ServerConfig`]: everything a node needs, with production defaults.
//! - [`run`]: starts the shards and blocks until shutdown (SIGINT/SIGTERM or the
//!   caller's flag): stop accepting, finish in-flight requests, sync and close logs.
//! - `shard`: a shard's partitions and request execution (no sockets).
//! - `cluster` (inside `shard`): the cluster runtime of a shard: quorum coordination
//!   through `crate::cluster::Coordinator`, replica messages, hints and their delivery,
//!   gossip and membership (shard 0), the failure detector, peer links.
//! - `conn`: the connection loop: check frames, pipeline, enforce limits and timeouts.
//! - `stats`: per-shard latency histograms by operation (STATS, `ringkv stats`).
//! - `metrics`: the Prometheus text endpoint (`--metrics-listen`), served by shard 0.

mod conn;
mod deadline;
mod metrics;
mod shard;
mod stats;

use crate::partition::Durability;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use shard::{NodeCounters, ShardStats};

/// Everything a node needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    /// The client port every shard accepts on.
    pub listen: SocketAddr,
    /// Shard `s` also listens on `shard_port_base + s` (0: no shard ports).
    pub shard_port_base: u16,
    pub shards: usize,
    /// Q, fixed at creation: a power of two.
    pub partitions: u32,
    pub durability: Durability,
    pub segment_bytes_max: u64,
    /// In `sync` mode each shard's commit log rotates to a new file at this size (a
    /// checkpoint then syncs the segments and removes the old file).
    pub commit_log_bytes_max: u64,
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    pub frame_bytes_max: usize,
    pub in_flight_per_connection_max: usize,
    pub connections_per_shard_max: usize,
    /// Memory a shard's connections may hold past each one's fixed buffers: frames
    /// bigger than 64 KiB being received, requests running and their replies, replies
    /// not yet sent (see `conn::ConnBudget`). A connection waits for room instead of
    /// reading or starting more.
    pub connection_bytes_per_shard_max: usize,
    /// A connection with nothing to read for this long is closed.
    pub idle_timeout: Duration,
    /// A frame started but not finished within this long closes the connection, and a
    /// client that does not read its replies within it is dropped.
    pub slow_client_timeout: Duration,
    /// Clock entries kept per version before truncation.
    pub clock_entries_max: usize,
    /// A coordinated put or delete that would leave a key more siblings than this is
    /// refused with `TooManySiblings`.
    pub siblings_max: usize,
    /// Compaction runs when this fraction of sealed bytes is dead.
    pub compaction_dead_ratio: f64,
    pub tombstone_grace: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Memory for recently written or read records, for the whole node (split
    /// evenly over its partitions).
    pub cache_bytes_max: usize,
    /// Addresses (`host:port`) of members to join through when this node has no
    /// persisted membership yet. Empty: the node starts a cluster of its own.
    pub seeds: Vec<String>,
    /// The address peers and clients reach this node at (default: `listen`).
    pub advertise: SocketAddr,
    /// N: replicas of every key (capped by the number of nodes).
    pub replicas: usize,
    /// R and W: the default read and write quorums (capped by N).
    pub read_quorum: usize,
    pub write_quorum: usize,
    /// How long a coordinator waits for replicas before answering without them.
    pub request_timeout: Duration,
    pub gossip_period: Duration,
    /// This node's claim weight and zone in the ring.
    pub weight: u32,
    pub zone: String,
    /// Deliver hints to their owners (off: hints are kept, not sent; for tests and
    /// for operators who want to hold handoff during maintenance).
    pub hinted_handoff: bool,
    /// Serve the node's stats in Prometheus's text format (`GET /metrics`, HTTP/1.1)
    /// on this address, from shard 0; `None` (the default): no such listener.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let partitions = 64;
        Self {
            node_id: 1,
            data_dir: PathBuf::from("ringkv-data"),
            listen: "127.0.0.1:7379".parse().expect("valid address"),
            shard_port_base: 7380,
            // one per core, but never more than partitions (each shard must own one)
            shards: cores.min(partitions as usize),
            partitions,
            durability: Durability::Sync,
            segment_bytes_max: 64 << 20,
            commit_log_bytes_max: 32 << 20,
            key_bytes_max: 4096,
            value_bytes_max: 4 << 20,
            frame_bytes_max: ringkv_net::protocol::FRAME_BYTES_MAX_DEFAULT,
            in_flight_per_connection_max: 1024,
            connections_per_shard_max: 4096,
            connection_bytes_per_shard_max: 512 << 20,
            idle_timeout: Duration::from_secs(300),
            slow_client_timeout: Duration::from_secs(10),
            clock_entries_max: crate::version::CLOCK_ENTRIES_MAX,
            siblings_max: 100,
            compaction_dead_ratio: 0.5,
            tombstone_grace: Duration::from_secs(24 * 3600),
            drain_timeout: Duration::from_secs(10),
            cache_bytes_max: 256 << 20,
            seeds: Vec::new(),
            advertise: "0.0.0.0:0".parse().expect("valid address"),
            replicas: 3,
            read_quorum: 2,
            write_quorum: 2,
            request_timeout: Duration::from_secs(2),
            gossip_period: Duration::from_secs(1),
            weight: 1,
            zone: String::new(),
            hinted_handoff: true,
            metrics_listen: None,
        }
    }
}

impl ServerConfig {
    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 1024 {
            return Err(format!("shards must be 1..=1024, not {}", self.shards));
        }
        if !ringkv_ring::hash::is_valid_partition_count(self.partitions) {
            return Err(format!(
                "partitions must be a power of two, not {}",
                self.partitions
            ));
        }
        if (self.partitions as usize) < self.shards {
            return Err("fewer partitions than shards: some shards would own nothing".into());
        }
        if self.shard_port_base != 0
            && self.shard_port_base as usize + self.shards > u16::MAX as usize
        {
            return Err("shard ports run past 65535".into());
        }
        // a hint's key is the data key plus its target and partition, within a record's
        // key limit
        let key_bytes_limit = crate::record::KEY_BYTES_MAX - crate::cluster::HINT_KEY_OVERHEAD;
        if self.key_bytes_max == 0 || self.key_bytes_max > key_bytes_limit {
            return Err(format!(
                "key_bytes_max must be 1..={key_bytes_limit}, not {}",
                self.key_bytes_max
            ));
        }
        if self.value_bytes_max == 0 || self.value_bytes_max > crate::record::VALUE_BYTES_MAX {
            return Err(format!(
                "value_bytes_max must be 1..={}, not {}",
                crate::record::VALUE_BYTES_MAX,
                self.value_bytes_max
            ));
        }
        if self.replicas == 0 || self.read_quorum == 0 || self.write_quorum == 0 {
            return Err("replicas, read and write quorums must be at least 1".into());
        }
        if self.read_quorum > self.replicas || self.write_quorum > self.replicas {
            return Err(format!(
                "R = {} and W = {} cannot exceed N = {}",
                self.read_quorum, self.write_quorum, self.replicas
            ));
        }
        if self.node_id == 0 {
            return Err("node ids start at 1".into());
        }
        if self.frame_bytes_max < self.value_bytes_max + self.key_bytes_max + 4096 {
            return Err("frame_bytes_max must hold the largest value, key and context".into());
        }
        // a frame's length field is 32 bits, and HELLO_OK announces the limit in one
        if self.frame_bytes_max > u32::MAX as usize {
            return Err(format!(
                "frame_bytes_max must be at most 4294967295, not {}",
                self.frame_bytes_max
            ));
        }
        if self.weight == 0 || self.weight > ringkv_ring::membership::WEIGHT_MAX {
            return Err(format!(
                "weight must be 1..={}, not {}",
                ringkv_ring::membership::WEIGHT_MAX,
                self.weight
            ));
        }
        if self.zone.len() > ringkv_ring::membership::ZONE_BYTES_MAX {
            return Err(format!(
                "zone must be at most {} bytes",
                ringkv_ring::membership::ZONE_BYTES_MAX
            ));
        }
        // a timeout of 0 would close every connection, or fail every replica call, at
        // once; a gossip period of 0 would gossip in a busy loop
        for (name, value) in [
            ("idle_timeout_ms", self.idle_timeout),
            ("slow_client_timeout_ms", self.slow_client_timeout),
            ("request_timeout_ms", self.request_timeout),
            ("gossip_period_ms", self.gossip_period),
        ] {
            if value < Duration::from_millis(10) {
                return Err(format!("{name} must be at least 10"));
            }
        }
        // glommio listens with SO_REUSEPORT: a metrics listener on a client or shard port
        // would quietly take a share of that port's connections
        if let Some(metrics) = self.metrics_listen.filter(|a| a.port() != 0) {
            let shard_ports = (self.shard_port_base != 0).then(|| {
                self.shard_port_base as usize..self.shard_port_base as usize + self.shards
            });
            let same_host = |a: SocketAddr| {
                a.ip() == metrics.ip() || a.ip().is_unspecified() || metrics.ip().is_unspecified()
            };
            let on_client_port = metrics.port() == self.listen.port() && same_host(self.listen);
            let on_shard_port = shard_ports
                .is_some_and(|ports| ports.contains(&(metrics.port() as usize)))
                && same_host(self.listen);
            if on_client_port || on_shard_port {
                return Err(format!(
                    "metrics_listen {metrics} is the client port or a shard port"
                ));
            }
        }
        for seed in &self.seeds {
            ringkv_net::peer::peer_addr(seed).map_err(|e| format!("seed {e}"))?;
        }
        // segment offsets and lengths are u32 on disk and in the keydir
        if !(4096..u32::MAX as u64).contains(&self.segment_bytes_max) {
            return Err(format!(
                "segment_bytes_max must be 4096..4294967295, not {}",
                self.segment_bytes_max
            ));
        }
        // each shard writes its log file out in full (zeros) before using it
        if !(1 << 20..=1 << 30).contains(&self.commit_log_bytes_max) {
            return Err(format!(
                "commit_log_bytes_max must be 1048576..=1073741824 (1 MiB to 1 GiB), not {}",
                self.commit_log_bytes_max
            ));
        }
        for (name, value) in [
            (
                "in_flight_per_connection_max",
                self.in_flight_per_connection_max,
            ),
            ("connections_per_shard_max", self.connections_per_shard_max),
            (
                "connection_bytes_per_shard_max",
                self.connection_bytes_per_shard_max,
            ),
            ("siblings_max", self.siblings_max),
            ("clock_entries_max", self.clock_entries_max),
        ] {
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        // HELLO_OK announces it in 32 bits
        if self.in_flight_per_connection_max > u32::MAX as usize {
            return Err(format!(
                "in_flight_per_connection_max must be at most 4294967295, not {}",
                self.in_flight_per_connection_max
            ));
        }
        if !(self.compaction_dead_ratio > 0.0 && self.compaction_dead_ratio <= 1.0) {
            return Err(format!(
                "compaction_dead_ratio must be in (0, 1], not {}",
                self.compaction_dead_ratio
            ));
        }
        Ok(())
    }
}

/// Set by SIGINT/SIGTERM (or by the caller) to stop the node gracefully.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Triggers this on SIGINT or SIGTERM (a background thread waits for them); a second
    /// one exits the process at once with status 130, without closing the partitions
    /// (what `sync` mode acknowledged is durable; the commit log is replayed at the next
    /// start). Call before any other thread starts, so every thread inherits the blocked
    /// mask.
    pub fn on_signals(&self) -> std::io::Result<()> {
        // SAFETY: plain libc signal-mask calls on a zeroed sigset_t we own.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            set
        };
        let flag = self.clone();
        std::thread::Builder::new()
            .name("ringkv-signals".into())
            .spawn(move || {
                let mut signal: libc::c_int = 0;
                // SAFETY: sigwait on the set blocked above.
                unsafe { libc::sigwait(&set, &mut signal) };
                flag.trigger();
                let first = std::time::Instant::now();
                // a second signal while the node drains (or is still starting: recovery
                // looks at the flag only once every shard is up) stops it at once; one
                // within a second of the first is the same request delivered twice (a
                // terminal's Ctrl-C to the group and a wrapper that forwards it, a
                // supervisor that signals the whole group and a parent that passes it
                // on), not a second request
                loop {
                    // SAFETY: as above.
                    unsafe { libc::sigwait(&set, &mut signal) };
                    if first.elapsed() >= SECOND_SIGNAL_AFTER {
                        break;
                    }
                }
                eprintln!("ringkv: second signal: exiting without waiting for the shards");
                // _exit, not exit: no atexit handlers run beside a main thread that may be
                // returning (and calling exit) at this moment
                // SAFETY: _exit ends the process; it takes no pointers
                unsafe { libc::_exit(130) };
            })?;
        Ok(())
    }
}

/// A signal this long after the first is a second request to stop (exit at once); an
/// earlier one is the first delivered twice.
pub const SECOND_SIGNAL_AFTER: Duration = Duration::from_secs(1);

/// What a shard reports when it stops.
#[derive(Debug, Clone, Default)]
pub struct ShardExit {
    pub shard: usize,
    pub stats: ShardStats,
    /// Every partition, the hint store and the commit log closed without an error (the
    /// log says which failed). When not, writes not yet synced in `none` or `interval`
    /// mode may be lost, and in `sync` mode the next start replays the commit log.
    pub clean: bool,
}

/// SO_REUSEPORT would let this node share a port that a running node listens on, so a
/// port where a server answers is refused. A listener that accepts but never answers is
/// the remains of a killed node (its io_uring teardown keeps the socket listening for a
/// moment): wait for it to go, so that no client connection lands in its backlog.
fn wait_until_port_is_free(listen: SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    if listen.port() == 0 {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let Ok(mut stream) =
            std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200))
        else {
            return Ok(());
        };
        let mut ping = Vec::new();
        ringkv_net::protocol::Request::Ping.encode(0, &mut ping);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
        let answered = stream.write_all(&ping).is_ok()
            && matches!(stream.read(&mut [0u8; 16]), Ok(n) if n > 0);
        if answered {
            return Err(format!(
                "cannot listen on {listen}: another server is listening there"
            ));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "cannot listen on {listen}: a listener that never answers holds the port"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A shard's commit log is replayed by that shard: one left by a shard this start
/// does not have (the node crashed, then got fewer `--shards`) would never be.
fn refuse_orphan_commit_logs(config: &ServerConfig) -> Result<(), String> {
    for (shard, path) in orphan_shard_folders(&config.data_dir.join("commitlog"), config.shards) {
        if !log_folder_holds_entries(&path) {
            // only empty (zero-filled) files: e.g. a start with more shards that
            // failed; nothing to replay, so the folder goes
            let _ = std::fs::remove_dir_all(path);
            continue;
        }
        return Err(format!(
            "{} holds the commit log of shard {shard}, but this node starts {} shards: \
             start it once with the --shards it last ran with, so that the log is \
             replayed",
            path.display(),
            config.shards
        ));
    }
    Ok(())
}

/// The `shard-SSS` folders in `dir` (per-shard commit logs, hint stores) of shards a
/// node of `shards` shards does not have: (shard, path).
pub(crate) fn orphan_shard_folders(
    dir: &std::path::Path,
    shards: usize,
) -> Vec<(usize, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let shard = name.strip_prefix("shard-")?.parse::<usize>().ok()?;
            (shard >= shards).then(|| (shard, entry.path()))
        })
        .collect()
}

/// Whether any file of a commit log folder starts with an entry (a log is read from
/// offset 0 up to its first all-zero entry header, so a file that starts with zeros
/// holds nothing to replay).
fn log_folder_holds_entries(folder: &std::path::Path) -> bool {
    use std::io::Read;
    let Ok(files) = std::fs::read_dir(folder) else {
        return false;
    };
    files.flatten().any(|f| {
        let mut head = [0u8; crate::commit_log::ENTRY_HEADER_BYTES];
        let Ok(mut file) = std::fs::File::open(f.path()) else {
            // unreadable: assume it matters
            return true;
        };
        let mut read = 0;
        while read < head.len() {
            match file.read(&mut head[read..]) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(_) => return true,
            }
        }
        head[..read].iter().any(|&b| b != 0)
    })
}

/// The data directory's lock file: `LOCK`, holding the pid of the process that has it.
pub const LOCK_FILE: &str = "LOCK";

/// Takes the data directory for this process: an exclusive `flock` on its `LOCK` file,
/// held while the returned file is open (the kernel drops it when the process ends,
/// however it ends). Two nodes on one directory would append to the same segments and
/// remove each other's files, so a second one is refused, naming the holder. On a file
/// system that cannot lock, the node warns and runs unprotected.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, String> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            return Err(format!(
                "the data directory {} is in use by another ringkv node{holder}",
                dir.display()
            ));
        }
        // a file system without locks (NFS without lockd, say): nothing to hold
        if [libc::ENOLCK, libc::EOPNOTSUPP, libc::ENOSYS].contains(&e.raw_os_error().unwrap_or(0)) {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "the file system cannot lock the data directory: nothing stops a second node on it"
            );
        } else {
            return Err(format!("cannot lock {}: {e}", path.display()));
        }
    }
    let pid = std::process::id().to_string();
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(pid.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(file)
}

/// Why a shard did not start.
pub(crate) enum StartError {
    /// glommio could not create its executor (pinning, io_uring, locked memory).
    Executor { shard_id: usize, cpu: usize },
    /// The shard's own start-up failed (recovery, listening), with the reason.
    Shard(String),
}

/// Sends [`StartError::Executor`] when dropped armed: glommio drops a shard's closure
/// without running it when the executor cannot be created, and the other shards would
/// wait for it in the mesh for ever.
struct StartGuard {
    shard_id: usize,
    cpu: usize,
    ready_tx: Option<std::sync::mpsc::Sender<Result<(), StartError>>>,
}

impl StartGuard {
    fn disarm(mut self) {
        self.ready_tx = None;
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.ready_tx.take() {
            let _ = tx.send(Err(StartError::Executor {
                shard_id: self.shard_id,
                cpu: self.cpu,
            }));
        }
    }
}

/// Refuses a data directory that belongs to another node (`cluster/node-id`, written
/// once the node is first persisted as a member: see [`record_node_id`]): its versions
/// were written by that node's actor, and a node restarted there with another id would
/// write as a second actor beside the first (or as the same actor as a live node with
/// that id), and would not find itself in the persisted membership.
fn check_node_id(data_dir: &std::path::Path, node_id: u64) -> Result<(), String> {
    let path = data_dir.join("cluster").join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let owner: u64 = text
                .trim()
                .parse()
                .map_err(|_| format!("{}: not a node id: {text:?}", path.display()))?;
            if owner != node_id {
                return Err(format!(
                    "the data directory {} belongs to node {owner}, not {node_id}: start it \
                     with --node-id {owner}, or give node {node_id} a directory of its own",
                    data_dir.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `cluster/node-id` (temporary file, fsync, rename, folder fsync) unless it
/// exists: called when the membership is persisted with `node_id` in it, so a start that
/// fails (a port taken, a seed that refuses the id) claims nothing.
pub(crate) fn record_node_id(data_dir: &std::path::Path, node_id: u64) -> Result<(), String> {
    use std::io::Write;
    let dir = data_dir.join("cluster");
    let path = dir.join("node-id");
    if path.exists() {
        return Ok(());
    }
    let tmp = dir.join("node-id.tmp");
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let mut file = std::fs::File::create(&tmp)?;
        writeln!(file, "{node_id}")?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Runs the node until `shutdown` triggers. `ready` is called once every shard
/// listens (with the client address actually bound).
pub fn run(
    config: ServerConfig,
    shutdown: Shutdown,
    ready: impl FnOnce(SocketAddr) + Send + 'static,
) -> Result<Vec<ShardExit>, String> {
    config.validate()?;
    crate::runtime::raise_memlock_limit(1 << 30);
    let files = (config.connections_per_shard_max * config.shards) as u64
        + 64 * config.partitions as u64
        + 1024;
    let files_limit = crate::runtime::raise_nofile_limit(files);
    if files_limit < files {
        tracing::warn!(
            files_limit,
            wanted = files,
            "open-file limit is below what the connection limits allow"
        );
    }
    std::fs::create_dir_all(config.data_dir.join("partitions"))
        .map_err(|e| format!("cannot create {}: {e}", config.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&config.data_dir)
        .map_err(|e| format!("cannot resolve {}: {e}", config.data_dir.display()))?;
    let config = ServerConfig { data_dir, ..config };
    // each shard holds a share of it: the lock lasts as long as the last shard (also
    // when this function returns early, leaving shards that cannot be joined)
    let lock = Arc::new(lock_data_dir(&config.data_dir)?);
    check_node_id(&config.data_dir, config.node_id)?;
    refuse_orphan_commit_logs(&config)?;
    // bind the client port once here to learn the address (port 0 picks one), then
    // every shard binds the same address with SO_REUSEPORT
    wait_until_port_is_free(config.listen)?;
    // the shard ports are bound with SO_REUSEPORT too, and glommio binds the metrics
    // listener that way: a node started beside another on the same shard ports (or
    // metrics address) would share them with it, silently
    if config.shard_port_base != 0 {
        for s in 0..config.shards {
            let mut own = config.listen;
            own.set_port(config.shard_port_base + s as u16);
            wait_until_port_is_free(own)?;
        }
    }
    if let Some(metrics) = config.metrics_listen {
        // any listener there (it would not answer a PING: it may speak HTTP)
        if metrics.port() != 0
            && std::net::TcpStream::connect_timeout(&metrics, Duration::from_millis(200)).is_ok()
        {
            return Err(format!(
                "cannot listen on {metrics} (metrics): something is listening there"
            ));
        }
    }
    // bound, not listening: a client connecting meanwhile is refused (and retries)
    // rather than queued on a socket that closes at once, which would reset it
    let probe = shard::bound_reusing(config.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let listen = probe
        .local_addr()
        .map_err(|e| e.to_string())?
        .as_socket()
        .ok_or_else(|| format!("cannot listen on {}: not an IP address", config.listen))?;
    drop(probe);
    let advertise = if config.advertise.port() == 0 {
        listen
    } else {
        config.advertise
    };
    if advertise.ip().is_unspecified() {
        tracing::warn!(
            %advertise,
            "listening on every interface: peers on other hosts need --advertise HOST:PORT"
        );
    }
    let config = ServerConfig {
        listen,
        advertise,
        ..config
    };
    // the membership: persisted, or a new cluster of this node alone, or (with seeds)
    // none until a seed admits this node
    let membership = match crate::server::shard::load_membership(&config.data_dir)? {
        Some(mut m) => {
            if m.partition_count() != config.partitions {
                return Err(format!(
                    "the data directory belongs to a cluster of {} partitions, not {}",
                    m.partition_count(),
                    config.partitions
                ));
            }
            // restarted on another address: the new one spreads by gossip
            let id = ringkv_ring::NodeId(config.node_id);
            let advertised = advertise.to_string();
            if m.member(id).is_some_and(|me| me.addr != advertised) {
                m.set_addr(id, &advertised).map_err(|e| e.to_string())?;
                crate::server::shard::persist_membership(&config.data_dir, &m, config.node_id)?;
            }
            Some(m.encode())
        }
        None if config.seeds.is_empty() => {
            let mut m =
                ringkv_ring::Membership::new(config.partitions).map_err(|e| e.to_string())?;
            let id = ringkv_ring::NodeId(config.node_id);
            m.join(
                id,
                &advertise.to_string(),
                config.weight,
                &config.zone,
                config.shards as u32,
            )
            .map_err(|e| e.to_string())?;
            m.set_status(id, ringkv_ring::Status::Valid)
                .map_err(|e| e.to_string())?;
            crate::server::shard::persist_membership(&config.data_dir, &m, config.node_id)?;
            Some(m.encode())
        }
        None => None,
    };
    let mesh = glommio::channels::channel_mesh::MeshBuilder::full(config.shards, 1024);
    let counters = Arc::new(NodeCounters::new(config.shards));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), StartError>>();
    // the CPUs this process may run on (taskset, a container's cpuset): pinning to any
    // other fails the executor's start
    let cpus = crate::runtime::allowed_cpus();
    let mut handles = Vec::new();
    for shard_id in 0..config.shards {
        let cpu = cpus[shard_id % cpus.len()];
        // reports the shard as failed if glommio drops the closure without running it
        // (its executor could not start); disarmed once it runs
        let start_guard = StartGuard {
            shard_id,
            cpu,
            ready_tx: Some(ready_tx.clone()),
        };
        let (config, shutdown, mesh, ready_tx, membership, counters, lock) = (
            config.clone(),
            shutdown.clone(),
            mesh.clone(),
            ready_tx.clone(),
            membership.clone(),
            counters.clone(),
            lock.clone(),
        );
        let builder = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
            // the blocking thread runs commit log syncs and syncfs: left unpinned
            // so it does not queue behind its own busy shard for the core
            .blocking_thread_pool_placement(glommio::PoolPlacement::Unbound(1))
            .name(&format!("ringkv-shard-{shard_id}"));
        let handle = builder
            .spawn(move || {
                start_guard.disarm();
                stop_node_on_panic(StopOnPanic {
                    shard_id,
                    shutdown: shutdown.clone(),
                    counters: counters.clone(),
                    ready_tx: ready_tx.clone(),
                });
                async move {
                    let _lock = lock;
                    shard::shard_main(
                        shard_id, config, shutdown, mesh, membership, counters, ready_tx,
                    )
                    .await
                }
            })
            .map_err(|e| format!("cannot start shard {shard_id}: {e}"))?;
        handles.push(handle);
    }
    drop(ready_tx);
    let mut failure = None;
    // recovery of big partitions takes time, but a shard that never reports (stuck
    // joining the mesh because another failed to start) must not hang the node
    let ready_deadline = std::time::Instant::now() + Duration::from_secs(600);
    for _ in 0..config.shards {
        let left = ready_deadline.saturating_duration_since(std::time::Instant::now());
        match ready_rx.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(StartError::Executor { shard_id, cpu })) => {
                // glommio's own error is what the shard's thread ended with
                let why = match handles.remove(shard_id).join() {
                    Err(e) => e.to_string(),
                    Ok(_) => "unknown".into(),
                };
                failure = Some(format!(
                    "shard {shard_id} could not start its executor on CPU {cpu}: {why}"
                ));
                break;
            }
            Ok(Err(StartError::Shard(e))) => {
                failure = Some(e);
                break;
            }
            Err(_) => {
                failure = Some("a shard stopped or hung before it was ready".into());
                break;
            }
        }
    }
    if let Some(e) = failure {
        // shards stuck in start-up cannot be joined; the caller exits the process
        shutdown.trigger();
        return Err(e);
    }
    ready(listen);
    // every shard is joined, also after one failed: the others are still closing their
    // partitions, and the caller exits the process once this returns
    let mut exits = Vec::new();
    let mut failure = None;
    for (shard_id, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(exit)) => exits.push(exit),
            Ok(Err(e)) => {
                shutdown.trigger();
                failure.get_or_insert(e);
            }
            Err(e) => {
                shutdown.trigger();
                failure.get_or_insert(format!("shard {shard_id}'s thread failed: {e}"));
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(exits),
    }
}

/// What a panic on a shard's thread does: the node stops gracefully instead of serving
/// on without the shard (its partitions unreachable, the other shards' forwards to it
/// waiting out their deadline), the other shards forward nothing more to it and do not
/// wait for it to drain. (A panic glommio catches, in a waker, counts too: any panic on
/// a shard is a bug, and the node stops.)
struct StopOnPanic {
    shard_id: usize,
    shutdown: Shutdown,
    counters: Arc<NodeCounters>,
    /// A panic before the shard is ready fails the start at once with its message
    /// (else the start would wait out its deadline for a shard that never reports).
    ready_tx: std::sync::mpsc::Sender<Result<(), StartError>>,
}

thread_local! {
    /// Set on a shard's thread (see [`stop_node_on_panic`]).
    static ON_PANIC: std::cell::RefCell<Option<StopOnPanic>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes a panic on the calling thread stop the node (`stop`). A panic hook, not a
/// guard dropped while unwinding: glommio does not drop the tasks of an executor whose
/// task panicked. The hook is installed once per process and acts only on threads that
/// called this; the hook it replaces still runs (the panic's message).
fn stop_node_on_panic(stop: StopOnPanic) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = ON_PANIC.try_with(|cell| {
                if let Ok(stop) = cell.try_borrow() {
                    if let Some(stop) = stop.as_ref() {
                        tracing::error!(shard = stop.shard_id, "shard panicked: stopping the node");
                        stop.shutdown.trigger();
                        stop.counters.shard_failed(stop.shard_id);
                        let what = info
                            .payload()
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| info.payload().downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(no message)".into());
                        let at = info
                            .location()
                            .map(|l| format!(" at {}:{}", l.file(), l.line()))
                            .unwrap_or_default();
                        // read only while the node is starting
                        let _ = stop.ready_tx.send(Err(StartError::Shard(format!(
                            "shard {} panicked{at}: {what}",
                            stop.shard_id
                        ))));
                    }
                }
            });
            previous(info);
        }));
    });
    ON_PANIC.with(|cell| *cell.borrow_mut() = Some(stop));
}

#[cfg(test)]
mod tests {
    use super::{NodeCounters, ServerConfig, Shutdown, StartError, StopOnPanic};
    use std::sync::Arc;

    /// glommio leaves a panicked executor's tasks undropped, so only a panic hook sees a
    /// shard's panic in time to stop the node; a panic on another thread stops nothing.
    #[test]
    fn a_panic_on_a_shard_thread_stops_the_node_and_counts_the_shard_failed() {
        let shutdown = Shutdown::new();
        let counters = Arc::new(NodeCounters::new(2));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let other = std::thread::spawn(|| panic!("not a shard"));
        assert!(other.join().is_err());
        assert!(!shutdown.is_triggered());
        let shard = {
            let (shutdown, counters) = (shutdown.clone(), counters.clone());
            std::thread::spawn(move || {
                super::stop_node_on_panic(StopOnPanic {
                    shard_id: 1,
                    shutdown,
                    counters,
                    ready_tx,
                });
                panic!("a shard's task failed");
            })
        };
        assert!(shard.join().is_err());
        assert!(shutdown.is_triggered());
        // a start still waiting for the shard hears why at once
        match ready_rx.try_recv() {
            Ok(Err(StartError::Shard(why))) => {
                assert!(why.contains("shard 1 panicked"), "{why}");
                assert!(why.contains("a shard's task failed"), "{why}");
            }
            _ => panic!("no start error"),
        }
        assert!(counters.is_failed(1) && !counters.is_failed(0));
        // the other shard's drain ends with its own
        assert!(!counters.all_shards_drained());
        counters.shard_drained(0);
        assert!(counters.all_shards_drained());
    }

    #[test]
    fn the_default_configuration_is_valid() {
        let config = ServerConfig::default();
        assert!(config.shards <= config.partitions as usize);
        config.validate().unwrap();
    }

    /// glommio listens with SO_REUSEPORT, so a metrics listener on the client port or a
    /// shard port would take a share of that port's connections without an error.
    #[test]
    fn a_metrics_listener_on_a_client_or_shard_port_is_refused() {
        let base = ServerConfig {
            listen: "127.0.0.1:7379".parse().unwrap(),
            shard_port_base: 7380,
            shards: 2,
            ..ServerConfig::default()
        };
        for (metrics, refused) in [
            ("127.0.0.1:7379", true),
            ("0.0.0.0:7379", true),
            ("127.0.0.1:7380", true),
            ("127.0.0.1:7381", true),
            ("127.0.0.1:7382", false),
            ("127.0.0.2:7379", false),
            ("127.0.0.1:0", false),
        ] {
            let config = ServerConfig {
                metrics_listen: Some(metrics.parse().unwrap()),
                ..base.clone()
            };
            let result = config.validate();
            assert_eq!(result.is_err(), refused, "{metrics}: {result:?}");
        }
    }
}

//! A deterministic one-thread simulator of a whole ringkv cluster (design section 2,
//! rule 3) running the real logic: [`Coordinator`], the replica functions, the hint
//! store and hint delivery, replica copies of puts as a node's copy tasks run them (a
//! home that fails gives way to a fallback with a hint, a copy that fails for good
//! leaves a hint on its coordinator), the ring's [`Gossip`] and [`FailureDetector`], and
//! [`Partition`]s on crashing in-memory disks ([`MemDisk`], one per node, `sync`
//! durability; futures are driven with `block_on`).
//!
//! The simulated network delays, loses, reorders and duplicates messages and splits the
//! nodes into two sides for a while; nodes crash (unsynced bytes are lost) and restart
//! (every partition and the hints partition are reopened from the disk). Time is
//! simulated in ms and every choice comes from one seed, with no hash-order dependence,
//! so a seed gives the identical run: [`SimReport::digest`] is a hash of the event
//! trace.
//!
//! A run has three phases: clients (read-modify-write puts, blind puts, deletes and
//! gets on a small key space) under faults; a settle phase (partitions healed, crashed
//! nodes restarted, a clean network, hints delivered, gossip and failure detection
//! settle); a final read of every key from its N home replicas (`R = N`, twice, so read
//! repair brings the replicas together). Then the checkers:
//! - `lost_write`: every acknowledged write is in the final read of its key, or a
//!   version there has seen it (a later write whose context covered it);
//! - `convergence`: the N home replicas of every key hold the same sibling set;
//! - `sibling_causality`: no get returned a version dominated by another it returned;
//! - `hints_drained`: no hint is left undelivered after the settle phase;
//! - `hint_handoff`: every version a fallback acknowledged with a hint is then held
//!   (or seen by a version held) by its home node, checked before the final reads;
//! - `final_read`: the final reads succeeded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use futures_lite::future::block_on;
use ringkv_ring::rng::mix64;
use ringkv_ring::{
    FailureDetector, FailureDetectorConfig, Gossip, GossipConfig, GossipMessage, Membership,
    NodeId, Ring, Rng, Status,
};

use super::coordinator::{
    choose_targets, uncovered_homes, Coordinator, CoordinatorOutput, GetResult, OpId, PutResult,
    Target, VersionedValue,
};
use super::replica::{
    pending_hint_count, replica_get, replica_put, Hint, HintStore, HINT_KEY_OVERHEAD,
};
use crate::partition::{Durability, Partition, PartitionConfig};
use crate::storage::mem::{MemDisk, MemStorage};
use crate::version::{context_of, VClock, Version};
use crate::versioned::ApplyOutcome;

/// Settings of one simulated run. Probabilities are per message (`loss`, `dup`,
/// `long_delay`) or per 50 ms tick of the whole cluster (`crash_prob`,
/// `partition_prob`).
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub partitions: u32,
    pub n: usize,
    pub r: usize,
    pub w: usize,
    pub clients: usize,
    pub keys: usize,
    /// Client operations (a read-modify-write counts as one) in the fault phase.
    pub client_ops: usize,
    pub loss: f64,
    pub dup: f64,
    /// Chance that a message takes up to 300 ms extra (reordering).
    pub long_delay: f64,
    pub crash_prob: f64,
    pub partition_prob: f64,
    /// Hinted handoff: fallbacks record hints and deliver them. Off only to show that
    /// the checkers catch the writes that then get lost.
    pub hints: bool,
    pub op_timeout_ms: u64,
    pub client_timeout_ms: u64,
    /// Simulated time of the settle phase after the faults stop.
    pub settle_ms: u64,
    /// Bound on the simulated time of the fault phase (a liveness failure past it).
    pub max_fault_ms: u64,
    pub clock_entries_max: usize,
    /// `None`: `sync` durability (every write is durable when acknowledged).
    /// `Some(ms)`: `interval` durability, every node syncs every `ms` (rounded to
    /// ticks); a crash then loses the writes of the last interval, so crashes are kept
    /// at least four intervals apart (one lost local copy at a time, as W >= 2
    /// tolerates), and the `hint_handoff` checker is off (a fallback may lose a hinted
    /// copy together with its hint).
    pub sync_interval_ms: Option<u64>,
    /// The data partitions' tombstone grace (`None`: the default, 24 h, which no run
    /// reaches). A short one has compaction reap tombstones during the run, except
    /// those a pending hint still has to deliver.
    pub tombstone_grace_ms: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            nodes: 5,
            partitions: 16,
            n: 3,
            r: 2,
            w: 2,
            clients: 4,
            keys: 20,
            client_ops: 1000,
            loss: 0.02,
            dup: 0.02,
            long_delay: 0.05,
            crash_prob: 0.01,
            partition_prob: 0.01,
            hints: true,
            op_timeout_ms: 300,
            client_timeout_ms: 1500,
            settle_ms: 20_000,
            max_fault_ms: 3_600_000,
            clock_entries_max: 64,
            sync_interval_ms: None,
            tombstone_grace_ms: None,
        }
    }
}

impl SimConfig {
    /// The default settings for `seed`, with 3 to 7 nodes (`3 + seed % 5`).
    pub fn for_seed(seed: u64) -> Self {
        Self {
            seed,
            nodes: 3 + (seed % 5) as usize,
            ..Self::default()
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub nodes: usize,
    pub acked_puts: u64,
    pub acked_deletes: u64,
    pub not_confirmed: u64,
    pub gets_ok: u64,
    pub gets_failed: u64,
    pub client_timeouts: u64,
    pub forwarded: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub hints_stored: u64,
    pub hints_delivered: u64,
    pub read_repairs: u64,
    pub messages_sent: u64,
    pub messages_dropped: u64,
    pub messages_duplicated: u64,
    pub store_errors: u64,
    pub compactions: u64,
    /// Replica copies of puts handed from a failed home to a fallback, and copies
    /// that failed for good and left a hint on their coordinator.
    pub fallback_copies: u64,
    pub failed_copy_hints: u64,
    /// Tombstones compaction reaped, and expired ones it kept for a pending hint.
    pub tombstones_reaped: u64,
    pub tombstones_held: u64,
    pub sim_ms: u64,
    /// Hash of the event trace: equal for equal runs.
    pub digest: u64,
}

impl SimReport {
    /// Adds `r`'s counters to these (a total over runs; seed, nodes and digest stay).
    pub fn add(&mut self, r: &SimReport) {
        self.acked_puts += r.acked_puts;
        self.acked_deletes += r.acked_deletes;
        self.not_confirmed += r.not_confirmed;
        self.gets_ok += r.gets_ok;
        self.gets_failed += r.gets_failed;
        self.client_timeouts += r.client_timeouts;
        self.forwarded += r.forwarded;
        self.crashes += r.crashes;
        self.partitions += r.partitions;
        self.hints_stored += r.hints_stored;
        self.hints_delivered += r.hints_delivered;
        self.read_repairs += r.read_repairs;
        self.messages_sent += r.messages_sent;
        self.messages_dropped += r.messages_dropped;
        self.messages_duplicated += r.messages_duplicated;
        self.store_errors += r.store_errors;
        self.compactions += r.compactions;
        self.fallback_copies += r.fallback_copies;
        self.failed_copy_hints += r.failed_copy_hints;
        self.tombstones_reaped += r.tombstones_reaped;
        self.tombstones_held += r.tombstones_held;
        self.sim_ms += r.sim_ms;
    }

    /// One line of `name=value` pairs.
    pub fn counters_line(&self) -> String {
        format!(
            "acked_puts={} acked_deletes={} not_confirmed={} gets_ok={} gets_failed={} \
             client_timeouts={} forwarded={} crashes={} partitions={} hints_stored={} \
             hints_delivered={} read_repairs={} messages={} dropped={} duplicated={} \
             store_errors={} compactions={} fallback_copies={} failed_copy_hints={} \
             tombstones_reaped={} tombstones_held={} sim_ms={}",
            self.acked_puts,
            self.acked_deletes,
            self.not_confirmed,
            self.gets_ok,
            self.gets_failed,
            self.client_timeouts,
            self.forwarded,
            self.crashes,
            self.partitions,
            self.hints_stored,
            self.hints_delivered,
            self.read_repairs,
            self.messages_sent,
            self.messages_dropped,
            self.messages_duplicated,
            self.store_errors,
            self.compactions,
            self.fallback_copies,
            self.failed_copy_hints,
            self.tombstones_reaped,
            self.tombstones_held,
            self.sim_ms
        )
    }
}

/// A checker found a violation (or the run could not finish).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFailure {
    pub seed: u64,
    /// `lost_write`, `convergence`, `sibling_causality`, `hints_drained`,
    /// `hint_handoff`, `final_read`, `liveness` or `setup`.
    pub checker: &'static str,
    /// The key concerned, if one.
    pub key: Option<String>,
    pub detail: String,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {}: checker {} failed", self.seed, self.checker)?;
        if let Some(key) = &self.key {
            write!(f, " for key {key}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl std::error::Error for SimFailure {}

/// One acknowledged write (`PutDone Ok`), as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedWrite {
    pub key: Vec<u8>,
    pub written: VersionedValue,
    /// The context the client wrote with.
    pub context: VClock,
}

/// Checker `lost_write` for one key: every acknowledged write of `key` is in `final_read`,
/// with its value, or a version there has seen it. Public so tests can feed it.
pub fn check_acked_writes(
    seed: u64,
    key: &[u8],
    acked: &[AckedWrite],
    final_read: &[VersionedValue],
    reaped: Option<&[Version]>,
) -> Result<(), SimFailure> {
    for write in acked.iter().filter(|w| w.key == key) {
        let v = &write.written;
        let present = final_read.iter().find(|f| f.version == v.version);
        match present {
            Some(f) if f.value == v.value => continue,
            Some(f) => {
                return Err(SimFailure {
                    seed,
                    checker: "lost_write",
                    key: Some(key_name(key)),
                    detail: format!(
                        "acknowledged version {:?} reads back with value {:?}, written {:?}",
                        v.version.dot,
                        f.value.as_deref().map(String::from_utf8_lossy),
                        v.value.as_deref().map(String::from_utf8_lossy)
                    ),
                })
            }
            None => {}
        }
        // with tombstones reaped (`reaped`: the key's deletes), a write may be gone
        // because a delete that saw it is: fine while nothing that delete superseded
        // is back
        if let Some(deletes) = reaped {
            let gone_with = deletes.iter().find(|d| d.descends(&v.version));
            if let Some(delete) = gone_with {
                let back = final_read
                    .iter()
                    .find(|f| f.version != *delete && delete.descends(&f.version));
                if let Some(back) = back {
                    return Err(SimFailure {
                        seed,
                        checker: "lost_write",
                        key: Some(key_name(key)),
                        detail: format!(
                            "delete {:?} was reaped and {:?}, which it superseded, is back",
                            delete.dot, back.version.dot
                        ),
                    });
                }
                if !final_read.iter().any(|f| f.version.descends(&v.version)) {
                    continue;
                }
            }
        }
        if !final_read.iter().any(|f| f.version.descends(&v.version)) {
            return Err(SimFailure {
                seed,
                checker: "lost_write",
                key: Some(key_name(key)),
                detail: format!(
                    "acknowledged write {:?} (value {:?}) is neither in the final read nor \
                     covered by a version there; final read: {:?}",
                    v.version.dot,
                    v.value.as_deref().map(String::from_utf8_lossy),
                    final_read
                        .iter()
                        .map(|f| (
                            f.version.dot,
                            f.value.as_deref().map(String::from_utf8_lossy)
                        ))
                        .collect::<Vec<_>>()
                ),
            });
        }
    }
    Ok(())
}

/// Checker `sibling_causality`: no returned version is dominated by another returned one.
pub fn check_siblings(
    seed: u64,
    key: &[u8],
    versions: &[VersionedValue],
) -> Result<(), SimFailure> {
    for a in versions {
        for b in versions {
            if a.version != b.version && a.version.descends(&b.version) {
                return Err(SimFailure {
                    seed,
                    checker: "sibling_causality",
                    key: Some(key_name(key)),
                    detail: format!(
                        "a get returned {:?} together with {:?}, which it has seen",
                        a.version.dot, b.version.dot
                    ),
                });
            }
        }
    }
    Ok(())
}

fn key_name(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// Runs one simulation; `Ok` if every checker passed.
pub fn run(config: &SimConfig) -> Result<SimReport, SimFailure> {
    let mut sim = Sim::new(config.clone())?;
    sim.run_all()
}

// ---------------------------------------------------------------------------------
// network, clients, nodes

#[derive(Debug, Clone)]
enum Msg {
    /// A client put or delete forwarded to a node of the key's targets.
    Forward(ClientReq),
    Put {
        op: OpId,
        hint_for: Option<NodeId>,
        partition: u32,
        key: Vec<u8>,
        version: VersionedValue,
    },
    PutAck {
        op: OpId,
        ok: bool,
    },
    Get {
        op: OpId,
        partition: u32,
        key: Vec<u8>,
    },
    GetReply {
        op: OpId,
        reply: Option<Vec<VersionedValue>>,
    },
    Repair {
        partition: u32,
        key: Vec<u8>,
        versions: Vec<VersionedValue>,
    },
    HintPut {
        id: u64,
        partition: u32,
        key: Vec<u8>,
        versions: Vec<VersionedValue>,
    },
    HintAck {
        id: u64,
        ok: bool,
    },
    Gossip(GossipMessage),
    Probe {
        id: u64,
    },
    ProbeAck {
        id: u64,
    },
}

impl Msg {
    fn tag(&self) -> u64 {
        match self {
            Msg::Forward(_) => 1,
            Msg::Put { .. } => 2,
            Msg::PutAck { .. } => 3,
            Msg::Get { .. } => 4,
            Msg::GetReply { .. } => 5,
            Msg::Repair { .. } => 6,
            Msg::HintPut { .. } => 7,
            Msg::HintAck { .. } => 8,
            Msg::Gossip(_) => 9,
            Msg::Probe { .. } => 10,
            Msg::ProbeAck { .. } => 11,
        }
    }

    fn detail(&self) -> u64 {
        match self {
            Msg::Forward(req) => req.req,
            Msg::Put { op, key, .. } | Msg::Get { op, key, .. } => op ^ ringkv_ring::xxh64(key, 0),
            Msg::PutAck { op, ok } => op ^ u64::from(*ok),
            Msg::GetReply { op, reply } => op ^ reply.as_ref().map_or(u64::MAX, |r| r.len() as u64),
            Msg::Repair { key, versions, .. } | Msg::HintPut { key, versions, .. } => {
                ringkv_ring::xxh64(key, versions.len() as u64)
            }
            Msg::HintAck { id, ok } => id ^ u64::from(*ok),
            Msg::Gossip(m) => ringkv_ring::xxh64(&m.encode(), 0),
            Msg::Probe { id } | Msg::ProbeAck { id } => *id,
        }
    }
}

#[derive(Debug, Clone)]
struct ClientReq {
    client: usize,
    req: u64,
    key: Vec<u8>,
    kind: ReqKind,
}

#[derive(Debug, Clone)]
enum ReqKind {
    Get,
    /// `value: None` deletes.
    Put {
        context: VClock,
        value: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone)]
enum ClientReply {
    PutOk,
    PutNotConfirmed,
    GetOk(Vec<VersionedValue>),
    GetFailed,
}

#[derive(Debug)]
enum Event {
    Deliver {
        from: NodeId,
        to: NodeId,
        msg: Box<Msg>,
    },
    ClientStart {
        client: usize,
    },
    ClientReply {
        client: usize,
        req: u64,
        reply: ClientReply,
    },
    ClientTimeout {
        client: usize,
        req: u64,
    },
    Tick,
    Restart {
        node: usize,
    },
    Heal,
}

/// What a client does once its pending request is answered.
#[derive(Debug, Clone)]
enum Then {
    Done,
    /// Read-modify-write: put `value` with the context of the read.
    PutAfterRead {
        value: Option<Vec<u8>>,
    },
}

#[derive(Debug)]
struct Pending {
    req: u64,
    key: Vec<u8>,
    then: Then,
}

#[derive(Debug, Default)]
struct Client {
    pending: Option<Pending>,
}

/// What a coordinator op belongs to (a handful per node at a time).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum OpCtx {
    Put {
        client: usize,
        req: u64,
        key: Vec<u8>,
        written: VersionedValue,
        context: VClock,
    },
    Get {
        client: usize,
        req: u64,
        key: Vec<u8>,
    },
    FinalRead {
        key: Vec<u8>,
    },
}

/// A fallback (`holder`) stored `version` of `key` for home node `home` and recorded
/// a hint: once hints drained, `home` must hold it or a version that has seen it.
#[derive(Debug, Clone)]
struct HintedWrite {
    holder: NodeId,
    home: NodeId,
    key: Vec<u8>,
    version: Version,
}

/// Everything but the nodes: what node handlers read and write besides their node.
struct World {
    cfg: SimConfig,
    now: u64,
    ring: Ring,
    /// Per partition: the preference order (home nodes, then fallbacks).
    prefs: Vec<Vec<NodeId>>,
    outbox: Vec<(NodeId, NodeId, Msg)>,
    replies: Vec<(usize, u64, ClientReply)>,
    acked: Vec<AckedWrite>,
    final_reads: BTreeMap<Vec<u8>, GetResult>,
    /// Every hinted write a fallback acknowledged.
    hinted: Vec<HintedWrite>,
    /// Every delete a coordinator made (acknowledged or not), by key: with a short
    /// tombstone grace the checkers accept a write gone because a delete that saw it was
    /// reaped, as long as nothing that delete superseded is back.
    deletes: Vec<(Vec<u8>, Version)>,
    report: SimReport,
    failure: Option<SimFailure>,
    /// Hash of the event trace so far.
    digest: u64,
}

impl World {
    fn trace(&mut self, parts: &[u64]) {
        for &p in parts {
            self.digest = mix64(self.digest ^ p).wrapping_add(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        self.outbox.push((from, to, msg));
    }

    fn fail(&mut self, failure: SimFailure) {
        if self.failure.is_none() {
            self.failure = Some(failure);
        }
    }

    fn homes(&self, partition: u32) -> &[NodeId] {
        let prefs = &self.prefs[partition as usize];
        &prefs[..self.cfg.n.min(prefs.len())]
    }
}

type Part = Partition<MemStorage>;

struct Node {
    id: NodeId,
    index: usize,
    disk: MemDisk,
    /// Data partitions and the hints partition; `None` while the node is down.
    open: Option<(Vec<Part>, HintStore<MemStorage>)>,
    incarnation: u64,
    coord: Coordinator,
    gossip: Gossip,
    fd: FailureDetector,
    ops: BTreeMap<OpId, OpCtx>,
    /// Replica copies of the puts this node coordinates, in flight, by (op, target).
    copies: BTreeMap<(OpId, NodeId), Copy>,
    /// Hint deliveries in flight: id -> (hint, give-up time).
    deliveries: BTreeMap<u64, (Hint, u64)>,
    next_delivery: u64,
}

/// One replica copy of a put, as a real node's copy task runs it
/// (`server::cluster`, `CoordinatorOutput::SendPut`): sent to its target; a home that
/// fails (no answer by `deadline`, or a refusal) gives way to a fallback with a hint
/// naming it, if the op has one free; a copy that fails for good leaves a hint here.
struct Copy {
    hint_for: Option<NodeId>,
    partition: u32,
    key: Vec<u8>,
    version: VersionedValue,
    started: u64,
    deadline: u64,
    /// The fallback the copy was handed to.
    fallback: Option<NodeId>,
}

fn durability(cfg: &SimConfig) -> Durability {
    match cfg.sync_interval_ms {
        None => Durability::Sync,
        Some(ms) => Durability::Interval { ms },
    }
}

fn data_config(partition: u32, durability: Durability, grace: Option<u64>) -> PartitionConfig {
    let default = PartitionConfig::default();
    PartitionConfig {
        partition: u64::from(partition),
        durability,
        segment_bytes_max: 8 << 10,
        buffer_bytes_max: 4 << 10,
        cache_bytes_max: 64 << 10,
        tombstone_grace_ms: grace.unwrap_or(default.tombstone_grace_ms),
        ..default
    }
}

fn hints_config(durability: Durability) -> PartitionConfig {
    PartitionConfig {
        partition: u64::from(u32::MAX),
        durability,
        segment_bytes_max: 16 << 10,
        buffer_bytes_max: 4 << 10,
        cache_bytes_max: 16 << 10,
        tombstone_grace_ms: 0,
        key_bytes_max: PartitionConfig::default().key_bytes_max + HINT_KEY_OVERHEAD,
        ..PartitionConfig::default()
    }
}

fn fd_config() -> FailureDetectorConfig {
    FailureDetectorConfig {
        unanswered_max: 2,
        probe_timeout_ms: 300,
        probe_interval_ms: 500,
        idle_probe_after_ms: Some(3000),
    }
}

impl Node {
    fn open_storage(
        &mut self,
        now: u64,
        q: u32,
        durability: Durability,
        grace: Option<u64>,
    ) -> Result<(), String> {
        let id = self.id.0;
        let mut parts = Vec::with_capacity(q as usize);
        for p in 0..q {
            let storage = self.disk.folder(&format!("/n{id}/p{p}"));
            let (part, _) = block_on(Partition::open(
                storage,
                data_config(p, durability, grace),
                now,
            ))
            .map_err(|e| format!("node {id} partition {p}: {e}"))?;
            parts.push(part);
        }
        let storage = self.disk.folder(&format!("/n{id}/hints"));
        let (hints, _) = block_on(Partition::open(storage, hints_config(durability), now))
            .map_err(|e| format!("node {id} hints: {e}"))?;
        self.open = Some((parts, HintStore::new(std::rc::Rc::new(hints))));
        Ok(())
    }

    /// Fresh in-memory state for an incarnation (what a process start builds).
    fn start_state(&mut self, now: u64, membership: &Membership, peers: &[NodeId], seed: u64) {
        self.incarnation += 1;
        self.coord = Coordinator::with_first_op_id(self.id, self.incarnation << 40);
        self.next_delivery = self.incarnation << 40;
        let mut fd = FailureDetector::new(fd_config());
        for &peer in peers {
            if peer != self.id {
                fd.add_peer(now, peer);
            }
        }
        self.fd = fd;
        self.gossip = Gossip::new(
            GossipConfig::new(self.id, vec![NodeId(1)], seed),
            membership.clone(),
        );
        self.ops.clear();
        self.deliveries.clear();
        self.copies.clear();
    }

    fn up(&self) -> bool {
        self.open.is_some()
    }

    fn reachable(&self, n: NodeId) -> bool {
        n == self.id || self.fd.is_reachable(n)
    }

    /// A client request arriving at this node (`forwarded`: from another node).
    fn client_request(&mut self, w: &mut World, req: ClientReq, forwarded: bool) {
        let Some((parts, hints)) = &self.open else {
            return;
        };
        let partition = w.ring.partition_for_key(&req.key);
        let pref = w.prefs[partition as usize].clone();
        let targets = choose_targets(&pref, w.cfg.n, |n| self.reachable(n));
        let local_target = targets.iter().find(|t| t.node == self.id).copied();
        let now = w.now;
        match req.kind {
            ReqKind::Get => {
                let local = if local_target.is_some() {
                    match block_on(replica_get(&parts[partition as usize], &req.key)) {
                        Ok(v) => Some(v),
                        Err(_) => {
                            w.report.store_errors += 1;
                            None
                        }
                    }
                } else {
                    None
                };
                let remote: Vec<NodeId> = targets
                    .iter()
                    .map(|t| t.node)
                    .filter(|&n| n != self.id)
                    .collect();
                let op = self.coord.start_get(
                    now,
                    partition,
                    req.key.clone(),
                    &remote,
                    local,
                    w.cfg.r,
                    w.cfg.op_timeout_ms,
                );
                self.ops.insert(
                    op,
                    OpCtx::Get {
                        client: req.client,
                        req: req.req,
                        key: req.key,
                    },
                );
            }
            ReqKind::Put { context, value } => {
                if targets.is_empty() {
                    w.replies
                        .push((req.client, req.req, ClientReply::PutNotConfirmed));
                    return;
                }
                if local_target.is_none() && !forwarded {
                    w.report.forwarded += 1;
                    let to = targets[0].node;
                    let req = ClientReq {
                        kind: ReqKind::Put { context, value },
                        ..req
                    };
                    w.send(self.id, to, Msg::Forward(req));
                    return;
                }
                let part = &parts[partition as usize];
                let made = block_on(part.coordinate_put(
                    self.id.0,
                    &req.key,
                    &context,
                    value.as_deref(),
                    now,
                    w.cfg.clock_entries_max,
                ));
                let made = match made {
                    Ok(made) => made,
                    Err(_) => {
                        w.report.store_errors += 1;
                        w.replies
                            .push((req.client, req.req, ClientReply::PutNotConfirmed));
                        return;
                    }
                };
                if value.is_none() {
                    w.deletes.push((req.key.clone(), made.version.clone()));
                }
                let mut local_acks = usize::from(local_target.is_some());
                if let Some(Target {
                    hint_for: Some(home),
                    ..
                }) = local_target
                {
                    if w.cfg.hints {
                        if block_on(hints.record(home, partition, &req.key, now)).is_ok() {
                            w.report.hints_stored += 1;
                            w.hinted.push(HintedWrite {
                                holder: self.id,
                                home,
                                key: req.key.clone(),
                                version: made.version.clone(),
                            });
                        } else {
                            w.report.store_errors += 1;
                            local_acks = 0;
                        }
                    }
                }
                // as a real node does: a down home with no fallback left gets a hint
                // here (this node holds the write)
                if w.cfg.hints {
                    for home in uncovered_homes(&pref, w.cfg.n, &targets, self.id) {
                        if block_on(hints.record(home, partition, &req.key, now)).is_ok() {
                            w.report.hints_stored += 1;
                        } else {
                            w.report.store_errors += 1;
                        }
                    }
                }
                let written = VersionedValue {
                    version: made.version,
                    value,
                };
                let remote: Vec<Target> = targets
                    .iter()
                    .filter(|t| t.node != self.id)
                    .copied()
                    .collect();
                let op = self.coord.start_put(
                    now,
                    partition,
                    req.key.clone(),
                    written.clone(),
                    &remote,
                    local_acks,
                    w.cfg.w,
                    w.cfg.op_timeout_ms,
                );
                self.ops.insert(
                    op,
                    OpCtx::Put {
                        client: req.client,
                        req: req.req,
                        key: req.key,
                        written,
                        context,
                    },
                );
            }
        }
        self.drain(w);
    }

    /// A final `R = N` read of `key` from its home replicas, coordinated here.
    fn final_read(&mut self, w: &mut World, key: Vec<u8>) {
        let Some((parts, _)) = &self.open else {
            return;
        };
        let partition = w.ring.partition_for_key(&key);
        let homes = w.homes(partition).to_vec();
        let local = if homes.contains(&self.id) {
            block_on(replica_get(&parts[partition as usize], &key)).ok()
        } else {
            None
        };
        let remote: Vec<NodeId> = homes.iter().copied().filter(|&n| n != self.id).collect();
        let op = self.coord.start_get(
            w.now,
            partition,
            key.clone(),
            &remote,
            local,
            homes.len(),
            2000,
        );
        self.ops.insert(op, OpCtx::FinalRead { key });
        self.drain(w);
    }

    /// Stores `versions` of `key` in the local partition; false if any failed.
    fn store(
        &self,
        w: &mut World,
        partition: u32,
        key: &[u8],
        versions: &[VersionedValue],
    ) -> bool {
        let Some((parts, _)) = &self.open else {
            return false;
        };
        let Some(part) = parts.get(partition as usize) else {
            return false;
        };
        let mut ok = true;
        for v in versions {
            // what the replica did (and the stored seqs) is part of the trace
            let outcome = match block_on(replica_put(part, key, v, w.now)) {
                Ok(ApplyOutcome::Applied { replaced, siblings }) => {
                    1 + ((replaced as u64) << 8) + ((siblings as u64) << 24)
                }
                Ok(ApplyOutcome::Stale(_)) => 2,
                Err(_) => {
                    w.report.store_errors += 1;
                    ok = false;
                    3
                }
            };
            let last_seq = part.versions(key).iter().map(|l| l.seq).max().unwrap_or(0);
            w.trace(&[0x57, self.id.0, outcome, last_seq]);
        }
        ok
    }

    fn handle(&mut self, w: &mut World, from: NodeId, msg: Msg) {
        if !self.up() {
            return;
        }
        let now = w.now;
        self.fd.handle_answered(now, from);
        match msg {
            Msg::Forward(req) => self.client_request(w, req, true),
            Msg::Put {
                op,
                hint_for,
                partition,
                key,
                version,
            } => {
                let mut ok = self.store(w, partition, &key, std::slice::from_ref(&version));
                if let (true, Some(home), true) = (ok, hint_for, w.cfg.hints) {
                    let Some((_, hints)) = &self.open else { return };
                    // after the version is stored (see `replica`)
                    if block_on(hints.record(home, partition, &key, now)).is_ok() {
                        w.report.hints_stored += 1;
                        w.hinted.push(HintedWrite {
                            holder: self.id,
                            home,
                            key: key.clone(),
                            version: version.version.clone(),
                        });
                    } else {
                        w.report.store_errors += 1;
                        ok = false;
                    }
                }
                w.send(self.id, from, Msg::PutAck { op, ok });
            }
            Msg::PutAck { op, ok } => {
                // the copy it answers: sent to `from`, or handed to `from` as a fallback
                let copy = if self
                    .copies
                    .get(&(op, from))
                    .is_some_and(|c| c.fallback.is_none())
                {
                    Some((op, from))
                } else {
                    self.copies
                        .iter()
                        .find(|(&(o, _), c)| o == op && c.fallback == Some(from))
                        .map(|(&k, _)| k)
                };
                if let Some(copy) = copy {
                    if ok {
                        self.copy_done(w, copy, true);
                    } else {
                        self.copy_failed(w, copy);
                    }
                }
            }
            Msg::Get { op, partition, key } => {
                let Some((parts, _)) = &self.open else { return };
                let reply = match parts.get(partition as usize) {
                    Some(part) => block_on(replica_get(part, &key)).ok(),
                    None => None,
                };
                w.send(self.id, from, Msg::GetReply { op, reply });
            }
            Msg::GetReply { op, reply } => {
                self.coord.handle_get_reply(now, op, from, reply);
                self.drain(w);
            }
            Msg::Repair {
                partition,
                key,
                versions,
            } => {
                self.store(w, partition, &key, &versions);
            }
            Msg::HintPut {
                id,
                partition,
                key,
                versions,
            } => {
                let ok = self.store(w, partition, &key, &versions);
                w.send(self.id, from, Msg::HintAck { id, ok });
            }
            Msg::HintAck { id, ok } => {
                let Some((hint, _)) = self.deliveries.remove(&id) else {
                    return;
                };
                if !ok {
                    return;
                }
                let Some((_, hints)) = &self.open else { return };
                let removed = match block_on(hints.delivered(&hint, now)) {
                    Ok(true) => {
                        w.report.hints_delivered += 1;
                        1
                    }
                    Ok(false) => 0,
                    Err(_) => {
                        w.report.store_errors += 1;
                        2
                    }
                };
                w.trace(&[0x4D, self.id.0, hint.seq, removed]);
            }
            Msg::Gossip(m) => {
                self.gossip.handle_message(now, from, m);
                self.drain_gossip(w);
            }
            Msg::Probe { id } => w.send(self.id, from, Msg::ProbeAck { id }),
            Msg::ProbeAck { id } => self.fd.handle_probe_answered(now, from, id),
        }
    }

    fn drain_gossip(&mut self, w: &mut World) {
        for _ in 0..1000 {
            let Some(out) = self.gossip.poll_outgoing() else {
                break;
            };
            w.send(self.id, out.to, Msg::Gossip(out.message));
        }
        self.gossip.poll_changed();
    }

    /// Carries out the coordinator's outputs.
    fn drain(&mut self, w: &mut World) {
        // bounded: each output is produced once per op event
        for _ in 0..100_000 {
            let Some(out) = self.coord.poll_output() else {
                return;
            };
            match out {
                CoordinatorOutput::SendPut {
                    op,
                    to,
                    hint_for,
                    partition,
                    key,
                    version,
                } => {
                    // as a real node: a home gives way to a fallback after half the
                    // op's time when the op has one free, else it has the whole time
                    let timeout = w.cfg.op_timeout_ms;
                    let candidates = self.fallback_candidates(w, partition);
                    let can_give_way =
                        hint_for.is_none() && self.coord.has_fallback(op, to, candidates);
                    let first = if can_give_way { timeout / 2 } else { timeout };
                    w.send(
                        self.id,
                        to,
                        Msg::Put {
                            op,
                            hint_for,
                            partition,
                            key: key.clone(),
                            version: version.clone(),
                        },
                    );
                    self.copies.insert(
                        (op, to),
                        Copy {
                            hint_for,
                            partition,
                            key,
                            version,
                            started: w.now,
                            deadline: w.now + first,
                            fallback: None,
                        },
                    );
                }
                CoordinatorOutput::SendGet {
                    op,
                    to,
                    partition,
                    key,
                } => w.send(self.id, to, Msg::Get { op, partition, key }),
                CoordinatorOutput::Repair {
                    to,
                    partition,
                    key,
                    versions,
                } => {
                    w.report.read_repairs += 1;
                    if to == self.id {
                        self.store(w, partition, &key, &versions);
                    } else {
                        w.send(
                            self.id,
                            to,
                            Msg::Repair {
                                partition,
                                key,
                                versions,
                            },
                        );
                    }
                }
                CoordinatorOutput::Silent { node } => self.fd.handle_unanswered(w.now, node),
                CoordinatorOutput::PutDone { op, result } => {
                    let Some(OpCtx::Put {
                        client,
                        req,
                        key,
                        written,
                        context,
                    }) = self.ops.remove(&op)
                    else {
                        continue;
                    };
                    let reply = match result {
                        PutResult::Ok { .. } => {
                            if written.value.is_some() {
                                w.report.acked_puts += 1;
                            } else {
                                w.report.acked_deletes += 1;
                            }
                            w.acked.push(AckedWrite {
                                key,
                                written,
                                context,
                            });
                            ClientReply::PutOk
                        }
                        PutResult::NotConfirmed { .. } => {
                            w.report.not_confirmed += 1;
                            ClientReply::PutNotConfirmed
                        }
                    };
                    w.replies.push((client, req, reply));
                }
                CoordinatorOutput::GetDone { op, result } => {
                    let Some(ctx) = self.ops.remove(&op) else {
                        continue;
                    };
                    let seed = w.cfg.seed;
                    match ctx {
                        OpCtx::Get { client, req, key } => {
                            let reply = match result {
                                GetResult::Ok { versions, .. } => {
                                    w.report.gets_ok += 1;
                                    if let Err(f) = check_siblings(seed, &key, &versions) {
                                        w.fail(f);
                                    }
                                    ClientReply::GetOk(versions)
                                }
                                GetResult::Failed { .. } => {
                                    w.report.gets_failed += 1;
                                    ClientReply::GetFailed
                                }
                            };
                            w.replies.push((client, req, reply));
                        }
                        OpCtx::FinalRead { key } => {
                            if let GetResult::Ok { versions, .. } = &result {
                                if let Err(f) = check_siblings(seed, &key, versions) {
                                    w.fail(f);
                                }
                            }
                            w.final_reads.insert(key, result);
                        }
                        OpCtx::Put { .. } => {}
                    }
                }
            }
        }
    }

    /// Periodic work: deadlines, failure detection, gossip.
    fn tick(&mut self, w: &mut World) {
        if !self.up() {
            return;
        }
        let now = w.now;
        let overdue: Vec<(OpId, NodeId)> = self
            .copies
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(&k, _)| k)
            .collect();
        for copy in overdue {
            self.copy_failed(w, copy);
        }
        self.coord.tick(now);
        self.drain(w);
        self.fd.tick(now);
        for _ in 0..1000 {
            let Some(probe) = self.fd.poll_probe() else {
                break;
            };
            w.send(self.id, probe.peer, Msg::Probe { id: probe.probe_id });
        }
        while self.fd.poll_change().is_some() {}
        self.gossip.tick(now);
        self.drain_gossip(w);
        self.deliveries.retain(|_, (_, until)| *until > now);
    }

    /// The reachable fallbacks of `partition`, in preference order.
    fn fallback_candidates(&self, w: &World, partition: u32) -> Vec<NodeId> {
        let pref = &w.prefs[partition as usize];
        pref.iter()
            .skip(w.cfg.n.min(pref.len()))
            .copied()
            .filter(|&n| self.reachable(n))
            .collect()
    }

    /// A copy's current attempt failed: a home's copy goes to a fallback if the op
    /// has one free (with the op's time left), else the copy has failed.
    fn copy_failed(&mut self, w: &mut World, key: (OpId, NodeId)) {
        let (op, to) = key;
        let Some(copy) = self.copies.get(&key) else {
            return;
        };
        if copy.fallback.is_some() {
            self.copy_done(w, key, false);
            return;
        }
        let home = copy.hint_for.unwrap_or(to);
        let candidates = self.fallback_candidates(w, copy.partition);
        let Some(fallback) = self.coord.claim_fallback(op, to, candidates) else {
            self.copy_done(w, key, false);
            return;
        };
        w.report.fallback_copies += 1;
        let copy = self.copies.get_mut(&key).expect("present");
        copy.fallback = Some(fallback);
        copy.deadline = (copy.started + w.cfg.op_timeout_ms).max(w.now + 10);
        let msg = Msg::Put {
            op,
            hint_for: Some(home),
            partition: copy.partition,
            key: copy.key.clone(),
            version: copy.version.clone(),
        };
        w.send(self.id, fallback, msg);
    }

    /// A copy ended: a failed one leaves a hint here (this node holds the write), then
    /// the coordinator hears of it, under the target it was sent to.
    fn copy_done(&mut self, w: &mut World, key: (OpId, NodeId), ok: bool) {
        let (op, to) = key;
        let Some(copy) = self.copies.remove(&key) else {
            return;
        };
        let home = copy.hint_for.unwrap_or(to);
        if !ok && home != self.id && w.cfg.hints {
            if let Some((_, hints)) = &self.open {
                if block_on(hints.record(home, copy.partition, &copy.key, w.now)).is_ok() {
                    w.report.hints_stored += 1;
                    w.report.failed_copy_hints += 1;
                    w.hinted.push(HintedWrite {
                        holder: self.id,
                        home,
                        key: copy.key.clone(),
                        version: copy.version.version.clone(),
                    });
                } else {
                    w.report.store_errors += 1;
                }
            }
        }
        self.coord.handle_put_ack(w.now, op, to, ok);
        self.drain(w);
    }

    /// The `interval` durability timer: makes every write so far durable.
    fn sync_all(&self, w: &mut World) {
        let Some((parts, hints)) = &self.open else {
            return;
        };
        for part in parts.iter().chain(std::iter::once(&**hints.partition())) {
            if block_on(part.sync()).is_err() {
                w.report.store_errors += 1;
            }
        }
    }

    /// Low-priority work of a real node: segment hint files and compaction, which keeps
    /// the tombstones the node's pending hints still have to deliver (as a shard does).
    fn background(&self, w: &mut World) {
        let Some((parts, hints)) = &self.open else {
            return;
        };
        let me = self.id;
        for (p, part) in parts.iter().enumerate() {
            if block_on(part.write_pending_hints()).is_err() {
                w.report.store_errors += 1;
            }
            let keep = |key: &[u8]| hints.names_key(|t| t != me, p as u32, key);
            if part.compaction_due_keeping(0.3, &keep) {
                match block_on(part.compact_keeping(w.now, &keep)) {
                    Ok(report) => {
                        w.report.compactions += u64::from(report.segments_in > 0);
                        w.report.tombstones_reaped += report.tombstones_dropped;
                        w.report.tombstones_held += report.tombstones_held;
                    }
                    Err(_) => w.report.store_errors += 1,
                }
            }
        }
    }

    /// Sends the current local siblings of each pending hint whose target looks
    /// reachable; the hint is removed once the target acknowledged them.
    fn deliver_hints(&mut self, w: &mut World) {
        let Some((parts, hints)) = &self.open else {
            return;
        };
        let now = w.now;
        let (fd, me) = (&self.fd, self.id);
        for hint in hints.pending(64, |t| t != me && fd.is_reachable(t)) {
            if self.deliveries.values().any(|(h, _)| *h == hint) {
                continue;
            }
            let Some(part) = parts.get(hint.partition as usize) else {
                continue;
            };
            let versions = match block_on(replica_get(part, &hint.key)) {
                Ok(v) => v,
                Err(_) => {
                    w.report.store_errors += 1;
                    continue;
                }
            };
            let id = self.next_delivery;
            self.next_delivery += 1;
            let msg = Msg::HintPut {
                id,
                partition: hint.partition,
                key: hint.key.clone(),
                versions,
            };
            w.send(self.id, hint.target, msg);
            self.deliveries.insert(id, (hint, now + 1000));
        }
        let store = hints.partition();
        if store.compaction_due(0.5) && block_on(store.compact(now)).is_err() {
            w.report.store_errors += 1;
        }
    }
}

struct Sim {
    w: World,
    nodes: Vec<Node>,
    membership: Membership,
    node_ids: Vec<NodeId>,
    rng: Rng,
    queue: BTreeMap<(u64, u64), Event>,
    next_event: u64,
    clients: Vec<Client>,
    next_req: u64,
    ops_started: usize,
    faults: bool,
    /// The side of each node while the network is split.
    split: Option<Vec<bool>>,
    events: u64,
    last_crash_ms: Option<u64>,
}

const TICK_MS: u64 = 50;
const HINT_EVERY_TICKS: u64 = 10;
const COMPACT_EVERY_TICKS: u64 = 100;
const START_MS: u64 = 1_000_000;
const EVENTS_MAX: u64 = 50_000_000;

impl Sim {
    fn new(cfg: SimConfig) -> Result<Sim, SimFailure> {
        let setup = |detail: String| SimFailure {
            seed: cfg.seed,
            checker: "setup",
            key: None,
            detail,
        };
        if cfg.nodes == 0 || cfg.n == 0 || cfg.keys == 0 || cfg.clients == 0 {
            return Err(setup("nodes, n, keys and clients must be positive".into()));
        }
        let mut membership =
            Membership::new(cfg.partitions).map_err(|e| setup(format!("membership: {e}")))?;
        let node_ids: Vec<NodeId> = (1..=cfg.nodes as u64).map(NodeId).collect();
        for &id in &node_ids {
            membership
                .join(id, &format!("sim:{}", id.0), 100, "", 1)
                .map_err(|e| setup(format!("join: {e}")))?;
            membership
                .set_status(id, Status::Valid)
                .map_err(|e| setup(format!("status: {e}")))?;
        }
        let ring = Ring::from_membership(&membership);
        let prefs: Vec<Vec<NodeId>> = (0..cfg.partitions)
            .map(|p| ring.preference_list(p, cfg.n).iter().collect())
            .collect();
        let mut rng = Rng::new(cfg.seed);
        let mut nodes = Vec::with_capacity(cfg.nodes);
        for (index, &id) in node_ids.iter().enumerate() {
            let mut node = Node {
                id,
                index,
                disk: MemDisk::new(),
                open: None,
                incarnation: 0,
                coord: Coordinator::new(id),
                gossip: Gossip::new(
                    GossipConfig::new(id, vec![NodeId(1)], 0),
                    membership.clone(),
                ),
                fd: FailureDetector::new(fd_config()),
                ops: BTreeMap::new(),
                copies: BTreeMap::new(),
                deliveries: BTreeMap::new(),
                next_delivery: 0,
            };
            node.open_storage(
                START_MS,
                cfg.partitions,
                durability(&cfg),
                cfg.tombstone_grace_ms,
            )
            .map_err(setup)?;
            node.start_state(START_MS, &membership, &node_ids, rng.next_u64());
            nodes.push(node);
        }
        let clients = (0..cfg.clients).map(|_| Client::default()).collect();
        let w = World {
            now: START_MS,
            ring,
            prefs,
            outbox: Vec::new(),
            replies: Vec::new(),
            acked: Vec::new(),
            final_reads: BTreeMap::new(),
            hinted: Vec::new(),
            deletes: Vec::new(),
            report: SimReport {
                seed: cfg.seed,
                nodes: cfg.nodes,
                ..SimReport::default()
            },
            failure: None,
            digest: 0xcbf2_9ce4_8422_2325,
            cfg,
        };
        let mut sim = Sim {
            w,
            nodes,
            membership,
            node_ids,
            rng,
            queue: BTreeMap::new(),
            next_event: 0,
            clients,
            next_req: 1,
            ops_started: 0,
            faults: true,
            split: None,
            events: 0,
            last_crash_ms: None,
        };
        sim.schedule(0, Event::Tick);
        for client in 0..sim.clients.len() {
            let delay = sim.rng.below(100);
            sim.schedule(delay, Event::ClientStart { client });
        }
        Ok(sim)
    }

    fn trace(&mut self, parts: &[u64]) {
        self.w.trace(parts);
    }

    fn schedule(&mut self, delay_ms: u64, event: Event) {
        let at = self.w.now + delay_ms;
        self.queue.insert((at, self.next_event), event);
        self.next_event += 1;
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.rng.next_u64() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }

    fn separated(&self, a: NodeId, b: NodeId) -> bool {
        match &self.split {
            None => false,
            Some(side) => side[(a.0 - 1) as usize] != side[(b.0 - 1) as usize],
        }
    }

    /// Puts the outbox on the simulated network.
    fn flush(&mut self) {
        let outbox = std::mem::take(&mut self.w.outbox);
        for (from, to, msg) in outbox {
            self.w.report.messages_sent += 1;
            if self.separated(from, to) || (self.faults && self.chance(self.w.cfg.loss)) {
                self.w.report.messages_dropped += 1;
                self.trace(&[0xD0, from.0, to.0, msg.tag()]);
                continue;
            }
            let copies = if self.faults && self.chance(self.w.cfg.dup) {
                self.w.report.messages_duplicated += 1;
                2
            } else {
                1
            };
            for _ in 0..copies {
                let mut delay = 1 + self.rng.below(20);
                if self.faults && self.chance(self.w.cfg.long_delay) {
                    delay += self.rng.below(300);
                }
                self.schedule(
                    delay,
                    Event::Deliver {
                        from,
                        to,
                        msg: Box::new(msg.clone()),
                    },
                );
            }
        }
        let replies = std::mem::take(&mut self.w.replies);
        for (client, req, reply) in replies {
            self.schedule(1, Event::ClientReply { client, req, reply });
        }
    }

    fn crash(&mut self, index: usize) {
        let seed = self.rng.next_u64();
        let node = &mut self.nodes[index];
        if !node.up() {
            return;
        }
        node.open = None; // the process dies: partitions dropped without a close
        node.disk.crash(seed);
        node.ops.clear();
        node.deliveries.clear();
        self.w.report.crashes += 1;
        self.trace(&[0xC0, index as u64]);
        let down_ms = 200 + self.rng.below(3000);
        self.schedule(down_ms, Event::Restart { node: index });
    }

    fn restart(&mut self, index: usize) -> Result<(), SimFailure> {
        if self.nodes[index].up() {
            return Ok(());
        }
        let seed = self.rng.next_u64();
        let now = self.w.now;
        let q = self.w.cfg.partitions;
        let durability = durability(&self.w.cfg);
        let grace = self.w.cfg.tombstone_grace_ms;
        let node = &mut self.nodes[index];
        node.open_storage(now, q, durability, grace)
            .map_err(|detail| SimFailure {
                seed: self.w.cfg.seed,
                checker: "setup",
                key: None,
                detail: format!("restart: {detail}"),
            })?;
        node.start_state(now, &self.membership, &self.node_ids, seed);
        self.trace(&[0xE0, index as u64]);
        Ok(())
    }

    fn faults_tick(&mut self) {
        if self.chance(self.w.cfg.crash_prob) {
            let index = self.rng.below(self.nodes.len() as u64) as usize;
            let spaced = match (self.w.cfg.sync_interval_ms, self.last_crash_ms) {
                (Some(ms), Some(last)) => self.w.now >= last + 4 * ms.max(TICK_MS),
                _ => true,
            };
            if spaced && self.nodes[index].up() {
                self.last_crash_ms = Some(self.w.now);
                self.crash(index);
            }
        }
        if self.split.is_none() && self.nodes.len() > 1 && self.chance(self.w.cfg.partition_prob) {
            let mut side: Vec<bool> = (0..self.nodes.len())
                .map(|_| self.rng.below(2) == 1)
                .collect();
            if side.iter().all(|&s| s) || side.iter().all(|&s| !s) {
                let flip = self.rng.below(side.len() as u64) as usize;
                side[flip] = !side[flip];
            }
            let mask = side
                .iter()
                .enumerate()
                .fold(0u64, |m, (i, &s)| m | (u64::from(s) << i));
            self.trace(&[0x5B, mask]);
            self.split = Some(side);
            self.w.report.partitions += 1;
            let heal_in = 1000 + self.rng.below(7000);
            self.schedule(heal_in, Event::Heal);
        }
    }

    fn client_start(&mut self, client: usize) {
        if !self.faults || self.ops_started >= self.w.cfg.client_ops {
            return;
        }
        self.ops_started += 1;
        let key = format!("key-{:02}", self.rng.below(self.w.cfg.keys as u64)).into_bytes();
        let req = self.next_req;
        self.next_req += 1;
        let value = format!("c{client}-r{req}").into_bytes();
        let pick = self.rng.below(100);
        let (kind, then) = match pick {
            0..=34 => (ReqKind::Get, Then::PutAfterRead { value: Some(value) }),
            35..=54 => (
                ReqKind::Put {
                    context: VClock::new(),
                    value: Some(value),
                },
                Then::Done,
            ),
            55..=69 => (ReqKind::Get, Then::PutAfterRead { value: None }),
            _ => (ReqKind::Get, Then::Done),
        };
        self.send_request(client, req, key, kind, then);
    }

    fn send_request(&mut self, client: usize, req: u64, key: Vec<u8>, kind: ReqKind, then: Then) {
        let node = self.rng.below(self.nodes.len() as u64) as usize;
        self.trace(&[
            0xA0,
            client as u64,
            req,
            node as u64,
            ringkv_ring::xxh64(&key, 0),
        ]);
        self.clients[client].pending = Some(Pending {
            req,
            key: key.clone(),
            then,
        });
        let timeout = self.w.cfg.client_timeout_ms;
        self.schedule(timeout, Event::ClientTimeout { client, req });
        let request = ClientReq {
            client,
            req,
            key,
            kind,
        };
        // a request to a node that is down is lost: the client times out
        self.nodes[node].client_request(&mut self.w, request, false);
    }

    fn client_reply(&mut self, client: usize, req: u64, reply: Option<ClientReply>) {
        let matches = self.clients[client]
            .pending
            .as_ref()
            .is_some_and(|p| p.req == req);
        if !matches {
            return;
        }
        let Some(pending) = self.clients[client].pending.take() else {
            return;
        };
        let outcome = match &reply {
            None => 0,
            Some(ClientReply::PutOk) => 1,
            Some(ClientReply::PutNotConfirmed) => 2,
            Some(ClientReply::GetOk(v)) => 3 + ((v.len() as u64) << 8),
            Some(ClientReply::GetFailed) => 4,
        };
        self.trace(&[0xB0, client as u64, req, outcome]);
        if reply.is_none() {
            self.w.report.client_timeouts += 1;
        }
        if let (Then::PutAfterRead { value }, Some(ClientReply::GetOk(versions))) =
            (pending.then, reply)
        {
            let seen: Vec<Version> = versions.into_iter().map(|v| v.version).collect();
            let context = context_of(&seen);
            let req = self.next_req;
            self.next_req += 1;
            self.send_request(
                client,
                req,
                pending.key,
                ReqKind::Put { context, value },
                Then::Done,
            );
            return;
        }
        let think = self.rng.below(50);
        self.schedule(think, Event::ClientStart { client });
    }

    fn step(&mut self, event: Event) -> Result<(), SimFailure> {
        match event {
            Event::Deliver { from, to, msg } => {
                let index = (to.0 - 1) as usize;
                if self.separated(from, to) || !self.nodes[index].up() {
                    self.w.report.messages_dropped += 1;
                    self.trace(&[0xD1, from.0, to.0, msg.tag()]);
                } else {
                    self.trace(&[0xDE, from.0, to.0, msg.tag(), msg.detail()]);
                    self.nodes[index].handle(&mut self.w, from, *msg);
                }
            }
            Event::ClientStart { client } => self.client_start(client),
            Event::ClientReply { client, req, reply } => {
                self.client_reply(client, req, Some(reply))
            }
            Event::ClientTimeout { client, req } => self.client_reply(client, req, None),
            Event::Tick => {
                if self.faults {
                    self.faults_tick();
                }
                let tick = (self.w.now - START_MS) / TICK_MS;
                let sync_every = self.w.cfg.sync_interval_ms.map(|ms| (ms / TICK_MS).max(1));
                for node in &mut self.nodes {
                    if sync_every.is_some_and(|every| tick % every == 0) {
                        node.sync_all(&mut self.w);
                    }
                    if tick % COMPACT_EVERY_TICKS == (node.index as u64) % COMPACT_EVERY_TICKS {
                        node.background(&mut self.w);
                    }
                    node.tick(&mut self.w);
                    if tick % HINT_EVERY_TICKS == (node.index as u64) % HINT_EVERY_TICKS
                        && self.w.cfg.hints
                    {
                        node.deliver_hints(&mut self.w);
                    }
                }
                self.schedule(TICK_MS, Event::Tick);
            }
            Event::Restart { node } => self.restart(node)?,
            Event::Heal => {
                if self.split.take().is_some() {
                    self.trace(&[0x4E]);
                }
            }
        }
        self.flush();
        Ok(())
    }

    /// Runs events until `until_ms` or until `stop` holds (checked between events).
    fn run_until(&mut self, until_ms: u64, stop: impl Fn(&Sim) -> bool) -> Result<(), SimFailure> {
        while !stop(self) {
            let Some((&(at, seq), _)) = self.queue.first_key_value() else {
                break;
            };
            if at > until_ms {
                self.w.now = self.w.now.max(until_ms);
                break;
            }
            let Some(event) = self.queue.remove(&(at, seq)) else {
                break;
            };
            self.events += 1;
            if self.events > EVENTS_MAX {
                return Err(self.failure("liveness", None, "event budget exhausted".into()));
            }
            self.w.now = at;
            self.step(event)?;
            if let Some(f) = self.w.failure.take() {
                return Err(f);
            }
        }
        Ok(())
    }

    /// The pending hints each running node counts in memory are the ones its store
    /// holds (the counts decide whether a delivery round walks the store at all).
    fn check_hint_counts(&self) -> Result<(), SimFailure> {
        for node in &self.nodes {
            let Some((_, hints)) = &node.open else {
                continue;
            };
            let held = pending_hint_count(hints.partition());
            if held != hints.pending_count() {
                return Err(self.failure(
                    "hint_counts",
                    None,
                    format!(
                        "node {} holds {held} hints and counts {}",
                        node.id,
                        hints.pending_count()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn failure(&self, checker: &'static str, key: Option<&[u8]>, detail: String) -> SimFailure {
        SimFailure {
            seed: self.w.cfg.seed,
            checker,
            key: key.map(key_name),
            detail,
        }
    }

    fn run_all(&mut self) -> Result<SimReport, SimFailure> {
        // phase 1: clients under faults
        let limit = START_MS + self.w.cfg.max_fault_ms;
        self.run_until(limit, |s| {
            s.ops_started >= s.w.cfg.client_ops && s.clients.iter().all(|c| c.pending.is_none())
        })?;
        if self.ops_started < self.w.cfg.client_ops
            || self.clients.iter().any(|c| c.pending.is_some())
        {
            return Err(self.failure(
                "liveness",
                None,
                format!(
                    "{} of {} client ops started by {} ms",
                    self.ops_started, self.w.cfg.client_ops, self.w.cfg.max_fault_ms
                ),
            ));
        }
        self.check_hint_counts()?;
        // phase 2: heal, restart, clean network, let hints and gossip settle
        self.faults = false;
        self.split = None;
        for index in 0..self.nodes.len() {
            self.restart(index)?;
        }
        self.trace(&[0x4EA1]);
        let settle_until = self.w.now + self.w.cfg.settle_ms;
        self.run_until(settle_until, |_| false)?;
        if self.w.cfg.hints {
            for node in &self.nodes {
                if let Some((_, hints)) = &node.open {
                    let left = pending_hint_count(hints.partition());
                    if left > 0 {
                        return Err(self.failure(
                            "hints_drained",
                            None,
                            format!("node {} still holds {left} hints after settling", node.id),
                        ));
                    }
                }
            }
        }
        if self.w.cfg.hints && self.w.cfg.sync_interval_ms.is_none() {
            self.check_handoff()?;
        }
        // phase 3: final reads from the home replicas, twice (the first repairs)
        let keys: Vec<Vec<u8>> = (0..self.w.cfg.keys)
            .map(|i| format!("key-{i:02}").into_bytes())
            .collect();
        for _round in 0..2 {
            self.w.final_reads.clear();
            for key in &keys {
                let partition = self.w.ring.partition_for_key(key);
                let coordinator = self.w.homes(partition)[0];
                self.nodes[(coordinator.0 - 1) as usize].final_read(&mut self.w, key.clone());
                self.flush();
            }
            let until = self.w.now + 5000;
            self.run_until(until, |_| false)?;
        }
        self.check(&keys)?;
        self.w.report.sim_ms = self.w.now - START_MS;
        self.trace(&[self.w.report.acked_puts, self.w.report.messages_sent]);
        self.w.report.digest = self.w.digest;
        Ok(self.w.report.clone())
    }

    /// Checker `hint_handoff`: every hinted write reached its home node (before any
    /// final read repair could paper over a lost hint).
    fn check_handoff(&self) -> Result<(), SimFailure> {
        for hinted in &self.w.hinted {
            let partition = self.w.ring.partition_for_key(&hinted.key);
            let node = &self.nodes[(hinted.home.0 - 1) as usize];
            let Some((parts, _)) = &node.open else {
                return Err(self.failure("hint_handoff", Some(&hinted.key), "home down".into()));
            };
            let held = block_on(replica_get(&parts[partition as usize], &hinted.key))
                .map_err(|e| self.failure("hint_handoff", Some(&hinted.key), e.to_string()))?;
            if held.iter().any(|h| h.version.descends(&hinted.version)) {
                continue;
            }
            // under a grace the write may be gone with a reaped delete that saw it, as
            // long as nothing that delete superseded is back on the home
            let deletes = self.expired_deletes(&hinted.key).unwrap_or_default();
            let mut covering = deletes.iter().filter(|d| d.descends(&hinted.version));
            let mut back = None;
            let reaped_with = covering.any(|d| {
                let superseded = held
                    .iter()
                    .find(|h| h.version != *d && d.descends(&h.version));
                back = back.or(superseded.map(|h| (d.dot, h.version.dot)));
                superseded.is_none()
            });
            if let (false, Some((delete, old))) = (reaped_with, back) {
                return Err(self.failure(
                    "hint_handoff",
                    Some(&hinted.key),
                    format!(
                        "{} acknowledged {:?} as a fallback for {}; delete {delete:?}, which saw it, \
                         was reaped there and {old:?}, which it superseded, is back",
                        hinted.holder, hinted.version.dot, hinted.home
                    ),
                ));
            }
            if !reaped_with {
                return Err(self.failure(
                    "hint_handoff",
                    Some(&hinted.key),
                    format!(
                        "{} acknowledged {:?} as a fallback for {}, which does not hold it after the hints drained",
                        hinted.holder, hinted.version.dot, hinted.home
                    ),
                ));
            }
        }
        Ok(())
    }

    /// With a tombstone grace, the deletes of `key` that compaction may have reaped by
    /// now: a replica reaps a tombstone only once its record (stamped no earlier than the
    /// delete was made, on the one simulated clock) is older than the grace. `None`
    /// without a grace: nothing is reaped.
    fn expired_deletes(&self, key: &[u8]) -> Option<Vec<Version>> {
        let grace = self.w.cfg.tombstone_grace_ms?;
        Some(
            self.w
                .deletes
                .iter()
                .filter(|(k, d)| k == key && d.timestamp_ms.saturating_add(grace) < self.w.now)
                .map(|(_, d)| d.clone())
                .collect(),
        )
    }

    fn check(&self, keys: &[Vec<u8>]) -> Result<(), SimFailure> {
        let seed = self.w.cfg.seed;
        for key in keys {
            let versions = match self.w.final_reads.get(key) {
                Some(GetResult::Ok { versions, .. }) => versions,
                other => {
                    return Err(self.failure(
                        "final_read",
                        Some(key),
                        format!("final R = N read did not succeed: {other:?}"),
                    ))
                }
            };
            let reaped = self.expired_deletes(key);
            check_acked_writes(seed, key, &self.w.acked, versions, reaped.as_deref())?;
            let partition = self.w.ring.partition_for_key(key);
            let mut sets: Vec<(NodeId, BTreeSet<Vec<u8>>)> = Vec::new();
            for &home in self.w.homes(partition) {
                let node = &self.nodes[(home.0 - 1) as usize];
                let Some((parts, _)) = &node.open else {
                    return Err(self.failure("convergence", Some(key), format!("{home} is down")));
                };
                let held = block_on(replica_get(&parts[partition as usize], key)).map_err(|e| {
                    self.failure("convergence", Some(key), format!("read on {home}: {e}"))
                })?;
                // each replica reaps in its own time, and only a key's sole tombstone,
                // once it is older than the grace
                let reaped_here = held.len() == 1
                    && held[0].value.is_none()
                    && reaped
                        .as_deref()
                        .is_some_and(|deletes| deletes.contains(&held[0].version));
                let set: BTreeSet<Vec<u8>> = held
                    .iter()
                    .filter(|_| !reaped_here)
                    .map(|v| {
                        let mut b = v.version.encode_to_vec();
                        b.push(u8::from(v.value.is_some()));
                        b.extend_from_slice(v.value.as_deref().unwrap_or_default());
                        b
                    })
                    .collect();
                sets.push((home, set));
            }
            if let Some((first, set)) = sets.first() {
                for (other, other_set) in &sets[1..] {
                    if other_set != set {
                        return Err(self.failure(
                            "convergence",
                            Some(key),
                            format!(
                                "home replicas {first} and {other} hold different sibling sets \
                                 ({} vs {} versions)",
                                set.len(),
                                other_set.len()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{ActorId, Dot};

    fn vv(node: u64, counter: u64, past: &[(u64, u64)], value: Option<&str>) -> VersionedValue {
        let mut clock = VClock::new();
        for &(n, c) in past {
            clock.raise(ActorId::new(n, 0), c, 0);
        }
        VersionedValue {
            version: Version {
                dot: Dot::new(ActorId::new(node, 0), counter),
                timestamp_ms: counter,
                past: clock,
            },
            value: value.map(|v| v.as_bytes().to_vec()),
        }
    }

    fn acked(v: &VersionedValue) -> AckedWrite {
        AckedWrite {
            key: b"k".to_vec(),
            written: v.clone(),
            context: VClock::new(),
        }
    }

    #[test]
    fn lost_write_checker_accepts_present_and_covered_writes() {
        let a = vv(1, 1, &[], Some("a"));
        let b = vv(2, 1, &[(1, 1)], Some("b"));
        let c = vv(3, 1, &[], None);
        let final_read = vec![b.clone(), c.clone()];
        check_acked_writes(
            0,
            b"k",
            &[acked(&a), acked(&b), acked(&c)],
            &final_read,
            None,
        )
        .unwrap();
        // another key's writes are not looked at
        let mut other = acked(&vv(9, 9, &[], Some("z")));
        other.key = b"other".to_vec();
        check_acked_writes(0, b"k", &[other], &final_read, None).unwrap();
    }

    #[test]
    fn lost_write_checker_catches_a_lost_or_changed_write() {
        let a = vv(1, 1, &[], Some("a"));
        let b = vv(2, 1, &[], Some("b"));
        let err =
            check_acked_writes(7, b"k", &[acked(&a)], std::slice::from_ref(&b), None).unwrap_err();
        assert_eq!(
            (err.seed, err.checker, err.key.as_deref()),
            (7, "lost_write", Some("k"))
        );
        let mut changed = a.clone();
        changed.value = Some(b"other".to_vec());
        let err = check_acked_writes(7, b"k", &[acked(&a)], &[changed], None).unwrap_err();
        assert_eq!(err.checker, "lost_write");
    }

    #[test]
    fn lost_write_checker_under_a_grace_accepts_only_writes_a_reaped_delete_covers() {
        let a = vv(1, 1, &[], Some("a"));
        let d = vv(2, 1, &[(1, 1)], None);
        let late = vv(3, 1, &[], Some("late"));
        let writes = [acked(&a), acked(&d)];
        // `a` and the delete that saw it are both gone: the delete was reaped
        check_acked_writes(
            0,
            b"k",
            &writes,
            &[],
            Some(std::slice::from_ref(&d.version)),
        )
        .unwrap();
        // a concurrent write the delete never saw still has to be there
        let err = check_acked_writes(
            0,
            b"k",
            &[acked(&late)],
            &[],
            Some(std::slice::from_ref(&d.version)),
        )
        .unwrap_err();
        assert_eq!(err.checker, "lost_write");
        // no delete may have been reaped yet (the caller passes only expired ones)
        let err = check_acked_writes(0, b"k", &writes, &[], Some(&[])).unwrap_err();
        assert_eq!(err.checker, "lost_write");
    }

    #[test]
    fn lost_write_checker_under_a_grace_catches_a_resurrection() {
        let a = vv(1, 1, &[], Some("a"));
        let d = vv(2, 1, &[(1, 1)], None);
        // the delete was reaped and `a`, which it superseded, is back
        let err = check_acked_writes(
            5,
            b"k",
            &[acked(&d)],
            std::slice::from_ref(&a),
            Some(std::slice::from_ref(&d.version)),
        )
        .unwrap_err();
        assert_eq!((err.seed, err.checker), (5, "lost_write"));
        assert!(err.detail.contains("is back"), "{}", err.detail);
    }

    #[test]
    fn sibling_checker_catches_a_dominated_sibling() {
        let a = vv(1, 1, &[], Some("a"));
        let b = vv(2, 1, &[(1, 1)], Some("b"));
        let c = vv(3, 1, &[], Some("c"));
        check_siblings(0, b"k", &[b.clone(), c]).unwrap();
        let err = check_siblings(0, b"k", &[a, b]).unwrap_err();
        assert_eq!(err.checker, "sibling_causality");
    }
}

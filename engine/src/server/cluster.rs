//! The cluster side of a shard: the runtime that drives the pure state machines
//! (`crate::cluster::Coordinator`, `ringkv_ring::Gossip`, `ringkv_ring::FailureDetector`)
//! with real time, peer links and the shard's partitions.
//!
//! - Client puts and deletes: the node computes the key's targets (N home nodes, an
//!   unreachable one replaced by the next reachable fallback, which keeps a hint). If it
//!   is not a target it forwards the request to the first target; otherwise it writes
//!   locally (making the new version), sends the version to the other targets and
//!   answers after W acknowledgements, or "not confirmed" when they do not come in time.
//! - Client gets: asks the targets, answers after R replies with the reconciled sibling
//!   set, then repairs replicas that missed a version (read repair).
//! - Replica messages from peers run on the shard that owns the partition.
//! - Hints: each shard keeps a hint store (a partition of its own); a background task
//!   delivers hints to owners that are reachable and deletes them after the owner's ack.
//! - Membership: shard 0 runs gossip, persists the membership and sends every change to
//!   the other shards over the mesh; each shard has its own failure detector, fed by its
//!   own peer requests and probes.
//! - Joins and leaves are accepted only when every partition whose home replicas change
//!   holds no keys (moving data on a membership change is not implemented yet).

use super::{mono_ms, now_ms, Shard, ShardMsg};
use crate::cluster::coordinator::{
    choose_targets, uncovered_homes, CoordinatorOutput, GetResult, OpId, PutResult, Target,
    VersionedValue,
};
use crate::cluster::replica;
use crate::notify::Notify;
use crate::version::{context_of, VClock, Version};
use ringkv_net::link::{LinkConfig, LinkError, PeerLink};
use ringkv_net::peer::{ClusterReply, ClusterRequest, WireVersion, FLAG_FORWARDED};
use ringkv_net::protocol::{self, ErrorCode, HelloOk, Reply};
use ringkv_ring::{
    FailureDetector, FailureDetectorConfig, Gossip, GossipConfig, GossipMessage, Membership,
    NodeId, Ring, Status,
};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

type Failure = (ErrorCode, String);

/// The membership and the ring computed from it.
pub(crate) struct View {
    pub membership: Membership,
    pub ring: Ring,
    /// N of this cluster: the configured N capped by the ring's nodes.
    pub n: usize,
    /// Every partition's preference list for `n` (computed once per membership).
    pub preference: Vec<ringkv_ring::PreferenceList>,
}

impl View {
    fn new(membership: Membership, replicas: usize) -> View {
        let ring = Ring::from_membership(&membership);
        let n = replicas.min(ring.nodes().len()).max(1);
        let preference = if ring.nodes().is_empty() {
            Vec::new()
        } else {
            ring.preference_lists(n)
        };
        View {
            membership,
            ring,
            n,
            preference,
        }
    }

    fn is_member(&self, id: NodeId) -> bool {
        self.membership
            .member(id)
            .is_some_and(|m| !m.status.has_left())
    }
}

/// Counters of the whole node, shared by its shards (statistics only: nothing on the
/// data path waits on them). `hints_pending[s]` is refreshed by shard s twice a second.
#[derive(Debug)]
pub struct NodeCounters {
    pub hints_pending: Vec<AtomicU64>,
    pub hints_stored: AtomicU64,
    pub hints_delivered: AtomicU64,
    pub read_repairs: AtomicU64,
    /// Shards that have stopped reading requests at shutdown and whose own requests
    /// (forwarded ones included) have all answered. A shard keeps answering requests
    /// other shards forward to it until every shard is counted here, so a request a
    /// shard read before its stop runs even when its owner stopped first.
    pub shards_drained: Vec<std::sync::atomic::AtomicBool>,
    /// Shards whose thread panicked: requests are no longer forwarded to them (they
    /// would wait out their deadline), and the others do not wait for them to drain.
    pub shards_failed: Vec<std::sync::atomic::AtomicBool>,
}

impl NodeCounters {
    pub fn new(shards: usize) -> NodeCounters {
        NodeCounters {
            hints_pending: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            hints_stored: AtomicU64::new(0),
            hints_delivered: AtomicU64::new(0),
            read_repairs: AtomicU64::new(0),
            shards_drained: (0..shards)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            shards_failed: (0..shards)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
        }
    }

    /// Counts shard `shard` as drained (see `shards_drained`; again is harmless).
    pub fn shard_drained(&self, shard: usize) {
        self.shards_drained[shard].store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Counts shard `shard` as failed (see `shards_failed`).
    pub fn shard_failed(&self, shard: usize) {
        self.shards_failed[shard].store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether shard `shard` has failed.
    pub fn is_failed(&self, shard: usize) -> bool {
        self.shards_failed[shard].load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether every shard has drained its own requests at shutdown (or failed).
    pub fn all_shards_drained(&self) -> bool {
        (0..self.shards_drained.len()).all(|s| {
            self.shards_drained[s].load(std::sync::atomic::Ordering::SeqCst) || self.is_failed(s)
        })
    }
}

/// What this shard knows of a peer's shards (from a HELLO on its client port).
#[derive(Debug, Clone)]
enum Layout {
    Fetching {
        addr: String,
    },
    Known {
        addr: String,
        shards: u16,
        port_base: u16,
    },
}

/// Whether a joined view keeps one replica per key (N = 1).
fn single_replica(view: &View) -> bool {
    !view.ring.nodes().is_empty() && view.n == 1
}

#[derive(Default)]
struct OpSlot {
    done: RefCell<Option<CoordinatorOutput>>,
    notify: Notify,
}

pub(crate) struct ClusterState {
    pub local: NodeId,
    view: RefCell<Option<Rc<View>>>,
    links: RefCell<HashMap<NodeId, Rc<PeerLink>>>,
    /// Links straight to a peer's shard (by its shard port).
    shard_links: RefCell<HashMap<(NodeId, u16), Rc<PeerLink>>>,
    layouts: Rc<RefCell<HashMap<NodeId, Layout>>>,
    fd: RefCell<FailureDetector>,
    coordinator: RefCell<crate::cluster::coordinator::Coordinator>,
    ops: RefCell<HashMap<OpId, Rc<OpSlot>>>,
    pub hints: replica::HintStore<crate::storage::dma::DmaStorage>,
    /// Shard 0 only: the gossip state machine (None until the node has joined).
    gossip: RefCell<Option<Gossip>>,
    /// Shard 0: membership changes (joins, leaves) take turns.
    change_busy: Cell<bool>,
    change_done: Notify,
    hint_wake: Notify,
    /// Shard 0: the number of its latest membership change; the other shards: the number
    /// of the latest one they installed (an older one arriving later is ignored).
    membership_seq: Cell<u64>,
    /// Shard 0: its latest membership (encoded) and the shards whose bounded mesh queue
    /// was full when it was sent; the 50 ms tick sends it to them again.
    membership_unsent: RefCell<Option<(Vec<u8>, Vec<usize>)>>,
}

impl ClusterState {
    pub(crate) fn new(
        local: NodeId,
        hints: Rc<crate::Partition<crate::storage::dma::DmaStorage>>,
    ) -> ClusterState {
        ClusterState {
            local,
            view: RefCell::new(None),
            links: RefCell::default(),
            shard_links: RefCell::default(),
            layouts: Rc::default(),
            fd: RefCell::new(FailureDetector::new(FailureDetectorConfig {
                unanswered_max: 2,
                probe_timeout_ms: 500,
                probe_interval_ms: 500,
                idle_probe_after_ms: Some(2000),
            })),
            coordinator: RefCell::new(crate::cluster::coordinator::Coordinator::new(local)),
            ops: RefCell::default(),
            hints: replica::HintStore::new(hints),
            gossip: RefCell::new(None),
            change_busy: Cell::new(false),
            membership_seq: Cell::new(0),
            membership_unsent: RefCell::new(None),
            change_done: Notify::default(),
            hint_wake: Notify::default(),
        }
    }

    pub(crate) fn view(&self) -> Option<Rc<View>> {
        self.view.borrow().clone()
    }

    /// Whether compaction must keep `key`'s tombstone in `partition` past its grace
    /// period: a pending hint in this shard's store still has to deliver the delete to
    /// a member (see [`replica::hint_names_key`]).
    pub(crate) fn hint_pending_for(&self, partition: u32, key: &[u8]) -> bool {
        if self.hints.pending_count() == 0 {
            return false;
        }
        let view = self.view();
        let member = |id: NodeId| match &view {
            Some(view) => id != self.local && view.is_member(id),
            // no membership yet, and hints from before: they may name any node
            None => true,
        };
        self.hints.names_key(member, partition, key)
    }
}

/// Reads the persisted membership of a node, if it has one.
pub(crate) fn load_membership(data_dir: &Path) -> Result<Option<Membership>, String> {
    let path = data_dir.join("cluster").join("membership");
    match std::fs::read(&path) {
        Ok(bytes) => Membership::decode(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes the membership durably (temporary file, fsync, rename, fsync the folder); once
/// it has this node (`node_id`) as a member, the directory is recorded as this node's
/// (`cluster/node-id`).
pub(crate) fn persist_membership(
    data_dir: &Path,
    membership: &Membership,
    node_id: u64,
) -> Result<(), String> {
    use std::io::Write;
    let dir = data_dir.join("cluster");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = dir.join("membership.tmp");
    let path = dir.join("membership");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&membership.encode())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    if membership.member(ringkv_ring::NodeId(node_id)).is_some() {
        crate::server::record_node_id(data_dir, node_id)?;
    }
    Ok(())
}

fn error_of(frame: &[u8]) -> Option<(u16, String)> {
    match Reply::parse(frame) {
        Ok((_, Reply::Error { code, message })) => {
            Some((code, String::from_utf8_lossy(message).into_owned()))
        }
        _ => None,
    }
}

fn wire_to_versioned(v: &WireVersion<'_>) -> Option<VersionedValue> {
    Some(VersionedValue {
        version: Version::decode(v.version).ok()?,
        value: v.value.map(<[u8]>::to_vec),
    })
}

impl Shard {
    /// The replication settings for this cluster size: (n, default r, default w).
    fn quorum(&self, view: &View) -> (usize, usize, usize) {
        let n = view.n;
        (
            n,
            self.config.read_quorum.clamp(1, n),
            self.config.write_quorum.clamp(1, n),
        )
    }

    fn reachable(&self, view: &View, id: NodeId) -> bool {
        if id == self.cluster.local {
            return true;
        }
        let down = view
            .membership
            .member(id)
            .is_none_or(|m| m.status == Status::Down || m.status.has_left());
        !down && self.cluster.fd.borrow().is_reachable(id)
    }

    fn targets(&self, view: &View, partition: u32) -> Vec<Target> {
        let pref: Vec<NodeId> = view.preference[partition as usize].iter().collect();
        choose_targets(&pref, view.n, |id| self.reachable(view, id))
    }

    fn link(&self, id: NodeId) -> Option<Rc<PeerLink>> {
        let view = self.cluster.view()?;
        let addr = view.membership.member(id)?.addr.clone();
        Some(self.link_to(&mut self.cluster.links.borrow_mut(), id, &addr))
    }

    fn link_to<K: std::hash::Hash + Eq + Copy>(
        &self,
        links: &mut HashMap<K, Rc<PeerLink>>,
        key: K,
        addr: &str,
    ) -> Rc<PeerLink> {
        let link = links.entry(key).or_insert_with(|| {
            Rc::new(PeerLink::spawn(
                addr,
                LinkConfig {
                    frame_bytes_max: self.config.frame_bytes_max,
                    // a peer refuses requests over its in-flight limit per connection
                    // (the nodes of a cluster share their limits): the link holds the
                    // rest back until replies free a place
                    pending_max: self.config.in_flight_per_connection_max,
                    ..LinkConfig::default()
                },
            ))
        });
        if link.addr() != addr {
            link.set_addr(addr);
        }
        link.clone()
    }

    /// The link for a request about `partition` on node `id`: straight to the shard
    /// that owns the partition there (its shard port) once the node's layout is known,
    /// else the node's client port (which forwards over its mesh).
    fn link_for(&self, id: NodeId, partition: Option<u32>) -> Option<Rc<PeerLink>> {
        let (Some(p), Some(view)) = (partition, self.cluster.view()) else {
            return self.link(id);
        };
        let addr = view.membership.member(id)?.addr.clone();
        let layout = self.cluster.layouts.borrow().get(&id).cloned();
        match layout {
            Some(Layout::Known {
                addr: known,
                shards,
                port_base,
            }) if known == addr => {
                if port_base == 0 || shards == 0 {
                    return self.link(id);
                }
                let shard = (p % u32::from(shards)) as u16;
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                let shard_addr = format!("{host}:{}", u32::from(port_base) + u32::from(shard));
                Some(self.link_to(
                    &mut self.cluster.shard_links.borrow_mut(),
                    (id, shard),
                    &shard_addr,
                ))
            }
            Some(Layout::Fetching { addr: fetching }) if fetching == addr => self.link(id),
            _ => {
                // learn the node's shards and shard ports from a HELLO, once per address
                self.cluster
                    .layouts
                    .borrow_mut()
                    .insert(id, Layout::Fetching { addr: addr.clone() });
                let link = self.link(id)?;
                let layouts = self.cluster.layouts.clone();
                let main = link.clone();
                glommio::spawn_local(async move { fetch_layout(main, layouts, id, addr).await })
                    .detach();
                Some(link)
            }
        }
    }

    /// Sends one cluster request to `to` and returns its reply frame; feeds the
    /// failure detector either way.
    async fn call_peer(
        &self,
        to: NodeId,
        request: &ClusterRequest<'_>,
        timeout: Duration,
    ) -> Result<Vec<u8>, LinkError> {
        let Some(link) = self.link_for(to, request.partition()) else {
            return Err(LinkError::Unreachable {
                addr: format!("node {to}"),
                reason: "not a member".into(),
            });
        };
        let reply = link.call(timeout, |id, out| request.encode(id, out)).await;
        let now = mono_ms();
        match &reply {
            Ok(_) => self.cluster.fd.borrow_mut().handle_answered(now, to),
            Err(LinkError::QueueFull(_)) => {}
            Err(e) => {
                self.cluster.fd.borrow_mut().handle_unanswered(now, to);
                // nothing listens on a shard port it learned: the node may have
                // restarted with other shards or shard ports, so learn its layout again
                // (requests use its client port meanwhile)
                let shard_link = !self
                    .cluster
                    .links
                    .borrow()
                    .get(&to)
                    .is_some_and(|main| Rc::ptr_eq(main, &link));
                if shard_link && e.is_connect_failure() {
                    let mut layouts = self.cluster.layouts.borrow_mut();
                    if matches!(layouts.get(&to), Some(Layout::Known { .. })) {
                        layouts.remove(&to);
                    }
                }
            }
        }
        reply
    }

    // ---------------------------------------------------------------- client side

    /// A client put (`value: Some`) or delete.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn cluster_put(
        self: &Rc<Self>,
        frame: &[u8],
        key: &[u8],
        context: &VClock,
        value: Option<&[u8]>,
        w_requested: u8,
        request_id: u64,
        out: &RefCell<Vec<u8>>,
    ) -> Result<(), Failure> {
        let view = self.joined_view()?;
        let (n, _, w_default) = self.quorum(&view);
        let w = self.requested_quorum(w_requested, w_default, n, "w")?;
        let partition = ringkv_ring::partition_for_key(key, self.config.partitions);
        let targets = self.targets(&view, partition);
        let forwarded = protocol::header(frame).flags & FLAG_FORWARDED != 0;
        let me = targets
            .iter()
            .find(|t| t.node == self.cluster.local)
            .copied();
        if me.is_none() && !forwarded {
            let Some(first) = targets.first() else {
                return Err((ErrorCode::Unavailable, "no replica is reachable".into()));
            };
            return self.forward_to(first.node, frame, request_id, out).await;
        }
        let local = self.partition_for(key)?.clone();
        let outcome = local
            .coordinate_put(
                self.config.node_id,
                key,
                context,
                value,
                now_ms(),
                self.config.clock_entries_max,
            )
            .await
            .map_err(super::store_error)?;
        // The version is stored here from now on: a failure below must neither end the
        // request with a plain error (the write may be read) nor skip the replicas. As
        // the simulator does, a fallback copy whose hint could not be stored does not
        // count toward W, and a missing hint for an uncovered home is only logged.
        let mut local_counts = me.is_some();
        if let Some(Target {
            hint_for: Some(home),
            ..
        }) = me
        {
            if let Err((_, why)) = self.store_hint(home, partition, key).await {
                tracing::warn!(home = home.0, partition, error = %why, "cannot store a hint: this copy does not count toward W");
                local_counts = false;
            }
        }
        // a home replica that is down with no fallback left to stand in for it gets a
        // hint here: this node holds the key and hands it off when the owner is back
        let homes = &view.preference[partition as usize].replicas;
        for home in uncovered_homes(homes, n, &targets, self.cluster.local) {
            if let Err((_, why)) = self.store_hint(home, partition, key).await {
                tracing::warn!(home = home.0, partition, error = %why, "cannot store a hint for a home replica that is down");
            }
        }
        let remote: Vec<Target> = targets
            .iter()
            .filter(|t| t.node != self.cluster.local)
            .copied()
            .collect();
        // a forwarded request this node coordinates without being a target (views
        // differ for a moment) stores locally but does not count as a replica
        let local_acks = usize::from(local_counts);
        let done = if remote.is_empty() && w <= local_acks {
            // a cluster of one (or N = 1): the local write is the quorum
            CoordinatorOutput::PutDone {
                op: 0,
                result: PutResult::Ok { acks: 1 },
            }
        } else {
            // the copy the replicas are sent, made only when there are replicas
            let version = VersionedValue {
                version: outcome.version.clone(),
                value: value.map(<[u8]>::to_vec),
            };
            let (op, slot) = {
                let mut coordinator = self.cluster.coordinator.borrow_mut();
                let op = coordinator.start_put(
                    mono_ms(),
                    partition,
                    key.to_vec(),
                    version,
                    &remote,
                    local_acks,
                    w,
                    self.config.request_timeout.as_millis() as u64,
                );
                let slot = Rc::new(OpSlot::default());
                self.cluster.ops.borrow_mut().insert(op, slot.clone());
                (op, slot)
            };
            self.pump();
            self.wait_op(op, &slot, false).await
        };
        match done {
            CoordinatorOutput::PutDone {
                result: PutResult::Ok { .. },
                ..
            } => {
                self.reply_put(&mut out.borrow_mut(), request_id, value.is_some(), &outcome);
                Ok(())
            }
            CoordinatorOutput::PutDone {
                result: PutResult::NotConfirmed { acks, w },
                ..
            } => Err((
                ErrorCode::NotConfirmed,
                format!(
                    "not confirmed: {acks} of the {w} replicas needed acknowledged in time; \
                         the write may or may not be applied"
                ),
            )),
            other => Err((
                ErrorCode::Internal,
                format!("coordinator answered a put with {other:?}"),
            )),
        }
    }

    /// A client get: (siblings with values, context).
    pub(crate) async fn cluster_get(
        self: &Rc<Self>,
        key: &[u8],
        r_requested: u8,
    ) -> Result<(Vec<VersionedValue>, VClock), Failure> {
        let view = self.joined_view()?;
        let (n, r_default, _) = self.quorum(&view);
        let r = self.requested_quorum(r_requested, r_default, n, "r")?;
        let partition = ringkv_ring::partition_for_key(key, self.config.partitions);
        let targets = self.targets(&view, partition);
        let local_is_target = targets.iter().any(|t| t.node == self.cluster.local);
        let local = if local_is_target {
            let p = self.partition_for(key)?.clone();
            Some(
                replica::replica_get(&p, key)
                    .await
                    .map_err(super::store_error)?,
            )
        } else {
            None
        };
        let remote: Vec<NodeId> = targets
            .iter()
            .map(|t| t.node)
            .filter(|&id| id != self.cluster.local)
            .collect();
        if remote.is_empty() && r <= 1 {
            // a cluster of one (or N = 1): this replica's answer is the answer
            if let Some(versions) = local {
                let clocks: Vec<Version> = versions.iter().map(|v| v.version.clone()).collect();
                return Ok((versions, context_of(&clocks)));
            }
        }
        let (op, slot) = {
            let mut coordinator = self.cluster.coordinator.borrow_mut();
            let op = coordinator.start_get(
                mono_ms(),
                partition,
                key.to_vec(),
                &remote,
                local,
                r,
                self.config.request_timeout.as_millis() as u64,
            );
            let slot = Rc::new(OpSlot::default());
            self.cluster.ops.borrow_mut().insert(op, slot.clone());
            (op, slot)
        };
        self.pump();
        match self.wait_op(op, &slot, true).await {
            CoordinatorOutput::GetDone {
                result: GetResult::Ok { versions, .. },
                ..
            } => {
                let clocks: Vec<Version> = versions.iter().map(|v| v.version.clone()).collect();
                Ok((versions, context_of(&clocks)))
            }
            CoordinatorOutput::GetDone {
                result: GetResult::Failed { replies, r },
                ..
            } => Err((
                ErrorCode::Unavailable,
                format!("only {replies} of the {r} replicas needed answered in time"),
            )),
            other => Err((
                ErrorCode::Internal,
                format!("coordinator answered a get with {other:?}"),
            )),
        }
    }

    /// Whether this node's replica alone answers a get of `partition` at R = 1, as
    /// [`Shard::cluster_get`] would decide: N = 1 (a cluster of one, or N set to 1) and
    /// this node heads the partition's preference list.
    pub(crate) fn answers_alone(&self, partition: u32) -> bool {
        self.cluster.view().is_some_and(|view| {
            single_replica(&view)
                && view.preference[partition as usize].iter().next() == Some(self.cluster.local)
        })
    }

    /// Whether every key has one replica (N = 1: a cluster of one, or N set to 1): the
    /// cheap first test of [`Shard::answers_alone`].
    pub(crate) fn single_replica(&self) -> bool {
        self.cluster
            .view()
            .is_some_and(|view| single_replica(&view))
    }

    fn joined_view(&self) -> Result<Rc<View>, Failure> {
        match self.cluster.view() {
            Some(view) if !view.ring.nodes().is_empty() => Ok(view),
            _ => Err((
                ErrorCode::Unavailable,
                "this node has not joined a cluster yet".into(),
            )),
        }
    }

    fn requested_quorum(
        &self,
        requested: u8,
        default: usize,
        n: usize,
        what: &str,
    ) -> Result<usize, Failure> {
        match requested as usize {
            0 => Ok(default),
            q if q <= n => Ok(q),
            q => Err((
                ErrorCode::BadRequest,
                format!("{what} = {q} is more than the {n} replicas of the key"),
            )),
        }
    }

    async fn forward_to(
        &self,
        to: NodeId,
        frame: &[u8],
        request_id: u64,
        out: &RefCell<Vec<u8>>,
    ) -> Result<(), Failure> {
        let Some(link) = self.link(to) else {
            return Err((ErrorCode::Unavailable, format!("node {to} is unknown")));
        };
        let reply = link
            .call(self.config.request_timeout * 2, |id, buf| {
                let start = buf.len();
                buf.extend_from_slice(frame);
                let flags = protocol::header(frame).flags | FLAG_FORWARDED;
                ringkv_net::peer::set_flags(&mut buf[start..], flags);
                ringkv_net::peer::set_request_id(&mut buf[start..], id);
            })
            .await;
        match reply {
            Ok(mut reply) => {
                self.cluster.fd.borrow_mut().handle_answered(mono_ms(), to);
                ringkv_net::peer::set_request_id(&mut reply, request_id);
                out.borrow_mut().extend_from_slice(&reply);
                Ok(())
            }
            Err(e) => {
                // a full link says nothing of the peer's health (as in `call_peer`)
                if !matches!(e, LinkError::QueueFull(_)) {
                    self.cluster
                        .fd
                        .borrow_mut()
                        .handle_unanswered(mono_ms(), to);
                }
                // the coordinator may have written before the link failed
                let code = match protocol::header(frame).opcode {
                    protocol::opcode::GET => ErrorCode::Unavailable,
                    _ => ErrorCode::NotConfirmed,
                };
                Err((
                    code,
                    format!("forwarding to coordinator node {to} failed: {e}"),
                ))
            }
        }
    }

    async fn wait_op(&self, op: OpId, slot: &OpSlot, is_get: bool) -> CoordinatorOutput {
        loop {
            if let Some(done) = slot.done.borrow_mut().take() {
                return done;
            }
            // the coordinator's deadline always ends an op; this is a backstop
            let waited = glommio::timer::timeout(self.config.request_timeout * 4, async {
                slot.notify.wait().await;
                Ok(())
            })
            .await;
            if waited.is_err() && slot.done.borrow().is_none() {
                self.cluster.ops.borrow_mut().remove(&op);
                return if is_get {
                    CoordinatorOutput::GetDone {
                        op,
                        result: GetResult::Failed { replies: 0, r: 0 },
                    }
                } else {
                    CoordinatorOutput::PutDone {
                        op,
                        result: PutResult::NotConfirmed { acks: 0, w: 0 },
                    }
                };
            }
        }
    }

    /// Drains the coordinator's outputs.
    fn pump(self: &Rc<Self>) {
        loop {
            let output = self.cluster.coordinator.borrow_mut().poll_output();
            let Some(output) = output else { return };
            self.dispatch(output);
        }
    }

    fn dispatch(self: &Rc<Self>, output: CoordinatorOutput) {
        match output {
            CoordinatorOutput::SendPut {
                op,
                to,
                hint_for,
                partition,
                key,
                version,
            } => {
                let shard = self.clone();
                // shutdown waits for it: a replica that fails it leaves a hint to store
                let counted = self.count_in_flight();
                glommio::spawn_local(async move {
                    let _counted = counted;
                    // A home that does not answer gives way to a fallback after half the
                    // request's time, leaving the other half for the fallback's copy: the
                    // op ends at its deadline, so a home allowed the whole of it would
                    // leave a stopped or partitioned node's fallback no time to count.
                    // With no fallback to give way to, the home has the whole time.
                    let timeout = shard.config.request_timeout;
                    let started = std::time::Instant::now();
                    let can_give_way = hint_for.is_none() && {
                        let candidates = shard.fallback_candidates(partition);
                        shard
                            .cluster
                            .coordinator
                            .borrow()
                            .has_fallback(op, to, candidates)
                    };
                    let first_timeout = if can_give_way { timeout / 2 } else { timeout };
                    let mut ok = shard
                        .send_replica_put(to, partition, hint_for, &key, &version, first_timeout)
                        .await;
                    let home = hint_for.unwrap_or(to);
                    if !ok {
                        // sloppy quorum: the replica failed, so the write goes to the
                        // next reachable fallback with a hint naming the home node
                        let candidates = shard.fallback_candidates(partition);
                        let fallback = shard
                            .cluster
                            .coordinator
                            .borrow_mut()
                            .claim_fallback(op, to, candidates);
                        if let Some(fallback) = fallback {
                            let left = timeout.saturating_sub(started.elapsed());
                            ok = shard
                                .send_replica_put(
                                    fallback,
                                    partition,
                                    Some(home),
                                    &key,
                                    &version,
                                    left.max(Duration::from_millis(10)),
                                )
                                .await;
                        }
                    }
                    if !ok && home != shard.cluster.local {
                        // a replica missed the write: this node holds the key, so it
                        // keeps a hint and hands the key off once the owner is back
                        if let Err((_, e)) = shard.store_hint(home, partition, &key).await {
                            tracing::warn!(error = %e, "cannot store a hint for a failed replica");
                        }
                    }
                    shard
                        .cluster
                        .coordinator
                        .borrow_mut()
                        .handle_put_ack(mono_ms(), op, to, ok);
                    shard.pump();
                })
                .detach();
            }
            CoordinatorOutput::SendGet {
                op,
                to,
                partition,
                key,
            } => {
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let reply = shard.send_replica_get(to, partition, &key).await;
                    shard.cluster.coordinator.borrow_mut().handle_get_reply(
                        mono_ms(),
                        op,
                        to,
                        reply,
                    );
                    shard.pump();
                })
                .detach();
            }
            CoordinatorOutput::Repair {
                to,
                partition,
                key,
                versions,
            } => {
                self.counters.read_repairs.fetch_add(1, Ordering::Relaxed);
                let shard = self.clone();
                glommio::spawn_local(async move {
                    for v in &versions {
                        if to == shard.cluster.local {
                            if let Some(p) = shard.partitions.get(&partition) {
                                if let Err(e) = replica::replica_put(p, &key, v, now_ms()).await {
                                    tracing::warn!(error = %e, "local read repair failed");
                                }
                            }
                        } else {
                            shard
                                .send_replica_put(
                                    to,
                                    partition,
                                    None,
                                    &key,
                                    v,
                                    shard.config.request_timeout,
                                )
                                .await;
                        }
                    }
                })
                .detach();
            }
            CoordinatorOutput::Silent { .. } => {
                // every replica request goes through `call_peer`, which tells the
                // failure detector how it ended (its link call times out with the op);
                // counting the op's silent targets as well made one slow request two
                // misses, and two mark a peer unreachable here
            }
            done @ (CoordinatorOutput::PutDone { op, .. }
            | CoordinatorOutput::GetDone { op, .. }) => {
                if let Some(slot) = self.cluster.ops.borrow_mut().remove(&op) {
                    *slot.done.borrow_mut() = Some(done);
                    slot.notify.notify_all();
                }
            }
        }
    }

    /// The fallbacks of `partition` that look reachable, in preference order (the
    /// coordinator picks one for a failed target: `Coordinator::claim_fallback`).
    fn fallback_candidates(&self, partition: u32) -> Vec<NodeId> {
        let Some(view) = self.cluster.view() else {
            return Vec::new();
        };
        let Some(pref) = view.preference.get(partition as usize) else {
            return Vec::new();
        };
        pref.fallbacks
            .iter()
            .copied()
            .filter(|&id| self.reachable(&view, id))
            .collect()
    }

    async fn send_replica_put(
        &self,
        to: NodeId,
        partition: u32,
        hint_for: Option<NodeId>,
        key: &[u8],
        version: &VersionedValue,
        timeout: Duration,
    ) -> bool {
        let blob = version.version.encode_to_vec();
        let request = ClusterRequest::ReplicaPut {
            partition,
            hint_for: hint_for.map_or(0, |h| h.0),
            key,
            version: WireVersion {
                version: &blob,
                value: version.value.as_deref(),
            },
        };
        match self.call_peer(to, &request, timeout).await {
            Ok(frame) => matches!(
                ClusterReply::parse(&frame),
                Ok((_, ClusterReply::ReplicaPutOk { .. }))
            ),
            Err(_) => false,
        }
    }

    async fn send_replica_get(
        &self,
        to: NodeId,
        partition: u32,
        key: &[u8],
    ) -> Option<Vec<VersionedValue>> {
        let request = ClusterRequest::ReplicaGet { partition, key };
        let frame = self
            .call_peer(to, &request, self.config.request_timeout)
            .await
            .ok()?;
        match ClusterReply::parse(&frame) {
            Ok((_, ClusterReply::ReplicaGetOk(versions))) => {
                versions.iter().map(wire_to_versioned).collect()
            }
            _ => None,
        }
    }

    async fn store_hint(&self, home: NodeId, partition: u32, key: &[u8]) -> Result<(), Failure> {
        self.cluster
            .hints
            .record(home, partition, key, now_ms())
            .await
            .map_err(super::store_error)?;
        self.counters.hints_stored.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    // ---------------------------------------------------------------- peer side

    /// Runs a cluster request (peer or admin) on this shard; the caller routed it here.
    pub(crate) async fn run_cluster_request(
        self: &Rc<Self>,
        frame: &[u8],
        request_id: u64,
        out: &RefCell<Vec<u8>>,
    ) -> Result<(), Failure> {
        let (_, request) = ClusterRequest::parse(frame).map_err(|e| (e.code(), e.to_string()))?;
        let reply_bytes: Vec<u8>;
        let reply = match request {
            ClusterRequest::ReplicaPut {
                partition,
                hint_for,
                key,
                version,
            } => {
                self.check_key(key)?;
                let p = self.key_partition(partition, key)?;
                let v = wire_to_versioned(&version)
                    .ok_or_else(|| (ErrorCode::BadRequest, "undecodable version".to_string()))?;
                // a hint is delivered only to a member: one for an id the membership
                // has never had would stay in the hint store for good (and anyone may
                // send this). A member that is leaving or left still counts: the
                // coordinator's view may be ahead of this node's
                let hinted = hint_for != 0 && hint_for != self.cluster.local.0;
                let known = self
                    .cluster
                    .view()
                    .is_some_and(|view| view.membership.member(NodeId(hint_for)).is_some());
                if hinted && !known {
                    return Err((
                        ErrorCode::BadRequest,
                        format!("a hint for node {hint_for}, which this node does not know"),
                    ));
                }
                let outcome = replica::replica_put(&p, key, &v, now_ms())
                    .await
                    .map_err(super::store_error)?;
                if hinted {
                    self.store_hint(NodeId(hint_for), partition, key).await?;
                }
                ClusterReply::ReplicaPutOk {
                    applied: matches!(outcome, crate::versioned::ApplyOutcome::Applied { .. }),
                }
                .encode(request_id, &mut out.borrow_mut());
                return Ok(());
            }
            ClusterRequest::ReplicaGet { partition, key } => {
                self.check_key(key)?;
                let p = self.key_partition(partition, key)?;
                let versions = replica::replica_get(&p, key)
                    .await
                    .map_err(super::store_error)?;
                let blobs: Vec<Vec<u8>> =
                    versions.iter().map(|v| v.version.encode_to_vec()).collect();
                let wire: Vec<WireVersion<'_>> = versions
                    .iter()
                    .zip(&blobs)
                    .map(|(v, blob)| WireVersion {
                        version: blob,
                        value: v.value.as_deref(),
                    })
                    .collect();
                if wire.len() > u16::MAX as usize {
                    return Err((ErrorCode::TooManySiblings, "too many versions".into()));
                }
                // a frame over the limit would make the asking node drop the whole link
                // (every request in flight on it): refuse this one read instead
                let reply_bytes = ringkv_net::protocol::HEADER_BYTES
                    + 2
                    + wire.iter().map(WireVersion::encoded_len).sum::<usize>();
                self.check_versions_fit(wire.len(), reply_bytes)?;
                ClusterReply::ReplicaGetOk(wire).encode(request_id, &mut out.borrow_mut());
                return Ok(());
            }
            ClusterRequest::KeyCount { partition } => {
                // counted, not walked: anyone may ask, and a walk of a big partition
                // would hold the shard
                let p = self.local_partition(partition)?;
                ClusterReply::KeyCountOk(p.key_count() as u64)
            }
            ClusterRequest::Gossip { from, message } => {
                let message = GossipMessage::decode(message)
                    .map_err(|e| (ErrorCode::BadRequest, format!("bad gossip message: {e}")))?;
                self.on_gossip(NodeId(from), message);
                ClusterReply::GossipOk
            }
            ClusterRequest::Status => {
                reply_bytes = self.status_json().into_bytes();
                ClusterReply::StatusOk(&reply_bytes)
            }
            ClusterRequest::Stats { shard_only } => {
                let stats = if shard_only {
                    self.shard_stats()
                } else {
                    self.node_stats(request_id).await?
                };
                stats.encode_reply(request_id, &mut out.borrow_mut());
                return Ok(());
            }
            ClusterRequest::JoinRequest {
                id,
                shards,
                weight,
                addr,
                zone,
            } => {
                let addr = std::str::from_utf8(addr)
                    .map_err(|_| (ErrorCode::BadRequest, "address is not UTF-8".to_string()))?;
                let zone = std::str::from_utf8(zone)
                    .map_err(|_| (ErrorCode::BadRequest, "zone is not UTF-8".to_string()))?;
                if id == 0 {
                    return Err((ErrorCode::BadRequest, "node ids start at 1".to_string()));
                }
                // the address goes into the membership every node links to
                ringkv_net::peer::peer_addr(addr)
                    .map_err(|e| (ErrorCode::BadRequest, format!("join request: {e}")))?;
                // a node that claims this node's own id from elsewhere would have this
                // node's address replaced by its own in every member's ring
                let own = self.config.advertise.to_string();
                if NodeId(id) == self.cluster.local && addr != own {
                    return Err((
                        ErrorCode::BadRequest,
                        format!(
                            "node id {id} is this node's own (at {own}), claimed by a node \
                             at {addr}: is a second node started with the same --node-id?"
                        ),
                    ));
                }
                reply_bytes = self
                    .admit(NodeId(id), shards, weight, addr, zone)
                    .await
                    .map_err(|e| (ErrorCode::Unavailable, e))?;
                ClusterReply::JoinAccept(&reply_bytes)
            }
            ClusterRequest::Join { seed } => {
                let seed = std::str::from_utf8(seed)
                    .map_err(|_| (ErrorCode::BadRequest, "seed is not UTF-8".to_string()))?
                    .to_string();
                ringkv_net::peer::peer_addr(&seed)
                    .map_err(|e| (ErrorCode::BadRequest, format!("seed {e}")))?;
                reply_bytes = self
                    .join_cluster_on_request(&seed)
                    .await
                    .map_err(|e| (ErrorCode::Unavailable, e))?
                    .into_bytes();
                ClusterReply::JoinOk(&reply_bytes)
            }
            ClusterRequest::Leave => {
                reply_bytes = self
                    .leave_cluster()
                    .await
                    .map_err(|e| (ErrorCode::Unavailable, e))?
                    .into_bytes();
                ClusterReply::LeaveOk(&reply_bytes)
            }
        };
        reply.encode(request_id, &mut out.borrow_mut());
        Ok(())
    }

    /// The local partition a peer request names, which must be the key's: a version
    /// stored in another one could not be read by the key, and would count as a key
    /// of that partition when a join or leave asks.
    fn key_partition(
        &self,
        partition: u32,
        key: &[u8],
    ) -> Result<Rc<crate::Partition<crate::storage::dma::DmaStorage>>, Failure> {
        let (owner, _) = self.owner_of(key);
        if owner != partition {
            return Err((
                ErrorCode::BadRequest,
                format!("the key is in partition {owner}, not {partition}"),
            ));
        }
        self.local_partition(partition)
    }

    fn local_partition(
        &self,
        partition: u32,
    ) -> Result<Rc<crate::Partition<crate::storage::dma::DmaStorage>>, Failure> {
        self.partitions.get(&partition).cloned().ok_or_else(|| {
            (
                ErrorCode::BadRequest,
                format!("partition {partition} is not on shard {}", self.id),
            )
        })
    }

    // ---------------------------------------------------------------- membership

    /// Installs a membership on this shard: ring, failure-detector peers, links.
    pub(crate) fn set_view(&self, membership: Membership) {
        let view = View::new(membership, self.config.replicas);
        let now = mono_ms();
        {
            let mut fd = self.cluster.fd.borrow_mut();
            for member in view.membership.members() {
                if member.id == self.cluster.local {
                    continue;
                }
                if member.status == Status::Removed {
                    fd.remove_peer(member.id);
                } else {
                    fd.add_peer(now, member.id);
                }
            }
        }
        // links to nodes gone for good would reconnect to their addresses forever
        // (a call already on one keeps it until it ends)
        let gone = |id: &NodeId| {
            view.membership
                .member(*id)
                .is_none_or(|m| m.status == Status::Removed)
        };
        self.cluster.links.borrow_mut().retain(|id, _| !gone(id));
        self.cluster
            .shard_links
            .borrow_mut()
            .retain(|(id, _), _| !gone(id));
        self.cluster.layouts.borrow_mut().retain(|id, _| !gone(id));
        *self.cluster.view.borrow_mut() = Some(Rc::new(view));
        self.cluster.hint_wake.notify_all();
    }

    /// Shard 0: a local change or gossip changed the membership.
    fn membership_changed(&self, membership: Membership) {
        if let Err(e) = persist_membership(&self.config.data_dir, &membership, self.config.node_id)
        {
            tracing::error!(error = %e, "cannot persist the membership");
        }
        if self.senders.is_some() {
            self.cluster
                .membership_seq
                .set(self.cluster.membership_seq.get() + 1);
            let others = (0..self.config.shards).filter(|&s| s != self.id).collect();
            *self.cluster.membership_unsent.borrow_mut() = Some((membership.encode(), others));
            self.send_membership();
        }
        tracing::info!(
            members = membership.len(),
            fingerprint = membership.fingerprint(),
            "membership changed"
        );
        self.set_view(membership);
    }

    /// Shard 0: sends its latest membership to the shards that have not got it. The mesh
    /// queues are bounded and shared with forwarded requests, so a full one is tried
    /// again by the next tick rather than skipped: a shard left on an older membership
    /// would place keys on an older ring until the next change.
    pub(crate) fn send_membership(&self) {
        let Some(senders) = &self.senders else {
            return;
        };
        let mut unsent = self.cluster.membership_unsent.borrow_mut();
        let Some((bytes, shards)) = unsent.as_mut() else {
            return;
        };
        let seq = self.cluster.membership_seq.get();
        shards.retain(|&shard| {
            let message = ShardMsg::Membership {
                seq,
                bytes: bytes.clone(),
            };
            match senders.try_send_to(shard, message) {
                Ok(()) => false,
                Err(glommio::GlommioError::Closed(_)) => false,
                Err(_) => true,
            }
        });
        if shards.is_empty() {
            *unsent = None;
        }
    }

    /// Another shard: installs the membership shard 0 sent unless a newer one is in.
    pub(crate) fn on_membership(&self, seq: u64, membership: Membership) {
        if seq <= self.cluster.membership_seq.get() {
            return;
        }
        self.cluster.membership_seq.set(seq);
        self.set_view(membership);
    }

    /// Shard 0: starts gossip with `membership` (the node has joined).
    pub(crate) fn start_gossip(&self, membership: Membership) {
        let seeds: Vec<NodeId> = membership
            .members()
            .filter(|m| self.config.seeds.contains(&m.addr))
            .map(|m| m.id)
            .filter(|&id| id != self.cluster.local)
            .collect();
        let mut config =
            GossipConfig::new(self.cluster.local, seeds, self.config.node_id ^ now_ms());
        config.gossip_period_ms = self.config.gossip_period.as_millis().max(1) as u64;
        *self.cluster.gossip.borrow_mut() = Some(Gossip::new(config, membership.clone()));
        self.membership_changed(membership);
    }

    fn on_gossip(self: &Rc<Self>, from: NodeId, message: GossipMessage) {
        let changed = {
            let mut gossip = self.cluster.gossip.borrow_mut();
            let Some(gossip) = gossip.as_mut() else {
                return;
            };
            gossip.handle_message(mono_ms(), from, message);
            gossip.poll_changed().then(|| gossip.membership().clone())
        };
        if let Some(membership) = changed {
            self.membership_changed(membership);
        }
        self.send_gossip();
    }

    fn send_gossip(self: &Rc<Self>) {
        let outgoing: Vec<_> = {
            let mut gossip = self.cluster.gossip.borrow_mut();
            let Some(gossip) = gossip.as_mut() else {
                return;
            };
            std::iter::from_fn(|| gossip.poll_outgoing()).collect()
        };
        for message in outgoing {
            let shard = self.clone();
            glommio::spawn_local(async move {
                let bytes = message.message.encode();
                let request = ClusterRequest::Gossip {
                    from: shard.cluster.local.0,
                    message: &bytes,
                };
                let _ = shard
                    .call_peer(message.to, &request, Duration::from_secs(1))
                    .await;
            })
            .detach();
        }
    }

    /// Pushes the whole membership to every member (after a local change, so the
    /// cluster agrees within one round trip instead of a few gossip rounds).
    fn push_membership(self: &Rc<Self>) {
        let Some(view) = self.cluster.view() else {
            return;
        };
        let message = GossipMessage::Delta {
            partition_count: view.membership.partition_count(),
            members: view.membership.members().cloned().collect(),
            wanted: Vec::new(),
        };
        let bytes = Rc::new(message.encode());
        for member in view.membership.members() {
            if member.id == self.cluster.local || member.status == Status::Removed {
                continue;
            }
            let (shard, bytes, to) = (self.clone(), bytes.clone(), member.id);
            glommio::spawn_local(async move {
                let request = ClusterRequest::Gossip {
                    from: shard.cluster.local.0,
                    message: &bytes,
                };
                let _ = shard.call_peer(to, &request, Duration::from_secs(1)).await;
            })
            .detach();
        }
    }

    async fn change_turn(&self) -> crate::notify::Turn<'_> {
        crate::notify::Turn::wait(&self.cluster.change_busy, &self.cluster.change_done).await
    }

    /// Partitions whose N home nodes differ between two memberships.
    fn changed_partitions(&self, before: &Membership, after: &Membership) -> Vec<u32> {
        let (a, b) = (Ring::from_membership(before), Ring::from_membership(after));
        let n = self.config.replicas;
        (0..self.config.partitions)
            .filter(|&p| {
                a.nodes().is_empty()
                    || a.preference_list(p, n).replicas != b.preference_list(p, n).replicas
            })
            .collect()
    }

    /// Refuses a membership change that would move partitions holding keys on any
    /// current member (moving data on a membership change is not implemented yet).
    async fn check_no_data_moves(
        &self,
        before: &Membership,
        after: &Membership,
    ) -> Result<(), String> {
        let changed = self.changed_partitions(before, after);
        let members: Vec<NodeId> = before
            .members()
            .filter(|m| !m.status.has_left())
            .map(|m| m.id)
            .collect();
        for id in members {
            for &p in &changed {
                let keys = if id == self.cluster.local && self.partitions.contains_key(&p) {
                    self.partitions[&p].key_count() as u64
                } else {
                    let frame = self
                        .call_peer(
                            id,
                            &ClusterRequest::KeyCount { partition: p },
                            Duration::from_secs(2),
                        )
                        .await
                        .map_err(|e| {
                            format!("cannot check node {id} holds no data to move: {e}")
                        })?;
                    match ClusterReply::parse(&frame) {
                        Ok((_, ClusterReply::KeyCountOk(keys))) => keys,
                        _ => {
                            return Err(format!(
                                "node {id} did not report its keys: {}",
                                error_of(&frame).map_or_else(String::new, |e| e.1)
                            ))
                        }
                    }
                };
                if keys > 0 {
                    return Err(format!(
                        "refused: this change moves {} partitions and partition {p} holds {keys} keys \
                         on node {id}; moving data on a membership change is not implemented yet",
                        changed.len()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Shard 0 of a member: admits node `id` into the cluster.
    async fn admit(
        self: &Rc<Self>,
        id: NodeId,
        shards: u32,
        weight: u32,
        addr: &str,
        zone: &str,
    ) -> Result<Vec<u8>, String> {
        let _turn = self.change_turn().await;
        let current = match self.cluster.gossip.borrow().as_ref() {
            Some(g) => g.membership().clone(),
            None => return Err("this node has not joined a cluster itself".into()),
        };
        if let Some(member) = current.member(id) {
            if member.status != Status::Removed {
                if member.addr == addr {
                    return Ok(current.encode());
                }
                // a restart at another address, or a second node started with the
                // same id: only the first may take the member's place
                if node_id_at(&member.addr).await == Some(id.0) {
                    return Err(format!(
                        "node id {id} is in use by the running node at {}: is a second \
                         node started with the same --node-id?",
                        member.addr
                    ));
                }
                let mut next = current.clone();
                next.set_addr(id, addr).map_err(|e| e.to_string())?;
                self.adopt_local_change(next.clone());
                return Ok(next.encode());
            }
        }
        let mut next = current.clone();
        next.join(id, addr, weight.max(1), zone, shards.max(1))
            .map_err(|e| e.to_string())?;
        next.set_status(id, Status::Valid)
            .map_err(|e| e.to_string())?;
        self.check_no_data_moves(&current, &next).await?;
        tracing::info!(node = id.0, addr, "admitted a node");
        self.adopt_local_change(next.clone());
        Ok(next.encode())
    }

    fn adopt_local_change(self: &Rc<Self>, next: Membership) {
        if let Some(gossip) = self.cluster.gossip.borrow_mut().as_mut() {
            let _ = gossip.membership_mut().merge(&next);
            let _ = gossip.poll_changed();
        }
        let merged = self
            .cluster
            .gossip
            .borrow()
            .as_ref()
            .map(|g| g.membership().clone());
        if let Some(merged) = merged {
            self.membership_changed(merged);
        }
        self.push_membership();
    }

    /// Shard 0: asks `seed` to admit this node; adopts the membership it answers.
    pub(crate) async fn join_via(self: &Rc<Self>, seed: &str) -> Result<Membership, String> {
        let link = PeerLink::spawn(seed, LinkConfig::default());
        let advertise = self.config.advertise.to_string();
        let request = ClusterRequest::JoinRequest {
            id: self.cluster.local.0,
            shards: self.config.shards as u32,
            weight: self.config.weight,
            addr: advertise.as_bytes(),
            zone: self.config.zone.as_bytes(),
        };
        let frame = link
            .call(Duration::from_secs(10), |id, out| request.encode(id, out))
            .await
            .map_err(|e| e.to_string())?;
        match ClusterReply::parse(&frame) {
            Ok((_, ClusterReply::JoinAccept(bytes))) => {
                let membership = Membership::decode(bytes).map_err(|e| e.to_string())?;
                if membership.partition_count() != self.config.partitions {
                    return Err(format!(
                        "the cluster has {} partitions, this node {}",
                        membership.partition_count(),
                        self.config.partitions
                    ));
                }
                self.start_gossip(membership.clone());
                self.push_membership();
                Ok(membership)
            }
            _ => Err(error_of(&frame).map_or_else(
                || "the seed answered with an unexpected frame".to_string(),
                |(_, message)| message,
            )),
        }
    }

    /// `ringkv join SEED`: only a node alone in its own cluster, holding no keys.
    async fn join_cluster_on_request(self: &Rc<Self>, seed: &str) -> Result<String, String> {
        let _turn = self.change_turn().await;
        if let Some(view) = self.cluster.view() {
            let others = view
                .membership
                .members()
                .filter(|m| m.id != self.cluster.local && !m.status.has_left())
                .count();
            // a node that left is in no cluster any more, whatever it still sees
            let left = view
                .membership
                .member(self.cluster.local)
                .is_some_and(|m| m.status.has_left());
            if others > 0 && !left {
                return Err(format!(
                    "this node is already in a cluster with {others} other members; leave it first"
                ));
            }
            // all of this node's keys: partitions on every shard
            let me = self.cluster.local;
            for p in 0..self.config.partitions {
                let frame = self
                    .call_peer(
                        me,
                        &ClusterRequest::KeyCount { partition: p },
                        Duration::from_secs(2),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                // an error reply (a shard stopping or failed) is not "no keys"
                let keys = match ClusterReply::parse(&frame) {
                    Ok((_, ClusterReply::KeyCountOk(keys))) => keys,
                    _ => {
                        return Err(format!(
                            "cannot check this node holds no keys in partition {p}: {}",
                            error_of(&frame).map_or_else(|| "no key count".into(), |e| e.1)
                        ))
                    }
                };
                if keys > 0 {
                    return Err(format!(
                        "refused: this node holds {keys} keys in partition {p}; moving data \
                         on a membership change is not implemented yet"
                    ));
                }
            }
        }
        let membership = self.join_via(seed).await?;
        Ok(format!(
            "{{\"joined\":true,\"members\":{},\"fingerprint\":{}}}",
            membership.len(),
            membership.fingerprint()
        ))
    }

    async fn leave_cluster(self: &Rc<Self>) -> Result<String, String> {
        let _turn = self.change_turn().await;
        let current = match self.cluster.gossip.borrow().as_ref() {
            Some(g) => g.membership().clone(),
            None => return Err("this node is not in a cluster".into()),
        };
        let others = current
            .members()
            .filter(|m| m.id != self.cluster.local && !m.status.has_left())
            .count();
        if others == 0 {
            return Err("this node is the only member; there is no cluster to leave".into());
        }
        let mut next = current.clone();
        next.remove(self.cluster.local).map_err(|e| e.to_string())?;
        self.check_no_data_moves(&current, &next).await?;
        self.adopt_local_change(next.clone());
        Ok(format!(
            "{{\"left\":true,\"members\":{}}}",
            next.members().filter(|m| !m.status.has_left()).count()
        ))
    }

    /// This node's view of the cluster, as JSON.
    fn status_json(&self) -> String {
        let Some(view) = self.cluster.view() else {
            return format!(
                "{{\"node_id\":{},\"joined\":false,\"members\":[]}}",
                self.cluster.local.0
            );
        };
        let counts = view.ring.partition_counts();
        let (n, r, w) = self.quorum(&view);
        let mut members = Vec::new();
        for m in view.membership.members() {
            let reachable = self.reachable(&view, m.id) && !m.status.has_left();
            members.push(format!(
                "{{\"id\":{},\"addr\":{},\"status\":\"{}\",\"reachable\":{},\"partitions\":{},\"shards\":{}}}",
                m.id.0,
                json_string(&m.addr),
                m.status.name(),
                reachable,
                counts.get(&m.id).copied().unwrap_or(0),
                m.shard_count
            ));
        }
        let c = &self.counters;
        let pending: u64 = c
            .hints_pending
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum();
        format!(
            "{{\"node_id\":{},\"joined\":true,\"addr\":{},\"partitions\":{},\"n\":{n},\"r\":{r},\"w\":{w},\
             \"fingerprint\":{},\"members\":[{}],\"hints_pending\":{pending},\"hints_stored\":{},\
             \"hints_delivered\":{},\"read_repairs\":{}}}",
            self.cluster.local.0,
            json_string(&self.config.advertise.to_string()),
            self.config.partitions,
            view.membership.fingerprint(),
            members.join(","),
            c.hints_stored.load(Ordering::Relaxed),
            c.hints_delivered.load(Ordering::Relaxed),
            c.read_repairs.load(Ordering::Relaxed),
        )
    }

    // ---------------------------------------------------------------- background

    /// The cluster's background tasks on this shard: coordinator and failure-detector
    /// ticks with probes, gossip (shard 0), hint delivery.
    pub(crate) fn spawn_cluster_tasks(self: &Rc<Self>) -> Vec<glommio::Task<()>> {
        let mut tasks = Vec::new();
        let shard = self.clone();
        tasks.push(glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(50)).await;
                shard.send_membership();
                let now = mono_ms();
                shard.cluster.coordinator.borrow_mut().tick(now);
                shard.pump();
                let probes: Vec<_> = {
                    let mut fd = shard.cluster.fd.borrow_mut();
                    fd.tick(now);
                    std::iter::from_fn(|| fd.poll_probe()).collect()
                };
                for probe in probes {
                    let s = shard.clone();
                    glommio::spawn_local(async move {
                        s.send_probe(probe.peer, probe.probe_id).await;
                    })
                    .detach();
                }
                let changes: Vec<_> = {
                    let mut fd = shard.cluster.fd.borrow_mut();
                    std::iter::from_fn(|| fd.poll_change()).collect()
                };
                for change in changes {
                    tracing::info!(
                        shard = shard.id,
                        peer = change.peer.0,
                        reachable = change.reachable,
                        "peer reachability changed"
                    );
                    if change.reachable {
                        shard.cluster.hint_wake.notify_all();
                    }
                }
                if shard.id == 0 {
                    if let Some(g) = shard.cluster.gossip.borrow_mut().as_mut() {
                        g.tick(now);
                    }
                    let changed = shard
                        .cluster
                        .gossip
                        .borrow_mut()
                        .as_mut()
                        .and_then(|g| g.poll_changed().then(|| g.membership().clone()));
                    if let Some(m) = changed {
                        shard.membership_changed(m);
                    }
                    shard.send_gossip();
                }
            }
        }));
        let shard = self.clone();
        tasks.push(glommio::spawn_local(async move {
            loop {
                let _ = glommio::timer::timeout(Duration::from_millis(500), async {
                    shard.cluster.hint_wake.wait().await;
                    Ok(())
                })
                .await;
                shard.deliver_hints().await;
            }
        }));
        tasks
    }

    async fn send_probe(&self, peer: NodeId, probe_id: u64) {
        let Some(link) = self.link(peer) else { return };
        let reply = link
            .call(Duration::from_millis(500), |id, out| {
                protocol::Request::Ping.encode(id, out)
            })
            .await;
        if reply.is_ok() {
            self.cluster
                .fd
                .borrow_mut()
                .handle_probe_answered(mono_ms(), peer, probe_id);
        }
    }

    /// One round of hint delivery: every hint whose owner is reachable gets the key's
    /// current local versions; the hint goes once the owner acknowledged them all.
    async fn deliver_hints(self: &Rc<Self>) {
        let pending = self.cluster.hints.pending_count();
        self.counters.hints_pending[self.id].store(pending as u64, Ordering::Relaxed);
        if pending == 0 || !self.config.hinted_handoff {
            return;
        }
        let Some(view) = self.cluster.view() else {
            return;
        };
        let hints = {
            let fd = self.cluster.fd.borrow();
            let local = self.cluster.local;
            self.cluster.hints.pending(4096, |target| {
                target != local && view.is_member(target) && fd.is_reachable(target)
            })
        };
        let mut by_target: BTreeMap<NodeId, Vec<replica::Hint>> = BTreeMap::new();
        for hint in hints {
            by_target.entry(hint.target).or_default().push(hint);
        }
        for (target, hints) in by_target {
            // up to 64 hints in flight to one owner
            for chunk in hints.chunks(64) {
                let tasks: Vec<_> = chunk
                    .iter()
                    .cloned()
                    .map(|hint| {
                        let shard = self.clone();
                        glommio::spawn_local(async move { shard.deliver_hint(&hint).await })
                    })
                    .collect();
                let mut failed = false;
                for task in tasks {
                    failed |= !task.await;
                }
                // a hint that fails on its own (an error reply, a partition this shard
                // no longer holds) must not hold back the owner's other hints round
                // after round: stop only when the owner stopped answering
                if failed && !self.cluster.fd.borrow().is_reachable(target) {
                    break;
                }
            }
        }
    }

    async fn deliver_hint(&self, hint: &replica::Hint) -> bool {
        let versions = match self.partitions.get(&hint.partition) {
            Some(p) => match replica::replica_get(p, &hint.key).await {
                Ok(v) => v,
                Err(_) => return false,
            },
            // the partition is another shard's since the shard count changed: this
            // node's versions of the key come from there
            None => match self
                .send_replica_get(self.cluster.local, hint.partition, &hint.key)
                .await
            {
                Some(v) => v,
                None => return false,
            },
        };
        if versions.is_empty() {
            // the key's copy here is gone: a tombstone older than its grace was
            // reaped by compaction (docs/format.md; it keeps one a hint in the same
            // shard names, so this is a hint held by another shard since the shard
            // count changed): nothing is left to hand off, and the hint goes without
            // counting as delivered
            tracing::warn!(
                target = hint.target.0,
                partition = hint.partition,
                "a hint's key has no version left here (a tombstone reaped after its \
                 grace, its hint held by another shard): dropped, the owner may still \
                 hold the deleted value"
            );
        }
        for v in &versions {
            if !self
                .send_replica_put(
                    hint.target,
                    hint.partition,
                    None,
                    &hint.key,
                    v,
                    self.config.request_timeout,
                )
                .await
            {
                return false;
            }
        }
        match self.cluster.hints.delivered(hint, now_ms()).await {
            Ok(removed) => {
                if removed && !versions.is_empty() {
                    self.counters
                        .hints_delivered
                        .fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot remove a delivered hint");
                false
            }
        }
    }
}

/// What a peer answers a HELLO with over `link`, if it answers within `timeout`.
async fn hello(link: &PeerLink, timeout: Duration) -> Option<HelloOk> {
    let reply = link
        .call(timeout, |rid, out| {
            protocol::Request::Hello {
                min_version: protocol::PROTOCOL_VERSION,
                max_version: protocol::PROTOCOL_VERSION,
            }
            .encode(rid, out)
        })
        .await
        .ok()?;
    match Reply::parse(&reply) {
        // its shard layout is read by v1's rules: another version's is not trusted
        Ok((_, Reply::HelloOk(h))) if h.version == protocol::PROTOCOL_VERSION => Some(h),
        _ => None,
    }
}

/// The node id of whatever answers a HELLO at `addr` within a second, if anything does.
async fn node_id_at(addr: &str) -> Option<u64> {
    let link = PeerLink::spawn(
        addr,
        LinkConfig {
            connect_timeout: Duration::from_secs(1),
            ..LinkConfig::default()
        },
    );
    hello(&link, Duration::from_secs(1))
        .await
        .map(|h| h.node_id)
}

/// Learns a peer's shards and shard ports from a HELLO on its client port.
async fn fetch_layout(
    link: Rc<PeerLink>,
    layouts: Rc<RefCell<HashMap<NodeId, Layout>>>,
    id: NodeId,
    addr: String,
) {
    match hello(&link, Duration::from_secs(2)).await {
        Some(h) => {
            layouts.borrow_mut().insert(
                id,
                Layout::Known {
                    addr,
                    shards: h.shards,
                    port_base: h.shard_port_base,
                },
            );
        }
        // asked again on a later request
        None => {
            layouts.borrow_mut().remove(&id);
        }
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

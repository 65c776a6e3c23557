//! The replica side of replication and the hint store of hinted handoff, async over any
//! [`Storage`].
//!
//! Replica: [`replica_put`] stores a version made by a coordinator under the sibling
//! rules (a duplicate is `Stale`, so a retried or duplicated message is applied once);
//! [`replica_get`] returns the key's siblings (tombstones included).
//!
//! Hints: a fallback node stores a hinted write in its OWN regular partition (every node
//! opens all partitions) and records a hint in its hints partition (one per shard,
//! opened by the caller with `tombstone_grace_ms: 0` and a `key_bytes_max` at least
//! [`HINT_KEY_OVERHEAD`] above the data partitions'). A hint only says "deliver key K of
//! partition P to node T": one record per (target, partition, key) under
//! [`hint_key`], value `Some(b"")`, empty version blob, replacing any earlier record of
//! that key. Delivery sends the key's CURRENT local siblings ([`replica_get`] on the
//! local partition), so several hinted writes of one key collapse into one hint. After
//! the target acknowledged every version, [`hint_delivered`] removes the hint with a
//! tombstone if its record is still the one that was delivered (a hinted write that
//! came in meanwhile keeps it); compaction reaps the tombstones.
//!
//! A [`HintStore`] wraps the hints partition with its pending hints counted per target
//! in memory, so that delivery rounds neither count by walking the store nor walk it
//! while no target that has hints can take them.
//!
//! Order that keeps hints safe: store the hinted version first, then record the hint
//! (a delivery that reads the siblings in between sees the version or, if it read
//! before, the new hint record has a newer seq and is not removed).

use ringkv_ring::NodeId;

use super::coordinator::VersionedValue;
use crate::keydir::Loc;
use crate::partition::{Partition, StoreError, WriteOp};
use crate::storage::Storage;
use crate::versioned::ApplyOutcome;

/// How many times a hint write re-reads a hint key that other writes keep changing.
const HINT_WRITE_ATTEMPTS_MAX: usize = 16;

/// Bytes a hint key adds to the data key: target node id (u64) and partition (u32),
/// both big-endian so hints list by target, then partition.
pub const HINT_KEY_OVERHEAD: usize = 12;

/// Stores a version made by a coordinator (replication, read repair, hint delivery).
/// A duplicate or covered version is `Stale` and writes nothing.
pub async fn replica_put<S: Storage>(
    partition: &Partition<S>,
    key: &[u8],
    v: &VersionedValue,
    now_ms: u64,
) -> Result<ApplyOutcome, StoreError> {
    partition
        .apply_version(key, &v.version, v.value.as_deref(), now_ms)
        .await
}

/// Every sibling of `key` (tombstones included) with its version.
pub async fn replica_get<S: Storage>(
    partition: &Partition<S>,
    key: &[u8],
) -> Result<Vec<VersionedValue>, StoreError> {
    let (siblings, _) = partition.read_siblings(key).await?;
    Ok(siblings
        .into_iter()
        .map(|s| VersionedValue {
            version: s.version,
            value: s.value,
        })
        .collect())
}

/// The hints-partition key of the hint "deliver `key` of `partition` to `target`".
pub fn hint_key(target: NodeId, partition: u32, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HINT_KEY_OVERHEAD + key.len());
    out.extend_from_slice(&target.0.to_be_bytes());
    out.extend_from_slice(&partition.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The inverse of [`hint_key`]; `None` for anything else (too short, empty data key).
pub fn parse_hint_key(k: &[u8]) -> Option<(NodeId, u32, &[u8])> {
    if k.len() <= HINT_KEY_OVERHEAD {
        return None;
    }
    let target = u64::from_be_bytes(k[0..8].try_into().ok()?);
    let partition = u32::from_be_bytes(k[8..12].try_into().ok()?);
    Some((NodeId(target), partition, &k[HINT_KEY_OVERHEAD..]))
}

/// One pending hint: deliver `key` of `partition` to `target`; `seq` is the hint
/// record's seq (see [`hint_delivered`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint {
    pub target: NodeId,
    pub partition: u32,
    pub key: Vec<u8>,
    pub seq: u64,
}

/// The live (non-tombstone) hint record of a key, if any.
fn live_record(locs: &[Loc]) -> Option<u64> {
    locs.iter()
        .filter(|l| !l.is_tombstone())
        .map(|l| l.seq)
        .max()
}

/// Replaces whatever `hints` holds under `hk` by one record (`value: Some` a hint,
/// `None` its removal); with `only_if_live: Some(seq)` only while the live record is
/// still `seq`. `Ok(None)`: nothing written for that reason; `Ok(Some(was_live))`:
/// written, and whether a live record (a pending hint) was there before. `appended`
/// is told `was_live` in the step that puts the record in the keydir (before the wait
/// for durability, which may still fail: the record stays in the keydir then).
async fn replace_hint_record<S: Storage>(
    hints: &Partition<S>,
    hk: &[u8],
    value: Option<&[u8]>,
    now_ms: u64,
    only_if_live: Option<u64>,
    appended: &dyn Fn(bool),
) -> Result<Option<bool>, StoreError> {
    for _ in 0..HINT_WRITE_ATTEMPTS_MAX {
        let locs = hints.versions(hk);
        let was_live = live_record(&locs).is_some();
        if let Some(seq) = only_if_live {
            if live_record(&locs) != Some(seq) {
                return Ok(None);
            }
        }
        let seqs: Vec<u64> = locs.iter().map(|l| l.seq).collect();
        let op = WriteOp {
            key: hk,
            version: b"",
            value,
            replaces: &seqs,
        };
        let unchanged = |keydir: &crate::keydir::KeyDir| {
            let now: Vec<u64> = keydir
                .get(hk)
                .map(|l| l.iter().map(|l| l.seq).collect())
                .unwrap_or_default();
            now == seqs
        };
        let written = hints
            .write_if_then(&[op], now_ms, unchanged, || appended(was_live))
            .await?;
        if written.is_some() {
            return Ok(Some(was_live));
        }
    }
    Err(StoreError::Contended {
        attempts: HINT_WRITE_ATTEMPTS_MAX,
    })
}

/// Records (or renews) the hint "deliver `key` of `partition` to `target`". Call it
/// after the hinted version is stored in the local partition. `Ok(true)`: a new
/// pending hint (none was pending for that key and target).
pub async fn record_hint<S: Storage>(
    hints: &Partition<S>,
    target: NodeId,
    partition: u32,
    key: &[u8],
    now_ms: u64,
) -> Result<bool, StoreError> {
    let hk = hint_key(target, partition, key);
    let written = replace_hint_record(hints, &hk, Some(b""), now_ms, None, &|_| {}).await?;
    Ok(written == Some(false))
}

/// Up to `limit` pending hints for the targets `deliverable` accepts, ordered by
/// (target, partition, key). Removed hints (tombstones not yet compacted away) and
/// foreign keys are skipped. The targets are filtered before the limit applies: hints
/// for a node that is down (or no longer a member) must not crowd out, sorted first,
/// the hints of nodes that can take theirs.
pub fn pending_hints<S: Storage>(
    hints: &Partition<S>,
    limit: usize,
    mut deliverable: impl FnMut(NodeId) -> bool,
) -> Vec<Hint> {
    if limit == 0 {
        return Vec::new();
    }
    // the `limit` first in order, kept in a heap: a store of millions of hints (a long
    // outage) costs one pass and `limit` copied keys, not a copy and a sort of them all.
    // A tuple orders by (target, partition, key), which no two hints share, so the seq
    // after them never decides
    let mut first: std::collections::BinaryHeap<(NodeId, u32, Vec<u8>, u64)> =
        std::collections::BinaryHeap::new();
    hints.for_each_key(|k, locs| {
        if let (Some((target, partition, key)), Some(seq)) = (parse_hint_key(k), live_record(locs))
        {
            if !deliverable(target) {
                return;
            }
            if first.len() == limit {
                let last = first.peek().expect("limit > 0");
                if (target, partition, key) >= (last.0, last.1, &last.2[..]) {
                    return;
                }
                first.pop();
            }
            first.push((target, partition, key.to_vec(), seq));
        }
    });
    // the keydir iterates in hash order; hand hints out in a fixed order
    first
        .into_sorted_vec()
        .into_iter()
        .map(|(target, partition, key, seq)| Hint {
            target,
            partition,
            key,
            seq,
        })
        .collect()
}

/// Whether a pending hint still has to hand `key` of `partition` to one of `targets`.
/// Compaction keeps such a key's tombstone past its grace period
/// ([`Partition::compact_keeping`]): dropped before the hint is delivered, the delete
/// would never reach the replica that missed it, which would keep (and read repair
/// would spread again) the deleted value.
pub fn hint_names_key<S: Storage>(
    hints: &Partition<S>,
    targets: impl IntoIterator<Item = NodeId>,
    partition: u32,
    key: &[u8],
) -> bool {
    targets
        .into_iter()
        .any(|t| live_record(&hints.versions(&hint_key(t, partition, key))).is_some())
}

/// How many hints are pending.
pub fn pending_hint_count<S: Storage>(hints: &Partition<S>) -> usize {
    let mut count = 0;
    hints.for_each_key(|k, locs| {
        if parse_hint_key(k).is_some() && live_record(locs).is_some() {
            count += 1;
        }
    });
    count
}

/// Removes the hint if its record is still `hint.seq` (a newer hinted write of the key
/// keeps it). `Ok(true)` if removed.
pub async fn hint_delivered<S: Storage>(
    hints: &Partition<S>,
    hint: &Hint,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let hk = hint_key(hint.target, hint.partition, &hint.key);
    let written = replace_hint_record(hints, &hk, None, now_ms, Some(hint.seq), &|_| {}).await?;
    Ok(written.is_some())
}

/// A hint store: the hints partition, and how many hints are pending for each target,
/// kept in memory (counted by one walk when made, then by every hint written or
/// removed through it). A delivery round then neither walks the store to count its
/// hints nor walks it at all while no target that has hints can take them: with a
/// node down for hours, its millions of hints would otherwise be walked twice a round,
/// holding the shard each time. Every hint write must go through it.
pub struct HintStore<S: Storage> {
    partition: std::rc::Rc<Partition<S>>,
    pending: std::cell::RefCell<std::collections::BTreeMap<NodeId, usize>>,
}

impl<S: Storage> HintStore<S> {
    /// Takes over `partition` (opened as the module documentation says), counting its
    /// pending hints.
    pub fn new(partition: std::rc::Rc<Partition<S>>) -> HintStore<S> {
        let store = HintStore {
            partition,
            pending: std::cell::RefCell::default(),
        };
        store.recount();
        store
    }

    /// Counts the pending hints from the store's records.
    fn recount(&self) {
        let mut pending = std::collections::BTreeMap::new();
        self.partition.for_each_key(|k, locs| {
            if let (Some((target, _, _)), Some(_)) = (parse_hint_key(k), live_record(locs)) {
                *pending.entry(target).or_insert(0usize) += 1;
            }
        });
        *self.pending.borrow_mut() = pending;
    }

    /// The hints partition (to sync, compact and close it; never to write hints).
    pub fn partition(&self) -> &std::rc::Rc<Partition<S>> {
        &self.partition
    }

    /// [`record_hint`], counted.
    pub async fn record(
        &self,
        target: NodeId,
        partition: u32,
        key: &[u8],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        // counted when the record enters the keydir: a write whose sync then fails
        // is in the keydir all the same, and others may write meanwhile
        let count = |was_live: bool| {
            if !was_live {
                *self.pending.borrow_mut().entry(target).or_insert(0) += 1;
            }
        };
        let hk = hint_key(target, partition, key);
        replace_hint_record(&self.partition, &hk, Some(b""), now_ms, None, &count)
            .await
            .map(|_| ())
    }

    /// [`hint_delivered`], counted.
    pub async fn delivered(&self, hint: &Hint, now_ms: u64) -> Result<bool, StoreError> {
        // written only over a live record (`only_if_live`): one pending hint less
        let uncount = |_was_live: bool| {
            let mut pending = self.pending.borrow_mut();
            if let Some(count) = pending.get_mut(&hint.target) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    pending.remove(&hint.target);
                }
            }
        };
        let hk = hint_key(hint.target, hint.partition, &hint.key);
        let written =
            replace_hint_record(&self.partition, &hk, None, now_ms, Some(hint.seq), &uncount)
                .await?;
        Ok(written.is_some())
    }

    /// How many hints are pending.
    pub fn pending_count(&self) -> usize {
        self.pending.borrow().values().sum()
    }

    /// The targets that have pending hints, and how many each.
    pub fn pending_by_target(&self) -> Vec<(NodeId, usize)> {
        self.pending
            .borrow()
            .iter()
            .map(|(&t, &c)| (t, c))
            .collect()
    }

    /// [`pending_hints`], without walking the store when no target `deliverable`
    /// accepts has a pending hint.
    pub fn pending(&self, limit: usize, mut deliverable: impl FnMut(NodeId) -> bool) -> Vec<Hint> {
        let targets: Vec<NodeId> = self.pending.borrow().keys().copied().collect();
        let wanted: Vec<NodeId> = targets.into_iter().filter(|&t| deliverable(t)).collect();
        if wanted.is_empty() {
            return Vec::new();
        }
        pending_hints(&self.partition, limit, |t| wanted.contains(&t))
    }

    /// [`hint_names_key`] for the targets `member` accepts among those with pending
    /// hints.
    pub fn names_key(&self, member: impl Fn(NodeId) -> bool, partition: u32, key: &[u8]) -> bool {
        let targets: Vec<NodeId> = self
            .pending
            .borrow()
            .keys()
            .copied()
            .filter(|&t| member(t))
            .collect();
        hint_names_key(&self.partition, targets, partition, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::PartitionConfig;
    use crate::storage::mem::{MemDisk, MemStorage};
    use crate::version::{ActorId, Dot, StaleReason, VClock, Version};
    use futures_lite::future::block_on;

    fn hints_config() -> PartitionConfig {
        PartitionConfig {
            tombstone_grace_ms: 0,
            segment_bytes_max: 4096,
            key_bytes_max: 4096 + HINT_KEY_OVERHEAD,
            ..PartitionConfig::default()
        }
    }

    async fn open(disk: &MemDisk, path: &str, config: PartitionConfig) -> Partition<MemStorage> {
        Partition::open(disk.folder(path), config, 1_000_000)
            .await
            .expect("open")
            .0
    }

    fn vv(node: u64, counter: u64, value: Option<&str>) -> VersionedValue {
        VersionedValue {
            version: Version {
                dot: Dot::new(ActorId::new(node, 0), counter),
                timestamp_ms: 5,
                past: VClock::new(),
            },
            value: value.map(|v| v.as_bytes().to_vec()),
        }
    }

    #[test]
    fn hint_key_round_trips_and_rejects_junk() {
        let k = hint_key(NodeId(7), 3, b"abc");
        assert_eq!(parse_hint_key(&k), Some((NodeId(7), 3, &b"abc"[..])));
        assert_eq!(parse_hint_key(&k[..12]), None);
        assert_eq!(parse_hint_key(b"short"), None);
        assert!(hint_key(NodeId(1), 0, b"z") < hint_key(NodeId(2), 0, b"a"));
    }

    #[test]
    fn replica_put_applies_once_and_get_returns_siblings() {
        block_on(async {
            let disk = MemDisk::new();
            let p = open(&disk, "/p", PartitionConfig::default()).await;
            let a = vv(1, 1, Some("a"));
            let b = vv(2, 1, None);
            assert!(matches!(
                replica_put(&p, b"k", &a, 10).await.unwrap(),
                ApplyOutcome::Applied { .. }
            ));
            assert_eq!(
                replica_put(&p, b"k", &a, 11).await.unwrap(),
                ApplyOutcome::Stale(StaleReason::Duplicate { index: 0 })
            );
            replica_put(&p, b"k", &b, 12).await.unwrap();
            let mut got = replica_get(&p, b"k").await.unwrap();
            got.sort_by_key(|v| v.version.dot);
            assert_eq!(got, vec![a, b]);
            assert!(replica_get(&p, b"none").await.unwrap().is_empty());
        });
    }

    /// Each key hinted once and delivered once: the hint store holds only tombstones of
    /// delivered hints, under half its bytes superseded, and compaction (which drops them
    /// all) was never due, so the store grew with every key ever hinted.
    #[test]
    fn a_hint_store_of_delivered_hints_is_due_for_compaction() {
        block_on(async {
            let disk = MemDisk::new();
            let hints = open(&disk, "/hints", hints_config()).await;
            for i in 0..300u32 {
                let key = format!("key-{i}");
                record_hint(&hints, NodeId(2), 5, key.as_bytes(), 10)
                    .await
                    .unwrap();
                let pending = pending_hints(&hints, usize::MAX, |_| true);
                let hint = pending
                    .iter()
                    .find(|h| h.key == key.as_bytes())
                    .expect("the hint is pending");
                hint_delivered(&hints, hint, 11).await.unwrap();
            }
            assert!(pending_hints(&hints, usize::MAX, |_| true).is_empty());
            let before = hints.stats();
            assert!(before.segments > 3, "{before:?}");
            assert!(hints.compaction_due(0.5), "{before:?}");
            // a compaction time before the tombstones' own (the wall clock stepped
            // back): with no grace period they go all the same, or the store would
            // stay due and be rewritten at every check
            hints.compact(5).await.unwrap();
            let after = hints.stats();
            assert!(after.bytes * 4 < before.bytes, "{before:?} -> {after:?}");
            assert!(!hints.compaction_due(0.5), "{after:?}");
        });
    }

    #[test]
    fn hints_survive_a_crash_after_sync_and_collapse_per_key() {
        block_on(async {
            let disk = MemDisk::new();
            let hints = open(&disk, "/hints", hints_config()).await;
            record_hint(&hints, NodeId(2), 5, b"k1", 10).await.unwrap();
            record_hint(&hints, NodeId(2), 5, b"k1", 11).await.unwrap();
            record_hint(&hints, NodeId(1), 9, b"k2", 12).await.unwrap();
            assert_eq!(pending_hint_count(&hints), 2);
            hints.sync().await.unwrap();
            drop(hints);
            disk.crash(42);
            let hints = open(&disk, "/hints", hints_config()).await;
            let pending = pending_hints(&hints, 10, |_| true);
            assert_eq!(pending.len(), 2);
            assert_eq!(
                (pending[0].target, pending[0].partition, &pending[0].key[..]),
                (NodeId(1), 9, &b"k2"[..])
            );
            assert_eq!(
                (pending[1].target, pending[1].partition, &pending[1].key[..]),
                (NodeId(2), 5, &b"k1"[..])
            );
            assert_eq!(pending_hints(&hints, 1, |_| true).len(), 1);
        });
    }

    /// The first `limit` hints in order are the first `limit` of all of them, whatever
    /// order the keydir holds them in (the selection keeps a bounded heap).
    #[test]
    fn a_limited_round_hands_out_the_first_hints_in_order() {
        block_on(async {
            let disk = MemDisk::new();
            let hints = open(&disk, "/hints", hints_config()).await;
            for i in 0..300u32 {
                let key = format!("k{}", (i * 7919) % 1000);
                record_hint(
                    &hints,
                    NodeId(u64::from(i % 3) + 1),
                    i % 5,
                    key.as_bytes(),
                    10,
                )
                .await
                .unwrap();
            }
            let order = |h: &Hint| (h.target, h.partition, h.key.clone());
            let all: Vec<_> = pending_hints(&hints, usize::MAX, |_| true)
                .iter()
                .map(order)
                .collect();
            assert_eq!(all.len(), 300);
            assert!(all.windows(2).all(|w| w[0] < w[1]), "in order");
            for limit in [0, 1, 7, 64, 299, 300, 1000] {
                let some: Vec<_> = pending_hints(&hints, limit, |_| true)
                    .iter()
                    .map(order)
                    .collect();
                assert_eq!(some[..], all[..limit.min(300)], "limit {limit}");
            }
            let some: Vec<_> = pending_hints(&hints, 20, |t| t != NodeId(1))
                .iter()
                .map(order)
                .collect();
            let want: Vec<_> = all
                .iter()
                .filter(|h| h.0 != NodeId(1))
                .take(20)
                .cloned()
                .collect();
            assert_eq!(some, want);
        });
    }

    #[test]
    fn hints_for_a_target_that_cannot_take_them_do_not_crowd_out_the_others() {
        block_on(async {
            let disk = MemDisk::new();
            let hints = open(&disk, "/hints", hints_config()).await;
            // node 1 is down with more hints than one round hands out; node 2 is up
            for i in 0..50u32 {
                record_hint(&hints, NodeId(1), i % 7, format!("k{i}").as_bytes(), 10)
                    .await
                    .unwrap();
            }
            record_hint(&hints, NodeId(2), 3, b"z", 11).await.unwrap();
            let round = pending_hints(&hints, 10, |t| t != NodeId(1));
            assert_eq!(round.len(), 1, "{round:?}");
            assert_eq!((round[0].target, &round[0].key[..]), (NodeId(2), &b"z"[..]));
            // every target wanted: the limit, in (target, partition, key) order
            let all = pending_hints(&hints, 10, |_| true);
            assert_eq!(all.len(), 10);
            assert!(all.iter().all(|h| h.target == NodeId(1)));
            assert_eq!(pending_hint_count(&hints), 51);
        });
    }

    #[test]
    fn delivered_hint_is_removed_unless_rehinted_meanwhile() {
        block_on(async {
            let disk = MemDisk::new();
            let hints = open(&disk, "/hints", hints_config()).await;
            record_hint(&hints, NodeId(3), 1, b"k", 10).await.unwrap();
            let first = pending_hints(&hints, 10, |_| true).remove(0);
            // a newer hinted write of the key arrives while the first delivery is in flight
            record_hint(&hints, NodeId(3), 1, b"k", 11).await.unwrap();
            assert!(!hint_delivered(&hints, &first, 12).await.unwrap());
            assert_eq!(pending_hint_count(&hints), 1);
            let second = pending_hints(&hints, 10, |_| true).remove(0);
            assert!(second.seq > first.seq);
            assert!(hint_delivered(&hints, &second, 13).await.unwrap());
            assert!(!hint_delivered(&hints, &second, 14).await.unwrap(), "once");
            assert_eq!(pending_hint_count(&hints), 0);
            assert!(pending_hints(&hints, 10, |_| true).is_empty());
            // removal is durable, and a later hint of the same key is a fresh one
            drop(hints);
            disk.crash(7);
            let hints = open(&disk, "/hints", hints_config()).await;
            assert_eq!(pending_hint_count(&hints), 0);
            record_hint(&hints, NodeId(3), 1, b"k", 20).await.unwrap();
            assert_eq!(pending_hint_count(&hints), 1);
        });
    }

    /// The documented order (store the hinted version, then record the hint) against a
    /// delivery that runs concurrently, interleaved at every possible await point: when
    /// both are done, either the delivery carried the new version or a hint is pending.
    #[test]
    fn concurrent_hinted_write_and_delivery_never_lose_the_new_version() {
        use crate::storage::mem::YieldOnce;
        for delay in 0..12 {
            block_on(async {
                let disk = MemDisk::new();
                let part = open(&disk, "/p", PartitionConfig::default()).await;
                let hints = open(&disk, "/hints", hints_config()).await;
                let old = vv(1, 1, Some("old"));
                let new = vv(1, 2, Some("new"));
                replica_put(&part, b"k", &old, 1).await.unwrap();
                record_hint(&hints, NodeId(9), 0, b"k", 1).await.unwrap();
                disk.set_yielding(true);
                let write = async {
                    replica_put(&part, b"k", &new, 2).await.unwrap();
                    record_hint(&hints, NodeId(9), 0, b"k", 2).await.unwrap();
                };
                let deliver = async {
                    for _ in 0..delay {
                        YieldOnce(false).await;
                    }
                    let hint = pending_hints(&hints, 1, |_| true).remove(0);
                    let sent = replica_get(&part, b"k").await.unwrap();
                    // the target's ack arrives after some more turns
                    for _ in 0..(delay % 3) {
                        YieldOnce(false).await;
                    }
                    hint_delivered(&hints, &hint, 3).await.unwrap();
                    sent
                };
                let ((), sent) = futures_lite::future::zip(write, deliver).await;
                let carried = sent.iter().any(|v| v.version == new.version);
                assert!(
                    carried || pending_hint_count(&hints) == 1,
                    "delay {delay}: the new version is neither delivered nor hinted"
                );
            });
        }
    }

    #[test]
    fn delivered_hints_are_reaped_by_compaction() {
        block_on(async {
            let disk = MemDisk::new();
            let hints = open(&disk, "/hints", hints_config()).await;
            // enough records to seal a few 4 KiB segments
            for i in 0..200u32 {
                let key = format!("key-{i:04}");
                record_hint(&hints, NodeId(1), i % 4, key.as_bytes(), 10)
                    .await
                    .unwrap();
            }
            for hint in pending_hints(&hints, 1000, |_| true) {
                assert!(hint_delivered(&hints, &hint, 20).await.unwrap());
            }
            let report = hints.compact(30).await.unwrap();
            assert!(report.records_dropped > 0, "{report:?}");
            assert_eq!(pending_hint_count(&hints), 0);
            let mut keys = 0;
            hints.for_each_key(|_, _| keys += 1);
            assert!(
                keys < 200,
                "tombstones of sealed segments are reaped: {keys}"
            );
        });
    }

    /// A node that missed a delete for longer than the tombstone grace: the fallback's
    /// compaction reaped the tombstone its hint was to hand off, and the hint found
    /// nothing to deliver. A tombstone that a pending hint names stays until the hint is
    /// delivered; the others still go.
    #[test]
    fn a_delete_a_pending_hint_names_outlives_its_grace_until_delivered() {
        block_on(async {
            let disk = MemDisk::new();
            let data_config = PartitionConfig {
                tombstone_grace_ms: 1_000,
                segment_bytes_max: 4096,
                ..PartitionConfig::default()
            };
            let part = open(&disk, "/p", data_config).await;
            let hints = open(&disk, "/hints", hints_config()).await;
            const P: u32 = 7;
            for (i, key) in [&b"named"[..], b"other"].into_iter().enumerate() {
                let node = i as u64 + 1;
                replica_put(&part, key, &vv(node, 1, Some("v")), 10)
                    .await
                    .unwrap();
                let mut delete = vv(node, 2, None);
                delete.version.past.raise(ActorId::new(node, 0), 1, 5);
                replica_put(&part, key, &delete, 20).await.unwrap();
            }
            // node 3 missed the delete of "named" (node 2's hint of another partition,
            // and of a node that is not a target here, changes nothing)
            record_hint(&hints, NodeId(3), P, b"named", 20)
                .await
                .unwrap();
            record_hint(&hints, NodeId(2), P + 1, b"other", 20)
                .await
                .unwrap();
            record_hint(&hints, NodeId(9), P, b"other", 20)
                .await
                .unwrap();
            // seal the segment holding the tombstones
            for i in 0..8u32 {
                let filler = vv(5, u64::from(i) + 1, Some(&"f".repeat(1000)));
                replica_put(&part, format!("filler-{i}").as_bytes(), &filler, 20)
                    .await
                    .unwrap();
            }
            let targets = [NodeId(2), NodeId(3)];
            let keep = |key: &[u8]| hint_names_key(&hints, targets, P, key);
            let report = part.compact_keeping(10_000, &keep).await.unwrap();
            assert_eq!(report.tombstones_held, 1, "{report:?}");
            assert_eq!(report.tombstones_dropped, 1, "{report:?}");
            assert!(replica_get(&part, b"other").await.unwrap().is_empty());
            let kept = replica_get(&part, b"named").await.unwrap();
            assert!(
                kept.len() == 1 && kept[0].value.is_none(),
                "the delete is still there to deliver: {kept:?}"
            );

            // delivered: the next compaction reaps it
            let hint = pending_hints(&hints, 10, |t| t == NodeId(3)).remove(0);
            assert!(hint_delivered(&hints, &hint, 30).await.unwrap());
            for i in 0..8u32 {
                let filler = vv(5, u64::from(i) + 9, Some(&"g".repeat(1000)));
                replica_put(&part, format!("filler2-{i}").as_bytes(), &filler, 30)
                    .await
                    .unwrap();
            }
            let report = part.compact_keeping(10_000, &keep).await.unwrap();
            assert_eq!(report.tombstones_held, 0, "{report:?}");
            assert_eq!(report.tombstones_dropped, 1, "{report:?}");
            assert!(replica_get(&part, b"named").await.unwrap().is_empty());
        });
    }

    /// The store counts its pending hints per target as they are recorded, renewed and
    /// delivered, and again when reopened; a round whose deliverable targets have no
    /// hints does not walk the store (`deliverable` is asked per target, not per hint).
    #[test]
    fn a_hint_store_counts_its_hints_and_skips_the_walk_when_no_target_can_take_them() {
        block_on(async {
            let disk = MemDisk::new();
            let part = open(&disk, "/hints", hints_config()).await;
            let store = HintStore::new(std::rc::Rc::new(part));
            for i in 0..500u32 {
                let key = format!("key-{i}");
                store
                    .record(NodeId(2), i % 3, key.as_bytes(), 10)
                    .await
                    .unwrap();
            }
            store.record(NodeId(3), 0, b"k", 10).await.unwrap();
            // renewing a pending hint adds nothing
            store.record(NodeId(2), 0, b"key-0", 11).await.unwrap();
            assert_eq!(store.pending_count(), 501);
            assert_eq!(
                store.pending_by_target(),
                vec![(NodeId(2), 500), (NodeId(3), 1)]
            );

            let mut asked = 0;
            let none = store.pending(100, |t| {
                asked += 1;
                t == NodeId(4)
            });
            assert!(none.is_empty());
            assert_eq!(asked, 2, "asked once per target with hints");
            let three = store.pending(100, |t| t == NodeId(3));
            assert_eq!(three.len(), 1);
            assert!(store.delivered(&three[0], 12).await.unwrap());
            // delivered already: removed once, counted once
            assert!(!store.delivered(&three[0], 12).await.unwrap());
            let two = store.pending(10, |t| t == NodeId(2));
            for hint in &two {
                assert!(store.delivered(hint, 13).await.unwrap());
            }
            assert_eq!(store.pending_by_target(), vec![(NodeId(2), 490)]);
            assert_eq!(pending_hint_count(store.partition()), 490);

            store.partition().sync().await.unwrap();
            drop(store);
            let reopened = HintStore::new(std::rc::Rc::new(
                open(&disk, "/hints", hints_config()).await,
            ));
            assert_eq!(reopened.pending_by_target(), vec![(NodeId(2), 490)]);
        });
    }

    /// With no grace period every sole tombstone counts as reclaimable; the ones a
    /// compaction keeps must not, or a partition of mostly hinted deletes would be
    /// compacted again every round for nothing while the hints wait.
    #[test]
    fn tombstones_a_compaction_keeps_do_not_make_it_due() {
        block_on(async {
            let disk = MemDisk::new();
            let config = PartitionConfig {
                tombstone_grace_ms: 0,
                segment_bytes_max: 4096,
                ..PartitionConfig::default()
            };
            let part = open(&disk, "/p", config).await;
            let hints = open(&disk, "/hints", hints_config()).await;
            for i in 0..100u64 {
                let key = format!("deleted-{i}");
                let mut delete = vv(1, 2 * i + 2, None);
                delete.version.past.raise(ActorId::new(1, 0), 2 * i + 1, 5);
                replica_put(&part, key.as_bytes(), &delete, 10)
                    .await
                    .unwrap();
                record_hint(&hints, NodeId(3), 0, key.as_bytes(), 10)
                    .await
                    .unwrap();
            }
            replica_put(&part, b"roll", &vv(2, 1, Some(&"r".repeat(3000))), 10)
                .await
                .unwrap();
            let keep = |key: &[u8]| hint_names_key(&hints, [NodeId(3)], 0, key);
            assert!(part.compaction_due(0.5));
            assert!(!part.compaction_due_keeping(0.5, &keep));
            let report = part.compact_keeping(20, &keep).await.unwrap();
            assert_eq!(report.tombstones_held, 100, "{report:?}");
            assert!(!part.compaction_due_keeping(0.5, &keep));
        });
    }

    /// A hint write whose sync failed has its record in the keydir all the same: the
    /// counts follow the records (they are kept when a record enters the keydir).
    #[test]
    fn a_failed_hint_write_leaves_the_counts_matching_the_records() {
        block_on(async {
            let disk = MemDisk::new();
            let config = PartitionConfig {
                durability: crate::partition::Durability::Sync,
                ..hints_config()
            };
            let store = HintStore::new(std::rc::Rc::new(open(&disk, "/hints", config).await));
            store.record(NodeId(2), 0, b"a", 10).await.unwrap();
            let hint = store.pending(1, |_| true).remove(0);
            disk.fail_syncs_after(0);
            assert!(store.record(NodeId(3), 0, b"b", 10).await.is_err());
            assert!(store.delivered(&hint, 11).await.is_err());
            assert_eq!(
                store.pending_count(),
                pending_hint_count(store.partition()),
                "{:?}",
                store.pending_by_target()
            );
        });
    }
}

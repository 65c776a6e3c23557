//! The replica write path with versioning: the partition stores, for each key, exactly
//! the surviving sibling set under the rules of [`crate::version`].
//!
//! - [`Partition::coordinate_put`]: this node coordinates a client put or delete: it
//!   makes the new dotted version from the client's context and replaces, in one
//!   atomic record, the stored siblings that context covered.
//! - [`Partition::apply_version`]: a version made elsewhere (replication, a hint, read
//!   repair, anti-entropy) is stored beside or over the stored siblings, or ignored as
//!   stale, and the reply says which.
//! - [`Partition::read_siblings`]: the sibling set with values, and the client context.
//!
//! Versioned writes to one key take turns (`Partition::lock_key`), and each still
//! checks, in the same step as its append, that the key's siblings are the ones it read
//! (a plain `write` in between makes it read and decide again).

use crate::partition::{Partition, StoreError, WriteOp};
use crate::storage::Storage;
use crate::version::{
    context_of, coordinate, reconcile, ActorId, CoordinateError, Coordinated, Reconcile,
    StaleReason, VClock, Version,
};

/// Seqs of a key's siblings (rarely more than two).
type Seqs = smallvec::SmallVec<[u64; 2]>;

fn decode_version(seq: u64, version: &[u8]) -> Result<(u64, Version), StoreError> {
    Version::decode(version)
        .map(|v| (seq, v))
        .map_err(|e| StoreError::BadVersion(e.to_string()))
}

/// How many times a write re-reads a key that other writes keep changing.
const WRITE_ATTEMPTS_MAX: usize = 16;

/// One stored sibling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    pub seq: u64,
    pub version: Version,
    /// `None` for a tombstone.
    pub value: Option<Vec<u8>>,
}

impl Sibling {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// The result of a coordinated put or delete.
#[derive(Debug, Clone)]
pub struct PutOutcome {
    pub version: Version,
    /// Siblings stored for the key after the write (the new version included).
    pub siblings: usize,
    /// Context covering the whole sibling set after the write.
    pub context: VClock,
}

/// What a replica did with a version made elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Stored; `replaced` siblings it supersedes were dropped.
    Applied { replaced: usize, siblings: usize },
    /// Already covered by what is stored: nothing written.
    Stale(StaleReason),
}

impl<S: Storage> Partition<S> {
    /// The siblings of `key` (tombstones included) and the context that covers them.
    pub async fn read_siblings(&self, key: &[u8]) -> Result<(Vec<Sibling>, VClock), StoreError> {
        let siblings = self.read_decoded(key).await?;
        let versions: Vec<Version> = siblings.iter().map(|s| s.version.clone()).collect();
        Ok((siblings, context_of(&versions)))
    }

    async fn read_decoded(&self, key: &[u8]) -> Result<Vec<Sibling>, StoreError> {
        let stored = self.get(key).await?;
        stored
            .into_iter()
            .map(|s| {
                Ok(Sibling {
                    seq: s.seq,
                    version: Version::decode(&s.version)
                        .map_err(|e| StoreError::BadVersion(e.to_string()))?,
                    value: s.value,
                })
            })
            .collect()
    }

    /// What a write decides on: the seqs and versions of `key`'s siblings, values left
    /// out (from the record cache without copying when it holds them all).
    async fn read_versions(&self, key: &[u8]) -> Result<(Seqs, Vec<Version>), StoreError> {
        if let Some(read) = self.read_versions_cached(key) {
            return read;
        }
        // one value in memory at a time: 100 siblings of 4 MiB were all held at once,
        // 400 MB, to learn their versions
        let (mut seqs, mut versions) = (Seqs::new(), Vec::new());
        self.for_each_version(key, |s| {
            let (seq, version) = decode_version(s.seq, &s.version)?;
            seqs.push(seq);
            versions.push(version);
            Ok(())
        })
        .await?;
        Ok((seqs, versions))
    }

    /// [`read_versions`](Self::read_versions) from the record cache alone: `None` when
    /// a version of `key` is not cached.
    fn read_versions_cached(&self, key: &[u8]) -> Option<Result<(Seqs, Vec<Version>), StoreError>> {
        // straight into the two results: no vector of pairs in between
        let cached = self.read_cached(key, |records| {
            let mut seqs = Seqs::new();
            let mut versions = Vec::with_capacity(records.len());
            for r in records {
                let (seq, version) = decode_version(r.header.seq, r.version)?;
                seqs.push(seq);
                versions.push(version);
            }
            Ok((seqs, versions))
        })?;
        Some(cached.and_then(|read| read))
    }

    /// [`coordinate_put`](Self::coordinate_put) in one step, without waiting, when it
    /// can be: no other write holds the key, every version of it is in the record
    /// cache, the context needs no new actor epoch, and the append owes no I/O but the
    /// commit log's sync ([`Partition::append_owes_no_io`]). Returns `None`, having
    /// written nothing, otherwise (the caller then runs `coordinate_put`; the cache
    /// hits of the read here are counted, as for any cached read).
    ///
    /// `Some(Ok((outcome, Some(position))))`: the write is in the log buffer and the
    /// keydir, and is durable (may be acknowledged) once
    /// [`Partition::wait_logged`]`(position)` returns; `None` for the position when the
    /// durability mode does not wait.
    pub fn try_coordinate_put_now(
        &self,
        node: u64,
        key: &[u8],
        context: &VClock,
        value: Option<&[u8]>,
        now_ms: u64,
        clock_entries_max: usize,
    ) -> Option<Result<(PutOutcome, Option<u64>), StoreError>> {
        if self.key_is_locked(key) {
            return None;
        }
        let (stored, versions) = match self.read_versions_cached(key)? {
            Ok(read) => read,
            Err(e) => return Some(Err(e)),
        };
        let actor = ActorId {
            node,
            epoch: self.epoch(),
        };
        // an epoch move writes a file first: that takes the full path
        let made = coordinate(actor, now_ms, context, &versions, clock_entries_max).ok()?;
        if let Err(e) = self.check_siblings_after(stored.len(), &made) {
            return Some(Err(e));
        }
        let replaces: Seqs = made.replaced.iter().map(|&i| stored[i]).collect();
        let mut blob = self.version_scratch.take();
        made.version.encode(&mut blob);
        let op = WriteOp {
            key,
            version: &blob,
            value,
            replaces: &replaces,
        };
        if !self.append_owes_no_io(op.encoded_len()) {
            self.version_scratch.put(blob);
            return None;
        }
        self.record_clock_truncation(made.truncated_entries);
        let appended = self.append_now_logged(&[op], now_ms);
        self.version_scratch.put(blob);
        let position = match appended {
            Ok(position) => position,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok((outcome_after(versions, made), position)))
    }

    /// Coordinates a put (`value: Some`) or delete (`None`) of `key` on this node
    /// `node`, superseding what `context` covers. Moves to a new actor epoch when the
    /// context shows this node's local data was lost (kv679), then retries.
    pub async fn coordinate_put(
        &self,
        node: u64,
        key: &[u8],
        context: &VClock,
        value: Option<&[u8]>,
        now_ms: u64,
        clock_entries_max: usize,
    ) -> Result<PutOutcome, StoreError> {
        let mut turn = Some(self.lock_key(key).await);
        for _ in 0..WRITE_ATTEMPTS_MAX {
            let (stored, versions) = self.read_versions(key).await?;
            let actor = ActorId {
                node,
                epoch: self.epoch(),
            };
            let made = match coordinate(actor, now_ms, context, &versions, clock_entries_max) {
                Ok(made) => made,
                Err(
                    e @ (CoordinateError::LocalDataBehindContext { .. }
                    | CoordinateError::CounterExhausted { .. }),
                ) => {
                    // Both come from a context (or a replicated version) claiming more
                    // of this actor than it made: a lost write, or a forgery (a counter
                    // at u64::MAX is never reached honestly). Either way the moves are
                    // rate-limited, or forged versions could burn epochs at will.
                    if self.epoch_moving() {
                        // another write is moving it (for the same reason, after a loss
                        // of local data): try again with the new actor, claiming nothing
                        self.wait_epoch_move().await;
                        continue;
                    }
                    self.claim_context_epoch_move(now_ms)?;
                    tracing::warn!(
                        partition = self.config().partition,
                        key = %String::from_utf8_lossy(key),
                        reason = %e,
                        "moving to a new actor epoch"
                    );
                    self.bump_epoch(now_ms).await?;
                    continue;
                }
            };
            self.check_siblings_after(stored.len(), &made)?;
            self.record_clock_truncation(made.truncated_entries);
            let written = self
                .replace_siblings(
                    key,
                    &stored,
                    &made.replaced,
                    &made.version,
                    value,
                    now_ms,
                    &mut turn,
                )
                .await?;
            if written {
                return Ok(outcome_after(versions, made));
            }
        }
        Err(StoreError::Contended {
            attempts: WRITE_ATTEMPTS_MAX,
        })
    }

    /// Stores a version made by another coordinator under the sibling rules.
    pub async fn apply_version(
        &self,
        key: &[u8],
        version: &Version,
        value: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut turn = Some(self.lock_key(key).await);
        for _ in 0..WRITE_ATTEMPTS_MAX {
            let (stored, versions) = self.read_versions(key).await?;
            let replaced = match reconcile(version, &versions) {
                Reconcile::Stale(reason) => {
                    // the version (or a newer one) is here, but possibly appended by a
                    // write still waiting for its sync: the sender drops its hint or
                    // counts this copy once told, so it must be durable first
                    drop(turn.take());
                    self.durable_barrier().await?;
                    return Ok(ApplyOutcome::Stale(reason));
                }
                Reconcile::Apply { replaced } => replaced,
            };
            let written = self
                .replace_siblings(key, &stored, &replaced, version, value, now_ms, &mut turn)
                .await?;
            if written {
                return Ok(ApplyOutcome::Applied {
                    replaced: replaced.len(),
                    siblings: stored.len() - replaced.len() + 1,
                });
            }
        }
        Err(StoreError::Contended {
            attempts: WRITE_ATTEMPTS_MAX,
        })
    }
}

impl<S: Storage> Partition<S> {
    /// A coordinated write may not leave a key more than `siblings_max` siblings.
    fn check_siblings_after(&self, stored: usize, made: &Coordinated) -> Result<(), StoreError> {
        let max = self.config().siblings_max;
        if stored - made.replaced.len() + 1 > max {
            return Err(StoreError::TooManySiblings {
                siblings: stored,
                max,
            });
        }
        Ok(())
    }

    /// Appends `version` for `key`, superseding the `stored` siblings at `replaced`, if
    /// the key's siblings are still exactly `stored`; releases `turn` once appended.
    /// `Ok(false)`: the key changed since it was read (read and decide again).
    #[allow(clippy::too_many_arguments)]
    async fn replace_siblings(
        &self,
        key: &[u8],
        stored: &[u64],
        replaced: &[usize],
        version: &Version,
        value: Option<&[u8]>,
        now_ms: u64,
        turn: &mut Option<crate::partition::KeyGuard<'_, S>>,
    ) -> Result<bool, StoreError> {
        let replaces: Seqs = replaced.iter().map(|&i| stored[i]).collect();
        let blob = version.encode_to_vec();
        let op = WriteOp {
            key,
            version: &blob,
            value,
            replaces: &replaces,
        };
        let written = self
            .write_if_then(
                &[op],
                now_ms,
                |keydir| unchanged(keydir, key, stored),
                || drop(turn.take()),
            )
            .await?;
        Ok(written.is_some())
    }
}

/// The key's siblings after `made` replaced some of the stored `versions`.
fn outcome_after(mut versions: Vec<Version>, made: Coordinated) -> PutOutcome {
    crate::version::remove_indices(&mut versions, &made.replaced);
    versions.push(made.version.clone());
    PutOutcome {
        siblings: versions.len(),
        context: context_of(&versions),
        version: made.version,
    }
}

fn unchanged(keydir: &crate::keydir::KeyDir, key: &[u8], read_seqs: &[u64]) -> bool {
    let now = keydir.get(key).unwrap_or_default();
    now.len() == read_seqs.len() && now.iter().all(|l| read_seqs.contains(&l.seq))
}

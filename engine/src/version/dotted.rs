//! Dotted versions and the sibling-set rules of the replica write path.
//!
//! A [`Version`] is one write (value or tombstone): the event `dot` that created it plus the
//! history `past` its writer had seen. Its causal history is `past ∪ {dot}`; because the dot is
//! kept apart from the past, two writes through one coordinator with the same stale context get
//! different dots and neither claims to have seen the other, and a later write whose context saw
//! both covers both.

use smallvec::SmallVec;
use thiserror::Error;

use super::clock::{ActorId, ClockDecodeError, Dot, VClock, ACTOR_BYTES};
use super::codec::{Reader, Truncated};

/// Format version byte that starts every encoded [`Version`].
pub const VERSION_FORMAT: u8 = 1;

/// Bytes of a [`Version`] encoding before its past clock: format u8, dot (actor, counter u64),
/// timestamp_ms u64.
pub const VERSION_HEADER_BYTES: usize = 1 + ACTOR_BYTES + 8 + 8;

/// Default bound on the entries of a new version's past; older entries are truncated.
pub const CLOCK_ENTRIES_MAX: usize = 16;

/// One write of a key (a value or a tombstone; the storage engine keeps that flag).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version {
    /// The event that created this version; unique per key.
    pub dot: Dot,
    /// Wall-clock time of the coordinator when it created the version.
    pub timestamp_ms: u64,
    /// What the writer had seen. Never contains `dot`.
    pub past: VClock,
}

/// Decoding a [`Version`] blob failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VersionDecodeError {
    #[error("version blob is empty")]
    Empty,
    #[error("version blob has format {found}, this build reads format {VERSION_FORMAT}")]
    UnsupportedFormat { found: u8 },
    #[error("version blob truncated: needed {needed} more bytes, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("version dot has counter 0; counters start at 1")]
    ZeroDotCounter,
    #[error("version past already contains its own dot (past counter {past_counter} >= dot counter {dot_counter})")]
    PastContainsDot { dot_counter: u64, past_counter: u64 },
    #[error("version past clock is invalid: {0}")]
    Past(#[from] ClockDecodeError),
    #[error("version blob has {count} trailing bytes")]
    TrailingBytes { count: usize },
}

impl From<Truncated> for VersionDecodeError {
    fn from(t: Truncated) -> Self {
        Self::Truncated {
            needed: t.needed,
            available: t.available,
        }
    }
}

impl Version {
    /// Whether this version's history contains `dot`.
    pub fn history_contains(&self, dot: Dot) -> bool {
        self.dot == dot || self.past.contains_dot(dot)
    }

    /// Whether `self` has seen `other` (reflexive). An equal dot with a different past is a
    /// counter collision, not descent, so both versions are kept.
    pub fn descends(&self, other: &Version) -> bool {
        self == other || self.past.contains_dot(other.dot)
    }

    /// Whether a context `clock` has seen this version.
    pub fn covered_by(&self, clock: &VClock) -> bool {
        clock.contains_dot(self.dot)
    }

    /// The history as a version vector: `past` plus the dot when the dot directly follows the
    /// past's entry for its actor (the writer's context was up to date for that actor).
    /// Otherwise the dot is left out and the clock under-approximates; see [`context_of`].
    pub fn clock(&self) -> VClock {
        context_of(std::slice::from_ref(self))
    }

    /// Appends the blob encoding (see docs/format.md).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(VERSION_HEADER_BYTES + self.past.encoded_len());
        out.push(VERSION_FORMAT);
        self.dot.actor.encode(out);
        out.extend_from_slice(&self.dot.counter.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        self.past.encode(out);
    }

    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes a whole blob; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Version, VersionDecodeError> {
        let mut reader = Reader::new(bytes);
        let format = reader.u8().map_err(|_| VersionDecodeError::Empty)?;
        if format != VERSION_FORMAT {
            return Err(VersionDecodeError::UnsupportedFormat { found: format });
        }
        let actor = ActorId::decode(&mut reader)?;
        let counter = reader.u64()?;
        let timestamp_ms = reader.u64()?;
        let past = VClock::decode_from(&mut reader)?;
        if reader.remaining() != 0 {
            return Err(VersionDecodeError::TrailingBytes {
                count: reader.remaining(),
            });
        }
        if counter == 0 {
            return Err(VersionDecodeError::ZeroDotCounter);
        }
        let past_counter = past.get(actor);
        if past_counter >= counter {
            return Err(VersionDecodeError::PastContainsDot {
                dot_counter: counter,
                past_counter,
            });
        }
        Ok(Version {
            dot: Dot { actor, counter },
            timestamp_ms,
            past,
        })
    }
}

/// A coordinator could not create a version.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CoordinateError {
    /// The client's context has seen more events of this actor than the local store holds, so
    /// this incarnation lost data (kv679): reusing its counters would make new writes look
    /// older than stale replicas. Pick a new epoch with [`next_epoch`](super::next_epoch),
    /// persist it, and coordinate again with the new actor.
    #[error("context has seen event {context_counter} of actor {actor:?} but local data only {local_counter}: local data was lost, move to a new epoch")]
    LocalDataBehindContext {
        actor: ActorId,
        context_counter: u64,
        local_counter: u64,
    },
    /// The actor's counter for this key reached `u64::MAX`.
    #[error("counter of actor {actor:?} is exhausted for this key, move to a new epoch")]
    CounterExhausted { actor: ActorId },
}

/// A version created by a coordinator and what it does to the local sibling set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coordinated {
    pub version: Version,
    /// Indices into `stored` of siblings the new version replaces (ascending); the others stay.
    pub replaced: SmallVec<[usize; 2]>,
    /// Entries truncated from the new version's past; feed to [`TruncationStats::record`](super::TruncationStats::record).
    pub truncated_entries: usize,
}

/// Creates the version a coordinator writes for a put or delete.
///
/// - `context`: what the client had seen (decoded client context, empty for a blind write).
/// - `stored`: the key's sibling set in the coordinator's local store.
///
/// The dot is `(actor, 1 + highest counter of actor in stored)`; the past is the context
/// truncated to `clock_entries_max` entries (oldest first). Stored siblings the new version
/// has seen are replaced; siblings the client had not seen stay beside it.
///
/// The counter comes from the local store, never from the context alone, so a coordinator
/// that lost data could reuse counters; it notices when the context has seen more of its
/// actor than it holds and refuses (switch to a new epoch). Truncation can hide an actor's
/// entry in the same way, so `clock_entries_max` must comfortably exceed the actors that
/// coordinate one key (replicas, fallbacks, their recent epochs).
pub fn coordinate(
    actor: ActorId,
    now_ms: u64,
    context: &VClock,
    stored: &[Version],
    clock_entries_max: usize,
) -> Result<Coordinated, CoordinateError> {
    let local_counter = stored
        .iter()
        .map(|v| {
            let own = if v.dot.actor == actor {
                v.dot.counter
            } else {
                0
            };
            own.max(v.past.get(actor))
        })
        .max()
        .unwrap_or(0);
    let context_counter = context.get(actor);
    if context_counter > local_counter {
        return Err(CoordinateError::LocalDataBehindContext {
            actor,
            context_counter,
            local_counter,
        });
    }
    let counter = local_counter
        .checked_add(1)
        .ok_or(CoordinateError::CounterExhausted { actor })?;
    let mut past = context.clone();
    // The coordinator's own entry stays: without it the new dot would not follow its
    // past, no context could ever cover the version, and each later write through this
    // coordinator would leave one more sibling.
    let truncated_entries = past.truncate_keeping(actor, clock_entries_max);
    let version = Version {
        dot: Dot { actor, counter },
        timestamp_ms: now_ms,
        past,
    };
    let replaced = stored
        .iter()
        .enumerate()
        .filter(|(_, s)| version.descends(s))
        .map(|(i, _)| i)
        .collect();
    Ok(Coordinated {
        version,
        replaced,
        truncated_entries,
    })
}

/// Why an incoming version was not written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleReason {
    /// The same version is stored at this index.
    Duplicate { index: usize },
    /// The stored sibling at this index has seen the incoming version.
    Covered { index: usize },
}

/// What a replica does with a version it receives (replication, hint, read repair,
/// anti-entropy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reconcile {
    /// Nothing to write; the reply tells the sender the version was stale.
    Stale(StaleReason),
    /// Write the incoming version, replacing the stored siblings at these indices (ascending);
    /// the other stored siblings stay.
    Apply { replaced: Vec<usize> },
}

/// The replica write rule: drop what is already seen, otherwise add and drop what it has seen.
///
/// The resulting sibling set is the versions not seen by another one, whatever order versions
/// arrive in (as long as clocks were not truncated).
pub fn reconcile(incoming: &Version, stored: &[Version]) -> Reconcile {
    if let Some(index) = stored.iter().position(|s| s == incoming) {
        return Reconcile::Stale(StaleReason::Duplicate { index });
    }
    if let Some(index) = stored.iter().position(|s| s.descends(incoming)) {
        return Reconcile::Stale(StaleReason::Covered { index });
    }
    let replaced = stored
        .iter()
        .enumerate()
        .filter(|(_, s)| incoming.descends(s))
        .map(|(i, _)| i)
        .collect();
    Reconcile::Apply { replaced }
}

/// The context to hand a client that read `siblings` (the union from all replies, tombstones
/// included): the union of their histories as a version vector.
///
/// Pasts are merged, then each dot is added if it directly follows what the clock already
/// holds for its actor. A dot that does not (a replica holds a version but not an earlier
/// sibling of the same actor) is left out: the client then cannot overwrite that version
/// and it stays a sibling until replicas converge, rather than a version vector claiming an
/// event the client never saw.
pub fn context_of(siblings: &[Version]) -> VClock {
    let mut clock = VClock::new();
    for sibling in siblings {
        clock.merge(&sibling.past);
    }
    let mut dots: SmallVec<[(Dot, u64); 4]> =
        siblings.iter().map(|s| (s.dot, s.timestamp_ms)).collect();
    dots.sort_unstable();
    for (dot, timestamp_ms) in dots {
        if dot.counter <= clock.get(dot.actor).saturating_add(1) {
            clock.raise(dot.actor, dot.counter, timestamp_ms);
        }
    }
    clock
}

/// [`context_of`] for a key with one version, which it consumes instead of copying its
/// clock: the read path's common case.
pub fn context_of_one(version: Version) -> VClock {
    let Version {
        dot,
        timestamp_ms,
        mut past,
    } = version;
    if dot.counter <= past.get(dot.actor).saturating_add(1) {
        past.raise(dot.actor, dot.counter, timestamp_ms);
    }
    past
}

/// Applies `reconcile`'s verdict to a plain vector of siblings (for simulations and tests);
/// `Err` says why `incoming` was not written.
pub fn apply_to(siblings: &mut Vec<Version>, incoming: Version) -> Result<(), StaleReason> {
    match reconcile(&incoming, siblings) {
        Reconcile::Stale(reason) => Err(reason),
        Reconcile::Apply { replaced } => {
            remove_indices(siblings, &replaced);
            siblings.push(incoming);
            Ok(())
        }
    }
}

/// Removes the given ascending indices.
pub fn remove_indices<T>(items: &mut Vec<T>, ascending: &[usize]) {
    for &index in ascending.iter().rev() {
        if index < items.len() {
            items.remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::clock::ClockEntry;

    const X: ActorId = ActorId::new(1, 0);
    const Y: ActorId = ActorId::new(2, 0);

    fn put(actor: ActorId, context: &VClock, stored: &mut Vec<Version>) -> Version {
        let c = coordinate(actor, 0, context, stored, CLOCK_ENTRIES_MAX).expect("coordinate");
        remove_indices(stored, &c.replaced);
        stored.push(c.version.clone());
        c.version
    }

    #[test]
    fn same_coordinator_stale_context_makes_sibling_not_overwrite() {
        let mut stored = Vec::new();
        let empty = VClock::new();
        let v1 = put(X, &empty, &mut stored);
        let v2 = put(X, &empty, &mut stored);
        assert_eq!(v1.dot, Dot::new(X, 1));
        assert_eq!(v2.dot, Dot::new(X, 2));
        assert_eq!(stored, vec![v1.clone(), v2.clone()]);
        // A context that saw both covers both.
        let ctx = context_of(&stored);
        assert_eq!(ctx.get(X), 2);
        let v3 = put(X, &ctx, &mut stored);
        assert_eq!(stored, vec![v3]);
    }

    #[test]
    fn reconcile_reports_duplicate_covered_and_apply() {
        let mut stored = Vec::new();
        let v1 = put(X, &VClock::new(), &mut stored);
        let v2 = put(X, &context_of(&stored), &mut stored);
        assert_eq!(
            reconcile(&v2, &stored),
            Reconcile::Stale(StaleReason::Duplicate { index: 0 })
        );
        assert_eq!(
            reconcile(&v1, &stored),
            Reconcile::Stale(StaleReason::Covered { index: 0 })
        );
        let mut other = vec![v1.clone()];
        assert_eq!(
            reconcile(&v2, &other),
            Reconcile::Apply { replaced: vec![0] }
        );
        let concurrent = coordinate(Y, 0, &VClock::new(), &other, 16)
            .expect("coordinate")
            .version;
        assert_eq!(
            reconcile(&concurrent, &other),
            Reconcile::Apply { replaced: vec![] }
        );
        assert_eq!(apply_to(&mut other, concurrent.clone()), Ok(()));
        assert_eq!(other.len(), 2);
    }

    #[test]
    fn counter_collision_keeps_both() {
        let a = Version {
            dot: Dot::new(X, 1),
            timestamp_ms: 0,
            past: VClock::new(),
        };
        let mut b = a.clone();
        b.past.raise(Y, 1, 0);
        assert!(!a.descends(&b) && !b.descends(&a));
        assert_eq!(
            reconcile(&b, std::slice::from_ref(&a)),
            Reconcile::Apply { replaced: vec![] }
        );
    }

    #[test]
    fn context_of_skips_dots_that_do_not_follow() {
        // Replica holds X:3 whose past is X:1 but not the concurrent X:2.
        let v3 = Version {
            dot: Dot::new(X, 3),
            timestamp_ms: 7,
            past: VClock::from_entries([ClockEntry {
                actor: X,
                counter: 1,
                timestamp_ms: 5,
            }]),
        };
        assert_eq!(context_of(std::slice::from_ref(&v3)).get(X), 1);
        let v2 = Version {
            dot: Dot::new(X, 2),
            timestamp_ms: 6,
            past: VClock::from_entries([ClockEntry {
                actor: X,
                counter: 1,
                timestamp_ms: 5,
            }]),
        };
        let both = context_of(&[v3.clone(), v2]);
        assert_eq!(both.get(X), 3);
        assert_eq!(both.entries()[0].timestamp_ms, 7);
    }

    #[test]
    fn coordinate_detects_lost_local_data() {
        let mut ctx = VClock::new();
        ctx.raise(X, 4, 0);
        assert_eq!(
            coordinate(X, 0, &ctx, &[], 16),
            Err(CoordinateError::LocalDataBehindContext {
                actor: X,
                context_counter: 4,
                local_counter: 0
            })
        );
    }

    #[test]
    fn coordinate_truncates_past_and_reports_it() {
        let ctx = VClock::from_entries((0..5).map(|n| ClockEntry {
            actor: ActorId::new(100 + n, 0),
            counter: 1,
            timestamp_ms: n,
        }));
        let c = coordinate(X, 50, &ctx, &[], 3).expect("coordinate");
        assert_eq!(c.truncated_entries, 2);
        assert_eq!(c.version.past.len(), 3);
        assert_eq!(c.version.past.get(ActorId::new(100, 0)), 0);
        assert_eq!(c.version.past.get(ActorId::new(104, 0)), 1);
    }

    #[test]
    fn version_decode_rejects_bad_blobs() {
        let mut past = VClock::new();
        past.raise(Y, 3, 9);
        let v = Version {
            dot: Dot::new(X, 2),
            timestamp_ms: 11,
            past,
        };
        let bytes = v.encode_to_vec();
        assert_eq!(Version::decode(&bytes), Ok(v.clone()));
        assert_eq!(Version::decode(&[]), Err(VersionDecodeError::Empty));
        let mut wrong = bytes.clone();
        wrong[0] = 2;
        assert_eq!(
            Version::decode(&wrong),
            Err(VersionDecodeError::UnsupportedFormat { found: 2 })
        );
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            Version::decode(&long),
            Err(VersionDecodeError::TrailingBytes { count: 1 })
        );
        assert!(matches!(
            Version::decode(&bytes[..10]),
            Err(VersionDecodeError::Truncated { .. })
        ));
        let mut zero = v.clone();
        zero.dot.counter = 0;
        assert_eq!(
            Version::decode(&zero.encode_to_vec()),
            Err(VersionDecodeError::ZeroDotCounter)
        );
        let mut own = v.clone();
        own.past.raise(X, 2, 0);
        assert_eq!(
            Version::decode(&own.encode_to_vec()),
            Err(VersionDecodeError::PastContainsDot {
                dot_counter: 2,
                past_counter: 2
            })
        );
    }
}

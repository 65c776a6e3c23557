//! Actor ids with epochs, and the version vector (`VClock`) whose entries they key.
//!
//! A `VClock` maps server-side actors to the highest contiguous counter of theirs that a
//! history contains. It is the "past" part of a dotted version and the payload of the
//! client context.

use smallvec::SmallVec;
use thiserror::Error;

use super::codec::{Reader, Truncated};

/// Number of clock entries stored inline before `VClock` spills to the heap.
pub const VCLOCK_ENTRIES_INLINE: usize = 4;

/// Encoded size of one clock entry: node u64, epoch u32, counter u64, timestamp_ms u64.
pub const CLOCK_ENTRY_BYTES: usize = 8 + 4 + 8 + 8;

/// Encoded size of an actor id: node u64, epoch u32.
pub const ACTOR_BYTES: usize = 8 + 4;

/// A server-side actor: one node's incarnation for one partition.
///
/// `epoch` changes whenever the node may no longer hold every version it coordinated for the
/// partition (see [`next_epoch`]), so a fresh incarnation never reuses a counter of an old one.
/// Client ids are never actors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ActorId {
    /// Cluster-wide node id.
    pub node: u64,
    /// Incarnation of this node's data for the partition.
    pub epoch: u32,
}

impl ActorId {
    pub const fn new(node: u64, epoch: u32) -> Self {
        Self { node, epoch }
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.node.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
    }

    pub(crate) fn decode(reader: &mut Reader<'_>) -> Result<Self, Truncated> {
        let node = reader.u64()?;
        let epoch = reader.u32()?;
        Ok(Self { node, epoch })
    }
}

/// Choosing an epoch failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EpochError {
    #[error("actor epoch exhausted: previous epoch is u32::MAX, no fresh epoch exists")]
    Exhausted,
}

/// The epoch a node must use after it lost (or may have lost) versions it coordinated for a
/// partition: `max(previous + 1, now_ms / 1000)`.
///
/// When to call it (before coordinating any write for the partition again, and after
/// persisting the result durably):
/// - the partition's data was wiped, restored from a backup, or is new on this node;
/// - a crash may have lost an unsynced tail of the partition's log;
/// - versions this node coordinated were deleted locally without a covering version staying
///   behind (tombstone reaping, handing off hinted data);
/// - [`coordinate`](super::coordinate) returned
///   [`CoordinateError::LocalDataBehindContext`](super::CoordinateError::LocalDataBehindContext).
///
/// `previous` is the last persisted epoch, `None` if that record was lost too. The time term
/// (Unix seconds) makes a node that lost its epoch record still pick an epoch above every epoch
/// it used before, provided its wall clock did not step backwards and it bumped epochs at most
/// once per second on average (each bump with a persisted `previous` may run one second ahead
/// of the clock). `coordinate` detects the remaining cases whenever a client context mentions
/// the reused actor with a higher counter.
pub fn next_epoch(previous: Option<u32>, now_ms: u64) -> Result<u32, EpochError> {
    let now_s = u32::try_from(now_ms / 1000).unwrap_or(u32::MAX);
    match previous {
        None => Ok(now_s),
        Some(previous) => {
            let bumped = previous.checked_add(1).ok_or(EpochError::Exhausted)?;
            Ok(bumped.max(now_s))
        }
    }
}

/// One event of one actor: the actor's `counter`-th update of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    pub actor: ActorId,
    /// Starts at 1; 0 means "no event" and never appears in a dot.
    pub counter: u64,
}

impl Dot {
    pub const fn new(actor: ActorId, counter: u64) -> Self {
        Self { actor, counter }
    }
}

/// One entry of a [`VClock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClockEntry {
    pub actor: ActorId,
    /// The history contains this actor's events `1..=counter`. Never 0.
    pub counter: u64,
    /// Newest wall-clock time known for this actor's entry; only picks truncation victims.
    pub timestamp_ms: u64,
}

/// Decoding a [`VClock`] failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClockDecodeError {
    #[error("clock truncated: needed {needed} more bytes, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("clock entry {index} has counter 0; counters start at 1")]
    ZeroCounter { index: usize },
    #[error("clock entry {index} is not in strictly increasing actor order (unsorted or duplicate actor)")]
    UnsortedActors { index: usize },
}

impl From<Truncated> for ClockDecodeError {
    fn from(t: Truncated) -> Self {
        Self::Truncated {
            needed: t.needed,
            available: t.available,
        }
    }
}

/// Counters of clock truncations, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TruncationStats {
    /// Clocks that lost at least one entry.
    pub clocks_truncated: u64,
    /// Entries removed in total.
    pub entries_removed: u64,
}

impl TruncationStats {
    /// Adds the result of one [`VClock::truncate`] call.
    pub fn record(&mut self, entries_removed: usize) {
        if entries_removed > 0 {
            self.clocks_truncated = self.clocks_truncated.saturating_add(1);
            self.entries_removed = self.entries_removed.saturating_add(entries_removed as u64);
        }
    }
}

/// A version vector over server-side actors, sorted by actor, no zero counters.
///
/// Comparisons (`descends`, `dominates`, `concurrent`) look at counters only; timestamps are
/// metadata for truncation. `==` compares everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct VClock {
    entries: SmallVec<[ClockEntry; VCLOCK_ENTRIES_INLINE]>,
}

impl VClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a clock from entries in any order; duplicate actors keep the maximum counter
    /// and timestamp, zero counters are dropped.
    pub fn from_entries(entries: impl IntoIterator<Item = ClockEntry>) -> Self {
        let mut clock = Self::new();
        for entry in entries {
            clock.raise(entry.actor, entry.counter, entry.timestamp_ms);
        }
        clock
    }

    pub fn entries(&self) -> &[ClockEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, actor: ActorId) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.actor.cmp(&actor))
    }

    /// The actor's counter, 0 if absent.
    pub fn get(&self, actor: ActorId) -> u64 {
        match self.position(actor) {
            Ok(i) => self.entries[i].counter,
            Err(_) => 0,
        }
    }

    /// Whether the history contains `dot`.
    pub fn contains_dot(&self, dot: Dot) -> bool {
        dot.counter != 0 && dot.counter <= self.get(dot.actor)
    }

    /// Raises the actor's entry to at least `counter` and `timestamp_ms`. A zero counter is a
    /// no-op.
    pub fn raise(&mut self, actor: ActorId, counter: u64, timestamp_ms: u64) {
        if counter == 0 {
            return;
        }
        match self.position(actor) {
            Ok(i) => {
                let entry = &mut self.entries[i];
                entry.counter = entry.counter.max(counter);
                entry.timestamp_ms = entry.timestamp_ms.max(timestamp_ms);
            }
            Err(i) => self.entries.insert(
                i,
                ClockEntry {
                    actor,
                    counter,
                    timestamp_ms,
                },
            ),
        }
    }

    /// Adds one event of `actor` and returns its dot, or `None` if the counter is at
    /// `u64::MAX`.
    pub fn increment(&mut self, actor: ActorId, now_ms: u64) -> Option<Dot> {
        let counter = self.get(actor).checked_add(1)?;
        self.raise(actor, counter, now_ms);
        Some(Dot { actor, counter })
    }

    /// `self` has seen every event `other` has seen (reflexive).
    pub fn descends(&self, other: &VClock) -> bool {
        let mut mine = self.entries.iter().peekable();
        for theirs in other.entries.iter() {
            // Skip my actors below theirs; each step consumes one entry, so the loops are
            // bounded by the two lengths.
            while mine.next_if(|m| m.actor < theirs.actor).is_some() {}
            match mine.peek() {
                Some(m) if m.actor == theirs.actor && m.counter >= theirs.counter => {}
                _ => return false,
            }
        }
        true
    }

    /// `self` descends `other` and has seen at least one event more.
    pub fn dominates(&self, other: &VClock) -> bool {
        self.descends(other) && !other.descends(self)
    }

    /// Neither descends the other.
    pub fn concurrent(&self, other: &VClock) -> bool {
        !self.descends(other) && !other.descends(self)
    }

    /// Same counters for every actor (timestamps ignored).
    pub fn same_history(&self, other: &VClock) -> bool {
        self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(other.entries.iter())
                .all(|(a, b)| a.actor == b.actor && a.counter == b.counter)
    }

    /// Least upper bound: per actor the maximum counter and the maximum timestamp.
    pub fn merge(&mut self, other: &VClock) {
        let mut merged: SmallVec<[ClockEntry; VCLOCK_ENTRIES_INLINE]> =
            SmallVec::with_capacity(self.entries.len() + other.entries.len());
        let (mine, theirs) = (&self.entries, &other.entries);
        let (mut i, mut j) = (0, 0);
        // Each iteration advances `i`, `j` or both, so it runs at most len + len times.
        while i < mine.len() || j < theirs.len() {
            let next = match (mine.get(i), theirs.get(j)) {
                (Some(x), Some(y)) if x.actor == y.actor => {
                    i += 1;
                    j += 1;
                    ClockEntry {
                        actor: x.actor,
                        counter: x.counter.max(y.counter),
                        timestamp_ms: x.timestamp_ms.max(y.timestamp_ms),
                    }
                }
                (Some(x), Some(y)) if x.actor < y.actor => {
                    i += 1;
                    *x
                }
                (Some(x), None) => {
                    i += 1;
                    *x
                }
                (_, Some(y)) => {
                    j += 1;
                    *y
                }
                (None, None) => break,
            };
            merged.push(next);
        }
        self.entries = merged;
    }

    /// Removes entries with the oldest timestamp (ties: lowest actor) until at most
    /// `entries_max` remain; returns how many were removed. The result only forgets history,
    /// so the original clock descends it.
    pub fn truncate(&mut self, entries_max: usize) -> usize {
        let removed = self.entries.len().saturating_sub(entries_max);
        if removed == 0 {
            return 0;
        }
        // the `removed` oldest, found with one sort (a clock from a peer may hold
        // thousands of entries: removing one minimum at a time was quadratic); actors
        // are unique, so the order is total and the result is the same
        let mut by_age: Vec<(u64, ActorId)> = self
            .entries
            .iter()
            .map(|e| (e.timestamp_ms, e.actor))
            .collect();
        by_age.select_nth_unstable(removed - 1);
        let cut = by_age[removed - 1];
        self.entries.retain(|e| (e.timestamp_ms, e.actor) > cut);
        removed
    }

    /// [`truncate`](Self::truncate) that never removes `keep`'s entry (unless
    /// `entries_max` is 0): the others make room for it.
    pub fn truncate_keeping(&mut self, keep: ActorId, entries_max: usize) -> usize {
        if self.entries.len() <= entries_max {
            return 0;
        }
        let Ok(i) = self.position(keep) else {
            return self.truncate(entries_max);
        };
        if entries_max == 0 {
            return self.truncate(0);
        }
        let kept = self.entries.remove(i);
        let removed = self.truncate(entries_max - 1);
        self.raise(kept.actor, kept.counter, kept.timestamp_ms);
        removed
    }

    /// Appends the binary encoding (see docs/format.md): u16 entry count, then per entry
    /// node u64, epoch u32, counter u64, timestamp_ms u64, all little-endian.
    ///
    /// # Panics
    /// If the clock has more than `u16::MAX` entries (callers truncate far below that).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let count = u16::try_from(self.entries.len())
            .unwrap_or_else(|_| panic!("clock has {} entries, more than u16::MAX", self.len()));
        out.reserve(2 + self.entries.len() * CLOCK_ENTRY_BYTES);
        out.extend_from_slice(&count.to_le_bytes());
        for entry in &self.entries {
            entry.actor.encode(out);
            out.extend_from_slice(&entry.counter.to_le_bytes());
            out.extend_from_slice(&entry.timestamp_ms.to_le_bytes());
        }
    }

    /// Encoded length in bytes.
    pub fn encoded_len(&self) -> usize {
        2 + self.entries.len() * CLOCK_ENTRY_BYTES
    }

    /// Decodes a clock from the start of `bytes`; returns it and the bytes consumed.
    pub fn decode(bytes: &[u8]) -> Result<(VClock, usize), ClockDecodeError> {
        let mut reader = Reader::new(bytes);
        let clock = Self::decode_from(&mut reader)?;
        Ok((clock, reader.position()))
    }

    pub(crate) fn decode_from(reader: &mut Reader<'_>) -> Result<VClock, ClockDecodeError> {
        let count = usize::from(reader.u16()?);
        // Check the whole body is present before allocating for it.
        reader.ensure(count * CLOCK_ENTRY_BYTES)?;
        let mut entries: SmallVec<[ClockEntry; VCLOCK_ENTRIES_INLINE]> =
            SmallVec::with_capacity(count);
        for index in 0..count {
            let actor = ActorId::decode(reader)?;
            let counter = reader.u64()?;
            let timestamp_ms = reader.u64()?;
            if counter == 0 {
                return Err(ClockDecodeError::ZeroCounter { index });
            }
            if let Some(last) = entries.last() {
                if last.actor >= actor {
                    return Err(ClockDecodeError::UnsortedActors { index });
                }
            }
            entries.push(ClockEntry {
                actor,
                counter,
                timestamp_ms,
            });
        }
        Ok(VClock { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ActorId = ActorId::new(1, 0);
    const B: ActorId = ActorId::new(2, 0);
    const A1: ActorId = ActorId::new(1, 1);

    #[test]
    fn increment_and_compare() {
        let mut x = VClock::new();
        assert_eq!(x.increment(A, 10), Some(Dot::new(A, 1)));
        let mut y = x.clone();
        y.increment(B, 20);
        assert!(y.dominates(&x));
        assert!(!x.dominates(&y));
        assert!(x.descends(&x) && !x.dominates(&x));
        x.increment(A, 30);
        assert!(x.concurrent(&y));
        let mut m = x.clone();
        m.merge(&y);
        assert_eq!(m.get(A), 2);
        assert_eq!(m.get(B), 1);
        assert!(m.descends(&x) && m.descends(&y));
        // Different epochs of one node are different actors.
        assert_eq!(m.get(A1), 0);
        assert!(m.contains_dot(Dot::new(A, 2)) && !m.contains_dot(Dot::new(A, 3)));
        assert!(!m.contains_dot(Dot::new(A1, 1)));
    }

    #[test]
    fn truncate_matches_removing_the_oldest_one_at_a_time() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let len = (next() % 40) as usize;
            let clock = VClock::from_entries((0..len).map(|_| ClockEntry {
                actor: ActorId {
                    node: next() % 50,
                    epoch: (next() % 3) as u32,
                },
                counter: 1 + next() % 9,
                // few distinct times: ties are broken by actor
                timestamp_ms: next() % 8,
            }));
            let max = (next() % 45) as usize;
            let mut expected = clock.clone();
            let removed = expected.entries.len().saturating_sub(max);
            for _ in 0..removed {
                let oldest = expected
                    .entries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| (e.timestamp_ms, e.actor))
                    .map(|(i, _)| i)
                    .unwrap();
                expected.entries.remove(oldest);
            }
            let mut got = clock.clone();
            assert_eq!(got.truncate(max), removed, "round {round}");
            assert_eq!(got, expected, "round {round}");
        }
    }

    #[test]
    fn truncate_removes_oldest_by_timestamp() {
        let mut c = VClock::from_entries([
            ClockEntry {
                actor: A,
                counter: 5,
                timestamp_ms: 300,
            },
            ClockEntry {
                actor: B,
                counter: 1,
                timestamp_ms: 100,
            },
            ClockEntry {
                actor: A1,
                counter: 2,
                timestamp_ms: 200,
            },
        ]);
        let original = c.clone();
        assert_eq!(c.truncate(3), 0);
        assert_eq!(c.truncate(1), 2);
        assert_eq!(c.entries().len(), 1);
        assert_eq!(c.get(A), 5);
        assert!(original.descends(&c));
        let mut stats = TruncationStats::default();
        stats.record(0);
        stats.record(2);
        assert_eq!(
            stats,
            TruncationStats {
                clocks_truncated: 1,
                entries_removed: 2
            }
        );
    }

    #[test]
    fn next_epoch_is_fresh() {
        assert_eq!(next_epoch(None, 1_700_000_000_123), Ok(1_700_000_000));
        assert_eq!(next_epoch(Some(5), 1_000), Ok(6));
        assert_eq!(next_epoch(Some(5), 9_999), Ok(9));
        assert_eq!(next_epoch(Some(u32::MAX), 0), Err(EpochError::Exhausted));
        // Far future: saturates rather than wrapping to a small, reused epoch.
        assert_eq!(next_epoch(None, u64::MAX), Ok(u32::MAX));
    }

    #[test]
    fn decode_rejects_bad_clocks() {
        let mut bytes = Vec::new();
        VClock::from_entries([
            ClockEntry {
                actor: A,
                counter: 1,
                timestamp_ms: 0,
            },
            ClockEntry {
                actor: B,
                counter: 1,
                timestamp_ms: 0,
            },
        ])
        .encode(&mut bytes);
        // Swap the two actors' node ids: unsorted.
        let mut unsorted = bytes.clone();
        unsorted[2] = 2;
        unsorted[2 + CLOCK_ENTRY_BYTES] = 1;
        assert_eq!(
            VClock::decode(&unsorted),
            Err(ClockDecodeError::UnsortedActors { index: 1 })
        );
        let mut duplicate = bytes.clone();
        duplicate[2 + CLOCK_ENTRY_BYTES] = 1;
        assert_eq!(
            VClock::decode(&duplicate),
            Err(ClockDecodeError::UnsortedActors { index: 1 })
        );
        let mut zero = bytes.clone();
        zero[2 + ACTOR_BYTES] = 0;
        assert_eq!(
            VClock::decode(&zero),
            Err(ClockDecodeError::ZeroCounter { index: 0 })
        );
        assert!(matches!(
            VClock::decode(&bytes[..bytes.len() - 1]),
            Err(ClockDecodeError::Truncated { .. })
        ));
        // A huge count with no body is rejected before allocating.
        assert!(matches!(
            VClock::decode(&[0xff, 0xff]),
            Err(ClockDecodeError::Truncated { .. })
        ));
        let (decoded, used) = VClock::decode(&bytes).expect("valid clock");
        assert_eq!(used, bytes.len());
        assert_eq!(decoded.get(B), 1);
    }
}

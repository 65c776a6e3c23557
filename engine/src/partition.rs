//! One partition: append-only segments, the keydir, group commit, roll-over, recovery
//! and compaction. Generic over the [`Storage`] trait so the same code runs on glommio
//! DMA files and on the crashing in-memory disk.
//!
//! Concurrency: a partition belongs to one shard (one thread). Many tasks of that shard
//! may call it at once; state lives in a `RefCell` that is never borrowed across an
//! `.await`. Appends reach the keydir in log order at the moment they are buffered.

use crate::keydir::{KeyDir, Loc, LOC_TOMBSTONE};
use crate::notify::{Notify, Turn};
use crate::record::{self, Record, RecordRef};
use crate::segment::{self, Scanned};
use crate::storage::{Storage, StorageFile};
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use thiserror::Error;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After an `fdatasync` that covers it; concurrent writers share one (group commit).
    Sync,
    /// At once; the runtime syncs every `ms` milliseconds (see [`Partition::sync`]).
    Interval { ms: u64 },
    /// At once; data reaches the device when buffers fill, a segment seals, or on close.
    None,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sync" => Ok(Self::Sync),
            "none" => Ok(Self::None),
            _ => s
                .strip_prefix("interval(")
                .and_then(|r| r.strip_suffix(')'))
                .map(|ms| ms.trim_end_matches("ms"))
                .and_then(|ms| ms.parse().ok())
                .map(|ms| Self::Interval { ms })
                .ok_or_else(|| format!("durability '{s}': expected sync, none or interval(MS)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PartitionConfig {
    /// The partition number (written into segment headers).
    pub partition: u64,
    pub durability: Durability,
    /// The active segment is sealed once it reaches this size.
    pub segment_bytes_max: u64,
    /// Appended bytes buffered before a flush in `interval`/`none` modes.
    pub buffer_bytes_max: u64,
    /// Tombstones older than this may be dropped by compaction.
    pub tombstone_grace_ms: u64,
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
    /// Largest accepted opaque version blob.
    pub version_bytes_max: usize,
    /// Bytes of recently written or read records kept in memory (reads are O_DIRECT).
    pub cache_bytes_max: usize,
    /// A coordinated write that would leave a key more siblings than this is refused
    /// (replicated versions are always stored).
    pub siblings_max: usize,
    /// A client context that shows local data was lost moves the partition to a new
    /// actor epoch (a synced file write, and one more entry in clocks written after):
    /// at most once per this many milliseconds. A context can be forged to claim that
    /// on every put; a real loss needs one move.
    pub context_epoch_move_interval_ms: u64,
    /// `sync` writes are made durable by a shard's commit log
    /// ([`Partition::set_commit_log`]) rather than by syncing segments: `open` then
    /// cuts the unsynced tail of *any* segment without a hint (a roll-over may have left
    /// one behind the last) instead of calling it corruption, and leaves hints to
    /// background work, because [`Partition::replay`] puts those bytes back.
    pub commit_log: bool,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            partition: 0,
            durability: Durability::Sync,
            segment_bytes_max: 64 << 20,
            buffer_bytes_max: 256 << 10,
            tombstone_grace_ms: 24 * 3600 * 1000,
            key_bytes_max: 4096,
            value_bytes_max: 4 << 20,
            version_bytes_max: 4096,
            cache_bytes_max: 2 << 20,
            siblings_max: 100,
            context_epoch_move_interval_ms: 1000,
            commit_log: false,
        }
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("key is {len} bytes, the limit is {max}")]
    KeyTooLong { len: usize, max: usize },
    #[error("value is {len} bytes, the limit is {max}")]
    ValueTooLarge { len: usize, max: usize },
    #[error("version blob is {len} bytes, the limit is {max}")]
    VersionTooLarge { len: usize, max: usize },
    #[error("empty key")]
    EmptyKey,
    #[error("empty batch")]
    EmptyBatch,
    #[error(
        "the partition refuses writes after a failed write or sync ({0}); reopen it (a node: \
         restart it) to recover"
    )]
    Failed(String),
    #[error("corrupt record for key at segment {segment:#x} offset {offset}: {error}")]
    Corrupt {
        segment: u64,
        offset: u64,
        error: String,
    },
    #[error("the key has {siblings} siblings, the limit is {max}: get, resolve, and put with the context")]
    TooManySiblings { siblings: usize, max: usize },
    #[error("the partition is closed")]
    Closed,
    #[error("the active segment is full while a roll-over runs; try again")]
    SegmentFull,
    #[error("actor epoch: {0}")]
    Epoch(String),
    #[error("stored version blob of a key is unreadable: {0}")]
    BadVersion(String),
    #[error("key changed under {attempts} attempts to write it; try again")]
    Contended { attempts: usize },
    #[error(
        "the context is ahead of this node's data for its current actor, and the partition \
         moved to a new actor epoch {since_ms} ms ago (at most one move per {interval_ms} ms): \
         try again later, or get the key for a fresh context"
    )]
    EpochMovesLimited { since_ms: u64, interval_ms: u64 },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A version to append: the key, its opaque version blob, a value or a tombstone,
/// and the seqs of the key's stored versions it supersedes.
#[derive(Debug, Clone)]
pub struct WriteOp<'a> {
    pub key: &'a [u8],
    pub version: &'a [u8],
    /// `None` writes a tombstone.
    pub value: Option<&'a [u8]>,
    pub replaces: &'a [u64],
}

impl<'a> WriteOp<'a> {
    /// Bytes its record takes in the log.
    pub fn encoded_len(&self) -> usize {
        self.record(0, 0, false).encoded_len()
    }

    fn record(&self, seq: u64, timestamp_ms: u64, batch_continues: bool) -> RecordRef<'a> {
        RecordRef {
            seq,
            timestamp_ms,
            key: self.key,
            replaced: self.replaces,
            version: self.version,
            value: self.value,
            batch_continues,
        }
    }
}

/// An append done, with what its writer still owes: see [`Partition::append_now`].
struct Appended<F> {
    segment: Rc<Segment<F>>,
    end: u64,
    seqs: std::ops::Range<u64>,
    roll: bool,
    /// The commit-log position the append is durable at.
    logged: Option<u64>,
}

/// A stored version read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub seq: u64,
    pub timestamp_ms: u64,
    pub version: Vec<u8>,
    /// `None` for a tombstone.
    pub value: Option<Vec<u8>>,
}

/// What opening a partition found.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub segments: usize,
    pub segments_from_hints: usize,
    pub records: u64,
    pub keys: usize,
    /// Non-zero bytes cut from the tail of a segment whose seal never finished (a torn
    /// or unsynced write; zero padding is cut silently), plus the length of an empty
    /// segment a cut-short roll-over left behind.
    pub truncated_tail_bytes: u64,
    /// Records of an unfinished batch that were dropped.
    pub dropped_batch_records: usize,
    /// Problems found: corruption inside segments (then `needs_repair` is set) and
    /// unreadable hint files (the segment was scanned instead; nothing lost).
    pub corruption: Vec<String>,
    /// Leftover `*.tmp` files and hints without a segment, removed.
    pub temp_files_removed: usize,
}

/// What a compaction did.
#[derive(Debug, Default, Clone)]
pub struct CompactionReport {
    pub segments_in: usize,
    pub segments_out: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub records_kept: u64,
    pub records_dropped: u64,
    pub tombstones_dropped: u64,
    /// Tombstones past their grace period kept because the caller asked (see
    /// [`Partition::compact_keeping`]).
    pub tombstones_held: u64,
}

#[derive(Debug, Default, Clone)]
pub struct PartitionStats {
    pub keys: usize,
    pub versions: usize,
    pub segments: usize,
    pub bytes: u64,
    pub dead_bytes: u64,
    pub syncs: u64,
    pub writes: u64,
    pub keydir_heap_bytes: usize,
    pub needs_repair: bool,
    pub epoch: u32,
    /// Clocks truncated past their size bound, and entries cut from them.
    pub clock_truncations: u64,
    pub clock_entries_truncated: u64,
}

/// Normal segments get ids `n << SEGMENT_ID_SHIFT`; compaction output of a prefix
/// ending at id `b` gets `b + 1, b + 2, ..`, so it sorts after its sources and before
/// every newer segment: replaying segments in id order is replaying the log in order.
const SEGMENT_ID_SHIFT: u32 = 24;
const EPOCH_FILE: &str = "EPOCH";
const EPOCH_MAGIC: &[u8; 8] = b"RKVEPCH1";
const SCAN_CHUNK_BYTES: usize = 8 << 20;

struct Segment<F> {
    id: u64,
    file: F,
    sealed: Cell<bool>,
    durable_len: Cell<u64>,
    dead_bytes: Cell<u64>,
    /// Its hint file exists (or it cannot have one).
    hinted: Cell<bool>,
    /// A flush, sync or truncate of this file is running.
    io_busy: Cell<bool>,
    io_done: Notify,
}

struct State<F> {
    keydir: KeyDir,
    /// slot -> segment; keydir locations name slots.
    slots: Vec<Option<Rc<Segment<F>>>>,
    /// segment id -> slot, in log order.
    order: BTreeMap<u64, u32>,
    active: u32,
    next_seq: u64,
    failed: Option<String>,
    /// `close` ran: writes are refused, reads still work.
    closed: bool,
    needs_repair: bool,
    /// segment id -> the byte spans of whole records `open` read from a segment it
    /// found damaged (until replay is finished): a commit log entry for that segment is
    /// present only inside one of them, however long the segment is.
    damaged: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Seqs of the records replay put into the active segment because their own place
    /// was damaged, and of the records after them that supersede one of those: every
    /// record that supersedes one must follow it there, since `open` applies segments
    /// in id order and the active segment comes last.
    moved: std::collections::HashSet<u64>,
    rolling: bool,
    compacting: bool,
    epoch: u32,
    syncs: u64,
    writes: u64,
    clock_truncations: u64,
    clock_entries_truncated: u64,
}

impl<F> State<F> {
    fn segment(&self, slot: u32) -> &Rc<Segment<F>> {
        self.slots[slot as usize]
            .as_ref()
            .expect("keydir names a live slot")
    }
    fn add_slot(&mut self, segment: Segment<F>) -> u32 {
        let id = segment.id;
        let rc = Rc::new(segment);
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(rc);
                i as u32
            }
            None => {
                self.slots.push(Some(rc));
                (self.slots.len() - 1) as u32
            }
        };
        self.order.insert(id, slot);
        slot
    }
    fn mark_dead(&self, loc: &Loc) {
        let seg = self.segment(loc.segment);
        seg.dead_bytes.set(seg.dead_bytes.get() + loc.len as u64);
    }
    /// Applies one record to the keydir, as a write or as a replay.
    fn apply(&mut self, key: &[u8], loc: Loc, replaced: &[u64]) {
        let (removed, old) = self.keydir.replace(key, replaced, loc);
        for old in removed.iter().chain(&old) {
            self.mark_dead(old);
        }
    }
}

/// One partition's log.
pub struct Partition<S: Storage> {
    storage: S,
    config: PartitionConfig,
    state: RefCell<State<S::File>>,
    /// An `EPOCH` write is running (they take turns).
    epoch_busy: Cell<bool>,
    /// When a client context last moved the partition to a new epoch (unix ms).
    context_epoch_moved_ms: Cell<Option<u64>>,
    sync_group: RefCell<Option<Rc<crate::sync_group::SyncGroup>>>,
    commit_log: RefCell<Option<Rc<crate::commit_log::CommitLog<S>>>>,
    /// Segments [`replay`](Self::replay) appended to, synced by `finish_replay`.
    replayed: RefCell<Vec<u64>>,
    /// Keys with a versioned write in progress (read, decide, append): such writes to
    /// one key take turns instead of racing and retrying.
    key_locks: RefCell<std::collections::HashSet<Box<[u8]>, ahash::RandomState>>,
    key_unlocked: Notify,
    /// `write_pending_hints` is running (they take turns).
    hints_busy: Cell<bool>,
    hints_done: Notify,
    cache: RefCell<crate::cache::RecordCache>,
    epoch_done: Notify,
    /// Reused buffers (no allocation per write in the steady state): the records an
    /// append encodes, and the version blob a coordinated write encodes.
    append_scratch: Scratch,
    pub(crate) version_scratch: Scratch,
}

/// A reused byte buffer: taken empty, given back after use.
#[derive(Default)]
pub(crate) struct Scratch(Cell<Vec<u8>>);

impl Scratch {
    /// A buffer grown past this is dropped after use rather than kept.
    const KEPT_BYTES_MAX: usize = 1 << 20;

    pub(crate) fn take(&self) -> Vec<u8> {
        let mut buf = self.0.take();
        buf.clear();
        buf
    }

    pub(crate) fn put(&self, buf: Vec<u8>) {
        if buf.capacity() <= Self::KEPT_BYTES_MAX {
            self.0.set(buf);
        }
    }
}

impl<S: Storage> std::fmt::Debug for Partition<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("partition", &self.config.partition)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Partition<S> {
    /// Opens (or creates) the partition in `storage` and recovers it. `now_ms` is the
    /// wall clock, used only to pick a fresh actor epoch when local data was lost.
    pub async fn open(
        storage: S,
        config: PartitionConfig,
        now_ms: u64,
    ) -> Result<(Self, RecoveryReport), StoreError> {
        assert!(config.segment_bytes_max >= 4096 && config.segment_bytes_max < u32::MAX as u64);
        let mut report = RecoveryReport::default();
        let names = storage.list().await?;
        let mut seg_ids = Vec::new();
        let mut hint_ids = std::collections::BTreeSet::new();
        for name in &names {
            if name.ends_with(".tmp") {
                storage.remove(name).await?;
                report.temp_files_removed += 1;
                continue;
            }
            match segment::parse_name(name) {
                Some((id, "seg")) => seg_ids.push(id),
                Some((id, _)) => {
                    hint_ids.insert(id);
                }
                None => {}
            }
        }
        // a hint whose segment is gone (a compaction that crashed before renaming its
        // output) describes nothing
        let orphans: Vec<u64> = hint_ids
            .iter()
            .copied()
            .filter(|id| !seg_ids.contains(id))
            .collect();
        for id in orphans {
            storage.remove(&segment::hint_name(id)).await?;
            hint_ids.remove(&id);
            report.temp_files_removed += 1;
        }
        if report.temp_files_removed > 0 {
            storage.sync_dir().await?;
        }
        seg_ids.sort_unstable();
        // The epoch is settled and persisted as "open" before recovery changes any
        // file: after a crash (not closed cleanly) writes that were visible may be gone,
        // so the node moves to a fresh epoch and never reuses a clock counter, even if
        // it crashes again during this recovery.
        let persisted_epoch = read_epoch(&storage).await?;
        let mut epoch = match persisted_epoch {
            Some((e, true)) => e,
            other => crate::version::next_epoch(other.map(|(e, _)| e), now_ms)
                .map_err(|e| StoreError::Epoch(e.to_string()))?,
        };
        let bumped_at_start = persisted_epoch.map(|(e, _)| e) != Some(epoch);
        write_epoch(&storage, epoch, false).await?;

        let mut state = State {
            keydir: KeyDir::new(),
            slots: Vec::new(),
            order: BTreeMap::new(),
            active: 0,
            next_seq: 1,
            failed: None,
            closed: false,
            needs_repair: false,
            damaged: BTreeMap::new(),
            moved: Default::default(),
            rolling: false,
            compacting: false,
            epoch: 0,
            syncs: 0,
            writes: 0,
            clock_truncations: 0,
            clock_entries_truncated: 0,
        };
        let mut reopen_active: Option<u32> = None;
        let last_id = seg_ids.last().copied();
        for &id in &seg_ids {
            let name = segment::segment_name(id);
            let file = storage.open(&name).await?;
            let len = file.len();
            let is_last = Some(id) == last_id;
            let has_hint = hint_ids.contains(&id);
            let mut entries = None;
            if hint_ids.contains(&id) {
                let hint = storage.open(&segment::hint_name(id)).await?;
                let bytes = hint.read_at(0, hint.len() as usize).await?;
                match segment::decode_hint(&bytes, id, len) {
                    Ok(e) => {
                        entries = Some(e);
                        report.segments_from_hints += 1;
                    }
                    Err(err) => {
                        report
                            .corruption
                            .push(format!("hint {id:016x} ignored, segment scanned: {err}"));
                    }
                }
            }
            // a segment with a hint file was sealed, even if the hint is unreadable
            let mut sealed = !is_last || has_hint;
            let mut hinted = sealed;
            let mut seg_len = len;
            let mut damaged = false;
            let entries = match entries {
                Some(e) => e,
                None => {
                    let bytes = read_all(&file, &storage).await?;
                    let scan = segment::scan(&bytes, id);
                    if let Some(err) = &scan.header_error {
                        if is_last && !has_hint && bytes.iter().all(|&b| b == 0) {
                            // created but never written: a roll-over cut short
                            drop(file);
                            storage.remove(&name).await?;
                            storage.sync_dir().await?;
                            report.truncated_tail_bytes += len;
                            continue;
                        }
                        report.corruption.push(format!(
                            "segment {id:016x}: unreadable header ({err}); its records are lost"
                        ));
                        state.needs_repair = true;
                        sealed = true;
                        damaged = true;
                    }
                    for bad in &scan.corrupt {
                        report.corruption.push(format!(
                            "segment {id:016x}: corrupt bytes {}..{}: {}",
                            bad.start, bad.end, bad.error
                        ));
                        state.needs_repair = true;
                        sealed = true;
                        damaged = true;
                    }
                    report.dropped_batch_records += scan.incomplete_batch_records;
                    let cut = len - scan.valid_end.min(len);
                    let header_ok = scan.header_error.is_none();
                    if header_ok && cut > 0 {
                        if has_hint || !scan.corrupt.is_empty() {
                            // a segment that was sealed (or is damaged inside) has no
                            // torn tail to cut: this is corruption
                            if let Some(bad) = &scan.torn_tail {
                                report.corruption.push(format!(
                                    "segment {id:016x}: corrupt tail {}..{}: {}",
                                    bad.start, bad.end, bad.error
                                ));
                                state.needs_repair = true;
                                damaged = true;
                            }
                        } else {
                            // a tail whose seal never finished: torn or unsynced writes
                            // that were never acknowledged in `sync` mode
                            if scan.torn_tail.is_some() {
                                report.truncated_tail_bytes += cut;
                            }
                            file.truncate(scan.valid_end).await?;
                            seg_len = scan.valid_end;
                        }
                    } else if header_ok && !has_hint {
                        // nothing to cut, but bytes a crashed process wrote may still be
                        // only in the page cache: they are trusted from here on (a hint
                        // may describe them, `close` skips what it thinks is durable and
                        // writes a clean EPOCH), so they are made durable first
                        file.sync().await?;
                    }
                    if header_ok && sealed && scan.corrupt.is_empty() && seg_len == scan.valid_end {
                        if config.commit_log {
                            // replay may still append to it: background work writes
                            // the hint later
                            hinted = false;
                        } else {
                            // a sealed segment without a (valid) hint: write one now
                            write_hint(&storage, id, seg_len, &scan.records).await?;
                        }
                    }
                    scan.records
                }
            };
            let segment = Segment {
                id,
                file,
                sealed: Cell::new(sealed),
                durable_len: Cell::new(seg_len),
                dead_bytes: Cell::new(0),
                hinted: Cell::new(hinted),
                io_busy: Cell::new(false),
                io_done: Notify::default(),
            };
            let slot = state.add_slot(segment);
            if damaged && config.commit_log {
                // what is known good: the records read, as merged spans
                let mut spans: Vec<(u64, u64)> = Vec::new();
                for e in &entries {
                    let (start, end) = (e.offset, e.offset + e.header.total_bytes() as u64);
                    match spans.last_mut() {
                        Some(last) if last.1 == start => last.1 = end,
                        _ => spans.push((start, end)),
                    }
                }
                state.damaged.insert(id, spans);
            }
            for e in &entries {
                let loc = Loc {
                    seq: e.header.seq,
                    segment: slot,
                    offset: e.offset as u32,
                    len: e.header.total_bytes() as u32,
                    flags: if e.header.is_tombstone() {
                        LOC_TOMBSTONE
                    } else {
                        0
                    },
                };
                state.next_seq = state.next_seq.max(e.header.seq.saturating_add(1));
                state.apply(&e.key, loc, &e.replaced);
            }
            report.records += entries.len() as u64;
            if !sealed {
                reopen_active = Some(slot);
            }
            storage.yield_now().await;
        }
        report.segments = seg_ids.len();
        report.keys = state.keydir.len();

        // Data was lost even though the partition was closed cleanly (corruption found):
        // move on to a fresh epoch too.
        let data_lost = state.needs_repair
            || report.truncated_tail_bytes > 0
            || report.dropped_batch_records > 0;
        if data_lost && !bumped_at_start {
            epoch = crate::version::next_epoch(Some(epoch), now_ms)
                .map_err(|e| StoreError::Epoch(e.to_string()))?;
            write_epoch(&storage, epoch, false).await?;
        }
        state.epoch = epoch;

        let cache_bytes_max = config.cache_bytes_max;
        let partition = Self {
            storage,
            config,
            state: RefCell::new(state),
            epoch_busy: Cell::new(false),
            context_epoch_moved_ms: Cell::new(None),
            epoch_done: Notify::default(),
            sync_group: RefCell::new(None),
            commit_log: RefCell::new(None),
            replayed: RefCell::default(),
            key_locks: RefCell::default(),
            key_unlocked: Notify::default(),
            hints_busy: Cell::new(false),
            hints_done: Notify::default(),
            cache: RefCell::new(crate::cache::RecordCache::new(cache_bytes_max)),
            append_scratch: Scratch::default(),
            version_scratch: Scratch::default(),
        };
        if partition.config.commit_log && !partition.state.borrow().damaged.is_empty() {
            // replay puts the records lost in damaged segments into a segment no log
            // entry names: a fresh active one (the last segment becomes a sealed one
            // that replay may still extend at its end)
            if let Some(slot) = reopen_active.take() {
                partition.state.borrow().segment(slot).sealed.set(true);
            }
        }
        match reopen_active {
            Some(slot) => partition.state.borrow_mut().active = slot,
            None => {
                let next_id = ((last_id.unwrap_or(0) >> SEGMENT_ID_SHIFT) + 1) << SEGMENT_ID_SHIFT;
                let slot = partition.create_segment(next_id).await?;
                partition.state.borrow_mut().active = slot;
            }
        }
        Ok((partition, report))
    }

    async fn create_segment(&self, id: u64) -> Result<u32, StoreError> {
        let file = self.storage.create(&segment::segment_name(id)).await?;
        file.append(&segment::encode_segment_header(id, self.config.partition));
        file.sync().await?;
        self.storage.sync_dir().await?;
        let len = file.len();
        let segment = Segment {
            id,
            file,
            sealed: Cell::new(false),
            durable_len: Cell::new(len),
            dead_bytes: Cell::new(0),
            hinted: Cell::new(false),
            io_busy: Cell::new(false),
            io_done: Notify::default(),
        };
        Ok(self.state.borrow_mut().add_slot(segment))
    }

    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    /// The actor epoch of this partition on this node (see `version`).
    pub fn epoch(&self) -> u32 {
        self.state.borrow().epoch
    }

    /// Claims the partition's next epoch move for a client context that shows local data
    /// was lost, unless one happened less than `context_epoch_move_interval_ms` ago.
    pub fn claim_context_epoch_move(&self, now_ms: u64) -> Result<(), StoreError> {
        let interval_ms = self.config.context_epoch_move_interval_ms;
        if let Some(last) = self.context_epoch_moved_ms.get() {
            let since_ms = now_ms.saturating_sub(last);
            if since_ms < interval_ms {
                return Err(StoreError::EpochMovesLimited {
                    since_ms,
                    interval_ms,
                });
            }
        }
        self.context_epoch_moved_ms.set(Some(now_ms));
        Ok(())
    }

    /// Moves this partition to a new actor epoch (persisted before it is used): after
    /// tombstone reaping, or when a client context shows local data was lost.
    pub async fn bump_epoch(&self, now_ms: u64) -> Result<u32, StoreError> {
        self.persist_epoch(Some(now_ms), false).await
    }

    /// Writes the `EPOCH` file, one writer at a time (they share `EPOCH.tmp`): with
    /// `bump_at_ms`, a new epoch first. A failure fails the partition.
    async fn persist_epoch(&self, bump_at_ms: Option<u64>, clean: bool) -> Result<u32, StoreError> {
        let turn = Turn::wait(&self.epoch_busy, &self.epoch_done).await;
        let current = self.state.borrow().epoch;
        let result = async {
            let epoch = match bump_at_ms {
                Some(now_ms) => crate::version::next_epoch(Some(current), now_ms)
                    .map_err(|e| StoreError::Epoch(e.to_string()))?,
                None => current,
            };
            write_epoch(&self.storage, epoch, clean).await?;
            Ok(epoch)
        }
        .await;
        drop(turn);
        let epoch = result.map_err(|e| self.fail_with(e))?;
        self.state.borrow_mut().epoch = epoch;
        Ok(epoch)
    }

    /// Whether a move to a new epoch is being written.
    pub(crate) fn epoch_moving(&self) -> bool {
        self.epoch_busy.get()
    }

    /// Waits until no move to a new epoch is being written.
    pub(crate) async fn wait_epoch_move(&self) {
        drop(Turn::wait(&self.epoch_busy, &self.epoch_done).await);
    }

    /// Counts clock entries cut by truncation (reported in stats).
    pub fn record_clock_truncation(&self, entries: usize) {
        if entries > 0 {
            let mut state = self.state.borrow_mut();
            state.clock_truncations += 1;
            state.clock_entries_truncated += entries as u64;
        }
    }

    /// Marks the partition as missing data found damaged outside it (its shard's
    /// commit log): see [`Partition::needs_repair`].
    pub fn mark_needs_repair(&self) {
        self.state.borrow_mut().needs_repair = true;
    }

    /// Corruption was found: some data must come back from replicas.
    pub fn needs_repair(&self) -> bool {
        self.state.borrow().needs_repair
    }

    /// Waits until no other versioned write holds `key`, then holds it until the guard
    /// is dropped (also when the write's future is dropped half-way).
    pub async fn lock_key(&self, key: &[u8]) -> KeyGuard<'_, S> {
        while self.key_locks.borrow().contains(key) {
            self.key_unlocked.wait().await;
        }
        self.key_locks.borrow_mut().insert(key.into());
        KeyGuard {
            partition: self,
            key: key.into(),
        }
    }

    /// Whether a versioned write holds `key` ([`lock_key`](Self::lock_key)).
    pub fn key_is_locked(&self, key: &[u8]) -> bool {
        self.key_locks.borrow().contains(key)
    }

    /// `close` ran.
    pub fn is_closed(&self) -> bool {
        self.state.borrow().closed
    }

    /// Why the partition refuses writes, if it does.
    pub fn failure(&self) -> Option<String> {
        self.state.borrow().failed.clone()
    }

    fn check(&self, op: &WriteOp<'_>) -> Result<(), StoreError> {
        let c = &self.config;
        if op.key.is_empty() {
            return Err(StoreError::EmptyKey);
        }
        if op.key.len() > c.key_bytes_max.min(record::KEY_BYTES_MAX) {
            return Err(StoreError::KeyTooLong {
                len: op.key.len(),
                max: c.key_bytes_max,
            });
        }
        let value_len = op.value.map_or(0, <[u8]>::len);
        if value_len > c.value_bytes_max.min(record::VALUE_BYTES_MAX) {
            return Err(StoreError::ValueTooLarge {
                len: value_len,
                max: c.value_bytes_max,
            });
        }
        if op.version.len() > c.version_bytes_max.min(record::VERSION_BYTES_MAX) {
            return Err(StoreError::VersionTooLarge {
                len: op.version.len(),
                max: c.version_bytes_max,
            });
        }
        if op.replaces.len() > record::REPLACED_COUNT_MAX {
            return Err(StoreError::VersionTooLarge {
                len: op.replaces.len(),
                max: record::REPLACED_COUNT_MAX,
            });
        }
        Ok(())
    }

    /// Appends `ops` as one atomic batch (after a crash all of it or none of it is
    /// there) and returns the seq given to each. Each op's `replaces` seqs leave the
    /// key's live set in the same step. Acknowledged per the durability mode.
    pub async fn write(&self, ops: &[WriteOp<'_>], now_ms: u64) -> Result<Vec<u64>, StoreError> {
        self.write_if(ops, now_ms, |_| true)
            .await
            .map(|r| r.expect("no precondition"))
    }

    /// Like [`write`](Self::write), but first checks `precondition` against the keydir
    /// in the same step as the append (no other write can come in between). Returns
    /// `Ok(None)` without writing when it fails.
    pub async fn write_if(
        &self,
        ops: &[WriteOp<'_>],
        now_ms: u64,
        precondition: impl FnOnce(&KeyDir) -> bool,
    ) -> Result<Option<Vec<u64>>, StoreError> {
        self.write_if_then(ops, now_ms, precondition, || ()).await
    }

    /// Like [`write_if`](Self::write_if); `appended` runs once the batch is in the
    /// keydir and the log buffer, before the wait for durability (not when the write is
    /// refused): a versioned write releases its key there, so the next write to the
    /// same key can join the same group commit.
    pub async fn write_if_then(
        &self,
        ops: &[WriteOp<'_>],
        now_ms: u64,
        precondition: impl FnOnce(&KeyDir) -> bool,
        appended: impl FnOnce(),
    ) -> Result<Option<Vec<u64>>, StoreError> {
        let Some(append) = self.append_now(ops, now_ms, precondition)? else {
            return Ok(None);
        };
        appended();
        self.finish_append(append).await.map(Some)
    }

    /// The step of a write that needs no waiting: checks, `precondition`, then the
    /// batch into the segment buffer, the commit log (in `Sync` mode with one), the
    /// record cache and the keydir. What is left (a roll, a flush, durability) is
    /// [`finish_append`](Self::finish_append)'s.
    fn append_now(
        &self,
        ops: &[WriteOp<'_>],
        now_ms: u64,
        precondition: impl FnOnce(&KeyDir) -> bool,
    ) -> Result<Option<Appended<S::File>>, StoreError> {
        if ops.is_empty() {
            return Err(StoreError::EmptyBatch);
        }
        for op in ops {
            self.check(op)?;
        }
        let mut state = self.state.borrow_mut();
        if let Some(err) = &state.failed {
            return Err(StoreError::Failed(err.clone()));
        }
        if state.closed {
            return Err(StoreError::Closed);
        }
        if !precondition(&state.keydir) {
            return Ok(None);
        }
        let first_seq = state.next_seq;
        if first_seq + ops.len() as u64 > record::SEQ_MAX + 1 {
            // a record past SEQ_MAX is refused by every decode: it would be written,
            // acknowledged and then unreadable (reachable only through a sequence number
            // forged into the data that `open` read back)
            return Err(StoreError::Failed(format!(
                "sequence numbers exhausted (next {first_seq}, the last is {})",
                record::SEQ_MAX
            )));
        }
        state.next_seq += ops.len() as u64;
        let mut buf = self.append_scratch.take();
        buf.reserve(ops.iter().map(WriteOp::encoded_len).sum());
        let mut places = SmallVec::<[(usize, usize); 4]>::new();
        for (i, op) in ops.iter().enumerate() {
            let start = buf.len();
            op.record(first_seq + i as u64, now_ms, i + 1 < ops.len())
                .encode_into(&mut buf);
            places.push((start, buf.len() - start));
        }
        let active = state.active;
        let segment = state.segment(active).clone();
        if segment.file.len() + buf.len() as u64 > u32::MAX as u64 {
            // a roll is running and writes outran it; offsets must fit in u32
            state.next_seq -= ops.len() as u64;
            return Err(StoreError::SegmentFull);
        }
        let base = segment.file.append(&buf);
        // in the same step as the segment append, so the log holds each
        // partition's appends in segment order
        let logged = match (&self.config.durability, &*self.commit_log.borrow()) {
            (Durability::Sync, Some(log)) => {
                Some(log.append(self.config.partition, segment.id, base, &buf))
            }
            _ => None,
        };
        {
            let mut cache = self.cache.borrow_mut();
            for (i, (start, len)) in places.iter().enumerate() {
                cache.insert(first_seq + i as u64, &buf[*start..*start + *len]);
            }
            // replaced versions are never read again: keep the cache to live data
            for op in ops {
                for &seq in op.replaces {
                    cache.remove(seq);
                }
            }
        }
        let end = base + buf.len() as u64;
        for (i, (op, (start, len))) in ops.iter().zip(places).enumerate() {
            let loc = Loc {
                seq: first_seq + i as u64,
                segment: active,
                offset: (base + start as u64) as u32,
                len: len as u32,
                flags: if op.value.is_none() { LOC_TOMBSTONE } else { 0 },
            };
            state.apply(op.key, loc, op.replaces);
        }
        state.writes += ops.len() as u64;
        let roll = end >= self.config.segment_bytes_max && !state.rolling;
        if roll {
            state.rolling = true;
        }
        self.append_scratch.put(buf);
        Ok(Some(Appended {
            segment,
            end,
            seqs: first_seq..first_seq + ops.len() as u64,
            roll,
            logged,
        }))
    }

    /// `append_now` for a caller that checked
    /// [`append_owes_no_io`](Self::append_owes_no_io) in the same step: returns the
    /// commit-log position to wait for, if the mode waits.
    pub fn append_now_logged(
        &self,
        ops: &[WriteOp<'_>],
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let append = self
            .append_now(ops, now_ms, |_| true)?
            .expect("no precondition");
        if append.roll {
            // ruled out by `append_owes_no_io`; should it happen, the next write rolls
            debug_assert!(false, "append_owes_no_io rules out a roll");
            self.state.borrow_mut().rolling = false;
        }
        Ok(append.logged)
    }

    /// Whether an append of `bytes` more (one [`WriteOp::encoded_len`] or a batch's
    /// sum) would leave `finish_append` nothing to do but wait
    /// for the commit log, or nothing at all: no roll due, no flush owed, and
    /// durability by the commit log (`Sync`) or not waited for.
    pub fn append_owes_no_io(&self, bytes: usize) -> bool {
        let state = self.state.borrow();
        if state.failed.is_some() || state.closed || state.rolling {
            return false;
        }
        let segment = state.segment(state.active);
        if segment.file.len() + bytes as u64 >= self.config.segment_bytes_max {
            return false;
        }
        let buffered = segment.file.buffered_bytes() + bytes as u64;
        match self.config.durability {
            Durability::Sync => {
                self.commit_log.borrow().is_some() && buffered < 8 * self.config.buffer_bytes_max
            }
            Durability::Interval { .. } | Durability::None => {
                buffered < self.config.buffer_bytes_max
            }
        }
    }

    /// Waits until the commit log is durable up to `position` (from an append that
    /// [`append_owes_no_io`](Self::append_owes_no_io) cleared). A failed sync fails the
    /// partition, as it does for a writer waiting in [`write`](Self::write).
    pub async fn wait_logged(&self, position: u64) -> Result<(), StoreError> {
        let log = self.commit_log.borrow().clone();
        match log {
            Some(log) => log.wait_durable(position).await.map_err(|e| self.fail(e)),
            None => Ok(()),
        }
    }

    /// Waits until everything appended so far is as durable as a write's reply waits
    /// for in `sync` mode (at once in the other modes): for a reply that rests on
    /// versions another write appended, which may still be waiting for its sync.
    pub async fn durable_barrier(&self) -> Result<(), StoreError> {
        if !matches!(self.config.durability, Durability::Sync) {
            return Ok(());
        }
        let log = self.commit_log.borrow().clone();
        if let Some(log) = log {
            return self.wait_logged(log.appended()).await;
        }
        self.sync().await
    }

    /// How far the commit log is durable (0 without one).
    pub fn logged_durable(&self) -> u64 {
        self.commit_log
            .borrow()
            .as_ref()
            .map_or(0, |log| log.durable())
    }

    /// The waiting part of a write: a roll that came due, then the durability the
    /// partition's mode asks for.
    async fn finish_append(&self, append: Appended<S::File>) -> Result<Vec<u64>, StoreError> {
        let Appended {
            segment,
            end,
            seqs,
            roll,
            logged,
        } = append;
        if roll {
            self.roll().await?;
        }
        if let Some(position) = logged {
            // the segment reaches the device behind the log: the runtime's background
            // flushes (`flush_if_buffered`), roll-over and the log's checkpoints. A
            // writer flushes only when those fall far behind (bounded memory): a flush
            // grows the file, which makes it slow, and later writers to the partition
            // would queue behind it.
            if segment.file.buffered_bytes() >= 8 * self.config.buffer_bytes_max {
                self.file_io(&segment, false).await?;
            }
            self.wait_logged(position).await?;
            return Ok(seqs.collect());
        }
        match self.config.durability {
            Durability::Sync => self.make_durable(&segment, end).await?,
            Durability::Interval { .. } | Durability::None => {
                if segment.file.buffered_bytes() >= self.config.buffer_bytes_max {
                    self.file_io(&segment, false).await?;
                }
            }
        }
        Ok(seqs.collect())
    }

    /// Waits until bytes `..end` of `segment` are durable, leading a group commit when
    /// no sync is running: one `fdatasync` covers every append buffered before it.
    async fn make_durable(
        &self,
        segment: &Rc<Segment<S::File>>,
        end: u64,
    ) -> Result<(), StoreError> {
        let group = self.sync_group.borrow().clone();
        loop {
            if let Some(err) = &self.state.borrow().failed {
                return Err(StoreError::Failed(err.clone()));
            }
            if segment.durable_len.get() >= end {
                return Ok(());
            }
            if segment.io_busy.get() {
                segment.io_done.wait().await;
                continue;
            }
            match &group {
                None => self.file_io(segment, true).await?,
                Some(group) => {
                    // write our bytes to the device, then one shard-wide sync
                    let target = segment.file.len();
                    self.file_io(segment, false).await?;
                    match group
                        .sync_after_now(|| self.storage.sync_filesystem())
                        .await
                    {
                        Ok(()) => {
                            segment
                                .durable_len
                                .set(segment.durable_len.get().max(target));
                            self.state.borrow_mut().syncs += 1;
                            segment.io_done.notify_all();
                        }
                        Err(e) => return Err(self.fail(e)),
                    }
                }
            }
        }
    }

    /// Shares group commit with the other partitions of the shard: `sync` mode
    /// writes then waits for one file-system sync the group runs for all of them.
    pub fn set_sync_group(&self, group: Rc<crate::sync_group::SyncGroup>) {
        *self.sync_group.borrow_mut() = Some(group);
    }

    /// Makes `sync` writes durable through the shard's commit log (see
    /// [`crate::commit_log`]): a write waits for the log's group commit, not for its
    /// segment. Set after [`replay`](Self::replay) and
    /// [`finish_replay`](Self::finish_replay); the config must have `commit_log` set.
    pub fn set_commit_log(&self, log: Rc<crate::commit_log::CommitLog<S>>) {
        *self.commit_log.borrow_mut() = Some(log);
    }

    /// Puts back one commit log entry: `bytes` (whole records of one batch) were
    /// appended to segment `segment` at `offset`. An entry already in the segment, or
    /// for a segment compaction has removed since (its records were durable by then),
    /// is skipped; one starting at the segment's end is appended and applied. In a
    /// segment `open` found damaged, an entry is present only where `open` read whole
    /// records; any other is put into the active segment (which no entry names) and
    /// applied, and so, after it, is every later entry that supersedes one of those
    /// records (see `State::moved`).
    pub fn replay(&self, segment_id: u64, offset: u64, bytes: &[u8]) -> ReplayOutcome {
        let mut state = self.state.borrow_mut();
        let Some(&slot) = state.order.get(&segment_id) else {
            return ReplayOutcome::SegmentGone;
        };
        let segment = state.segment(slot).clone();
        let len = segment.file.len();
        let Some(end) = offset.checked_add(bytes.len() as u64) else {
            // no segment reaches that far: an entry the log's checks let through
            return ReplayOutcome::Mismatch { segment_len: len };
        };
        let present = match state.damaged.get(&segment_id) {
            Some(spans) => spans.iter().any(|&(a, b)| a <= offset && end <= b),
            None => end <= len,
        };
        if !present && state.damaged.contains_key(&segment_id) {
            // lost in its own segment: the log's copy is the good one
            return self.move_to_active(&mut state, bytes);
        }
        // an entry that supersedes a record now in the active segment goes there too,
        // after it, or the next `open` would apply them the other way round
        let follows_moved = !state.moved.is_empty() && supersedes_any(bytes, &state.moved);
        if present {
            // The records are there, but the versions they supersede may be back: an
            // earlier entry's record that an older segment had only in its unsynced
            // tail when this one reached the disk is appended back by replay, after
            // `open` applied this record (which then found nothing to supersede).
            // Superseding again is idempotent: a record that names a seq is durable.
            let mut at = 0usize;
            while at < bytes.len() {
                let Ok(r) = record::decode(&bytes[at..]) else {
                    break;
                };
                at += r.total_bytes();
                let replaced: SmallVec<[u64; 4]> = r.replaced().collect();
                for old in state.keydir.remove_seqs(r.key, &replaced) {
                    state.mark_dead(&old);
                }
            }
            return self.follow_moved(&mut state, bytes, follows_moved, ReplayOutcome::Present);
        }
        if offset != len {
            // a gap, or an entry the segment holds only part of: neither can come
            // from a crash (segments are cut at whole batches, the log holds every
            // batch since the last checkpoint)
            state.needs_repair = true;
            return ReplayOutcome::Mismatch { segment_len: len };
        }
        let outcome = self.append_replayed(&mut state, slot, &segment, bytes, false);
        if !matches!(outcome, ReplayOutcome::Applied { .. }) {
            return outcome;
        }
        self.follow_moved(&mut state, bytes, follows_moved, outcome)
    }

    /// Appends a commit log entry's records to the active segment (which no entry
    /// names) and applies them; their seqs join `State::moved`.
    fn move_to_active(&self, state: &mut State<S::File>, bytes: &[u8]) -> ReplayOutcome {
        let active = state.active;
        let target = state.segment(active).clone();
        self.append_replayed(state, active, &target, bytes, true)
    }

    /// `outcome`, once the entry is also copied to the active segment if it `follows`
    /// a moved record; a copy that cannot be made is reported instead (the superseded
    /// version could come back at the next open).
    fn follow_moved(
        &self,
        state: &mut State<S::File>,
        bytes: &[u8],
        follows: bool,
        outcome: ReplayOutcome,
    ) -> ReplayOutcome {
        if !follows {
            return outcome;
        }
        match self.move_to_active(state, bytes) {
            mismatch @ ReplayOutcome::Mismatch { .. } => mismatch,
            _ => outcome,
        }
    }

    /// Appends one commit log entry's records (`bytes`) at the end of the segment in
    /// `slot` and applies them, for [`replay`](Self::replay); `moved`: they go to the
    /// active segment rather than their own (their seqs join `State::moved`).
    fn append_replayed(
        &self,
        state: &mut State<S::File>,
        slot: u32,
        segment: &Segment<S::File>,
        bytes: &[u8],
        moved: bool,
    ) -> ReplayOutcome {
        let len = segment.file.len();
        if len + bytes.len() as u64 > u32::MAX as u64 {
            state.needs_repair = true;
            return ReplayOutcome::Mismatch { segment_len: len };
        }
        // check every record before changing anything
        let mut records = Vec::new();
        let mut at = 0usize;
        while at < bytes.len() {
            match record::decode(&bytes[at..]) {
                Ok(r) => {
                    records.push((at, r));
                    at += records.last().expect("just pushed").1.total_bytes();
                }
                Err(_) => {
                    state.needs_repair = true;
                    return ReplayOutcome::Mismatch { segment_len: len };
                }
            }
        }
        let base = segment.file.append(bytes);
        for (at, r) in &records {
            let loc = Loc {
                seq: r.header.seq,
                segment: slot,
                offset: (base + *at as u64) as u32,
                len: r.total_bytes() as u32,
                flags: if r.header.is_tombstone() {
                    LOC_TOMBSTONE
                } else {
                    0
                },
            };
            state.next_seq = state.next_seq.max(r.header.seq.saturating_add(1));
            let replaced: SmallVec<[u64; 4]> = r.replaced().collect();
            state.apply(r.key, loc, &replaced);
            if moved {
                state.moved.insert(r.header.seq);
            }
        }
        let mut replayed = self.replayed.borrow_mut();
        if !replayed.contains(&segment.id) {
            replayed.push(segment.id);
        }
        ReplayOutcome::Applied {
            records: records.len(),
        }
    }

    /// Writes the active segment's buffered bytes to the device (no sync) once they
    /// reach `buffer_bytes_max`; with a commit log, writers leave this to the runtime's
    /// background work. Returns whether it flushed.
    pub async fn flush_if_buffered(&self) -> Result<bool, StoreError> {
        let segment = {
            let state = self.state.borrow();
            if state.failed.is_some() || state.closed {
                return Ok(false);
            }
            state.segment(state.active).clone()
        };
        if segment.file.buffered_bytes() < self.config.buffer_bytes_max || segment.io_busy.get() {
            return Ok(false);
        }
        self.file_io(&segment, false).await?;
        Ok(true)
    }

    /// Syncs the segments [`replay`](Self::replay) appended to. Returns how many.
    pub async fn finish_replay(&self) -> Result<usize, StoreError> {
        {
            let mut state = self.state.borrow_mut();
            state.damaged.clear();
            state.moved.clear();
        }
        let ids = std::mem::take(&mut *self.replayed.borrow_mut());
        for id in &ids {
            let segment = {
                let state = self.state.borrow();
                match state.order.get(id) {
                    Some(&slot) => state.segment(slot).clone(),
                    None => continue,
                }
            };
            if segment.sealed.get() {
                // as `seal` does: truncate syncs, and cuts the O_DIRECT padding that a
                // plain sync would leave after the new tail (the hint describes the
                // segment's real length, and padding would fail it on every open)
                self.truncate_sealed(&segment).await?;
            } else if segment.durable_len.get() < segment.file.len() {
                self.file_io(&segment, true).await?;
            }
        }
        Ok(ids.len())
    }

    /// Runs one flush (or sync) of a segment's buffered bytes, taking turns with
    /// other I/O on the same file. A failed sync fails the partition.
    async fn file_io(&self, segment: &Rc<Segment<S::File>>, sync: bool) -> Result<(), StoreError> {
        let turn = Turn::wait(&segment.io_busy, &segment.io_done).await;
        let target = segment.file.len();
        let result = if sync {
            segment.file.sync().await
        } else {
            segment.file.flush().await
        };
        let outcome = match result {
            Ok(()) => {
                if sync {
                    segment
                        .durable_len
                        .set(segment.durable_len.get().max(target));
                    self.state.borrow_mut().syncs += 1;
                }
                Ok(())
            }
            Err(err) => Err(self.fail(err)),
        };
        drop(turn);
        outcome
    }

    /// Like [`fail`](Self::fail) for any error on a path that must not stop halfway.
    fn fail_with(&self, err: StoreError) -> StoreError {
        match err {
            StoreError::Io(io) => self.fail(io),
            StoreError::Failed(msg) => StoreError::Failed(msg),
            other => {
                let mut state = self.state.borrow_mut();
                if state.failed.is_none() {
                    state.failed = Some(other.to_string());
                }
                StoreError::Failed(other.to_string())
            }
        }
    }

    /// Records an I/O failure: from now on the partition refuses writes.
    fn fail(&self, err: io::Error) -> StoreError {
        let mut state = self.state.borrow_mut();
        if state.failed.is_none() {
            state.failed = Some(err.to_string());
        }
        StoreError::Failed(state.failed.clone().expect("just set"))
    }

    /// The segments still being appended to (or not yet sealed), unless the partition
    /// has failed.
    fn unsealed_segments(&self) -> Result<Vec<Rc<Segment<S::File>>>, StoreError> {
        let state = self.state.borrow();
        if let Some(err) = &state.failed {
            return Err(StoreError::Failed(err.clone()));
        }
        Ok(state
            .slots
            .iter()
            .flatten()
            .filter(|s| !s.sealed.get())
            .cloned()
            .collect())
    }

    /// Makes every write so far durable (the `interval` mode's timer calls this).
    pub async fn sync(&self) -> Result<(), StoreError> {
        for segment in self.unsealed_segments()? {
            let end = segment.file.len();
            self.make_durable(&segment, end).await?;
        }
        Ok(())
    }

    /// Like [`sync`](Self::sync), but with this partition's own `fdatasync`s even when
    /// it shares a sync group: a commit log checkpoint syncs the shard's partitions one
    /// after another this way instead of with file-system-wide `syncfs`s, which also
    /// flush everything else on the file system and stall the log's own syncs.
    pub async fn sync_own(&self) -> Result<(), StoreError> {
        for segment in self.unsealed_segments()? {
            // one sync covers every byte appended before it starts
            if segment.durable_len.get() < segment.file.len() {
                self.file_io(&segment, true).await?;
            }
        }
        Ok(())
    }

    /// Seals the active segment and starts a new one.
    async fn roll(&self) -> Result<(), StoreError> {
        // cleared also when the roll is dropped half-way (its writer cancelled), or the
        // partition would never roll again
        struct ClearRolling<'a, S: Storage>(&'a Partition<S>);
        impl<S: Storage> Drop for ClearRolling<'_, S> {
            fn drop(&mut self) {
                self.0.state.borrow_mut().rolling = false;
            }
        }
        let _clear = ClearRolling(self);
        self.roll_inner().await
    }

    async fn roll_inner(&self) -> Result<(), StoreError> {
        let old_id = {
            let state = self.state.borrow();
            state.segment(state.active).id
        };
        let new_id = ((old_id >> SEGMENT_ID_SHIFT) + 1) << SEGMENT_ID_SHIFT;
        let new_slot = self.create_segment(new_id).await.map_err(|e| match e {
            StoreError::Io(io) => self.fail(io),
            other => other,
        })?;
        // the old active segment, and any an earlier roll dropped half-way left
        // unsealed (compaction takes sealed segments up to the first unsealed one)
        let unsealed: Vec<_> = {
            let mut state = self.state.borrow_mut();
            state.active = new_slot;
            state
                .order
                .values()
                .map(|&slot| state.segment(slot).clone())
                .filter(|seg| !seg.sealed.get() && seg.id != new_id)
                .collect()
        };
        for segment in unsealed {
            self.seal(&segment).await?;
        }
        Ok(())
    }

    /// Syncs a no-longer-active segment, cuts its padding and writes its hint.
    async fn seal(&self, segment: &Rc<Segment<S::File>>) -> Result<(), StoreError> {
        let end = segment.file.len();
        self.make_durable(segment, end).await?;
        self.truncate_sealed(segment).await?;
        // the hint (a read and scan of the whole segment) is left to background work
        // (`write_pending_hints`), off the writer's path; until it exists, opening the
        // partition scans this segment instead
        segment.sealed.set(true);
        Ok(())
    }

    /// Cuts a segment that takes no more appends to its length (the O_DIRECT padding
    /// of its last block goes) and syncs it.
    async fn truncate_sealed(&self, segment: &Rc<Segment<S::File>>) -> Result<(), StoreError> {
        let _turn = Turn::wait(&segment.io_busy, &segment.io_done).await;
        let end = segment.file.len();
        segment.file.truncate(end).await.map_err(|e| self.fail(e))?;
        segment.durable_len.set(segment.durable_len.get().max(end));
        Ok(())
    }

    /// Writes the hint file of every sealed segment that has none yet. The runtime
    /// calls this from its low-priority queue; `close` calls it too. Returns how many
    /// hints were written.
    pub async fn write_pending_hints(&self) -> Result<usize, StoreError> {
        // one writer at a time: hint files are written through a shared temp name
        let _turn = Turn::wait(&self.hints_busy, &self.hints_done).await;
        self.write_pending_hints_inner().await
    }

    async fn write_pending_hints_inner(&self) -> Result<usize, StoreError> {
        let pending: Vec<Rc<Segment<S::File>>> = {
            let state = self.state.borrow();
            state
                .slots
                .iter()
                .flatten()
                .filter(|s| s.sealed.get() && !s.hinted.get())
                .cloned()
                .collect()
        };
        let mut written = 0;
        let still_there = |id: u64| self.state.borrow().order.contains_key(&id);
        for segment in pending {
            if !still_there(segment.id) {
                continue; // compacted away meanwhile
            }
            let bytes = read_all(&segment.file, &self.storage).await?;
            let scan = segment::scan(&bytes, segment.id);
            let clean =
                scan.header_error.is_none() && scan.corrupt.is_empty() && scan.torn_tail.is_none();
            if clean && still_there(segment.id) {
                write_hint(&self.storage, segment.id, bytes.len() as u64, &scan.records).await?;
                written += 1;
            }
            // a damaged segment keeps being scanned (and reported) on open
            segment.hinted.set(true);
        }
        Ok(written)
    }

    /// Every live version of `key` (siblings and tombstones), each read from its log
    /// record and CRC-checked.
    pub async fn get(&self, key: &[u8]) -> Result<Vec<StoredVersion>, StoreError> {
        type Place<F> = (Loc, Rc<Segment<F>>);
        let places: SmallVec<[Place<S::File>; 2]> = {
            let state = self.state.borrow();
            match state.keydir.get(key) {
                None => return Ok(Vec::new()),
                Some(locs) => locs
                    .iter()
                    .map(|l| (*l, state.segment(l.segment).clone()))
                    .collect(),
            }
        };
        let mut out = Vec::with_capacity(places.len());
        for (loc, segment) in places {
            out.push(self.read_version(key, &loc, &segment).await?);
        }
        Ok(out)
    }

    /// [`Partition::get`] one version at a time: each is read and handed to `each`,
    /// then dropped before the next is read, so a caller that keeps only part of each
    /// (the version, not the value) holds one value at a time, not all of them.
    pub(crate) async fn for_each_version(
        &self,
        key: &[u8],
        mut each: impl FnMut(StoredVersion) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        type Place<F> = (Loc, Rc<Segment<F>>);
        let places: SmallVec<[Place<S::File>; 2]> = {
            let state = self.state.borrow();
            match state.keydir.get(key) {
                None => return Ok(()),
                Some(locs) => locs
                    .iter()
                    .map(|l| (*l, state.segment(l.segment).clone()))
                    .collect(),
            }
        };
        for (loc, segment) in places {
            each(self.read_version(key, &loc, &segment).await?)?;
        }
        Ok(())
    }

    /// The keydir entry of `key`: seqs and places of its live versions.
    pub fn versions(&self, key: &[u8]) -> SmallVec<[Loc; 2]> {
        self.state
            .borrow()
            .keydir
            .get(key)
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default()
    }

    /// [`Partition::get`] without waiting: `None` when a version of `key` is not in the
    /// record cache (then only `get`, which reads it from its segment, can answer).
    pub fn get_cached(&self, key: &[u8]) -> Option<Result<Vec<StoredVersion>, StoreError>> {
        self.read_cached(key, |records| records.iter().map(stored_version).collect())
    }

    /// Calls `f` with every live record of `key` (borrowed from the record cache, whose
    /// records were CRC-checked on their way in; nothing copied) when all of them are
    /// cached; `None`, without calling it, when one is not (then only
    /// [`Partition::get`] can answer). The server answers a cached read this way in the
    /// step that parsed it, without a task of its own.
    pub fn read_cached<T>(
        &self,
        key: &[u8],
        f: impl FnOnce(&[Record<'_>]) -> T,
    ) -> Option<Result<T, StoreError>> {
        type Found = (Loc, u64, Rc<[u8]>);
        let found: SmallVec<[Found; 2]> = {
            let state = self.state.borrow();
            let Some(locs) = state.keydir.get(key) else {
                return Some(Ok(f(&[])));
            };
            let mut cache = self.cache.borrow_mut();
            let mut found = SmallVec::new();
            for loc in locs {
                // a miss is counted by the `get` that follows, not here
                let bytes = cache.peek(loc.seq)?;
                found.push((*loc, state.segment(loc.segment).id, bytes));
            }
            cache.hits += found.len() as u64;
            found
        };
        let records: Result<SmallVec<[Record<'_>; 2]>, StoreError> = found
            .iter()
            .map(|(loc, segment, bytes)| self.check_record(key, loc, *segment, bytes, false))
            .collect();
        Some(records.map(|records| f(&records)))
    }

    async fn read_version(
        &self,
        key: &[u8],
        loc: &Loc,
        segment: &Segment<S::File>,
    ) -> Result<StoredVersion, StoreError> {
        let cached = self.cache.borrow_mut().get(loc.seq);
        let from_log = cached.is_none();
        let bytes: Rc<[u8]> = match cached {
            Some(b) => b,
            None => {
                let b: Rc<[u8]> = segment
                    .file
                    .read_at(loc.offset as u64, loc.len as usize)
                    .await?
                    .into();
                b
            }
        };
        let version = stored_version(&self.check_record(key, loc, segment.id, &bytes, from_log)?);
        if from_log {
            self.cache.borrow_mut().insert(loc.seq, &bytes);
        }
        Ok(version)
    }

    /// A record's bytes decoded, CRC-checked when `from_log` (bytes from the record
    /// cache were checked on their way in, or encoded here), and matched against the
    /// keydir entry that named them (a mismatch marks the partition for repair).
    fn check_record<'b>(
        &self,
        key: &[u8],
        loc: &Loc,
        segment: u64,
        bytes: &'b [u8],
        from_log: bool,
    ) -> Result<Record<'b>, StoreError> {
        let corrupt = |error: String| {
            self.state.borrow_mut().needs_repair = true;
            StoreError::Corrupt {
                segment,
                offset: loc.offset as u64,
                error,
            }
        };
        let decoded = if from_log {
            record::decode(bytes)
        } else {
            record::decode_verified(bytes)
        };
        let r = decoded.map_err(|e| corrupt(e.to_string()))?;
        if r.key != key || r.header.seq != loc.seq {
            return Err(corrupt("record does not match the keydir".into()));
        }
        Ok(r)
    }

    /// The keys with at least one version here (tombstones included), without a walk.
    pub fn key_count(&self) -> usize {
        self.state.borrow().keydir.len()
    }

    /// Calls `f` with every key and its live versions (keydir order).
    pub fn for_each_key(&self, mut f: impl FnMut(&[u8], &[Loc])) {
        let state = self.state.borrow();
        for (key, locs) in state.keydir.iter() {
            f(key, locs);
        }
    }

    pub fn stats(&self) -> PartitionStats {
        let mut stats = self.stats_without_memory();
        stats.keydir_heap_bytes = self.state.borrow().keydir.heap_bytes();
        stats
    }

    /// [`stats`](Self::stats) without `keydir_heap_bytes` (0 here), which takes a pass
    /// over every key: this one costs O(segments) and may run on a serving shard.
    pub fn stats_without_memory(&self) -> PartitionStats {
        let state = self.state.borrow();
        let segments: Vec<_> = state.slots.iter().flatten().collect();
        PartitionStats {
            keys: state.keydir.len(),
            versions: state.keydir.version_count(),
            segments: segments.len(),
            bytes: segments.iter().map(|s| s.file.len()).sum(),
            dead_bytes: segments.iter().map(|s| s.dead_bytes.get()).sum(),
            syncs: state.syncs,
            writes: state.writes,
            keydir_heap_bytes: 0,
            needs_repair: state.needs_repair,
            epoch: state.epoch,
            clock_truncations: state.clock_truncations,
            clock_entries_truncated: state.clock_entries_truncated,
        }
    }

    /// Whether compaction would reclaim at least `min_dead_ratio` of the sealed bytes.
    pub fn compaction_due(&self, min_dead_ratio: f64) -> bool {
        self.compaction_due_keeping(min_dead_ratio, &|_| false)
    }

    /// [`Partition::compaction_due`] for [`Partition::compact_keeping`] with the same
    /// `keep`: the tombstones it keeps are not counted as reclaimable (with no grace
    /// period they would be, and compaction would run again and again for nothing).
    pub fn compaction_due_keeping(
        &self,
        min_dead_ratio: f64,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> bool {
        let state = self.state.borrow();
        let (mut total, mut dead) = (0u64, 0u64);
        for s in state.slots.iter().flatten().filter(|s| s.sealed.get()) {
            total += s.file.len();
            dead += s.dead_bytes.get();
        }
        let due = |dead: u64| total > 0 && dead as f64 >= min_dead_ratio * total as f64;
        if !due(dead) && self.config.tombstone_grace_ms == 0 {
            // With no grace period (the hint store: a delivered hint leaves a tombstone)
            // compaction drops every tombstone that is its key's only version, so they
            // count as dead; without them a store of hints written and delivered once
            // each stays under half dead and grows for good. (With a grace period they
            // are dropped only once old enough: not counted.)
            for (key, locs) in state.keydir.iter() {
                if let [only] = locs {
                    if only.is_tombstone() && state.segment(only.segment).sealed.get() && !keep(key)
                    {
                        dead += only.len as u64;
                    }
                }
            }
        }
        due(dead)
    }

    /// Compacts every sealed segment into new ones holding only live versions,
    /// dropping tombstones older than the grace period that are their key's only
    /// version. Crash-safe at every step: the output is complete and durable before
    /// any source is removed, and replaying sources and output together is the same
    /// log. Yields often; run it in a low-priority task queue.
    pub async fn compact(&self, now_ms: u64) -> Result<CompactionReport, StoreError> {
        self.compact_keeping(now_ms, &|_| false).await
    }

    /// [`Partition::compact`], keeping the expired tombstones of the keys `keep` names
    /// (a delete that a pending hint still has to hand to a replica that missed it:
    /// dropped before its delivery, the replica would keep the deleted value).
    pub async fn compact_keeping(
        &self,
        now_ms: u64,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<CompactionReport, StoreError> {
        {
            let mut state = self.state.borrow_mut();
            if let Some(err) = &state.failed {
                return Err(StoreError::Failed(err.clone()));
            }
            if state.closed {
                return Err(StoreError::Closed);
            }
            if state.compacting {
                return Ok(CompactionReport::default());
            }
            state.compacting = true;
        }
        let result = self.compact_inner(now_ms, keep).await;
        if result.is_err() && self.state.borrow().failed.is_none() {
            // failed before its output became visible (out of space, say): the output
            // files would hold that space until the next open
            self.remove_compaction_leftovers().await;
        }
        self.state.borrow_mut().compacting = false;
        result
    }

    /// Removes the files of a compaction that failed before its renames: its output
    /// segments (`*.seg.tmp`) and the hint files already written for them.
    async fn remove_compaction_leftovers(&self) {
        let Ok(names) = self.storage.list().await else {
            return;
        };
        for name in &names {
            let Some(stem) = name.strip_suffix(".tmp") else {
                continue;
            };
            let Some((id, "seg")) = segment::parse_name(stem) else {
                continue;
            };
            let _ = self.storage.remove(name).await;
            if !names.contains(&segment::segment_name(id)) {
                let _ = self.storage.remove(&segment::hint_name(id)).await;
            }
        }
    }

    async fn compact_inner(
        &self,
        now_ms: u64,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<CompactionReport, StoreError> {
        let mut report = CompactionReport::default();
        // the sources: every sealed segment, which is always a prefix of the log
        let sources: Vec<(u32, Rc<Segment<S::File>>)> = {
            let state = self.state.borrow();
            let mut prefix = Vec::new();
            for (_, &slot) in state.order.iter() {
                let seg = state.segment(slot);
                if !seg.sealed.get() {
                    break;
                }
                prefix.push((slot, seg.clone()));
            }
            prefix
        };
        if sources.is_empty() {
            return Ok(report);
        }
        let last_source_id = sources.last().expect("non-empty").1.id;
        let grace = self.config.tombstone_grace_ms;

        // (output index, offset in output, source slot, source offset, key, seq, loc len, flags)
        struct Kept {
            out: usize,
            out_offset: u64,
            from: (u32, u32),
            key: Vec<u8>,
            seq: u64,
            len: u32,
            flags: u32,
        }
        let mut kept: Vec<Kept> = Vec::new();
        let mut dropped_tombstones: Vec<(Vec<u8>, u64, (u32, u32))> = Vec::new();
        let mut outputs: Vec<(u64, S::File)> = Vec::new();
        let mut out_records: Vec<Vec<Scanned>> = Vec::new();
        for (slot, seg) in &sources {
            let bytes = read_all(&seg.file, &self.storage).await?;
            report.bytes_in += bytes.len() as u64;
            report.segments_in += 1;
            let scan = segment::scan(&bytes, seg.id);
            if scan.header_error.is_some() || !scan.corrupt.is_empty() || scan.torn_tail.is_some() {
                // A sealed segment went bad after it was opened: its live records cannot
                // all be copied. Keep everything as it is and report it (`compact`
                // removes the output begun so far).
                self.state.borrow_mut().needs_repair = true;
                return Err(StoreError::Corrupt {
                    segment: seg.id,
                    offset: scan
                        .corrupt
                        .first()
                        .map(|b| b.start)
                        .or(scan.torn_tail.as_ref().map(|b| b.start))
                        .unwrap_or(0),
                    error: "compaction found a damaged sealed segment; partition needs repair"
                        .into(),
                });
            }
            for rec in scan.records {
                self.storage.yield_now().await;
                let len = rec.header.total_bytes() as u32;
                let from = (*slot, rec.offset as u32);
                let (live, sole_expired_tombstone) = {
                    let state = self.state.borrow();
                    match state.keydir.get(&rec.key) {
                        Some(locs) => {
                            let live = locs
                                .iter()
                                .any(|l| l.seq == rec.header.seq && (l.segment, l.offset) == from);
                            // no grace period: every sole tombstone goes (whatever the
                            // clock says), as compaction_due counts them
                            let expired = rec.header.is_tombstone()
                                && locs.len() == 1
                                && (grace == 0
                                    || now_ms.saturating_sub(rec.header.timestamp_ms) > grace);
                            (live, live && expired)
                        }
                        None => (false, false),
                    }
                };
                if !live {
                    report.records_dropped += 1;
                    continue;
                }
                let held = sole_expired_tombstone && keep(&rec.key);
                report.tombstones_held += u64::from(held);
                if sole_expired_tombstone && !held {
                    report.records_dropped += 1;
                    report.tombstones_dropped += 1;
                    dropped_tombstones.push((rec.key, rec.header.seq, from));
                    continue;
                }
                let need_new = match outputs.last() {
                    None => true,
                    Some((_, f)) => f.len() + len as u64 > self.config.segment_bytes_max,
                };
                if need_new {
                    let id = last_source_id
                        .checked_add(1 + outputs.len() as u64)
                        .filter(|id| id >> SEGMENT_ID_SHIFT == last_source_id >> SEGMENT_ID_SHIFT);
                    // ids climb by one per compaction between roll-overs: only a segment
                    // file renamed by hand (or a corrupt name) gets here; compaction of
                    // this partition stops with the reason, nothing is lost
                    let Some(id) = id else {
                        return Err(StoreError::Io(io::Error::other(format!(
                            "compaction output ids exhausted the gap after segment \
                             {last_source_id:#x} (a segment file name out of sequence?)"
                        ))));
                    };
                    let file = self
                        .storage
                        .create(&format!("{}.tmp", segment::segment_name(id)))
                        .await?;
                    file.append(&segment::encode_segment_header(id, self.config.partition));
                    outputs.push((id, file));
                    out_records.push(Vec::new());
                }
                let out = outputs.len() - 1;
                let start = rec.offset as usize;
                let mut copy = bytes[start..start + len as usize].to_vec();
                record::end_batch_in_place(&mut copy);
                let out_offset = outputs[out].1.append(&copy);
                let mut header = rec.header;
                header.flags &= !record::FLAG_BATCH_CONTINUES;
                out_records[out].push(Scanned {
                    offset: out_offset,
                    header,
                    ..rec.clone()
                });
                kept.push(Kept {
                    out,
                    out_offset,
                    from,
                    key: rec.key,
                    seq: rec.header.seq,
                    len,
                    flags: if rec.header.is_tombstone() {
                        LOC_TOMBSTONE
                    } else {
                        0
                    },
                });
                report.records_kept += 1;
            }
        }
        // Versions were dropped because later records superseded them; those records
        // may still sit unsynced in the active segment. Make them durable first, or a
        // crash would lose both the superseded version and what superseded it.
        self.sync().await?;
        // make the output durable, then visible, before anything else changes
        for (i, (id, file)) in outputs.iter().enumerate() {
            // truncate syncs, and cuts the O_DIRECT padding of the last block
            file.truncate(file.len()).await?;
            report.bytes_out += file.len();
            write_hint(&self.storage, *id, file.len(), &out_records[i]).await?;
        }
        // From the first rename on, files on disk and the keydir must not part ways: an
        // error fails the partition, and reopening rebuilds everything from the files.
        let made_visible = async {
            for (id, _) in &outputs {
                let name = segment::segment_name(*id);
                self.storage.rename(&format!("{name}.tmp"), &name).await?;
            }
            self.storage.sync_dir().await?;
            if !dropped_tombstones.is_empty() {
                // A reaped tombstone's dot is forgotten once the keydir swaps below;
                // every write this node coordinates afterwards must use a new epoch so
                // it never reuses that counter (the doomstone case).
                self.bump_epoch(now_ms).await?;
            }
            Ok::<(), StoreError>(())
        }
        .await;
        made_visible.map_err(|e| self.fail_with(e))?;
        report.segments_out = outputs.len();

        // swap the keydir over to the output, in one step
        {
            let mut state = self.state.borrow_mut();
            let mut out_slots = Vec::with_capacity(outputs.len());
            for (id, file) in outputs {
                let len = file.len();
                out_slots.push(state.add_slot(Segment {
                    id,
                    file,
                    sealed: Cell::new(true),
                    durable_len: Cell::new(len),
                    dead_bytes: Cell::new(0),
                    hinted: Cell::new(true),
                    io_busy: Cell::new(false),
                    io_done: Notify::default(),
                }));
            }
            for k in &kept {
                let to = Loc {
                    seq: k.seq,
                    segment: out_slots[k.out],
                    offset: k.out_offset as u32,
                    len: k.len,
                    flags: k.flags,
                };
                if !state.keydir.relocate(&k.key, k.seq, k.from, to) {
                    // superseded while compaction ran: dead in the output already
                    state.mark_dead(&to);
                }
            }
            for (key, seq, from) in &dropped_tombstones {
                // reaped even if a concurrent sibling arrived meanwhile (its record is
                // gone with the sources; it was past the grace period)
                let still_there = state.keydir.get(key).is_some_and(|locs| {
                    locs.iter()
                        .any(|l| l.seq == *seq && (l.segment, l.offset) == *from)
                });
                if still_there {
                    state.keydir.remove_seqs(key, &[*seq]);
                }
            }
            for (slot, seg) in &sources {
                state.order.remove(&seg.id);
                state.slots[*slot as usize] = None;
            }
            // every keydir entry now points at a live slot: check it (cheap next to
            // the compaction itself, and a broken keydir would serve wrong data)
            let mut dangling = 0usize;
            for (_, locs) in state.keydir.iter() {
                dangling += locs
                    .iter()
                    .filter(|l| {
                        state
                            .slots
                            .get(l.segment as usize)
                            .is_none_or(Option::is_none)
                    })
                    .count();
            }
            assert_eq!(
                dangling, 0,
                "compaction left keydir entries pointing at removed segments"
            );
        }
        // only now remove the sources, oldest first
        let removed = async {
            for (_, seg) in &sources {
                let _ = self.storage.remove(&segment::hint_name(seg.id)).await;
                self.storage.remove(&segment::segment_name(seg.id)).await?;
            }
            self.storage.sync_dir().await
        }
        .await;
        removed.map_err(|e| self.fail(e))?;
        Ok(report)
    }

    /// Syncs everything and records a clean shutdown (the next open keeps the epoch).
    /// Writes are refused from the moment it starts (a write accepted while its sync or
    /// its hint files are under way would be covered by neither, though the runtime
    /// deletes the commit log once every partition closed); reads still work.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.state.borrow_mut().closed = true;
        self.sync().await?;
        self.write_pending_hints().await?;
        self.persist_epoch(None, true).await?;
        Ok(())
    }

    /// Removes the whole partition from disk (the node no longer owns it).
    pub async fn destroy(self) -> Result<(), StoreError> {
        let Self { storage, state, .. } = self;
        drop(state);
        storage.destroy().await?;
        Ok(())
    }
}

/// Whether a record of the commit log entry `bytes` supersedes one of `seqs`.
fn supersedes_any(bytes: &[u8], seqs: &std::collections::HashSet<u64>) -> bool {
    let mut at = 0usize;
    // each pass consumes one whole record
    while at < bytes.len() {
        let Ok(r) = record::decode(&bytes[at..]) else {
            return false;
        };
        if r.replaced().any(|s| seqs.contains(&s)) {
            return true;
        }
        at += r.total_bytes();
    }
    false
}

/// What [`Partition::replay`] did with one commit log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    Applied {
        records: usize,
    },
    /// Already in the segment.
    Present,
    /// The segment is gone (compacted away after its records were durable).
    SegmentGone,
    /// The entry does not fit the segment (a gap, a partial overlap, or records that
    /// fail their checks): the partition needs repair; nothing was changed.
    Mismatch {
        segment_len: u64,
    },
}

/// Holds a key for one versioned write (see [`Partition::lock_key`]).
pub struct KeyGuard<'a, S: Storage> {
    partition: &'a Partition<S>,
    key: Box<[u8]>,
}

impl<S: Storage> Drop for KeyGuard<'_, S> {
    fn drop(&mut self) {
        self.partition.key_locks.borrow_mut().remove(&self.key);
        self.partition.key_unlocked.notify_all();
    }
}

async fn read_all<S: Storage>(file: &S::File, storage: &S) -> Result<Vec<u8>, StoreError> {
    let len = file.len() as usize;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(SCAN_CHUNK_BYTES);
        out.extend_from_slice(&file.read_at(out.len() as u64, n).await?);
        storage.yield_now().await;
    }
    Ok(out)
}

/// Writes a hint durably: temp file, sync, rename, folder sync.
async fn write_hint<S: Storage>(
    storage: &S,
    id: u64,
    segment_len: u64,
    records: &[Scanned],
) -> Result<(), StoreError> {
    let name = segment::hint_name(id);
    let tmp = format!("{name}.tmp");
    let file = storage.create(&tmp).await?;
    file.append(&segment::encode_hint(id, segment_len, records));
    // truncate (which syncs) rather than sync: O_DIRECT pads the last block
    file.truncate(file.len()).await?;
    storage.rename(&tmp, &name).await?;
    storage.sync_dir().await?;
    Ok(())
}

const EPOCH_FILE_BYTES: usize = 20;
const EPOCH_FLAG_CLEAN: u32 = 1;

/// Reads `EPOCH`: the epoch, and whether the partition was closed cleanly.
async fn read_epoch<S: Storage>(storage: &S) -> Result<Option<(u32, bool)>, StoreError> {
    let file = match storage.open(EPOCH_FILE).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let len = file.len() as usize;
    let bytes = file.read_at(0, len.min(EPOCH_FILE_BYTES)).await?;
    if bytes.len() == EPOCH_FILE_BYTES && &bytes[0..8] == EPOCH_MAGIC {
        let epoch = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        if crc == crc32fast::hash(&bytes[0..16]) {
            return Ok(Some((epoch, flags & EPOCH_FLAG_CLEAN != 0)));
        }
    }
    // an unreadable epoch counts as lost: a fresh one will be chosen
    Ok(None)
}

/// `EPOCH`: magic "RKVEPCH1" | u32 epoch | u32 flags (bit 0: closed cleanly) |
/// u32 CRC32 of the first 16 bytes.
async fn write_epoch<S: Storage>(storage: &S, epoch: u32, clean: bool) -> Result<(), StoreError> {
    let mut bytes = Vec::with_capacity(EPOCH_FILE_BYTES);
    bytes.extend_from_slice(EPOCH_MAGIC);
    bytes.extend_from_slice(&epoch.to_le_bytes());
    let flags = if clean { EPOCH_FLAG_CLEAN } else { 0 };
    bytes.extend_from_slice(&flags.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let tmp = format!("{EPOCH_FILE}.tmp");
    let file = storage.create(&tmp).await?;
    file.append(&bytes);
    file.truncate(file.len()).await?;
    storage.rename(&tmp, EPOCH_FILE).await?;
    storage.sync_dir().await?;
    Ok(())
}

/// An owned copy of a record's version and value.
fn stored_version(r: &Record<'_>) -> StoredVersion {
    StoredVersion {
        seq: r.header.seq,
        timestamp_ms: r.header.timestamp_ms,
        version: r.version.to_vec(),
        value: r.value.map(<[u8]>::to_vec),
    }
}

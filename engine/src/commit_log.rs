//! The shard's commit log: one append and one `fdatasync` make a batch of writes to
//! many partitions durable.
//!
//! In `sync` mode without it, each partition must make its own segment durable before
//! acknowledging: a flush per partition plus one device flush for all of them, and
//! the segment appends grow their files, so every sync also commits file-system
//! metadata. With it, a write appends its encoded records to its partition's segment
//! buffer (as before) *and* to this log, then waits for the log's group commit: one
//! `O_DIRECT` write and one `fdatasync` of one file per batch. The log's files are
//! zero-filled when created, so those writes overwrite allocated blocks and the sync
//! flushes data only. Segments reach the device behind it (when their buffers fill,
//! at roll-over, at checkpoints).
//!
//! **Files.** `GGGGGGGGGGGGGGGG.clog`, by generation. A file that reaches
//! `file_bytes_max` is rotated out by the next group commit and *retired*: its entries
//! may still be only in the log. A [`CommitLog::checkpoint`] makes every partition's
//! segments durable, then removes the retired files.
//!
//! **Entries** (little-endian): `crc32 u32` (of everything after it) · `payload_len
//! u32` · `generation u64` · `log_id u64` (the partition) · `segment u64` · `offset
//! u64` (where the payload starts in that segment) · the payload, which is exactly the
//! bytes appended to the segment there: whole records of one write batch. A file is
//! read front to back until the first entry that is zero, torn, of another
//! generation, or fails its CRC; every acknowledged entry is before that point unless
//! synced bytes were damaged: a valid entry further on then means corruption, which
//! is skipped and reported, and reading goes on (see [`decode_entries`]).
//!
//! **Recovery.** [`CommitLog::open`] returns the entries of every file in order. The
//! runtime opens the partitions first (which cut unsynced segment tails), then hands
//! each entry to [`Partition::replay`](crate::Partition::replay): an entry already in
//! its segment is skipped, one that starts exactly at the segment's end is appended
//! back; the segments are synced and the old files retired. Replay is idempotent: a
//! crash during it replays again.

use crate::notify::Notify;
use crate::storage::{Storage, StorageFile};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::rc::Rc;

pub const ENTRY_HEADER_BYTES: usize = 40;
const SUFFIX: &str = ".clog";
/// Zero-filled room past `file_bytes_max`: a file rotates at the group commit after it
/// fills, so appends may run a little past the limit.
const FILE_SLACK_BYTES: u64 = 1 << 20;
const READ_CHUNK_BYTES: u64 = 4 << 20;

pub fn file_name(generation: u64) -> String {
    format!("{generation:016x}{SUFFIX}")
}

/// The generation of a commit log file name (`GGGGGGGGGGGGGGGG.clog`).
pub fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(SUFFIX)?;
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// One entry read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub log_id: u64,
    pub segment: u64,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// What [`CommitLog::open`] found.
#[derive(Debug, Default)]
pub struct LogRecovery {
    /// Files read (every one is retired: the first checkpoint removes it).
    pub files: usize,
    /// Valid entries, in log order.
    pub entries: Vec<Entry>,
    /// Non-zero bytes after the last valid entry of a file (a torn or unsynced group
    /// commit: never acknowledged).
    pub torn_bytes: u64,
    /// Bytes between valid entries (damage to synced entries: acknowledged writes in
    /// them are lost from the log) and in how many places; see [`decode_entries`].
    pub corrupt_bytes: u64,
    pub corrupt_regions: usize,
}

fn entry_header(
    generation: u64,
    log_id: u64,
    segment: u64,
    offset: u64,
    payload: &[u8],
) -> [u8; 40] {
    let mut h = [0u8; ENTRY_HEADER_BYTES];
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    h[16..24].copy_from_slice(&log_id.to_le_bytes());
    h[24..32].copy_from_slice(&segment.to_le_bytes());
    h[32..40].copy_from_slice(&offset.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[4..]);
    crc.update(payload);
    h[0..4].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// What [`decode_entries`] read from one file.
#[derive(Debug, Default)]
pub struct Decoded {
    pub entries: Vec<Entry>,
    /// End of the last valid entry: what follows is a torn or unsynced group commit,
    /// or the zero fill.
    pub end: usize,
    /// Non-zero bytes after `end` (a torn or unsynced group commit: never
    /// acknowledged).
    pub torn_bytes: usize,
    /// Bytes skipped between valid entries, and in how many places: damage inside the
    /// part of the log that was synced (a group commit is written only after the one
    /// before it is durable, so a torn write can only be last).
    pub corrupt_bytes: usize,
    pub corrupt_regions: usize,
}

/// Decodes the entries of one file's bytes. An entry that is not valid (zero, torn, of
/// another generation, failing its CRC) ends the log unless a valid entry follows
/// somewhere after it: then the bytes in between are counted as corrupt and decoding
/// goes on from there, so one damaged block does not hide every later acknowledged
/// write. Never panics on any input.
pub fn decode_entries(bytes: &[u8], generation: u64) -> Decoded {
    let mut out = Decoded::default();
    let mut at = 0usize;
    loop {
        if let Some(len) = valid_entry_len(bytes, at, generation) {
            let h = &bytes[at..at + ENTRY_HEADER_BYTES];
            out.entries.push(Entry {
                log_id: u64_at(h, 16),
                segment: u64_at(h, 24),
                offset: u64_at(h, 32),
                bytes: bytes[at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + len].to_vec(),
            });
            at += ENTRY_HEADER_BYTES + len;
            out.end = at;
            continue;
        }
        let last_start = bytes.len().saturating_sub(ENTRY_HEADER_BYTES);
        match (at + 1..=last_start).find(|&j| valid_entry_len(bytes, j, generation).is_some()) {
            Some(next) => {
                out.corrupt_bytes += next - at;
                out.corrupt_regions += 1;
                at = next;
            }
            None => {
                out.torn_bytes = bytes[out.end..].iter().filter(|&&b| b != 0).count();
                return out;
            }
        }
    }
}

/// The payload length of the valid entry of `generation` starting at `at`, if one does.
fn valid_entry_len(bytes: &[u8], at: usize, generation: u64) -> Option<usize> {
    if bytes.len().saturating_sub(at) < ENTRY_HEADER_BYTES {
        return None;
    }
    let h = &bytes[at..at + ENTRY_HEADER_BYTES];
    let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
    if len == 0 || u64_at(h, 8) != generation || bytes.len() - at - ENTRY_HEADER_BYTES < len {
        return None;
    }
    let payload = &bytes[at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + len];
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[4..]);
    crc.update(payload);
    (crc.finalize() == u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"))).then_some(len)
}

struct LogState<F> {
    file: Rc<F>,
    generation: u64,
    /// A zero-filled file made ahead of the next rotation.
    spare: Option<(u64, F)>,
    /// Full files whose entries may not be in durable segments yet.
    retired: Vec<u64>,
    /// Bytes appended since open (over all files): a write's position.
    appended: u64,
    /// Every byte up to here is durable.
    durable: u64,
    failed: Option<String>,
    /// A group commit is running.
    busy: bool,
    rotate_due: bool,
    syncs: u64,
    /// How long each group commit took (ns), rotations included.
    sync_latency: hdrhistogram::Histogram<u64>,
}

/// A shard's commit log (see the module documentation).
pub struct CommitLog<S: Storage> {
    storage: S,
    file_bytes_max: u64,
    state: RefCell<LogState<S::File>>,
    done: Notify,
    checkpointing: Cell<bool>,
    /// A file is being made (a spare ahead of time, or by a rotation that found none):
    /// one at a time, so two never create and fill the same file.
    creating: Cell<bool>,
    created: Notify,
}

impl<S: Storage> std::fmt::Debug for CommitLog<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.borrow();
        f.debug_struct("CommitLog")
            .field("generation", &st.generation)
            .field("appended", &st.appended)
            .field("durable", &st.durable)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> CommitLog<S> {
    /// Opens the log folder: reads every file's entries for replay (all of them are
    /// retired) and starts a new file.
    pub async fn open(storage: S, file_bytes_max: u64) -> io::Result<(Self, LogRecovery)> {
        let mut recovery = LogRecovery::default();
        let mut generations = Vec::new();
        for name in storage.list().await? {
            if name.ends_with(".tmp") {
                storage.remove(&name).await?;
            } else if let Some(g) = parse_name(&name) {
                generations.push(g);
            }
        }
        generations.sort_unstable();
        for &g in &generations {
            let file = storage.open(&file_name(g)).await?;
            let len = file.len();
            let mut bytes = Vec::with_capacity(len as usize);
            let mut at = 0u64;
            while at < len {
                let n = READ_CHUNK_BYTES.min(len - at);
                bytes.extend_from_slice(&file.read_at(at, n as usize).await?);
                at += n;
                storage.yield_now().await;
            }
            let decoded = decode_entries(&bytes, g);
            recovery.torn_bytes += decoded.torn_bytes as u64;
            recovery.corrupt_bytes += decoded.corrupt_bytes as u64;
            recovery.corrupt_regions += decoded.corrupt_regions;
            recovery.entries.extend(decoded.entries);
            recovery.files += 1;
        }
        let generation = generations.last().map_or(1, |g| g + 1);
        let file = create_zeroed(&storage, generation, file_bytes_max).await?;
        storage.sync_dir().await?;
        let log = Self {
            storage,
            file_bytes_max,
            state: RefCell::new(LogState {
                file: Rc::new(file),
                generation,
                spare: None,
                retired: generations,
                appended: 0,
                durable: 0,
                failed: None,
                busy: false,
                rotate_due: false,
                syncs: 0,
                sync_latency: ringkv_net::stats::latency_histogram(),
            }),
            done: Notify::default(),
            checkpointing: Cell::new(false),
            creating: Cell::new(false),
            created: Notify::default(),
        };
        Ok((log, recovery))
    }

    /// Buffers one entry: `payload` was appended to segment `segment` of partition
    /// `log_id` at `offset`. Returns the position to pass to [`wait_durable`](Self::wait_durable).
    pub fn append(&self, log_id: u64, segment: u64, offset: u64, payload: &[u8]) -> u64 {
        let mut st = self.state.borrow_mut();
        let header = entry_header(st.generation, log_id, segment, offset, payload);
        st.file.append(&header);
        st.file.append(payload);
        st.appended += (ENTRY_HEADER_BYTES + payload.len()) as u64;
        if st.file.len() >= self.file_bytes_max {
            st.rotate_due = true;
        }
        st.appended
    }

    /// Returns once every entry up to `position` is durable, leading a group commit
    /// when none is running. A failed sync fails the log for good (like a partition).
    pub async fn wait_durable(&self, position: u64) -> io::Result<()> {
        loop {
            let lead = {
                let mut st = self.state.borrow_mut();
                // before the failure: what was durable stays so (see `remove_all`)
                if st.durable >= position {
                    return Ok(());
                }
                if let Some(err) = &st.failed {
                    return Err(io::Error::other(format!("commit log failed: {err}")));
                }
                if st.busy {
                    None
                } else {
                    st.busy = true;
                    Some((st.file.clone(), st.appended, st.rotate_due))
                }
            };
            let Some((file, target, rotate)) = lead else {
                self.done.wait().await;
                continue;
            };
            // hands the lead back even if this future is dropped mid-sync
            let lead = Lead(self, rotate);
            let started = std::time::Instant::now();
            let result = if rotate {
                self.rotate().await
            } else {
                file.sync().await.map(|()| target)
            };
            std::mem::forget(lead);
            let mut st = self.state.borrow_mut();
            st.busy = false;
            match result {
                Ok(durable) => {
                    st.durable = st.durable.max(durable);
                    st.syncs += 1;
                    ringkv_net::stats::record_latency(&mut st.sync_latency, started.elapsed());
                }
                Err(e) => {
                    st.failed.get_or_insert_with(|| e.to_string());
                }
            }
            drop(st);
            self.done.notify_all();
        }
    }

    /// Switches to a new file and syncs the old one whole: returns the position up to
    /// which everything is then durable.
    async fn rotate(&self) -> io::Result<u64> {
        // a spare being made is the file this rotation needs: wait for it
        while self.creating.get() {
            self.created.wait().await;
        }
        let spare = self.state.borrow_mut().spare.take();
        let next = self.state.borrow().generation + 1;
        let file = match spare {
            Some((g, file)) if g == next => file,
            _ => {
                let _creating = Running::start(&self.creating, Some(&self.created));
                let file = create_zeroed(&self.storage, next, self.file_bytes_max).await?;
                self.storage.sync_dir().await?;
                file
            }
        };
        let (old, old_generation, target) = {
            let mut st = self.state.borrow_mut();
            let old = std::mem::replace(&mut st.file, Rc::new(file));
            let old_generation = std::mem::replace(&mut st.generation, next);
            st.rotate_due = false;
            (old, old_generation, st.appended)
        };
        old.sync().await?;
        self.state.borrow_mut().retired.push(old_generation);
        Ok(target)
    }

    /// Makes the next file ahead of time once the current one is half full (the
    /// runtime calls this off the write path), so that a rotation does not wait for
    /// zero-filling. Returns whether it made one (not when none is due yet, one is
    /// ready, or one is being made).
    pub async fn prepare_spare(&self) -> io::Result<bool> {
        if self.creating.get() {
            return Ok(false);
        }
        let next = {
            let st = self.state.borrow();
            let next = st.generation + 1;
            if st.spare.as_ref().map(|(g, _)| *g) == Some(next)
                || st.file.len() < self.file_bytes_max / 2
            {
                return Ok(false);
            }
            next
        };
        let _creating = Running::start(&self.creating, Some(&self.created));
        let file = create_zeroed(&self.storage, next, self.file_bytes_max).await?;
        self.storage.sync_dir().await?;
        let mut st = self.state.borrow_mut();
        if st.generation + 1 == next {
            st.spare = Some((next, file));
        }
        Ok(true)
    }

    /// Files waiting for a checkpoint.
    pub fn checkpoint_due(&self) -> bool {
        !self.state.borrow().retired.is_empty()
    }

    /// Makes the partitions durable (`sync_partitions` syncs every partition using
    /// this log), then removes the retired files: their entries are then in durable
    /// segments. Returns how many files were removed (0 when another checkpoint is
    /// running or none is due).
    pub async fn checkpoint<F, Fut>(&self, sync_partitions: F) -> io::Result<usize>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<()>>,
    {
        if self.checkpointing.get() {
            return Ok(0);
        }
        let generations = self.state.borrow().retired.clone();
        if generations.is_empty() {
            return Ok(0);
        }
        let _checkpointing = Running::start(&self.checkpointing, None);
        let result = async {
            // every entry of a retired file was appended to its segment before the
            // file retired, so before this sync starts
            sync_partitions().await?;
            for g in &generations {
                self.remove_file(*g).await?;
            }
            self.storage.sync_dir().await
        }
        .await;
        result?;
        self.state
            .borrow_mut()
            .retired
            .retain(|g| !generations.contains(g));
        Ok(generations.len())
    }

    /// Retires the current file at once (the next group commit starts a new one), so a
    /// checkpoint after this covers every entry written so far.
    pub fn rotate_soon(&self) {
        self.state.borrow_mut().rotate_due = true;
    }

    /// Removes every file once all partitions using the log are closed (synced): a
    /// clean shutdown leaves nothing to replay. Every entry appended is then durable
    /// (in the partitions' synced files): a writer still waiting for one is told so,
    /// and no entry can be appended or waited for after this.
    pub async fn remove_all(&self) -> io::Result<()> {
        let (current, retired, spare) = {
            let mut st = self.state.borrow_mut();
            st.durable = st.durable.max(st.appended);
            st.failed.get_or_insert_with(|| "closed".to_string());
            self.done.notify_all();
            let spare = st.spare.take().map(|(g, _)| g);
            (st.generation, std::mem::take(&mut st.retired), spare)
        };
        for g in retired.iter().chain([current].iter()).chain(spare.iter()) {
            self.remove_file(*g).await?;
        }
        self.storage.sync_dir().await
    }

    /// Removes log file `generation`; one already gone counts as removed (a checkpoint
    /// that removed it and then failed, on its folder sync say, still lists it).
    async fn remove_file(&self, generation: u64) -> io::Result<()> {
        match self.storage.remove(&file_name(generation)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// One file-system-wide sync (`syncfs`) through the log's folder.
    pub async fn sync_filesystem(&self) -> io::Result<()> {
        self.storage.sync_filesystem().await
    }

    /// The position up to which every entry is durable.
    pub fn durable(&self) -> u64 {
        self.state.borrow().durable
    }

    /// Group commits run so far.
    pub fn syncs(&self) -> u64 {
        self.state.borrow().syncs
    }

    /// How long the group commits so far took (ns; see `ringkv_net::stats`).
    pub fn sync_latency(&self) -> hdrhistogram::Histogram<u64> {
        self.state.borrow().sync_latency.clone()
    }

    pub fn generation(&self) -> u64 {
        self.state.borrow().generation
    }

    /// Bytes appended since open.
    pub fn appended(&self) -> u64 {
        self.state.borrow().appended
    }

    pub fn failure(&self) -> Option<String> {
        self.state.borrow().failed.clone()
    }
}

/// The group-commit lead of a leader whose future was dropped mid-sync: frees it and
/// wakes the waiters, one of which leads next (a plain sync is simply run again: it
/// covers every earlier append in the one current file). A rotation cut short may have
/// switched files without syncing the old one, so then the log fails instead of
/// letting a later sync of the new file vouch for the old one's entries (the old file
/// stays on disk and is replayed at the next start).
/// Marks one kind of work (a checkpoint, a file creation) as running until dropped,
/// also when its future is dropped half-way; `done` is notified then.
struct Running<'a> {
    flag: &'a Cell<bool>,
    done: Option<&'a Notify>,
}

impl<'a> Running<'a> {
    fn start(flag: &'a Cell<bool>, done: Option<&'a Notify>) -> Self {
        debug_assert!(!flag.get(), "one at a time");
        flag.set(true);
        Running { flag, done }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.flag.set(false);
        if let Some(done) = self.done {
            done.notify_all();
        }
    }
}

struct Lead<'a, S: Storage>(&'a CommitLog<S>, bool);

impl<S: Storage> Drop for Lead<'_, S> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.try_borrow_mut() {
            st.busy = false;
            if self.1 {
                st.failed
                    .get_or_insert_with(|| "a log rotation was cancelled".to_string());
            }
        }
        self.0.done.notify_all();
    }
}

async fn create_zeroed<S: Storage>(
    storage: &S,
    generation: u64,
    bytes: u64,
) -> io::Result<S::File> {
    storage
        .create_zeroed(&file_name(generation), bytes + FILE_SLACK_BYTES)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_stop_at_damage() {
        let mut bytes = Vec::new();
        for (i, payload) in [&b"one"[..], b"two two", b"three"].iter().enumerate() {
            bytes.extend_from_slice(&entry_header(7, i as u64, 100, 40 * i as u64, payload));
            bytes.extend_from_slice(payload);
        }
        let Decoded { entries, end, .. } = decode_entries(&bytes, 7);
        assert_eq!(entries.len(), 3);
        assert_eq!(end, bytes.len());
        assert_eq!(entries[1].bytes, b"two two");
        assert_eq!((entries[2].log_id, entries[2].offset), (2, 80));
        // another generation's bytes (a reused file) end the log
        assert!(decode_entries(&bytes, 8).entries.is_empty());
        // zero padding ends it cleanly
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0; 100]);
        let decoded = decode_entries(&padded, 7);
        assert_eq!(decoded.entries.len(), 3);
        assert_eq!((decoded.end, decoded.corrupt_bytes), (bytes.len(), 0));
        // a flipped byte anywhere in the second entry: that entry is reported corrupt
        // and the third is still read
        let second = ENTRY_HEADER_BYTES + 3;
        let second_len = ENTRY_HEADER_BYTES + 7;
        for at in second..second + second_len {
            let mut bad = padded.clone();
            bad[at] ^= 0x10;
            let decoded = decode_entries(&bad, 7);
            let logs: Vec<u64> = decoded.entries.iter().map(|e| e.log_id).collect();
            assert_eq!(logs, vec![0, 2], "flip at {at}");
            assert_eq!(decoded.corrupt_bytes, second_len, "flip at {at}");
            assert_eq!(decoded.corrupt_regions, 1);
            assert_eq!(decoded.end, bytes.len());
        }
        // damage to the last entry is indistinguishable from a torn write: no corruption
        let mut torn = padded.clone();
        torn[bytes.len() - 1] ^= 1;
        let decoded = decode_entries(&torn, 7);
        assert_eq!((decoded.entries.len(), decoded.corrupt_bytes), (2, 0));
        // any cut keeps the whole entries before it
        for cut in 0..bytes.len() {
            let decoded = decode_entries(&bytes[..cut], 7);
            assert!(decoded.end <= cut);
            assert!(decoded.entries.len() <= 3);
        }
        assert_eq!(parse_name(&file_name(0xabc)), Some(0xabc));
        assert_eq!(parse_name("0000000000000abc.seg"), None);
    }
}

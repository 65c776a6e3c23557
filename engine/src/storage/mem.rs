//! In-memory storage that can crash, for model tests and the simulator.
//!
//! Each file keeps its durable bytes (what survived the last `sync`) apart from its
//! volatile bytes; the folder keeps a durable and a volatile listing (made durable by
//! `sync_dir`). [`MemDisk::crash`] drops everything volatile, except that a seeded
//! choice may keep a torn prefix of the unsynced tail (possibly with garbage in it).
//! [`MemDisk::flip_byte`] corrupts a byte; [`MemDisk::fail_syncs_after`] makes a
//! chosen `fdatasync` fail.

use super::{Storage, StorageFile};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

/// A file's bytes. The log only appends and truncates (truncation syncs), so what is
/// durable is always a prefix of the current content.
#[derive(Default, Debug)]
struct FileData {
    /// Current content: the durable prefix plus flushed-but-unsynced bytes.
    current: Vec<u8>,
    durable_len: usize,
}

#[derive(Default, Debug)]
struct DiskState {
    files: BTreeMap<u64, FileData>,
    /// folder path -> (name -> file id)
    durable_dirs: BTreeMap<String, BTreeMap<String, u64>>,
    dirs: BTreeMap<String, BTreeMap<String, u64>>,
    next_file_id: u64,
    syncs_until_failure: Option<u64>,
    sync_count: u64,
    /// `yield_now` and every file sync give other tasks a turn (interleaving tests).
    yielding: bool,
}

impl DiskState {
    fn check_sync(&mut self) -> io::Result<()> {
        self.sync_count += 1;
        match self.syncs_until_failure.as_mut() {
            Some(0) => Err(io::Error::other("injected fdatasync failure (EIO)")),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// A whole simulated disk, shared by every folder opened on it.
#[derive(Clone, Default, Debug)]
pub struct MemDisk {
    state: Rc<RefCell<DiskState>>,
}

impl MemDisk {
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens (creating if needed) a folder. A folder created here is durable only
    /// after a `sync_dir` on it.
    pub fn folder(&self, path: &str) -> MemStorage {
        self.state
            .borrow_mut()
            .dirs
            .entry(path.to_string())
            .or_default();
        MemStorage {
            disk: self.clone(),
            path: path.to_string(),
        }
    }

    pub fn folder_exists(&self, path: &str) -> bool {
        self.state.borrow().dirs.contains_key(path)
    }

    /// Simulates power loss. `seed` decides, per file, whether a torn prefix of the
    /// unsynced bytes survives and whether its last bytes are garbage.
    pub fn crash(&self, seed: u64) {
        let mut rng = SplitMix(seed);
        let mut state = self.state.borrow_mut();
        state.dirs = state.durable_dirs.clone();
        let live: std::collections::BTreeSet<u64> = state
            .dirs
            .values()
            .flat_map(|d| d.values().copied())
            .collect();
        state.files.retain(|id, _| live.contains(id));
        for file in state.files.values_mut() {
            let unsynced = file.current.len() - file.durable_len;
            let mut keep = 0;
            if unsynced > 0 && rng.next_u64() % 2 == 0 {
                keep = (rng.next_u64() % (unsynced as u64 + 1)) as usize;
            }
            file.current.truncate(file.durable_len + keep);
            if keep > 0 && rng.next_u64() % 3 == 0 {
                // a torn sector: the last few unsynced bytes hold garbage
                let garbage = (rng.next_u64() % 8 + 1) as usize;
                let n = file.current.len();
                let from = n.saturating_sub(garbage).max(file.durable_len);
                for b in &mut file.current[from..] {
                    *b = rng.next_u64() as u8;
                }
            }
            file.durable_len = file.current.len();
        }
        state.syncs_until_failure = None;
    }

    /// XORs `mask` into byte `offset` of a file, durably (a bit flip on the medium).
    pub fn flip_byte(&self, folder: &str, name: &str, offset: u64, mask: u8) -> bool {
        let mut state = self.state.borrow_mut();
        let Some(id) = state.dirs.get(folder).and_then(|d| d.get(name)).copied() else {
            return false;
        };
        let file = state.files.get_mut(&id).expect("listed file exists");
        let at = offset as usize;
        if at >= file.current.len() {
            return false;
        }
        file.current[at] ^= mask;
        true
    }

    /// Makes `yield_now` and every file sync yield once to other tasks, so tests can
    /// interleave foreground writes with background work deterministically.
    pub fn set_yielding(&self, yielding: bool) {
        self.state.borrow_mut().yielding = yielding;
    }

    fn yielding(&self) -> bool {
        self.state.borrow().yielding
    }

    /// The next `n` syncs succeed, every later one fails with an I/O error.
    pub fn fail_syncs_after(&self, n: u64) {
        self.state.borrow_mut().syncs_until_failure = Some(n);
    }

    pub fn sync_count(&self) -> u64 {
        self.state.borrow().sync_count
    }

    /// The durable length of a file, if it exists.
    pub fn file_len(&self, folder: &str, name: &str) -> Option<usize> {
        let state = self.state.borrow();
        let id = state.dirs.get(folder)?.get(name)?;
        Some(state.files[id].current.len())
    }
}

/// A small deterministic RNG (SplitMix64) for crash decisions.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[derive(Debug, Clone)]
pub struct MemStorage {
    disk: MemDisk,
    path: String,
}

impl MemStorage {
    fn file_id(&self, name: &str) -> io::Result<u64> {
        let state = self.disk.state.borrow();
        state
            .dirs
            .get(&self.path)
            .and_then(|d| d.get(name))
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no file {name}")))
    }
    fn handle(&self, id: u64) -> MemFile {
        let len = self.disk.state.borrow().files[&id].current.len() as u64;
        MemFile {
            disk: self.disk.clone(),
            id,
            inner: Rc::new(RefCell::new(MemFileBuf {
                flushed_len: len,
                buffer: Vec::new(),
            })),
        }
    }
}

impl Storage for MemStorage {
    type File = MemFile;

    async fn list(&self) -> io::Result<Vec<String>> {
        let state = self.disk.state.borrow();
        Ok(state
            .dirs
            .get(&self.path)
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default())
    }

    async fn create(&self, name: &str) -> io::Result<MemFile> {
        let id = {
            let mut state = self.disk.state.borrow_mut();
            let id = state.next_file_id;
            state.next_file_id += 1;
            state.files.insert(id, FileData::default());
            let dir = state.dirs.entry(self.path.clone()).or_default();
            if let Some(old) = dir.insert(name.to_string(), id) {
                let still_durable = state
                    .durable_dirs
                    .values()
                    .any(|d| d.values().any(|v| *v == old));
                if !still_durable {
                    state.files.remove(&old);
                }
            }
            id
        };
        Ok(self.handle(id))
    }

    async fn open(&self, name: &str) -> io::Result<MemFile> {
        let id = self.file_id(name)?;
        Ok(self.handle(id))
    }

    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let id = self.file_id(from)?;
        let mut state = self.disk.state.borrow_mut();
        let dir = state.dirs.get_mut(&self.path).expect("folder exists");
        dir.remove(from);
        dir.insert(to.to_string(), id);
        Ok(())
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        self.file_id(name)?;
        let mut state = self.disk.state.borrow_mut();
        state
            .dirs
            .get_mut(&self.path)
            .expect("folder exists")
            .remove(name);
        Ok(())
    }

    async fn sync_dir(&self) -> io::Result<()> {
        if self.disk.yielding() {
            YieldOnce(false).await;
        }
        let mut state = self.disk.state.borrow_mut();
        state.check_sync()?;
        let listing = state.dirs.get(&self.path).cloned().unwrap_or_default();
        state.durable_dirs.insert(self.path.clone(), listing);
        Ok(())
    }

    async fn destroy(self) -> io::Result<()> {
        let mut state = self.disk.state.borrow_mut();
        state.dirs.remove(&self.path);
        state.durable_dirs.remove(&self.path);
        Ok(())
    }

    async fn sync_filesystem(&self) -> io::Result<()> {
        if self.disk.yielding() {
            YieldOnce(false).await;
        }
        let mut state = self.disk.state.borrow_mut();
        state.check_sync()?;
        for file in state.files.values_mut() {
            file.durable_len = file.current.len();
        }
        state.durable_dirs = state.dirs.clone();
        Ok(())
    }

    async fn yield_now(&self) {
        if self.disk.yielding() {
            YieldOnce(false).await;
        }
    }
}

#[derive(Debug)]
struct MemFileBuf {
    flushed_len: u64,
    buffer: Vec<u8>,
}

/// A handle to one in-memory file with its own append buffer.
#[derive(Debug, Clone)]
pub struct MemFile {
    disk: MemDisk,
    id: u64,
    inner: Rc<RefCell<MemFileBuf>>,
}

impl MemFile {
    fn flush_now(&self) -> io::Result<()> {
        let mut inner = self.inner.borrow_mut();
        let mut state = self.disk.state.borrow_mut();
        let Some(file) = state.files.get_mut(&self.id) else {
            return Err(io::Error::other("file was lost"));
        };
        let at = inner.flushed_len as usize;
        file.current.truncate(at);
        file.durable_len = file.durable_len.min(at);
        file.current.extend_from_slice(&inner.buffer);
        inner.flushed_len += inner.buffer.len() as u64;
        inner.buffer.clear();
        Ok(())
    }
}

impl StorageFile for MemFile {
    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let inner = self.inner.borrow();
        let state = self.disk.state.borrow();
        let file = state
            .files
            .get(&self.id)
            .ok_or_else(|| io::Error::other("file was lost"))?;
        let mut out = Vec::with_capacity(len);
        let end = offset as usize + len;
        let flushed = (inner.flushed_len as usize).min(file.current.len());
        let start = offset as usize;
        if start < flushed {
            out.extend_from_slice(&file.current[start..end.min(flushed)]);
        }
        if end > flushed {
            let from = start.max(flushed) - flushed;
            let to = end - flushed;
            if to > inner.buffer.len() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past end of file",
                ));
            }
            out.extend_from_slice(&inner.buffer[from..to]);
        }
        Ok(out)
    }

    fn append(&self, bytes: &[u8]) -> u64 {
        let mut inner = self.inner.borrow_mut();
        let at = inner.flushed_len + inner.buffer.len() as u64;
        inner.buffer.extend_from_slice(bytes);
        at
    }

    async fn flush(&self) -> io::Result<()> {
        self.flush_now()
    }

    async fn sync(&self) -> io::Result<()> {
        if self.disk.yielding() {
            YieldOnce(false).await;
        }
        self.flush_now()?;
        let mut state = self.disk.state.borrow_mut();
        state.check_sync()?;
        let file = state.files.get_mut(&self.id).expect("flushed file exists");
        file.durable_len = file.current.len();
        Ok(())
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        self.flush_now()?;
        let mut inner = self.inner.borrow_mut();
        let mut state = self.disk.state.borrow_mut();
        state.check_sync()?;
        let file = state.files.get_mut(&self.id).expect("file exists");
        file.current.truncate(len as usize);
        file.durable_len = file.current.len();
        inner.flushed_len = file.current.len() as u64;
        Ok(())
    }

    fn len(&self) -> u64 {
        let inner = self.inner.borrow();
        inner.flushed_len + inner.buffer.len() as u64
    }

    fn buffered_bytes(&self) -> u64 {
        self.inner.borrow().buffer.len() as u64
    }
}

/// A future that is pending once, waking itself, then ready.
#[derive(Debug)]
pub struct YieldOnce(pub bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

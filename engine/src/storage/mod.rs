//! The small storage trait the log talks to, and its two backends.
//!
//! A [`Storage`] is one partition's folder; a [`StorageFile`] is one file in it.
//! Appends are buffered in memory and reach the device on [`StorageFile::flush`];
//! [`StorageFile::sync`] is flush plus `fdatasync`. Creating, renaming and removing a
//! file is made durable by [`Storage::sync_dir`], which the log calls before it relies on
//! them (once after a group of renames or removes).
//!
//! - [`dma`]: the real backend, glommio `DmaFile` (io_uring, `O_DIRECT`).
//! - [`mem`]: an in-memory backend that can crash: unsynced bytes are lost, the last
//!   write may be torn, chosen bytes may be flipped, a chosen sync may fail.
#![allow(async_fn_in_trait)]

pub mod dma;
pub mod mem;

use std::io;

/// One file of a partition folder.
pub trait StorageFile {
    /// Reads exactly `len` bytes at `offset` (buffered, unflushed bytes included).
    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Buffers `bytes` at the end of the file and returns the offset they start at.
    fn append(&self, bytes: &[u8]) -> u64;
    /// Writes buffered bytes to the device (no `fdatasync`).
    async fn flush(&self) -> io::Result<()>;
    /// Flushes, then `fdatasync`: every byte appended before the call is durable.
    async fn sync(&self) -> io::Result<()>;
    /// Cuts the file to `len` bytes (dropping buffered bytes beyond it) and syncs.
    async fn truncate(&self, len: u64) -> io::Result<()>;
    /// Logical length: every byte appended so far, flushed or not.
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes appended but not yet written to the device.
    fn buffered_bytes(&self) -> u64;
}

/// One partition folder.
pub trait Storage {
    type File: StorageFile;
    /// Names of the files in the folder, sorted.
    async fn list(&self) -> io::Result<Vec<String>>;
    /// Creates (or truncates) a file.
    async fn create(&self, name: &str) -> io::Result<Self::File>;
    /// Creates (or truncates) a file whose first `bytes` bytes are zeros already on
    /// the device, returned empty: appends then overwrite allocated blocks, so syncing
    /// them commits no file-system metadata (the commit log's files). A backend without
    /// that distinction just creates the file.
    async fn create_zeroed(&self, name: &str, bytes: u64) -> io::Result<Self::File> {
        let _ = bytes;
        self.create(name).await
    }
    /// Opens an existing file for reading and appending at its end.
    async fn open(&self, name: &str) -> io::Result<Self::File>;
    async fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    async fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creates, renames and removes so far durable (fsync of the folder).
    async fn sync_dir(&self) -> io::Result<()>;
    /// Removes the folder and everything in it.
    async fn destroy(self) -> io::Result<()>;
    /// Makes everything written to the device anywhere on this file system durable,
    /// data and metadata (`syncfs`): one flush for many files.
    async fn sync_filesystem(&self) -> io::Result<()>;
    /// A cooperative yield point for long background loops (compaction, recovery).
    async fn yield_now(&self);
}

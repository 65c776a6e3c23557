//! Group commit across the partitions of a shard.
//!
//! Each partition has its own files, so a per-partition `fdatasync` makes one device
//! flush per partition with pending writes; with tens of partitions per shard that is
//! tens of flushes where one would do. A [`SyncGroup`] shared by a shard's partitions
//! lets every partition write its buffered bytes to the device, then waits for one
//! file-system-wide sync (`syncfs`) that started after that write: one flush covers
//! every partition of the shard.

use crate::notify::Notify;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;

#[derive(Debug, Default)]
pub struct SyncGroup {
    /// Syncs started so far (a ticket numbers the sync a caller needs).
    started: Cell<u64>,
    /// The last sync finished (successfully or not).
    finished: Cell<u64>,
    busy: Cell<bool>,
    /// The first failure: every later caller gets it too (a failed sync is never
    /// retried into a success).
    failed: RefCell<Option<String>>,
    done: Notify,
    syncs: Cell<u64>,
}

impl SyncGroup {
    pub fn new() -> Self {
        Self::default()
    }

    /// File-system syncs run so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.get()
    }

    /// Returns once a sync that started after this call has finished: everything
    /// written to the device before the call is then durable. `sync_fs` runs the sync
    /// when this caller leads it.
    pub async fn sync_after_now<F, Fut>(&self, sync_fs: F) -> io::Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<()>>,
    {
        let ticket = self.started.get() + 1;
        let mut sync_fs = Some(sync_fs);
        loop {
            if let Some(err) = self.failed.borrow().as_ref() {
                return Err(io::Error::other(err.clone()));
            }
            if self.finished.get() >= ticket {
                return Ok(());
            }
            if self.busy.get() {
                self.done.wait().await;
                continue;
            }
            let Some(run) = sync_fs.take() else {
                // we led a sync that did not cover our ticket: cannot happen, as a sync
                // we lead starts after the call
                return Err(io::Error::other("sync group lost track of its tickets"));
            };
            self.busy.set(true);
            // a leader dropped during its sync (a cancelled background task) hands the
            // lead back: another waiter runs a sync of its own
            let leading = Leading(self);
            self.started.set(self.started.get() + 1);
            let number = self.started.get();
            let result = run().await;
            drop(leading);
            if let Err(e) = &result {
                self.failed.replace(Some(e.to_string()));
            }
            self.syncs.set(self.syncs.get() + 1);
            self.finished.set(number);
            self.done.notify_all();
            result?;
        }
    }
}

/// Clears `busy` and wakes the waiters when the leading call ends, also when it is
/// dropped (cancelled) before its sync finished.
struct Leading<'a>(&'a SyncGroup);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        self.0.done.notify_all();
    }
}

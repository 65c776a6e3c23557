//! The single-threaded wake-all notifier lives in `ringkv-net` (its peer links use it
//! too); the engine uses the same one. [`Turn`] builds one-at-a-time jobs on it.

use std::cell::Cell;

pub(crate) use ringkv_net::notify::Notify;

/// A turn at a job that runs one at a time (a segment's I/O, an `EPOCH` write, the hint
/// files, a membership change): `busy` is set while one runs, `done` wakes the next.
/// Given back when dropped, also when the task holding it is cancelled (the shard drops
/// its background tasks at shutdown): a flag left set would stop every later turn.
pub(crate) struct Turn<'a> {
    busy: &'a Cell<bool>,
    done: &'a Notify,
}

impl<'a> Turn<'a> {
    /// Waits until no turn is running, then takes it.
    pub(crate) async fn wait(busy: &'a Cell<bool>, done: &'a Notify) -> Self {
        while busy.get() {
            done.wait().await;
        }
        busy.set(true);
        Self { busy, done }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.busy.set(false);
        self.done.notify_all();
    }
}

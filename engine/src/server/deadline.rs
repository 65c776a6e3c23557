//! Connection deadlines without a timer per read or write.
//!
//! A connection's reader and writer keep their current deadline in a cell: set when a
//! read or a write has to wait, cleared when it ends. One sweeper per shard wakes every
//! tick and expires the waits whose deadline has passed; an expired side is woken and
//! ends its connection. A wait thus costs a clock read and two stores, where a glommio
//! timer around each read and each write cost two clock reads and an insertion into and
//! a removal from the reactor's timer tree (about 8% of a shard's user time at one
//! request in flight per connection). A deadline is kept to within one tick late, never
//! early.

use crate::notify::Notify;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

/// The ticks a sweeper takes per shortest timeout it enforces (its lateness bound is a
/// quarter of that timeout), within [`TICK_MIN`, `TICK_MAX`].
const TICKS_PER_TIMEOUT: u32 = 4;
const TICK_MIN: Duration = Duration::from_millis(1);
const TICK_MAX: Duration = Duration::from_millis(250);

/// One connection's deadlines: its reader's and its writer's.
#[derive(Default)]
pub(crate) struct Deadlines {
    /// The reader waiting for bytes.
    pub read: Side,
    /// The writer waiting for the socket to take its batch.
    pub write: Side,
}

/// The deadline of one side's current wait, if it waits.
#[derive(Default)]
pub(crate) struct Side {
    at: Cell<Option<Instant>>,
    expired: Cell<bool>,
    /// Woken when this side expires.
    woken: Notify,
}

impl Side {
    /// The side waits until `at` (an expiry of an earlier wait that its I/O won the
    /// race against is forgotten).
    pub fn arm(&self, at: Instant) {
        self.expired.set(false);
        self.at.set(Some(at));
    }

    pub fn disarm(&self) {
        self.at.set(None);
    }

    /// Returns once the deadline has passed (never, if it does not).
    pub async fn expired(&self) {
        while !self.expired.get() {
            self.woken.wait().await;
        }
    }

    /// Expires the wait if its deadline is at or before `now`; true if it did.
    fn expire_at(&self, now: Instant) -> bool {
        if self.at.get().is_none_or(|at| at > now) {
            return false;
        }
        self.at.set(None);
        self.expired.set(true);
        self.woken.notify_all();
        true
    }
}

impl Deadlines {
    /// Expires each side whose deadline is at or before `now`; true if one did.
    fn expire_at(&self, now: Instant) -> bool {
        // both sides, whatever the first says
        self.read.expire_at(now) | self.write.expire_at(now)
    }
}

/// A shard's connections' deadlines, swept every tick.
pub(crate) struct Sweeper {
    tick: Duration,
    watched: RefCell<Vec<Weak<Deadlines>>>,
}

impl Sweeper {
    /// A sweeper late by at most a quarter of the shortest of `timeouts` (and by at
    /// least a millisecond, at most 250 ms).
    pub fn new(timeouts: &[Duration]) -> Self {
        let tick = timeouts.iter().min().map_or(TICK_MAX, |shortest| {
            (*shortest / TICKS_PER_TIMEOUT).clamp(TICK_MIN, TICK_MAX)
        });
        Self {
            tick,
            watched: RefCell::default(),
        }
    }

    #[cfg(test)]
    fn tick(&self) -> Duration {
        self.tick
    }

    /// Deadlines for a new connection, watched until the connection drops them.
    pub fn watch(&self) -> Rc<Deadlines> {
        let deadlines = Rc::new(Deadlines::default());
        self.watched.borrow_mut().push(Rc::downgrade(&deadlines));
        deadlines
    }

    /// Expires what is due at `now` and forgets connections that are gone; returns how
    /// many connections had a side expire.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut expired = 0;
        self.watched.borrow_mut().retain(|w| match w.upgrade() {
            Some(d) => {
                expired += usize::from(d.expire_at(now));
                true
            }
            None => false,
        });
        expired
    }

    /// Connections watched (gone ones until the next sweep).
    #[cfg(test)]
    fn watched(&self) -> usize {
        self.watched.borrow().len()
    }

    /// Sweeps every tick, for as long as the task runs (the shard drops it at shutdown,
    /// once its connections have closed or its drain timeout has passed).
    pub async fn run(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(self.tick).await;
            self.sweep(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_is_a_quarter_of_the_shortest_timeout_within_bounds() {
        let s = |ms: &[u64]| {
            let t: Vec<_> = ms.iter().map(|&m| Duration::from_millis(m)).collect();
            Sweeper::new(&t).tick()
        };
        assert_eq!(s(&[300_000, 10_000]), TICK_MAX);
        assert_eq!(s(&[500, 60_000]), Duration::from_millis(125));
        assert_eq!(s(&[2]), TICK_MIN);
        assert_eq!(s(&[]), TICK_MAX);
    }

    #[test]
    fn a_side_expires_only_once_its_deadline_has_passed() {
        let sweeper = Sweeper::new(&[Duration::from_secs(1)]);
        let conn = sweeper.watch();
        let t0 = Instant::now();
        // nothing armed: nothing expires, however late
        assert_eq!(sweeper.sweep(t0 + Duration::from_secs(3600)), 0);
        conn.read.arm(t0 + Duration::from_secs(1));
        conn.write.arm(t0 + Duration::from_secs(2));
        assert_eq!(sweeper.sweep(t0 + Duration::from_millis(999)), 0);
        assert!(!conn.read.expired.get() && !conn.write.expired.get());
        assert_eq!(sweeper.sweep(t0 + Duration::from_secs(1)), 1);
        assert!(conn.read.expired.get() && !conn.write.expired.get());
        // a write that ended in time is not expired later
        conn.write.disarm();
        assert_eq!(sweeper.sweep(t0 + Duration::from_secs(5)), 0);
        assert!(!conn.write.expired.get());
        // a deadline moved later by a new wait is the one that counts
        conn.write.arm(t0 + Duration::from_secs(10));
        conn.write.arm(t0 + Duration::from_secs(20));
        assert_eq!(sweeper.sweep(t0 + Duration::from_secs(15)), 0);
        assert_eq!(sweeper.sweep(t0 + Duration::from_secs(20)), 1);
        assert!(conn.write.expired.get());
    }

    /// A wait whose I/O completed although its deadline had just been swept (the I/O
    /// wins the race) must not make the next wait expire at once.
    #[test]
    fn an_expiry_does_not_carry_over_to_the_next_wait() {
        let sweeper = Sweeper::new(&[Duration::from_secs(1)]);
        let conn = sweeper.watch();
        let t0 = Instant::now();
        conn.read.arm(t0);
        conn.write.arm(t0);
        assert_eq!(sweeper.sweep(t0), 1);
        conn.read.disarm();
        conn.write.disarm();
        conn.read.arm(t0 + Duration::from_secs(300));
        conn.write.arm(t0 + Duration::from_secs(10));
        assert!(!conn.read.expired.get() && !conn.write.expired.get());
        use std::future::Future;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::pin::pin!(conn.read.expired())
            .poll(&mut cx)
            .is_pending());
        assert!(std::pin::pin!(conn.write.expired())
            .poll(&mut cx)
            .is_pending());
    }

    #[test]
    fn gone_connections_are_forgotten() {
        let sweeper = Sweeper::new(&[Duration::from_secs(1)]);
        let kept = sweeper.watch();
        drop(sweeper.watch());
        drop(sweeper.watch());
        assert_eq!(sweeper.watched(), 3);
        sweeper.sweep(Instant::now());
        assert_eq!(sweeper.watched(), 1);
        kept.read.arm(Instant::now());
        assert_eq!(sweeper.sweep(Instant::now()), 1);
    }

    #[test]
    fn an_expired_side_wakes_its_waiter() {
        use std::future::Future;
        use std::pin::pin;
        use std::task::{Context, Poll, Waker};
        let sweeper = Sweeper::new(&[Duration::from_secs(1)]);
        let conn = sweeper.watch();
        let mut read = pin!(conn.read.expired());
        let mut write = pin!(conn.write.expired());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(read.as_mut().poll(&mut cx).is_pending());
        assert!(write.as_mut().poll(&mut cx).is_pending());
        let t0 = Instant::now();
        conn.read.arm(t0);
        sweeper.sweep(t0);
        assert_eq!(read.as_mut().poll(&mut cx), Poll::Ready(()));
        assert!(write.as_mut().poll(&mut cx).is_pending());
    }
}

//! A tiny single-threaded wake-all notifier (group commit, I/O turn-taking, shutdown).
//!
//! A waiting future keeps one waker slot, replaced on every poll and freed when the
//! future is dropped, so waits that are polled many times or abandoned (raced against
//! other futures) do not pile up wakers.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
pub struct Notify {
    generation: Cell<u64>,
    slots: RefCell<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    wakers: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Notify {
    /// Wakes every task waiting now. Allocates nothing: the slots' own vector is taken
    /// out while its wakers run (a waker may register a new wait), then given back.
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        let mut wakers = {
            let mut slots = self.slots.borrow_mut();
            if slots.wakers.is_empty() {
                return;
            }
            slots.free.clear();
            std::mem::take(&mut slots.wakers)
        };
        for waker in wakers.drain(..).flatten() {
            waker.wake();
        }
        let mut slots = self.slots.borrow_mut();
        if slots.wakers.is_empty() {
            slots.wakers = wakers;
        }
    }

    /// Completes at the next `notify_all` after this call.
    pub fn wait(&self) -> Wait<'_> {
        Wait {
            notify: self,
            generation: self.generation.get(),
            slot: None,
        }
    }
}

#[derive(Debug)]
pub struct Wait<'a> {
    notify: &'a Notify,
    generation: u64,
    slot: Option<usize>,
}

impl Future for Wait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.generation {
            self.slot = None;
            return Poll::Ready(());
        }
        let mut slots = self.notify.slots.borrow_mut();
        match self.slot {
            Some(i) => slots.wakers[i] = Some(cx.waker().clone()),
            None => {
                let i = match slots.free.pop() {
                    Some(i) => {
                        slots.wakers[i] = Some(cx.waker().clone());
                        i
                    }
                    None => {
                        slots.wakers.push(Some(cx.waker().clone()));
                        slots.wakers.len() - 1
                    }
                };
                drop(slots);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        // a slot from before the last notify_all is gone already
        if let Some(i) = self.slot {
            if self.notify.generation.get() == self.generation {
                if let Ok(mut slots) = self.notify.slots.try_borrow_mut() {
                    if slots.wakers.get(i).is_some() {
                        slots.wakers[i] = None;
                        slots.free.push(i);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoned_waits_free_their_slots() {
        let n = Notify::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for _ in 0..1000 {
            let mut w = Box::pin(n.wait());
            for _ in 0..3 {
                assert!(w.as_mut().poll(&mut cx).is_pending());
            }
        }
        assert!(n.slots.borrow().wakers.len() <= 1, "slots are reused");
        let mut w = Box::pin(n.wait());
        assert!(w.as_mut().poll(&mut cx).is_pending());
        n.notify_all();
        assert!(w.as_mut().poll(&mut cx).is_ready());
    }

    thread_local! {
        static WOKEN: Cell<usize> = const { Cell::new(0) };
    }

    /// A waker that registers a new wait on the notifier it is woken by, as a task
    /// polled at once would (its data is that `&'static Notify`).
    fn rewait_waker(notify: &'static Notify) -> Waker {
        use std::task::{RawWaker, RawWakerVTable};
        const VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);
        fn clone(p: *const ()) -> RawWaker {
            RawWaker::new(p, &VTABLE)
        }
        fn wake(p: *const ()) {
            WOKEN.with(|w| w.set(w.get() + 1));
            // SAFETY: every waker of this vtable carries a `&'static Notify`
            let notify: &'static Notify = unsafe { &*(p as *const Notify) };
            let waker = rewait_waker(notify);
            let mut again = Box::pin(notify.wait());
            assert!(again
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
            // keeps its slot, as a wait still pending does
            std::mem::forget(again);
        }
        fn drop(_: *const ()) {}
        // SAFETY: the vtable's functions only read the `&'static Notify`
        unsafe { Waker::from_raw(RawWaker::new(notify as *const Notify as *const (), &VTABLE)) }
    }

    #[test]
    fn every_waiter_is_woken_once_per_notify_even_one_that_waits_again() {
        let n: &'static Notify = Box::leak(Box::default());
        let waker = rewait_waker(n);
        let mut cx = Context::from_waker(&waker);
        let noop = Waker::noop();
        let mut plain = Box::pin(n.wait());
        assert!(plain
            .as_mut()
            .poll(&mut Context::from_waker(noop))
            .is_pending());
        let mut first = Box::pin(n.wait());
        assert!(first.as_mut().poll(&mut cx).is_pending());
        let woken = || WOKEN.with(Cell::get);
        n.notify_all();
        assert_eq!(woken(), 1);
        assert!(plain
            .as_mut()
            .poll(&mut Context::from_waker(noop))
            .is_ready());
        // the wait registered from inside the wake is kept and woken by the next one
        assert_eq!(n.slots.borrow().wakers.len(), 1);
        n.notify_all();
        assert_eq!(woken(), 2);
        n.notify_all();
        assert_eq!(woken(), 3);
    }
}

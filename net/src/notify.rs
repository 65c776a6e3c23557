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
    /// Wakes every task waiting now.
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get() + 1);
        let wakers: Vec<Waker> = {
            let mut slots = self.slots.borrow_mut();
            slots.free.clear();
            slots.wakers.drain(..).flatten().collect()
        };
        for waker in wakers {
            waker.wake();
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
}

//! A peer link: one persistent, pipelined connection from this shard to another node,
//! on glommio. Callers hand it whole request frames and await the reply frame with the
//! same request id; many requests are in flight at once. A background task connects,
//! writes queued frames in batches and matches replies; when the connection fails it
//! fails every waiting request at once (so the caller's failure detector hears about it
//! promptly) and reconnects with exponential backoff. While the peer is known to be down
//! (between a failed connect and the next attempt) calls fail fast instead of queueing.
//! Both the queue and the number of requests outstanding are bounded: a call waits
//! (within its timeout) for a free place when `pending_max` requests are outstanding, and
//! a request that timed out stays counted until its reply arrives or the connection
//! drops, so the link never has more outstanding at the peer than the peer accepts.

use crate::notify::Notify;
use crate::protocol::{check_frame, header};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Limits and timings of a link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub connect_timeout: Duration,
    /// Requests outstanding (sent or queued, reply not yet in), at most: no more than
    /// the peer's in-flight limit per connection, which refuses the rest
    /// (`TooManyInFlight`). A call over it waits for a reply to free a place.
    pub pending_max: usize,
    /// Encoded bytes waiting to be written, at most (a single larger frame is still
    /// accepted when the queue is empty).
    pub queue_bytes_max: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The largest reply frame accepted.
    pub frame_bytes_max: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            // the server's default `in_flight_per_connection_max`
            pending_max: 1024,
            queue_bytes_max: 16 << 20,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            frame_bytes_max: crate::protocol::FRAME_BYTES_MAX_DEFAULT,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LinkError {
    #[error("the link to {0} is full (too many bytes waiting to be sent)")]
    QueueFull(String),
    #[error("{addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("{addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("the link is closed")]
    Closed,
}

/// How the reason of a failed connect starts.
const CONNECT_FAILED: &str = "connect failed";

impl LinkError {
    /// The peer could not be connected to at all (nothing listens there, or no answer
    /// to the connect), as opposed to a connection that was lost.
    pub fn is_connect_failure(&self) -> bool {
        matches!(self, LinkError::Unreachable { reason, .. } if reason.starts_with(CONNECT_FAILED))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Connected,
    /// The last connect failed; calls fail fast until `retry_at`.
    Down {
        retry_at: Instant,
    },
}

#[derive(Default)]
struct Slot {
    reply: RefCell<Option<Result<Vec<u8>, LinkError>>>,
    done: Notify,
}

struct Inner {
    addr: RefCell<String>,
    config: LinkConfig,
    queue: RefCell<Vec<u8>>,
    /// Requests sent or queued whose reply has not come, timed-out ones included.
    pending: RefCell<HashMap<u64, Rc<Slot>>>,
    /// A place in `pending` came free.
    freed: Notify,
    next_id: Cell<u64>,
    wake: Notify,
    state: Cell<State>,
    last_error: RefCell<String>,
    closed: Cell<bool>,
    connects: Cell<u64>,
    /// Replies to this link's requests read so far, over all connections.
    frames_read: Cell<u64>,
    /// The peer sent an error with request id 0 (it refused the connection).
    refusal_seen: Cell<bool>,
}

/// A link to one peer; dropping it stops its task and fails its waiting requests.
pub struct PeerLink {
    inner: Rc<Inner>,
    task: RefCell<Option<glommio::Task<()>>>,
}

impl PeerLink {
    /// Creates the link and starts its connection task on the current executor.
    pub fn spawn(addr: &str, config: LinkConfig) -> PeerLink {
        let inner = Rc::new(Inner {
            addr: RefCell::new(addr.to_string()),
            config,
            queue: RefCell::default(),
            pending: RefCell::default(),
            freed: Notify::default(),
            next_id: Cell::new(1),
            wake: Notify::default(),
            state: Cell::new(State::Connecting),
            last_error: RefCell::default(),
            closed: Cell::new(false),
            connects: Cell::new(0),
            frames_read: Cell::new(0),
            refusal_seen: Cell::new(false),
        });
        let task = glommio::spawn_local(connection_task(inner.clone()));
        PeerLink {
            inner,
            task: RefCell::new(Some(task)),
        }
    }

    pub fn addr(&self) -> String {
        self.inner.addr.borrow().clone()
    }

    /// Points the link at a new address (the peer moved); the current connection drops.
    pub fn set_addr(&self, addr: &str) {
        if *self.inner.addr.borrow() != addr {
            *self.inner.addr.borrow_mut() = addr.to_string();
            self.inner.state.set(State::Connecting);
            // the connection task notices the change on its next turn
            self.inner.wake.notify_all();
        }
    }

    /// True while a connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.state.get() == State::Connected
    }

    /// Successful connects so far (tests and stats).
    pub fn connects(&self) -> u64 {
        self.inner.connects.get()
    }

    /// Sends one request, built by `build(request_id, out)` (it must append exactly one
    /// frame carrying that request id), and waits up to `timeout` for its reply frame;
    /// the wait includes waiting for a place when `pending_max` requests are
    /// outstanding. A request that times out stays outstanding (its place is freed by
    /// its reply, or by the connection dropping).
    pub async fn call(
        &self,
        timeout: Duration,
        build: impl FnOnce(u64, &mut Vec<u8>),
    ) -> Result<Vec<u8>, LinkError> {
        let inner = &self.inner;
        let deadline = Instant::now() + timeout;
        // bounded by the deadline: each pass waits for a freed place or fails
        loop {
            if inner.closed.get() {
                return Err(LinkError::Closed);
            }
            if let State::Down { retry_at } = inner.state.get() {
                if Instant::now() < retry_at {
                    return Err(self.unreachable());
                }
            }
            {
                let queue = inner.queue.borrow();
                if !queue.is_empty() && queue.len() >= inner.config.queue_bytes_max {
                    return Err(LinkError::QueueFull(self.addr()));
                }
            }
            if inner.pending.borrow().len() < inner.config.pending_max {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let freed = glommio::timer::timeout(left, async {
                inner.freed.wait().await;
                Ok(())
            })
            .await;
            if freed.is_err() {
                return Err(LinkError::Timeout {
                    addr: self.addr(),
                    after: timeout,
                });
            }
        }
        let id = inner.next_id.get();
        inner.next_id.set(id + 1);
        build(id, &mut inner.queue.borrow_mut());
        let slot = Rc::new(Slot::default());
        inner.pending.borrow_mut().insert(id, slot.clone());
        inner.wake.notify_all();
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = glommio::timer::timeout(left, async {
            while slot.reply.borrow().is_none() {
                slot.done.wait().await;
            }
            Ok(())
        })
        .await;
        let reply = slot.reply.borrow_mut().take();
        match reply {
            Some(reply) => reply,
            None => Err(LinkError::Timeout {
                addr: self.addr(),
                after: timeout,
            }),
        }
    }

    /// Requests outstanding now (timed-out ones whose reply has not come included).
    pub fn outstanding(&self) -> usize {
        self.inner.pending.borrow().len()
    }

    fn unreachable(&self) -> LinkError {
        LinkError::Unreachable {
            addr: self.addr(),
            reason: self.inner.last_error.borrow().clone(),
        }
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.inner.closed.set(true);
        fail_all(&self.inner, LinkError::Closed);
        self.inner.wake.notify_all();
        // dropping the task handle cancels it
        drop(self.task.borrow_mut().take());
    }
}

fn fail_all(inner: &Inner, error: LinkError) {
    inner.queue.borrow_mut().clear();
    let slots: Vec<Rc<Slot>> = inner.pending.borrow_mut().drain().map(|(_, s)| s).collect();
    for slot in slots {
        *slot.reply.borrow_mut() = Some(Err(error.clone()));
        slot.done.notify_all();
    }
    inner.freed.notify_all();
}

async fn connection_task(inner: Rc<Inner>) {
    let mut backoff = inner.config.backoff_min;
    loop {
        if inner.closed.get() {
            return;
        }
        inner.state.set(State::Connecting);
        let addr = inner.addr.borrow().clone();
        // never a name: glommio 0.9 would look it up on this thread (and unwraps an
        // empty answer)
        let connected = match crate::peer::peer_addr(&addr) {
            Ok(target) => {
                glommio::timer::timeout(inner.config.connect_timeout, async {
                    TcpStream::connect(target).await
                })
                .await
            }
            Err(e) => Err(glommio::GlommioError::IoError(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                e,
            ))),
        };
        match connected {
            Ok(stream) => {
                inner.connects.set(inner.connects.get() + 1);
                inner.state.set(State::Connected);
                let (started, frames) = (Instant::now(), inner.frames_read.get());
                let reason = run_connection(&inner, stream, &addr).await;
                // nothing of ours was outstanding when it ended (an idle close)
                let idle = inner.pending.borrow().is_empty();
                *inner.last_error.borrow_mut() = reason.clone();
                // requests on the lost connection may or may not have been served
                fail_all(
                    &inner,
                    LinkError::Unreachable {
                        addr: addr.clone(),
                        reason,
                    },
                );
                // A peer that accepts and closes at once is retried with backoff, not
                // in a loop of connects. One that refused (a node at its connection
                // limit sends an error with request id 0 first) is down for the
                // backoff, as after a failed connect: calls fail fast. One that closed
                // an idle connection (nothing of ours outstanding: its idle timeout on
                // a quiet link, say) is connected to again after the backoff or as
                // soon as a call needs it, whichever comes first; one that closed with
                // requests outstanding and no answer waits the backoff out.
                let refusal = inner.refusal_seen.replace(false);
                let wait_out = refusal || !idle;
                let quick = inner.frames_read.get() == frames
                    && started.elapsed() < Duration::from_secs(1)
                    && !inner.closed.get()
                    && *inner.addr.borrow() == addr;
                if quick {
                    inner.state.set(if refusal {
                        State::Down {
                            retry_at: Instant::now() + backoff,
                        }
                    } else {
                        State::Connecting
                    });
                    let queued = inner.queue.borrow().len();
                    let _ = glommio::timer::timeout(backoff, async {
                        // a new address, a close, or (after an idle close) a call
                        while *inner.addr.borrow() == addr
                            && !inner.closed.get()
                            && (wait_out || inner.queue.borrow().len() == queued)
                        {
                            inner.wake.wait().await;
                        }
                        Ok(())
                    })
                    .await;
                    backoff = (backoff * 2).min(inner.config.backoff_max);
                } else {
                    backoff = inner.config.backoff_min;
                }
            }
            Err(e) => {
                *inner.last_error.borrow_mut() = format!("{CONNECT_FAILED}: {e}");
                inner.state.set(State::Down {
                    retry_at: Instant::now() + backoff,
                });
                fail_all(
                    &inner,
                    LinkError::Unreachable {
                        addr: addr.clone(),
                        reason: format!("{CONNECT_FAILED}: {e}"),
                    },
                );
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(inner.config.backoff_max);
            }
        }
    }
}

/// Serves one connection until it fails, the link closes or the address changes;
/// returns why it ended.
async fn run_connection(inner: &Rc<Inner>, stream: TcpStream, addr: &str) -> String {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let write_loop = async {
        loop {
            loop {
                if inner.closed.get() {
                    return "link closed".to_string();
                }
                if *inner.addr.borrow() != addr {
                    return "address changed".to_string();
                }
                if !inner.queue.borrow().is_empty() {
                    break;
                }
                inner.wake.wait().await;
            }
            let batch = std::mem::take(&mut *inner.queue.borrow_mut());
            if let Err(e) = writer.write_all(&batch).await {
                return format!("write failed: {e}");
            }
            if let Err(e) = writer.flush().await {
                return format!("write failed: {e}");
            }
        }
    };
    let read_loop = async {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut chunk).await {
                Ok(0) => return "closed by peer".to_string(),
                Ok(n) => n,
                Err(e) => return format!("read failed: {e}"),
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            loop {
                match check_frame(&buf[at..], inner.config.frame_bytes_max) {
                    Ok(Some(len)) => {
                        let frame = &buf[at..at + len];
                        let frame_header = header(frame);
                        let id = frame_header.request_id;
                        if id == 0 && frame_header.opcode == crate::protocol::opcode::ERROR {
                            inner.refusal_seen.set(true);
                        }
                        if let Some(slot) = inner.pending.borrow_mut().remove(&id) {
                            // only an answer counts: a peer at its connection limit
                            // sends an error (request id 0) before it closes
                            inner.frames_read.set(inner.frames_read.get() + 1);
                            *slot.reply.borrow_mut() = Some(Ok(frame.to_vec()));
                            slot.done.notify_all();
                            inner.freed.notify_all();
                        }
                        at += len;
                    }
                    Ok(None) => break,
                    Err(e) => return format!("bad reply frame: {e}"),
                }
            }
            buf.drain(..at);
        }
    };
    futures_lite::future::or(write_loop, read_loop).await
}

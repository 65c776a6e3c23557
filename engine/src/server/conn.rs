//! One client connection: the only code that reads and writes its socket.
//!
//! The reader checks the buffer for whole frames before parsing anything, runs each
//! request as its own task (pipelining: replies go out as they complete, matched by
//! request id) and refuses work past the in-flight limits (requests and bytes). A
//! request the shard can run in the reader's own step ([`Shard::try_execute_now`]) is
//! answered there; a write done that way in `sync` mode has its reply held until the
//! commit log's group commit covers it (an acker task waits for that). Requests for
//! partitions another shard owns go to it in one batch per shard and pass over the
//! buffer, with one task taking that batch's replies. Replies
//! are encoded into one shared output buffer. The reader (once per pass, or, when the
//! pass forwarded requests, the forwarded batch's task with the first replies it gets
//! back), the acker and a forwarded batch's task send the buffer themselves when the
//! writer task holds no bytes of its own, as far as the socket takes it at once; the
//! writer task sends everything else in batches, waiting for the socket as long as the
//! slow-client timeout allows;
//! while that buffer is over its budget the reader stops reading, so a client that does
//! not read its replies cannot make the server hold unbounded memory; and what all of a
//! shard's connections hold past their fixed buffers is bounded by its [`ConnBudget`]
//! (a connection waits for room instead of reading or starting more). A broken stream
//! (bad length) gets an error frame and the connection closes; a bad request in a
//! well-framed stream gets an error frame and the connection goes on.

use super::shard::{Now, Shard};
use super::stats::{Latencies, Op, OPS};
use crate::notify::Notify;
use crate::partition::Partition;
use crate::storage::dma::DmaStorage;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use futures_lite::FutureExt;
use glommio::net::TcpStream;
use ringkv_net::protocol::{self, encode, ErrorCode, FrameError, Request};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The most room a connection's read buffer, reply buffers and held replies keep
/// between uses: after a big frame or batch they shrink back (4,096 idle connections
/// that each once sent a 4 MiB frame would otherwise keep 16-32 GiB). Room past this
/// in any of them is charged to the shard's [`ConnBudget`].
const BUFFER_KEPT_BYTES: usize = READ_CHUNK_BYTES;

/// The room a buffer of `capacity` bytes holds past what every connection may keep
/// (what it is charged to the shard's [`ConnBudget`]).
fn excess(capacity: usize) -> usize {
    capacity.saturating_sub(BUFFER_KEPT_BYTES)
}

/// The memory a shard's connections may hold past their fixed buffers
/// (`ServerConfig::connection_bytes_per_shard_max`), in two parts:
///
/// - **reads**: read buffers' room past [`BUFFER_KEPT_BYTES`], that is frames bigger
///   than that being received. A connection takes the room for such a frame whole
///   before reading past its first chunk, and only while reads and work together
///   leave room for it (or no other connection holds room for such a frame: one
///   always can); otherwise it reads nothing more until room is freed, holding no
///   more than a chunk. It keeps that room until the frame has been taken off its
///   buffer.
/// - **work**: the frames of requests running as tasks or forwarded, the reply bytes
///   they are charged, and reply buffers' room past [`BUFFER_KEPT_BYTES`] (replies
///   not yet sent, or held for the group commit). A connection takes no request off
///   its buffer while work is over the budget.
///
/// Cluster requests (peer links, `ringkv_net::peer::is_cluster_opcode`) are charged
/// but never wait, neither for room for their frames nor to run: two nodes over
/// budget must not stall each other's replication, and a peer link is bounded by the
/// sender's own pending limit.
///
/// Nothing that holds work waits for the budget (tasks end, replies are sent or their
/// client is cut off at the slow-client timeout), and a connection waiting for room
/// for a frame holds no room for one, so the waits always end. Together the node holds
/// at most about twice the budget per shard past each connection's fixed buffers
/// (reads are admitted against reads and work, and work may then grow to the budget),
/// plus per connection the one request that took work past the budget (a reply
/// answered at once is charged as it grows, before the next is taken), what
/// [`dispatch`] lets one that holds no work start (a frame copy and a reply), and up
/// to 64 KiB more of read buffer (a partial small frame and the chunk read after it is
/// charged, not admitted); and a get this shard cannot size may bring back a reply
/// bigger than its charge ([`unsized_reply_charge`]). A client that reads its replies
/// slowly but takes each batch within the slow-client timeout is never cut off: it
/// holds its share of the budget for as long as it reads.
pub(crate) struct ConnBudget {
    max: usize,
    reads: Cell<usize>,
    work: Cell<usize>,
    /// Connections holding room for a frame bigger than [`BUFFER_KEPT_BYTES`].
    frames: Cell<usize>,
    freed: Notify,
    /// Connections waiting for room now.
    waiters: Cell<usize>,
    /// Times a connection paused for room (STATS `connection_budget_waits`).
    waits: Cell<u64>,
}

impl ConnBudget {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            reads: Cell::new(0),
            work: Cell::new(0),
            frames: Cell::new(0),
            freed: Notify::default(),
            waiters: Cell::new(0),
            waits: Cell::new(0),
        }
    }

    /// Bytes charged now (STATS `connection_bytes`).
    pub(crate) fn held(&self) -> usize {
        self.reads.get() + self.work.get()
    }

    pub(crate) fn waits(&self) -> u64 {
        self.waits.get()
    }

    fn work_over(&self) -> bool {
        self.work.get() > self.max
    }

    /// Whether a frame that needs `needed` more bytes of read buffer may take them (by a
    /// connection that holds no room for such a frame itself).
    fn admits_frame(&self, needed: usize) -> bool {
        self.frames.get() == 0 || self.held() + needed <= self.max
    }

    /// Counts the connection whose flag `holds` is as holding room for a big frame.
    fn hold_frame_room(&self, holds: &Cell<bool>) {
        if !holds.replace(true) {
            self.frames.set(self.frames.get() + 1);
        }
    }

    /// The counterpart of [`ConnBudget::hold_frame_room`] (its buffer's charge is
    /// changed apart).
    fn release_frame_room(&self, holds: &Cell<bool>) {
        if holds.replace(false) {
            self.frames.set(self.frames.get() - 1);
            if self.frames.get() == 0 {
                self.freed_some();
            }
        }
    }

    fn add_work(&self, bytes: usize) {
        self.work.set(self.work.get() + bytes);
    }

    fn sub_work(&self, bytes: usize) {
        self.work.set(self.work.get() - bytes);
        self.freed_below_max();
    }

    /// Replaces a charge of `before` bytes by one of `now` in `part`.
    fn change(&self, part: &Cell<usize>, before: usize, now: usize) {
        if before == now {
            return;
        }
        part.set(part.get() - before + now);
        if now < before {
            self.freed_below_max();
        }
    }

    /// Wakes the waiters after a decrease, unless work is still over the budget: then no
    /// wait can end by it (every wait needs work within the budget, or no other
    /// connection holding room for a big frame, whose end wakes them apart), and waking
    /// every waiting connection on every reply sent would cost the shard most when it is
    /// busiest.
    fn freed_below_max(&self) {
        if !self.work_over() {
            self.freed_some();
        }
    }

    fn freed_some(&self) {
        if self.waiters.get() > 0 {
            self.freed.notify_all();
        }
    }

    /// Waits until `ready()` holds, checked again whenever room is freed or the
    /// connection's own replies drain or requests end; ends early when the connection
    /// fails or the shard stops.
    async fn wait_until(&self, shard: &Shard, output: &Output, ready: impl Fn() -> bool) {
        if ready() {
            return;
        }
        self.waits.set(self.waits.get() + 1);
        self.waiters.set(self.waiters.get() + 1);
        while !ready() && !output.broken.get() && !shard.stopping.get() {
            self.freed
                .wait()
                .or(shard.stop.wait())
                .or(output.broke.wait())
                .or(output.drained.wait())
                .or(output.in_flight_done.wait())
                .await;
        }
        self.waiters.set(self.waiters.get() - 1);
    }
}

struct Output {
    /// The connection's socket (for [`Output::flush`]).
    fd: std::os::fd::RawFd,
    buf: RefCell<Vec<u8>>,
    /// Bytes the writer has taken and is sending.
    sending_bytes: Cell<usize>,
    ready: Notify,
    /// The writer drained some output (the reader may read again).
    drained: Notify,
    closed: Cell<bool>,
    /// The writer failed: the reader must stop.
    broken: Cell<bool>,
    /// Woken when `broken` is set (not `drained`: a reader waiting for bytes is not
    /// woken by every batch of replies sent).
    broke: Notify,
    in_flight: Cell<usize>,
    in_flight_bytes: Cell<usize>,
    /// The reply bytes the requests running as tasks (or forwarded) are expected to
    /// add (see [`Output::can_dispatch`]).
    running_reply_bytes: Cell<usize>,
    in_flight_done: Notify,
    /// Replies to writes done in the reader's step, waiting for durability.
    held: RefCell<Held>,
    held_ready: Notify,
    /// The reader stopped for good (nothing more can be held): the acker may end.
    reading_done: Cell<bool>,
    /// The shard's connection memory, and what this connection's buffers are charged
    /// in its work part now ([`Output::recharge`]; running requests are charged as
    /// they start and end).
    budget: Rc<ConnBudget>,
    charged_buffers: Cell<usize>,
    /// The capacity of the batch the writer is sending.
    sending_room: Cell<usize>,
    /// The connection has ended: its buffers are charged nothing more.
    finished: Cell<bool>,
}

/// Replies to writes waiting for the commit log, in the order the writes were
/// appended (so in the order of their log positions).
#[derive(Default)]
struct Held {
    /// The replies' bytes, back to back.
    bytes: Vec<u8>,
    /// Bytes released off the front of `bytes` since the connection opened: reply
    /// ends are counted from there.
    released: usize,
    replies: VecDeque<HeldReply>,
}

struct HeldReply {
    partition: Rc<Partition<DmaStorage>>,
    position: u64,
    request_id: u64,
    /// Where the reply ends, counted like `Held::released`.
    end: usize,
    /// What the write was, and when its frame was taken (for its latency).
    op: Option<Op>,
    started: Instant,
}

impl Held {
    /// Moves the replies the commit log now covers to `out`, oldest first; with
    /// `failed`, the oldest reply's sync failed: `failed` encodes its error reply
    /// instead. Counts each released reply's latency in `latencies`. Returns how many
    /// replies it released.
    fn release(
        &mut self,
        out: &mut Vec<u8>,
        failed: Option<impl FnOnce(&mut Vec<u8>, u64)>,
        latencies: &mut Latencies,
    ) -> usize {
        let mut released = 0;
        let mut start = self.released;
        if let Some(failed) = failed {
            if let Some(reply) = self.replies.pop_front() {
                failed(out, reply.request_id);
                start = reply.end;
                released += 1;
                if let Some(op) = reply.op {
                    latencies.record(op, reply.started);
                }
            }
        }
        while let Some(reply) = self.replies.front() {
            if reply.partition.logged_durable() < reply.position {
                break;
            }
            out.extend_from_slice(&self.bytes[start - self.released..reply.end - self.released]);
            start = reply.end;
            released += 1;
            if let Some(op) = reply.op {
                latencies.record(op, reply.started);
            }
            self.replies.pop_front();
        }
        self.bytes.drain(..start - self.released);
        if self.bytes.is_empty() && self.bytes.capacity() > BUFFER_KEPT_BYTES {
            self.bytes = Vec::new();
        }
        self.released = start;
        released
    }
}

/// Output bytes a running request is assumed to add when deciding whether more
/// requests may start, unless it is a get: replies are usually far smaller, and a
/// bigger one only delays the next dispatch. A get of a key on this shard of a node
/// whose replica alone answers is charged what the keydir says its records hold
/// ([`Shard::stored_value_records`]); any other get (or replica get), whose reply this
/// shard cannot size, is charged [`unsized_reply_charge`].
const REPLY_BYTES_ESTIMATE: usize = 64 * 1024;

/// Gets whose reply this shard cannot size (forwarded to the owning shard, or read from
/// the replicas of a cluster) that one connection may have running at once.
const UNSIZED_GETS_RUNNING: usize = 16;

/// The charge of a get whose reply this shard cannot size: a share of the output
/// budget such that [`UNSIZED_GETS_RUNNING`] of them fill it. Such a reply can be as
/// big as a frame; at 64 KiB each, about 130 gets of 4 MiB values could start at once
/// on one connection that reads nothing (over half a GB held); now about 16 (17 when
/// no reply waits to be sent; with the default limits a pipeline of 16 gets never
/// waits for this). A client pipelining more cluster gets than that on one connection
/// is held to it.
fn unsized_reply_charge(output_budget: usize) -> usize {
    (output_budget / UNSIZED_GETS_RUNNING).max(REPLY_BYTES_ESTIMATE)
}

/// What a request that runs as a task or is forwarded is charged (see
/// [`REPLY_BYTES_ESTIMATE`]), with `sized`, for a get, what its reply is known to need.
fn reply_charge(op: Option<Op>, sized: Option<usize>, output_budget: usize) -> usize {
    match (op, sized) {
        (Some(Op::Get | Op::ReplicaGet), Some(bytes)) => bytes,
        (Some(Op::Get | Op::ReplicaGet), None) => unsized_reply_charge(output_budget),
        _ => REPLY_BYTES_ESTIMATE,
    }
}

/// Reply bytes the client must take within the slow-client timeout (for a batch of
/// replies bigger than this, each such part of it in turn).
const WRITE_CHUNK_BYTES: usize = 1 << 20;

/// Request bytes that requests running as tasks may hold per connection, in frame
/// limits (each such request keeps a copy of its frame).
const IN_FLIGHT_FRAMES_OF_BYTES: usize = 4;

impl Output {
    /// Sends the buffered replies from the calling task when the writer holds none of
    /// its own (so the stream stays in order) and the socket takes them at once; wakes
    /// the writer for whatever is left. A reply that can go out at once then costs no
    /// switch to the writer task.
    fn flush(&self) {
        self.send_now();
        self.recharge();
    }

    fn send_now(&self) {
        if self.buf.borrow().is_empty() {
            return;
        }
        // `closed` unset: the reader still runs, so its half keeps the socket open
        if self.sending_bytes.get() == 0 && !self.closed.get() && !self.broken.get() {
            let mut buf = self.buf.borrow_mut();
            // SAFETY: `send` reads `buf.len()` initialised bytes of `buf`, which
            // outlives the call; `fd` is this connection's open socket (see above)
            let sent = unsafe {
                libc::send(
                    self.fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            // an error or a full socket is left to the writer, which waits or fails
            if sent > 0 {
                buf.drain(..sent as usize);
            }
            if buf.is_empty() {
                if buf.capacity() > BUFFER_KEPT_BYTES {
                    // a big batch sent from here does not keep its room either
                    *buf = Vec::new();
                }
                return;
            }
        }
        self.ready.notify_all();
    }

    /// Charges the budget for this connection's buffers as they are now (skipped while
    /// one is borrowed: the next call catches up). Called wherever they can shrink.
    fn recharge(&self) {
        let now = if self.finished.get() {
            0
        } else {
            let (Ok(buf), Ok(held)) = (self.buf.try_borrow(), self.held.try_borrow()) else {
                return;
            };
            excess(buf.capacity()) + excess(held.bytes.capacity()) + excess(self.sending_room.get())
        };
        let before = self.charged_buffers.replace(now);
        self.budget.change(&self.budget.work, before, now);
    }

    /// [`Output::recharge`] when a buffer has grown past what is charged (a cheap
    /// check while they stay within the room every connection keeps).
    fn recharge_if_grown(&self) {
        let grown = self.buf.borrow().capacity() > BUFFER_KEPT_BYTES
            || self.held.borrow().bytes.capacity() > BUFFER_KEPT_BYTES;
        if grown {
            self.recharge();
        }
    }

    /// Whether the connection has requests running or replies not yet sent.
    fn holds_work(&self) -> bool {
        self.in_flight.get() > 0 || self.pending_bytes() > 0
    }

    fn pending_bytes(&self) -> usize {
        self.buf.borrow().len() + self.sending_bytes.get() + self.held.borrow().bytes.len()
    }

    /// Whether more requests may be taken off the socket: output not over budget,
    /// counting what requests running as tasks will add (a held reply is already in
    /// `held.bytes`). This is backpressure for a client that does not read its replies;
    /// the in-flight limit is enforced per request, with an error (see `dispatch`).
    fn can_dispatch(&self, budget: usize) -> bool {
        self.pending_bytes() + self.running_reply_bytes.get() <= budget
    }

    /// Counts a request that starts running as a task or forwarded: its frame's bytes
    /// and the reply bytes it is expected to add.
    fn start_running(&self, frame_len: usize, reply_bytes: usize) {
        self.in_flight.set(self.in_flight.get() + 1);
        self.in_flight_bytes
            .set(self.in_flight_bytes.get() + frame_len);
        self.running_reply_bytes
            .set(self.running_reply_bytes.get() + reply_bytes);
        self.budget.add_work(frame_len + reply_bytes);
    }

    /// The counterpart of [`Output::start_running`], once its reply is in `buf`.
    fn end_running(&self, frame_len: usize, reply_bytes: usize) {
        self.in_flight.set(self.in_flight.get() - 1);
        self.in_flight_bytes
            .set(self.in_flight_bytes.get() - frame_len);
        self.running_reply_bytes
            .set(self.running_reply_bytes.get() - reply_bytes);
        self.budget.sub_work(frame_len + reply_bytes);
    }

    /// Whether a request frame of `len` bytes may start now: the frames of requests
    /// running as tasks (each holds a copy) stay under `bytes_max`, or none runs. This
    /// is backpressure, not an error: HELLO_OK announces no bytes limit.
    fn has_room_for(&self, len: usize, bytes_max: usize) -> bool {
        let running = self.in_flight_bytes.get();
        running == 0 || running + len <= bytes_max
    }
}

/// The reply bytes a connection may have waiting to be sent, or expected from the
/// requests it runs, before its reader stops reading (see [`Output::can_dispatch`]).
fn output_budget_bytes(config: &super::ServerConfig) -> usize {
    2 * config.frame_bytes_max
}

/// Answers a connection over the per-shard limit with an error frame, then closes it.
pub(crate) async fn refuse(mut stream: TcpStream) {
    let mut out = Vec::new();
    encode::error(
        &mut out,
        0,
        ErrorCode::Unavailable,
        "too many connections on this shard",
    );
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}

pub(crate) async fn serve(stream: TcpStream, shard: Rc<Shard>) {
    let config = &shard.config;
    let _ = stream.set_nodelay(true);
    // no glommio write timeout: the writer's deadline covers each batch (see deadline.rs)
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let output = Rc::new(Output {
        fd,
        // the output buffers and the read buffer take room on first use: an idle
        // connection holds only its read chunk
        buf: RefCell::new(Vec::new()),
        sending_bytes: Cell::new(0),
        ready: Notify::default(),
        drained: Notify::default(),
        closed: Cell::new(false),
        broken: Cell::new(false),
        broke: Notify::default(),
        in_flight: Cell::new(0),
        in_flight_bytes: Cell::new(0),
        running_reply_bytes: Cell::new(0),
        in_flight_done: Notify::default(),
        held: RefCell::default(),
        held_ready: Notify::default(),
        reading_done: Cell::new(false),
        budget: shard.conn_budget.clone(),
        charged_buffers: Cell::new(0),
        sending_room: Cell::new(0),
        finished: Cell::new(false),
    });
    let budget = &shard.conn_budget;
    // the output a client may leave unread before the reader pauses
    let output_budget = output_budget_bytes(config);
    let in_flight_bytes_max = IN_FLIGHT_FRAMES_OF_BYTES * config.frame_bytes_max;
    let deadlines = shard.sweeper.watch();
    let writer_task = {
        let output = output.clone();
        let deadlines = deadlines.clone();
        let deadline_per_batch = config.slow_client_timeout;
        glommio::spawn_local(async move {
            let mut sending = Vec::new();
            loop {
                if output.buf.borrow().is_empty() {
                    if output.closed.get() && output.in_flight.get() == 0 {
                        break;
                    }
                    output.ready.wait().await;
                    continue;
                }
                std::mem::swap(&mut *output.buf.borrow_mut(), &mut sending);
                output.sending_bytes.set(sending.len());
                output.sending_room.set(sending.capacity());
                output.recharge();
                // each WRITE_CHUNK_BYTES of the batch must go out within the slow-client
                // timeout (a deadline only when the socket does not take it at once): a
                // client that keeps reading is never cut off, however big the batch
                let mut sent = Ok(());
                for chunk in sending.chunks(WRITE_CHUNK_BYTES) {
                    let mut write = std::pin::pin!(writer.write_all(chunk));
                    sent = match futures_lite::future::poll_once(&mut write).await {
                        Some(sent) => sent,
                        None => {
                            deadlines.write.arm(Instant::now() + deadline_per_batch);
                            let sent = futures_lite::future::or(write, async {
                                deadlines.write.expired().await;
                                Err(std::io::ErrorKind::TimedOut.into())
                            })
                            .await;
                            deadlines.write.disarm();
                            sent
                        }
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                output.sending_bytes.set(0);
                output.drained.notify_all();
                if sent.is_err() {
                    output.broken.set(true);
                    output.closed.set(true);
                    output.drained.notify_all();
                    output.broke.notify_all();
                    break;
                }
                sending.clear();
                if sending.capacity() > BUFFER_KEPT_BYTES {
                    sending = Vec::new();
                }
                output.sending_room.set(0);
                output.recharge();
            }
            let _ = writer.flush().await;
            let _ = writer.close().await;
        })
    };

    let acker_task = glommio::spawn_local(ack_held(output.clone(), shard.clone()));

    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    // when the first byte of the frame now being received arrived
    let mut frame_started: Option<Instant> = None;
    let mut forwards = Forwards::new(config.shards);
    // what `buf`'s room is charged in the budget's reads part
    let charged_reads = Cell::new(0);
    let charge_reads = |buf: &Vec<u8>| {
        let now = excess(buf.capacity());
        budget.change(&budget.reads, charged_reads.replace(now), now);
    };
    // `buf` holds room taken for a frame bigger than BUFFER_KEPT_BYTES
    let frame_room = Cell::new(false);
    'read: loop {
        // take every whole frame already buffered
        let mut consumed = 0;
        let mut broken = false;
        // when the pass took its first frame, and the requests it answered at once
        let mut pass_started: Option<Instant> = None;
        let mut answered = [0u32; OPS.len()];
        // the pass stopped because the shard's connections hold too much work
        let mut over_budget = None;
        loop {
            if !output.can_dispatch(output_budget) {
                // backpressure: the rest waits in `buf` until replies drain
                break;
            }
            match protocol::check_frame(&buf[consumed..], config.frame_bytes_max) {
                Ok(None) => break,
                Ok(Some(len)) => {
                    if !output.has_room_for(len, in_flight_bytes_max) {
                        // backpressure: it waits in `buf` until running requests end
                        break;
                    }
                    // replies answered at once in this pass are charged as they grow
                    // past the room every connection keeps, so that the budget stops a
                    // pass of big cached gets too
                    output.recharge_if_grown();
                    let frame = &buf[consumed..consumed + len];
                    let started = *pass_started.get_or_insert_with(Instant::now);
                    let taken = dispatch(
                        frame,
                        started,
                        &shard,
                        &output,
                        &mut forwards,
                        &mut answered,
                    );
                    if let Err(wait) = taken {
                        over_budget = Some(wait);
                        break;
                    }
                    consumed += len;
                }
                Err(err) => {
                    let request_id = if buf.len() - consumed >= protocol::HEADER_BYTES {
                        protocol::header(&buf[consumed..]).request_id
                    } else {
                        0
                    };
                    let code = match err {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
                        FrameError::TooShort(_) => ErrorCode::BadRequest,
                    };
                    encode::error(
                        &mut output.buf.borrow_mut(),
                        request_id,
                        code,
                        &err.to_string(),
                    );
                    if err.resynchronisable() {
                        let len = protocol::header(&buf[consumed..]).frame_len as usize;
                        consumed += len;
                        continue;
                    }
                    broken = true;
                    break;
                }
            }
        }
        if let Some(started) = pass_started {
            shard.latencies.borrow_mut().record_pass(&answered, started);
        }
        // what this pass read for other shards goes out, one message per shard; the
        // replies this pass answered at once go out together, now, or with the first
        // forwarded replies when it forwarded any (their task flushes as they arrive):
        // one send instead of two for a pipeline that spans both shards
        if !forwards.send(&shard, &output) {
            output.flush();
        }
        if broken {
            break 'read;
        }
        buf.drain(..consumed);
        // room taken for a big frame is kept until that frame is off the buffer; then
        // one big frame does not keep its room for the life of the connection
        let big_frame_len = big_frame_declared(&buf);
        if big_frame_len.is_none_or(|len| buf.capacity() < len) {
            if buf.capacity() > BUFFER_KEPT_BYTES && buf.len() <= BUFFER_KEPT_BYTES {
                buf.shrink_to(BUFFER_KEPT_BYTES);
            }
            budget.release_frame_room(&frame_room);
        }
        charge_reads(&buf);
        output.recharge();
        let checked = protocol::check_frame(&buf, config.frame_bytes_max);
        let waiting_frame_len = match checked {
            Ok(Some(len)) => Some(len),
            _ => None,
        };
        // a whole frame, or bytes the next pass answers with an error at once: either
        // way nothing more needs to be read first (a bad frame left behind by a pass
        // that stopped at its budget must not wait for bytes the client never sends)
        let whole_frame_waiting = !matches!(checked, Ok(None));
        frame_started = match (buf.is_empty() || whole_frame_waiting, consumed > 0) {
            (true, _) => None,
            (false, true) => Some(Instant::now()),
            (false, false) => frame_started.or(Some(Instant::now())),
        };
        if output.broken.get() || shard.stopping.get() {
            break;
        }
        if let Some(wait) = over_budget {
            // not bounded by a timeout: whatever holds the work ends by itself
            let ready = || match wait {
                RoomFor::Task => !budget.work_over(),
                RoomFor::Any => !budget.work_over() || !output.holds_work(),
            };
            budget.wait_until(&shard, &output, ready).await;
            continue;
        }
        // backpressure: wait (bounded) for replies to drain or requests to finish
        // before taking or reading more
        let blocked = || {
            !output.can_dispatch(output_budget)
                || waiting_frame_len
                    .is_some_and(|len| !output.has_room_for(len, in_flight_bytes_max))
        };
        if blocked() {
            let waited = glommio::timer::timeout(config.slow_client_timeout, async {
                while blocked() && !output.broken.get() {
                    futures_lite::future::or(output.drained.wait(), output.in_flight_done.wait())
                        .await;
                }
                Ok(())
            })
            .await;
            if waited.is_err() || output.broken.get() {
                break;
            }
            continue;
        }
        if whole_frame_waiting {
            // the pass stopped at its budget and sending the replies freed room
            // (replies sent from this task leave no writer to wake the reader)
            glommio::yield_if_needed().await;
            continue;
        }
        // a frame started must finish within the slow-client timeout counted from its
        // first byte
        let overdue = frame_started.map(|t| t + config.slow_client_timeout);
        if overdue.is_some_and(|at| at <= Instant::now()) {
            break;
        }
        // a frame bigger than the room every connection keeps takes its room from the
        // budget whole before more of it is read, and nothing past it is read into that
        // room (so the buffer never grows past the frame)
        let mut want = READ_CHUNK_BYTES;
        if let Some(frame_len) = big_frame_len {
            if buf.capacity() < frame_len {
                let needed = excess(frame_len) - excess(buf.capacity());
                // a peer's frame takes its room at once (see ConnBudget)
                if !budget.admits_frame(needed) && !cluster_frame(&buf) {
                    budget
                        .wait_until(&shard, &output, || budget.admits_frame(needed))
                        .await;
                    // the wait was the node's, not the client's: the frame's time
                    // starts again (meanwhile the connection held only its chunk)
                    frame_started = Some(Instant::now());
                    continue;
                }
                buf.reserve_exact(frame_len - buf.len());
                budget.hold_frame_room(&frame_room);
                charge_reads(&buf);
            }
            want = (frame_len - buf.len()).min(READ_CHUNK_BYTES);
        }
        let mut read = std::pin::pin!(reader.read(&mut chunk[..want]));
        let read = match futures_lite::future::poll_once(&mut read).await {
            Some(read) => Some(read),
            None => {
                // nothing to read yet: idle connections wait long
                deadlines
                    .read
                    .arm(overdue.unwrap_or_else(|| Instant::now() + config.idle_timeout));
                // a deadline, shutdown or a failed writer end the read at once
                let writer_failed = async {
                    while !output.broken.get() {
                        output.broke.wait().await;
                    }
                };
                let interrupted = deadlines
                    .read
                    .expired()
                    .or(shard.stop.wait())
                    .or(writer_failed);
                let read = async { Some(read.await) }
                    .or(async {
                        interrupted.await;
                        None
                    })
                    .await;
                deadlines.read.disarm();
                read
            }
        };
        match read {
            None | Some(Ok(0)) | Some(Err(_)) => break,
            Some(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                charge_reads(&buf);
            }
        }
    }
    drop(buf);
    budget.change(&budget.reads, charged_reads.take(), 0);
    budget.release_frame_room(&frame_room);
    // let requests already running answer, then the writer drains and closes
    let deadline = Instant::now() + shard.config.drain_timeout;
    while output.in_flight.get() > 0 && Instant::now() < deadline {
        let _ = glommio::timer::timeout(Duration::from_millis(100), async {
            output.in_flight_done.wait().await;
            Ok(())
        })
        .await;
    }
    output.closed.set(true);
    output.reading_done.set(true);
    output.held_ready.notify_all();
    acker_task.await;
    output.ready.notify_all();
    writer_task.await;
    output.finished.set(true);
    output.recharge();
}

/// The length the frame at the start of `buf` declares, when its header has arrived and
/// it is bigger than the room every connection keeps.
fn big_frame_declared(buf: &[u8]) -> Option<usize> {
    let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    (len > BUFFER_KEPT_BYTES).then_some(len)
}

/// Whether the frame at the start of `buf` is a cluster request (by its opcode, when
/// that has arrived).
fn cluster_frame(buf: &[u8]) -> bool {
    buf.get(5)
        .is_some_and(|&opcode| ringkv_net::peer::is_cluster_opcode(opcode))
}

/// Sends each held reply once the commit log covers its write: waits for the oldest
/// one (leading a group commit when none runs), then releases every reply covered.
/// Ends when the connection is closing and nothing is held.
async fn ack_held(output: Rc<Output>, shard: Rc<Shard>) {
    loop {
        let oldest = output
            .held
            .borrow()
            .replies
            .front()
            .map(|r| (r.partition.clone(), r.position));
        let Some((partition, position)) = oldest else {
            // not `closed`: a failed writer sets that while the reader may still hold
            // one more reply
            if output.reading_done.get() {
                return;
            }
            output.held_ready.wait().await;
            continue;
        };
        let synced = partition.wait_logged(position).await;
        let released = {
            let mut out = output.buf.borrow_mut();
            let mut held = output.held.borrow_mut();
            let failed = synced.err().map(|e| {
                |out: &mut Vec<u8>, request_id| shard.reply_held_failed(out, request_id, e)
            });
            held.release(&mut out, failed, &mut shard.latencies.borrow_mut())
        };
        output.in_flight.set(output.in_flight.get() - released);
        output.flush();
        output.in_flight_done.notify_all();
    }
}

/// Why a frame was left in the read buffer: the shard's connections hold more work
/// than its budget allows (see [`dispatch`]).
#[derive(Clone, Copy)]
enum RoomFor {
    /// A get that runs as a task or is forwarded: it waits until work is under the
    /// budget.
    Task,
    /// Any request: this connection itself holds work; it may go on once that is sent
    /// or the budget has room.
    Any,
}

/// Runs, holds, forwards or refuses one request frame; `started` is when the pass took
/// its first frame, and a request answered at once is counted in `answered` (the pass
/// records their latencies together).
///
/// While the shard's connections hold more work than the budget ([`ConnBudget`]), a
/// connection that holds none may still have a request answered at once (a get only
/// when its reply fits the room every connection keeps) or one that is not a get run
/// (its reply is small; its task holds a copy of its frame, which was admitted as it
/// was read); anything else but a cluster request is left in the buffer (`Err`) until
/// room is freed. So a client that reads its replies is still served while
/// others that do not hold the budget, and each connection adds at most one such
/// request's reply past it.
fn dispatch(
    frame: &[u8],
    started: Instant,
    shard: &Rc<Shard>,
    output: &Rc<Output>,
    forwards: &mut Forwards,
    answered: &mut [u32; OPS.len()],
) -> Result<(), RoomFor> {
    let header = protocol::header(frame);
    // peer links' requests are charged but never wait (see ConnBudget)
    let over_budget =
        shard.conn_budget.work_over() && !ringkv_net::peer::is_cluster_opcode(header.opcode);
    if over_budget && output.holds_work() {
        return Err(RoomFor::Any);
    }
    let (request_id, op) = (header.request_id, Op::of(header.opcode));
    // the reader flushes what its pass answered
    let refuse = |code: ErrorCode, message: &str| {
        encode::error(&mut output.buf.borrow_mut(), request_id, code, message);
    };
    if shard.stopping.get() {
        refuse(ErrorCode::ShuttingDown, "the node is shutting down");
        return Ok(());
    }
    if output.in_flight.get() >= shard.config.in_flight_per_connection_max {
        // the count HELLO_OK announced: a client that keeps to it is never refused
        // (the server stops counting a request before the client does)
        refuse(
            ErrorCode::TooManyInFlight,
            &format!(
                "more than {} requests in flight on this connection",
                shard.config.in_flight_per_connection_max
            ),
        );
        return Ok(());
    }
    if over_budget
        && op == Some(Op::Get)
        && get_reply_size(frame, shard).is_none_or(|bytes| bytes > BUFFER_KEPT_BYTES)
    {
        // past the budget, a get is answered at once only when its reply fits the room
        // every connection keeps: thousands of connections that each leave one big
        // cached reply unread would otherwise hold gigabytes past it
        return Err(RoomFor::Task);
    }
    {
        let mut held = output.held.borrow_mut();
        match shard.try_execute_now(frame, &output.buf, &mut held.bytes) {
            Now::Later => {}
            Now::Answered => {
                shard.stats.borrow_mut().requests += 1;
                if let Some(op) = op {
                    answered[op as usize] += 1;
                }
                return Ok(());
            }
            Now::Held {
                partition,
                position,
            } => {
                shard.stats.borrow_mut().requests += 1;
                let end = held.released + held.bytes.len();
                held.replies.push_back(HeldReply {
                    partition,
                    position,
                    request_id,
                    end,
                    op,
                    started,
                });
                output.in_flight.set(output.in_flight.get() + 1);
                output.held_ready.notify_all();
                return Ok(());
            }
        }
    }
    if over_budget && matches!(op, Some(Op::Get | Op::ReplicaGet)) {
        return Err(RoomFor::Task);
    }
    let output_budget = output_budget_bytes(&shard.config);
    if let Some(owner) = shard.forward_target(frame) {
        let charge = reply_charge(op, None, output_budget);
        output.start_running(frame.len(), charge);
        let batch = &mut forwards.by_shard[owner];
        if batch.frames.capacity() == 0 {
            // room for the replies too: the owner writes them into this buffer when
            // they fit, so it comes back to be freed here
            batch.frames.reserve(BATCH_BUFFER_BYTES);
        }
        batch.frames.extend_from_slice(frame);
        batch.requests.push(Forwarded {
            request_id,
            op,
            started,
            len: frame.len(),
            charge,
            answered: false,
        });
        return Ok(());
    }
    // a get of a key on this shard: what its records hold (its values, and a little
    // more), so that gets of big values do not all start at once
    let sized = match op {
        Some(Op::Get) => get_reply_size(frame, shard),
        // a peer's read of this node's own copy: sized by it whatever the replication
        // (peer links carry many at once: 16 at a time would hold up their puts)
        Some(Op::ReplicaGet) => match ringkv_net::peer::ClusterRequest::parse(frame) {
            Ok((_, ringkv_net::peer::ClusterRequest::ReplicaGet { partition, key })) => shard
                .local_value_records(partition, key)
                .map(|(versions, bytes)| bytes + 1024 + 256 * versions),
            _ => None,
        },
        _ => None,
    };
    let reply_bytes = reply_charge(op, sized, output_budget);
    output.start_running(frame.len(), reply_bytes);
    let frame = frame.to_vec();
    let (shard, output) = (shard.clone(), output.clone());
    glommio::spawn_local(async move {
        shard.execute(&frame, &output.buf).await;
        if let Some(op) = op {
            shard.latencies.borrow_mut().record(op, started);
        }
        output.end_running(frame.len(), reply_bytes);
        output.recharge();
        // not flushed here: replies of tasks that end in the same turn go out together
        output.ready.notify_all();
        output.in_flight_done.notify_all();
    })
    .detach();
    Ok(())
}

/// The most bytes the reply to the get in `frame` needs: what its key's records on
/// this shard hold, with room for the context, on a node whose replica alone answers
/// ([`Shard::stored_value_records`]); `None` when this shard cannot size it.
fn get_reply_size(frame: &[u8], shard: &Shard) -> Option<usize> {
    Request::parse(frame)
        .ok()
        .and_then(|(_, request)| shard.stored_value_records(request.key()?))
        .map(|(_, bytes)| bytes + 1024)
}

/// Room a forwarded batch's buffer starts with: its requests, and then the replies
/// the owner writes into it when they fit.
const BATCH_BUFFER_BYTES: usize = 16 * 1024;

/// Requests one pass over the read buffer found for partitions other shards own, by
/// owning shard: each shard's go over the mesh as one message, and one task takes
/// their replies (instead of a task, a message and a reply message per request).
struct Forwards {
    by_shard: Vec<Batch>,
}

#[derive(Default)]
struct Batch {
    /// The request frames, back to back.
    frames: Vec<u8>,
    requests: Vec<Forwarded>,
}

struct Forwarded {
    request_id: u64,
    op: Option<Op>,
    started: Instant,
    /// Its frame's length (counted in the connection's in-flight bytes).
    len: usize,
    /// The reply bytes it is charged while it runs ([`reply_charge`]).
    charge: usize,
    answered: bool,
}

impl Forwards {
    fn new(shards: usize) -> Self {
        Forwards {
            by_shard: (0..shards).map(|_| Batch::default()).collect(),
        }
    }

    /// Starts a task per shard that has requests waiting, with those requests; true if
    /// it started any.
    fn send(&mut self, shard: &Rc<Shard>, output: &Rc<Output>) -> bool {
        let mut sent = false;
        for (owner, batch) in self.by_shard.iter_mut().enumerate() {
            if batch.requests.is_empty() {
                continue;
            }
            let batch = std::mem::take(batch);
            shard.count_forwarded(batch.requests.len());
            glommio::spawn_local(forward_batch(shard.clone(), output.clone(), owner, batch))
                .detach();
            sent = true;
        }
        sent
    }
}

/// Forwards one batch and writes each reply to the connection as it arrives; the
/// requests left without one when forwarding fails get error replies.
async fn forward_batch(shard: Rc<Shard>, output: Rc<Output>, owner: usize, batch: Batch) {
    let Batch {
        frames,
        mut requests,
    } = batch;
    let count = requests.len();
    let mut answered = 0;
    // replies usually come in request order: look from the oldest unanswered
    let mut oldest = 0;
    let finish = |requests: &mut [Forwarded], i: usize, latencies: &mut Latencies| {
        let request = &mut requests[i];
        request.answered = true;
        if let Some(op) = request.op {
            latencies.record(op, request.started);
        }
        output.end_running(request.len, request.charge);
    };
    let result = shard
        .forward_batch(owner, frames, count, |replies| {
            let mut out = output.buf.borrow_mut();
            let mut latencies = shard.latencies.borrow_mut();
            for reply in protocol::frames(replies) {
                let id = protocol::header(reply).request_id;
                while oldest < count && requests[oldest].answered {
                    oldest += 1;
                }
                // a reply to no request of this batch cannot come from the owner;
                // dropping it beats sending the client a reply it never asked for
                let Some(i) = (oldest..count)
                    .find(|&i| !requests[i].answered && requests[i].request_id == id)
                else {
                    continue;
                };
                out.extend_from_slice(reply);
                finish(&mut requests, i, &mut latencies);
                answered += 1;
            }
            drop(out);
            output.flush();
            output.in_flight_done.notify_all();
            answered == count
        })
        .await;
    if let Err((code, message)) = result {
        let mut out = output.buf.borrow_mut();
        let mut latencies = shard.latencies.borrow_mut();
        for i in 0..count {
            if !requests[i].answered {
                encode::error(&mut out, requests[i].request_id, code, message);
                finish(&mut requests, i, &mut latencies);
            }
        }
        drop(out);
        output.flush();
        output.in_flight_done.notify_all();
    }
}

//! The tokio client (feature `tokio`): the typed API of [`crate::client`], async.
//! [`AsyncClient`] is one connection that many tasks share; [`AsyncPool`] spreads tasks
//! over several connections to one node, reopening closed ones; [`AsyncShardAwareClient`]
//! sends each key straight to the shard that owns it.
//!
//! On one connection: A writer task sends the frames callers queue (several
//! per write when they pile up); a reader task matches each reply to its caller by request
//! id through a map of oneshot channels, so replies may come back in any order.
//!
//! At most `in_flight_window` requests are outstanding (the server's `in_flight_max` less
//! one, kept for the liveness PING below); a request counts until its reply arrives, even
//! if its caller timed out or went away, so the server's `in_flight_max` is never
//! exceeded. A timeout fails only its own request, unless the server has gone
//! silent: when a request times out and nothing at all has arrived for a request timeout,
//! one PING goes out, and if nothing answers it within another request timeout the
//! connection is closed (so [`AsyncPool`] and [`AsyncShardAwareClient`] open a new one
//! instead of handing out a connection that never answers). An I/O error or a malformed
//! reply closes the connection and fails every outstanding request with
//! [`ClientError::Closed`]; nothing is written after the connection closed (a request
//! made then fails with [`ClientError::NotSent`]).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at};

use crate::client::{
    accept_hello, check_request, deadline_after, delete_request, put_request, settle, shard_config,
    ClientConfig, ClientError, Context, Expect, OwnedReply, PutOutcome, ReplyBuffer, Response,
    Routing, ShardSlot, Versions, SHARD_RETRY_INTERVAL,
};
use crate::protocol::{HelloOk, Request, FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION};

/// Most frames the writer gathers into one write.
const WRITE_BATCH_FRAMES_MAX: usize = 64;
/// The writer stops gathering frames once a write holds this many bytes.
const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;

type ReplySender = oneshot::Sender<Result<OwnedReply, ClientError>>;
type ReplyReceiver = oneshot::Receiver<Result<OwnedReply, ClientError>>;

/// A request waiting for its reply; its window permit is released with it (a liveness
/// PING has none: it goes past the window).
struct Waiter {
    reply: ReplySender,
    _permit: Option<OwnedSemaphorePermit>,
}

struct Pending {
    waiting: HashMap<u64, Waiter>,
    /// Why the connection is closed, once it is.
    closed: Option<String>,
    /// When bytes last arrived from the server (the connect's HELLO_OK at first).
    last_read: Instant,
    /// The request id of the last liveness PING (see [`AsyncClient::suspect_silence`]);
    /// it is out while its waiter is in `waiting`.
    probe: Option<u64>,
}

/// What the caller side and the two tasks share.
struct Shared {
    pending: Mutex<Pending>,
    window: Arc<Semaphore>,
    /// `pending.closed` is set (read without the lock).
    closed: AtomicBool,
    /// Woken when the connection closes: the reader and the writer stop, mid-write too.
    closing: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // every change under the lock is a single insert, remove or assignment, so a
        // panic elsewhere cannot leave it half-done
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Completes once the connection is closed, at once if it already is: for the
    /// reader and the writer to stop with, mid-read or mid-write.
    async fn closed(&self) {
        let closing = self.closing.notified();
        tokio::pin!(closing);
        // registered before the check: a close after it wakes `closing`
        closing.as_mut().enable();
        if self.is_closed() {
            return;
        }
        closing.await;
    }

    /// Closes the connection: every waiting request fails with `reason` (`Closed`), and
    /// every later one too (`NotSent`).
    fn close(&self, reason: String) {
        let waiting = {
            let mut pending = self.lock();
            if pending.closed.is_some() {
                return;
            }
            pending.closed = Some(reason.clone());
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut pending.waiting)
        };
        self.window.close();
        self.closing.notify_waiters();
        for (_, waiter) in waiting {
            let _ = waiter.reply.send(Err(ClientError::Closed(reason.clone())));
        }
    }
}

struct Inner {
    hello: HelloOk,
    peer: SocketAddr,
    config: ClientConfig,
    next_request_id: AtomicU64,
    frames: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// A connection to a node that many tasks may use at once (clone it: clones share the
/// connection). The tasks end when the last clone is dropped.
#[derive(Clone)]
pub struct AsyncClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for AsyncClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncClient")
            .field("peer", &self.inner.peer)
            .field("hello", &self.inner.hello)
            .field("closed", &self.inner.shared.lock().closed)
            .finish()
    }
}

async fn read_reply_before(
    stream: &mut TcpStream,
    replies: &mut ReplyBuffer,
    config: &ClientConfig,
) -> Result<(u64, OwnedReply), ClientError> {
    let read = async {
        // Bounded: each read adds at least one byte to a frame of bounded size; the
        // timeout around this ends the wait.
        loop {
            if let Some(got) = replies.next_reply(config.reply_frame_bytes_max)? {
                return Ok(got);
            }
            match stream.read(replies.spare()).await? {
                0 => return Err(ClientError::Closed("server closed the connection".into())),
                n => replies.filled(n),
            }
        }
    };
    timeout(config.request_timeout, read)
        .await
        .unwrap_or(Err(ClientError::Timeout))
}

impl AsyncClient {
    /// Connects to the first address of `addr` that answers and negotiates protocol v1.
    /// Must be called inside a tokio runtime (it spawns the reader and writer tasks).
    pub async fn connect(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
    ) -> Result<AsyncClient, ClientError> {
        let addrs = resolve(addr).await?;
        Self::connect_any(&addrs, &config).await
    }

    /// Connects to the first of `addrs` that answers.
    async fn connect_any(addrs: &[SocketAddr], config: &ClientConfig) -> Result<Self, ClientError> {
        let mut last = ClientError::NoAddress("address resolved to nothing".into());
        for &addr in addrs {
            match Self::connect_addr(addr, config.clone()).await {
                Ok(client) => return Ok(client),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn connect_addr(addr: SocketAddr, config: ClientConfig) -> Result<Self, ClientError> {
        let mut stream = timeout(config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout)??;
        stream.set_nodelay(true)?;
        let hello_request = Request::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        };
        // not 0: the server sends connection-level errors with request id 0
        let hello_request_id = 1;
        let mut frame = Vec::new();
        check_request(&hello_request, FRAME_BYTES_MAX_DEFAULT)?;
        hello_request.encode(hello_request_id, &mut frame);
        timeout(config.request_timeout, stream.write_all(&frame))
            .await
            .map_err(|_| ClientError::Timeout)??;
        let mut replies = ReplyBuffer::new();
        let (request_id, reply) = read_reply_before(&mut stream, &mut replies, &config).await?;
        if request_id != hello_request_id {
            return Err(ClientError::Protocol(format!(
                "HELLO answered with request id {request_id}"
            )));
        }
        let hello = accept_hello(reply)?;
        // one of the server's in-flight slots is kept for the liveness PING (see
        // `suspect_silence`), so that it never pushes a request over the server's limit
        let window_size = config
            .in_flight_max
            .min(hello.in_flight_max.saturating_sub(1))
            .max(1) as usize;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                waiting: HashMap::new(),
                closed: None,
                last_read: Instant::now(),
                probe: None,
            }),
            window: Arc::new(Semaphore::new(window_size)),
            closed: AtomicBool::new(false),
            closing: Notify::new(),
        });
        let (read_half, write_half) = stream.into_split();
        let (frames, frames_rx) = mpsc::channel(window_size);
        let reader = tokio::spawn(read_loop(
            read_half,
            replies,
            config.reply_frame_bytes_max,
            shared.clone(),
        ));
        let writer = tokio::spawn(write_loop(
            write_half,
            frames_rx,
            config.request_timeout,
            shared.clone(),
        ));
        Ok(AsyncClient {
            inner: Arc::new(Inner {
                hello,
                peer: addr,
                config,
                next_request_id: AtomicU64::new(hello_request_id + 1),
                frames,
                shared,
                reader,
                writer,
            }),
        })
    }

    pub fn hello(&self) -> &HelloOk {
        &self.inner.hello
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer
    }

    /// Whether the connection is closed (every call now fails with
    /// [`ClientError::NotSent`]).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.lock().closed.is_some()
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call(Request::Ping).await.map(|_| ())
    }

    pub async fn get(&self, key: &[u8]) -> Result<Versions, ClientError> {
        self.get_with(key, 0).await
    }

    /// A get that waits for `r` replicas (0: the cluster default).
    pub async fn get_with(&self, key: &[u8], r: u8) -> Result<Versions, ClientError> {
        versions_of(self.call(Request::Get { r, key }).await)
    }

    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        context: Option<&Context>,
    ) -> Result<PutOutcome, ClientError> {
        self.put_with(key, value, context, 0).await
    }

    /// A put that waits for `w` acknowledgements (0: the cluster default).
    pub async fn put_with(
        &self,
        key: &[u8],
        value: &[u8],
        context: Option<&Context>,
        w: u8,
    ) -> Result<PutOutcome, ClientError> {
        outcome_of(self.call(put_request(key, value, context, w)).await)
    }

    pub async fn delete(&self, key: &[u8], context: Option<&Context>) -> Result<(), ClientError> {
        self.delete_with(key, context, 0).await
    }

    /// A delete that waits for `w` acknowledgements (0: the cluster default).
    pub async fn delete_with(
        &self,
        key: &[u8],
        context: Option<&Context>,
        w: u8,
    ) -> Result<(), ClientError> {
        self.call(delete_request(key, context, w)).await.map(|_| ())
    }

    /// Gets many keys: every request is queued before the first reply is awaited.
    pub async fn get_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Vec<Result<Versions, ClientError>> {
        let requests = get_requests(keys).map(|r| (self.clone(), r));
        batch_over(requests)
            .await
            .into_iter()
            .map(versions_of)
            .collect()
    }

    /// Puts many (key, value) pairs without context, all queued before any reply is awaited.
    pub async fn put_many<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        items: &[(K, V)],
    ) -> Vec<Result<PutOutcome, ClientError>> {
        let requests = put_requests(items).map(|r| (self.clone(), r));
        batch_over(requests)
            .await
            .into_iter()
            .map(outcome_of)
            .collect()
    }

    async fn call(&self, request: Request<'_>) -> Result<Response, ClientError> {
        let expect = Expect::of(&request);
        let rx = self.submit(request).await?;
        self.wait(rx, expect, self.deadline()).await
    }

    /// When a request queued now times out.
    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(deadline_after(self.inner.config.request_timeout))
    }

    /// Called when a request timed out: if nothing at all has arrived from the server
    /// for a request timeout, sends one PING past the window (any reply to it, an
    /// ERROR included, shows the server alive), and closes the connection when nothing
    /// arrives for another request timeout. A server that is merely slow with some
    /// requests keeps the connection; one that stopped (a frozen process, a host gone
    /// without a FIN) loses it, so pools reopen it rather than keep handing it out.
    fn suspect_silence(&self) {
        let inner = &*self.inner;
        let quiet = inner.config.request_timeout;
        let request_id = inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let sent_at = {
            let mut pending = inner.shared.lock();
            // a server that allows one request in flight has no slot for the PING, and
            // one PING at a time keeps to the one slot kept for it (a PING whose answer
            // is late is still out)
            let probe_out = pending
                .probe
                .is_some_and(|id| pending.waiting.contains_key(&id));
            if pending.closed.is_some()
                || probe_out
                || pending.last_read.elapsed() < quiet
                || inner.hello.in_flight_max <= 1
            {
                return;
            }
            pending.probe = Some(request_id);
            pending.waiting.insert(
                request_id,
                Waiter {
                    reply: tx,
                    _permit: None,
                },
            );
            Instant::now()
        };
        let mut frame = Vec::new();
        Request::Ping.encode(request_id, &mut frame);
        let shared = inner.shared.clone();
        if inner.frames.try_send(frame).is_err() {
            // the writer has a window of frames still to write: its own write timeout
            // closes a connection whose server stopped reading
            let mut pending = shared.lock();
            pending.waiting.remove(&request_id);
            return;
        }
        tokio::spawn(async move {
            let answered = timeout(quiet, rx).await.is_ok();
            let silent = {
                let pending = shared.lock();
                // the waiter stays otherwise: its PONG may still come (the server answers
                // PING in a task; a busy shard can take longer), and a reply that no
                // waiter expects would close the connection
                !answered && pending.last_read < sent_at
            };
            if silent {
                shared.close(format!(
                    "the server sent nothing for {:?}, not even a reply to a PING",
                    sent_at.elapsed() + quiet
                ));
            }
        });
    }

    /// Queues one request for the writer; the receiver gets its reply.
    async fn submit(&self, request: Request<'_>) -> Result<ReplyReceiver, ClientError> {
        let inner = &*self.inner;
        check_request(&request, inner.hello.frame_bytes_max as usize)?;
        let request_id = inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        request.encode(request_id, &mut frame);
        // never queued: nothing was written
        let closed = || ClientError::NotSent(self.closed_reason());
        let wait = async {
            let permit = inner
                .shared
                .window
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| closed())?;
            let slot = inner.frames.reserve().await.map_err(|_| closed())?;
            Ok::<_, ClientError>((permit, slot))
        };
        let Ok(waited) = timeout(inner.config.request_timeout, wait).await else {
            self.suspect_silence();
            return Err(ClientError::Timeout);
        };
        let (permit, slot) = waited?;
        let (tx, rx) = oneshot::channel();
        {
            // registered and queued with no await in between, so a caller that goes away
            // cannot leave a request registered but never sent
            let mut pending = inner.shared.lock();
            if let Some(reason) = &pending.closed {
                return Err(ClientError::NotSent(reason.clone()));
            }
            pending.waiting.insert(
                request_id,
                Waiter {
                    reply: tx,
                    _permit: Some(permit),
                },
            );
        }
        slot.send(frame);
        Ok(rx)
    }

    /// Waits for the reply `rx` brings until `deadline` (counted from when the request
    /// was queued).
    async fn wait(
        &self,
        rx: ReplyReceiver,
        expect: Option<Expect>,
        deadline: tokio::time::Instant,
    ) -> Result<Response, ClientError> {
        let reply = match timeout_at(deadline, rx).await {
            Err(_) => {
                self.suspect_silence();
                return Err(ClientError::Timeout);
            }
            Ok(Err(_)) => return Err(ClientError::Closed(self.closed_reason())),
            Ok(Ok(reply)) => reply?,
        };
        let expect = expect.ok_or_else(|| ClientError::Protocol("HELLO after connect".into()))?;
        let result = settle(reply, expect);
        if let Err(e @ ClientError::Protocol(_)) = &result {
            self.inner.shared.close(e.to_string());
        }
        result
    }

    fn closed_reason(&self) -> String {
        self.inner
            .shared
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| "connection closed".into())
    }
}

fn mismatch(response: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response {response:?}"))
}

fn versions_of(response: Result<Response, ClientError>) -> Result<Versions, ClientError> {
    match response? {
        Response::Get(versions) => Ok(versions),
        other => Err(mismatch(other)),
    }
}

fn outcome_of(response: Result<Response, ClientError>) -> Result<PutOutcome, ClientError> {
    match response? {
        Response::Put(outcome) => Ok(outcome),
        other => Err(mismatch(other)),
    }
}

fn get_requests<K: AsRef<[u8]>>(keys: &[K]) -> impl Iterator<Item = Request<'_>> {
    keys.iter().map(|k| Request::Get {
        r: 0,
        key: k.as_ref(),
    })
}

fn put_requests<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    items: &[(K, V)],
) -> impl Iterator<Item = Request<'_>> {
    items.iter().map(|(k, v)| Request::Put {
        w: 0,
        key: k.as_ref(),
        context: &[],
        value: v.as_ref(),
    })
}

async fn resolve(addr: impl ToSocketAddrs) -> Result<Vec<SocketAddr>, ClientError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr).await?.collect();
    if addrs.is_empty() {
        return Err(ClientError::NoAddress("address resolved to nothing".into()));
    }
    Ok(addrs)
}

/// Queues every request on the connection paired with it before awaiting any reply, then
/// collects the replies in request order. A request that could not be queued fails alone;
/// once one times out waiting for room on its connection, the later ones for that
/// connection fail at once (they are never sent). Each request's timeout counts from when
/// it was queued, so a batch against a silent server ends about one request timeout after
/// its last request was queued, not one per request.
async fn batch_over<'r>(
    requests: impl Iterator<Item = (AsyncClient, Request<'r>)>,
) -> Vec<Result<Response, ClientError>> {
    let mut submitted = Vec::new();
    let mut stalled: Vec<*const Inner> = Vec::new();
    for (client, request) in requests {
        let connection = Arc::as_ptr(&client.inner);
        if stalled.contains(&connection) {
            submitted.push(Err(ClientError::Timeout));
            continue;
        }
        let expect = Expect::of(&request);
        let queued = client.submit(request).await;
        if matches!(queued, Err(ClientError::Timeout)) {
            stalled.push(connection);
        }
        let deadline = client.deadline();
        submitted.push(queued.map(|rx| (client, rx, expect, deadline)));
    }
    let mut results = Vec::with_capacity(submitted.len());
    for s in submitted {
        results.push(match s {
            Ok((client, rx, expect, deadline)) => client.wait(rx, expect, deadline).await,
            Err(e) => Err(e),
        });
    }
    results
}

/// Up to `size` connections to one node, shared by many tasks: [`AsyncPool::client`]
/// hands them out in turn (each is itself shared by any number of tasks), opening a
/// connection on its slot's first use and reopening one that closed. With SO_REUSEPORT
/// on the server, the connections spread over its shards. Clones share the pool.
#[derive(Clone)]
pub struct AsyncPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    addrs: Vec<SocketAddr>,
    config: ClientConfig,
    hello: HelloOk,
    slots: Vec<tokio::sync::Mutex<Option<AsyncClient>>>,
    next: AtomicUsize,
}

impl fmt::Debug for AsyncPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncPool")
            .field("addrs", &self.inner.addrs)
            .field("size", &self.inner.slots.len())
            .finish()
    }
}

impl AsyncPool {
    /// A pool of at most `size` connections (at least 1) to `addr`. One connection is
    /// opened now, so a wrong address fails here; the others on first use.
    pub async fn new(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
        size: usize,
    ) -> Result<AsyncPool, ClientError> {
        let addrs = resolve(addr).await?;
        let first = AsyncClient::connect_any(&addrs, &config).await?;
        let hello = *first.hello();
        let mut slots: Vec<_> = (1..size.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        slots.insert(0, tokio::sync::Mutex::new(Some(first)));
        Ok(AsyncPool {
            inner: Arc::new(PoolInner {
                addrs,
                config,
                hello,
                slots,
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// The HELLO_OK of the pool's first connection.
    pub fn hello(&self) -> &HelloOk {
        &self.inner.hello
    }

    pub fn size(&self) -> usize {
        self.inner.slots.len()
    }

    /// Connections open now (not counting one being opened or used by a caller of
    /// [`AsyncPool::client`] at this instant).
    pub fn open_count(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|slot| {
                slot.try_lock()
                    .is_ok_and(|c| c.as_ref().is_some_and(|c| !c.is_closed()))
            })
            .count()
    }

    /// The next connection in turn, opened (or reopened, if it closed) now if need be.
    /// A request that failed on a connection is never resent by the pool.
    pub async fn client(&self) -> Result<AsyncClient, ClientError> {
        let inner = &*self.inner;
        let i = inner.next.fetch_add(1, Ordering::Relaxed) % inner.slots.len();
        let mut slot = inner.slots[i].lock().await;
        match &*slot {
            Some(client) if !client.is_closed() => Ok(client.clone()),
            _ => {
                let client = AsyncClient::connect_any(&inner.addrs, &inner.config).await?;
                *slot = Some(client.clone());
                Ok(client)
            }
        }
    }
}

/// A client that sends each key to the shard owning it, like the blocking
/// [`ShardAwareClient`](crate::client::ShardAwareClient): after the first HELLO it opens
/// one connection per shard, to `shard_port_base + s` on the same host, and routes a key
/// to shard `partition_for_key(key, partitions) % shards`. Without shard ports (or when a
/// shard cannot be reached) requests go through the main connection, and the server
/// forwards them. A closed connection is reopened before the next request that needs it
/// (a request that failed is never resent); a shard connection that could not be opened
/// is tried again after 1 s, backing off to once a minute while it fails. Clones share the connections; every method
/// takes `&self`, so any number of tasks use it at once.
#[derive(Clone)]
pub struct AsyncShardAwareClient {
    inner: Arc<ShardAwareInner>,
}

struct ShardAwareInner {
    main_addrs: Vec<SocketAddr>,
    config: ClientConfig,
    main: tokio::sync::Mutex<MainSlot>,
    /// The node's shard layout as the main connection last saw it; replaced whenever
    /// the main connection is reopened (with the same shard connections when the shard
    /// layout did not change).
    layout: std::sync::RwLock<Arc<Layout>>,
}

/// The main connection, and when a request routed to a shard may next try to reopen it
/// (a request that needs the main connection itself always tries).
struct MainSlot {
    client: AsyncClient,
    retry_at: std::time::Instant,
}

/// How keys are routed: what a main connection's HELLO_OK said, and the shard
/// connections opened by it.
struct Layout {
    hello: HelloOk,
    peer: SocketAddr,
    routing: Option<Routing>,
    /// One per shard when routing; without a client, that shard is reached through
    /// `main`.
    shards: Arc<Vec<tokio::sync::Mutex<ShardSlot<AsyncClient>>>>,
}

impl ShardAwareInner {
    fn layout(&self) -> Arc<Layout> {
        self.layout
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl fmt::Debug for AsyncShardAwareClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layout = self.inner.layout();
        f.debug_struct("AsyncShardAwareClient")
            .field("main", &layout.peer)
            .field("routing", &layout.routing)
            .finish()
    }
}

/// Which connection a request goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Main,
    Shard(u16),
}

impl AsyncShardAwareClient {
    pub async fn connect(
        addr: impl ToSocketAddrs,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let main_addrs = resolve(addr).await?;
        let main = AsyncClient::connect_any(&main_addrs, &config).await?;
        let mut layout = Layout::of(&main, &config, None);
        // the first connection to every shard is opened now
        let mut shards = Vec::with_capacity(layout.shards.len());
        for s in 0..layout.shards.len() {
            let client = connect_shard(&layout.hello, layout.peer, &config, s as u16).await;
            shards.push(tokio::sync::Mutex::new(ShardSlot::new(client)));
        }
        layout.shards = Arc::new(shards);
        Ok(AsyncShardAwareClient {
            inner: Arc::new(ShardAwareInner {
                main_addrs,
                config,
                main: tokio::sync::Mutex::new(MainSlot {
                    client: main,
                    retry_at: std::time::Instant::now(),
                }),
                layout: std::sync::RwLock::new(Arc::new(layout)),
            }),
        })
    }

    /// The HELLO_OK of the main connection (the latest one, if it was reopened).
    pub fn hello(&self) -> HelloOk {
        self.inner.layout().hello
    }

    /// The shard a key belongs to on this node, when the node has shard ports.
    pub fn shard_for_key(&self, key: &[u8]) -> Option<u16> {
        self.inner.layout().routing.map(|r| r.shard_for_key(key))
    }

    /// Shard connections open now (0 without shard routing; a connection in use by a
    /// caller reopening it at this instant is not counted).
    pub fn shard_connection_count(&self) -> usize {
        self.inner
            .layout()
            .shards
            .iter()
            .filter(|slot| slot.try_lock().is_ok_and(|c| c.client.is_some()))
            .count()
    }

    /// The layout to route by. A closed main connection is reopened first, since the
    /// node may have come back with another shard layout, unless another task holds it
    /// (reopening it or using it) or an attempt failed less than a second ago: a request
    /// its shard connection can serve does not wait for the main connection.
    async fn current_layout(&self) -> Arc<Layout> {
        let inner = &*self.inner;
        if let Ok(mut main) = inner.main.try_lock() {
            if main.client.is_closed() && std::time::Instant::now() >= main.retry_at {
                if let Ok(reopened) =
                    AsyncClient::connect_any(&inner.main_addrs, &inner.config).await
                {
                    self.adopt_main(&mut main, reopened);
                } else {
                    main.retry_at = std::time::Instant::now() + SHARD_RETRY_INTERVAL;
                }
            }
        }
        inner.layout()
    }

    /// Makes `reopened` the main connection and routes by what its HELLO_OK says: the
    /// same shard connections if the shard layout is the same, new ones otherwise.
    fn adopt_main(&self, main: &mut MainSlot, reopened: AsyncClient) {
        let inner = &*self.inner;
        let old = inner.layout();
        let same = Routing::same_layout(
            (&old.hello, old.peer),
            (reopened.hello(), reopened.peer_addr()),
        );
        let fresh = Layout::of(&reopened, &inner.config, same.then(|| old.shards.clone()));
        *inner.layout.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        main.client = reopened;
    }

    fn route(layout: &Layout, key: &[u8]) -> Route {
        match layout.routing {
            Some(routing) => Route::Shard(routing.shard_for_key(key)),
            None => Route::Main,
        }
    }

    /// The connection for `route` in `layout`, reopening it if it closed. While a shard
    /// connection cannot be reopened (tried after 1 s, backing off to 60 s), that shard's keys go
    /// through the main connection.
    async fn connection(&self, layout: &Layout, route: Route) -> Result<AsyncClient, ClientError> {
        let inner = &*self.inner;
        if let Route::Shard(s) = route {
            let shard = &layout.shards[usize::from(s)];
            let attempt = {
                let mut slot = shard.lock().await;
                if slot.should_reopen(AsyncClient::is_closed) {
                    // the slot is not held across the connect: other requests for this
                    // shard go through the main connection meanwhile
                    slot.attempting();
                    true
                } else if let Some(client) = &slot.client {
                    return Ok(client.clone());
                } else {
                    false
                }
            };
            if attempt {
                let client = connect_shard(&layout.hello, layout.peer, &inner.config, s).await;
                let mut slot = shard.lock().await;
                slot.reopened(client);
                if let Some(client) = &slot.client {
                    return Ok(client.clone());
                }
            }
        }
        let mut main = inner.main.lock().await;
        if main.client.is_closed() {
            let reopened = AsyncClient::connect_any(&inner.main_addrs, &inner.config).await?;
            self.adopt_main(&mut main, reopened);
        }
        Ok(main.client.clone())
    }

    /// The connection that `key` goes through.
    async fn connection_for(&self, key: &[u8]) -> Result<AsyncClient, ClientError> {
        let layout = self.current_layout().await;
        self.connection(&layout, Self::route(&layout, key)).await
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        let layout = self.current_layout().await;
        self.connection(&layout, Route::Main).await?.ping().await
    }

    pub async fn get(&self, key: &[u8]) -> Result<Versions, ClientError> {
        self.get_with(key, 0).await
    }

    /// A get that waits for `r` replicas (0: the cluster default).
    pub async fn get_with(&self, key: &[u8], r: u8) -> Result<Versions, ClientError> {
        self.connection_for(key).await?.get_with(key, r).await
    }

    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        context: Option<&Context>,
    ) -> Result<PutOutcome, ClientError> {
        self.put_with(key, value, context, 0).await
    }

    /// A put that waits for `w` acknowledgements (0: the cluster default).
    pub async fn put_with(
        &self,
        key: &[u8],
        value: &[u8],
        context: Option<&Context>,
        w: u8,
    ) -> Result<PutOutcome, ClientError> {
        let client = self.connection_for(key).await?;
        client.put_with(key, value, context, w).await
    }

    pub async fn delete(&self, key: &[u8], context: Option<&Context>) -> Result<(), ClientError> {
        self.delete_with(key, context, 0).await
    }

    /// A delete that waits for `w` acknowledgements (0: the cluster default).
    pub async fn delete_with(
        &self,
        key: &[u8],
        context: Option<&Context>,
        w: u8,
    ) -> Result<(), ClientError> {
        let client = self.connection_for(key).await?;
        client.delete_with(key, context, w).await
    }

    /// Gets many keys, each on its shard's connection; every request is queued before
    /// the first reply is awaited. A connection that cannot be had fails only the keys
    /// routed to it.
    pub async fn get_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Vec<Result<Versions, ClientError>> {
        let routed = self.routed(get_requests(keys)).await;
        self.run_routed(routed)
            .await
            .into_iter()
            .map(versions_of)
            .collect()
    }

    /// Puts many (key, value) pairs without context, each on its shard's connection, all
    /// queued before any reply is awaited.
    pub async fn put_many<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        items: &[(K, V)],
    ) -> Vec<Result<PutOutcome, ClientError>> {
        let routed = self.routed(put_requests(items)).await;
        self.run_routed(routed)
            .await
            .into_iter()
            .map(outcome_of)
            .collect()
    }

    /// Pairs each request with its connection (each distinct route looked up once).
    async fn routed<'r>(
        &self,
        requests: impl Iterator<Item = Request<'r>>,
    ) -> Vec<(Result<AsyncClient, String>, Request<'r>)> {
        let layout = self.current_layout().await;
        let mut connections: Vec<(Route, Result<AsyncClient, String>)> = Vec::new();
        let mut routed = Vec::new();
        for request in requests {
            let route = match &request {
                Request::Get { key, .. }
                | Request::Put { key, .. }
                | Request::Delete { key, .. } => Self::route(&layout, key),
                _ => Route::Main,
            };
            let connection = match connections.iter().find(|(r, _)| *r == route) {
                Some((_, c)) => c.clone(),
                None => {
                    let c = self
                        .connection(&layout, route)
                        .await
                        .map_err(|e| e.to_string());
                    connections.push((route, c.clone()));
                    c
                }
            };
            routed.push((connection, request));
        }
        routed
    }

    async fn run_routed<'r>(
        &self,
        routed: Vec<(Result<AsyncClient, String>, Request<'r>)>,
    ) -> Vec<Result<Response, ClientError>> {
        let failed: Vec<Option<String>> = routed.iter().map(|(c, _)| c.clone().err()).collect();
        let sendable = routed
            .into_iter()
            .filter_map(|(c, request)| c.ok().map(|c| (c, request)));
        let mut sent = batch_over(sendable).await.into_iter();
        failed
            .into_iter()
            .map(|failure| match failure {
                Some(reason) => Err(ClientError::Closed(reason)),
                None => sent
                    .next()
                    .unwrap_or_else(|| Err(ClientError::Protocol("no result".into()))),
            })
            .collect()
    }
}

impl Layout {
    /// The layout `main`'s HELLO_OK describes, with `shards` (those of a layout that is
    /// the same) or shard connections to be opened on first use.
    fn of(
        main: &AsyncClient,
        config: &ClientConfig,
        shards: Option<Arc<Vec<tokio::sync::Mutex<ShardSlot<AsyncClient>>>>>,
    ) -> Layout {
        let hello = *main.hello();
        let routing = Routing::from_hello(&hello, config.shard_connections_max);
        let shards = shards.unwrap_or_else(|| {
            Arc::new(
                (0..routing.map_or(0, |r| r.shards()))
                    .map(|_| tokio::sync::Mutex::new(ShardSlot::due_now()))
                    .collect(),
            )
        });
        Layout {
            hello,
            peer: main.peer_addr(),
            routing,
            shards,
        }
    }
}

/// A connection to shard `s` of the node `main` describes, if it answers as that shard.
async fn connect_shard(
    main: &HelloOk,
    main_peer: SocketAddr,
    config: &ClientConfig,
    s: u16,
) -> Option<AsyncClient> {
    let addr = Routing::shard_addr(main, main_peer, s)?;
    // the connect and the HELLO together within SHARD_CONNECT_TIMEOUT; the connection
    // then keeps the client's own timeouts
    let connect = AsyncClient::connect_addr(addr, config.clone());
    let client = timeout(shard_config(config).request_timeout, connect)
        .await
        .ok()?
        .ok()?;
    Routing::is_shard_of(main, client.hello(), s).then_some(client)
}

/// Reads replies and hands each to its waiter until the connection ends.
async fn read_loop(
    mut read_half: OwnedReadHalf,
    mut replies: ReplyBuffer,
    reply_frame_bytes_max: usize,
    shared: Arc<Shared>,
) {
    // Runs for the life of the connection: ends on EOF, an error, the connection closing,
    // or when the client is dropped (the task is aborted).
    let reason = 'connection: loop {
        // Bounded by the bytes buffered: each pass consumes one whole frame.
        loop {
            match replies.next_reply(reply_frame_bytes_max) {
                Ok(None) => break,
                Ok(Some((request_id, reply))) => {
                    let waiter = shared.lock().waiting.remove(&request_id);
                    match (waiter, reply) {
                        (Some(waiter), reply) => {
                            // the caller may have timed out or gone away: nothing to do
                            let _ = waiter.reply.send(Ok(reply));
                        }
                        (None, OwnedReply::Error { code, message }) => {
                            break 'connection ClientError::from_server(code, message).to_string();
                        }
                        (None, _) => {
                            break 'connection format!(
                                "protocol error: reply for unknown request id {request_id}"
                            );
                        }
                    }
                }
                Err(e) => break 'connection e.to_string(),
            }
        }
        let read = tokio::select! {
            biased;
            // closed by a caller (a malformed reply, a silent server) or the writer
            () = shared.closed() => return,
            read = read_half.read(replies.spare()) => read,
        };
        match read {
            Ok(0) => break "server closed the connection".to_string(),
            Ok(n) => {
                replies.filled(n);
                shared.lock().last_read = Instant::now();
            }
            Err(e) => break ClientError::Io(e).to_string(),
        }
    };
    shared.close(reason);
}

/// Writes queued frames, gathering several into one write when they pile up.
async fn write_loop(
    mut write_half: OwnedWriteHalf,
    mut frames: mpsc::Receiver<Vec<u8>>,
    write_timeout: Duration,
    shared: Arc<Shared>,
) {
    let mut batch: Vec<u8> = Vec::new();
    // Runs until every sender (the client) is gone, a write fails, or the connection
    // closed: a request failed with `Closed` that is still queued is never sent (its
    // caller may send it again elsewhere), and a write under way when it closes stops.
    // Ending shuts the socket's sending side, so the server sees the close.
    loop {
        let frame = tokio::select! {
            biased;
            () = shared.closed() => break,
            frame = frames.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
        };
        if batch.capacity() > 2 * WRITE_BATCH_BYTES_MAX {
            // one big frame does not pin its buffer for the life of the connection
            batch = Vec::new();
        }
        batch.clear();
        batch.extend_from_slice(&frame);
        for _ in 1..WRITE_BATCH_FRAMES_MAX {
            if batch.len() >= WRITE_BATCH_BYTES_MAX {
                break;
            }
            match frames.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let write = async {
            tokio::select! {
                biased;
                () = shared.closed() => None,
                written = write_half.write_all(&batch) => Some(written),
            }
        };
        match timeout(write_timeout, write).await {
            Ok(None) => break,
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => {
                shared.close(ClientError::Io(e).to_string());
                return;
            }
            Err(_) => {
                shared.close("timed out writing to the server".into());
                return;
            }
        }
    }
    let _ = write_half.shutdown().await;
}

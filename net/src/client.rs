//! The blocking client: one TCP connection per [`Client`] with requests pipelined over it,
//! a [`Pool`] of such connections, and a [`ShardAwareClient`] that sends each key straight
//! to the shard that owns it. Everything here is `std::net` (non-blocking sockets that a
//! call waits on with `poll(2)`, so a pipeline reads replies while it writes); the tokio
//! client is `async_client` (feature `tokio`) and shares the reply buffer and the typed
//! results.
//!
//! A connection that saw an I/O error, a timeout or a malformed reply cannot be trusted
//! to be in step with the server any more: it is closed and every later call on it returns
//! [`ClientError::NotSent`] (nothing is written). An ERROR reply from the server only
//! fails its own request.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::protocol::{
    check_frame, ErrorCode, HelloOk, Reply, Request, FRAME_BYTES_MAX_DEFAULT, HEADER_BYTES,
    PROTOCOL_VERSION,
};

/// Default largest reply frame a client accepts: a GET may carry several 4 MiB siblings.
pub const REPLY_FRAME_BYTES_MAX_DEFAULT: usize = 64 << 20;

/// Request bytes a pipelined batch encodes ahead of what the socket has taken: it goes
/// on reading replies meanwhile, so a server that stops reading until its replies are
/// read (backpressure) never waits on a client that is stuck writing.
const WRITE_AHEAD_BYTES: usize = 256 * 1024;

/// The smallest timeout handed to the socket (the OS refuses a zero timeout).
const SOCKET_TIMEOUT_MIN: Duration = Duration::from_millis(1);

/// Bytes the reply buffer reads at a time, and the size it shrinks back to.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// How a client connects, waits and limits itself.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Longest wait for the TCP connection to be set up (per address tried).
    pub connect_timeout: Duration,
    /// Longest wait for a request to be written, and for each reply to arrive.
    /// In a pipeline, the wait restarts with every reply received and whenever the
    /// socket takes more request bytes.
    pub request_timeout: Duration,
    /// Largest reply frame accepted; a larger one closes the connection.
    pub reply_frame_bytes_max: usize,
    /// Most requests outstanding on one connection; the window used is the smaller of
    /// this and the server's `in_flight_max`.
    pub in_flight_max: u32,
    /// Most per-shard connections a [`ShardAwareClient`] opens; a node with more shards
    /// is reached through its main connection only.
    pub shard_connections_max: u16,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            reply_frame_bytes_max: REPLY_FRAME_BYTES_MAX_DEFAULT,
            in_flight_max: 128,
            shard_connections_max: 256,
        }
    }
}

/// An ERROR code as received: one this client knows, or a newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerCode {
    Known(ErrorCode),
    Unknown(u16),
}

impl ServerCode {
    pub fn from_u16(code: u16) -> Self {
        match ErrorCode::from_u16(code) {
            Some(known) => ServerCode::Known(known),
            None => ServerCode::Unknown(code),
        }
    }

    pub fn as_u16(self) -> u16 {
        match self {
            ServerCode::Known(known) => known as u16,
            ServerCode::Unknown(code) => code,
        }
    }
}

impl fmt::Display for ServerCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerCode::Known(known) => write!(f, "{known:?} ({})", *known as u16),
            ServerCode::Unknown(code) => write!(f, "unknown code {code}"),
        }
    }
}

/// Everything a client call can fail with.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The connect, a write or a reply took longer than configured; a write may or may
    /// not have been applied. The blocking client closes the connection; the async
    /// client keeps it (the timeout fails only its request) unless the server has sent
    /// nothing at all for a request timeout and does not answer a PING either.
    #[error("timed out")]
    Timeout,
    /// The server answered the request with an ERROR reply.
    #[error("server error {code}: {message}")]
    Server { code: ServerCode, message: String },
    /// The server could not gather W acknowledgements in time: the write may or may not
    /// be applied. Reading the key tells which.
    #[error("write not confirmed, it may or may not be applied: {message}")]
    NotConfirmed { message: String },
    /// The server sent something that is not protocol v1; the connection is closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection was closed, by the server or after an earlier error. A request
    /// that was already written when it closed may or may not have been applied (read
    /// the key to tell); nothing is written after it closed.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The request was never written: the connection was already closed (the reason
    /// given), or failed before the request's turn in a batch. It was not applied and
    /// may be sent again, on another connection.
    #[error("not sent, the connection is closed: {0}")]
    NotSent(String),
    /// The request cannot be sent: a field or the whole frame is over its limit.
    #[error("{field} of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge {
        field: &'static str,
        len_bytes: usize,
        max_bytes: usize,
    },
    #[error("address {0} resolved to nothing")]
    NoAddress(String),
}

impl ClientError {
    /// Whether the error leaves the blocking client's connection unusable (as opposed
    /// to failing only the request: an ERROR reply, a request over a limit). The async
    /// client keeps its connection after a `Timeout`; its `is_closed` tells.
    pub fn breaks_connection(&self) -> bool {
        matches!(
            self,
            ClientError::Io(_)
                | ClientError::Timeout
                | ClientError::Protocol(_)
                | ClientError::Closed(_)
                | ClientError::NotSent(_)
        )
    }

    /// The server's error code, for an ERROR reply.
    pub fn server_code(&self) -> Option<ServerCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            ClientError::NotConfirmed { .. } => Some(ServerCode::Known(ErrorCode::NotConfirmed)),
            _ => None,
        }
    }

    pub(crate) fn from_server(code: u16, message: String) -> Self {
        if code == ErrorCode::NotConfirmed as u16 {
            ClientError::NotConfirmed { message }
        } else {
            ClientError::Server {
                code: ServerCode::from_u16(code),
                message,
            }
        }
    }

    fn from_io(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
            io::ErrorKind::UnexpectedEof => {
                ClientError::Closed("server closed the connection".into())
            }
            _ => ClientError::Io(e),
        }
    }
}

/// The opaque causal context of a key, as returned by a get or a put; handed back on a
/// put or delete, it says which versions the new one supersedes. Empty means "none".
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Context(Vec<u8>);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ContextHexError {
    #[error("hex context has an odd length ({0})")]
    OddLength(usize),
    #[error("hex context has a non-hex character at byte {0}")]
    BadDigit(usize),
}

impl Context {
    pub fn empty() -> Self {
        Self(Vec::new())
    }

    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len_bytes(&self) -> usize {
        self.0.len()
    }

    /// Lowercase hex, two digits a byte (for command lines and logs).
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(self.0.len() * 2);
        for &b in &self.0 {
            out.push(DIGITS[usize::from(b >> 4)] as char);
            out.push(DIGITS[usize::from(b & 0x0f)] as char);
        }
        out
    }

    /// Parses [`Context::to_hex`] output (either case). Surrounding whitespace is ignored.
    pub fn from_hex(text: &str) -> Result<Self, ContextHexError> {
        let text = text.trim().as_bytes();
        if text.len() % 2 != 0 {
            return Err(ContextHexError::OddLength(text.len()));
        }
        fn digit(c: u8, at: usize) -> Result<u8, ContextHexError> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(ContextHexError::BadDigit(at)),
            }
        }
        let mut out = Vec::with_capacity(text.len() / 2);
        for (i, pair) in text.chunks_exact(2).enumerate() {
            out.push(digit(pair[0], 2 * i)? << 4 | digit(pair[1], 2 * i + 1)?);
        }
        Ok(Self(out))
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a get returns: the values of all live siblings and one context covering them.
/// No values means the key is absent (or deleted; the context then covers the tombstone).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions {
    pub values: Vec<Vec<u8>>,
    pub context: Context,
}

impl Versions {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// More than one causally concurrent value: the caller should reconcile them and put
    /// the result with [`Versions::context`].
    pub fn has_siblings(&self) -> bool {
        self.values.len() > 1
    }
}

/// What a put returns: a context covering every sibling the key has now, and how many
/// there are (1 when the put superseded everything). With more than one sibling the
/// context also covers concurrent values this client has not read: a put with it
/// replaces them unseen, so `get` first when they must be reconciled (docs/protocol.md,
/// PUT_OK).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOutcome {
    pub context: Context,
    pub siblings: u16,
}

/// The result of one request of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Pong,
    Get(Versions),
    Put(PutOutcome),
    Deleted,
}

/// A reply copied out of its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OwnedReply {
    HelloOk(HelloOk),
    Pong,
    GetOk(Versions),
    PutOk(PutOutcome),
    DeleteOk,
    Error { code: u16, message: String },
}

impl OwnedReply {
    fn from_reply(reply: Reply<'_>) -> Self {
        match reply {
            Reply::HelloOk(hello) => OwnedReply::HelloOk(hello),
            Reply::Pong => OwnedReply::Pong,
            Reply::GetOk { context, values } => OwnedReply::GetOk(Versions {
                values: values.into_iter().map(<[u8]>::to_vec).collect(),
                context: Context::from_bytes(context),
            }),
            Reply::PutOk { context, siblings } => OwnedReply::PutOk(PutOutcome {
                context: Context::from_bytes(context),
                siblings,
            }),
            Reply::DeleteOk => OwnedReply::DeleteOk,
            Reply::Error { code, message } => OwnedReply::Error {
                code,
                message: String::from_utf8_lossy(message).into_owned(),
            },
        }
    }
}

/// The reply a request kind expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    Pong,
    Get,
    Put,
    Delete,
}

impl Expect {
    pub(crate) fn of(request: &Request<'_>) -> Option<Self> {
        match request {
            Request::Hello { .. } => None,
            Request::Ping => Some(Expect::Pong),
            Request::Get { .. } => Some(Expect::Get),
            Request::Put { .. } => Some(Expect::Put),
            Request::Delete { .. } => Some(Expect::Delete),
        }
    }
}

/// Turns a reply into the typed result of a request that expected `expect`. A reply of the
/// wrong kind is a [`ClientError::Protocol`] error (the caller closes the connection).
pub(crate) fn settle(reply: OwnedReply, expect: Expect) -> Result<Response, ClientError> {
    match (reply, expect) {
        (OwnedReply::Error { code, message }, _) => Err(ClientError::from_server(code, message)),
        (OwnedReply::Pong, Expect::Pong) => Ok(Response::Pong),
        (OwnedReply::GetOk(versions), Expect::Get) => Ok(Response::Get(versions)),
        (OwnedReply::PutOk(outcome), Expect::Put) => Ok(Response::Put(outcome)),
        (OwnedReply::DeleteOk, Expect::Delete) => Ok(Response::Deleted),
        (other, expect) => Err(ClientError::Protocol(format!(
            "expected a reply to {expect:?}, got {}",
            reply_name(&other)
        ))),
    }
}

fn reply_name(reply: &OwnedReply) -> &'static str {
    match reply {
        OwnedReply::HelloOk(_) => "HELLO_OK",
        OwnedReply::Pong => "PONG",
        OwnedReply::GetOk(_) => "GET_OK",
        OwnedReply::PutOk(_) => "PUT_OK",
        OwnedReply::DeleteOk => "DELETE_OK",
        OwnedReply::Error { .. } => "ERROR",
    }
}

/// Checks a HELLO answer: protocol v1 and limits that make sense.
pub(crate) fn accept_hello(reply: OwnedReply) -> Result<HelloOk, ClientError> {
    match reply {
        OwnedReply::HelloOk(hello) => {
            if hello.version != PROTOCOL_VERSION {
                return Err(ClientError::Protocol(format!(
                    "server chose protocol version {} but this client speaks only {}",
                    hello.version, PROTOCOL_VERSION
                )));
            }
            if (hello.frame_bytes_max as usize) < HEADER_BYTES {
                return Err(ClientError::Protocol(format!(
                    "server frame limit {} is below the {HEADER_BYTES}-byte header",
                    hello.frame_bytes_max
                )));
            }
            Ok(hello)
        }
        OwnedReply::Error { code, message } => Err(ClientError::from_server(code, message)),
        other => Err(ClientError::Protocol(format!(
            "expected HELLO_OK, got {}",
            reply_name(&other)
        ))),
    }
}

/// The size of the frame `request` encodes to, after checking each field fits its
/// length prefix and the frame fits `frame_bytes_max`. Nothing is encoded that fails.
pub(crate) fn check_request(
    request: &Request<'_>,
    frame_bytes_max: usize,
) -> Result<usize, ClientError> {
    fn field(name: &'static str, bytes: &[u8], max_bytes: usize) -> Result<usize, ClientError> {
        if bytes.len() > max_bytes {
            return Err(ClientError::TooLarge {
                field: name,
                len_bytes: bytes.len(),
                max_bytes,
            });
        }
        Ok(bytes.len())
    }
    const U16: usize = u16::MAX as usize;
    const U32: usize = u32::MAX as usize;
    let body_bytes = match *request {
        Request::Hello { .. } => 2,
        Request::Ping => 0,
        Request::Get { key, .. } => 1 + 2 + field("key", key, U16)?,
        Request::Put {
            key,
            context,
            value,
            ..
        } => {
            1 + 2
                + field("key", key, U16)?
                + 2
                + field("context", context, U16)?
                + 4
                + field("value", value, U32)?
        }
        Request::Delete { key, context, .. } => {
            1 + 2 + field("key", key, U16)? + 2 + field("context", context, U16)?
        }
    };
    let frame_bytes = HEADER_BYTES + body_bytes;
    if frame_bytes > frame_bytes_max {
        return Err(ClientError::TooLarge {
            field: "request frame",
            len_bytes: frame_bytes,
            max_bytes: frame_bytes_max,
        });
    }
    Ok(frame_bytes)
}

/// Bytes read from a connection that are not yet a whole reply. Holds at most one partial
/// frame (bounded by the reply frame limit) plus one read chunk.
#[derive(Debug)]
pub(crate) struct ReplyBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReplyBuffer {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0; READ_CHUNK_BYTES],
            start: 0,
            end: 0,
        }
    }

    /// The next whole reply with its request id, if one is buffered. An error means the
    /// stream cannot be trusted any more.
    pub(crate) fn next_reply(
        &mut self,
        frame_bytes_max: usize,
    ) -> Result<Option<(u64, OwnedReply)>, ClientError> {
        let pending = &self.buf[self.start..self.end];
        let frame_bytes = match check_frame(pending, frame_bytes_max) {
            Ok(None) => return Ok(None),
            Ok(Some(n)) => n,
            Err(e) => return Err(ClientError::Protocol(format!("reply refused: {e}"))),
        };
        let frame = &pending[..frame_bytes];
        let (header, reply) = Reply::parse(frame)
            .map_err(|e| ClientError::Protocol(format!("malformed reply: {e}")))?;
        let owned = OwnedReply::from_reply(reply);
        self.start += frame_bytes;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > 16 * READ_CHUNK_BYTES {
                // give back the memory of a large reply
                self.buf.truncate(READ_CHUNK_BYTES);
                self.buf.shrink_to_fit();
            }
        }
        Ok(Some((header.request_id, owned)))
    }

    /// Free space to read into (at least one chunk), after moving buffered bytes to the
    /// front. Call [`ReplyBuffer::filled`] with how much was read.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < READ_CHUNK_BYTES {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < READ_CHUNK_BYTES {
            self.buf.resize(self.end + READ_CHUNK_BYTES, 0);
        }
        &mut self.buf[self.end..]
    }

    pub(crate) fn filled(&mut self, n: usize) {
        assert!(self.end + n <= self.buf.len());
        self.end += n;
    }

    /// Bytes buffered that are not a whole reply yet.
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.end - self.start
    }
}

/// Resolves `addr` to the socket addresses to try, in order.
pub(crate) fn resolve(
    addr: impl ToSocketAddrs + fmt::Debug,
) -> Result<Vec<SocketAddr>, ClientError> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(ClientError::NoAddress(format!("{addr:?}")));
    }
    Ok(addrs)
}

/// `d` from now; a timeout too long for the clock (`Duration::MAX` for "no timeout")
/// is a century.
pub(crate) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn socket_timeout(d: Duration) -> Duration {
    d.max(SOCKET_TIMEOUT_MIN)
}

/// One connection to a node (or one shard of it), negotiated with HELLO.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    peer: SocketAddr,
    config: ClientConfig,
    hello: HelloOk,
    next_request_id: u64,
    replies: ReplyBuffer,
    write_buf: Vec<u8>,
    /// Why the connection cannot be used any more, once it cannot.
    broken: Option<String>,
}

impl Client {
    /// Connects to the first address of `addr` that answers, then negotiates protocol v1.
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Debug,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        Self::connect_any(&resolve(addr)?, config)
    }

    /// Tries each address in turn; the error is the last address's.
    pub fn connect_any(addrs: &[SocketAddr], config: ClientConfig) -> Result<Client, ClientError> {
        let mut last = ClientError::NoAddress("empty address list".into());
        for &addr in addrs {
            match Self::connect_addr(addr, config.clone()) {
                Ok(client) => return Ok(client),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn connect_addr(addr: SocketAddr, config: ClientConfig) -> Result<Client, ClientError> {
        let stream = TcpStream::connect_timeout(&addr, socket_timeout(config.connect_timeout))
            .map_err(ClientError::from_io)?;
        stream.set_nodelay(true)?;
        // every read and write waits in `exchange`, which reads while it writes
        stream.set_nonblocking(true)?;
        let mut client = Client {
            stream,
            peer: addr,
            config,
            // a placeholder until the server's answer: limits for the HELLO itself
            hello: HelloOk {
                version: PROTOCOL_VERSION,
                node_id: 0,
                partitions: 0,
                shards: 0,
                shard: 0,
                shard_port_base: 0,
                frame_bytes_max: FRAME_BYTES_MAX_DEFAULT as u32,
                in_flight_max: 1,
            },
            next_request_id: 1,
            replies: ReplyBuffer::new(),
            write_buf: Vec::with_capacity(4096),
            broken: None,
        };
        let hello = Request::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        };
        let mut replies = client.exchange(1, |_| hello)?;
        let reply = match replies.pop() {
            Some(Ok(reply)) => reply,
            Some(Err(e)) => return Err(e),
            None => return Err(ClientError::Protocol("no reply to HELLO".into())),
        };
        match accept_hello(reply) {
            Ok(hello) => {
                client.hello = hello;
                Ok(client)
            }
            Err(e) => Err(client.close(e)),
        }
    }

    /// What the server said in its HELLO_OK: node id, partitions, shards, limits.
    pub fn hello(&self) -> &HelloOk {
        &self.hello
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Whether an earlier error closed the connection (every call now fails).
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Whether the connection can take a request: not broken, and not closed by the
    /// server while no request was outstanding (its idle timeout, a restart), which a
    /// non-blocking peek finds without sending anything. A connection the server closed,
    /// or that holds bytes no request asked for, is marked broken. Pools and the
    /// shard-aware client check this before handing a connection out, so a request is
    /// not sent on a connection already closed (it would fail with `Closed`, and a
    /// write's caller could not know it never ran).
    pub fn still_open(&mut self) -> bool {
        if self.broken.is_some() {
            return false;
        }
        let mut probe = [0u8; 1];
        // the socket is non-blocking: the peek returns at once
        match self.stream.peek(&mut probe) {
            Err(e) if would_wait(&e) => true,
            Ok(0) => {
                self.close_with("server closed the connection while it was idle".into());
                false
            }
            Ok(_) => {
                // a connection-level ERROR (shutdown) or a confused server: the stream
                // is not where a new request expects it
                self.close_with("server sent bytes no request asked for".into());
                false
            }
            Err(e) => {
                self.close_with(ClientError::from_io(e).to_string());
                false
            }
        }
    }

    /// Requests written before their replies are read: the smaller of the client's and
    /// the server's `in_flight_max` (at least 1).
    pub fn in_flight_window(&self) -> usize {
        self.config
            .in_flight_max
            .min(self.hello.in_flight_max)
            .max(1) as usize
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.one(Request::Ping).map(|_| ())
    }

    pub fn get(&mut self, key: &[u8]) -> Result<Versions, ClientError> {
        self.get_with(key, 0)
    }

    /// A get that waits for `r` replicas (0: the cluster default).
    pub fn get_with(&mut self, key: &[u8], r: u8) -> Result<Versions, ClientError> {
        match self.one(Request::Get { r, key })? {
            Response::Get(versions) => Ok(versions),
            other => Err(unreachable_kind(other)),
        }
    }

    /// Writes `value`; with `context` (from a get) it supersedes the versions the context
    /// covers, without one it becomes a sibling of whatever the key holds.
    pub fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        context: Option<&Context>,
    ) -> Result<PutOutcome, ClientError> {
        self.put_with(key, value, context, 0)
    }

    /// A put that waits for `w` acknowledgements (0: the cluster default).
    pub fn put_with(
        &mut self,
        key: &[u8],
        value: &[u8],
        context: Option<&Context>,
        w: u8,
    ) -> Result<PutOutcome, ClientError> {
        match self.one(put_request(key, value, context, w))? {
            Response::Put(outcome) => Ok(outcome),
            other => Err(unreachable_kind(other)),
        }
    }

    /// Writes a tombstone superseding what `context` covers.
    pub fn delete(&mut self, key: &[u8], context: Option<&Context>) -> Result<(), ClientError> {
        self.delete_with(key, context, 0)
    }

    /// A delete that waits for `w` acknowledgements (0: the cluster default).
    pub fn delete_with(
        &mut self,
        key: &[u8],
        context: Option<&Context>,
        w: u8,
    ) -> Result<(), ClientError> {
        self.one(delete_request(key, context, w)).map(|_| ())
    }

    /// Gets many keys with their requests pipelined. The outer error means the
    /// connection was already closed and nothing was sent; each inner result is that
    /// key's, and a connection that fails during the batch fails only the keys it had
    /// not answered yet.
    pub fn get_many<K: AsRef<[u8]>>(
        &mut self,
        keys: &[K],
    ) -> Result<Vec<Result<Versions, ClientError>>, ClientError> {
        let results = self.run(keys.len(), |i| Request::Get {
            r: 0,
            key: keys[i].as_ref(),
        })?;
        Ok(results
            .into_iter()
            .map(|r| match r? {
                Response::Get(versions) => Ok(versions),
                other => Err(unreachable_kind(other)),
            })
            .collect())
    }

    /// Puts many (key, value) pairs without context, pipelined. The outer error
    /// ([`ClientError::NotSent`]) means the connection was already closed and nothing
    /// was sent; each inner result is that pair's. If the connection fails during the
    /// batch, the puts it acknowledged keep their `Ok`, the ones in flight fail with the
    /// error (they may or may not be applied) and the ones never sent with
    /// [`ClientError::NotSent`].
    pub fn put_many<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        items: &[(K, V)],
    ) -> Result<Vec<Result<PutOutcome, ClientError>>, ClientError> {
        let results = self.run(items.len(), |i| Request::Put {
            w: 0,
            key: items[i].0.as_ref(),
            context: &[],
            value: items[i].1.as_ref(),
        })?;
        Ok(results
            .into_iter()
            .map(|r| match r? {
                Response::Put(outcome) => Ok(outcome),
                other => Err(unreachable_kind(other)),
            })
            .collect())
    }

    /// A batch of requests of any kind, sent pipelined by [`Pipeline::execute`].
    pub fn pipeline(&mut self) -> Pipeline<'_> {
        Pipeline {
            client: self,
            requests: Vec::new(),
        }
    }

    fn one(&mut self, request: Request<'_>) -> Result<Response, ClientError> {
        match self.run(1, |_| request)?.pop() {
            Some(result) => result,
            None => Err(ClientError::Protocol("no reply".into())),
        }
    }

    /// Sends `count` requests pipelined and turns each reply into its typed result.
    fn run<'r>(
        &mut self,
        count: usize,
        request_at: impl Fn(usize) -> Request<'r>,
    ) -> Result<Vec<Result<Response, ClientError>>, ClientError> {
        let replies = self.exchange(count, &request_at)?;
        let mut results = Vec::with_capacity(count);
        for (i, reply) in replies.into_iter().enumerate() {
            let result = match (reply, Expect::of(&request_at(i))) {
                (Ok(reply), Some(expect)) => settle(reply, expect),
                (Ok(_), None) => Err(ClientError::Protocol("HELLO inside a batch".into())),
                (Err(e), _) => Err(e),
            };
            match &result {
                Err(e @ ClientError::Protocol(_)) => {
                    // a reply of the wrong kind: the server is not speaking our protocol
                    let reason = e.to_string();
                    self.close_with(reason);
                }
                Err(e) if e.server_code() == Some(ServerCode::Known(ErrorCode::ShuttingDown)) => {
                    // the server closes this connection once it has drained: a pool
                    // must not hand it out again
                    let reason = e.to_string();
                    self.close_with(reason);
                }
                _ => {}
            }
            results.push(result);
        }
        Ok(results)
    }

    /// Writes `count` requests, at most [`Client::in_flight_window`] outstanding, and
    /// collects the replies, which may arrive in any order, by request id. A request over
    /// a limit fails alone without being sent.
    ///
    /// The outer error means the connection was closed before the batch, so nothing was
    /// sent. If the connection fails during the batch, the replies already received are
    /// kept: a caller must learn which writes were acknowledged. The requests still in
    /// flight get the failure (the first of them the error itself) and the ones never
    /// sent get [`ClientError::NotSent`].
    fn exchange<'r>(
        &mut self,
        count: usize,
        request_at: impl Fn(usize) -> Request<'r>,
    ) -> Result<Vec<Result<OwnedReply, ClientError>>, ClientError> {
        if let Some(reason) = &self.broken {
            return Err(ClientError::NotSent(reason.clone()));
        }
        let window = self.in_flight_window();
        let frame_bytes_max = self.hello.frame_bytes_max as usize;
        let mut results: Vec<Option<Result<OwnedReply, ClientError>>> =
            (0..count).map(|_| None).collect();
        let mut pending: HashMap<u64, usize> = HashMap::with_capacity(window.min(count));
        let mut next = 0;
        // bytes at the front of `write_buf` already written
        let mut written = 0;
        self.write_buf.clear();
        let reply_frame_bytes_max = self.config.reply_frame_bytes_max;
        // the wait restarts whenever a reply arrives or request bytes go out
        let mut deadline = deadline_after(self.config.request_timeout);
        // Bounded: a pass that neither writes, reads nor settles a reply waits in `poll`
        // until the socket is ready or the deadline has passed; every request is encoded
        // once and settled once.
        let outcome: Result<(), ClientError> = loop {
            // encode what the window allows, keeping at most WRITE_AHEAD_BYTES unsent
            // (and always one request, however large)
            while next < count
                && pending.len() < window
                && self.write_buf.len() - written < WRITE_AHEAD_BYTES
            {
                if written > 0 {
                    // drop what the socket took, so the buffer stays bounded
                    self.write_buf.drain(..written);
                    written = 0;
                }
                let request = request_at(next);
                match check_request(&request, frame_bytes_max) {
                    Ok(_) => {
                        let request_id = self.next_request_id;
                        self.next_request_id = self.next_request_id.wrapping_add(1);
                        request.encode(request_id, &mut self.write_buf);
                        pending.insert(request_id, next);
                    }
                    Err(e) => results[next] = Some(Err(e)),
                }
                next += 1;
            }
            match self.settle_buffered(&mut pending, &mut results, reply_frame_bytes_max) {
                Ok(0) => {}
                Ok(_) => deadline = deadline_after(self.config.request_timeout),
                Err(e) => break Err(e),
            }
            let unsent = written < self.write_buf.len();
            if !unsent && pending.is_empty() {
                if next < count {
                    continue;
                }
                break Ok(());
            }
            let mut progress = false;
            if unsent {
                match self.stream.write(&self.write_buf[written..]) {
                    Ok(0) => {
                        break Err(ClientError::Closed(
                            "the connection takes no more bytes".into(),
                        ))
                    }
                    Ok(n) => {
                        written += n;
                        progress = true;
                        deadline = deadline_after(self.config.request_timeout);
                    }
                    Err(e) if would_wait(&e) => {}
                    Err(e) => break Err(ClientError::from_io(e)),
                }
            }
            if !pending.is_empty() {
                match self.stream.read(self.replies.spare()) {
                    Ok(0) => {
                        let buffered_bytes = self.replies.buffered_bytes();
                        break Err(ClientError::Closed(if buffered_bytes == 0 {
                            "server closed the connection".into()
                        } else {
                            format!("server closed the connection inside a reply ({buffered_bytes} bytes buffered)")
                        }));
                    }
                    Ok(n) => {
                        self.replies.filled(n);
                        progress = true;
                    }
                    Err(e) if would_wait(&e) => {}
                    Err(e) => break Err(ClientError::from_io(e)),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                // also when bytes trickle in: a reply must be whole within the wait; but
                // a reply this pass's read completed is taken first, not timed out
                match self.settle_buffered(&mut pending, &mut results, reply_frame_bytes_max) {
                    Ok(0) => break Err(ClientError::Timeout),
                    Ok(_) => {
                        deadline = deadline_after(self.config.request_timeout);
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
            if progress {
                continue;
            }
            let want_write = written < self.write_buf.len();
            if let Err(e) = wait_ready(
                &self.stream,
                !pending.is_empty(),
                want_write,
                deadline - now,
            ) {
                break Err(ClientError::from_io(e));
            }
        };
        if let Err(e) = outcome {
            let e = self.close(e);
            fail_unanswered(&mut results, &pending, e);
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ClientError::Protocol("no reply".into()))))
            .collect())
    }

    /// Hands every whole reply buffered to its request (taking it out of `pending`);
    /// returns how many. An error (a malformed reply, or one for no request of ours)
    /// means the connection is out of step.
    fn settle_buffered(
        &mut self,
        pending: &mut HashMap<u64, usize>,
        results: &mut [Option<Result<OwnedReply, ClientError>>],
        reply_frame_bytes_max: usize,
    ) -> Result<usize, ClientError> {
        let mut settled = 0;
        // bounded by the bytes buffered: each pass consumes one whole frame
        while let Some((request_id, reply)) = self.replies.next_reply(reply_frame_bytes_max)? {
            match pending.remove(&request_id) {
                Some(i) => results[i] = Some(Ok(reply)),
                None => {
                    // Not ours: a connection-level ERROR (the server gives up on the
                    // connection) or a confused server. Either way the requests still
                    // out get no answer of their own: `Closed` (may or may not be
                    // applied), not the server's code, which would read as a refusal
                    return Err(match reply {
                        OwnedReply::Error { code, message } => ClientError::Closed(format!(
                            "the server gave up on the connection: {}",
                            ClientError::from_server(code, message)
                        )),
                        other => ClientError::Protocol(format!(
                            "{} for unknown request id {request_id}",
                            reply_name(&other)
                        )),
                    });
                }
            }
            settled += 1;
        }
        Ok(settled)
    }

    /// Closes the connection because of `e`, and returns `e`.
    fn close(&mut self, e: ClientError) -> ClientError {
        self.close_with(e.to_string());
        e
    }

    fn close_with(&mut self, reason: String) {
        if self.broken.is_none() {
            self.broken = Some(reason);
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

/// Whether a non-blocking read or write found the socket not ready (or was interrupted):
/// try again after [`wait_ready`].
fn would_wait(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Waits until `stream` can be read (`read`) or written (`write`), or `timeout` passes.
/// An error or hang-up on the socket also ends the wait: the next read or write reports
/// it.
fn wait_ready(stream: &TcpStream, read: bool, write: bool, timeout: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    // round up, so that a wait of less than a millisecond does not spin
    let millis = timeout
        .as_micros()
        .div_ceil(1000)
        .clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `fd` is one valid pollfd that lives across the call.
    let ready = unsafe { libc::poll(&mut fd, 1, millis) };
    if ready < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// After the connection failed with `e` during a batch: the requests in `pending` (sent,
/// unanswered) share `e` (see [`spread_failure`]) and every request with no result yet
/// (never sent) gets `NotSent`.
fn fail_unanswered(
    results: &mut [Option<Result<OwnedReply, ClientError>>],
    pending: &HashMap<u64, usize>,
    e: ClientError,
) {
    let reason = e.to_string();
    let mut sent: Vec<usize> = pending.values().copied().collect();
    sent.sort_unstable();
    let mut failure = spread_failure(e);
    for i in sent {
        results[i] = Some(Err(failure()));
    }
    for result in results.iter_mut().filter(|r| r.is_none()) {
        *result = Some(Err(ClientError::NotSent(reason.clone())));
    }
}

/// An error of the same kind as `e` for another request (a timeout stays a timeout,
/// anything else is `Closed` with `e`'s text).
fn echo(e: &ClientError) -> ClientError {
    match e {
        ClientError::Timeout => ClientError::Timeout,
        other => ClientError::Closed(other.to_string()),
    }
}

/// Hands one failure to several requests: the first call returns `e` itself, the later
/// ones its kind (a timeout stays a timeout, anything else is `Closed` with `e`'s text).
fn spread_failure(e: ClientError) -> impl FnMut() -> ClientError {
    let again = echo(&e);
    let mut first = Some(e);
    move || first.take().unwrap_or_else(|| echo(&again))
}

fn unreachable_kind(response: Response) -> ClientError {
    // `settle` already matched the reply against the request kind.
    ClientError::Protocol(format!("unexpected response {response:?}"))
}

/// Requests gathered to be sent in one pipelined batch.
#[derive(Debug)]
pub struct Pipeline<'c> {
    client: &'c mut Client,
    requests: Vec<OwnedRequest>,
}

#[derive(Debug, Clone)]
enum OwnedRequest {
    Ping,
    Get {
        r: u8,
        key: Vec<u8>,
    },
    Put {
        w: u8,
        key: Vec<u8>,
        context: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        w: u8,
        key: Vec<u8>,
        context: Vec<u8>,
    },
}

impl OwnedRequest {
    fn as_request(&self) -> Request<'_> {
        match self {
            OwnedRequest::Ping => Request::Ping,
            OwnedRequest::Get { r, key } => Request::Get { r: *r, key },
            OwnedRequest::Put {
                w,
                key,
                context,
                value,
            } => Request::Put {
                w: *w,
                key,
                context,
                value,
            },
            OwnedRequest::Delete { w, key, context } => Request::Delete {
                w: *w,
                key,
                context,
            },
        }
    }
}

fn context_bytes(context: Option<&Context>) -> Vec<u8> {
    context.map_or_else(Vec::new, |c| c.as_bytes().to_vec())
}

impl Pipeline<'_> {
    pub fn ping(&mut self) -> &mut Self {
        self.requests.push(OwnedRequest::Ping);
        self
    }

    pub fn get(&mut self, key: &[u8]) -> &mut Self {
        self.get_with(key, 0)
    }

    pub fn get_with(&mut self, key: &[u8], r: u8) -> &mut Self {
        self.requests.push(OwnedRequest::Get {
            r,
            key: key.to_vec(),
        });
        self
    }

    pub fn put(&mut self, key: &[u8], value: &[u8], context: Option<&Context>) -> &mut Self {
        self.put_with(key, value, context, 0)
    }

    pub fn put_with(
        &mut self,
        key: &[u8],
        value: &[u8],
        context: Option<&Context>,
        w: u8,
    ) -> &mut Self {
        self.requests.push(OwnedRequest::Put {
            w,
            key: key.to_vec(),
            context: context_bytes(context),
            value: value.to_vec(),
        });
        self
    }

    pub fn delete(&mut self, key: &[u8], context: Option<&Context>) -> &mut Self {
        self.delete_with(key, context, 0)
    }

    pub fn delete_with(&mut self, key: &[u8], context: Option<&Context>, w: u8) -> &mut Self {
        self.requests.push(OwnedRequest::Delete {
            w,
            key: key.to_vec(),
            context: context_bytes(context),
        });
        self
    }

    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Sends every request (pipelined, within the in-flight window) and returns their
    /// results in the order they were added. The outer error means the connection was
    /// already closed and nothing was sent; a failure during the batch fails only the
    /// requests not answered yet (see [`Client::put_many`]).
    pub fn execute(self) -> Result<Vec<Result<Response, ClientError>>, ClientError> {
        let requests = self.requests;
        self.client
            .run(requests.len(), |i| requests[i].as_request())
    }
}

/// A PUT of `value` under `key` carrying `context` (none: the empty context, a blind
/// write).
pub(crate) fn put_request<'a>(
    key: &'a [u8],
    value: &'a [u8],
    context: Option<&'a Context>,
    w: u8,
) -> Request<'a> {
    let context = context.map_or(&[][..], Context::as_bytes);
    Request::Put {
        w,
        key,
        context,
        value,
    }
}

/// A DELETE of `key` carrying `context` (none: the empty context).
pub(crate) fn delete_request<'a>(
    key: &'a [u8],
    context: Option<&'a Context>,
    w: u8,
) -> Request<'a> {
    let context = context.map_or(&[][..], Context::as_bytes);
    Request::Delete { w, key, context }
}

/// A bounded set of connections to one address, shared by threads. A connection is
/// checked out with [`Pool::connection`] and goes back when the guard drops, unless it
/// broke.
#[derive(Debug)]
pub struct Pool {
    addrs: Vec<SocketAddr>,
    config: ClientConfig,
    size: usize,
    hello: HelloOk,
    state: Mutex<PoolState>,
    returned: Condvar,
}

#[derive(Debug)]
struct PoolState {
    idle: Vec<Client>,
    /// Connections open, idle or checked out.
    open: usize,
}

impl Pool {
    /// A pool of at most `size` connections (at least 1). One connection is opened now so
    /// a wrong address fails here; the others as needed.
    pub fn new(
        addr: impl ToSocketAddrs + fmt::Debug,
        config: ClientConfig,
        size: usize,
    ) -> Result<Pool, ClientError> {
        let addrs = resolve(addr)?;
        let first = Client::connect_any(&addrs, config.clone())?;
        let hello = *first.hello();
        Ok(Pool {
            addrs,
            config,
            size: size.max(1),
            hello,
            state: Mutex::new(PoolState {
                idle: vec![first],
                open: 1,
            }),
            returned: Condvar::new(),
        })
    }

    /// The HELLO_OK of the pool's first connection.
    pub fn hello(&self) -> &HelloOk {
        &self.hello
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Connections open now (idle or checked out).
    pub fn open_count(&self) -> usize {
        self.lock().open
    }

    pub fn idle_count(&self) -> usize {
        self.lock().idle.len()
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // a thread that panicked while holding the lock left the state consistent: every
        // change to it is a single push, pop or counter step
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection, a new one if fewer than `size` are open, or else the next one
    /// returned within `request_timeout` ([`ClientError::Timeout`] after that).
    pub fn connection(&self) -> Result<PooledClient<'_>, ClientError> {
        let deadline = deadline_after(self.config.request_timeout);
        let mut state = self.lock();
        // Bounded by the deadline: every pass waits until it or returns.
        loop {
            if let Some(mut client) = state.idle.pop() {
                if !client.still_open() {
                    // closed by the server while idle: dropped, its slot free
                    state.open -= 1;
                    continue;
                }
                return Ok(PooledClient {
                    pool: self,
                    client: Some(client),
                });
            }
            if state.open < self.size {
                state.open += 1;
                drop(state);
                return match Client::connect_any(&self.addrs, self.config.clone()) {
                    Ok(client) => Ok(PooledClient {
                        pool: self,
                        client: Some(client),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.returned.notify_one();
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout);
            }
            state = self
                .returned
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn give_back(&self, client: Client) {
        let mut state = self.lock();
        if client.is_broken() {
            state.open -= 1;
        } else {
            state.idle.push(client);
        }
        drop(state);
        self.returned.notify_one();
    }
}

/// A connection checked out of a [`Pool`]; it goes back when dropped.
#[derive(Debug)]
pub struct PooledClient<'p> {
    pool: &'p Pool,
    client: Option<Client>,
}

impl Deref for PooledClient<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until drop")
    }
}

impl DerefMut for PooledClient<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until drop")
    }
}

impl Drop for PooledClient<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            self.pool.give_back(client);
        }
    }
}

/// How long a client waits before trying again to open a shard connection that could
/// not be opened; meanwhile that shard's keys go through the main connection. Each
/// failure in a row doubles the wait, up to [`SHARD_RETRY_INTERVAL_MAX`].
pub(crate) const SHARD_RETRY_INTERVAL: Duration = Duration::from_secs(1);
pub(crate) const SHARD_RETRY_INTERVAL_MAX: Duration = Duration::from_secs(60);

/// The longest a shard connection's connect and HELLO may take (less when the client's
/// own timeouts are shorter). A shard port that drops packets (a firewall that lets
/// only the client port through) then costs the request that tries it this long, at
/// most once per retry interval, instead of the full connect timeout.
pub(crate) const SHARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// `config` with its connect and request timeouts capped for opening a shard
/// connection, its connect and its HELLO (see [`SHARD_CONNECT_TIMEOUT`]); the
/// connection then goes on with `config` itself.
pub(crate) fn shard_config(config: &ClientConfig) -> ClientConfig {
    ClientConfig {
        connect_timeout: config.connect_timeout.min(SHARD_CONNECT_TIMEOUT),
        request_timeout: config.request_timeout.min(SHARD_CONNECT_TIMEOUT),
        ..config.clone()
    }
}

/// A shard-aware client's connection to one shard: open, or when to try again.
#[derive(Debug)]
pub(crate) struct ShardSlot<C> {
    pub(crate) client: Option<C>,
    /// With no client: no new attempt before this.
    pub(crate) retry_at: Instant,
    /// Attempts that failed in a row.
    failures: u32,
}

impl<C> ShardSlot<C> {
    pub(crate) fn new(client: Option<C>) -> Self {
        let mut slot = Self::due_now();
        slot.reopened(client);
        slot
    }

    /// Whether to try to open the connection now: it is missing or `broken`, and any
    /// earlier failed attempt is at least `SHARD_RETRY_INTERVAL` old.
    pub(crate) fn should_reopen(&self, broken: impl Fn(&C) -> bool) -> bool {
        match &self.client {
            Some(client) => broken(client),
            None => Instant::now() >= self.retry_at,
        }
    }

    /// No connection yet, to be opened on first use.
    pub(crate) fn due_now() -> Self {
        ShardSlot {
            client: None,
            retry_at: Instant::now(),
            failures: 0,
        }
    }

    /// An attempt to (re)open the connection starts: the old one (closed) goes, and no
    /// other attempt starts before this one's outcome or the next retry time (callers
    /// meanwhile use the main connection).
    pub(crate) fn attempting(&mut self) {
        self.client = None;
        self.retry_at = Instant::now() + self.retry_interval(self.failures + 1);
    }

    /// Records the outcome of an attempt to (re)open the connection. A failed attempt
    /// leaves a connection another attempt opened meanwhile in place.
    pub(crate) fn reopened(&mut self, client: Option<C>) {
        if client.is_none() && self.client.is_some() {
            return;
        }
        self.failures = if client.is_some() {
            0
        } else {
            self.failures.saturating_add(1)
        };
        self.client = client;
        self.retry_at = Instant::now() + self.retry_interval(self.failures);
    }

    /// The wait before the next attempt after `failures` in a row.
    fn retry_interval(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(6);
        (SHARD_RETRY_INTERVAL * (1 << doublings)).min(SHARD_RETRY_INTERVAL_MAX)
    }
}

/// How keys map to shards, from a HELLO_OK that allows shard routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Routing {
    partitions: u32,
    shards: u16,
}

impl Routing {
    pub(crate) fn from_hello(hello: &HelloOk, shard_connections_max: u16) -> Option<Self> {
        let usable = hello.shard_port_base != 0
            && hello.shards > 0
            && hello.shards <= shard_connections_max
            && ringkv_ring::hash::is_valid_partition_count(hello.partitions)
            && hello
                .shard_port_base
                .checked_add(hello.shards - 1)
                .is_some();
        usable.then_some(Routing {
            partitions: hello.partitions,
            shards: hello.shards,
        })
    }

    pub(crate) fn shards(&self) -> u16 {
        self.shards
    }

    /// The address of shard `s`'s own port, on the host of the main connection.
    pub(crate) fn shard_addr(main: &HelloOk, main_peer: SocketAddr, s: u16) -> Option<SocketAddr> {
        let port = main.shard_port_base.checked_add(s)?;
        Some(SocketAddr::new(main_peer.ip(), port))
    }

    /// Whether a connection to a shard port answered as shard `s` of the same node and
    /// ring as the main connection.
    pub(crate) fn is_shard_of(main: &HelloOk, shard: &HelloOk, s: u16) -> bool {
        shard.shard == s
            && shard.shards == main.shards
            && shard.partitions == main.partitions
            && shard.node_id == main.node_id
    }

    /// Whether two HELLO_OKs (with the address each came from) describe the same node
    /// with the same shard layout: same routing, shard ports and host.
    pub(crate) fn same_layout(a: (&HelloOk, SocketAddr), b: (&HelloOk, SocketAddr)) -> bool {
        let ((a, a_peer), (b, b_peer)) = (a, b);
        a.node_id == b.node_id
            && a.partitions == b.partitions
            && a.shards == b.shards
            && a.shard_port_base == b.shard_port_base
            && a_peer.ip() == b_peer.ip()
    }

    pub(crate) fn shard_for_key(&self, key: &[u8]) -> u16 {
        let partition = ringkv_ring::partition_for_key(key, self.partitions);
        ringkv_ring::shard_for_partition(partition, u32::from(self.shards)) as u16
    }
}

/// A client that sends each key to the shard owning it: after the first HELLO it opens
/// one connection per shard, to `shard_port_base + s` on the same host, and routes a key
/// to shard `partition_for_key(key, partitions) % shards`. Without shard ports (or while a
/// shard cannot be reached) requests go through the main connection, and the server
/// forwards them. Broken connections are reopened before the next request that needs
/// them (a request that failed is never resent); a shard connection that could not be
/// opened is tried again after 1 s, backing off to once a minute while it fails.
#[derive(Debug)]
pub struct ShardAwareClient {
    main: Client,
    main_addrs: Vec<SocketAddr>,
    /// One per shard when routing; without a client, that shard is reached through
    /// `main`.
    shards: Vec<ShardSlot<Client>>,
    routing: Option<Routing>,
}

/// Which connection a request goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Main,
    Shard(u16),
}

impl ShardAwareClient {
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Debug,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let main_addrs = resolve(addr)?;
        let main = Client::connect_any(&main_addrs, config.clone())?;
        let routing = Routing::from_hello(main.hello(), config.shard_connections_max);
        let mut client = ShardAwareClient {
            main,
            main_addrs,
            shards: Vec::new(),
            routing,
        };
        if let Some(routing) = routing {
            client.shards = (0..routing.shards())
                .map(|s| ShardSlot::new(client.connect_shard(s)))
                .collect();
        }
        Ok(client)
    }

    /// A connection to shard `s` that reports being shard `s` of the same ring, if any.
    fn connect_shard(&self, s: u16) -> Option<Client> {
        let main_hello = self.main.hello();
        let addr = Routing::shard_addr(main_hello, self.main.peer_addr(), s)?;
        let mut client = Client::connect_addr(addr, shard_config(self.main.config())).ok()?;
        // past the HELLO, the connection's requests get the client's own timeouts
        client.config = self.main.config().clone();
        Routing::is_shard_of(main_hello, client.hello(), s).then_some(client)
    }

    /// The main connection's HELLO_OK.
    pub fn hello(&self) -> &HelloOk {
        self.main.hello()
    }

    /// The shard a key belongs to on this node, when the node has shard ports.
    pub fn shard_for_key(&self, key: &[u8]) -> Option<u16> {
        self.routing.map(|r| r.shard_for_key(key))
    }

    /// Shard connections open (0 without shard routing).
    pub fn shard_connection_count(&self) -> usize {
        self.shards.iter().filter(|c| c.client.is_some()).count()
    }

    /// The route for `key`, by the layout of the node as the main connection last saw
    /// it (reopen a broken main connection first, with
    /// [`reopen_main_if_broken`](Self::reopen_main_if_broken)).
    fn route(&self, key: &[u8]) -> Route {
        match self.shard_for_key(key) {
            Some(s) => Route::Shard(s),
            None => Route::Main,
        }
    }

    /// Reopens a broken main connection, since the node may have come back with another
    /// shard layout: if its HELLO_OK describes another one, keys are routed by that from
    /// now on (every shard connection to be opened afresh). Every call tries this once,
    /// before routing; the error says why main is still broken.
    fn reopen_main_if_broken(&mut self) -> Result<(), ClientError> {
        if self.main.still_open() {
            return Ok(());
        }
        let config = self.main.config().clone();
        let main = Client::connect_any(&self.main_addrs, config.clone())?;
        let same = Routing::same_layout(
            (self.main.hello(), self.main.peer_addr()),
            (main.hello(), main.peer_addr()),
        );
        self.main = main;
        if !same {
            self.routing = Routing::from_hello(self.main.hello(), config.shard_connections_max);
            self.shards = (0..self.routing.map_or(0, |r| r.shards()))
                .map(|_| ShardSlot::due_now())
                .collect();
        }
        Ok(())
    }

    /// The connection for `key` (none: the main connection), after one attempt to
    /// reopen a broken main connection.
    fn connection_for(&mut self, key: Option<&[u8]>) -> Result<&mut Client, ClientError> {
        let reopened = self.reopen_main_if_broken();
        let route = key.map_or(Route::Main, |k| self.route(k));
        self.connection(route, reopened)
    }

    /// The connection for `route`, reopening a broken shard connection (tried again
    /// after 1 s, backing off to 60 s); while it cannot be had, the shard's keys go
    /// through the main connection, which `reopened` says whether [`reopen_main_if_broken`] could
    /// restore.
    ///
    /// [`reopen_main_if_broken`]: Self::reopen_main_if_broken
    fn connection(
        &mut self,
        route: Route,
        reopened: Result<(), ClientError>,
    ) -> Result<&mut Client, ClientError> {
        if let Route::Shard(s) = route {
            let s_index = usize::from(s);
            if s_index < self.shards.len() {
                if let Some(client) = self.shards[s_index].client.as_mut() {
                    // marks it broken if the server closed it while it sat idle
                    client.still_open();
                }
                if self.shards[s_index].should_reopen(Client::is_broken) {
                    self.shards[s_index].attempting();
                    let client = self.connect_shard(s);
                    self.shards[s_index].reopened(client);
                }
                if self.shards[s_index].client.is_some() {
                    return Ok(self.shards[s_index].client.as_mut().expect("checked"));
                }
            }
        }
        reopened?;
        Ok(&mut self.main)
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.connection_for(None)?.ping()
    }

    pub fn get(&mut self, key: &[u8]) -> Result<Versions, ClientError> {
        self.get_with(key, 0)
    }

    pub fn get_with(&mut self, key: &[u8], r: u8) -> Result<Versions, ClientError> {
        self.connection_for(Some(key))?.get_with(key, r)
    }

    pub fn put(
        &mut self,
        key: &[u8],
        value: &[u8],
        context: Option<&Context>,
    ) -> Result<PutOutcome, ClientError> {
        self.put_with(key, value, context, 0)
    }

    pub fn put_with(
        &mut self,
        key: &[u8],
        value: &[u8],
        context: Option<&Context>,
        w: u8,
    ) -> Result<PutOutcome, ClientError> {
        self.connection_for(Some(key))?
            .put_with(key, value, context, w)
    }

    pub fn delete(&mut self, key: &[u8], context: Option<&Context>) -> Result<(), ClientError> {
        self.delete_with(key, context, 0)
    }

    pub fn delete_with(
        &mut self,
        key: &[u8],
        context: Option<&Context>,
        w: u8,
    ) -> Result<(), ClientError> {
        self.connection_for(Some(key))?.delete_with(key, context, w)
    }

    /// Gets many keys: grouped by shard, each group pipelined on its connection. A
    /// connection failure fails only the keys of that connection's group.
    pub fn get_many<K: AsRef<[u8]>>(&mut self, keys: &[K]) -> Vec<Result<Versions, ClientError>> {
        self.scatter(
            keys.len(),
            |i| keys[i].as_ref(),
            |client, indices| {
                let group: Vec<&[u8]> = indices.iter().map(|&i| keys[i].as_ref()).collect();
                client.get_many(&group)
            },
        )
    }

    /// Puts many (key, value) pairs without context, grouped by shard and pipelined.
    pub fn put_many<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        items: &[(K, V)],
    ) -> Vec<Result<PutOutcome, ClientError>> {
        self.scatter(
            items.len(),
            |i| items[i].0.as_ref(),
            |client, indices| {
                let group: Vec<(&[u8], &[u8])> = indices
                    .iter()
                    .map(|&i| (items[i].0.as_ref(), items[i].1.as_ref()))
                    .collect();
                client.put_many(&group)
            },
        )
    }

    fn scatter<'k, T>(
        &mut self,
        count: usize,
        key_at: impl Fn(usize) -> &'k [u8],
        mut run: impl FnMut(&mut Client, &[usize]) -> Result<Vec<Result<T, ClientError>>, ClientError>,
    ) -> Vec<Result<T, ClientError>> {
        // one attempt to reopen main for the whole batch, then every key routed by
        // the same layout
        let reopened = self.reopen_main_if_broken().err();
        let mut groups: Vec<(Route, Vec<usize>)> = Vec::new();
        for i in 0..count {
            let route = self.route(key_at(i));
            match groups.iter_mut().find(|(r, _)| *r == route) {
                Some((_, indices)) => indices.push(i),
                None => groups.push((route, vec![i])),
            }
        }
        let mut results: Vec<Option<Result<T, ClientError>>> = (0..count).map(|_| None).collect();
        for (route, indices) in groups {
            let reopened = match &reopened {
                None => Ok(()),
                Some(e) => Err(echo(e)),
            };
            let group_results = match self.connection(route, reopened) {
                Ok(client) => run(client, &indices),
                Err(e) => Err(e),
            };
            match group_results {
                Ok(group_results) => {
                    for (i, result) in indices.into_iter().zip(group_results) {
                        results[i] = Some(result);
                    }
                }
                Err(e) => {
                    // nothing of this group was sent: its first key gets the error
                    // itself, the others its kind (a timeout stays a timeout)
                    let mut failure = spread_failure(e);
                    for i in indices {
                        results[i] = Some(Err(failure()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ClientError::Protocol("no result".into()))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard that cannot be reached is tried again after 1 s, then 2, 4, ... up to a
    /// minute; one success resets the wait. Before, every second: on a shard port that
    /// drops packets each attempt held a request for the whole connect timeout.
    #[test]
    fn shard_reconnects_back_off_while_they_fail() {
        let mut slot: ShardSlot<()> = ShardSlot::due_now();
        assert!(slot.should_reopen(|_| false));
        let mut waits = Vec::new();
        for _ in 0..9 {
            slot.attempting();
            slot.reopened(None);
            let wait = slot.retry_at.duration_since(Instant::now());
            waits.push((wait + Duration::from_millis(500)).as_secs());
            assert!(!slot.should_reopen(|_| false));
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        slot.reopened(Some(()));
        slot.client = None;
        slot.reopened(None);
        let wait = slot.retry_at.duration_since(Instant::now());
        assert_eq!((wait + Duration::from_millis(500)).as_secs(), 1);
        assert!(shard_config(&ClientConfig::default()).connect_timeout <= SHARD_CONNECT_TIMEOUT);
    }

    #[test]
    fn context_hex_round_trips_and_rejects_garbage() {
        let c = Context::from_bytes(vec![0x00, 0x7f, 0xab, 0xff]);
        assert_eq!(c.to_hex(), "007fabff");
        assert_eq!(Context::from_hex("007FABFF\n"), Ok(c));
        assert_eq!(Context::from_hex(""), Ok(Context::empty()));
        assert_eq!(Context::from_hex("abc"), Err(ContextHexError::OddLength(3)));
        assert_eq!(Context::from_hex("zz"), Err(ContextHexError::BadDigit(0)));
        assert_eq!(Context::from_hex("0g"), Err(ContextHexError::BadDigit(1)));
    }

    #[test]
    fn oversized_fields_are_refused_before_encoding() {
        let key = vec![0u8; 70_000];
        let err = check_request(&Request::Get { r: 0, key: &key }, 1 << 30).unwrap_err();
        assert!(
            matches!(err, ClientError::TooLarge { field: "key", .. }),
            "{err}"
        );
        let value = vec![0u8; 200];
        let put = Request::Put {
            w: 0,
            key: b"k",
            context: b"",
            value: &value,
        };
        let err = check_request(&put, 100).unwrap_err();
        assert!(matches!(
            err,
            ClientError::TooLarge {
                field: "request frame",
                ..
            }
        ));
        let mut encoded = Vec::new();
        put.encode(1, &mut encoded);
        assert_eq!(check_request(&put, 1 << 20).unwrap(), encoded.len());
    }

    #[test]
    fn routing_needs_shard_ports_and_a_valid_ring() {
        let mut hello = HelloOk {
            version: 1,
            node_id: 1,
            partitions: 64,
            shards: 4,
            shard: 0,
            shard_port_base: 9000,
            frame_bytes_max: 1 << 20,
            in_flight_max: 8,
        };
        let routing = Routing::from_hello(&hello, 256).unwrap();
        for key in [&b"a"[..], b"bb", b"user:42"] {
            let p = ringkv_ring::partition_for_key(key, 64);
            assert_eq!(u32::from(routing.shard_for_key(key)), p % 4);
        }
        hello.partitions = 63;
        assert_eq!(Routing::from_hello(&hello, 256), None);
        hello.partitions = 64;
        hello.shard_port_base = 0;
        assert_eq!(Routing::from_hello(&hello, 256), None);
        hello.shard_port_base = u16::MAX - 1;
        assert_eq!(Routing::from_hello(&hello, 256), None);
        hello.shard_port_base = 9000;
        assert_eq!(Routing::from_hello(&hello, 2), None);
    }
}

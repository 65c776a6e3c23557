//! Drivers: one connection speaking one system's wire protocol, written for speed
//! (one buffered reader, requests appended to one buffer per pipeline batch).
//!
//! - ringkv: protocol v1 frames (`ringkv_net::protocol`), R/W per request, and
//!   shard-aware routing (a connection to one shard's port, sent only that shard's keys).
//! - Redis: RESP2 `GET`/`SET`.
//! - memcached: text protocol `get`/`set`.
//! - echo: length-prefixed frames the echo server sends back unchanged: the round trip
//!   with no work on the server side.

use anyhow::{bail, Context as _};
use ringkv_net::protocol::{self, Reply, Request};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    Ringkv,
    Redis,
    Memcached,
    Echo,
}

impl DriverKind {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "ringkv" => DriverKind::Ringkv,
            "redis" => DriverKind::Redis,
            "memcached" => DriverKind::Memcached,
            "echo" => DriverKind::Echo,
            other => bail!("unknown driver {other} (ringkv, redis, memcached, echo)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Ringkv => "ringkv",
            DriverKind::Redis => "redis",
            DriverKind::Memcached => "memcached",
            DriverKind::Echo => "echo",
        }
    }
}

/// How to reach the target.
#[derive(Debug, Clone)]
pub struct Target {
    pub driver: DriverKind,
    pub addr: String,
    /// ringkv: replies to wait for on a get (0: the cluster default).
    pub r: u8,
    /// ringkv: acknowledgements to wait for on a put (0: the cluster default).
    pub w: u8,
    /// ringkv: route each connection to one shard's port with that shard's keys.
    pub shard_aware: bool,
    pub timeout: Duration,
    /// ringkv: the contexts the run's connections have seen, shared by all of them.
    pub contexts: std::sync::Arc<ContextCache>,
}

/// The last context any connection of a run saw per key, as one client process that
/// remembers what it read or wrote does: a put without a context of its own uses it, so
/// an update supersedes the latest version the client knows instead of adding a sibling.
/// (Per connection, each connection's contexts went stale as soon as another connection
/// wrote the key, and keys piled up siblings that every later put and get carried.)
/// Sharded by key hash; bounded (a full shard forgets everything it holds).
///
/// The load generator shares the CPUs with the server it measures, so a lookup is one
/// ahash of the key and one probe of a table whose slots hold the key and the context
/// themselves (up to `KEY_INLINE` and `CONTEXT_INLINE` bytes; longer ones spill to
/// the heap): with 100,000 keys a `HashMap<Vec<u8>, Vec<u8>>` missed the CPU caches
/// three times per lookup (slot, key, context) and took a third of the load
/// generator's user time on a put-only load.
pub struct ContextCache {
    shards: Vec<std::sync::Mutex<hashbrown::HashTable<Remembered>>>,
    hasher: ahash::RandomState,
}

/// Key bytes kept in a [`ContextCache`] slot (YCSB keys `user%012d` are 16).
const KEY_INLINE: usize = 24;
/// Context bytes kept in a slot (a one-actor context is 40).
const CONTEXT_INLINE: usize = 56;

struct Remembered {
    hash: u64,
    key: smallvec::SmallVec<[u8; KEY_INLINE]>,
    context: smallvec::SmallVec<[u8; CONTEXT_INLINE]>,
}

impl Default for ContextCache {
    fn default() -> Self {
        Self {
            shards: (0..64).map(|_| Default::default()).collect(),
            hasher: Default::default(),
        }
    }
}

impl std::fmt::Debug for ContextCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextCache").finish_non_exhaustive()
    }
}

impl ContextCache {
    /// The key's hash and its shard. The shard takes bits 32-37, which the table inside
    /// the shard uses for neither its bucket index (the low bits) nor its slot tags
    /// (the top 7): taking the top bits made every key of a shard share 6 of the 7 tag
    /// bits, so half the slots of a probed group matched and had their keys compared.
    fn shard(
        &self,
        key: &[u8],
    ) -> (
        u64,
        std::sync::MutexGuard<'_, hashbrown::HashTable<Remembered>>,
    ) {
        let hash = self.hasher.hash_one(key);
        let shard = &self.shards[((hash >> 32) as usize & 63) % self.shards.len()];
        (hash, shard.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Appends the remembered context of `key` (if any) to `out`.
    fn get_into(&self, key: &[u8], out: &mut Vec<u8>) {
        let (hash, shard) = self.shard(key);
        if let Some(r) = shard.find(hash, |r| r.key.as_slice() == key) {
            out.extend_from_slice(&r.context);
        }
    }

    fn remember(&self, key: &[u8], context: &[u8]) {
        let (hash, mut shard) = self.shard(key);
        if let Some(r) = shard.find_mut(hash, |r| r.key.as_slice() == key) {
            if r.context.as_slice() != context {
                r.context.clear();
                r.context.extend_from_slice(context);
            }
            return;
        }
        if shard.len() >= CONTEXTS_MAX / 64 {
            shard.clear();
        }
        shard.insert_unique(
            hash,
            Remembered {
                hash,
                key: key.into(),
                context: context.into(),
            },
            |r| r.hash,
        );
    }
}

/// What a reply said, when the stream is still in sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A read that found the key; `context` is ringkv's (empty for others).
    Found {
        context: Vec<u8>,
    },
    NotFound,
    /// The server answered with an error (counted, the connection carries on).
    Error(String),
}

/// One connection. A broken stream or an unparseable reply is an `Err`.
pub trait Connection: Send {
    /// `want_context`: the caller puts the reply's context back (a read-modify-write),
    /// so [`Outcome::Found`] must carry it; otherwise a driver need not copy it.
    fn encode_get(&mut self, key: &[u8], want_context: bool, out: &mut Vec<u8>);
    fn encode_put(&mut self, key: &[u8], value: &[u8], context: &[u8], out: &mut Vec<u8>);
    /// Reads the reply to the oldest outstanding request (a server that answers out of
    /// order has its replies put back in request order).
    fn read_reply(&mut self, is_get: bool) -> anyhow::Result<Outcome>;
    fn send(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Whether this connection should be sent `key` (shard-aware routing).
    fn accepts(&self, _key: &[u8]) -> bool {
        true
    }
    /// ringkv: whether to remember the contexts reads return (on by default). A run
    /// that never writes an existing key turns it off: a client that only reads has
    /// no use for them, and the contexts remembered before stay current since reads
    /// change nothing.
    fn remember_read_contexts(&mut self, _remember: bool) {}
}

fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("bad address {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))
}

fn open(addr: &str, timeout: Duration) -> anyhow::Result<BufReader<TcpStream>> {
    let sa = resolve(addr)?;
    let stream = TcpStream::connect_timeout(&sa, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(BufReader::with_capacity(256 * 1024, stream))
}

/// Opens connection number `index` of a run.
pub fn connect(target: &Target, index: usize) -> anyhow::Result<Box<dyn Connection>> {
    let what = target.driver.name();
    let fail = |e: anyhow::Error| e.context(format!("{what} at {} unreachable", target.addr));
    Ok(match target.driver {
        DriverKind::Ringkv => {
            // a cluster: connections spread round-robin over the nodes listed
            let nodes: Vec<&str> = target.addr.split(',').filter(|a| !a.is_empty()).collect();
            let node = nodes
                .get(index % nodes.len().max(1))
                .copied()
                .unwrap_or(target.addr.as_str());
            let mut addr = node.to_string();
            let mut shard = None;
            if target.shard_aware {
                let layout = ringkv_layout(node, target.timeout).map_err(fail)?;
                if layout.shard_port_base == 0 {
                    bail!(
                        "--shard-aware needs a node started with shard ports (--shard-port-base)"
                    );
                }
                let s = index % layout.shards as usize;
                let host = node.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
                addr = format!("{host}:{}", layout.shard_port_base as usize + s);
                shard = Some((layout.partitions, layout.shards as usize, s));
            }
            Box::new(RingkvConnection {
                reader: open(&addr, target.timeout).map_err(fail)?,
                frame: Vec::new(),
                next_id: 1,
                outstanding: std::collections::VecDeque::new(),
                spare_keys: Vec::new(),
                early: std::collections::HashMap::new(),
                contexts: target.contexts.clone(),
                context: Vec::new(),
                r: target.r,
                w: target.w,
                shard,
                remember_reads: true,
            })
        }
        DriverKind::Redis => Box::new(RedisConnection {
            reader: open(&target.addr, target.timeout).map_err(fail)?,
            line: Vec::new(),
            skip: Vec::new(),
        }),
        DriverKind::Memcached => Box::new(MemcachedConnection {
            reader: open(&target.addr, target.timeout).map_err(fail)?,
            line: Vec::new(),
            skip: Vec::new(),
        }),
        DriverKind::Echo => Box::new(EchoConnection {
            reader: open(&target.addr, target.timeout).map_err(fail)?,
            frame: Vec::new(),
        }),
    })
}

/// Reads one ringkv-style frame (u32 LE length including itself) into `frame`.
fn read_frame(reader: &mut BufReader<TcpStream>, frame: &mut Vec<u8>) -> anyhow::Result<()> {
    frame.resize(4, 0);
    reader.read_exact(frame)?;
    let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
    if !(protocol::HEADER_BYTES..64 << 20).contains(&len) {
        bail!("bad frame length {len}");
    }
    frame.resize(len, 0);
    reader.read_exact(&mut frame[4..])?;
    Ok(())
}

/// Contexts a run remembers (bounded memory; see [`ContextCache`]).
const CONTEXTS_MAX: usize = 262_144;

struct RingkvConnection {
    reader: BufReader<TcpStream>,
    frame: Vec<u8>,
    next_id: u64,
    /// Request ids and keys of the requests sent and not yet answered, oldest first,
    /// and whether the caller wants the context of the reply (see
    /// [`Connection::encode_get`]).
    outstanding: std::collections::VecDeque<(u64, Vec<u8>, bool)>,
    /// Key buffers of answered requests, reused (no allocation per request).
    spare_keys: Vec<Vec<u8>>,
    /// Replies that arrived before the reply to an older request, by request id. The
    /// server answers a pipeline in any order (a cached get before a put that waits
    /// for its sync, a local key before a forwarded one); the runner takes replies in
    /// the order it sent the requests, and a context must be remembered under the key
    /// of the request it answers, not of the oldest one.
    early: std::collections::HashMap<u64, Outcome>,
    /// Contexts seen by any connection of the run (see [`ContextCache`]).
    contexts: std::sync::Arc<ContextCache>,
    /// Scratch for the context a put sends.
    context: Vec<u8>,
    r: u8,
    w: u8,
    shard: Option<(u32, usize, usize)>,
    /// Whether GET_OK contexts go into `contexts` (PUT_OK ones always do).
    remember_reads: bool,
}

impl RingkvConnection {
    /// Records a request sent for `key` under the next request id.
    fn track(&mut self, key: &[u8], want_context: bool) {
        let mut k = self.spare_keys.pop().unwrap_or_default();
        k.clear();
        k.extend_from_slice(key);
        self.outstanding.push_back((self.next_id, k, want_context));
    }

    fn untrack_oldest(&mut self) {
        if let Some((_, k, _)) = self.outstanding.pop_front() {
            self.spare_keys.push(k);
        }
    }
}

impl Connection for RingkvConnection {
    fn remember_read_contexts(&mut self, remember: bool) {
        self.remember_reads = remember;
    }
    fn encode_get(&mut self, key: &[u8], want_context: bool, out: &mut Vec<u8>) {
        self.next_id += 1;
        self.track(key, want_context);
        Request::Get { r: self.r, key }.encode(self.next_id, out);
    }
    fn encode_put(&mut self, key: &[u8], value: &[u8], context: &[u8], out: &mut Vec<u8>) {
        self.next_id += 1;
        self.context.clear();
        if context.is_empty() {
            self.contexts.get_into(key, &mut self.context);
        } else {
            self.context.extend_from_slice(context);
        }
        self.track(key, false);
        Request::Put {
            w: self.w,
            key,
            context: &self.context,
            value,
        }
        .encode(self.next_id, out);
    }
    fn read_reply(&mut self, _is_get: bool) -> anyhow::Result<Outcome> {
        let oldest = self.outstanding.front().map(|(id, _, _)| *id);
        loop {
            if let Some(outcome) = oldest.and_then(|id| self.early.remove(&id)) {
                self.untrack_oldest();
                return Ok(outcome);
            }
            read_frame(&mut self.reader, &mut self.frame)?;
            let (header, reply) = Reply::parse(&self.frame)?;
            let (key, want_context) = match self
                .outstanding
                .iter()
                .find(|(id, _, _)| *id == header.request_id)
            {
                Some((_, key, want)) => (Some(key.as_slice()), *want),
                None => (None, false),
            };
            let context = match &reply {
                Reply::GetOk { context, .. } if self.remember_reads => Some(context),
                Reply::PutOk { context, .. } => Some(context),
                _ => None,
            };
            if let (Some(key), Some(context)) = (key, context) {
                if !context.is_empty() {
                    self.contexts.remember(key, context);
                }
            }
            let answers_later_request = key.is_some() && Some(header.request_id) != oldest;
            let outcome = match reply {
                Reply::GetOk { values, .. } if values.is_empty() => Outcome::NotFound,
                // a copy only for a caller that puts it back (no allocation per read)
                Reply::GetOk { context, .. } => Outcome::Found {
                    context: if want_context {
                        context.to_vec()
                    } else {
                        Vec::new()
                    },
                },
                Reply::PutOk { .. } | Reply::DeleteOk | Reply::Pong | Reply::HelloOk(_) => {
                    Outcome::Ok
                }
                Reply::Error { code, message } => Outcome::Error(format!(
                    "error {code}: {}",
                    String::from_utf8_lossy(message)
                )),
            };
            if answers_later_request {
                self.early.insert(header.request_id, outcome);
                continue;
            }
            // the oldest request's reply, or one no request matches (an error about
            // the stream itself, request id 0): it stands for the oldest
            self.untrack_oldest();
            return Ok(outcome);
        }
    }
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }
    fn accepts(&self, key: &[u8]) -> bool {
        match self.shard {
            None => true,
            Some((partitions, shards, shard)) => {
                ringkv_ring::partition_for_key(key, partitions) as usize % shards == shard
            }
        }
    }
}

/// A node's shard layout, from its HELLO reply.
#[derive(Debug, Clone, Copy)]
pub struct RingkvLayout {
    pub partitions: u32,
    pub shards: u16,
    pub shard_port_base: u16,
}

pub fn ringkv_layout(addr: &str, timeout: Duration) -> anyhow::Result<RingkvLayout> {
    let mut reader = open(addr, timeout)?;
    let mut out = Vec::new();
    Request::Hello {
        min_version: 1,
        max_version: 1,
    }
    .encode(0, &mut out);
    reader.get_mut().write_all(&out)?;
    let mut frame = Vec::new();
    read_frame(&mut reader, &mut frame)?;
    match Reply::parse(&frame)?.1 {
        Reply::HelloOk(h) => Ok(RingkvLayout {
            partitions: h.partitions,
            shards: h.shards,
            shard_port_base: h.shard_port_base,
        }),
        other => bail!("unexpected HELLO reply {other:?}"),
    }
}

/// Reads a line ending in CRLF into `line` (without the CRLF).
fn read_line(reader: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> anyhow::Result<()> {
    line.clear();
    let n = reader.take(64 * 1024).read_until(b'\n', line)?;
    if n == 0 {
        bail!("connection closed by the server");
    }
    if !line.ends_with(b"\r\n") {
        bail!("reply line not ended by CRLF");
    }
    line.truncate(line.len() - 2);
    Ok(())
}

fn parse_usize(bytes: &[u8]) -> anyhow::Result<usize> {
    std::str::from_utf8(bytes)?
        .trim()
        .parse()
        .with_context(|| format!("bad number {:?}", String::from_utf8_lossy(bytes)))
}

struct RedisConnection {
    reader: BufReader<TcpStream>,
    line: Vec<u8>,
    skip: Vec<u8>,
}

fn resp_arg(out: &mut Vec<u8>, a: &[u8]) {
    use std::io::Write as _;
    write!(out, "${}\r\n", a.len()).expect("writing to a Vec");
    out.extend_from_slice(a);
    out.extend_from_slice(b"\r\n");
}

impl Connection for RedisConnection {
    fn encode_get(&mut self, key: &[u8], _want_context: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(b"*2\r\n$3\r\nGET\r\n");
        resp_arg(out, key);
    }
    fn encode_put(&mut self, key: &[u8], value: &[u8], _context: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(b"*3\r\n$3\r\nSET\r\n");
        resp_arg(out, key);
        resp_arg(out, value);
    }
    fn read_reply(&mut self, _is_get: bool) -> anyhow::Result<Outcome> {
        read_line(&mut self.reader, &mut self.line)?;
        match self.line.first() {
            Some(b'+') | Some(b':') => Ok(Outcome::Ok),
            Some(b'-') => Ok(Outcome::Error(
                String::from_utf8_lossy(&self.line[1..]).into_owned(),
            )),
            Some(b'$') if self.line == b"$-1" => Ok(Outcome::NotFound),
            Some(b'$') => {
                let n = parse_usize(&self.line[1..])?;
                self.skip.resize(n + 2, 0);
                self.reader.read_exact(&mut self.skip)?;
                Ok(Outcome::Found {
                    context: Vec::new(),
                })
            }
            _ => bail!("redis replied {:?}", String::from_utf8_lossy(&self.line)),
        }
    }
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }
}

struct MemcachedConnection {
    reader: BufReader<TcpStream>,
    line: Vec<u8>,
    skip: Vec<u8>,
}

impl Connection for MemcachedConnection {
    fn encode_get(&mut self, key: &[u8], _want_context: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(b"get ");
        out.extend_from_slice(key);
        out.extend_from_slice(b"\r\n");
    }
    fn encode_put(&mut self, key: &[u8], value: &[u8], _context: &[u8], out: &mut Vec<u8>) {
        use std::io::Write as _;
        out.extend_from_slice(b"set ");
        out.extend_from_slice(key);
        write!(out, " 0 0 {}\r\n", value.len()).expect("writing to a Vec");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    fn read_reply(&mut self, is_get: bool) -> anyhow::Result<Outcome> {
        read_line(&mut self.reader, &mut self.line)?;
        if self.line.starts_with(b"SERVER_ERROR") || self.line.starts_with(b"CLIENT_ERROR") {
            return Ok(Outcome::Error(
                String::from_utf8_lossy(&self.line).into_owned(),
            ));
        }
        if !is_get {
            return match self.line.as_slice() {
                b"STORED" => Ok(Outcome::Ok),
                b"NOT_STORED" => Ok(Outcome::Error("NOT_STORED".into())),
                other => bail!("memcached replied {:?}", String::from_utf8_lossy(other)),
            };
        }
        // VALUE key flags bytes CRLF data CRLF END CRLF, or END CRLF
        if self.line == b"END" {
            return Ok(Outcome::NotFound);
        }
        if !self.line.starts_with(b"VALUE ") {
            bail!(
                "memcached replied {:?}",
                String::from_utf8_lossy(&self.line)
            );
        }
        let bytes = self
            .line
            .split(|&b| b == b' ')
            .nth(3)
            .context("VALUE line without a length")?;
        let n = parse_usize(bytes)?;
        self.skip.resize(n + 2, 0);
        self.reader.read_exact(&mut self.skip)?;
        read_line(&mut self.reader, &mut self.line)?;
        if self.line != b"END" {
            bail!(
                "memcached replied {:?} after a value",
                String::from_utf8_lossy(&self.line)
            );
        }
        Ok(Outcome::Found {
            context: Vec::new(),
        })
    }
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }
}

/// Sends the same bytes a ringkv request would be; the echo server returns them.
struct EchoConnection {
    reader: BufReader<TcpStream>,
    frame: Vec<u8>,
}

impl Connection for EchoConnection {
    fn encode_get(&mut self, key: &[u8], _want_context: bool, out: &mut Vec<u8>) {
        Request::Get { r: 0, key }.encode(0, out);
    }
    fn encode_put(&mut self, key: &[u8], value: &[u8], context: &[u8], out: &mut Vec<u8>) {
        Request::Put {
            w: 0,
            key,
            context,
            value,
        }
        .encode(0, out);
    }
    fn read_reply(&mut self, is_get: bool) -> anyhow::Result<Outcome> {
        read_frame(&mut self.reader, &mut self.frame)?;
        let opcode = protocol::header(&self.frame).opcode;
        let expected = if is_get {
            protocol::opcode::GET
        } else {
            protocol::opcode::PUT
        };
        if opcode != expected {
            bail!("echo returned opcode {opcode}, sent {expected}");
        }
        Ok(if is_get {
            Outcome::Found {
                context: Vec::new(),
            }
        } else {
            Outcome::Ok
        })
    }
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(cache: &ContextCache, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        cache.get_into(key, &mut out);
        out
    }

    #[test]
    fn the_context_cache_keeps_the_last_context_of_each_key() {
        let cache = ContextCache::default();
        assert!(get(&cache, b"user000000000001").is_empty());
        cache.remember(b"user000000000001", &[1; 40]);
        cache.remember(b"user000000000002", &[2; 40]);
        cache.remember(b"user000000000001", &[3; 41]);
        assert_eq!(get(&cache, b"user000000000001"), vec![3; 41]);
        assert_eq!(get(&cache, b"user000000000002"), vec![2; 40]);
        // keys and contexts longer than a slot holds
        let long_key = vec![b'k'; 300];
        cache.remember(&long_key, &[4; 500]);
        assert_eq!(get(&cache, &long_key), vec![4; 500]);
        assert!(get(&cache, &long_key[..299]).is_empty());
        // get_into appends
        let mut out = vec![9];
        cache.get_into(b"user000000000002", &mut out);
        assert_eq!(out.len(), 41);
    }

    #[test]
    fn the_context_cache_stays_bounded() {
        let cache = ContextCache::default();
        for i in 0..CONTEXTS_MAX * 2 {
            cache.remember(format!("user{i:012}").as_bytes(), &[7; 40]);
        }
        let held: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= CONTEXTS_MAX, "{held} contexts held");
        assert!(held > 0);
        // the latest key is always there
        let last = format!("user{:012}", CONTEXTS_MAX * 2 - 1);
        assert_eq!(get(&cache, last.as_bytes()), vec![7; 40]);
    }
}

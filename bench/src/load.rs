//! `ringkv-bench load`: the first, single-operation closed-loop load generator for ringkv and its peers, so
//! every system is measured by the same code with the same connections, pipeline
//! depth, value size and key space.
//!
//! Each connection is a thread that writes `pipeline` requests, then reads their
//! replies; every request's latency is from the write of its batch to the read of its
//! reply. Drivers: ringkv (protocol v1), Redis (RESP2: SET/GET), memcached (text
//! protocol: set/get).

use crate::{latency_histogram, report_line};
use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use ringkv_net::protocol::{self, Reply, Request};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Ringkv,
    Redis,
    Memcached,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub target: Target,
    pub addr: String,
    pub op: Op,
    pub connections: usize,
    pub pipeline: usize,
    pub seconds: f64,
    pub value_bytes: usize,
    pub keys: u64,
    /// Load every key once before a GET run.
    pub preload: bool,
    /// ringkv only: each connection goes to one shard's own port and asks only for
    /// keys that shard owns (what a shard-aware client does).
    pub shard_aware: bool,
}

/// Checks the options make sense.
pub fn validate(o: &LoadOptions) -> anyhow::Result<()> {
    if !(1..=10_000).contains(&o.connections) || !(1..=1024).contains(&o.pipeline) {
        bail!("--connections 1..=10000, --pipeline 1..=1024");
    }
    if !(o.seconds > 0.0 && o.seconds <= 600.0) || o.keys == 0 {
        bail!("--seconds in (0, 600], --keys > 0");
    }
    Ok(())
}

/// One connection speaking one system's protocol.
trait Driver {
    /// Appends one request for `key` to `out`.
    fn request(&mut self, op: Op, key: &[u8], value: &[u8], id: u64, out: &mut Vec<u8>);
    /// Reads one reply; an error reply or a broken stream is an error.
    fn reply(&mut self, op: Op) -> anyhow::Result<()>;
    fn stream(&mut self) -> &mut TcpStream;
    /// Whether this connection should be sent `key` (shard-aware routing).
    fn accepts(&self, _key: &[u8]) -> bool {
        true
    }
}

struct RingkvDriver {
    reader: BufReader<TcpStream>,
    frame: Vec<u8>,
    /// (partitions, shards, this connection's shard) when routing by shard.
    shard: Option<(u32, usize, usize)>,
}

impl Driver for RingkvDriver {
    fn request(&mut self, op: Op, key: &[u8], value: &[u8], id: u64, out: &mut Vec<u8>) {
        match op {
            Op::Get => Request::Get { r: 0, key }.encode(id, out),
            Op::Put => Request::Put {
                w: 0,
                key,
                context: b"",
                value,
            }
            .encode(id, out),
        }
    }
    fn reply(&mut self, _op: Op) -> anyhow::Result<()> {
        self.frame.resize(4, 0);
        self.reader.read_exact(&mut self.frame)?;
        let len = u32::from_le_bytes(self.frame[..4].try_into().expect("4")) as usize;
        if !(protocol::HEADER_BYTES..64 << 20).contains(&len) {
            bail!("bad frame length {len}");
        }
        self.frame.resize(len, 0);
        self.reader.read_exact(&mut self.frame[4..])?;
        match Reply::parse(&self.frame)?.1 {
            Reply::Error { code, message } => {
                bail!("error {code}: {}", String::from_utf8_lossy(message))
            }
            _ => Ok(()),
        }
    }
    fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
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

/// Asks a node for its shard layout: (partitions, shards, shard port base).
fn ringkv_layout(addr: &str) -> anyhow::Result<(u32, usize, u16)> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut d = RingkvDriver {
        reader: BufReader::new(stream),
        frame: Vec::new(),
        shard: None,
    };
    let mut out = Vec::new();
    Request::Hello {
        min_version: 1,
        max_version: 1,
    }
    .encode(0, &mut out);
    d.stream().write_all(&out)?;
    d.reply(Op::Get)?;
    match Reply::parse(&d.frame)?.1 {
        Reply::HelloOk(h) => Ok((h.partitions, h.shards as usize, h.shard_port_base)),
        other => bail!("unexpected HELLO reply {other:?}"),
    }
}

struct RedisDriver {
    reader: BufReader<TcpStream>,
    line: String,
    skip: Vec<u8>,
}

impl Driver for RedisDriver {
    fn request(&mut self, op: Op, key: &[u8], value: &[u8], _id: u64, out: &mut Vec<u8>) {
        let arg = |out: &mut Vec<u8>, a: &[u8]| {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        };
        match op {
            Op::Get => {
                out.extend_from_slice(b"*2\r\n");
                arg(out, b"GET");
                arg(out, key);
            }
            Op::Put => {
                out.extend_from_slice(b"*3\r\n");
                arg(out, b"SET");
                arg(out, key);
                arg(out, value);
            }
        }
    }
    fn reply(&mut self, _op: Op) -> anyhow::Result<()> {
        self.line.clear();
        self.reader.read_line(&mut self.line)?;
        match self.line.as_bytes().first() {
            Some(b'+') | Some(b':') => Ok(()),
            Some(b'$') => {
                let n: i64 = self.line[1..].trim().parse()?;
                if n >= 0 {
                    self.skip.resize(n as usize + 2, 0);
                    self.reader.read_exact(&mut self.skip)?;
                }
                Ok(())
            }
            _ => bail!("redis replied {:?}", self.line.trim()),
        }
    }
    fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

struct MemcachedDriver {
    reader: BufReader<TcpStream>,
    line: String,
    skip: Vec<u8>,
}

impl Driver for MemcachedDriver {
    fn request(&mut self, op: Op, key: &[u8], value: &[u8], _id: u64, out: &mut Vec<u8>) {
        match op {
            Op::Get => {
                out.extend_from_slice(b"get ");
                out.extend_from_slice(key);
                out.extend_from_slice(b"\r\n");
            }
            Op::Put => {
                out.extend_from_slice(b"set ");
                out.extend_from_slice(key);
                out.extend_from_slice(format!(" 0 0 {}\r\n", value.len()).as_bytes());
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    fn reply(&mut self, op: Op) -> anyhow::Result<()> {
        self.line.clear();
        self.reader.read_line(&mut self.line)?;
        match op {
            Op::Put if self.line == "STORED\r\n" => Ok(()),
            Op::Get => {
                // VALUE key flags bytes \r\n data \r\n END \r\n, or END
                if let Some(rest) = self.line.strip_prefix("VALUE ") {
                    let n: usize = rest
                        .split_whitespace()
                        .nth(2)
                        .context("VALUE line")?
                        .parse()?;
                    self.skip.resize(n + 2, 0);
                    self.reader.read_exact(&mut self.skip)?;
                    self.line.clear();
                    self.reader.read_line(&mut self.line)?;
                }
                if self.line == "END\r\n" {
                    Ok(())
                } else {
                    bail!("memcached replied {:?}", self.line.trim())
                }
            }
            _ => bail!("memcached replied {:?}", self.line.trim()),
        }
    }
    fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

fn connect(o: &LoadOptions, connection: usize) -> anyhow::Result<Box<dyn Driver + Send>> {
    let mut addr = o.addr.clone();
    let mut shard = None;
    if o.shard_aware && o.target == Target::Ringkv {
        let (partitions, shards, port_base) = ringkv_layout(&o.addr)?;
        if port_base == 0 {
            bail!("--shard-aware needs a node started with shard ports (--shard-port-base)");
        }
        let s = connection % shards;
        let host = o.addr.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
        addr = format!("{host}:{}", port_base as usize + s);
        shard = Some((partitions, shards, s));
    }
    let stream = TcpStream::connect(&addr).with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let reader = BufReader::with_capacity(256 * 1024, stream);
    Ok(match o.target {
        Target::Ringkv => Box::new(RingkvDriver {
            reader,
            frame: Vec::new(),
            shard,
        }),
        Target::Redis => Box::new(RedisDriver {
            reader,
            line: String::new(),
            skip: Vec::new(),
        }),
        Target::Memcached => Box::new(MemcachedDriver {
            reader,
            line: String::new(),
            skip: Vec::new(),
        }),
    })
}

fn key_of(i: u64) -> Vec<u8> {
    format!("key:{i:012}").into_bytes()
}

/// Puts every key once (pipelined, over a few connections).
fn preload(o: &LoadOptions) -> anyhow::Result<()> {
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let o = o.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut d = connect(
                    &LoadOptions {
                        shard_aware: false,
                        ..o.clone()
                    },
                    0,
                )?;
                let value = vec![b'v'; o.value_bytes];
                let mut out = Vec::new();
                let mut i = t;
                while i < o.keys {
                    out.clear();
                    let mut n = 0;
                    while n < 64 && i < o.keys {
                        d.request(Op::Put, &key_of(i), &value, i, &mut out);
                        i += 4;
                        n += 1;
                    }
                    d.stream().write_all(&out)?;
                    for _ in 0..n {
                        d.reply(Op::Put)?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("preload thread panicked"))??;
    }
    Ok(())
}

/// Runs the load; returns (ops, seconds, latency histogram in ns).
pub fn run(o: &LoadOptions) -> anyhow::Result<(u64, f64, Histogram<u64>)> {
    if o.preload && o.op == Op::Get {
        preload(o)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..o.connections)
        .map(|c| {
            let (o, stop) = (o.clone(), stop.clone());
            std::thread::spawn(move || -> anyhow::Result<(u64, Histogram<u64>)> {
                let mut d = connect(&o, c)?;
                let mut hist = latency_histogram();
                let value = vec![b'x'; o.value_bytes];
                let mut out = Vec::with_capacity(o.pipeline * (o.value_bytes + 64));
                let mut rng = (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut ops = 0u64;
                let deadline = Instant::now() + Duration::from_secs_f64(o.seconds);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    out.clear();
                    for j in 0..o.pipeline {
                        // keys this connection's shard owns (all keys unless shard-aware);
                        // bounded: a shard owns about 1/shards of the keys
                        let mut key = Vec::new();
                        for _ in 0..10_000 {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            key = key_of(rng % o.keys);
                            if d.accepts(&key) {
                                break;
                            }
                        }
                        d.request(o.op, &key, &value, ops + j as u64, &mut out);
                    }
                    let t = Instant::now();
                    d.stream().write_all(&out)?;
                    for _ in 0..o.pipeline {
                        d.reply(o.op)?;
                        hist.record(t.elapsed().as_nanos().max(1) as u64)?;
                    }
                    ops += o.pipeline as u64;
                }
                Ok((ops, hist))
            })
        })
        .collect();
    let mut total = 0;
    let mut hist = latency_histogram();
    let mut failure = None;
    for t in threads {
        match t.join() {
            Ok(Ok((ops, h))) => {
                total += ops;
                hist.add(&h)?;
            }
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                failure = Some(e);
            }
            Err(_) => failure = Some(anyhow::anyhow!("a load thread panicked")),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok((total, start.elapsed().as_secs_f64(), hist))
}

pub fn main(o: LoadOptions) -> anyhow::Result<()> {
    validate(&o)?;
    let (ops, seconds, hist) = run(&o)?;
    let name = format!(
        "{:?}{} {:?} c={} p={}",
        o.target,
        if o.shard_aware { " (shard-aware)" } else { "" },
        o.op,
        o.connections,
        o.pipeline
    );
    println!("{}", report_line(&name, ops, seconds, &hist));
    Ok(())
}

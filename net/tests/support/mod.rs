//! Fake servers over `std::net` for the client tests: a scripted one-connection server
//! (the test decides every byte it sends) and a tiny in-memory key-value node with
//! optional shard ports.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ringkv_net::protocol::{
    check_frame, encode, ErrorCode, HelloOk, Request, FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION,
};

/// A request copied out of its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Req {
    Hello {
        min_version: u8,
        max_version: u8,
    },
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

impl Req {
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            Req::Get { key, .. } | Req::Put { key, .. } | Req::Delete { key, .. } => Some(key),
            _ => None,
        }
    }
}

fn own(request: Request<'_>) -> Req {
    match request {
        Request::Hello {
            min_version,
            max_version,
        } => Req::Hello {
            min_version,
            max_version,
        },
        Request::Ping => Req::Ping,
        Request::Get { r, key } => Req::Get {
            r,
            key: key.to_vec(),
        },
        Request::Put {
            w,
            key,
            context,
            value,
        } => Req::Put {
            w,
            key: key.to_vec(),
            context: context.to_vec(),
            value: value.to_vec(),
        },
        Request::Delete { w, key, context } => Req::Delete {
            w,
            key: key.to_vec(),
            context: context.to_vec(),
        },
    }
}

pub fn hello_ok(in_flight_max: u32) -> HelloOk {
    HelloOk {
        version: PROTOCOL_VERSION,
        node_id: 7,
        partitions: 64,
        shards: 4,
        shard: 1,
        shard_port_base: 0,
        frame_bytes_max: FRAME_BYTES_MAX_DEFAULT as u32,
        in_flight_max,
    }
}

/// The server side of one connection.
pub struct FakeConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl FakeConn {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// The next whole frame, or `None` once the client closed the connection.
    pub fn read_frame(&mut self) -> Option<Vec<u8>> {
        let mut chunk = [0u8; 4096];
        // bounded: a frame is at most FRAME_BYTES_MAX_DEFAULT bytes and each read adds one
        for _ in 0..=FRAME_BYTES_MAX_DEFAULT {
            if let Some(len) = check_frame(&self.buf, FRAME_BYTES_MAX_DEFAULT).expect("valid frame")
            {
                return Some(self.buf.drain(..len).collect());
            }
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        None
    }

    pub fn read_request(&mut self) -> Option<(u64, Req)> {
        let frame = self.read_frame()?;
        let (header, request) = Request::parse(&frame).expect("client sent a valid request");
        Some((header.request_id, own(request)))
    }

    pub fn send(&mut self, bytes: &[u8]) {
        // the client may have hung up already; the test checks what it saw
        let _ = self.stream.write_all(bytes);
    }

    /// Reads the HELLO (which must offer exactly v1) and answers with `hello`.
    pub fn accept_hello(&mut self, hello: &HelloOk) {
        let (id, request) = self.read_request().expect("HELLO");
        assert_eq!(
            request,
            Req::Hello {
                min_version: 1,
                max_version: 1
            }
        );
        let mut out = Vec::new();
        encode::hello_ok(&mut out, id, hello);
        self.send(&out);
    }

    /// Whether the client sent more bytes than the frames read so far: buffered here, or
    /// arriving within a short wait. (A late byte can slip past the wait, so a `false`
    /// is weak evidence; a `true` is proof.)
    pub fn has_more_bytes(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        self.stream
            .set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .expect("set timeout");
        let mut probe = [0u8; 1];
        let more = self.stream.peek(&mut probe).map(|n| n > 0).unwrap_or(false);
        self.stream.set_read_timeout(None).expect("clear timeout");
        more
    }

    /// Sends a PONG for request `id`.
    pub fn pong(&mut self, id: u64) {
        let mut out = Vec::new();
        encode::pong(&mut out, id);
        self.send(&out);
    }

    /// Answers every request with a PONG until the client closes the connection.
    pub fn answer_pings(&mut self) {
        while let Some((id, _)) = self.read_request() {
            self.pong(id);
        }
    }

    /// Blocks until the client closes the connection.
    pub fn wait_for_close(&mut self) {
        let mut chunk = [0u8; 4096];
        for _ in 0..1_000_000 {
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// A server that accepts one connection and runs `script` on it. Join the handle to see
/// the script's assertions.
pub fn serve_one(script: impl FnOnce(FakeConn) + Send + 'static) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        script(FakeConn::new(stream));
    });
    (addr, handle)
}

/// What a fake node saw: (shard that served it, key) for every keyed request.
pub type Seen = Arc<Mutex<Vec<(u16, Vec<u8>)>>>;

type Store = Arc<Mutex<HashMap<Vec<u8>, (u64, Vec<Vec<u8>>)>>>;

/// An in-memory key-value node: a put with the key's current context replaces its values,
/// a put without context adds a sibling; the context is the key's version number.
pub struct FakeNode {
    pub addr: SocketAddr,
    pub seen: Seen,
}

/// Connections a fake node accepts per listener before it stops.
const FAKE_NODE_CONNECTIONS_MAX: usize = 64;

impl FakeNode {
    /// A node without shard ports.
    pub fn start(in_flight_max: u32) -> FakeNode {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Seen = Arc::default();
        let store: Store = Arc::default();
        let mut hello = hello_ok(in_flight_max);
        hello.shard = 0;
        spawn_listener(listener, hello, seen.clone(), store);
        FakeNode { addr, seen }
    }

    /// A node with `shards` shard ports at consecutive ports, plus a main port served as
    /// shard 0. Returns `None` if no free run of ports was found.
    pub fn start_sharded(shards: u16) -> Option<FakeNode> {
        for _ in 0..50 {
            let main = TcpListener::bind("127.0.0.1:0").expect("bind");
            let base = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port_base = base.local_addr().expect("addr").port();
            drop(base);
            if port_base.checked_add(shards).is_none() {
                continue;
            }
            let listeners: Option<Vec<TcpListener>> = (0..shards)
                .map(|s| TcpListener::bind(("127.0.0.1", port_base + s)).ok())
                .collect();
            let Some(listeners) = listeners else { continue };
            let seen: Seen = Arc::default();
            let store: Store = Arc::default();
            let mut hello = hello_ok(16);
            hello.shards = shards;
            hello.shard_port_base = port_base;
            let addr = main.local_addr().expect("addr");
            hello.shard = 0;
            spawn_listener(main, hello, seen.clone(), store.clone());
            for (s, listener) in listeners.into_iter().enumerate() {
                hello.shard = s as u16;
                spawn_listener(listener, hello, seen.clone(), store.clone());
            }
            return Some(FakeNode { addr, seen });
        }
        None
    }
}

/// A port nobody listens on now (bound, then released).
#[allow(dead_code)]
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A key-value node on a fresh port whose HELLO announces one shard, on `shard_port`,
/// which this node does not serve: (its address, its HELLO, what it sees).
#[allow(dead_code)]
pub fn node_announcing_shard_port(shard_port: u16) -> (SocketAddr, HelloOk, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut hello = hello_ok(8);
    hello.shards = 1;
    hello.shard = 0;
    hello.shard_port_base = shard_port;
    (addr, hello, serve_kv_listener(listener, hello))
}

/// Serves `listener` as a key-value node answering HELLO with `hello`; returns what it
/// sees.
#[allow(dead_code)]
pub fn serve_kv_listener(listener: TcpListener, hello: HelloOk) -> Seen {
    let seen: Seen = Arc::default();
    spawn_listener(listener, hello, seen.clone(), Arc::default());
    seen
}

fn spawn_listener(listener: TcpListener, hello: HelloOk, seen: Seen, store: Store) {
    std::thread::spawn(move || {
        for stream in listener.incoming().take(FAKE_NODE_CONNECTIONS_MAX) {
            let Ok(stream) = stream else { continue };
            let (seen, store) = (seen.clone(), store.clone());
            std::thread::spawn(move || serve_kv(FakeConn::new(stream), hello, seen, store));
        }
    });
}

fn serve_kv(mut conn: FakeConn, hello: HelloOk, seen: Seen, store: Store) {
    let mut out = Vec::new();
    // bounded: one pass per request; the client closing ends it
    for _ in 0..1_000_000 {
        let Some((id, request)) = conn.read_request() else {
            return;
        };
        if let Some(key) = request.key() {
            seen.lock().unwrap().push((hello.shard, key.to_vec()));
        }
        out.clear();
        let mut store = store.lock().unwrap();
        match request {
            Req::Hello { .. } => encode::hello_ok(&mut out, id, &hello),
            Req::Ping => encode::pong(&mut out, id),
            Req::Get { key, .. } => {
                let (version, values) = store.get(&key).cloned().unwrap_or_default();
                let context = if version == 0 {
                    Vec::new()
                } else {
                    version.to_le_bytes().to_vec()
                };
                encode::get_ok(&mut out, id, &context, values.iter().map(Vec::as_slice));
            }
            Req::Put {
                key,
                context,
                value,
                ..
            } => {
                let entry = store.entry(key).or_default();
                if context.is_empty() {
                    entry.1.push(value);
                } else if context == entry.0.to_le_bytes() {
                    entry.1 = vec![value];
                } else {
                    encode::error(&mut out, id, ErrorCode::BadContext, "stale context");
                    conn.send(&out);
                    continue;
                }
                entry.0 += 1;
                encode::put_ok(&mut out, id, &entry.0.to_le_bytes(), entry.1.len() as u16);
            }
            Req::Delete { key, .. } => {
                store.remove(&key);
                encode::delete_ok(&mut out, id);
            }
        }
        drop(store);
        conn.send(&out);
    }
}

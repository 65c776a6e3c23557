//! A real `ringkv server` process for tests, and a minimal raw protocol client (the
//! bad-input tests need to send bytes no client library would).
#![allow(dead_code)]

use ringkv_net::protocol::{self, Reply, Request};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
}

/// Runs `ringkv ARGS`, which must fail by itself (within 60 s, else the test fails);
/// returns its stderr.
pub fn ringkv_fails(args: &[&std::ffi::OsStr]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringkv");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringkv {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "ringkv {args:?} succeeded: {stderr}");
    stderr
}

/// Runs `ringkv server --data-dir DIR --listen 127.0.0.1:0 --shard-port-base 0 EXTRA`,
/// which must fail by itself (see [`ringkv_fails`]); returns its stderr.
pub fn server_fails(data_dir: &Path, extra: &[&std::ffi::OsStr]) -> String {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "server".as_ref(),
        "--data-dir".as_ref(),
        data_dir.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--shard-port-base".as_ref(),
        "0".as_ref(),
    ];
    args.extend_from_slice(extra);
    ringkv_fails(&args)
}

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Lines the server printed on stdout after "listening" (kept by a drain thread).
    pub stdout: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// A node with 2 shards and no shard ports (tests run in parallel: fixed ports
    /// would collide), on a free client port.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["--shard-port-base", "0", "--shards", "2"];
        args.extend_from_slice(extra);
        Server::try_start(data_dir, &args).expect("server exited before it was ready")
    }

    /// [`Server::start`] with `toml` as its config file (`DIR/ringkv.toml`, rewritten
    /// each time) and its data in `DIR/data`.
    pub fn start_with_config(dir: &Path, toml: &str, extra: &[&str]) -> Server {
        let config = dir.join("ringkv.toml");
        std::fs::write(&config, toml).expect("write the config file");
        let config = config.to_str().expect("a UTF-8 path").to_string();
        let mut args = vec!["--config", config.as_str()];
        args.extend_from_slice(extra);
        Server::start(&dir.join("data"), &args)
    }

    /// A node with `shards` shards and shard ports: a free-looking range of ports is
    /// picked and the start retried (bounded) if another process takes one first.
    pub fn start_with_shard_ports(data_dir: &Path, shards: u16, extra: &[&str]) -> Server {
        let seed = std::process::id() as u64 ^ now_nanos();
        for attempt in 0..20u64 {
            let base =
                20_000 + ((seed.wrapping_mul(6364136223846793005) >> 33) + attempt * 977) % 40_000;
            let base = base as u16;
            let free =
                (0..shards).all(|s| std::net::TcpListener::bind(("127.0.0.1", base + s)).is_ok());
            if !free {
                continue;
            }
            let (base_arg, shards_arg) = (base.to_string(), shards.to_string());
            let mut args = vec![
                "--shard-port-base",
                base_arg.as_str(),
                "--shards",
                shards_arg.as_str(),
            ];
            args.extend_from_slice(extra);
            if let Some(server) = Server::try_start(data_dir, &args) {
                return server;
            }
        }
        panic!("no free range of {shards} shard ports found in 20 tries");
    }

    /// Starts `ringkv server --data-dir DIR --listen 127.0.0.1:0 ARGS`; `None` if it exits
    /// before printing its "listening" line.
    pub fn try_start(data_dir: &Path, args: &[&str]) -> Option<Server> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringkv"))
            .args(["server", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ringkv server");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("ringkv listening on ") {
                        break addr.parse().expect("address");
                    }
                }
                _ => {
                    let _ = child.wait();
                    return None;
                }
            }
        };
        // keep draining stdout so the server never blocks on it
        let kept = Arc::new(Mutex::new(Vec::new()));
        let sink = kept.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Some(Server {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            stdout: kept,
        })
    }

    /// The counts of the "ringkv stopped: ..." line, once the server stopped cleanly:
    /// (requests, forwarded, connections accepted, connections refused).
    pub fn stopped_counts(&self) -> Option<(u64, u64, u64, u64)> {
        // the drain thread may still be taking the last line (bounded wait)
        for _ in 0..100 {
            let lines = self.stdout.lock().unwrap();
            if let Some(line) = lines.iter().find(|l| l.starts_with("ringkv stopped: ")) {
                let numbers: Vec<u64> = line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse().ok())
                    .collect();
                return match numbers[..] {
                    [requests, forwarded, accepted, refused] => {
                        Some((requests, forwarded, accepted, refused))
                    }
                    _ => panic!("unexpected stop line {line:?}"),
                };
            }
            drop(lines);
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGINT, then wait for a clean exit (bounded).
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        self.signal_and_wait(libc::SIGINT)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit (bounded).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.wait_exit(signal)
    }

    /// Waits (bounded) for the node to exit after a signal the caller sent it (a
    /// second signal would make it exit at once, with 130).
    pub fn wait_exit(&mut self, signal: i32) -> std::process::ExitStatus {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        panic!("server did not stop within 15 s of signal {signal}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A raw connection speaking protocol v1 frame by frame.
pub struct Raw {
    pub stream: TcpStream,
    next_id: u64,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Raw { stream, next_id: 1 }
    }

    /// A raw connection over a stream the caller opened (its timeouts as they are).
    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw { stream, next_id: 1 }
    }

    pub fn send(&mut self, req: Request<'_>) -> u64 {
        let (id, written) = self.try_send(req);
        assert!(written, "write");
        id
    }

    /// [`Raw::send`] that reports a failed write (a connection the server closed)
    /// instead of panicking: (request id, written).
    pub fn try_send(&mut self, req: Request<'_>) -> (u64, bool) {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = Vec::new();
        req.encode(id, &mut out);
        (id, self.stream.write_all(&out).is_ok())
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads one whole frame; `None` when the server closed the connection (an end of
    /// stream, or a reset). Panics when nothing came within the stream's read timeout:
    /// a server that neither answers nor closes must not pass for one that closed.
    pub fn read_frame(&mut self) -> Option<Vec<u8>> {
        let mut frame = vec![0u8; 4];
        if let Err(e) = self.stream.read_exact(&mut frame) {
            return closed_or_panic(e);
        }
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert!(
            (16..64 << 20).contains(&len),
            "server sent a bad frame length {len}"
        );
        frame.resize(len, 0);
        if let Err(e) = self.stream.read_exact(&mut frame[4..]) {
            return closed_or_panic(e);
        }
        Some(frame)
    }

    pub fn call(&mut self, req: Request<'_>) -> (u64, Vec<u8>) {
        let id = self.send(req);
        let frame = self.read_frame().expect("a reply");
        let (h, _) = Reply::parse(&frame).expect("valid reply");
        assert_eq!(h.request_id, id);
        (id, frame)
    }

    pub fn put(&mut self, key: &[u8], value: &[u8], context: &[u8]) -> Vec<u8> {
        let (_, frame) = self.call(Request::Put {
            w: 0,
            key,
            context,
            value,
        });
        match Reply::parse(&frame).unwrap().1 {
            Reply::PutOk { context, .. } => context.to_vec(),
            other => panic!("put failed: {other:?}"),
        }
    }

    /// (values sorted, context)
    pub fn get(&mut self, key: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let (_, frame) = self.call(Request::Get { r: 0, key });
        match Reply::parse(&frame).unwrap().1 {
            Reply::GetOk { context, values } => {
                let mut v: Vec<Vec<u8>> = values.iter().map(|v| v.to_vec()).collect();
                v.sort();
                (v, context.to_vec())
            }
            other => panic!("get failed: {other:?}"),
        }
    }

    pub fn ping(&mut self) -> bool {
        let (_, frame) = self.call(Request::Ping);
        matches!(Reply::parse(&frame).unwrap().1, Reply::Pong)
    }

    /// Sends a JOIN_REQUEST as node `id` at `addr` (2 shards, weight 1, no zone), as a
    /// joining node would, and returns the reply frame.
    pub fn join_request(&mut self, id: u64, addr: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        ringkv_net::peer::ClusterRequest::JoinRequest {
            id,
            shards: 2,
            weight: 1,
            addr,
            zone: b"",
        }
        .encode(self.next_id, &mut f);
        self.next_id += 1;
        self.send_bytes(&f);
        self.read_frame().expect("a reply")
    }
}

/// `None` for a read error that means the server closed the connection; a panic for
/// one that means it did not answer in time (or anything else).
pub fn closed_or_panic<T>(e: std::io::Error) -> Option<T> {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
            None
        }
        _ => panic!("the server neither answered nor closed the connection: {e}"),
    }
}

/// Appends a PUT frame without context (a blind write) to `out`.
pub fn encode_blind_put(id: u64, key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    Request::Put {
        w: 0,
        key,
        context: b"",
        value,
    }
    .encode(id, out);
}

/// Opens connections until one answers a PING (a shard over its connection limit
/// refuses new ones until it has seen old ones close), 25 ms apart: the served
/// connection, or `None` after `tries`, and how many were refused first.
pub fn connect_until_served(addr: SocketAddr, tries: usize) -> (Option<Raw>, usize) {
    let mut refused = 0;
    for _ in 0..tries {
        let mut raw = Raw::connect(addr);
        raw.try_send(Request::Ping);
        if let Some(f) = raw.read_frame() {
            if error_code(&f).is_none() {
                return (Some(raw), refused);
            }
        }
        refused += 1;
        std::thread::sleep(Duration::from_millis(25));
    }
    (None, refused)
}

/// The error code of an ERROR reply frame.
pub fn error_code(frame: &[u8]) -> Option<u16> {
    match Reply::parse(frame).ok()?.1 {
        Reply::Error { code, .. } => Some(code),
        _ => None,
    }
}

pub fn header_of(frame: &[u8]) -> protocol::Header {
    protocol::header(frame)
}

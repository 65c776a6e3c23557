//! Starting the systems under test on free 127.0.0.1 ports, for `compare` and for
//! the driver tests: Redis, memcached, the echo server and a ringkv node (a process,
//! or in this process on a thread). Every process is killed when its guard drops.

use anyhow::{bail, Context as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port the kernel just handed out (free unless someone else takes it first).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The first of `count` consecutive ports that are all free now. A port the kernel
/// handed out is free, but the ones after it may be in use, or held in TIME_WAIT by a
/// connection that had it as its ephemeral port (a listener cannot bind it then).
pub fn free_port_run(count: usize) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let base = free_port()?;
        if usize::from(base) + count > usize::from(u16::MAX) {
            continue;
        }
        let all_free =
            (0..count as u16).all(|s| TcpListener::bind(("127.0.0.1", base + s)).is_ok());
        if all_free {
            return Ok(base);
        }
    }
    bail!("no run of {count} free ports found in 100 tries")
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The Debian package that provides a missing program.
pub fn debian_package(program: &str) -> &'static str {
    match program {
        "redis-server" => "redis-server",
        "memcached" => "memcached",
        _ => "(unknown)",
    }
}

/// A started process; killed and reaped on drop.
#[derive(Debug)]
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts connections (or `child` exits, or `timeout` passes).
fn wait_for_port(addr: SocketAddr, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("exited with {status} before listening on {addr}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("not listening on {addr} after {timeout:?}")
}

fn spawn(name: &str, mut command: Command, port: u16, log: &Path) -> anyhow::Result<Server> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let out = std::fs::File::create(log)?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    if let Err(e) = wait_for_port(addr, &mut child, Duration::from_secs(20)) {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(log).unwrap_or_default();
        bail!("{name} {e}; its output:\n{log}");
    }
    Ok(Server {
        name: name.into(),
        addr,
        child,
    })
}

/// Redis on a free port, data in `dir`; `durable`: `appendonly yes`, `appendfsync always`.
pub fn start_redis(dir: &Path, durable: bool) -> anyhow::Result<Server> {
    let port = free_port()?;
    let mut c = Command::new("redis-server");
    c.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ])
    .args(["--daemonize", "no", "--protected-mode", "no"])
    .arg("--dir")
    .arg(dir);
    if durable {
        c.args(["--appendonly", "yes", "--appendfsync", "always"]);
    }
    spawn("redis-server", c, port, &dir.join("redis.log"))
}

/// memcached on a free port with `threads` worker threads.
pub fn start_memcached(dir: &Path, threads: usize) -> anyhow::Result<Server> {
    let port = free_port()?;
    let mut c = Command::new("memcached");
    c.args(["-l", "127.0.0.1", "-p", &port.to_string(), "-U", "0"])
        .args(["-t", &threads.to_string(), "-m", "1024"]);
    // memcached refuses to run as root unless told which user to be
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        c.args(["-u", "root"]);
    }
    spawn("memcached", c, port, &dir.join("memcached.log"))
}

/// A program next to the running executable (e.g. `ringkv-echo`, `ringkv`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // tests run from target/<profile>/deps
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// The echo server as its own process.
pub fn start_echo_process(binary: &Path, dir: &Path) -> anyhow::Result<Server> {
    let port = free_port()?;
    let mut c = Command::new(binary);
    c.args(["--listen", &format!("127.0.0.1:{port}")]);
    spawn("ringkv-echo", c, port, &dir.join("echo.log"))
}

/// A ringkv node as its own process (`ringkv server`), `shards` shards with shard
/// ports, `sync` durability.
pub fn start_ringkv_process(binary: &Path, dir: &Path, shards: usize) -> anyhow::Result<Server> {
    let port = free_port()?;
    let shard_base = free_port_run(shards)?;
    let mut c = Command::new(binary);
    c.arg("server")
        .arg("--data-dir")
        .arg(dir.join("ringkv"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--shard-port-base", &shard_base.to_string()])
        .args(["--shards", &shards.to_string(), "--durability", "sync"]);
    spawn("ringkv", c, port, &dir.join("ringkv.log"))
}

/// A ringkv node in this process (glommio shards on their own threads); stops when
/// dropped.
pub struct InProcessNode {
    pub addr: SocketAddr,
    shutdown: ringkv_engine::server::Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for InProcessNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessNode")
            .field("addr", &self.addr)
            .finish()
    }
}

impl InProcessNode {
    /// Starts a node with `shards` shards on port 0, data in `dir`.
    pub fn start(dir: &Path, shards: usize) -> anyhow::Result<Self> {
        Self::start_with(dir, shards, 4 << 20)
    }

    /// Same, refusing values above `value_bytes_max`.
    pub fn start_with(dir: &Path, shards: usize, value_bytes_max: usize) -> anyhow::Result<Self> {
        use ringkv_engine::server::{run, ServerConfig, Shutdown};
        let config = ServerConfig {
            data_dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".parse()?,
            shard_port_base: 0,
            shards,
            durability: ringkv_engine::Durability::None,
            cache_bytes_max: 16 << 20,
            value_bytes_max,
            drain_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        let shutdown = Shutdown::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let sd = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let failed = tx.clone();
            if let Err(e) = run(config, sd, move |addr| {
                let _ = tx.send(Ok(addr));
            }) {
                let _ = failed.send(Err(e));
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => bail!("ringkv node failed to start: {e}"),
            Err(_) => bail!("ringkv node not ready after 30 s"),
        };
        Ok(InProcessNode {
            addr,
            shutdown,
            thread: Some(thread),
        })
    }
}

impl Drop for InProcessNode {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A scratch folder removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

//! `ringkv dev`: a local cluster of child processes that agree on the ring, serve
//! quorum reads and writes, and all stop on SIGINT; a second `dev` in its way fails.

mod common;

use ringkv_net::client::{Client, ClientConfig};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `ringkv dev` in a process group of its own: interrupted as a terminal's
/// Ctrl-C does (SIGINT to the group; dev's nodes are in groups of their own, and dev
/// stops them), and so when dropped (then killed after 30 s, and its nodes stop when
/// it dies), so a failing test leaves no cluster on its ports.
struct Dev(Child);

impl Dev {
    /// Starts `ringkv dev ARGS --data-dir DIR` and waits until it reports the cluster
    /// ready; returns it with the client addresses it printed.
    fn start(args: &[&str], data_dir: &std::path::Path) -> (Dev, Vec<String>) {
        let child = Command::new(env!("CARGO_BIN_EXE_ringkv"))
            .arg("dev")
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("start ringkv dev");
        let mut dev = Dev(child);
        let mut lines = BufReader::new(dev.0.stdout.take().unwrap()).lines();
        let (mut addrs, mut ready) = (Vec::new(), false);
        // dev gives up by itself within 180 s (60 s for node 1, 120 s to agree)
        for line in lines.by_ref() {
            let line = line.expect("stdout");
            if line.starts_with("127.0.0.1:") {
                addrs.push(line.trim().to_string());
            }
            if line.starts_with("Ctrl-C") {
                ready = true;
                break;
            }
        }
        assert!(ready, "ringkv dev {args:?} did not report a ready cluster");
        std::thread::spawn(move || for _ in lines {});
        (dev, addrs)
    }

    /// SIGINT to dev's process group, as a terminal sends it.
    fn ctrl_c(&self) {
        // SAFETY: kill(2) on the process group our own child leads.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGINT) };
    }

    /// Ctrl-C; the exit status (bounded wait, then killed).
    fn interrupt(&mut self) -> ExitStatus {
        if let Ok(Some(status)) = self.0.try_wait() {
            return status;
        }
        self.ctrl_c();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.0.kill();
                panic!("dev did not stop on SIGINT within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(None) = self.0.try_wait() {
                self.ctrl_c();
                let deadline = Instant::now() + Duration::from_secs(30);
                while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = self.0.kill();
            }
            let _ = self.0.wait();
        } else {
            self.interrupt();
        }
    }
}

#[test]
fn dev_starts_a_cluster_that_serves_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--nodes", "3", "--base-port", "7600", "--shards", "1"];
    let (mut dev, addrs) = Dev::start(&args, &dir.path().join("dev"));
    assert_eq!(
        addrs,
        ["127.0.0.1:7600", "127.0.0.1:7610", "127.0.0.1:7620"],
        "dev prints each node's client address once the ring agrees"
    );
    let mut a = Client::connect(&addrs[0], ClientConfig::default()).unwrap();
    let mut c = Client::connect(&addrs[2], ClientConfig::default()).unwrap();
    a.put_with(b"dev-key", b"dev-value", None, 3)
        .expect("put W = 3");
    assert_eq!(
        c.get_with(b"dev-key", 3).expect("get R = 3").values,
        vec![b"dev-value".to_vec()]
    );
    let status = dev.interrupt();
    assert!(status.success(), "{status}");
    // the nodes stopped with it
    assert!(std::net::TcpStream::connect(&addrs[1]).is_err());
}

/// `ringkv dev` with `args` on `data_dir`, expected to fail by itself: its stderr.
fn failing_dev(args: &[&str], data_dir: &std::path::Path) -> String {
    let mut all: Vec<&std::ffi::OsStr> = vec!["dev".as_ref()];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    all.extend(["--data-dir".as_ref(), data_dir.as_os_str()]);
    common::ringkv_fails(&all)
}

/// A second `ringkv dev` beside a running one fails at once, saying why, instead of
/// reporting the first cluster as its own: on the same ports, or (other ports) on the
/// same data directory. The first keeps serving.
#[test]
fn a_second_dev_on_the_same_ports_or_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let first_args = ["--nodes", "1", "--base-port", "7640", "--shards", "1"];
    let (mut first, addrs) = Dev::start(&first_args, &data);
    assert_eq!(addrs, ["127.0.0.1:7640"]);
    let stderr = failing_dev(&first_args, &dir.path().join("other"));
    assert!(
        stderr.contains("127.0.0.1:7640 (node 1) is taken"),
        "{stderr}"
    );
    let other_ports = ["--nodes", "1", "--base-port", "7660", "--shards", "1"];
    let stderr = failing_dev(&other_ports, &data);
    assert!(
        stderr.contains("is in use by another ringkv node"),
        "{stderr}"
    );
    assert!(
        stderr.contains("node 1 exited (exit status: 1) before the cluster was ready"),
        "{stderr}"
    );
    let mut c = Client::connect("127.0.0.1:7640", ClientConfig::default()).unwrap();
    c.put(b"still", b"serving", None)
        .expect("the first cluster serves");
    let status = first.interrupt();
    assert!(status.success(), "{status}");
}

/// Nodes of 10 shards or more get more than 10 ports each: node 1's tenth shard port
/// used to be node 2's client port, so node 2 refused to start (on any machine with 10
/// cores, with the default of a shard per core). Ports outside 1024..=65535 are refused.
#[test]
fn dev_spaces_nodes_of_many_shards_apart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let args = ["--nodes", "2", "--base-port", "7800", "--shards", "10"];
    let (mut dev, addrs) = Dev::start(&args, &data);
    assert_eq!(addrs, ["127.0.0.1:7800", "127.0.0.1:7820"]);
    let mut c = Client::connect("127.0.0.1:7820", ClientConfig::default()).unwrap();
    c.put(b"k", b"v", None).expect("node 2 serves");
    let status = dev.interrupt();
    assert!(status.success(), "{status}");
    let stderr = failing_dev(
        &["--nodes", "2", "--base-port", "65530", "--shards", "1"],
        &dir.path().join("other"),
    );
    assert!(stderr.contains("must lie within 1024..=65535"), "{stderr}");
}

/// The pid of the process whose command line holds `needle` (a dev node's
/// `--listen ADDR`).
fn pid_with_arg(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"--listen" && w[1] == needle.as_bytes())
                .then_some(pid)
        })
}

/// A node that died while the cluster ran is reported, and dev's exit status after
/// Ctrl-C says so (it used to be 0 whenever Ctrl-C ended it).
#[test]
fn dev_exits_with_failure_when_a_node_died_before_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--nodes", "2", "--base-port", "7700", "--shards", "1"];
    let (mut dev, addrs) = Dev::start(&args, &dir.path().join("dev"));
    let pid = pid_with_arg(&addrs[1]).expect("node 2's process");
    // SAFETY: SIGKILL to the node process dev started for this test.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // dev sees it in its loop, or at the latest in the statuses it collects at stop
    let status = dev.interrupt();
    assert_eq!(status.code(), Some(1), "{status}");
}

/// dev killed outright (SIGKILL: no chance to stop its nodes) takes its nodes with it:
/// each gets a SIGTERM when its parent dies, and stops cleanly. Before, they ran on,
/// holding their ports and data directories, with nothing left to stop them.
#[test]
fn a_dev_killed_outright_stops_its_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--nodes", "1", "--base-port", "7740", "--shards", "1"];
    let (mut dev, addrs) = Dev::start(&args, &dir.path().join("dev"));
    assert_eq!(addrs, ["127.0.0.1:7740"]);
    dev.0.kill().unwrap();
    dev.0.wait().unwrap();
    // bounded: a node stops within its drain timeout
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect("127.0.0.1:7740").is_ok() {
        assert!(Instant::now() < deadline, "the node outlived dev by 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

//! `ringkv dev`: a local cluster of child processes that agree on the ring, serve
//! quorum reads and writes, and all stop on SIGINT.

mod common;

use ringkv_net::client::{Client, ClientConfig};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn dev_starts_a_cluster_that_serves_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args([
            "dev",
            "--nodes",
            "3",
            "--base-port",
            "7600",
            "--shards",
            "1",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("dev"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ringkv dev");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addrs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for line in lines.by_ref() {
        let line = line.expect("stdout");
        if line.starts_with("127.0.0.1:") {
            addrs.push(line.trim().to_string());
        }
        if line.starts_with("Ctrl-C") || Instant::now() > deadline {
            break;
        }
    }
    assert_eq!(
        addrs,
        ["127.0.0.1:7600", "127.0.0.1:7610", "127.0.0.1:7620"],
        "dev prints each node's client address once the ring agrees"
    );
    std::thread::spawn(move || for _ in lines {});
    let mut a = Client::connect(&addrs[0], ClientConfig::default()).unwrap();
    let mut c = Client::connect(&addrs[2], ClientConfig::default()).unwrap();
    a.put_with(b"dev-key", b"dev-value", None, 3)
        .expect("put W = 3");
    assert_eq!(
        c.get_with(b"dev-key", 3).expect("get R = 3").values,
        vec![b"dev-value".to_vec()]
    );
    // SAFETY: SIGINT to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "dev did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
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
    let mut first = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args([
            "dev",
            "--nodes",
            "1",
            "--base-port",
            "7640",
            "--shards",
            "1",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ringkv dev");
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.expect("stdout").starts_with("Ctrl-C") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let other = dir.path().join("other");
    let base_port = ["--nodes", "1", "--base-port", "7640", "--shards", "1"];
    let stderr = failing_dev(&base_port, &other);
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
    // SAFETY: SIGINT to our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGINT) };
    assert!(first.wait().unwrap().success());
}

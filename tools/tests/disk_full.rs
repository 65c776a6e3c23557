//! A node whose data directory fills up: a real ext4 file system on a loop device,
//! small enough that a write load fills it. Needs root, `mkfs.ext4`, `e2fsck`,
//! `resize2fs` and loop devices, so it is ignored by default; run it with
//!
//! ```sh
//! cargo test --release -p ringkv-tools --test disk_full -- --ignored
//! ```
mod common;

use common::{Raw, Server};
use ringkv_net::protocol::{Reply, Request};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The file system image: room for the two shards' commit logs (33 MiB each, written
/// when the node starts) and about 12 MiB more.
const IMAGE_BYTES: u64 = 96 << 20;
/// The image after the test makes room.
const GROWN_BYTES: u64 = 256 << 20;

fn run(program: &str, args: &[&std::ffi::OsStr], ok_codes: &[i32]) {
    let status = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program} (this test needs it): {e}"));
    assert!(
        status.code().is_some_and(|c| ok_codes.contains(&c)),
        "{program} {args:?} failed: {status}"
    );
}

/// An ext4 file system in `image`, loop-mounted on `at` until dropped.
struct Mounted {
    image: PathBuf,
    at: PathBuf,
}

impl Mounted {
    fn new(image: &Path, at: &Path) -> Mounted {
        let file = std::fs::File::create(image).expect("create the image");
        file.set_len(IMAGE_BYTES).expect("size the image");
        drop(file);
        run(
            "mkfs.ext4",
            &["-q".as_ref(), "-F".as_ref(), image.as_os_str()],
            &[0],
        );
        std::fs::create_dir_all(at).expect("mount point");
        let mounted = Mounted {
            image: image.to_path_buf(),
            at: at.to_path_buf(),
        };
        mounted.mount();
        mounted
    }

    fn mount(&self) {
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                self.image.as_os_str(),
                self.at.as_os_str(),
            ],
            &[0],
        );
    }

    fn unmount(&self) {
        run("umount", &[self.at.as_os_str()], &[0]);
    }

    /// Unmounts, grows the image and its file system to `bytes`, mounts again.
    fn grow(&self, bytes: u64) {
        self.unmount();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.image)
            .expect("open the image");
        file.set_len(bytes).expect("grow the image");
        drop(file);
        // 1: errors corrected (none expected after a clean unmount, but not a failure)
        run(
            "e2fsck",
            &["-f".as_ref(), "-y".as_ref(), self.image.as_os_str()],
            &[0, 1],
        );
        run("resize2fs", &[self.image.as_os_str()], &[0]);
        self.mount();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // lazy: a server the test failed to stop may still hold files
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// A counter of `ringkv stats --json` from the node at `addr`.
fn stat(addr: std::net::SocketAddr, name: &str) -> u64 {
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(["stats", "--json", "--addr", &addr.to_string()])
        .output()
        .expect("run ringkv stats");
    assert!(
        out.status.success(),
        "ringkv stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    stats["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name} in {stats}"))
}

fn value_of(key: &str) -> Vec<u8> {
    let mut v = format!("{key}:").into_bytes();
    v.resize(2048, b'v');
    v
}

#[test]
#[ignore = "needs root, loop devices and e2fsprogs; see the file's doc"]
fn a_full_disk_refuses_writes_with_errors_and_loses_no_acknowledged_put() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test mounts a file system: run it as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let mounted = Mounted::new(&dir.path().join("fs.img"), &dir.path().join("mnt"));
    let data = mounted.at.join("data");
    let mut server = Server::start(&data, &["--durability", "sync"]);
    let addr = server.addr;

    // writers of distinct keys until the node refuses their puts, bounded in count and
    // time: the file system fills after a few thousand 2 KiB values
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let refusals: Arc<Mutex<Vec<String>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (acked, refusals) = (acked.clone(), refusals.clone());
            std::thread::spawn(move || {
                let mut c = Raw::connect(addr);
                let mut refused_in_a_row = 0;
                for i in 0..40_000u32 {
                    if refused_in_a_row >= 200 || Instant::now() > deadline {
                        break;
                    }
                    let key = format!("full-{t}-{i}");
                    let (_, reply) = c.call(Request::Put {
                        w: 0,
                        key: key.as_bytes(),
                        context: b"",
                        value: &value_of(&key),
                    });
                    match Reply::parse(&reply)
                        .expect("a reply the client can parse")
                        .1
                    {
                        Reply::PutOk { .. } => {
                            refused_in_a_row = 0;
                            acked.lock().unwrap().push(key);
                        }
                        Reply::Error { code, message } => {
                            // Unavailable: the storage refused
                            assert_eq!(code, 9, "{}", String::from_utf8_lossy(message));
                            refused_in_a_row += 1;
                            refusals
                                .lock()
                                .unwrap()
                                .push(String::from_utf8_lossy(message).into_owned());
                        }
                        other => panic!("writer {t}: {other:?}"),
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("a writer failed");
    }
    let acked = acked.lock().unwrap().clone();
    let refusals = refusals.lock().unwrap().clone();
    println!(
        "{} puts acknowledged, {} refused",
        acked.len(),
        refusals.len()
    );
    assert!(
        acked.len() >= 100,
        "the load ran: {} acknowledged",
        acked.len()
    );
    assert!(
        refusals.len() >= 200,
        "the file system filled and the node refused puts ({} refused)",
        refusals.len()
    );
    assert!(
        refusals
            .iter()
            .any(|m| m.contains("No space left on device")
                && m.contains("refuses writes after a failed write or sync")),
        "a refusal names the cause: {:?}",
        refusals.first()
    );

    // still serving: pings, and every acknowledged put reads back while the disk is full
    assert!(server.is_running(), "the node exited when its disk filled");
    let mut c = Raw::connect(addr);
    assert!(c.ping());
    for key in &acked {
        assert_eq!(
            c.get(key.as_bytes()).0,
            vec![value_of(key)],
            "{key} while the disk is full"
        );
    }
    drop(c);
    // and the operator can see which storage refuses writes
    let failed = stat(addr, "partitions_failed");
    println!(
        "{failed} partitions failed, commit logs failed: {}",
        stat(addr, "commit_log_failed")
    );
    assert!(failed > 0, "no partition counted as failed");
    // the partitions failed on their own writes: the log, whose files were written
    // whole at the start, still takes entries
    assert_eq!(stat(addr, "commit_log_failed"), 0);

    // a stop cannot sync the partitions that failed: it says so, exits by itself, 1
    let status = server.interrupt();
    assert_eq!(status.code(), Some(1), "the stop's exit status: {status}");
    drop(server);

    // a start on the full disk fails with the cause, and leaves no part-made log file
    let log_files = || {
        let mut names = Vec::new();
        for shard in std::fs::read_dir(data.join("commitlog")).expect("commit log folder") {
            for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
                names.push(file.unwrap().path());
            }
        }
        names.sort();
        names
    };
    let before = log_files();
    let stderr = common::server_fails(&data, &["--shards".as_ref(), "2".as_ref()]);
    assert!(
        stderr.contains("No space left on device"),
        "the failed start names the cause: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(log_files(), before, "the failed start left files behind");

    // with room again, the node starts and every acknowledged put is there
    mounted.grow(GROWN_BYTES);
    let server = Server::start(&data, &["--durability", "sync"]);
    let mut c = Raw::connect(server.addr);
    for key in &acked {
        assert_eq!(
            c.get(key.as_bytes()).0,
            vec![value_of(key)],
            "acknowledged put of {key} lost"
        );
    }
    // and it takes writes again
    assert_eq!(stat(server.addr, "partitions_failed"), 0);
    assert_eq!(stat(server.addr, "commit_log_failed"), 0);
    for i in 0..100 {
        let key = format!("after-{i}");
        let ctx = c.put(key.as_bytes(), &value_of(&key), b"");
        assert!(!ctx.is_empty());
    }
    println!(
        "{} acknowledged puts read back after the disk was grown",
        acked.len()
    );
}

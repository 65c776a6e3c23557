//! End to end through a real `ringkv server` process: put/get/delete, siblings and
//! reconciliation, pipelining from many clients, SIGKILL during a write load, and a
//! changed shard count after a crash (the commit logs must be replayed first), and
//! every shard port taking connections once the client port answers.

mod common;

use common::{error_code, header_of, Raw, Server};
use ringkv_net::protocol::{ErrorCode, Reply, Request};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[test]
fn put_get_delete_siblings_and_reconciliation() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let mut c = Raw::connect(server.addr);
    assert!(c.ping());
    assert_eq!(c.get(b"absent").0, Vec::<Vec<u8>>::new());
    let ctx = c.put(b"user:1", b"alice", b"");
    assert_eq!(c.get(b"user:1").0, vec![b"alice".to_vec()]);
    // overwrite with the context: one value
    c.put(b"user:1", b"alice2", &ctx);
    assert_eq!(c.get(b"user:1").0, vec![b"alice2".to_vec()]);
    // two puts without context: siblings
    c.put(b"cart", b"apple", b"");
    c.put(b"cart", b"pear", b"");
    let (values, merged) = c.get(b"cart");
    assert_eq!(values, vec![b"apple".to_vec(), b"pear".to_vec()]);
    // a put with the merged context reconciles them
    c.put(b"cart", b"apple+pear", &merged);
    assert_eq!(c.get(b"cart").0, vec![b"apple+pear".to_vec()]);
    // delete with the context: gone
    let (_, ctx) = c.get(b"user:1");
    let (_, frame) = c.call(Request::Delete {
        w: 0,
        key: b"user:1",
        context: &ctx,
    });
    assert!(matches!(Reply::parse(&frame).unwrap().1, Reply::DeleteOk));
    assert_eq!(c.get(b"user:1").0, Vec::<Vec<u8>>::new());
    // everything survives a graceful restart (SIGINT here, SIGTERM below)
    assert!(server.interrupt().success());
    let mut server = Server::start(dir.path(), &[]);
    let mut c = Raw::connect(server.addr);
    assert_eq!(c.get(b"cart").0, vec![b"apple+pear".to_vec()]);
    assert_eq!(c.get(b"user:1").0, Vec::<Vec<u8>>::new());
    assert!(server.stop().success());
}

#[test]
fn pipelined_requests_from_many_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let addr = server.addr;
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Raw::connect(addr);
                // 200 puts written back to back, then 200 replies read
                let mut ids = Vec::new();
                for i in 0..200 {
                    let key = format!("t{t}-k{i}");
                    ids.push(c.send(Request::Put {
                        w: 0,
                        key: key.as_bytes(),
                        context: b"",
                        value: key.as_bytes(),
                    }));
                }
                let mut seen = Vec::new();
                for _ in 0..200 {
                    let f = c.read_frame().expect("reply");
                    let (h, reply) = Reply::parse(&f).unwrap();
                    assert!(matches!(reply, Reply::PutOk { .. }), "{reply:?}");
                    seen.push(h.request_id);
                }
                seen.sort();
                assert_eq!(seen, ids, "every request answered once, matched by id");
                // each get's reply holds its own key's value (each put wrote its key)
                let mut key_of = std::collections::HashMap::new();
                for i in 0..200 {
                    let key = format!("t{t}-k{i}");
                    let id = c.send(Request::Get {
                        r: 0,
                        key: key.as_bytes(),
                    });
                    key_of.insert(id, key);
                }
                for _ in 0..200 {
                    let f = c.read_frame().expect("reply");
                    let (h, reply) = Reply::parse(&f).unwrap();
                    let key = key_of
                        .remove(&h.request_id)
                        .expect("a reply to a get asked, once");
                    match reply {
                        Reply::GetOk { values, .. } => {
                            assert_eq!(values, vec![key.as_bytes()], "the get of {key}")
                        }
                        other => panic!("{other:?}"),
                    }
                }
                assert!(key_of.is_empty());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(server.stop().success());
}

#[test]
fn sigkill_during_sync_writes_loses_no_acknowledged_put() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let addr = server.addr;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // each writer runs until the kill cuts its connection (true), or to its end
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let acked = acked.clone();
            let killed = killed.clone();
            std::thread::spawn(move || -> bool {
                let cut = || {
                    assert!(
                        killed.load(std::sync::atomic::Ordering::SeqCst),
                        "writer {t} cut off before the kill"
                    );
                    true
                };
                let mut c = Raw::connect(addr);
                c.stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                for i in 0..50_000u32 {
                    let key = format!("w{t}-{i}");
                    let value = format!("value-{t}-{i}-{}", "x".repeat((i % 64) as usize));
                    let mut out = Vec::new();
                    Request::Put {
                        w: 0,
                        key: key.as_bytes(),
                        context: b"",
                        value: value.as_bytes(),
                    }
                    .encode(i as u64, &mut out);
                    if std::io::Write::write_all(&mut c.stream, &out).is_err() {
                        return cut();
                    }
                    match c.read_frame() {
                        Some(f) => match Reply::parse(&f).map(|r| r.1) {
                            Ok(Reply::PutOk { .. }) => acked.lock().unwrap().push((key, value)),
                            other => panic!("writer {t}: {other:?}"),
                        },
                        None => return cut(),
                    }
                }
                false
            })
        })
        .collect();
    // let the load run, then kill the server without warning
    for _ in 0..100 {
        if acked.lock().unwrap().len() >= 2000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    server.kill();
    for w in writers {
        assert!(
            w.join().unwrap(),
            "the writer was still writing at the kill"
        );
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 100,
        "the load ran before the kill: {}",
        acked.len()
    );
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let mut c = Raw::connect(server.addr);
    for (key, value) in &acked {
        assert_eq!(
            c.get(key.as_bytes()).0,
            vec![value.as_bytes().to_vec()],
            "acknowledged put of {key} lost"
        );
    }
    println!(
        "{} acknowledged puts all read back after SIGKILL",
        acked.len()
    );
    assert!(server.stop().success());
}

/// Starts `ringkv server` on `dir` with `shards` shards and expects it to refuse to
/// start, saying why; returns its stderr.
fn refused_start(dir: &std::path::Path, shards: &str) -> String {
    let args = ["server", "--data-dir"].map(std::ffi::OsStr::new);
    let rest = [
        "--listen",
        "127.0.0.1:0",
        "--shard-port-base",
        "0",
        "--shards",
        shards,
    ];
    let rest = rest
        .iter()
        .chain(&["--durability", "sync"])
        .map(std::ffi::OsStr::new);
    let args: Vec<&std::ffi::OsStr> = args
        .into_iter()
        .chain([dir.as_os_str()])
        .chain(rest)
        .collect();
    common::ringkv_fails(&args)
}

#[test]
fn after_a_crash_a_changed_shard_count_waits_for_the_commit_log_replay() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let mut c = Raw::connect(server.addr);
    for i in 0..64 {
        c.put(format!("k{i}").as_bytes(), b"v", b"");
    }
    server.kill();
    // each shard's log names the partitions it owned: fewer or more shards would
    // leave some writes unreplayed, so both are refused, with the way out
    for shards in ["1", "4"] {
        let stderr = refused_start(dir.path(), shards);
        assert!(stderr.contains("--shards it last ran with"), "{stderr}");
    }
    // the old count replays (and the refused starts left nothing in its way)
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let mut c = Raw::connect(server.addr);
    for i in 0..64 {
        assert_eq!(c.get(format!("k{i}").as_bytes()).0, vec![b"v".to_vec()]);
    }
    assert!(server.stop().success());
    // after a clean stop nothing is left to replay: the count may change
    let mut server = Server::start(dir.path(), &["--durability", "sync", "--shards", "1"]);
    let mut c = Raw::connect(server.addr);
    for i in 0..64 {
        assert_eq!(c.get(format!("k{i}").as_bytes()).0, vec![b"v".to_vec()]);
    }
    assert!(server.stop().success());
}

/// Two nodes on one data directory would append to the same segments and remove each
/// other's files: the second is refused, naming the first, and the first keeps serving.
#[test]
fn a_second_node_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let mut c = Raw::connect(server.addr);
    c.put(b"k", b"v", b"");
    let stderr = refused_start(dir.path(), "2");
    assert!(
        stderr.contains(&format!(
            "is in use by another ringkv node (pid {})",
            server.child.id()
        )),
        "{stderr}"
    );
    // the refused start touched nothing of the running node
    c.put(b"k2", b"v2", b"");
    assert_eq!(c.get(b"k").0, vec![b"v".to_vec()]);
    assert!(server.stop().success());
    // a stopped node leaves the directory free
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let mut c = Raw::connect(server.addr);
    assert_eq!(c.get(b"k2").0, vec![b"v2".to_vec()]);
    assert!(server.stop().success());
}

/// A second node with its own client port but the shard ports (or the metrics address)
/// of a running node is refused: SO_REUSEPORT let it share them, so a shard-aware
/// client of either could write into the other's store.
#[test]
fn a_second_node_on_a_running_nodes_shard_ports_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = metrics.local_addr().unwrap().to_string();
    drop(metrics);
    let mut server = Server::start_with_shard_ports(
        &dir.path().join("a"),
        2,
        &["--metrics-listen", &metrics_addr],
    );
    let hello = *ringkv_net::client::Client::connect(
        server.addr,
        ringkv_net::client::ClientConfig::default(),
    )
    .unwrap()
    .hello();
    let base = hello.shard_port_base.to_string();
    for extra in [
        ["--shard-port-base", base.as_str()],
        ["--metrics-listen", metrics_addr.as_str()],
    ] {
        let data = dir.path().join("b");
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "server".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--shards".as_ref(),
            "2".as_ref(),
        ];
        if extra[0] != "--shard-port-base" {
            args.extend(["--shard-port-base", "0"].map(std::ffi::OsStr::new));
        }
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let stderr = common::ringkv_fails(&args);
        assert!(
            stderr.contains("cannot listen on 127.0.0.1:"),
            "{extra:?}: {stderr}"
        );
    }
    let mut c = Raw::connect(server.addr);
    assert!(c.ping());
    assert!(server.stop().success());
}

/// SIGINT while a pipeline of durable puts is in flight: puts get their replies (done,
/// or an error such as `ShuttingDown` or `TooManyInFlight`: not done) until the
/// connection closes, the node exits 0, and every put it acknowledged is there after
/// the restart.
#[test]
fn sigint_answers_in_flight_puts_and_a_restart_keeps_the_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let mut c = Raw::connect(server.addr);
    assert!(c.ping());
    const PUTS: u64 = 2_000;
    let mut batch = Vec::new();
    for i in 0..PUTS {
        let key = format!("drain{i}");
        common::encode_blind_put(100 + i, key.as_bytes(), key.as_bytes(), &mut batch);
    }
    c.send_bytes(&batch);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGINT) };
    let (mut done, mut refused) = (Vec::new(), 0);
    while let Some(frame) = c.read_frame() {
        let (header, reply) = Reply::parse(&frame).expect("a valid reply");
        match reply {
            Reply::PutOk { .. } => done.push(header.request_id - 100),
            Reply::Error { code, .. } => {
                assert_ne!(code, ErrorCode::BadRequest as u16);
                refused += 1;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    println!("{} puts done, {refused} refused", done.len());
    // each put answered at most once (the loop above ends at the close: a read that
    // times out fails the test), and the ones read before the stop ran
    let unique: std::collections::HashSet<u64> = done.iter().copied().collect();
    assert_eq!(unique.len(), done.len(), "a put answered twice");
    assert!(done.iter().all(|&i| i < PUTS));
    assert!(done.len() as u64 + refused <= PUTS);
    assert!(
        !done.is_empty(),
        "the puts read before the signal were answered"
    );
    assert!(
        server.wait_exit(libc::SIGINT).success(),
        "a clean exit after SIGINT"
    );
    let mut server = Server::start(dir.path(), &[]);
    let mut c = Raw::connect(server.addr);
    for i in done {
        let key = format!("drain{i}");
        assert_eq!(
            c.get(key.as_bytes()).0,
            vec![key.as_bytes().to_vec()],
            "{key}"
        );
    }
    assert!(server.stop().success());
}

/// Each shard sees the stop signal on its own (up to one watcher period apart), so a
/// shard may still be reading when the owner of a key it forwards has stopped. Requests
/// read before the reading shard's stop must still run: the owner keeps answering
/// forwarded requests (and keeps its partitions open) until every shard has drained.
/// Before, the owner refused them (`ShuttingDown` from "the owning shard"), or, once it
/// had dropped its mesh receivers, the reading shard answered "owning shard is gone"
/// or timed out after 10 s.
#[test]
fn requests_forwarded_while_the_shards_stop_one_by_one_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    const CONNECTIONS: usize = 8;
    const BATCH: u64 = 200;
    // bounded: each connection stops at its close, or after this many batches
    const BATCHES_MAX: u64 = 2_000;
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // each connection sends batches of blind puts (half of them for the other shard)
    // and reads their replies, through the signal, until the node closes it
    let loads: Vec<_> = (0..CONNECTIONS)
        .map(|n| {
            let mut c = Raw::connect(server.addr);
            assert!(c.ping());
            let stopped = stopped.clone();
            std::thread::spawn(move || {
                let (mut done, mut refused, mut batches_after_stop) = (Vec::new(), 0, 0);
                'load: for b in 0..BATCHES_MAX {
                    let mut batch = Vec::new();
                    for i in 0..BATCH {
                        let key = format!("stop{n}-{}", b * BATCH + i);
                        common::encode_blind_put(1 + i, key.as_bytes(), key.as_bytes(), &mut batch);
                    }
                    if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                        batches_after_stop += 1;
                    }
                    if std::io::Write::write_all(&mut c.stream, &batch).is_err() {
                        break;
                    }
                    for _ in 0..BATCH {
                        let Some(frame) = c.read_frame() else {
                            break 'load;
                        };
                        let (header, reply) = Reply::parse(&frame).expect("a valid reply");
                        match reply {
                            Reply::PutOk { .. } => {
                                done.push(format!("stop{n}-{}", b * BATCH + header.request_id - 1))
                            }
                            Reply::Error { code, message } => {
                                let message = String::from_utf8_lossy(message);
                                assert!(
                                    code == ErrorCode::ShuttingDown as u16
                                        && !message.contains("owning"),
                                    "only the shard that read a request may refuse it: \
                                     {code} {message}"
                                );
                                refused += 1;
                            }
                            other => panic!("unexpected reply {other:?}"),
                        }
                    }
                }
                (done, refused, batches_after_stop)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    stopped.store(true, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let mut done = Vec::new();
    let mut refused = 0;
    for load in loads {
        let (d, r, after) = load.join().expect("a load thread");
        assert!(after < BATCHES_MAX / 2, "the node stopped serving the load");
        // checked after the restart: the puts acknowledged last (around the stop), and
        // a sample of the rest
        let last = d.len().saturating_sub(2 * BATCH as usize);
        done.extend(
            d.into_iter()
                .enumerate()
                .filter(|&(i, _)| i >= last || i % 97 == 0)
                .map(|(_, key)| key),
        );
        refused += r;
    }
    println!("{} puts done, {refused} refused", done.len());
    assert!(
        server.wait_exit(libc::SIGTERM).success(),
        "a clean exit after SIGTERM"
    );
    let mut server = Server::start(dir.path(), &[]);
    let mut c = Raw::connect(server.addr);
    for key in done {
        assert_eq!(
            c.get(key.as_bytes()).0,
            vec![key.as_bytes().to_vec()],
            "{key}"
        );
    }
    assert!(server.stop().success());
}

/// What a script or a load balancer does with a node it just started: ping the client
/// port until it answers, then go to the shard ports that HELLO_OK names. Every shard
/// port must take the connection by then (before, a shard still opening its partitions
/// had not bound its own port while another shard already answered on the shared one).
#[test]
fn once_the_client_port_answers_every_shard_port_takes_connections() {
    const SHARDS: u16 = 4;
    let seed = std::process::id() as u64;
    for round in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        // a free-looking client port with SHARDS free ports after it (bounded tries)
        let base = (0..50u64)
            .map(|t| 21_000 + ((seed * 7919 + (round * 50 + t) * 613) % 11_000) as u16)
            .find(|&p| {
                (0..=SHARDS).all(|s| std::net::TcpListener::bind(("127.0.0.1", p + s)).is_ok())
            })
            .expect("a free range of ports");
        // killed if an assertion fails first (a running child would hold the test's pipes)
        struct KillOnDrop(std::process::Child);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv"))
            .args(["server", "--data-dir"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{base}")])
            .args(["--shard-port-base", &(base + 1).to_string()])
            .args(["--shards", &SHARDS.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .map(KillOnDrop)
            .expect("start ringkv server");
        let client: std::net::SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut answered = false;
        while !answered && std::time::Instant::now() < deadline {
            if let Ok(stream) = std::net::TcpStream::connect(client) {
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                // a connection closed unanswered is retried like a refused one: before
                // the node listens, another test's free-port probe may hold the port for
                // an instant and close it with this connection queued
                let mut raw = Raw::from_stream(stream);
                answered = raw.try_send(Request::Ping).1
                    && raw
                        .read_frame()
                        .is_some_and(|f| matches!(Reply::parse(&f), Ok((_, Reply::Pong))));
            }
            if !answered {
                assert!(child.0.try_wait().unwrap().is_none(), "the server exited");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert!(answered, "the client port never answered");
        // at once, no retry: each shard port takes the connection and answers
        for s in 0..SHARDS {
            let addr: std::net::SocketAddr = format!("127.0.0.1:{}", base + 1 + s).parse().unwrap();
            let stream = std::net::TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("round {round}: shard {s} port refused: {e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            assert!(Raw::from_stream(stream).ping(), "shard {s}");
        }
        unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) };
        assert!(child.0.wait().unwrap().success());
    }
}

/// Requests one connection pipelines for partitions of other shards travel in one
/// batch per owning shard. Every kind the owner handles differently comes back once,
/// matched by id: reads it answers at once, `sync` writes it holds for the commit
/// log, requests its full path refuses (a key over the limit), and ids a client
/// repeats. Then the writes read back, and the node counts the forwarding.
#[test]
fn forwarded_batches_answer_each_request_once_whatever_the_owner_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--shards", "4", "--durability", "sync"]);
    let mut c = Raw::connect(server.addr);
    let long_key = vec![b'k'; 5000];
    let mut bytes = Vec::new();
    // (request id, what its reply must be)
    let mut expected: Vec<(u64, &str)> = Vec::new();
    let mut id = 100;
    for i in 0..120 {
        let key = format!("fb{i}");
        Request::Put {
            w: 0,
            key: key.as_bytes(),
            context: b"",
            value: key.as_bytes(),
        }
        .encode(id, &mut bytes);
        expected.push((id, "put"));
        id += 1;
        Request::Get {
            r: 0,
            key: format!("absent{i}").as_bytes(),
        }
        .encode(id, &mut bytes);
        expected.push((id, "get"));
        id += 1;
        if i % 10 == 0 {
            Request::Get {
                r: 0,
                key: &long_key,
            }
            .encode(id, &mut bytes);
            expected.push((id, "error"));
            id += 1;
            // the same id twice in a row: both are answered
            for _ in 0..2 {
                Request::Get {
                    r: 0,
                    key: b"absent-twice",
                }
                .encode(id, &mut bytes);
                expected.push((id, "get"));
            }
            id += 1;
        }
    }
    c.send_bytes(&bytes);
    let mut got: Vec<(u64, &str)> = Vec::new();
    for _ in 0..expected.len() {
        let f = c.read_frame().expect("a reply to every request");
        let (h, reply) = Reply::parse(&f).unwrap();
        let kind = match reply {
            Reply::PutOk { .. } => "put",
            Reply::GetOk { values, .. } => {
                assert!(values.is_empty(), "absent keys read empty");
                "get"
            }
            Reply::Error { code, .. } => {
                assert_eq!(code, ErrorCode::KeyTooLong as u16);
                "error"
            }
            other => panic!("{other:?}"),
        };
        got.push((h.request_id, kind));
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "each request answered once, by its own id");
    for i in 0..120 {
        let key = format!("fb{i}");
        let (values, _) = c.get(key.as_bytes());
        assert_eq!(values, vec![key.into_bytes()]);
    }
    // replies bigger than the batch's buffer (16 KiB) come back beside it
    let big: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("big{i}"), vec![b'a' + i as u8; 20 * 1024]))
        .collect();
    for (k, v) in &big {
        c.put(k.as_bytes(), v, b"");
    }
    let mut bytes = Vec::new();
    for (i, (k, _)) in big.iter().enumerate() {
        Request::Get {
            r: 0,
            key: k.as_bytes(),
        }
        .encode(1000 + i as u64, &mut bytes);
    }
    c.send_bytes(&bytes);
    for _ in 0..big.len() {
        let f = c.read_frame().expect("a reply to every request");
        let (h, reply) = Reply::parse(&f).unwrap();
        let Reply::GetOk { values, .. } = reply else {
            panic!("{reply:?}");
        };
        assert_eq!(
            values,
            vec![big[(h.request_id - 1000) as usize].1.as_slice()]
        );
    }
    drop(c);
    assert!(server.stop().success());
    let (requests, forwarded, _, _) = server.stopped_counts().expect("a stop line");
    // each request counted once, by the shard that read it, forwarded or not
    assert_eq!(requests, (expected.len() + 120 + 2 * big.len()) as u64);
    assert!(forwarded > 100, "{forwarded} of {requests} forwarded");
}

/// Replies go out either straight from the task that made them or, once the socket is
/// full, from the connection's writer task: a client that writes a long pipeline of
/// large GETs and only then starts reading must still get every reply whole, by its
/// own id, with its own value (2 shards on the shared port: some replies come from
/// the other shard, some are answered at once).
/// A pass over the buffer stops once the replies it made reach the output budget (two
/// frames' worth); a bad frame right behind that point is answered as soon as the
/// replies are sent, like any other. Before, a frame the reader could only answer
/// with an error (here: protocol version 2) was left in the buffer while the reader
/// waited for more bytes, and the client, waiting for its replies, got none for it or
/// for the PING behind it until the slow-client timeout closed the connection.
#[test]
fn a_bad_frame_behind_a_full_pass_is_answered_without_more_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let toml = "frame_bytes_max = 65536\nvalue_bytes_max = 49152\n";
    let mut server = Server::start_with_config(dir.path(), toml, &["--shards", "1"]);
    let mut c = Raw::connect(server.addr);
    let value = vec![b'v'; 48 * 1024];
    c.put(b"budget", &value, b"");
    // three GETs make about 147 KiB of replies: over the 128 KiB budget only with the
    // third, so the pass stops right before the bad frame
    let mut bytes = Vec::new();
    for id in 1..=3u64 {
        Request::Get {
            r: 0,
            key: b"budget",
        }
        .encode(id, &mut bytes);
    }
    let mut bad = Vec::new();
    Request::Ping.encode(4, &mut bad);
    bad[4] = 2; // protocol version 2
    bytes.extend_from_slice(&bad);
    Request::Ping.encode(5, &mut bytes);
    c.send_bytes(&bytes);
    for id in 1..=3u64 {
        let f = c.read_frame().expect("a GET reply");
        assert_eq!(header_of(&f).request_id, id);
        assert!(matches!(Reply::parse(&f).unwrap().1, Reply::GetOk { .. }));
    }
    let f = c.read_frame().expect("an error for the bad frame");
    assert_eq!(header_of(&f).request_id, 4);
    assert_eq!(error_code(&f), Some(ErrorCode::UnsupportedVersion as u16));
    let f = c.read_frame().expect("the PING behind it answered");
    assert_eq!(header_of(&f).request_id, 5);
    assert!(matches!(Reply::parse(&f).unwrap().1, Reply::Pong));
    drop(c);
    assert!(server.stop().success());
}

#[test]
fn replies_held_up_by_a_slow_reader_arrive_whole_and_by_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--shards", "2"]);
    let mut c = Raw::connect(server.addr);
    let values: Vec<Vec<u8>> = (0..8u8)
        .map(|i| {
            let mut v = vec![b'a' + i; 48 * 1024];
            v[..8].copy_from_slice(&u64::from(i).to_le_bytes());
            v
        })
        .collect();
    for (i, v) in values.iter().enumerate() {
        c.put(format!("slow-reader-{i}").as_bytes(), v, b"");
    }
    // 400 GETs, about 19 MiB of replies, far more than the socket buffers hold
    let mut bytes = Vec::new();
    let mut key_of_id = std::collections::HashMap::new();
    for id in 1000..1400u64 {
        let k = (id * 7 % 8) as usize;
        Request::Get {
            r: 0,
            key: format!("slow-reader-{k}").as_bytes(),
        }
        .encode(id, &mut bytes);
        key_of_id.insert(id, k);
    }
    let mut writer = c.stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || std::io::Write::write_all(&mut writer, &bytes));
    // not reading yet: the server's socket fills and its writer has to wait
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..key_of_id.len() {
        let f = c.read_frame().expect("a reply to every request");
        let (h, reply) = Reply::parse(&f).expect("a whole reply");
        let k = key_of_id
            .remove(&h.request_id)
            .unwrap_or_else(|| panic!("a reply to id {} twice or never asked", h.request_id));
        match reply {
            Reply::GetOk { values: got, .. } => {
                assert_eq!(got.len(), 1);
                assert!(
                    got[0] == values[k],
                    "id {}: the value of key {k}",
                    h.request_id
                );
            }
            other => panic!("{other:?}"),
        }
    }
    sending.join().unwrap().unwrap();
    assert!(key_of_id.is_empty());
    assert!(c.ping());
    drop(c);
    assert!(server.stop().success());
}

/// A node whose CPUs are restricted (taskset, a container's cpuset) pins its shards to
/// the CPUs it may use. Before, shard s was pinned to CPU `s mod cores`: a process that
/// taskset confined to CPU 1 put its shard 0 on CPU 0, outside what the operator
/// allowed; under a cpuset cgroup that pin fails, the executor does not start, and the
/// other shards waited for it in the mesh for ten minutes.
#[test]
fn a_node_confined_to_some_cpus_pins_its_shards_to_those() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("one CPU: nothing to confine to; skipped");
        return;
    }
    let only = cpus - 1;
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv"));
    command
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--shard-port-base",
            "0",
        ])
        .args(["--shards", "2", "--data-dir"])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: sched_setaffinity on the child between fork and exec, on a set we own;
    // it allocates nothing
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(only, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // killed if the test fails before it stops the node
    struct Node(std::process::Child);
    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut node = Node(command.spawn().unwrap());
    let child = &mut node.0;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let listening = lines
        .by_ref()
        .find_map(|line| line.strip_prefix("ringkv listening on ").map(String::from));
    let Some(addr) = listening else {
        let mut stderr = String::new();
        let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr);
        panic!("the node did not start: {stderr}");
    };
    let mut c = Raw::connect(addr.parse().unwrap());
    c.put(b"k", b"v", b"");
    assert_eq!(c.get(b"k").0, vec![b"v".to_vec()]);
    drop(c);
    let mut shards = 0;
    for task in std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !name.starts_with("ringkv-shard") {
            continue;
        }
        shards += 1;
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        assert_eq!(
            allowed,
            only.to_string(),
            "{} runs on CPUs {allowed}",
            name.trim()
        );
    }
    assert!(shards >= 2, "{shards} shard threads found");
    // SAFETY: a signal to our own child
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    // its "stopped" line is read (the pipe stays open until the node exits)
    assert!(lines.any(|line| line.starts_with("ringkv stopped: ")));
    assert!(child.wait().unwrap().success());
}

/// A node whose data could not be closed at shutdown exits with status 1 and says so,
/// rather than "stopped cleanly" and 0: in `none` or `interval` mode writes may be lost,
/// and a supervisor or script must be able to tell.
#[test]
fn a_shutdown_that_cannot_close_the_data_exits_with_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "none"]);
    let mut c = Raw::connect(server.addr);
    c.put(b"k", b"v", b"");
    drop(c);
    // each partition's close writes its epoch file in its folder, now gone
    std::fs::remove_dir_all(dir.path().join("partitions")).unwrap();
    let status = server.interrupt();
    assert_eq!(status.code(), Some(1), "{status:?}");
}

/// A data directory belongs to the node that first used it: restarting it with another
/// `--node-id` is refused. Before, the node started, found itself missing from the
/// persisted membership, sent its requests to "node 1" (itself), and wrote versions as
/// a second actor into node 1's data.
#[test]
fn a_data_directory_restarted_with_another_node_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // a first start that fails (its port is another node's) claims nothing
    let other = tempfile::tempdir().unwrap();
    let mut taken = Server::start(other.path(), &[]);
    let taken_addr = taken.addr.to_string();
    let rest = [
        "--listen",
        taken_addr.as_str(),
        "--shard-port-base",
        "0",
        "--node-id",
        "7",
    ];
    let args: Vec<&std::ffi::OsStr> = ["server", "--data-dir"]
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([dir.path().as_os_str()])
        .chain(rest.iter().map(std::ffi::OsStr::new))
        .collect();
    let stderr = common::ringkv_fails(&args);
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(taken.stop().success());
    let mut server = Server::start(dir.path(), &[]);
    let mut c = Raw::connect(server.addr);
    c.put(b"k", b"v", b"");
    drop(c);
    assert!(server.stop().success());
    let args: Vec<&std::ffi::OsStr> = ["server", "--data-dir"]
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([dir.path().as_os_str()])
        .chain(
            [
                "--listen",
                "127.0.0.1:0",
                "--shard-port-base",
                "0",
                "--node-id",
                "2",
            ]
            .iter()
            .map(std::ffi::OsStr::new),
        )
        .collect();
    let stderr = common::ringkv_fails(&args);
    assert!(stderr.contains("belongs to node 1, not 2"), "{stderr}");
    // its own id still opens it, with its data
    let mut server = Server::start(dir.path(), &["--node-id", "1"]);
    let mut c = Raw::connect(server.addr);
    assert_eq!(c.get(b"k").0, vec![b"v".to_vec()]);
    drop(c);
    assert!(server.stop().success());
}

/// A stop request delivered twice at once (a terminal's Ctrl-C to the process group
/// and a wrapper such as `timeout` that forwards it, or a supervisor that signals the
/// whole group while a parent passes the signal on) is one request: the node stops
/// cleanly, exit 0. Before, the second copy made it exit at once with 130, its data
/// not closed.
#[test]
fn a_stop_signal_delivered_twice_at_once_is_one_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "none"]);
    let mut c = Raw::connect(server.addr);
    c.put(b"k", b"v", b"");
    drop(c);
    let pid = server.child.id() as i32;
    // SAFETY: signals to our own child process
    unsafe {
        libc::kill(pid, libc::SIGINT);
        libc::kill(pid, libc::SIGTERM);
    }
    let status = server.wait_exit(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(server.stopped_counts().is_some(), "a clean stop's line");
    let mut server = Server::start(dir.path(), &[]);
    let mut c = Raw::connect(server.addr);
    assert_eq!(c.get(b"k").0, vec![b"v".to_vec()]);
    drop(c);
    assert!(server.stop().success());
}

/// `ringkv server` with no options and no config file, as the README starts it: the
/// embedded defaults put the data in `./ringkv-data` and listen on 127.0.0.1:7379, with
/// one shard per core (at most the 64 partitions) on shard ports from 7380.
#[test]
fn a_server_with_no_options_uses_the_embedded_defaults() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .arg("server")
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start ringkv server");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("ringkv listening on "));
    std::thread::spawn(move || lines.for_each(drop));
    let addr: std::net::SocketAddr = "127.0.0.1:7379".parse().unwrap();
    // killed on drop if an assertion fails
    let mut server = Server {
        child,
        addr,
        data_dir: dir.path().join("ringkv-data"),
        stdout: Arc::default(),
    };
    assert_eq!(
        listening.as_deref(),
        Some("ringkv listening on 127.0.0.1:7379"),
        "the default address (is something else on 127.0.0.1:7379?)"
    );
    let mut c = Raw::connect(addr);
    let (_, hello) = c.call(Request::Hello {
        min_version: 1,
        max_version: 1,
    });
    let Reply::HelloOk(hello) = Reply::parse(&hello).unwrap().1 else {
        panic!("no HELLO_OK");
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(usize::from(hello.shards), cores.min(64));
    assert_eq!(hello.shard_port_base, 7380);
    c.put(b"default", b"v", b"");
    assert_eq!(c.get(b"default").0, vec![b"v".to_vec()]);
    let mut shard = Raw::connect("127.0.0.1:7380".parse().unwrap());
    assert!(shard.ping(), "shard 0 answers on its port");
    assert!(server.data_dir.join("partitions").is_dir());
    drop((c, shard));
    assert!(server.stop().success());
}

//! `ringkv stats` through a real `ringkv server`: every request counted once in the
//! latency histogram of its operation, whichever shard owns its key; the node's figures
//! are the sum of its shards'; `.hgrm` export; a bad STATS request gets an error.

mod common;

use common::{Raw, Server};
use ringkv_net::peer::{ClusterReply, ClusterRequest};
use ringkv_net::protocol::{ErrorCode, Reply, Request};
use std::process::Command;

fn stats_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .arg("stats")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ringkv stats failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn stats_count_every_request_once_and_sum_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_shard_ports(dir.path(), 2, &["--durability", "sync"]);
    let addr = server.addr.to_string();
    // one connection on the shared port: one shard reads every request
    let mut c = Raw::connect(server.addr);
    let (_, hello) = c.call(Request::Hello {
        min_version: 1,
        max_version: 1,
    });
    let Reply::HelloOk(hello) = Reply::parse(&hello).unwrap().1 else {
        panic!("no HELLO_OK");
    };
    let shard_addr = |s: u16| format!("127.0.0.1:{}", hello.shard_port_base + s);
    // 40 keys: both shards own some, so half the requests cross the mesh
    let keys: Vec<String> = (0..40).map(|i| format!("stats-key-{i}")).collect();
    let mut contexts = Vec::new();
    for k in &keys {
        contexts.push(c.put(k.as_bytes(), b"v1", b""));
    }
    for (k, ctx) in keys.iter().zip(&contexts).take(10) {
        c.put(k.as_bytes(), b"v2", ctx);
    }
    for k in &keys {
        assert_eq!(c.get(k.as_bytes()).0.len(), 1);
    }
    for k in keys.iter().take(5) {
        let (_, ctx) = c.get(k.as_bytes());
        c.call(Request::Delete {
            w: 0,
            key: k.as_bytes(),
            context: &ctx,
        });
    }
    assert!(c.ping());

    let node = stats_json(&["--addr", &addr]);
    assert_eq!(node["shards"], 2, "{node}");
    let count = |v: &serde_json::Value, op: &str| v["latency_us"][op]["count"].as_u64().unwrap();
    assert_eq!(count(&node, "put"), 50, "{node}");
    assert_eq!(count(&node, "get"), 45, "{node}");
    assert_eq!(count(&node, "delete"), 5, "{node}");
    assert_eq!(count(&node, "replica_put"), 0, "{node}");
    // every sync write waited for a group commit
    assert!(count(&node, "commit_log_sync") >= 1, "{node}");
    let put = &node["latency_us"]["put"];
    assert!(put["p50"].as_f64().unwrap() > 0.0);
    assert!(put["p50"].as_f64().unwrap() <= put["p999"].as_f64().unwrap());
    assert!(put["p999"].as_f64().unwrap() <= put["max"].as_f64().unwrap());
    // HELLO, 100 gets, puts and deletes, the ping and this STATS, each once (the
    // STATS that the reading shard sent on to the other shard is not a request read)
    assert_eq!(node["counters"]["requests"], 103, "{node}");
    assert_eq!(node["counters"]["errors"], 0, "{node}");
    // what the node holds: 40 keys, one version each (5 of them tombstones)
    assert_eq!(node["counters"]["keys"], 40, "{node}");
    assert_eq!(node["counters"]["versions"], 40, "{node}");
    assert!(
        node["counters"]["log_bytes"].as_u64().unwrap() > 40 * 100,
        "{node}"
    );
    assert!(
        node["counters"]["log_dead_bytes"].as_u64().unwrap() > 0,
        "{node}"
    );

    // each shard's own figures (asked on its own port): the shard that read the
    // requests timed them all, whichever shard owns the keys; both hold keys
    let shards: Vec<serde_json::Value> = (0..2)
        .map(|s| stats_json(&["--addr", &shard_addr(s), "--shard"]))
        .collect();
    let mut puts: Vec<u64> = shards.iter().map(|s| count(s, "put")).collect();
    puts.sort_unstable();
    assert_eq!(puts, vec![0, 50], "{shards:?}");
    let gets: u64 = shards.iter().map(|s| count(s, "get")).sum();
    assert_eq!(gets, 45, "{shards:?}");
    let keys: Vec<u64> = shards
        .iter()
        .map(|s| s["counters"]["keys"].as_u64().unwrap())
        .collect();
    assert_eq!(keys.iter().sum::<u64>(), 40, "{shards:?}");
    assert!(keys.iter().all(|&k| k > 0), "{shards:?}");
    for s in &shards {
        assert_eq!(s["shards"], 1, "{s}");
    }

    // a host name works as well as an IP (as for get and put)
    let by_name = stats_json(&["--addr", &format!("localhost:{}", server.addr.port())]);
    assert_eq!(by_name["shards"], 2, "{by_name}");

    // the .hgrm export holds every put
    let hgrm = dir.path().join("hgrm");
    stats_json(&["--addr", &addr, "--hgrm", hgrm.to_str().unwrap()]);
    let text = std::fs::read_to_string(hgrm.join("put.hgrm")).unwrap();
    let total: u64 = text
        .lines()
        .find(|l| l.contains("Total count"))
        .and_then(|l| l.split('=').nth(2))
        .and_then(|v| v.trim().trim_end_matches(']').trim().parse().ok())
        .expect("a Total count line");
    // the STATS above each read the node: nothing but stats ran since
    assert_eq!(total, 50, "{text}");
    assert!(hgrm.join("commit_log_sync.hgrm").exists());

    // a STATS with an unknown scope is refused; the connection goes on
    let mut frame = Vec::new();
    ClusterRequest::Stats { shard_only: false }.encode(9, &mut frame);
    *frame.last_mut().unwrap() = 2;
    c.send_bytes(&frame);
    let reply = c.read_frame().expect("an error reply");
    assert_eq!(
        common::error_code(&reply),
        Some(ErrorCode::BadRequest as u16)
    );
    // a well-formed STATS on the same connection is answered
    let mut frame = Vec::new();
    ClusterRequest::Stats { shard_only: true }.encode(10, &mut frame);
    c.send_bytes(&frame);
    let reply = c.read_frame().expect("a reply");
    assert!(matches!(
        ClusterReply::parse(&reply).unwrap().1,
        ClusterReply::StatsOk { shards: 1, .. }
    ));
    assert!(server.stop().success());
}

/// One HTTP exchange: `request` written as it is, the whole response read back (empty
/// when the node closed without answering).
fn http(addr: &str, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    // a node that closes early (a head over its limit) may reset the connection
    let _ = s.write_all(request);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn the_metrics_endpoint_serves_the_node_stats_to_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    // a free port for the endpoint (the node binds it right after)
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut server = Server::start(dir.path(), &["--metrics-listen", &metrics]);
    let mut c = Raw::connect(server.addr);
    let ctx = c.put(b"scraped", b"v", b"");
    c.put(b"scraped", b"w", &ctx);
    assert_eq!(c.get(b"scraped").0, vec![b"w".to_vec()]);

    let page = http(&metrics, b"GET /metrics HTTP/1.1\r\nHost: ringkv\r\n\r\n");
    let (head, body) = page.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len());
    for line in [
        "ringkv_shards 2",
        "ringkv_keys 1",
        "ringkv_versions 1",
        "ringkv_errors_total 0",
        "# TYPE ringkv_requests_total counter",
        "# TYPE ringkv_latency_seconds summary",
        "ringkv_latency_seconds_count{op=\"put\"} 2",
        "ringkv_latency_seconds_count{op=\"get\"} 1",
        "ringkv_latency_seconds_count{op=\"delete\"} 0",
        "# TYPE ringkv_connection_bytes gauge",
        "ringkv_partitions_failed 0",
        "# TYPE ringkv_partitions_failed gauge",
        "ringkv_commit_log_failed 0",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
    }

    // anything but GET /metrics is a 404; a head that never ends is cut off at its
    // limit; the endpoint and the node go on serving
    let other = http(&metrics, b"GET / HTTP/1.1\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    let endless = http(&metrics, &vec![b'x'; 20 * 1024]);
    assert_eq!(endless, "");
    // a head sent a byte a second is cut off once the whole head took 5 s, though no
    // single read waits that long (it used to be held open for as long as it went on)
    let mut slow = std::net::TcpStream::connect(&metrics).unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    let cut_off = (0..15).any(|_| {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let sent = std::io::Write::write_all(&mut slow, b"G").is_ok();
        let mut byte = [0u8; 1];
        let closed = match std::io::Read::read(&mut slow, &mut byte) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        !sent || closed
    });
    assert!(cut_off, "a trickled head held the connection for 15 s");
    let again = http(&metrics, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert!(again.starts_with("HTTP/1.1 200 OK"), "{again}");
    assert!(c.ping());
    assert!(server.stop().success());
}

#[test]
fn compactions_are_timed() {
    let dir = tempfile::tempdir().unwrap();
    // small segments: overwrites of one key seal segments that are all dead
    let mut server = Server::start_with_config(dir.path(), "segment_bytes_max = 4096\n", &[]);
    let addr = server.addr.to_string();
    let mut c = Raw::connect(server.addr);
    let mut ctx = Vec::new();
    for i in 0..300u32 {
        ctx = c.put(b"churn", &[b'a' + (i % 26) as u8; 100], &ctx);
    }
    // the compactor checks each partition once a second, in the background
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let node = stats_json(&["--addr", &addr]);
        let compactions = node["latency_us"]["compaction"]["count"].as_u64().unwrap();
        if compactions >= 1 {
            assert!(node["latency_us"]["compaction"]["max"].as_f64().unwrap() > 0.0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no compaction timed in 30 s: {node}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(c.get(b"churn").0.len(), 1);
    assert!(server.stop().success());
}

//! `ringkv stats` through a real `ringkv server`: every request counted once in the
//! latency histogram of its operation, whichever shard owns its key; the node's figures
//! are the sum of its shards'; `.hgrm` export; a bad STATS request gets an error.

mod common;

use common::{Raw, Server};
use ringkv_net::peer::{ClusterReply, ClusterRequest};
use ringkv_net::protocol::{ErrorCode, Request};
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
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let addr = server.addr.to_string();
    let mut c = Raw::connect(server.addr);
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
    // the 100 client requests, the ping, and the HELLO-less STATS requests are counted
    assert!(
        node["counters"]["requests"].as_u64().unwrap() >= 101,
        "{node}"
    );
    assert_eq!(node["counters"]["errors"], 0, "{node}");

    // one shard's figures are part of the node's
    let shard = stats_json(&["--addr", &addr, "--shard"]);
    assert_eq!(shard["shards"], 1, "{shard}");
    assert!(count(&shard, "put") <= 50);
    assert!(count(&shard, "get") <= 45);

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

//! The client library and the CLI against a real `ringkv server` process: the blocking
//! client (pipelined, shard-aware), the tokio client, and `ringkv put/get/del/ping`.

mod common;

use common::Server;
use ringkv_net::client::{Client, ClientConfig, Context};
use std::process::Command;

fn ringkv(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn blocking_client_siblings_reconcile_and_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let mut c = Client::connect(server.addr, ClientConfig::default()).unwrap();
    c.ping().unwrap();
    assert_eq!(c.hello().shards, 2);
    c.put(b"k", b"a", None).unwrap();
    c.put(b"k", b"b", None).unwrap();
    let v = c.get(b"k").unwrap();
    assert!(v.has_siblings());
    let out = c.put(b"k", b"ab", Some(&v.context)).unwrap();
    assert_eq!(out.siblings, 1);
    assert_eq!(c.get(b"k").unwrap().values, vec![b"ab".to_vec()]);
    // pipelined
    let pairs: Vec<(String, String)> = (0..500)
        .map(|i| (format!("p{i}"), format!("v{i}")))
        .collect();
    for r in c.put_many(&pairs).unwrap() {
        r.unwrap();
    }
    let keys: Vec<&String> = pairs.iter().map(|(k, _)| k).collect();
    for (r, (_, v)) in c.get_many(&keys).unwrap().into_iter().zip(&pairs) {
        assert_eq!(r.unwrap().values, vec![v.as_bytes().to_vec()]);
    }
    let ctx = c.get(b"k").unwrap().context;
    c.delete(b"k", Some(&ctx)).unwrap();
    assert!(c.get(b"k").unwrap().is_empty());
    assert!(server.stop().success());
}

#[test]
fn tokio_client_shares_one_connection_between_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let addr = server.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = std::sync::Arc::new(
            ringkv_net::async_client::AsyncClient::connect(addr, ClientConfig::default())
                .await
                .unwrap(),
        );
        let mut tasks = Vec::new();
        for t in 0..16 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    let key = format!("t{t}-{i}");
                    client.put(key.as_bytes(), b"x", None).await.unwrap();
                    assert_eq!(
                        client.get(key.as_bytes()).await.unwrap().values,
                        vec![b"x".to_vec()]
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        client.ping().await.unwrap();
    });
    assert!(server.stop().success());
}

#[test]
fn cli_put_get_del_with_context() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let addr = server.addr.to_string();
    let (ok, out) = ringkv(&["ping", "--addr", &addr]);
    assert!(ok && out.contains("PONG"), "{out}");
    assert!(ringkv(&["put", "user:42", "hello", "--addr", &addr]).0);
    assert!(ringkv(&["put", "user:42", "world", "--addr", &addr]).0);
    let (ok, out) = ringkv(&["get", "user:42", "--json", "--addr", &addr]);
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mut values: Vec<String> = json["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    values.sort();
    assert_eq!(values, vec!["hello", "world"]);
    let ctx = json["context"].as_str().unwrap().to_string();
    assert!(Context::from_hex(&ctx).is_ok());
    assert!(
        ringkv(&[
            "put",
            "user:42",
            "merged",
            "--context",
            &ctx,
            "--addr",
            &addr
        ])
        .0
    );
    let (_, out) = ringkv(&["get", "user:42", "--json", "--addr", &addr]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["values"], serde_json::json!(["merged"]));
    let ctx = json["context"].as_str().unwrap().to_string();
    assert!(ringkv(&["del", "user:42", "--context", &ctx, "--addr", &addr]).0);
    let (_, out) = ringkv(&["get", "user:42", "--json", "--addr", &addr]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["values"], serde_json::json!([]));
    // a forged context is refused with a clear error
    let (ok, out) = ringkv(&["put", "user:42", "x", "--context", "00ff", "--addr", &addr]);
    assert!(!ok && out.to_lowercase().contains("context"), "{out}");
    assert!(server.stop().success());
}

//! The client library and the CLI against a real `ringkv server` process: the blocking
//! client (pipelined, pooled, shard-aware), the tokio client (shared, pooled,
//! shard-aware), and `ringkv put/get/del/ping`.

mod common;

use common::Server;
use ringkv_net::async_client::{AsyncPool, AsyncShardAwareClient};
use ringkv_net::client::{Client, ClientConfig, Context, Pool, ShardAwareClient};
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
    let mut siblings = v.values.clone();
    siblings.sort();
    assert_eq!(siblings, vec![b"a".to_vec(), b"b".to_vec()]);
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
    // del without a context deletes what a read finds (a blind tombstone would stand
    // beside the values as a sibling, and the key would still read back)
    assert!(ringkv(&["put", "blind", "a", "--addr", &addr]).0);
    assert!(ringkv(&["put", "blind", "b", "--addr", &addr]).0);
    assert!(ringkv(&["del", "blind", "--addr", &addr]).0);
    let (_, out) = ringkv(&["get", "blind", "--json", "--addr", &addr]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["values"], serde_json::json!([]), "{out}");
    let (ok, out) = ringkv(&["del", "blind", "--addr", &addr]);
    assert!(ok && out.contains("nothing to delete"), "{out}");
    // a forged context is refused with a clear error
    let (ok, out) = ringkv(&["put", "user:42", "x", "--context", "00ff", "--addr", &addr]);
    assert!(!ok && out.to_lowercase().contains("context"), "{out}");
    // values that are not UTF-8 (written by a library client) are also given exactly
    let mut c = Client::connect(server.addr, ClientConfig::default()).unwrap();
    c.put(b"bin", b"\xff\x00a", None).unwrap();
    c.put(b"bin", b"\xfe\x00a", None).unwrap();
    let (ok, out) = ringkv(&["get", "bin", "--json", "--addr", &addr]);
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mut exact: Vec<&str> = json["values_hex"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    exact.sort();
    assert_eq!(exact, vec!["fe0061", "ff0061"]);
    assert_eq!(json["values"].as_array().unwrap().len(), 2);
    let (ok, out) = ringkv(&["get", "bin", "--addr", &addr]);
    assert!(ok && out.contains("(binary, 3 bytes) ff0061"), "{out}");
    let (_, out) = ringkv(&["get", "user:42", "--json", "--addr", &addr]);
    assert!(!out.contains("values_hex"), "{out}");
    assert!(server.stop().success());
}

/// The blocking shard-aware client against a node with shard ports: one connection per
/// shard, every key sent to its owner, so no request is forwarded between shards (the
/// node's own count, printed when it stops); the same keys through the shared port are.
#[test]
fn blocking_shard_aware_client_sends_each_key_to_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_shard_ports(dir.path(), 2, &[]);
    let mut c = ShardAwareClient::connect(server.addr, ClientConfig::default()).unwrap();
    assert_eq!(c.hello().shards, 2);
    assert_ne!(c.hello().shard_port_base, 0);
    assert_eq!(c.shard_connection_count(), 2);
    let pairs: Vec<(String, String)> = (0..400)
        .map(|i| (format!("sa{i}"), format!("v{i}")))
        .collect();
    let on_shard: Vec<u16> = pairs
        .iter()
        .map(|(k, _)| c.shard_for_key(k.as_bytes()).unwrap())
        .collect();
    assert!(on_shard.contains(&0) && on_shard.contains(&1));
    for r in c.put_many(&pairs) {
        r.unwrap();
    }
    let keys: Vec<&String> = pairs.iter().map(|(k, _)| k).collect();
    for (r, (_, v)) in c.get_many(&keys).into_iter().zip(&pairs) {
        assert_eq!(r.unwrap().values, vec![v.as_bytes().to_vec()]);
    }
    let v = c.get(b"sa7").unwrap();
    c.put(b"sa7", b"new", Some(&v.context)).unwrap();
    assert_eq!(c.get(b"sa7").unwrap().values, vec![b"new".to_vec()]);
    let v = c.get(b"sa7").unwrap();
    c.delete(b"sa7", Some(&v.context)).unwrap();
    assert!(c.get(b"sa7").unwrap().is_empty());
    drop(c);
    assert!(server.stop().success());
    let (requests, forwarded, _, _) = server.stopped_counts().expect("a stop line");
    assert_eq!(
        forwarded, 0,
        "shard-aware requests reach their owner directly"
    );
    assert!(requests > 0);

    // the same reads through a pool on the shared port: some cross to the other shard
    let mut server = Server::start_with_shard_ports(dir.path(), 2, &[]);
    let pool = Pool::new(server.addr, ClientConfig::default(), 4).unwrap();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (pool, pairs) = (&pool, &pairs);
            scope.spawn(move || {
                let mut c = pool.connection().unwrap();
                for (k, v) in pairs.iter().skip(t).step_by(4) {
                    if k == "sa7" {
                        continue;
                    }
                    assert_eq!(
                        c.get(k.as_bytes()).unwrap().values,
                        vec![v.as_bytes().to_vec()]
                    );
                }
            });
        }
    });
    assert!((1..=4).contains(&pool.open_count()));
    drop(pool);
    assert!(server.stop().success());
    let (_, forwarded, _, _) = server.stopped_counts().expect("a stop line");
    assert!(forwarded > 0, "keys of the other shard are forwarded");
}

/// The tokio shard-aware client and pool against a node with shard ports: many tasks
/// at once, each key to its owning shard (nothing forwarded); then a pool of three
/// connections shared by twelve tasks.
#[test]
fn tokio_shard_aware_client_and_pool() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_shard_ports(dir.path(), 2, &[]);
    let addr = server.addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pairs = rt.block_on(async move {
        let client = AsyncShardAwareClient::connect(addr, ClientConfig::default())
            .await
            .unwrap();
        assert_eq!(client.shard_connection_count(), 2);
        let mut tasks = Vec::new();
        for t in 0..16 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..40 {
                    let key = format!("at{t}-{i}");
                    client.put(key.as_bytes(), b"x", None).await.unwrap();
                    let v = client.get(key.as_bytes()).await.unwrap();
                    assert_eq!(v.values, vec![b"x".to_vec()]);
                    if i % 10 == 0 {
                        client
                            .put(key.as_bytes(), b"y", Some(&v.context))
                            .await
                            .unwrap();
                        assert_eq!(
                            client.get(key.as_bytes()).await.unwrap().values,
                            vec![b"y".to_vec()]
                        );
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let pairs: Vec<(String, String)> = (0..300)
            .map(|i| (format!("am{i}"), format!("v{i}")))
            .collect();
        for r in client.put_many(&pairs).await {
            r.unwrap();
        }
        let keys: Vec<&String> = pairs.iter().map(|(k, _)| k).collect();
        for (r, (_, v)) in client.get_many(&keys).await.into_iter().zip(&pairs) {
            assert_eq!(r.unwrap().values, vec![v.as_bytes().to_vec()]);
        }
        client.ping().await.unwrap();
        pairs
    });
    assert!(server.stop().success());
    let (_, forwarded, _, _) = server.stopped_counts().expect("a stop line");
    assert_eq!(
        forwarded, 0,
        "shard-aware requests reach their owner directly"
    );

    // a pool of 3 connections on the shared port, shared by 12 tasks
    let mut server = Server::start_with_shard_ports(dir.path(), 2, &[]);
    let addr = server.addr;
    rt.block_on(async move {
        let pool = AsyncPool::new(addr, ClientConfig::default(), 3)
            .await
            .unwrap();
        assert_eq!(pool.size(), 3);
        let mut tasks = Vec::new();
        for t in 0..12 {
            let (pool, pairs) = (pool.clone(), pairs.clone());
            tasks.push(tokio::spawn(async move {
                for (k, v) in pairs.iter().skip(t).step_by(12) {
                    let c = pool.client().await.unwrap();
                    assert_eq!(
                        c.get(k.as_bytes()).await.unwrap().values,
                        vec![v.as_bytes().to_vec()]
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(pool.open_count(), 3);
    });
    assert!(server.stop().success());
}

#[test]
fn cli_help_succeeds() {
    for command in ["get", "put", "del", "ping", "status", "logdump"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ringkv {command} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("usage"));
    }
}

/// An argument that is not UTF-8 is refused with a message and exit code 2; it used to
/// panic (`std::env::args`), exit code 101.
#[test]
fn a_non_utf8_argument_is_refused_not_panicked_on() {
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .arg("get")
        .arg(std::ffi::OsStr::from_bytes(b"key-\xff"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not valid UTF-8"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Arguments that do not fit the command are refused with the usage text and exit code
/// 2 before any connection is tried: before, `ringkv get` with no key reported the
/// address unreachable, and `put --r 3` was taken as a write quorum.
#[test]
fn cli_arguments_that_do_not_fit_are_refused_before_connecting() {
    // nothing listens on port 1
    for (args, says) in [
        (
            &["get", "--addr", "127.0.0.1:1"][..],
            "get takes 1 argument, not 0",
        ),
        (
            &["put", "k", "--addr", "127.0.0.1:1"],
            "put takes 2 arguments, not 1",
        ),
        (&["put", "k", "v", "--r", "3"], "put takes no --r"),
        (&["get", "k", "--w", "2"], "get takes no --w"),
        (&["del", "k", "--json"], "del takes no --json"),
        (&["get", "k", "--context", "00"], "get takes no --context"),
        (&["ping", "k"], "ping takes 0 arguments, not 1"),
        (&["get", "k", "--bogus"], "unknown option --bogus"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("cannot reach"), "{args:?}: {stderr}");
    }
}

/// A pipeline that both sends and receives big values: the client must keep reading
/// replies while it writes, or the server, whose replies the client does not read,
/// stops reading (backpressure) while the client blocks writing, and both wait until a
/// timeout breaks the connection.
#[test]
fn a_pipeline_of_big_gets_and_puts_does_not_stall() {
    const BIG: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "none"]);
    let config = ClientConfig {
        request_timeout: std::time::Duration::from_secs(5),
        ..ClientConfig::default()
    };
    let mut c = Client::connect(server.addr, config).unwrap();
    let value = vec![7u8; BIG];
    for k in 0..4 {
        c.put(format!("big-{k}").as_bytes(), &value, None).unwrap();
    }
    let keys: Vec<String> = (0..64).map(|i| format!("big-{}", i % 4)).collect();
    let new_keys: Vec<String> = (0..64).map(|i| format!("new-{i}")).collect();
    let mut pipeline = c.pipeline();
    for (key, new_key) in keys.iter().zip(&new_keys) {
        pipeline.get(key.as_bytes());
        pipeline.put(new_key.as_bytes(), &value, None);
    }
    let results = pipeline.execute().unwrap();
    assert_eq!(results.len(), 128);
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Ok(ringkv_net::client::Response::Get(v)) => assert_eq!(v.values, vec![value.clone()]),
            Ok(ringkv_net::client::Response::Put(out)) => assert_eq!(out.siblings, 1),
            other => panic!("request {i}: {other:?}"),
        }
    }
    for new_key in &new_keys {
        assert_eq!(
            c.get(new_key.as_bytes()).unwrap().values,
            vec![value.clone()]
        );
    }
    assert!(server.stop().success());
}

/// Keys and values that start with `--` are given after `--`; before, `put k --x` was
/// "unknown option --x" and such a value could not be written from the CLI at all.
#[test]
fn cli_takes_keys_and_values_that_look_like_options_after_a_double_dash() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let addr = server.addr.to_string();
    let (ok, out) = ringkv(&["put", "--addr", &addr, "--", "--key", "--help"]);
    assert!(ok, "{out}");
    let (ok, out) = ringkv(&["get", "--json", "--addr", &addr, "--", "--key"]);
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["values"], serde_json::json!(["--help"]));
    assert!(server.stop().success());
}

/// The path of net's example `name`, built for this test's profile: `cargo test
/// --workspace` has built it, and the build here is then a no-op (the same features);
/// run for this package alone, it builds the examples (or rebuilds stale ones) first.
/// (A custom profile or `--target` puts them elsewhere: not handled.)
fn example(name: &str) -> std::path::PathBuf {
    let deps = std::env::current_exe().unwrap();
    let profile_dir = deps.parent().unwrap().parent().unwrap();
    let mut build = Command::new(env!("CARGO"));
    build
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["build", "--workspace", "--examples"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    assert!(build.status().unwrap().success(), "cargo build --examples");
    profile_dir.join("examples").join(name)
}

/// The examples in net/examples/, as the README points users to them, against a real
/// node: they run to the end and print what they did.
#[test]
fn the_examples_run_against_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_shard_ports(dir.path(), 2, &[]);
    let addr = server.addr.to_string();

    let out = Command::new(example("blocking"))
        .arg(&addr)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("after two blind puts: 2 sibling(s)"),
        "{text}"
    );
    assert!(
        text.contains("reconciled to \"apple,pear\": 1 sibling(s)"),
        "{text}"
    );
    assert!(text.contains("pipelined 8 puts, 8 ok"), "{text}");

    let out = Command::new(example("async_tokio"))
        .arg(&addr)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("2 shard connection(s) of 2 shard(s)"),
        "{text}"
    );
    assert_eq!(text.matches("-> 1 value(s)").count(), 32, "{text}");
    assert!(
        text.contains("32 of 32 keys read back through the pool"),
        "{text}"
    );
    let mut c = Client::connect(server.addr, ClientConfig::default()).unwrap();
    assert_eq!(
        c.get(b"example:cart").unwrap().values,
        vec![b"apple,pear".to_vec()]
    );
}

//! The tokio client against fake servers: many tasks on one connection with replies out
//! of order, the in-flight window, timeouts, and malformed or ERROR replies.
#![cfg(feature = "tokio")]

mod support;

use std::time::Duration;

use ringkv_net::async_client::{AsyncClient, AsyncPool, AsyncShardAwareClient};
use ringkv_net::client::{ClientConfig, ClientError, ServerCode};
use ringkv_net::protocol::{begin_frame, encode, end_frame, opcode, ErrorCode};
use support::{
    free_port, hello_ok, node_announcing_shard_port, serve_kv_listener, serve_one, FakeConn,
    FakeNode, Req,
};

/// Joins a fake server thread without blocking the runtime (which must go on running so
/// the dropped client's tasks end and close the socket the server waits on).
async fn join(server: std::thread::JoinHandle<()>) {
    tokio::task::spawn_blocking(move || server.join())
        .await
        .unwrap()
        .unwrap();
}

fn short_timeout_config() -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_millis(200),
        ..ClientConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_one_connection_and_get_their_own_replies() {
    const WINDOW: usize = 4;
    const TASKS: usize = 30;
    let (addr, server) = serve_one(|mut conn| {
        // one slot more than the window: the client keeps one for its liveness PING
        conn.accept_hello(&hello_ok(WINDOW as u32 + 1));
        let mut answered = 0;
        let mut ids = std::collections::HashSet::new();
        // bounded: each pass answers at least one request
        while answered < TASKS {
            let mut got = Vec::new();
            for _ in 0..WINDOW.min(TASKS - answered) {
                got.push(conn.read_request().unwrap());
            }
            // a full window, then nothing until a reply goes out
            if got.len() == WINDOW {
                assert!(
                    !conn.has_more_bytes(),
                    "client exceeded the in-flight window"
                );
            }
            let mut out = Vec::new();
            for (id, req) in got.iter().rev() {
                assert!(ids.insert(*id), "request id {id} reused");
                match req {
                    Req::Get { key, .. } => {
                        encode::get_ok(&mut out, *id, b"c", [key.as_slice()].into_iter())
                    }
                    Req::Put { value, .. } => encode::put_ok(&mut out, *id, value, 1),
                    other => panic!("{other:?}"),
                }
            }
            answered += got.len();
            conn.send(&out);
        }
        conn.wait_for_close();
    });
    let client = AsyncClient::connect(addr, ClientConfig::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("key-{t}").into_bytes();
            if t % 2 == 0 {
                let versions = client.get(&key).await.unwrap();
                assert_eq!(versions.values, vec![key]);
            } else {
                let outcome = client.put(&key, &key, None).await.unwrap();
                assert_eq!(outcome.context.as_bytes(), key.as_slice());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    drop(client);
    join(server).await;
}

#[tokio::test]
async fn typed_api_against_a_fake_in_memory_node() {
    let node = FakeNode::start(8);
    let client = AsyncClient::connect(node.addr, ClientConfig::default())
        .await
        .unwrap();
    client.ping().await.unwrap();
    client.put(b"k", b"a", None).await.unwrap();
    client.put_with(b"k", b"b", None, 2).await.unwrap();
    let versions = client.get_with(b"k", 1).await.unwrap();
    assert_eq!(versions.values.len(), 2);
    let outcome = client
        .put(b"k", b"ab", Some(&versions.context))
        .await
        .unwrap();
    assert_eq!(outcome.siblings, 1);
    let keys: Vec<Vec<u8>> = (0..50).map(|i| vec![b'x', i]).collect();
    let items: Vec<(Vec<u8>, Vec<u8>)> = keys.iter().map(|k| (k.clone(), k.clone())).collect();
    assert!(client.put_many(&items).await.iter().all(Result::is_ok));
    let got = client.get_many(&keys).await;
    for (key, versions) in keys.iter().zip(got) {
        assert_eq!(versions.unwrap().values, vec![key.clone()]);
    }
    client.delete(b"k", None).await.unwrap();
    client.delete_with(b"k", None, 1).await.unwrap();
    assert!(client.get(b"k").await.unwrap().is_empty());
}

/// A server that leaves one request unanswered but answers the rest: the timeout fails
/// that request alone. (Nothing arrived for a request timeout, so the client checks with
/// a PING, which this server answers: the connection stays.)
#[tokio::test]
async fn a_timeout_fails_only_its_request() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let (_ignored, _) = conn.read_request().unwrap();
        let mut pings = 0;
        while let Some((id, request)) = conn.read_request() {
            assert_eq!(request, Req::Ping);
            pings += 1;
            let mut out = Vec::new();
            encode::pong(&mut out, id);
            conn.send(&out);
        }
        // the client's liveness check, then the test's own PING
        assert_eq!(pings, 2);
    });
    let client = AsyncClient::connect(addr, short_timeout_config())
        .await
        .unwrap();
    let err = client.get(b"never answered").await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
    // the liveness check's answer arrives (bounded wait), and the connection stays
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!client.is_closed());
    client.ping().await.unwrap();
    assert!(!client.is_closed());
    drop(client);
    join(server).await;
}

/// A server that stops answering anything (a frozen process, a host gone without a FIN):
/// after a request times out the client's PING goes unanswered too, the connection
/// closes, and the pool opens a new one instead of handing out the silent one for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_loses_the_connection_and_the_pool_opens_another() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        // first connection: reads every request and answers none
        let (stream, _) = listener.accept().unwrap();
        let mut silent = FakeConn::new(stream);
        silent.accept_hello(&hello_ok(8));
        let mut read = Vec::new();
        while let Some((_, request)) = silent.read_request() {
            read.push(request);
        }
        assert_eq!(
            read[0],
            Req::Get {
                r: 0,
                key: b"k".to_vec()
            }
        );
        assert_eq!(read[1..], [Req::Ping], "one liveness PING");
        // second: answers PINGs until the client goes
        let (stream, _) = listener.accept().unwrap();
        let mut conn = FakeConn::new(stream);
        conn.accept_hello(&hello_ok(8));
        conn.answer_pings();
    });
    let pool = AsyncPool::new(addr, short_timeout_config(), 1)
        .await
        .unwrap();
    let first = pool.client().await.unwrap();
    let err = first.get(b"k").await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
    // the PING's own timeout passes (bounded wait)
    for _ in 0..300 {
        if first.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(first.is_closed(), "a silent connection must close");
    let err = first.ping().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::NotSent(m) if m.contains("sent nothing")),
        "{err:?}"
    );
    let second = pool.client().await.unwrap();
    second.ping().await.unwrap();
    drop((first, second, pool));
    join(server).await;
}

/// A batch against a server that answers nothing: the requests that fit in the window
/// are sent, the first one that finds no room times out, and the rest fail at once
/// instead of each waiting a request timeout of its own. Measured on tokio's paused
/// clock (virtual time, not the machine's).
#[tokio::test]
async fn a_batch_against_a_silent_server_ends_after_about_one_request_timeout() {
    const WINDOW: u32 = 4;
    const KEYS: usize = 100;
    let (addr, server) = serve_one(|mut conn| {
        // one slot more than the window: the client keeps one for its liveness PING
        conn.accept_hello(&hello_ok(WINDOW + 1));
        let mut gets = 0;
        while let Some((_, request)) = conn.read_request() {
            if matches!(request, Req::Get { .. }) {
                gets += 1;
            }
        }
        assert_eq!(gets, WINDOW, "only the window's worth is sent");
    });
    let client = AsyncClient::connect(addr, short_timeout_config())
        .await
        .unwrap();
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    let keys: Vec<Vec<u8>> = (0..KEYS).map(|i| format!("k{i}").into_bytes()).collect();
    let results = client.get_many(&keys).await;
    let took = started.elapsed();
    tokio::time::resume();
    assert!(results
        .iter()
        .all(|r| matches!(r, Err(ClientError::Timeout))));
    // one request timeout for room in the window, the window's replies due by then;
    // before, every key waited its own: 97 of them
    assert!(
        took < 3 * short_timeout_config().request_timeout,
        "{took:?} of virtual time"
    );
    drop(client);
    join(server).await;
}

#[tokio::test]
async fn a_malformed_reply_closes_the_connection_and_fails_everyone() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let _ = conn.read_request().unwrap();
        let (id, _) = conn.read_request().unwrap();
        // PUT_OK whose body is one byte short
        let mut out = Vec::new();
        let start = begin_frame(&mut out, opcode::PUT_OK, id);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.push(1);
        end_frame(&mut out, start);
        conn.send(&out);
        conn.wait_for_close();
    });
    let client = AsyncClient::connect(addr, ClientConfig::default())
        .await
        .unwrap();
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.get(b"waits forever").await })
    };
    // whichever request the server reads second gets the malformed reply; the server
    // waits for both, so the spawned get is sent while the put waits
    let err = client.put(b"k", b"v", None).await.unwrap_err();
    assert!(matches!(err, ClientError::Closed(_)), "{err:?}");
    let err = waiting.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, ClientError::Closed(m) if m.contains("malformed")),
        "{err:?}"
    );
    assert!(client.is_closed());
    let err = client.ping().await.unwrap_err();
    assert!(matches!(err, ClientError::NotSent(_)), "{err:?}");
    drop(client);
    join(server).await;
}

#[tokio::test]
async fn error_replies_map_to_server_and_not_confirmed() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let mut out = Vec::new();
        let (id, _) = conn.read_request().unwrap();
        encode::error(&mut out, id, ErrorCode::ValueTooLarge, "too big");
        conn.send(&out);
        out.clear();
        let (id, _) = conn.read_request().unwrap();
        encode::error(&mut out, id, ErrorCode::NotConfirmed, "maybe");
        conn.send(&out);
        conn.wait_for_close();
    });
    let client = AsyncClient::connect(addr, ClientConfig::default())
        .await
        .unwrap();
    let err = client.put(b"k", b"v", None).await.unwrap_err();
    assert_eq!(
        err.server_code(),
        Some(ServerCode::Known(ErrorCode::ValueTooLarge))
    );
    let err = client.delete(b"k", None).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::NotConfirmed { message } if message == "maybe"),
        "{err:?}"
    );
    assert!(!client.is_closed());
    drop(client);
    join(server).await;
}

#[tokio::test]
async fn hello_error_fails_the_connect() {
    let (addr, server) = serve_one(|mut conn| {
        let (id, _) = conn.read_request().unwrap();
        let mut out = Vec::new();
        encode::error(&mut out, id, ErrorCode::ShuttingDown, "draining");
        conn.send(&out);
    });
    let err = AsyncClient::connect(addr, ClientConfig::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.server_code(),
        Some(ServerCode::Known(ErrorCode::ShuttingDown))
    );
    join(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_aware_client_sends_each_key_to_its_shard() {
    const SHARDS: u16 = 4;
    let Some(node) = FakeNode::start_sharded(SHARDS) else {
        eprintln!("no free run of ports for the shard listeners; skipped");
        return;
    };
    let client = AsyncShardAwareClient::connect(node.addr, ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(client.shard_connection_count(), usize::from(SHARDS));
    let keys: Vec<Vec<u8>> = (0..40).map(|i| format!("user:{i}").into_bytes()).collect();
    // tasks at once through clones
    let mut tasks = Vec::new();
    for key in &keys[..20] {
        let (client, key) = (client.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            client.put(&key, b"v", None).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let results = client.get_many(&keys).await;
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result.as_ref().unwrap().values.is_empty(), i >= 20);
    }
    let pairs: Vec<(Vec<u8>, Vec<u8>)> =
        keys[20..].iter().map(|k| (k.clone(), k.clone())).collect();
    for outcome in client.put_many(&pairs).await {
        outcome.unwrap();
    }
    client.ping().await.unwrap();
    let partitions = client.hello().partitions;
    let seen = node.seen.lock().unwrap();
    assert_eq!(seen.len(), 80);
    let mut shards_used = std::collections::BTreeSet::new();
    for (shard, key) in seen.iter() {
        let want = ringkv_ring::partition_for_key(key, partitions) % u32::from(SHARDS);
        assert_eq!(u32::from(*shard), want, "key {key:?}");
        assert_eq!(client.shard_for_key(key), Some(*shard));
        shards_used.insert(*shard);
    }
    assert!(shards_used.len() > 1, "40 keys all on one shard");
}

#[tokio::test]
async fn shard_aware_client_falls_back_to_the_main_connection() {
    // a shard port announced but nobody listens there
    let (addr, _, seen) = node_announcing_shard_port(free_port());
    let client = AsyncShardAwareClient::connect(addr, short_timeout_config())
        .await
        .unwrap();
    assert_eq!(client.shard_connection_count(), 0);
    assert!(client.get(b"k").await.unwrap().is_empty());
    assert_eq!(seen.lock().unwrap().len(), 1, "through the main connection");
}

/// A pool of one connection whose connection the server closes: the next `client()`
/// opens a new one; a pool of three opens its connections as they are first used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_opens_connections_on_use_and_reopens_closed_ones() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        // first connection: one PING answered, then closed by the server
        let (stream, _) = listener.accept().unwrap();
        let mut conn = FakeConn::new(stream);
        conn.accept_hello(&hello_ok(8));
        let (id, req) = conn.read_request().unwrap();
        assert_eq!(req, Req::Ping);
        let mut out = Vec::new();
        encode::pong(&mut out, id);
        conn.send(&out);
        drop(conn);
        // second: serves PINGs until the client goes
        let (stream, _) = listener.accept().unwrap();
        let mut conn = FakeConn::new(stream);
        conn.accept_hello(&hello_ok(8));
        while let Some((id, req)) = conn.read_request() {
            assert_eq!(req, Req::Ping);
            out.clear();
            encode::pong(&mut out, id);
            conn.send(&out);
        }
    });
    let pool = AsyncPool::new(addr, short_timeout_config(), 1)
        .await
        .unwrap();
    let first = pool.client().await.unwrap();
    first.ping().await.unwrap();
    // the server's close reaches the client's reader (bounded wait)
    for _ in 0..200 {
        if first.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(first.is_closed());
    assert!(first.ping().await.is_err());
    let second = pool.client().await.unwrap();
    assert!(!second.is_closed());
    second.ping().await.unwrap();
    second.ping().await.unwrap();
    assert_eq!(pool.open_count(), 1);
    drop((first, second, pool));
    join(server).await;

    let node = FakeNode::start(8);
    let pool = AsyncPool::new(node.addr, ClientConfig::default(), 3)
        .await
        .unwrap();
    assert_eq!(pool.open_count(), 1);
    for i in 0..6u32 {
        let c = pool.client().await.unwrap();
        c.put(format!("k{i}").as_bytes(), b"v", None).await.unwrap();
    }
    assert_eq!(pool.open_count(), 3);
    let c = pool.client().await.unwrap();
    assert_eq!(c.get(b"k5").await.unwrap().values, vec![b"v".to_vec()]);
}

/// A shard port that does not answer at connect time: its keys go through the main
/// connection; once the shard listens, the client opens it (after the retry interval)
/// and sends that shard's keys there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_aware_client_opens_a_shard_that_comes_up_later() {
    let shard_port = free_port();
    let (addr, hello, main_seen) = node_announcing_shard_port(shard_port);
    let client = AsyncShardAwareClient::connect(addr, ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(client.shard_connection_count(), 0);
    client.put(b"a", b"1", None).await.unwrap();
    assert_eq!(
        main_seen.lock().unwrap().len(),
        1,
        "through the main connection"
    );
    // the shard comes up (the port may have been taken meanwhile: then skip)
    let Ok(shard_listener) = std::net::TcpListener::bind(("127.0.0.1", shard_port)) else {
        eprintln!("shard port taken by another process; skipped");
        return;
    };
    let shard_seen = serve_kv_listener(shard_listener, hello);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client.put(b"b", b"2", None).await.unwrap();
    assert_eq!(client.shard_connection_count(), 1);
    assert_eq!(
        shard_seen.lock().unwrap().len(),
        1,
        "through the shard port"
    );
    assert_eq!(main_seen.lock().unwrap().len(), 1);
}

/// A node that comes back with another shard count is routed by its new layout once the
/// client has reconnected to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_aware_client_follows_a_new_shard_layout_after_reconnecting() {
    follows_a_new_layout(1).await;
}

/// The same with the same shard count on other shard ports: the client used to keep the
/// first HELLO_OK, dialling the old ports for ever and sending every key through the
/// main connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_aware_client_follows_new_shard_ports_after_reconnecting() {
    follows_a_new_layout(2).await;
}

/// A client connects to a node announcing `shards_before` shards on ports nobody
/// listens on; the node comes back with two shards on a fake node's shard ports.
async fn follows_a_new_layout(shards_before: u16) {
    let Some(node) = FakeNode::start_sharded(2) else {
        eprintln!("no free run of ports for the shard listeners; skipped");
        return;
    };
    let after = *AsyncClient::connect(node.addr, ClientConfig::default())
        .await
        .unwrap()
        .hello();
    let mut before = after;
    before.shards = shards_before;
    before.shard_port_base = free_port();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        FakeConn::new(stream).accept_hello(&before);
        // the node restarts on its new layout
        let (stream, _) = listener.accept().unwrap();
        let mut conn = FakeConn::new(stream);
        conn.accept_hello(&after);
        conn.wait_for_close();
    });
    let client = AsyncShardAwareClient::connect(addr, ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(client.hello().shards, shards_before);
    assert_eq!(client.shard_connection_count(), 0);
    // whether this one request sees the old connection closed depends on timing
    let _ = client.get(b"first").await;
    let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("user:{i}").into_bytes()).collect();
    for key in &keys {
        client.put(key, b"v", None).await.unwrap();
    }
    assert_eq!(client.hello().shards, 2);
    assert_eq!(client.hello().shard_port_base, after.shard_port_base);
    assert_eq!(client.shard_connection_count(), 2);
    {
        let seen = node.seen.lock().unwrap();
        let mut shards_used = std::collections::BTreeSet::new();
        for (shard, key) in seen.iter() {
            let want = ringkv_ring::partition_for_key(key, after.partitions) % 2;
            assert_eq!(u32::from(*shard), want, "key {key:?}");
            shards_used.insert(*shard);
        }
        assert!(seen.len() >= 20, "{} requests seen", seen.len());
        assert_eq!(shards_used.len(), 2);
    }
    drop(client);
    join(server).await;
}

/// While one request is opening a shard connection that is slow to answer (a shard
/// port behind a firewall that drops packets, a host under load), the shard's other
/// requests go through the main connection instead of queueing behind that attempt.
/// Before, the shard's slot was held across the connect and its HELLO: every request
/// for the shard waited the whole connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_shard_connect_does_not_hold_up_that_shards_other_requests() {
    let shard_port = free_port();
    let (addr, _, seen) = node_announcing_shard_port(shard_port);
    let config = ClientConfig {
        request_timeout: Duration::from_secs(30),
        ..ClientConfig::default()
    };
    // nothing listens on the shard port yet: the first attempt fails at once
    let client = AsyncShardAwareClient::connect(addr, config).await.unwrap();
    assert_eq!(client.shard_connection_count(), 0);
    // now a listener that accepts and never answers the HELLO, until released
    let listener = std::net::TcpListener::bind(("127.0.0.1", shard_port)).unwrap();
    let (accepted_tx, accepted_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let shard = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        accepted_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(Duration::from_secs(30));
        drop(stream);
    });
    // the failed attempt's retry interval passes
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let attempt = {
        let client = client.clone();
        tokio::spawn(async move { client.get(b"first").await })
    };
    tokio::task::spawn_blocking(move || accepted_rx.recv().unwrap())
        .await
        .unwrap();
    // the attempt waits for its HELLO; this request must not wait with it (bounded:
    // the attempt alone would take the 30 s request timeout)
    let other = tokio::time::timeout(Duration::from_secs(10), client.get(b"second")).await;
    release_tx.send(()).unwrap();
    assert!(other
        .expect("served while the shard connect was pending")
        .unwrap()
        .is_empty());
    // the attempt fails (the shard closed) and its request goes through main too
    assert!(attempt.await.unwrap().unwrap().is_empty());
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "both through the main connection"
    );
    shard.join().unwrap();
}

/// A server that is alive but slow to answer the liveness PING: a reply to another
/// request arrives meanwhile, so the connection stays, and the PONG that comes after
/// the PING's own timeout is taken, not treated as a reply nobody asked for. Before,
/// that late PONG closed a healthy connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_to_the_liveness_ping_keeps_the_connection() {
    const T: Duration = Duration::from_millis(500);
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let (_a, _) = conn.read_request().unwrap();
        let (b, _) = conn.read_request().unwrap();
        // both time out at T; the client's PING follows
        let (ping, request) = conn.read_request().unwrap();
        assert_eq!(request, Req::Ping);
        std::thread::sleep(T / 2);
        let mut out = Vec::new();
        encode::get_ok(&mut out, b, b"", std::iter::empty());
        conn.send(&out);
        // after the PING's own timeout
        std::thread::sleep(T + T / 2);
        conn.pong(ping);
        conn.answer_pings();
    });
    let config = ClientConfig {
        request_timeout: T,
        ..ClientConfig::default()
    };
    let client = AsyncClient::connect(addr, config).await.unwrap();
    let (a, b) = tokio::join!(client.get(b"a"), client.get(b"b"));
    assert!(matches!(a, Err(ClientError::Timeout)), "{a:?}");
    assert!(matches!(b, Err(ClientError::Timeout)), "{b:?}");
    // past the late PONG (bounded wait)
    tokio::time::sleep(3 * T).await;
    assert!(!client.is_closed(), "a healthy connection was closed");
    client.ping().await.unwrap();
    drop(client);
    join(server).await;
}

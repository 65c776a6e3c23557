//! The blocking client against scripted fake servers: negotiation, typed requests,
//! pipelining with out-of-order replies, timeouts, malformed and ERROR replies, the pool
//! and shard-aware routing.

mod support;

use std::time::Duration;

use ringkv_net::client::{
    ClientConfig, ClientError, Context, Pool, Response, ServerCode, ShardAwareClient, Versions,
};
use ringkv_net::protocol::{begin_frame, encode, end_frame, opcode, ErrorCode};
use support::{hello_ok, serve_one, FakeNode, Req};

fn config() -> ClientConfig {
    ClientConfig::default()
}

/// A config for tests that expect a timeout (the value only bounds how long they take).
fn short_timeout_config() -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_millis(200),
        ..ClientConfig::default()
    }
}

#[test]
fn connect_negotiates_v1_and_keeps_hello_ok() {
    let mut hello = hello_ok(32);
    hello.node_id = 0xDEAD_BEEF;
    hello.shard_port_base = 9100;
    let (addr, server) = serve_one(move |mut conn| {
        conn.accept_hello(&hello);
        conn.wait_for_close();
    });
    let client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    assert_eq!(*client.hello(), hello);
    assert_eq!(client.in_flight_window(), 32);
    drop(client);
    server.join().unwrap();
}

#[test]
fn hello_answered_with_error_is_a_server_error() {
    let (addr, server) = serve_one(|mut conn| {
        let (id, _) = conn.read_request().unwrap();
        let mut out = Vec::new();
        encode::error(&mut out, id, ErrorCode::UnsupportedVersion, "v2 only");
        conn.send(&out);
    });
    let err = ringkv_net::client::Client::connect(addr, config()).unwrap_err();
    match err {
        ClientError::Server { code, message } => {
            assert_eq!(code, ServerCode::Known(ErrorCode::UnsupportedVersion));
            assert_eq!(message, "v2 only");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    server.join().unwrap();
}

#[test]
fn hello_ok_with_another_version_is_refused() {
    let (addr, server) = serve_one(|mut conn| {
        let mut hello = hello_ok(8);
        hello.version = 2;
        conn.accept_hello(&hello);
    });
    let err = ringkv_net::client::Client::connect(addr, config()).unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    server.join().unwrap();
}

#[test]
fn typed_requests_carry_their_fields_and_replies_their_values() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let mut out = Vec::new();
        let (id, req) = conn.read_request().unwrap();
        assert_eq!(req, Req::Ping);
        encode::pong(&mut out, id);

        let (id, req) = conn.read_request().unwrap();
        assert_eq!(
            req,
            Req::Get {
                r: 2,
                key: b"k".to_vec()
            }
        );
        encode::get_ok(&mut out, id, b"ctx1", [&b"a"[..], b"b"].into_iter());

        let (id, req) = conn.read_request().unwrap();
        assert_eq!(
            req,
            Req::Put {
                w: 3,
                key: b"k".to_vec(),
                context: b"ctx1".to_vec(),
                value: b"ab".to_vec()
            }
        );
        encode::put_ok(&mut out, id, b"ctx2", 1);

        let (id, req) = conn.read_request().unwrap();
        assert_eq!(
            req,
            Req::Delete {
                w: 0,
                key: b"k".to_vec(),
                context: b"ctx2".to_vec()
            }
        );
        encode::delete_ok(&mut out, id);

        let (id, req) = conn.read_request().unwrap();
        assert_eq!(
            req,
            Req::Put {
                w: 0,
                key: b"k2".to_vec(),
                context: Vec::new(),
                value: b"v".to_vec()
            }
        );
        encode::put_ok(&mut out, id, b"ctx3", 2);
        // every reply goes out one byte at a time: the client must reassemble them
        for b in out.iter() {
            conn.send(&[*b]);
        }
        conn.wait_for_close();
    });
    let mut client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    let mut pipeline = client.pipeline();
    pipeline.ping().get_with(b"k", 2);
    let context = Context::from_bytes(b"ctx1".to_vec());
    pipeline.put_with(b"k", b"ab", Some(&context), 3);
    pipeline.delete(b"k", Some(&Context::from_bytes(b"ctx2".to_vec())));
    pipeline.put(b"k2", b"v", None);
    let results: Vec<Response> = pipeline
        .execute()
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(results[0], Response::Pong);
    assert_eq!(
        results[1],
        Response::Get(Versions {
            values: vec![b"a".to_vec(), b"b".to_vec()],
            context: context.clone(),
        })
    );
    match &results[2] {
        Response::Put(outcome) => {
            assert_eq!(outcome.context.as_bytes(), b"ctx2");
            assert_eq!(outcome.siblings, 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(results[3], Response::Deleted);
    match &results[4] {
        Response::Put(outcome) => assert_eq!(outcome.siblings, 2),
        other => panic!("{other:?}"),
    }
    drop(client);
    server.join().unwrap();
}

#[test]
fn pipelined_replies_in_any_order_reach_their_requests_within_the_window() {
    const WINDOW: usize = 4;
    const KEYS: usize = 23;
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(WINDOW as u32));
        let mut answered = 0;
        // bounded: each pass answers at least one request
        while answered < KEYS {
            let batch = WINDOW.min(KEYS - answered);
            let mut got = Vec::new();
            for _ in 0..batch {
                got.push(conn.read_request().unwrap());
            }
            // the client must now wait: nothing more may arrive before a reply
            assert!(
                !conn.has_more_bytes(),
                "client exceeded the in-flight window"
            );
            // answer in reverse order; the value is the key, so a mismatch shows
            let mut out = Vec::new();
            for (id, req) in got.into_iter().rev() {
                let key = req.key().unwrap().to_vec();
                encode::get_ok(&mut out, id, b"c", [key.as_slice()].into_iter());
            }
            conn.send(&out);
            answered += batch;
        }
        conn.wait_for_close();
    });
    let mut client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    let keys: Vec<Vec<u8>> = (0..KEYS).map(|i| format!("key-{i}").into_bytes()).collect();
    let results = client.get_many(&keys).unwrap();
    assert_eq!(results.len(), KEYS);
    for (key, result) in keys.iter().zip(results) {
        assert_eq!(result.unwrap().values, vec![key.clone()]);
    }
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_reply_that_never_comes_is_a_timeout_and_closes_the_connection() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let _ = conn.read_request().unwrap();
        conn.wait_for_close();
    });
    let mut client = ringkv_net::client::Client::connect(addr, short_timeout_config()).unwrap();
    let err = client.get(b"k").unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
    assert!(client.is_broken());
    let err = client.ping().unwrap_err();
    assert!(matches!(err, ClientError::NotSent(_)), "{err:?}");
    // the server saw the connection closed
    server.join().unwrap();
}

#[test]
fn a_server_that_never_answers_hello_is_a_timeout() {
    let (addr, server) = serve_one(|mut conn| {
        let _ = conn.read_request().unwrap();
        conn.wait_for_close();
    });
    let err = ringkv_net::client::Client::connect(addr, short_timeout_config()).unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
    server.join().unwrap();
}

/// Serves HELLO, reads one request and answers it with `reply(request_id)`.
fn one_reply(reply: impl FnOnce(u64) -> Vec<u8> + Send + 'static) -> std::net::SocketAddr {
    let (addr, _server) = serve_one(move |mut conn| {
        conn.accept_hello(&hello_ok(8));
        let (id, _) = conn.read_request().unwrap();
        conn.send(&reply(id));
        conn.wait_for_close();
    });
    addr
}

#[test]
fn a_malformed_reply_is_a_protocol_error_not_a_panic() {
    // GET_OK announcing 3 values but carrying 1
    let addr = one_reply(|id| {
        let mut out = Vec::new();
        let start = begin_frame(&mut out, opcode::GET_OK, id);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&3u16.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.push(b'x');
        end_frame(&mut out, start);
        out
    });
    let mut client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    let err = client.get(b"k").unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    assert!(client.is_broken());
}

#[test]
fn a_reply_over_the_frame_limit_is_refused() {
    let addr = one_reply(|id| {
        let mut out = Vec::new();
        let start = begin_frame(&mut out, opcode::PONG, id);
        end_frame(&mut out, start);
        out[0..4].copy_from_slice(&(100u32 << 20).to_le_bytes());
        out
    });
    let cfg = ClientConfig {
        reply_frame_bytes_max: 1 << 20,
        ..config()
    };
    let mut client = ringkv_net::client::Client::connect(addr, cfg).unwrap();
    let err = client.ping().unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("exceeds")),
        "{err:?}"
    );
}

#[test]
fn a_reply_of_the_wrong_kind_is_a_protocol_error() {
    let addr = one_reply(|id| {
        let mut out = Vec::new();
        encode::delete_ok(&mut out, id);
        out
    });
    let mut client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    let err = client.get(b"k").unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    assert!(client.is_broken());
}

#[test]
fn a_reply_for_an_unknown_request_id_closes_the_connection() {
    let addr = one_reply(|id| {
        let mut out = Vec::new();
        encode::pong(&mut out, id + 1000);
        out
    });
    let mut client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    let err = client.ping().unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    assert!(client.is_broken());
}

#[test]
fn the_server_closing_mid_reply_is_reported_as_closed() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let (id, _) = conn.read_request().unwrap();
        let mut out = Vec::new();
        encode::get_ok(&mut out, id, b"ctx", [&b"value"[..]].into_iter());
        out.truncate(out.len() - 2);
        conn.send(&out);
        // dropping the connection closes it half-way through the reply
    });
    let mut client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    let err = client.get(b"k").unwrap_err();
    assert!(
        matches!(&err, ClientError::Closed(m) if m.contains("inside a reply")),
        "{err:?}"
    );
    assert!(client.is_broken());
    server.join().unwrap();
}

#[test]
fn an_error_reply_fails_only_its_request() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let mut out = Vec::new();
        let (id, _) = conn.read_request().unwrap();
        encode::error(&mut out, id, ErrorCode::KeyTooLong, "key too long");
        let (id, _) = conn.read_request().unwrap();
        encode::error(&mut out, id, ErrorCode::NotConfirmed, "1 of 2 acks");
        let (id, _) = conn.read_request().unwrap();
        // an error code this client does not know
        let start = begin_frame(&mut out, opcode::ERROR, id);
        out.extend_from_slice(&999u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        end_frame(&mut out, start);
        let (id, _) = conn.read_request().unwrap();
        encode::pong(&mut out, id);
        conn.send(&out);
        conn.wait_for_close();
    });
    let mut client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    let mut pipeline = client.pipeline();
    pipeline
        .get(b"k")
        .put_with(b"k", b"v", None, 2)
        .delete(b"k", None)
        .ping();
    let results = pipeline.execute().unwrap();
    match &results[0] {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(*code, ServerCode::Known(ErrorCode::KeyTooLong));
            assert_eq!(message, "key too long");
        }
        other => panic!("{other:?}"),
    }
    match &results[1] {
        Err(e @ ClientError::NotConfirmed { message }) => {
            assert_eq!(message, "1 of 2 acks");
            assert_eq!(
                e.server_code(),
                Some(ServerCode::Known(ErrorCode::NotConfirmed))
            );
        }
        other => panic!("{other:?}"),
    }
    match &results[2] {
        Err(ClientError::Server { code, .. }) => assert_eq!(*code, ServerCode::Unknown(999)),
        other => panic!("{other:?}"),
    }
    assert_eq!(results[3].as_ref().unwrap(), &Response::Pong);
    assert!(!client.is_broken());
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_connection_level_error_closes_the_connection() {
    let addr = one_reply(|_| {
        let mut out = Vec::new();
        encode::error(&mut out, 0, ErrorCode::ShuttingDown, "bye");
        out
    });
    let mut client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    let err = client.get(b"k").unwrap_err();
    // not the get's own answer: the get may or may not have run (before, it got the
    // server's code, which reads as a refusal, and `breaks_connection` said false)
    assert!(
        matches!(&err, ClientError::Closed(m) if m.contains("ShuttingDown") && m.contains("bye")),
        "{err:?}"
    );
    assert!(err.breaks_connection());
    assert!(client.is_broken());
}

#[test]
fn a_request_over_a_limit_fails_alone_and_is_never_sent() {
    let node = FakeNode::start(8);
    let mut client = ringkv_net::client::Client::connect(node.addr, config()).unwrap();
    let long_key = vec![b'k'; 70_000];
    let err = client.get(&long_key).unwrap_err();
    assert!(
        matches!(err, ClientError::TooLarge { field: "key", .. }),
        "{err:?}"
    );
    let huge_value = vec![0u8; ringkv_net::protocol::FRAME_BYTES_MAX_DEFAULT];
    let err = client.put(b"k", &huge_value, None).unwrap_err();
    assert!(matches!(
        err,
        ClientError::TooLarge {
            field: "request frame",
            ..
        }
    ));
    client.ping().unwrap();
    assert!(node.seen.lock().unwrap().is_empty());
}

#[test]
fn siblings_are_reconciled_with_the_context() {
    let node = FakeNode::start(8);
    let mut client = ringkv_net::client::Client::connect(node.addr, config()).unwrap();
    client.put(b"cart", b"apple", None).unwrap();
    let outcome = client.put(b"cart", b"pear", None).unwrap();
    assert_eq!(outcome.siblings, 2);
    let versions = client.get(b"cart").unwrap();
    assert!(versions.has_siblings());
    let merged = versions.values.join(&b"+"[..]);
    let outcome = client
        .put(b"cart", &merged, Some(&versions.context))
        .unwrap();
    assert_eq!(outcome.siblings, 1);
    assert_eq!(client.get(b"cart").unwrap().values, vec![merged]);
    let results = client
        .put_many(&[(&b"a"[..], &b"1"[..]), (b"b", b"2")])
        .unwrap();
    assert!(results.iter().all(Result::is_ok));
    let versions = client.get_many(&[b"a", b"b", b"c"]).unwrap();
    assert_eq!(versions[1].as_ref().unwrap().values, vec![b"2".to_vec()]);
    assert!(versions[2].as_ref().unwrap().is_empty());
}

#[test]
fn pool_caps_its_connections_and_reuses_returned_ones() {
    let node = FakeNode::start(8);
    let pool = Pool::new(node.addr, short_timeout_config(), 2).unwrap();
    let mut a = pool.connection().unwrap();
    let mut b = pool.connection().unwrap();
    a.ping().unwrap();
    b.ping().unwrap();
    assert_eq!(pool.open_count(), 2);
    let err = pool.connection().unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
    drop(a);
    assert_eq!(pool.idle_count(), 1);
    let mut c = pool.connection().unwrap();
    c.put(b"k", b"v", None).unwrap();
    assert_eq!(pool.open_count(), 2);
    drop(b);
    drop(c);
    // threads share the pool
    std::thread::scope(|s| {
        for t in 0..4 {
            let pool = &pool;
            s.spawn(move || {
                let key = format!("t{t}");
                pool.connection()
                    .unwrap()
                    .put(key.as_bytes(), b"v", None)
                    .unwrap();
            });
        }
    });
    assert!(pool.open_count() <= 2);
}

#[test]
fn shard_aware_client_sends_each_key_to_its_shard() {
    const SHARDS: u16 = 4;
    let Some(node) = FakeNode::start_sharded(SHARDS) else {
        eprintln!("no free run of ports for the shard listeners; skipped");
        return;
    };
    let mut client = ShardAwareClient::connect(node.addr, config()).unwrap();
    assert_eq!(client.shard_connection_count(), usize::from(SHARDS));
    let keys: Vec<Vec<u8>> = (0..40).map(|i| format!("user:{i}").into_bytes()).collect();
    for key in &keys[..20] {
        client.put(key, b"v", None).unwrap();
    }
    let results = client.get_many(&keys);
    for (i, result) in results.iter().enumerate() {
        let values = &result.as_ref().unwrap().values;
        assert_eq!(values.is_empty(), i >= 20);
    }
    let partitions = client.hello().partitions;
    let seen = node.seen.lock().unwrap();
    assert_eq!(seen.len(), 60);
    let mut shards_used = std::collections::BTreeSet::new();
    for (shard, key) in seen.iter() {
        let want = ringkv_ring::partition_for_key(key, partitions) % u32::from(SHARDS);
        assert_eq!(u32::from(*shard), want, "key {key:?}");
        assert_eq!(client.shard_for_key(key), Some(*shard));
        shards_used.insert(*shard);
    }
    assert!(shards_used.len() > 1, "40 keys all on one shard");
}

#[test]
fn shard_aware_client_falls_back_to_the_main_connection() {
    // shard ports announced but nobody listens there
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = listener.local_addr().unwrap().port();
    drop(listener);
    let (addr, server) = serve_one(move |mut conn| {
        let mut hello = hello_ok(8);
        hello.shards = 1;
        hello.shard_port_base = dead_port;
        conn.accept_hello(&hello);
        let (id, req) = conn.read_request().unwrap();
        assert_eq!(
            req,
            Req::Get {
                r: 0,
                key: b"k".to_vec()
            }
        );
        let mut out = Vec::new();
        encode::get_ok(&mut out, id, b"", std::iter::empty());
        conn.send(&out);
        conn.wait_for_close();
    });
    let mut client = ShardAwareClient::connect(addr, config()).unwrap();
    assert_eq!(client.shard_connection_count(), 0);
    assert!(client.get(b"k").unwrap().is_empty());
    drop(client);
    server.join().unwrap();
}

/// A shard port that does not answer at connect time is tried again (at most once a
/// second) and used once it answers.
#[test]
fn shard_aware_client_opens_a_shard_that_comes_up_later() {
    let shard_port = support::free_port();
    let (addr, hello, main_seen) = support::node_announcing_shard_port(shard_port);
    let mut client = ShardAwareClient::connect(addr, config()).unwrap();
    assert_eq!(client.shard_connection_count(), 0);
    client.put(b"a", b"1", None).unwrap();
    assert_eq!(
        main_seen.lock().unwrap().len(),
        1,
        "through the main connection"
    );
    let Ok(shard_listener) = std::net::TcpListener::bind(("127.0.0.1", shard_port)) else {
        eprintln!("shard port taken by another process; skipped");
        return;
    };
    let shard_seen = support::serve_kv_listener(shard_listener, hello);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    client.put(b"b", b"2", None).unwrap();
    assert_eq!(client.shard_connection_count(), 1);
    assert_eq!(
        shard_seen.lock().unwrap().len(),
        1,
        "through the shard port"
    );
    assert_eq!(main_seen.lock().unwrap().len(), 1);
}

/// A connection that closes in the middle of a batch keeps the replies it already gave:
/// a caller must learn which puts were acknowledged.
#[test]
fn a_batch_cut_short_keeps_the_acknowledged_puts() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(2));
        let mut out = Vec::new();
        for n in 1..=3u64 {
            let (id, req) = conn.read_request().unwrap();
            assert_eq!(req.key().unwrap(), format!("k{n}").as_bytes());
            out.clear();
            encode::put_ok(&mut out, id, &n.to_le_bytes(), 1);
            conn.send(&out);
        }
        // the node goes away with requests 4 and 5 unanswered
        conn.stream.shutdown(std::net::Shutdown::Write).unwrap();
        conn.wait_for_close();
    });
    let mut client = ringkv_net::client::Client::connect(addr, config()).unwrap();
    let items: Vec<(Vec<u8>, Vec<u8>)> = (1..=6)
        .map(|n| (format!("k{n}").into_bytes(), b"v".to_vec()))
        .collect();
    let results = client.put_many(&items).unwrap();
    assert_eq!(results.len(), 6);
    for (n, result) in results[..3].iter().enumerate() {
        let outcome = result.as_ref().unwrap();
        assert_eq!(outcome.context.as_bytes(), &(n as u64 + 1).to_le_bytes());
    }
    // the window is 2: k4 went out with k3 (in flight: may or may not be applied); k5
    // went out after k3's reply if the client saw that reply before the close, and is
    // `NotSent` otherwise; k6 needed k4's reply, so it was never sent (not applied)
    let err = results[3].as_ref().unwrap_err();
    assert!(matches!(err, ClientError::Closed(_)), "{err:?}");
    let err = results[4].as_ref().unwrap_err();
    assert!(
        matches!(err, ClientError::Closed(_) | ClientError::NotSent(_)),
        "{err:?}"
    );
    let err = results[5].as_ref().unwrap_err();
    assert!(matches!(err, ClientError::NotSent(_)), "{err:?}");
    assert!(client.is_broken());
    // a batch on the closed connection sends nothing
    assert!(matches!(
        client.put_many(&items[..1]),
        Err(ClientError::NotSent(_))
    ));
    drop(client);
    server.join().unwrap();
}

/// A reply that never comes times out the requests still waiting, not the ones answered.
#[test]
fn a_timeout_inside_a_batch_fails_only_the_unanswered_keys() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let (id, _) = conn.read_request().unwrap();
        let mut out = Vec::new();
        encode::get_ok(&mut out, id, b"c", [&b"v"[..]].into_iter());
        conn.send(&out);
        conn.wait_for_close();
    });
    let mut client = ringkv_net::client::Client::connect(addr, short_timeout_config()).unwrap();
    let results = client.get_many(&[b"a", b"b", b"c"]).unwrap();
    assert_eq!(results[0].as_ref().unwrap().values, vec![b"v".to_vec()]);
    for result in &results[1..] {
        let err = result.as_ref().unwrap_err();
        assert!(matches!(err, ClientError::Timeout), "{err:?}");
    }
    assert!(client.is_broken());
    drop(client);
    server.join().unwrap();
}

/// A node that comes back with another shard count is routed by its new layout once the
/// client has reconnected to it.
#[test]
fn shard_aware_client_follows_a_new_shard_layout_after_reconnecting() {
    let Some(node) = FakeNode::start_sharded(2) else {
        eprintln!("no free run of ports for the shard listeners; skipped");
        return;
    };
    let after = *ringkv_net::client::Client::connect(node.addr, config())
        .unwrap()
        .hello();
    let mut before = after;
    before.shards = 1;
    before.shard_port_base = support::free_port();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        support::FakeConn::new(stream).accept_hello(&before);
        closed_tx.send(()).unwrap();
        // the node restarts with two shards
        let (stream, _) = listener.accept().unwrap();
        let mut conn = support::FakeConn::new(stream);
        conn.accept_hello(&after);
        let (id, req) = conn.read_request().unwrap();
        assert_eq!(req, Req::Ping);
        let mut out = Vec::new();
        encode::pong(&mut out, id);
        conn.send(&out);
        conn.wait_for_close();
    });
    let mut client = ShardAwareClient::connect(addr, config()).unwrap();
    assert_eq!(client.hello().shards, 1);
    // the old connection is gone (its close reaches this socket: bounded wait)
    closed_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // the next request finds it closed and reopens it, and routing follows the new
    // layout
    client.ping().unwrap();
    let key = b"user:1";
    assert_eq!(
        client.shard_for_key(key),
        Some((ringkv_ring::partition_for_key(key, after.partitions) % 2) as u16)
    );
    let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("user:{i}").into_bytes()).collect();
    for key in &keys {
        client.put(key, b"v", None).unwrap();
    }
    assert_eq!(client.hello().shards, 2);
    assert_eq!(client.shard_connection_count(), 2);
    let seen = node.seen.lock().unwrap();
    let partitions = after.partitions;
    let mut shards_used = std::collections::BTreeSet::new();
    for (shard, key) in seen.iter() {
        let want = ringkv_ring::partition_for_key(key, partitions) % 2;
        assert_eq!(u32::from(*shard), want, "key {key:?}");
        shards_used.insert(*shard);
    }
    assert_eq!(seen.len(), 20);
    assert_eq!(shards_used.len(), 2);
    drop(seen);
    drop(client);
    server.join().unwrap();
}

/// A batch routed while the main connection cannot be reopened fails its keys, and the
/// next batch routes by the layout the reopened connection describes. The keys of one
/// batch used to be routed one by one, each retrying the main connection: a key routed
/// to a shard of the old layout, then a reopen that found no shard ports, indexed past
/// the (now empty) shard list and panicked.
#[test]
fn a_batch_routes_all_its_keys_by_one_layout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut four = hello_ok(8);
    four.shards = 4;
    four.shard_port_base = support::free_port();
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        support::FakeConn::new(stream).accept_hello(&four);
        closed_tx.send(()).unwrap();
        // the node is restarting: one connection refused at its HELLO
        let (stream, _) = listener.accept().unwrap();
        drop(stream);
        // back, without shard ports
        let (stream, _) = listener.accept().unwrap();
        let mut conn = support::FakeConn::new(stream);
        conn.accept_hello(&hello_ok(8));
        let mut out = Vec::new();
        for _ in 0..2 {
            let (id, _) = conn.read_request().unwrap();
            encode::get_ok(&mut out, id, b"", std::iter::empty());
        }
        conn.send(&out);
        conn.wait_for_close();
    });
    let mut client = ShardAwareClient::connect(addr, config()).unwrap();
    // the first connection is gone (its close reaches this socket: bounded wait)
    closed_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let keys = [&b"user:1"[..], b"user:2", b"user:3", b"user:4"];
    for result in client.get_many(&keys) {
        assert!(result.is_err(), "{result:?}");
    }
    let results = client.get_many(&keys[..2]);
    for result in results {
        assert!(result.unwrap().is_empty());
    }
    assert_eq!(client.shard_for_key(b"user:1"), None);
    drop(client);
    server.join().unwrap();
}

/// A pooled connection the server closed while it sat idle (the server's idle timeout,
/// a restart) is found closed before it is handed out, and the pool opens another: the
/// request does not fail. Before, the pool handed out the closed connection and the
/// request failed with `Closed`.
#[test]
fn a_pooled_connection_the_server_closed_while_idle_is_replaced() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        // first connection: one PING answered, then closed by the server
        let (stream, _) = listener.accept().unwrap();
        let mut conn = support::FakeConn::new(stream);
        conn.accept_hello(&hello_ok(8));
        let (id, _) = conn.read_request().unwrap();
        conn.pong(id);
        drop(conn);
        closed_tx.send(()).unwrap();
        // second: serves PINGs until the client goes
        let (stream, _) = listener.accept().unwrap();
        let mut conn = support::FakeConn::new(stream);
        conn.accept_hello(&hello_ok(8));
        conn.answer_pings();
    });
    let pool = Pool::new(addr, short_timeout_config(), 1).unwrap();
    pool.connection().unwrap().ping().unwrap();
    closed_rx.recv().unwrap();
    // the FIN reaches this socket (bounded wait: loopback)
    std::thread::sleep(Duration::from_millis(50));
    pool.connection().unwrap().ping().unwrap();
    assert_eq!(pool.open_count(), 1);
    drop(pool);
    server.join().unwrap();
}

/// ERROR `ShuttingDown` fails its request and closes the connection (the server closes
/// it once drained), so a pool does not hand it out again.
#[test]
fn a_shutting_down_reply_closes_the_connection() {
    let (addr, server) = serve_one(|mut conn| {
        conn.accept_hello(&hello_ok(8));
        let (id, _) = conn.read_request().unwrap();
        let mut out = Vec::new();
        encode::error(
            &mut out,
            id,
            ErrorCode::ShuttingDown,
            "the node is shutting down",
        );
        conn.send(&out);
        conn.wait_for_close();
    });
    let pool = Pool::new(addr, short_timeout_config(), 1).unwrap();
    let mut c = pool.connection().unwrap();
    let err = c.ping().unwrap_err();
    assert_eq!(
        err.server_code(),
        Some(ServerCode::Known(ErrorCode::ShuttingDown))
    );
    assert!(c.is_broken());
    drop(c);
    assert_eq!(pool.open_count(), 0);
    drop(pool);
    server.join().unwrap();
}

/// `Duration::MAX` ("no timeout") as a timeout works; before, adding it to the clock
/// panicked on every request and every pool checkout.
#[test]
fn timeouts_of_duration_max_mean_no_timeout() {
    let node = FakeNode::start(8);
    let config = ClientConfig {
        request_timeout: Duration::MAX,
        connect_timeout: Duration::MAX,
        ..ClientConfig::default()
    };
    let pool = Pool::new(node.addr, config.clone(), 1).unwrap();
    let mut c = pool.connection().unwrap();
    c.put(b"k", b"v", None).unwrap();
    assert_eq!(c.get(b"k").unwrap().values, vec![b"v".to_vec()]);
    drop(c);
    let mut shard_aware = ShardAwareClient::connect(node.addr, config).unwrap();
    shard_aware.ping().unwrap();
}

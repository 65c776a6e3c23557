//! The peer link against a slow fake peer: it never has more than `pending_max`
//! requests outstanding at the peer (a call over the limit waits for a place instead of
//! failing), and a request that timed out keeps its place until its reply comes.

use ringkv_engine::runtime::run_local;
use ringkv_net::link::{LinkConfig, LinkError, PeerLink};
use ringkv_net::protocol::{check_frame, encode, header, Request};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// A peer that answers every PING with a PONG `delay` after the previous answer, one at
/// a time, and records the most requests it ever held unanswered.
struct SlowPeer {
    addr: String,
    most_unanswered: Arc<AtomicUsize>,
}

fn slow_peer(delay: Duration) -> SlowPeer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let most_unanswered = Arc::new(AtomicUsize::new(0));
    let most = most_unanswered.clone();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let unanswered = Arc::new(AtomicUsize::new(0));
        let (ids, to_answer) = mpsc::channel::<u64>();
        let mut writer: TcpStream = stream.try_clone().unwrap();
        let answering = unanswered.clone();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            for id in to_answer {
                std::thread::sleep(delay);
                out.clear();
                encode::pong(&mut out, id);
                // the count drops before the reply can reach the link
                answering.fetch_sub(1, Ordering::SeqCst);
                if writer.write_all(&out).is_err() {
                    return;
                }
            }
        });
        let mut reader = stream;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // ends when the link closes the connection
        loop {
            let n = match reader.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some(len)) = check_frame(&buf, 1 << 20) {
                let id = header(&buf[..len]).request_id;
                buf.drain(..len);
                let now = unanswered.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                if ids.send(id).is_err() {
                    return;
                }
            }
        }
    });
    SlowPeer {
        addr,
        most_unanswered,
    }
}

fn config(pending_max: usize) -> LinkConfig {
    LinkConfig {
        pending_max,
        ..LinkConfig::default()
    }
}

#[test]
fn calls_over_the_limit_wait_for_a_place() {
    let peer = slow_peer(Duration::from_millis(30));
    let addr = peer.addr.clone();
    let results = run_local(move || async move {
        let link = std::rc::Rc::new(PeerLink::spawn(&addr, config(2)));
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let link = link.clone();
                glommio::spawn_local(async move {
                    link.call(Duration::from_secs(10), |id, out| {
                        Request::Ping.encode(id, out)
                    })
                    .await
                })
            })
            .collect();
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await);
        }
        results
    });
    for result in &results {
        assert!(result.is_ok(), "{result:?}");
    }
    let most = peer.most_unanswered.load(Ordering::SeqCst);
    assert!((1..=2).contains(&most), "the peer held {most} unanswered");
}

#[test]
fn a_timed_out_call_keeps_its_place_until_its_reply() {
    let peer = slow_peer(Duration::from_millis(300));
    let addr = peer.addr.clone();
    run_local(move || async move {
        let link = PeerLink::spawn(&addr, config(1));
        let ping = |id, out: &mut Vec<u8>| Request::Ping.encode(id, out);
        let first = link.call(Duration::from_millis(50), ping).await;
        assert!(matches!(first, Err(LinkError::Timeout { .. })), "{first:?}");
        assert_eq!(link.outstanding(), 1, "still outstanding at the peer");
        // the next call waits for the first reply, then gets its own
        let second = link.call(Duration::from_secs(10), ping).await;
        assert!(second.is_ok(), "{second:?}");
        assert_eq!(link.outstanding(), 0);
    });
    assert_eq!(peer.most_unanswered.load(Ordering::SeqCst), 1);
}

/// A peer address that is a name, not IP:port (from a bad gossip record, say), fails the
/// call with the reason; the shard's thread never blocks in a name lookup.
#[test]
fn a_name_is_refused_not_looked_up() {
    let error = run_local(|| async {
        let link = PeerLink::spawn("localhost:1", config(4));
        let call = link
            .call(Duration::from_secs(2), |id, out| {
                Request::Ping.encode(id, out)
            })
            .await;
        drop(link);
        call
    });
    match error {
        Err(LinkError::Unreachable { reason, .. }) => {
            assert!(reason.contains("must be IP:port"), "{reason}")
        }
        other => panic!("a call to a name: {other:?}"),
    }
}

/// A peer that accepts each connection and closes it at once, after an error frame
/// (as a node at its connection limit refuses one) or without a word, is retried with
/// backoff, as a failed connect is: the link used to reconnect in a loop, thousands of
/// times a second.
#[test]
fn a_peer_that_accepts_and_closes_is_retried_with_backoff() {
    for refuse_with_error in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        std::thread::spawn(move || {
            let mut refusal = Vec::new();
            encode::error(
                &mut refusal,
                0,
                ringkv_net::protocol::ErrorCode::Unavailable,
                "too many connections on this shard",
            );
            for stream in listener.incoming() {
                counted.fetch_add(1, Ordering::SeqCst);
                // as conn::refuse does: an error frame with request id 0, then close
                if let (Ok(mut stream), true) = (stream, refuse_with_error) {
                    let _ = stream.write_all(&refusal);
                }
            }
        });
        run_local(move || async move {
            let link = PeerLink::spawn(&addr, config(4));
            glommio::timer::sleep(Duration::from_millis(600)).await;
            drop(link);
        });
        // 50, 100, 200 ms of backoff fit in 600 ms: a handful of connects
        let n = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=8).contains(&n),
            "{n} connections in 600 ms (error frame: {refuse_with_error})"
        );
    }
}

/// A healthy peer that closes idle connections quickly (a short idle timeout): the
/// link's quiet connections end within a second with no reply read, like a refusal
/// without the error frame. A call made meanwhile must still be served (the link
/// connects again for it), not fail at once as towards a peer that is down.
#[test]
fn a_call_on_a_link_whose_peer_closes_idle_connections_is_served() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                stream
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let (mut buf, mut chunk, mut out) = (Vec::new(), [0u8; 4096], Vec::new());
                // answers PINGs; 100 ms without a request closes the connection
                while let Ok(n @ 1..) = stream.read(&mut chunk) {
                    buf.extend_from_slice(&chunk[..n]);
                    while let Ok(Some(len)) = check_frame(&buf, 1 << 20) {
                        out.clear();
                        encode::pong(&mut out, header(&buf[..len]).request_id);
                        buf.drain(..len);
                        if stream.write_all(&out).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let results = run_local(move || async move {
        let link = PeerLink::spawn(&addr, config(4));
        let ping = |id, out: &mut Vec<u8>| Request::Ping.encode(id, out);
        let mut results = Vec::new();
        for _ in 0..4 {
            // long enough for the peer to close the idle connection (after 100 ms)
            glommio::timer::sleep(Duration::from_millis(400)).await;
            results.push(link.call(Duration::from_secs(5), ping).await);
        }
        results
    });
    for r in &results {
        assert!(r.is_ok(), "{results:?}");
    }
}

/// A peer that reads a request and closes without answering (it dropped us over
/// something, or its refusal frame was lost to the reset) is retried with backoff
/// even while calls keep coming: only an idle close may end the backoff early.
#[test]
fn a_peer_that_closes_on_requests_is_retried_with_backoff_under_calls() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counted.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut stream) = stream {
                let mut chunk = [0u8; 64];
                let _ = stream.read(&mut chunk);
            }
        }
    });
    run_local(move || async move {
        let link = PeerLink::spawn(&addr, config(4));
        let ping = |id, out: &mut Vec<u8>| Request::Ping.encode(id, out);
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(600) {
            let _ = link.call(Duration::from_millis(20), ping).await;
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    });
    let n = accepted.load(Ordering::SeqCst);
    assert!((1..=10).contains(&n), "{n} connections in 600 ms of calls");
}

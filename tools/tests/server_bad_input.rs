//! Bad input against a real `ringkv server` process: each case gets an error frame or
//! a closed connection, never a crash, and every other client keeps being served
//! without losing an acknowledged write.

mod common;

use common::{error_code, Raw, Server};
use ringkv_net::protocol::{opcode, ErrorCode, Request, HEADER_BYTES};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn frame(version: u8, op: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&((HEADER_BYTES + body.len()) as u32).to_le_bytes());
    f.push(version);
    f.push(op);
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(body);
    f
}

/// Runs `abuse` against a fresh node (`sync`) while a well-behaved client writes before
/// and after it, another one writes all through it from its own thread, and `abuse` may
/// write through the first (`Witness::put`); then the node must still run and serve,
/// and every write it acknowledged must read back, also after a clean stop and a
/// restart.
fn abuse_then_check(abuse: impl FnOnce(std::net::SocketAddr, &mut Witness)) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let mut good = Witness {
        raw: Raw::connect(server.addr),
        written: Vec::new(),
    };
    good.put(b"before", b"1");
    // the other client: bounded in count, stopped once the abuse is over
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (addr, stop) = (server.addr, stop.clone());
        std::thread::spawn(move || {
            let mut w = Witness {
                raw: Raw::connect(addr),
                written: Vec::new(),
            };
            for i in 0..100_000u32 {
                if stop.load(Ordering::Relaxed) && i >= 10 {
                    break;
                }
                w.put(format!("during-{i}").as_bytes(), &i.to_le_bytes());
            }
            w.written
        })
    };
    abuse(server.addr, &mut good);
    stop.store(true, Ordering::Relaxed);
    let mut written = writer.join().expect("the other client's writes");
    assert!(server.is_running(), "the server survived");
    good.put(b"after", b"2");
    written.append(&mut good.written);
    let check = |c: &mut Raw| {
        for (key, value) in &written {
            assert_eq!(
                c.get(key).0,
                vec![value.clone()],
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    };
    check(&mut good.raw);
    drop(good);
    assert!(server.stop().success());
    let server = Server::start(dir.path(), &["--durability", "sync"]);
    check(&mut Raw::connect(server.addr));
}

/// A client whose acknowledged puts are kept, to be read back.
struct Witness {
    raw: Raw,
    written: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Witness {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.raw.put(key, value, b"");
        self.written.push((key.to_vec(), value.to_vec()));
    }
}

#[test]
fn an_unknown_opcode_gets_an_error_frame_and_the_connection_goes_on() {
    abuse_then_check(|addr, _| {
        let mut c = Raw::connect(addr);
        c.send_bytes(&frame(1, 0x33, 7, b""));
        let f = c.read_frame().unwrap();
        assert_eq!(error_code(&f), Some(ErrorCode::UnknownOpcode as u16));
        assert_eq!(common::header_of(&f).request_id, 7);
        assert!(c.ping(), "connection still usable after an unknown opcode");
        // a peer-range opcode from a client is unknown too
        c.send_bytes(&frame(1, opcode::PEER_FIRST, 8, b"x"));
        assert_eq!(
            error_code(&c.read_frame().unwrap()),
            Some(ErrorCode::UnknownOpcode as u16)
        );
        assert!(c.ping());
    });
}

#[test]
fn a_truncated_body_gets_bad_request_and_the_connection_goes_on() {
    abuse_then_check(|addr, _| {
        let mut c = Raw::connect(addr);
        // a GET whose key length runs past the frame
        c.send_bytes(&frame(1, opcode::GET, 9, &[0, 200, 0, b'k']));
        let f = c.read_frame().unwrap();
        assert_eq!(error_code(&f), Some(ErrorCode::BadRequest as u16));
        assert_eq!(common::header_of(&f).request_id, 9);
        assert!(c.ping());
    });
}

#[test]
fn an_unsupported_protocol_version_gets_an_error_frame() {
    abuse_then_check(|addr, _| {
        let mut c = Raw::connect(addr);
        // the frame is skipped and the connection goes on
        c.send_bytes(&frame(9, opcode::PING, 10, b""));
        assert_eq!(
            error_code(&c.read_frame().unwrap()),
            Some(ErrorCode::UnsupportedVersion as u16)
        );
        assert!(c.ping());
        // HELLO offering only versions the server does not speak
        c.send_bytes(&frame(1, opcode::HELLO, 11, &[2, 5]));
        assert_eq!(
            error_code(&c.read_frame().unwrap()),
            Some(ErrorCode::UnsupportedVersion as u16)
        );
        assert!(c.ping());
    });
}

#[test]
fn an_oversized_key_or_value_or_a_garbage_context_is_refused_and_writes_nothing() {
    abuse_then_check(|addr, _| {
        let mut c = Raw::connect(addr);
        let long_key = vec![b'k'; 5000];
        let (_, f) = c.call(Request::Get {
            r: 0,
            key: &long_key,
        });
        assert_eq!(error_code(&f), Some(ErrorCode::KeyTooLong as u16));
        // a value one byte over the 4 MiB limit, in a frame under the frame limit
        let big_value = vec![b'v'; (4 << 20) + 1];
        let (_, f) = c.call(Request::Put {
            w: 0,
            key: b"too-big",
            context: b"",
            value: &big_value,
        });
        assert_eq!(error_code(&f), Some(ErrorCode::ValueTooLarge as u16));
        assert_eq!(
            c.get(b"too-big").0,
            Vec::<Vec<u8>>::new(),
            "nothing written"
        );
        let (_, f) = c.call(Request::Put {
            w: 0,
            key: b"k",
            context: b"not a context",
            value: b"v",
        });
        assert_eq!(error_code(&f), Some(ErrorCode::BadContext as u16));
        assert_eq!(c.get(b"k").0, Vec::<Vec<u8>>::new(), "nothing written");
    });
}

#[test]
fn an_empty_key_gets_bad_request() {
    abuse_then_check(|addr, _| {
        let mut c = Raw::connect(addr);
        for request in [
            Request::Get { r: 0, key: b"" },
            Request::Put {
                w: 0,
                key: b"",
                context: b"",
                value: b"v",
            },
            Request::Delete {
                w: 0,
                key: b"",
                context: b"",
            },
        ] {
            let (_, f) = c.call(request);
            assert_eq!(error_code(&f), Some(ErrorCode::BadRequest as u16));
        }
        assert!(c.ping());
    });
}

#[test]
fn a_frame_length_over_the_limit_gets_an_error_frame_then_a_close() {
    abuse_then_check(|addr, _| {
        let mut big = Raw::connect(addr);
        let mut huge = frame(1, opcode::PUT, 12, b"");
        huge[0..4].copy_from_slice(&(1u32 << 30).to_le_bytes());
        big.send_bytes(&huge);
        assert_eq!(
            error_code(&big.read_frame().unwrap()),
            Some(ErrorCode::FrameTooLarge as u16)
        );
        assert!(
            big.read_frame().is_none(),
            "connection closed after an unframeable length"
        );
    });
}

#[test]
fn a_length_shorter_than_a_header_gets_an_error_frame_then_a_close() {
    abuse_then_check(|addr, _| {
        // the stream cannot be resynchronised
        let mut short = Raw::connect(addr);
        short.send_bytes(&[3, 0, 0, 0, 1, 2, 3, 4]);
        assert_eq!(
            error_code(&short.read_frame().unwrap()),
            Some(ErrorCode::BadRequest as u16)
        );
        assert!(short.read_frame().is_none());
    });
}

#[test]
fn garbage_bytes_get_an_error_frame_then_a_close() {
    abuse_then_check(|addr, good| {
        // the first four bytes read as a length (about 860 MB)
        let mut garbage = Raw::connect(addr);
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        garbage.send_bytes(&noise);
        good.put(b"between", b"3");
        let f = garbage.read_frame().expect("an ERROR frame");
        assert_eq!(error_code(&f), Some(ErrorCode::FrameTooLarge as u16));
        assert!(garbage.read_frame().is_none(), "then closed");
        assert_eq!(good.raw.get(b"between").0, vec![b"3".to_vec()]);
    });
}

#[test]
fn garbage_inside_well_framed_frames_gets_errors_and_the_connection_goes_on() {
    abuse_then_check(|addr, good| {
        // each frame gets an error frame with its request id
        let mut framed = Raw::connect(addr);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        };
        for (case, opcode, expected) in [
            (1u64, 0x3Fu8, ErrorCode::UnknownOpcode),
            (2, opcode::GET, ErrorCode::BadRequest),
            (3, opcode::PUT, ErrorCode::BadRequest),
        ] {
            let body: Vec<u8> = (0..48).map(|_| random()).collect();
            let mut f = frame(1, opcode, case, &body);
            // a GET or PUT body whose key's length prefix runs past the frame
            if opcode != 0x3F {
                f[16] = 0;
                f[17..19].copy_from_slice(&u16::MAX.to_le_bytes());
            }
            framed.send_bytes(&f);
            let reply = framed.read_frame().expect("an ERROR frame");
            assert_eq!(error_code(&reply), Some(expected as u16), "case {case}");
            assert_eq!(common::header_of(&reply).request_id, case);
            good.put(format!("during{case}").as_bytes(), b"4");
        }
        assert!(framed.ping(), "the connection goes on after bad requests");
    });
}

#[test]
fn half_a_frame_then_silence_is_closed_without_hurting_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_config(
        dir.path(),
        "slow_client_timeout_ms = 500\nidle_timeout_ms = 60000\n",
        &[],
    );
    let mut staller = Raw::connect(server.addr);
    let f = frame(1, opcode::PING, 1, b"");
    staller.send_bytes(&f[..7]);
    // others are served while it stalls
    let mut good = Raw::connect(server.addr);
    for i in 0..50u32 {
        good.put(format!("k{i}").as_bytes(), b"v", b"");
    }
    // the staller is disconnected once its frame is overdue (bounded wait)
    staller
        .stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut byte = [0u8; 1];
    match staller.stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("the server answered half a frame"),
        Err(e) => {
            common::closed_or_panic::<()>(e);
        }
    }
    assert!(good.ping());
    for i in 0..50u32 {
        assert_eq!(good.get(format!("k{i}").as_bytes()).0, vec![b"v".to_vec()]);
    }
    assert!(server.stop().success());
}

/// 10,000 connections opened at once against 2 shards of 4,096 connections each (the
/// default limit): every connection is either served or told `Unavailable` and closed,
/// the limit holds, and the server keeps serving and keeps what it acknowledged.
#[test]
fn ten_thousand_connections_at_once() {
    const CONNECTIONS: usize = 10_000;
    const PER_SHARD: usize = 4_096;
    let files = ringkv_engine::runtime::raise_nofile_limit(CONNECTIONS as u64 + 2_000);
    assert!(
        files >= CONNECTIONS as u64 + 1_000,
        "this test needs {} open files, the limit is {files}",
        CONNECTIONS + 1_000
    );
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let mut good = Raw::connect(server.addr);
    good.put(b"k", b"v", b"");
    let mut conns = Vec::new();
    let mut connect_errors = 0;
    for _ in 0..CONNECTIONS {
        match std::net::TcpStream::connect_timeout(&server.addr, Duration::from_secs(10)) {
            Ok(s) => conns.push(s),
            Err(_) => connect_errors += 1,
        }
    }
    // every connection: a PING, then its answer: PONG (served) or ERROR Unavailable with
    // request id 0 (over the limit), or a close without a frame (refused before the PING
    // could be answered)
    let (mut served, mut refused, mut closed) = (0usize, 0usize, 0usize);
    for conn in &mut conns {
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut raw = Raw::from_stream(conn.try_clone().unwrap());
        raw.try_send(Request::Ping);
        match raw.read_frame() {
            Some(f) => match ringkv_net::protocol::Reply::parse(&f)
                .expect("a valid frame")
                .1
            {
                ringkv_net::protocol::Reply::Pong => served += 1,
                ringkv_net::protocol::Reply::Error { code, .. } => {
                    assert_eq!(code, ErrorCode::Unavailable as u16);
                    assert_eq!(common::header_of(&f).request_id, 0);
                    refused += 1;
                }
                other => panic!("unexpected reply {other:?}"),
            },
            None => closed += 1,
        }
    }
    println!(
        "{CONNECTIONS} connection attempts: {} open ({served} served, {refused} refused \
         with an error, {closed} closed), {connect_errors} failed to connect",
        conns.len()
    );
    assert!(
        connect_errors <= CONNECTIONS / 100,
        "{connect_errors} connects failed"
    );
    assert_eq!(served + refused + closed, conns.len());
    assert!(served <= 2 * PER_SHARD, "{served} served over the limit");
    assert!(
        served >= PER_SHARD,
        "at least one shard's worth is served: {served}"
    );
    assert!(refused + closed >= conns.len() - 2 * PER_SHARD);
    assert!(server.is_running());
    // the server still answers, on an old connection and a new one, and takes
    // durable writes while every connection is open
    assert!(good.ping());
    assert_eq!(good.get(b"k").0, vec![b"v".to_vec()]);
    for i in 0..200u32 {
        good.put(format!("flood{i}").as_bytes(), b"kept", b"");
    }
    drop(conns);
    // a new connection is served once the shards have seen the old ones close (bounded)
    let (fresh, late_refusals) = common::connect_until_served(server.addr, 200);
    let served_again = fresh.is_some();
    assert!(
        served_again,
        "a new connection is served after the others closed"
    );
    assert!(server.stop().success());
    let (_, _, _, refused_by_node) = server.stopped_counts().expect("a stop line");
    assert_eq!(refused_by_node as usize, refused + closed + late_refusals);
    // what it acknowledged is there after a restart
    let mut server = Server::start(dir.path(), &[]);
    let mut c = Raw::connect(server.addr);
    assert_eq!(c.get(b"k").0, vec![b"v".to_vec()]);
    for i in 0..200u32 {
        assert_eq!(
            c.get(format!("flood{i}").as_bytes()).0,
            vec![b"kept".to_vec()]
        );
    }
    assert!(server.stop().success());
}

/// Requests within the announced count but carrying more bytes than the server keeps
/// running per connection (4 frame limits: here 80 puts of 1 MiB against a 4 MiB frame
/// limit; on the shared port half of them cross to the other shard, as tasks) wait in
/// the socket instead of failing.
#[test]
fn many_large_pipelined_puts_wait_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    let mut c = Raw::connect(server.addr);
    c.stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let value = vec![b'x'; 1 << 20];
    const PUTS: u64 = 80;
    // written from another thread while this one reads, so neither side's buffers fill
    let mut writer = c.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..PUTS {
            let key = format!("big{i}");
            let mut frame = Vec::new();
            common::encode_blind_put(i + 1, key.as_bytes(), &value, &mut frame);
            std::io::Write::write_all(&mut writer, &frame).unwrap();
        }
    });
    for _ in 0..PUTS {
        let f = c.read_frame().expect("a reply for every put");
        assert_eq!(
            error_code(&f),
            None,
            "put {} refused",
            common::header_of(&f).request_id
        );
    }
    sender.join().unwrap();
    for i in (0..PUTS).step_by(7) {
        let (values, _) = c.get(format!("big{i}").as_bytes());
        assert_eq!(values.len(), 1);
        assert_eq!(values[0].len(), 1 << 20);
    }
    assert!(server.stop().success());
}

/// The per-connection in-flight limit and the per-shard connection limit, set low in
/// the config file: a request over the first gets `TooManyInFlight` and is not run; a
/// connection over the second gets `Unavailable` and is closed; the idle timeout closes
/// a silent connection while a busy one stays.
#[test]
fn configured_limits_are_enforced_with_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_config(
        dir.path(),
        "in_flight_per_connection_max = 1\nconnections_per_shard_max = 3\nidle_timeout_ms = 60000\n",
        &["--shards", "1", "--durability", "sync"],
    );
    // 20 puts in one write: the first waits for its group commit while the others are
    // read in the same step, so those over the limit of 1 are refused
    let mut c = Raw::connect(server.addr);
    let mut batch = Vec::new();
    for i in 0..20u64 {
        common::encode_blind_put(i + 1, format!("f{i}").as_bytes(), b"v", &mut batch);
    }
    c.send_bytes(&batch);
    let (mut done, mut refused) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let f = c.read_frame().expect("a reply for every request");
        let id = common::header_of(&f).request_id - 1;
        match error_code(&f) {
            None => done.push(id),
            Some(code) if code == ErrorCode::TooManyInFlight as u16 => refused.push(id),
            Some(code) => panic!("error code {code}"),
        }
    }
    assert!(
        !done.is_empty() && !refused.is_empty(),
        "{done:?} {refused:?}"
    );
    for i in done {
        assert_eq!(c.get(format!("f{i}").as_bytes()).0, vec![b"v".to_vec()]);
    }
    for i in refused {
        assert!(
            c.get(format!("f{i}").as_bytes()).0.is_empty(),
            "f{i} not run"
        );
    }
    // connections: `c` and two more are served, a fourth is refused and closed
    let mut second = Raw::connect(server.addr);
    let mut third = Raw::connect(server.addr);
    assert!(second.ping() && third.ping());
    let mut fourth = Raw::connect(server.addr);
    let f = fourth.read_frame().expect("an error frame");
    assert_eq!(error_code(&f), Some(ErrorCode::Unavailable as u16));
    assert_eq!(common::header_of(&f).request_id, 0);
    assert!(fourth.read_frame().is_none(), "then closed");
    // once one closes, a new connection is served
    drop(third);
    let (fifth, _) = common::connect_until_served(server.addr, 100);
    assert!(fifth.is_some(), "a freed connection slot is reused");
    assert!(c.ping() && second.ping());
    drop((c, second, fifth));
    assert!(server.stop().success());

    // the idle timeout
    let mut server = Server::start_with_config(dir.path(), "idle_timeout_ms = 300\n", &[]);
    let mut idle = Raw::connect(server.addr);
    let mut busy = Raw::connect(server.addr);
    for _ in 0..20 {
        assert!(busy.ping(), "a busy connection stays open");
        std::thread::sleep(Duration::from_millis(50));
    }
    idle.stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut byte = [0u8; 1];
    match idle.stream.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the idle connection was not closed: {other:?}"),
    }
    assert!(busy.ping());
    assert!(server.stop().success());
}

/// Review finding: blind puts could grow a key's siblings without bound until a GET
/// reply overflowed; the server now refuses past `siblings_max`, and a put with the
/// context still resolves them.
#[test]
fn siblings_past_the_limit_are_refused_and_resolvable() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_config(dir.path(), "siblings_max = 5\n", &[]);
    let mut c = Raw::connect(server.addr);
    for i in 0..5 {
        c.put(b"hot", format!("v{i}").as_bytes(), b"");
    }
    let (_, f) = c.call(Request::Put {
        w: 0,
        key: b"hot",
        context: b"",
        value: b"one-too-many",
    });
    assert_eq!(error_code(&f), Some(ErrorCode::TooManySiblings as u16));
    let (values, ctx) = c.get(b"hot");
    assert_eq!(values.len(), 5);
    c.put(b"hot", b"resolved", &ctx);
    assert_eq!(c.get(b"hot").0, vec![b"resolved".to_vec()]);
    assert!(server.stop().success());
}

/// Review finding: a client that pipelines requests with big replies and never reads
/// them made the server buffer replies without bound. Now the reader pauses at the
/// output budget and the connection is dropped after the slow-client timeout, while
/// other clients are served.
#[test]
fn a_client_that_never_reads_its_replies_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_config(dir.path(), "slow_client_timeout_ms = 1000\n", &[]);
    let mut good = Raw::connect(server.addr);
    let big = vec![b'x'; 1 << 20];
    good.put(b"big", &big, b"");
    let mut hog = Raw::connect(server.addr);
    hog.stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // 2,000 GETs of a 1 MiB value = 2 GiB of replies; never read any
    for id in 0..2000u64 {
        let mut out = Vec::new();
        Request::Get { r: 0, key: b"big" }.encode(id, &mut out);
        if std::io::Write::write_all(&mut hog.stream, &out).is_err() {
            break;
        }
    }
    // the server stays responsive for others meanwhile
    for i in 0..20u32 {
        good.put(format!("k{i}").as_bytes(), b"v", b"");
    }
    assert!(server.is_running());
    // and eventually closes the hog (its writes fail or the socket reaches EOF)
    std::thread::sleep(Duration::from_millis(2500));
    // what is left in the sockets' buffers, then the close (a read that times out
    // means the connection was left open: a failure)
    hog.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut drained = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let closed = (0..20_000).any(|_| match hog.stream.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => {
            drained += n;
            false
        }
        Err(e) => common::closed_or_panic::<()>(e).is_none(),
    });
    assert!(closed, "the hog's connection was closed");
    // the output budget (twice the frame limit, about 8 MiB) and the two sockets'
    // buffers, not 2 GiB
    assert!(
        drained < 64 << 20,
        "the server did not buffer the hog's replies: {drained} bytes"
    );
    assert!(good.ping());
    assert!(server.stop().success());
}

/// The peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_resident_bytes(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

/// How much the node's peak resident memory grows while one connection to `addr` has
/// 300 gets of `key` sent and reads none of their replies (given time to run; bounded
/// wait). The connection closes on return.
fn growth_from_unread_gets(server: &Server, addr: std::net::SocketAddr, key: &[u8]) -> usize {
    let before = peak_resident_bytes(server.child.id());
    let mut hog = Raw::connect(addr);
    let mut gets = Vec::new();
    for id in 0..300u64 {
        Request::Get { r: 0, key }.encode(id, &mut gets);
    }
    std::io::Write::write_all(&mut hog.stream, &gets).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    peak_resident_bytes(server.child.id()).saturating_sub(before)
}

/// Gets of a value too big for the record cache run as tasks. Each was charged 64 KiB
/// of reply before it ran, so about 130 started at once and one connection that sent
/// 300 gets of a 4 MiB value, reading nothing, made the node hold over half a GB. A get
/// of a key on the shard is now charged what the keydir says its records hold.
#[test]
fn pipelined_gets_of_a_big_value_hold_a_bounded_amount_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--shards", "1", "--durability", "none"]);
    let mut c = Raw::connect(server.addr);
    c.put(b"big", &vec![b'x'; 4 << 20], b"");
    let grown = growth_from_unread_gets(&server, server.addr, b"big");
    assert!(
        grown < 160 << 20,
        "one connection's unread gets grew the node by {} MiB",
        grown >> 20
    );
    assert!(c.ping());
    assert!(server.stop().success());
}

/// The same for gets another shard answers: read on shard 0's own port, a key of shard
/// 1 is forwarded, and shard 0 cannot size its replies. At 64 KiB each, about 130 gets
/// of a 4 MiB value started at once; they are now charged a sixteenth of the
/// connection's output budget each.
#[test]
fn pipelined_forwarded_gets_of_a_big_value_hold_a_bounded_amount_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_shard_ports(dir.path(), 2, &["--durability", "none"]);
    // partition p is on shard p mod 2
    let key = (0..)
        .map(|i| format!("big{i}"))
        .find(|k| ringkv_ring::partition_for_key(k.as_bytes(), 64) % 2 == 1)
        .unwrap();
    let mut c = Raw::connect(server.addr);
    c.put(key.as_bytes(), &vec![b'x'; 4 << 20], b"");
    let shard_0 = ringkv_net::client::Client::connect(
        server.addr,
        ringkv_net::client::ClientConfig::default(),
    )
    .unwrap()
    .hello()
    .shard_port_base;
    let shard_0 = std::net::SocketAddr::from(([127, 0, 0, 1], shard_0));
    let grown = growth_from_unread_gets(&server, shard_0, key.as_bytes());
    println!("the node grew by {} MiB", grown >> 20);
    assert!(
        grown < 200 << 20,
        "one connection's unread gets grew the node by {} MiB",
        grown >> 20
    );
    assert!(c.ping());
    assert!(server.stop().success());
}

/// A client that reads its replies steadily, if slowly, is not cut off: the slow-client
/// timeout bounds each MiB of replies taken, not a whole batch. With a 16 MiB frame
/// limit the server lets up to 32 MiB of replies wait for a client; read at 5 MiB/s,
/// they used to have to go out as one batch within the 2 s timeout.
#[test]
fn a_client_that_reads_slowly_but_steadily_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_config(
        dir.path(),
        "slow_client_timeout_ms = 2000\nframe_bytes_max = 16777216\n",
        &[],
    );
    let mut c = Raw::connect(server.addr);
    let big = vec![b'x'; 1 << 20];
    c.put(b"big", &big, b"");
    const GETS: u64 = 30;
    let mut out = Vec::new();
    for id in 0..GETS {
        Request::Get { r: 0, key: b"big" }.encode(1_000 + id, &mut out);
    }
    c.send_bytes(&out);
    // the replies pile up on the server while nothing is read
    std::thread::sleep(Duration::from_millis(500));
    // then one reply (1 MiB) every 200 ms
    for i in 0..GETS {
        let frame = c
            .read_frame()
            .unwrap_or_else(|| panic!("cut off after {i} replies"));
        assert!(frame.len() > 1 << 20, "reply {i} is the value");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.ping());
    assert!(server.stop().success());
}

#[test]
fn bad_cluster_messages_get_errors_and_the_server_keeps_serving() {
    use ringkv_net::peer::{opcode as peer_op, ClusterRequest, WireVersion};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut good = Raw::connect(server.addr);
    good.put(b"kept", b"1", b"");
    let mut c = Raw::connect(server.addr);
    let expect_error = |c: &mut Raw, bytes: Vec<u8>, code: ErrorCode, what: &str| {
        c.send_bytes(&bytes);
        let f = c.read_frame().expect("a reply");
        assert_eq!(error_code(&f), Some(code as u16), "{what}");
    };
    // a partition the node does not have
    let mut f = Vec::new();
    ClusterRequest::KeyCount { partition: 9_999 }.encode(1, &mut f);
    expect_error(
        &mut c,
        f,
        ErrorCode::BadRequest,
        "key count of a partition out of range",
    );
    // a replica put whose version blob is garbage
    let mut f = Vec::new();
    ClusterRequest::ReplicaPut {
        partition: 0,
        hint_for: 0,
        key: b"k",
        version: WireVersion {
            version: b"not a version",
            value: Some(b"v"),
        },
    }
    .encode(2, &mut f);
    expect_error(&mut c, f, ErrorCode::BadRequest, "undecodable version");
    // a gossip message that is not one
    let mut f = Vec::new();
    ClusterRequest::Gossip {
        from: 5,
        message: b"\xff\xff garbage",
    }
    .encode(3, &mut f);
    expect_error(&mut c, f, ErrorCode::BadRequest, "garbage gossip");
    // a replica get cut short inside its key
    expect_error(
        &mut c,
        frame(1, peer_op::REPLICA_GET, 4, &[0, 0, 0, 0, 9, 0, b'k']),
        ErrorCode::BadRequest,
        "truncated replica get",
    );
    // a join through a seed given by name: the node looks no names up
    let mut f = Vec::new();
    ClusterRequest::Join {
        seed: b"localhost:7379",
    }
    .encode(6, &mut f);
    expect_error(&mut c, f, ErrorCode::BadRequest, "a seed that is a name");
    // a join request from a node of another cluster size is refused with a reason
    let mut f = Vec::new();
    ClusterRequest::JoinRequest {
        id: 0,
        shards: 1,
        weight: 1,
        addr: b"",
        zone: b"",
    }
    .encode(5, &mut f);
    c.send_bytes(&f);
    let reply = c.read_frame().expect("a reply");
    assert!(error_code(&reply).is_some(), "an invalid join is refused");
    assert!(c.ping(), "the connection is still usable");
    assert_eq!(good.get(b"kept").0, vec![b"1".to_vec()]);
}

/// A join request that claims the node's own id from another address, or names an
/// address that is not IP:port, is refused and changes nothing. Before, the first
/// rewrote the node's own address in its membership (found by sending mutated peer
/// frames at a node: its ring ended up naming it at the fuzzer's address).
#[test]
fn a_join_request_for_this_nodes_id_or_a_bad_address_changes_nothing() {
    use ringkv_net::peer::ClusterRequest;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--node-id", "7"]);
    let mut c = Raw::connect(server.addr);
    let own = server.addr.to_string();
    let refused = |c: &mut Raw, id: u64, addr: &[u8], says: &str| {
        let reply = c.join_request(id, addr);
        assert_eq!(
            error_code(&reply),
            Some(ErrorCode::BadRequest as u16),
            "{says}"
        );
        let text = String::from_utf8_lossy(&reply);
        assert!(text.contains(says), "{text}");
    };
    refused(&mut c, 7, b"127.0.0.9:1", "is this node's own");
    refused(&mut c, 0, b"127.0.0.9:1", "node ids start at 1");
    refused(&mut c, 8, b"not an address", "must be IP:port");
    refused(&mut c, 8, b"", "must be IP:port");
    // the node still names itself at its own address, alone
    let mut f = Vec::new();
    ClusterRequest::Status.encode(10, &mut f);
    c.send_bytes(&f);
    let status = String::from_utf8_lossy(&c.read_frame().expect("a reply")).to_string();
    assert!(status.contains(&format!("\"addr\":\"{own}\"")), "{status}");
    assert!(!status.contains("127.0.0.9"), "{status}");
    assert_eq!(status.matches("\"id\":").count(), 1, "{status}");
    // the same id at the node's own address is the node itself: its membership
    let reply = c.join_request(7, own.as_bytes());
    assert_eq!(
        error_code(&reply),
        None,
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert!(c.ping());
    assert!(server.stop().success());
}

/// Limits that make no sense are refused at start with the key's name, before the node
/// touches its data directory; before, `segment_bytes_max = 100` passed the checks and
/// panicked a shard thread when it opened its partitions.
#[test]
fn nonsense_limits_are_refused_at_start_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, says) in [
        (
            "segment_bytes_max = 100",
            "segment_bytes_max must be 4096..4294967295",
        ),
        (
            "segment_bytes_max = 5000000000",
            "segment_bytes_max must be 4096..4294967295",
        ),
        (
            "commit_log_bytes_max = 10",
            "commit_log_bytes_max must be 1048576..=1073741824",
        ),
        (
            "commit_log_bytes_max = 10000000000000",
            "commit_log_bytes_max must be 1048576..=1073741824",
        ),
        (
            "frame_bytes_max = 4294967296",
            "frame_bytes_max must be at most 4294967295",
        ),
        ("weight = 0", "weight must be 1..=1000000"),
        ("idle_timeout_ms = 0", "idle_timeout_ms must be at least 10"),
        (
            "slow_client_timeout_ms = 0",
            "slow_client_timeout_ms must be at least 10",
        ),
        ("siblings_max = 0", "siblings_max must be at least 1"),
        (
            "in_flight_per_connection_max = 0",
            "in_flight_per_connection_max must be at least 1",
        ),
        (
            "connections_per_shard_max = 0",
            "connections_per_shard_max must be at least 1",
        ),
        (
            "value_bytes_max = 0",
            "value_bytes_max must be 1..=67108864",
        ),
        // past a record's value limit: every put of such a value failed with a
        // self-contradictory message
        (
            "value_bytes_max = 70000000\nframe_bytes_max = 80000000",
            "value_bytes_max must be 1..=67108864",
        ),
        // its hint's key would be over a record's key limit
        ("key_bytes_max = 65535", "key_bytes_max must be 1..=65523"),
        // every replica call timed out at once
        (
            "request_timeout_ms = 0",
            "request_timeout_ms must be at least 10",
        ),
        // was quietly made 1 ms
        (
            "gossip_period_ms = 0",
            "gossip_period_ms must be at least 10",
        ),
        // HELLO_OK announced it cut to 32 bits (here: 0)
        (
            "in_flight_per_connection_max = 4294967296",
            "in_flight_per_connection_max must be at most 4294967295",
        ),
    ] {
        let config = dir.path().join("ringkv.toml");
        std::fs::write(&config, toml).unwrap();
        let data = dir.path().join("data");
        let stderr = common::server_fails(&data, &["--config".as_ref(), config.as_os_str()]);
        assert!(stderr.contains(says), "{toml}: {stderr}");
        assert!(!stderr.contains("panicked"), "{toml}: {stderr}");
        assert!(
            !data.exists(),
            "{toml}: the refused node made its data directory"
        );
    }
}

/// Siblings too large for one frame: a peer's REPLICA_GET of them gets `FrameTooLarge`
/// (as a client's GET does), not a reply frame over the limit, which would make the
/// asking node drop its whole link to this one. And a peer request naming a partition
/// that is not its key's is refused.
#[test]
fn a_replica_get_over_the_frame_limit_is_refused_not_sent() {
    use ringkv_net::peer::{ClusterReply, ClusterRequest};
    let dir = tempfile::tempdir().unwrap();
    let toml = "value_bytes_max = 65536\nframe_bytes_max = 80000\n";
    // one shard: the partition is on the shard the connection lands on
    let server = Server::start_with_config(dir.path(), toml, &["--shards", "1"]);
    let mut c = Raw::connect(server.addr);
    let value = vec![b'x'; 60_000];
    // two puts without a context: two siblings, 120 KB together
    c.put(b"big", &value, b"");
    c.put(b"big", &value, b"");
    let (_, frame) = c.call(Request::Get { r: 0, key: b"big" });
    assert_eq!(
        error_code(&frame),
        Some(ErrorCode::FrameTooLarge as u16),
        "a client's get of them"
    );
    let partition = ringkv_ring::hash::partition_for_key(b"big", 64);
    let mut f = Vec::new();
    ClusterRequest::ReplicaGet {
        partition,
        key: b"big",
    }
    .encode(7, &mut f);
    c.send_bytes(&f);
    let reply = c.read_frame().expect("a reply");
    assert!(
        reply.len() <= 80_000,
        "a {}-byte reply over the 80,000-byte frame limit",
        reply.len()
    );
    assert_eq!(error_code(&reply), Some(ErrorCode::FrameTooLarge as u16));
    // a key that fits is still served to peers
    c.put(b"small", b"v", b"");
    let mut f = Vec::new();
    ClusterRequest::ReplicaGet {
        partition: ringkv_ring::hash::partition_for_key(b"small", 64),
        key: b"small",
    }
    .encode(8, &mut f);
    c.send_bytes(&f);
    let reply = c.read_frame().expect("a reply");
    let blob = match ClusterReply::parse(&reply) {
        Ok((_, ClusterReply::ReplicaGetOk(versions))) => {
            assert_eq!(versions.len(), 1);
            versions[0].version.to_vec()
        }
        other => panic!("replica get of a small key: {other:?}"),
    };
    // a peer request that names a partition other than its key's is refused: the
    // version would be stored where no read of the key looks
    let elsewhere = (ringkv_ring::hash::partition_for_key(b"moved", 64) + 1) % 64;
    let mut f = Vec::new();
    ClusterRequest::ReplicaPut {
        partition: elsewhere,
        hint_for: 0,
        key: b"moved",
        version: ringkv_net::peer::WireVersion {
            version: &blob,
            value: Some(b"v"),
        },
    }
    .encode(9, &mut f);
    c.send_bytes(&f);
    let reply = c.read_frame().expect("a reply");
    assert_eq!(error_code(&reply), Some(ErrorCode::BadRequest as u16));
    let mut f = Vec::new();
    ClusterRequest::ReplicaGet {
        partition: elsewhere,
        key: b"moved",
    }
    .encode(10, &mut f);
    c.send_bytes(&f);
    let reply = c.read_frame().expect("a reply");
    assert_eq!(error_code(&reply), Some(ErrorCode::BadRequest as u16));
    let mut f = Vec::new();
    ClusterRequest::KeyCount {
        partition: elsewhere,
    }
    .encode(11, &mut f);
    c.send_bytes(&f);
    match ClusterReply::parse(&c.read_frame().expect("a reply")) {
        Ok((_, ClusterReply::KeyCountOk(keys))) => assert_eq!(keys, 0, "nothing stored there"),
        other => panic!("key count: {other:?}"),
    }
    // a copy with a hint for a node that is not a member is refused, and stores
    // neither the version nor the hint (which no delivery would ever take away)
    for (id, hint_for) in [(12u64, 999_999u64), (13, 1_000_000)] {
        let mut f = Vec::new();
        ClusterRequest::ReplicaPut {
            partition: ringkv_ring::hash::partition_for_key(b"hinted", 64),
            hint_for,
            key: b"hinted",
            version: ringkv_net::peer::WireVersion {
                version: &blob,
                value: Some(b"v"),
            },
        }
        .encode(id, &mut f);
        c.send_bytes(&f);
        let reply = c.read_frame().expect("a reply");
        assert_eq!(error_code(&reply), Some(ErrorCode::BadRequest as u16));
    }
    assert!(c.get(b"hinted").0.is_empty());
}

/// The node's STATS counters (`ringkv stats --json`), from `addr`.
fn node_counters(addr: std::net::SocketAddr) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(["stats", "--addr", &addr.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    stats["counters"].clone()
}

/// The node's connections waited for its connection memory budget at least once.
fn assert_connections_waited_for_the_budget(addr: std::net::SocketAddr) {
    let waits = node_counters(addr)["connection_budget_waits"]
        .as_u64()
        .unwrap();
    assert!(waits > 0, "no connection waited for the budget");
}

/// Polls (bounded: 200 tries, 50 ms apart) until the node's `connection_bytes` is
/// back to what the STATS request asking for it is charged itself while it runs (its
/// frame and a 64 KiB reply estimate), with nothing else held.
fn connection_bytes_return_to_zero(addr: std::net::SocketAddr) {
    let mut last = serde_json::Value::Null;
    for _ in 0..200 {
        last = node_counters(addr);
        if last["connection_bytes"].as_u64().unwrap() <= 64 * 1024 + 64 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("connection bytes never went back to 0: {last}");
}

/// A budget of 16 MiB for the shard's connections: 40 connections that each send
/// 3 MiB of a 4 MiB put and then stall would make the node hold 120 MiB without it.
/// With it, a frame takes its room whole before more of it is read, the rest wait
/// holding a chunk, and the stalled frames are dropped at the slow-client timeout;
/// another client is served all along, and the budget is all given back.
#[test]
fn big_frames_from_many_stalled_connections_hold_the_shards_budget() {
    const BUDGET: usize = 16 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_config(
        dir.path(),
        &format!("connection_bytes_per_shard_max = {BUDGET}\nslow_client_timeout_ms = 3000\n"),
        &["--shards", "1", "--durability", "none"],
    );
    let before = peak_resident_bytes(server.child.id());
    let value = vec![b'v'; 4 << 20];
    let mut put = Vec::new();
    common::encode_blind_put(1, b"big", &value, &mut put);
    let mut stallers = Vec::new();
    for _ in 0..40 {
        let mut s = Raw::connect(server.addr);
        s.stream.set_nonblocking(true).unwrap();
        // as much of the first 3 MiB as the sockets take (bounded: no retry loop)
        let _ = std::io::Write::write(&mut s.stream, &put[..3 << 20]);
        stallers.push(s);
    }
    std::thread::sleep(Duration::from_millis(1000));
    let mut good = Raw::connect(server.addr);
    assert!(good.ping());
    good.put(b"small", b"1", b"");
    let grown = peak_resident_bytes(server.child.id()).saturating_sub(before);
    eprintln!("the node grew by {} MiB", grown >> 20);
    assert!(
        grown < 3 * BUDGET,
        "40 stalled big frames grew the node by {} MiB",
        grown >> 20
    );
    assert_connections_waited_for_the_budget(server.addr);
    drop(stallers);
    connection_bytes_return_to_zero(server.addr);
    // the budget is free again: a whole big put goes through
    good.put(b"big", &value, b"");
    assert_eq!(good.get(b"big").0, vec![value]);
    assert!(server.stop().success());
}

/// A one-shard node (durability `none`) whose connections may hold `budget` bytes,
/// with a 1 MiB value under the key `big` put by the client returned.
fn node_with_budget_and_a_big_value(budget: usize) -> (tempfile::TempDir, Server, Raw, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(
        dir.path(),
        &format!("connection_bytes_per_shard_max = {budget}\n"),
        &["--shards", "1", "--durability", "none"],
    );
    let mut good = Raw::connect(server.addr);
    let value = vec![b'x'; 1 << 20];
    good.put(b"big", &value, b"");
    (dir, server, good, value)
}

/// A peer's REPLICA_GET of `key` in its partition (of the default 64).
fn replica_get_frame(request_id: u64, key: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    ringkv_net::peer::ClusterRequest::ReplicaGet {
        partition: ringkv_ring::hash::partition_for_key(key, 64),
        key,
    }
    .encode(request_id, &mut frame);
    frame
}

/// `count` connections that each send 40 gets of the key `big` and read no reply.
fn unread_big_gets(addr: std::net::SocketAddr, count: usize) -> Vec<Raw> {
    let mut gets = Vec::new();
    for id in 0..40u64 {
        Request::Get { r: 0, key: b"big" }.encode(id, &mut gets);
    }
    (0..count)
        .map(|_| {
            let mut hog = Raw::connect(addr);
            std::io::Write::write_all(&mut hog.stream, &gets).unwrap();
            hog
        })
        .collect()
}

/// 30 connections that each send 40 gets of a 1 MiB value and read none of the replies
/// could make the node hold about 8 MiB each (the per-connection output budget), 240
/// MiB in all; with a budget of 16 MiB for the shard's connections they stop taking
/// requests once the replies waiting reach it. Another client is still served, and
/// the budget comes back once the hogs are gone. Meanwhile a client that reads its
/// replies still has its pings, small puts and cached gets answered, and a peer its
/// replica reads.
#[test]
fn unread_replies_across_many_connections_hold_the_shards_budget() {
    const BUDGET: usize = 16 << 20;
    let (_dir, mut server, mut good, value) = node_with_budget_and_a_big_value(BUDGET);
    let before = peak_resident_bytes(server.child.id());
    let hogs = unread_big_gets(server.addr, 30);
    std::thread::sleep(Duration::from_millis(1500));
    // served while the hogs hold the budget: requests with small replies
    assert!(good.ping());
    good.put(b"small", b"1", b"");
    assert_eq!(good.get(b"small").0, vec![b"1".to_vec()]);
    // and a peer's pipelined replica reads (cluster requests never wait for the
    // budget: two nodes over theirs must not stall each other), well before the
    // 10 s slow-client timeout frees the budget
    let mut peer = Raw::connect(server.addr);
    peer.stream
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    let mut frames = Vec::new();
    for id in 1..=4u64 {
        frames.extend_from_slice(&replica_get_frame(id, b"big"));
    }
    peer.send_bytes(&frames);
    for _ in 0..4 {
        let reply = peer.read_frame().expect("a replica get's reply");
        match ringkv_net::peer::ClusterReply::parse(&reply) {
            Ok((_, ringkv_net::peer::ClusterReply::ReplicaGetOk(versions))) => {
                assert_eq!(versions.len(), 1);
                assert_eq!(versions[0].value, Some(&value[..]));
            }
            other => panic!("a replica get over the budget: {other:?}"),
        }
    }
    let grown = peak_resident_bytes(server.child.id()).saturating_sub(before);
    eprintln!("the node grew by {} MiB", grown >> 20);
    assert!(
        grown < 4 * BUDGET,
        "30 connections' unread gets grew the node by {} MiB",
        grown >> 20
    );
    assert_connections_waited_for_the_budget(server.addr);
    drop(hogs);
    connection_bytes_return_to_zero(server.addr);
    assert!(good.ping());
    assert_eq!(good.get(b"big").0, vec![value]);
    assert!(server.stop().success());
}

/// While connections that do not read their replies hold the whole budget, big puts
/// from other clients still go through one frame's room at a time (the end of each
/// frame wakes the connections waiting for room), well before the slow-client timeout
/// (10 s) cuts the hogs off and frees the budget.
#[test]
fn big_puts_go_through_while_unread_replies_hold_the_budget() {
    const BUDGET: usize = 8 << 20;
    let (_dir, mut server, mut good, _) = node_with_budget_and_a_big_value(BUDGET);
    let hogs = unread_big_gets(server.addr, 20);
    std::thread::sleep(Duration::from_millis(1000));
    let held = node_counters(server.addr)["connection_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        held > BUDGET as u64,
        "the hogs hold {held} bytes, not past the budget"
    );
    let addr = server.addr;
    let putters: Vec<_> = (0..8u8)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Raw::connect(addr);
                c.stream
                    .set_read_timeout(Some(Duration::from_secs(6)))
                    .unwrap();
                c.put(&[b'k', i], &vec![i; 2 << 20], b"");
            })
        })
        .collect();
    for putter in putters {
        putter.join().expect("a big put while the budget is held");
    }
    assert_connections_waited_for_the_budget(server.addr);
    drop(hogs);
    connection_bytes_return_to_zero(server.addr);
    for i in 0..8u8 {
        assert_eq!(good.get(&[b'k', i]).0, vec![vec![i; 2 << 20]]);
    }
    assert!(server.stop().success());
}

/// A peer's big replica copy takes its frame's room at once, even while unread replies
/// hold the budget and a stalled client holds room for a big frame (a client's frame
/// would wait until the 10 s slow-client timeout cut the staller off).
#[test]
fn a_peers_big_copy_does_not_wait_for_the_budget() {
    use ringkv_net::peer::{ClusterReply, ClusterRequest, WireVersion};
    const BUDGET: usize = 8 << 20;
    let (_dir, mut server, mut good, value) = node_with_budget_and_a_big_value(BUDGET);
    let partition = ringkv_ring::hash::partition_for_key(b"big", 64);
    // the version a peer would copy: the node's own
    good.send_bytes(&replica_get_frame(1, b"big"));
    let version = match ClusterReply::parse(&good.read_frame().expect("a reply")) {
        Ok((_, ClusterReply::ReplicaGetOk(versions))) => versions[0].version.to_vec(),
        other => panic!("replica get: {other:?}"),
    };
    let hogs = unread_big_gets(server.addr, 20);
    let mut put = Vec::new();
    common::encode_blind_put(1, b"stalled", &vec![b's'; 3 << 20], &mut put);
    let mut staller = Raw::connect(server.addr);
    staller.send_bytes(&put[..1 << 20]);
    std::thread::sleep(Duration::from_millis(1000));
    let mut peer = Raw::connect(server.addr);
    peer.stream
        .set_read_timeout(Some(Duration::from_secs(4)))
        .unwrap();
    let mut f = Vec::new();
    ClusterRequest::ReplicaPut {
        partition,
        hint_for: 0,
        key: b"big",
        version: WireVersion {
            version: &version,
            value: Some(&value),
        },
    }
    .encode(2, &mut f);
    peer.send_bytes(&f);
    match ClusterReply::parse(&peer.read_frame().expect("the copy's reply")) {
        Ok((_, ClusterReply::ReplicaPutOk { .. })) => {}
        other => panic!("a replica copy while the budget is held: {other:?}"),
    }
    assert_connections_waited_for_the_budget(server.addr);
    drop((hogs, staller));
    connection_bytes_return_to_zero(server.addr);
    assert!(server.stop().success());
}

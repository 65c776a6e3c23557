//! Bad input against a real `ringkv server` process: each case gets an error frame or
//! a closed connection, never a crash, and every other client keeps being served
//! without losing an acknowledged write.

mod common;

use common::{error_code, Raw, Server};
use ringkv_net::protocol::{opcode, ErrorCode, Request, HEADER_BYTES};
use std::io::Read;
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

#[test]
fn bad_input_gets_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--durability", "sync"]);
    // a well-behaved client writes before, during and after the abuse
    let mut good = Raw::connect(server.addr);
    good.put(b"before", b"1", b"");

    // unknown opcode: error frame, connection stays usable
    let mut c = Raw::connect(server.addr);
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

    // truncated body (a GET whose key length runs past the frame): error, usable
    c.send_bytes(&frame(1, opcode::GET, 9, &[0, 200, 0, b'k']));
    assert_eq!(
        error_code(&c.read_frame().unwrap()),
        Some(ErrorCode::BadRequest as u16)
    );
    assert!(c.ping());

    // unsupported protocol version: error frame, the frame is skipped, usable
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

    // oversized key and value: errors with the limit in the message
    let long_key = vec![b'k'; 5000];
    let (_, f) = c.call(Request::Get {
        r: 0,
        key: &long_key,
    });
    assert_eq!(error_code(&f), Some(ErrorCode::KeyTooLong as u16));
    // a garbage context
    let (_, f) = c.call(Request::Put {
        w: 0,
        key: b"k",
        context: b"not a context",
        value: b"v",
    });
    assert_eq!(error_code(&f), Some(ErrorCode::BadContext as u16));

    // a frame length larger than the limit: error frame, then the connection closes
    let mut big = Raw::connect(server.addr);
    big.send_bytes(&frame(1, opcode::PING, 12, b"")[..0]);
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

    // a length shorter than a header: the stream cannot be resynchronised
    let mut short = Raw::connect(server.addr);
    short.send_bytes(&[3, 0, 0, 0, 1, 2, 3, 4]);
    assert_eq!(
        error_code(&short.read_frame().unwrap()),
        Some(ErrorCode::BadRequest as u16)
    );
    assert!(short.read_frame().is_none());

    // garbage bytes
    let mut garbage = Raw::connect(server.addr);
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    garbage.send_bytes(&noise);
    let _ = garbage.read_frame();

    assert!(server.is_running(), "the server survived");
    good.put(b"after", b"2", b"");
    assert_eq!(good.get(b"before").0, vec![b"1".to_vec()]);
    assert_eq!(good.get(b"after").0, vec![b"2".to_vec()]);
    assert!(server.stop().success());
}

#[test]
fn half_a_frame_then_silence_is_closed_without_hurting_others() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ringkv.toml");
    std::fs::write(
        &config,
        "slow_client_timeout_ms = 500\nidle_timeout_ms = 60000\n",
    )
    .unwrap();
    let mut server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
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
    let n = staller.stream.read(&mut byte).unwrap_or(0);
    assert_eq!(n, 0, "the server closed the stalled connection");
    assert!(good.ping());
    assert!(server.stop().success());
}

#[test]
fn ten_thousand_connections_at_once() {
    ringkv_engine::runtime::raise_nofile_limit(12_000);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[]);
    let mut good = Raw::connect(server.addr);
    good.put(b"k", b"v", b"");
    let mut conns = Vec::new();
    let mut refused = 0;
    for _ in 0..10_000 {
        match std::net::TcpStream::connect_timeout(&server.addr, Duration::from_secs(5)) {
            Ok(s) => conns.push(s),
            Err(_) => refused += 1,
        }
    }
    println!(
        "10,000 connection attempts: {} open, {refused} refused",
        conns.len()
    );
    assert!(server.is_running());
    // the server still answers, on an old connection and a new one
    assert!(good.ping());
    assert_eq!(good.get(b"k").0, vec![b"v".to_vec()]);
    drop(conns);
    let mut fresh = Raw::connect(server.addr);
    assert!(fresh.ping());
    assert!(server.stop().success());
}

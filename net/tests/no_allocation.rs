//! The server side of the codec allocates nothing per request in the steady state:
//! checking a buffer for a whole frame and parsing a request borrow from the buffer
//! (a PUT's value is not copied), and replies are encoded into a reused buffer. A
//! counting allocator (this test binary's own) checks it.

use ringkv_net::protocol::{self, encode, ErrorCode, Request, FRAME_BYTES_MAX_DEFAULT};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocations;

/// A pipelined buffer of requests as a client sends them.
fn requests(value: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    for id in 0..64u64 {
        let key = format!("user{id:012}");
        if id % 2 == 0 {
            Request::Get {
                r: 0,
                key: key.as_bytes(),
            }
            .encode(id, &mut buf);
        } else {
            Request::Put {
                w: 0,
                key: key.as_bytes(),
                context: b"some-context-bytes",
                value,
            }
            .encode(id, &mut buf);
        }
    }
    Request::Ping.encode(64, &mut buf);
    buf
}

#[test]
fn checking_and_parsing_requests_allocates_nothing() {
    let value = vec![7u8; 4096];
    let buf = requests(&value);
    let before = allocations();
    let (mut at, mut gets, mut puts, mut value_bytes) = (0, 0, 0, 0);
    while let Some(len) = protocol::check_frame(&buf[at..], FRAME_BYTES_MAX_DEFAULT).unwrap() {
        let (_, request) = Request::parse(&buf[at..at + len]).unwrap();
        match request {
            Request::Get { key, .. } => {
                assert_eq!(key.len(), 16);
                gets += 1;
            }
            Request::Put { value: v, .. } => {
                // borrowed from the buffer, not copied
                assert!(buf.as_ptr_range().contains(&v.as_ptr()));
                value_bytes += v.len();
                puts += 1;
            }
            _ => {}
        }
        at += len;
    }
    assert_eq!(allocations() - before, 0, "no allocation while parsing");
    assert_eq!((gets, puts, at), (32, 32, buf.len()));
    assert_eq!(value_bytes, 32 * value.len());
}

#[test]
fn encoding_replies_into_a_reused_buffer_allocates_nothing() {
    let values: [&[u8]; 2] = [&[1u8; 100], &[2u8; 100]];
    let context = [9u8; 40];
    let mut out = Vec::new();
    let round = |out: &mut Vec<u8>, id: u64| {
        out.clear();
        encode::get_ok(out, id, &context, values.iter().copied());
        encode::get_ok(out, id + 1, &context, values[..1].iter().copied());
        encode::put_ok(out, id + 2, &context, 1);
        encode::delete_ok(out, id + 3);
        encode::pong(out, id + 4);
        encode::error(
            out,
            id + 5,
            ErrorCode::KeyTooLong,
            "key longer than the limit",
        );
    };
    // the first round grows the buffer
    round(&mut out, 0);
    let frames = out.len();
    let before = allocations();
    for i in 1..1000 {
        round(&mut out, i * 10);
    }
    assert_eq!(
        allocations() - before,
        0,
        "no allocation in the steady state"
    );
    assert_eq!(out.len(), frames, "the same frames each round");
    assert_eq!(protocol::frames(&out).count(), 6);
}

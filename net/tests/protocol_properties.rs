//! Codec properties: every request and reply survives encode -> check_frame -> parse;
//! arbitrary or corrupted bytes never panic the decoders; a stream of frames cut at
//! arbitrary points is put back together frame by frame.

use proptest::collection::vec;
use proptest::prelude::*;
use ringkv_net::peer::{ClusterRequest, WireVersion};

use ringkv_net::protocol::{
    check_frame, encode, header, ErrorCode, FrameError, HelloOk, Reply, Request, HEADER_BYTES,
    PROTOCOL_VERSION,
};

const FRAME_BYTES_MAX: usize = 1 << 20;

/// An owned request, so strategies can generate it (Request borrows).
#[derive(Debug, Clone)]
enum Req {
    Hello(u8, u8),
    Ping,
    Get(u8, Vec<u8>),
    Put(u8, Vec<u8>, Vec<u8>, Vec<u8>),
    Delete(u8, Vec<u8>, Vec<u8>),
}

impl Req {
    fn as_request(&self) -> Request<'_> {
        match self {
            Req::Hello(min_version, max_version) => Request::Hello {
                min_version: *min_version,
                max_version: *max_version,
            },
            Req::Ping => Request::Ping,
            Req::Get(r, key) => Request::Get { r: *r, key },
            Req::Put(w, key, context, value) => Request::Put {
                w: *w,
                key,
                context,
                value,
            },
            Req::Delete(w, key, context) => Request::Delete {
                w: *w,
                key,
                context,
            },
        }
    }
}

fn bytes(len_max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..=len_max)
}

fn arb_request() -> impl Strategy<Value = Req> {
    prop_oneof![
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Req::Hello(a, b)),
        Just(Req::Ping),
        (any::<u8>(), bytes(300)).prop_map(|(r, k)| Req::Get(r, k)),
        (any::<u8>(), bytes(300), bytes(64), bytes(3000))
            .prop_map(|(w, k, c, v)| Req::Put(w, k, c, v)),
        (any::<u8>(), bytes(300), bytes(64)).prop_map(|(w, k, c)| Req::Delete(w, k, c)),
    ]
}

/// An owned reply and its encoding.
#[derive(Debug, Clone)]
enum Rep {
    HelloOk(HelloOk),
    Pong,
    GetOk(Vec<u8>, Vec<Vec<u8>>),
    PutOk(Vec<u8>, u16),
    DeleteOk,
    Error(ErrorCode, String),
}

const ERROR_CODES: [ErrorCode; 14] = [
    ErrorCode::BadRequest,
    ErrorCode::UnknownOpcode,
    ErrorCode::UnsupportedVersion,
    ErrorCode::FrameTooLarge,
    ErrorCode::KeyTooLong,
    ErrorCode::ValueTooLarge,
    ErrorCode::BadContext,
    ErrorCode::TooManyInFlight,
    ErrorCode::Unavailable,
    ErrorCode::Internal,
    ErrorCode::NotConfirmed,
    ErrorCode::ShuttingDown,
    ErrorCode::Timeout,
    ErrorCode::TooManySiblings,
];

fn arb_hello() -> impl Strategy<Value = HelloOk> {
    (
        any::<u8>(),
        any::<u64>(),
        any::<u32>(),
        any::<u16>(),
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(version, node_id, partitions, shards, shard, base, frame_max, in_flight)| HelloOk {
                version,
                node_id,
                partitions,
                shards,
                shard,
                shard_port_base: base,
                frame_bytes_max: frame_max,
                in_flight_max: in_flight,
            },
        )
}

fn arb_reply() -> impl Strategy<Value = Rep> {
    prop_oneof![
        arb_hello().prop_map(Rep::HelloOk),
        Just(Rep::Pong),
        (bytes(64), vec(bytes(500), 0..6)).prop_map(|(c, vs)| Rep::GetOk(c, vs)),
        (bytes(64), any::<u16>()).prop_map(|(c, s)| Rep::PutOk(c, s)),
        Just(Rep::DeleteOk),
        (0..ERROR_CODES.len(), "[ -~]{0,200}").prop_map(|(i, m)| Rep::Error(ERROR_CODES[i], m)),
    ]
}

impl Rep {
    fn encode(&self, request_id: u64, out: &mut Vec<u8>) {
        match self {
            Rep::HelloOk(h) => encode::hello_ok(out, request_id, h),
            Rep::Pong => encode::pong(out, request_id),
            Rep::GetOk(context, values) => {
                encode::get_ok(out, request_id, context, values.iter().map(Vec::as_slice))
            }
            Rep::PutOk(context, siblings) => encode::put_ok(out, request_id, context, *siblings),
            Rep::DeleteOk => encode::delete_ok(out, request_id),
            Rep::Error(code, message) => encode::error(out, request_id, *code, message),
        }
    }

    fn matches(&self, reply: &Reply<'_>) -> bool {
        match (self, reply) {
            (Rep::HelloOk(a), Reply::HelloOk(b)) => a == b,
            (Rep::Pong, Reply::Pong) | (Rep::DeleteOk, Reply::DeleteOk) => true,
            (Rep::GetOk(c, vs), Reply::GetOk { context, values }) => {
                c.as_slice() == *context
                    && vs.len() == values.len()
                    && vs.iter().zip(values).all(|(a, b)| a.as_slice() == *b)
            }
            (Rep::PutOk(c, s), Reply::PutOk { context, siblings }) => {
                c.as_slice() == *context && s == siblings
            }
            (Rep::Error(code, m), Reply::Error { code: c, message }) => {
                *code as u16 == *c && m.as_bytes() == *message
            }
            _ => false,
        }
    }
}

/// Splits `stream` at `cuts` (positions taken modulo its length), feeds the pieces to a
/// buffer one at a time, and returns every whole frame taken out of it.
fn reassemble(stream: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(0);
    points.push(stream.len());
    points.sort_unstable();
    points.dedup();
    let mut buffer: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    for piece in points.windows(2) {
        buffer.extend_from_slice(&stream[piece[0]..piece[1]]);
        // bounded: each pass removes one whole frame from the buffer
        while let Some(len) = check_frame(&buffer, FRAME_BYTES_MAX).unwrap() {
            frames.push(buffer.drain(..len).collect());
        }
    }
    assert!(buffer.is_empty(), "{} bytes left over", buffer.len());
    frames
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_request_round_trips(req in arb_request(), request_id in any::<u64>()) {
        let mut frame = Vec::new();
        req.as_request().encode(request_id, &mut frame);
        prop_assert_eq!(check_frame(&frame, FRAME_BYTES_MAX), Ok(Some(frame.len())));
        let (h, parsed) = Request::parse(&frame).unwrap();
        prop_assert_eq!(h.request_id, request_id);
        prop_assert_eq!(h.frame_len as usize, frame.len());
        prop_assert_eq!(h.version, 1);
        prop_assert_eq!(h.flags, 0);
        prop_assert_eq!(h.opcode, req.as_request().opcode());
        prop_assert_eq!(parsed, req.as_request());
        // every strict prefix is "not yet", never an error or a frame
        for cut in [0, 3, 4, 5, HEADER_BYTES - 1, HEADER_BYTES, frame.len() - 1] {
            if cut < frame.len() {
                prop_assert_eq!(check_frame(&frame[..cut], FRAME_BYTES_MAX), Ok(None));
            }
        }
    }

    #[test]
    fn every_reply_round_trips(rep in arb_reply(), request_id in any::<u64>()) {
        let mut frame = Vec::new();
        rep.encode(request_id, &mut frame);
        prop_assert_eq!(check_frame(&frame, FRAME_BYTES_MAX), Ok(Some(frame.len())));
        let (h, parsed) = Reply::parse(&frame).unwrap();
        prop_assert_eq!(h.request_id, request_id);
        prop_assert!(rep.matches(&parsed), "{:?} parsed as {:?}", rep, parsed);
    }

    #[test]
    fn a_frame_is_refused_when_over_the_limit(req in arb_request()) {
        let mut frame = Vec::new();
        req.as_request().encode(1, &mut frame);
        let limit = frame.len() - 1;
        prop_assert_eq!(
            check_frame(&frame, limit),
            Err(FrameError::TooLarge { len: frame.len(), max: limit })
        );
    }

    /// The fuzz target's own checks (net/fuzz), on generated streams: whole client
    /// requests and replies, cluster requests, a STATS_OK with real histograms, then
    /// random bytes.
    #[test]
    fn the_fuzz_targets_checks_hold_on_generated_streams(
        reqs in proptest::collection::vec(arb_request(), 0..4),
        reps in proptest::collection::vec(arb_reply(), 0..4),
        partition in any::<u32>(),
        id in any::<u64>(),
        key in bytes(24),
        blob in bytes(40),
        value in proptest::option::of(bytes(40)),
        latencies in proptest::collection::vec(1u64..10_000_000, 0..20),
        tail in bytes(64),
    ) {
        let mut stream = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            req.as_request().encode(i as u64, &mut stream);
        }
        for (i, rep) in reps.iter().enumerate() {
            rep.encode(i as u64, &mut stream);
        }
        let cluster = [
            ClusterRequest::ReplicaPut {
                partition,
                hint_for: id,
                key: &key,
                version: WireVersion { version: &blob, value: value.as_deref() },
            },
            ClusterRequest::ReplicaGet { partition, key: &key },
            ClusterRequest::Gossip { from: id, message: &blob },
            ClusterRequest::JoinRequest {
                id,
                shards: partition,
                weight: 1,
                addr: &key,
                zone: &blob,
            },
            ClusterRequest::KeyCount { partition },
            ClusterRequest::Stats { shard_only: id % 2 == 0 },
        ];
        for (i, req) in cluster.iter().enumerate() {
            req.encode(i as u64, &mut stream);
        }
        let mut histogram = ringkv_net::stats::latency_histogram();
        for ns in &latencies {
            histogram.record(*ns).unwrap();
        }
        ringkv_net::stats::NodeStats {
            shards: 2,
            counters: vec![("requests".into(), id)],
            latencies: vec![("get".into(), histogram)],
        }
        .encode_reply(7, &mut stream);
        stream.extend_from_slice(&tail);
        ringkv_net::fuzzing::frames(&stream);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(data in bytes(600), limit in 0usize..2048) {
        let checked = check_frame(&data, limit);
        if let Ok(Some(len)) = checked {
            prop_assert!((HEADER_BYTES..=limit.max(HEADER_BYTES)).contains(&len));
            prop_assert!(len <= data.len());
            let _ = Request::parse(&data[..len]);
            let _ = Reply::parse(&data[..len]);
        }
        if data.len() >= HEADER_BYTES {
            // parse must not trust the header's length either
            let _ = Request::parse(&data);
            let _ = Reply::parse(&data);
            let _ = header(&data);
        }
    }

    /// Random bytes rarely start with a usable length (the property above then checks
    /// only the refusals): here every frame is whole and within the limit, so the
    /// parsers always meet the random header fields and body.
    #[test]
    fn random_frames_behind_a_valid_length_never_panic_the_decoders(
        version in prop_oneof![Just(PROTOCOL_VERSION), any::<u8>()],
        opcode in any::<u8>(),
        flags in any::<u16>(),
        body in bytes(600),
        trailing in bytes(32),
    ) {
        let len = HEADER_BYTES + body.len();
        let mut data = (len as u32).to_le_bytes().to_vec();
        data.push(version);
        data.push(opcode);
        data.extend_from_slice(&flags.to_le_bytes());
        data.extend_from_slice(&9u64.to_le_bytes());
        data.extend_from_slice(&body);
        data.extend_from_slice(&trailing);
        match check_frame(&data, 4096) {
            Ok(Some(checked)) => {
                prop_assert_eq!(version, PROTOCOL_VERSION);
                prop_assert_eq!(checked, len);
                prop_assert_eq!(header(&data).request_id, 9);
                let _ = Request::parse(&data[..len]);
                let _ = Reply::parse(&data[..len]);
            }
            Err(FrameError::UnsupportedVersion(v)) => {
                prop_assert_ne!(version, PROTOCOL_VERSION);
                prop_assert_eq!(v, version);
            }
            other => prop_assert!(false, "a whole frame within the limit: {:?}", other),
        }
    }

    #[test]
    fn corrupted_frames_never_panic_the_decoders(
        req in arb_request(),
        rep in arb_reply(),
        flips in vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let mut frames = [Vec::new(), Vec::new()];
        req.as_request().encode(5, &mut frames[0]);
        rep.encode(6, &mut frames[1]);
        for frame in frames.iter_mut() {
            for &(at, byte) in &flips {
                let at = at % frame.len();
                frame[at] ^= byte;
            }
            if let Ok(Some(len)) = check_frame(frame, FRAME_BYTES_MAX) {
                let _ = Request::parse(&frame[..len]);
                let _ = Reply::parse(&frame[..len]);
            }
            let _ = Request::parse(frame);
            let _ = Reply::parse(frame);
        }
    }

    #[test]
    fn truncated_or_extended_bodies_are_errors(req in arb_request(), extra in bytes(8)) {
        let mut frame = Vec::new();
        req.as_request().encode(9, &mut frame);
        // a frame whose length field says it is longer, with trailing bytes
        if !extra.is_empty() {
            let mut longer = frame.clone();
            longer.extend_from_slice(&extra);
            let len = longer.len() as u32;
            longer[0..4].copy_from_slice(&len.to_le_bytes());
            prop_assert!(Request::parse(&longer).is_err());
        }
        // a body cut short (only requests that have a body)
        if frame.len() > HEADER_BYTES {
            let mut shorter = frame[..frame.len() - 1].to_vec();
            let len = shorter.len() as u32;
            shorter[0..4].copy_from_slice(&len.to_le_bytes());
            prop_assert!(Request::parse(&shorter).is_err());
        }
    }

    #[test]
    fn a_stream_cut_anywhere_is_reassembled(
        reqs in vec(arb_request(), 1..20),
        reps in vec(arb_reply(), 1..20),
        cuts in vec(any::<usize>(), 0..40),
    ) {
        let mut stream = Vec::new();
        for (i, req) in reqs.iter().enumerate() {
            req.as_request().encode(i as u64, &mut stream);
        }
        let frames = reassemble(&stream, &cuts);
        prop_assert_eq!(frames.len(), reqs.len());
        for (i, (frame, req)) in frames.iter().zip(&reqs).enumerate() {
            let (h, parsed) = Request::parse(frame).unwrap();
            prop_assert_eq!(h.request_id, i as u64);
            prop_assert_eq!(parsed, req.as_request());
        }

        let mut stream = Vec::new();
        for (i, rep) in reps.iter().enumerate() {
            rep.encode(i as u64, &mut stream);
        }
        let frames = reassemble(&stream, &cuts);
        prop_assert_eq!(frames.len(), reps.len());
        for (i, (frame, rep)) in frames.iter().zip(&reps).enumerate() {
            let (h, parsed) = Reply::parse(frame).unwrap();
            prop_assert_eq!(h.request_id, i as u64);
            prop_assert!(rep.matches(&parsed));
        }
    }
}

#[test]
fn a_frame_with_another_version_is_skippable_once_whole() {
    let mut frame = Vec::new();
    Request::Get { r: 0, key: b"key" }.encode(3, &mut frame);
    frame[4] = 2;
    for cut in 0..frame.len() {
        let partial = check_frame(&frame[..cut], FRAME_BYTES_MAX);
        assert_eq!(partial, Ok(None), "cut at {cut}");
    }
    let err = check_frame(&frame, FRAME_BYTES_MAX).unwrap_err();
    assert_eq!(err, FrameError::UnsupportedVersion(2));
    assert!(err.resynchronisable());
    assert!(!FrameError::TooShort(3).resynchronisable());
}

#[test]
fn unknown_opcodes_are_refused_with_their_own_code() {
    for op in [0x00u8, 0x06, 0x3F, 0x40, 0x7E, 0x80, 0xFF] {
        let mut frame = Vec::new();
        let start = ringkv_net::protocol::begin_frame(&mut frame, op, 1);
        ringkv_net::protocol::end_frame(&mut frame, start);
        let err = Request::parse(&frame).unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnknownOpcode, "opcode {op:#04x}");
    }
    assert!(ErrorCode::from_u16(0).is_none());
    assert!(ErrorCode::from_u16(15).is_none());
    for code in ERROR_CODES {
        assert_eq!(ErrorCode::from_u16(code as u16), Some(code));
    }
}

/// Regression: `Request::parse` and `Reply::parse` asserted the frame held 16 bytes, so
/// a caller that skipped `check_frame` panicked on a short buffer.
#[test]
fn parse_of_a_short_buffer_is_an_error_not_a_panic() {
    for n in 0..HEADER_BYTES {
        let data = vec![0u8; n];
        assert!(Request::parse(&data).is_err());
        assert!(Reply::parse(&data).is_err());
    }
}

fn from_hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .filter(|t| *t != "|")
        .map(|t| u8::from_str_radix(t, 16).unwrap())
        .collect()
}

/// The examples at the end of docs/protocol.md, byte for byte.
#[test]
fn documented_examples_encode_byte_for_byte() {
    let mut out = Vec::new();
    Request::Hello {
        min_version: 1,
        max_version: 1,
    }
    .encode(1, &mut out);
    assert_eq!(
        out,
        from_hex("12 00 00 00 01 01 00 00 01 00 00 00 00 00 00 00 | 01 01")
    );
    out.clear();
    Request::Get { r: 0, key: b"k" }.encode(2, &mut out);
    assert_eq!(
        out,
        from_hex("14 00 00 00 01 03 00 00 02 00 00 00 00 00 00 00 | 00 | 01 00 6b")
    );
    out.clear();
    Request::Put {
        w: 2,
        key: b"k",
        context: b"",
        value: b"v1",
    }
    .encode(3, &mut out);
    assert_eq!(
        out,
        from_hex(
            "1c 00 00 00 01 04 00 00 03 00 00 00 00 00 00 00 | 02 | 01 00 6b | 00 00 | 02 00 00 00 76 31"
        )
    );
    out.clear();
    encode::get_ok(&mut out, 2, &[0xab, 0xcd], [&b"a"[..], b"b"].into_iter());
    assert_eq!(
        out,
        from_hex(
            "20 00 00 00 01 43 00 00 02 00 00 00 00 00 00 00 | 02 00 ab cd | 02 00 | 01 00 00 00 61 | 01 00 00 00 62"
        )
    );
    out.clear();
    encode::error(&mut out, 3, ErrorCode::NotConfirmed, "w=1/2");
    assert_eq!(
        out,
        from_hex("19 00 00 00 01 7f 00 00 03 00 00 00 00 00 00 00 | 0b 00 | 05 00 77 3d 31 2f 32")
    );
    // HELLO_OK: a 27-byte body, fields at the documented offsets
    out.clear();
    let hello = HelloOk {
        version: 1,
        node_id: 0x0102_0304_0506_0708,
        partitions: 64,
        shards: 4,
        shard: 2,
        shard_port_base: 7400,
        frame_bytes_max: 4_259_840,
        in_flight_max: 128,
    };
    encode::hello_ok(&mut out, 0, &hello);
    assert_eq!(out.len(), 43);
    assert_eq!(out[16], 1);
    assert_eq!(out[17..25], hello.node_id.to_le_bytes());
    assert_eq!(out[25..29], 64u32.to_le_bytes());
    assert_eq!(out[29..31], 4u16.to_le_bytes());
    assert_eq!(out[31..33], 2u16.to_le_bytes());
    assert_eq!(out[33..35], 7400u16.to_le_bytes());
    assert_eq!(out[35..39], 4_259_840u32.to_le_bytes());
    assert_eq!(out[39..43], 128u32.to_le_bytes());
    assert_eq!(
        ringkv_net::protocol::FRAME_BYTES_MAX_DEFAULT,
        4_259_840,
        "docs/protocol.md states the default frame limit"
    );
}

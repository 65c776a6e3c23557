//! Arbitrary bytes through the frame check and every parser (client and cluster): nothing may panic, and a
//! frame that parses must re-encode to the same bytes.
//!
//! Run: `cd net/fuzz && cargo +nightly fuzz run frame_decoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_net::protocol::{check_frame, Request, FRAME_BYTES_MAX_DEFAULT};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // bounded: each pass consumes one whole frame of at least 16 bytes
    loop {
        let len = match check_frame(rest, FRAME_BYTES_MAX_DEFAULT) {
            Ok(Some(len)) => len,
            // the server skips a whole frame of another version and goes on (conn.rs):
            // so does this, so that what follows such a frame is fuzzed too
            Err(e) if e.resynchronisable() => {
                let len = ringkv_net::protocol::header(rest).frame_len as usize;
                rest = &rest[len..];
                continue;
            }
            _ => break,
        };
        let frame = &rest[..len];
        if let Ok((header, request)) = Request::parse(frame) {
            let mut again = Vec::new();
            request.encode(header.request_id, &mut again);
            // flags are not carried by Request: compare all but them
            assert_eq!(again.len(), frame.len());
            assert_eq!(again[..6], frame[..6]);
            assert_eq!(again[8..], frame[8..]);
        }
        let _ = ringkv_net::protocol::Reply::parse(frame);
        // the cluster (peer and admin) messages: same rules
        if let Ok((header, request)) = ringkv_net::peer::ClusterRequest::parse(frame) {
            let mut again = Vec::new();
            request.encode(header.request_id, &mut again);
            assert_eq!(again.len(), frame.len());
            assert_eq!(again[8..], frame[8..]);
        }
        // a STATS_OK's histograms and names: refused or decoded, never a panic
        if let Ok((
            _,
            ringkv_net::peer::ClusterReply::StatsOk {
                shards,
                counters,
                latencies,
            },
        )) = ringkv_net::peer::ClusterReply::parse(frame)
        {
            let _ = ringkv_net::stats::NodeStats::decode(shards, &counters, &latencies);
        }
        rest = &rest[len..];
    }
});

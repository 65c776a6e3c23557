//! The fuzz target's checks (`net/fuzz/fuzz_targets/frame_decoder.rs`), here so that the
//! workspace's own tests run them too: arbitrary bytes through the frame check and every
//! parser (client and cluster) must never panic, and a frame that parses must re-encode
//! to the same bytes. Not an API.

use crate::protocol::{check_frame, Request, FRAME_BYTES_MAX_DEFAULT};

/// Runs every whole frame at the start of `data` through the decoders; panics on a
/// violation (that is what the fuzzer looks for).
pub fn frames(data: &[u8]) {
    let mut rest = data;
    // bounded: each pass consumes one whole frame of at least 16 bytes
    loop {
        let len = match check_frame(rest, FRAME_BYTES_MAX_DEFAULT) {
            Ok(Some(len)) => len,
            // the server skips a whole frame of another version and goes on (conn.rs):
            // so does this, so that what follows such a frame is fuzzed too
            Err(e) if e.resynchronisable() => {
                let len = crate::protocol::header(rest).frame_len as usize;
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
        let _ = crate::protocol::Reply::parse(frame);
        // the cluster (peer and admin) messages: same rules
        if let Ok((header, request)) = crate::peer::ClusterRequest::parse(frame) {
            let mut again = Vec::new();
            request.encode(header.request_id, &mut again);
            assert_eq!(again.len(), frame.len());
            assert_eq!(again[8..], frame[8..]);
        }
        // a STATS_OK's histograms and names: refused or decoded, never a panic
        if let Ok((
            _,
            crate::peer::ClusterReply::StatsOk {
                shards,
                counters,
                latencies,
            },
        )) = crate::peer::ClusterReply::parse(frame)
        {
            let _ = crate::stats::NodeStats::decode(shards, &counters, &latencies);
        }
        rest = &rest[len..];
    }
}

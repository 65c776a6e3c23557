//! Arbitrary bytes through the frame check and every parser (client and cluster): nothing
//! may panic, and a frame that parses must re-encode to the same bytes. The checks are
//! `ringkv_net::fuzzing::frames`, which the workspace's own tests also run on generated
//! input (net/tests/protocol_properties.rs), so CI compiles and exercises them.
//!
//! Run: `cd net/fuzz && cargo +nightly fuzz run frame_decoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ringkv_net::fuzzing::frames(data));

//! The causal context handed to clients: an opaque, versioned, size-bounded, checksummed
//! encoding of a [`VClock`] that the server validates when the client sends it back.

use thiserror::Error;

use super::clock::{ClockDecodeError, VClock, CLOCK_ENTRY_BYTES};
use super::codec::Reader;

/// First bytes of every client context.
pub const CONTEXT_MAGIC: [u8; 4] = *b"rkvc";

/// Format version byte after the magic.
pub const CONTEXT_FORMAT: u8 = 1;

/// Most clock entries a context carries; longer clocks are truncated (oldest first) on encode.
pub const CONTEXT_ENTRIES_MAX: usize = 64;

/// Bytes of an empty context: magic, format, u16 count, crc32.
pub const CONTEXT_BYTES_MIN: usize = 4 + 1 + 2 + 4;

/// Largest valid context in bytes.
pub const CONTEXT_BYTES_MAX: usize = CONTEXT_BYTES_MIN + CONTEXT_ENTRIES_MAX * CLOCK_ENTRY_BYTES;

/// A client sent a context the server cannot use.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ContextError {
    #[error("context is {len} bytes, shorter than the minimum {CONTEXT_BYTES_MIN}")]
    TooShort { len: usize },
    #[error("context is {len} bytes, longer than the maximum {CONTEXT_BYTES_MAX}")]
    TooLong { len: usize },
    #[error(
        "context does not start with the ringkv context magic; it was not issued by this service"
    )]
    BadMagic,
    #[error("context format {found} is not supported, this server reads format {CONTEXT_FORMAT}")]
    UnsupportedFormat { found: u8 },
    #[error("context checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupted or modified")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("context has {count} entries, more than the maximum {CONTEXT_ENTRIES_MAX}")]
    TooManyEntries { count: usize },
    #[error("context clock is invalid: {0}")]
    Clock(#[from] ClockDecodeError),
    #[error("context length does not match its entry count ({extra} unexplained bytes)")]
    LengthMismatch { extra: usize },
}

/// A context ready to send, and how many clock entries were truncated to fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedContext {
    pub bytes: Vec<u8>,
    /// Feed to [`TruncationStats::record`](super::TruncationStats::record).
    pub truncated_entries: usize,
}

/// Encoding and validation of client contexts.
#[derive(Debug)]
pub struct Context;

impl Context {
    /// Encodes `clock` (usually [`context_of`](super::context_of) the siblings a read
    /// returned). A clock over [`CONTEXT_ENTRIES_MAX`] entries is truncated first: the client
    /// then appears to have seen less, which can only keep siblings, never drop one.
    pub fn encode(clock: &VClock) -> EncodedContext {
        let mut bytes = Vec::with_capacity(CONTEXT_BYTES_MIN + clock.len() * CLOCK_ENTRY_BYTES);
        let truncated_entries = Self::encode_into(clock, &mut bytes);
        EncodedContext {
            bytes,
            truncated_entries,
        }
    }

    /// [`Context::encode`] appending to `out` (a buffer the caller reuses, so that
    /// encoding a reply's context allocates nothing in the steady state); returns the
    /// number of clock entries truncated.
    pub fn encode_into(clock: &VClock, out: &mut Vec<u8>) -> usize {
        let mut truncated_entries = 0;
        let truncated;
        let clock = if clock.len() > CONTEXT_ENTRIES_MAX {
            let mut copy = clock.clone();
            truncated_entries = copy.truncate(CONTEXT_ENTRIES_MAX);
            truncated = copy;
            &truncated
        } else {
            clock
        };
        let start = out.len();
        out.extend_from_slice(&CONTEXT_MAGIC);
        out.push(CONTEXT_FORMAT);
        clock.encode(out);
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert!(out.len() - start <= CONTEXT_BYTES_MAX);
        truncated_entries
    }

    /// Validates and decodes a context a client sent back. The empty context (a blind write)
    /// is [`Context::encode`] of an empty clock; a client that never read sends that, or the
    /// server treats a missing context as empty.
    pub fn decode(bytes: &[u8]) -> Result<VClock, ContextError> {
        let len = bytes.len();
        if len < CONTEXT_BYTES_MIN {
            return Err(ContextError::TooShort { len });
        }
        if len > CONTEXT_BYTES_MAX {
            return Err(ContextError::TooLong { len });
        }
        let (body, crc_bytes) = bytes.split_at(len - 4);
        let mut reader = Reader::new(body);
        let magic = reader
            .take(CONTEXT_MAGIC.len())
            .map_err(|_| ContextError::TooShort { len })?;
        if magic != CONTEXT_MAGIC {
            return Err(ContextError::BadMagic);
        }
        let format = reader.u8().map_err(|_| ContextError::TooShort { len })?;
        if format != CONTEXT_FORMAT {
            return Err(ContextError::UnsupportedFormat { found: format });
        }
        let mut stored = [0u8; 4];
        stored.copy_from_slice(crc_bytes);
        let stored = u32::from_le_bytes(stored);
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(ContextError::CrcMismatch { stored, computed });
        }
        let count = match body.get(5..7) {
            Some(&[low, high]) => usize::from(u16::from_le_bytes([low, high])),
            _ => return Err(ContextError::TooShort { len }),
        };
        if count > CONTEXT_ENTRIES_MAX {
            return Err(ContextError::TooManyEntries { count });
        }
        let clock = VClock::decode_from(&mut reader)?;
        if reader.remaining() != 0 {
            return Err(ContextError::LengthMismatch {
                extra: reader.remaining(),
            });
        }
        Ok(clock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::clock::{ActorId, ClockEntry};

    fn clock(n: u64) -> VClock {
        VClock::from_entries((0..n).map(|i| ClockEntry {
            actor: ActorId::new(i, 1),
            counter: i + 1,
            timestamp_ms: 1000 + i,
        }))
    }

    /// Re-seals a modified body with a valid CRC, as a forger would.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        let body_len = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..body_len]);
        bytes[body_len..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn empty_context_round_trips() {
        let e = Context::encode(&VClock::new());
        assert_eq!(e.bytes.len(), CONTEXT_BYTES_MIN);
        assert_eq!(Context::decode(&e.bytes), Ok(VClock::new()));
    }

    #[test]
    fn oversized_clock_is_truncated_to_fit() {
        let big = clock(CONTEXT_ENTRIES_MAX as u64 + 3);
        let e = Context::encode(&big);
        assert_eq!(e.truncated_entries, 3);
        assert_eq!(e.bytes.len(), CONTEXT_BYTES_MAX);
        let decoded = Context::decode(&e.bytes).expect("valid");
        assert_eq!(decoded.len(), CONTEXT_ENTRIES_MAX);
        assert!(big.descends(&decoded));
        // The three oldest were dropped.
        assert_eq!(decoded.get(ActorId::new(2, 1)), 0);
        assert_eq!(decoded.get(ActorId::new(3, 1)), 4);
    }

    #[test]
    fn each_kind_of_bad_context_gets_its_error() {
        let good = Context::encode(&clock(2)).bytes;
        assert_eq!(Context::decode(&good), Ok(clock(2)));
        assert_eq!(
            Context::decode(b"hello"),
            Err(ContextError::TooShort { len: 5 })
        );
        assert_eq!(
            Context::decode(&vec![0u8; CONTEXT_BYTES_MAX + 1]),
            Err(ContextError::TooLong {
                len: CONTEXT_BYTES_MAX + 1
            })
        );
        assert_eq!(
            Context::decode(b"GET / HTTP/1.1\r\n"),
            Err(ContextError::BadMagic)
        );
        let mut format = good.clone();
        format[4] = 9;
        assert_eq!(
            Context::decode(&reseal(format)),
            Err(ContextError::UnsupportedFormat { found: 9 })
        );
        let mut flipped = good.clone();
        flipped[20] ^= 0x40;
        assert!(matches!(
            Context::decode(&flipped),
            Err(ContextError::CrcMismatch { .. })
        ));
        // Forged but checksummed: duplicate actor, zero counter, too many entries, bad length.
        let mut duplicate = good.clone();
        duplicate[7 + CLOCK_ENTRY_BYTES] = 0;
        assert_eq!(
            Context::decode(&reseal(duplicate)),
            Err(ContextError::Clock(ClockDecodeError::UnsortedActors {
                index: 1
            }))
        );
        let mut zero = good.clone();
        zero[7 + 12] = 0;
        assert_eq!(
            Context::decode(&reseal(zero)),
            Err(ContextError::Clock(ClockDecodeError::ZeroCounter {
                index: 0
            }))
        );
        let mut many = good.clone();
        many[5..7].copy_from_slice(&100u16.to_le_bytes());
        assert_eq!(
            Context::decode(&reseal(many)),
            Err(ContextError::TooManyEntries { count: 100 })
        );
        let mut short_count = good.clone();
        short_count[5..7].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(
            Context::decode(&reseal(short_count)),
            Err(ContextError::LengthMismatch {
                extra: CLOCK_ENTRY_BYTES
            })
        );
        let mut long_count = good.clone();
        long_count[5..7].copy_from_slice(&3u16.to_le_bytes());
        assert!(matches!(
            Context::decode(&reseal(long_count)),
            Err(ContextError::Clock(ClockDecodeError::Truncated { .. }))
        ));
    }
}

//! The on-disk record, format v1: one version of one key, CRC-checked.
//!
//! Layout (all integers little-endian; drawn byte by byte in `docs/format.md`):
//!
//! ```text
//! 0   u16  magic 0x4B52 ("RK")
//! 2   u8   format version (1)
//! 3   u8   flags (bit 0 tombstone, bit 1 batch continues)
//! 4   u32  CRC32 (crc32fast/IEEE) over bytes 0..4 and 8..end
//! 8   u64  seq: the partition-unique id of this version
//! 16  u64  timestamp_ms: wall clock of the write (tombstone grace)
//! 24  u16  key_len
//! 26  u16  replaced_count: versions (by seq) this record supersedes
//! 28  u32  version_len: the opaque version blob (a vector clock)
//! 32  u32  value_len (0 for a tombstone)
//! 36  u32  reserved, zero
//! 40  key | replaced seqs (u64 each) | version blob | value
//! ```

use thiserror::Error;

pub const RECORD_MAGIC: u16 = 0x4B52;
pub const RECORD_FORMAT_V1: u8 = 1;
pub const RECORD_HEADER_BYTES: usize = 40;

pub const FLAG_TOMBSTONE: u8 = 1 << 0;
pub const FLAG_BATCH_CONTINUES: u8 = 1 << 1;
const FLAGS_KNOWN: u8 = FLAG_TOMBSTONE | FLAG_BATCH_CONTINUES;

/// Hard limits of format v1 (the node enforces smaller, configurable ones).
pub const KEY_BYTES_MAX: usize = u16::MAX as usize;
pub const REPLACED_COUNT_MAX: usize = 1024;
/// The largest seq a record may carry. A partition numbers its writes from 1, one by
/// one, so none gets near; a larger one is corruption (and would make the next seq
/// wrap around onto live ones).
pub const SEQ_MAX: u64 = 1 << 62;
pub const VERSION_BYTES_MAX: usize = 64 * 1024;
pub const VALUE_BYTES_MAX: usize = 64 * 1024 * 1024;
pub const RECORD_BYTES_MAX: usize = RECORD_HEADER_BYTES
    + KEY_BYTES_MAX
    + REPLACED_COUNT_MAX * 8
    + VERSION_BYTES_MAX
    + VALUE_BYTES_MAX;

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum RecordError {
    #[error("record needs {needed} bytes, only {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("bad record magic {found:#06x}")]
    BadMagic { found: u16 },
    #[error("unsupported record format version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown record flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("record CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("record field out of bounds: {0}")]
    OutOfBounds(&'static str),
}

/// The header fields of a record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub flags: u8,
    pub seq: u64,
    pub timestamp_ms: u64,
    pub key_len: u16,
    pub replaced_count: u16,
    pub version_len: u32,
    pub value_len: u32,
}

impl RecordHeader {
    pub fn total_bytes(&self) -> usize {
        RECORD_HEADER_BYTES
            + self.key_len as usize
            + self.replaced_count as usize * 8
            + self.version_len as usize
            + self.value_len as usize
    }
    pub fn is_tombstone(&self) -> bool {
        self.flags & FLAG_TOMBSTONE != 0
    }
    pub fn batch_continues(&self) -> bool {
        self.flags & FLAG_BATCH_CONTINUES != 0
    }
}

/// A record to write.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub seq: u64,
    pub timestamp_ms: u64,
    pub key: &'a [u8],
    pub replaced: &'a [u64],
    pub version: &'a [u8],
    /// `None` is a tombstone.
    pub value: Option<&'a [u8]>,
    pub batch_continues: bool,
}

impl RecordRef<'_> {
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES
            + self.key.len()
            + self.replaced.len() * 8
            + self.version.len()
            + self.value.map_or(0, <[u8]>::len)
    }

    /// Appends the encoded record to `out`. Panics (an invariant, checked by the
    /// caller's limits) if a field exceeds the format's hard limits.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        assert!(
            self.key.len() <= KEY_BYTES_MAX,
            "key too long for format v1"
        );
        assert!(self.replaced.len() <= REPLACED_COUNT_MAX);
        assert!(self.version.len() <= VERSION_BYTES_MAX);
        let value = self.value.unwrap_or(&[]);
        assert!(value.len() <= VALUE_BYTES_MAX);
        let start = out.len();
        let mut flags = 0u8;
        if self.value.is_none() {
            flags |= FLAG_TOMBSTONE;
        }
        if self.batch_continues {
            flags |= FLAG_BATCH_CONTINUES;
        }
        out.reserve(self.encoded_len());
        out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        out.push(RECORD_FORMAT_V1);
        out.push(flags);
        out.extend_from_slice(&[0; 4]); // CRC, filled below
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&(self.key.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.replaced.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.version.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(self.key);
        for seq in self.replaced {
            out.extend_from_slice(&seq.to_le_bytes());
        }
        out.extend_from_slice(self.version);
        out.extend_from_slice(value);
        let crc = record_crc(&out[start..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Rewrites an encoded, valid record so that it ends its batch (compaction copies
/// records out of their batches into a file that becomes visible only when whole).
pub fn end_batch_in_place(record: &mut [u8]) {
    assert!(record.len() >= RECORD_HEADER_BYTES);
    if record[3] & FLAG_BATCH_CONTINUES != 0 {
        record[3] &= !FLAG_BATCH_CONTINUES;
        let crc = record_crc(record);
        record[4..8].copy_from_slice(&crc.to_le_bytes());
    }
}

fn record_crc(record: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record[0..4]);
    hasher.update(&record[8..]);
    hasher.finalize()
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes and checks the fixed header (not the CRC, which needs the whole record).
pub fn decode_header(buf: &[u8]) -> Result<RecordHeader, RecordError> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Err(RecordError::Truncated {
            needed: RECORD_HEADER_BYTES,
            available: buf.len(),
        });
    }
    let magic = u16_at(buf, 0);
    if magic != RECORD_MAGIC {
        return Err(RecordError::BadMagic { found: magic });
    }
    if buf[2] != RECORD_FORMAT_V1 {
        return Err(RecordError::UnsupportedVersion(buf[2]));
    }
    let flags = buf[3];
    if flags & !FLAGS_KNOWN != 0 {
        return Err(RecordError::UnknownFlags(flags));
    }
    let header = RecordHeader {
        flags,
        seq: u64_at(buf, 8),
        timestamp_ms: u64_at(buf, 16),
        key_len: u16_at(buf, 24),
        replaced_count: u16_at(buf, 26),
        version_len: u32_at(buf, 28),
        value_len: u32_at(buf, 32),
    };
    if u32_at(buf, 36) != 0 {
        return Err(RecordError::OutOfBounds("reserved field is not zero"));
    }
    if header.seq > SEQ_MAX {
        return Err(RecordError::OutOfBounds("seq"));
    }
    if header.replaced_count as usize > REPLACED_COUNT_MAX {
        return Err(RecordError::OutOfBounds("replaced_count"));
    }
    if header.version_len as usize > VERSION_BYTES_MAX {
        return Err(RecordError::OutOfBounds("version_len"));
    }
    if header.value_len as usize > VALUE_BYTES_MAX {
        return Err(RecordError::OutOfBounds("value_len"));
    }
    if header.is_tombstone() && header.value_len != 0 {
        return Err(RecordError::OutOfBounds("tombstone with a value"));
    }
    Ok(header)
}

/// A decoded record borrowing from the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub header: RecordHeader,
    pub key: &'a [u8],
    replaced_raw: &'a [u8],
    pub version: &'a [u8],
    /// `None` for a tombstone.
    pub value: Option<&'a [u8]>,
}

impl<'a> Record<'a> {
    pub fn replaced(&self) -> impl Iterator<Item = u64> + 'a {
        self.replaced_raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
    }
    pub fn total_bytes(&self) -> usize {
        self.header.total_bytes()
    }
}

/// Decodes one whole record from the front of `buf`, verifying its CRC.
pub fn decode(buf: &[u8]) -> Result<Record<'_>, RecordError> {
    decode_with(buf, true)
}

/// [`decode`] without the CRC check, for bytes whose CRC this process has already
/// checked or computed (the record cache holds only records read from disk and
/// verified, or encoded here). The header is still checked field by field.
pub fn decode_verified(buf: &[u8]) -> Result<Record<'_>, RecordError> {
    decode_with(buf, false)
}

fn decode_with(buf: &[u8], check_crc: bool) -> Result<Record<'_>, RecordError> {
    let header = decode_header(buf)?;
    let total = header.total_bytes();
    if buf.len() < total {
        return Err(RecordError::Truncated {
            needed: total,
            available: buf.len(),
        });
    }
    let record = &buf[..total];
    if check_crc {
        let stored = u32_at(record, 4);
        let computed = record_crc(record);
        if stored != computed {
            return Err(RecordError::CrcMismatch { stored, computed });
        }
    }
    let mut at = RECORD_HEADER_BYTES;
    let key = &record[at..at + header.key_len as usize];
    at += header.key_len as usize;
    let replaced_raw = &record[at..at + header.replaced_count as usize * 8];
    at += replaced_raw.len();
    let version = &record[at..at + header.version_len as usize];
    at += version.len();
    let value = if header.is_tombstone() {
        None
    } else {
        Some(&record[at..at + header.value_len as usize])
    };
    Ok(Record {
        header,
        key,
        replaced_raw,
        version,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(value: Option<&[u8]>) -> Vec<u8> {
        let mut out = Vec::new();
        RecordRef {
            seq: 7,
            timestamp_ms: 1_700_000_000_000,
            key: b"user:42",
            replaced: &[3, 5],
            version: b"\x01clock",
            value,
            batch_continues: false,
        }
        .encode_into(&mut out);
        out
    }

    #[test]
    fn a_seq_past_the_limit_is_refused_even_with_a_good_crc() {
        let record = |seq| {
            let mut out = Vec::new();
            RecordRef {
                seq,
                timestamp_ms: 1,
                key: b"k",
                replaced: &[],
                version: b"v",
                value: Some(b"x"),
                batch_continues: false,
            }
            .encode_into(&mut out);
            out
        };
        assert_eq!(decode(&record(SEQ_MAX)).unwrap().header.seq, SEQ_MAX);
        assert!(matches!(
            decode(&record(u64::MAX)),
            Err(RecordError::OutOfBounds("seq"))
        ));
    }

    #[test]
    fn round_trip_value_and_tombstone() {
        let bytes = sample(Some(b"hello"));
        let r = decode(&bytes).unwrap();
        assert_eq!(r.key, b"user:42");
        assert_eq!(r.replaced().collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(r.version, b"\x01clock");
        assert_eq!(r.value, Some(&b"hello"[..]));
        assert_eq!(r.header.seq, 7);
        assert_eq!(r.total_bytes(), bytes.len());

        let bytes = sample(None);
        let r = decode(&bytes).unwrap();
        assert!(r.header.is_tombstone());
        assert_eq!(r.value, None);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample(Some(b"hello"));
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                match decode(&b) {
                    Err(_) => {}
                    Ok(r) => panic!("flip at byte {i} bit {bit} decoded as {r:?}"),
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample(Some(b"hello"));
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "len {len}");
        }
    }
}

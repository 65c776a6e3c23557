//! Segment files and their hint files: names, the segment header, scanning a
//! segment's records (with torn-tail and corruption detection), and hint encoding.
//!
//! A segment is `{id:016x}.seg`: a 32-byte header then records back to back. When a
//! segment is sealed a hint `{id:016x}.hint` lists every record's key, seq, place and
//! the versions it replaces, so opening the partition does not read the segment.

use crate::record::{self, Record, RecordError, RecordHeader, RECORD_FORMAT_V1, RECORD_MAGIC};
use thiserror::Error;

pub const SEGMENT_MAGIC: &[u8; 8] = b"RKVSEG\x00\x01";
pub const SEGMENT_HEADER_BYTES: usize = 32;
pub const HINT_MAGIC: &[u8; 8] = b"RKVHNT\x00\x01";
const HINT_HEADER_BYTES: usize = 32;
const HINT_ENTRY_FIXED_BYTES: usize = 36;

pub fn segment_name(id: u64) -> String {
    format!("{id:016x}.seg")
}
pub fn hint_name(id: u64) -> String {
    format!("{id:016x}.hint")
}
/// Parses `{id:016x}.seg` / `.hint` names.
pub fn parse_name(name: &str) -> Option<(u64, &'static str)> {
    let (stem, kind) = if let Some(stem) = name.strip_suffix(".seg") {
        (stem, "seg")
    } else if let Some(stem) = name.strip_suffix(".hint") {
        (stem, "hint")
    } else {
        return None;
    };
    // exactly the names segment_name/hint_name write: from_str_radix alone takes a
    // leading '+' and upper case, names that then open a different file (or the same
    // segment twice)
    if stem.len() != 16 || !stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(stem, 16).ok().map(|id| (id, kind))
}

/// The segment header: magic, id, partition number, CRC.
///
/// ```text
/// 0  [u8; 8] magic "RKVSEG\0\x01" (last byte: segment format version)
/// 8  u64     segment id
/// 16 u64     partition number
/// 24 u32     reserved, zero
/// 28 u32     CRC32 of bytes 0..28
/// ```
pub fn encode_segment_header(id: u64, partition: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut out = [0u8; SEGMENT_HEADER_BYTES];
    out[0..8].copy_from_slice(SEGMENT_MAGIC);
    out[8..16].copy_from_slice(&id.to_le_bytes());
    out[16..24].copy_from_slice(&partition.to_le_bytes());
    let crc = crc32fast::hash(&out[0..28]);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
    out
}

#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum SegmentError {
    #[error("segment header is {0} bytes, need 32")]
    ShortHeader(usize),
    #[error("bad segment magic")]
    BadMagic,
    #[error("segment header CRC mismatch")]
    HeaderCrc,
    #[error("segment header names id {found:#x}, file name says {expected:#x}")]
    WrongId { expected: u64, found: u64 },
}

pub fn decode_segment_header(buf: &[u8]) -> Result<(u64, u64), SegmentError> {
    if buf.len() < SEGMENT_HEADER_BYTES {
        return Err(SegmentError::ShortHeader(buf.len()));
    }
    if &buf[0..8] != SEGMENT_MAGIC {
        return Err(SegmentError::BadMagic);
    }
    let crc = u32::from_le_bytes(buf[28..32].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&buf[0..28]) {
        return Err(SegmentError::HeaderCrc);
    }
    Ok((record::u64_at(buf, 8), record::u64_at(buf, 16)))
}

/// What the log keeps of a record to rebuild the keydir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub offset: u64,
    pub header: RecordHeader,
    pub key: Vec<u8>,
    pub replaced: Vec<u64>,
}

impl Scanned {
    fn from_record(offset: u64, r: &Record<'_>) -> Self {
        Self {
            offset,
            header: r.header,
            key: r.key.to_vec(),
            replaced: r.replaced().collect(),
        }
    }
}

/// A stretch of bytes that held no valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRange {
    pub start: u64,
    pub end: u64,
    pub error: String,
}

/// The outcome of reading a segment front to back.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// Valid records of complete batches, in log order.
    pub records: Vec<Scanned>,
    /// End of the last valid record of a complete batch.
    pub valid_end: u64,
    /// Bad bytes followed by valid records: corruption inside the segment.
    pub corrupt: Vec<BadRange>,
    /// Bad, non-zero bytes at the end with nothing valid after them (a torn write).
    pub torn_tail: Option<BadRange>,
    /// Records of a batch whose last record never made it, dropped.
    pub incomplete_batch_records: usize,
    /// The header could not be read: nothing in the file is trusted.
    pub header_error: Option<SegmentError>,
}

/// Scans a whole segment held in memory. Never panics on any input.
pub fn scan(bytes: &[u8], expected_id: u64) -> ScanResult {
    let mut result = ScanResult::default();
    match decode_segment_header(bytes) {
        Ok((id, _)) if id == expected_id => {}
        Ok((found, _)) => {
            result.header_error = Some(SegmentError::WrongId {
                expected: expected_id,
                found,
            });
            return result;
        }
        Err(e) => {
            result.header_error = Some(e);
            return result;
        }
    }
    let mut at = SEGMENT_HEADER_BYTES;
    result.valid_end = at as u64;
    let mut batch: Vec<Scanned> = Vec::new();
    let mut batch_end = at;
    // seqs only grow along a segment; a "record" found after damage with a seq not
    // above the last good one is bytes inside a damaged value, not a record
    let mut last_seq = 0u64;
    // each iteration consumes at least one byte
    while at < bytes.len() {
        match record::decode(&bytes[at..]) {
            Ok(r) => {
                let total = r.total_bytes();
                last_seq = last_seq.max(r.header.seq);
                batch.push(Scanned::from_record(at as u64, &r));
                at += total;
                if !r.header.batch_continues() {
                    result.records.append(&mut batch);
                    batch_end = at;
                    result.valid_end = at as u64;
                }
            }
            Err(err) => {
                let bad_start = at;
                if bytes[at..].iter().all(|&b| b == 0) {
                    // zero padding of the last O_DIRECT block: a clean end
                    break;
                }
                match resync(bytes, at + 1, last_seq) {
                    Some(next) => {
                        result.corrupt.push(BadRange {
                            start: bad_start as u64,
                            end: next as u64,
                            error: err.to_string(),
                        });
                        // the records of a batch before the damage are dropped; records
                        // after it cannot be told apart from a new batch, and the
                        // segment is reported corrupt (needs repair) either way
                        result.incomplete_batch_records += batch.len();
                        batch.clear();
                        at = next;
                    }
                    None => {
                        result.torn_tail = Some(BadRange {
                            start: bad_start as u64,
                            end: bytes.len() as u64,
                            error: err.to_string(),
                        });
                        break;
                    }
                }
            }
        }
    }
    result.incomplete_batch_records += batch.len();
    if !batch.is_empty() {
        result.valid_end = batch_end as u64;
    }
    result
}

/// The next offset at or after `from` where a whole valid record with a seq above
/// `last_seq` starts.
fn resync(bytes: &[u8], from: usize, last_seq: u64) -> Option<usize> {
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut at = from;
    while at + record::RECORD_HEADER_BYTES <= bytes.len() {
        if bytes[at] == magic[0]
            && bytes[at + 1] == magic[1]
            && bytes[at + 2] == RECORD_FORMAT_V1
            && record::decode(&bytes[at..]).is_ok_and(|r| r.header.seq > last_seq)
        {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Encodes a hint file for a sealed segment of `segment_len` bytes.
///
/// ```text
/// header:  [u8; 8] magic "RKVHNT\0\x01" | u64 segment id | u64 segment_len | u64 entry count
/// entry:   u64 seq | u64 timestamp_ms | u64 offset | u32 record len | u8 flags | u8 0
///          | u16 key_len | u16 replaced_count | u16 0 | key | replaced seqs (u64 each)
/// trailer: u32 CRC32 of everything before it
/// ```
pub fn encode_hint(id: u64, segment_len: u64, records: &[Scanned]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HINT_HEADER_BYTES + records.len() * 64 + 4);
    out.extend_from_slice(HINT_MAGIC);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&segment_len.to_le_bytes());
    out.extend_from_slice(&(records.len() as u64).to_le_bytes());
    for r in records {
        out.extend_from_slice(&r.header.seq.to_le_bytes());
        out.extend_from_slice(&r.header.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&r.offset.to_le_bytes());
        out.extend_from_slice(&(r.header.total_bytes() as u32).to_le_bytes());
        out.push(r.header.flags);
        out.push(0);
        out.extend_from_slice(&(r.key.len() as u16).to_le_bytes());
        out.extend_from_slice(&(r.replaced.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&r.key);
        for seq in &r.replaced {
            out.extend_from_slice(&seq.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HintError {
    #[error("hint file truncated")]
    Truncated,
    #[error("bad hint magic")]
    BadMagic,
    #[error("hint CRC mismatch")]
    Crc,
    #[error("hint is for segment {found:#x}, expected {expected:#x}")]
    WrongSegment { expected: u64, found: u64 },
    #[error("hint describes {hinted} segment bytes, the segment has {actual}")]
    LengthMismatch { hinted: u64, actual: u64 },
    #[error("hint entry out of bounds: {0}")]
    OutOfBounds(#[from] RecordError),
}

/// Decodes a hint file, checking it against the segment it describes.
pub fn decode_hint(buf: &[u8], id: u64, segment_len: u64) -> Result<Vec<Scanned>, HintError> {
    if buf.len() < HINT_HEADER_BYTES + 4 {
        return Err(HintError::Truncated);
    }
    if &buf[0..8] != HINT_MAGIC {
        return Err(HintError::BadMagic);
    }
    let (body, trailer) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(trailer.try_into().expect("4 bytes")) {
        return Err(HintError::Crc);
    }
    let found = record::u64_at(body, 8);
    if found != id {
        return Err(HintError::WrongSegment {
            expected: id,
            found,
        });
    }
    let hinted = record::u64_at(body, 16);
    if hinted != segment_len {
        return Err(HintError::LengthMismatch {
            hinted,
            actual: segment_len,
        });
    }
    let count = record::u64_at(body, 24);
    let mut at = HINT_HEADER_BYTES;
    let mut entries = Vec::new();
    for _ in 0..count {
        if body.len() < at + HINT_ENTRY_FIXED_BYTES {
            return Err(HintError::Truncated);
        }
        let e = &body[at..at + HINT_ENTRY_FIXED_BYTES];
        let seq = record::u64_at(e, 0);
        let timestamp_ms = record::u64_at(e, 8);
        let offset = record::u64_at(e, 16);
        let len = u32::from_le_bytes(e[24..28].try_into().expect("4 bytes"));
        let flags = e[28];
        let key_len = u16::from_le_bytes([e[30], e[31]]) as usize;
        let replaced_count = u16::from_le_bytes([e[32], e[33]]) as usize;
        at += HINT_ENTRY_FIXED_BYTES;
        if replaced_count > record::REPLACED_COUNT_MAX {
            return Err(RecordError::OutOfBounds("replaced_count").into());
        }
        let need = key_len + replaced_count * 8;
        if body.len() < at + need {
            return Err(HintError::Truncated);
        }
        let key = body[at..at + key_len].to_vec();
        at += key_len;
        let replaced = body[at..at + replaced_count * 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        at += replaced_count * 8;
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > segment_len)
        {
            return Err(RecordError::OutOfBounds("hint entry beyond segment end").into());
        }
        let fixed = RECORD_HEADER_FIXED + key_len + replaced_count * 8;
        if (len as usize) < fixed {
            return Err(RecordError::OutOfBounds("hint record length").into());
        }
        entries.push(Scanned {
            offset,
            header: RecordHeader {
                flags,
                seq,
                timestamp_ms,
                key_len: key_len as u16,
                replaced_count: replaced_count as u16,
                // the split of the rest between version and value is not needed to
                // rebuild the keydir; reads decode the record itself
                version_len: 0,
                value_len: len - fixed as u32,
            },
            key,
            replaced,
        });
    }
    if at != body.len() {
        return Err(HintError::Truncated);
    }
    Ok(entries)
}

const RECORD_HEADER_FIXED: usize = record::RECORD_HEADER_BYTES;

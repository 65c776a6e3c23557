//! Protocol v1: frames and every client message, checked then parsed without copying.
//!
//! A frame is a 16-byte header and a body (all integers little-endian; drawn byte by
//! byte in `docs/protocol.md`):
//!
//! ```text
//! 0  u32 frame_len   whole frame, header included (16 ..= frame limit)
//! 4  u8  version     protocol version (1)
//! 5  u8  opcode      client requests 0x01..=0x3F, replies 0x40..=0x7F,
//!                    peer requests 0x80..=0xBF, peer replies 0xC0..=0xFE
//!                    (the cluster messages, `crate::peer`)
//! 6  u16 flags       0 from clients; bit 0 is `peer::FLAG_FORWARDED` (a client request
//!                    a node forwards to the key's coordinator); other bits zero, ignored
//! 8  u64 request_id  chosen by the client, echoed in the reply
//! 16 body
//! ```
//!
//! [`check_frame`] looks at a buffer and says whether it starts with a whole frame (and
//! how long it is) before anything is parsed; [`Request::parse`] and
//! [`Reply::parse`] then borrow keys, contexts and values from the buffer.

use thiserror::Error;

pub const PROTOCOL_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 16;
/// Default largest frame a server accepts (a 4 MiB value plus key, context, header).
pub const FRAME_BYTES_MAX_DEFAULT: usize = (4 << 20) + 64 * 1024;

pub mod opcode {
    pub const HELLO: u8 = 0x01;
    pub const PING: u8 = 0x02;
    pub const GET: u8 = 0x03;
    pub const PUT: u8 = 0x04;
    pub const DELETE: u8 = 0x05;
    pub const HELLO_OK: u8 = 0x41;
    pub const PONG: u8 = 0x42;
    pub const GET_OK: u8 = 0x43;
    pub const PUT_OK: u8 = 0x44;
    pub const DELETE_OK: u8 = 0x45;
    pub const ERROR: u8 = 0x7F;
    /// First opcode of the range reserved for node-to-node messages.
    pub const PEER_FIRST: u8 = 0x80;
}

/// Error codes carried by an ERROR reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be parsed; the connection stays usable.
    BadRequest = 1,
    UnknownOpcode = 2,
    UnsupportedVersion = 3,
    FrameTooLarge = 4,
    KeyTooLong = 5,
    ValueTooLarge = 6,
    BadContext = 7,
    TooManyInFlight = 8,
    /// The storage refused (failed sync, closed partition); retry elsewhere or later.
    Unavailable = 9,
    Internal = 10,
    /// Fewer than W acknowledgements in time: the write may or may not be applied.
    NotConfirmed = 11,
    ShuttingDown = 12,
    Timeout = 13,
    /// The key has as many siblings as the server allows: put with the context of a
    /// get to resolve them.
    TooManySiblings = 14,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        use ErrorCode::*;
        Some(match v {
            1 => BadRequest,
            2 => UnknownOpcode,
            3 => UnsupportedVersion,
            4 => FrameTooLarge,
            5 => KeyTooLong,
            6 => ValueTooLarge,
            7 => BadContext,
            8 => TooManyInFlight,
            9 => Unavailable,
            10 => Internal,
            11 => NotConfirmed,
            12 => ShuttingDown,
            13 => Timeout,
            14 => TooManySiblings,
            _ => return None,
        })
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame length {0} is shorter than the 16-byte header")]
    TooShort(u32),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
}

impl FrameError {
    /// Whether the stream can still be read after this error (the frame's length was
    /// trustworthy, so it can be skipped).
    pub fn resynchronisable(&self) -> bool {
        matches!(self, FrameError::UnsupportedVersion(_))
    }
}

/// A frame header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub frame_len: u32,
    pub version: u8,
    pub opcode: u8,
    pub flags: u16,
    pub request_id: u64,
}

/// `Ok(None)`: not a whole frame yet. `Ok(Some(len))`: the buffer starts with a frame
/// of `len` bytes. `Err`: the stream is broken or the frame is refused.
pub fn check_frame(buf: &[u8], frame_bytes_max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if (len as usize) < HEADER_BYTES {
        return Err(FrameError::TooShort(len));
    }
    if len as usize > frame_bytes_max {
        return Err(FrameError::TooLarge {
            len: len as usize,
            max: frame_bytes_max,
        });
    }
    if buf.len() >= 5 && buf[4] != PROTOCOL_VERSION {
        // the length is still trusted so the frame can be skipped and answered
        if buf.len() >= len as usize {
            return Err(FrameError::UnsupportedVersion(buf[4]));
        }
        return Ok(None);
    }
    if buf.len() < len as usize {
        return Ok(None);
    }
    Ok(Some(len as usize))
}

/// The frames of a buffer holding whole frames back to back (each one `check_frame`
/// accepted, such as a batch one shard forwards to another), in order. Stops at the
/// first length that is shorter than a header or runs past the end, so a damaged
/// buffer yields only the whole frames before the damage.
pub fn frames(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < HEADER_BYTES {
            return None;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < HEADER_BYTES || len > rest.len() {
            rest = &[];
            return None;
        }
        let (frame, tail) = rest.split_at(len);
        rest = tail;
        Some(frame)
    })
}

/// Decodes the header of a frame `check_frame` accepted (or any 16+ bytes).
pub fn header(frame: &[u8]) -> Header {
    assert!(frame.len() >= HEADER_BYTES);
    Header {
        frame_len: u32::from_le_bytes(frame[0..4].try_into().expect("4")),
        version: frame[4],
        opcode: frame[5],
        flags: u16::from_le_bytes([frame[6], frame[7]]),
        request_id: u64::from_le_bytes(frame[8..16].try_into().expect("8")),
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    #[error("body truncated: {0}")]
    Truncated(&'static str),
    #[error("{0} trailing bytes after the body")]
    Trailing(usize),
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("field out of range: {0}")]
    OutOfRange(&'static str),
}

impl ParseError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::UnknownOpcode(_) => ErrorCode::UnknownOpcode,
            _ => ErrorCode::BadRequest,
        }
    }
}

/// A bounds-checked little-endian reader over a body.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ParseError> {
        let end = self.at.checked_add(n).ok_or(ParseError::Truncated(what))?;
        let out = self
            .buf
            .get(self.at..end)
            .ok_or(ParseError::Truncated(what))?;
        self.at = end;
        Ok(out)
    }
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ParseError> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    pub(crate) fn bytes16(&mut self, what: &'static str) -> Result<&'a [u8], ParseError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
    pub(crate) fn bytes32(&mut self, what: &'static str) -> Result<&'a [u8], ParseError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    pub(crate) fn finish(self) -> Result<(), ParseError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            n => Err(ParseError::Trailing(n)),
        }
    }
}

/// A client request, borrowing from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// Version negotiation: the client speaks versions `min..=max`.
    Hello {
        min_version: u8,
        max_version: u8,
    },
    Ping,
    /// `r`: replies to wait for (0: the cluster default).
    Get {
        r: u8,
        key: &'a [u8],
    },
    /// `w`: acknowledgements to wait for (0: the cluster default). An empty context
    /// means "none".
    Put {
        w: u8,
        key: &'a [u8],
        context: &'a [u8],
        value: &'a [u8],
    },
    Delete {
        w: u8,
        key: &'a [u8],
        context: &'a [u8],
    },
}

impl<'a> Request<'a> {
    /// Parses the body of a whole frame (`frame` includes the header).
    pub fn parse(frame: &'a [u8]) -> Result<(Header, Request<'a>), ParseError> {
        if frame.len() < HEADER_BYTES {
            return Err(ParseError::Truncated("header"));
        }
        let h = header(frame);
        let mut r = Reader::new(&frame[HEADER_BYTES..]);
        let req = match h.opcode {
            opcode::HELLO => Request::Hello {
                min_version: r.u8("min_version")?,
                max_version: r.u8("max_version")?,
            },
            opcode::PING => Request::Ping,
            opcode::GET => Request::Get {
                r: r.u8("r")?,
                key: r.bytes16("key")?,
            },
            opcode::PUT => Request::Put {
                w: r.u8("w")?,
                key: r.bytes16("key")?,
                context: r.bytes16("context")?,
                value: r.bytes32("value")?,
            },
            opcode::DELETE => Request::Delete {
                w: r.u8("w")?,
                key: r.bytes16("key")?,
                context: r.bytes16("context")?,
            },
            other => return Err(ParseError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok((h, req))
    }

    pub fn opcode(&self) -> u8 {
        match self {
            Request::Hello { .. } => opcode::HELLO,
            Request::Ping => opcode::PING,
            Request::Get { .. } => opcode::GET,
            Request::Put { .. } => opcode::PUT,
            Request::Delete { .. } => opcode::DELETE,
        }
    }

    /// The key the request is about, if any (routing).
    pub fn key(&self) -> Option<&'a [u8]> {
        match self {
            Request::Get { key, .. } | Request::Put { key, .. } | Request::Delete { key, .. } => {
                Some(key)
            }
            _ => None,
        }
    }

    /// Appends the whole frame to `out`.
    pub fn encode(&self, request_id: u64, out: &mut Vec<u8>) {
        let start = begin_frame(out, self.opcode(), request_id);
        match *self {
            Request::Hello {
                min_version,
                max_version,
            } => {
                out.push(min_version);
                out.push(max_version);
            }
            Request::Ping => {}
            Request::Get { r, key } => {
                out.push(r);
                put_bytes16(out, key);
            }
            Request::Put {
                w,
                key,
                context,
                value,
            } => {
                out.push(w);
                put_bytes16(out, key);
                put_bytes16(out, context);
                put_bytes32(out, value);
            }
            Request::Delete { w, key, context } => {
                out.push(w);
                put_bytes16(out, key);
                put_bytes16(out, context);
            }
        }
        end_frame(out, start);
    }
}

/// What a HELLO is answered with: enough for a shard-aware client to route by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloOk {
    pub version: u8,
    pub node_id: u64,
    /// Partitions in the ring (Q); a key's partition is `ringkv_ring::partition_for_key`.
    pub partitions: u32,
    /// Shards of this node; partition p is owned by shard `p % shards`.
    pub shards: u16,
    /// The shard this connection is served by.
    pub shard: u16,
    /// Shard s listens on `shard_port_base + s` (0: no shard ports).
    pub shard_port_base: u16,
    pub frame_bytes_max: u32,
    pub in_flight_max: u32,
}

/// A reply, borrowing from the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    HelloOk(HelloOk),
    Pong,
    /// Values of the live siblings (tombstones left out) and the context covering all.
    GetOk {
        context: &'a [u8],
        values: Vec<&'a [u8]>,
    },
    PutOk {
        context: &'a [u8],
        siblings: u16,
    },
    DeleteOk,
    Error {
        code: u16,
        message: &'a [u8],
    },
}

impl<'a> Reply<'a> {
    pub fn parse(frame: &'a [u8]) -> Result<(Header, Reply<'a>), ParseError> {
        if frame.len() < HEADER_BYTES {
            return Err(ParseError::Truncated("header"));
        }
        let h = header(frame);
        let mut r = Reader::new(&frame[HEADER_BYTES..]);
        let reply = match h.opcode {
            opcode::HELLO_OK => Reply::HelloOk(HelloOk {
                version: r.u8("version")?,
                node_id: r.u64("node_id")?,
                partitions: r.u32("partitions")?,
                shards: r.u16("shards")?,
                shard: r.u16("shard")?,
                shard_port_base: r.u16("shard_port_base")?,
                frame_bytes_max: r.u32("frame_bytes_max")?,
                in_flight_max: r.u32("in_flight_max")?,
            }),
            opcode::PONG => Reply::Pong,
            opcode::GET_OK => {
                let context = r.bytes16("context")?;
                let count = r.u16("sibling count")? as usize;
                let mut values = Vec::with_capacity(count.min(64));
                for _ in 0..count {
                    values.push(r.bytes32("value")?);
                }
                Reply::GetOk { context, values }
            }
            opcode::PUT_OK => Reply::PutOk {
                context: r.bytes16("context")?,
                siblings: r.u16("siblings")?,
            },
            opcode::DELETE_OK => Reply::DeleteOk,
            opcode::ERROR => Reply::Error {
                code: r.u16("code")?,
                message: r.bytes16("message")?,
            },
            other => return Err(ParseError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok((h, reply))
    }
}

/// Starts a frame in `out` (header with a zero length); returns where it starts.
pub fn begin_frame(out: &mut Vec<u8>, opcode: u8, request_id: u64) -> usize {
    let start = out.len();
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(PROTOCOL_VERSION);
    out.push(opcode);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&request_id.to_le_bytes());
    start
}

/// Writes the frame length of the frame started at `start`.
pub fn end_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

pub fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) {
    assert!(b.len() <= u16::MAX as usize, "field longer than u16");
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

pub fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    assert!(b.len() <= u32::MAX as usize, "field longer than u32");
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Reply encoders: each appends one whole frame to `out` (a reused buffer: no
/// allocation in the steady state).
pub mod encode {
    use super::*;

    pub fn hello_ok(out: &mut Vec<u8>, request_id: u64, h: &HelloOk) {
        let s = begin_frame(out, opcode::HELLO_OK, request_id);
        out.push(h.version);
        out.extend_from_slice(&h.node_id.to_le_bytes());
        out.extend_from_slice(&h.partitions.to_le_bytes());
        out.extend_from_slice(&h.shards.to_le_bytes());
        out.extend_from_slice(&h.shard.to_le_bytes());
        out.extend_from_slice(&h.shard_port_base.to_le_bytes());
        out.extend_from_slice(&h.frame_bytes_max.to_le_bytes());
        out.extend_from_slice(&h.in_flight_max.to_le_bytes());
        end_frame(out, s);
    }

    pub fn pong(out: &mut Vec<u8>, request_id: u64) {
        let s = begin_frame(out, opcode::PONG, request_id);
        end_frame(out, s);
    }

    pub fn get_ok<'v>(
        out: &mut Vec<u8>,
        request_id: u64,
        context: &[u8],
        values: impl ExactSizeIterator<Item = &'v [u8]>,
    ) {
        let s = begin_frame(out, opcode::GET_OK, request_id);
        put_bytes16(out, context);
        // the server caps siblings far below this; a count that does not fit is a bug
        assert!(
            values.len() <= u16::MAX as usize,
            "more siblings than a GET_OK holds"
        );
        out.extend_from_slice(&(values.len() as u16).to_le_bytes());
        for v in values {
            put_bytes32(out, v);
        }
        end_frame(out, s);
    }

    pub fn put_ok(out: &mut Vec<u8>, request_id: u64, context: &[u8], siblings: u16) {
        let s = begin_frame(out, opcode::PUT_OK, request_id);
        put_bytes16(out, context);
        out.extend_from_slice(&siblings.to_le_bytes());
        end_frame(out, s);
    }

    pub fn delete_ok(out: &mut Vec<u8>, request_id: u64) {
        let s = begin_frame(out, opcode::DELETE_OK, request_id);
        end_frame(out, s);
    }

    pub fn error(out: &mut Vec<u8>, request_id: u64, code: ErrorCode, message: &str) {
        let s = begin_frame(out, opcode::ERROR, request_id);
        out.extend_from_slice(&(code as u16).to_le_bytes());
        let m = &message.as_bytes()[..message.len().min(1024)];
        put_bytes16(out, m);
        end_frame(out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_check() {
        let reqs = [
            Request::Hello {
                min_version: 1,
                max_version: 1,
            },
            Request::Ping,
            Request::Get { r: 2, key: b"k" },
            Request::Put {
                w: 0,
                key: b"key",
                context: b"ctx",
                value: b"value",
            },
            Request::Delete {
                w: 3,
                key: b"key",
                context: b"",
            },
        ];
        let mut buf = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            r.encode(i as u64, &mut buf);
        }
        let mut at = 0;
        for (i, want) in reqs.iter().enumerate() {
            let len = check_frame(&buf[at..], 1 << 20).unwrap().unwrap();
            let (h, got) = Request::parse(&buf[at..at + len]).unwrap();
            assert_eq!(h.request_id, i as u64);
            assert_eq!(&got, want);
            at += len;
        }
        assert_eq!(at, buf.len());
        // every strict prefix of a frame is incomplete, never an error
        let mut one = Vec::new();
        reqs[3].encode(9, &mut one);
        for n in 0..one.len() {
            assert_eq!(check_frame(&one[..n], 1 << 20), Ok(None));
        }
    }

    #[test]
    fn frames_yields_whole_frames_and_stops_at_damage() {
        let mut buf = Vec::new();
        Request::Ping.encode(1, &mut buf);
        Request::Get { r: 0, key: b"k" }.encode(2, &mut buf);
        let ids: Vec<u64> = frames(&buf).map(|f| header(f).request_id).collect();
        assert_eq!(ids, [1, 2]);
        // every cut yields the whole frames before it, never a partial one
        for n in 0..buf.len() {
            let whole = frames(&buf[..n]).count();
            assert_eq!(
                whole,
                usize::from(n >= HEADER_BYTES) + usize::from(n == buf.len())
            );
        }
        // a length shorter than a header ends the walk instead of looping
        let mut bad = buf.clone();
        bad[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(frames(&bad).count(), 1);
    }

    #[test]
    fn limits_and_versions_are_refused() {
        let mut f = Vec::new();
        Request::Ping.encode(1, &mut f);
        assert_eq!(
            check_frame(&f, 8),
            Err(FrameError::TooLarge { len: 16, max: 8 })
        );
        f[4] = 9;
        assert_eq!(
            check_frame(&f, 1 << 20),
            Err(FrameError::UnsupportedVersion(9))
        );
        let short = [3u8, 0, 0, 0, 1];
        assert_eq!(check_frame(&short, 1 << 20), Err(FrameError::TooShort(3)));
    }
}

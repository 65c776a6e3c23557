//! Cluster messages: the peer messages nodes send each other (opcodes `0x80..=0xBF`,
//! replies `0xC0..=0xFE`) and the cluster admin requests a client sends to one node
//! (`STATUS`, `JOIN`, `LEAVE`, `STATS`). Same frame header as every client message; bodies are
//! laid out in `docs/protocol.md`, section "Cluster messages".
//!
//! A client request a node forwards to the key's coordinator travels as the client's own
//! frame with [`FLAG_FORWARDED`] set in the header flags, so the receiver coordinates it
//! itself instead of forwarding it again, and the reply is the ordinary client reply.

use crate::protocol::{begin_frame, end_frame, put_bytes16, put_bytes32, ParseError, Reader};
use crate::protocol::{header, Header, HEADER_BYTES};

/// Header flag of a client request forwarded by another node: coordinate it here.
pub const FLAG_FORWARDED: u16 = 0x0001;

pub mod opcode {
    /// Admin (client range): this node's view of the cluster, as JSON.
    pub const STATUS: u8 = 0x06;
    /// Admin: ask this node to join the cluster of the seed address in the body.
    pub const JOIN: u8 = 0x07;
    /// Admin: ask this node to leave its cluster.
    pub const LEAVE: u8 = 0x08;
    /// Admin: this node's (or one shard's) counters and latency histograms.
    pub const STATS: u8 = 0x09;
    pub const STATUS_OK: u8 = 0x46;
    pub const JOIN_OK: u8 = 0x47;
    pub const LEAVE_OK: u8 = 0x48;
    pub const STATS_OK: u8 = 0x49;

    pub const REPLICA_PUT: u8 = 0x81;
    pub const REPLICA_GET: u8 = 0x82;
    pub const GOSSIP: u8 = 0x83;
    pub const JOIN_REQUEST: u8 = 0x84;
    pub const KEY_COUNT: u8 = 0x85;
    pub const REPLICA_PUT_OK: u8 = 0xC1;
    pub const REPLICA_GET_OK: u8 = 0xC2;
    pub const GOSSIP_OK: u8 = 0xC3;
    pub const JOIN_ACCEPT: u8 = 0xC4;
    pub const KEY_COUNT_OK: u8 = 0xC5;
}

/// Whether `op` is a cluster request this module parses.
pub fn is_cluster_opcode(op: u8) -> bool {
    matches!(
        op,
        opcode::STATUS
            | opcode::JOIN
            | opcode::LEAVE
            | opcode::STATS
            | opcode::REPLICA_PUT
            | opcode::REPLICA_GET
            | opcode::GOSSIP
            | opcode::JOIN_REQUEST
            | opcode::KEY_COUNT
    )
}

/// One stored version on the wire: the opaque version blob and the value (`None`: a
/// tombstone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireVersion<'a> {
    pub version: &'a [u8],
    pub value: Option<&'a [u8]>,
}

/// A peer address (a member's, or a seed's) as a socket address: `IP:port` only. Nodes
/// never look names up, as that is a blocking call on a shard's thread; members
/// advertise `IP:port`, so a name can only come from a bad record or request.
pub fn peer_addr(addr: &str) -> Result<std::net::SocketAddr, String> {
    addr.parse()
        .map_err(|_| format!("{addr}: a peer address must be IP:port (names are not looked up)"))
}

impl WireVersion<'_> {
    /// Bytes it takes in a frame (`write_version`).
    pub fn encoded_len(&self) -> usize {
        2 + self.version.len() + 1 + 4 + self.value.map_or(0, <[u8]>::len)
    }
}

const VERSION_FLAG_TOMBSTONE: u8 = 1;

/// A cluster request, borrowing from its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterRequest<'a> {
    Status,
    /// Join the cluster that `seed` (`host:port`) belongs to.
    Join {
        seed: &'a [u8],
    },
    Leave,
    /// The node's counters and latency histograms, summed over its shards; with
    /// `shard_only`, those of the shard that reads the request alone.
    Stats {
        shard_only: bool,
    },
    /// Store `version` of `key` (partition `partition`) under the sibling rules;
    /// `hint_for` (0: none) is the home node this replica stands in for.
    ReplicaPut {
        partition: u32,
        hint_for: u64,
        key: &'a [u8],
        version: WireVersion<'a>,
    },
    ReplicaGet {
        partition: u32,
        key: &'a [u8],
    },
    /// One gossip message (`ringkv_ring::GossipMessage::encode`) from node `from`.
    Gossip {
        from: u64,
        message: &'a [u8],
    },
    /// A node asks a member to be admitted to its cluster.
    JoinRequest {
        id: u64,
        shards: u32,
        weight: u32,
        addr: &'a [u8],
        zone: &'a [u8],
    },
    /// How many keys the receiver stores in `partition` (hints not counted).
    KeyCount {
        partition: u32,
    },
}

impl<'a> ClusterRequest<'a> {
    pub fn parse(frame: &'a [u8]) -> Result<(Header, ClusterRequest<'a>), ParseError> {
        if frame.len() < HEADER_BYTES {
            return Err(ParseError::Truncated("header"));
        }
        let h = header(frame);
        let mut r = Reader::new(&frame[HEADER_BYTES..]);
        let req = match h.opcode {
            opcode::STATUS => ClusterRequest::Status,
            opcode::JOIN => ClusterRequest::Join {
                seed: r.bytes16("seed")?,
            },
            opcode::LEAVE => ClusterRequest::Leave,
            opcode::STATS => ClusterRequest::Stats {
                shard_only: match r.u8("scope")? {
                    0 => false,
                    1 => true,
                    _ => return Err(ParseError::OutOfRange("scope (0: node, 1: shard)")),
                },
            },
            opcode::REPLICA_PUT => ClusterRequest::ReplicaPut {
                partition: r.u32("partition")?,
                hint_for: r.u64("hint_for")?,
                key: r.bytes16("key")?,
                version: read_version(&mut r)?,
            },
            opcode::REPLICA_GET => ClusterRequest::ReplicaGet {
                partition: r.u32("partition")?,
                key: r.bytes16("key")?,
            },
            opcode::GOSSIP => ClusterRequest::Gossip {
                from: r.u64("from")?,
                message: r.bytes32("message")?,
            },
            opcode::JOIN_REQUEST => ClusterRequest::JoinRequest {
                id: r.u64("id")?,
                shards: r.u32("shards")?,
                weight: r.u32("weight")?,
                addr: r.bytes16("addr")?,
                zone: r.bytes16("zone")?,
            },
            opcode::KEY_COUNT => ClusterRequest::KeyCount {
                partition: r.u32("partition")?,
            },
            other => return Err(ParseError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok((h, req))
    }

    /// The partition a replica message is about (the shard that owns it runs it).
    pub fn partition(&self) -> Option<u32> {
        match self {
            ClusterRequest::ReplicaPut { partition, .. }
            | ClusterRequest::ReplicaGet { partition, .. }
            | ClusterRequest::KeyCount { partition } => Some(*partition),
            _ => None,
        }
    }

    fn opcode(&self) -> u8 {
        match self {
            ClusterRequest::Status => opcode::STATUS,
            ClusterRequest::Join { .. } => opcode::JOIN,
            ClusterRequest::Leave => opcode::LEAVE,
            ClusterRequest::Stats { .. } => opcode::STATS,
            ClusterRequest::ReplicaPut { .. } => opcode::REPLICA_PUT,
            ClusterRequest::ReplicaGet { .. } => opcode::REPLICA_GET,
            ClusterRequest::Gossip { .. } => opcode::GOSSIP,
            ClusterRequest::JoinRequest { .. } => opcode::JOIN_REQUEST,
            ClusterRequest::KeyCount { .. } => opcode::KEY_COUNT,
        }
    }

    /// Appends the whole frame to `out`.
    pub fn encode(&self, request_id: u64, out: &mut Vec<u8>) {
        let start = begin_frame(out, self.opcode(), request_id);
        match self {
            ClusterRequest::Status | ClusterRequest::Leave => {}
            ClusterRequest::Join { seed } => put_bytes16(out, seed),
            ClusterRequest::Stats { shard_only } => out.push(u8::from(*shard_only)),
            ClusterRequest::ReplicaPut {
                partition,
                hint_for,
                key,
                version,
            } => {
                out.extend_from_slice(&partition.to_le_bytes());
                out.extend_from_slice(&hint_for.to_le_bytes());
                put_bytes16(out, key);
                write_version(out, version);
            }
            ClusterRequest::ReplicaGet { partition, key } => {
                out.extend_from_slice(&partition.to_le_bytes());
                put_bytes16(out, key);
            }
            ClusterRequest::Gossip { from, message } => {
                out.extend_from_slice(&from.to_le_bytes());
                put_bytes32(out, message);
            }
            ClusterRequest::JoinRequest {
                id,
                shards,
                weight,
                addr,
                zone,
            } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&shards.to_le_bytes());
                out.extend_from_slice(&weight.to_le_bytes());
                put_bytes16(out, addr);
                put_bytes16(out, zone);
            }
            ClusterRequest::KeyCount { partition } => {
                out.extend_from_slice(&partition.to_le_bytes())
            }
        }
        end_frame(out, start);
    }
}

fn read_version<'a>(r: &mut Reader<'a>) -> Result<WireVersion<'a>, ParseError> {
    let version = r.bytes16("version")?;
    let flags = r.u8("version flags")?;
    let value = r.bytes32("value")?;
    if flags & !VERSION_FLAG_TOMBSTONE != 0 {
        return Err(ParseError::OutOfRange("version flags"));
    }
    let tombstone = flags & VERSION_FLAG_TOMBSTONE != 0;
    if tombstone && !value.is_empty() {
        return Err(ParseError::OutOfRange("tombstone with a value"));
    }
    Ok(WireVersion {
        version,
        value: (!tombstone).then_some(value),
    })
}

fn write_version(out: &mut Vec<u8>, v: &WireVersion<'_>) {
    put_bytes16(out, v.version);
    out.push(if v.value.is_none() {
        VERSION_FLAG_TOMBSTONE
    } else {
        0
    });
    put_bytes32(out, v.value.unwrap_or(&[]));
}

/// A cluster reply, borrowing from its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterReply<'a> {
    /// JSON bytes (see `docs/protocol.md`).
    StatusOk(&'a [u8]),
    /// A human-readable JSON summary of the join.
    JoinOk(&'a [u8]),
    LeaveOk(&'a [u8]),
    /// Counters and latency histograms (HdrHistogram V2 serialization, ns) by name,
    /// summed over `shards` shards (`crate::stats::NodeStats` decodes them).
    StatsOk {
        shards: u16,
        counters: Vec<(&'a [u8], u64)>,
        latencies: Vec<(&'a [u8], &'a [u8])>,
    },
    /// `applied`: false when the replica already had it (or something newer).
    ReplicaPutOk {
        applied: bool,
    },
    ReplicaGetOk(Vec<WireVersion<'a>>),
    GossipOk,
    /// The admitted node's new membership (`ringkv_ring::Membership::encode`).
    JoinAccept(&'a [u8]),
    KeyCountOk(u64),
}

impl<'a> ClusterReply<'a> {
    /// Parses a cluster reply; an ERROR frame is parsed by `protocol::Reply`.
    pub fn parse(frame: &'a [u8]) -> Result<(Header, ClusterReply<'a>), ParseError> {
        if frame.len() < HEADER_BYTES {
            return Err(ParseError::Truncated("header"));
        }
        let h = header(frame);
        let mut r = Reader::new(&frame[HEADER_BYTES..]);
        let reply = match h.opcode {
            opcode::STATUS_OK => ClusterReply::StatusOk(r.bytes32("status")?),
            opcode::JOIN_OK => ClusterReply::JoinOk(r.bytes32("join")?),
            opcode::LEAVE_OK => ClusterReply::LeaveOk(r.bytes32("leave")?),
            opcode::STATS_OK => {
                let shards = r.u16("shards")?;
                let count = r.u16("counter count")? as usize;
                let mut counters = Vec::with_capacity(count.min(crate::stats::STATS_ENTRIES_MAX));
                for _ in 0..count {
                    counters.push((r.bytes16("counter name")?, r.u64("counter")?));
                }
                let count = r.u16("histogram count")? as usize;
                let mut latencies = Vec::with_capacity(count.min(crate::stats::STATS_ENTRIES_MAX));
                for _ in 0..count {
                    latencies.push((r.bytes16("histogram name")?, r.bytes32("histogram")?));
                }
                ClusterReply::StatsOk {
                    shards,
                    counters,
                    latencies,
                }
            }
            opcode::REPLICA_PUT_OK => ClusterReply::ReplicaPutOk {
                applied: r.u8("applied")? != 0,
            },
            opcode::REPLICA_GET_OK => {
                let count = r.u16("version count")? as usize;
                let mut versions = Vec::with_capacity(count.min(64));
                for _ in 0..count {
                    versions.push(read_version(&mut r)?);
                }
                ClusterReply::ReplicaGetOk(versions)
            }
            opcode::GOSSIP_OK => ClusterReply::GossipOk,
            opcode::JOIN_ACCEPT => ClusterReply::JoinAccept(r.bytes32("membership")?),
            opcode::KEY_COUNT_OK => ClusterReply::KeyCountOk(r.u64("keys")?),
            other => return Err(ParseError::UnknownOpcode(other)),
        };
        r.finish()?;
        Ok((h, reply))
    }

    fn opcode(&self) -> u8 {
        match self {
            ClusterReply::StatusOk(_) => opcode::STATUS_OK,
            ClusterReply::JoinOk(_) => opcode::JOIN_OK,
            ClusterReply::LeaveOk(_) => opcode::LEAVE_OK,
            ClusterReply::StatsOk { .. } => opcode::STATS_OK,
            ClusterReply::ReplicaPutOk { .. } => opcode::REPLICA_PUT_OK,
            ClusterReply::ReplicaGetOk(_) => opcode::REPLICA_GET_OK,
            ClusterReply::GossipOk => opcode::GOSSIP_OK,
            ClusterReply::JoinAccept(_) => opcode::JOIN_ACCEPT,
            ClusterReply::KeyCountOk(_) => opcode::KEY_COUNT_OK,
        }
    }

    /// Appends the whole frame to `out`.
    pub fn encode(&self, request_id: u64, out: &mut Vec<u8>) {
        let start = begin_frame(out, self.opcode(), request_id);
        match self {
            ClusterReply::StatusOk(b)
            | ClusterReply::JoinOk(b)
            | ClusterReply::LeaveOk(b)
            | ClusterReply::JoinAccept(b) => put_bytes32(out, b),
            ClusterReply::StatsOk {
                shards,
                counters,
                latencies,
            } => {
                out.extend_from_slice(&shards.to_le_bytes());
                let count = u16::try_from(counters.len()).expect("at most u16::MAX counters");
                out.extend_from_slice(&count.to_le_bytes());
                for (name, value) in counters {
                    put_bytes16(out, name);
                    out.extend_from_slice(&value.to_le_bytes());
                }
                let count = u16::try_from(latencies.len()).expect("at most u16::MAX histograms");
                out.extend_from_slice(&count.to_le_bytes());
                for (name, h) in latencies {
                    put_bytes16(out, name);
                    put_bytes32(out, h);
                }
            }
            ClusterReply::ReplicaPutOk { applied } => out.push(u8::from(*applied)),
            ClusterReply::ReplicaGetOk(versions) => {
                let count = u16::try_from(versions.len()).expect("at most u16::MAX versions");
                out.extend_from_slice(&count.to_le_bytes());
                for v in versions {
                    write_version(out, v);
                }
            }
            ClusterReply::GossipOk => {}
            ClusterReply::KeyCountOk(keys) => out.extend_from_slice(&keys.to_le_bytes()),
        }
        end_frame(out, start);
    }
}

/// Sets `flags` in the header of the frame at the start of `frame`.
pub fn set_flags(frame: &mut [u8], flags: u16) {
    frame[6..8].copy_from_slice(&flags.to_le_bytes());
}

/// Rewrites the request id of the frame at the start of `frame`.
pub fn set_request_id(frame: &mut [u8], request_id: u64) {
    frame[8..16].copy_from_slice(&request_id.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::check_frame;

    fn round_trip_request(req: ClusterRequest<'_>) {
        let mut out = Vec::new();
        req.encode(42, &mut out);
        assert_eq!(check_frame(&out, 1 << 20), Ok(Some(out.len())));
        let (h, parsed) = ClusterRequest::parse(&out).expect("parse");
        assert_eq!(h.request_id, 42);
        assert_eq!(parsed, req);
        // every strict prefix of the body is refused, never a panic
        for cut in HEADER_BYTES..out.len() {
            let mut short = out[..cut].to_vec();
            end_frame(&mut short, 0);
            assert!(ClusterRequest::parse(&short).is_err());
        }
    }

    fn round_trip_reply(reply: ClusterReply<'_>) {
        let mut out = Vec::new();
        reply.encode(7, &mut out);
        let (h, parsed) = ClusterReply::parse(&out).expect("parse");
        assert_eq!(h.request_id, 7);
        assert_eq!(parsed, reply);
    }

    #[test]
    fn requests_round_trip() {
        round_trip_request(ClusterRequest::Status);
        round_trip_request(ClusterRequest::Stats { shard_only: false });
        round_trip_request(ClusterRequest::Stats { shard_only: true });
        round_trip_request(ClusterRequest::Leave);
        round_trip_request(ClusterRequest::Join {
            seed: b"127.0.0.1:7379",
        });
        round_trip_request(ClusterRequest::ReplicaPut {
            partition: 9,
            hint_for: 3,
            key: b"k",
            version: WireVersion {
                version: b"vvv",
                value: Some(b"value"),
            },
        });
        round_trip_request(ClusterRequest::ReplicaPut {
            partition: 9,
            hint_for: 0,
            key: b"k",
            version: WireVersion {
                version: b"vvv",
                value: None,
            },
        });
        round_trip_request(ClusterRequest::ReplicaGet {
            partition: 1,
            key: b"key",
        });
        round_trip_request(ClusterRequest::Gossip {
            from: 5,
            message: b"gossip",
        });
        round_trip_request(ClusterRequest::JoinRequest {
            id: 4,
            shards: 2,
            weight: 1,
            addr: b"127.0.0.1:1",
            zone: b"",
        });
        round_trip_request(ClusterRequest::KeyCount { partition: 63 });
    }

    #[test]
    fn replies_round_trip() {
        round_trip_reply(ClusterReply::StatusOk(b"{}"));
        round_trip_reply(ClusterReply::StatsOk {
            shards: 2,
            counters: vec![(&b"requests"[..], 7), (&b"errors"[..], 0)],
            latencies: vec![(&b"get"[..], &b"\x1c\x84\x93\x14"[..])],
        });
        round_trip_reply(ClusterReply::JoinOk(b"{}"));
        round_trip_reply(ClusterReply::LeaveOk(b"{}"));
        round_trip_reply(ClusterReply::ReplicaPutOk { applied: true });
        round_trip_reply(ClusterReply::ReplicaGetOk(vec![
            WireVersion {
                version: b"a",
                value: Some(b""),
            },
            WireVersion {
                version: b"b",
                value: None,
            },
        ]));
        round_trip_reply(ClusterReply::GossipOk);
        round_trip_reply(ClusterReply::JoinAccept(b"members"));
        round_trip_reply(ClusterReply::KeyCountOk(12));
    }

    #[test]
    fn encoded_len_is_what_a_version_takes_in_a_frame() {
        let versions = vec![
            WireVersion {
                version: b"clock",
                value: Some(b"value bytes"),
            },
            WireVersion {
                version: b"tomb",
                value: None,
            },
        ];
        let lens: usize = versions.iter().map(WireVersion::encoded_len).sum();
        let mut frame = Vec::new();
        ClusterReply::ReplicaGetOk(versions).encode(1, &mut frame);
        assert_eq!(frame.len(), HEADER_BYTES + 2 + lens);
    }

    #[test]
    fn bad_version_flags_are_refused() {
        let mut out = Vec::new();
        ClusterRequest::ReplicaPut {
            partition: 0,
            hint_for: 0,
            key: b"k",
            version: WireVersion {
                version: b"v",
                value: Some(b"x"),
            },
        }
        .encode(1, &mut out);
        // the flags byte follows partition(4) hint(8) key(2+1) version(2+1)
        let flags_at = HEADER_BYTES + 4 + 8 + 3 + 3;
        out[flags_at] = 0x80;
        assert_eq!(
            ClusterRequest::parse(&out).unwrap_err(),
            ParseError::OutOfRange("version flags")
        );
        out[flags_at] = VERSION_FLAG_TOMBSTONE;
        assert!(ClusterRequest::parse(&out).is_err(), "tombstone with value");
    }
}

//! ringkv-ring: where every key lives and who is in the cluster.
//!
//! **What this crate is.** The pure cluster logic of ringkv (design sections 3 and 6):
//! the stable key hash and the Q equal partitions, the weighted claim of partitions by
//! nodes, preference lists for N replicas plus sloppy-quorum fallbacks, the membership
//! state (a CRDT merged by gossip, with a persistent encoding), and the gossip and
//! failure-detector state machines.
//!
//! **What it is not.** It does no I/O: no sockets, files, clocks, threads or global
//! randomness, and it depends on nothing but `std`. State machines take time as an
//! argument (`now_ms`), draw randomness from a seeded [`rng::Rng`], and hand their
//! output to the caller through `poll_*` methods; the runtime in `engine` and `net`
//! moves the bytes, persists the membership and streams partitions.
//!
//! Modules:
//! - [`hash`]: xxHash64 written out, key -> partition (top bits of the hash).
//! - [`claim`]: the claim algorithm: balanced, weighted, minimal movement.
//! - [`ring`]: the ring of a membership state, preference lists, partition -> shard.
//! - [`membership`]: members, statuses, claim epochs, merge, encode/decode.
//! - [`gossip`]: the gossip state machine (digest, then deltas; seeds).
//! - [`failure`]: the failure-detector state machine (requests and probes).
//! - [`rng`]: SplitMix64, the seeded RNG of the state machines.
//!
//! The formats and the algorithms are described byte by byte in `docs/ring.md`.

pub mod claim;
pub mod failure;
pub mod gossip;
pub mod hash;
pub mod membership;
pub mod ring;
pub mod rng;

pub use claim::{minimum_moves, rebalance, share_bounds, ClaimNode};
pub use failure::{FailureDetector, FailureDetectorConfig, Probe, ReachabilityChange};
pub use gossip::{Gossip, GossipConfig, GossipMessage, GossipStats, OutgoingMessage};
pub use hash::{key_hash, partition_for_hash, partition_for_key, xxh64};
pub use membership::{Member, Membership, MembershipError, NodeId, Status};
pub use ring::{shard_for_partition, PreferenceList, Ring, RingNode};
pub use rng::Rng;

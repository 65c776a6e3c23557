//! ringkv-engine: the node's storage and replication core.
//!
//! What it is: per-partition append-only logs (CRC-checked records, an in-memory
//! keydir, group commit, roll-over with hint files, crash recovery, compaction) over a
//! small storage trait with a glommio DMA backend and a crashing in-memory backend,
//! and the versioning rules (vector clocks, dotted versions, siblings, contexts).
//! The cluster logic (coordinator state machine, replica side, hint store) and a
//! deterministic cluster simulator live in [`cluster`]; the node that runs it all on
//! glommio (shards, connections, peer links, gossip) is [`server`].
//!
//! Modules:
//! - [`record`]: the on-disk record format v1.
//! - [`segment`]: segment and hint files, scanning with torn-tail/corruption detection.
//! - [`storage`]: the storage trait; [`storage::dma`] (glommio) and [`storage::mem`].
//! - [`cluster`]: coordinator state machine, replica side, hinted handoff, simulator.
//! - [`commit_log`]: a shard's commit log: one `fdatasync` per batch of `sync` writes.
//! - [`cache`]: recently written or read records, by seq (reads are O_DIRECT).
//! - [`keydir`]: key -> every live version's location, compact in memory.
//! - [`partition`]: one partition's log, recovery and compaction.
//! - [`sync_group`]: group commit across a shard's partitions (one `syncfs`).
//! - [`version`]: clocks, dotted versions, sibling rules, client contexts.
//! - [`server`]: the node: shards, client connections, and the cluster runtime.

pub mod cache;
pub mod cluster;
pub mod commit_log;
pub mod keydir;
mod notify;
pub mod partition;
pub mod record;
pub mod runtime;
pub mod segment;
pub mod server;
pub mod storage;
pub mod sync_group;
pub mod version;
pub mod versioned;

pub use partition::{
    CompactionReport, Durability, Partition, PartitionConfig, RecoveryReport, StoreError,
    StoredVersion, WriteOp,
};

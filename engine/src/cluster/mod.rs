//! Cluster logic (issue 6): what a node does to replicate a key, without any I/O of its
//! own.
//!
//! - [`coordinator`]: the pure coordinator state machine (sloppy-quorum target choice,
//!   put and get quorums, deadlines, read repair, reconciliation of replies).
//! - [`replica`]: the replica side (`replica_put`, `replica_get`) and the hint store of
//!   hinted handoff, async over any [`Storage`](crate::storage::Storage).
//! - [`sim`]: a deterministic one-thread simulator of whole clusters running this logic
//!   with the ring's gossip and failure detector over a faulty simulated network and
//!   crashing in-memory disks.

pub mod coordinator;
pub mod replica;
pub mod sim;

pub use coordinator::{
    choose_targets, reconcile_replies, Coordinator, CoordinatorOutput, GetResult, OpId, PutResult,
    Target, VersionedValue,
};
pub use replica::{
    hint_delivered, hint_key, parse_hint_key, pending_hint_count, pending_hints, record_hint,
    replica_get, replica_put, Hint, HintStore, HINT_KEY_OVERHEAD,
};

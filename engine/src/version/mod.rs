//! Versioning of keys: which writes a replica keeps, which it drops, and what a client must
//! send back to overwrite what it read. Pure logic: no I/O, no clock reads (time comes in as
//! `now_ms`), values and tombstone flags stay with the storage engine.
//!
//! Why each piece exists:
//! - **Dynamo clocks** ([`VClock`]): a version vector whose actors are *server* node ids,
//!   never client ids (Riak learned that client-id clocks grow without bound). Versions whose
//!   clocks do not descend each other are concurrent and kept as siblings.
//! - **Dotted versions** ([`Version`]): each write carries the single event (`dot`) that made
//!   it apart from the history it had seen (`past`). With plain version vectors, two clients
//!   writing through one coordinator with stale contexts either overwrite each other (lost
//!   write) or pile up false siblings that never collapse; with dots each write replaces
//!   exactly the siblings its context saw, so siblings stay bounded by the truly concurrent
//!   writers ([`coordinate`], [`reconcile`]).
//! - **Actor epochs** ([`ActorId`], [`next_epoch`]): a node that lost a partition's data and
//!   restarted its counters would issue dots that stale replicas already hold with older
//!   data, so its new writes look old and anti-entropy deletes them (Riak's bug kv679). An
//!   actor is (node, epoch) and the epoch moves on whenever local data may have been lost;
//!   [`coordinate`] refuses to reuse an actor whose counters a client has seen beyond the
//!   local data.
//! - **Doomstones**: a delete is a tombstone [`Version`] with a clock like any write, so a
//!   tombstone delivered late (from a hint) cannot delete a value written after it: the new
//!   value's context saw the tombstone, or (if the tombstone was reaped and the coordinator
//!   moved to a new epoch, as [`next_epoch`] requires) the two are concurrent siblings.
//! - **Truncation** ([`VClock::truncate`], [`TruncationStats`]): clocks are cut past a size
//!   bound, oldest entry by timestamp first, as in the Dynamo paper. Truncation only forgets
//!   history, so it can bring back a sibling that was already overwritten, never drop one;
//!   it is counted so metrics show when the bound is too tight.
//! - **Client context** ([`Context`]): what a read returns and a write sends back — the
//!   union of the histories the client saw, as an opaque, versioned, size-bounded,
//!   checksummed byte string that the server validates.
//!
//! Modules: `clock` (actors, epochs, dots, version vectors), `dotted` (versions and the
//! sibling-set rules), `context` (client context encoding). Binary formats are described in
//! docs/format.md, section "Version blob and client context".

mod clock;
mod codec;
mod context;
mod dotted;

pub use clock::{
    next_epoch, ActorId, ClockDecodeError, ClockEntry, Dot, EpochError, TruncationStats, VClock,
    ACTOR_BYTES, CLOCK_ENTRY_BYTES, VCLOCK_ENTRIES_INLINE,
};
pub use context::{
    Context, ContextError, EncodedContext, CONTEXT_BYTES_MAX, CONTEXT_BYTES_MIN,
    CONTEXT_ENTRIES_MAX, CONTEXT_FORMAT, CONTEXT_MAGIC,
};
pub use dotted::{
    apply_to, context_of, context_of_one, coordinate, reconcile, remove_indices, CoordinateError,
    Coordinated, Reconcile, StaleReason, Version, VersionDecodeError, CLOCK_ENTRIES_MAX,
    VERSION_FORMAT, VERSION_HEADER_BYTES,
};

//! ringkv-net: the wire protocol (v1) and the client library.
//!
//! What it is: the frame format and codec for every client message ([`protocol`]), and
//! clients that speak it ([`client`]: blocking, over `std::net`; `async_client`: tokio,
//! behind the `tokio` feature). The server's client connection loops live in
//! `ringkv-engine`'s runtime next to the shards; the peer link lives here.
//!
//! Modules:
//! - [`protocol`]: frames, opcodes, requests, replies, error codes; check-then-parse.
//! - [`client`]: a pipelined blocking client with timeouts, a connection pool and
//!   shard-aware routing.
//! - [`peer`]: cluster messages between nodes and the cluster admin requests.
//! - [`notify`]: a single-threaded wake-all notifier.
//! - [`stats`]: node statistics (counters, latency histograms) as STATS replies carry them.
//! - `link` (feature `glommio`): a persistent, pipelined peer link to another node with
//!   reconnect and backoff and a bounded queue, used by the server runtime.
//! - `async_client` (feature `tokio`): the same typed API for tokio: one connection
//!   shared by many tasks, a connection pool, and shard-aware routing.

pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod notify;
pub mod peer;
pub mod protocol;
pub mod stats;

#[cfg(feature = "glommio")]
pub mod link;

#[cfg(feature = "tokio")]
pub mod async_client;

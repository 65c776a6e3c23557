//! ringkv-net: the wire protocol (v1) and the client library.
//!
//! What it is: the frame format and codec for every client message ([`protocol`]), and
//! clients that speak it ([`client`]: blocking, over `std::net`; `async_client`: tokio,
//! behind the `tokio` feature). What it is not: the server's connection loops live in
//! `ringkv-engine`'s runtime next to the shards.
//!
//! Modules:
//! - [`protocol`]: frames, opcodes, requests, replies, error codes; check-then-parse.
//! - [`client`]: a pipelined blocking client with timeouts, a connection pool and
//!   shard-aware routing.
//! - `async_client` (feature `tokio`): the same typed API for tokio, one connection
//!   shared by many tasks.

pub mod client;
pub mod protocol;

#[cfg(feature = "tokio")]
pub mod async_client;

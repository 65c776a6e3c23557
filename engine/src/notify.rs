//! The single-threaded wake-all notifier lives in `ringkv-net` (its peer links use it
//! too); the engine uses the same one.

pub(crate) use ringkv_net::notify::Notify;

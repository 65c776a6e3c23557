//! ringkv-bench

//! ringkv-net: the wire protocol and client library (arrives with the node issue).

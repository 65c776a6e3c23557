//! What a shard measures for STATS (`ringkv stats`): how long the requests it read
//! took, by operation, and how long its partitions' compactions took, as HdrHistograms
//! in nanoseconds.
//!
//! A request's latency runs from the moment its connection took the whole frame off
//! the socket buffer (the start of the reader's pass over the frames it read) to the
//! moment its reply was put in the connection's output: for a request the reader
//! answered in its pass, the end of the pass, when the pass's replies go out; for a
//! `sync` write, after the group commit that made it durable; for a request another
//! shard or node answered, after that answer came back. It leaves out the time a frame
//! waited in the kernel and the reply's send, which the client sees on top.

use hdrhistogram::Histogram;
use ringkv_net::peer::opcode as peer_opcode;
use ringkv_net::protocol::opcode;
use ringkv_net::stats::record_latency;
use std::time::Instant;

/// The operations a shard keeps a latency histogram for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Get = 0,
    Put = 1,
    Delete = 2,
    ReplicaGet = 3,
    ReplicaPut = 4,
}

pub(crate) const OPS: [Op; 5] = [Op::Get, Op::Put, Op::Delete, Op::ReplicaGet, Op::ReplicaPut];

impl Op {
    /// The operation a request with `opcode` is, if it is one measured.
    pub(crate) fn of(opcode: u8) -> Option<Op> {
        match opcode {
            opcode::GET => Some(Op::Get),
            opcode::PUT => Some(Op::Put),
            opcode::DELETE => Some(Op::Delete),
            peer_opcode::REPLICA_GET => Some(Op::ReplicaGet),
            peer_opcode::REPLICA_PUT => Some(Op::ReplicaPut),
            _ => None,
        }
    }

    /// Its name in STATS replies.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::ReplicaGet => "replica_get",
            Op::ReplicaPut => "replica_put",
        }
    }
}

/// One histogram per [`Op`], and one of compactions.
pub(crate) struct Latencies {
    by_op: [Histogram<u64>; OPS.len()],
    compaction: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            by_op: std::array::from_fn(|_| ringkv_net::stats::latency_histogram()),
            compaction: ringkv_net::stats::latency_histogram(),
        }
    }
}

impl Latencies {
    /// Counts one `op` that started at `started` and ends now.
    pub(crate) fn record(&mut self, op: Op, started: Instant) {
        record_latency(&mut self.by_op[op as usize], started.elapsed());
    }

    /// Counts the requests a connection's reader answered in one pass over its buffer,
    /// `answered[op]` of each `op`, as taking from `started` (when the pass took its
    /// first frame) to now (when the pass ends and sends their replies): one clock read
    /// per pass instead of one per request.
    pub(crate) fn record_pass(&mut self, answered: &[u32; OPS.len()], started: Instant) {
        if answered.iter().all(|&n| n == 0) {
            return;
        }
        let took = started.elapsed();
        for (h, &n) in self.by_op.iter_mut().zip(answered) {
            if n > 0 {
                ringkv_net::stats::record_latencies(h, took, u64::from(n));
            }
        }
    }

    /// Counts one compaction of one of the shard's partitions that took `took`.
    pub(crate) fn record_compaction(&mut self, took: std::time::Duration) {
        record_latency(&mut self.compaction, took);
    }

    /// Each operation's name and histogram, then `compaction`'s.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'static str, &Histogram<u64>)> {
        OPS.iter()
            .map(|&op| (op.name(), &self.by_op[op as usize]))
            .chain(std::iter::once(("compaction", &self.compaction)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_measured_opcode_has_its_own_histogram() {
        let mut l = Latencies::default();
        for (i, op) in [
            opcode::GET,
            opcode::PUT,
            opcode::DELETE,
            peer_opcode::REPLICA_GET,
            peer_opcode::REPLICA_PUT,
        ]
        .into_iter()
        .enumerate()
        {
            let op = Op::of(op).expect("measured");
            for _ in 0..=i {
                l.record(op, Instant::now());
            }
        }
        assert_eq!(Op::of(opcode::PING), None);
        l.record_compaction(std::time::Duration::from_millis(3));
        let counts: Vec<(&str, u64)> = l.iter().map(|(n, h)| (n, h.len())).collect();
        assert_eq!(
            counts,
            vec![
                ("get", 1),
                ("put", 2),
                ("delete", 3),
                ("replica_get", 4),
                ("replica_put", 5),
                ("compaction", 1)
            ]
        );
    }
}

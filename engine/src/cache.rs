//! A bounded cache of live records, by seq.
//!
//! Segments are read with `O_DIRECT`, so without it every get and every versioned
//! put (which reads the stored siblings first) costs a device read. A seq names one
//! record for good, so an entry can never be stale.
//!
//! A write that replaces versions removes them from the cache ([`RecordCache::remove`]):
//! the cache then holds live versions only, so an overwrite-heavy load keeps a working
//! set the size of the live data rather than filling the budget with superseded
//! versions (which made every lookup a trip to main memory). Eviction is first-in
//! first-out by bytes; the FIFO queue forgets removed seqs lazily and is compacted
//! when they outnumber the live entries.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

#[derive(Debug, Default)]
pub struct RecordCache {
    bytes_max: usize,
    bytes: usize,
    records: HashMap<u64, Rc<[u8]>, ahash::RandomState>,
    /// Insertion order; may still name seqs removed since (skipped on eviction).
    order: VecDeque<u64>,
    pub hits: u64,
    pub misses: u64,
}

impl RecordCache {
    pub fn new(bytes_max: usize) -> Self {
        Self {
            bytes_max,
            ..Self::default()
        }
    }

    pub fn get(&mut self, seq: u64) -> Option<Rc<[u8]>> {
        match self.records.get(&seq) {
            Some(r) => {
                self.hits += 1;
                Some(r.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// The record under `seq`, without counting a hit or a miss.
    pub fn peek(&self, seq: u64) -> Option<Rc<[u8]>> {
        self.records.get(&seq).cloned()
    }

    /// Caches `record` under `seq` (a no-op if it is cached already or too large).
    pub fn insert(&mut self, seq: u64, record: &[u8]) {
        if record.len() > self.bytes_max / 8 || self.records.contains_key(&seq) {
            return;
        }
        // each step pops one queue entry: bounded by the queue's length
        while self.bytes + record.len() > self.bytes_max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(r) = self.records.remove(&old) {
                self.bytes -= r.len();
            }
        }
        self.bytes += record.len();
        self.records.insert(seq, Rc::from(record));
        self.order.push_back(seq);
        if self.order.len() > 2 * self.records.len() + 64 {
            let records = &self.records;
            self.order.retain(|s| records.contains_key(s));
        }
    }

    /// Forgets `seq` (a version that was replaced and will not be read again).
    pub fn remove(&mut self, seq: u64) {
        if let Some(r) = self.records.remove(&seq) {
            self.bytes -= r.len();
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::RecordCache;

    #[test]
    fn newest_records_stay_within_the_budget() {
        let mut c = RecordCache::new(1000);
        for seq in 1..=100u64 {
            c.insert(seq, &[seq as u8; 100]);
            assert!(c.bytes() <= 1000);
        }
        for seq in 91..=100u64 {
            assert_eq!(c.get(seq).as_deref(), Some(&[seq as u8; 100][..]));
        }
        assert!(c.get(90).is_none());
        c.insert(100, &[0; 100]);
        assert_eq!(c.get(100).as_deref(), Some(&[100; 100][..]), "cached once");
        c.insert(5, &[0; 126]);
        assert!(c.get(5).is_none(), "larger than an eighth of the budget");
    }

    #[test]
    fn removed_versions_free_their_bytes_and_leave_the_queue() {
        let mut c = RecordCache::new(1000);
        // one key overwritten many times: each write removes the version it replaces
        c.insert(1, &[1; 100]);
        for seq in 2..10_000u64 {
            c.insert(seq, &[seq as u8; 100]);
            c.remove(seq - 1);
            assert_eq!(c.len(), 1);
            assert_eq!(c.bytes(), 100);
        }
        assert!(c.order.len() <= 2 * c.len() + 65, "the queue is compacted");
        // a live old record is not evicted by churn on other keys
        c.insert(20_000, &[7; 100]);
        for seq in 20_001..30_000u64 {
            c.insert(seq, &[8; 100]);
            if seq > 20_001 {
                c.remove(seq - 1);
            }
        }
        assert_eq!(c.get(20_000).as_deref(), Some(&[7; 100][..]));
        c.remove(424_242);
        assert!(c.bytes() <= 1000);
    }
}

//! A bounded cache of recently written or read records, by seq.
//!
//! Segments are read with `O_DIRECT`, so without it every get and every versioned
//! put (which reads the stored siblings first) costs a device read. A seq names one
//! record for good, so an entry can never be stale; entries of superseded versions
//! simply age out. Eviction is first-in first-out by bytes.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

#[derive(Debug, Default)]
pub struct RecordCache {
    bytes_max: usize,
    bytes: usize,
    records: HashMap<u64, Rc<[u8]>, ahash::RandomState>,
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

    pub fn insert(&mut self, seq: u64, record: &[u8]) {
        if record.len() > self.bytes_max / 8 || self.records.contains_key(&seq) {
            return;
        }
        // each eviction frees at least one entry: bounded by the entry count
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
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

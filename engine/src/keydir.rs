//! The keydir: for every key, the location of every live version (siblings included).
//!
//! Memory is the point of this module (Bitcask spends about 91 bytes per key). Keys are
//! stored back to back in one arena; a `hashbrown::HashTable<u32>` hashed with
//! `ahash` maps a key to an index into a dense `Vec<Entry>`; an entry holds the key's
//! arena position and its versions inline when there is one (`SmallVec<[Loc; 1]>`).
//! Per key that is 4 bytes of table slot + 1 control byte (at most 7/8 load), 40 bytes
//! of entry, and the key bytes themselves.

use hashbrown::HashTable;
use smallvec::SmallVec;

/// Where one version of a key lives, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// Partition-unique id of the version (its record's `seq`).
    pub seq: u64,
    /// Slot of the segment holding the record (see `partition`).
    pub segment: u32,
    pub offset: u32,
    /// Whole record length in bytes.
    pub len: u32,
    pub flags: u32,
}

pub const LOC_TOMBSTONE: u32 = 1;

impl Loc {
    pub fn is_tombstone(&self) -> bool {
        self.flags & LOC_TOMBSTONE != 0
    }
}

pub type Versions = SmallVec<[Loc; 1]>;

#[derive(Debug)]
struct Entry {
    /// arena offset << 16 | key length
    key_at: u64,
    versions: Versions,
}

impl Entry {
    fn key<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        let at = (self.key_at >> 16) as usize;
        let len = (self.key_at & 0xFFFF) as usize;
        &arena[at..at + len]
    }
}

#[derive(Debug, Default)]
pub struct KeyDir {
    hasher: ahash::RandomState,
    table: HashTable<u32>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    arena: Vec<u8>,
    arena_garbage_bytes: usize,
    version_count: usize,
}

impl KeyDir {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(keys: usize) -> Self {
        Self {
            table: HashTable::with_capacity(keys),
            entries: Vec::with_capacity(keys),
            ..Self::default()
        }
    }

    /// Number of keys with at least one version.
    pub fn len(&self) -> usize {
        self.table.len()
    }
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
    /// Number of versions over all keys.
    pub fn version_count(&self) -> usize {
        self.version_count
    }

    fn find(&self, key: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        let (entries, arena) = (&self.entries, &self.arena);
        self.table
            .find(hash, |&i| entries[i as usize].key(arena) == key)
            .copied()
    }

    pub fn get(&self, key: &[u8]) -> Option<&[Loc]> {
        self.find(key)
            .map(|i| &self.entries[i as usize].versions[..])
    }

    /// Adds a version to `key` (replacing a version with the same seq: a replay of a
    /// compacted copy). Returns the location it replaced, if any.
    pub fn insert(&mut self, key: &[u8], loc: Loc) -> Option<Loc> {
        assert!(key.len() <= 0xFFFF, "key longer than the format allows");
        if let Some(i) = self.find(key) {
            let versions = &mut self.entries[i as usize].versions;
            if let Some(v) = versions.iter_mut().find(|v| v.seq == loc.seq) {
                return Some(std::mem::replace(v, loc));
            }
            versions.push(loc);
            self.version_count += 1;
            return None;
        }
        let key_at = ((self.arena.len() as u64) << 16) | key.len() as u64;
        self.arena.extend_from_slice(key);
        let entry = Entry {
            key_at,
            versions: smallvec::smallvec![loc],
        };
        let index = match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = entry;
                i
            }
            None => {
                self.entries.push(entry);
                (self.entries.len() - 1) as u32
            }
        };
        let hash = self.hasher.hash_one(key);
        let (entries, arena, hasher) = (&self.entries, &self.arena, &self.hasher);
        self.table.insert_unique(hash, index, |&i| {
            hasher.hash_one(entries[i as usize].key(arena))
        });
        self.version_count += 1;
        None
    }

    /// [`remove_seqs`](Self::remove_seqs)`(key, replaced)` then
    /// [`insert`](Self::insert)`(key, loc)` with one lookup: a write that supersedes
    /// the key's versions keeps its entry and arena bytes instead of dropping and
    /// adding the key back. Returns the removed versions and the one `loc` replaced.
    pub fn replace(
        &mut self,
        key: &[u8],
        replaced: &[u64],
        loc: Loc,
    ) -> (SmallVec<[Loc; 2]>, Option<Loc>) {
        let Some(i) = self.find(key) else {
            return (SmallVec::new(), self.insert(key, loc));
        };
        let removed = self.take_seqs(i, replaced);
        let versions = &mut self.entries[i as usize].versions;
        if versions.is_empty() {
            // every version superseded: the list goes back inside the entry, as a key
            // added anew would have it (no heap list, no pointer hop on every get)
            versions.shrink_to_fit();
        }
        if let Some(v) = versions.iter_mut().find(|v| v.seq == loc.seq) {
            return (removed, Some(std::mem::replace(v, loc)));
        }
        versions.push(loc);
        self.version_count += 1;
        (removed, None)
    }

    /// Removes the versions of `key` whose seq is in `seqs`; returns what was removed.
    /// A key left with no version is removed.
    pub fn remove_seqs(&mut self, key: &[u8], seqs: &[u64]) -> SmallVec<[Loc; 2]> {
        let Some(i) = self.find(key) else {
            return SmallVec::new();
        };
        let removed = self.take_seqs(i, seqs);
        if self.entries[i as usize].versions.is_empty() {
            self.remove_entry(key, i);
        }
        removed
    }

    /// Takes the versions whose seq is in `seqs` out of entry `i` (which may be left
    /// with none).
    fn take_seqs(&mut self, i: u32, seqs: &[u64]) -> SmallVec<[Loc; 2]> {
        let mut removed = SmallVec::new();
        if seqs.is_empty() {
            return removed;
        }
        self.entries[i as usize].versions.retain(|v| {
            if seqs.contains(&v.seq) {
                removed.push(*v);
                false
            } else {
                true
            }
        });
        self.version_count -= removed.len();
        removed
    }

    /// Points the version `seq` of `key` at a new place if it is still at `from`.
    pub fn relocate(&mut self, key: &[u8], seq: u64, from: (u32, u32), to: Loc) -> bool {
        let Some(i) = self.find(key) else {
            return false;
        };
        match self.entries[i as usize]
            .versions
            .iter_mut()
            .find(|v| v.seq == seq && (v.segment, v.offset) == from)
        {
            Some(v) => {
                *v = to;
                true
            }
            None => false,
        }
    }

    fn remove_entry(&mut self, key: &[u8], index: u32) {
        let hash = self.hasher.hash_one(key);
        if let Ok(slot) = self.table.find_entry(hash, |&i| i == index) {
            slot.remove();
        }
        let entry = &mut self.entries[index as usize];
        entry.versions = SmallVec::new();
        self.arena_garbage_bytes += (entry.key_at & 0xFFFF) as usize;
        self.free.push(index);
        if self.arena_garbage_bytes > 1 << 20 && self.arena_garbage_bytes * 2 > self.arena.len() {
            self.rebuild_arena();
        }
    }

    /// Copies live keys into a fresh arena, dropping the bytes of removed keys.
    fn rebuild_arena(&mut self) {
        let mut arena = Vec::with_capacity(self.arena.len() - self.arena_garbage_bytes);
        for entry in &mut self.entries {
            if entry.versions.is_empty() {
                entry.key_at = 0;
                continue;
            }
            let key = entry.key(&self.arena);
            let key_at = ((arena.len() as u64) << 16) | key.len() as u64;
            arena.extend_from_slice(key);
            entry.key_at = key_at;
        }
        self.arena = arena;
        self.arena_garbage_bytes = 0;
    }

    /// Every key with its versions, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[Loc])> {
        self.entries
            .iter()
            .filter(|e| !e.versions.is_empty())
            .map(|e| (e.key(&self.arena), &e.versions[..]))
    }

    /// Bytes of heap this keydir holds (capacity, not just length).
    pub fn heap_bytes(&self) -> usize {
        let spilled: usize = self
            .entries
            .iter()
            .filter(|e| e.versions.spilled())
            .map(|e| e.versions.capacity() * std::mem::size_of::<Loc>())
            .sum();
        self.table.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.free.capacity() * 4
            + self.arena.capacity()
            + spilled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(seq: u64) -> Loc {
        Loc {
            seq,
            segment: 1,
            offset: seq as u32 * 10,
            len: 10,
            flags: 0,
        }
    }

    #[test]
    fn replace_is_remove_seqs_then_insert() {
        // a small model run: the same operations through both paths
        let (mut one, mut two) = (KeyDir::new(), KeyDir::new());
        let keys: [&[u8]; 3] = [b"a", b"bb", b"ccc"];
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        for step in 0..2000u64 {
            let key = keys[(next() % 3) as usize];
            let live: Vec<u64> = one
                .get(key)
                .map_or(vec![], |v| v.iter().map(|l| l.seq).collect());
            // supersede some of the live versions (none, one, all) or re-place one
            let replaced: Vec<u64> = live.iter().copied().filter(|_| next() % 2 == 0).collect();
            let seq = if next() % 10 == 0 && !live.is_empty() {
                live[0]
            } else {
                10_000 + step
            };
            let mut l = loc(seq);
            l.offset = step as u32;
            let superseded_all = !live.is_empty() && replaced.len() == live.len();
            let (removed, old) = one.replace(key, &replaced, l);
            if superseded_all {
                let i = one.find(key).unwrap() as usize;
                assert!(!one.entries[i].versions.spilled(), "step {step}");
            }
            let removed_two = two.remove_seqs(key, &replaced);
            let old_two = two.insert(key, l);
            assert_eq!((removed.as_slice(), old), (removed_two.as_slice(), old_two));
            assert_eq!(one.version_count(), two.version_count());
            assert_eq!(one.len(), two.len());
            for k in keys {
                let mut a: Vec<Loc> = one.get(k).map_or(vec![], |v| v.to_vec());
                let mut b: Vec<Loc> = two.get(k).map_or(vec![], |v| v.to_vec());
                a.sort_by_key(|l| l.seq);
                b.sort_by_key(|l| l.seq);
                assert_eq!(a, b, "key {k:?} at step {step}");
            }
        }
    }

    #[test]
    fn siblings_insert_remove_and_reuse() {
        let mut kd = KeyDir::new();
        kd.insert(b"a", loc(1));
        kd.insert(b"a", loc(2));
        kd.insert(b"b", loc(3));
        assert_eq!(kd.get(b"a").unwrap().len(), 2);
        assert_eq!(kd.version_count(), 3);
        let removed = kd.remove_seqs(b"a", &[1, 2]);
        assert_eq!(removed.len(), 2);
        assert!(kd.get(b"a").is_none());
        assert_eq!(kd.len(), 1);
        kd.insert(b"c", loc(4));
        assert_eq!(kd.get(b"c").unwrap()[0].seq, 4);
        assert_eq!(kd.get(b"b").unwrap()[0].seq, 3);
        // same seq again replaces the location (replay of a compacted copy)
        let mut moved = loc(4);
        moved.segment = 9;
        assert_eq!(kd.insert(b"c", moved), Some(loc(4)));
        assert_eq!(kd.get(b"c").unwrap(), &[moved]);
    }

    #[test]
    fn arena_rebuild_keeps_every_live_key() {
        let mut kd = KeyDir::new();
        for i in 0..100_000u64 {
            kd.insert(format!("key-{i:08}-padding-padding").as_bytes(), loc(i));
        }
        for i in (0..100_000u64).filter(|i| i % 4 != 0) {
            kd.remove_seqs(format!("key-{i:08}-padding-padding").as_bytes(), &[i]);
        }
        assert_eq!(kd.len(), 25_000);
        for i in (0..100_000u64).step_by(4) {
            let key = format!("key-{i:08}-padding-padding");
            assert_eq!(kd.get(key.as_bytes()).unwrap()[0].seq, i, "{key}");
        }
        assert!(kd.arena.len() < 100_000 * 30, "arena was rebuilt");
    }
}

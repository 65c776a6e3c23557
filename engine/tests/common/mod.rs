//! The model of stored versions the crash tests compare a recovered partition with.

use std::collections::BTreeMap;

/// One stored version: (value, or `None` for a tombstone; version blob).
pub type Version = (Option<Vec<u8>>, Vec<u8>);

/// Key (or (partition, key)) -> its versions, in any order.
pub type Model<K> = BTreeMap<K, Vec<Version>>;

/// Without keys that have no version, each key's versions sorted.
pub fn normalise<K: Ord + Clone>(model: &Model<K>) -> Model<K> {
    model
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| {
            let mut v = v.clone();
            v.sort();
            (k.clone(), v)
        })
        .collect()
}

/// Without keys whose only version is a tombstone (compaction may drop expired ones).
pub fn without_lone_tombstones<K: Ord + Clone>(model: &Model<K>) -> Model<K> {
    model
        .iter()
        .filter(|(_, v)| !(v.len() == 1 && v[0].0.is_none()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Equal, up to expired lone tombstones compaction may or may not have dropped.
pub fn same<K: Ord + Clone>(a: &Model<K>, b: &Model<K>) -> bool {
    a == b || without_lone_tombstones(a) == without_lone_tombstones(b)
}

/// Hands `entries` (offset and bytes of each batch in `segment`) to `replay` in order,
/// as a commit log holding every write since the last checkpoint would; each must be
/// present or applied.
#[allow(dead_code)] // not every test binary replays
pub fn replay_all<S: ringkv_engine::storage::Storage>(
    p: &ringkv_engine::Partition<S>,
    segment: u64,
    entries: &[(u64, Vec<u8>)],
) {
    use ringkv_engine::partition::ReplayOutcome;
    for (offset, bytes) in entries {
        let outcome = p.replay(segment, *offset, bytes);
        assert!(
            matches!(
                outcome,
                ReplayOutcome::Present | ReplayOutcome::Applied { .. }
            ),
            "{outcome:?}"
        );
    }
}

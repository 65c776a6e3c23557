//! Random operations against a model on the crashing in-memory disk.
//!
//! Each run draws operations from a seed (single puts that replace a chosen subset of a
//! key's versions, siblings, tombstones, multi-key batches, compaction, clean reopen,
//! explicit syncs), crashes the disk after `k` of them, reopens and compares with the
//! model. In `sync` mode every acknowledged write must be there with its exact bytes.
//! In `none` mode the recovered state must equal the model after some prefix of the
//! operations that is at least as long as the last acknowledged `sync` (so batches are
//! atomic and nothing unsynced appears partially).

use futures_lite::future::block_on;
use ringkv_engine::storage::mem::{MemDisk, SplitMix};
use ringkv_engine::{Durability, Partition, PartitionConfig, WriteOp};
use std::collections::BTreeMap;

mod common;

use common::{normalise, same};

type Model = common::Model<Vec<u8>>;

const FOLDER: &str = "/data/p0";

fn config(durability: Durability) -> PartitionConfig {
    PartitionConfig {
        durability,
        segment_bytes_max: 4096,
        buffer_bytes_max: 1024,
        tombstone_grace_ms: 50,
        ..PartitionConfig::default()
    }
}

/// A blind write of `key` (it replaces no version).
async fn put(
    p: &Partition<ringkv_engine::storage::mem::MemStorage>,
    key: &[u8],
    value: &[u8],
    now_ms: u64,
) -> Result<Vec<u64>, ringkv_engine::StoreError> {
    p.write(
        &[WriteOp {
            key,
            version: b"v",
            value: Some(value),
            replaces: &[],
        }],
        now_ms,
    )
    .await
}

/// `count` blind writes of 300 bytes (`fill-0`, `fill-1`, ...): with the 4096-byte
/// segments of [`config`], every 13 seal a segment.
async fn fill(p: &Partition<ringkv_engine::storage::mem::MemStorage>, count: u32, now_ms: u64) {
    for i in 0..count {
        put(p, format!("fill-{i}").as_bytes(), &[1; 300], now_ms)
            .await
            .unwrap();
    }
}

async fn read_state(
    p: &Partition<ringkv_engine::storage::mem::MemStorage>,
    keys: &[Vec<u8>],
) -> Model {
    let mut out = Model::new();
    for key in keys {
        let mut versions: Vec<_> = p
            .get(key)
            .await
            .expect("read")
            .into_iter()
            .map(|v| (v.value, v.version))
            .collect();
        versions.sort();
        if !versions.is_empty() {
            out.insert(key.clone(), versions);
        }
    }
    let mut total = 0;
    p.for_each_key(|_, _| total += 1);
    assert_eq!(total, out.len(), "keydir holds keys the model never wrote");
    out
}

fn run(seed: u64, ops_before_crash: usize, durability: Durability) {
    run_with(seed, ops_before_crash, durability, false)
}

/// `group`: the partition commits through a shard-wide `SyncGroup` (one file-system
/// sync for many partitions) instead of its own fdatasync.
fn run_with(seed: u64, ops_before_crash: usize, durability: Durability, group: bool) {
    block_on(async {
        let disk = MemDisk::new();
        let mut rng = SplitMix(seed);
        let keys: Vec<Vec<u8>> = (0..12).map(|i| format!("key-{i}").into_bytes()).collect();
        let mut now_ms = 1_000_000u64;
        let (mut p, _) = Partition::open(disk.folder(FOLDER), config(durability), now_ms)
            .await
            .unwrap();
        let sync_group = std::rc::Rc::new(ringkv_engine::sync_group::SyncGroup::new());
        if group {
            p.set_sync_group(sync_group.clone());
        }
        let mut model = Model::new();
        // snapshots of the model after each op since the last acknowledged sync
        let mut candidates: Vec<Model> = vec![normalise(&model)];
        for op_index in 0..ops_before_crash {
            now_ms += 1 + rng.next_u64() % 20;
            let choice = rng.next_u64() % 100;
            if choice < 70 {
                // a batch of 1..3 writes on distinct keys
                let n = if choice < 55 {
                    1
                } else {
                    2 + (rng.next_u64() % 2) as usize
                };
                let mut chosen: Vec<usize> = Vec::new();
                while chosen.len() < n {
                    let k = (rng.next_u64() % keys.len() as u64) as usize;
                    if !chosen.contains(&k) {
                        chosen.push(k);
                    }
                }
                let mut owned = Vec::new();
                for (j, &k) in chosen.iter().enumerate() {
                    let key = &keys[k];
                    let stored = p.get(key).await.unwrap();
                    // replace a random subset of the stored versions
                    let mut replaces = Vec::new();
                    let mut replaced_versions = Vec::new();
                    for v in &stored {
                        if rng.next_u64() % 3 != 0 {
                            replaces.push(v.seq);
                            replaced_versions.push(v.version.clone());
                        }
                    }
                    let tombstone = rng.next_u64() % 5 == 0;
                    let len = (rng.next_u64() % 300) as usize;
                    let value: Option<Vec<u8>> = (!tombstone).then(|| {
                        (0..len)
                            .map(|i| (i as u64 ^ seed ^ op_index as u64) as u8)
                            .collect()
                    });
                    let version = format!("op{op_index}.{j}").into_bytes();
                    owned.push((key.clone(), version, value, replaces, replaced_versions));
                }
                let ops: Vec<WriteOp<'_>> = owned
                    .iter()
                    .map(|(key, version, value, replaces, _)| WriteOp {
                        key,
                        version,
                        value: value.as_deref(),
                        replaces,
                    })
                    .collect();
                p.write(&ops, now_ms).await.unwrap();
                for (key, version, value, _, replaced_versions) in owned {
                    let entry = model.entry(key).or_default();
                    entry.retain(|(_, v)| !replaced_versions.contains(v));
                    entry.push((value, version));
                }
                candidates.push(normalise(&model));
            } else if choice < 80 {
                p.sync().await.unwrap();
                candidates = vec![normalise(&model)];
            } else if choice < 88 {
                p.compact(now_ms).await.unwrap();
                // compaction may drop expired lone tombstones: the model forgets them too
                let compacted = read_state(&p, &keys).await;
                assert!(
                    same(&compacted, &normalise(&model)),
                    "seed {seed} op {op_index}: compaction changed live data"
                );
                model = compacted;
                let last = candidates.len() - 1;
                candidates[last] = normalise(&model);
            } else if choice < 93 {
                p.close().await.unwrap();
                drop(p);
                let (reopened, report) =
                    Partition::open(disk.folder(FOLDER), config(durability), now_ms)
                        .await
                        .unwrap();
                assert!(report.corruption.is_empty(), "{report:?}");
                p = reopened;
                if group {
                    p.set_sync_group(sync_group.clone());
                }
                let state = read_state(&p, &keys).await;
                assert_eq!(
                    state,
                    normalise(&model),
                    "seed {seed}: clean reopen lost data"
                );
                candidates = vec![normalise(&model)];
            } else {
                // reads interleaved with writes
                let key = &keys[(rng.next_u64() % keys.len() as u64) as usize];
                let mut got: Vec<_> = p
                    .get(key)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|v| (v.value, v.version))
                    .collect();
                got.sort();
                let want = normalise(&model).get(key).cloned().unwrap_or_default();
                assert_eq!(got, want, "seed {seed} op {op_index}: read mismatch");
            }
        }
        drop(p);
        disk.crash(seed ^ 0xC0FFEE);
        let (p, report) = Partition::open(disk.folder(FOLDER), config(durability), now_ms + 1)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: reopen after crash failed: {e}"));
        assert!(report.corruption.is_empty(), "seed {seed}: {report:?}");
        assert!(!p.needs_repair());
        let state = read_state(&p, &keys).await;
        match durability {
            Durability::Sync => assert!(
                same(&state, candidates.last().unwrap()),
                "seed {seed} k {ops_before_crash}: an acknowledged write is missing or wrong\n got {state:?}\nwant {:?}",
                candidates.last()
            ),
            _ => assert!(
                candidates.iter().any(|c| same(&state, c)),
                "seed {seed} k {ops_before_crash}: recovered state is no prefix since the last sync\n got {state:?}"
            ),
        }
        // the recovered partition keeps working
        p.write(
            &[WriteOp {
                key: b"after",
                version: b"v",
                value: Some(b"crash"),
                replaces: &[],
            }],
            now_ms + 2,
        )
        .await
        .unwrap();
        assert_eq!(
            p.get(b"after").await.unwrap()[0].value.as_deref(),
            Some(&b"crash"[..])
        );
    });
}

#[test]
fn sync_mode_crash_after_k_ops_keeps_every_acknowledged_write() {
    for seed in 0..300u64 {
        for k in [0usize, 1, 3, 7, 15, 40, 90, 150] {
            run(seed * 1000 + k as u64, k, Durability::Sync);
        }
    }
}

#[test]
fn none_mode_crash_recovers_a_prefix_since_the_last_sync() {
    for seed in 0..300u64 {
        for k in [0usize, 2, 5, 11, 30, 80, 150] {
            run(seed * 7919 + k as u64, k, Durability::None);
        }
    }
}

#[test]
fn failed_fdatasync_stops_acknowledging_until_reopen() {
    block_on(async {
        let disk = MemDisk::new();
        let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::Sync), 1)
            .await
            .unwrap();
        let put = |key: &'static [u8], value: &'static [u8]| WriteOp {
            key,
            version: b"v",
            value: Some(value),
            replaces: &[],
        };
        p.write(&[put(b"a", b"1")], 2).await.unwrap();
        disk.fail_syncs_after(0);
        let err = p.write(&[put(b"b", b"2")], 3).await.unwrap_err();
        assert!(err.to_string().contains("refuses writes"), "{err}");
        // the device recovers, but a retried sync is not success: still refused
        disk.fail_syncs_after(u64::MAX);
        assert!(p.write(&[put(b"c", b"3")], 4).await.is_err());
        assert!(p.sync().await.is_err());
        assert!(p.failure().is_some());
        drop(p);
        disk.crash(9);
        let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::Sync), 5)
            .await
            .unwrap();
        assert_eq!(
            p.get(b"a").await.unwrap()[0].value.as_deref(),
            Some(&b"1"[..])
        );
        assert!(
            p.get(b"c").await.unwrap().is_empty(),
            "a refused write appeared"
        );
        p.write(&[put(b"d", b"4")], 6).await.unwrap();
    });
}

/// Regression: compaction dropped versions superseded by records still unsynced in the
/// active segment; a crash then lost both (found by this model test, seed 7999).
#[test]
fn compaction_keeps_versions_whose_superseder_is_not_yet_durable() {
    run(7999, 80, Durability::None);
}

/// Regression: compaction copied a record that continued a batch into its output
/// without ending the batch, so the output's last records were dropped on open.
#[test]
fn compaction_output_records_end_their_batches() {
    for seed in 0..40u64 {
        run(seed * 1000 + 90, 90, Durability::Sync);
    }
}

/// Regression (review): a tombstone compaction chose to reap gained a concurrent
/// sibling while compaction was still running; the keydir kept pointing at the
/// removed source segment and the dangling-entry assert fired.
#[test]
fn tombstone_reaped_while_a_sibling_arrives_does_not_dangle() {
    for delay in 0..40usize {
        block_on(async {
            let disk = MemDisk::new();
            let config = PartitionConfig {
                tombstone_grace_ms: 10,
                ..config(Durability::Sync)
            };
            let (p, _) = Partition::open(disk.folder(FOLDER), config.clone(), 1)
                .await
                .unwrap();
            p.write(
                &[WriteOp {
                    key: b"t",
                    version: b"tomb",
                    value: None,
                    replaces: &[],
                }],
                2,
            )
            .await
            .unwrap();
            fill(&p, 20, 3).await;
            disk.set_yielding(true);
            let compaction = p.compact(10_000);
            let writer = async {
                for _ in 0..delay {
                    ringkv_engine::storage::mem::YieldOnce(false).await;
                }
                p.write(
                    &[WriteOp {
                        key: b"t",
                        version: b"sibling",
                        value: Some(b"new"),
                        replaces: &[],
                    }],
                    10_001,
                )
                .await
                .unwrap();
            };
            let (report, ()) = futures_lite::future::zip(compaction, writer).await;
            report.unwrap();
            disk.set_yielding(false);
            let got = p.get(b"t").await.unwrap();
            assert!(
                got.iter().any(|v| v.value.as_deref() == Some(&b"new"[..])),
                "delay {delay}: {got:?}"
            );
            p.close().await.unwrap();
            drop(p);
            let (p, report) = Partition::open(disk.folder(FOLDER), config, 20_000)
                .await
                .unwrap();
            assert!(report.corruption.is_empty());
            let reread = p.get(b"t").await.unwrap();
            assert_eq!(got, reread, "delay {delay}: reopen disagrees with memory");
        });
    }
}

#[test]
fn epoch_moves_on_after_an_unclean_shutdown_only() {
    block_on(async {
        let disk = MemDisk::new();
        let now = 5_000_000u64;
        let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::Sync), now)
            .await
            .unwrap();
        let first = p.epoch();
        p.write(
            &[WriteOp {
                key: b"k",
                version: b"v",
                value: Some(b"1"),
                replaces: &[],
            }],
            now,
        )
        .await
        .unwrap();
        p.close().await.unwrap();
        assert!(
            p.write(
                &[WriteOp {
                    key: b"k",
                    version: b"v",
                    value: Some(b"2"),
                    replaces: &[]
                }],
                now
            )
            .await
            .is_err(),
            "closed refuses writes"
        );
        drop(p);
        let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::Sync), now)
            .await
            .unwrap();
        assert_eq!(p.epoch(), first, "a clean close keeps the epoch");
        p.write(
            &[WriteOp {
                key: b"k",
                version: b"v",
                value: Some(b"3"),
                replaces: &[],
            }],
            now,
        )
        .await
        .unwrap();
        drop(p);
        disk.crash(1);
        let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::Sync), now)
            .await
            .unwrap();
        assert!(p.epoch() > first, "after a crash the epoch moves on");
    });
}

#[test]
fn sync_mode_with_a_shard_sync_group_keeps_every_acknowledged_write() {
    for seed in 0..150u64 {
        for k in [0usize, 3, 15, 40, 150] {
            run_with(seed * 31 + k as u64, k, Durability::Sync, true);
        }
    }
}

/// Two partitions share one group: concurrent writers on both are covered by far fewer
/// file-system syncs than writes, and a failed sync fails both partitions.
#[test]
fn sync_group_shares_one_sync_between_partitions_and_fails_them_together() {
    block_on(async {
        let disk = MemDisk::new();
        disk.set_yielding(true);
        let group = std::rc::Rc::new(ringkv_engine::sync_group::SyncGroup::new());
        let (a, _) = Partition::open(disk.folder("/a"), config(Durability::Sync), 1)
            .await
            .unwrap();
        let (b, _) = Partition::open(disk.folder("/b"), config(Durability::Sync), 1)
            .await
            .unwrap();
        a.set_sync_group(group.clone());
        b.set_sync_group(group.clone());
        let writes: Vec<_> = (0..64u32)
            .map(|i| {
                let p = if i % 2 == 0 { &a } else { &b };
                async move {
                    let key = format!("k{i}");
                    p.write(
                        &[WriteOp {
                            key: key.as_bytes(),
                            version: b"v",
                            value: Some(b"x"),
                            replaces: &[],
                        }],
                        2,
                    )
                    .await
                }
            })
            .collect();
        for r in join_all(writes).await {
            r.unwrap();
        }
        assert!(
            group.syncs() * 4 < 64,
            "{} syncs for 64 writes",
            group.syncs()
        );
        disk.fail_syncs_after(0);
        let e1 = a
            .write(
                &[WriteOp {
                    key: b"x",
                    version: b"v",
                    value: Some(b"1"),
                    replaces: &[],
                }],
                3,
            )
            .await;
        assert!(e1.is_err());
        let e2 = b
            .write(
                &[WriteOp {
                    key: b"y",
                    version: b"v",
                    value: Some(b"1"),
                    replaces: &[],
                }],
                3,
            )
            .await;
        assert!(e2.is_err(), "the group's failure is every member's failure");
    });
}

/// Polls every future to completion, interleaved (a tiny join_all for tests).
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..futures.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futures.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}

/// A crash at every step of a compaction (and of the roll-overs and syncs it waits on)
/// loses nothing: the disk yields at each sync, record and file-system sync, the
/// compaction future is polled `steps` times, dropped, and the disk crashes.
#[test]
fn crash_at_every_step_of_a_compaction_loses_nothing() {
    let mut finished_runs = 0;
    for steps in 0..120usize {
        let finished = block_on(async {
            let disk = MemDisk::new();
            let cfg = PartitionConfig {
                tombstone_grace_ms: 10,
                ..config(Durability::Sync)
            };
            let (p, _) = Partition::open(disk.folder(FOLDER), cfg.clone(), 1)
                .await
                .unwrap();
            let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            for round in 0..6u32 {
                for i in 0..12u32 {
                    let key = format!("k{i}").into_bytes();
                    let old: Vec<u64> = p.versions(&key).iter().map(|l| l.seq).collect();
                    let value = (round * 7 + i) % 5 != 0;
                    let bytes = format!("r{round}-{i}-{}", "x".repeat(100)).into_bytes();
                    p.write(
                        &[WriteOp {
                            key: &key,
                            version: b"v",
                            value: value.then_some(&bytes[..]),
                            replaces: &old,
                        }],
                        2 + round as u64,
                    )
                    .await
                    .unwrap();
                    model.insert(key, value.then_some(bytes));
                }
            }
            disk.set_yielding(true);
            let mut finished = false;
            {
                let mut compaction = Box::pin(p.compact(1_000));
                let waker = std::task::Waker::noop();
                let mut cx = std::task::Context::from_waker(waker);
                for _ in 0..steps {
                    if let std::task::Poll::Ready(r) =
                        std::future::Future::poll(compaction.as_mut(), &mut cx)
                    {
                        r.unwrap();
                        finished = true;
                        break;
                    }
                }
            }
            drop(p);
            disk.crash(steps as u64);
            let (p, report) = Partition::open(disk.folder(FOLDER), cfg, 2_000)
                .await
                .unwrap();
            assert!(report.corruption.is_empty(), "steps {steps}: {report:?}");
            for (key, want) in &model {
                let got = p.get(key).await.unwrap();
                match want {
                    Some(v) => {
                        assert_eq!(got.len(), 1, "steps {steps}: {key:?}");
                        assert_eq!(got[0].value.as_ref(), Some(v), "steps {steps}");
                    }
                    // a tombstone, or nothing if compaction reaped it
                    None => assert!(
                        got.iter().all(|g| g.value.is_none()),
                        "steps {steps}: deleted key came back"
                    ),
                }
            }
            finished
        });
        finished_runs += usize::from(finished);
    }
    // the crash points cover the whole compaction, and then some
    assert!(
        (1..120).contains(&finished_runs),
        "{finished_runs} runs finished"
    );
}

/// A write that races `close` is either refused or made durable by it: `close` syncs
/// "everything" and the node then deletes its commit log, so a write accepted after
/// close's sync began and left in a segment buffer was acknowledged (through the log)
/// and lost at the next crash. Every interleaving of the write with close's awaits.
#[test]
fn a_write_racing_close_is_refused_or_durable() {
    for delay in 0..12 {
        block_on(async {
            let disk = MemDisk::new();
            let config = config(Durability::None);
            let (p, _) = Partition::open(disk.folder(FOLDER), config.clone(), 1_000)
                .await
                .unwrap();
            put(&p, b"before", b"1", 1_001).await.unwrap();
            // segments rolled over: close also writes their hint files (more awaits)
            fill(&p, 30, 1_001).await;
            disk.set_yielding(true);
            let writer = async {
                for _ in 0..delay {
                    ringkv_engine::storage::mem::YieldOnce(false).await;
                }
                put(&p, b"racing", b"2", 1_002).await.is_ok()
            };
            let (closed, accepted) = futures_lite::future::zip(p.close(), writer).await;
            closed.unwrap();
            disk.set_yielding(false);
            drop(p);
            disk.crash(delay);
            let (p, _) = Partition::open(disk.folder(FOLDER), config, 2_000)
                .await
                .unwrap();
            assert_eq!(p.get(b"before").await.unwrap().len(), 1, "delay {delay}");
            if accepted {
                assert_eq!(
                    p.get(b"racing").await.unwrap().len(),
                    1,
                    "delay {delay}: a write close accepted is gone after a crash"
                );
            }
        });
    }
}

/// Background work is cancelled at shutdown (its task dropped) wherever it waits. A
/// hint-file writer cancelled mid-way left its one-at-a-time flag set, and `close`,
/// which writes the pending hint files too, then waited for it forever.
#[test]
fn close_finishes_after_a_cancelled_hint_writer() {
    block_on(async {
        let disk = MemDisk::new();
        let config = config(Durability::None);
        let (p, _) = Partition::open(disk.folder(FOLDER), config.clone(), 1_000)
            .await
            .unwrap();
        // sealed segments whose hint files are still to write
        fill(&p, 30, 1_001).await;
        disk.set_yielding(true);
        {
            let mut writer = std::pin::pin!(p.write_pending_hints());
            assert!(
                futures_lite::future::poll_once(&mut writer).await.is_none(),
                "the writer waits for a sync"
            );
        } // cancelled
        let mut closed = None;
        {
            let mut close = std::pin::pin!(p.close());
            for _ in 0..10_000 {
                if let Some(r) = futures_lite::future::poll_once(&mut close).await {
                    closed = Some(r);
                    break;
                }
            }
        }
        closed.expect("close finished").unwrap();
        disk.set_yielding(false);
        drop(p);
        let (p, report) = Partition::open(disk.folder(FOLDER), config, 2_000)
            .await
            .unwrap();
        assert!(report.corruption.is_empty());
        assert_eq!(p.get(b"fill-29").await.unwrap().len(), 1);
    });
}

/// Commit-log replay brings back a record whose segment lost its unsynced tail. When a
/// later record that superseded it sits in another segment that did reach the disk,
/// `open` applied the later one first (finding nothing to supersede), so the record
/// replayed back stood beside it as a live sibling: an overwritten or deleted value
/// returned after a crash. The later record's entry, present in its segment, now
/// supersedes it again. Here both sit in one segment, in the order `open` and replay
/// applied them in that case.
#[test]
fn replay_does_not_bring_back_a_superseded_version() {
    use ringkv_engine::partition::ReplayOutcome;
    use ringkv_engine::record::RecordRef;
    block_on(async {
        let disk = MemDisk::new();
        let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::None), 1_000)
            .await
            .unwrap();
        let segment = 1u64 << 24;
        let header = 32u64;
        let encode = |r: RecordRef<'_>| {
            let mut out = Vec::new();
            r.encode_into(&mut out);
            out
        };
        let old = encode(RecordRef {
            seq: 7,
            timestamp_ms: 1_000,
            key: b"k",
            replaced: &[],
            version: b"v",
            value: Some(b"old"),
            batch_continues: false,
        });
        let new = encode(RecordRef {
            seq: 9,
            timestamp_ms: 1_001,
            key: b"k",
            replaced: &[7],
            version: b"v",
            value: Some(b"new"),
            batch_continues: false,
        });
        // what open found on disk: the newer record
        assert_eq!(
            p.replay(segment, header, &new),
            ReplayOutcome::Applied { records: 1 }
        );
        // the entry of the older record, whose own segment lost it
        let at = header + new.len() as u64;
        assert_eq!(
            p.replay(segment, at, &old),
            ReplayOutcome::Applied { records: 1 }
        );
        // the newer record's entry comes later in the log: present
        assert_eq!(p.replay(segment, header, &new), ReplayOutcome::Present);
        let got = p.get(b"k").await.unwrap();
        let values: Vec<_> = got.iter().map(|v| v.value.clone()).collect();
        assert_eq!(values, vec![Some(b"new".to_vec())]);
    });
}

/// A commit log entry: where its batch went in the segment, and its bytes.
type LogEntry = (u64, Vec<u8>);

/// Writes `writes` (key, value, superseding the key's earlier version or not) into a
/// fresh partition of the commit-log kind, one batch each, and "crashes" (the active
/// segment is left unsealed, so `open` scans it). Returns the segment's id and the
/// commit log entries the writes made.
fn damaged_replay_setup(disk: &MemDisk, writes: &[(&[u8], &[u8], bool)]) -> (u64, Vec<LogEntry>) {
    use ringkv_engine::storage::{Storage, StorageFile};
    block_on(async {
        let (p, _) = Partition::open(disk.folder(FOLDER), logged_config(), 1_000)
            .await
            .unwrap();
        for (key, value, supersede) in writes {
            let replaces: Vec<u64> = if *supersede {
                p.get(key).await.unwrap().iter().map(|v| v.seq).collect()
            } else {
                Vec::new()
            };
            p.write(
                &[WriteOp {
                    key,
                    version: b"v",
                    value: Some(value),
                    replaces: &replaces,
                }],
                1_001,
            )
            .await
            .unwrap();
        }
        p.sync().await.unwrap();
        drop(p);
        let segment = 1u64 << 24;
        let file = disk
            .folder(FOLDER)
            .open(&ringkv_engine::segment::segment_name(segment))
            .await
            .unwrap();
        let bytes = file.read_at(0, file.len() as usize).await.unwrap();
        let scan = ringkv_engine::segment::scan(&bytes, segment);
        assert_eq!(scan.records.len(), writes.len());
        let entries = scan
            .records
            .iter()
            .map(|r| {
                let (at, n) = (r.offset as usize, r.header.total_bytes());
                (r.offset, bytes[at..at + n].to_vec())
            })
            .collect();
        (segment, entries)
    })
}

/// Bit rot in the value of the record `entry` holds (its CRC then fails).
fn rot(disk: &MemDisk, segment: u64, entry: &LogEntry) {
    let name = ringkv_engine::segment::segment_name(segment);
    let end = entry.0 + entry.1.len() as u64;
    assert!(disk.flip_byte(FOLDER, &name, end - 2, 0x10));
}

/// The config of a partition whose writes a commit log makes durable.
fn logged_config() -> PartitionConfig {
    PartitionConfig {
        commit_log: true,
        ..config(Durability::Sync)
    }
}

/// Opens the partition after damage, replays `entries` (all of them, as a commit log
/// holding every write since the last checkpoint would), checks `want`, and checks it
/// again after one more open without the log (deleted after replay).
fn replay_after_damage(
    disk: &MemDisk,
    segment: u64,
    entries: &[LogEntry],
    want: &[(&[u8], &[&[u8]])],
) {
    block_on(async {
        let (p, report) = Partition::open(disk.folder(FOLDER), logged_config(), 2_000)
            .await
            .unwrap();
        assert!(!report.corruption.is_empty(), "the damage is reported");
        common::replay_all(&p, segment, entries);
        p.finish_replay().await.unwrap();
        for round in ["after replay", "after the next open"] {
            if round == "after the next open" {
                drop(p);
                let (p2, _) = Partition::open(disk.folder(FOLDER), logged_config(), 3_000)
                    .await
                    .unwrap();
                check(&p2, want, round).await;
                return;
            }
            check(&p, want, round).await;
        }
    });

    async fn check(
        p: &Partition<ringkv_engine::storage::mem::MemStorage>,
        want: &[(&[u8], &[&[u8]])],
        round: &str,
    ) {
        for (key, values) in want {
            let mut got: Vec<Vec<u8>> = p
                .get(key)
                .await
                .unwrap()
                .into_iter()
                .filter_map(|v| v.value)
                .collect();
            got.sort();
            let want: Vec<Vec<u8>> = values.iter().map(|v| v.to_vec()).collect();
            assert_eq!(got, want, "{round}: {key:?}");
        }
    }
}

/// A commit log entry whose bytes sit where `open` found the segment damaged is not
/// "present" just because the segment is long enough: its records are lost there, and
/// the log (deleted after replay) held their only good copy. Replay puts them into the
/// active segment, where the next `open` finds them too.
#[test]
fn replay_restores_an_entry_that_sits_in_a_damaged_range() {
    let disk = MemDisk::new();
    let writes: [(&[u8], &[u8], bool); 3] = [
        (b"a", b"1", false),
        (b"b", b"2", false),
        (b"c", b"3", false),
    ];
    let (segment, entries) = damaged_replay_setup(&disk, &writes);
    // bit rot in b's value
    rot(&disk, segment, &entries[1]);
    replay_after_damage(
        &disk,
        segment,
        &entries,
        &[(b"a", &[b"1"]), (b"b", &[b"2"]), (b"c", &[b"3"])],
    );
}

/// Two damaged records, the second in the segment's last bytes (a corrupt tail that a
/// segment damaged inside keeps): both come back, and stay after the next open.
#[test]
fn replay_restores_entries_from_two_damaged_places() {
    let disk = MemDisk::new();
    let writes: [(&[u8], &[u8], bool); 4] = [
        (b"a", b"1", false),
        (b"b", b"2", false),
        (b"c", b"3", false),
        (b"d", b"4", false),
    ];
    let (segment, entries) = damaged_replay_setup(&disk, &writes);
    rot(&disk, segment, &entries[1]);
    rot(&disk, segment, &entries[3]);
    replay_after_damage(
        &disk,
        segment,
        &entries,
        &[
            (b"a", &[b"1"]),
            (b"b", &[b"2"]),
            (b"c", &[b"3"]),
            (b"d", &[b"4"]),
        ],
    );
}

/// A segment whose header is unreadable: every record of it comes back from the log.
#[test]
fn replay_restores_the_records_of_a_segment_with_a_damaged_header() {
    let disk = MemDisk::new();
    let writes: [(&[u8], &[u8], bool); 2] = [(b"a", b"1", false), (b"b", b"2", false)];
    let (segment, entries) = damaged_replay_setup(&disk, &writes);
    let name = ringkv_engine::segment::segment_name(segment);
    assert!(disk.flip_byte(FOLDER, &name, 0, 0xff));
    replay_after_damage(
        &disk,
        segment,
        &entries,
        &[(b"a", &[b"1"]), (b"b", &[b"2"])],
    );
}

/// A record put back from the log supersedes nothing that came after it: when a later
/// record replaced it, that one follows it into the active segment, so the next `open`
/// (which applies the active segment last) does not bring the old value back beside it.
#[test]
fn a_version_put_back_from_the_log_stays_superseded() {
    let disk = MemDisk::new();
    let writes: [(&[u8], &[u8], bool); 3] = [
        (b"k", b"old", false),
        (b"x", b"1", false),
        (b"k", b"new", true),
    ];
    let (segment, entries) = damaged_replay_setup(&disk, &writes);
    rot(&disk, segment, &entries[0]);
    replay_after_damage(
        &disk,
        segment,
        &entries,
        &[(b"k", &[b"new"]), (b"x", &[b"1"])],
    );
}

/// Replay after damage can run again: a crash before `finish_replay` (the commit log is
/// still there) leaves a fresh active segment with part of the copies, and the next
/// start copies everything again into another one.
#[test]
fn replay_after_damage_runs_again_after_a_crash_in_it() {
    let disk = MemDisk::new();
    let writes: [(&[u8], &[u8], bool); 4] = [
        (b"k", b"old", false),
        (b"x", b"1", false),
        (b"k", b"new", true),
        (b"y", b"2", false),
    ];
    let (segment, entries) = damaged_replay_setup(&disk, &writes);
    rot(&disk, segment, &entries[0]);
    block_on(async {
        let (p, _) = Partition::open(disk.folder(FOLDER), logged_config(), 2_000)
            .await
            .unwrap();
        for (offset, bytes) in &entries[..2] {
            p.replay(segment, *offset, bytes);
        }
        // a crash before finish_replay
    });
    disk.crash(7);
    replay_after_damage(
        &disk,
        segment,
        &entries,
        &[(b"k", &[b"new"]), (b"x", &[b"1"]), (b"y", &[b"2"])],
    );
}

/// A write that came due for a roll-over and was dropped half-way through it (its
/// task cancelled) left the partition marked as rolling: it never rolled again, and
/// its active segment grew past the segment size for good.
#[test]
fn a_roll_dropped_half_way_does_not_stop_later_rolls() {
    block_on(async {
        let disk = MemDisk::new();
        let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::None), 1_000)
            .await
            .unwrap();
        disk.set_yielding(true);
        // writes of 300 bytes until one comes due for a roll and waits inside it (for
        // the sync that seals the full segment): it is dropped there
        let mut dropped = false;
        for i in 0..20u32 {
            let key = format!("fill-{i}");
            let mut write = Box::pin(put(&p, key.as_bytes(), &[2; 300], 1_002));
            if futures_lite::future::poll_once(&mut write).await.is_none() {
                dropped = true;
                break;
            }
        }
        assert!(dropped, "a write waited inside its roll");
        disk.set_yielding(false);
        let before = p.stats().segments;
        for i in 0..40u32 {
            put(&p, format!("after-{i}").as_bytes(), &[3; 300], 1_003)
                .await
                .unwrap();
        }
        assert!(
            p.stats().segments >= before + 3,
            "{} segments after 12 KB more, {before} before",
            p.stats().segments
        );
    });
}

/// A record at the last sequence number (only reachable through data forged to look
/// like records, read back after damage): the next write is refused with an error
/// instead of being written past `SEQ_MAX`, acknowledged, and then refused by every
/// read as corrupt (and dropped by the next open).
#[test]
fn a_write_past_the_last_sequence_number_is_refused_not_written_unreadable() {
    use ringkv_engine::partition::ReplayOutcome;
    use ringkv_engine::record::{RecordRef, SEQ_MAX};
    block_on(async {
        let disk = MemDisk::new();
        let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::None), 1_000)
            .await
            .unwrap();
        let mut last = Vec::new();
        RecordRef {
            seq: SEQ_MAX,
            timestamp_ms: 1_000,
            key: b"last",
            replaced: &[],
            version: b"v",
            value: Some(b"x"),
            batch_continues: false,
        }
        .encode_into(&mut last);
        assert_eq!(
            p.replay(1 << 24, 32, &last),
            ReplayOutcome::Applied { records: 1 }
        );
        let err = put(&p, b"next", b"y", 1_001).await.unwrap_err();
        assert!(
            err.to_string().contains("sequence numbers exhausted"),
            "{err}"
        );
        assert!(p.get(b"next").await.unwrap().is_empty());
        assert_eq!(p.get(b"last").await.unwrap().len(), 1);
    });
}

/// What `open` recovers after a process crash is made durable before it is served: a
/// later power loss does not take away keys the reopened partition already answered
/// with. Before, `open` trusted the crashed process's unsynced bytes as they were (they
/// were still in the page cache) without syncing them, so a power loss after the
/// restart could drop values that reads had returned.
#[test]
fn what_open_recovers_after_a_process_crash_survives_a_later_power_loss() {
    for seed in 0..20u64 {
        block_on(async {
            let disk = MemDisk::new();
            let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::None), 1_000)
                .await
                .unwrap();
            // 300-byte values through a 1 KiB write buffer: most reach the file, none
            // is synced (the 4 KiB segment does not fill, so no roll-over syncs it)
            for i in 0..10u32 {
                put(&p, format!("k{i}").as_bytes(), &[7; 300], 1_000)
                    .await
                    .unwrap();
            }
            // the process dies: the bytes written are still in the page cache
            drop(p);
            let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::None), 2_000)
                .await
                .unwrap();
            let mut served = Vec::new();
            for i in 0..10u32 {
                let key = format!("k{i}");
                if !p.get(key.as_bytes()).await.unwrap().is_empty() {
                    served.push(key);
                }
            }
            assert!(
                served.len() >= 6,
                "seed {seed}: the restart found {served:?}"
            );
            drop(p);
            // then the power goes
            disk.crash(seed);
            let (p, _) = Partition::open(disk.folder(FOLDER), config(Durability::None), 3_000)
                .await
                .unwrap();
            for key in &served {
                assert!(
                    !p.get(key.as_bytes()).await.unwrap().is_empty(),
                    "seed {seed}: {key} was served after the restart, then lost"
                );
            }
        });
    }
}

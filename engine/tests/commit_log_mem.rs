//! The shard commit log on the crashing in-memory disk: partitions in `sync` mode that
//! commit through one log, random writes (some running concurrently, so group commits
//! cover several partitions), roll-overs, compaction, log rotation, checkpoints,
//! background segment flushes and clean reopens, then a crash after `k` operations. Recovery opens the log, opens the
//! partitions (which cut unsynced segment tails), replays the log and checkpoints;
//! every acknowledged write must be back with its exact bytes, and a second crash
//! right after recovery (replay is idempotent) must not change that.

use futures_lite::future::block_on;
use ringkv_engine::commit_log::CommitLog;
use ringkv_engine::partition::ReplayOutcome;
use ringkv_engine::storage::mem::{MemDisk, MemStorage, SplitMix};
use ringkv_engine::{Durability, Partition, PartitionConfig, WriteOp};
use std::rc::Rc;

mod common;

use common::{normalise, same};

const PARTITIONS: u64 = 3;
const LOG_FOLDER: &str = "/data/commitlog";

type Versions = Vec<common::Version>;
type Model = common::Model<(u64, Vec<u8>)>;

fn folder(p: u64) -> String {
    format!("/data/p{p}")
}

fn config(p: u64) -> PartitionConfig {
    PartitionConfig {
        partition: p,
        durability: Durability::Sync,
        segment_bytes_max: 4096,
        buffer_bytes_max: 1024,
        tombstone_grace_ms: 50,
        commit_log: true,
        ..PartitionConfig::default()
    }
}

struct Node {
    log: Rc<CommitLog<MemStorage>>,
    parts: Vec<Rc<Partition<MemStorage>>>,
}

impl Node {
    /// A clean shutdown, as the server's: every partition closes (synced), then the
    /// log's files go.
    async fn close(&self) {
        for part in &self.parts {
            part.close().await.expect("close");
        }
        self.log
            .remove_all()
            .await
            .expect("the log's files removed");
    }
}

/// Opens the log and the partitions and replays, as the server does at start.
async fn open_node(disk: &MemDisk, now_ms: u64, log_bytes: u64) -> (Node, usize) {
    let (log, recovery) = CommitLog::open(disk.folder(LOG_FOLDER), log_bytes)
        .await
        .expect("open log");
    let mut parts = Vec::new();
    for p in 0..PARTITIONS {
        let (part, report) = Partition::open(disk.folder(&folder(p)), config(p), now_ms)
            .await
            .expect("open partition");
        assert!(report.corruption.is_empty(), "{report:?}");
        parts.push(Rc::new(part));
    }
    let mut applied = 0;
    for e in &recovery.entries {
        let part = &parts[e.log_id as usize];
        match part.replay(e.segment, e.offset, &e.bytes) {
            ReplayOutcome::Applied { records } => applied += records,
            ReplayOutcome::Present | ReplayOutcome::SegmentGone => {}
            ReplayOutcome::Mismatch { segment_len } => panic!(
                "entry {:?} does not fit its segment (len {segment_len})",
                (e.log_id, e.segment, e.offset, e.bytes.len())
            ),
        }
    }
    for part in &parts {
        part.finish_replay().await.expect("finish replay");
        assert!(!part.needs_repair());
    }
    let log = Rc::new(log);
    log.checkpoint(|| log.sync_filesystem())
        .await
        .expect("checkpoint after replay");
    assert!(!log.checkpoint_due());
    for part in &parts {
        part.set_commit_log(log.clone());
    }
    (Node { log, parts }, applied)
}

async fn sync_all(parts: &[Rc<Partition<MemStorage>>]) -> std::io::Result<()> {
    for p in parts {
        p.sync_own()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

async fn read_state(node: &Node, keys: &[Vec<u8>]) -> Model {
    let mut out = Model::new();
    for (p, part) in node.parts.iter().enumerate() {
        let mut total = 0;
        part.for_each_key(|_, _| total += 1);
        let mut found = 0;
        let other: &[u8] = b"other";
        for key in keys.iter().map(Vec::as_slice).chain([other]) {
            let mut versions: Versions = part
                .get(key)
                .await
                .expect("read")
                .into_iter()
                .map(|v| (v.value, v.version))
                .collect();
            versions.sort();
            if !versions.is_empty() {
                found += 1;
                out.insert((p as u64, key.to_vec()), versions);
            }
        }
        assert_eq!(total, found, "keydir holds keys the model never wrote");
    }
    out
}

/// One write the model knows how to apply.
struct Planned {
    partition: u64,
    key: Vec<u8>,
    version: Vec<u8>,
    value: Option<Vec<u8>>,
    replaces: Vec<u64>,
    replaced_versions: Vec<Vec<u8>>,
}

async fn plan(node: &Node, rng: &mut SplitMix, keys: &[Vec<u8>], tag: String) -> Planned {
    let partition = rng.next_u64() % PARTITIONS;
    let key = keys[(rng.next_u64() % keys.len() as u64) as usize].clone();
    let stored = node.parts[partition as usize].get(&key).await.unwrap();
    let mut replaces = Vec::new();
    let mut replaced_versions = Vec::new();
    for v in &stored {
        if rng.next_u64() % 3 != 0 {
            replaces.push(v.seq);
            replaced_versions.push(v.version.clone());
        }
    }
    let tombstone = rng.next_u64() % 6 == 0;
    let len = (rng.next_u64() % 400) as usize;
    let value = (!tombstone).then(|| (0..len).map(|i| (i as u8) ^ tag.len() as u8).collect());
    Planned {
        partition,
        key,
        version: tag.into_bytes(),
        value,
        replaces,
        replaced_versions,
    }
}

async fn write(node: &Node, w: &Planned, now_ms: u64) {
    node.parts[w.partition as usize]
        .write(
            &[WriteOp {
                key: &w.key,
                version: &w.version,
                value: w.value.as_deref(),
                replaces: &w.replaces,
            }],
            now_ms,
        )
        .await
        .expect("write");
}

fn apply(model: &mut Model, w: Planned) {
    let entry = model.entry((w.partition, w.key)).or_default();
    entry.retain(|(_, v)| !w.replaced_versions.contains(v));
    entry.push((w.value, w.version));
}

/// Returns how many records the recovery after the crash replayed.
fn run(seed: u64, ops_before_crash: usize) -> usize {
    block_on(async {
        let disk = MemDisk::new();
        disk.set_yielding(true);
        let mut rng = SplitMix(seed);
        // small files: rotations and checkpoints happen often
        let log_bytes = 1024 + rng.next_u64() % 4096;
        let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("key-{i}").into_bytes()).collect();
        let mut now_ms = 1_000_000u64;
        let (mut node, _) = open_node(&disk, now_ms, log_bytes).await;
        let mut model = Model::new();
        for op in 0..ops_before_crash {
            now_ms += 1 + rng.next_u64() % 20;
            let choice = rng.next_u64() % 100;
            if choice < 50 {
                let w = plan(&node, &mut rng, &keys, format!("op{op}")).await;
                write(&node, &w, now_ms).await;
                apply(&mut model, w);
            } else if choice < 70 {
                // two writes at once (different keys or partitions): one group commit
                // may cover both
                let a = plan(&node, &mut rng, &keys, format!("op{op}a")).await;
                let mut b = plan(&node, &mut rng, &keys, format!("op{op}b")).await;
                if (a.partition, &a.key) == (b.partition, &b.key) {
                    b.replaces.clear();
                    b.replaced_versions.clear();
                    b.key = b"other".to_vec();
                }
                futures_lite::future::zip(write(&node, &a, now_ms), write(&node, &b, now_ms)).await;
                apply(&mut model, a);
                apply(&mut model, b);
            } else if choice < 80 {
                node.log
                    .checkpoint(|| sync_all(&node.parts))
                    .await
                    .expect("checkpoint");
            } else if choice < 85 {
                // the runtime's background work between writes
                node.log.prepare_spare().await.expect("spare");
                for part in &node.parts {
                    part.flush_if_buffered().await.expect("flush");
                }
            } else if choice < 92 {
                let p = (rng.next_u64() % PARTITIONS) as usize;
                node.parts[p].compact(now_ms).await.expect("compact");
                let compacted = read_state(&node, &keys).await;
                assert!(
                    same(&compacted, &normalise(&model)),
                    "seed {seed} op {op}: compaction changed live data"
                );
                model = compacted;
            } else if choice < 95 {
                // clean shutdown: partitions close (synced), the log goes
                node.close().await;
                drop(node);
                let (reopened, applied) = open_node(&disk, now_ms, log_bytes).await;
                assert_eq!(applied, 0, "seed {seed}: a clean reopen replayed writes");
                node = reopened;
                assert!(
                    same(&read_state(&node, &keys).await, &normalise(&model)),
                    "seed {seed} op {op}: clean reopen lost data"
                );
            } else {
                let state = read_state(&node, &keys).await;
                assert!(
                    same(&state, &normalise(&model)),
                    "seed {seed} op {op}: read mismatch"
                );
            }
        }
        drop(node);
        disk.crash(seed ^ 0xC0FFEE);
        let (node, replayed) = open_node(&disk, now_ms + 1, log_bytes).await;
        let state = read_state(&node, &keys).await;
        let want = normalise(&model);
        assert!(
            same(&state, &want),
            "seed {seed} k {ops_before_crash}: an acknowledged write is missing or wrong\n got {state:?}\nwant {want:?}"
        );
        // crash again at once: what recovery did is durable, and replay is idempotent
        drop(node);
        disk.crash(seed ^ 0xBEEF);
        let (node, _) = open_node(&disk, now_ms + 2, log_bytes).await;
        assert!(
            same(&read_state(&node, &keys).await, &want),
            "seed {seed}: the second recovery differs"
        );
        // and the node keeps working
        let w = Planned {
            partition: 1,
            key: b"after".to_vec(),
            version: b"v".to_vec(),
            value: Some(b"crash".to_vec()),
            replaces: Vec::new(),
            replaced_versions: Vec::new(),
        };
        write(&node, &w, now_ms + 3).await;
        assert_eq!(
            node.parts[1].get(b"after").await.unwrap()[0]
                .value
                .as_deref(),
            Some(&b"crash"[..])
        );
        replayed
    })
}

#[test]
fn crash_after_k_ops_keeps_every_acknowledged_write() {
    let mut replayed = 0;
    for seed in 0..150u64 {
        for k in [0usize, 1, 4, 9, 20, 45, 90, 160] {
            replayed += run(seed * 1000 + k as u64, k);
        }
    }
    // the crashes lost segment tails that only the log still had
    assert!(replayed > 1000, "replayed only {replayed} records");
}

#[test]
fn a_failed_log_sync_refuses_the_write_and_later_ones() {
    block_on(async {
        let disk = MemDisk::new();
        let (node, _) = open_node(&disk, 1, 1 << 20).await;
        let put = |key: &'static [u8]| WriteOp {
            key,
            version: b"v",
            value: Some(b"x"),
            replaces: &[],
        };
        node.parts[0].write(&[put(b"a")], 2).await.unwrap();
        disk.fail_syncs_after(0);
        assert!(node.parts[0].write(&[put(b"b")], 3).await.is_err());
        disk.fail_syncs_after(u64::MAX);
        // the log failed for good: no partition acknowledges through it any more
        assert!(node.parts[1].write(&[put(b"c")], 4).await.is_err());
        assert!(node.log.failure().is_some());
        drop(node);
        disk.crash(3);
        let (node, _) = open_node(&disk, 5, 1 << 20).await;
        // the acknowledged write is there (the refused ones may or may not be)
        assert_eq!(
            node.parts[0].get(b"a").await.unwrap()[0].value.as_deref(),
            Some(&b"x"[..])
        );
        node.parts[2].write(&[put(b"d")], 6).await.unwrap();
    });
}

/// A writer whose future is dropped while it leads a group commit (the runtime drops
/// tasks at shutdown; a timeout may drop a write) hands the lead back: later writes are
/// acknowledged, and a partition flush dropped mid-write does not leave its segment
/// busy for ever.
#[test]
fn a_leader_dropped_mid_sync_hands_the_lead_back() {
    block_on(async {
        let disk = MemDisk::new();
        let (node, _) = open_node(&disk, 1, 1 << 20).await;
        disk.set_yielding(true);
        let put = |key: &'static [u8]| WriteOp {
            key,
            version: b"v",
            value: Some(b"x"),
            replaces: &[],
        };
        {
            let ops = [put(b"dropped")];
            let mut write = Box::pin(node.parts[0].write(&ops, 2));
            // the first poll appends and starts the log sync, which yields once
            assert!(futures_lite::future::poll_once(&mut write).await.is_none());
        }
        // no leader is left holding the log: this write leads its own group commit
        finishes(node.parts[1].write(&[put(b"next")], 3))
            .await
            .unwrap();
        assert!(node.log.failure().is_none());
        {
            let mut sync = Box::pin(node.parts[1].sync_own());
            assert!(futures_lite::future::poll_once(&mut sync).await.is_none());
        }
        finishes(node.parts[1].sync_own()).await.unwrap();
        node.parts[1].close().await.unwrap();
    });
}

/// `fut`'s output, or a panic if it is still pending after many turns (a hang).
async fn finishes<T>(fut: impl std::future::Future<Output = T>) -> T {
    futures_lite::future::or(fut, async {
        for _ in 0..100_000 {
            futures_lite::future::yield_now().await;
        }
        panic!("still pending: something holds a turn it never gives back")
    })
    .await
}

/// Damage inside the synced part of the log (not a torn last write) is reported, and
/// the entries after it are still read back rather than silently dropped.
#[test]
fn damage_in_the_middle_of_the_log_is_reported_and_later_entries_survive() {
    block_on(async {
        let disk = MemDisk::new();
        let (log, recovery) = CommitLog::open(disk.folder(LOG_FOLDER), 1 << 20)
            .await
            .unwrap();
        assert_eq!(recovery.files, 0);
        for (log_id, payload) in [(0u64, &b"first"[..]), (1, b"second"), (2, b"third")] {
            let at = log.append(log_id, 1, 0, payload);
            log.wait_durable(at).await.unwrap();
        }
        drop(log);
        disk.crash(1);
        // a byte of the second entry's payload
        let second_payload = (40 + 5 + 40 + 2) as u64;
        assert!(disk.flip_byte(LOG_FOLDER, "0000000000000001.clog", second_payload, 0x40));
        let (_, recovery) = CommitLog::open(disk.folder(LOG_FOLDER), 1 << 20)
            .await
            .unwrap();
        let read: Vec<(u64, Vec<u8>)> = recovery
            .entries
            .iter()
            .map(|e| (e.log_id, e.bytes.clone()))
            .collect();
        assert_eq!(read, vec![(0, b"first".to_vec()), (2, b"third".to_vec())]);
        assert_eq!(recovery.corrupt_bytes, 40 + 6);
        assert_eq!(recovery.corrupt_regions, 1);
        assert_eq!(recovery.torn_bytes, 0);
    });
}

/// A put done in one step (`try_coordinate_put_now`, as the server does for a cluster
/// of one) is in the keydir at once but durable only at the log position it returns:
/// once `wait_logged` returns, a crash keeps it. It agrees with `coordinate_put`, and
/// steps aside (does nothing) whenever the full path has to wait for something else.
#[test]
fn a_put_done_in_one_step_is_durable_once_its_log_position_is() {
    use ringkv_engine::version::{Context, VClock};
    const CLOCK_MAX: usize = 16;
    block_on(async {
        let disk = MemDisk::new();
        let (node, _) = open_node(&disk, 1, 1 << 20).await;
        let p = &node.parts[0];
        let empty = VClock::new();
        let (first, position) = p
            .try_coordinate_put_now(1, b"k", &empty, Some(b"x"), 2, CLOCK_MAX)
            .expect("an absent key needs no waiting")
            .unwrap();
        let position = position.expect("sync mode waits for the log");
        assert!(p.logged_durable() < position);
        // readable at once (like any write before its sync), with the same context
        let (siblings, context) = p.read_siblings(b"k").await.unwrap();
        assert_eq!(siblings.len(), 1);
        assert_eq!(context, first.context);
        p.wait_logged(position).await.unwrap();
        assert!(p.logged_durable() >= position);

        // a second put without context makes a sibling, as coordinate_put would
        let (second, position) = p
            .try_coordinate_put_now(1, b"k", &empty, Some(b"y"), 3, CLOCK_MAX)
            .unwrap()
            .unwrap();
        assert_eq!(second.siblings, 2);
        assert_eq!(p.read_siblings(b"k").await.unwrap().1, second.context);
        p.wait_logged(position.unwrap()).await.unwrap();

        // it steps aside while another write holds the key ...
        let turn = p.lock_key(b"k").await;
        assert!(p
            .try_coordinate_put_now(1, b"k", &second.context, Some(b"z"), 4, CLOCK_MAX)
            .is_none());
        drop(turn);
        // ... and when the context is ahead of the local data (a new epoch first)
        let mut ahead = second.context.clone();
        let me = ringkv_engine::version::ActorId {
            node: 1,
            epoch: p.epoch(),
        };
        ahead.raise(me, 100, 4);
        assert!(p
            .try_coordinate_put_now(1, b"k", &ahead, Some(b"z"), 4, CLOCK_MAX)
            .is_none());
        let acknowledged = Context::encode(&second.context).bytes;

        drop(node);
        disk.crash(7);
        let (node, _) = open_node(&disk, 10, 1 << 20).await;
        let p = &node.parts[0];
        // after a reopen the cache is cold: the key's versions must come from the log
        assert!(p
            .try_coordinate_put_now(1, b"k", &empty, Some(b"z"), 11, CLOCK_MAX)
            .is_none());
        let (siblings, context) = p.read_siblings(b"k").await.unwrap();
        let mut values: Vec<_> = siblings.into_iter().map(|s| s.value.unwrap()).collect();
        values.sort();
        assert_eq!(values, vec![b"x".to_vec(), b"y".to_vec()]);
        assert_eq!(Context::encode(&context).bytes, acknowledged);
        // the read cached them: one step again, and it resolves the siblings it was given
        let (done, position) = p
            .try_coordinate_put_now(1, b"k", &context, None, 12, CLOCK_MAX)
            .unwrap()
            .unwrap();
        assert_eq!(done.siblings, 1);
        p.wait_logged(position.unwrap()).await.unwrap();
        let left = p.get(b"k").await.unwrap();
        assert!(left.len() == 1 && left[0].value.is_none());
    });
}

/// A failed log sync fails the one-step put's wait (its reply becomes an error), as it
/// fails a waiting writer.
#[test]
fn a_failed_log_sync_fails_a_one_step_put() {
    use ringkv_engine::version::VClock;
    block_on(async {
        let disk = MemDisk::new();
        let (node, _) = open_node(&disk, 1, 1 << 20).await;
        let p = &node.parts[0];
        let (_, position) = p
            .try_coordinate_put_now(1, b"k", &VClock::new(), Some(b"x"), 2, 16)
            .unwrap()
            .unwrap();
        disk.fail_syncs_after(0);
        assert!(p.wait_logged(position.unwrap()).await.is_err());
        assert!(p.failure().is_some());
        // the partition refuses writes from then on, in one step as on the full path
        assert!(matches!(
            p.try_coordinate_put_now(1, b"j", &VClock::new(), Some(b"x"), 3, 16),
            None | Some(Err(_))
        ));
    });
}

/// A rotation that comes while the next file is still being made ahead of time
/// completes, and the writes on both sides of it survive a crash. (On the real disk
/// the rotation must wait for that file rather than create it again: a second
/// `create` would truncate it under the other. The in-memory disk cannot show that
/// truncation, so this checks the interleaving, not the race.)
#[test]
fn a_rotation_while_the_spare_file_is_made_keeps_every_write() {
    block_on(async {
        let disk = MemDisk::new();
        let (node, _) = open_node(&disk, 1, 4096).await;
        let put = |key: &'static [u8]| WriteOp {
            key,
            version: b"v",
            value: Some(&[7u8; 700][..]),
            replaces: &[],
        };
        // past half of the first file: a spare is due
        for (i, key) in [&b"a"[..], b"b", b"c"].into_iter().enumerate() {
            node.parts[0]
                .write(&[put(key)], 2 + i as u64)
                .await
                .unwrap();
        }
        let generation = node.log.generation();
        disk.set_yielding(true);
        let mut spare = Box::pin(node.log.prepare_spare());
        assert!(futures_lite::future::poll_once(&mut spare).await.is_none());
        // these fill the file: one of them rotates while the spare is half made
        let writes = async {
            for key in [&b"d"[..], b"e", b"f", b"g"] {
                node.parts[1].write(&[put(key)], 10).await.unwrap();
            }
        };
        let (spared, ()) = futures_lite::future::zip(spare, finishes(writes)).await;
        spared.unwrap();
        assert!(node.log.generation() > generation, "the log rotated");
        assert!(node.log.failure().is_none());
        disk.set_yielding(false);
        drop(node);
        disk.crash(11);
        let (node, _) = open_node(&disk, 20, 4096).await;
        for key in [&b"a"[..], b"b", b"c"] {
            assert_eq!(node.parts[0].get(key).await.unwrap().len(), 1);
        }
        for key in [&b"d"[..], b"e", b"f", b"g"] {
            assert_eq!(node.parts[1].get(key).await.unwrap().len(), 1);
        }
    });
}

/// A partition's sync that leads the shard's group sync (`syncfs`) and is dropped
/// half-way (a background task cancelled at shutdown) left the group busy for good:
/// every later sync of the shard waited for ever, so `close` hung.
#[test]
fn a_sync_group_leader_dropped_mid_sync_does_not_hang_close() {
    block_on(async {
        let disk = MemDisk::new();
        let (node, _) = open_node(&disk, 1, 1 << 20).await;
        let group = Rc::new(ringkv_engine::sync_group::SyncGroup::new());
        for p in &node.parts {
            p.set_sync_group(group.clone());
        }
        let ops = [WriteOp {
            key: b"a",
            version: b"v",
            value: Some(b"x"),
            replaces: &[],
        }];
        node.parts[0].write(&ops, 2).await.unwrap();
        disk.set_yielding(true);
        {
            let mut sync = Box::pin(node.parts[0].sync());
            assert!(
                futures_lite::future::poll_once(&mut sync).await.is_none(),
                "the sync waits for the group's file-system sync"
            );
        } // dropped, as shutdown drops the background tasks
        finishes(node.parts[0].close()).await.unwrap();
        disk.set_yielding(false);
    });
}

/// A checkpoint that removed its retired files and then failed (its folder sync)
/// kept them on its list, and every later checkpoint failed on the first one
/// ("no file"): the log was never cut again and grew without bound.
#[test]
fn a_checkpoint_that_failed_after_its_removes_can_run_again() {
    for then_shut_down in [false, true] {
        checkpoint_failed_after_its_removes(then_shut_down);
    }
}

/// ... and the clean shutdown after it (which removes every log file) succeeds too.
fn checkpoint_failed_after_its_removes(then_shut_down: bool) {
    block_on(async {
        let disk = MemDisk::new();
        let (node, _) = open_node(&disk, 1, 4096).await;
        let value = [7u8; 700];
        let mut i = 0;
        while !node.log.checkpoint_due() {
            let key = format!("k{i}");
            let ops = [WriteOp {
                key: key.as_bytes(),
                version: b"v",
                value: Some(&value[..]),
                replaces: &[],
            }];
            node.parts[0].write(&ops, 2).await.unwrap();
            i += 1;
        }
        // the partitions are durable: the checkpoint's own syncs have nothing to do,
        // and only its folder sync meets the failing disk
        sync_all(&node.parts).await.unwrap();
        disk.fail_syncs_after(0);
        assert!(node.log.checkpoint(|| sync_all(&node.parts)).await.is_err());
        disk.fail_syncs_after(u64::MAX);
        if then_shut_down {
            node.close().await;
            return;
        }
        node.log
            .checkpoint(|| sync_all(&node.parts))
            .await
            .expect("the next checkpoint");
        assert!(!node.log.checkpoint_due());
    });
}

/// A write whose reply waits for its group commit when the shard's drain runs out and
/// the partitions close: closing synced it, so the wait ends Ok (it was told the log
/// had failed, and the client `Unavailable`, for a write on disk). An entry appended
/// after that is refused.
#[test]
fn an_entry_a_clean_close_made_durable_is_reported_durable() {
    block_on(async {
        let disk = MemDisk::new();
        let (node, _) = open_node(&disk, 1, 1 << 20).await;
        let position = node.log.append(1, 0, 0, b"an entry");
        assert!(node.log.durable() < position);
        node.close().await;
        node.log
            .wait_durable(position)
            .await
            .expect("durable by the close");
        let later = node.log.append(1, 0, 0, b"too late");
        assert!(node.log.wait_durable(later).await.is_err());
    });
}

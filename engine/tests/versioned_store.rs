//! The storage engine keeps exactly the surviving sibling set: versioning rules through
//! real partitions (on the in-memory disk), across replicas, compaction and wipes.

use futures_lite::future::block_on;
use ringkv_engine::storage::mem::{MemDisk, MemStorage};
use ringkv_engine::version::{Context, VClock};
use ringkv_engine::versioned::ApplyOutcome;
use ringkv_engine::{Partition, PartitionConfig};

const CLOCK_MAX: usize = 16;

fn config() -> PartitionConfig {
    PartitionConfig {
        segment_bytes_max: 4096,
        tombstone_grace_ms: 100,
        ..PartitionConfig::default()
    }
}

async fn replica(disk: &MemDisk, name: &str, now_ms: u64) -> Partition<MemStorage> {
    Partition::open(disk.folder(name), config(), now_ms)
        .await
        .unwrap()
        .0
}

async fn values(p: &Partition<MemStorage>, key: &[u8]) -> Vec<Option<Vec<u8>>> {
    let (siblings, _) = p.read_siblings(key).await.unwrap();
    let mut v: Vec<_> = siblings.into_iter().map(|s| s.value).collect();
    v.sort();
    v
}

/// Sends every sibling of `key` from one replica to another (anti-entropy / repair).
async fn exchange(
    from: &Partition<MemStorage>,
    to: &Partition<MemStorage>,
    key: &[u8],
    now_ms: u64,
) {
    let (siblings, _) = from.read_siblings(key).await.unwrap();
    for s in siblings {
        to.apply_version(key, &s.version, s.value.as_deref(), now_ms)
            .await
            .unwrap();
    }
}

#[test]
fn puts_without_context_are_siblings_and_a_merged_context_collapses_them() {
    block_on(async {
        let disk = MemDisk::new();
        let p = replica(&disk, "a", 1_000).await;
        p.coordinate_put(1, b"k", &VClock::new(), Some(b"x"), 1_001, CLOCK_MAX)
            .await
            .unwrap();
        let out = p
            .coordinate_put(1, b"k", &VClock::new(), Some(b"y"), 1_002, CLOCK_MAX)
            .await
            .unwrap();
        assert_eq!(out.siblings, 2);
        assert_eq!(
            values(&p, b"k").await,
            vec![Some(b"x".to_vec()), Some(b"y".to_vec())]
        );
        // the client reads both and writes back with the context it got
        let (_, ctx) = p.read_siblings(b"k").await.unwrap();
        let wire = Context::encode(&ctx).bytes;
        let ctx = Context::decode(&wire).unwrap();
        let out = p
            .coordinate_put(1, b"k", &ctx, Some(b"xy"), 1_003, CLOCK_MAX)
            .await
            .unwrap();
        assert_eq!(out.siblings, 1);
        assert_eq!(values(&p, b"k").await, vec![Some(b"xy".to_vec())]);
        // survives a reopen and a compaction with exactly that sibling set
        p.close().await.unwrap();
        drop(p);
        let p = replica(&disk, "a", 2_000).await;
        p.compact(2_001).await.unwrap();
        assert_eq!(values(&p, b"k").await, vec![Some(b"xy".to_vec())]);
    });
}

#[test]
fn stale_version_from_elsewhere_is_ignored_and_the_reply_says_so() {
    block_on(async {
        let disk = MemDisk::new();
        let a = replica(&disk, "a", 1_000).await;
        let b = replica(&disk, "b", 1_000).await;
        let first = a
            .coordinate_put(1, b"k", &VClock::new(), Some(b"old"), 1_001, CLOCK_MAX)
            .await
            .unwrap();
        let second = a
            .coordinate_put(1, b"k", &first.context, Some(b"new"), 1_002, CLOCK_MAX)
            .await
            .unwrap();
        let applied = b
            .apply_version(b"k", &second.version, Some(b"new"), 1_003)
            .await
            .unwrap();
        assert_eq!(
            applied,
            ApplyOutcome::Applied {
                replaced: 0,
                siblings: 1
            }
        );
        let stale = b
            .apply_version(b"k", &first.version, Some(b"old"), 1_004)
            .await
            .unwrap();
        assert!(matches!(stale, ApplyOutcome::Stale(_)), "{stale:?}");
        let dup = b
            .apply_version(b"k", &second.version, Some(b"new"), 1_005)
            .await
            .unwrap();
        assert!(matches!(dup, ApplyOutcome::Stale(_)), "{dup:?}");
        assert_eq!(values(&b, b"k").await, vec![Some(b"new".to_vec())]);
    });
}

#[test]
fn doomstone_late_tombstone_does_not_delete_a_recreated_value() {
    block_on(async {
        let disk = MemDisk::new();
        let a = replica(&disk, "a", 1_000).await;
        let b = replica(&disk, "b", 1_000).await;
        let put = a
            .coordinate_put(1, b"k", &VClock::new(), Some(b"v1"), 1_001, CLOCK_MAX)
            .await
            .unwrap();
        exchange(&a, &b, b"k", 1_001).await;
        let del = a
            .coordinate_put(1, b"k", &put.context, None, 1_002, CLOCK_MAX)
            .await
            .unwrap();
        // the client reads the tombstone's context and recreates the key
        let (_, ctx) = a.read_siblings(b"k").await.unwrap();
        a.coordinate_put(1, b"k", &ctx, Some(b"v2"), 1_003, CLOCK_MAX)
            .await
            .unwrap();
        exchange(&a, &b, b"k", 1_004).await;
        // the tombstone arrives late, as a hint would deliver it
        let late = b
            .apply_version(b"k", &del.version, None, 1_005)
            .await
            .unwrap();
        assert!(matches!(late, ApplyOutcome::Stale(_)));
        assert_eq!(values(&b, b"k").await, vec![Some(b"v2".to_vec())]);

        // with the tombstone reaped by compaction before the key is recreated
        let c = replica(&disk, "c", 10_000).await;
        let put = c
            .coordinate_put(3, b"r", &VClock::new(), Some(b"v1"), 10_001, CLOCK_MAX)
            .await
            .unwrap();
        let del = c
            .coordinate_put(3, b"r", &put.context, None, 10_002, CLOCK_MAX)
            .await
            .unwrap();
        let epoch_before = c.epoch();
        c.write(
            &[ringkv_engine::WriteOp {
                key: b"filler",
                version: &del.version.encode_to_vec(),
                value: Some(&[0; 5000]),
                replaces: &[],
            }],
            10_003,
        )
        .await
        .unwrap();
        let report = c.compact(20_000).await.unwrap();
        assert_eq!(report.tombstones_dropped, 1);
        assert!(values(&c, b"r").await.is_empty());
        assert!(c.epoch() > epoch_before, "reaping moves to a new epoch");
        c.coordinate_put(3, b"r", &VClock::new(), Some(b"v2"), 20_001, CLOCK_MAX)
            .await
            .unwrap();
        let late = c
            .apply_version(b"r", &del.version, None, 20_002)
            .await
            .unwrap();
        // concurrent, so kept as a sibling: the new value is not lost
        assert!(
            matches!(late, ApplyOutcome::Applied { replaced: 0, .. }),
            "{late:?}"
        );
        assert!(values(&c, b"r").await.contains(&Some(b"v2".to_vec())));
    });
}

#[test]
fn kv679_wiped_replica_keeps_coordinating_without_being_dominated() {
    block_on(async {
        let disk = MemDisk::new();
        let a = replica(&disk, "a", 1_000_000).await;
        let b = replica(&disk, "b", 1_000_000).await;
        let mut ctx = VClock::new();
        for i in 0..5u8 {
            let out = a
                .coordinate_put(1, b"k", &ctx, Some(&[i]), 1_000_001 + i as u64, CLOCK_MAX)
                .await
                .unwrap();
            ctx = out.context;
        }
        exchange(&a, &b, b"k", 1_000_010).await;
        let old_epoch = a.epoch();
        // node 1 loses the partition's disk and starts it again empty
        a.destroy().await.unwrap();
        let a = replica(&disk, "a", 1_005_000).await;
        assert!(a.epoch() > old_epoch, "a wiped partition gets a new epoch");
        // writes coordinated after the wipe, without and with a context from b
        let fresh = a
            .coordinate_put(
                1,
                b"k",
                &VClock::new(),
                Some(b"after-wipe"),
                1_005_001,
                CLOCK_MAX,
            )
            .await
            .unwrap();
        let (_, b_ctx) = b.read_siblings(b"k").await.unwrap();
        let a2 = replica(&disk, "a2", 1_006_000).await;
        let covering = a2
            .coordinate_put(1, b"k", &b_ctx, Some(b"covering"), 1_006_001, CLOCK_MAX)
            .await
            .unwrap();
        // replicas exchange everything
        exchange(&b, &a, b"k", 1_007_000).await;
        exchange(&a, &b, b"k", 1_007_001).await;
        exchange(&a2, &b, b"k", 1_007_002).await;
        let on_b = values(&b, b"k").await;
        assert!(on_b.contains(&Some(b"after-wipe".to_vec())), "{on_b:?}");
        assert!(on_b.contains(&Some(b"covering".to_vec())), "{on_b:?}");
        assert!(
            !on_b.contains(&Some(vec![4])),
            "the covering write replaced the old value: {on_b:?}"
        );
        let (sibs, _) = b.read_siblings(b"k").await.unwrap();
        for s in &sibs {
            for v in [&fresh.version, &covering.version] {
                if s.version != *v {
                    assert!(
                        !s.version.descends(v),
                        "an acknowledged write after the wipe is dominated"
                    );
                }
            }
        }
    });
}

#[test]
fn sibling_explosion_two_stale_clients_through_one_coordinator() {
    block_on(async {
        let disk = MemDisk::new();
        let p = replica(&disk, "a", 1).await;
        // each client keeps the context from its own last write (never re-reads)
        let mut contexts = [VClock::new(), VClock::new()];
        let mut acked: Vec<(Vec<u8>, VClock)> = Vec::new();
        let mut max_siblings = 0;
        for round in 0..1000u32 {
            let c = (round % 2) as usize;
            let value = format!("c{c}-r{round}").into_bytes();
            let out = p
                .coordinate_put(
                    1,
                    b"k",
                    &contexts[c],
                    Some(&value),
                    2 + round as u64,
                    CLOCK_MAX,
                )
                .await
                .unwrap();
            max_siblings = max_siblings.max(out.siblings);
            contexts[c] = out.context.clone();
            acked.push((value, out.version.clock()));
        }
        assert!(max_siblings <= 2, "siblings grew to {max_siblings}");
        // every acknowledged write is either stored or covered by a later write's context
        let (siblings, ctx) = p.read_siblings(b"k").await.unwrap();
        let present: Vec<Vec<u8>> = siblings.iter().filter_map(|s| s.value.clone()).collect();
        for (value, clock) in &acked {
            assert!(
                present.contains(value) || ctx.descends(clock),
                "write {:?} lost",
                String::from_utf8_lossy(value)
            );
        }
        // the last write of each client is present (nobody else saw it)
        assert!(present.contains(&b"c0-r998".to_vec()) && present.contains(&b"c1-r999".to_vec()));
    });
}

#[test]
fn concurrent_writes_on_both_sides_of_a_partition_become_siblings_then_collapse() {
    block_on(async {
        let disk = MemDisk::new();
        let a = replica(&disk, "a", 1_000).await;
        let b = replica(&disk, "b", 1_000).await;
        let base = a
            .coordinate_put(1, b"k", &VClock::new(), Some(b"base"), 1_001, CLOCK_MAX)
            .await
            .unwrap();
        exchange(&a, &b, b"k", 1_002).await;
        // the network splits; each side takes a write with the same (base) context
        a.coordinate_put(1, b"k", &base.context, Some(b"left"), 1_003, CLOCK_MAX)
            .await
            .unwrap();
        b.coordinate_put(2, b"k", &base.context, Some(b"right"), 1_004, CLOCK_MAX)
            .await
            .unwrap();
        // heal: the replicas exchange versions
        exchange(&a, &b, b"k", 1_005).await;
        exchange(&b, &a, b"k", 1_006).await;
        let want = vec![Some(b"left".to_vec()), Some(b"right".to_vec())];
        assert_eq!(values(&a, b"k").await, want);
        assert_eq!(values(&b, b"k").await, want);
        let (_, merged) = a.read_siblings(b"k").await.unwrap();
        a.coordinate_put(1, b"k", &merged, Some(b"resolved"), 1_007, CLOCK_MAX)
            .await
            .unwrap();
        exchange(&a, &b, b"k", 1_008).await;
        assert_eq!(values(&a, b"k").await, vec![Some(b"resolved".to_vec())]);
        assert_eq!(values(&b, b"k").await, vec![Some(b"resolved".to_vec())]);
    });
}

#[test]
fn a_read_without_waiting_answers_only_from_the_record_cache_and_agrees_with_a_read() {
    block_on(async {
        let disk = MemDisk::new();
        let p = replica(&disk, "a", 1_000).await;
        assert_eq!(p.get_cached(b"absent").unwrap().unwrap(), vec![]);
        p.coordinate_put(1, b"k", &VClock::new(), Some(b"x"), 1_001, CLOCK_MAX)
            .await
            .unwrap();
        p.coordinate_put(1, b"k", &VClock::new(), Some(b"y"), 1_002, CLOCK_MAX)
            .await
            .unwrap();
        // a write caches the versions it appends
        let read = p.get(b"k").await.unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(p.get_cached(b"k").unwrap().unwrap(), read);
        // a reopened partition starts with an empty cache: the log must answer first
        p.close().await.unwrap();
        drop(p);
        let p = replica(&disk, "a", 2_000).await;
        assert!(p.get_cached(b"k").is_none());
        assert!(p.read_cached(b"k", |_| unreachable!()).is_none());
        assert_eq!(p.get_cached(b"absent").unwrap().unwrap(), vec![]);
        let read = p.get(b"k").await.unwrap();
        assert_eq!(p.get_cached(b"k").unwrap().unwrap(), read);
        let seen = p.read_cached(b"k", |records| {
            records
                .iter()
                .map(|r| r.value.map(<[u8]>::to_vec))
                .collect::<Vec<_>>()
        });
        let mut seen = seen.unwrap().unwrap();
        seen.sort();
        assert_eq!(seen, vec![Some(b"x".to_vec()), Some(b"y".to_vec())]);
        let (_, ctx) = p.read_siblings(b"k").await.unwrap();
        p.coordinate_put(1, b"k", &ctx, None, 2_001, CLOCK_MAX)
            .await
            .unwrap();
        let tombstone = p.get_cached(b"k").unwrap().unwrap();
        assert!(tombstone.len() == 1 && tombstone[0].value.is_none());
        assert_eq!(p.get(b"k").await.unwrap(), tombstone);
        // with no cache at all, a stored key always needs the log
        p.close().await.unwrap();
        drop(p);
        let uncached = PartitionConfig {
            cache_bytes_max: 0,
            ..config()
        };
        let p = Partition::open(disk.folder("a"), uncached, 3_000)
            .await
            .unwrap()
            .0;
        p.get(b"k").await.unwrap();
        assert!(p.get_cached(b"k").is_none());
    })
}

/// A context forged to claim, put after put, that this node lost data moves the
/// partition to a new actor epoch at most once per `context_epoch_move_interval_ms`;
/// the puts in between are refused (nothing is written), and a real loss (one move)
/// is not affected.
#[test]
fn forged_contexts_move_the_epoch_at_most_once_per_interval() {
    use ringkv_engine::partition::StoreError;
    use ringkv_engine::version::ActorId;
    block_on(async {
        let disk = MemDisk::new();
        let p = replica(&disk, "a", 1_000).await;
        let out = p
            .coordinate_put(1, b"k", &VClock::new(), Some(b"x"), 1_001, CLOCK_MAX)
            .await
            .unwrap();
        let forged = |p: &Partition<MemStorage>| {
            let mut c = out.context.clone();
            c.raise(
                ActorId {
                    node: 1,
                    epoch: p.epoch(),
                },
                1_000_000,
                1_002,
            );
            c
        };
        let epoch = p.epoch();
        // the first claim of a loss moves the epoch and writes
        p.coordinate_put(1, b"k", &forged(&p), Some(b"y"), 2_000, CLOCK_MAX)
            .await
            .unwrap();
        let moved = p.epoch();
        assert!(moved > epoch);
        // a second one within the interval is refused, and writes nothing
        let refused = p
            .coordinate_put(1, b"k", &forged(&p), Some(b"z"), 2_500, CLOCK_MAX)
            .await;
        assert!(
            matches!(refused, Err(StoreError::EpochMovesLimited { .. })),
            "{refused:?}"
        );
        assert_eq!(p.epoch(), moved);
        assert_eq!(values(&p, b"k").await, vec![Some(b"y".to_vec())]);
        // an honest put meanwhile is not affected
        let (_, ctx) = p.read_siblings(b"k").await.unwrap();
        p.coordinate_put(1, b"k", &ctx, Some(b"w"), 2_600, CLOCK_MAX)
            .await
            .unwrap();
        // once the interval has passed, another move is allowed
        p.coordinate_put(1, b"k", &forged(&p), Some(b"v"), 3_100, CLOCK_MAX)
            .await
            .unwrap();
        assert!(p.epoch() > moved);
    });
}

/// A replica answers a copy it already holds as stale (a duplicate) at once. When the
/// earlier copy was appended by a write still waiting for its sync, that answer told
/// the sender the version was stored (it then drops its hint, or counts the copy toward
/// W) while a crash could still lose it. The answer now waits for that sync.
#[test]
fn a_duplicate_is_acknowledged_only_once_the_first_copy_is_durable() {
    use futures_lite::future::poll_once;
    block_on(async {
        let disk = MemDisk::new();
        let a = replica(&disk, "a", 1_000).await;
        let out = a
            .coordinate_put(1, b"k", &VClock::new(), Some(b"v"), 1_001, CLOCK_MAX)
            .await
            .unwrap();
        let b = replica(&disk, "b", 1_000).await;
        disk.set_yielding(true);
        let acknowledged_early = {
            let mut first = std::pin::pin!(b.apply_version(b"k", &out.version, Some(b"v"), 1_002));
            assert!(
                poll_once(&mut first).await.is_none(),
                "the first copy waits for its sync"
            );
            let mut second = std::pin::pin!(b.apply_version(b"k", &out.version, Some(b"v"), 1_003));
            let mut early = false;
            for _ in 0..1_000 {
                if let Some(r) = poll_once(&mut second).await {
                    assert!(matches!(r, Ok(ApplyOutcome::Stale(_))), "{r:?}");
                    early = true;
                    break;
                }
            }
            if !early {
                // once the first copy's sync runs, both are answered
                let (first, second) = futures_lite::future::zip(first, second).await;
                assert!(
                    matches!(first, Ok(ApplyOutcome::Applied { .. })),
                    "{first:?}"
                );
                assert!(matches!(second, Ok(ApplyOutcome::Stale(_))), "{second:?}");
            }
            early
        };
        assert!(
            !acknowledged_early,
            "a duplicate was acknowledged before the copy it duplicates was durable"
        );
        disk.set_yielding(false);
        drop(b);
        disk.crash(7);
        let b = replica(&disk, "b", 2_000).await;
        assert_eq!(values(&b, b"k").await, vec![Some(b"v".to_vec())]);
    });
}

/// A forged context can put a counter of u64::MAX for another node's current actor into
/// a version that then replicates there; that node's next put to the key finds its
/// counter exhausted and moves to a new epoch. Those moves were not rate-limited (only
/// a context ahead of local data was), so forged versions could burn epochs at will.
#[test]
fn forged_exhausted_counters_move_the_epoch_at_most_once_per_interval() {
    use ringkv_engine::partition::StoreError;
    use ringkv_engine::version::ActorId;
    block_on(async {
        let disk = MemDisk::new();
        let a = replica(&disk, "a", 1_000).await;
        let b = replica(&disk, "b", 1_000).await;
        let first = b.epoch();
        let mut refused = 0;
        for i in 0..3u64 {
            let mut forged = VClock::new();
            forged.raise(
                ActorId {
                    node: 2,
                    epoch: b.epoch(),
                },
                u64::MAX,
                u64::MAX,
            );
            a.coordinate_put(1, b"k", &forged, Some(b"x"), 2_000 + i, CLOCK_MAX)
                .await
                .unwrap();
            exchange(&a, &b, b"k", 2_000 + i).await;
            match b
                .coordinate_put(2, b"k", &VClock::new(), Some(b"y"), 2_000 + i, CLOCK_MAX)
                .await
            {
                Ok(_) => {}
                Err(StoreError::EpochMovesLimited { .. }) => refused += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(b.epoch() > first, "the first one moves the epoch");
        assert_eq!(refused, 2, "the next ones within the interval are refused");
    });
}

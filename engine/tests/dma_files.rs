//! The log on real files through glommio DMA: model test, torn tails, bit flips,
//! compaction, group commit, partition removal and import, and the v1 fixture.

#[allow(dead_code)] // only its replay helper is used here
mod common;

use ringkv_engine::runtime::run_local;
use ringkv_engine::storage::dma::DmaStorage;
use ringkv_engine::storage::mem::SplitMix;
use ringkv_engine::{Durability, Partition, PartitionConfig, WriteOp};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

fn small_segments() -> PartitionConfig {
    PartitionConfig {
        segment_bytes_max: 8192,
        tombstone_grace_ms: 10,
        ..PartitionConfig::default()
    }
}

async fn open(
    path: &Path,
    config: PartitionConfig,
    now_ms: u64,
) -> (Partition<DmaStorage>, ringkv_engine::RecoveryReport) {
    let storage = DmaStorage::open(path).await.unwrap();
    Partition::open(storage, config, now_ms).await.unwrap()
}

fn put<'a>(key: &'a [u8], version: &'a [u8], value: &'a [u8], replaces: &'a [u64]) -> WriteOp<'a> {
    WriteOp {
        key,
        version,
        value: Some(value),
        replaces,
    }
}

async fn value_of(p: &Partition<DmaStorage>, key: &[u8]) -> Option<Vec<u8>> {
    let versions = p.get(key).await.unwrap();
    assert!(versions.len() <= 1, "unexpected siblings for {key:?}");
    versions.into_iter().next().and_then(|v| v.value)
}

/// (version blob, value or tombstone)
type Versioned = (Vec<u8>, Option<Vec<u8>>);

/// Random puts, deletes, siblings, compactions and reopens against a model, no crash.
#[test]
fn model_on_real_files() {
    for seed in 0..4u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        run_local(move || async move {
            let mut rng = SplitMix(seed);
            let mut now = 10_000u64;
            // `none` durability keeps this fast (fdatasync costs milliseconds here);
            // reopens below still close (sync) the partition
            let config = PartitionConfig {
                durability: Durability::None,
                segment_bytes_max: 64 << 10,
                ..small_segments()
            };
            let (mut p, _) = open(&path, config.clone(), now).await;
            // key -> list of (version, value or tombstone)
            let mut model: BTreeMap<Vec<u8>, Vec<Versioned>> = BTreeMap::new();
            for op in 0..1500u64 {
                now += 1;
                let key = format!("k{}", rng.next_u64() % 64).into_bytes();
                let r = rng.next_u64() % 100;
                if r < 75 {
                    let stored = p.get(&key).await.unwrap();
                    let sibling = r < 10;
                    let replaces: Vec<u64> = if sibling {
                        vec![]
                    } else {
                        stored.iter().map(|v| v.seq).collect()
                    };
                    let version = format!("v{op}").into_bytes();
                    let value: Option<Vec<u8>> = if r < 65 {
                        Some(
                            (0..(rng.next_u64() % 2000) as usize)
                                .map(|i| (i as u64 * op) as u8)
                                .collect(),
                        )
                    } else {
                        None
                    };
                    p.write(
                        &[WriteOp {
                            key: &key,
                            version: &version,
                            value: value.as_deref(),
                            replaces: &replaces,
                        }],
                        now,
                    )
                    .await
                    .unwrap();
                    let entry = model.entry(key.clone()).or_default();
                    if !sibling {
                        entry.clear();
                    }
                    entry.push((version, value));
                } else if r < 77 {
                    p.compact(now).await.unwrap();
                    // expired lone tombstones may be gone
                    model.retain(|k, v| {
                        !(v.len() == 1 && v[0].1.is_none()) || p.versions(k).len() == 1
                    });
                } else if r < 79 {
                    p.close().await.unwrap();
                    drop(p);
                    let (reopened, report) = open(&path, config.clone(), now).await;
                    assert!(report.corruption.is_empty(), "{report:?}");
                    p = reopened;
                } else {
                    let mut got: Vec<_> = p
                        .get(&key)
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|v| (v.version, v.value))
                        .collect();
                    got.sort();
                    let mut want = model.get(&key).cloned().unwrap_or_default();
                    want.sort();
                    assert_eq!(got, want, "seed {seed} op {op}");
                }
            }
            for (key, want) in &model {
                let mut got: Vec<_> = p
                    .get(key)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|v| (v.version, v.value))
                    .collect();
                got.sort();
                let mut want = want.clone();
                want.sort();
                assert_eq!(got, want);
            }
            assert!(p.stats().segments > 1, "the test should exercise roll-over");
        });
    }
}

fn segment_files(path: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// The id a segment file is named by.
fn segment_id(path: &Path) -> u64 {
    u64::from_str_radix(path.file_stem().unwrap().to_str().unwrap(), 16).unwrap()
}

/// 200 blind writes, `k000` to `k199`, the value of `kI` 100 bytes of `I`: with
/// [`small_segments`], several sealed segments.
async fn write_numbered(p: &Partition<DmaStorage>) {
    for i in 0..200u32 {
        let key = format!("k{i:03}");
        p.write(&[put(key.as_bytes(), b"v", &[i as u8; 100], &[])], 2)
            .await
            .unwrap();
    }
}

#[test]
fn torn_tail_is_truncated_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let p2 = path.clone();
    run_local(move || async move {
        let (p, _) = open(&p2, PartitionConfig::default(), 1).await;
        for i in 0..100u32 {
            let key = format!("k{i}");
            p.write(
                &[put(key.as_bytes(), b"v", format!("val{i}").as_bytes(), &[])],
                2,
            )
            .await
            .unwrap();
        }
        p.close().await.unwrap();
    });
    // a torn write: half a record of garbage at the end of the active segment
    let active = segment_files(&path).pop().unwrap();
    let good_len = std::fs::metadata(&active).unwrap().len();
    let mut bytes = std::fs::read(&active).unwrap();
    // records end in a non-zero byte here; what follows is O_DIRECT padding
    let valid_end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    bytes.truncate(valid_end);
    bytes.extend_from_slice(&[0x52, 0x4B, 0x01, 0x00, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
    std::fs::write(&active, &bytes).unwrap();
    assert!(good_len > 0);
    run_local(move || async move {
        let (p, report) = open(&path, PartitionConfig::default(), 3).await;
        assert_eq!(report.truncated_tail_bytes, 11, "{report:?}");
        assert!(report.corruption.is_empty());
        assert!(!p.needs_repair());
        for i in 0..100u32 {
            assert_eq!(
                value_of(&p, format!("k{i}").as_bytes()).await,
                Some(format!("val{i}").into_bytes())
            );
        }
        // writes continue after the cut
        p.write(&[put(b"after", b"v", b"x", &[])], 4).await.unwrap();
        p.close().await.unwrap();
        drop(p);
        let (p, report) = open(&path, PartitionConfig::default(), 5).await;
        assert_eq!(report.truncated_tail_bytes, 0);
        assert_eq!(value_of(&p, b"after").await, Some(b"x".to_vec()));
    });
}

#[test]
fn bit_flip_in_sealed_segment_is_reported_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let p2 = path.clone();
    run_local(move || async move {
        let (p, _) = open(&p2, small_segments(), 1).await;
        write_numbered(&p).await;
        p.close().await.unwrap();
    });
    let first = segment_files(&path).remove(0);
    let mut bytes = std::fs::read(&first).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&first, &bytes).unwrap();

    // with the hint in place, open is fast and the flip is caught when read
    let p2 = path.clone();
    run_local(move || async move {
        let (p, report) = open(&p2, small_segments(), 3).await;
        assert!(report.segments_from_hints > 0);
        let mut corrupt = 0;
        for i in 0..200u32 {
            match p.get(format!("k{i:03}").as_bytes()).await {
                Ok(v) => assert_eq!(
                    v[0].value.as_deref(),
                    Some(&[i as u8; 100][..]),
                    "wrong value served"
                ),
                Err(e) => {
                    assert!(e.to_string().contains("corrupt"), "{e}");
                    corrupt += 1;
                }
            }
        }
        assert_eq!(corrupt, 1);
        assert!(p.needs_repair());
    });

    // without the hint, open scans, reports the damage and keeps everything else
    for hint in std::fs::read_dir(&path).unwrap() {
        let hint = hint.unwrap().path();
        if hint.extension().is_some_and(|e| e == "hint") {
            std::fs::remove_file(hint).unwrap();
        }
    }
    run_local(move || async move {
        let (p, report) = open(&path, small_segments(), 4).await;
        assert_eq!(report.corruption.len(), 1, "{report:?}");
        assert!(p.needs_repair());
        let mut present = 0;
        for i in 0..200u32 {
            if let Some(v) = value_of(&p, format!("k{i:03}").as_bytes()).await {
                assert_eq!(v, vec![i as u8; 100], "wrong value served");
                present += 1;
            }
        }
        assert_eq!(present, 199, "only the damaged record is missing");
    });
}

#[test]
fn compaction_keeps_every_live_version_and_reclaims_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    run_local(move || async move {
        let (p, _) = open(&path, small_segments(), 1).await;
        let mut now = 100;
        for round in 0..10u8 {
            for i in 0..50u32 {
                now += 1;
                let key = format!("k{i}");
                let old: Vec<u64> = p.versions(key.as_bytes()).iter().map(|l| l.seq).collect();
                p.write(&[put(key.as_bytes(), &[round], &[round; 64], &old)], now)
                    .await
                    .unwrap();
            }
        }
        // siblings and a tombstone survive compaction too
        p.write(
            &[put(b"sib", b"a", b"1", &[]), put(b"sib2", b"b", b"2", &[])],
            now,
        )
        .await
        .unwrap();
        p.write(&[put(b"sib", b"c", b"3", &[])], now).await.unwrap();
        p.write(
            &[WriteOp {
                key: b"gone",
                version: b"t",
                value: None,
                replaces: &[],
            }],
            now,
        )
        .await
        .unwrap();
        let before = p.stats();
        let report = p.compact(now + 1).await.unwrap();
        let after = p.stats();
        assert!(
            report.records_dropped > 0 && after.bytes < before.bytes,
            "{report:?}"
        );
        for i in 0..50u32 {
            assert_eq!(
                value_of(&p, format!("k{i}").as_bytes()).await,
                Some(vec![9u8; 64])
            );
        }
        assert_eq!(p.get(b"sib").await.unwrap().len(), 2);
        assert_eq!(
            p.get(b"gone").await.unwrap().len(),
            1,
            "tombstone inside grace kept"
        );
        // after the grace period the lone tombstone goes
        p.write(&[put(b"roll", b"r", &[0; 9000], &[])], now + 100)
            .await
            .unwrap();
        let report = p.compact(now + 1000).await.unwrap();
        assert!(report.tombstones_dropped >= 1, "{report:?}");
        assert!(p.get(b"gone").await.unwrap().is_empty());
        p.close().await.unwrap();
        drop(p);
        let (p, report) = open(&path, small_segments(), now + 2000).await;
        assert!(report.corruption.is_empty());
        for i in 0..50u32 {
            assert_eq!(
                value_of(&p, format!("k{i}").as_bytes()).await,
                Some(vec![9u8; 64])
            );
        }
        assert!(p.get(b"gone").await.unwrap().is_empty());
        assert_eq!(p.get(b"sib").await.unwrap().len(), 2);
    });
}

#[test]
fn group_commit_shares_fdatasync_between_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    run_local(move || async move {
        let (p, _) = open(&path, PartitionConfig::default(), 1).await;
        let p = Rc::new(p);
        let writers = 128u32;
        let per_writer = 20u32;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let p = p.clone();
            tasks.push(glommio::spawn_local(async move {
                for i in 0..per_writer {
                    let key = format!("w{w}-{i}");
                    p.write(&[put(key.as_bytes(), b"v", &[7; 100], &[])], 2)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        let stats = p.stats();
        let writes = (writers * per_writer) as u64;
        assert_eq!(stats.writes, writes);
        println!(
            "group commit: {writes} acknowledged writes shared {} fdatasyncs",
            stats.syncs
        );
        assert!(
            stats.syncs * 8 < writes,
            "{} syncs for {writes} writes",
            stats.syncs
        );
    });
}

#[test]
fn remove_partition_and_open_copied_files() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let copy = dir.path().join("copy");
    let (s2, c2) = (source.clone(), copy.clone());
    run_local(move || async move {
        let (p, _) = open(&s2, small_segments(), 1).await;
        for i in 0..300u32 {
            let key = format!("k{i}");
            p.write(&[put(key.as_bytes(), b"v", &i.to_le_bytes(), &[])], 2)
                .await
                .unwrap();
        }
        p.close().await.unwrap();
        let epoch = p.epoch();
        // what partition transfer does: copy the segment and hint files, not the epoch
        std::fs::create_dir_all(&c2).unwrap();
        for entry in std::fs::read_dir(&s2).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            if name.ends_with(".seg") || name.ends_with(".hint") {
                std::fs::copy(entry.path(), c2.join(&name)).unwrap();
            }
        }
        let (copied, report) = open(&c2, small_segments(), 5_000_000).await;
        assert!(report.corruption.is_empty());
        for i in 0..300u32 {
            assert_eq!(
                value_of(&copied, format!("k{i}").as_bytes()).await,
                Some(i.to_le_bytes().to_vec())
            );
        }
        assert_ne!(
            copied.epoch(),
            epoch,
            "imported data gets this node's own fresh epoch"
        );
        p.destroy().await.unwrap();
        assert!(!s2.exists());
    });
    assert!(copy.exists());
}

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format-v1");

/// The committed v1 fixture: every later version of ringkv must open it. Regenerate
/// (only when deliberately starting a new fixture) with
/// `RINGKV_WRITE_FIXTURE=1 cargo test -p ringkv-engine --release --test dma_files fixture`.
#[test]
fn format_v1_fixture_still_opens() {
    let fixture = PathBuf::from(FIXTURE);
    if std::env::var_os("RINGKV_WRITE_FIXTURE").is_some() {
        let _ = std::fs::remove_dir_all(&fixture);
        let f2 = fixture.clone();
        run_local(move || async move {
            let config = PartitionConfig {
                segment_bytes_max: 4096,
                ..PartitionConfig::default()
            };
            let (p, _) = open(&f2, config, 1_700_000_000_000).await;
            for i in 0..40u32 {
                let key = format!("fixture-{i:02}");
                p.write(
                    &[put(
                        key.as_bytes(),
                        format!("clock-{i}").as_bytes(),
                        format!("value-{i}-{}", "x".repeat(200)).as_bytes(),
                        &[],
                    )],
                    1_700_000_000_000 + i as u64,
                )
                .await
                .unwrap();
            }
            let seqs: Vec<u64> = p.versions(b"fixture-00").iter().map(|l| l.seq).collect();
            p.write(
                &[put(b"fixture-00", b"clock-new", b"replaced", &seqs)],
                1_700_000_001_000,
            )
            .await
            .unwrap();
            p.write(
                &[put(b"fixture-01", b"clock-sibling", b"sibling", &[])],
                1_700_000_001_001,
            )
            .await
            .unwrap();
            let seqs: Vec<u64> = p.versions(b"fixture-02").iter().map(|l| l.seq).collect();
            p.write(
                &[WriteOp {
                    key: b"fixture-02",
                    version: b"clock-del",
                    value: None,
                    replaces: &seqs,
                }],
                1_700_000_001_002,
            )
            .await
            .unwrap();
            p.close().await.unwrap();
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("fixture");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(&fixture).expect("fixture folder is committed") {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    run_local(move || async move {
        let (p, report) = open(&copy, PartitionConfig::default(), 1_800_000_000_000).await;
        assert!(report.corruption.is_empty(), "{report:?}");
        assert!(report.segments >= 2, "fixture spans segments");
        assert_eq!(
            value_of(&p, b"fixture-00").await,
            Some(b"replaced".to_vec())
        );
        let mut sib: Vec<_> = p
            .get(b"fixture-01")
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.value.unwrap())
            .collect();
        sib.sort();
        assert_eq!(
            sib,
            vec![
                b"sibling".to_vec(),
                format!("value-1-{}", "x".repeat(200)).into_bytes()
            ]
        );
        let del = p.get(b"fixture-02").await.unwrap();
        assert_eq!(del.len(), 1);
        assert_eq!(del[0].value, None);
        assert_eq!(del[0].version, b"clock-del");
        for i in 3..40u32 {
            let v = p.get(format!("fixture-{i:02}").as_bytes()).await.unwrap();
            assert_eq!(
                v[0].value.as_deref(),
                Some(format!("value-{i}-{}", "x".repeat(200)).as_bytes())
            );
            assert_eq!(v[0].version, format!("clock-{i}").as_bytes());
            assert_eq!(v[0].timestamp_ms, 1_700_000_000_000 + i as u64);
        }
    });
}

/// Regression (review): compaction of a sealed segment damaged after open panicked on
/// a keydir entry it could not copy; now it stops, reports, and changes nothing.
#[test]
fn compaction_over_a_damaged_sealed_segment_reports_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let p2 = path.clone();
    run_local(move || async move {
        // no record cache: reads must go to the damaged file
        let config = PartitionConfig {
            cache_bytes_max: 0,
            ..small_segments()
        };
        let (p, _) = open(&p2, config, 1).await;
        write_numbered(&p).await;
        // damage the first sealed segment while the partition is open
        let first = segment_files(&p2).remove(0);
        let mut bytes = std::fs::read(&first).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        std::fs::write(&first, &bytes).unwrap();
        let err = p.compact(3).await.unwrap_err();
        assert!(err.to_string().contains("needs repair"), "{err}");
        assert!(p.needs_repair());
        let mut readable = 0;
        for i in 0..200u32 {
            if let Ok(v) = p.get(format!("k{i:03}").as_bytes()).await {
                assert_eq!(v[0].value.as_deref(), Some(&[i as u8; 100][..]));
                readable += 1;
            }
        }
        assert_eq!(readable, 199);
        assert!(std::fs::read_dir(&p2).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    });
}

/// A hint left without its segment (compaction crashed before renaming its output)
/// is removed on open.
#[test]
fn orphan_hint_is_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("0000000001000001.hint"), b"leftover").unwrap();
    run_local(move || async move {
        let (p, report) = open(&path, small_segments(), 1).await;
        assert_eq!(report.temp_files_removed, 1);
        assert!(!path.join("0000000001000001.hint").exists());
        p.write(&[put(b"k", b"v", b"x", &[])], 2).await.unwrap();
    });
}

/// `interval(ms)` durability: acknowledged at once, synced by the runtime's timer.
#[test]
fn interval_mode_is_synced_by_the_runtime_timer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    run_local(move || async move {
        let config = PartitionConfig {
            durability: Durability::Interval { ms: 5 },
            ..PartitionConfig::default()
        };
        let (p, _) = open(&path, config, 1).await;
        let p = Rc::new(p);
        let syncer = ringkv_engine::runtime::spawn_interval_syncer(p.clone(), 10_000);
        p.write(&[put(b"k", b"v", b"x", &[])], 2).await.unwrap();
        assert_eq!(p.stats().syncs, 0, "acknowledged before any sync");
        for _ in 0..1000 {
            if p.stats().syncs > 0 {
                break;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
        }
        assert!(p.stats().syncs > 0, "the timer synced the write");
        p.close().await.unwrap();
        let ran = syncer.await.unwrap();
        assert!(ran >= 1);
    });
}

/// Compaction in the low-priority queue while foreground writers overwrite keys:
/// every write lands, dead space is reclaimed, nothing is lost.
#[test]
fn background_compaction_runs_beside_foreground_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    run_local(move || async move {
        let config = PartitionConfig {
            durability: Durability::None,
            segment_bytes_max: 16 << 10,
            ..PartitionConfig::default()
        };
        let (p, _) = open(&path, config.clone(), 1).await;
        let p = Rc::new(p);
        let compactor = ringkv_engine::runtime::spawn_compactor(
            p.clone(),
            ringkv_engine::runtime::background_queue(),
            0.3,
            std::time::Duration::from_millis(1),
            1_000_000,
            || 100,
            |_| {},
        );
        for round in 0..40u32 {
            for i in 0..100u32 {
                let key = format!("k{i}");
                let old: Vec<u64> = p.versions(key.as_bytes()).iter().map(|l| l.seq).collect();
                p.write(
                    &[put(
                        key.as_bytes(),
                        b"v",
                        &round.to_le_bytes().repeat(25),
                        &old,
                    )],
                    10,
                )
                .await
                .unwrap();
            }
            glommio::yield_if_needed().await;
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        p.close().await.unwrap();
        let compactions = compactor.await.unwrap();
        assert!(compactions > 0, "the background compactor ran");
        for i in 0..100u32 {
            assert_eq!(
                value_of(&p, format!("k{i}").as_bytes()).await,
                Some(39u32.to_le_bytes().repeat(25))
            );
        }
        let stats = p.stats();
        assert!(
            stats.bytes < 40 * 100 * 150,
            "dead versions were reclaimed: {stats:?}"
        );
        drop(p);
        let (p, report) = open(&path, config, 200).await;
        assert!(report.corruption.is_empty());
        for i in 0..100u32 {
            assert_eq!(
                value_of(&p, format!("k{i}").as_bytes()).await,
                Some(39u32.to_le_bytes().repeat(25))
            );
        }
    });
}

/// Regression (found by the benchmark's zipfian workloads): concurrent versioned puts
/// to one hot key raced and gave up with "key changed under 16 attempts"; they now
/// take turns on the key and share group commits.
#[test]
fn concurrent_versioned_puts_to_one_hot_key_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    run_local(move || async move {
        let config = PartitionConfig {
            cache_bytes_max: 0,
            ..PartitionConfig::default()
        };
        let (p, _) = open(&path, config, 1).await;
        let p = Rc::new(p);
        let mut tasks = Vec::new();
        for w in 0..50u64 {
            let p = p.clone();
            tasks.push(glommio::spawn_local(async move {
                let mut context = ringkv_engine::version::VClock::new();
                for i in 0..20u64 {
                    let value = format!("w{w}-{i}");
                    let out = p
                        .coordinate_put(1, b"hot", &context, Some(value.as_bytes()), 10 + i, 16)
                        .await
                        .expect("a versioned put to a hot key succeeds");
                    context = out.context;
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        let (siblings, _) = p.read_siblings(b"hot").await.unwrap();
        assert!(
            !siblings.is_empty() && siblings.len() <= 50,
            "{} siblings",
            siblings.len()
        );
        assert!(
            p.stats().syncs < 50 * 20,
            "writes to one key still shared syncs"
        );
    });
}

/// A sealed segment that commit-log replay appended to keeps a usable hint: replay's
/// sync wrote the new tail padded to the O_DIRECT block, and the padding stayed, so the
/// hint (written for the segment's real length) failed its length check on every open
/// and the segment was scanned and reported instead.
#[test]
fn a_sealed_segment_replay_appended_to_keeps_its_hint_usable() {
    use ringkv_engine::partition::ReplayOutcome;
    use ringkv_engine::record::RecordRef;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let p2 = path.clone();
    run_local(move || async move {
        let (p, _) = open(&p2, small_segments(), 1).await;
        write_numbered(&p).await;
        // no close: the sealed segments have no hint files yet
    });
    let first = segment_files(&path).remove(0);
    let first_len = std::fs::metadata(&first).unwrap().len();
    let first_id = segment_id(&first);
    let logged = PartitionConfig {
        commit_log: true,
        ..small_segments()
    };
    let p2 = path.clone();
    run_local(move || async move {
        let (p, report) = open(&p2, logged, 3).await;
        assert!(report.corruption.is_empty(), "{report:?}");
        // a write the commit log held and the segment had lost
        let mut entry = Vec::new();
        RecordRef {
            seq: 1_000_000,
            timestamp_ms: 3,
            key: b"late",
            replaced: &[],
            version: b"v",
            value: Some(b"from the log"),
            batch_continues: false,
        }
        .encode_into(&mut entry);
        assert_eq!(
            p.replay(first_id, first_len, &entry),
            ReplayOutcome::Applied { records: 1 }
        );
        p.finish_replay().await.unwrap();
        p.close().await.unwrap();
    });
    run_local(move || async move {
        let (p, report) = open(&path, small_segments(), 4).await;
        assert!(report.corruption.is_empty(), "{report:?}");
        assert_eq!(value_of(&p, b"late").await, Some(b"from the log".to_vec()));
        assert_eq!(value_of(&p, b"k000").await, Some(vec![0; 100]));
    });
}

/// A commit log entry past the records `open` could read from a damaged segment is
/// put back, even when it lies within the O_DIRECT padding of the segment's last block
/// (a write the log acknowledged that never reached the segment): it used to count as
/// present because the padded file was long enough, and was lost with the log.
#[test]
fn an_entry_in_the_padding_of_a_damaged_segment_is_put_back() {
    use ringkv_engine::record::RecordRef;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let logged = PartitionConfig {
        commit_log: true,
        ..small_segments()
    };
    let (p2, config) = (path.clone(), logged.clone());
    run_local(move || async move {
        let (p, _) = open(&p2, config, 1).await;
        for key in [&b"a"[..], b"b", b"c"] {
            p.write(&[put(key, b"v", b"value", &[])], 2).await.unwrap();
        }
        p.sync().await.unwrap();
        // no close: a crash
    });
    let segment_path = segment_files(&path).remove(0);
    let mut bytes = std::fs::read(&segment_path).unwrap();
    let segment = segment_id(&segment_path);
    let scan = ringkv_engine::segment::scan(&bytes, segment);
    assert_eq!(scan.records.len(), 3);
    let entry = |i: usize| {
        let r = &scan.records[i];
        let (at, n) = (r.offset as usize, r.header.total_bytes());
        (r.offset, bytes[at..at + n].to_vec())
    };
    let mut entries: Vec<(u64, Vec<u8>)> = (0..3).map(entry).collect();
    let c_end = entries[2].0 + entries[2].1.len() as u64;
    assert!(
        (bytes.len() as u64) > c_end,
        "the file ends in padding ({} bytes, records to {c_end})",
        bytes.len()
    );
    // a fourth write the log acknowledged, lost from the segment
    let mut d = Vec::new();
    RecordRef {
        seq: scan.records[2].header.seq + 1,
        timestamp_ms: 2,
        key: b"d",
        replaced: &[],
        version: b"v",
        value: Some(b"value"),
        batch_continues: false,
    }
    .encode_into(&mut d);
    entries.push((c_end, d));
    // bit rot in b
    let b_end = (entries[1].0 + entries[1].1.len() as u64) as usize;
    bytes[b_end - 2] ^= 0x10;
    std::fs::write(&segment_path, &bytes).unwrap();
    let (p2, config) = (path.clone(), logged.clone());
    run_local(move || async move {
        let (p, report) = open(&p2, config, 3).await;
        assert!(!report.corruption.is_empty(), "{report:?}");
        common::replay_all(&p, segment, &entries);
        p.finish_replay().await.unwrap();
        p.close().await.unwrap();
    });
    run_local(move || async move {
        let (p, _) = open(&path, logged, 4).await;
        for key in [&b"a"[..], b"b", b"c", b"d"] {
            assert_eq!(value_of(&p, key).await, Some(b"value".to_vec()), "{key:?}");
        }
    });
}

/// A compaction that fails without failing the partition (its output could not be made
/// durable: a full or failing disk) used to end the background compactor for good, and
/// left its output files behind until the next open. Now the files go and the
/// compactor tries again later, and compacts once the disk is back.
#[test]
fn a_failed_background_compaction_is_cleaned_up_and_tried_again() {
    use ringkv_engine::storage::mem::MemDisk;
    run_local(|| async {
        let disk = MemDisk::new();
        let config = PartitionConfig {
            durability: Durability::Sync,
            segment_bytes_max: 4096,
            ..PartitionConfig::default()
        };
        let (p, _) = Partition::open(disk.folder("p"), config, 1).await.unwrap();
        let p = Rc::new(p);
        // more live data than one segment holds: the sealed ones keep live records
        for round in 0..20u32 {
            for i in 0..100u32 {
                let key = format!("k{i}");
                let old: Vec<u64> = p.versions(key.as_bytes()).iter().map(|l| l.seq).collect();
                let value = round.to_le_bytes().repeat(10);
                p.write(&[put(key.as_bytes(), b"v", &value, &old)], 10)
                    .await
                    .unwrap();
            }
        }
        p.write_pending_hints().await.unwrap();
        assert!(p.compaction_due(0.3));
        // every write is durable: only the compactor's own syncs fail from here
        disk.fail_syncs_after(0);
        let compactor = ringkv_engine::runtime::spawn_compactor(
            p.clone(),
            ringkv_engine::runtime::background_queue(),
            0.3,
            std::time::Duration::from_millis(1),
            1_000,
            || 100,
            |_| {},
        );
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
        assert!(p.failure().is_none(), "{:?}", p.failure());
        assert!(p.compaction_due(0.3), "nothing compacted while syncs fail");
        let names = ringkv_engine::storage::Storage::list(&disk.folder("p"))
            .await
            .unwrap();
        assert!(
            !names.iter().any(|n| n.ends_with(".tmp")),
            "a failed compaction left {names:?}"
        );
        disk.fail_syncs_after(u64::MAX);
        for _ in 0..500 {
            if !p.compaction_due(0.3) {
                break;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(
            !p.compaction_due(0.3),
            "the compactor tried again and compacted"
        );
        p.close().await.unwrap();
        assert!(compactor.await.unwrap() >= 1);
    });
}

/// Files in a partition's folder whose names only look like segments (upper-case hex, a
/// leading '+') are not segments: `open` read their ids, then opened the lower-case name
/// of that id (not there: open failed) or the same segment twice.
#[test]
fn names_that_only_look_like_segments_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    run_local(move || async move {
        let config = PartitionConfig::default();
        let (p, _) = open(&path, config.clone(), 1).await;
        p.write(&[put(b"k", b"v", b"kept", &[])], 2).await.unwrap();
        p.close().await.unwrap();
        drop(p);
        for stray in [
            "000000000100000A.seg",
            "+000000001000000.seg",
            "000000000100000A.hint",
        ] {
            std::fs::write(path.join(stray), b"not a segment").unwrap();
        }
        let (p, report) = open(&path, config, 3).await;
        assert!(report.corruption.is_empty(), "{report:?}");
        assert_eq!(value_of(&p, b"k").await, Some(b"kept".to_vec()));
    });
}

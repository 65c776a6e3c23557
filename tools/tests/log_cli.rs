//! `ringkv logdump` / `ringkv logcheck` on a real partition folder.

use ringkv_engine::runtime::run_local;
use ringkv_engine::storage::dma::DmaStorage;
use ringkv_engine::{Partition, PartitionConfig, WriteOp};
use std::process::Command;

fn ringkv(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn logdump_prints_records_and_logcheck_finds_a_flipped_bit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p7");
    let p2 = path.clone();
    run_local(move || async move {
        let storage = DmaStorage::open(&p2).await.unwrap();
        let config = PartitionConfig {
            segment_bytes_max: 4096,
            ..PartitionConfig::default()
        };
        let (p, _) = Partition::open(storage, config, 1).await.unwrap();
        for i in 0..60u32 {
            let key = format!("key-{i}");
            p.write(
                &[WriteOp {
                    key: key.as_bytes(),
                    version: b"v",
                    value: Some(&[b'x'; 100]),
                    replaces: &[],
                }],
                5,
            )
            .await
            .unwrap();
        }
        p.write(
            &[WriteOp {
                key: b"key-0",
                version: b"v",
                value: None,
                replaces: &[1],
            }],
            6,
        )
        .await
        .unwrap();
        p.close().await.unwrap();
    });
    let folder = path.to_str().unwrap();
    let (code, out) = ringkv(&["logdump", folder]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("key=key-59"), "{out}");
    assert!(
        out.contains("TOMBSTONE") && out.contains("replaces=[1]"),
        "{out}"
    );
    let (code, out) = ringkv(&["logcheck", folder]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok:"), "{out}");

    // flip one bit in the middle of the first (sealed) segment
    let mut segs: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&segs[0], &bytes).unwrap();
    let (code, out) = ringkv(&["logcheck", folder]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("CORRUPTION: segment 0000000001000000: corrupt bytes"),
        "{out}"
    );
    assert!(out.contains("needs repair"), "{out}");

    let (code, out) = ringkv(&["logcheck", "/nonexistent/folder"]);
    assert_eq!(code, 1);
    assert!(out.contains("cannot read"), "{out}");
}

/// A shard's commit log: `logdump` prints each entry with its records, `logcheck`
/// passes a clean log and reports damage before valid entries (exit 1), naming how
/// many bytes were skipped, while the entries after it still show.
#[test]
fn logdump_and_logcheck_read_a_commit_log() {
    use ringkv_engine::commit_log::CommitLog;
    use ringkv_engine::record::RecordRef;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shard-000");
    let p2 = path.clone();
    run_local(move || async move {
        let storage = DmaStorage::open(&p2).await.unwrap();
        let (log, _) = CommitLog::open(storage, 1 << 20).await.unwrap();
        for i in 0..3u64 {
            let key = format!("log-key-{i}");
            let mut payload = Vec::new();
            RecordRef {
                seq: i + 1,
                timestamp_ms: 7,
                key: key.as_bytes(),
                replaced: &[],
                version: b"v",
                value: Some(b"hello"),
                batch_continues: false,
            }
            .encode_into(&mut payload);
            let at = log.append(i, 1 << 24, 32, &payload);
            log.wait_durable(at).await.unwrap();
        }
    });
    let folder = path.to_str().unwrap();
    let (code, out) = ringkv(&["logdump", folder]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("# entry: partition 2 segment 0000000001000000 at 32"),
        "{out}"
    );
    assert!(
        out.contains("key=log-key-1") && out.contains("value[5]=hello"),
        "{out}"
    );
    let (code, out) = ringkv(&["logcheck", folder]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("ok: 1 commit log files, 3 entries"),
        "{out}"
    );

    // damage the middle entry's payload
    let file = path.join("0000000000000001.clog");
    let mut bytes = std::fs::read(&file).unwrap();
    let entry = bytes.len() - bytes.iter().rev().take_while(|&&b| b == 0).count();
    let middle = entry / 2;
    bytes[middle] ^= 0x04;
    std::fs::write(&file, &bytes).unwrap();
    let (code, out) = ringkv(&["logcheck", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("CORRUPTION: commit log 0000000000000001"),
        "{out}"
    );
    let (code, out) = ringkv(&["logdump", folder]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("key=log-key-0") && out.contains("key=log-key-2"),
        "{out}"
    );
    assert!(!out.contains("key=log-key-1"), "{out}");
    assert!(out.contains("CORRUPT:"), "{out}");
}

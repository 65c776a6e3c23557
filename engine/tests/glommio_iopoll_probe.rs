//! Minimal reproduction of a glommio 0.9 defect and the check that our workaround
//! holds (see `storage::dma::probe_device_once`).
//!
//! glommio probes polled-I/O support with a read of the first file a thread opens on
//! a device. If that file is empty, the read stops at EOF, polling is taken as
//! supported, and on a device without poll queues every later read fails with
//! EOPNOTSUPP. The reproduction is printed, not asserted: it depends on the device.

use ringkv_engine::runtime::run_local;
use ringkv_engine::storage::dma::DmaStorage;
use ringkv_engine::storage::{Storage, StorageFile};

/// Run with `cargo test -p ringkv-engine --release --test glommio_iopoll_probe -- --ignored --nocapture`.
#[test]
#[ignore = "reproduction of a glommio defect: prints the outcome, which depends on the device"]
fn raw_glommio_first_open_of_an_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty-first");
    let outcome = run_local(move || async move {
        let file = glommio::io::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(&path)
            .await
            .unwrap();
        let mut buf = file.alloc_dma_buffer(4096);
        buf.as_bytes_mut().fill(7);
        file.write_at(buf, 0).await.unwrap();
        file.truncate(16).await.unwrap();
        file.fdatasync().await.unwrap();
        let result = file.read_at(0, 16).await.map(|r| r.len());
        format!("{result:?}")
    });
    println!("glommio read after first-open-empty: {outcome} (Err(EOPNOTSUPP) is the defect)");
}

#[test]
fn dma_storage_reads_work_after_creating_empty_files_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    run_local(move || async move {
        let storage = DmaStorage::open(&path).await.unwrap();
        let file = storage.create("a").await.unwrap();
        file.append(&[9u8; 5000]);
        file.sync().await.unwrap();
        file.truncate(4999).await.unwrap();
        let reopened = storage.open("a").await.unwrap();
        let bytes = reopened.read_at(100, 4000).await.unwrap();
        assert_eq!(bytes, vec![9u8; 4000]);
        let bytes = reopened.read_at(4000, 999).await.unwrap();
        assert_eq!(bytes, vec![9u8; 999]);
    });
}

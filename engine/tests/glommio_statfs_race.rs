//! Minimal reproduction of a glommio 0.9 defect (not worked around: see below).
//!
//! `DmaFile::open_at` opens the file, then calls `statfs(path).unwrap()` on the *path*
//! to learn the file system type. A file renamed or removed between the two makes the
//! `statfs` fail with ENOENT, and the `unwrap` panics the executor thread instead of
//! returning an error (glommio-0.9.0/src/io/dma_file.rs:132).
//!
//! ringkv cannot reach that window by itself: a node never removes or renames a file
//! while it opens it, and the data directory's `LOCK` keeps a second node out (two
//! nodes started on one directory at once was how the panic was found).
//!
//! Run with `cargo test -p ringkv-engine --release --test glommio_statfs_race -- --ignored --nocapture`.

use ringkv_engine::runtime::run_local;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
#[ignore = "reproduction of a glommio defect: a race, so it prints whether it hit the window"]
fn dma_open_panics_when_the_path_goes_away_after_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, [0u8; 4096]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // moves the file between two names until told to stop (bounded by the opener)
    let mover = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::rename(&a, &b);
                let _ = std::fs::rename(&b, &a);
            }
        })
    };
    let opener = std::thread::spawn(move || {
        run_local(move || async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            let (mut opened, mut not_found) = (0u64, 0u64);
            for _ in 0..200_000 {
                if Instant::now() > deadline {
                    break;
                }
                match glommio::io::DmaFile::open(&a).await {
                    Ok(file) => {
                        opened += 1;
                        let _ = file.close().await;
                    }
                    Err(_) => not_found += 1,
                }
            }
            (opened, not_found)
        })
    });
    let outcome = opener.join();
    stop.store(true, Ordering::Relaxed);
    mover.join().unwrap();
    match outcome {
        Ok((opened, not_found)) => println!(
            "no panic this time: {opened} opens, {not_found} ENOENT errors (the window was missed)"
        ),
        Err(_) => {
            println!("the executor panicked: the defect (statfs(path).unwrap() after the open)")
        }
    }
}

//! The deterministic cluster simulator (`cluster::sim`) over a fixed set of seeds with 3
//! to 7 nodes, its determinism, and proof that its checkers can fail.
//!
//! A failing seed is reproduced exactly with `ringkv sim --seed S --runs 1`.

use ringkv_engine::cluster::sim::{self, SimConfig, SimReport};

/// Seeds that must pass with the default settings (`3 + seed % 5` nodes).
const SEEDS: std::ops::Range<u64> = 0..100;

#[test]
fn fixed_seeds_pass_every_checker() {
    let mut total = SimReport::default();
    for seed in SEEDS {
        let report = match sim::run(&SimConfig::for_seed(seed)) {
            Ok(report) => report,
            Err(failure) => panic!("{failure}"),
        };
        assert_eq!(report.nodes, 3 + (seed % 5) as usize);
        assert_eq!(
            report.store_errors,
            0,
            "seed {seed}: {}",
            report.counters_line()
        );
        total.add(&report);
    }
    // the seeds must exercise what the checkers are about, or passing means little
    let line = total.counters_line();
    assert!(
        total.acked_puts > 1000 && total.acked_deletes > 100,
        "{line}"
    );
    assert!(total.crashes > 20 && total.partitions > 20, "{line}");
    assert!(
        total.hints_stored > 100 && total.hints_delivered > 100,
        "{line}"
    );
    assert!(total.read_repairs > 1000 && total.forwarded > 100, "{line}");
    assert!(
        total.messages_dropped > 1000 && total.messages_duplicated > 100,
        "{line}"
    );
    assert!(total.not_confirmed > 0, "{line}");
    assert!(
        total.fallback_copies > 100 && total.failed_copy_hints > 100,
        "{line}"
    );
}

#[test]
fn same_seed_gives_the_identical_run() {
    for seed in [3, 9] {
        let config = SimConfig::for_seed(seed);
        let first = sim::run(&config).expect("passes");
        let second = sim::run(&config).expect("passes");
        assert_eq!(first, second, "seed {seed}");
    }
    let a = sim::run(&SimConfig::for_seed(3)).expect("passes");
    let b = sim::run(&SimConfig::for_seed(8)).expect("passes");
    assert_ne!(a.digest, b.digest);
}

/// `interval` durability: a crash loses the last interval's writes on that node; with
/// W = 2 and crashes spaced apart, nothing acknowledged may be lost, and nodes move to
/// fresh actor epochs so reused clock counters never hide a write.
#[test]
fn fixed_seeds_pass_with_interval_durability() {
    let mut crashes = 0;
    for seed in 0..15 {
        let config = SimConfig {
            sync_interval_ms: Some(100),
            ..SimConfig::for_seed(seed)
        };
        match sim::run(&config) {
            Ok(report) => crashes += report.crashes,
            Err(failure) => panic!("{failure}"),
        }
    }
    assert!(crashes > 20, "{crashes} crashes");
}

/// Tombstones reaped during the run. These seeds and graces fail (`hint_handoff`) when
/// compaction reaps the tombstones that pending hints still have to deliver (checked
/// with the keep check turned off), and pass now that it keeps them. The checkers accept
/// a write gone with a reaped delete only while nothing that delete superseded is back.
/// (Shorter graces still show other ways back, which hints do not cover: at 2 s, seeds
/// 59, 269 and 584 of 0..600 fail; at 5 s, 652, 1058 and 1673 of 0..3000, each a
/// reaped delete whose superseded value is back.)
#[test]
fn deletes_pending_hints_carry_outlive_a_short_tombstone_grace() {
    let mut total = SimReport::default();
    for (seed, grace) in [(227, 500), (227, 2_000), (596, 2_000)] {
        let config = SimConfig {
            tombstone_grace_ms: Some(grace),
            ..SimConfig::for_seed(seed)
        };
        match sim::run(&config) {
            Ok(report) => total.add(&report),
            Err(failure) => panic!("grace {grace} ms: {failure}"),
        }
    }
    let line = total.counters_line();
    assert!(
        total.tombstones_reaped > 0 && total.tombstones_held > 0,
        "{line}"
    );
}

/// Regression: a hinted write that reaches a fallback while an earlier hint of the same
/// key is being delivered must keep the hint (`hint_delivered` only removes the record
/// it delivered). Removing the hint regardless makes this seed fail `hint_handoff`: the
/// home node never gets the newer version.
#[test]
fn rehinted_key_during_delivery_keeps_its_hint_seed_109() {
    let report = sim::run(&SimConfig::for_seed(109)).unwrap_or_else(|f| panic!("{f}"));
    assert_eq!(report.nodes, 7);
    assert!(report.hints_delivered > 0);
}

/// Pins one run's trace across processes and builds: nothing may depend on hash-map
/// order, addresses or the environment. A deliberate change of the simulator or of the
/// logic it runs changes this digest: rerun with `ringkv sim --seed 11 --runs 1` and
/// update it in the same commit.
#[test]
fn digest_is_pinned() {
    let report = sim::run(&SimConfig::for_seed(11)).expect("passes");
    assert_eq!(
        report.digest,
        PINNED_DIGEST_SEED_11,
        "{}",
        report.counters_line()
    );
}

const PINNED_DIGEST_SEED_11: u64 = 2_284_769_134_128_701_216;

/// Without hinted handoff and with W = 1, writes acknowledged only by fallbacks never
/// reach their home replicas: the lost-write checker must say so, naming seed and key.
#[test]
fn lost_write_checker_fails_without_hints() {
    let mut caught = Vec::new();
    for seed in 1..5 {
        let config = SimConfig {
            hints: false,
            w: 1,
            ..SimConfig::for_seed(seed)
        };
        if let Err(failure) = sim::run(&config) {
            assert_eq!(failure.seed, seed);
            assert_eq!(failure.checker, "lost_write", "{failure}");
            assert!(failure.key.is_some());
            caught.push(seed);
        }
    }
    assert!(!caught.is_empty(), "no seed lost a write without hints");
}

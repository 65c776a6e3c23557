//! `ringkv sim` end to end: runs the built binary over a few seeds.

use std::process::Command;

fn ringkv_sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .arg("sim")
        .args(args)
        .output()
        .expect("run ringkv")
}

#[test]
fn runs_a_seed_range_with_one_line_each_and_a_summary() {
    let output = ringkv_sim(&["--seed", "5", "--runs", "3", "--ops", "200"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    // nodes default to 3 + seed % 5
    assert!(lines[0].starts_with("seed 5 nodes 3 acked "), "{stdout}");
    assert!(lines[1].starts_with("seed 6 nodes 4 acked "), "{stdout}");
    assert!(lines[2].starts_with("seed 7 nodes 5 acked "), "{stdout}");
    assert!(
        lines[3].starts_with("3 runs, 3 passed, 0 failed"),
        "{stdout}"
    );
}

#[test]
fn json_output_is_deterministic_per_seed() {
    let run = || {
        let output = ringkv_sim(&["--seed", "2", "--runs", "1", "--ops", "200", "--json"]);
        assert!(output.status.success());
        let stdout = String::from_utf8(output.stdout).expect("utf-8");
        let mut lines = stdout.lines();
        let run: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        let summary: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(summary["passed"], 1);
        run
    };
    let first = run();
    assert_eq!(first["ok"], true);
    assert_eq!(first["nodes"], 5);
    assert_eq!(first, run(), "same seed, same run");
}

#[test]
fn failing_seeds_exit_1_and_are_named() {
    // without hinted handoff and with W = 1, seed 1 loses an acknowledged write
    let output = ringkv_sim(&["--seed", "1", "--runs", "2", "--no-hints", "--w", "1"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("seed 1 nodes 4 FAILED: seed 1: checker lost_write"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("failing seed 1"));
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["--runs", "0"][..],
        &["--loss", "2"],
        &["--bogus"],
        &["--seed"],
    ] {
        let output = ringkv_sim(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
}

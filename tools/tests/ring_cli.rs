//! `ringkv ring` end to end: runs the built binary and checks its output.

use std::process::Command;

fn ringkv_ring(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .arg("ring")
        .args(args)
        .output()
        .expect("run ringkv")
}

fn json(args: &[&str]) -> serde_json::Value {
    let output = ringkv_ring(args);
    assert!(
        output.status.success(),
        "ringkv ring {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON object")
}

#[test]
fn json_reports_partitions_per_node_and_moves_for_a_join() {
    let report = json(&[
        "--partitions",
        "64",
        "--nodes",
        "4",
        "--join",
        "1",
        "--json",
    ]);
    let per_node = report["partitions_per_node"]
        .as_object()
        .expect("partitions_per_node is an object");
    assert_eq!(per_node.len(), 5);
    let counts: Vec<u64> = per_node
        .values()
        .map(|count| count.as_u64().unwrap())
        .collect();
    assert_eq!(counts.iter().sum::<u64>(), 64);
    // 64 / 5 = 12.8: every node holds 12 or 13.
    assert!(
        counts.iter().all(|&count| count == 12 || count == 13),
        "{counts:?}"
    );
    // The newcomer takes its share and nothing else moves.
    let moved = report["moved"].as_u64().expect("moved is a number");
    assert_eq!(moved, per_node["4"].as_u64().unwrap());
    assert_eq!(moved, report["moved_minimum"].as_u64().unwrap());
}

#[test]
fn json_weights_zones_and_leave() {
    let report = json(&[
        "--partitions",
        "128",
        "--nodes",
        "4",
        "--weights",
        "1,2,1,2",
        "--zones",
        "a,b,a,b",
        "--leave",
        "1",
        "--json",
    ]);
    let per_node = report["partitions_per_node"].as_object().unwrap();
    assert!(!per_node.contains_key("1"), "the leaver owns nothing");
    // Shares after the leave: 128 * (1, 1, 2) / 4 = 32, 32, 64.
    assert_eq!(per_node["0"], 32);
    assert_eq!(per_node["2"], 32);
    assert_eq!(per_node["3"], 64);
    // The leaver owned 128 * 2 / 6 = 42 or 43; exactly those move.
    let before = report["partitions_per_node_before"].as_object().unwrap();
    assert_eq!(report["moved"], before["1"]);
    assert_eq!(report["zone_shortfall"], 0);
}

#[test]
fn no_change_moves_nothing() {
    let report = json(&["--nodes", "3", "--json"]);
    assert_eq!(report["moved"], 0);
    assert_eq!(report["partitions"], 64);
}

#[test]
fn text_output_and_help() {
    let output = ringkv_ring(&["--nodes", "3", "--join", "1"]);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("moved: 16 partitions"), "{text}");

    let help = ringkv_ring(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8(help.stdout)
        .unwrap()
        .contains("usage: ringkv ring"));

    let bad = ringkv_ring(&["--nodes", "3", "--partitions", "100"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8(bad.stderr)
        .unwrap()
        .contains("power of two"));
}

/// A client command whose reader is gone (`ringkv … | head -1`) ends by SIGPIPE like
/// any Unix tool, not by a panic on the broken pipe.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(["ring", "--help"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run ringkv");
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

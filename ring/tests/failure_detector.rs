//! The failure detector marks a silent peer down (through unanswered probes, and through
//! unanswered requests) and back up as soon as it answers again.

use ringkv_ring::{FailureDetector, FailureDetectorConfig, NodeId, ReachabilityChange};

const TICK_MS: u64 = 100;

/// Drives the detector over time for one peer that answers every probe while
/// `answers(now_ms)` is true and is silent otherwise. Returns every change seen.
fn run(
    detector: &mut FailureDetector,
    peer: NodeId,
    from_ms: u64,
    until_ms: u64,
    answers: impl Fn(u64) -> bool,
) -> Vec<ReachabilityChange> {
    let mut changes = Vec::new();
    let mut now_ms = from_ms;
    while now_ms < until_ms {
        detector.tick(now_ms);
        while let Some(probe) = detector.poll_probe() {
            assert_eq!(probe.peer, peer);
            if answers(now_ms) {
                // The answer arrives one tick later.
                detector.handle_probe_answered(now_ms + TICK_MS / 2, peer, probe.probe_id);
            }
        }
        while let Some(change) = detector.poll_change() {
            changes.push(change);
        }
        now_ms += TICK_MS;
    }
    changes
}

#[test]
fn silent_peer_is_marked_down_by_probes_and_up_when_it_answers() {
    let config = FailureDetectorConfig {
        unanswered_max: 3,
        probe_timeout_ms: 500,
        probe_interval_ms: 1000,
        idle_probe_after_ms: Some(2000),
    };
    let mut detector = FailureDetector::new(config);
    let peer = NodeId(42);
    detector.add_peer(0, peer);

    // Alive for 10 s: idle probes are answered, nothing changes.
    let changes = run(&mut detector, peer, 0, 10_000, |_| true);
    assert!(changes.is_empty(), "{changes:?}");
    assert!(detector.is_reachable(peer));

    // Silent from 10 s: three unanswered probes later it is down.
    let changes = run(&mut detector, peer, 10_000, 20_000, |_| false);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(!changes[0].reachable);
    // Idle after 2 s (the last answer was just before 10 s), then three probes 1 s
    // apart, each timing out after 0.5 s: down between 12 s and 16 s.
    assert!((12_000..16_000).contains(&changes[0].at_ms), "{changes:?}");
    assert!(!detector.is_reachable(peer));
    assert_eq!(detector.unreachable_peers(), vec![peer]);

    // It keeps being probed while down and comes back with its first answer.
    let changes = run(&mut detector, peer, 20_000, 30_000, |now_ms| {
        now_ms >= 25_000
    });
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(changes[0].reachable);
    assert!((25_000..26_500).contains(&changes[0].at_ms), "{changes:?}");
    assert!(detector.is_reachable(peer));
}

#[test]
fn unanswered_requests_mark_down_and_a_reply_marks_up_without_idle_probes() {
    let config = FailureDetectorConfig {
        idle_probe_after_ms: None,
        ..FailureDetectorConfig::default()
    };
    let mut detector = FailureDetector::new(config);
    let peer = NodeId(5);
    detector.add_peer(0, peer);
    // With no traffic and no idle probing, silence alone changes nothing.
    for now_ms in (0..60_000).step_by(100) {
        detector.tick(now_ms);
    }
    assert!(detector.poll_probe().is_none());
    assert!(detector.is_reachable(peer));

    // An answered request in between resets the count.
    detector.handle_unanswered(60_000, peer);
    detector.handle_unanswered(60_100, peer);
    detector.handle_answered(60_200, peer);
    detector.handle_unanswered(60_300, peer);
    detector.handle_unanswered(60_400, peer);
    assert!(detector.is_reachable(peer));
    detector.handle_unanswered(60_500, peer);
    assert!(!detector.is_reachable(peer));

    // Down peers are probed; the probe's answer brings it back.
    detector.tick(61_000);
    let probe = detector.poll_probe().expect("a down peer is probed");
    assert_eq!(probe.peer, peer);
    detector.handle_probe_answered(61_050, peer, probe.probe_id);
    assert!(detector.is_reachable(peer));
    let changes: Vec<bool> = std::iter::from_fn(|| detector.poll_change())
        .map(|change| change.reachable)
        .collect();
    assert_eq!(changes, [false, true]);
}

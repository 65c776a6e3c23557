//! The local failure detector: per-peer reachability from answered and unanswered
//! requests and probes. A peer that leaves `unanswered_max` requests or probes in a row
//! unanswered is unreachable (routing skips it, sloppy quorum uses fallbacks); it is
//! probed every `probe_interval_ms` and is reachable again as soon as it answers.

use std::collections::{BTreeMap, VecDeque};

use crate::membership::NodeId;

/// The most reachability changes kept for [`FailureDetector::poll_change`]; older ones
/// are dropped first (the current state is always in [`FailureDetector::is_reachable`]).
pub const CHANGES_MAX: usize = 4096;

#[derive(Debug, Clone)]
pub struct FailureDetectorConfig {
    /// Consecutive unanswered requests or probes before a peer is unreachable.
    pub unanswered_max: u32,
    /// A probe not answered within this long counts as unanswered.
    pub probe_timeout_ms: u64,
    /// Time between probes to a peer that is unreachable (or being checked).
    pub probe_interval_ms: u64,
    /// Probe a reachable peer that has been silent this long; `None` relies on request
    /// traffic alone, as Dynamo does.
    pub idle_probe_after_ms: Option<u64>,
}

impl Default for FailureDetectorConfig {
    fn default() -> Self {
        Self {
            unanswered_max: 3,
            probe_timeout_ms: 1000,
            probe_interval_ms: 1000,
            idle_probe_after_ms: Some(5000),
        }
    }
}

/// A probe (ping) for the caller to send; the answer comes back through
/// [`FailureDetector::handle_probe_answered`] with the same `probe_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub peer: NodeId,
    pub probe_id: u64,
}

/// A peer became reachable or unreachable at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReachabilityChange {
    pub peer: NodeId,
    pub reachable: bool,
    pub at_ms: u64,
}

#[derive(Debug, Clone)]
struct PeerState {
    reachable: bool,
    unanswered_count: u32,
    last_heard_ms: u64,
    /// (probe id, sent at) of the probe in flight.
    probe_in_flight: Option<(u64, u64)>,
    next_probe_ms: u64,
}

#[derive(Debug)]
pub struct FailureDetector {
    config: FailureDetectorConfig,
    peers: BTreeMap<NodeId, PeerState>,
    next_probe_id: u64,
    probes: VecDeque<Probe>,
    changes: VecDeque<ReachabilityChange>,
}

impl FailureDetector {
    pub fn new(config: FailureDetectorConfig) -> Self {
        assert!(config.unanswered_max > 0, "unanswered_max must be positive");
        assert!(
            config.probe_interval_ms > 0,
            "probe interval must be positive"
        );
        Self {
            config,
            peers: BTreeMap::new(),
            next_probe_id: 1,
            probes: VecDeque::new(),
            changes: VecDeque::new(),
        }
    }

    // --- getters ---

    /// Whether routing should use `peer`. Unknown peers are presumed reachable.
    pub fn is_reachable(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_none_or(|state| state.reachable)
    }

    /// Every tracked peer that is currently unreachable.
    pub fn unreachable_peers(&self) -> Vec<NodeId> {
        self.peers
            .iter()
            .filter(|(_, state)| !state.reachable)
            .map(|(peer, _)| *peer)
            .collect()
    }

    // --- mutators ---

    /// Starts tracking a peer (reachable, heard from now). No-op if already tracked.
    pub fn add_peer(&mut self, now_ms: u64, peer: NodeId) {
        self.peers.entry(peer).or_insert(PeerState {
            reachable: true,
            unanswered_count: 0,
            last_heard_ms: now_ms,
            probe_in_flight: None,
            next_probe_ms: now_ms,
        });
    }

    pub fn remove_peer(&mut self, peer: NodeId) {
        self.peers.remove(&peer);
    }

    // --- inputs ---

    /// `peer` answered a request or sent anything at all: it is alive.
    pub fn handle_answered(&mut self, now_ms: u64, peer: NodeId) {
        self.add_peer(now_ms, peer);
        let state = self.peers.get_mut(&peer).expect("just added");
        state.unanswered_count = 0;
        state.last_heard_ms = now_ms;
        state.probe_in_flight = None;
        if !state.reachable {
            state.reachable = true;
            push_change(&mut self.changes, peer, true, now_ms);
        }
    }

    /// A request to `peer` timed out without an answer.
    pub fn handle_unanswered(&mut self, now_ms: u64, peer: NodeId) {
        self.add_peer(now_ms, peer);
        self.record_unanswered(now_ms, peer);
    }

    /// `peer` answered probe `probe_id`. Answers to probes no longer in flight are
    /// ignored: they may predate the failure.
    pub fn handle_probe_answered(&mut self, now_ms: u64, peer: NodeId, probe_id: u64) {
        let in_flight = self
            .peers
            .get(&peer)
            .and_then(|state| state.probe_in_flight)
            .is_some_and(|(id, _)| id == probe_id);
        if in_flight {
            self.handle_answered(now_ms, peer);
        }
    }

    /// Times out probes in flight and sends the probes that are due.
    pub fn tick(&mut self, now_ms: u64) {
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for peer in peers {
            let state = &self.peers[&peer];
            if let Some((_, sent_ms)) = state.probe_in_flight {
                if now_ms >= sent_ms + self.config.probe_timeout_ms {
                    self.peers.get_mut(&peer).expect("tracked").probe_in_flight = None;
                    self.record_unanswered(now_ms, peer);
                }
            }
            let state = &self.peers[&peer];
            if state.probe_in_flight.is_some() || now_ms < state.next_probe_ms {
                continue;
            }
            let probe_due = !state.reachable
                || state.unanswered_count > 0
                || self
                    .config
                    .idle_probe_after_ms
                    .is_some_and(|idle_ms| now_ms >= state.last_heard_ms + idle_ms);
            if probe_due {
                let probe_id = self.next_probe_id;
                self.next_probe_id += 1;
                let state = self.peers.get_mut(&peer).expect("tracked");
                state.probe_in_flight = Some((probe_id, now_ms));
                state.next_probe_ms = now_ms + self.config.probe_interval_ms;
                self.probes.push_back(Probe { peer, probe_id });
            }
        }
    }

    // --- outputs ---

    /// The next probe to send. At most one probe per peer is in flight.
    pub fn poll_probe(&mut self) -> Option<Probe> {
        self.probes.pop_front()
    }

    /// The next reachability change, oldest first.
    pub fn poll_change(&mut self) -> Option<ReachabilityChange> {
        self.changes.pop_front()
    }

    fn record_unanswered(&mut self, now_ms: u64, peer: NodeId) {
        let unanswered_max = self.config.unanswered_max;
        let state = self.peers.get_mut(&peer).expect("tracked");
        state.unanswered_count = state.unanswered_count.saturating_add(1);
        if state.reachable && state.unanswered_count >= unanswered_max {
            state.reachable = false;
            push_change(&mut self.changes, peer, false, now_ms);
        }
    }
}

fn push_change(
    changes: &mut VecDeque<ReachabilityChange>,
    peer: NodeId,
    reachable: bool,
    at_ms: u64,
) {
    if changes.len() >= CHANGES_MAX {
        changes.pop_front();
    }
    changes.push_back(ReachabilityChange {
        peer,
        reachable,
        at_ms,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_requests_mark_a_peer_down_and_an_answer_brings_it_back() {
        let mut detector = FailureDetector::new(FailureDetectorConfig::default());
        let peer = NodeId(7);
        detector.handle_unanswered(0, peer);
        detector.handle_unanswered(10, peer);
        assert!(detector.is_reachable(peer));
        detector.handle_unanswered(20, peer);
        assert!(!detector.is_reachable(peer));
        assert_eq!(
            detector.poll_change(),
            Some(ReachabilityChange {
                peer,
                reachable: false,
                at_ms: 20
            })
        );
        detector.handle_answered(30, peer);
        assert!(detector.is_reachable(peer));
        assert!(detector.poll_change().unwrap().reachable);
        assert!(detector.poll_change().is_none());
    }

    #[test]
    fn stale_probe_answers_are_ignored() {
        let config = FailureDetectorConfig {
            unanswered_max: 1,
            ..FailureDetectorConfig::default()
        };
        let mut detector = FailureDetector::new(config);
        let peer = NodeId(3);
        detector.handle_unanswered(0, peer);
        detector.tick(0);
        let probe = detector.poll_probe().unwrap();
        detector.handle_probe_answered(5, peer, probe.probe_id + 100);
        assert!(!detector.is_reachable(peer));
        detector.handle_probe_answered(5, peer, probe.probe_id);
        assert!(detector.is_reachable(peer));
    }
}

//! Gossip over an in-memory network of 100 nodes (with and without 20% message loss)
//! converges to one membership view in a number of rounds logarithmic in the node
//! count; seeds heal a logically partitioned ring. Each test prints the rounds taken.

use std::collections::VecDeque;

use ringkv_ring::{Gossip, GossipConfig, GossipMessage, Membership, NodeId, Ring, Rng};

const PARTITION_COUNT: u32 = 64;
const PERIOD_MS: u64 = 1000;

/// A cluster of gossip state machines exchanging messages in memory. A round is one
/// gossip period: every node ticks, then messages are delivered (each dropped with
/// probability `drop_percent`) until none are left; an exchange fits in one period.
struct Network {
    nodes: Vec<Gossip>,
    drop_percent: u64,
    rng: Rng,
    now_ms: u64,
    dropped: u64,
    delivered: u64,
}

impl Network {
    /// `node_count` nodes, each knowing itself (and, if given, the members of its group).
    fn new(node_count: u64, seeds: &[u64], drop_percent: u64, seed: u64) -> Self {
        let nodes = (0..node_count)
            .map(|id| {
                let mut membership = Membership::new(PARTITION_COUNT).unwrap();
                membership
                    .join(
                        NodeId(id),
                        &format!("10.0.{}.{}:7000", id / 256, id % 256),
                        1,
                        "",
                        4,
                    )
                    .unwrap();
                let seeds = seeds.iter().map(|&seed| NodeId(seed)).collect();
                let config = GossipConfig::new(NodeId(id), seeds, seed ^ (id * 0x9E37));
                Gossip::new(config, membership)
            })
            .collect();
        Self {
            nodes,
            drop_percent,
            rng: Rng::new(seed),
            now_ms: 0,
            dropped: 0,
            delivered: 0,
        }
    }

    fn round(&mut self) {
        for node in &mut self.nodes {
            node.tick(self.now_ms);
        }
        let mut in_flight: VecDeque<(NodeId, NodeId, GossipMessage)> = VecDeque::new();
        // Bounded: an exchange is at most three messages, so three waves drain it.
        for _wave in 0..8 {
            for node in &mut self.nodes {
                let from = node.config().local_id;
                while let Some(out) = node.poll_outgoing() {
                    in_flight.push_back((from, out.to, out.message));
                }
            }
            if in_flight.is_empty() {
                break;
            }
            while let Some((from, to, message)) = in_flight.pop_front() {
                if self.rng.chance(self.drop_percent, 100) {
                    self.dropped += 1;
                    continue;
                }
                self.delivered += 1;
                // Through the wire encoding, as a real node would see it.
                let message = GossipMessage::decode(&message.encode()).unwrap();
                self.nodes[to.0 as usize].handle_message(self.now_ms, from, message);
            }
        }
        self.now_ms += PERIOD_MS;
    }

    /// True when every node holds the same membership with `member_count` members.
    fn converged(&self, member_count: usize) -> bool {
        let first = self.nodes[0].membership();
        first.len() == member_count && self.nodes.iter().all(|node| node.membership() == first)
    }

    /// Rounds until convergence, or `None` after `rounds_max`.
    fn rounds_to_converge(&mut self, member_count: usize, rounds_max: u32) -> Option<u32> {
        for round in 1..=rounds_max {
            self.round();
            if self.converged(member_count) {
                return Some(round);
            }
        }
        None
    }
}

/// Generous but logarithmic: a few rounds per doubling of the cluster.
fn rounds_bound(node_count: u64) -> u32 {
    let log2_ceil = 64 - (node_count - 1).leading_zeros();
    3 * log2_ceil
}

fn bootstrap(node_count: u64, drop_percent: u64, seed: u64) -> u32 {
    let mut network = Network::new(node_count, &[0, 1, 2], drop_percent, seed);
    let rounds = network
        .rounds_to_converge(node_count as usize, 200)
        .expect("gossip did not converge in 200 rounds");
    println!(
        "bootstrap: {node_count} nodes, {drop_percent}% dropped, seed {seed}: {rounds} rounds \
         (bound {}), {} messages delivered, {} dropped",
        rounds_bound(node_count),
        network.delivered,
        network.dropped
    );
    // Everyone computes the same ring from the converged state.
    let ring = Ring::from_membership(network.nodes[0].membership());
    for node in network.nodes.iter().step_by(17) {
        assert_eq!(Ring::from_membership(node.membership()), ring);
    }
    assert_eq!(ring.nodes().len(), node_count as usize);
    rounds
}

#[test]
fn hundred_nodes_bootstrap_through_seeds_in_logarithmic_rounds() {
    for seed in 1..=5 {
        let rounds = bootstrap(100, 0, seed);
        assert!(rounds <= rounds_bound(100), "{rounds} rounds");
    }
}

#[test]
fn hundred_nodes_bootstrap_with_a_fifth_of_messages_dropped() {
    for seed in 1..=5 {
        let rounds = bootstrap(100, 20, seed);
        assert!(rounds <= rounds_bound(100), "{rounds} rounds");
    }
}

/// After convergence one node changes its own record; the change spreads epidemically.
fn spread_of_one_change(node_count: u64, drop_percent: u64, seed: u64) -> u32 {
    let mut network = Network::new(node_count, &[0], drop_percent, seed);
    network
        .rounds_to_converge(node_count as usize, 200)
        .expect("bootstrap converges");
    let changer = (node_count - 1) as usize;
    let changer_id = NodeId(changer as u64);
    network.nodes[changer]
        .membership_mut()
        .set_weight(changer_id, 3)
        .unwrap();
    let mut rounds = None;
    for round in 1..=200u32 {
        network.round();
        let informed = network
            .nodes
            .iter()
            .filter(|node| node.membership().member(changer_id).unwrap().weight == 3)
            .count();
        if informed == network.nodes.len() {
            rounds = Some(round);
            break;
        }
    }
    let rounds = rounds.expect("the change did not spread in 200 rounds");
    assert!(network.converged(node_count as usize));
    println!(
        "one change: {node_count} nodes, {drop_percent}% dropped, seed {seed}: {rounds} rounds"
    );
    rounds
}

#[test]
fn one_change_reaches_all_hundred_nodes_in_logarithmic_rounds_despite_loss() {
    let mut rounds_total = 0;
    for seed in 1..=5 {
        let rounds = spread_of_one_change(100, 20, seed);
        assert!(rounds <= rounds_bound(100), "{rounds} rounds");
        rounds_total += rounds;
    }
    // Rounds grow with log(n), not n: 100 nodes take far fewer than 100/16 times the
    // rounds of 16 nodes.
    let small_total: u32 = (1..=5).map(|seed| spread_of_one_change(16, 20, seed)).sum();
    println!(
        "average rounds: 16 nodes {}, 100 nodes {}",
        small_total as f64 / 5.0,
        rounds_total as f64 / 5.0
    );
    assert!(
        rounds_total <= 3 * small_total,
        "{rounds_total} vs {small_total}"
    );
}

#[test]
fn seeds_join_two_logically_partitioned_halves() {
    // Two groups that each bootstrapped on their own (node 0 and node 50 are their
    // seeds) would never learn of each other by random peer choice: every node only
    // picks peers it knows. With both seeds configured, the seeds talk and the halves
    // merge into one ring.
    let node_count = 100u64;
    let mut network = Network::new(node_count, &[0, 50], 20, 9);
    for node in &mut network.nodes {
        let id = node.config().local_id.0;
        let group: Vec<u64> = if id < 50 {
            (0..50).collect()
        } else {
            (50..100).collect()
        };
        for other in group {
            if other != id {
                let mut piece = Membership::new(PARTITION_COUNT).unwrap();
                piece.join(NodeId(other), "x", 1, "", 4).unwrap();
                node.membership_mut().merge(&piece).unwrap();
            }
        }
    }
    let rounds = network
        .rounds_to_converge(node_count as usize, 200)
        .expect("the halves never merged");
    println!("partitioned halves merged in {rounds} rounds");
    assert!(rounds <= 2 * rounds_bound(node_count), "{rounds} rounds");
}

#[test]
fn without_seeds_two_halves_stay_apart() {
    // The control for the test above: the same halves with each seed list naming only
    // the group's own seed never merge. This is the failure seeds exist to prevent.
    let mut network = Network::new(100, &[], 0, 9);
    for node in &mut network.nodes {
        let id = node.config().local_id.0;
        let group: Vec<u64> = if id < 50 {
            (0..50).collect()
        } else {
            (50..100).collect()
        };
        for other in group {
            if other != id {
                let mut piece = Membership::new(PARTITION_COUNT).unwrap();
                piece.join(NodeId(other), "x", 1, "", 4).unwrap();
                node.membership_mut().merge(&piece).unwrap();
            }
        }
    }
    assert_eq!(network.rounds_to_converge(100, 50), None);
    assert_eq!(network.nodes[0].membership().len(), 50);
}

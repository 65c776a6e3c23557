//! Properties of the claim and the ring over many (Q, S, weights, zones): balance within
//! one partition of the weighted share, near-minimal movement on join and leave,
//! preference lists without duplicates and with zones spread, and determinism whatever
//! the merge order.

use proptest::prelude::*;
use ringkv_ring::{minimum_moves, ClaimNode, Member, Membership, NodeId, Ring, Status};

const ZONE_NAMES: [&str; 5] = ["zone-a", "zone-b", "zone-c", "zone-d", "zone-e"];

#[derive(Debug, Clone)]
struct Cluster {
    partition_count: u32,
    weights: Vec<u32>,
    /// Zone index per node; `None` when the cluster has no zone labels.
    zones: Option<Vec<usize>>,
    /// All nodes joined at epoch 1 (a fresh cluster) or one per epoch (grown one by one).
    joined_together: bool,
}

fn cluster_strategy() -> impl Strategy<Value = Cluster> {
    (3u32..=10, 1usize..=24, any::<bool>(), 0usize..=4)
        .prop_flat_map(|(bits, node_count, joined_together, zone_count)| {
            let weights =
                prop::collection::vec(prop_oneof![3 => Just(1u32), 1 => 1u32..=4], node_count);
            let zones = if zone_count == 0 {
                Just(None).boxed()
            } else {
                prop::collection::vec(0..zone_count, node_count)
                    .prop_map(Some)
                    .boxed()
            };
            (Just(1u32 << bits), weights, zones, Just(joined_together))
        })
        .prop_map(
            |(partition_count, weights, zones, joined_together)| Cluster {
                partition_count,
                weights,
                zones,
                joined_together,
            },
        )
}

fn zone_of(cluster: &Cluster, index: usize) -> &'static str {
    cluster
        .zones
        .as_ref()
        .map_or("", |zones| ZONE_NAMES[zones[index]])
}

fn member(cluster: &Cluster, index: usize) -> Member {
    Member {
        id: NodeId(100 + index as u64 * 7),
        addr: format!("10.0.0.{index}:7000"),
        status: Status::Valid,
        weight: cluster.weights[index],
        zone: zone_of(cluster, index).to_string(),
        shard_count: 4,
        version: 1,
        joined_epoch: if cluster.joined_together {
            1
        } else {
            1 + index as u64
        },
        left_epoch: 0,
    }
}

fn membership(cluster: &Cluster) -> Membership {
    let mut membership = Membership::new(cluster.partition_count).unwrap();
    for index in 0..cluster.weights.len() {
        membership.merge_member(&member(cluster, index)).unwrap();
    }
    membership
}

fn claim_nodes(ring: &Ring) -> Vec<ClaimNode> {
    ring.nodes()
        .iter()
        .map(|node| ClaimNode {
            id: node.id,
            weight: node.weight,
            zone: node.zone.clone(),
        })
        .collect()
}

/// Every node owns the floor or the ceiling of `Q * weight / total_weight`.
fn assert_balanced(ring: &Ring) -> Result<(), TestCaseError> {
    let weight_total: u64 = ring.nodes().iter().map(|node| u64::from(node.weight)).sum();
    let counts = ring.partition_counts();
    prop_assert_eq!(counts.values().sum::<u32>(), ring.partition_count());
    for node in ring.nodes() {
        let count = u64::from(counts[&node.id]);
        let share_scaled = u64::from(ring.partition_count()) * u64::from(node.weight);
        // |count - share| < 1, scaled by the total weight.
        prop_assert!(
            (count * weight_total).abs_diff(share_scaled) < weight_total,
            "node {} owns {} partitions, share {}/{}",
            node.id,
            count,
            share_scaled,
            weight_total
        );
    }
    Ok(())
}

/// The partitions that changed owner are at most 10% above the fewest possible.
fn assert_near_minimal_moves(before: &Ring, after: &Ring) -> Result<(), TestCaseError> {
    let previous: Vec<Option<NodeId>> = before.owners().iter().copied().map(Some).collect();
    let minimum = minimum_moves(&previous, &claim_nodes(after));
    let moved = before.moved_partitions(after).len() as u32;
    prop_assert!(
        moved >= minimum,
        "moved {} below the bound {}",
        moved,
        minimum
    );
    prop_assert!(
        moved * 10 <= minimum * 11,
        "moved {} partitions, minimum {}",
        moved,
        minimum
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_node_is_within_one_partition_of_its_weighted_share(cluster in cluster_strategy()) {
        let ring = Ring::from_membership(&membership(&cluster));
        prop_assert_eq!(ring.nodes().len(), cluster.weights.len());
        assert_balanced(&ring)?;
    }

    #[test]
    fn a_join_moves_close_to_the_minimum_and_stays_balanced(
        cluster in cluster_strategy(),
        new_weight in 1u32..=4,
    ) {
        let mut state = membership(&cluster);
        let before = Ring::from_membership(&state);
        state.join(NodeId(1), "10.0.1.1:7000", new_weight, "zone-a", 4).unwrap();
        let after = Ring::from_membership(&state);
        assert_balanced(&after)?;
        assert_near_minimal_moves(&before, &after)?;
    }

    #[test]
    fn a_leave_moves_close_to_the_minimum_and_stays_balanced(
        cluster in cluster_strategy().prop_filter("two nodes", |c| c.weights.len() >= 2),
        leaver in any::<prop::sample::Index>(),
    ) {
        let mut state = membership(&cluster);
        let before = Ring::from_membership(&state);
        let leaver = member(&cluster, leaver.index(cluster.weights.len())).id;
        state.leave(leaver).unwrap();
        let after = Ring::from_membership(&state);
        prop_assert!(after.node(leaver).is_none());
        assert_balanced(&after)?;
        assert_near_minimal_moves(&before, &after)?;
        // Every partition of the leaver moved.
        let moved = before.moved_partitions(&after);
        for p in before.partitions_of(leaver) {
            prop_assert!(moved.contains(&p));
        }
        // And removing it for good changes nothing more.
        state.remove(leaver).unwrap();
        prop_assert_eq!(Ring::from_membership(&state), after);
    }

    #[test]
    fn preference_lists_name_distinct_nodes_and_spread_zones(
        cluster in cluster_strategy(),
        replica_count in 1usize..=5,
    ) {
        let ring = Ring::from_membership(&membership(&cluster));
        let node_count = ring.nodes().len();
        let zone_count = {
            let mut zones: Vec<&str> = ring.nodes().iter().map(|node| node.zone.as_str()).collect();
            zones.sort_unstable();
            zones.dedup();
            zones.len()
        };
        for p in 0..ring.partition_count() {
            let list = ring.preference_list(p, replica_count);
            prop_assert_eq!(list.replicas.len(), replica_count.min(node_count));
            let mut all: Vec<NodeId> = list.iter().collect();
            prop_assert_eq!(all.len(), node_count);
            all.sort_unstable();
            all.dedup();
            prop_assert_eq!(all.len(), node_count, "duplicate node in the list of {}", p);
            prop_assert_eq!(list.replicas[0], ring.owner(p).unwrap());
            let mut zones: Vec<&str> = list
                .replicas
                .iter()
                .map(|id| ring.node(*id).unwrap().zone.as_str())
                .collect();
            zones.sort_unstable();
            zones.dedup();
            prop_assert_eq!(zones.len(), replica_count.min(node_count).min(zone_count));
        }
    }

    #[test]
    fn the_same_state_gives_the_same_ring_in_any_merge_order(
        cluster in cluster_strategy(),
        order_seed in any::<u64>(),
    ) {
        let reference = membership(&cluster);
        let ring = Ring::from_membership(&reference);
        // Each member as its own tiny state, plus an older version of one of them.
        let mut pieces: Vec<Membership> = (0..cluster.weights.len())
            .map(|index| {
                let mut piece = Membership::new(cluster.partition_count).unwrap();
                piece.merge_member(&member(&cluster, index)).unwrap();
                piece
            })
            .collect();
        pieces.extend(pieces.clone());
        // A deterministic shuffle from the seed.
        let mut rng = ringkv_ring::Rng::new(order_seed);
        for index in (1..pieces.len()).rev() {
            let other = rng.below(index as u64 + 1) as usize;
            pieces.swap(index, other);
        }
        // Merge left to right, and as a tree (pairs, then pairs of pairs).
        let mut folded = Membership::new(cluster.partition_count).unwrap();
        for piece in &pieces {
            folded.merge(piece).unwrap();
        }
        let mut level = pieces;
        for _ in 0..16 {
            if level.len() <= 1 {
                break;
            }
            level = level
                .chunks(2)
                .map(|pair| {
                    let mut merged = pair[0].clone();
                    if let Some(second) = pair.get(1) {
                        merged.merge(second).unwrap();
                    }
                    merged
                })
                .collect();
        }
        prop_assert_eq!(&folded, &reference);
        prop_assert_eq!(&level[0], &reference);
        prop_assert_eq!(Ring::from_membership(&folded), ring.clone());
        let decoded = Membership::decode(&reference.encode()).unwrap();
        prop_assert_eq!(Ring::from_membership(&decoded), ring);
    }
}

#[test]
fn pinned_ring_of_four_nodes_does_not_change_silently() {
    // The ring decides where data lives on disk: a change to the claim must be a
    // deliberate, migrated change. This pins the owners of a small ring.
    let mut state = Membership::new(16).unwrap();
    for id in 1..=4 {
        state.join(NodeId(id), "addr", 1, "", 2).unwrap();
    }
    let ring = Ring::from_membership(&state);
    let owners: Vec<u64> = ring.owners().iter().map(|id| id.0).collect();
    assert_eq!(owners, PINNED_OWNERS, "got {owners:?}");
}

const PINNED_OWNERS: [u64; 16] = [2, 3, 4, 1, 2, 3, 1, 4, 3, 2, 4, 1, 2, 4, 3, 1];

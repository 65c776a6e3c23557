//! The claim: which node owns each partition. A pure function from the previous
//! assignment and the new set of weighted owners to the next assignment that keeps
//! every node within one partition of its weighted share and moves the minimum number
//! of partitions for that (the ring module folds it over the membership history).

use crate::membership::NodeId;
use crate::rng::mix64;

/// Partitions closer than this on the ring share preference lists (for N = 3, the
/// Dynamo default), so the claim avoids giving them the same node or zone. It is a
/// constant, not a setting, because the ring must be a function of membership alone.
pub const CLAIM_SPREAD_PARTITIONS: usize = 3;

/// A node taking part in a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimNode {
    pub id: NodeId,
    /// Relative capacity, at least 1.
    pub weight: u32,
    /// Zone label; empty means no zone.
    pub zone: String,
}

/// The weighted share of each node, as the bounds every balanced assignment must meet:
/// `(floor, ceil)` of `partition_count * weight / total_weight`.
pub fn share_bounds(partition_count: u32, nodes: &[ClaimNode]) -> Vec<(u32, u32)> {
    let weight_total: u64 = nodes.iter().map(|node| u64::from(node.weight)).sum();
    assert!(
        weight_total > 0,
        "a claim needs at least one node of positive weight"
    );
    nodes
        .iter()
        .map(|node| {
            let numerator = u64::from(partition_count) * u64::from(node.weight);
            let floor = (numerator / weight_total) as u32;
            let ceil = floor + u32::from(numerator % weight_total != 0);
            (floor, ceil)
        })
        .collect()
}

/// The fewest partitions that must change owner to go from `previous` to any assignment
/// balanced for `nodes` (every node at the floor or ceiling of its share): the larger of
/// what must leave (orphans plus surplus over the ceilings) and what must arrive
/// (shortfall under the floors).
pub fn minimum_moves(previous: &[Option<NodeId>], nodes: &[ClaimNode]) -> u32 {
    let counts = current_counts(previous, nodes);
    let orphans = previous.len() as u32 - counts.iter().sum::<u32>();
    let bounds = share_bounds(previous.len() as u32, nodes);
    let mut must_leave = orphans;
    let mut must_arrive = 0u32;
    for (&count, &(floor, ceil)) in counts.iter().zip(&bounds) {
        must_leave += count.saturating_sub(ceil);
        must_arrive += floor.saturating_sub(count);
    }
    must_leave.max(must_arrive)
}

/// The next assignment: every node ends at the floor or ceiling of its weighted share,
/// and only the partitions that must move do (orphans of departed nodes and the surplus
/// of nodes above their target), which is [`minimum_moves`].
///
/// `nodes` must be sorted by id without duplicates; `previous` may name nodes that are
/// no longer in `nodes` (their partitions are orphans) or `None` (unassigned).
/// Deterministic: equal inputs give equal outputs on every machine.
pub fn rebalance(previous: &[Option<NodeId>], nodes: &[ClaimNode]) -> Vec<NodeId> {
    assert!(!nodes.is_empty(), "a claim needs at least one node");
    assert!(
        nodes.windows(2).all(|pair| pair[0].id < pair[1].id),
        "claim nodes must be sorted by id without duplicates"
    );
    let partition_count = previous.len();
    let mut owner: Vec<Option<usize>> = previous
        .iter()
        .map(|id| id.and_then(|id| node_index(nodes, id)))
        .collect();
    let counts = current_counts(previous, nodes);
    let targets = targets(partition_count as u32, nodes, &counts);
    let zone_of: Vec<Option<&str>> = nodes
        .iter()
        .map(|node| (!node.zone.is_empty()).then_some(node.zone.as_str()))
        .collect();

    let mut deficits: Vec<u32> = counts
        .iter()
        .zip(&targets)
        .map(|(&count, &target)| target.saturating_sub(count))
        .collect();
    let mut surpluses: Vec<u32> = counts
        .iter()
        .zip(&targets)
        .map(|(&count, &target)| count.saturating_sub(target))
        .collect();
    let orphans: Vec<usize> = (0..partition_count)
        .filter(|&p| owner[p].is_none())
        .collect();
    assert_eq!(
        deficits.iter().sum::<u32>() as usize,
        orphans.len() + surpluses.iter().sum::<u32>() as usize,
        "claim: partitions to place must match the room below the targets"
    );

    // 1. Orphans (unassigned, or owned by a departed node) in ring order, each to the
    //    node below target that conflicts least with the partition's neighbours and is
    //    furthest from its target relative to that target.
    for &p in &orphans {
        let mut best: Option<(usize, u32, u64)> = None;
        for (index, &deficit) in deficits.iter().enumerate() {
            if deficit == 0 {
                continue;
            }
            let (same_node, same_zone) = conflicts(&owner, &zone_of, p, index);
            let penalty = 2 * same_node + same_zone;
            let better = match best {
                None => true,
                Some((best_index, best_penalty, best_score)) => {
                    // deficit / target, compared by cross-multiplication.
                    let mine = u64::from(deficit) * u64::from(targets[best_index]);
                    let theirs = u64::from(deficits[best_index]) * u64::from(targets[index]);
                    (penalty, std::cmp::Reverse(mine), score(p, nodes[index].id))
                        < (best_penalty, std::cmp::Reverse(theirs), best_score)
                }
            };
            if better {
                best = Some((index, penalty, score(p, nodes[index].id)));
            }
        }
        let (index, _, _) = best.expect("an orphan always has a node below target");
        owner[p] = Some(index);
        deficits[index] -= 1;
    }

    // 2. Nodes above target hand their surplus to nodes below target. Each pass scores
    //    every partition of a giver with its best receiver (relief of the giver's
    //    neighbourhood minus crowding of the receiver's) and applies the best moves
    //    whose neighbourhood no earlier move of the pass touched (their scores are
    //    still exact). Every pass applies at least one move, so the passes are bounded
    //    by the total surplus.
    let mut transfers_left: u32 = surpluses.iter().sum();
    let reach = spread_reach(partition_count);
    let passes_max = transfers_left;
    for _pass in 0..=passes_max {
        if transfers_left == 0 {
            break;
        }
        let mut candidates: Vec<((i64, u64), usize, usize)> = Vec::new();
        for p in 0..partition_count {
            let giver = owner[p].expect("orphans are placed");
            if surpluses[giver] == 0 {
                continue;
            }
            let (giver_node, giver_zone) = conflicts(&owner, &zone_of, p, giver);
            let relief = i64::from(2 * giver_node + giver_zone);
            let best = deficits
                .iter()
                .enumerate()
                .filter(|(_, &deficit)| deficit > 0)
                .map(|(receiver, _)| {
                    let (same_node, same_zone) = conflicts(&owner, &zone_of, p, receiver);
                    let key = (
                        i64::from(2 * same_node + same_zone) - relief,
                        score(p, nodes[receiver].id),
                    );
                    (key, p, receiver)
                })
                .min();
            candidates.extend(best);
        }
        candidates.sort_unstable();
        let mut touched = vec![false; partition_count];
        for (_, p, receiver) in candidates {
            if transfers_left == 0 {
                break;
            }
            let giver = owner[p].expect("placed");
            if touched[p] || surpluses[giver] == 0 || deficits[receiver] == 0 {
                continue;
            }
            surpluses[giver] -= 1;
            deficits[receiver] -= 1;
            owner[p] = Some(receiver);
            transfers_left -= 1;
            for distance in 0..=reach {
                touched[(p + distance) % partition_count] = true;
                touched[(p + partition_count - distance) % partition_count] = true;
            }
        }
    }
    assert!(
        deficits.iter().all(|&deficit| deficit == 0),
        "claim: targets met"
    );

    owner
        .into_iter()
        .map(|index| nodes[index.expect("every partition is assigned")].id)
        .collect()
}

/// Per-node targets summing to the partition count: every node gets the floor of its
/// share, and the remaining partitions go one each to nodes with a fractional share,
/// first to those already above their floor (each such choice saves a move), then to
/// the largest fractions, then by a fixed per-node order.
fn targets(partition_count: u32, nodes: &[ClaimNode], counts: &[u32]) -> Vec<u32> {
    let bounds = share_bounds(partition_count, nodes);
    let weight_total: u64 = nodes.iter().map(|node| u64::from(node.weight)).sum();
    let mut targets: Vec<u32> = bounds.iter().map(|&(floor, _)| floor).collect();
    let extra = partition_count - targets.iter().sum::<u32>();
    let mut candidates: Vec<(bool, u64, u64, usize)> = bounds
        .iter()
        .enumerate()
        .filter(|(_, &(floor, ceil))| ceil > floor)
        .map(|(index, &(floor, _))| {
            let remainder =
                u64::from(partition_count) * u64::from(nodes[index].weight) % weight_total;
            (
                counts[index] > floor,
                remainder,
                mix64(nodes[index].id.0),
                index,
            )
        })
        .collect();
    candidates.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    assert!(
        candidates.len() >= extra as usize,
        "claim: not enough fractional shares"
    );
    for &(_, _, _, index) in candidates.iter().take(extra as usize) {
        targets[index] += 1;
    }
    targets
}

fn current_counts(previous: &[Option<NodeId>], nodes: &[ClaimNode]) -> Vec<u32> {
    let mut counts = vec![0u32; nodes.len()];
    for id in previous.iter().flatten() {
        if let Some(index) = node_index(nodes, *id) {
            counts[index] += 1;
        }
    }
    counts
}

fn node_index(nodes: &[ClaimNode], id: NodeId) -> Option<usize> {
    nodes.binary_search_by(|node| node.id.cmp(&id)).ok()
}

/// How many partitions within [`CLAIM_SPREAD_PARTITIONS`] of `p` (either side) are
/// owned by node `index`, and how many by another node of its zone.
fn conflicts(
    owner: &[Option<usize>],
    zone_of: &[Option<&str>],
    p: usize,
    index: usize,
) -> (u32, u32) {
    let partition_count = owner.len();
    let mut same_node = 0;
    let mut same_zone = 0;
    for distance in 1..=spread_reach(partition_count) {
        for neighbour in [
            (p + distance) % partition_count,
            (p + partition_count - distance) % partition_count,
        ] {
            match owner[neighbour] {
                Some(other) if other == index => same_node += 1,
                Some(other) if zone_of[index].is_some() && zone_of[other] == zone_of[index] => {
                    same_zone += 1
                }
                _ => {}
            }
        }
    }
    (same_node, same_zone)
}

/// How far either side of a partition its neighbourhood reaches.
fn spread_reach(partition_count: usize) -> usize {
    (CLAIM_SPREAD_PARTITIONS - 1).min(partition_count / 2)
}

/// A fixed pseudo-random score of (partition, node) for tie-breaks, so that ties do not
/// always go to the lowest id or the lowest partition.
fn score(p: usize, id: NodeId) -> u64 {
    mix64(mix64(id.0) ^ p as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(weights: &[u32]) -> Vec<ClaimNode> {
        weights
            .iter()
            .enumerate()
            .map(|(index, &weight)| ClaimNode {
                id: NodeId(index as u64),
                weight,
                zone: String::new(),
            })
            .collect()
    }

    fn count(assignment: &[NodeId], id: u64) -> usize {
        assignment.iter().filter(|owner| owner.0 == id).count()
    }

    #[test]
    fn first_claim_is_balanced_and_interleaved() {
        let assignment = rebalance(&[None; 64], &nodes(&[1, 1, 1, 1]));
        for id in 0..4 {
            assert_eq!(count(&assignment, id), 16);
        }
        for p in 0..64 {
            assert_ne!(assignment[p], assignment[(p + 1) % 64], "partition {p}");
        }
    }

    #[test]
    fn weight_two_takes_twice_the_partitions() {
        let assignment = rebalance(&[None; 64], &nodes(&[1, 2, 1]));
        assert_eq!(count(&assignment, 1), 32);
        assert_eq!(count(&assignment, 0), 16);
    }

    #[test]
    fn a_join_moves_only_what_the_new_node_takes() {
        let before = rebalance(&[None; 64], &nodes(&[1, 1, 1]));
        let previous: Vec<Option<NodeId>> = before.iter().copied().map(Some).collect();
        let after = rebalance(&previous, &nodes(&[1, 1, 1, 1]));
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(moved, 16);
        assert_eq!(minimum_moves(&previous, &nodes(&[1, 1, 1, 1])), 16);
        assert!(before.iter().zip(&after).all(|(a, b)| a == b || b.0 == 3));
    }
}

//! The ring: the partition -> owner map computed from a membership state, preference
//! lists (N distinct nodes, zones spread, then fallbacks for sloppy quorum) and the
//! partition -> shard map. Every node computes the same ring from the same membership.

use std::collections::BTreeMap;

use crate::claim::{self, ClaimNode};
use crate::hash::partition_for_key;
use crate::membership::{Membership, NodeId};
use crate::rng::mix64;

/// A node that owns partitions in the ring (joining, valid or down; not leaving or
/// removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingNode {
    pub id: NodeId,
    pub weight: u32,
    pub zone: String,
    pub shard_count: u32,
}

/// The nodes that hold one partition: `replicas` are its N home nodes, in order
/// (the first is the usual coordinator); `fallbacks` are every other ring node, in the
/// order a sloppy quorum should try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceList {
    pub replicas: Vec<NodeId>,
    pub fallbacks: Vec<NodeId>,
}

impl PreferenceList {
    /// Replicas then fallbacks.
    pub fn iter(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas.iter().chain(&self.fallbacks).copied()
    }
}

/// The partition map of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ring {
    partition_count: u32,
    /// Owner of each partition; empty when the cluster has no owning node.
    owners: Vec<NodeId>,
    /// Owning nodes sorted by id.
    nodes: Vec<RingNode>,
}

impl Ring {
    /// The ring of a membership state. The claim is folded over the claim epochs of
    /// the state in ascending order (each epoch's owners rebalance the previous
    /// epoch's assignment), so the ring is a pure function of the state, and a change
    /// that adds a new epoch moves the minimum number of partitions.
    pub fn from_membership(membership: &Membership) -> Ring {
        let partition_count = membership.partition_count();
        let members: Vec<_> = membership.members().collect();
        let mut epochs: Vec<u64> = members
            .iter()
            .flat_map(|member| [member.joined_epoch, member.left_epoch])
            .filter(|&epoch| epoch != 0)
            .collect();
        epochs.sort_unstable();
        epochs.dedup();

        let mut assignment: Vec<Option<NodeId>> = vec![None; partition_count as usize];
        let mut owner_ids: Vec<NodeId> = Vec::new();
        // Bounded: at most two epochs per member, and members <= MEMBERS_MAX.
        for &epoch in &epochs {
            let claim_nodes: Vec<ClaimNode> = members
                .iter()
                .filter(|member| member.owns_at(epoch))
                .map(|member| ClaimNode {
                    id: member.id,
                    weight: member.weight,
                    zone: member.zone.clone(),
                })
                .collect();
            let ids: Vec<NodeId> = claim_nodes.iter().map(|node| node.id).collect();
            if ids == owner_ids {
                continue;
            }
            owner_ids = ids;
            if claim_nodes.is_empty() {
                assignment.iter_mut().for_each(|owner| *owner = None);
                continue;
            }
            assignment = claim::rebalance(&assignment, &claim_nodes)
                .into_iter()
                .map(Some)
                .collect();
        }

        let nodes: Vec<RingNode> = members
            .iter()
            .filter(|member| owner_ids.contains(&member.id))
            .map(|member| RingNode {
                id: member.id,
                weight: member.weight,
                zone: member.zone.clone(),
                shard_count: member.shard_count,
            })
            .collect();
        let owners = if nodes.is_empty() {
            Vec::new()
        } else {
            assignment
                .into_iter()
                .map(|owner| owner.expect("every partition has an owner"))
                .collect()
        };
        Ring {
            partition_count,
            owners,
            nodes,
        }
    }

    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// The owning nodes, sorted by id.
    pub fn nodes(&self) -> &[RingNode] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> Option<&RingNode> {
        self.node_index(id).map(|index| &self.nodes[index])
    }

    /// The owner (token holder) of each partition; empty for a ring without nodes.
    pub fn owners(&self) -> &[NodeId] {
        &self.owners
    }

    pub fn owner(&self, partition: u32) -> Option<NodeId> {
        self.owners.get(partition as usize).copied()
    }

    /// The partition of a key (see [`crate::hash`]).
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        partition_for_key(key, self.partition_count)
    }

    /// How many partitions each ring node owns.
    pub fn partition_counts(&self) -> BTreeMap<NodeId, u32> {
        let mut counts: BTreeMap<NodeId, u32> =
            self.nodes.iter().map(|node| (node.id, 0)).collect();
        for owner in &self.owners {
            *counts.entry(*owner).or_insert(0) += 1;
        }
        counts
    }

    /// The partitions a node owns, ascending.
    pub fn partitions_of(&self, id: NodeId) -> Vec<u32> {
        (0..self.owners.len() as u32)
            .filter(|&p| self.owners[p as usize] == id)
            .collect()
    }

    /// The partitions whose owner differs between two rings of the same size.
    pub fn moved_partitions(&self, other: &Ring) -> Vec<u32> {
        assert_eq!(self.partition_count, other.partition_count);
        (0..self.partition_count)
            .filter(|&p| self.owner(p) != other.owner(p))
            .collect()
    }

    /// The preference list of `partition` for `replica_count` (N) replicas: walking the
    /// ring clockwise from the partition, the first N distinct nodes, preferring a node
    /// whose zone is not yet used while unused zones remain; then every other ring node
    /// as a fallback (clockwise, then nodes that own no partition). Never names a node
    /// twice; has `min(N, nodes)` replicas.
    pub fn preference_list(&self, partition: u32, replica_count: usize) -> PreferenceList {
        assert!(partition < self.partition_count, "partition out of range");
        let node_count = self.nodes.len();
        let mut seen = vec![false; node_count];
        let mut order: Vec<usize> = Vec::with_capacity(node_count);
        // Bounded by the partition count; stops as soon as every node is seen.
        for step in 0..self.owners.len() {
            if order.len() == node_count {
                break;
            }
            let p = (partition as usize + step) % self.owners.len();
            let index = self
                .node_index(self.owners[p])
                .expect("owners are ring nodes");
            if !seen[index] {
                seen[index] = true;
                order.push(index);
            }
        }
        // Nodes with too little weight to own a partition come last, in a fixed order.
        let mut unseen: Vec<usize> = (0..node_count).filter(|&index| !seen[index]).collect();
        unseen.sort_unstable_by_key(|&index| {
            (mix64(self.nodes[index].id.0 ^ u64::from(partition)), index)
        });
        order.extend(unseen);

        let replica_count = replica_count.min(node_count);
        let mut chosen = vec![false; node_count];
        let mut replicas: Vec<NodeId> = Vec::with_capacity(replica_count);
        let mut zones_used: Vec<&str> = Vec::new();
        // First pass: new zones only (an empty zone counts as one shared zone).
        for &index in &order {
            if replicas.len() == replica_count {
                break;
            }
            let zone = self.nodes[index].zone.as_str();
            if !zones_used.contains(&zone) {
                zones_used.push(zone);
                chosen[index] = true;
                replicas.push(self.nodes[index].id);
            }
        }
        // Second pass: fewer zones than replicas, so fill in ring order.
        for &index in &order {
            if replicas.len() == replica_count {
                break;
            }
            if !chosen[index] {
                chosen[index] = true;
                replicas.push(self.nodes[index].id);
            }
        }
        let fallbacks = order
            .iter()
            .filter(|&&index| !chosen[index])
            .map(|&index| self.nodes[index].id)
            .collect();
        PreferenceList {
            replicas,
            fallbacks,
        }
    }

    /// The preference list of every partition, indexed by partition.
    pub fn preference_lists(&self, replica_count: usize) -> Vec<PreferenceList> {
        (0..self.partition_count)
            .map(|p| self.preference_list(p, replica_count))
            .collect()
    }

    /// The shard that holds `partition` on node `id` (`partition mod shard_count`).
    pub fn shard_on(&self, id: NodeId, partition: u32) -> Option<u32> {
        self.node(id)
            .map(|node| shard_for_partition(partition, node.shard_count))
    }

    fn node_index(&self, id: NodeId) -> Option<usize> {
        self.nodes.binary_search_by(|node| node.id.cmp(&id)).ok()
    }
}

/// The shard of a partition on a node with `shard_count` shards.
pub fn shard_for_partition(partition: u32, shard_count: u32) -> u32 {
    assert!(shard_count > 0, "a node has at least one shard");
    partition % shard_count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership(zones: &[&str]) -> Membership {
        let mut membership = Membership::new(64).unwrap();
        for (index, zone) in zones.iter().enumerate() {
            membership
                .join(NodeId(index as u64), "addr", 1, zone, 4)
                .unwrap();
        }
        membership
    }

    #[test]
    fn empty_membership_gives_an_empty_ring() {
        let ring = Ring::from_membership(&Membership::new(8).unwrap());
        assert!(ring.owners().is_empty() && ring.nodes().is_empty());
        assert_eq!(ring.owner(0), None);
    }

    #[test]
    fn preference_list_spreads_zones_when_it_can() {
        let ring = Ring::from_membership(&membership(&["a", "a", "a", "b", "b", "c"]));
        for p in 0..64 {
            let list = ring.preference_list(p, 3);
            let mut zones: Vec<&str> = list
                .replicas
                .iter()
                .map(|id| ring.node(*id).unwrap().zone.as_str())
                .collect();
            zones.sort_unstable();
            assert_eq!(zones, ["a", "b", "c"], "partition {p}");
            assert_eq!(list.replicas.len() + list.fallbacks.len(), 6);
            assert_eq!(list.replicas[0], ring.owner(p).unwrap());
        }
    }

    #[test]
    fn leaving_node_owns_nothing_and_others_keep_their_partitions() {
        let mut state = membership(&["", "", "", ""]);
        let before = Ring::from_membership(&state);
        state.leave(NodeId(2)).unwrap();
        let after = Ring::from_membership(&state);
        assert!(after.partitions_of(NodeId(2)).is_empty());
        assert!(after.node(NodeId(2)).is_none());
        let moved = before.moved_partitions(&after);
        assert_eq!(moved, before.partitions_of(NodeId(2)));
    }

    #[test]
    fn shard_is_partition_mod_shard_count() {
        let ring = Ring::from_membership(&membership(&["", ""]));
        assert_eq!(ring.shard_on(NodeId(0), 13), Some(1));
        assert_eq!(ring.shard_on(NodeId(9), 13), None);
        assert_eq!(shard_for_partition(13, 8), 5);
    }
}

//! `ringkv ring`: the ring planner. Builds the ring of a hypothetical cluster with the
//! real claim of `ringkv-ring`, applies a join and/or a leave, and reports partitions per
//! node, the spread from each node's weighted share, and how many partitions move.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{bail, Context};
use ringkv_ring::{minimum_moves, ClaimNode, Member, Membership, NodeId, Ring, Status};

const USAGE: &str = "usage: ringkv ring --nodes S [options]

Plans a ring with the claim ringkv uses: partitions per node, the spread from each
node's weighted share, and how many partitions change owner for a join or leave.
Nodes are numbered 0..S-1; joined nodes get the next ids.

options:
  --partitions Q      partitions in the ring, a power of two (default 64)
  --nodes S           nodes in the cluster before the change (required, >= 1)
  --weights w1,w2,..  relative capacity per node (S values, or S+K with --join K;
                      default 1; joined nodes default to 1)
  --zones z1,z2,..    zone label per node (S or S+K values; with S values joined
                      nodes take the zones in turn)
  --replicas N        replicas per partition (default 3)
  --join K            add K nodes (at once)
  --leave ID          node ID leaves
  --json              print one JSON object instead of text
  --help              print this help
";

/// The parsed command line.
#[derive(Debug)]
struct Plan {
    partition_count: u32,
    node_count: u32,
    weights: Vec<u32>,
    zones: Vec<String>,
    replica_count: usize,
    join_count: u32,
    leave: Option<u64>,
    json: bool,
}

/// Largest node count the planner accepts (the membership limit).
const PLANNER_NODES_MAX: u32 = 4096;

pub fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let plan = match crate::parse_or_usage("ring", USAGE, args, parse) {
        Ok(plan) => plan,
        Err(code) => return Ok(code),
    };
    let report = evaluate(&plan)?;
    if plan.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

fn parse(args: &[String]) -> anyhow::Result<Plan> {
    let mut partition_count = 64u32;
    let mut node_count: Option<u32> = None;
    let mut weights: Option<Vec<u32>> = None;
    let mut zones: Option<Vec<String>> = None;
    let mut replica_count = 3usize;
    let mut join_count = 0u32;
    let mut leave: Option<u64> = None;
    let mut json = false;

    let mut rest = args.iter();
    // Bounded by the argument count: every iteration consumes at least one argument.
    while let Some(flag) = rest.next() {
        let mut value = |name: &str| {
            rest.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--partitions" => partition_count = number(&value("--partitions")?, "--partitions")?,
            "--nodes" => node_count = Some(number(&value("--nodes")?, "--nodes")?),
            "--weights" => {
                let list = value("--weights")?;
                let parsed: anyhow::Result<Vec<u32>> = list
                    .split(',')
                    .map(|weight| number(weight.trim(), "--weights"))
                    .collect();
                weights = Some(parsed?);
            }
            "--zones" => {
                let list = value("--zones")?;
                zones = Some(
                    list.split(',')
                        .map(|zone| zone.trim().to_string())
                        .collect(),
                );
            }
            "--replicas" => replica_count = number(&value("--replicas")?, "--replicas")?,
            "--join" => join_count = number(&value("--join")?, "--join")?,
            "--leave" => leave = Some(number(&value("--leave")?, "--leave")?),
            "--json" => json = true,
            other => bail!("unknown argument '{other}'"),
        }
    }

    let Some(node_count) = node_count else {
        bail!("--nodes is required");
    };
    if !ringkv_ring::hash::is_valid_partition_count(partition_count) {
        bail!(
            "--partitions must be a power of two up to {}",
            ringkv_ring::hash::PARTITION_COUNT_MAX
        );
    }
    if node_count == 0 || node_count.saturating_add(join_count) > PLANNER_NODES_MAX {
        bail!("--nodes must be at least 1 and nodes plus joins at most {PLANNER_NODES_MAX}");
    }
    if replica_count == 0 {
        bail!("--replicas must be at least 1");
    }
    let total = (node_count + join_count) as usize;
    let weights = match weights {
        None => vec![1; total],
        Some(list) if list.len() == node_count as usize || list.len() == total => {
            if list.contains(&0) {
                bail!("weights must be at least 1");
            }
            let mut list = list;
            list.resize(total, 1);
            list
        }
        Some(list) => bail!(
            "--weights has {} values; expected {node_count} (or {total} with the joins)",
            list.len()
        ),
    };
    let zones = match zones {
        None => vec![String::new(); total],
        Some(list) if list.len() == node_count as usize || list.len() == total => (0..total)
            .map(|index| list[index % list.len()].clone())
            .collect(),
        Some(list) => bail!(
            "--zones has {} values; expected {node_count} (or {total} with the joins)",
            list.len()
        ),
    };
    if let Some(id) = leave {
        if id >= u64::from(node_count) {
            bail!("--leave {id}: nodes are numbered 0..{}", node_count - 1);
        }
        if node_count + join_count < 2 {
            bail!("--leave would leave the cluster without nodes");
        }
    }
    Ok(Plan {
        partition_count,
        node_count,
        weights,
        zones,
        replica_count,
        join_count,
        leave,
        json,
    })
}

fn number<T: std::str::FromStr>(text: &str, flag: &str) -> anyhow::Result<T> {
    text.parse()
        .map_err(|_| anyhow::anyhow!("{flag}: '{text}' is not a valid number"))
}

/// One node's line of the report.
#[derive(Debug)]
struct NodeReport {
    id: u64,
    weight: u32,
    zone: String,
    /// Weighted share after the change (0 for a node that left).
    share: f64,
    partitions_before: Option<u32>,
    partitions_after: Option<u32>,
    /// Partitions whose N replicas include the node, after the change.
    replica_load: u32,
}

#[derive(Debug)]
struct Report {
    partition_count: u32,
    replica_count: usize,
    node_count_before: usize,
    node_count_after: usize,
    joined: Vec<u64>,
    left: Option<u64>,
    nodes: Vec<NodeReport>,
    moved: u32,
    moved_minimum: u32,
    /// Partitions whose replicas span fewer zones than possible (0 without zones).
    zone_shortfall: u32,
}

fn member(plan: &Plan, index: usize, joined_epoch: u64) -> Member {
    Member {
        id: NodeId(index as u64),
        addr: String::new(),
        status: Status::Valid,
        weight: plan.weights[index],
        zone: plan.zones[index].clone(),
        shard_count: 1,
        version: 1,
        joined_epoch,
        left_epoch: 0,
    }
}

fn evaluate(plan: &Plan) -> anyhow::Result<Report> {
    let mut before_state = Membership::new(plan.partition_count)?;
    for index in 0..plan.node_count as usize {
        before_state.merge_member(&member(plan, index, 1))?;
    }
    let before = Ring::from_membership(&before_state);

    // The change happens in one claim epoch, as one membership update would make it.
    let mut after_state = before_state.clone();
    let epoch = after_state.next_epoch();
    let total = (plan.node_count + plan.join_count) as usize;
    let joined: Vec<u64> = (plan.node_count as usize..total)
        .map(|index| index as u64)
        .collect();
    for index in plan.node_count as usize..total {
        after_state.merge_member(&member(plan, index, epoch))?;
    }
    if let Some(id) = plan.leave {
        let mut leaving = after_state
            .member(NodeId(id))
            .context("leaving node is a member")?
            .clone();
        leaving.status = Status::Leaving;
        leaving.left_epoch = epoch;
        leaving.version += 1;
        after_state.merge_member(&leaving)?;
    }
    let after = Ring::from_membership(&after_state);

    let previous: Vec<Option<NodeId>> = before.owners().iter().copied().map(Some).collect();
    let after_nodes: Vec<ClaimNode> = after
        .nodes()
        .iter()
        .map(|node| ClaimNode {
            id: node.id,
            weight: node.weight,
            zone: node.zone.clone(),
        })
        .collect();
    let moved_minimum = minimum_moves(&previous, &after_nodes);
    let moved = before.moved_partitions(&after).len() as u32;

    let counts_before = before.partition_counts();
    let counts_after = after.partition_counts();
    let weight_total_after: u64 = after
        .nodes()
        .iter()
        .map(|node| u64::from(node.weight))
        .sum();
    let mut replica_load: BTreeMap<NodeId, u32> = BTreeMap::new();
    let zone_count = {
        let mut zones: Vec<&str> = after
            .nodes()
            .iter()
            .map(|node| node.zone.as_str())
            .collect();
        zones.sort_unstable();
        zones.dedup();
        zones.len()
    };
    let mut zone_shortfall = 0u32;
    for list in after.preference_lists(plan.replica_count) {
        let mut zones: Vec<&str> = Vec::new();
        for id in &list.replicas {
            *replica_load.entry(*id).or_insert(0) += 1;
            let zone = after.node(*id).map_or("", |node| node.zone.as_str());
            if !zones.contains(&zone) {
                zones.push(zone);
            }
        }
        if zones.len() < list.replicas.len().min(zone_count) {
            zone_shortfall += 1;
        }
    }

    let nodes = (0..total)
        .map(|index| {
            let id = NodeId(index as u64);
            let partitions_after = counts_after.get(&id).copied();
            let share = if partitions_after.is_some() {
                f64::from(plan.partition_count) * f64::from(plan.weights[index])
                    / weight_total_after as f64
            } else {
                0.0
            };
            NodeReport {
                id: index as u64,
                weight: plan.weights[index],
                zone: plan.zones[index].clone(),
                share,
                partitions_before: counts_before.get(&id).copied(),
                partitions_after,
                replica_load: replica_load.get(&id).copied().unwrap_or(0),
            }
        })
        .collect();
    Ok(Report {
        partition_count: plan.partition_count,
        replica_count: plan.replica_count,
        node_count_before: before.nodes().len(),
        node_count_after: after.nodes().len(),
        joined,
        left: plan.leave,
        nodes,
        moved,
        moved_minimum,
        zone_shortfall,
    })
}

impl Report {
    /// (largest count above its share, largest count below its share) after the change.
    fn spread(&self) -> (f64, f64) {
        let deviations = self.nodes.iter().filter_map(|node| {
            node.partitions_after
                .map(|count| f64::from(count) - node.share)
        });
        deviations.fold((0.0f64, 0.0f64), |(above, below), deviation| {
            (above.max(deviation), below.max(-deviation))
        })
    }

    fn mean(&self) -> f64 {
        f64::from(self.partition_count) / self.node_count_after as f64
    }

    fn to_json(&self) -> serde_json::Value {
        let per_node =
            |pick: fn(&NodeReport) -> Option<u32>| -> serde_json::Map<String, serde_json::Value> {
                self.nodes
                    .iter()
                    .filter_map(|node| pick(node).map(|count| (node.id.to_string(), count.into())))
                    .collect()
            };
        let (above, below) = self.spread();
        serde_json::json!({
            "partitions": self.partition_count,
            "replicas": self.replica_count,
            "nodes_before": self.node_count_before,
            "nodes_after": self.node_count_after,
            "joined": self.joined,
            "left": self.left,
            "partitions_per_node": per_node(|node| node.partitions_after),
            "partitions_per_node_before": per_node(|node| node.partitions_before),
            "replica_load_per_node": self
                .nodes
                .iter()
                .filter(|node| node.partitions_after.is_some())
                .map(|node| (node.id.to_string(), serde_json::Value::from(node.replica_load)))
                .collect::<serde_json::Map<_, _>>(),
            "share_per_node": self
                .nodes
                .iter()
                .filter(|node| node.partitions_after.is_some())
                .map(|node| (node.id.to_string(), serde_json::Value::from(node.share)))
                .collect::<serde_json::Map<_, _>>(),
            "mean": self.mean(),
            "spread": { "max_above_share": above, "max_below_share": below },
            "moved": self.moved,
            "moved_minimum": self.moved_minimum,
            "zone_shortfall": self.zone_shortfall,
        })
    }

    fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut text = String::new();
        let _ = writeln!(
            text,
            "ring: {} partitions, {} replicas, {} nodes",
            self.partition_count, self.replica_count, self.node_count_before
        );
        if !self.joined.is_empty() || self.left.is_some() {
            let mut change = Vec::new();
            if !self.joined.is_empty() {
                let ids: Vec<String> = self.joined.iter().map(u64::to_string).collect();
                change.push(format!("join {} ({})", self.joined.len(), ids.join(",")));
            }
            if let Some(id) = self.left {
                change.push(format!("leave {id}"));
            }
            let _ = writeln!(
                text,
                "change: {} -> {} nodes",
                change.join(", "),
                self.node_count_after
            );
        }
        let _ = writeln!(
            text,
            "\n{:>6} {:>8} {:>6} {:>8} {:>7} {:>7} {:>8} {:>8}",
            "node", "zone", "weight", "share", "before", "after", "vs share", "replicas"
        );
        for node in &self.nodes {
            let show = |count: Option<u32>| count.map_or("-".to_string(), |c| c.to_string());
            let deviation = node.partitions_after.map_or("-".to_string(), |count| {
                format!("{:+.2}", f64::from(count) - node.share)
            });
            let zone = if node.zone.is_empty() {
                "-"
            } else {
                node.zone.as_str()
            };
            let _ = writeln!(
                text,
                "{:>6} {:>8} {:>6} {:>8.2} {:>7} {:>7} {:>8} {:>8}",
                node.id,
                zone,
                node.weight,
                node.share,
                show(node.partitions_before),
                show(node.partitions_after),
                deviation,
                node.replica_load
            );
        }
        let (above, below) = self.spread();
        let _ = writeln!(
            text,
            "\nmean {:.2} partitions per node; spread from the weighted share: +{:.2} / -{:.2}",
            self.mean(),
            above,
            below
        );
        let _ = writeln!(
            text,
            "moved: {} partitions ({:.1}% of the ring; minimum possible {})",
            self.moved,
            100.0 * f64::from(self.moved) / f64::from(self.partition_count),
            self.moved_minimum
        );
        if self.zone_shortfall > 0 {
            let _ = writeln!(
                text,
                "zones: {} partitions have replicas in fewer zones than available",
                self.zone_shortfall
            );
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn join_of_one_node_to_four_moves_a_fifth() {
        let plan = parse(&args("--partitions 64 --nodes 4 --join 1")).unwrap();
        let report = evaluate(&plan).unwrap();
        assert_eq!(report.moved, report.moved_minimum);
        assert!((12..=13).contains(&report.moved), "{}", report.moved);
    }

    #[test]
    fn bad_arguments_are_rejected() {
        for bad in [
            "--partitions 48 --nodes 4",
            "--nodes 0",
            "--nodes 3 --weights 1,2",
            "--nodes 3 --leave 3",
            "--nodes 3 --frobnicate",
            "--nodes",
            "--partitions 64",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad}");
        }
    }
}

//! The coordinator of client puts and gets: a pure state machine (design section 2,
//! rule 1). Inputs are `start_*`, `handle_*(now_ms, ..)` and `tick(now_ms)`; outputs
//! (replica requests, read repairs, silent peers, results) are drained with
//! [`Coordinator::poll_output`]. No I/O, no clock reads, no randomness.
//!
//! - put: the caller has already stored the new version locally (or not); the
//!   coordinator sends it to the remote targets and reports `PutDone` once `w`
//!   acknowledgements are in (the local one included), or `NotConfirmed` when the
//!   deadline passes or every target answered without reaching `w`.
//! - get: asks the remote targets, counts the local replica's versions as one reply,
//!   reports `GetDone` after `r` successful replies with the reconciled sibling set, and
//!   once every target answered (or the deadline passed) sends read repairs to every
//!   replier that lacks a version of the reconciled set of all replies.
//!
//! Every op reports exactly one `*Done`. Replies for unknown or finished ops, from
//! nodes that are not targets, and duplicates are ignored.

use std::collections::{BTreeMap, VecDeque};

use ringkv_ring::NodeId;

use crate::version::Version;

/// One version of a key with its value; `value: None` is a tombstone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionedValue {
    pub version: Version,
    pub value: Option<Vec<u8>>,
}

/// A replica to write: `node`, standing in for home node `hint_for` when it is a
/// sloppy-quorum fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub node: NodeId,
    pub hint_for: Option<NodeId>,
}

/// `preference`: the key's partition preference order (N home nodes first, then
/// fallbacks), distinct nodes. Each of the first `n` nodes that is reachable is a target
/// with `hint_for: None`; each unreachable home node is replaced by the next reachable
/// fallback (from position `n` on, each used once) with `hint_for: Some(home)`; if no
/// fallback is left it is skipped (fewer targets). Result in preference order of the
/// home slots.
pub fn choose_targets(
    preference: &[NodeId],
    n: usize,
    reachable: impl Fn(NodeId) -> bool,
) -> Vec<Target> {
    let homes = n.min(preference.len());
    let mut fallbacks = preference[homes..].iter().copied();
    let mut targets = Vec::with_capacity(homes);
    for &home in &preference[..homes] {
        if reachable(home) {
            targets.push(Target {
                node: home,
                hint_for: None,
            });
        } else if let Some(fallback) = fallbacks.by_ref().find(|&f| reachable(f)) {
            targets.push(Target {
                node: fallback,
                hint_for: Some(home),
            });
        }
    }
    targets
}

/// The home replicas (the first `n` of `preference`) that no target covers, neither
/// as itself nor through a fallback's hint: down, with no fallback left to stand in.
/// The coordinator holds the write, so it keeps a hint for each of them and hands the
/// key off when they are back (with N nodes and N replicas there are no fallbacks).
pub fn uncovered_homes(
    preference: &[NodeId],
    n: usize,
    targets: &[Target],
    local: NodeId,
) -> Vec<NodeId> {
    preference[..n.min(preference.len())]
        .iter()
        .copied()
        .filter(|&home| {
            home != local
                && !targets
                    .iter()
                    .any(|t| t.node == home || t.hint_for == Some(home))
        })
        .collect()
}

/// Identifies one coordinated operation within one [`Coordinator`].
pub type OpId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutResult {
    /// At least `w` replicas (the local one included) stored the version.
    Ok { acks: usize },
    /// Fewer than `w` acknowledged before the deadline: the write may or may not survive.
    NotConfirmed { acks: usize, w: usize },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GetResult {
    /// `replies` successful replies (at least `r`), reconciled into `versions`.
    Ok {
        versions: Vec<VersionedValue>,
        replies: usize,
    },
    /// Fewer than `r` successful replies before the deadline.
    Failed { replies: usize, r: usize },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordinatorOutput {
    /// Replica put: store `version` on `to` (`hint_for`: the home node it stands in
    /// for). Reply via [`Coordinator::handle_put_ack`].
    SendPut {
        op: OpId,
        to: NodeId,
        hint_for: Option<NodeId>,
        partition: u32,
        key: Vec<u8>,
        version: VersionedValue,
    },
    /// Replica get: read `key` on `to`. Reply via [`Coordinator::handle_get_reply`].
    SendGet {
        op: OpId,
        to: NodeId,
        partition: u32,
        key: Vec<u8>,
    },
    /// Read repair: `to` (may be the local node) lacks these versions; store each. No
    /// reply awaited.
    Repair {
        to: NodeId,
        partition: u32,
        key: Vec<u8>,
        versions: Vec<VersionedValue>,
    },
    /// A target did not answer before the op's deadline (feed the failure detector).
    Silent {
        node: NodeId,
    },
    PutDone {
        op: OpId,
        result: PutResult,
    },
    GetDone {
        op: OpId,
        result: GetResult,
    },
}

/// A remote target's state within one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Waiting,
    Answered,
}

#[derive(Debug)]
struct PutOp {
    deadline_ms: u64,
    targets: Vec<(NodeId, Answer)>,
    /// Fallbacks taken for targets that failed ([`Coordinator::claim_fallback`]).
    fallbacks_taken: Vec<NodeId>,
    acks: usize,
    w: usize,
    done: bool,
}

impl PutOp {
    /// Neither a target of this put nor a fallback already standing in for one of them.
    fn free_to_stand_in(&self, n: NodeId) -> bool {
        !self.targets.iter().any(|(t, _)| *t == n) && !self.fallbacks_taken.contains(&n)
    }
}

#[derive(Debug)]
struct GetOp {
    deadline_ms: u64,
    partition: u32,
    key: Vec<u8>,
    targets: Vec<(NodeId, Answer)>,
    /// Successful replies in arrival order (the local replica first when it is one).
    replies: Vec<(NodeId, Vec<VersionedValue>)>,
    r: usize,
    done: bool,
}

/// Marks the first still-waiting entry of `from`; false for strangers and duplicates.
fn mark_answered(targets: &mut [(NodeId, Answer)], from: NodeId) -> bool {
    match targets
        .iter_mut()
        .find(|(node, answer)| *node == from && *answer == Answer::Waiting)
    {
        Some(entry) => {
            entry.1 = Answer::Answered;
            true
        }
        None => false,
    }
}

fn all_answered(targets: &[(NodeId, Answer)]) -> bool {
    targets.iter().all(|(_, a)| *a == Answer::Answered)
}

/// The coordinator of one node (or one shard of it).
#[derive(Debug)]
pub struct Coordinator {
    local: NodeId,
    next_op: OpId,
    puts: BTreeMap<OpId, PutOp>,
    gets: BTreeMap<OpId, GetOp>,
    outputs: VecDeque<CoordinatorOutput>,
}

impl Coordinator {
    pub fn new(local: NodeId) -> Self {
        Self::with_first_op_id(local, 1)
    }

    /// Like [`new`](Self::new), with op ids counting from `first`. A restarted node
    /// should not reuse the op ids of its previous incarnation (a late reply to an old
    /// op would count for a new one): derive `first` from something that moves on with
    /// every start, such as the start time in ms shifted left by 20 bits.
    pub fn with_first_op_id(local: NodeId, first: OpId) -> Self {
        Self {
            local,
            next_op: first,
            puts: BTreeMap::new(),
            gets: BTreeMap::new(),
            outputs: VecDeque::new(),
        }
    }

    pub fn local(&self) -> NodeId {
        self.local
    }

    fn new_op(&mut self) -> OpId {
        let op = self.next_op;
        self.next_op = self.next_op.wrapping_add(1);
        op
    }

    /// The local node already stored `version` (`local_acks` = 1, or 0 if it did not);
    /// sends it to `remote`. `PutDone` Ok as soon as acks >= `w` (possibly immediately,
    /// inside this call's outputs); `NotConfirmed` when the deadline (`now_ms +
    /// timeout_ms`) passes or every target answered with acks < `w`. Exactly one
    /// `PutDone` per op.
    #[allow(clippy::too_many_arguments)]
    pub fn start_put(
        &mut self,
        now_ms: u64,
        partition: u32,
        key: Vec<u8>,
        version: VersionedValue,
        remote: &[Target],
        local_acks: usize,
        w: usize,
        timeout_ms: u64,
    ) -> OpId {
        let op = self.new_op();
        for target in remote {
            self.outputs.push_back(CoordinatorOutput::SendPut {
                op,
                to: target.node,
                hint_for: target.hint_for,
                partition,
                key: key.clone(),
                version: version.clone(),
            });
        }
        let put = PutOp {
            deadline_ms: now_ms.saturating_add(timeout_ms),
            targets: remote.iter().map(|t| (t.node, Answer::Waiting)).collect(),
            fallbacks_taken: Vec::new(),
            acks: local_acks,
            w,
            done: false,
        };
        self.puts.insert(op, put);
        self.advance_put(now_ms, op);
        op
    }

    /// The send of put `op` to `failed` failed: picks the node to send it to instead,
    /// with a hint naming the home node (sloppy quorum). `candidates` are the
    /// partition's fallbacks that look reachable, in preference order. The pick is the
    /// first that is neither this node, nor a target of the op, nor a fallback already
    /// taken for another of its targets: its ack is reported for `failed`
    /// ([`handle_put_ack`](Self::handle_put_ack)), so one node must never stand for two
    /// targets, or W acks could come from fewer than W nodes. For an op that is over
    /// (every target answered, or the deadline passed) the first candidate other than
    /// `failed` and this node: its ack no longer counts.
    pub fn claim_fallback(
        &mut self,
        op: OpId,
        failed: NodeId,
        candidates: impl IntoIterator<Item = NodeId>,
    ) -> Option<NodeId> {
        let local = self.local;
        let mut candidates = candidates
            .into_iter()
            .filter(move |&n| n != failed && n != local);
        let Some(put) = self.puts.get_mut(&op) else {
            return candidates.next();
        };
        let chosen = candidates.find(|&n| put.free_to_stand_in(n))?;
        put.fallbacks_taken.push(chosen);
        Some(chosen)
    }

    /// Whether [`claim_fallback`](Self::claim_fallback) would find a fallback for
    /// `failed` among `candidates` now (nothing is claimed).
    pub fn has_fallback(
        &self,
        op: OpId,
        failed: NodeId,
        candidates: impl IntoIterator<Item = NodeId>,
    ) -> bool {
        let Some(put) = self.puts.get(&op) else {
            return false;
        };
        candidates
            .into_iter()
            .any(|n| n != failed && n != self.local && put.free_to_stand_in(n))
    }

    /// A replica answered a put: `ok` if it stored (or already held) the version.
    pub fn handle_put_ack(&mut self, now_ms: u64, op: OpId, from: NodeId, ok: bool) {
        let Some(put) = self.puts.get_mut(&op) else {
            return;
        };
        if !mark_answered(&mut put.targets, from) {
            return;
        }
        if ok {
            put.acks += 1;
        }
        self.advance_put(now_ms, op);
    }

    /// Reports and retires the put `op` as far as its state allows.
    fn advance_put(&mut self, now_ms: u64, op: OpId) {
        let Some(put) = self.puts.get_mut(&op) else {
            return;
        };
        if !put.done && put.acks >= put.w {
            put.done = true;
            self.outputs.push_back(CoordinatorOutput::PutDone {
                op,
                result: PutResult::Ok { acks: put.acks },
            });
        }
        let expired = now_ms >= put.deadline_ms;
        if !expired && !all_answered(&put.targets) {
            return;
        }
        for (node, answer) in &put.targets {
            if *answer == Answer::Waiting {
                self.outputs
                    .push_back(CoordinatorOutput::Silent { node: *node });
            }
        }
        if !put.done {
            self.outputs.push_back(CoordinatorOutput::PutDone {
                op,
                result: PutResult::NotConfirmed {
                    acks: put.acks,
                    w: put.w,
                },
            });
        }
        self.puts.remove(&op);
    }

    /// `local`: `Some(the local replica's versions)` when the coordinator is itself a
    /// replica (counts as one reply). `GetDone` Ok after `r` successful replies, with
    /// the reconciled set (union of replies, duplicates removed, every version
    /// dominated by another dropped); Failed at the deadline with fewer. After all
    /// targets answered (or the deadline), emits `Repair` for each replier (local
    /// included) missing a version of the final reconciled set of ALL replies. Exactly
    /// one `GetDone` per op. Late/duplicate replies are ignored.
    #[allow(clippy::too_many_arguments)]
    pub fn start_get(
        &mut self,
        now_ms: u64,
        partition: u32,
        key: Vec<u8>,
        remote: &[NodeId],
        local: Option<Vec<VersionedValue>>,
        r: usize,
        timeout_ms: u64,
    ) -> OpId {
        let op = self.new_op();
        for &to in remote {
            self.outputs.push_back(CoordinatorOutput::SendGet {
                op,
                to,
                partition,
                key: key.clone(),
            });
        }
        let mut replies = Vec::new();
        if let Some(versions) = local {
            replies.push((self.local, versions));
        }
        let get = GetOp {
            deadline_ms: now_ms.saturating_add(timeout_ms),
            partition,
            key,
            targets: remote.iter().map(|&n| (n, Answer::Waiting)).collect(),
            replies,
            r,
            done: false,
        };
        self.gets.insert(op, get);
        self.advance_get(now_ms, op);
        op
    }

    /// A replica answered a get; `reply: None` is an error reply.
    pub fn handle_get_reply(
        &mut self,
        now_ms: u64,
        op: OpId,
        from: NodeId,
        reply: Option<Vec<VersionedValue>>,
    ) {
        let Some(get) = self.gets.get_mut(&op) else {
            return;
        };
        if !mark_answered(&mut get.targets, from) {
            return;
        }
        if let Some(versions) = reply {
            get.replies.push((from, versions));
        }
        self.advance_get(now_ms, op);
    }

    fn advance_get(&mut self, now_ms: u64, op: OpId) {
        let Some(get) = self.gets.get_mut(&op) else {
            return;
        };
        if !get.done && get.replies.len() >= get.r {
            get.done = true;
            let sets: Vec<&[VersionedValue]> =
                get.replies.iter().map(|(_, v)| v.as_slice()).collect();
            self.outputs.push_back(CoordinatorOutput::GetDone {
                op,
                result: GetResult::Ok {
                    versions: reconcile_replies(&sets),
                    replies: get.replies.len(),
                },
            });
        }
        let expired = now_ms >= get.deadline_ms;
        if !expired && !all_answered(&get.targets) {
            return;
        }
        let Some(get) = self.gets.remove(&op) else {
            return;
        };
        for (node, answer) in &get.targets {
            if *answer == Answer::Waiting {
                self.outputs
                    .push_back(CoordinatorOutput::Silent { node: *node });
            }
        }
        if !get.done {
            self.outputs.push_back(CoordinatorOutput::GetDone {
                op,
                result: GetResult::Failed {
                    replies: get.replies.len(),
                    r: get.r,
                },
            });
        }
        let sets: Vec<&[VersionedValue]> = get.replies.iter().map(|(_, v)| v.as_slice()).collect();
        let reconciled = reconcile_replies(&sets);
        for (node, held) in &get.replies {
            let missing: Vec<VersionedValue> = reconciled
                .iter()
                .filter(|v| !held.iter().any(|h| h.version == v.version))
                .cloned()
                .collect();
            if !missing.is_empty() {
                self.outputs.push_back(CoordinatorOutput::Repair {
                    to: *node,
                    partition: get.partition,
                    key: get.key.clone(),
                    versions: missing,
                });
            }
        }
    }

    /// Retires every op whose deadline passed.
    pub fn tick(&mut self, now_ms: u64) {
        let puts: Vec<OpId> = self
            .puts
            .iter()
            .filter(|(_, p)| now_ms >= p.deadline_ms)
            .map(|(op, _)| *op)
            .collect();
        for op in puts {
            self.advance_put(now_ms, op);
        }
        let gets: Vec<OpId> = self
            .gets
            .iter()
            .filter(|(_, g)| now_ms >= g.deadline_ms)
            .map(|(op, _)| *op)
            .collect();
        for op in gets {
            self.advance_get(now_ms, op);
        }
    }

    /// The next output, oldest first.
    pub fn poll_output(&mut self) -> Option<CoordinatorOutput> {
        self.outputs.pop_front()
    }

    /// Ops not yet retired (a finished op stays until every target answered or its
    /// deadline passed, to report silent targets and send read repairs).
    pub fn in_flight(&self) -> usize {
        self.puts.len() + self.gets.len()
    }
}

/// Union minus duplicates minus dominated versions, in a deterministic order (by dot,
/// then timestamp). Of two entries with the same version the first is kept.
pub fn reconcile_replies<S: AsRef<[VersionedValue]>>(sets: &[S]) -> Vec<VersionedValue> {
    // borrowed until the end: only the versions kept are copied (values can be large)
    let mut union: Vec<&VersionedValue> = Vec::new();
    for set in sets {
        for v in set.as_ref() {
            if !union.iter().any(|u| u.version == v.version) {
                union.push(v);
            }
        }
    }
    let mut kept: Vec<VersionedValue> = union
        .iter()
        .filter(|v| {
            !union
                .iter()
                .any(|u| u.version != v.version && u.version.descends(&v.version))
        })
        .map(|v| (*v).clone())
        .collect();
    kept.sort_by(|a, b| {
        (a.version.dot, a.version.timestamp_ms)
            .cmp(&(b.version.dot, b.version.timestamp_ms))
            .then_with(|| a.version.encode_to_vec().cmp(&b.version.encode_to_vec()))
    });
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{ActorId, Dot, VClock};

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const C: NodeId = NodeId(3);
    const D: NodeId = NodeId(4);
    const E: NodeId = NodeId(5);

    fn version(node: u64, counter: u64, past: &[(u64, u64)]) -> Version {
        let mut clock = VClock::new();
        for &(n, c) in past {
            clock.raise(ActorId::new(n, 0), c, 0);
        }
        Version {
            dot: Dot::new(ActorId::new(node, 0), counter),
            timestamp_ms: counter,
            past: clock,
        }
    }

    fn vv(node: u64, counter: u64, past: &[(u64, u64)], value: &str) -> VersionedValue {
        VersionedValue {
            version: version(node, counter, past),
            value: Some(value.as_bytes().to_vec()),
        }
    }

    fn drain(c: &mut Coordinator) -> Vec<CoordinatorOutput> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }

    fn dones(outputs: &[CoordinatorOutput]) -> Vec<CoordinatorOutput> {
        outputs
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    CoordinatorOutput::PutDone { .. } | CoordinatorOutput::GetDone { .. }
                )
            })
            .cloned()
            .collect()
    }

    fn home(node: NodeId) -> Target {
        Target {
            node,
            hint_for: None,
        }
    }

    #[test]
    fn uncovered_homes_are_the_down_homes_without_a_fallback() {
        let pref: Vec<NodeId> = [1, 2, 3].map(NodeId).to_vec();
        let targets = choose_targets(&pref, 3, |n| n != NodeId(3));
        assert_eq!(targets.len(), 2);
        assert_eq!(
            uncovered_homes(&pref, 3, &targets, NodeId(1)),
            vec![NodeId(3)]
        );
        // a fallback covers a down home: nothing uncovered
        let pref: Vec<NodeId> = [1, 2, 3, 4].map(NodeId).to_vec();
        let targets = choose_targets(&pref, 3, |n| n != NodeId(2));
        assert!(uncovered_homes(&pref, 3, &targets, NodeId(1)).is_empty());
        // the local node is never its own hint target
        let targets = choose_targets(&pref[..3], 3, |n| n == NodeId(2));
        assert_eq!(
            uncovered_homes(&pref[..3], 3, &targets, NodeId(1)),
            vec![NodeId(3)]
        );
    }

    #[test]
    fn choose_targets_all_reachable_takes_the_home_nodes() {
        let t = choose_targets(&[A, B, C, D, E], 3, |_| true);
        assert_eq!(t, vec![home(A), home(B), home(C)]);
    }

    #[test]
    fn choose_targets_replaces_unreachable_homes_by_fallbacks_in_order() {
        let t = choose_targets(&[A, B, C, D, E], 3, |n| n != A && n != C);
        assert_eq!(
            t,
            vec![
                Target {
                    node: D,
                    hint_for: Some(A)
                },
                home(B),
                Target {
                    node: E,
                    hint_for: Some(C)
                },
            ]
        );
    }

    #[test]
    fn choose_targets_skips_unreachable_fallbacks_and_runs_out() {
        // D is unreachable, E stands in for A, nothing is left for C
        let t = choose_targets(&[A, B, C, D, E], 3, |n| n == B || n == E);
        assert_eq!(
            t,
            vec![
                Target {
                    node: E,
                    hint_for: Some(A)
                },
                home(B)
            ]
        );
        assert!(choose_targets(&[A, B], 3, |_| false).is_empty());
        assert_eq!(choose_targets(&[A, B], 3, |_| true), vec![home(A), home(B)]);
    }

    #[test]
    fn put_done_at_w_acks_and_exactly_once() {
        let mut c = Coordinator::new(A);
        let v = vv(1, 1, &[], "x");
        let op = c.start_put(
            0,
            7,
            b"k".to_vec(),
            v.clone(),
            &[home(B), home(C)],
            1,
            2,
            100,
        );
        let out = drain(&mut c);
        assert_eq!(out.len(), 2);
        assert!(
            matches!(&out[0], CoordinatorOutput::SendPut { to, partition: 7, version, .. } if *to == B && *version == v)
        );
        c.handle_put_ack(5, op, B, true);
        assert_eq!(
            drain(&mut c),
            vec![CoordinatorOutput::PutDone {
                op,
                result: PutResult::Ok { acks: 2 }
            }]
        );
        assert_eq!(c.in_flight(), 1, "waits for C until the deadline");
        c.handle_put_ack(6, op, B, true); // duplicate
        c.handle_put_ack(6, op, D, true); // stranger
        assert!(drain(&mut c).is_empty());
        c.handle_put_ack(7, op, C, true);
        assert!(drain(&mut c).is_empty(), "no second PutDone");
        assert_eq!(c.in_flight(), 0);
        c.handle_put_ack(8, op, C, true); // late
        c.tick(1000);
        assert!(drain(&mut c).is_empty());
    }

    #[test]
    fn a_fallback_never_stands_for_two_targets_of_one_put() {
        // N = W = 3 from A: C is down, so D stands in for it from the start; then the
        // send to B fails. D must not be taken again (its two acks would make W = 3
        // with two nodes holding the write): E is, and once E is taken too, nothing.
        let mut c = Coordinator::new(A);
        let v = vv(1, 1, &[], "x");
        let d_for_c = Target {
            node: D,
            hint_for: Some(C),
        };
        let op = c.start_put(0, 7, b"k".to_vec(), v, &[home(B), d_for_c], 1, 3, 100);
        drain(&mut c);
        // has_fallback agrees with claim_fallback and claims nothing
        assert!(
            !c.has_fallback(op, B, [A, B, D]),
            "only taken or excluded nodes"
        );
        assert!(c.has_fallback(op, B, [A, B, D, E]));
        assert!(c.has_fallback(op, B, [A, B, D, E]));
        assert_eq!(c.claim_fallback(op, B, [A, B, D, E]), Some(E));
        assert!(!c.has_fallback(op, B, [A, B, D, E]), "E is taken now");
        c.handle_put_ack(1, op, D, true);
        c.handle_put_ack(2, op, B, true); // E's ack, reported for B
        assert_eq!(
            dones(&drain(&mut c)),
            vec![CoordinatorOutput::PutDone {
                op,
                result: PutResult::Ok { acks: 3 }
            }]
        );
        // another op: B and C both fail and only D is left to stand in
        let op = c.start_put(
            10,
            7,
            b"k".to_vec(),
            vv(1, 2, &[], "y"),
            &[home(B), home(C)],
            1,
            3,
            100,
        );
        drain(&mut c);
        assert_eq!(c.claim_fallback(op, B, [D]), Some(D));
        assert_eq!(c.claim_fallback(op, C, [D]), None, "D stands for B already");
        c.handle_put_ack(11, op, B, true);
        c.handle_put_ack(11, op, C, false);
        assert_eq!(
            dones(&drain(&mut c)),
            vec![CoordinatorOutput::PutDone {
                op,
                result: PutResult::NotConfirmed { acks: 2, w: 3 }
            }]
        );
        // an op that is over: the first candidate, which no longer counts
        assert_eq!(c.claim_fallback(op, C, [A, C, D]), Some(D));
    }

    #[test]
    fn put_done_immediately_when_local_ack_is_enough() {
        let mut c = Coordinator::new(A);
        let op = c.start_put(
            0,
            0,
            b"k".to_vec(),
            vv(1, 1, &[], "x"),
            &[home(B)],
            1,
            1,
            100,
        );
        let out = drain(&mut c);
        assert_eq!(
            dones(&out),
            vec![CoordinatorOutput::PutDone {
                op,
                result: PutResult::Ok { acks: 1 }
            }]
        );
        let op = c.start_put(0, 0, b"k".to_vec(), vv(1, 2, &[], "x"), &[], 1, 1, 100);
        assert_eq!(
            drain(&mut c),
            vec![CoordinatorOutput::PutDone {
                op,
                result: PutResult::Ok { acks: 1 }
            }]
        );
        assert_eq!(c.in_flight(), 1, "the first op still waits for B");
    }

    #[test]
    fn put_not_confirmed_at_deadline_reports_silent_targets() {
        let mut c = Coordinator::new(A);
        let op = c.start_put(
            10,
            0,
            b"k".to_vec(),
            vv(1, 1, &[], "x"),
            &[home(B), home(C)],
            1,
            3,
            100,
        );
        drain(&mut c);
        c.handle_put_ack(20, op, B, true);
        c.tick(109);
        assert!(drain(&mut c).is_empty(), "deadline not reached");
        c.tick(110);
        assert_eq!(
            drain(&mut c),
            vec![
                CoordinatorOutput::Silent { node: C },
                CoordinatorOutput::PutDone {
                    op,
                    result: PutResult::NotConfirmed { acks: 2, w: 3 }
                }
            ]
        );
        c.handle_put_ack(120, op, C, true);
        c.tick(200);
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn put_not_confirmed_when_everyone_answered_short_of_w() {
        let mut c = Coordinator::new(A);
        let op = c.start_put(
            0,
            0,
            b"k".to_vec(),
            vv(1, 1, &[], "x"),
            &[home(B), home(C)],
            0,
            2,
            100,
        );
        drain(&mut c);
        c.handle_put_ack(1, op, B, false);
        assert!(drain(&mut c).is_empty());
        c.handle_put_ack(2, op, C, true);
        assert_eq!(
            drain(&mut c),
            vec![CoordinatorOutput::PutDone {
                op,
                result: PutResult::NotConfirmed { acks: 1, w: 2 }
            }]
        );
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn op_ids_are_distinct_and_start_where_asked() {
        let mut c = Coordinator::with_first_op_id(A, 1 << 40);
        let a = c.start_get(0, 0, b"k".to_vec(), &[B], None, 1, 10);
        let b = c.start_put(
            0,
            0,
            b"k".to_vec(),
            vv(1, 1, &[], "x"),
            &[home(B)],
            1,
            2,
            10,
        );
        assert_eq!(a, 1 << 40);
        assert_ne!(a, b);
    }

    #[test]
    fn get_done_after_r_replies_with_reconciled_set() {
        let mut c = Coordinator::new(A);
        let old = vv(2, 1, &[], "old");
        let new = vv(3, 1, &[(2, 1)], "new");
        let op = c.start_get(
            0,
            4,
            b"k".to_vec(),
            &[B, C],
            Some(vec![old.clone()]),
            2,
            100,
        );
        let out = drain(&mut c);
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[1], CoordinatorOutput::SendGet { to, partition: 4, .. } if *to == C));
        c.handle_get_reply(1, op, C, Some(vec![new.clone()]));
        assert_eq!(
            drain(&mut c),
            vec![CoordinatorOutput::GetDone {
                op,
                result: GetResult::Ok {
                    versions: vec![new.clone()],
                    replies: 2
                }
            }]
        );
        // B answers with the old version: the repair goes out now, to A and B
        c.handle_get_reply(2, op, B, Some(vec![old.clone()]));
        let out = drain(&mut c);
        assert_eq!(
            out,
            vec![
                CoordinatorOutput::Repair {
                    to: A,
                    partition: 4,
                    key: b"k".to_vec(),
                    versions: vec![new.clone()]
                },
                CoordinatorOutput::Repair {
                    to: B,
                    partition: 4,
                    key: b"k".to_vec(),
                    versions: vec![new.clone()]
                },
            ]
        );
        assert_eq!(c.in_flight(), 0);
        c.handle_get_reply(3, op, B, Some(vec![]));
        c.tick(500);
        assert!(drain(&mut c).is_empty());
    }

    #[test]
    fn get_failed_at_deadline_then_repairs_what_it_has() {
        let mut c = Coordinator::new(A);
        let x = vv(2, 1, &[], "x");
        let op = c.start_get(0, 1, b"k".to_vec(), &[B, C], Some(vec![]), 3, 50);
        drain(&mut c);
        c.handle_get_reply(1, op, B, Some(vec![x.clone()]));
        c.handle_get_reply(1, op, B, Some(vec![])); // duplicate ignored
        assert!(drain(&mut c).is_empty());
        c.tick(50);
        assert_eq!(
            drain(&mut c),
            vec![
                CoordinatorOutput::Silent { node: C },
                CoordinatorOutput::GetDone {
                    op,
                    result: GetResult::Failed { replies: 2, r: 3 }
                },
                CoordinatorOutput::Repair {
                    to: A,
                    partition: 1,
                    key: b"k".to_vec(),
                    versions: vec![x]
                },
            ]
        );
    }

    #[test]
    fn get_error_replies_do_not_count_and_get_no_repair() {
        let mut c = Coordinator::new(A);
        let x = vv(2, 1, &[], "x");
        let op = c.start_get(0, 1, b"k".to_vec(), &[B, C], None, 2, 50);
        drain(&mut c);
        c.handle_get_reply(1, op, B, None);
        c.handle_get_reply(2, op, C, Some(vec![x]));
        assert_eq!(
            drain(&mut c),
            vec![CoordinatorOutput::GetDone {
                op,
                result: GetResult::Failed { replies: 1, r: 2 }
            }]
        );
    }

    #[test]
    fn get_with_enough_local_replies_is_done_at_once() {
        let mut c = Coordinator::new(A);
        let x = vv(1, 1, &[], "x");
        let op = c.start_get(0, 1, b"k".to_vec(), &[], Some(vec![x.clone()]), 1, 50);
        assert_eq!(
            drain(&mut c),
            vec![CoordinatorOutput::GetDone {
                op,
                result: GetResult::Ok {
                    versions: vec![x],
                    replies: 1
                }
            }]
        );
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn reconcile_keeps_concurrent_drops_dominated_and_duplicates() {
        let a = vv(1, 1, &[], "a");
        let b = vv(2, 1, &[], "b");
        let c = vv(3, 1, &[(1, 1)], "c"); // saw a
        let got = reconcile_replies(&[
            vec![a.clone(), b.clone()],
            vec![b.clone(), c.clone()],
            vec![],
        ]);
        assert_eq!(got, vec![b.clone(), c.clone()]);
        let tomb = VersionedValue {
            version: version(4, 1, &[(2, 1), (3, 1), (1, 1)]),
            value: None,
        };
        assert_eq!(
            reconcile_replies(&[vec![a, b, c], vec![tomb.clone()]]),
            vec![tomb]
        );
        assert!(reconcile_replies::<Vec<VersionedValue>>(&[]).is_empty());
    }

    #[test]
    fn reconcile_order_does_not_depend_on_reply_order() {
        let x = vv(1, 1, &[], "x");
        let y = vv(2, 1, &[], "y");
        let z = vv(3, 2, &[(3, 1)], "z");
        let one = reconcile_replies(&[vec![x.clone()], vec![y.clone(), z.clone()]]);
        let two = reconcile_replies(&[vec![z, y], vec![x]]);
        assert_eq!(one, two);
        assert_eq!(one.len(), 3);
    }
}

//! Replication scenarios for the versioning rules, with replicas simulated as plain vectors
//! of (version, value) siblings: the Dynamo paper's Figure 3, sibling explosion, kv679,
//! doomstones, and concurrent writes during a partition.

use std::collections::BTreeSet;

use ringkv_engine::version::*;

/// A stored sibling: a version and its value (`None` is a tombstone).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Write {
    version: Version,
    value: Option<String>,
}

/// One replica of one key.
#[derive(Clone, Debug)]
struct Replica {
    actor: ActorId,
    siblings: Vec<Write>,
}

impl Replica {
    fn new(node: u64, epoch: u32) -> Self {
        Self {
            actor: ActorId::new(node, epoch),
            siblings: Vec::new(),
        }
    }

    fn versions(&self) -> Vec<Version> {
        self.siblings.iter().map(|w| w.version.clone()).collect()
    }

    /// Coordinates a put (`Some`) or delete (`None`) with a client context as bytes, the way
    /// it arrives over the wire.
    fn coordinate(
        &mut self,
        context: &[u8],
        value: Option<&str>,
        now_ms: u64,
    ) -> Result<Write, CoordinateError> {
        let context = Context::decode(context).expect("context issued by the server");
        let c = coordinate(
            self.actor,
            now_ms,
            &context,
            &self.versions(),
            CLOCK_ENTRIES_MAX,
        )?;
        remove_indices(&mut self.siblings, &c.replaced);
        let write = Write {
            version: c.version,
            value: value.map(str::to_owned),
        };
        self.siblings.push(write.clone());
        Ok(write)
    }

    fn put(&mut self, context: &[u8], value: Option<&str>, now_ms: u64) -> Write {
        self.coordinate(context, value, now_ms).expect("coordinate")
    }

    /// Receives a replicated version (replication, hint, read repair, anti-entropy).
    fn receive(&mut self, write: &Write) -> Reconcile {
        let verdict = reconcile(&write.version, &self.versions());
        if let Reconcile::Apply { replaced } = &verdict {
            remove_indices(&mut self.siblings, replaced);
            self.siblings.push(write.clone());
        }
        verdict
    }

    /// Sends every sibling to `other`.
    fn push_to(&self, other: &mut Replica) {
        for w in &self.siblings {
            other.receive(w);
        }
    }

    fn values(&self) -> BTreeSet<Option<String>> {
        self.siblings.iter().map(|w| w.value.clone()).collect()
    }

    fn holds(&self, write: &Write) -> bool {
        self.siblings.contains(write)
    }
}

/// What a client gets from a read of `replicas`: the union of their siblings minus those
/// another one has seen, and the encoded context.
fn read(replicas: &[&Replica]) -> (Vec<Write>, Vec<u8>) {
    let mut union: Vec<Write> = Vec::new();
    for r in replicas {
        for w in &r.siblings {
            let mut versions: Vec<Version> = union.iter().map(|u| u.version.clone()).collect();
            if apply_to(&mut versions, w.version.clone()).is_ok() {
                union.retain(|u| versions.contains(&u.version));
                union.push(w.clone());
            }
        }
    }
    let versions: Vec<Version> = union.iter().map(|w| w.version.clone()).collect();
    let context = Context::encode(&context_of(&versions)).bytes;
    (union, context)
}

fn empty_context() -> Vec<u8> {
    Context::encode(&VClock::new()).bytes
}

fn counters(clock: &VClock) -> Vec<(ActorId, u64)> {
    clock
        .entries()
        .iter()
        .map(|e| (e.actor, e.counter))
        .collect()
}

fn is_stale(r: &Reconcile) -> bool {
    matches!(r, Reconcile::Stale(_))
}

/// Dynamo paper, Figure 3: D1..D5 handled by Sx, Sy, Sz end with the sibling sets and clocks
/// the paper shows.
#[test]
fn dynamo_figure_3() {
    let (mut sx, mut sy, mut sz) = (Replica::new(1, 1), Replica::new(2, 1), Replica::new(3, 1));
    let (x, y, z) = (sx.actor, sy.actor, sz.actor);

    // D1 ([Sx,1]) then D2 ([Sx,2]), both by Sx, replicated everywhere: D2 replaces D1.
    let d1 = sx.put(&empty_context(), Some("D1"), 1);
    sy.receive(&d1);
    sz.receive(&d1);
    let (_, ctx) = read(&[&sx]);
    let d2 = sx.put(&ctx, Some("D2"), 2);
    assert_eq!(counters(&d2.version.clock()), vec![(x, 2)]);
    for r in [&mut sy, &mut sz] {
        assert_eq!(r.receive(&d2), Reconcile::Apply { replaced: vec![0] });
    }
    for r in [&sx, &sy, &sz] {
        assert_eq!(r.siblings, vec![d2.clone()]);
    }

    // D3 ([Sx,2],[Sy,1]) through Sy; another client that read D2 writes D4 ([Sx,2],[Sz,1])
    // through Sz before D3 reached it.
    let (_, ctx_d2) = read(&[&sx]);
    let d3 = sy.put(&ctx_d2, Some("D3"), 3);
    let d4 = sz.put(&ctx_d2, Some("D4"), 4);
    assert_eq!(counters(&d3.version.clock()), vec![(x, 2), (y, 1)]);
    assert_eq!(counters(&d4.version.clock()), vec![(x, 2), (z, 1)]);
    assert!(!d3.version.descends(&d4.version) && !d4.version.descends(&d3.version));
    assert!(d3.version.clock().concurrent(&d4.version.clock()));

    // A node aware of D2 that receives D3 and D4 keeps both (in either order).
    assert_eq!(sx.receive(&d4), Reconcile::Apply { replaced: vec![0] });
    assert_eq!(sx.receive(&d3), Reconcile::Apply { replaced: vec![] });
    sy.receive(&d4);
    sz.receive(&d3);
    for r in [&sx, &sy, &sz] {
        assert_eq!(
            r.values(),
            BTreeSet::from([Some("D3".into()), Some("D4".into())])
        );
    }

    // A client reads both, reconciles, and Sx writes D5 ([Sx,3],[Sy,1],[Sz,1]).
    let (siblings, ctx) = read(&[&sx, &sy]);
    assert_eq!(siblings.len(), 2);
    let d5 = sx.put(&ctx, Some("D5"), 5);
    assert_eq!(counters(&d5.version.clock()), vec![(x, 3), (y, 1), (z, 1)]);
    assert_eq!(
        sy.receive(&d5),
        Reconcile::Apply {
            replaced: vec![0, 1]
        }
    );
    // Sz still holds D3 and D4 and gets D5 late, after old versions arrive again.
    for old in [&d1, &d2, &d3] {
        assert!(is_stale(&sz.receive(old)));
    }
    sz.receive(&d5);
    for r in [&sx, &sy, &sz] {
        assert_eq!(r.siblings, vec![d5.clone()]);
    }
    // Every earlier version is stale everywhere now.
    for old in [&d1, &d2, &d3, &d4] {
        assert!(is_stale(&sx.receive(old)));
    }
}

/// Clients alternately writing one key through one coordinator, each with the context from
/// its own previous write's reply (stale by the other clients' writes since), for 1,000
/// rounds: siblings stay bounded by the number of writers and a write disappears only when a
/// write whose context saw it replaces it.
fn sibling_explosion(clients: usize, rounds: usize, order_seed: u64) {
    let mut coordinator = Replica::new(1, 1);
    let mut contexts: Vec<Vec<u8>> = vec![empty_context(); clients];
    // For each write id, the ids the client had seen (transitively) when it made it.
    let mut saw: Vec<BTreeSet<usize>> = Vec::new();
    // Per client: the write ids of the siblings in its last reply.
    let mut reply_ids: Vec<Vec<usize>> = vec![Vec::new(); clients];
    let mut id_of = std::collections::HashMap::new();
    let mut seed = order_seed | 1;
    for round in 0..rounds {
        // Mostly alternate, sometimes let one client write twice in a row.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let client = if seed % 8 < 2 {
            (round + 1) % clients
        } else {
            round % clients
        };
        let mut seen = BTreeSet::new();
        for &id in &reply_ids[client] {
            seen.insert(id);
            seen.extend(saw[id].iter().copied());
        }
        let before: Vec<usize> = coordinator
            .siblings
            .iter()
            .map(|w| id_of[&w.version.dot])
            .collect();
        let value = format!("client {client} round {round}");
        let write = coordinator.put(&contexts[client], Some(&value), round as u64);
        let id = saw.len();
        id_of.insert(write.version.dot, id);
        saw.push(seen);
        let after: BTreeSet<usize> = coordinator
            .siblings
            .iter()
            .map(|w| id_of[&w.version.dot])
            .collect();
        for gone in before.iter().filter(|b| !after.contains(b)) {
            assert!(
                saw[id].contains(gone),
                "round {round}: write {gone} dropped by write {id} whose context never saw it"
            );
        }
        assert!(
            coordinator.siblings.len() <= clients,
            "round {round}: {} siblings for {clients} writers",
            coordinator.siblings.len()
        );
        let (_, reply_context) = read(&[&coordinator]);
        contexts[client] = reply_context;
        reply_ids[client] = after.into_iter().collect();
    }
    // Every acknowledged write is still stored or was seen by a stored one.
    for id in 0..saw.len() {
        assert!(coordinator.siblings.iter().any(|w| {
            let s = id_of[&w.version.dot];
            s == id || saw[s].contains(&id)
        }));
    }
}

#[test]
fn sibling_explosion_two_clients_1000_rounds() {
    sibling_explosion(2, 1000, 0x5eed);
}

#[test]
fn sibling_explosion_three_clients_1000_rounds() {
    sibling_explosion(3, 1000, 0xbeef);
}

/// Two writers with stale contexts through one coordinator really are concurrent: both
/// survive as siblings, and the next write of each replaces only its own previous write.
#[test]
fn stale_context_writes_through_one_coordinator_are_both_kept() {
    let mut a = Replica::new(1, 1);
    let ctx0 = empty_context();
    let w1 = a.put(&ctx0, Some("one"), 1);
    let w2 = a.put(&ctx0, Some("two"), 2);
    assert!(a.holds(&w1) && a.holds(&w2));
    let (_, ctx) = read(&[&a]);
    a.put(&ctx, Some("three"), 3);
    assert_eq!(a.values(), BTreeSet::from([Some("three".into())]));
}

/// kv679: a replica's partition data is wiped (epoch record too), it keeps coordinating with
/// a new epoch, and none of its new acknowledged writes is dominated by an older version.
#[test]
fn kv679_wiped_replica_coordinates_with_new_epoch() {
    let t0_ms = 1_700_000_000_000;
    let epoch0 = next_epoch(None, t0_ms).expect("epoch");
    let mut a = Replica::new(1, epoch0);
    let mut b = Replica::new(2, epoch0);
    let mut c = Replica::new(3, epoch0);
    let mut ctx = empty_context();
    let mut before_wipe = Vec::new();
    for i in 0..5 {
        let w = a.put(&ctx, Some(&format!("old {i}")), t0_ms + i);
        b.receive(&w);
        c.receive(&w);
        ctx = read(&[&a]).1;
        before_wipe.push(w);
    }
    let stale_ctx = ctx;

    // The disk is replaced: no data, no epoch record. An hour later the node is back.
    let t1_ms = t0_ms + 3_600_000;
    a.siblings.clear();

    // Reusing the old actor is refused when a context shows it...
    assert_eq!(
        a.coordinate(&stale_ctx, Some("new"), t1_ms),
        Err(CoordinateError::LocalDataBehindContext {
            actor: a.actor,
            context_counter: 5,
            local_counter: 0
        })
    );
    // ...and a blind write with it would be the kv679 bug: its dot is an old one, so a
    // replica holding older data drops the newer write as stale.
    let reused = a.put(&empty_context(), Some("lost"), t1_ms);
    assert_eq!(reused.version.dot, before_wipe[0].version.dot);
    assert!(is_stale(&b.receive(&reused)));
    a.siblings.clear();

    // With the epoch rule the node is a fresh actor.
    let epoch1 = next_epoch(None, t1_ms).expect("epoch");
    assert!(epoch1 > epoch0);
    a.actor = ActorId::new(1, epoch1);
    let mut after_wipe = Vec::new();
    let blind = a.put(&empty_context(), Some("new blind"), t1_ms);
    after_wipe.push(blind.clone());
    for r in [&mut b, &mut c] {
        assert_eq!(r.receive(&blind), Reconcile::Apply { replaced: vec![] });
    }
    // A client that read the old data and the blind write replaces both.
    let (siblings, ctx) = read(&[&b, &c]);
    assert_eq!(siblings.len(), 2);
    let w = a.put(&ctx, Some("new with context"), t1_ms + 1);
    after_wipe.push(w.clone());
    for r in [&mut b, &mut c] {
        assert!(!is_stale(&r.receive(&w)));
    }
    // Anti-entropy and hints deliver every old version again, in both directions.
    for old in &before_wipe {
        for r in [&mut a, &mut b, &mut c] {
            assert!(is_stale(&r.receive(old)));
        }
    }
    for new in &after_wipe {
        for old in &before_wipe {
            assert!(
                !old.version.descends(&new.version),
                "{:?} dominated by {:?}",
                new.version,
                old.version
            );
        }
    }
    for r in [&a, &b, &c] {
        assert_eq!(r.siblings, vec![w.clone()]);
    }

    // A wiped node that kept its epoch record bumps it even if its clock went backwards.
    assert_eq!(next_epoch(Some(epoch1), t0_ms), Ok(epoch1 + 1));
}

/// Delete, recreate, then the old tombstone arrives late as a hint: the new value survives,
/// whether the coordinator still held the tombstone or had reaped it (and so, by the epoch
/// rule, moved to a new epoch).
#[test]
fn doomstone_late_tombstone_does_not_delete_recreated_value() {
    for reaped in [false, true] {
        let (mut a, mut b, mut c) = (Replica::new(1, 1), Replica::new(2, 1), Replica::new(3, 1));
        let v1 = a.put(&empty_context(), Some("v1"), 1);
        for r in [&mut b, &mut c] {
            r.receive(&v1);
        }
        // Delete through A; C is unreachable so a fallback keeps the tombstone as a hint.
        let (_, ctx) = read(&[&a, &b]);
        let tombstone = a.put(&ctx, None, 2);
        assert_eq!(tombstone.value, None);
        b.receive(&tombstone);
        let hint = tombstone.clone();

        let recreated = if reaped {
            // A and B reap the tombstone; A moves to a new epoch before coordinating again.
            a.siblings.clear();
            b.siblings.clear();
            a.actor = ActorId::new(1, next_epoch(Some(1), 3).expect("epoch"));
            // The read finds nothing, so the client writes blind.
            let (siblings, ctx) = read(&[&a, &b]);
            assert!(siblings.is_empty());
            a.put(&ctx, Some("v2"), 3)
        } else {
            // The read returns the tombstone; its context goes with the new put.
            let (siblings, ctx) = read(&[&a, &b]);
            assert_eq!(siblings, vec![tombstone.clone()]);
            a.put(&ctx, Some("v2"), 3)
        };
        b.receive(&recreated);
        // C gets the new value by read repair, then the hint is delivered everywhere.
        c.receive(&recreated);
        for r in [&mut a, &mut b, &mut c] {
            r.receive(&hint);
        }
        for r in [&a, &b, &c] {
            assert!(r.holds(&recreated), "reaped={reaped}: {:?}", r.siblings);
            assert!(r.values().contains(&Some("v2".into())));
            assert!(!r.values().contains(&Some("v1".into())));
        }
        // Same with the hint arriving first at C.
        let mut c2 = Replica::new(3, 1);
        c2.receive(&v1);
        c2.receive(&hint);
        assert_eq!(c2.values(), BTreeSet::from([None]));
        c2.receive(&recreated);
        assert!(c2.holds(&recreated));
        if !reaped {
            // The recreating write saw the tombstone: the tombstone is gone for good.
            for r in [&a, &b, &c, &c2] {
                assert_eq!(r.siblings, vec![recreated.clone()]);
            }
        }
    }
}

/// Why the epoch rule covers tombstone reaping: if the coordinator reaps and keeps its
/// actor, its counters restart and the late tombstone deletes the recreated value.
#[test]
fn doomstone_reaping_without_new_epoch_loses_the_recreated_value() {
    let (mut a, mut c) = (Replica::new(1, 1), Replica::new(3, 1));
    let v1 = a.put(&empty_context(), Some("v1"), 1);
    c.receive(&v1);
    let (_, ctx) = read(&[&a]);
    let tombstone = a.put(&ctx, None, 2);
    a.siblings.clear();
    let recreated = a.put(&empty_context(), Some("v2"), 3);
    assert_eq!(recreated.version.dot, v1.version.dot);
    c.receive(&recreated);
    for r in [&mut a, &mut c] {
        r.receive(&tombstone);
        assert!(!r.holds(&recreated));
    }
}

/// Writes through different coordinators during a partition are all siblings after the
/// replicas exchange versions (in any order), and one put with the merged context collapses
/// them.
#[test]
fn partition_writes_become_siblings_then_collapse() {
    let fresh = || [Replica::new(1, 1), Replica::new(2, 1), Replica::new(3, 1)];
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let [mut a, mut b, mut c] = fresh();
        let v0 = a.put(&empty_context(), Some("v0"), 1);
        b.receive(&v0);
        c.receive(&v0);
        let (_, ctx_v0) = read(&[&a]);

        // Partition {A} {B} {C}.
        let a1 = a.put(&ctx_v0, Some("a1"), 10);
        let (_, ctx_a1) = read(&[&a]);
        let a2 = a.put(&ctx_a1, Some("a2"), 11);
        let b1 = b.put(&ctx_v0, Some("b1"), 12);
        let c1 = c.put(&empty_context(), Some("c1"), 13);
        assert!(!a.holds(&a1) && a.holds(&a2));

        // Heal: every replica pushes its siblings to every other, in the chosen order.
        let mut replicas = [a, b, c];
        for &from in &order {
            for to in 0..3 {
                if from != to {
                    let sender = replicas[from].clone();
                    sender.push_to(&mut replicas[to]);
                }
            }
        }
        let expected = BTreeSet::from([Some("a2".into()), Some("b1".into()), Some("c1".into())]);
        for r in &replicas {
            assert_eq!(r.values(), expected, "order {order:?}");
        }
        // The blind write c1 did not see v0, but a2 and b1 did.
        for old in [&v0, &a1] {
            for r in replicas.iter_mut() {
                assert!(is_stale(&r.receive(old)));
            }
        }

        let [mut a, mut b, mut c] = replicas;
        let (siblings, ctx) = read(&[&a, &b]);
        assert_eq!(siblings.len(), 3);
        let merged = b.put(&ctx, Some("merged"), 20);
        for r in [&mut a, &mut c] {
            assert_eq!(
                r.receive(&merged),
                Reconcile::Apply {
                    replaced: vec![0, 1, 2]
                }
            );
        }
        for r in [&a, &b, &c] {
            assert_eq!(r.siblings, vec![merged.clone()]);
        }
        for old in [&a2, &b1, &c1] {
            assert!(is_stale(&a.receive(old)));
        }
    }
}

/// A replica that holds a later version of an actor but not an earlier concurrent one hands
/// out a context without the later dot: the client's write keeps it as a sibling instead of
/// claiming to have seen the earlier one, which stays too.
#[test]
fn partial_replication_never_overwrites_an_unseen_sibling() {
    let (mut a, mut b) = (Replica::new(1, 1), Replica::new(2, 1));
    let ctx0 = empty_context();
    let w1 = a.put(&ctx0, Some("w1"), 1);
    let w2 = a.put(&ctx0, Some("w2"), 2);
    // Only w2 reaches B.
    b.receive(&w2);
    let (siblings, ctx) = read(&[&b]);
    assert_eq!(siblings, vec![w2.clone()]);
    let w3 = b.put(&ctx, Some("w3"), 3);
    a.receive(&w3);
    assert!(
        a.holds(&w1),
        "w1 was never seen by a client but was dropped"
    );
    // Once replicas exchange, a read sees everything and one write collapses it.
    a.push_to(&mut b);
    let (siblings, ctx) = read(&[&a, &b]);
    assert_eq!(siblings.len(), 3);
    let w4 = a.put(&ctx, Some("w4"), 4);
    b.receive(&w4);
    assert_eq!(a.siblings, vec![w4.clone()]);
    assert_eq!(b.siblings, vec![w4]);
}

/// A key whose history has more actors than a clock keeps: truncating the new
/// version's past oldest-first cut the coordinator's own entry, so the new dot did not
/// follow its past, no context could cover the version, and every read-modify-write
/// through that coordinator left one more sibling (until the key refused writes).
#[test]
fn truncating_a_past_keeps_the_coordinators_own_entry() {
    let (x, y, z) = (ActorId::new(1, 1), ActorId::new(2, 1), ActorId::new(3, 1));
    let mut stored: Vec<Version> = Vec::new();
    let put = |actor, t, stored: &mut Vec<Version>| {
        let c = coordinate(actor, t, &context_of(stored), stored, 2).unwrap();
        remove_indices(stored, &c.replaced);
        stored.push(c.version);
        stored.len()
    };
    put(x, 0, &mut stored);
    put(y, 10, &mut stored);
    put(z, 20, &mut stored);
    // the past {X:1, Y:1, Z:1} is one entry too many: X:1 is the oldest
    assert_eq!(put(x, 30, &mut stored), 1);
    for t in 40..45 {
        assert_eq!(
            put(x, t, &mut stored),
            1,
            "read-modify-writes left siblings"
        );
    }
    let mut clock = VClock::new();
    clock.raise(x, 5, 1);
    clock.raise(y, 1, 100);
    clock.raise(z, 1, 200);
    assert_eq!(clock.truncate_keeping(x, 2), 1);
    assert_eq!((clock.get(x), clock.get(y), clock.get(z)), (5, 0, 1));
}

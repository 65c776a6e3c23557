//! Property tests of the versioning laws: clock lattice laws, encodings, decoders on hostile
//! input, and convergence of sibling sets whatever order versions arrive in.

use proptest::prelude::*;
use ringkv_engine::version::*;

fn arb_actor() -> impl Strategy<Value = ActorId> {
    // Few actors so that clocks share entries and relations between them are common.
    (0u64..4, 0u32..2).prop_map(|(node, epoch)| ActorId::new(node, epoch))
}

fn arb_clock() -> impl Strategy<Value = VClock> {
    prop::collection::vec((arb_actor(), 1u64..6, 0u64..50), 0..6).prop_map(|entries| {
        VClock::from_entries(
            entries
                .into_iter()
                .map(|(actor, counter, timestamp_ms)| ClockEntry {
                    actor,
                    counter,
                    timestamp_ms,
                }),
        )
    })
}

fn arb_version() -> impl Strategy<Value = Version> {
    // half the timestamps in the range of the clocks' (0..50), so either side can be the
    // newer; the other half anywhere, for the encodings
    let ts = prop_oneof![0u64..100, any::<u64>()];
    (arb_actor(), 1u64..8, ts, arb_clock()).prop_map(|(actor, extra, ts, past)| {
        // Keep the invariant: the past never contains the dot.
        let counter = past.get(actor) + extra;
        Version {
            dot: Dot::new(actor, counter),
            timestamp_ms: ts,
            past,
        }
    })
}

fn merged(a: &VClock, b: &VClock) -> VClock {
    let mut m = a.clone();
    m.merge(b);
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn merge_is_commutative(a in arb_clock(), b in arb_clock()) {
        prop_assert_eq!(merged(&a, &b), merged(&b, &a));
    }

    #[test]
    fn merge_is_associative(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
        prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
    }

    /// The read path's one-version shortcut gives exactly the general context.
    #[test]
    fn context_of_one_is_context_of_a_single_version(v in arb_version()) {
        prop_assert_eq!(context_of_one(v.clone()), context_of(std::slice::from_ref(&v)));
    }

    #[test]
    fn merge_is_idempotent(a in arb_clock()) {
        prop_assert_eq!(merged(&a, &a), a);
    }

    #[test]
    fn merge_is_the_least_upper_bound(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
        let m = merged(&a, &b);
        prop_assert!(m.descends(&a) && m.descends(&b));
        if c.descends(&a) && c.descends(&b) {
            prop_assert!(c.descends(&m));
        }
    }

    #[test]
    fn descends_is_reflexive(a in arb_clock()) {
        prop_assert!(a.descends(&a));
        prop_assert!(!a.dominates(&a));
        prop_assert!(!a.concurrent(&a));
    }

    #[test]
    fn descends_is_antisymmetric(a in arb_clock(), b in arb_clock()) {
        if a.descends(&b) && b.descends(&a) {
            prop_assert!(a.same_history(&b));
        }
        // Exactly one of: same history, a dominates, b dominates, concurrent.
        let cases = [a.same_history(&b), a.dominates(&b), b.dominates(&a), a.concurrent(&b)];
        prop_assert_eq!(cases.iter().filter(|c| **c).count(), 1);
    }

    #[test]
    fn descends_is_transitive(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
        // Chains built by merging, where the premise always holds, and plain random triples.
        let ab = merged(&a, &b);
        let abc = merged(&ab, &c);
        prop_assert!(abc.descends(&ab) && ab.descends(&a) && abc.descends(&a));
        if a.descends(&b) && b.descends(&c) {
            prop_assert!(a.descends(&c));
        }
    }

    #[test]
    fn increment_dominates(a in arb_clock(), actor in arb_actor(), now in any::<u64>()) {
        let mut b = a.clone();
        let dot = b.increment(actor, now).expect("small counters");
        prop_assert!(b.dominates(&a));
        prop_assert!(b.contains_dot(dot) && !a.contains_dot(dot));
        prop_assert_eq!(dot.counter, a.get(actor) + 1);
    }

    #[test]
    fn truncate_only_forgets(a in arb_clock(), entries_max in 0usize..7) {
        let mut t = a.clone();
        let removed = t.truncate(entries_max);
        prop_assert_eq!(t.len(), a.len().min(entries_max));
        prop_assert_eq!(removed, a.len() - t.len());
        prop_assert!(a.descends(&t));
        // What stays is never older than what went.
        let kept_min = t.entries().iter().map(|e| e.timestamp_ms).min();
        if let Some(kept_min) = kept_min {
            for e in a.entries().iter().filter(|e| t.get(e.actor) == 0) {
                prop_assert!(e.timestamp_ms <= kept_min);
            }
        }
    }

    #[test]
    fn clock_encoding_round_trips(a in arb_clock(), tail in prop::collection::vec(any::<u8>(), 0..8)) {
        let mut bytes = Vec::new();
        a.encode(&mut bytes);
        prop_assert_eq!(bytes.len(), a.encoded_len());
        let used = bytes.len();
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(VClock::decode(&bytes), Ok((a, used)));
    }

    #[test]
    fn version_encoding_round_trips(v in arb_version()) {
        prop_assert_eq!(Version::decode(&v.encode_to_vec()), Ok(v));
    }

    #[test]
    fn context_encoding_round_trips(a in arb_clock()) {
        let e = Context::encode(&a);
        prop_assert_eq!(e.truncated_entries, 0);
        prop_assert!(e.bytes.len() <= CONTEXT_BYTES_MAX);
        prop_assert_eq!(Context::decode(&e.bytes), Ok(a));
    }

    #[test]
    fn any_changed_byte_of_a_context_is_rejected(a in arb_clock(), index in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let mut bytes = Context::encode(&a).bytes;
        let i = index.index(bytes.len());
        bytes[i] ^= xor;
        prop_assert!(Context::decode(&bytes).is_err());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = VClock::decode(&bytes);
        let _ = Version::decode(&bytes);
        let _ = Context::decode(&bytes);
        // Same bytes behind a valid header, so decoders get past their first checks.
        let mut version = vec![VERSION_FORMAT];
        version.extend_from_slice(&bytes);
        if let Ok(v) = Version::decode(&version) {
            prop_assert_eq!(v.encode_to_vec(), version);
        }
        let mut context = CONTEXT_MAGIC.to_vec();
        context.push(CONTEXT_FORMAT);
        context.extend_from_slice(&bytes);
        let crc = crc32fast_hash(&context);
        context.extend_from_slice(&crc.to_le_bytes());
        if let Ok(c) = Context::decode(&context) {
            prop_assert_eq!(Context::encode(&c).bytes, context);
        }
    }
}

/// CRC-32 (IEEE), bitwise, so this test does not depend on the implementation under test.
fn crc32fast_hash(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// One step of a random history over three replicas.
#[derive(Clone, Debug)]
enum Step {
    /// A client reads from `read_from` (or writes blind), then writes through `via`.
    Put {
        via: usize,
        read_from: Option<usize>,
    },
    /// A client writes through `via` with a context it got `age` reads ago.
    StalePut { via: usize, age: usize },
    /// Replicate the `version`-th version created so far (mod count) to replica `to`.
    Deliver { version: usize, to: usize },
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0usize..3, prop::option::of(0usize..3))
            .prop_map(|(via, read_from)| Step::Put { via, read_from }),
        (0usize..3, 0usize..6).prop_map(|(via, age)| Step::StalePut { via, age }),
        (any::<usize>(), 0usize..3).prop_map(|(version, to)| Step::Deliver { version, to }),
        (any::<usize>(), 0usize..3).prop_map(|(version, to)| Step::Deliver { version, to }),
    ]
}

fn sorted(mut versions: Vec<Version>) -> Vec<Version> {
    versions.sort_by_key(|v| v.dot);
    versions
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the interleaving of writes and partial replication, once every replica has
    /// received every version, all replicas hold the same siblings: exactly the versions no
    /// other version has seen. So nothing is lost unless a write's context saw it.
    #[test]
    fn replicas_converge_to_the_unseen_versions(
        steps in prop::collection::vec(arb_step(), 1..40),
        order_seed in any::<u64>(),
    ) {
        let actors = [ActorId::new(1, 7), ActorId::new(2, 7), ActorId::new(3, 7)];
        let mut stored: [Vec<Version>; 3] = Default::default();
        let mut created: Vec<Version> = Vec::new();
        let mut contexts: Vec<VClock> = Vec::new();
        for (now_ms, step) in steps.into_iter().enumerate() {
            let now_ms = now_ms as u64;
            let (via, context) = match step {
                Step::Put { via, read_from } => {
                    let context = read_from.map_or_else(VClock::new, |r| context_of(&stored[r]));
                    contexts.push(context.clone());
                    (via, context)
                }
                Step::StalePut { via, age } => {
                    let context = contexts.len().checked_sub(age + 1)
                        .and_then(|i| contexts.get(i)).cloned().unwrap_or_default();
                    (via, context)
                }
                Step::Deliver { version, to } => {
                    if !created.is_empty() {
                        let v = created[version % created.len()].clone();
                        let _ = apply_to(&mut stored[to], v);
                    }
                    continue;
                }
            };
            let c = coordinate(actors[via], now_ms, &context, &stored[via], CLOCK_ENTRIES_MAX)
                .expect("a replica that never lost data can always coordinate");
            remove_indices(&mut stored[via], &c.replaced);
            stored[via].push(c.version.clone());
            created.push(c.version);
        }
        // Maximal versions: those no other created version descends.
        let maximal: Vec<Version> = created.iter()
            .filter(|v| !created.iter().any(|w| w != *v && w.descends(v)))
            .cloned().collect();
        let mut seed = order_seed | 1;
        for replica in stored.iter_mut() {
            // Deliver everything in a replica-specific pseudo-random order.
            let mut order: Vec<usize> = (0..created.len()).collect();
            for i in (1..order.len()).rev() {
                seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
                order.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            for i in order {
                let _ = apply_to(replica, created[i].clone());
            }
            prop_assert_eq!(sorted(replica.clone()), sorted(maximal.clone()));
        }
        // And one write with the merged context collapses them.
        let context = context_of(&stored[0]);
        let c = coordinate(actors[1], 1000, &context, &stored[1], CLOCK_ENTRIES_MAX).expect("coordinate");
        prop_assert_eq!(c.replaced.len(), stored[1].len());
    }
}

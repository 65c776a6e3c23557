//! Membership as a CRDT: merge is commutative, associative and idempotent over random
//! states; the encoding round-trips, and decoding garbage or damaged bytes returns an
//! error instead of panicking (the same for gossip messages).

use proptest::prelude::*;
use ringkv_ring::{GossipMessage, Member, Membership, NodeId, Status};

fn member_strategy() -> impl Strategy<Value = Member> {
    (
        0u64..6,
        1u64..4,
        prop_oneof![
            Just(Status::Joining),
            Just(Status::Valid),
            Just(Status::Down),
            Just(Status::Leaving),
            Just(Status::Removed)
        ],
        1u32..4,
        prop_oneof![Just(""), Just("a"), Just("b")],
        1u64..5,
    )
        .prop_map(|(id, version, status, weight, zone, joined_epoch)| Member {
            id: NodeId(id),
            addr: format!("10.0.0.{id}:7000"),
            status,
            weight,
            zone: zone.to_string(),
            shard_count: 2,
            version,
            joined_epoch,
            left_epoch: if status.has_left() {
                joined_epoch + 1
            } else {
                0
            },
        })
}

fn membership_strategy() -> impl Strategy<Value = Membership> {
    prop::collection::vec(member_strategy(), 0..8).prop_map(|members| {
        let mut membership = Membership::new(32).unwrap();
        for member in &members {
            membership.merge_member(member).unwrap();
        }
        membership
    })
}

fn merged(a: &Membership, b: &Membership) -> Membership {
    let mut result = a.clone();
    result.merge(b).unwrap();
    result
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn merge_is_commutative_associative_and_idempotent(
        a in membership_strategy(),
        b in membership_strategy(),
        c in membership_strategy(),
    ) {
        prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        prop_assert_eq!(merged(&a, &a), a.clone());
        let mut again = merged(&a, &b);
        prop_assert!(!again.merge(&b).unwrap(), "a second merge reports no change");
    }

    #[test]
    fn encoding_round_trips(a in membership_strategy()) {
        let bytes = a.encode();
        prop_assert_eq!(Membership::decode(&bytes).unwrap(), a);
    }

    #[test]
    fn decoding_garbage_is_an_error_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        // Random bytes essentially never carry a valid checksum.
        prop_assert!(Membership::decode(&bytes).is_err());
        let _ = GossipMessage::decode(&bytes);
    }

    #[test]
    fn decoding_damaged_encodings_never_panics(
        a in membership_strategy(),
        position in any::<prop::sample::Index>(),
        value in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = a.encode();
        let index = position.index(bytes.len());
        let original = bytes[index];
        bytes[index] = value;
        let decoded = Membership::decode(&bytes);
        if value != original {
            prop_assert!(decoded.is_err());
        }
        let delta = GossipMessage::Delta {
            partition_count: 32,
            members: a.members().cloned().collect(),
            wanted: vec![NodeId(1)],
        };
        let mut wire = delta.encode();
        let index = position.index(wire.len());
        wire[index] = value;
        let _ = GossipMessage::decode(&wire);
        let _ = GossipMessage::decode(&wire[..cut.index(wire.len())]);
    }
}

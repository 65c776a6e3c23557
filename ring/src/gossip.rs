//! The gossip state machine that spreads membership: every period it sends a digest to
//! a random peer (and now and then to a seed), the peer answers with the members it has
//! newer plus the ids it wants, and the wanted members come back. No clock, no socket:
//! time is an argument, randomness a seeded [`Rng`], messages are drained with
//! [`Gossip::poll_outgoing`].

use std::collections::VecDeque;

use crate::membership::{
    decode_member, encode_member, Member, Membership, MembershipError, NodeId, Reader, Status,
    MEMBERS_MAX,
};
use crate::rng::Rng;

/// The version byte of the gossip message encoding.
pub const GOSSIP_FORMAT_VERSION: u8 = 1;
/// The most messages waiting in the outgoing queue; beyond it new ones are dropped (and
/// counted), as gossip repairs any loss on a later round.
pub const OUTGOING_MAX: usize = 1024;

/// Settings of one node's gossip.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub local_id: NodeId,
    /// Seed nodes. Every node talks to a seed every `seed_every_rounds` rounds (and
    /// whenever it knows no other peer), so every group of nodes learns of every other
    /// through the seeds and no logically partitioned ring can persist.
    pub seeds: Vec<NodeId>,
    pub gossip_period_ms: u64,
    pub seed_every_rounds: u64,
    /// Seed of the peer-selection RNG.
    pub rng_seed: u64,
}

impl GossipConfig {
    /// Defaults from the design: one round per second, a seed every fourth round.
    pub fn new(local_id: NodeId, seeds: Vec<NodeId>, rng_seed: u64) -> Self {
        Self {
            local_id,
            seeds,
            gossip_period_ms: 1000,
            seed_every_rounds: 4,
            rng_seed,
        }
    }
}

/// What a digest says about one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestEntry {
    pub id: NodeId,
    pub version: u64,
    pub fingerprint: u64,
}

/// A gossip message between two nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipMessage {
    /// "Here is what I have": the opening of an exchange.
    Digest {
        partition_count: u32,
        state_fingerprint: u64,
        entries: Vec<DigestEntry>,
    },
    /// Member records the receiver lacks or has older, and the ids the sender wants
    /// back (empty in the last message of an exchange).
    Delta {
        partition_count: u32,
        members: Vec<Member>,
        wanted: Vec<NodeId>,
    },
}

/// A message for the caller to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub to: NodeId,
    pub message: GossipMessage,
}

/// Counters for observability and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GossipStats {
    pub rounds: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub members_merged: u64,
    /// Messages ignored: another cluster's partition count, or invalid members.
    pub messages_rejected: u64,
    pub outgoing_dropped: u64,
}

/// One node's gossip.
#[derive(Debug)]
pub struct Gossip {
    config: GossipConfig,
    membership: Membership,
    rng: Rng,
    next_round_ms: Option<u64>,
    seed_phase: u64,
    outgoing: VecDeque<OutgoingMessage>,
    changed: bool,
    stats: GossipStats,
}

impl Gossip {
    pub fn new(config: GossipConfig, membership: Membership) -> Self {
        assert!(
            config.gossip_period_ms > 0,
            "gossip period must be positive"
        );
        assert!(
            config.seed_every_rounds > 0,
            "seed_every_rounds must be positive"
        );
        let mut rng = Rng::new(config.rng_seed);
        let seed_phase = rng.below(config.seed_every_rounds);
        Self {
            config,
            membership,
            rng,
            next_round_ms: None,
            seed_phase,
            outgoing: VecDeque::new(),
            changed: false,
            stats: GossipStats::default(),
        }
    }

    // --- getters ---

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub fn stats(&self) -> GossipStats {
        self.stats
    }

    pub fn config(&self) -> &GossipConfig {
        &self.config
    }

    // --- mutators ---

    /// Local changes (join, leave, status) go through here; they spread on the next
    /// rounds. The caller persists the state after changing it.
    pub fn membership_mut(&mut self) -> &mut Membership {
        &mut self.membership
    }

    // --- inputs ---

    /// One gossip round when the period has elapsed (the first tick starts one).
    pub fn tick(&mut self, now_ms: u64) {
        if self.next_round_ms.is_some_and(|next_ms| now_ms < next_ms) {
            return;
        }
        self.next_round_ms = Some(now_ms + self.config.gossip_period_ms);
        self.round();
    }

    /// A message from `from`.
    pub fn handle_message(&mut self, _now_ms: u64, from: NodeId, message: GossipMessage) {
        self.stats.messages_received += 1;
        match message {
            GossipMessage::Digest {
                partition_count,
                state_fingerprint,
                entries,
            } => {
                if partition_count != self.membership.partition_count()
                    || entries.len() > MEMBERS_MAX
                {
                    self.stats.messages_rejected += 1;
                    return;
                }
                if state_fingerprint == self.membership.fingerprint() {
                    return;
                }
                self.answer_digest(from, &entries);
            }
            GossipMessage::Delta {
                partition_count,
                members,
                wanted,
            } => {
                if partition_count != self.membership.partition_count()
                    || members.len() > MEMBERS_MAX
                    || wanted.len() > MEMBERS_MAX
                {
                    self.stats.messages_rejected += 1;
                    return;
                }
                for member in &members {
                    match self.membership.merge_member(member) {
                        Ok(true) => {
                            self.changed = true;
                            self.stats.members_merged += 1;
                        }
                        Ok(false) => {}
                        Err(_) => self.stats.messages_rejected += 1,
                    }
                }
                let reply: Vec<Member> = wanted
                    .iter()
                    .filter_map(|id| self.membership.member(*id).cloned())
                    .collect();
                if !reply.is_empty() {
                    self.send(
                        from,
                        GossipMessage::Delta {
                            partition_count: self.membership.partition_count(),
                            members: reply,
                            wanted: Vec::new(),
                        },
                    );
                }
            }
        }
    }

    // --- outputs ---

    /// The next message to send, if any.
    pub fn poll_outgoing(&mut self) -> Option<OutgoingMessage> {
        self.outgoing.pop_front()
    }

    /// True once after gossip changed the membership (persist it, recompute the ring).
    pub fn poll_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    // --- internals ---

    fn round(&mut self) {
        let round = self.stats.rounds;
        self.stats.rounds += 1;
        let local_id = self.config.local_id;
        let peers: Vec<NodeId> = self
            .membership
            .members()
            .filter(|member| member.id != local_id && member.status != Status::Removed)
            .map(|member| member.id)
            .collect();
        let seeds: Vec<NodeId> = self
            .config
            .seeds
            .iter()
            .copied()
            .filter(|&seed| seed != local_id)
            .collect();
        let peer = if peers.is_empty() {
            None
        } else {
            Some(peers[self.rng.below(peers.len() as u64) as usize])
        };
        let seed_due =
            peer.is_none() || (round + self.seed_phase) % self.config.seed_every_rounds == 0;
        let seed = if seed_due && !seeds.is_empty() && !peer.is_some_and(|p| seeds.contains(&p)) {
            Some(seeds[self.rng.below(seeds.len() as u64) as usize])
        } else {
            None
        };
        for target in [peer, seed].into_iter().flatten() {
            let digest = self.digest();
            self.send(target, digest);
        }
    }

    fn digest(&self) -> GossipMessage {
        GossipMessage::Digest {
            partition_count: self.membership.partition_count(),
            state_fingerprint: self.membership.fingerprint(),
            entries: self
                .membership
                .members()
                .map(|member| DigestEntry {
                    id: member.id,
                    version: member.version,
                    fingerprint: member.fingerprint(),
                })
                .collect(),
        }
    }

    /// Compares a peer's digest with the local state: sends what the peer lacks or has
    /// older, asks for what is missing or older here. Equal versions with different
    /// contents go both ways; the merge order settles them.
    fn answer_digest(&mut self, from: NodeId, entries: &[DigestEntry]) {
        let mut members: Vec<Member> = Vec::new();
        let mut wanted: Vec<NodeId> = Vec::new();
        for entry in entries {
            match self.membership.member(entry.id) {
                None => wanted.push(entry.id),
                Some(local) if local.version > entry.version => members.push(local.clone()),
                Some(local) if local.version < entry.version => wanted.push(entry.id),
                Some(local) => {
                    if local.fingerprint() != entry.fingerprint {
                        members.push(local.clone());
                        wanted.push(entry.id);
                    }
                }
            }
        }
        for local in self.membership.members() {
            if !entries.iter().any(|entry| entry.id == local.id) {
                members.push(local.clone());
            }
        }
        if members.is_empty() && wanted.is_empty() {
            return;
        }
        self.send(
            from,
            GossipMessage::Delta {
                partition_count: self.membership.partition_count(),
                members,
                wanted,
            },
        );
    }

    fn send(&mut self, to: NodeId, message: GossipMessage) {
        if self.outgoing.len() >= OUTGOING_MAX {
            self.stats.outgoing_dropped += 1;
            return;
        }
        self.stats.messages_sent += 1;
        self.outgoing.push_back(OutgoingMessage { to, message });
    }
}

impl GossipMessage {
    /// The wire encoding: a version byte, a kind byte (1 digest, 2 delta), the partition
    /// count, then the body; little-endian throughout (layout in `docs/ring.md`).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![GOSSIP_FORMAT_VERSION];
        match self {
            GossipMessage::Digest {
                partition_count,
                state_fingerprint,
                entries,
            } => {
                bytes.push(1);
                bytes.extend_from_slice(&partition_count.to_le_bytes());
                bytes.extend_from_slice(&state_fingerprint.to_le_bytes());
                bytes.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for entry in entries {
                    bytes.extend_from_slice(&entry.id.0.to_le_bytes());
                    bytes.extend_from_slice(&entry.version.to_le_bytes());
                    bytes.extend_from_slice(&entry.fingerprint.to_le_bytes());
                }
            }
            GossipMessage::Delta {
                partition_count,
                members,
                wanted,
            } => {
                bytes.push(2);
                bytes.extend_from_slice(&partition_count.to_le_bytes());
                bytes.extend_from_slice(&(members.len() as u32).to_le_bytes());
                for member in members {
                    encode_member(member, &mut bytes);
                }
                bytes.extend_from_slice(&(wanted.len() as u32).to_le_bytes());
                for id in wanted {
                    bytes.extend_from_slice(&id.0.to_le_bytes());
                }
            }
        }
        bytes
    }

    /// Decodes [`GossipMessage::encode`] output; anything else is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<GossipMessage, MembershipError> {
        let mut reader = Reader::new(bytes);
        if reader.u8()? != GOSSIP_FORMAT_VERSION {
            return Err(MembershipError::Decode("unknown gossip format version"));
        }
        let kind = reader.u8()?;
        let partition_count = reader.u32()?;
        let message = match kind {
            1 => {
                let state_fingerprint = reader.u64()?;
                let count = bounded_count(&mut reader)?;
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(DigestEntry {
                        id: NodeId(reader.u64()?),
                        version: reader.u64()?,
                        fingerprint: reader.u64()?,
                    });
                }
                GossipMessage::Digest {
                    partition_count,
                    state_fingerprint,
                    entries,
                }
            }
            2 => {
                let count = bounded_count(&mut reader)?;
                let mut members = Vec::with_capacity(count);
                for _ in 0..count {
                    members.push(decode_member(&mut reader)?);
                }
                let count = bounded_count(&mut reader)?;
                let mut wanted = Vec::with_capacity(count);
                for _ in 0..count {
                    wanted.push(NodeId(reader.u64()?));
                }
                GossipMessage::Delta {
                    partition_count,
                    members,
                    wanted,
                }
            }
            _ => return Err(MembershipError::Decode("unknown gossip message kind")),
        };
        if !reader.is_empty() {
            return Err(MembershipError::Decode("trailing bytes"));
        }
        Ok(message)
    }
}

fn bounded_count(reader: &mut Reader<'_>) -> Result<usize, MembershipError> {
    let count = reader.u32()? as usize;
    if count > MEMBERS_MAX {
        return Err(MembershipError::TooManyMembers);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, seeds: &[u64]) -> Gossip {
        let mut membership = Membership::new(16).unwrap();
        membership
            .join(NodeId(id), &format!("10.0.0.{id}:7000"), 1, "", 2)
            .unwrap();
        let seeds = seeds.iter().map(|&seed| NodeId(seed)).collect();
        Gossip::new(GossipConfig::new(NodeId(id), seeds, id), membership)
    }

    #[test]
    fn lonely_node_gossips_with_a_seed_and_both_learn() {
        let mut seed = node(1, &[1]);
        let mut newcomer = node(2, &[1]);
        newcomer.tick(0);
        let digest = newcomer.poll_outgoing().unwrap();
        assert_eq!(digest.to, NodeId(1));
        assert!(newcomer.poll_outgoing().is_none());
        seed.handle_message(0, NodeId(2), digest.message);
        let delta = seed.poll_outgoing().unwrap();
        assert_eq!(delta.to, NodeId(2));
        newcomer.handle_message(0, NodeId(1), delta.message);
        assert!(newcomer.poll_changed());
        let back = newcomer.poll_outgoing().unwrap();
        seed.handle_message(0, NodeId(2), back.message);
        assert!(seed.poll_changed());
        assert_eq!(seed.membership(), newcomer.membership());
        assert_eq!(seed.membership().len(), 2);
        // In sync: a digest gets no answer.
        newcomer.tick(1000);
        while let Some(out) = newcomer.poll_outgoing() {
            seed.handle_message(1000, NodeId(2), out.message);
        }
        assert!(seed.poll_outgoing().is_none());
    }

    #[test]
    fn tick_waits_for_the_period() {
        let mut gossip = node(2, &[1]);
        gossip.tick(0);
        assert!(gossip.poll_outgoing().is_some());
        gossip.tick(999);
        assert!(gossip.poll_outgoing().is_none());
        gossip.tick(1000);
        assert!(gossip.poll_outgoing().is_some());
    }

    #[test]
    fn another_clusters_messages_are_rejected() {
        let mut gossip = node(1, &[]);
        let foreign = GossipMessage::Delta {
            partition_count: 32,
            members: Vec::new(),
            wanted: vec![NodeId(1)],
        };
        gossip.handle_message(0, NodeId(9), foreign);
        assert_eq!(gossip.stats().messages_rejected, 1);
        assert!(gossip.poll_outgoing().is_none());
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let mut a = node(1, &[]);
        let b = node(2, &[]);
        a.membership_mut().merge(b.membership()).unwrap();
        let digest = a.digest();
        let delta = GossipMessage::Delta {
            partition_count: 16,
            members: a.membership().members().cloned().collect(),
            wanted: vec![NodeId(7)],
        };
        for message in [digest, delta] {
            let bytes = message.encode();
            assert_eq!(GossipMessage::decode(&bytes).unwrap(), message);
            for length in 0..bytes.len() {
                assert!(GossipMessage::decode(&bytes[..length]).is_err());
            }
        }
    }
}

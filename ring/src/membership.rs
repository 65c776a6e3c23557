//! Cluster membership: who is in the cluster, with what weight, zone and shard count,
//! and since which claim epoch. A state-based CRDT (per-member last-writer-wins on a
//! total order), merged by gossip and persisted by the caller through
//! [`Membership::encode`] / [`Membership::decode`].

use std::collections::BTreeMap;
use std::fmt;

use crate::hash::{is_valid_partition_count, xxh64, PARTITION_COUNT_MAX};

/// The version byte of the membership encoding. Bump it when the layout changes and keep
/// decoding the old one.
pub const MEMBERSHIP_FORMAT_VERSION: u8 = 1;
/// The most members (including removed ones, which stay as tombstones) a state may hold.
pub const MEMBERS_MAX: usize = 4096;
/// The longest address, in bytes of UTF-8.
pub const ADDR_BYTES_MAX: usize = 1024;
/// The longest zone label, in bytes of UTF-8.
pub const ZONE_BYTES_MAX: usize = 255;
/// The largest weight of one node.
pub const WEIGHT_MAX: u32 = 1_000_000;
/// The most shards (cores) on one node.
pub const SHARD_COUNT_MAX: u32 = 4096;
/// The largest member version and claim epoch a state may hold. Each grows by one per
/// change, so no real cluster comes near; the bound keeps `+ 1` from overflowing on a
/// record that came from the network or the disk.
pub const COUNTER_MAX: u64 = 1 << 48;

/// The identity of a node, stable for its whole life in the cluster. Ids of removed
/// nodes should not be reused (their history is part of the ring, see `docs/ring.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a member is in its life cycle.
///
/// Ownership of partitions does not follow the status directly but the claim epochs of
/// the member (see [`Member::owns_at`]): a joining, valid or down member owns partitions;
/// a leaving or removed one does not (a leaving node still holds data and hands it off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    /// Announced; claims partitions, which are streamed to it.
    Joining,
    /// A full member.
    Valid,
    /// Handing its partitions to their new owners; owns nothing in the ring.
    Leaving,
    /// Marked down by an operator: still owns its partitions, skipped by routing.
    Down,
    /// Gone for good. Kept as a tombstone so that gossip never resurrects it.
    Removed,
}

impl Status {
    /// The byte of this status in the encoding.
    pub fn code(self) -> u8 {
        match self {
            Status::Joining => 1,
            Status::Valid => 2,
            Status::Leaving => 3,
            Status::Down => 4,
            Status::Removed => 5,
        }
    }

    /// The status of an encoding byte, if it is one.
    pub fn from_code(code: u8) -> Option<Status> {
        match code {
            1 => Some(Status::Joining),
            2 => Some(Status::Valid),
            3 => Some(Status::Leaving),
            4 => Some(Status::Down),
            5 => Some(Status::Removed),
            _ => None,
        }
    }

    /// True for the statuses of a member that has left or is leaving.
    pub fn has_left(self) -> bool {
        matches!(self, Status::Leaving | Status::Removed)
    }

    /// The lower-case name used in logs and tools.
    pub fn name(self) -> &'static str {
        match self {
            Status::Joining => "joining",
            Status::Valid => "valid",
            Status::Leaving => "leaving",
            Status::Down => "down",
            Status::Removed => "removed",
        }
    }
}

/// One member of the cluster as every node sees it once gossip has converged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    pub id: NodeId,
    /// Where peers reach the node (`IP:port` in a ringkv cluster: its links connect to
    /// addresses, never look names up); opaque to this crate.
    pub addr: String,
    pub status: Status,
    /// Relative capacity: a node of weight 2 claims about twice the partitions.
    pub weight: u32,
    /// Zone or rack label; replicas of a partition are spread across zones. Empty means
    /// "no zone".
    pub zone: String,
    /// Shards (cores) on the node; partition `p` lives on shard `p mod shard_count`.
    pub shard_count: u32,
    /// Bumped by every change to this member; the higher version wins a merge.
    pub version: u64,
    /// The claim epoch at which the member started to own partitions (>= 1).
    pub joined_epoch: u64,
    /// The claim epoch at which it stopped owning partitions; 0 while it still owns.
    pub left_epoch: u64,
}

impl Member {
    /// True when the member owns partitions at claim epoch `epoch`.
    pub fn owns_at(&self, epoch: u64) -> bool {
        self.joined_epoch <= epoch && (self.left_epoch == 0 || epoch < self.left_epoch)
    }

    /// True when this record wins a merge against `other` (a record of the same id).
    /// The order is total (version first, then every other field), so merging is
    /// commutative, associative and idempotent even when two nodes wrote different
    /// records under the same version.
    pub fn supersedes(&self, other: &Member) -> bool {
        self.precedence() > other.precedence()
    }

    /// A 64-bit digest of the whole record, for gossip digests.
    pub fn fingerprint(&self) -> u64 {
        let mut bytes = Vec::with_capacity(64 + self.addr.len() + self.zone.len());
        encode_member(self, &mut bytes);
        xxh64(&bytes, 0)
    }

    #[allow(clippy::type_complexity)]
    fn precedence(&self) -> (u64, u8, u64, u64, u32, u32, &str, &str) {
        (
            self.version,
            self.status.code(),
            self.left_epoch,
            self.joined_epoch,
            self.weight,
            self.shard_count,
            &self.zone,
            &self.addr,
        )
    }

    fn validate(&self) -> Result<(), MembershipError> {
        let invalid = |reason: &'static str| MembershipError::InvalidMember {
            id: self.id,
            reason,
        };
        if self.weight == 0 || self.weight > WEIGHT_MAX {
            return Err(invalid("weight out of range"));
        }
        if self.shard_count == 0 || self.shard_count > SHARD_COUNT_MAX {
            return Err(invalid("shard count out of range"));
        }
        if self.addr.len() > ADDR_BYTES_MAX {
            return Err(invalid("address too long"));
        }
        if self.zone.len() > ZONE_BYTES_MAX {
            return Err(invalid("zone too long"));
        }
        if self.version == 0 {
            return Err(invalid("version 0"));
        }
        if self.version > COUNTER_MAX {
            return Err(invalid("version out of range"));
        }
        if self.joined_epoch > COUNTER_MAX || self.left_epoch > COUNTER_MAX {
            return Err(invalid("claim epoch out of range"));
        }
        if self.joined_epoch == 0 {
            return Err(invalid("joined epoch 0"));
        }
        if self.status.has_left() != (self.left_epoch != 0) {
            return Err(invalid("status and left epoch disagree"));
        }
        if self.left_epoch != 0 && self.left_epoch <= self.joined_epoch {
            return Err(invalid("left before joining"));
        }
        Ok(())
    }
}

/// Everything that can go wrong building, changing, merging or decoding a membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipError {
    InvalidPartitionCount(u32),
    PartitionCountMismatch {
        local: u32,
        remote: u32,
    },
    TooManyMembers,
    AlreadyMember(NodeId),
    UnknownMember(NodeId),
    /// The requested status change is not allowed from the member's current status.
    InvalidTransition {
        id: NodeId,
        from: Status,
        to: Status,
    },
    InvalidMember {
        id: NodeId,
        reason: &'static str,
    },
    /// The bytes are not a membership encoding this version understands.
    Decode(&'static str),
}

impl fmt::Display for MembershipError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MembershipError::InvalidPartitionCount(count) => write!(
                f,
                "partition count {count} is not a power of two in 1..={PARTITION_COUNT_MAX}"
            ),
            MembershipError::PartitionCountMismatch { local, remote } => write!(
                f,
                "partition count mismatch: local {local}, remote {remote} (another cluster?)"
            ),
            MembershipError::TooManyMembers => write!(f, "more than {MEMBERS_MAX} members"),
            MembershipError::AlreadyMember(id) => write!(f, "node {id} is already a member"),
            MembershipError::UnknownMember(id) => write!(f, "node {id} is not a member"),
            MembershipError::InvalidTransition { id, from, to } => write!(
                f,
                "node {id} cannot go from {} to {}",
                from.name(),
                to.name()
            ),
            MembershipError::InvalidMember { id, reason } => {
                write!(f, "invalid member {id}: {reason}")
            }
            MembershipError::Decode(reason) => write!(f, "cannot decode membership: {reason}"),
        }
    }
}

impl std::error::Error for MembershipError {}

/// The membership state of a cluster: its partition count (fixed at creation) and every
/// member ever seen, keyed by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    partition_count: u32,
    members: BTreeMap<NodeId, Member>,
}

impl Membership {
    /// An empty membership for a cluster of `partition_count` partitions.
    pub fn new(partition_count: u32) -> Result<Self, MembershipError> {
        if !is_valid_partition_count(partition_count) {
            return Err(MembershipError::InvalidPartitionCount(partition_count));
        }
        Ok(Self {
            partition_count,
            members: BTreeMap::new(),
        })
    }

    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.members.get(&id)
    }

    /// Every member (removed ones included) in ascending id order.
    pub fn members(&self) -> impl Iterator<Item = &Member> + '_ {
        self.members.values()
    }

    /// Number of member records, removed ones included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The claim epoch the next join or leave gets: one past every epoch in the state.
    pub fn next_epoch(&self) -> u64 {
        let epoch_max = self
            .members
            .values()
            .map(|member| member.joined_epoch.max(member.left_epoch))
            .max()
            .unwrap_or(0);
        epoch_max + 1
    }

    /// Adds a node (status joining). A removed node may rejoin under its old id, but
    /// that rewrites its history and moves more partitions than a fresh id would.
    pub fn join(
        &mut self,
        id: NodeId,
        addr: &str,
        weight: u32,
        zone: &str,
        shard_count: u32,
    ) -> Result<&Member, MembershipError> {
        let version = match self.members.get(&id) {
            Some(existing) if existing.status != Status::Removed => {
                return Err(MembershipError::AlreadyMember(id))
            }
            Some(existing) => existing.version + 1,
            None => {
                if self.members.len() >= MEMBERS_MAX {
                    return Err(MembershipError::TooManyMembers);
                }
                1
            }
        };
        let member = Member {
            id,
            addr: addr.to_string(),
            status: Status::Joining,
            weight,
            zone: zone.to_string(),
            shard_count,
            version,
            joined_epoch: self.next_epoch(),
            left_epoch: 0,
        };
        member.validate()?;
        self.members.insert(id, member);
        Ok(&self.members[&id])
    }

    /// Starts the departure of a member: from now on it owns no partitions.
    pub fn leave(&mut self, id: NodeId) -> Result<(), MembershipError> {
        let next_epoch = self.next_epoch();
        let member = self.member_mut(id)?;
        if member.status.has_left() {
            return Err(MembershipError::InvalidTransition {
                id,
                from: member.status,
                to: Status::Leaving,
            });
        }
        change(member, |m| {
            m.status = Status::Leaving;
            m.left_epoch = next_epoch;
        })
    }

    /// Marks a member removed for good (after its hand-off, or by force).
    pub fn remove(&mut self, id: NodeId) -> Result<(), MembershipError> {
        let next_epoch = self.next_epoch();
        let member = self.member_mut(id)?;
        if member.status == Status::Removed {
            return Ok(());
        }
        change(member, |m| {
            if m.left_epoch == 0 {
                m.left_epoch = next_epoch;
            }
            m.status = Status::Removed;
        })
    }

    /// Moves a member between joining, valid and down; none of these changes ownership.
    pub fn set_status(&mut self, id: NodeId, status: Status) -> Result<(), MembershipError> {
        let member = self.member_mut(id)?;
        if status.has_left() || member.status.has_left() {
            return Err(MembershipError::InvalidTransition {
                id,
                from: member.status,
                to: status,
            });
        }
        if member.status == status {
            return Ok(());
        }
        change(member, |m| m.status = status)
    }

    /// Changes the weight of a member. The ring folds its history with current weights,
    /// so a weight change may move more than the minimum (see `docs/ring.md`).
    pub fn set_weight(&mut self, id: NodeId, weight: u32) -> Result<(), MembershipError> {
        change(self.member_mut(id)?, |m| m.weight = weight)
    }

    /// Changes the address of a member (a restart on a new port, say).
    pub fn set_addr(&mut self, id: NodeId, addr: &str) -> Result<(), MembershipError> {
        change(self.member_mut(id)?, |m| m.addr = addr.to_string())
    }

    /// Merges one member record; returns true when the state changed.
    pub fn merge_member(&mut self, member: &Member) -> Result<bool, MembershipError> {
        member.validate()?;
        match self.members.get_mut(&member.id) {
            Some(existing) => {
                if member.supersedes(existing) {
                    *existing = member.clone();
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
            None => {
                if self.members.len() >= MEMBERS_MAX {
                    return Err(MembershipError::TooManyMembers);
                }
                self.members.insert(member.id, member.clone());
                Ok(true)
            }
        }
    }

    /// Merges another state into this one (the CRDT join: commutative, associative,
    /// idempotent). Returns true when this state changed.
    pub fn merge(&mut self, other: &Membership) -> Result<bool, MembershipError> {
        if other.partition_count != self.partition_count {
            return Err(MembershipError::PartitionCountMismatch {
                local: self.partition_count,
                remote: other.partition_count,
            });
        }
        let mut changed = false;
        for member in other.members.values() {
            changed |= self.merge_member(member)?;
        }
        Ok(changed)
    }

    /// A 64-bit digest of the whole state: equal states have equal fingerprints.
    pub fn fingerprint(&self) -> u64 {
        let bytes = self.encode();
        xxh64(&bytes[..bytes.len() - 8], 0)
    }

    /// The persistent encoding (layout in `docs/ring.md`): a version byte, little-endian
    /// integers, members in ascending id order, and a trailing xxHash64 checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(16 + self.members.len() * 64);
        bytes.push(MEMBERSHIP_FORMAT_VERSION);
        bytes.extend_from_slice(&self.partition_count.to_le_bytes());
        bytes.extend_from_slice(&(self.members.len() as u32).to_le_bytes());
        for member in self.members.values() {
            encode_member(member, &mut bytes);
        }
        let checksum = xxh64(&bytes, 0);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        bytes
    }

    /// Decodes [`Membership::encode`] output. Any other input is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Membership, MembershipError> {
        if bytes.len() < 1 + 4 + 4 + 8 {
            return Err(MembershipError::Decode("too short"));
        }
        let (body, checksum_bytes) = bytes.split_at(bytes.len() - 8);
        let mut reader = Reader::new(body);
        let format_version = reader.u8()?;
        if format_version != MEMBERSHIP_FORMAT_VERSION {
            return Err(MembershipError::Decode("unknown format version"));
        }
        let checksum = u64::from_le_bytes(checksum_bytes.try_into().expect("8 bytes"));
        if checksum != xxh64(body, 0) {
            return Err(MembershipError::Decode("checksum mismatch"));
        }
        let partition_count = reader.u32()?;
        let mut membership = Membership::new(partition_count)?;
        let member_count = reader.u32()? as usize;
        if member_count > MEMBERS_MAX {
            return Err(MembershipError::TooManyMembers);
        }
        let mut previous_id: Option<NodeId> = None;
        for _ in 0..member_count {
            let member = decode_member(&mut reader)?;
            if previous_id.is_some_and(|previous| previous >= member.id) {
                return Err(MembershipError::Decode("members not in ascending id order"));
            }
            previous_id = Some(member.id);
            membership.members.insert(member.id, member);
        }
        if !reader.is_empty() {
            return Err(MembershipError::Decode("trailing bytes"));
        }
        Ok(membership)
    }

    fn member_mut(&mut self, id: NodeId) -> Result<&mut Member, MembershipError> {
        self.members
            .get_mut(&id)
            .ok_or(MembershipError::UnknownMember(id))
    }
}

/// Applies `edit` to `member` as one change (its version bumped): only if the result is
/// valid, so a refused change leaves the member as it was.
fn change(member: &mut Member, edit: impl FnOnce(&mut Member)) -> Result<(), MembershipError> {
    let mut changed = member.clone();
    edit(&mut changed);
    changed.version += 1;
    changed.validate()?;
    *member = changed;
    Ok(())
}

/// Appends the encoding of one member (shared by the membership and gossip encodings).
pub(crate) fn encode_member(member: &Member, bytes: &mut Vec<u8>) {
    bytes.extend_from_slice(&member.id.0.to_le_bytes());
    bytes.extend_from_slice(&member.version.to_le_bytes());
    bytes.push(member.status.code());
    bytes.extend_from_slice(&member.weight.to_le_bytes());
    bytes.extend_from_slice(&member.shard_count.to_le_bytes());
    bytes.extend_from_slice(&member.joined_epoch.to_le_bytes());
    bytes.extend_from_slice(&member.left_epoch.to_le_bytes());
    bytes.extend_from_slice(&(member.addr.len() as u16).to_le_bytes());
    bytes.extend_from_slice(member.addr.as_bytes());
    bytes.extend_from_slice(&(member.zone.len() as u16).to_le_bytes());
    bytes.extend_from_slice(member.zone.as_bytes());
}

/// Reads one member written by [`encode_member`] and validates it.
pub(crate) fn decode_member(reader: &mut Reader<'_>) -> Result<Member, MembershipError> {
    let id = NodeId(reader.u64()?);
    let version = reader.u64()?;
    let status =
        Status::from_code(reader.u8()?).ok_or(MembershipError::Decode("unknown status"))?;
    let weight = reader.u32()?;
    let shard_count = reader.u32()?;
    let joined_epoch = reader.u64()?;
    let left_epoch = reader.u64()?;
    let addr = reader.string(ADDR_BYTES_MAX)?;
    let zone = reader.string(ZONE_BYTES_MAX)?;
    let member = Member {
        id,
        addr,
        status,
        weight,
        zone,
        shard_count,
        version,
        joined_epoch,
        left_epoch,
    };
    member.validate()?;
    Ok(member)
}

/// A bounds-checked little-endian reader over a byte slice.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(crate) fn take(&mut self, length: usize) -> Result<&'a [u8], MembershipError> {
        if self.bytes.len() < length {
            return Err(MembershipError::Decode("truncated"));
        }
        let (head, tail) = self.bytes.split_at(length);
        self.bytes = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, MembershipError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, MembershipError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, MembershipError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, MembershipError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self, length_max: usize) -> Result<String, MembershipError> {
        let length = self.u16()? as usize;
        if length > length_max {
            return Err(MembershipError::Decode("string too long"));
        }
        let raw = self.take(length)?;
        String::from_utf8(raw.to_vec()).map_err(|_| MembershipError::Decode("invalid UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_node_membership() -> Membership {
        let mut membership = Membership::new(64).unwrap();
        membership
            .join(NodeId(1), "10.0.0.1:7000", 1, "a", 4)
            .unwrap();
        membership
            .join(NodeId(2), "10.0.0.2:7000", 2, "b", 4)
            .unwrap();
        membership
            .join(NodeId(3), "10.0.0.3:7000", 1, "", 8)
            .unwrap();
        membership
    }

    #[test]
    fn counters_near_overflow_are_refused_so_a_change_cannot_overflow_them() {
        let mut membership = three_node_membership();
        let good = membership.member(NodeId(2)).unwrap().clone();
        for (field, value) in [
            ("version", u64::MAX),
            ("joined", u64::MAX),
            ("left", u64::MAX),
        ] {
            let mut bad = good.clone();
            match field {
                "version" => bad.version = value,
                "joined" => bad.joined_epoch = value,
                _ => {
                    bad.status = Status::Leaving;
                    bad.left_epoch = value;
                }
            }
            assert!(
                matches!(
                    membership.merge_member(&bad),
                    Err(MembershipError::InvalidMember { .. })
                ),
                "{field} = {value}"
            );
        }
        // at the bound, changes still work (and the next one is refused, not wrapped)
        let mut top = good.clone();
        top.version = COUNTER_MAX - 1;
        assert!(membership.merge_member(&top).unwrap());
        membership.set_status(NodeId(2), Status::Valid).unwrap();
        assert_eq!(membership.member(NodeId(2)).unwrap().version, COUNTER_MAX);
        assert!(membership.set_weight(NodeId(2), 3).is_err());
        assert!(membership.set_status(NodeId(2), Status::Down).is_err());
        assert!(membership.leave(NodeId(2)).is_err());
        assert!(membership.remove(NodeId(2)).is_err());
        let member = membership.member(NodeId(2)).unwrap();
        assert_eq!(
            (member.version, member.status),
            (COUNTER_MAX, Status::Valid)
        );
    }

    #[test]
    fn encode_decode_round_trips() {
        let mut membership = three_node_membership();
        membership.leave(NodeId(3)).unwrap();
        membership.set_status(NodeId(1), Status::Valid).unwrap();
        let bytes = membership.encode();
        assert_eq!(bytes[0], MEMBERSHIP_FORMAT_VERSION);
        assert_eq!(Membership::decode(&bytes).unwrap(), membership);
    }

    #[test]
    fn decode_rejects_every_truncation_and_every_single_bit_flip() {
        let bytes = three_node_membership().encode();
        for length in 0..bytes.len() {
            assert!(
                Membership::decode(&bytes[..length]).is_err(),
                "len {length}"
            );
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(Membership::decode(&flipped).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn epochs_follow_joins_and_leaves() {
        let mut membership = three_node_membership();
        assert_eq!(membership.member(NodeId(1)).unwrap().joined_epoch, 1);
        assert_eq!(membership.member(NodeId(3)).unwrap().joined_epoch, 3);
        membership.leave(NodeId(2)).unwrap();
        let member = membership.member(NodeId(2)).unwrap();
        assert_eq!((member.status, member.left_epoch), (Status::Leaving, 4));
        assert!(member.owns_at(3) && !member.owns_at(4));
        assert_eq!(membership.next_epoch(), 5);
        assert!(membership.leave(NodeId(2)).is_err());
        assert!(membership.set_status(NodeId(2), Status::Valid).is_err());
        membership.remove(NodeId(2)).unwrap();
        assert_eq!(membership.member(NodeId(2)).unwrap().left_epoch, 4);
    }

    #[test]
    fn join_rejects_bad_weights_and_duplicates() {
        let mut membership = three_node_membership();
        assert_eq!(
            membership.join(NodeId(1), "x", 1, "", 1).unwrap_err(),
            MembershipError::AlreadyMember(NodeId(1))
        );
        assert!(membership.join(NodeId(9), "x", 0, "", 1).is_err());
        assert!(membership.join(NodeId(9), "x", 1, "", 0).is_err());
        assert!(Membership::new(48).is_err());
    }

    #[test]
    fn merge_prefers_the_higher_version_and_breaks_ties_by_content() {
        let base = three_node_membership();
        let mut left = base.clone();
        let mut right = base.clone();
        left.set_weight(NodeId(1), 5).unwrap();
        right.set_weight(NodeId(1), 7).unwrap();
        let mut left_then_right = left.clone();
        left_then_right.merge(&right).unwrap();
        let mut right_then_left = right.clone();
        right_then_left.merge(&left).unwrap();
        assert_eq!(left_then_right, right_then_left);
        assert_eq!(left_then_right.member(NodeId(1)).unwrap().weight, 7);
        // A newer version beats a larger weight.
        left.set_weight(NodeId(1), 3).unwrap();
        left_then_right.merge(&left).unwrap();
        assert_eq!(left_then_right.member(NodeId(1)).unwrap().weight, 3);
        let other_cluster = Membership::new(128).unwrap();
        assert!(left.merge(&other_cluster).is_err());
    }
}

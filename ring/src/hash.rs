//! The stable key hash (xxHash64, seed 0) and the key -> partition map. Placement on
//! disk depends on this forever, so the function is written out here, documented in
//! `docs/ring.md` and pinned by the reference test vectors below.

/// The seed used for placement. Fixed forever: changing it moves every key.
pub const KEY_HASH_SEED: u64 = 0;

/// The largest supported partition count (2^20). Beyond that the per-partition folders
/// and the ring itself stop being small.
pub const PARTITION_COUNT_MAX: u32 = 1 << 20;

const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

/// The placement hash of a key: xxHash64 of its bytes with seed [`KEY_HASH_SEED`].
pub fn key_hash(key: &[u8]) -> u64 {
    xxh64(key, KEY_HASH_SEED)
}

/// The partition of a key among `partition_count` partitions (a power of two).
pub fn partition_for_key(key: &[u8], partition_count: u32) -> u32 {
    partition_for_hash(key_hash(key), partition_count)
}

/// The partition of a 64-bit hash: its top `log2(partition_count)` bits, so partition
/// `p` is the slice `[p * 2^64 / Q, (p + 1) * 2^64 / Q)` of the hash space and every
/// partition is the same size.
pub fn partition_for_hash(hash: u64, partition_count: u32) -> u32 {
    assert!(
        is_valid_partition_count(partition_count),
        "partition count {partition_count} is not a power of two in 1..={PARTITION_COUNT_MAX}"
    );
    let bits = partition_count.trailing_zeros();
    if bits == 0 {
        return 0;
    }
    (hash >> (64 - bits)) as u32
}

/// True when `partition_count` is a power of two in `1..=PARTITION_COUNT_MAX`.
pub fn is_valid_partition_count(partition_count: u32) -> bool {
    partition_count.is_power_of_two() && partition_count <= PARTITION_COUNT_MAX
}

/// xxHash64 (Yann Collet, XXH64 from the xxHash specification) of `input` with `seed`.
pub fn xxh64(input: &[u8], seed: u64) -> u64 {
    let length_bytes = input.len() as u64;
    let mut rest = input;
    let mut hash;
    if rest.len() >= 32 {
        let mut v1 = seed.wrapping_add(PRIME64_1).wrapping_add(PRIME64_2);
        let mut v2 = seed.wrapping_add(PRIME64_2);
        let mut v3 = seed;
        let mut v4 = seed.wrapping_sub(PRIME64_1);
        // One iteration per 32-byte stripe: bounded by input.len() / 32.
        while rest.len() >= 32 {
            v1 = round(v1, read_u64_le(&rest[0..8]));
            v2 = round(v2, read_u64_le(&rest[8..16]));
            v3 = round(v3, read_u64_le(&rest[16..24]));
            v4 = round(v4, read_u64_le(&rest[24..32]));
            rest = &rest[32..];
        }
        hash = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        hash = merge_round(hash, v1);
        hash = merge_round(hash, v2);
        hash = merge_round(hash, v3);
        hash = merge_round(hash, v4);
    } else {
        hash = seed.wrapping_add(PRIME64_5);
    }
    hash = hash.wrapping_add(length_bytes);
    while rest.len() >= 8 {
        hash ^= round(0, read_u64_le(&rest[0..8]));
        hash = hash
            .rotate_left(27)
            .wrapping_mul(PRIME64_1)
            .wrapping_add(PRIME64_4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        hash ^= u64::from(read_u32_le(&rest[0..4])).wrapping_mul(PRIME64_1);
        hash = hash
            .rotate_left(23)
            .wrapping_mul(PRIME64_2)
            .wrapping_add(PRIME64_3);
        rest = &rest[4..];
    }
    for &byte in rest {
        hash ^= u64::from(byte).wrapping_mul(PRIME64_5);
        hash = hash.rotate_left(11).wrapping_mul(PRIME64_1);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(PRIME64_2);
    hash ^= hash >> 29;
    hash = hash.wrapping_mul(PRIME64_3);
    hash ^= hash >> 32;
    hash
}

fn round(accumulator: u64, lane: u64) -> u64 {
    accumulator
        .wrapping_add(lane.wrapping_mul(PRIME64_2))
        .rotate_left(31)
        .wrapping_mul(PRIME64_1)
}

fn merge_round(hash: u64, accumulator: u64) -> u64 {
    (hash ^ round(0, accumulator))
        .wrapping_mul(PRIME64_1)
        .wrapping_add(PRIME64_4)
}

fn read_u64_le(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

fn read_u32_le(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sanity buffer of the xxHash reference CLI (`xsum_sanity_check.c`): byte `i` is
    /// the top byte of a 32-bit generator that starts at 2654435761 and squares itself.
    fn reference_sanity_buffer() -> Vec<u8> {
        let mut generator: u32 = 2_654_435_761;
        let mut buffer = Vec::with_capacity(101);
        for _ in 0..101 {
            buffer.push((generator >> 24) as u8);
            generator = generator.wrapping_mul(generator);
        }
        buffer
    }

    #[test]
    fn xxh64_matches_the_reference_vectors() {
        let prime = 2_654_435_761u64;
        let buffer = reference_sanity_buffer();
        assert_eq!(xxh64(&[], 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(&[], prime), 0xAC75_FDA2_929B_17EF);
        assert_eq!(xxh64(&buffer[..1], 0), 0x4FCE_394C_C889_52D8);
        assert_eq!(xxh64(&buffer[..1], prime), 0x7398_40CB_819F_A723);
        assert_eq!(xxh64(&buffer[..14], 0), 0xCFFA_8DB8_81BC_3A3D);
        assert_eq!(xxh64(&buffer[..14], prime), 0x5B96_1158_5EFC_C9CB);
        assert_eq!(xxh64(&buffer, 0), 0x0EAB_5433_84F8_78AD);
        assert_eq!(xxh64(&buffer, prime), 0xCAA6_5939_306F_1E21);
    }

    #[test]
    fn key_hash_matches_the_pinned_vectors() {
        // These are the vectors of docs/ring.md; they decide on-disk placement.
        assert_eq!(key_hash(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(key_hash(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(key_hash(b"abc"), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            key_hash(b"Nobody inspects the spammish repetition"),
            0xFBCE_A83C_8A37_8BF1
        );
    }

    #[test]
    fn partition_is_the_top_bits_of_the_hash() {
        assert_eq!(partition_for_hash(0, 64), 0);
        assert_eq!(partition_for_hash(u64::MAX, 64), 63);
        assert_eq!(partition_for_hash(1 << 58, 64), 1);
        assert_eq!(partition_for_hash((1 << 58) - 1, 64), 0);
        assert_eq!(partition_for_hash(u64::MAX, 1), 0);
        assert_eq!(partition_for_hash(1 << 63, 2), 1);
        // "abc" hashes to 0x44BC...: top 6 bits 010001 = 17, top 10 bits = 274.
        // The table of docs/ring.md.
        let pinned: [(&[u8], u32, u32); 4] = [
            (b"", 59, 957),
            (b"a", 52, 841),
            (b"abc", 17, 274),
            (b"Nobody inspects the spammish repetition", 62, 1007),
        ];
        for (key, partition_of_64, partition_of_1024) in pinned {
            assert_eq!(partition_for_key(key, 64), partition_of_64);
            assert_eq!(partition_for_key(key, 1024), partition_of_1024);
        }
    }

    #[test]
    fn partitions_are_filled_evenly_by_distinct_keys() {
        let partition_count = 64u32;
        let mut counts = vec![0u32; partition_count as usize];
        for index in 0..64_000u32 {
            let key = format!("user:{index}");
            counts[partition_for_key(key.as_bytes(), partition_count) as usize] += 1;
        }
        // Expected 1000 each; a good hash stays within a few standard deviations (~32).
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "min {min} max {max}");
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn partition_count_must_be_a_power_of_two() {
        partition_for_hash(1, 48);
    }
}

//! YCSB-style workloads: which operation comes next and on which key.
//!
//! A [`Workload`] is a mix of operations (read, update, insert, read-modify-write)
//! and a key [`Distribution`]; an [`OpGenerator`] draws from it with a seeded RNG, so
//! a run is repeatable. The core workloads follow YCSB's `workloads/workload[a-f]`
//! (E, scans, is left out: none of the systems measured here has a range scan).

use anyhow::bail;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How keys are chosen among the records.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distribution {
    Uniform,
    /// YCSB's scrambled zipfian: item popularity follows Zipf's law with constant
    /// `theta` (YCSB's default 0.99), and the popular items are spread over the key
    /// space by a hash.
    Zipfian {
        theta: f64,
    },
    /// YCSB's "latest": zipfian over recency, the newest inserted record the most
    /// popular (workload D).
    Latest {
        theta: f64,
    },
}

impl Distribution {
    pub fn parse(name: &str, theta: f64) -> anyhow::Result<Self> {
        if !(theta > 0.0 && theta < 1.0) {
            bail!("--zipf-theta must be in (0, 1), not {theta}");
        }
        Ok(match name {
            "uniform" => Distribution::Uniform,
            "zipfian" => Distribution::Zipfian { theta },
            "latest" => Distribution::Latest { theta },
            other => bail!("unknown distribution {other} (uniform, zipfian, latest)"),
        })
    }

    pub fn name(&self) -> String {
        match self {
            Distribution::Uniform => "uniform".into(),
            Distribution::Zipfian { theta } => format!("zipfian({theta})"),
            Distribution::Latest { theta } => format!("latest({theta})"),
        }
    }
}

/// One operation of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OpKind {
    Read,
    Update,
    Insert,
    /// Read a record, then write it back (with the read's context for ringkv);
    /// measured from the read's send to the write's reply.
    ReadModifyWrite,
}

impl OpKind {
    pub const ALL: [OpKind; 4] = [
        OpKind::Read,
        OpKind::Update,
        OpKind::Insert,
        OpKind::ReadModifyWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Update => "update",
            OpKind::Insert => "insert",
            OpKind::ReadModifyWrite => "rmw",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A mix of operations over a key distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub name: String,
    pub read: f64,
    pub update: f64,
    pub insert: f64,
    pub read_modify_write: f64,
    pub distribution: Distribution,
}

impl Workload {
    /// The YCSB core workload `name` (A, B, C, D, F) or `put-only`, with its own
    /// distribution unless `distribution` overrides it.
    pub fn core(name: &str, distribution: Option<Distribution>) -> anyhow::Result<Self> {
        let zipfian = Distribution::Zipfian { theta: 0.99 };
        let (read, update, insert, rmw, default) = match name.to_ascii_uppercase().as_str() {
            "A" => (0.5, 0.5, 0.0, 0.0, zipfian),
            "B" => (0.95, 0.05, 0.0, 0.0, zipfian),
            "C" => (1.0, 0.0, 0.0, 0.0, zipfian),
            "D" => (0.95, 0.0, 0.05, 0.0, Distribution::Latest { theta: 0.99 }),
            "F" => (0.5, 0.0, 0.0, 0.5, zipfian),
            "PUT-ONLY" => (0.0, 1.0, 0.0, 0.0, Distribution::Uniform),
            other => bail!("unknown workload {other} (A, B, C, D, F, put-only)"),
        };
        Ok(Workload {
            name: if name.len() == 1 {
                name.to_ascii_uppercase()
            } else {
                name.to_ascii_lowercase()
            },
            read,
            update,
            insert,
            read_modify_write: rmw,
            distribution: distribution.unwrap_or(default),
        })
    }

    /// Picks the operation for a uniform draw `u` in [0, 1).
    pub fn op_for(&self, u: f64) -> OpKind {
        let mut edge = self.read;
        if u < edge {
            return OpKind::Read;
        }
        edge += self.update;
        if u < edge {
            return OpKind::Update;
        }
        edge += self.insert;
        if u < edge {
            return OpKind::Insert;
        }
        if self.read_modify_write > 0.0 {
            OpKind::ReadModifyWrite
        } else if self.update > 0.0 {
            OpKind::Update
        } else {
            OpKind::Read
        }
    }
}

/// xorshift64* seeded through SplitMix64: fast, repeatable, good enough for keys.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// YCSB's ZipfianGenerator (Gray et al., "Quickly generating billion-record
/// synthetic databases"): item 0 is the most popular.
#[derive(Debug, Clone)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    zeta_n: f64,
    alpha: f64,
    eta: f64,
}

/// Items above which zeta(n) is extrapolated instead of summed (bounded set-up time).
const ZETA_SUM_ITEMS_MAX: u64 = 50_000_000;

fn zeta(n: u64, theta: f64) -> f64 {
    let summed = n.min(ZETA_SUM_ITEMS_MAX);
    let mut sum = 0.0;
    for i in 1..=summed {
        sum += 1.0 / (i as f64).powf(theta);
    }
    if n > summed {
        // integral of x^-theta from summed to n
        let a = 1.0 - theta;
        sum += ((n as f64).powf(a) - (summed as f64).powf(a)) / a;
    }
    sum
}

impl Zipfian {
    pub fn new(items: u64, theta: f64) -> Self {
        assert!(items >= 1, "a zipfian needs at least one item");
        assert!(theta > 0.0 && theta < 1.0, "theta in (0, 1)");
        let zeta_n = zeta(items, theta);
        let zeta_2 = zeta(2, theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n);
        Zipfian {
            items,
            theta,
            zeta_n,
            alpha,
            eta,
        }
    }

    /// The item for a uniform draw `u` in [0, 1); in [0, items).
    pub fn sample(&self, u: f64) -> u64 {
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let item = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        item.min(self.items - 1)
    }
}

/// FNV-1a 64 of the item number: YCSB's scramble of zipfian items.
pub fn fnv64(mut x: u64) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for _ in 0..8 {
        hash ^= x & 0xFF;
        hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
        x >>= 8;
    }
    hash
}

/// The key of record `index`.
pub fn key_of(index: u64, out: &mut Vec<u8>) {
    // `user` and the index in at least 12 decimal digits, zero-padded (YCSB's
    // `user%012d`), without the formatting machinery: the load generator shares the
    // CPUs with the server it measures
    let mut digits = [0u8; 20];
    let mut n = index;
    let mut len = 0;
    while n > 0 || len < 12 {
        digits[19 - len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
    }
    out.clear();
    out.extend_from_slice(b"user");
    out.extend_from_slice(&digits[20 - len..]);
}

/// Draws operations and keys for one connection.
#[derive(Debug)]
pub struct OpGenerator {
    workload: Workload,
    rng: Rng,
    zipfian: Option<Zipfian>,
    /// Records that exist (grows with inserts); shared by a run's connections.
    records: Arc<AtomicU64>,
    records_at_start: u64,
}

impl OpGenerator {
    pub fn new(workload: &Workload, records: Arc<AtomicU64>, seed: u64) -> Self {
        let records_at_start = records.load(Ordering::Relaxed).max(1);
        let zipfian = match workload.distribution {
            Distribution::Uniform => None,
            Distribution::Zipfian { theta } | Distribution::Latest { theta } => {
                Some(Zipfian::new(records_at_start, theta))
            }
        };
        OpGenerator {
            workload: workload.clone(),
            rng: Rng::new(seed),
            zipfian,
            records,
            records_at_start,
        }
    }

    /// A record index for a read or an update.
    pub fn existing_key(&mut self) -> u64 {
        let u = self.rng.next_f64();
        match (self.workload.distribution, &self.zipfian) {
            (Distribution::Zipfian { .. }, Some(z)) => fnv64(z.sample(u)) % self.records_at_start,
            (Distribution::Latest { .. }, Some(z)) => {
                let newest = self.records.load(Ordering::Relaxed).max(1) - 1;
                newest.saturating_sub(z.sample(u))
            }
            _ => self.rng.below(self.records_at_start),
        }
    }

    /// The next operation and its record index (a fresh index for an insert).
    pub fn next_op(&mut self) -> (OpKind, u64) {
        let op = self.workload.op_for(self.rng.next_f64());
        let index = match op {
            OpKind::Insert => self.records.fetch_add(1, Ordering::Relaxed),
            _ => self.existing_key(),
        };
        (op, index)
    }

    /// A value length in `min..=max`.
    pub fn value_len(&mut self, min: usize, max: usize) -> usize {
        if max <= min {
            min
        } else {
            min + self.rng.below((max - min + 1) as u64) as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_ycsb_user_and_twelve_digits() {
        let mut key = Vec::new();
        for i in [
            0u64,
            7,
            99_999,
            123_456_789_012,
            9_999_999_999_999,
            u64::MAX,
        ] {
            key_of(i, &mut key);
            assert_eq!(key, format!("user{i:012}").into_bytes());
        }
    }

    fn counts(workload: &Workload, records: u64, draws: usize) -> (Vec<u64>, [u64; 4]) {
        let shared = Arc::new(AtomicU64::new(records));
        let mut g = OpGenerator::new(workload, shared, 7);
        let mut keys = vec![0u64; records as usize + draws];
        let mut ops = [0u64; 4];
        for _ in 0..draws {
            let (op, k) = g.next_op();
            ops[op.index()] += 1;
            keys[k as usize] += 1;
        }
        (keys, ops)
    }

    #[test]
    fn read_update_ratios_match_each_core_workload() {
        let draws = 200_000;
        for (name, read, write) in [("A", 0.5, 0.5), ("B", 0.95, 0.05), ("C", 1.0, 0.0)] {
            let w = Workload::core(name, None).unwrap();
            let (_, ops) = counts(&w, 1000, draws);
            let r = ops[OpKind::Read.index()] as f64 / draws as f64;
            let u = ops[OpKind::Update.index()] as f64 / draws as f64;
            assert!((r - read).abs() < 0.01, "{name}: read share {r}");
            assert!((u - write).abs() < 0.01, "{name}: update share {u}");
        }
        let (_, ops) = counts(&Workload::core("F", None).unwrap(), 1000, draws);
        let rmw = ops[OpKind::ReadModifyWrite.index()] as f64 / draws as f64;
        assert!((rmw - 0.5).abs() < 0.01, "F: rmw share {rmw}");
        let (_, ops) = counts(&Workload::core("D", None).unwrap(), 1000, draws);
        let ins = ops[OpKind::Insert.index()] as f64 / draws as f64;
        assert!((ins - 0.05).abs() < 0.005, "D: insert share {ins}");
        let (_, ops) = counts(&Workload::core("put-only", None).unwrap(), 1000, draws);
        assert_eq!(ops[OpKind::Update.index()], draws as u64);
    }

    #[test]
    fn uniform_keys_are_flat() {
        let w = Workload::core("C", Some(Distribution::Uniform)).unwrap();
        let (keys, _) = counts(&w, 100, 200_000);
        for (k, &n) in keys[..100].iter().enumerate() {
            assert!(
                (1600..2400).contains(&n),
                "key {k} drawn {n} times, expected ~2000"
            );
        }
    }

    #[test]
    fn zipfian_items_follow_zipfs_law() {
        let z = Zipfian::new(1000, 0.99);
        let mut rng = Rng::new(1);
        let mut hits = vec![0u64; 1000];
        let draws = 1_000_000;
        for _ in 0..draws {
            hits[z.sample(rng.next_f64()) as usize] += 1;
        }
        // item 0 has probability 1/zeta(n); rank i about (1/i^theta) of that
        let p0 = 1.0 / zeta(1000, 0.99);
        let share0 = hits[0] as f64 / draws as f64;
        assert!((share0 - p0).abs() < 0.01, "item 0 share {share0} vs {p0}");
        let ratio = hits[0] as f64 / hits[1] as f64;
        assert!((ratio - 2f64.powf(0.99)).abs() < 0.15, "p0/p1 = {ratio}");
        // monotone on average: the top 10 items take far more than the bottom 500
        let top: u64 = hits[..10].iter().sum();
        let bottom: u64 = hits[500..].iter().sum();
        assert!(top > bottom, "top 10 {top} vs bottom 500 {bottom}");
        // a smaller constant is flatter
        let flat = Zipfian::new(1000, 0.5);
        let mut flat0 = 0;
        for _ in 0..100_000 {
            flat0 += (flat.sample(rng.next_f64()) == 0) as u64;
        }
        assert!((flat0 as f64 / 100_000.0) < share0 / 2.0);
    }

    #[test]
    fn scrambled_zipfian_keys_are_skewed_but_spread() {
        let w = Workload::core("C", None).unwrap();
        let (keys, _) = counts(&w, 10_000, 500_000);
        let mut sorted: Vec<u64> = keys[..10_000].to_vec();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let top_1_percent: u64 = sorted[..100].iter().sum();
        assert!(
            top_1_percent > 500_000 / 4,
            "top 1% of keys get {top_1_percent}"
        );
        // the hottest key is not simply key 0
        let hottest = keys[..10_000]
            .iter()
            .enumerate()
            .max_by_key(|(_, &n)| n)
            .unwrap()
            .0;
        assert_ne!(hottest, 0);
    }

    #[test]
    fn latest_prefers_the_newest_records() {
        let w = Workload::core("D", None).unwrap();
        let shared = Arc::new(AtomicU64::new(1000));
        let mut g = OpGenerator::new(&w, shared.clone(), 3);
        let mut recent = 0;
        let mut reads = 0;
        for _ in 0..100_000 {
            let (op, k) = g.next_op();
            let newest = shared.load(Ordering::Relaxed) - 1;
            assert!(k <= newest);
            if op == OpKind::Read {
                reads += 1;
                recent += (newest - k < 10) as u64;
            }
        }
        assert!(
            shared.load(Ordering::Relaxed) > 1000 + 4000,
            "inserts grew the records"
        );
        assert!(
            recent * 3 > reads,
            "{recent} of {reads} reads among the 10 newest"
        );
    }
}

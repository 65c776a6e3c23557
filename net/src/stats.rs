//! Node statistics, as STATS replies carry them (`docs/protocol.md`, "STATS"): named
//! counters and named latency histograms (HdrHistogram, nanoseconds, in its V2
//! serialization on the wire), one set per shard, merged for the whole node.
//!
//! The server fills them; `ringkv stats` and capacity planners read them. A histogram
//! merges losslessly, so a node's figures are the sum of its shards'.

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use std::fmt::Write as _;

/// The largest latency a histogram tracks (60 s, in ns); longer ones count as this.
pub const LATENCY_MAX_NS: u64 = 60_000_000_000;

/// Significant decimal digits the histograms keep (0.1% resolution).
pub const LATENCY_SIGFIGS: u8 = 3;

/// The first 4 bytes (big-endian) of HdrHistogram's uncompressed V2 serialization.
pub const V2_COOKIE: u64 = 0x1c84_9313;

/// Bytes of the V2 header (cookie, payload length, offset, digits, lowest, highest,
/// conversion ratio).
const V2_HEADER_BYTES: usize = 40;

/// At most this many counters, and histograms, in one STATS reply a reader accepts
/// (the node sends about 20 and 6).
pub const STATS_ENTRIES_MAX: usize = 64;

/// Whether `name` may name a counter or a histogram: 1 to 32 of `a-z`, `0-9`, `_`
/// (names become file names in `ringkv stats --hgrm` and are printed as they are).
pub fn is_stats_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// An empty latency histogram, in nanoseconds from 1 ns to [`LATENCY_MAX_NS`].
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, LATENCY_SIGFIGS).expect("valid bounds")
}

/// Counts one latency of `took` in `h` (a [`latency_histogram`]): past its top, it
/// counts as the top (60 s); under 1 ns, as 1 ns.
pub fn record_latency(h: &mut Histogram<u64>, took: std::time::Duration) {
    record_latencies(h, took, 1);
}

/// `count` requests that each took `took`.
pub fn record_latencies(h: &mut Histogram<u64>, took: std::time::Duration, count: u64) {
    let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    h.saturating_record_n(ns.max(1), count);
}

/// `h` in HdrHistogram's V2 serialization (what a STATS reply carries).
pub fn encode_histogram(h: &Histogram<u64>, out: &mut Vec<u8>) {
    V2Serializer::new()
        .serialize(h, out)
        .expect("a histogram within its bounds serializes into memory");
}

/// A histogram from its V2 serialization. Refuses one with other bounds than
/// [`latency_histogram`]'s (a hostile or corrupt header could otherwise make the
/// reader allocate whatever it names).
pub fn decode_histogram(bytes: &[u8]) -> Result<Histogram<u64>, String> {
    // the V2 header: cookie, payload length, normalizing offset, sigfigs, lowest,
    // highest (all big-endian); checked before the deserializer sizes anything
    let field = |at: usize, n: usize| -> Result<u64, String> {
        let b = bytes
            .get(at..at + n)
            .ok_or_else(|| "histogram header truncated".to_string())?;
        Ok(b.iter().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    };
    // the whole header, before any field is read or the payload sliced off
    if bytes.len() < V2_HEADER_BYTES {
        return Err("histogram header truncated".into());
    }
    // V2, uncompressed: a compressed one would hide its real header
    if field(0, 4)? != V2_COOKIE {
        return Err("not an uncompressed V2 histogram".into());
    }
    // the deserializer sizes a buffer by the payload length before reading it
    if field(4, 4)? != bytes.len().saturating_sub(V2_HEADER_BYTES) as u64 {
        return Err("histogram payload length does not match its bytes".into());
    }
    let (sigfigs, lowest, highest) = (field(12, 4)?, field(16, 8)?, field(24, 8)?);
    if sigfigs != u64::from(LATENCY_SIGFIGS) || lowest != 1 || highest != LATENCY_MAX_NS {
        return Err(format!(
            "histogram bounds {lowest}..{highest} at {sigfigs} digits, expected 1..{LATENCY_MAX_NS} at {LATENCY_SIGFIGS}"
        ));
    }
    check_payload(&bytes[V2_HEADER_BYTES..])?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("bad histogram: {e:?}"))
}

/// Most samples one histogram a reader accepts may hold (2^53: 28 years at ten
/// million a second), so that summing up to 1,024 shards' cannot overflow.
pub const HISTOGRAM_SAMPLES_MAX: u64 = 1 << 53;

/// Walks a V2 payload (zig-zag LEB128 numbers, at most 9 bytes each, the 9th taking
/// 8 bits: a count, or minus a run of zero counts) before the deserializer does, and
/// refuses what would overflow its arithmetic: a run of `i64::MIN` zeros, or more
/// than [`HISTOGRAM_SAMPLES_MAX`] samples in all.
fn check_payload(payload: &[u8]) -> Result<(), String> {
    let mut at = 0;
    let mut samples = 0u64;
    while at < payload.len() {
        let mut raw = 0u64;
        let mut len = 0;
        loop {
            let b = *payload
                .get(at + len)
                .ok_or_else(|| "histogram payload cut in a number".to_string())?;
            if len == 8 {
                raw |= u64::from(b) << 56;
                len += 1;
                break;
            }
            raw |= u64::from(b & 0x7f) << (7 * len);
            len += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        at += len;
        let n = ((raw >> 1) as i64) ^ -((raw & 1) as i64);
        if n == i64::MIN {
            return Err("histogram payload has an impossible run of zeros".into());
        }
        if n > 0 {
            samples = samples
                .checked_add(n as u64)
                .filter(|&s| s <= HISTOGRAM_SAMPLES_MAX)
                .ok_or_else(|| "histogram holds too many samples".to_string())?;
        }
    }
    Ok(())
}

/// What a STATS reply says about a node (or one shard), decoded.
#[derive(Debug, Clone)]
pub struct NodeStats {
    /// Shards whose figures are summed here.
    pub shards: u16,
    /// Counters since the node started, by name.
    pub counters: Vec<(String, u64)>,
    /// Latency histograms (ns) since the node started, by operation name.
    pub latencies: Vec<(String, Histogram<u64>)>,
}

impl NodeStats {
    /// Decodes the fields of a STATS_OK reply (`peer::ClusterReply::StatsOk`): at most
    /// [`STATS_ENTRIES_MAX`] of each, names that pass [`is_stats_name`], none twice.
    pub fn decode(
        shards: u16,
        counters: &[(&[u8], u64)],
        latencies: &[(&[u8], &[u8])],
    ) -> Result<NodeStats, String> {
        if counters.len() > STATS_ENTRIES_MAX || latencies.len() > STATS_ENTRIES_MAX {
            return Err(format!(
                "{} counters and {} histograms: at most {STATS_ENTRIES_MAX} of each",
                counters.len(),
                latencies.len()
            ));
        }
        let names = counters
            .iter()
            .map(|(n, _)| n)
            .chain(latencies.iter().map(|(n, _)| n));
        let mut seen = std::collections::HashSet::new();
        for n in names {
            if !std::str::from_utf8(n).is_ok_and(is_stats_name) {
                return Err(format!("bad stats name {:?}", String::from_utf8_lossy(n)));
            }
            if !seen.insert(*n) {
                return Err(format!("stats name {} twice", String::from_utf8_lossy(n)));
            }
        }
        let name = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ok(NodeStats {
            shards,
            counters: counters.iter().map(|&(n, v)| (name(n), v)).collect(),
            latencies: latencies
                .iter()
                .map(|&(n, h)| Ok((name(n), decode_histogram(h)?)))
                .collect::<Result<_, String>>()?,
        })
    }

    /// Parses a reply to STATS: a STATS_OK decoded as [`NodeStats::decode`] does, or
    /// the reason it is not one (an ERROR's message included).
    pub fn parse_reply(frame: &[u8]) -> Result<NodeStats, String> {
        match crate::peer::ClusterReply::parse(frame) {
            Ok((
                _,
                crate::peer::ClusterReply::StatsOk {
                    shards,
                    counters,
                    latencies,
                },
            )) => NodeStats::decode(shards, &counters, &latencies),
            _ => Err(match crate::protocol::Reply::parse(frame) {
                Ok((_, crate::protocol::Reply::Error { message, .. })) => {
                    String::from_utf8_lossy(message).into_owned()
                }
                _ => "not a reply to STATS".into(),
            }),
        }
    }

    /// Appends the STATS_OK frame carrying these figures to `out`.
    pub fn encode_reply(&self, request_id: u64, out: &mut Vec<u8>) {
        let encoded: Vec<Vec<u8>> = self
            .latencies
            .iter()
            .map(|(_, h)| {
                let mut bytes = Vec::new();
                encode_histogram(h, &mut bytes);
                bytes
            })
            .collect();
        crate::peer::ClusterReply::StatsOk {
            shards: self.shards,
            counters: self
                .counters
                .iter()
                .map(|(n, v)| (n.as_bytes(), *v))
                .collect(),
            latencies: self
                .latencies
                .iter()
                .zip(&encoded)
                .map(|((n, _), bytes)| (n.as_bytes(), bytes.as_slice()))
                .collect(),
        }
        .encode(request_id, out);
    }

    /// Adds `other`'s figures to these (counters summed, histograms merged, names
    /// this set lacks appended).
    pub fn merge(&mut self, other: &NodeStats) {
        self.shards = self.shards.saturating_add(other.shards);
        for (name, value) in &other.counters {
            match self.counters.iter_mut().find(|(n, _)| n == name) {
                Some((_, v)) => *v = v.saturating_add(*value),
                None => self.counters.push((name.clone(), *value)),
            }
        }
        for (name, h) in &other.latencies {
            match self.latencies.iter_mut().find(|(n, _)| n == name) {
                // same bounds on both sides (checked at decode): cannot fail
                Some((_, mine)) => {
                    let _ = mine.add(h);
                }
                None => self.latencies.push((name.clone(), h.clone())),
            }
        }
    }

    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    pub fn latency(&self, name: &str) -> Option<&Histogram<u64>> {
        self.latencies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h)
    }
}

/// Values that say what is held now (Prometheus gauges); every other counter counts
/// from the node's start (a Prometheus counter, named with `_total`).
const GAUGES: &[&str] = &[
    "connections_open",
    "connection_bytes",
    "keys",
    "versions",
    "segments",
    "log_bytes",
    "log_dead_bytes",
    "partitions_needing_repair",
    "partitions_failed",
    "commit_log_failed",
    "hints_pending",
];

/// The quantiles a Prometheus summary of a latency histogram carries.
const SUMMARY_QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];

/// `stats` in Prometheus's text exposition format (version 0.0.4): one metric
/// `ringkv_NAME` per counter (`ringkv_NAME_total` for those that count from the start),
/// `ringkv_shards`, and the latencies as one summary `ringkv_latency_seconds` with an
/// `op` label (quantiles 0.5, 0.9, 0.99, 0.999 and 1, `_sum`, `_count`; `NaN`
/// quantiles while an operation has no sample).
pub fn prometheus_text(stats: &NodeStats) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HELP ringkv_shards Shards whose figures are summed here."
    );
    let _ = writeln!(s, "# TYPE ringkv_shards gauge");
    let _ = writeln!(s, "ringkv_shards {}", stats.shards);
    for (name, value) in &stats.counters {
        let (metric, kind) = if GAUGES.contains(&name.as_str()) {
            (format!("ringkv_{name}"), "gauge")
        } else {
            (format!("ringkv_{name}_total"), "counter")
        };
        let _ = writeln!(s, "# HELP {metric} ringkv stats value {name}.");
        let _ = writeln!(s, "# TYPE {metric} {kind}");
        let _ = writeln!(s, "{metric} {value}");
    }
    let _ = writeln!(
        s,
        "# HELP ringkv_latency_seconds Request and group-commit latency on the node, by operation."
    );
    let _ = writeln!(s, "# TYPE ringkv_latency_seconds summary");
    for (op, h) in &stats.latencies {
        for q in SUMMARY_QUANTILES {
            if h.is_empty() {
                let _ = writeln!(
                    s,
                    "ringkv_latency_seconds{{op=\"{op}\",quantile=\"{q}\"}} NaN"
                );
            } else {
                let v = h.value_at_quantile(q) as f64 / 1e9;
                let _ = writeln!(
                    s,
                    "ringkv_latency_seconds{{op=\"{op}\",quantile=\"{q}\"}} {v}"
                );
            }
        }
        let sum = if h.is_empty() {
            0.0
        } else {
            h.mean() * h.len() as f64 / 1e9
        };
        let _ = writeln!(s, "ringkv_latency_seconds_sum{{op=\"{op}\"}} {sum}");
        let _ = writeln!(s, "ringkv_latency_seconds_count{{op=\"{op}\"}} {}", h.len());
    }
    s
}

/// HdrHistogram's percentile distribution text (`outputPercentileDistribution`, 5
/// ticks per half distance, the `.hgrm` format), values in microseconds from a
/// histogram in ns.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total = total.saturating_add(v.count_since_last_iteration());
            let value = h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(
                    s,
                    "{value:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        s,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        h.distinct_values()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A histogram of 32 to 39 bytes with a valid-looking header and a payload length
    /// of 0 sliced its payload off past its end: a panic in `ringkv stats` (and in the
    /// fuzz target, which decodes every STATS_OK) on a reply from a bad node.
    #[test]
    fn a_histogram_shorter_than_its_header_is_refused_not_panicked_on() {
        let mut header = Vec::new();
        header.extend_from_slice(&V2_COOKIE.to_be_bytes()[4..]);
        header.extend_from_slice(&0u32.to_be_bytes());
        header.extend_from_slice(&0u32.to_be_bytes());
        header.extend_from_slice(&u32::from(LATENCY_SIGFIGS).to_be_bytes());
        header.extend_from_slice(&1u64.to_be_bytes());
        header.extend_from_slice(&LATENCY_MAX_NS.to_be_bytes());
        assert_eq!(header.len(), 32);
        for len in 0..V2_HEADER_BYTES {
            let mut bytes = header.clone();
            bytes.resize(len, 0);
            assert!(decode_histogram(&bytes).is_err(), "{len} bytes");
        }
    }

    #[test]
    fn a_histogram_round_trips_and_merges() {
        let mut a = latency_histogram();
        for v in [1_000, 2_000, 3_000, 1_000_000] {
            a.record(v).unwrap();
        }
        let mut bytes = Vec::new();
        encode_histogram(&a, &mut bytes);
        let back = decode_histogram(&bytes).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), a.max());
        let one = NodeStats {
            shards: 1,
            counters: vec![("requests".into(), 4)],
            latencies: vec![("get".into(), back)],
        };
        let mut node = one.clone();
        node.merge(&one);
        assert_eq!(node.shards, 2);
        assert_eq!(node.counter("requests"), Some(8));
        assert_eq!(node.latency("get").unwrap().len(), 8);
    }

    #[test]
    fn other_bounds_and_garbage_are_refused_before_allocating() {
        let mut bytes = Vec::new();
        let h = Histogram::<u64>::new_with_bounds(1, 1_000_000, 2).unwrap();
        encode_histogram(&h, &mut bytes);
        assert!(decode_histogram(&bytes).unwrap_err().contains("bounds"));
        assert!(decode_histogram(&[1, 2, 3]).is_err());
        // a compressed serialization is refused (its real header is inside the deflate)
        let mut compressed = Vec::new();
        hdrhistogram::serialization::V2DeflateSerializer::new()
            .serialize(&latency_histogram(), &mut compressed)
            .unwrap();
        assert!(decode_histogram(&compressed)
            .unwrap_err()
            .contains("uncompressed"));
        let mut good = Vec::new();
        encode_histogram(&latency_histogram(), &mut good);
        good.truncate(good.len() - 1);
        // a cut payload, or a header claiming a larger payload than it has (the
        // deserializer would allocate that much), is refused
        assert!(decode_histogram(&good).unwrap_err().contains("length"));
        let mut huge = Vec::new();
        encode_histogram(&latency_histogram(), &mut huge);
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_histogram(&huge).unwrap_err().contains("length"));
    }

    #[test]
    fn prometheus_text_names_counters_gauges_and_latency_summaries() {
        let mut get = latency_histogram();
        get.record(2_000).unwrap();
        get.record(4_000).unwrap();
        let stats = NodeStats {
            shards: 2,
            counters: vec![("requests".into(), 7), ("keys".into(), 3)],
            latencies: vec![("get".into(), get), ("put".into(), latency_histogram())],
        };
        let text = prometheus_text(&stats);
        for line in [
            "ringkv_shards 2",
            "# TYPE ringkv_requests_total counter",
            "ringkv_requests_total 7",
            "# TYPE ringkv_keys gauge",
            "ringkv_keys 3",
            "# TYPE ringkv_latency_seconds summary",
            "ringkv_latency_seconds_count{op=\"get\"} 2",
            "ringkv_latency_seconds{op=\"put\",quantile=\"0.5\"} NaN",
            "ringkv_latency_seconds_count{op=\"put\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let p50 = text
            .lines()
            .find_map(|l| l.strip_prefix("ringkv_latency_seconds{op=\"get\",quantile=\"0.5\"} "))
            .unwrap();
        let p50: f64 = p50.parse().unwrap();
        assert!((1.9e-6..2.1e-6).contains(&p50), "{p50}");
    }

    #[test]
    fn payloads_that_would_overflow_the_deserializer_are_refused() {
        let mut h = latency_histogram();
        h.record_n(1_000, 5).unwrap();
        h.record_n(9_000_000, 7).unwrap();
        let mut good = Vec::new();
        encode_histogram(&h, &mut good);
        check_payload(&good[V2_HEADER_BYTES..]).unwrap();
        assert_eq!(decode_histogram(&good).unwrap().len(), 12);
        let with_payload = |payload: &[u8]| {
            let mut bytes = good[..V2_HEADER_BYTES].to_vec();
            bytes[4..8].copy_from_slice(&(payload.len() as u32).to_be_bytes());
            bytes.extend_from_slice(payload);
            decode_histogram(&bytes)
        };
        // nine 0xFF bytes: zig-zag i64::MIN, a run of zeros that cannot be negated
        assert!(with_payload(&[0xff; 9]).unwrap_err().contains("zeros"));
        // two counts of 2^62 each: past the sample limit (and near u64 overflow)
        let big = |n: u64| {
            let mut v = Vec::new();
            let mut z = n << 1; // zig-zag of a positive number
            for _ in 0..8 {
                let more = z >> 7 != 0;
                v.push((z & 0x7f) as u8 | if more { 0x80 } else { 0 });
                z >>= 7;
                if !more {
                    return v;
                }
            }
            v.push(z as u8);
            v
        };
        let two: Vec<u8> = [big(1 << 62), big(1 << 62)].concat();
        assert!(with_payload(&two).unwrap_err().contains("too many samples"));
        assert!(with_payload(&[0x80]).unwrap_err().contains("cut"));
        // a small valid payload of counts is accepted
        assert_eq!(with_payload(&[2, 4]).unwrap().len(), 3);
    }

    #[test]
    fn replies_with_bad_names_or_too_many_entries_are_refused() {
        let mut h = Vec::new();
        encode_histogram(&latency_histogram(), &mut h);
        let ok = NodeStats::decode(1, &[(b"keys", 1)], &[(b"get", &h)]).unwrap();
        assert_eq!(ok.counter("keys"), Some(1));
        for bad in [
            &b"../x"[..],
            b"/etc/x",
            b"",
            b"GET",
            b"a\x1b[2J",
            &[b'a'; 33],
        ] {
            assert!(NodeStats::decode(1, &[(bad, 1)], &[]).is_err(), "{bad:?}");
            assert!(NodeStats::decode(1, &[], &[(bad, &h)]).is_err(), "{bad:?}");
        }
        assert!(NodeStats::decode(1, &[(b"keys", 1), (b"keys", 2)], &[]).is_err());
        let many: Vec<(&[u8], &[u8])> = (0..=STATS_ENTRIES_MAX)
            .map(|_| (&b"get"[..], &h[..]))
            .collect();
        assert!(NodeStats::decode(1, &[], &many)
            .unwrap_err()
            .contains("at most"));
    }
}

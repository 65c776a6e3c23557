//! Output of a run: the summary table, `.hgrm` percentile distributions, the JSON
//! result file and the latency plot that overlays several runs.

use crate::latency_histogram;
use crate::workload::OpKind;
use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

/// Latency in microseconds at quantile `q` of a histogram in nanoseconds.
pub fn us_at(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// `812.4 us` or `3.21 ms`.
pub fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.1} us")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

/// `1,234,567`.
pub fn fmt_count(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// One row of a summary: what, how many, how fast, and the percentiles.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub op: String,
    pub count: u64,
    pub ops_s: f64,
    pub hist: Histogram<u64>,
}

/// A plain-text table (ops/s, p50, p90, p99, p999, max per row).
pub fn summary_table(rows: &[Row]) -> String {
    let label_w = rows.iter().map(|r| r.label.len()).max().unwrap_or(5).max(5);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<label_w$}  {:<7} {:>11} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "run", "op", "count", "ops/s", "p50", "p90", "p99", "p999", "max"
    );
    for r in rows {
        let h = &r.hist;
        let _ = writeln!(
            s,
            "{:<label_w$}  {:<7} {:>11} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
            r.label,
            r.op,
            fmt_count(r.count as f64),
            fmt_count(r.ops_s),
            fmt_us(us_at(h, 0.5)),
            fmt_us(us_at(h, 0.9)),
            fmt_us(us_at(h, 0.99)),
            fmt_us(us_at(h, 0.999)),
            fmt_us(h.max() as f64 / 1000.0),
        );
    }
    s
}

/// The same as a Markdown table.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| run | op | ops/s | p50 | p90 | p99 | p999 | max |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let h = &r.hist;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            r.op,
            fmt_count(r.ops_s),
            fmt_us(us_at(h, 0.5)),
            fmt_us(us_at(h, 0.9)),
            fmt_us(us_at(h, 0.99)),
            fmt_us(us_at(h, 0.999)),
            fmt_us(h.max() as f64 / 1000.0),
        );
    }
    s
}

/// HdrHistogram's percentile distribution text (the `.hgrm` format), values in
/// microseconds from a histogram in ns: the same writer `ringkv stats --hgrm` uses.
pub use ringkv_net::stats::hgrm;

/// A parsed `.hgrm`: rows of (value in us, percentile, total count), and the footer.
#[derive(Debug, Clone, PartialEq)]
pub struct Hgrm {
    pub rows: Vec<(f64, f64, u64)>,
    pub mean_us: f64,
    pub max_us: f64,
    pub total_count: u64,
}

fn footer_field(line: &str, name: &str) -> Option<f64> {
    let rest = &line[line.find(name)? + name.len()..];
    let rest = rest.trim_start().strip_prefix('=')?;
    rest.split([',', ']']).next()?.trim().parse().ok()
}

pub fn parse_hgrm(text: &str) -> anyhow::Result<Hgrm> {
    let mut out = Hgrm {
        rows: Vec::new(),
        mean_us: f64::NAN,
        max_us: f64::NAN,
        total_count: 0,
    };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("#[") {
            if let Some(v) = footer_field(line, "Mean") {
                out.mean_us = v;
            }
            if let Some(v) = footer_field(line, "Max") {
                out.max_us = v;
            }
            if let Some(v) = footer_field(line, "Total count") {
                out.total_count = v as u64;
            }
            continue;
        }
        if line.starts_with("Value") {
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 3 {
            bail!("bad .hgrm row {line:?}");
        }
        out.rows.push((
            cols[0]
                .parse()
                .with_context(|| format!("value in {line:?}"))?,
            cols[1]
                .parse()
                .with_context(|| format!("percentile in {line:?}"))?,
            cols[2]
                .parse()
                .with_context(|| format!("count in {line:?}"))?,
        ));
    }
    Ok(out)
}

impl Hgrm {
    /// Rebuilds a histogram (ns) from the rows: each row's new counts at its value.
    pub fn to_histogram(&self) -> anyhow::Result<Histogram<u64>> {
        let mut h = latency_histogram();
        let mut previous = 0;
        for &(us, _, total) in &self.rows {
            if total > previous {
                h.record_n(((us * 1000.0).round() as u64).max(1), total - previous)?;
                previous = total;
            }
        }
        Ok(h)
    }
}

/// Points of a percentile curve: (percentile in %, latency in us).
pub fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_quantiles(5)
        .map(|v| {
            (
                v.quantile_iterated_to() * 100.0,
                h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
            )
        })
        .collect()
}

/// The JSON of one operation's figures.
pub fn op_json(count: u64, ops_s: f64, h: &Histogram<u64>) -> Value {
    json!({
        "count": count,
        "throughput_ops_s": ops_s,
        "mean_us": h.mean() / 1000.0,
        "p50_us": us_at(h, 0.5),
        "p90_us": us_at(h, 0.9),
        "p99_us": us_at(h, 0.99),
        "p999_us": us_at(h, 0.999),
        "p9999_us": us_at(h, 0.9999),
        "max_us": h.max() as f64 / 1000.0,
        "percentiles": percentile_curve(h).iter().map(|&(p, us)| json!([p, us])).collect::<Vec<_>>(),
    })
}

/// `ops` object of a result: every operation that ran, and `all`.
pub fn ops_json(histograms: &[Histogram<u64>], all: &Histogram<u64>, elapsed_s: f64) -> Value {
    let mut ops = serde_json::Map::new();
    for op in OpKind::ALL {
        let h = &histograms[op.index()];
        if !h.is_empty() {
            ops.insert(
                op.name().into(),
                op_json(h.len(), h.len() as f64 / elapsed_s, h),
            );
        }
    }
    ops.insert(
        "all".into(),
        op_json(all.len(), all.len() as f64 / elapsed_s, all),
    );
    Value::Object(ops)
}

/// A curve to plot: a label and (percentile %, latency us) points.
#[derive(Debug, Clone)]
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// The curve of `op` (e.g. "all", "read") in a result JSON.
pub fn curve_from_json(result: &Value, op: &str) -> anyhow::Result<Curve> {
    let label = result["label"].as_str().unwrap_or("run").to_string();
    let points = result["ops"][op]["percentiles"]
        .as_array()
        .with_context(|| format!("no percentiles of {op} in result {label}"))?
        .iter()
        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect();
    Ok(Curve { label, points })
}

/// x position of a percentile: 0 at 0%, 1 at 90%, 2 at 99%, 3 at 99.9% ...
fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(1e-6);
    (-rest.log10()).min(6.0)
}

/// Writes an SVG percentile plot (latency against percentile, log scales) of
/// several curves.
pub fn plot(path: &Path, title: &str, curves: &[Curve]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let points: Vec<Vec<(f64, f64)>> = curves
        .iter()
        .map(|c| {
            c.points
                .iter()
                .map(|&(p, us)| (nines(p), us.max(0.1)))
                .collect()
        })
        .collect();
    let x_max = points
        .iter()
        .flatten()
        .map(|p| p.0)
        .fold(3.0f64, f64::max)
        .ceil();
    let y_max = points.iter().flatten().map(|p| p.1).fold(10.0f64, f64::max) * 1.5;
    let y_min = points
        .iter()
        .flatten()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.1, y_max / 10.0)
        / 1.5;
    let root = SVGBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            let s = format!("{p:.4}");
            format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
        })
        .y_label_formatter(&|y| fmt_us(*y))
        .x_desc("percentile")
        .y_desc("latency")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (i, (curve, pts)) in curves.iter().zip(points).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(curve.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = latency_histogram();
        let mut x = 12345u64;
        for i in 0..100_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // 20 us .. 2 ms, with a tail to 50 ms
            let ns = 20_000 + (x >> 33) % 2_000_000 + if i % 1000 == 0 { 50_000_000 } else { 0 };
            h.record(ns).unwrap();
        }
        h
    }

    #[test]
    fn hgrm_export_round_trips() {
        let h = sample();
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        let parsed = parse_hgrm(&text).unwrap();
        assert_eq!(parsed.total_count, h.len());
        assert_eq!(parsed.rows.last().unwrap().2, h.len());
        assert!((parsed.max_us - h.max() as f64 / 1000.0).abs() < 0.01);
        assert!((parsed.mean_us - h.mean() / 1000.0).abs() < 0.01);
        // percentiles never go down, counts never go down
        assert!(parsed
            .rows
            .windows(2)
            .all(|w| w[0].1 <= w[1].1 && w[0].2 <= w[1].2));
        let rebuilt = parsed.to_histogram().unwrap();
        assert_eq!(rebuilt.len(), h.len());
        for q in [0.5, 0.9, 0.99, 0.999] {
            let (a, b) = (us_at(&h, q), us_at(&rebuilt, q));
            assert!((a - b).abs() <= a * 0.002 + 0.01, "q {q}: {a} vs {b}");
        }
        assert!((us_at(&h, 1.0) - us_at(&rebuilt, 1.0)).abs() < us_at(&h, 1.0) * 0.002);
    }

    #[test]
    fn json_has_the_promised_fields_and_the_plot_is_an_svg() {
        let h = sample();
        let mut per_op: Vec<Histogram<u64>> =
            OpKind::ALL.iter().map(|_| latency_histogram()).collect();
        per_op[OpKind::Read.index()] = h.clone();
        let result = json!({"label": "x", "ops": ops_json(&per_op, &h, 2.0)});
        for field in ["p50_us", "p99_us", "p999_us", "throughput_ops_s"] {
            assert!(
                result["ops"]["read"][field].as_f64().unwrap() > 0.0,
                "{field}"
            );
        }
        assert!(result["ops"].get("update").is_none());
        let curve = curve_from_json(&result, "all").unwrap();
        let dir = std::env::temp_dir().join(format!("ringkv-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.svg");
        let mut other = curve.clone();
        other.label = "y".into();
        other.points.iter_mut().for_each(|p| p.1 *= 2.0);
        plot(&path, "test", &[curve, other]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("polyline") || svg.contains("<path"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

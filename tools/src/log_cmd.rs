//! `ringkv logdump` and `ringkv logcheck`: offline inspection of a partition folder
//! (or a single segment file), or of a shard's commit log folder (or one `.clog`
//! file). They read files with `std::fs`, never change them, and work on a stopped
//! node's data or on files copied from one.

use anyhow::{bail, Context as _};
use ringkv_engine::commit_log;
use ringkv_engine::record;
use ringkv_engine::segment::{self, ScanResult};
use ringkv_engine::version::Version;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The segment files named by `arg`: the `.seg` files of a folder, or one file.
fn segments_of(arg: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let meta = std::fs::metadata(arg).with_context(|| format!("cannot read {}", arg.display()))?;
    let mut out = Vec::new();
    if meta.is_dir() {
        for entry in std::fs::read_dir(arg)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Some((id, "seg")) = segment::parse_name(name) {
                out.push((id, path));
            }
        }
        out.sort();
    } else {
        let name = arg.file_name().and_then(|n| n.to_str()).unwrap_or("");
        match segment::parse_name(name) {
            Some((id, "seg")) => out.push((id, arg.to_path_buf())),
            _ => bail!(
                "{} is not a segment file (NNNNNNNNNNNNNNNN.seg)",
                arg.display()
            ),
        }
    }
    Ok(out)
}

/// The commit log files named by `arg`, oldest first: the `.clog` files of a folder,
/// or one file; empty when `arg` is neither.
fn commit_logs_of(arg: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let name_of = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(commit_log::parse_name)
    };
    let meta = std::fs::metadata(arg).with_context(|| format!("cannot read {}", arg.display()))?;
    let mut out = Vec::new();
    if meta.is_dir() {
        for entry in std::fs::read_dir(arg)? {
            let path = entry?.path();
            if let Some(g) = name_of(&path) {
                out.push((g, path));
            }
        }
        out.sort();
    } else if let Some(g) = name_of(arg) {
        out.push((g, arg.to_path_buf()));
    }
    Ok(out)
}

fn one_path(args: &[String], command: &str) -> anyhow::Result<PathBuf> {
    match args {
        [path] => Ok(PathBuf::from(path)),
        _ => bail!("usage: ringkv {command} DIR|SEGMENT_FILE|COMMIT_LOG_FILE"),
    }
}

/// One record as a line of `logdump`.
fn record_line(at: usize, rec: &record::Record<'_>) -> String {
    let replaced: Vec<String> = rec.replaced().map(|s| s.to_string()).collect();
    let value = match rec.value {
        None => "TOMBSTONE".to_string(),
        Some(v) => format!("value[{}]={}", v.len(), show(v, 48)),
    };
    format!(
        "{at:>10} seq={} ts={} key={} replaces=[{}] {} {}{}",
        rec.header.seq,
        rec.header.timestamp_ms,
        show(rec.key, 64),
        replaced.join(","),
        describe_version(rec.version),
        value,
        if rec.header.batch_continues() {
            " (batch continues)"
        } else {
            ""
        },
    )
}

/// `logdump` of commit log files: every entry, and the records of its payload.
fn dump_commit_logs(files: &[(u64, PathBuf)]) -> anyhow::Result<ExitCode> {
    for (generation, file) in files {
        let bytes = std::fs::read(file)?;
        let decoded = commit_log::decode_entries(&bytes, *generation);
        println!(
            "# commit log {generation:016x} ({} bytes) {}",
            bytes.len(),
            file.display()
        );
        for e in &decoded.entries {
            println!(
                "# entry: partition {} segment {:016x} at {} ({} bytes)",
                e.log_id,
                e.segment,
                e.offset,
                e.bytes.len()
            );
            let mut at = 0usize;
            while at < e.bytes.len() {
                match record::decode(&e.bytes[at..]) {
                    Ok(rec) => {
                        println!("{}", record_line(e.offset as usize + at, &rec));
                        at += rec.total_bytes();
                    }
                    Err(err) => {
                        println!("#   undecodable record at {at} of the payload: {err}");
                        break;
                    }
                }
            }
        }
        if decoded.corrupt_bytes > 0 {
            println!(
                "#   CORRUPT: {} bytes in {} places between valid entries",
                decoded.corrupt_bytes, decoded.corrupt_regions
            );
        }
        let torn = decoded.torn_bytes;
        if torn > 0 {
            println!("#   {torn} non-zero bytes after the last entry (a torn or unsynced write)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `logcheck` of commit log files: damage between entries is corruption (exit 1);
/// bytes after the last entry are a warning (never acknowledged).
fn check_commit_logs(files: &[(u64, PathBuf)]) -> anyhow::Result<ExitCode> {
    let (mut entries, mut problems) = (0usize, Vec::new());
    for (generation, file) in files {
        let bytes = std::fs::read(file)?;
        let decoded = commit_log::decode_entries(&bytes, *generation);
        entries += decoded.entries.len();
        if decoded.corrupt_bytes > 0 {
            problems.push(format!(
                "commit log {generation:016x}: {} corrupt bytes in {} places before valid entries",
                decoded.corrupt_bytes, decoded.corrupt_regions
            ));
        }
        let torn = decoded.torn_bytes;
        if torn > 0 {
            println!(
                "warning: commit log {generation:016x}: {torn} non-zero bytes after the last \
                 entry (a torn or unsynced write: never acknowledged)"
            );
        }
    }
    if problems.is_empty() {
        println!(
            "ok: {} commit log files, {entries} entries, every CRC verified",
            files.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for p in &problems {
        println!("CORRUPTION: {p}");
    }
    println!(
        "{} problems ({entries} valid entries); writes in the damaged entries are lost \
         unless their segments hold them: the shard's partitions need repair from replicas",
        problems.len()
    );
    Ok(ExitCode::from(1))
}

/// Bytes shown as text where printable, escaped otherwise, cut after `max` bytes.
fn show(bytes: &[u8], max: usize) -> String {
    let mut out: String = bytes[..bytes.len().min(max)]
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if bytes.len() > max {
        out.push_str(&format!("...(+{} bytes)", bytes.len() - max));
    }
    out
}

fn describe_version(blob: &[u8]) -> String {
    match Version::decode(blob) {
        Ok(v) => format!(
            "dot=({}:{}).{} past={} entries",
            v.dot.actor.node,
            v.dot.actor.epoch,
            v.dot.counter,
            v.past.len()
        ),
        Err(_) => format!("blob[{}]={}", blob.len(), show(blob, 24)),
    }
}

pub fn logdump(args: &[String]) -> anyhow::Result<ExitCode> {
    let path = one_path(args, "logdump")?;
    let logs = commit_logs_of(&path)?;
    if !logs.is_empty() {
        return dump_commit_logs(&logs);
    }
    for (id, file) in segments_of(&path)? {
        let bytes = std::fs::read(&file)?;
        let scan = segment::scan(&bytes, id);
        println!(
            "# segment {id:016x} ({} bytes) {}",
            bytes.len(),
            file.display()
        );
        if let Some(err) = &scan.header_error {
            println!("#   unreadable header: {err}");
            continue;
        }
        for r in &scan.records {
            let at = r.offset as usize;
            let Ok(rec) = record::decode(&bytes[at..]) else {
                continue;
            };
            println!("{}", record_line(at, &rec));
        }
        print_problems(&scan);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_problems(scan: &ScanResult) {
    for bad in &scan.corrupt {
        println!(
            "#   CORRUPT bytes {}..{}: {}",
            bad.start, bad.end, bad.error
        );
    }
    if let Some(bad) = &scan.torn_tail {
        println!(
            "#   torn tail at bytes {}..{}: {}",
            bad.start, bad.end, bad.error
        );
    }
    if scan.incomplete_batch_records > 0 {
        println!(
            "#   {} records of an unfinished batch",
            scan.incomplete_batch_records
        );
    }
}

pub fn logcheck(args: &[String]) -> anyhow::Result<ExitCode> {
    let path = one_path(args, "logcheck")?;
    let logs = commit_logs_of(&path)?;
    if !logs.is_empty() {
        return check_commit_logs(&logs);
    }
    let segments = segments_of(&path)?;
    let last = segments.last().map(|(id, _)| *id);
    let (mut records, mut problems, mut warnings) = (0u64, Vec::new(), Vec::new());
    for (id, file) in &segments {
        let bytes = std::fs::read(file)?;
        let scan = segment::scan(&bytes, *id);
        let hint_path = file.with_extension("hint");
        let hinted = hint_path.exists();
        if let Some(err) = &scan.header_error {
            problems.push(format!("segment {id:016x}: unreadable header: {err}"));
            continue;
        }
        records += scan.records.len() as u64;
        for bad in &scan.corrupt {
            problems.push(format!(
                "segment {id:016x}: corrupt bytes {}..{} ({} bytes): {}",
                bad.start,
                bad.end,
                bad.end - bad.start,
                bad.error
            ));
        }
        if let Some(bad) = &scan.torn_tail {
            let msg = format!(
                "segment {id:016x}: torn tail at {}..{}: {}",
                bad.start, bad.end, bad.error
            );
            if Some(*id) == last && !hinted {
                warnings.push(format!("{msg} (unacknowledged writes; cut on next open)"));
            } else {
                problems.push(msg);
            }
        }
        if hinted {
            let hint = std::fs::read(&hint_path)?;
            match segment::decode_hint(&hint, *id, bytes.len() as u64) {
                Ok(entries) => {
                    let offsets: Vec<u64> = scan.records.iter().map(|r| r.offset).collect();
                    let hinted_offsets: Vec<u64> = entries.iter().map(|e| e.offset).collect();
                    if offsets != hinted_offsets {
                        problems.push(format!(
                            "hint {id:016x}: lists {} records, the segment holds {}",
                            entries.len(),
                            scan.records.len()
                        ));
                    }
                }
                Err(err) => problems.push(format!("hint {id:016x}: {err}")),
            }
        }
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    if problems.is_empty() {
        println!(
            "ok: {} segments, {records} records, every CRC verified",
            segments.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            println!("CORRUPTION: {p}");
        }
        println!(
            "{} problems in {} segments ({records} valid records); the partition needs repair from replicas",
            problems.len(),
            segments.len()
        );
        Ok(ExitCode::from(1))
    }
}

//! `ringkv`: the one binary of ringkv.
//!
//! Subcommands (each lives in its own module):
//! - `logdump DIR`, `logcheck DIR`: inspect partition log files (`log_cmd`).
//! - `ring ...`: the ring planner for capacity planners (`ring_cmd`).
//! - `server ...`: one node (`server_cmd`).
//! - `ping`, `get`, `put`, `del`: a client for one node (`client_cmd`).
//! - `status`, `join`, `leave`, `dev`: cluster admin and a local dev cluster
//!   (`cluster_cmd`).
//! - `stats`: a node's counters and latency percentiles (`stats_cmd`).
//! - `sim ...`: the deterministic cluster simulator over a range of seeds (`sim_cmd`).

mod client_cmd;
mod cluster_cmd;
mod log_cmd;
mod ring_cmd;
mod server_cmd;
mod sim_cmd;
mod stats_cmd;

use std::process::ExitCode;

const USAGE: &str = "usage: ringkv <command> [args]

commands:
  dev [--nodes K]  start a local cluster of K nodes (default 3) under ./ringkv-data/dev
  server [options] start a node (see `ringkv server --help`)
  status [--json]  a node's view of the cluster: members, status, reachability, partitions
  join SEED        make the node at --addr join the cluster of SEED
  leave            make the node at --addr leave its cluster
  stats [--shard] [--json] [--hgrm DIR]   a node's counters, holdings and latency percentiles
  ping | get KEY | put KEY VALUE | del KEY   talk to a node (--addr, --context, --json)
  logdump DIR     print every record of a partition folder (or one segment file),
                  or every entry of a commit log folder (or one .clog file)
  logcheck DIR    verify every record (or commit log entry) CRC; exits non-zero with a
                  report on corruption
  ring ...        ring planner: partitions per node and partitions moved (see `ringkv ring --help`)
  sim ...         deterministic cluster simulator: --seed S --runs K (see `ringkv sim --help`)
";

fn wants_help(args: &[String]) -> bool {
    // after "--" every argument is a key or a value
    args.iter()
        .take_while(|arg| *arg != "--")
        .any(|arg| arg == "--help" || arg == "-h")
}

/// The opening of a subcommand: `--help` prints `usage` and succeeds; arguments that do
/// not parse print the error with `usage` and exit 2. `Err` carries that exit code.
pub(crate) fn parse_or_usage<T>(
    command: &str,
    usage: &str,
    args: &[String],
    parse: impl FnOnce(&[String]) -> anyhow::Result<T>,
) -> Result<T, ExitCode> {
    if wants_help(args) {
        print!("{usage}");
        return Err(ExitCode::SUCCESS);
    }
    parse(args).map_err(|err| {
        eprintln!("ringkv {command}: {err:#}\n\n{usage}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    // `std::env::args` panics on an argument that is not Unicode: say which instead
    let args: Vec<String> = match std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect::<Result<_, _>>()
    {
        Ok(args) => args,
        Err(bad) => {
            eprintln!(
                "ringkv: argument {} is not valid UTF-8 (keys and values are given as text)",
                bad.to_string_lossy()
            );
            return ExitCode::from(2);
        }
    };
    let Some(command) = args.first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    if !matches!(command.as_str(), "server" | "dev") {
        // a command whose output is piped into `head` ends quietly when the reader
        // goes, as Unix tools do, instead of panicking on the broken pipe (the node
        // keeps Rust's default: a closed client socket must not end the server)
        // SAFETY: restoring the default disposition of one signal at start, before any
        // thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // commands whose hand-written parsers do not go through `parse_or_usage`: `--help`
    // prints their usage and succeeds, as for the others
    let usage = match command.as_str() {
        "ping" | "get" | "put" | "del" => Some(client_cmd::USAGE.to_string()),
        "status" | "join" | "leave" => Some(cluster_cmd::USAGE.to_string()),
        "logdump" | "logcheck" => Some(format!(
            "usage: ringkv {command} DIR|SEGMENT_FILE|COMMIT_LOG_FILE\n"
        )),
        _ => None,
    };
    if let Some(usage) = usage {
        if wants_help(rest) {
            print!("{usage}");
            if !usage.ends_with('\n') {
                println!();
            }
            return ExitCode::SUCCESS;
        }
    }
    let result = match command.as_str() {
        "logdump" => log_cmd::logdump(rest),
        "logcheck" => log_cmd::logcheck(rest),
        "ring" => ring_cmd::run(rest),
        "server" => server_cmd::run(rest),
        "sim" => sim_cmd::run(rest),
        "ping" | "get" | "put" | "del" => client_cmd::run(command, rest),
        "status" => cluster_cmd::status(rest),
        "join" => cluster_cmd::join(rest),
        "leave" => cluster_cmd::leave(rest),
        "dev" => cluster_cmd::dev(rest),
        "stats" => stats_cmd::run(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("ringkv: unknown command '{other}'\n\n{USAGE}");
            Ok(ExitCode::from(2))
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ringkv {command}: {err:#}");
            ExitCode::from(1)
        }
    }
}

//! `ringkv ring`: the ring planner (arrives with the ring issue).
use std::process::ExitCode;

pub fn run(_args: &[String]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the ring planner is not built yet")
}

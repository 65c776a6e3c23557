//! `ringkv logdump` / `ringkv logcheck`.
use std::process::ExitCode;

pub fn logdump(_args: &[String]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}
pub fn logcheck(_args: &[String]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not built yet")
}

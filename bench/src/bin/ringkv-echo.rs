//! `ringkv-echo [--listen 127.0.0.1:7399]`: the io_uring echo server of
//! `ringkv_bench::echo`, as its own process (the physical reference of
//! `ringkv-bench compare`). Runs until killed.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen = match args.as_slice() {
        [] => "127.0.0.1:7399".to_string(),
        [flag, addr] if flag == "--listen" => addr.clone(),
        _ => anyhow::bail!("usage: ringkv-echo [--listen HOST:PORT]"),
    };
    let listener = std::net::TcpListener::bind(&listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!("ringkv-echo listening on {}", listener.local_addr()?);
    ringkv_bench::echo::serve(listener, Arc::new(AtomicBool::new(false)))?;
    Ok(())
}

//! `ringkv ping | get | put | del`: talk to a node with the blocking client.
//!
//! Contexts travel on the command line as hex (what `get` and `put` print).

use anyhow::{bail, Context as _};
use ringkv_net::client::{Client, ClientConfig, Context};
use std::process::ExitCode;

pub const USAGE: &str = "usage: ringkv ping [--addr HOST:PORT]
       ringkv get KEY [--json] [--r R] [--addr HOST:PORT]
       ringkv put KEY VALUE [--context CTX] [--w W] [--addr HOST:PORT]
       ringkv del KEY [--context CTX] [--w W] [--addr HOST:PORT]
(default address 127.0.0.1:7379; CTX is the hex context `get` prints; del without
--context reads the key first and deletes the values it found; after `--` every
argument is a key or a value, even one that starts with `--`)";

struct Args {
    positional: Vec<String>,
    addr: String,
    context: Option<Context>,
    json: bool,
    r: Option<u8>,
    w: Option<u8>,
}

fn parse(args: &[String]) -> anyhow::Result<Args> {
    let mut out = Args {
        positional: Vec::new(),
        addr: "127.0.0.1:7379".into(),
        context: None,
        json: false,
        r: None,
        w: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            // the rest are keys and values, even those that start with "--"
            "--" => {
                out.positional.extend(it.cloned());
                break;
            }
            "--addr" => out.addr = value()?.clone(),
            "--context" => {
                let hex = value()?;
                out.context =
                    Some(Context::from_hex(hex).map_err(|e| anyhow::anyhow!("--context: {e}"))?)
            }
            "--json" => out.json = true,
            "--r" => out.r = Some(value()?.parse().context("--r: a quorum 0..=255")?),
            "--w" => out.w = Some(value()?.parse().context("--w: a quorum 0..=255")?),
            s if s.starts_with("--") => bail!("unknown option {s}\n\n{USAGE}"),
            _ => out.positional.push(a.clone()),
        }
    }
    Ok(out)
}

fn connect(addr: &str) -> anyhow::Result<Client> {
    Client::connect(addr, ClientConfig::default()).with_context(|| format!("cannot reach {addr}"))
}

/// Why `a` does not fit `command` (the arguments are checked before connecting).
fn misfit(command: &str, a: &Args) -> Option<String> {
    let (positional, r, w, context, json) = match command {
        "ping" => (0, false, false, false, false),
        "get" => (1, true, false, false, true),
        "put" => (2, false, true, true, false),
        "del" => (1, false, true, true, false),
        _ => return Some(format!("unknown command {command}")),
    };
    let refused = [
        (a.r.is_some() && !r, "--r"),
        (a.w.is_some() && !w, "--w"),
        (a.context.is_some() && !context, "--context"),
        (a.json && !json, "--json"),
    ];
    if let Some((_, option)) = refused.iter().find(|(bad, _)| *bad) {
        return Some(format!("{command} takes no {option}"));
    }
    (a.positional.len() != positional).then(|| {
        format!(
            "{command} takes {positional} argument{}, not {}",
            if positional == 1 { "" } else { "s" },
            a.positional.len()
        )
    })
}

pub fn run(command: &str, args: &[String]) -> anyhow::Result<ExitCode> {
    let a = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ringkv {command}: {e:#}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(why) = misfit(command, &a) {
        eprintln!("ringkv {command}: {why}\n\n{USAGE}");
        return Ok(ExitCode::from(2));
    }
    let mut client = connect(&a.addr)?;
    match (command, a.positional.as_slice()) {
        ("ping", []) => {
            let t = std::time::Instant::now();
            client.ping()?;
            let hello = client.hello();
            println!(
                "PONG from node {} at {} ({} shards, {} partitions) in {:.0} us",
                hello.node_id,
                a.addr,
                hello.shards,
                hello.partitions,
                t.elapsed().as_secs_f64() * 1e6
            );
        }
        ("get", [key]) => {
            let v = client.get_with(key.as_bytes(), a.r.unwrap_or(0))?;
            if a.json {
                let values: Vec<String> = v
                    .values
                    .iter()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .collect();
                let mut out =
                    serde_json::json!({ "values": values, "context": v.context.to_hex() });
                // A JSON string cannot hold bytes that are not UTF-8: then every sibling
                // is also given exactly, in hex.
                if v.values.iter().any(|b| std::str::from_utf8(b).is_err()) {
                    let hex: Vec<String> = v.values.iter().map(|b| hex(b)).collect();
                    out["values_hex"] = serde_json::json!(hex);
                }
                println!("{out}");
            } else if v.values.is_empty() {
                println!("(not found)");
                println!("context: {}", v.context.to_hex());
            } else {
                for (i, value) in v.values.iter().enumerate() {
                    if v.values.len() > 1 {
                        print!("sibling {}: ", i + 1);
                    }
                    match std::str::from_utf8(value) {
                        Ok(text) => println!("{text}"),
                        Err(_) => println!("(binary, {} bytes) {}", value.len(), hex(value)),
                    }
                }
                println!("context: {}", v.context.to_hex());
            }
        }
        ("put", [key, value]) => {
            let out = client.put_with(
                key.as_bytes(),
                value.as_bytes(),
                a.context.as_ref(),
                a.w.unwrap_or(0),
            )?;
            println!(
                "OK ({} sibling{})",
                out.siblings,
                if out.siblings == 1 { "" } else { "s" }
            );
            println!("context: {}", out.context.to_hex());
            if out.siblings > 1 {
                eprintln!(
                    "the key holds concurrent values this put did not replace, and the \
                     context covers them: `ringkv get {key}` shows them before you reuse it"
                );
            }
        }
        ("del", [key]) => {
            // Without a context a tombstone supersedes nothing: it would stand beside
            // the values as a sibling and a get would still show them. From the command
            // line "delete KEY" means the values there now, so they are read first.
            let context = match &a.context {
                Some(context) => context.clone(),
                None => {
                    let v = client.get_with(key.as_bytes(), 0)?;
                    if v.values.is_empty() {
                        println!("(not found: nothing to delete)");
                        return Ok(ExitCode::SUCCESS);
                    }
                    v.context
                }
            };
            client.delete_with(key.as_bytes(), Some(&context), a.w.unwrap_or(0))?;
            println!("OK");
        }
        _ => bail!("{USAGE}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

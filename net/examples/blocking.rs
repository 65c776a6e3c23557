//! The blocking client: put two concurrent values, read the siblings back, reconcile them
//! with the context. Run a node first (`ringkv server`), then
//! `cargo run -p ringkv-net --example blocking [ADDR]` (default 127.0.0.1:7379).

use ringkv_net::client::{Client, ClientConfig, ClientError};

fn main() -> Result<(), ClientError> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7379".into());
    let mut client = Client::connect(addr.as_str(), ClientConfig::default())?;
    let hello = client.hello();
    println!(
        "connected to node {:#x}: {} partitions, shard {} of {}",
        hello.node_id, hello.partitions, hello.shard, hello.shards
    );
    client.ping()?;

    let key = b"example:cart";
    // start from a clean key
    let old = client.get(key)?;
    if !old.is_empty() {
        client.delete(key, Some(&old.context))?;
    }
    // two writers that did not read first: their values become siblings
    client.put(key, b"apple", None)?;
    let outcome = client.put(key, b"pear", None)?;
    println!("after two blind puts: {} sibling(s)", outcome.siblings);

    let versions = client.get(key)?;
    for value in &versions.values {
        println!("  sibling: {}", String::from_utf8_lossy(value));
    }
    println!("  context: {}", versions.context.to_hex());

    // reconcile: the union of the items, written with the context that covers both
    let mut items: Vec<&[u8]> = versions
        .values
        .iter()
        .flat_map(|v| v.split(|&b| b == b','))
        .collect();
    items.sort_unstable();
    items.dedup();
    let merged = items.join(&b","[..]);
    let outcome = client.put(key, &merged, Some(&versions.context))?;
    println!(
        "reconciled to {:?}: {} sibling(s)",
        String::from_utf8_lossy(&merged),
        outcome.siblings
    );

    // many keys in one round of pipelined requests
    let keys: Vec<String> = (0..8).map(|i| format!("example:{i}")).collect();
    let pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_bytes(), &b"v"[..])).collect();
    let written = client.put_many(&pairs)?;
    let ok_count = written.iter().filter(|r| r.is_ok()).count();
    println!("pipelined {} puts, {ok_count} ok", pairs.len());
    Ok(())
}

//! The tokio client: a shard-aware client shared by many tasks (each key goes straight
//! to the shard that owns it; without shard ports, through the node's main port), and a
//! pool of connections. Run a node first (`ringkv server`), then
//! `cargo run -p ringkv-net --features tokio --example async_tokio [ADDR]`.

use ringkv_net::async_client::{AsyncPool, AsyncShardAwareClient};
use ringkv_net::client::{ClientConfig, ClientError};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7379".into());
    let client = AsyncShardAwareClient::connect(addr.as_str(), ClientConfig::default()).await?;
    client.ping().await?;
    println!(
        "{} shard connection(s) of {} shard(s)",
        client.shard_connection_count(),
        client.hello().shards
    );

    // 32 tasks write and read their own key; clones share the connections
    let mut tasks = Vec::new();
    for t in 0..32u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("async:{t}");
            let versions = client.get(key.as_bytes()).await?;
            let value = format!("written by task {t}");
            // with the context of the read, the put replaces what was there
            client
                .put(key.as_bytes(), value.as_bytes(), Some(&versions.context))
                .await?;
            client.get(key.as_bytes()).await
        }));
    }
    for (t, task) in tasks.into_iter().enumerate() {
        match task.await {
            Ok(Ok(versions)) => println!("async:{t} -> {} value(s)", versions.values.len()),
            Ok(Err(e)) => println!("async:{t} failed: {e}"),
            Err(e) => println!("task {t} failed: {e}"),
        }
    }

    // a pool: up to 4 connections to the node's main port, handed out in turn
    let pool = AsyncPool::new(addr.as_str(), ClientConfig::default(), 4).await?;
    let keys: Vec<String> = (0..32).map(|t| format!("async:{t}")).collect();
    let found = pool.client().await?.get_many(&keys).await;
    let present = found
        .iter()
        .filter(|r| matches!(r, Ok(v) if !v.is_empty()))
        .count();
    println!(
        "{present} of {} keys read back through the pool",
        keys.len()
    );
    Ok(())
}

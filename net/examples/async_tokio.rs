//! The tokio client: one connection shared by many tasks. Run a node first
//! (`ringkv server`), then
//! `cargo run -p ringkv-net --features tokio --example async_tokio [ADDR]`.

use ringkv_net::async_client::AsyncClient;
use ringkv_net::client::{ClientConfig, ClientError};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7379".into());
    let client = AsyncClient::connect(addr.as_str(), ClientConfig::default()).await?;
    client.ping().await?;

    // 32 tasks write and read their own key over the same connection
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
    Ok(())
}

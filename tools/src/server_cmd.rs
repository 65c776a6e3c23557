//! `ringkv server`: one node, with an embedded default configuration (data in
//! `./ringkv-data`, clients on 127.0.0.1:7379), a TOML file, and flags (flags win).

use anyhow::{bail, Context as _};
use ringkv_engine::server::{self, ServerConfig, Shutdown};
use ringkv_engine::Durability;
use serde::Deserialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub const USAGE: &str =
    "usage: ringkv server [--config FILE.toml] [--data-dir DIR] [--listen HOST:PORT]
                     [--shard-port-base PORT|0] [--shards N] [--node-id ID] [--partitions Q]
                     [--durability sync|none|interval(MS)] [--seeds HOST:PORT,...]
                     [--advertise HOST:PORT] [--replicas N] [--r R] [--w W]
                     [--request-timeout-ms MS] [--weight W] [--zone Z]
                     [--hinted-handoff on|off] [--metrics-listen HOST:PORT]

Starts one node. With no options: data in ./ringkv-data, clients on 127.0.0.1:7379,
shard s also on port 7380+s, one shard per core (at most one per partition), 64
partitions, sync durability.
Without --seeds and without a persisted membership the node starts a cluster of its
own; with --seeds it joins the cluster of the first seed that admits it. A restarted
node rejoins with its persisted membership (data-dir/cluster/membership).
Replication: N = 3, R = 2, W = 2 (each capped by the number of nodes).
--metrics-listen serves the node's stats for Prometheus (GET /metrics); off by default.
A host name in --listen, --metrics-listen or --advertise is looked up once at start:
its first IPv4 address is used (its first address if it has none).
Stops gracefully on SIGINT/SIGTERM. Log level: RUST_LOG (default info).";

/// The TOML file: every field optional, names as in `ServerConfig`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u64>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    shard_port_base: Option<u16>,
    shards: Option<usize>,
    partitions: Option<u32>,
    durability: Option<String>,
    segment_bytes_max: Option<u64>,
    commit_log_bytes_max: Option<u64>,
    key_bytes_max: Option<usize>,
    value_bytes_max: Option<usize>,
    frame_bytes_max: Option<usize>,
    in_flight_per_connection_max: Option<usize>,
    connections_per_shard_max: Option<usize>,
    connection_bytes_per_shard_max: Option<usize>,
    idle_timeout_ms: Option<u64>,
    slow_client_timeout_ms: Option<u64>,
    siblings_max: Option<usize>,
    tombstone_grace_ms: Option<u64>,
    cache_bytes_max: Option<usize>,
    seeds: Option<Vec<String>>,
    advertise: Option<String>,
    replicas: Option<usize>,
    read_quorum: Option<usize>,
    write_quorum: Option<usize>,
    request_timeout_ms: Option<u64>,
    gossip_period_ms: Option<u64>,
    weight: Option<u32>,
    zone: Option<String>,
    hinted_handoff: Option<bool>,
    metrics_listen: Option<String>,
}

impl FileConfig {
    fn apply(self, c: &mut ServerConfig) -> anyhow::Result<()> {
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            node_id,
            data_dir,
            shard_port_base,
            shards,
            partitions,
            segment_bytes_max,
            commit_log_bytes_max,
            key_bytes_max,
            value_bytes_max,
            frame_bytes_max,
            in_flight_per_connection_max,
            connections_per_shard_max,
            connection_bytes_per_shard_max,
            siblings_max,
            cache_bytes_max,
            seeds,
            replicas,
            read_quorum,
            write_quorum,
            weight,
            zone,
            hinted_handoff
        );
        if let Some(a) = self.advertise {
            c.advertise = one_addr(&a).with_context(|| format!("advertise = {a:?}"))?;
        }
        if let Some(ms) = self.request_timeout_ms {
            c.request_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.gossip_period_ms {
            c.gossip_period = Duration::from_millis(ms);
        }
        if let Some(listen) = self.listen {
            c.listen = one_addr(&listen).with_context(|| format!("listen = {listen:?}"))?;
        }
        if let Some(m) = self.metrics_listen {
            c.metrics_listen =
                Some(one_addr(&m).with_context(|| format!("metrics_listen = {m:?}"))?);
        }
        if let Some(d) = self.durability {
            c.durability = d.parse::<Durability>().map_err(anyhow::Error::msg)?;
        }
        if let Some(ms) = self.idle_timeout_ms {
            c.idle_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.slow_client_timeout_ms {
            c.slow_client_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.tombstone_grace_ms {
            c.tombstone_grace = Duration::from_millis(ms);
        }
        Ok(())
    }
}

/// `text`, the value of `flag`, as a number; the error names both.
pub(crate) fn number<T: std::str::FromStr>(flag: &str, text: &str) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    text.parse()
        .map_err(|e| anyhow::anyhow!("{flag} {text:?}: {e}"))
}

pub fn config_from_args(args: &[String]) -> anyhow::Result<Option<ServerConfig>> {
    if args.iter().filter(|a| *a == "--config").count() > 1 {
        // only one file is read: a second would be ignored without a word
        bail!("--config given more than once");
    }
    let mut config = ServerConfig::default();
    // set by the file or a flag; otherwise one per core, up to the partition count
    let mut shards_given = false;
    // the file first, then flags on top
    if let Some(i) = args.iter().position(|a| a == "--config") {
        let path = args.get(i + 1).context("--config needs a file")?;
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let file: FileConfig = toml::from_str(&text).with_context(|| format!("in {path}"))?;
        shards_given = file.shards.is_some();
        file.apply(&mut config)?;
    }
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => {
                value()?;
            }
            "--data-dir" => config.data_dir = PathBuf::from(value()?),
            "--listen" => config.listen = one_addr(value()?).context("--listen HOST:PORT")?,
            "--shard-port-base" => config.shard_port_base = number(flag, value()?)?,
            "--shards" => {
                config.shards = number(flag, value()?)?;
                shards_given = true;
            }
            "--node-id" => config.node_id = number(flag, value()?)?,
            "--partitions" => config.partitions = number(flag, value()?)?,
            "--durability" => {
                config.durability = value()?.parse::<Durability>().map_err(anyhow::Error::msg)?
            }
            "--seeds" => {
                config.seeds = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "--advertise" => {
                config.advertise = one_addr(value()?).context("--advertise HOST:PORT")?
            }
            "--replicas" | "--n" => config.replicas = number(flag, value()?)?,
            "--r" => config.read_quorum = number(flag, value()?)?,
            "--w" => config.write_quorum = number(flag, value()?)?,
            "--request-timeout-ms" => {
                config.request_timeout = Duration::from_millis(number(flag, value()?)?)
            }
            "--weight" => config.weight = number(flag, value()?)?,
            "--hinted-handoff" => {
                config.hinted_handoff = match value()?.as_str() {
                    "on" => true,
                    "off" => false,
                    other => bail!("--hinted-handoff on|off, not {other}"),
                }
            }
            "--zone" => config.zone = value()?.clone(),
            "--metrics-listen" => {
                config.metrics_listen =
                    Some(one_addr(value()?).context("--metrics-listen HOST:PORT")?)
            }
            "--help" | "-h" => return Ok(None),
            other => bail!("unknown option {other}\n\n{USAGE}"),
        }
    }
    if !shards_given {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        config.shards = cores.min(config.partitions as usize).max(1);
    }
    // a name stands for every address it has (`localhost`: ::1 and 127.0.0.1), each a
    // seed tried in turn
    let mut seeds: Vec<String> = Vec::new();
    for seed in &config.seeds {
        for addr in resolve_all(seed)? {
            let addr = addr.to_string();
            if !seeds.contains(&addr) {
                seeds.push(addr);
            }
        }
    }
    config.seeds = seeds;
    config.validate().map_err(anyhow::Error::msg)?;
    Ok(Some(config))
}

/// Every address `host:port` names, in the resolver's order (at least one), looked up
/// here (once, at start): the node itself connects to addresses only, never to names.
pub(crate) fn resolve_all(host_port: &str) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = host_port.parse::<std::net::SocketAddr>() {
        return Ok(vec![addr]);
    }
    let found: Vec<_> = host_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host_port}"))?
        .collect();
    if found.is_empty() {
        anyhow::bail!("{host_port} resolves to no address");
    }
    Ok(found)
}

/// The address to listen on or advertise for `host:port`: itself if it is one, else the
/// name's first IPv4 address (its first address if it has none), looked up once here.
fn one_addr(host_port: &str) -> anyhow::Result<std::net::SocketAddr> {
    let all = resolve_all(host_port)?;
    Ok(all.iter().find(|a| a.is_ipv4()).copied().unwrap_or(all[0]))
}

pub fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let Some(config) = config_from_args(args)? else {
        println!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let shutdown = Shutdown::new();
    shutdown
        .on_signals()
        .context("cannot install signal handling")?;
    let shown = config.clone();
    let exits = server::run(config, shutdown, move |addr| {
        tracing::info!(
            %addr,
            shards = shown.shards,
            partitions = shown.partitions,
            data_dir = %shown.data_dir.display(),
            durability = ?shown.durability,
            "ringkv node ready"
        );
        // a line scripts and tests can wait for
        println!("ringkv listening on {addr}");
    })
    .map_err(anyhow::Error::msg)?;
    let sum = |f: fn(&ringkv_engine::server::ShardStats) -> u64| -> u64 {
        exits.iter().map(|e| f(&e.stats)).sum()
    };
    let requests = sum(|s| s.requests);
    let forwarded = sum(|s| s.forwarded);
    let (accepted, refused) = (
        sum(|s| s.connections_accepted),
        sum(|s| s.connections_refused),
    );
    // the counterpart of the "listening" line: what the node served, for scripts and tests
    println!(
        "ringkv stopped: {requests} requests, {forwarded} forwarded to another shard, \
         {accepted} connections accepted, {refused} refused"
    );
    let unclean: Vec<usize> = exits.iter().filter(|e| !e.clean).map(|e| e.shard).collect();
    if !unclean.is_empty() {
        // a supervisor or script must not take this for a clean stop
        tracing::error!(
            shards = ?unclean,
            "ringkv node stopped, but closing its data failed (see the errors above)"
        );
        eprintln!(
            "ringkv: closing the data of shard(s) {unclean:?} failed: writes not yet \
             synced may be lost (in sync mode the next start replays the commit log)"
        );
        return Ok(ExitCode::FAILURE);
    }
    tracing::info!(requests, "ringkv node stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::config_from_args;

    /// The default shard count (one per core) is capped by the partition count given,
    /// not only by the default 64: `--partitions 1` on a machine of two cores or more
    /// was refused with "fewer partitions than shards". An explicit count is checked.
    #[test]
    fn the_default_shard_count_fits_the_partitions_given() {
        let args = ["--partitions", "1"].map(String::from);
        let config = config_from_args(&args).unwrap().expect("a config");
        assert_eq!(config.shards, 1);
        let args = ["--partitions", "1", "--shards", "2"].map(String::from);
        let err = config_from_args(&args).unwrap_err().to_string();
        assert!(err.contains("fewer partitions than shards"), "{err}");
    }

    /// A number that does not parse names its flag (it was "invalid digit found in
    /// string" alone), and a second --config is refused (it was ignored).
    #[test]
    fn bad_flags_are_named_and_a_second_config_is_refused() {
        let args = ["--shards", "x"].map(String::from);
        let err = config_from_args(&args).unwrap_err().to_string();
        assert!(err.contains("--shards \"x\""), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
        std::fs::write(&a, "shards = 1\n").unwrap();
        std::fs::write(&b, "shards = 2\n").unwrap();
        let args = [
            "--config",
            a.to_str().unwrap(),
            "--config",
            b.to_str().unwrap(),
        ]
        .map(String::from);
        let err = config_from_args(&args).unwrap_err().to_string();
        assert!(err.contains("--config given more than once"), "{err}");
    }

    #[test]
    fn listen_metrics_and_advertise_take_a_name() {
        let args = [
            "--listen",
            "localhost:7500",
            "--metrics-listen",
            "localhost:7599",
            "--advertise",
            "localhost:7500",
        ]
        .map(String::from);
        let c = config_from_args(&args).unwrap().unwrap();
        // localhost's IPv4 address, wherever the resolver puts it
        assert_eq!(c.listen, "127.0.0.1:7500".parse().unwrap());
        assert_eq!(c.metrics_listen, Some("127.0.0.1:7599".parse().unwrap()));
        assert_eq!(c.advertise, c.listen);
        // and the TOML keys
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"localhost:7501\"\nmetrics_listen = \"localhost:7598\"\n\
             advertise = \"localhost:7501\"\n",
        )
        .unwrap();
        let args = ["--config".to_string(), file.display().to_string()];
        let c = config_from_args(&args).unwrap().unwrap();
        assert_eq!(c.listen, "127.0.0.1:7501".parse().unwrap());
        assert_eq!(c.metrics_listen, Some("127.0.0.1:7598".parse().unwrap()));
        assert_eq!(c.advertise, c.listen);
        // no port: refused without a lookup
        let bad = ["--listen", "localhost"].map(String::from);
        let err = format!("{:#}", config_from_args(&bad).unwrap_err());
        assert!(err.contains("--listen"), "{err}");
    }

    #[test]
    fn seeds_given_by_name_are_looked_up_once_at_start() {
        let args = ["--seeds", "localhost:7400,127.0.0.1:7410"].map(String::from);
        let config = config_from_args(&args).unwrap().expect("a config");
        // every address of the name, each once, then the next seed
        let (last, named) = config.seeds.split_last().expect("seeds");
        assert_eq!(last, "127.0.0.1:7410");
        assert!(!named.is_empty());
        for seed in named {
            assert!(
                ["127.0.0.1:7400", "[::1]:7400"].contains(&seed.as_str()),
                "{:?}",
                config.seeds
            );
        }
    }
}

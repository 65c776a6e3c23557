//! `ringkv status | join | leave | dev`: the cluster admin commands.
//!
//! - `status [--addr A] [--json]`: one node's view of the cluster (members, their
//!   address, status, reachability and partitions).
//! - `join SEED [--addr A]`: node A (alone in a cluster of its own, holding no keys)
//!   joins the cluster of SEED.
//! - `leave [--addr A]`: node A leaves its cluster.
//! - `dev [--nodes K]`: a local cluster of K `ringkv server` child processes.

use anyhow::{bail, Context as _};
use ringkv_engine::server::SECOND_SIGNAL_AFTER;
use ringkv_net::peer::{ClusterReply, ClusterRequest};
use ringkv_net::protocol::{check_frame, Reply, FRAME_BYTES_MAX_DEFAULT};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

pub const USAGE: &str = "usage: ringkv status [--addr HOST:PORT] [--json]
       ringkv join SEED_HOST:PORT [--addr HOST:PORT]
       ringkv leave [--addr HOST:PORT]
       ringkv dev [--nodes K] [--data-dir DIR] [--base-port PORT] [--shards S]
(default address 127.0.0.1:7379)";

/// Sends one cluster admin request and returns the reply's JSON text.
pub fn admin_call(
    addr: &str,
    request: &ClusterRequest<'_>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let frame = admin_frame(addr, request, timeout)?;
    match ClusterReply::parse(&frame).map_err(anyhow::Error::msg)? {
        (_, ClusterReply::StatusOk(b) | ClusterReply::JoinOk(b) | ClusterReply::LeaveOk(b)) => {
            Ok(String::from_utf8_lossy(b).into_owned())
        }
        (_, other) => bail!("unexpected reply {other:?}"),
    }
}

/// Sends one cluster admin request and returns its reply frame; an ERROR reply is
/// an error with the node's message.
pub fn admin_frame(
    addr: &str,
    request: &ClusterRequest<'_>,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    // a host name as well as an IP, as `get`/`put` take; every address the name has
    // is tried in turn (`localhost` may be ::1 first, with the node on 127.0.0.1)
    let socks =
        crate::server_cmd::resolve_all(addr).with_context(|| format!("{addr} is not HOST:PORT"))?;
    let mut connected = Err(std::io::Error::other("no address"));
    for sock in &socks {
        connected = TcpStream::connect_timeout(sock, timeout);
        if connected.is_ok() {
            break;
        }
    }
    let mut stream = connected.with_context(|| format!("cannot reach {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut frame = Vec::new();
    request.encode(1, &mut frame);
    stream.write_all(&frame)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let len = loop {
        if let Some(len) = check_frame(&buf, FRAME_BYTES_MAX_DEFAULT).map_err(anyhow::Error::msg)? {
            break len;
        }
        let n = stream
            .read(&mut chunk)
            .with_context(|| format!("no answer from {addr}"))?;
        if n == 0 {
            bail!("{addr} closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    buf.truncate(len);
    if let Ok((_, Reply::Error { code, message })) = Reply::parse(&buf) {
        bail!("{} (error {code})", String::from_utf8_lossy(message));
    }
    Ok(buf)
}

fn addr_and_rest(args: &[String]) -> anyhow::Result<(String, bool, Vec<String>)> {
    let mut addr = "127.0.0.1:7379".to_string();
    let mut json = false;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--addr" => addr = it.next().context("--addr needs HOST:PORT")?.clone(),
            "--json" => json = true,
            s if s.starts_with("--") => bail!("unknown option {s}\n\n{USAGE}"),
            _ => rest.push(a.clone()),
        }
    }
    Ok((addr, json, rest))
}

pub fn status(args: &[String]) -> anyhow::Result<ExitCode> {
    let (addr, json, rest) = addr_and_rest(args)?;
    if !rest.is_empty() {
        bail!("{USAGE}");
    }
    let text = admin_call(&addr, &ClusterRequest::Status, Duration::from_secs(5))?;
    if json {
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value = serde_json::from_str(&text).context("status is not JSON")?;
    if v["joined"] != serde_json::Value::Bool(true) {
        println!("node {} has not joined a cluster yet", v["node_id"]);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "node {} at {}: {} partitions, N={} R={} W={}, ring fingerprint {}",
        v["node_id"],
        v["addr"].as_str().unwrap_or("?"),
        v["partitions"],
        v["n"],
        v["r"],
        v["w"],
        v["fingerprint"]
    );
    println!(
        "{:>6}  {:<22} {:<8} {:<10} {:>10}",
        "node", "addr", "status", "reachable", "partitions"
    );
    for m in v["members"].as_array().into_iter().flatten() {
        println!(
            "{:>6}  {:<22} {:<8} {:<10} {:>10}",
            m["id"].to_string(),
            m["addr"].as_str().unwrap_or(""),
            m["status"].as_str().unwrap_or(""),
            if m["reachable"] == serde_json::Value::Bool(true) {
                "yes"
            } else {
                "no"
            },
            m["partitions"].to_string()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn join(args: &[String]) -> anyhow::Result<ExitCode> {
    let (addr, _, rest) = addr_and_rest(args)?;
    let [seed] = rest.as_slice() else {
        bail!("{USAGE}");
    };
    // the node takes IP:port only: a name is looked up here, and of its addresses the
    // first that accepts a connection is sent (`localhost` may be ::1 first)
    let seeds = crate::server_cmd::resolve_all(seed)?;
    let seed = seeds
        .iter()
        .find(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok())
        .unwrap_or(&seeds[0])
        .to_string();
    let text = admin_call(
        &addr,
        &ClusterRequest::Join {
            seed: seed.as_bytes(),
        },
        Duration::from_secs(30),
    )?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

pub fn leave(args: &[String]) -> anyhow::Result<ExitCode> {
    let (addr, _, rest) = addr_and_rest(args)?;
    if !rest.is_empty() {
        bail!("{USAGE}");
    }
    let text = admin_call(&addr, &ClusterRequest::Leave, Duration::from_secs(30))?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// The fingerprint and member count a node reports, when it answers.
fn agreement(addr: &str) -> Option<(u64, usize)> {
    let text = admin_call(addr, &ClusterRequest::Status, Duration::from_secs(1)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let valid = v["members"]
        .as_array()?
        .iter()
        .filter(|m| m["status"] == "valid")
        .count();
    Some((v["fingerprint"].as_u64()?, valid))
}

struct Children(Vec<Child>);

impl Children {
    /// Polls `ok` until it holds or `limit` passes; gives up at once when a node has
    /// exited (a node that could not start has printed why on stderr).
    fn wait_until(&mut self, limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if stopping() {
                bail!("interrupted before the cluster was ready");
            }
            for (i, child) in self.0.iter_mut().enumerate() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "node {} exited ({status}) before the cluster was ready",
                        i + 1
                    );
                }
            }
            if ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Children {
    /// Stops every node still running (SIGTERM: a clean shutdown) and waits for all;
    /// each node's exit status, in order. A second Ctrl-C meanwhile (a second or more
    /// after the first: sooner, it is the first delivered twice) sends the nodes still
    /// running another SIGTERM (they exit at once, status 130); a third, SIGKILL.
    fn stop(&mut self) -> Vec<Option<std::process::ExitStatus>> {
        self.terminate();
        let mut escalated = 0;
        // the signals counted as the first request to stop: any that come within
        // SECOND_SIGNAL_AFTER of it are that request delivered twice
        let mut first: Option<(Instant, usize)> = None;
        let mut statuses: Vec<Option<std::process::ExitStatus>> = vec![None; self.0.len()];
        // bounded by the nodes' own drain (each stops within its drain timeout) and by
        // the operator's signals
        loop {
            for (child, status) in self.0.iter_mut().zip(&mut statuses) {
                if status.is_none() {
                    match child.try_wait() {
                        Ok(Some(s)) => *status = Some(s),
                        Ok(None) => {}
                        // not ours to wait for any more: nothing to report
                        Err(_) => *status = Some(std::process::ExitStatus::default()),
                    }
                }
            }
            if statuses.iter().all(Option::is_some) {
                return statuses;
            }
            let received = signals();
            if received > 0 {
                match &mut first {
                    None => first = Some((Instant::now(), received)),
                    Some((at, count)) if at.elapsed() < SECOND_SIGNAL_AFTER => *count = received,
                    Some(_) => {}
                }
            }
            let more = first.map_or(0, |(_, count)| received - count);
            if more >= 1 && escalated < more {
                escalated = more;
                let signal = if more == 1 {
                    libc::SIGTERM
                } else {
                    libc::SIGKILL
                };
                eprintln!(
                    "forcing the nodes to stop ({})",
                    if more == 1 {
                        "SIGTERM again"
                    } else {
                        "SIGKILL"
                    }
                );
                for (child, status) in self.0.iter_mut().zip(&statuses) {
                    if status.is_none() {
                        // SAFETY: kill(2) on our own child's pid, not yet reaped.
                        unsafe { libc::kill(child.id() as i32, signal) };
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn terminate(&mut self) {
        for child in &mut self.0 {
            // one already reaped (it exited, say killed from outside) has no pid any
            // more: the number may be another process's by now
            if let Ok(Some(_)) = child.try_wait() {
                continue;
            }
            // SAFETY: plain kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Node `i` (from 1) of `ringkv dev` listens here; its shards on the ports after it.
/// `gap`: ports per node.
fn node_port(base_port: u16, gap: u16, i: usize) -> u16 {
    base_port + gap * (i as u16 - 1)
}

/// Ports per node of `ringkv dev`: 10, or for nodes of 10 shards or more the next
/// multiple of 10 above the shard count (a node's shard ports follow its client port).
fn ports_per_node(shards: usize) -> usize {
    (shards + 1).div_ceil(10).max(1) * 10
}

/// `arg` as a POSIX shell reads it back: as it is when it holds only characters no
/// shell treats specially, else in single quotes (a quote inside as `'\''`).
fn shell_quoted(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:,=+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// SIGINT, SIGTERM and SIGHUP received so far.
static SIGNALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn signals() -> usize {
    SIGNALS.load(std::sync::atomic::Ordering::SeqCst)
}

fn stopping() -> bool {
    signals() > 0
}

extern "C" fn on_stop(_: libc::c_int) {
    SIGNALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

pub fn dev(args: &[String]) -> anyhow::Result<ExitCode> {
    let mut nodes = 3usize;
    let mut data_dir = PathBuf::from("ringkv-data/dev");
    let mut base_port = 7400u16;
    let mut shards: Option<usize> = None;
    let mut extra: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--nodes" => nodes = crate::server_cmd::number(a, value()?)?,
            "--data-dir" => data_dir = PathBuf::from(value()?),
            "--base-port" => base_port = crate::server_cmd::number(a, value()?)?,
            "--shards" => shards = Some(crate::server_cmd::number(a, value()?)?),
            "--" => {
                extra.extend(it.by_ref().cloned());
            }
            "--help" | "-h" => {
                println!("{USAGE}\n\nStarts K nodes on 127.0.0.1 (node i listens on BASE+10*(i-1), its\nshards on the ports after it; with 10 shards or more a node takes the next\nmultiple of 10 ports above its shard count), data under DIR/node-i; arguments\nafter -- go to every server. Ctrl-C stops them all.");
                return Ok(ExitCode::SUCCESS);
            }
            other => bail!("unknown option {other}\n\n{USAGE}"),
        }
    }
    if !(1..=32).contains(&nodes) {
        bail!("--nodes must be 1..=32");
    }
    // the servers' default: one shard per core, at most one per partition
    let shards_per_node =
        shards.unwrap_or_else(|| ringkv_engine::server::ServerConfig::default().shards);
    if !(1..=1024).contains(&shards_per_node) {
        bail!("--shards must be 1..=1024");
    }
    let gap = ports_per_node(shards_per_node);
    let last_port = base_port as usize + gap * nodes - 1;
    if base_port < 1024 || last_port > u16::MAX as usize {
        bail!(
            "--base-port {base_port}: the {nodes} nodes need ports {base_port}..={last_port}, \
             which must lie within 1024..=65535"
        );
    }
    let gap = gap as u16;
    // SAFETY: installing a plain handler that only adds to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        // the terminal closing: stop the nodes too (they are not in its process group)
        libc::signal(libc::SIGHUP, on_stop as *const () as libc::sighandler_t);
    }
    let exe = std::env::current_exe().context("cannot find the ringkv binary")?;
    // readiness is asked of the nodes' addresses: one another process answers on
    // would pass for a node of this cluster
    for i in 1..=nodes {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], node_port(base_port, gap, i)));
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
            bail!(
                "{addr} (node {i}) is taken: something listens there (another `ringkv dev`?); \
                 stop it or choose --base-port"
            );
        }
    }
    let seed = format!("127.0.0.1:{base_port}");
    let mut children = Children(Vec::new());
    let mut addrs = Vec::new();
    for i in 1..=nodes {
        let port = node_port(base_port, gap, i);
        let addr = format!("127.0.0.1:{port}");
        // absolute: the printed restart line works from any directory
        let dir = std::path::absolute(data_dir.join(format!("node-{i}")))
            .context("cannot resolve --data-dir")?;
        let mut cmd_args: Vec<String> = vec![
            "server".into(),
            "--node-id".into(),
            i.to_string(),
            "--listen".into(),
            addr.clone(),
            "--shard-port-base".into(),
            (port + 1).to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        if let Some(s) = shards {
            cmd_args.extend(["--shards".into(), s.to_string()]);
        }
        if i > 1 {
            cmd_args.extend(["--seeds".into(), seed.clone()]);
        }
        cmd_args.extend(extra.iter().cloned());
        // a line to paste into a shell: each argument quoted when it needs it
        let line: Vec<String> = std::iter::once(exe.display().to_string())
            .chain(cmd_args.iter().cloned())
            .map(|a| shell_quoted(&a))
            .collect();
        println!("node {i}: {}", line.join(" "));
        // its own process group: a Ctrl-C at the terminal reaches dev alone, which
        // stops each node with one SIGTERM (a node takes a second signal as "exit now");
        // and a SIGTERM when dev dies, however it dies (SIGKILL included)
        let mut command = Command::new(&exe);
        command.args(&cmd_args).stdout(Stdio::null());
        // SAFETY: prctl between fork and exec, on the child alone; it allocates nothing
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = std::os::unix::process::CommandExt::process_group(&mut command, 0)
            .spawn()
            .with_context(|| format!("cannot start node {i}"))?;
        children.0.push(child);
        addrs.push(addr.clone());
        // the seed first: the others join through it
        if i == 1 {
            children
                .wait_until(Duration::from_secs(60), || agreement(&addr).is_some())
                .context("node 1 did not start")?;
        }
    }
    children
        .wait_until(Duration::from_secs(120), || {
            let views: Vec<_> = addrs.iter().map(|a| agreement(a)).collect();
            views
                .iter()
                .all(|v| *v == views[0] && v.is_some_and(|(_, n)| n == nodes))
        })
        .context("the nodes did not agree on the ring (see their logs above)")?;
    println!("cluster of {nodes} nodes ready; clients can use any of:");
    for addr in &addrs {
        println!("{addr}");
    }
    println!("Ctrl-C stops them all");
    let mut reported = vec![false; nodes];
    let mut failed = false;
    while !stopping() {
        std::thread::sleep(Duration::from_millis(100));
        for (i, child) in children.0.iter_mut().enumerate() {
            if reported[i] {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                reported[i] = true;
                // a node killed from outside may be restarted with its own command line
                // (printed above); dev keeps the others running
                if status.code() != Some(0) {
                    failed = true;
                    eprintln!("node {} exited ({status})", i + 1);
                }
            }
        }
        // all gone by themselves (killed from outside, say) and no Ctrl-C: nothing left
        // to serve
        if reported.iter().all(|&r| r) && !stopping() {
            eprintln!("every node has exited");
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
    }
    // a node that died unseen by the loop (just before the Ctrl-C, say) ends with a
    // failure too; the others stop cleanly on SIGTERM (exit status 0)
    for (i, status) in children.stop().into_iter().enumerate() {
        if let Some(status) = status.filter(|s| !reported[i] && s.code() != Some(0)) {
            failed = true;
            eprintln!("node {} exited ({status})", i + 1);
        }
    }
    if failed {
        // a node that failed while the cluster ran was reported above: say so in the
        // exit status too, for scripts
        println!("stopped (a node had exited with an error)");
        return Ok(ExitCode::FAILURE);
    }
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::shell_quoted;

    /// The restart line dev prints is read back by a shell as the arguments it was
    /// made of, a data directory with spaces or quotes included.
    #[test]
    fn quoted_arguments_read_back_through_a_shell() {
        let args = [
            "server",
            "--data-dir",
            "/tmp/my data/it's $HOME `x` \\n",
            "",
            "127.0.0.1:7400",
        ];
        let line: Vec<String> = args.iter().map(|a| shell_quoted(a)).collect();
        assert_eq!(line[0], "server");
        assert_eq!(line[4], "127.0.0.1:7400");
        let script = format!("printf '%s\\0' {}", line.join(" "));
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .expect("sh");
        let got: Vec<&[u8]> = out.stdout.split(|&b| b == 0).collect();
        let want: Vec<&[u8]> = args
            .iter()
            .map(|a| a.as_bytes())
            .chain([&b""[..]])
            .collect();
        assert_eq!(got, want);
    }
}

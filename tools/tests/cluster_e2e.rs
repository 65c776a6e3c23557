//! Real clusters of `ringkv server` processes on 127.0.0.x: quorum reads and writes,
//! a SIGKILLed node and its hints, sloppy quorum with two home replicas down, and
//! read repair. Each test uses its own 127.0.X.0/24 block so they can run in parallel.

mod common;

use common::Server;
use ringkv_net::client::{Client, ClientConfig, ClientError};
use ringkv_ring::{Membership, NodeId, Ring};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Node {
    server: Option<Server>,
    id: u64,
    addr: String,
    args: Vec<String>,
    data_dir: std::path::PathBuf,
}

impl Node {
    fn start(dir: &Path, block: u8, id: u64, seed: Option<&str>, extra: &[&str]) -> Node {
        let addr = format!("127.0.{block}.{id}:7379");
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--request-timeout-ms".into(),
            "1000".into(),
        ];
        if let Some(seed) = seed {
            args.extend(["--seeds".into(), seed.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let data_dir = dir.join(format!("node-{id}"));
        let mut node = Node {
            server: None,
            id,
            addr,
            args,
            data_dir,
        };
        node.restart();
        node
    }

    /// Starts the node with its own command line (again).
    fn restart(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.server = Some(Server::start(&self.data_dir, &args));
    }

    /// Stops the node cleanly and starts it again with `--shards shards`.
    fn restart_with_shards(&mut self, shards: &str) {
        assert!(self.server.take().expect("running").stop().success());
        let at = self.args.iter().rposition(|a| a == "--shards").unwrap();
        self.args[at + 1] = shards.to_string();
        self.restart();
    }

    fn kill(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
    }

    /// Sends `sig`; for SIGSTOP, returns only once every thread of the node has
    /// stopped. `kill` returns before the stop takes effect: on a loaded machine a
    /// shard could still answer a peer for a while, and a test that stops a node to
    /// keep it from answering would race with it.
    fn signal(&self, sig: i32) {
        let pid = self.server.as_ref().expect("running").child.id();
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(pid as i32, sig) };
        if sig == libc::SIGSTOP {
            wait_for(
                "the node's threads to stop",
                Duration::from_secs(10),
                || all_threads_stopped(pid),
            );
        }
    }

    fn client(&self) -> Client {
        Client::connect(
            &self.addr,
            ClientConfig {
                request_timeout: Duration::from_secs(10),
                ..ClientConfig::default()
            },
        )
        .expect("connect")
    }
}

/// Nodes 1..=count of one shard each on 127.0.`block`.x, node 1 the seed, once they
/// agree on the ring.
fn one_shard_cluster(dir: &Path, block: u8, count: u64) -> Vec<Node> {
    let seed = format!("127.0.{block}.1:7379");
    let nodes: Vec<Node> = (1..=count)
        .map(|id| {
            Node::start(
                dir,
                block,
                id,
                (id > 1).then_some(seed.as_str()),
                &["--shards", "1"],
            )
        })
        .collect();
    wait_agreement(&nodes.iter().collect::<Vec<_>>());
    nodes
}

fn status(addr: &str) -> Option<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(["status", "--json", "--addr", addr])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Whether every thread of process `pid` is in state `T` (stopped by a signal).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // the state follows the command name, which is in parentheses
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Waits until every node reports the same ring with all of them valid.
fn wait_agreement(nodes: &[&Node]) {
    wait_for(
        "the nodes to agree on the ring",
        Duration::from_secs(60),
        || {
            let views: Vec<Option<(u64, usize)>> = nodes
                .iter()
                .map(|n| {
                    let v = status(&n.addr)?;
                    let valid = v["members"]
                        .as_array()?
                        .iter()
                        .filter(|m| m["status"] == "valid")
                        .count();
                    Some((v["fingerprint"].as_u64()?, valid))
                })
                .collect();
            views
                .iter()
                .all(|v| *v == views[0] && v.is_some_and(|(_, n)| n == nodes.len()))
        },
    );
}

fn hints_pending(node: &Node) -> u64 {
    status(&node.addr).map_or(u64::MAX, |v| {
        v["hints_pending"].as_u64().unwrap_or(u64::MAX)
    })
}

/// The home replicas (N = 3) of `key`, from node's persisted membership.
fn home_replicas(node: &Node, key: &[u8]) -> Vec<u64> {
    let bytes =
        std::fs::read(node.data_dir.join("cluster").join("membership")).expect("membership");
    let membership = Membership::decode(&bytes).expect("decode");
    let ring = Ring::from_membership(&membership);
    let p = ring.partition_for_key(key);
    ring.preference_list(p, 3)
        .replicas
        .iter()
        .map(|n: &NodeId| n.0)
        .collect()
}

/// Puts with bounded retries on "not confirmed" (the first puts after a crash may go
/// to the dead node before the failure detector notices it).
fn put_retrying(client: &mut Client, key: &[u8], value: &[u8], w: u8) {
    for _ in 0..20 {
        match client.put_with(key, value, None, w) {
            Ok(_) => return,
            Err(ClientError::NotConfirmed { .. }) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("put {}: {e}", String::from_utf8_lossy(key)),
        }
    }
    panic!("put {} never confirmed", String::from_utf8_lossy(key));
}

fn read_one(node: &Node, key: &[u8], r: u8) -> Vec<Vec<u8>> {
    node.client().get_with(key, r).expect("get").values
}

#[test]
fn three_nodes_quorum_then_a_killed_node_gets_its_hints() {
    let dir = tempfile::tempdir().unwrap();
    let seed = "127.0.11.1:7379";
    let mut n1 = Node::start(dir.path(), 11, 1, None, &[]);
    let n2 = Node::start(dir.path(), 11, 2, Some(seed), &[]);
    let mut n3 = Node::start(dir.path(), 11, 3, Some(seed), &[]);
    wait_agreement(&[&n1, &n2, &n3]);

    // N=3 R=2 W=2: writes through every node, reads through every other node
    let nodes = [&n1, &n2, &n3];
    for i in 0..60u32 {
        let key = format!("key-{i}");
        nodes[i as usize % 3]
            .client()
            .put_with(key.as_bytes(), format!("v{i}").as_bytes(), None, 2)
            .expect("put");
    }
    for i in 0..60u32 {
        let key = format!("key-{i}");
        let got = nodes[(i as usize + 1) % 3]
            .client()
            .get_with(key.as_bytes(), 2)
            .expect("get");
        assert_eq!(got.values, vec![format!("v{i}").into_bytes()], "{key}");
    }

    // node 3 dies: puts and gets through the others keep succeeding
    n3.kill();
    let mut c1 = n1.client();
    let mut c2 = n2.client();
    for i in 0..100u32 {
        let key = format!("down-{i}");
        let c = if i % 2 == 0 { &mut c1 } else { &mut c2 };
        put_retrying(c, key.as_bytes(), format!("d{i}").as_bytes(), 2);
    }
    for i in 0..100u32 {
        let key = format!("down-{i}");
        let got = c1
            .get_with(key.as_bytes(), 2)
            .expect("get with a node down");
        assert_eq!(got.values, vec![format!("d{i}").into_bytes()]);
    }
    // every key has node 3 as a home, so each gets a hint; a coordinator stores it
    // once its send to node 3 has failed, which can be after the client's ack: wait
    // for all of them before crashing the holders (one stored a moment too late was
    // lost once, and its key never reached node 3)
    wait_for(
        "the live nodes to hold a hint for every key of node 3",
        Duration::from_secs(20),
        || {
            let held = hints_pending(&n1).saturating_add(hints_pending(&n2));
            held != u64::MAX && held >= 100
        },
    );

    // the hints survive a crash of the nodes that hold them
    let mut n2 = n2;
    n1.kill();
    n2.kill();
    n1.restart();
    n2.restart();
    wait_for(
        "hints still held after the holders restarted",
        Duration::from_secs(30),
        || hints_pending(&n1) + hints_pending(&n2) > 0,
    );

    // node 3 comes back with its own command line and its data; the hints reach it
    n3.restart();
    wait_agreement(&[&n1, &n2, &n3]);
    wait_for("hints delivered", Duration::from_secs(60), || {
        hints_pending(&n1) == 0 && hints_pending(&n2) == 0
    });
    // node 3 alone (R = 1 read on node 3 answers from its own replica first)
    for i in 0..100u32 {
        let key = format!("down-{i}");
        assert_eq!(
            read_one(&n3, key.as_bytes(), 1),
            vec![format!("d{i}").into_bytes()],
            "node 3 has {key} after handoff"
        );
    }
    for i in 0..60u32 {
        let key = format!("key-{i}");
        assert_eq!(
            read_one(&n3, key.as_bytes(), 1),
            vec![format!("v{i}").into_bytes()]
        );
    }
    n1.kill();
}

#[test]
fn five_nodes_sloppy_quorum_accepts_writes_with_two_homes_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = one_shard_cluster(dir.path(), 12, 5);

    // a key whose home replicas do not include node 1 (the node we write through)
    let key = (0..)
        .map(|i| format!("sloppy-{i}"))
        .find(|k| !home_replicas(&nodes[0], k.as_bytes()).contains(&1))
        .unwrap();
    let homes = home_replicas(&nodes[0], key.as_bytes());
    let (down_a, down_b, up) = (homes[0], homes[1], homes[2]);
    nodes[down_a as usize - 1].kill();
    nodes[down_b as usize - 1].kill();

    // writes to the key still succeed with W = 2: fallbacks take the homes' places
    let values: Vec<String> = (0..20).map(|i| format!("while-down-{i}")).collect();
    let mut c = nodes[0].client();
    let mut context = None;
    for v in &values {
        for attempt in 0.. {
            match c.put_with(key.as_bytes(), v.as_bytes(), context.as_ref(), 2) {
                Ok(out) => {
                    context = Some(out.context);
                    break;
                }
                Err(ClientError::NotConfirmed { .. }) if attempt < 20 => {
                    // the read tells whether it landed; go on from what is there
                    std::thread::sleep(Duration::from_millis(100));
                    context = Some(c.get_with(key.as_bytes(), 1).expect("get").context);
                }
                Err(e) => panic!("put with two home replicas down: {e}"),
            }
        }
    }
    let last = values.last().unwrap().as_bytes().to_vec();
    assert_eq!(
        c.get_with(key.as_bytes(), 2).expect("get").values,
        vec![last.clone()]
    );

    // the homes return; hints are delivered; then the home replicas alone hold it
    nodes[down_a as usize - 1].restart();
    nodes[down_b as usize - 1].restart();
    wait_agreement(&nodes.iter().collect::<Vec<_>>());
    wait_for("hints delivered", Duration::from_secs(60), || {
        nodes.iter().all(|n| hints_pending(n) == 0)
    });
    for id in [down_a, down_b, up] {
        assert_eq!(
            read_one(&nodes[id as usize - 1], key.as_bytes(), 1),
            vec![last.clone()],
            "home replica {id} has the last write"
        );
    }
    // and with every non-home node stopped, the homes serve it with R = 3
    for n in &nodes {
        if !homes.contains(&n.id) {
            n.signal(libc::SIGSTOP);
        }
    }
    // bounded retries: a link from `up` to a restarted home may still be in its
    // reconnect backoff (up to 2 s), and a loaded machine can miss the 2 s deadline
    let mut got = None;
    let mut last_error = None;
    wait_for(
        "R = 3 from the home replicas alone",
        Duration::from_secs(20),
        || match nodes[up as usize - 1].client().get_with(key.as_bytes(), 3) {
            Ok(v) => {
                got = Some(v);
                true
            }
            Err(e) => {
                last_error = Some(e.to_string());
                false
            }
        },
    );
    if let Some(e) = last_error {
        println!("an R = 3 read failed before one succeeded: {e}");
    }
    assert_eq!(got.expect("a successful read").values, vec![last]);
    for n in &nodes {
        if !homes.contains(&n.id) {
            n.signal(libc::SIGCONT);
        }
    }
}

#[test]
fn read_repair_fills_a_replica_that_missed_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let seed = "127.0.13.1:7379";
    // handoff off: only read repair can bring the missed write to node 3
    let extra = ["--hinted-handoff", "off", "--shards", "1"];
    let n1 = Node::start(dir.path(), 13, 1, None, &extra);
    let n2 = Node::start(dir.path(), 13, 2, Some(seed), &extra);
    let mut n3 = Node::start(dir.path(), 13, 3, Some(seed), &extra);
    wait_agreement(&[&n1, &n2, &n3]);

    // node 3 is down while the key is written (a stopped process would still read the
    // write from its socket buffer later, so it is killed and restarted)
    n3.kill();
    put_retrying(&mut n1.client(), b"repair-me", b"fresh", 2);
    n3.restart();
    wait_agreement(&[&n1, &n2, &n3]);
    // node 3's own replica, read with the others stopped so that this read cannot
    // repair it
    n1.signal(libc::SIGSTOP);
    n2.signal(libc::SIGSTOP);
    let before = read_one(&n3, b"repair-me", 1);
    // past node 3's 1 s request deadline (with margin for a loaded machine), so the
    // stopped nodes' late answers find the read retired and repair nothing
    std::thread::sleep(Duration::from_millis(3000));
    n1.signal(libc::SIGCONT);
    n2.signal(libc::SIGCONT);
    assert_eq!(before, Vec::<Vec<u8>>::new(), "node 3 missed the write");

    // a read with R = N sees node 3 stale and repairs it
    let mut got = None;
    for _ in 0..50 {
        if let Ok(v) = n1.client().get_with(b"repair-me", 3) {
            got = Some(v);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(got.expect("get R = 3").values, vec![b"fresh".to_vec()]);
    wait_for("node 1 to repair node 3", Duration::from_secs(10), || {
        status(&n1.addr).unwrap()["read_repairs"].as_u64().unwrap() >= 1
    });
    wait_for(
        "node 3 to hold the repaired write",
        Duration::from_secs(10),
        || read_one(&n3, b"repair-me", 1) == vec![b"fresh".to_vec()],
    );
}

fn ringkv(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringkv"))
        .args(args)
        .output()
        .expect("run ringkv");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn join_and_leave_are_refused_when_they_would_move_data() {
    let dir = tempfile::tempdir().unwrap();
    // three nodes, each alone in a cluster of its own
    let a = Node::start(dir.path(), 14, 1, None, &["--shards", "1"]);
    let b = Node::start(dir.path(), 14, 2, None, &["--shards", "1"]);
    let c = Node::start(dir.path(), 14, 3, None, &["--shards", "1"]);
    b.client()
        .put_with(b"held", b"by b", None, 1)
        .expect("put on b");

    // b holds a key: joining would orphan it, so it is refused with the reason
    let (ok, text) = ringkv(&["join", &a.addr, "--addr", &b.addr]);
    assert!(!ok, "join of a node with data must be refused: {text}");
    assert!(text.contains("not implemented yet"), "{text}");

    // c is empty: it joins a's cluster (nothing moves that holds data)
    let (ok, text) = ringkv(&["join", &a.addr, "--addr", &c.addr]);
    assert!(ok, "join of an empty node: {text}");
    wait_agreement(&[&a, &c]);

    // with data in the cluster, c leaving would move partitions holding keys
    a.client().put_with(b"shared", b"x", None, 2).expect("put");
    let (ok, text) = ringkv(&["leave", "--addr", &c.addr]);
    assert!(!ok, "leave that moves data must be refused: {text}");
    assert!(text.contains("not implemented yet"), "{text}");
    // the cluster is unchanged and serving
    wait_agreement(&[&a, &c]);
    assert_eq!(
        c.client().get_with(b"shared", 2).expect("get").values,
        vec![b"x".to_vec()]
    );
}

/// Hints are delivered 64 at a time per owner. A hint the owner refuses every time
/// (here a key over node 3's smaller key limit) used to stop the owner's delivery for
/// the round at the first batch that held one, so the hints sorted after it were
/// never handed off; now only an owner that stopped answering stops its delivery.
#[test]
fn a_hint_the_owner_refuses_does_not_hold_back_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let seed = "127.0.16.1:7379";
    let small_keys = dir.path().join("small-keys.toml");
    std::fs::write(&small_keys, "key_bytes_max = 64\n").unwrap();
    let n1 = Node::start(dir.path(), 16, 1, None, &[]);
    let n2 = Node::start(dir.path(), 16, 2, Some(seed), &[]);
    let mut n3 = Node::start(
        dir.path(),
        16,
        3,
        Some(seed),
        &["--config", small_keys.to_str().unwrap()],
    );
    wait_agreement(&[&n1, &n2, &n3]);
    n3.kill();
    // every key has node 3 as a home (N = 3 of 3 nodes): node 1, the coordinator of
    // every put, keeps a hint per key; a long key in most partitions puts one the
    // owner refuses in the first batch of each of node 1's shards
    let mut c1 = n1.client();
    let long = |i: u32| format!("{i:0>100}");
    for i in 0..200u32 {
        put_retrying(&mut c1, long(i).as_bytes(), b"long", 2);
    }
    for i in 0..400u32 {
        put_retrying(&mut c1, format!("short-{i}").as_bytes(), b"short", 2);
    }
    wait_for("a hint for every key", Duration::from_secs(20), || {
        hints_pending(&n1) == 600
    });
    n3.restart();
    wait_agreement(&[&n1, &n2, &n3]);
    wait_for(
        "every hint node 3 accepts delivered",
        Duration::from_secs(60),
        || hints_pending(&n1) == 200,
    );
    for i in (0..400u32).step_by(37) {
        let key = format!("short-{i}");
        assert_eq!(
            read_one(&n3, key.as_bytes(), 1),
            vec![b"short".to_vec()],
            "{key}"
        );
    }
}

/// A member may come back at another address (a restart), but not while it still
/// answers at its own: a second node started with a live member's id is refused, and
/// the member keeps its address in every ring. Before, the seed replaced the member's
/// address with the newcomer's, and the real member was cut off for good.
#[test]
fn a_second_node_with_a_live_members_id_is_refused() {
    use ringkv_net::peer::ClusterReply;
    let dir = tempfile::tempdir().unwrap();
    let seed = "127.0.15.1:7379";
    let n1 = Node::start(dir.path(), 15, 1, None, &[]);
    let mut n2 = Node::start(dir.path(), 15, 2, Some(seed), &[]);
    wait_agreement(&[&n1, &n2]);
    let join_as_2 = |addr: &str| {
        let reply = common::Raw::connect(n1.addr.parse().unwrap()).join_request(2, addr.as_bytes());
        match ClusterReply::parse(&reply) {
            Ok((_, ClusterReply::JoinAccept(_))) => Ok(()),
            _ => Err(String::from_utf8_lossy(&reply).to_string()),
        }
    };
    let addr_of_2 = || {
        status(&n1.addr).expect("status")["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == 2)
            .map(|m| m["addr"].as_str().unwrap().to_string())
    };
    let err = join_as_2("127.0.15.9:7379").expect_err("node 2 is alive at its address");
    assert!(err.contains("in use by the running node at"), "{err}");
    assert_eq!(addr_of_2().as_deref(), Some(n2.addr.as_str()));
    // node 2 gone: the same request is a restart at a new address
    n2.kill();
    join_as_2("127.0.15.9:7379").expect("a restart at another address");
    assert_eq!(addr_of_2().as_deref(), Some("127.0.15.9:7379"));
}

/// A node that left the cluster may join it again: it used to be refused as "already
/// in a cluster", since it still saw the members it had left.
/// `ringkv leave` on `node`, then waits until `other` sees it removed.
fn leave(node: &Node, other: &Node) {
    let (ok, text) = ringkv(&["leave", "--addr", &node.addr]);
    assert!(ok, "leave: {text}");
    wait_for(
        "the node to be seen removed",
        Duration::from_secs(30),
        || {
            status(&other.addr).is_some_and(|v| {
                v["members"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|m| m["id"] == node.id && m["status"] == "removed")
                })
            })
        },
    );
}

#[test]
fn a_node_that_left_can_join_again() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(dir.path(), 17, 1, None, &["--shards", "1"]);
    let c = Node::start(dir.path(), 17, 3, None, &["--shards", "1"]);
    let (ok, text) = ringkv(&["join", &a.addr, "--addr", &c.addr]);
    assert!(ok, "join of an empty node: {text}");
    wait_agreement(&[&a, &c]);
    // nothing stored: leaving moves no data
    leave(&c, &a);
    let (ok, text) = ringkv(&["join", &a.addr, "--addr", &c.addr]);
    assert!(ok, "join after leave: {text}");
    wait_agreement(&[&a, &c]);
    // and the cluster serves through both
    a.client().put_with(b"k", b"v", None, 2).expect("put");
    assert_eq!(
        c.client().get_with(b"k", 2).expect("get").values,
        vec![b"v".to_vec()]
    );
}

/// Hints outlive a change of their holder's `--shards`. Fewer shards: the hint store of
/// a shard the node no longer has was never opened again, so its hints were never
/// counted or delivered; now a remaining shard takes it over. More shards: a hint for a
/// partition now on another shard of the node was never delivered (its shard reads the
/// key's versions there now).
#[test]
fn hints_survive_a_change_of_the_holders_shard_count() {
    let dir = tempfile::tempdir().unwrap();
    let seed = "127.0.18.1:7379";
    let mut n1 = Node::start(dir.path(), 18, 1, None, &["--shards", "2"]);
    let n2 = Node::start(dir.path(), 18, 2, Some(seed), &["--shards", "1"]);
    let mut n3 = Node::start(dir.path(), 18, 3, Some(seed), &["--shards", "1"]);
    wait_agreement(&[&n1, &n2, &n3]);
    n3.kill();
    // node 1 is a home of every key (N = 3 of 3 nodes): it coordinates, and hints
    let mut c1 = n1.client();
    for i in 0..40u32 {
        put_retrying(&mut c1, format!("moved-{i}").as_bytes(), b"v", 2);
    }
    drop(c1);
    wait_for(
        "node 1 to hold a hint for every key",
        Duration::from_secs(20),
        || hints_pending(&n1) == 40,
    );
    // one shard: shard 0 takes over shard 1's hints
    n1.restart_with_shards("1");
    wait_for(
        "node 1 to count every hint with one shard",
        Duration::from_secs(20),
        || hints_pending(&n1) == 40,
    );
    // three shards: shard 0 holds hints for partitions of shards 1 and 2 (a restarted
    // node counts its hints at its first delivery round: until then it reports none)
    n1.restart_with_shards("3");
    wait_for(
        "node 1 to count every hint with three shards",
        Duration::from_secs(20),
        || hints_pending(&n1) == 40,
    );
    n3.restart();
    wait_agreement(&[&n1, &n2, &n3]);
    wait_for("hints delivered", Duration::from_secs(60), || {
        hints_pending(&n1) == 0
    });
    for i in 0..40u32 {
        let key = format!("moved-{i}");
        assert_eq!(
            read_one(&n3, key.as_bytes(), 1),
            vec![b"v".to_vec()],
            "{key}"
        );
    }
}

/// A node that learned a peer's shard layout (its shard count and shard ports) sends
/// replica requests straight to the owning shard's port. When the peer restarted with
/// fewer shards, requests for the shards that were gone went to a closed port for good:
/// puts with W = 3 through the other node were never confirmed. The layout is now
/// learned again after such a failure.
#[test]
fn a_peer_restarted_with_fewer_shards_gets_its_replica_requests() {
    let dir = tempfile::tempdir().unwrap();
    let seed = "127.0.19.1:7379";
    let ports = ["--shard-port-base", "7380"];
    let mut n1 = Node::start(
        dir.path(),
        19,
        1,
        None,
        &[&ports[..], &["--shards", "2"]].concat(),
    );
    let n2 = Node::start(dir.path(), 19, 2, Some(seed), &["--shards", "1"]);
    let n3 = Node::start(dir.path(), 19, 3, Some(seed), &["--shards", "1"]);
    wait_agreement(&[&n1, &n2, &n3]);
    // node 2 coordinates: it learns node 1's two shard ports and uses both
    let mut c2 = n2.client();
    for i in 0..20u32 {
        put_retrying(&mut c2, format!("before-{i}").as_bytes(), b"v", 3);
    }
    n1.restart_with_shards("1");
    wait_agreement(&[&n1, &n2, &n3]);
    let mut c2 = n2.client();
    for i in 0..20u32 {
        put_retrying(&mut c2, format!("after-{i}").as_bytes(), b"v", 3);
    }
    // a put retried after NotConfirmed may have landed twice: siblings of one value
    for i in 0..20u32 {
        let key = format!("after-{i}");
        let values = read_one(&n1, key.as_bytes(), 1);
        assert!(
            !values.is_empty() && values.iter().all(|v| v == b"v"),
            "{key}: {values:?}"
        );
    }
}

/// Sloppy quorum with a home replica that is stopped, not dead (SIGSTOP: connects
/// succeed, nothing answers): a fallback stands in for it within the request time.
/// The copy for the home used to go to the fallback only once the home's request timed
/// out, after the whole request time, when the op's deadline had come too: the op
/// ended NotConfirmed whenever the 50 ms tick that retires ops ran before the
/// fallback's ack (a race of a few milliseconds in 50, which this test does not force:
/// it passed on the old code in the runs tried). The home now gets half the time.
#[test]
fn a_stopped_home_replica_gives_way_to_a_fallback_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = one_shard_cluster(dir.path(), 20, 4);
    // keys node 1 (the coordinator) and node 2 (to be stopped) are both homes of
    let keys: Vec<String> = (0..)
        .map(|i| format!("stopped-{i}"))
        .filter(|k| {
            let homes = home_replicas(&nodes[0], k.as_bytes());
            homes.contains(&1) && homes.contains(&2)
        })
        .take(20)
        .collect();
    let mut c = nodes[0].client();
    for key in &keys {
        c.put_with(key.as_bytes(), b"before", None, 3)
            .expect("put with all up");
    }
    nodes[1].signal(libc::SIGSTOP);
    // all at once, before the failure detector marks the node down
    let mut pipeline = c.pipeline();
    for key in &keys {
        pipeline.put_with(key.as_bytes(), b"during", None, 3);
    }
    let results = pipeline.execute();
    nodes[1].signal(libc::SIGCONT);
    for (key, result) in keys.iter().zip(results.expect("the pipeline ran")) {
        assert!(
            result.is_ok(),
            "{key}: {result:?} (a fallback stands in for the stopped home in time)"
        );
    }
}

/// A put acknowledged by W replicas leaves a copy to a third, stopped one still being
/// sent; when that fails the coordinator stores a hint. A coordinator stopped (SIGTERM)
/// right after the puts closed its hint store first and lost those hints; shutdown now
/// waits for the copies (bounded by the drain timeout).
#[test]
fn a_node_stopped_right_after_its_puts_keeps_the_hints_they_leave() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = one_shard_cluster(dir.path(), 21, 3);
    let n3 = nodes.pop().unwrap();
    n3.signal(libc::SIGSTOP);
    let mut c1 = nodes[0].client();
    const PUTS: u64 = 20;
    for i in 0..PUTS {
        put_retrying(&mut c1, format!("late-{i}").as_bytes(), b"v", 2);
    }
    drop(c1);
    let mut server = nodes[0].server.take().expect("running");
    assert!(server.stop().success());
    nodes[0].restart();
    wait_for(
        "node 1 to count a hint for every put",
        Duration::from_secs(20),
        || hints_pending(&nodes[0]) == PUTS,
    );
    n3.signal(libc::SIGCONT);
}

/// The partition of `key` on node's persisted ring.
fn partition_of(node: &Node, key: &[u8]) -> u32 {
    let bytes =
        std::fs::read(node.data_dir.join("cluster").join("membership")).expect("membership");
    let ring = Ring::from_membership(&Membership::decode(&bytes).expect("decode"));
    ring.partition_for_key(key)
}

/// The segment files of one of node's partitions.
fn segment_files(node: &Node, partition: u32) -> Vec<String> {
    let dir = node
        .data_dir
        .join("partitions")
        .join(format!("{partition:05}"));
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("the partition's folder")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

/// A node down across a delete, and for longer than the tombstone grace: the
/// coordinator's compaction must keep the tombstone its hint still has to deliver.
/// Before, compaction reaped it, the hint found nothing to hand off, and the node came
/// back with the deleted value (which a read with R = 3 would have repaired onto the
/// others again).
#[test]
fn a_delete_older_than_the_tombstone_grace_still_reaches_the_node_that_missed_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("grace.toml");
    std::fs::write(
        &config,
        "tombstone_grace_ms = 1000\nsegment_bytes_max = 4096\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let seed = "127.0.22.1:7379";
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            Node::start(
                dir.path(),
                22,
                id,
                (id > 1).then_some(seed),
                &["--shards", "1", "--config", config],
            )
        })
        .collect();
    wait_agreement(&nodes.iter().collect::<Vec<_>>());
    let key = b"deleted-while-away";
    let mut c1 = nodes[0].client();
    c1.put_with(key, b"old value", None, 3)
        .expect("put on all three");

    // killed, not stopped: a stopped node would still read the delete its peer link
    // had sent before timing out
    nodes[2].kill();
    let context = c1.get_with(key, 2).expect("get").context;
    c1.delete_with(key, Some(&context), 2)
        .expect("delete on two");
    wait_for(
        "node 1 to hold the delete's hint",
        Duration::from_secs(20),
        || hints_pending(&nodes[0]) >= 1,
    );
    // the segment that holds node 1's tombstone: the partition's newest
    let partition = partition_of(&nodes[0], key);
    let tombstone_segment = segment_files(&nodes[0], partition)
        .pop()
        .expect("a segment");
    // the tombstone passes its grace, then writes to the same partition seal its
    // segment and leave it mostly dead: compaction takes it
    std::thread::sleep(Duration::from_millis(1500));
    let fillers: Vec<String> = (0..)
        .map(|i| format!("filler-{i}"))
        .filter(|k| partition_of(&nodes[0], k.as_bytes()) == partition)
        .take(12)
        .collect();
    let mut contexts: Vec<Option<ringkv_net::client::Context>> = vec![None; fillers.len()];
    for round in 0..6 {
        for (k, ctx) in fillers.iter().zip(contexts.iter_mut()) {
            let value = format!("{round}").repeat(900);
            let put = c1
                .put_with(k.as_bytes(), value.as_bytes(), ctx.as_ref(), 2)
                .expect("filler put");
            *ctx = Some(put.context);
        }
    }
    wait_for(
        "node 1 to compact the segment that held the tombstone",
        Duration::from_secs(30),
        || !segment_files(&nodes[0], partition).contains(&tombstone_segment),
    );

    nodes[2].restart();
    wait_agreement(&nodes.iter().collect::<Vec<_>>());
    wait_for("node 1's hints delivered", Duration::from_secs(60), || {
        hints_pending(&nodes[0]) == 0
    });
    assert!(
        read_one(&nodes[2], key, 1).is_empty(),
        "node 3 still has the deleted value"
    );
    assert!(read_one(&nodes[0], key, 3).is_empty());
}

/// A member that left is no longer called: before, each shard's link to it kept
/// reconnecting to its address (backoff up to 2 s) for as long as the node ran.
#[test]
fn links_to_a_node_that_left_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(dir.path(), 23, 1, None, &["--shards", "2"]);
    let mut c = Node::start(dir.path(), 23, 3, None, &["--shards", "1"]);
    let (ok, text) = ringkv(&["join", &a.addr, "--addr", &c.addr]);
    assert!(ok, "join of an empty node: {text}");
    wait_agreement(&[&a, &c]);
    // reads through every shard of a, so each has its link to c (a leave that would
    // move data is refused, so nothing is written)
    let mut client = a.client();
    for i in 0..20u32 {
        client.get_with(format!("k{i}").as_bytes(), 2).expect("get");
    }
    leave(&c, &a);
    c.kill();
    // count what connects to c's address from now on (free once a has closed its end
    // of the connections c's exit closed; the tests run without shard ports)
    let mut listener = None;
    wait_for("c's port to be free", Duration::from_secs(10), || {
        listener = std::net::TcpListener::bind("127.0.23.3:7379").ok();
        listener.is_some()
    });
    let listener = listener.expect("bound");
    listener.set_nonblocking(true).unwrap();
    let mut connects = 0;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if listener.accept().is_ok() {
            connects += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(connects, 0, "a still connects to the node that left");
    // and a still serves alone
    client.put_with(b"after", b"v", None, 1).expect("put");
    assert_eq!(
        client.get_with(b"after", 1).expect("get").values,
        vec![b"v".to_vec()]
    );
}

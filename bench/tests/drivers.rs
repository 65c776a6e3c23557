//! Each driver against a real server on a free 127.0.0.1 port: the echo server and a
//! ringkv node in this process, Redis and memcached as processes when installed
//! (skipped with a printed reason otherwise). Every run is short and bounded.

use ringkv_bench::app::{self, RunSpec};
use ringkv_bench::driver::{DriverKind, Target};
use ringkv_bench::runner::{self, RunConfig, Stop};
use ringkv_bench::servers::{self, InProcessNode, TempDir};
use ringkv_bench::workload::{OpKind, Workload};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn config(driver: DriverKind, addr: String, workload: &str) -> RunConfig {
    RunConfig {
        target: Target {
            driver,
            addr,
            r: 0,
            w: 0,
            shard_aware: false,
            timeout: Duration::from_secs(10),
            contexts: Default::default(),
        },
        workload: Workload::core(workload, None).unwrap(),
        records: 500,
        stop: Stop::Operations(2_000),
        connections: 4,
        pipeline: 8,
        rate: None,
        value_bytes_min: 10,
        value_bytes_max: 200,
        seed: 1,
        errors_max: 0,
        progress: false,
    }
}

/// Loads, then runs workloads A and F (reads, updates, read-modify-writes): every
/// operation answered, at most `errors_max` error replies, every read finds its record.
fn exercise(driver: DriverKind, addr: String, errors_max: u64) {
    let mut c = config(driver, addr, "A");
    c.errors_max = errors_max;
    runner::load(&c).expect("load phase");
    for workload in ["A", "F"] {
        let c = RunConfig {
            workload: Workload::core(workload, None).unwrap(),
            ..c.clone()
        };
        let r = runner::run(&c).expect("run phase");
        assert_eq!(r.operations, 2_000, "{workload}");
        assert!(r.errors <= errors_max, "{workload}: {:?}", r.first_error);
        assert_eq!(r.not_found, 0, "{workload}: every loaded record is found");
        assert_eq!(r.all().len() + r.errors, 2_000);
        let reads = r.histograms[OpKind::Read.index()].len();
        assert!(reads > 700 && reads < 1300, "{workload}: {reads} reads");
        if workload == "F" {
            assert!(r.histograms[OpKind::ReadModifyWrite.index()].len() > 700);
        }
    }
}

#[test]
fn echo_driver_against_the_io_uring_echo_server() {
    let (addr, stop) = ringkv_bench::echo::spawn("127.0.0.1:0").unwrap();
    exercise(DriverKind::Echo, addr.to_string(), 0);
    // open loop at 2,000 ops/s for 0.5 s: about 1,000 operations, none run ahead
    let c = RunConfig {
        rate: Some(2_000.0),
        stop: Stop::Duration(Duration::from_millis(500)),
        ..config(DriverKind::Echo, addr.to_string(), "C")
    };
    let r = runner::run(&c).unwrap();
    assert!(
        r.operations > 800 && r.operations <= 1_004,
        "{}",
        r.operations
    );
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn ringkv_driver_against_a_node() {
    let dir = TempDir::new("ringkv-bench-node").unwrap();
    let node = InProcessNode::start(&dir.0, 2).unwrap();
    // concurrent updates of the hottest zipfian keys may be refused with
    // `Unavailable` ("key changed under 16 attempts"): the node's answer to contention,
    // counted as errors; allow 1%
    exercise(DriverKind::Ringkv, node.addr.to_string(), 20);
    // D inserts new records and reads the latest ones
    let c = RunConfig {
        workload: Workload::core("D", None).unwrap(),
        ..config(DriverKind::Ringkv, node.addr.to_string(), "D")
    };
    let r = runner::run(&c).unwrap();
    assert_eq!(r.operations, 2_000);
    assert_eq!(r.errors, 0, "{:?}", r.first_error);
    assert!(r.histograms[OpKind::Insert.index()].len() > 30);
    drop(node);
}

fn skip_unless(program: &str) -> bool {
    if servers::on_path(program) {
        return false;
    }
    println!(
        "skipped: {program} is not installed (apt-get install {})",
        servers::debian_package(program)
    );
    true
}

#[test]
fn redis_driver_against_redis_server() {
    if skip_unless("redis-server") {
        return;
    }
    let dir = TempDir::new("ringkv-bench-redis").unwrap();
    let redis = servers::start_redis(&dir.0, false).unwrap();
    exercise(DriverKind::Redis, redis.addr.to_string(), 0);
}

#[test]
fn memcached_driver_against_memcached() {
    if skip_unless("memcached") {
        return;
    }
    let dir = TempDir::new("ringkv-bench-memcached").unwrap();
    let memcached = servers::start_memcached(&dir.0, 1).unwrap();
    exercise(DriverKind::Memcached, memcached.addr.to_string(), 0);
}

#[test]
fn an_unreachable_target_is_a_clear_error() {
    let port = servers::free_port().unwrap();
    let c = config(DriverKind::Redis, format!("127.0.0.1:{port}"), "C");
    let e = runner::run(&c).unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("cannot reach the redis target"), "{text}");
    assert!(runner::load(&c).is_err());
}

#[test]
fn error_replies_beyond_the_bound_fail_the_run() {
    // a value above the node's limit is refused with an error frame for every put
    let dir = TempDir::new("ringkv-bench-errors").unwrap();
    let node = InProcessNode::start_with(&dir.0, 1, 1000).unwrap();
    let mut c = config(DriverKind::Ringkv, node.addr.to_string(), "put-only");
    c.value_bytes_min = 2000;
    c.value_bytes_max = 2000;
    c.pipeline = 1;
    c.connections = 1;
    c.errors_max = 3;
    c.stop = Stop::Operations(50);
    let e = runner::run(&c).unwrap_err();
    assert!(
        format!("{e:#}").contains("more than --max-errors 3"),
        "{e:#}"
    );
}

#[test]
fn json_hgrm_and_plot_files_of_a_run() {
    let (addr, stop) = ringkv_bench::echo::spawn("127.0.0.1:0").unwrap();
    let dir = TempDir::new("ringkv-bench-out").unwrap();
    let spec = RunSpec {
        config: config(DriverKind::Echo, addr.to_string(), "B"),
        label: "echo B".into(),
        skip_load: false,
        json: Some(dir.0.join("r.json")),
        hgrm_dir: Some(dir.0.join("hgrm")),
        plot: Some(dir.0.join("p.svg")),
        plot_with: Vec::new(),
        print: false,
    };
    app::execute(&spec).unwrap();
    let v = app::read_json(&dir.0.join("r.json")).unwrap();
    assert!(v["throughput_ops_s"].as_f64().unwrap() > 0.0);
    for op in ["read", "update", "all"] {
        for field in ["p50_us", "p99_us", "p999_us"] {
            assert!(v["ops"][op][field].as_f64().unwrap() > 0.0, "{op} {field}");
        }
    }
    let hgrm = std::fs::read_to_string(dir.0.join("hgrm/echo-b-read.hgrm")).unwrap();
    let parsed = ringkv_bench::report::parse_hgrm(&hgrm).unwrap();
    assert_eq!(
        parsed.total_count,
        v["ops"]["read"]["count"].as_u64().unwrap()
    );
    // a second run overlaid on the first
    let spec2 = RunSpec {
        label: "echo B p1".into(),
        json: None,
        hgrm_dir: None,
        plot_with: vec![dir.0.join("r.json")],
        skip_load: true,
        config: RunConfig {
            pipeline: 1,
            ..spec.config.clone()
        },
        ..spec
    };
    app::execute(&spec2).unwrap();
    let svg = std::fs::read_to_string(dir.0.join("p.svg")).unwrap();
    assert!(svg.contains("echo B p1") && svg.contains("echo B"));
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn help_documents_every_option() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv-bench"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for option in [
        "--driver",
        "--addr",
        "--workload",
        "--records",
        "--duration",
        "--operations",
        "--connections",
        "--pipeline",
        "--rate",
        "--value-size",
        "--distribution",
        "--zipf-theta",
        "--json",
        "--hgrm",
        "--plot",
        "--skip-load",
        "--shard-aware",
        "--max-errors",
        "compare",
        "storage",
        "load",
    ] {
        assert!(help.contains(option), "--help lacks {option}:\n{help}");
    }
    // an unreachable target: non-zero exit and a message that says so
    let port = servers::free_port().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringkv-bench"))
        .args([
            "--driver",
            "memcached",
            "--addr",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--operations", "10", "--no-progress"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the memcached target"), "{err}");
}

/// A ringkv server may answer a pipeline in any order: the driver still hands the
/// runner each request's own reply in request order, and remembers each context under
/// the key of the request it answers (a context filed under another key made the next
/// put of that key look like it came from a client that had seen the future).
#[test]
fn ringkv_replies_out_of_order_are_matched_by_request_id() {
    use ringkv_bench::driver::{self, Outcome};
    use ringkv_net::protocol::{self, encode, Request};
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let keys: [&[u8]; 3] = [b"k0", b"k1", b"k2"];
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let mut requests = Vec::new();
        let mut chunk = [0u8; 4096];
        while requests.len() < 3 {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "client closed early");
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some(len)) = protocol::check_frame(&buf, 1 << 20) {
                let frame: Vec<u8> = buf.drain(..len).collect();
                let (h, req) = Request::parse(&frame).unwrap();
                let key = match req {
                    Request::Get { key, .. } | Request::Put { key, .. } => key.to_vec(),
                    other => panic!("unexpected {other:?}"),
                };
                requests.push((h.request_id, h.opcode, key));
            }
        }
        // newest first
        let mut out = Vec::new();
        for (id, opcode, key) in requests.iter().rev() {
            let context = [b"ctx-".as_slice(), key].concat();
            if *opcode == protocol::opcode::GET {
                encode::get_ok(&mut out, *id, &context, [b"v".as_slice()].into_iter());
            } else {
                encode::put_ok(&mut out, *id, &context, 1);
            }
        }
        s.write_all(&out).unwrap();
        // the next put of k1 must carry k1's context
        let mut buf = Vec::new();
        loop {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "client closed early");
            buf.extend_from_slice(&chunk[..n]);
            if let Ok(Some(len)) = protocol::check_frame(&buf, 1 << 20) {
                match Request::parse(&buf[..len]).unwrap().1 {
                    Request::Put { key, context, .. } => {
                        assert_eq!(key, b"k1");
                        assert_eq!(context, b"ctx-k1");
                    }
                    other => panic!("unexpected {other:?}"),
                }
                return;
            }
        }
    });
    let target = config(DriverKind::Ringkv, addr, "A").target;
    let mut c = driver::connect(&target, 0).unwrap();
    let mut out = Vec::new();
    // the first read's context is wanted (a read-modify-write), the last one's not
    c.encode_get(keys[0], true, &mut out);
    c.encode_put(keys[1], b"x", b"", &mut out);
    c.encode_get(keys[2], false, &mut out);
    c.send(&out).unwrap();
    let replies: Vec<Outcome> = (0..3).map(|_| c.read_reply(false).unwrap()).collect();
    assert_eq!(
        replies,
        vec![
            Outcome::Found {
                context: b"ctx-k0".to_vec()
            },
            Outcome::Ok,
            Outcome::Found {
                context: Vec::new()
            },
        ]
    );
    let mut out = Vec::new();
    c.encode_put(keys[1], b"y", b"", &mut out);
    c.send(&out).unwrap();
    server.join().unwrap();
}

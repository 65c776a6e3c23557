//! Criterion micro-benchmarks of the hot functions outside the storage engine:
//! the protocol frame codec, vector clock compare and merge, and preference-list
//! lookup. `cargo bench -p ringkv-bench --bench hot`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringkv_engine::version::{ActorId, VClock};
use ringkv_net::protocol::{self, encode, Reply, Request, FRAME_BYTES_MAX_DEFAULT};
use ringkv_ring::{Membership, NodeId, Ring};

fn frame_codec(c: &mut Criterion) {
    let value = [7u8; 100];
    let context = [3u8; 40];
    let mut group = c.benchmark_group("frame codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("PUT encode, 100-byte value", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            Request::Put {
                w: 0,
                key: black_box(b"user000000000042"),
                context: &context,
                value: &value,
            }
            .encode(42, &mut out);
            black_box(out.len())
        })
    });
    let mut put = Vec::new();
    Request::Put {
        w: 0,
        key: b"user000000000042",
        context: &context,
        value: &value,
    }
    .encode(42, &mut put);
    group.bench_function("PUT check + parse, 100-byte value", |b| {
        b.iter(|| {
            let len = protocol::check_frame(black_box(&put), FRAME_BYTES_MAX_DEFAULT)
                .unwrap()
                .unwrap();
            black_box(Request::parse(&put[..len]).unwrap().1.key())
        })
    });
    group.bench_function("GET_OK encode, 1 value of 100 bytes", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            encode::get_ok(&mut out, 42, &context, [&value[..]].into_iter());
            black_box(out.len())
        })
    });
    let mut get_ok = Vec::new();
    encode::get_ok(
        &mut get_ok,
        42,
        &context,
        [&value[..], &value[..]].into_iter(),
    );
    group.bench_function("GET_OK parse, 2 siblings", |b| {
        b.iter(|| match Reply::parse(black_box(&get_ok)).unwrap().1 {
            Reply::GetOk { values, .. } => black_box(values.len()),
            _ => unreachable!("a GET_OK frame"),
        })
    });
    group.finish();
}

fn clock(actors: u64, base: u64) -> VClock {
    let mut clock = VClock::new();
    for node in 1..=actors {
        for _ in 0..(base + node) % 5 + 1 {
            clock.increment(ActorId::new(node, 1), 1_700_000_000_000 + node);
        }
    }
    clock
}

fn clocks(c: &mut Criterion) {
    let mut group = c.benchmark_group("vector clock");
    group.throughput(Throughput::Elements(1));
    for actors in [3u64, 10] {
        let a = clock(actors, 0);
        let mut b_clock = a.clone();
        b_clock.increment(ActorId::new(1, 1), 1_700_000_000_999);
        let concurrent = clock(actors, 2);
        group.bench_function(format!("descends, {actors} actors"), |b| {
            b.iter(|| black_box(black_box(&b_clock).descends(black_box(&a))))
        });
        group.bench_function(format!("concurrent, {actors} actors"), |b| {
            b.iter(|| black_box(black_box(&a).concurrent(black_box(&concurrent))))
        });
        group.bench_function(format!("merge, {actors} actors"), |b| {
            b.iter(|| {
                let mut m = black_box(&a).clone();
                m.merge(black_box(&concurrent));
                black_box(m.len())
            })
        });
    }
    group.finish();
}

fn preference_lists(c: &mut Criterion) {
    let mut group = c.benchmark_group("preference list");
    group.throughput(Throughput::Elements(1));
    for (partitions, nodes) in [(64u32, 4u64), (1024, 16)] {
        let mut membership = Membership::new(partitions).unwrap();
        for id in 0..nodes {
            let zone = format!("zone{}", id % 3);
            membership
                .join(NodeId(id), "127.0.0.1:7379", 1, &zone, 2)
                .unwrap();
        }
        let ring = Ring::from_membership(&membership);
        let mut i = 0u32;
        group.bench_function(
            format!("key -> N=3 list, Q={partitions}, {nodes} nodes"),
            |b| {
                b.iter(|| {
                    i = i.wrapping_add(7919);
                    let key = i.to_le_bytes();
                    let p = ring.partition_for_key(black_box(&key));
                    black_box(ring.preference_list(p, 3).replicas.len())
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, frame_codec, clocks, preference_lists);
criterion_main!(benches);

//! Criterion micro-benchmarks of the storage engine's hot functions:
//! `cargo bench -p ringkv-bench --bench engine`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ringkv_engine::keydir::{KeyDir, Loc};
use ringkv_engine::record::{self, RecordRef};
use ringkv_engine::segment;
use ringkv_engine::version::{coordinate, ActorId, VClock};

fn encode_one(out: &mut Vec<u8>, seq: u64, value: &[u8]) {
    RecordRef {
        seq,
        timestamp_ms: 1_700_000_000_000,
        key: b"user:0000000042",
        replaced: &[seq.saturating_sub(1)],
        version: &[1u8; 40],
        value: Some(value),
        batch_continues: false,
    }
    .encode_into(out);
}

fn records(c: &mut Criterion) {
    let value = [7u8; 100];
    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode 100-byte value", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            encode_one(&mut out, black_box(42), &value);
            black_box(out.len())
        })
    });
    let mut encoded = Vec::new();
    encode_one(&mut encoded, 42, &value);
    group.bench_function("decode + CRC 100-byte value", |b| {
        b.iter(|| black_box(record::decode(black_box(&encoded)).unwrap().total_bytes()))
    });
    // a read from the record cache
    group.bench_function("decode verified 100-byte value", |b| {
        b.iter(|| {
            black_box(
                record::decode_verified(black_box(&encoded))
                    .unwrap()
                    .total_bytes(),
            )
        })
    });
    group.finish();

    let mut seg = segment::encode_segment_header(1 << 24, 0).to_vec();
    for i in 0..10_000u64 {
        encode_one(&mut seg, i + 1, &value);
    }
    let mut group = c.benchmark_group("segment");
    group.throughput(Throughput::Bytes(seg.len() as u64));
    group.bench_function("scan 10k records", |b| {
        b.iter(|| black_box(segment::scan(black_box(&seg), 1 << 24).records.len()))
    });
    group.finish();
}

fn keydir(c: &mut Criterion) {
    let n = 1_000_000u64;
    let mut kd = KeyDir::with_capacity(n as usize);
    let keys: Vec<String> = (0..n).map(|i| format!("{i:016x}")).collect();
    for (i, k) in keys.iter().enumerate() {
        kd.insert(
            k.as_bytes(),
            Loc {
                seq: i as u64 + 1,
                segment: 0,
                offset: i as u32,
                len: 160,
                flags: 0,
            },
        );
    }
    let mut group = c.benchmark_group("keydir 1M keys");
    group.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    group.bench_function("get hit", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(kd.get(keys[i].as_bytes()).map(<[Loc]>::len))
        })
    });
    let mut seq = n + 1;
    let loc = |seq| Loc {
        seq,
        segment: 0,
        offset: 0,
        len: 160,
        flags: 0,
    };
    // what a write that supersedes the one version does (the read of it first)
    group.bench_function("replace version", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            let key = keys[i].as_bytes();
            let old = kd.get(key).unwrap()[0].seq;
            seq += 1;
            black_box(kd.replace(key, &[old], loc(seq)));
        })
    });
    // the same in two lookups, as writes did before `KeyDir::replace`
    group.bench_function("replace version: remove_seqs + insert", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            let key = keys[i].as_bytes();
            let old = kd.get(key).unwrap()[0].seq;
            kd.remove_seqs(key, &[old]);
            seq += 1;
            black_box(kd.insert(key, loc(seq)));
        })
    });
    group.finish();
}

fn versioning(c: &mut Criterion) {
    let actor = ActorId { node: 1, epoch: 7 };
    let mut context = VClock::new();
    for node in 2..5 {
        context.increment(ActorId { node, epoch: 1 }, 10);
    }
    let first = coordinate(actor, 1, &context, &[], 16).unwrap().version;
    let stored = vec![first];
    c.bench_function("version coordinate (1 sibling, 4 actors)", |b| {
        b.iter(|| black_box(coordinate(actor, 2, black_box(&context), &stored, 16).unwrap()))
    });
}

criterion_group!(benches, records, keydir, versioning);
criterion_main!(benches);

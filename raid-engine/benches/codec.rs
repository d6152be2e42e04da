//! Erasure coding: encode and reconstruct (1 and m lost data shards) for both codecs at
//! (2,1), (3,2), (4,2), (8,3) with 4 KiB and 64 KiB chunks. Throughput counts the row's data
//! bytes (k x chunk), except for the parity delta of a change to the last data column (a
//! patched write's parity work), which counts the delta's bytes (one chunk).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raid_engine::codec::{new_codec, CodecKind};
use std::hint::black_box;
use std::time::Duration;

const GEOMETRIES: [(usize, usize); 4] = [(2, 1), (3, 2), (4, 2), (8, 3)];
const CHUNKS: [usize; 2] = [4096, 65536];
const KINDS: [CodecKind; 2] = [CodecKind::ReedSolomonSimd, CodecKind::GfMatrix];

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for &(k, m) in &GEOMETRIES {
        for &chunk in &CHUNKS {
            let data: Vec<Vec<u8>> = (0..k)
                .map(|i| (0..chunk).map(|j| (i * 7 + j) as u8).collect())
                .collect();
            g.throughput(Throughput::Bytes((k * chunk) as u64));
            for kind in KINDS {
                let codec = new_codec(kind, k, m).unwrap();
                let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
                let mut parity = vec![vec![0u8; chunk]; m];
                let id = |op: &str| {
                    BenchmarkId::new(
                        format!("{}/{op}", kind.name()),
                        format!("{k}+{m}/{}k", chunk / 1024),
                    )
                };
                g.bench_function(id("encode"), |b| {
                    b.iter(|| codec.encode(black_box(&refs), &mut parity).unwrap())
                });
                let full: Vec<Option<Vec<u8>>> = data
                    .iter()
                    .chain(parity.iter())
                    .cloned()
                    .map(Some)
                    .collect();
                let cases = [("reconstruct_1", 1), ("reconstruct_m", m.min(k))];
                // With one parity shard, losing m shards is the same case as losing one.
                for (name, lost) in cases.into_iter().take(if m == 1 { 1 } else { 2 }) {
                    g.bench_function(id(name), |b| {
                        b.iter(|| {
                            let mut shards = full.clone();
                            for s in shards.iter_mut().take(lost) {
                                *s = None;
                            }
                            codec.reconstruct(black_box(&mut shards)).unwrap();
                            shards
                        })
                    });
                }
                g.throughput(Throughput::Bytes(chunk as u64));
                let delta = &data[k - 1];
                g.bench_function(id("parity_delta"), |b| {
                    b.iter(|| codec.parity_delta(k - 1, black_box(delta)).unwrap())
                });
                g.throughput(Throughput::Bytes((k * chunk) as u64));
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

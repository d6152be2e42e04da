//! Write-intent map updates and peer message framing, the per-write metadata and transport
//! costs of the cluster's data path that are not I/O.
//!
//! - `write_intent/*`: one Mark and its Clear applied to the replicated state holding 100 000
//!   other marks (the state machine's own cost), and the same pair serialized as metadata log
//!   entries (JSON, as the log stores them).
//! - `peer_frame/*`: encode and decode of one peer frame (header CRC, payload CRC32C) for a
//!   heartbeat and for a write of a 4 KiB and a 64 KiB chunk; and a 64 KiB chunk's reply
//!   framed for a TLS link, encoded in place behind the header (`reply_in_place`) or as head
//!   and bulk with the data moved (`reply_head_bulk`, what the transport sends).

use appliance::meta::{MetaCommand, MetaState, StoredState};
use appliance::peer::wire::{
    decode_frame, encode_frame, frame_start, seal_frame, Envelope, Frame, Reply, Request, Sum,
    HEADER_LEN, REPLY,
};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use raid_engine::shard::{Chunk, ChunkAddr};
use std::hint::black_box;
use std::time::Duration;

/// The appliance's allocator (see its main.rs), so allocations cost here what they cost there.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn write_intent(c: &mut Criterion) {
    let mut g = c.benchmark_group("write_intent");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let mut s = MetaState::default();
    s.apply(&MetaCommand::SetState {
        id: 1,
        state: StoredState::Up,
    });
    let epoch = s.epoch;
    for i in 0..100_000u64 {
        s.apply(&MetaCommand::Mark {
            mark: (1, i / 64, (i % 64) as u32, (i % 3) as u8),
            missed: i + 1,
            epoch,
        });
    }
    let mut n = 0u64;
    g.bench_function("mark_then_clear_among_100k", |b| {
        b.iter(|| {
            n += 1;
            let mark = (2, n % 4096, (n % 61) as u32, 1);
            s.apply(&MetaCommand::Mark {
                mark,
                missed: n,
                epoch,
            });
            s.apply(&MetaCommand::Clear {
                mark,
                upto: n,
                epoch,
            });
        });
    });
    assert_eq!(s.intents.len(), 100_000, "every benchmark mark was cleared");
    let cmds = [
        MetaCommand::Mark {
            mark: (2, 77, 5, 1),
            missed: 1 << 40,
            epoch,
        },
        MetaCommand::Clear {
            mark: (2, 77, 5, 1),
            upto: 1 << 40,
            epoch,
        },
    ];
    g.bench_function("mark_then_clear_as_log_entries_json", |b| {
        b.iter(|| {
            for cmd in &cmds {
                let bytes = serde_json::to_vec(black_box(cmd)).unwrap();
                let back: MetaCommand = serde_json::from_slice(&bytes).unwrap();
                black_box(back);
            }
        });
    });
    g.finish();
}

fn peer_frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("peer_frame");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let addr = ChunkAddr {
        volume: 1,
        extent: 3,
        row: 9,
        pos: 2,
    };
    let write = |len: usize| {
        Request::WriteChunk(
            addr,
            Chunk {
                version: 5,
                cols: vec![5, 4],
                acked: 4,
                acked_cols: vec![4, 4],
                data: (0..len).map(|i| i as u8).collect(),
            },
        )
    };
    for (name, req) in [
        ("heartbeat", Request::Heartbeat),
        ("write_chunk_4k", write(4096)),
        ("write_chunk_64k", write(65536)),
    ] {
        let (kind, payload) = req.encode();
        let frame = Frame {
            kind: kind as u8,
            sender: 1,
            epoch: 7,
            request_id: 42,
            payload,
            bulk: Vec::new(),
        };
        let mut wire = Vec::new();
        encode_frame(&frame, &mut wire);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", name), &frame, |b, f| {
            let mut out = Vec::with_capacity(wire.len());
            b.iter(|| {
                out.clear();
                encode_frame(black_box(f), &mut out);
            });
        });
        g.bench_with_input(BenchmarkId::new("decode", name), &wire, |b, w| {
            b.iter(|| {
                let (f, used) = decode_frame(black_box(w)).unwrap().unwrap();
                let req = Request::decode(f.kind, &f.payload).unwrap();
                black_box((req, used));
            });
        });
        // On a TLS link: the body and the bulk the header names arrive in buffers of their
        // own (made outside the timing, as the reader fills them), and the bulk becomes the
        // chunk's data.
        let (kind, parts) = req.into_frame(Envelope {
            sender: 1,
            epoch: 7,
            request_id: 42,
            sum: Sum::Link,
        });
        let body = parts.head[HEADER_LEN..].to_vec();
        g.bench_with_input(BenchmarkId::new("decode_link", name), &body, |b, body| {
            b.iter_batched(
                || parts.bulk.clone(),
                |bulk| black_box(Request::decode_parts(kind as u8, body, bulk).unwrap()),
                BatchSize::SmallInput,
            );
        });
    }
    // A ranged read's answer on a TLS link (no payload CRC): the chunk is made outside the
    // timing, and each encoding consumes it as the transport does.
    let reply = || {
        Reply::Copies(vec![Chunk {
            version: 5,
            cols: vec![5, 4],
            acked: 4,
            acked_cols: vec![4, 4],
            data: vec![0x5a; 65536],
        }])
    };
    let kind = 7 | REPLY;
    g.throughput(Throughput::Bytes(65536));
    g.bench_function("reply_in_place/64k", |b| {
        b.iter_batched(
            reply,
            |r| {
                let mut out = frame_start();
                r.encode_into(&mut out);
                seal_frame(&mut out, kind, 2, 7, 42, Sum::Link);
                black_box((out, r))
            },
            BatchSize::SmallInput,
        );
    });
    let env = Envelope {
        sender: 2,
        epoch: 7,
        request_id: 42,
        sum: Sum::Link,
    };
    g.bench_function("reply_head_bulk/64k", |b| {
        b.iter_batched(
            reply,
            |r| black_box(r.into_frame(kind, env)),
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

criterion_group!(benches, write_intent, peer_frame);
criterion_main!(benches);

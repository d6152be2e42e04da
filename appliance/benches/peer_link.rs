//! The cost of mutual TLS on peer links: one controller's client writing 64 KiB chunks to a
//! peer server over loopback (16 in flight, as the engine pipelines them) and heartbeat round
//! trips at queue depth 1, plaintext against TLS 1.3 (rustls, ring, AES-GCM or ChaCha20 as
//! negotiated). The handler stores nothing, so the figures are the transport's alone.

use appliance::peer::tls::{issue, PeerTls};
use appliance::peer::wire::{RemoteError, Reply, Request};
use appliance::peer::{serve, PeerClient, PeerHandler, PeerLimits};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raid_engine::shard::{BoxFut, Chunk, ChunkAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Answers every request with `Done` (heartbeats and writes alike).
struct Sink;

impl PeerHandler for Sink {
    fn handle(&self, _: u32, _: u64, _: Request) -> BoxFut<'_, Result<Reply, RemoteError>> {
        Box::pin(async { Ok(Reply::Done) })
    }
}

const CHUNK: usize = 64 << 10;
const BATCH: usize = 64;
const IN_FLIGHT: usize = 16;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pki = tempfile::tempdir().unwrap();
    issue(pki.path(), &[1, 2]).unwrap();
    let mut g = c.benchmark_group("peer_link");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for tls in [false, true] {
        let mode = if tls { "tls" } else { "plain" };
        let client = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            let server_tls = tls.then(|| Arc::new(PeerTls::load(pki.path(), 2).unwrap()));
            tokio::spawn(serve(
                l,
                2,
                Arc::new(Sink),
                PeerLimits::default(),
                server_tls,
            ));
            let c = PeerClient::new(1, a, PeerLimits::default());
            let c = if tls {
                c.with_tls(&PeerTls::load(pki.path(), 1).unwrap(), Some(2))
            } else {
                c
            };
            c.call(1, Request::Heartbeat).await.unwrap();
            Arc::new(c)
        });
        let chunk = Chunk {
            version: 1,
            cols: vec![1, 0, 0],
            acked: 0,
            acked_cols: Vec::new(),
            data: vec![0x5a; CHUNK],
        };
        g.throughput(Throughput::Bytes((BATCH * CHUNK) as u64));
        g.bench_function(BenchmarkId::new("write-64k-qd16", mode), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        for round in 0..BATCH / IN_FLIGHT {
                            let calls = (0..IN_FLIGHT).map(|i| {
                                let (c, chunk) = (client.clone(), chunk.clone());
                                let addr = ChunkAddr {
                                    volume: 1,
                                    extent: 0,
                                    row: (round * IN_FLIGHT + i) as u32,
                                    pos: 0,
                                };
                                async move { c.call(1, Request::WriteChunk(addr, chunk)).await }
                            });
                            for r in futures::future::join_all(calls).await {
                                r.unwrap();
                            }
                        }
                    }
                    t.elapsed()
                })
            })
        });
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("heartbeat-qd1", mode), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        client.call(1, Request::Heartbeat).await.unwrap();
                    }
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

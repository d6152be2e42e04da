//! End to end over loopback: the project's test initiator against an in-process target with a
//! file-backed LUN (io_uring), one 4 KiB READ or WRITE at a time (queue depth 1). Measures the
//! whole round trip: PDU encode, socket, fabric, device server, disk, and back.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iscsi_target::{FabricConfig, Portal, TargetInfo, Timers};
use lun::{DeviceServer, LogicalUnit, LuIdentity, TargetPort};
use std::collections::BTreeMap;
use std::sync::Arc;
use tests::initiator::{read16, write16, Initiator, LoginOptions};

const IQN: &str = "iqn.2026-11.io.rainio:bench";

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let size = 256u64 << 20;
    let (addr, _stop) = rt.block_on(async {
        let dev = disk_io::Device::open(&disk_io::DeviceConfig::file(
            dir.path().join("bench.img"),
            size,
        ))
        .unwrap();
        let vol = Arc::new(raid_engine::Volume::Local(
            raid_engine::LocalVolume::new(Arc::new(dev), 0, size).unwrap(),
        ));
        let lu = Arc::new(LogicalUnit::new(LuIdentity::for_volume(1), 512, vol));
        let device = Arc::new(DeviceServer::new(
            TargetPort {
                relative_port: 1,
                port_group: 1,
            },
            BTreeMap::from([(0, lu)]),
        ));
        let listener = iscsi_target::driver::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = Arc::new(FabricConfig {
            targets: vec![TargetInfo {
                name: IQN.into(),
                alias: None,
                chap: None,
                allowed_initiators: None,
                portals: vec![Portal {
                    address: addr.to_string(),
                    tpgt: 1,
                }],
                device,
            }],
            discovery_chap: None,
            tpgt: 1,
            relative_port: 1,
            timers: Timers::default(),
            limits: Default::default(),
            chap_challenges: Default::default(),
        });
        let (tx, rx) = tokio::sync::watch::channel(false);
        let server = iscsi_target::driver::Server::new(cfg);
        tokio::spawn(async move { server.serve(listener, rx).await });
        (addr, tx)
    });
    let mut ini = rt
        .block_on(Initiator::login(addr, &LoginOptions::normal(IQN)))
        .unwrap();
    let block = vec![0x3cu8; 4096];
    rt.block_on(ini.command(0, &write16(0, 8), &block, 4096))
        .unwrap();
    let mut g = c.benchmark_group("loopback_qd1");
    g.throughput(Throughput::Bytes(4096));
    let mut lba = 0u64;
    g.bench_function("read_4k", |b| {
        b.iter(|| {
            lba = (lba + 8) % (size / 512 - 8);
            let r = rt
                .block_on(ini.command(0, &read16(lba, 8), &[], 4096))
                .unwrap();
            assert_eq!(r.status, 0);
        })
    });
    g.bench_function("write_4k", |b| {
        b.iter(|| {
            lba = (lba + 8) % (size / 512 - 8);
            let r = rt
                .block_on(ini.command(0, &write16(lba, 8), &block, 4096))
                .unwrap();
            assert_eq!(r.status, 0);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Micro-benchmarks of the fabric's hot paths: BHS parse, whole-PDU framing, CRC32C.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iscsi_target::proto::digest;
use iscsi_target::proto::pdu::*;
use std::hint::black_box;

fn scsi_command() -> Bhs {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x28;
    Bhs::ScsiCommand(ScsiCommandPdu {
        immediate: false,
        final_: true,
        read: true,
        write: false,
        attr: 1,
        lun: 0,
        itt: 0x1234,
        edtl: 4096,
        cmd_sn: 77,
        exp_stat_sn: 99,
        cdb,
    })
}

fn bench_bhs(c: &mut Criterion) {
    let mut hdr = [0u8; 48];
    scsi_command().encode(&mut hdr, 0, 0);
    let mut g = c.benchmark_group("bhs");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_scsi_command", |b| {
        b.iter(|| Bhs::parse(black_box(&hdr)).unwrap())
    });
    g.bench_function("encode_scsi_command", |b| {
        let bhs = scsi_command();
        let mut out = [0u8; 48];
        b.iter(|| black_box(&bhs).encode(&mut out, 0, 0))
    });
    let mut wire = Vec::new();
    let data = vec![0x5au8; 4096];
    let d = Digests {
        header: true,
        data: true,
    };
    encode_pdu(&mut wire, &scsi_command(), &[], &data, d);
    let limits = FrameLimits {
        digests: d,
        max_data_segment: 262_144,
    };
    g.bench_function("frame_and_parse_4k_with_digests", |b| {
        b.iter(|| {
            let info = frame_len(black_box(&wire), limits).unwrap().unwrap();
            parse_pdu(&wire, info, d).unwrap().data.len()
        })
    });
    g.finish();
}

fn bench_crc(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    for size in [4096usize, 65_536, 1 << 20] {
        let buf = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &buf, |b, buf| {
            b.iter(|| digest::crc32c(black_box(buf)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_bhs, bench_crc);
criterion_main!(benches);

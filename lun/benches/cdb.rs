//! CDB decode: the per-command cost of turning a host's CDB into a typed command (or the sense
//! that refuses it) for the commands on the data path and a few of the rest.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lun::cdb::decode;
use std::hint::black_box;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("cdb_decode");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let cdbs: [(&str, Vec<u8>); 7] = [
        ("read10", vec![0x28, 0, 0, 0, 0x10, 0, 0, 0, 8, 0]),
        (
            "read16",
            vec![0x88, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 8, 0, 0],
        ),
        (
            "write16_fua",
            vec![0x8a, 0x08, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 8, 0, 0],
        ),
        ("test_unit_ready", vec![0; 6]),
        ("inquiry_vpd83", vec![0x12, 1, 0x83, 0, 0xff, 0]),
        (
            "report_luns",
            vec![0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
        ),
        ("unsupported_opcode", vec![0xff, 0, 0, 0, 0, 0]),
    ];
    for (name, cdb) in &cdbs {
        g.bench_with_input(BenchmarkId::from_parameter(name), cdb, |b, cdb| {
            b.iter(|| black_box(decode(black_box(cdb))));
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

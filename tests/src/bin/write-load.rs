//! A small iSCSI load generator for benchmarks: `S` sessions (one command in flight each)
//! writing or reading `BYTES`-sized blocks sequentially (each session its own region) for
//! `SECS` seconds through the project's own initiator. Prints `ops MB/s` on one line.
//!
//! Usage: `write-load write|read PORTAL IQN SESSIONS BYTES SECS [VOLUME_BYTES]`.
//! libiscsi ships no write benchmark (iscsi-perf only reads), so the cluster benchmark uses
//! this for writes; it retries NOT READY like a host would.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tests::initiator::{read16, write16, Initiator, LoginOptions};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 6 {
        eprintln!("usage: write-load write|read PORTAL IQN SESSIONS BYTES SECS [VOLUME_BYTES]");
        return ExitCode::FAILURE;
    }
    let write = a[0] == "write";
    let (Ok(portal), Ok(sessions), Ok(bytes), Ok(secs)) = (
        a[1].parse::<SocketAddr>(),
        a[3].parse::<u64>(),
        a[4].parse::<u32>(),
        a[5].parse::<u64>(),
    ) else {
        eprintln!("error: bad arguments");
        return ExitCode::FAILURE;
    };
    let volume: u64 = a.get(6).and_then(|v| v.parse().ok()).unwrap_or(1 << 30);
    let iqn = a[2].clone();
    let blocks = bytes / 512;
    let region = volume / sessions / u64::from(bytes) * u64::from(bytes);
    let stop = Instant::now() + Duration::from_secs(secs);
    let tasks = (0..sessions).map(|s| {
        let iqn = iqn.clone();
        tokio::spawn(async move {
            // One ISID per session: the same ISID would reinstate (end) the others.
            let opts = LoginOptions {
                isid: 0x8012_3456_7800 + s,
                ..LoginOptions::normal(&iqn)
            };
            let mut i = Initiator::login(portal, &opts).await.expect("login");
            let data = vec![0x5au8 ^ s as u8; bytes as usize];
            let mut ops = 0u64;
            let mut off = 0u64;
            while Instant::now() < stop {
                let lba = (s * region + off) / 512;
                let r = if write {
                    i.command(0, &write16(lba, blocks), &data, bytes).await
                } else {
                    i.command(0, &read16(lba, blocks), &[], bytes).await
                }
                .expect("command");
                if r.status == 0 {
                    ops += 1;
                    off = (off + u64::from(bytes)) % region;
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            ops
        })
    });
    let started = Instant::now();
    let mut ops = 0;
    for t in futures::future::join_all(tasks).await {
        ops += t.expect("task");
    }
    let el = started.elapsed().as_secs_f64();
    println!(
        "{:.0} {:.1}",
        ops as f64 / el,
        ops as f64 * f64::from(bytes) / el / 1e6
    );
    ExitCode::SUCCESS
}

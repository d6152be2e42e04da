//! A small iSCSI load generator for benchmarks: `S` sessions (one command in flight each)
//! writing or reading `BYTES`-sized blocks sequentially (each session its own region), or
//! reading at random offsets (`randread`), for `SECS` seconds through the project's own
//! initiator. Prints `ops MB/s` on one line.
//!
//! Usage: `write-load write|read|randread PORTAL IQN SESSIONS BYTES SECS [VOLUME_BYTES]
//! [lost=C/N/K/M/CHUNK]`. With `lost=...`, `randread` reads only blocks whose data chunk
//! lives on controller `C` of an `N`-controller cluster with geometry `K`+`M` and `CHUNK`-byte
//! chunks (64 MiB extents, rotated placement, as `appliance up` lays volumes out): with `C`
//! down, every read then needs reconstruction (the worst case of a degraded volume).
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
        eprintln!("usage: write-load write|read|randread PORTAL IQN SESSIONS BYTES SECS [VOLUME_BYTES] [lost=C/N/K/M/CHUNK]");
        return ExitCode::FAILURE;
    }
    let write = a[0] == "write";
    let random = a[0] == "randread";
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
    let lost = match a.get(7).map(|l| parse_lost(l)) {
        None => None,
        Some(Some(l)) => Some(std::sync::Arc::new(l)),
        Some(None) => {
            eprintln!("error: `{}` is not lost=C/N/K/M/CHUNK", a[7]);
            return ExitCode::FAILURE;
        }
    };
    let iqn = a[2].clone();
    let blocks = bytes / 512;
    let region = volume / sessions / u64::from(bytes) * u64::from(bytes);
    let stop = Instant::now() + Duration::from_secs(secs);
    let tasks = (0..sessions).map(|s| {
        let iqn = iqn.clone();
        let lost = lost.clone();
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
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (s + 1).wrapping_mul(0xd1b5_4a32_d192_ed03);
            while Instant::now() < stop {
                let lba = if random {
                    random_offset(&mut rng, volume, bytes, lost.as_deref()) / 512
                } else {
                    (s * region + off) / 512
                };
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

/// A cluster layout and the controller whose data chunks a degraded read targets.
struct Lost {
    ctrl: u32,
    controllers: Vec<u32>,
    geometry: raid_engine::layout::Geometry,
}

fn parse_lost(s: &str) -> Option<Lost> {
    let v: Vec<u64> = s
        .strip_prefix("lost=")?
        .split('/')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [ctrl, n, k, m, chunk] = v[..] else {
        return None;
    };
    let rows = raid_engine::layout::default_rows_per_extent(k as usize, u32::try_from(chunk).ok()?);
    let geometry = raid_engine::layout::Geometry::new(
        k as usize,
        m as usize,
        u32::try_from(chunk).ok()?,
        rows,
        raid_engine::codec::CodecKind::default(),
        None,
    )
    .ok()?;
    Some(Lost {
        ctrl: u32::try_from(ctrl).ok()?,
        controllers: (1..=u32::try_from(n).ok()?).collect(),
        geometry,
    })
}

/// A random `bytes`-aligned offset in the volume; with `lost`, one inside a data chunk held by
/// the lost controller.
fn random_offset(rng: &mut u64, volume: u64, bytes: u32, lost: Option<&Lost>) -> u64 {
    loop {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let off = *rng % (volume / u64::from(bytes)) * u64::from(bytes);
        let Some(l) = lost else { return off };
        let g = &l.geometry;
        let extent = off / g.extent_bytes();
        let col = (off % g.row_bytes()) / u64::from(g.chunk_bytes);
        let set = raid_engine::layout::rotated_placement(extent, &l.controllers, g.width())
            .expect("enough controllers");
        if set[col as usize] == l.ctrl {
            return off;
        }
    }
}

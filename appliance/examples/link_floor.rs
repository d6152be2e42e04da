//! The floor of moving a chunk across a peer link on this machine: what the kernel's loopback
//! TCP and the peer links' TLS cost for one request and its answer, with nothing else done.
//!
//! A server thread answers each 64-byte request with `--size` bytes from a buffer made once;
//! a client thread keeps `--depth` requests in flight and reads every answer whole. Both use
//! blocking sockets (no runtime, no readiness polling, no framing, no checksums), over
//! plaintext TCP or over TLS 1.3 with the controllers' own configuration
//! ([`appliance::peer::tls::PeerTls`], certificates from a throw-away cluster CA). The process's
//! CPU time (both threads, user and system, from `/proc/self/stat`) divided by the answers is
//! the least a controller can spend to fetch a chunk from another controller here; the data
//! path's own cost per remote chunk read is measured end to end by `scripts/profile.sh` and
//! `scripts/bench.sh` (docs/benchmarks.md compares them).
//!
//! With `--peer` the same exchange goes through the controllers' own peer transport instead
//! ([`appliance::peer::serve`] and [`appliance::peer::PeerClient`] on one tokio worker each, as
//! a controller runs): a ranged chunk read answered with one copy of `--size` bytes, cloned
//! from memory as a holder copies it out of its store. The difference to the blocking floor
//! is what the runtime and the framing add.
//!
//! `cargo run --release -p appliance --example link_floor -- [--tls] [--peer] [--depth N] [--size B] [--secs S]`
//!
//! Invariants: binds 127.0.0.1 only; every answer is checked for its length and first byte,
//! so a short or garbled answer fails the run instead of counting.

use appliance::peer::tls::{issue, server_name, PeerTls};
use appliance::peer::wire::{RemoteError, Reply, Request};
use appliance::peer::{PeerClient, PeerHandler, PeerLimits};
use raid_engine::shard::{BoxFut, Chunk, ChunkAddr, RangeRead, Want};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The controllers' allocator, so the TLS records' buffers cost what they cost there.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REQ: usize = 64;
const USAGE: &str = "[--tls] [--peer] [--depth N] [--size B] [--secs S]";

#[derive(Clone, Copy)]
struct Opts {
    tls: bool,
    peer: bool,
    depth: usize,
    size: usize,
    secs: f64,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        tls: false,
        peer: false,
        depth: 8,
        size: 64 << 10,
        secs: 5.0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--tls" => o.tls = true,
            "--peer" => o.peer = true,
            "--depth" => {
                o.depth = val("--depth")?
                    .parse()
                    .map_err(|e| format!("--depth: {e}"))?
            }
            "--size" => o.size = val("--size")?.parse().map_err(|e| format!("--size: {e}"))?,
            "--secs" => o.secs = val("--secs")?.parse().map_err(|e| format!("--secs: {e}"))?,
            _ => return Err(format!("unknown argument {a:?}; use {USAGE}")),
        }
    }
    if o.depth == 0 || o.size == 0 {
        return Err("--depth and --size must be at least 1".into());
    }
    Ok(o)
}

/// Runs `f` (which returns the answers it got); returns them with the CPU seconds and the
/// wall time it took.
fn timed(f: impl FnOnce() -> u64) -> (u64, f64, Duration) {
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let n = f();
    (n, cpu_seconds() - c0, t0.elapsed())
}

/// User plus system CPU of this process (every thread), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // Linux reports these in USER_HZ, which is 100 on every architecture it supports.
    ticks as f64 / 100.0
}

fn serve(mut s: impl Read + Write, size: usize) {
    let answer = vec![0xa5u8; size];
    let mut req = [0u8; REQ];
    loop {
        if s.read_exact(&mut req).is_err() {
            return;
        }
        if req[0] == 0xff {
            return;
        }
        s.write_all(&answer).unwrap();
        s.flush().unwrap();
    }
}

fn drive(mut s: impl Read + Write, o: &Opts) -> u64 {
    let mut buf = vec![0u8; o.size];
    let req = [0u8; REQ];
    let deadline = Instant::now() + Duration::from_secs_f64(o.secs);
    let mut in_flight = 0;
    let mut answers = 0u64;
    for _ in 0..o.depth {
        s.write_all(&req).unwrap();
        in_flight += 1;
    }
    s.flush().unwrap();
    while in_flight > 0 {
        s.read_exact(&mut buf).unwrap();
        assert!(buf[0] == 0xa5 && buf[o.size - 1] == 0xa5, "garbled answer");
        in_flight -= 1;
        answers += 1;
        if Instant::now() < deadline {
            s.write_all(&req).unwrap();
            s.flush().unwrap();
            in_flight += 1;
        }
    }
    let mut stop = [0u8; REQ];
    stop[0] = 0xff;
    s.write_all(&stop).unwrap();
    s.flush().unwrap();
    answers
}

/// Answers every ranged read with one copy of the chunk, cloned (a holder copies it out of its
/// store).
struct Holder(Chunk);

impl PeerHandler for Holder {
    fn handle(&self, _: u32, _: u64, req: Request) -> BoxFut<'_, Result<Reply, RemoteError>> {
        Box::pin(async move {
            match req {
                Request::ReadRange(..) => Ok(Reply::Copies(vec![self.0.clone()])),
                _ => Ok(Reply::Done),
            }
        })
    }
}

/// One ranged read of a whole chunk through the peer client, its answer checked.
async fn read_one(c: &PeerClient, row: u32, size: usize) {
    let addr = ChunkAddr {
        volume: 1,
        extent: 0,
        row,
        pos: 0,
    };
    let read = RangeRead {
        want: Want::Version(1),
        off: 0,
        len: size as u32,
    };
    match c.call(1, Request::ReadRange(addr, read)).await {
        Ok(Reply::Copies(cs)) => assert!(
            cs.len() == 1 && cs[0].data.len() == size && cs[0].data[0] == 0xa5,
            "garbled answer"
        ),
        other => panic!("unexpected answer {other:?}"),
    }
}

/// One controller's runtime: a single worker, as `appliance run` starts it on this machine.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The exchange through the peer transport; returns (answers, CPU seconds, wall time).
fn peer(o: Opts, pki: &std::path::Path) -> (u64, f64, Duration) {
    let server_rt = runtime();
    let client_rt = runtime();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().unwrap();
    let chunk = Chunk {
        version: 1,
        cols: vec![1, 0, 0],
        acked: 0,
        acked_cols: Vec::new(),
        data: vec![0xa5; o.size],
    };
    let server_tls = o.tls.then(|| Arc::new(PeerTls::load(pki, 2).unwrap()));
    server_rt.spawn(appliance::peer::serve(
        listener,
        2,
        Arc::new(Holder(chunk)),
        PeerLimits::default(),
        server_tls,
    ));
    let client = PeerClient::new(1, addr, PeerLimits::default());
    let client = Arc::new(if o.tls {
        client.with_tls(&PeerTls::load(pki, 1).unwrap(), Some(2))
    } else {
        client
    });
    let size = o.size;
    client_rt.block_on(async {
        // Connect (and shake hands) before the clock starts.
        read_one(&client, 0, size).await;
        let (t0, c0) = (Instant::now(), cpu_seconds());
        let deadline = t0 + Duration::from_secs_f64(o.secs);
        let workers = (0..o.depth).map(|w| {
            let c = Arc::clone(&client);
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    read_one(&c, w as u32, size).await;
                    n += 1;
                }
                n
            })
        });
        let mut answers = 0;
        for w in futures::future::join_all(workers).await {
            answers += w.unwrap();
        }
        (answers, cpu_seconds() - c0, t0.elapsed())
    })
}

fn main() {
    // Copy as the controllers do (appliance::copy_tuning; APPLIANCE_KEEP_COPIES=1 keeps glibc's
    // default copies, which on AMD parts with FSRM make rustls's record copy far slower).
    if let Some(e) = appliance::copy_tuning::restart_if_needed() {
        eprintln!("link_floor: {e}");
    }
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("link_floor: {e}");
            std::process::exit(2);
        }
    };
    let pki = tempfile::tempdir().expect("a temporary directory");
    issue(pki.path(), &[1, 2]).expect("a throw-away cluster CA");
    if o.peer {
        let (answers, cpu, wall) = peer(o, pki.path());
        report(o, answers, cpu, wall);
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let addr = listener.local_addr().unwrap();
    let (tls1, tls2) = if o.tls {
        (
            Some(PeerTls::load(pki.path(), 1).unwrap()),
            Some(PeerTls::load(pki.path(), 2).unwrap()),
        )
    } else {
        (None, None)
    };
    let size = o.size;
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        match tls2 {
            None => serve(s, size),
            Some(t) => {
                let c = rustls::ServerConnection::new(Arc::clone(&t.server)).unwrap();
                serve(rustls::StreamOwned::new(c, s), size);
            }
        }
    });
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let (answers, cpu, wall) = match tls1 {
        None => timed(|| drive(s, &o)),
        Some(t) => {
            let mut c =
                rustls::ClientConnection::new(Arc::clone(&t.client), server_name(Some(2))).unwrap();
            let mut s = s;
            // Shake hands before the clock starts.
            while c.is_handshaking() {
                c.complete_io(&mut s).unwrap();
            }
            timed(|| drive(rustls::StreamOwned::new(c, s), &o))
        }
    };
    server.join().unwrap();
    report(o, answers, cpu, wall);
}

fn report(o: Opts, answers: u64, cpu: f64, wall: Duration) {
    println!(
        "{}{} depth {} answers of {} B: {:.0} answers/s, {:.1} us of CPU per answer (both ends)",
        if o.peer {
            "peer transport, "
        } else {
            "blocking, "
        },
        if o.tls { "tls" } else { "plain" },
        o.depth,
        o.size,
        answers as f64 / wall.as_secs_f64(),
        cpu / answers as f64 * 1e6
    );
}

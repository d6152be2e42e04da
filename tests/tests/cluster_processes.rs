//! Real processes: three `appliance run` controllers (k=2, m=1) on loopback, each with its own
//! portal, peer port, data dir and shard file. A checksummed pattern is written over iSCSI
//! through one portal while a controller (the primary of the rows being written, then
//! another) is killed with SIGKILL; writing and reading go on through the surviving portals;
//! `appliance status` shows exactly the rows written around it; the killed controller is
//! restarted, resync copies exactly those rows, and every block reads back as last
//! acknowledged through every portal. Also: a frozen controller (SIGSTOP), and five
//! controllers (k=3, m=2) losing two at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Child;
use std::time::{Duration, Instant};
use tests::appliance::{free_port, spawn};
use tests::initiator::{read16, write16, Initiator, LoginOptions};

const IQN: &str = "iqn.2026-11.io.rainio:cluster-test";
const BS: usize = 512;
/// Blocks per write (32 KiB).
const CHUNK_BLOCKS: u32 = 64;
/// Writes across the volume's first part.
const WRITES: u64 = 96;

struct Ctrl {
    dir: tempfile::TempDir,
    portal: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
    /// The cluster's certificate directory (the CA and every controller's certificate, made
    /// by `appliance pki`); shared by the cluster's controllers.
    pki: std::sync::Arc<tempfile::TempDir>,
    /// Whether its peer links are plaintext (`cluster.tls = false`).
    plain: bool,
}

impl Ctrl {
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("appliance.log")).unwrap_or_default()
    }
}

impl Drop for Ctrl {
    fn drop(&mut self) {
        // A failing test shows how each controller's log ended (and whether its process was
        // still running): the temp dir, and the log with it, is gone once the test is over.
        if std::thread::panicking() {
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => format!("exited: {status}"),
                Some(_) => "running".to_string(),
                None => "not running (never started or stopped by the test)".to_string(),
            };
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            eprintln!(
                "---- controller with peer port {} ({exited}), last {} log lines:",
                self.peer,
                tail.len()
            );
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
        self.kill9();
    }
}

fn start_cluster() -> Vec<Ctrl> {
    start_cluster_of(3, 2, 1)
}

/// `n` controllers, `k` + `m` geometry, mutual TLS on peer links.
fn start_cluster_of(n: u32, k: usize, m: usize) -> Vec<Ctrl> {
    start_cluster_with(n, k, m, true)
}

/// `n` controllers, `k` + `m` geometry; `tls = false`: plaintext peer links.
fn start_cluster_with(n: u32, k: usize, m: usize, tls: bool) -> Vec<Ctrl> {
    start_cluster_extra(n, k, m, tls, &|_| String::new())
}

/// As [`start_cluster_with`], with `extra(id)` appended to controller `id`'s config.
fn start_cluster_extra(
    n: u32,
    k: usize,
    m: usize,
    tls: bool,
    extra: &dyn Fn(u32) -> String,
) -> Vec<Ctrl> {
    start_cluster_founded(n, n, k, m, tls, extra)
}

/// `n` controllers of which the first `founding` form the cluster (their configs name only
/// each other) and are started; the others have a config naming every controller and a
/// certificate, ready to be started and added (`appliance controller add`).
fn start_cluster_founded(
    n: u32,
    founding: u32,
    k: usize,
    m: usize,
    tls: bool,
    extra: &dyn Fn(u32) -> String,
) -> Vec<Ctrl> {
    let ids: Vec<u32> = (1..=n).collect();
    let portals: BTreeMap<u32, SocketAddr> = ids
        .iter()
        .map(|&i| (i, format!("127.0.0.1:{}", free_port()).parse().unwrap()))
        .collect();
    let peers: BTreeMap<u32, SocketAddr> = ids
        .iter()
        .map(|&i| (i, format!("127.0.0.1:{}", free_port()).parse().unwrap()))
        .collect();
    let map = |m: &BTreeMap<u32, SocketAddr>, i: u32| {
        m.iter()
            .filter(|(&j, _)| i > founding || j <= founding)
            .map(|(i, a)| format!("\"{i}\" = \"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let pki = std::sync::Arc::new(make_pki(&ids));
    ids.iter()
        .map(|&i| {
            let dir = tempfile::tempdir().unwrap();
            let cfg = format!(
                "data_dir = \".\"\nlog_level = \"info\"\n[iscsi]\nlisten = \"{}\"\ntpgt = {i}\n[target]\niqn = \"{IQN}\"\n[[volume]]\nname = \"vol0\"\nlun = 0\nsize = \"64MiB\"\nblock_size = 512\n[cluster]\nid = {i}\npeers = {{ {} }}\nportals = {{ {} }}\nk = {k}\nm = {m}\nchunk = \"16KiB\"\nbootstrap = {}\n{}\n",
                portals[&i],
                map(&peers, i),
                map(&portals, i),
                i == 1,
                if tls {
                    format!("pki = \"{}\"", pki.path().display())
                } else {
                    "tls = false".into()
                }
            ) + &extra(i);
            std::fs::write(dir.path().join("appliance.toml"), cfg).unwrap();
            let child = (i <= founding).then(|| spawn(dir.path()));
            Ctrl {
                dir,
                portal: portals[&i],
                peer: peers[&i],
                child,
                pki: pki.clone(),
                plain: !tls,
            }
        })
        .collect()
}

/// A cluster CA and certificates for controllers `ids`, made by `appliance pki`.
fn make_pki(ids: &[u32]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = std::process::Command::new(tests::appliance::binary())
        .args(["pki", "--dir"])
        .arg(dir.path())
        .args(["--controller", &list])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "appliance pki: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The volume's layout as `appliance run` derives it from the test's config (64 MiB, 16 KiB
/// chunks, 64 MiB extents, rotated placement over controllers 1..=n).
fn layout(k: usize, m: usize) -> raid_engine::layout::Layout {
    let chunk = 16u32 << 10;
    let rows = raid_engine::layout::default_rows_per_extent(k, chunk);
    raid_engine::layout::Layout {
        size_bytes: 64 << 20,
        geometry: raid_engine::layout::Geometry::new(
            k,
            m,
            chunk,
            rows,
            raid_engine::codec::CodecKind::default(),
            None,
        )
        .unwrap(),
    }
}

/// The rows that writes `ws` touch, and those among them in which controller `id` holds a
/// position the write sends a chunk to (a touched data column, or parity): the chunks it
/// misses while it is down.
fn rows_missed(
    n: u32,
    k: usize,
    m: usize,
    id: u32,
    ws: impl Iterator<Item = u64>,
) -> (usize, usize) {
    let l = layout(k, m);
    let ids: Vec<u32> = (1..=n).collect();
    let chunk = u64::from(l.geometry.chunk_bytes);
    let mut touched = std::collections::BTreeSet::new();
    let mut targeted = std::collections::BTreeSet::new();
    for w in ws {
        let len = u64::from(CHUNK_BLOCKS) * BS as u64;
        for sp in l.spans(lba(w) * BS as u64, len) {
            let set = raid_engine::layout::rotated_placement(sp.extent, &ids, k + m).unwrap();
            let first = u64::from(sp.offset_in_row) / chunk;
            let last = (u64::from(sp.offset_in_row) + u64::from(sp.len) - 1) / chunk;
            let pos = set.iter().position(|&c| c == id).unwrap() as u64;
            touched.insert((sp.extent, sp.row));
            if (first..=last).contains(&pos) || pos >= k as u64 {
                targeted.insert((sp.extent, sp.row));
            }
        }
    }
    (touched.len(), targeted.len())
}

fn pattern(gen: u32, w: u64) -> Vec<u8> {
    let mut v = vec![0u8; CHUNK_BLOCKS as usize * BS];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u32 ^ gen.wrapping_mul(0x9e37) ^ (w as u32).wrapping_mul(31)) as u8;
    }
    v[..4].copy_from_slice(&gen.to_le_bytes());
    v[4..12].copy_from_slice(&w.to_le_bytes());
    v
}

fn lba(w: u64) -> u64 {
    w * u64::from(CHUNK_BLOCKS)
}

/// Logs in, retrying while the portal or the cluster is not ready.
async fn connect(addr: SocketAddr, deadline: Instant) -> Initiator {
    loop {
        if let Ok(mut i) = Initiator::login(addr, &LoginOptions::normal(IQN)).await {
            if let Ok(r) = i.command(0, &[0; 6], &[], 0).await {
                if r.status == 0 {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "no usable session on {addr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes write `w` at generation `gen`, retrying NOT READY and UNIT ATTENTION until the
/// deadline. Returns whether it was acknowledged.
async fn write(i: &mut Initiator, w: u64, gen: u32, deadline: Instant) -> bool {
    let data = pattern(gen, w);
    loop {
        match i
            .command(0, &write16(lba(w), CHUNK_BLOCKS), &data, data.len() as u32)
            .await
        {
            Ok(r) if r.status == 0 => return true,
            // NOT READY (cluster changing) and UNIT ATTENTION (e.g. access states changed)
            // are retried, as hosts do.
            Ok(r) if r.status == 2 && matches!(r.sense.get(2).map(|k| k & 0xf), Some(2 | 6)) => {}
            Ok(r) => panic!("write {w}: status {:#x} sense {:02x?}", r.status, r.sense),
            Err(_) => return false,
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn verify(addr: SocketAddr, want: &BTreeMap<u64, u32>, what: &str) {
    let one: BTreeMap<u64, Vec<u32>> = want.iter().map(|(&w, &g)| (w, vec![g])).collect();
    verify_any(addr, &one, what).await;
}

/// Runs a command, retrying UNIT ATTENTION and NOT READY as hosts do (under CPU load a late
/// heartbeat can change membership, hence access states, at any time) until `deadline`.
async fn retrying(
    i: &mut Initiator,
    cdb: &[u8],
    data: &[u8],
    want: u32,
    deadline: Instant,
) -> tests::initiator::ScsiResult {
    loop {
        let r = i.command(0, cdb, data, want).await.expect("command");
        let transient = r.status == 2 && matches!(r.sense.get(2).map(|k| k & 0xf), Some(2 | 6));
        if !transient || Instant::now() > deadline {
            return r;
        }
        eprintln!("sense {:02x?}: retrying, as hosts do", r.sense);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (up to 120 s: CI runs debug builds of several clusters at once) until one of the
/// controllers' logs contains `text`.
async fn wait_log(c: &[Ctrl], text: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c.iter().any(|c| c.log().contains(text)) {
        assert!(
            Instant::now() < deadline,
            "no log line `{text}`; logs:\n{}",
            c.iter().map(Ctrl::log).collect::<Vec<_>>().join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `appliance status --peer ... --json` of one controller, as an operator would run it.
fn status(c: &Ctrl) -> Option<serde_json::Value> {
    let out = std::process::Command::new(tests::appliance::binary())
        .args(["status", "--peer", &c.peer.to_string(), "--json", "--pki"])
        .arg(if c.plain {
            std::path::Path::new("none")
        } else {
            c.pki.path()
        })
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `c`'s status (up to 120 s) until `ok` holds; returns that status.
async fn wait_status(
    c: &Ctrl,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(c);
        if let Some(s) = s.as_ref().filter(|s| ok(s)) {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "status of {} never showed {what}; last: {s:?}",
            c.peer
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The only volume's entry in a status.
fn vol0(s: &serde_json::Value) -> &serde_json::Value {
    &s["volumes"][0]
}

/// Chunks copied by resync, summed over the controllers that answer.
fn resync_total(c: &[Ctrl]) -> u64 {
    c.iter()
        .filter(|c| c.child.is_some())
        .filter_map(status)
        .map(|s| s["resync_chunks"].as_u64().expect("resync_chunks"))
        .sum()
}

/// One round: with the cluster (`k` + `m` over all its controllers) healthy, writes
/// generation `gen` of every write through controller `via`, SIGKILLs controller `victim` a
/// third of the way in, keeps writing, checks that the write-intent log names at least the
/// rows whose chunks it missed and at most the rows written since, restarts it, and checks
/// that resync copied exactly the chunks it missed before it serves the latest data.
async fn kill_write_restart(
    c: &mut [Ctrl],
    (k, m): (usize, usize),
    victim: usize,
    via: usize,
    want: &mut BTreeMap<u64, Vec<u32>>,
    gen: u32,
) {
    let id = victim + 1;
    wait_status(&c[via], "a healthy volume", |s| {
        vol0(s)["health"] == "healthy" && s["fenced"] == false
    })
    .await;
    let copied_before = resync_total(c);
    let mut w1 = connect(c[via].portal, Instant::now() + Duration::from_secs(90)).await;
    for w in 0..WRITES {
        if w == WRITES / 3 {
            c[victim].kill9();
        }
        let until = Instant::now() + Duration::from_secs(30);
        if !write(&mut w1, w, gen, until).await {
            // Not acknowledged: either generation may be on disk. Overwrite it until it is.
            w1 = connect(c[via].portal, Instant::now() + Duration::from_secs(90)).await;
            assert!(
                write(&mut w1, w, gen, until).await,
                "write {w} never acknowledged"
            );
        }
        want.insert(w, vec![gen]);
    }
    let (touched, missed) = rows_missed(c.len() as u32, k, m, id as u32, WRITES / 3..WRITES);
    verify_any(
        c[via].portal,
        want,
        &format!(
            "with controller {id} killed, through controller {}",
            via + 1
        ),
    )
    .await;
    wait_log(c, &format!("membership change controller={id} state=Down")).await;
    let s = wait_status(
        &c[via],
        "the rows written around the killed controller",
        |s| {
            let behind = vol0(s)["rows_behind"].as_u64().unwrap_or(0) as usize;
            vol0(s)["health"] == "degraded" && behind >= missed
        },
    )
    .await;
    let behind = vol0(&s)["chunks_behind"][0][1].as_u64().unwrap() as usize;
    assert_eq!(vol0(&s)["chunks_behind"][0][0], id, "{s}");
    assert!(
        (missed..=touched).contains(&behind),
        "{behind} chunks marked on controller {id}; it missed {missed}, {touched} rows were written: {s}"
    );
    // Restart it: resync copies exactly what it missed, then it is up and serves the latest.
    c[victim].child = Some(spawn(c[victim].dir.path()));
    wait_log(c, &format!("membership change controller={id} state=Up")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while resync_total(c) < copied_before + missed as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Exactly the missed chunks where every write covers whole rows (3 controllers); with
    // partial rows a primary may also re-issue the down holder's untouched column of a row it
    // rewrote (it could not read it), so then: at least the missed chunks, at most one per
    // row written while it was down, never any other row.
    let copied = (resync_total(c) - copied_before) as usize;
    assert!(
        (missed..=touched).contains(&copied),
        "resync copied {copied} chunks to controller {id}; it missed {missed} in the {touched} rows written while it was down"
    );
    if missed == touched {
        assert_eq!(copied, missed);
    }
    eprintln!(
        "controller {id}: missed {missed} chunks in {touched} rows written while down; {behind} marked; resync copied {copied}"
    );
    wait_status(&c[victim], "a healthy volume after resync", |s| {
        vol0(s)["health"] == "healthy"
    })
    .await;
    verify_any(
        c[victim].portal,
        want,
        &format!("after restart, through controller {id}"),
    )
    .await;
}

/// The index of the primary of extent 0 (where everything the tests write lies) among `n`.
fn primary_of_extent0(n: u32, width: usize) -> usize {
    let ids: Vec<u32> = (1..=n).collect();
    raid_engine::layout::rotated_placement(0, &ids, width).unwrap()[0] as usize - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_primary_then_another_controller_mid_write_and_lose_nothing() {
    let mut c = start_cluster();
    let primary = primary_of_extent0(3, 3);
    let other = (primary + 1) % 3;
    let last = (primary + 2) % 3;
    let mut want = BTreeMap::new();
    // Round 1: kill the primary of the rows being written, writing through another portal.
    kill_write_restart(&mut c, (2, 1), primary, other, &mut want, 1).await;
    // Round 2: kill a non-primary holder, writing through the primary's portal.
    kill_write_restart(&mut c, (2, 1), last, primary, &mut want, 2).await;
    // With any one controller gone now, the other two serve everything.
    c[other].kill9();
    verify_any(
        c[last].portal,
        &want,
        &format!(
            "with controller {} killed, through controller {}",
            other + 1,
            last + 1
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_controller_is_written_around_and_fenced_when_it_resumes() {
    let c = start_cluster();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut w1 = connect(c[0].portal, deadline).await;
    let mut via2 = connect(c[1].portal, deadline).await;
    let mut want = BTreeMap::new();
    for w in 0..WRITES / 2 {
        assert!(write(&mut w1, w, 1, deadline).await, "healthy write {w}");
        want.insert(w, 1);
    }
    // Freeze controller 2 for longer than down_after (3 s).
    let pid2 = c[1].child.as_ref().expect("running").id().to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid2])
            .status()
            .expect("kill")
    };
    assert!(signal("-STOP").success());
    let frozen = Instant::now();
    // Writes through controller 1 continue within a few seconds.
    let mut first_ack = None;
    for w in 0..WRITES / 2 {
        let until = Instant::now() + Duration::from_secs(20);
        assert!(
            write(&mut w1, w, 2, until).await,
            "write {w} while 2 is frozen"
        );
        first_ack.get_or_insert_with(|| frozen.elapsed());
        want.insert(w, 2);
    }
    eprintln!(
        "first write acknowledged {:?} after the freeze; all {} in {:?}",
        first_ack.unwrap_or_default(),
        WRITES / 2,
        frozen.elapsed()
    );
    wait_log(&c, "membership change controller=2 state=Down").await;
    let elapsed = frozen.elapsed();
    assert!(
        elapsed < Duration::from_secs(20),
        "writes took {elapsed:?} to resume"
    );
    if frozen.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_secs(4) - frozen.elapsed()).await;
    }
    assert!(signal("-CONT").success());
    // On resuming it refuses I/O (its lease ran out while frozen, its epoch is old); a unit
    // attention (its access state changed) may come first ...
    let r = loop {
        let r = via2
            .command(
                0,
                &read16(lba(0), CHUNK_BLOCKS),
                &[],
                CHUNK_BLOCKS * BS as u32,
            )
            .await
            .expect("the session survives the freeze");
        if !(r.status == 2 && r.sense.get(2).map(|k| k & 0xf) == Some(6)) {
            break r;
        }
    };
    assert_eq!(
        r.status, 2,
        "a resumed controller must not serve before catching up"
    );
    assert_eq!(
        r.sense.get(2).map(|k| k & 0xf),
        Some(2),
        "NOT READY: {:02x?}",
        r.sense
    );
    // ... until it has caught up: then it serves the latest data.
    wait_log(&c, "membership change controller=2 state=Up").await;
    verify(c[1].portal, &want, "after the freeze, through controller 2").await;
    drop(via2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_controllers_k3_m2_lose_two_at_once_reads_go_on_writes_fail_cleanly() {
    let mut c = start_cluster_of(5, 3, 2);
    let mut want: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    // One at a time first: the primary of the rows being written, then another controller
    // (writes here are 32 KiB against 48 KiB rows, so some rows are partial and a controller
    // misses only the rows whose chunks a write sends it).
    let primary = primary_of_extent0(5, 5);
    kill_write_restart(&mut c, (3, 2), primary, (primary + 1) % 5, &mut want, 10).await;
    kill_write_restart(&mut c, (3, 2), (primary + 2) % 5, primary, &mut want, 11).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut w1 = connect(c[0].portal, deadline).await;
    for w in 0..WRITES / 2 {
        assert!(write(&mut w1, w, 1, deadline).await, "healthy write {w}");
        want.insert(w, vec![1]);
    }
    // Two controllers killed at once, mid-loop: with write_quorum = max(k, k+m-1) = 4 and
    // three holders left, writes must fail (NOT READY), never be acknowledged short of quorum.
    let mut acked_with_two_down = 0;
    for w in 0..16 {
        if w == 4 {
            c[3].kill9();
            c[4].kill9();
        }
        let until = Instant::now() + Duration::from_secs(if w < 4 { 20 } else { 1 });
        if write(&mut w1, w, 2, until).await {
            want.insert(w, vec![2]);
            if w >= 4 {
                acked_with_two_down += 1;
            }
        } else {
            // Not acknowledged: either generation may be on disk.
            want.insert(w, vec![1, 2]);
            w1 = connect(c[0].portal, Instant::now() + Duration::from_secs(90)).await;
        }
    }
    wait_log(&c[..3], "membership change controller=4 state=Down").await;
    wait_log(&c[..3], "membership change controller=5 state=Down").await;
    // Acknowledged writes after both were declared down would violate write_quorum.
    let after_down = write(&mut w1, 0, 3, Instant::now() + Duration::from_secs(3)).await;
    assert!(
        !after_down,
        "a write was acknowledged with only 3 of 5 holders (write_quorum 4)"
    );
    want.insert(0, vec![1, 2, 3]);
    eprintln!(
        "{acked_with_two_down} writes acknowledged between the kills and the down declaration"
    );
    // Reads go on through the three survivors.
    verify_any(
        c[1].portal,
        &want,
        "with two of five down, through controller 2",
    )
    .await;
    verify_any(
        c[2].portal,
        &want,
        "with two of five down, through controller 3",
    )
    .await;
    // Both come back; once up, writes are acknowledged again and read back everywhere.
    c[3].child = Some(spawn(c[3].dir.path()));
    c[4].child = Some(spawn(c[4].dir.path()));
    wait_log(&c, "membership change controller=4 state=Up").await;
    wait_log(&c, "membership change controller=5 state=Up").await;
    let mut w1 = connect(c[0].portal, Instant::now() + Duration::from_secs(90)).await;
    for w in 0..WRITES / 2 {
        assert!(
            write(&mut w1, w, 4, Instant::now() + Duration::from_secs(20)).await,
            "write {w} after both returned"
        );
        want.insert(w, vec![4]);
    }
    for (i, ctrl) in c.iter().enumerate() {
        verify_any(
            ctrl.portal,
            &want,
            &format!("after recovery, through controller {}", i + 1),
        )
        .await;
    }
}

/// The controllers voting in the metadata log, from a status report.
fn voters(s: &serde_json::Value) -> Vec<u64> {
    s["log"]["voters"]
        .as_array()
        .expect("status has log.voters")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect()
}

/// Like [`verify`], accepting any of several generations per write (for unacknowledged ones).
async fn verify_any(addr: SocketAddr, want: &BTreeMap<u64, Vec<u32>>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = connect(addr, deadline).await;
    for (&w, gens) in want {
        loop {
            let r = i
                .command(
                    0,
                    &read16(lba(w), CHUNK_BLOCKS),
                    &[],
                    CHUNK_BLOCKS * BS as u32,
                )
                .await
                .expect("read");
            if r.status == 0 {
                // An unacknowledged write may have landed on some blocks and not others: each
                // 512-byte block must be one of the generations, whole.
                let pats: Vec<Vec<u8>> = gens.iter().map(|&g| pattern(g, w)).collect();
                for (b, got) in r.data.chunks(BS).enumerate() {
                    assert!(
                        pats.iter().any(|p| &p[b * BS..(b + 1) * BS] == got),
                        "{what}: block {b} of write {w} through {addr} is none of generations {gens:?}"
                    );
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: read {w} through {addr} kept failing: sense {:02x?}",
                r.sense
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

const RTPG: [u8; 12] = [0xa3, 0x0a, 0, 0, 0, 0, 0x04, 0, 0, 0, 0, 0];
const TUR: [u8; 6] = [0; 6];

/// Whether a response is the unit attention ASYMMETRIC ACCESS STATE CHANGED (06/2A/06).
fn is_alua_ua(r: &tests::initiator::ScsiResult) -> bool {
    r.status == 2
        && r.sense.get(2).map(|k| k & 0xf) == Some(6)
        && r.sense.get(12) == Some(&0x2a)
        && r.sense.get(13) == Some(&0x06)
}

/// REPORT TARGET PORT GROUPS through `i`: (group, access state) pairs by group, or `None` when the
/// command got a CHECK CONDITION (a unit attention, reported once).
async fn groups(i: &mut Initiator) -> Option<Vec<(u16, u8)>> {
    let r = i.command(0, &RTPG, &[], 1024).await.expect("rtpg");
    if r.status != 0 {
        assert!(
            is_alua_ua(&r),
            "RTPG: status {:#x} sense {:02x?}",
            r.status,
            r.sense
        );
        return None;
    }
    let len = u32::from_be_bytes(r.data[..4].try_into().unwrap()) as usize;
    Some(
        r.data[4..4 + len]
            .chunks(12)
            .map(|g| (u16::from_be_bytes([g[2], g[3]]), g[0] & 0x0f))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
    )
}

/// Portals SendTargets lists through `addr`.
async fn discovered(addr: SocketAddr) -> Vec<String> {
    let mut d = Initiator::login(addr, &LoginOptions::discovery())
        .await
        .expect("discovery login");
    d.send_targets()
        .await
        .expect("SendTargets")
        .into_iter()
        .filter(|(k, _)| k == "TargetAddress")
        .map(|(_, v)| v)
        .collect()
}

/// Polls TEST UNIT READY and REPORT TARGET PORT GROUPS through `i` until the groups read
/// `want`; returns how many ASYMMETRIC ACCESS STATE CHANGED unit attentions it got meanwhile.
async fn until_groups(i: &mut Initiator, want: &[(u16, u8)], what: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut uas = 0;
    loop {
        let r = i.command(0, &TUR, &[], 0).await.expect("tur");
        if is_alua_ua(&r) {
            uas += 1;
        }
        let g = groups(i).await;
        eprintln!(
            "{what}: tur {:#x} {:02x?} groups {g:?}",
            r.status,
            r.sense.get(12..14)
        );
        match g {
            Some(g) if g == want => return uas,
            Some(_) => {}
            None => uas += 1,
        }
        assert!(
            Instant::now() < deadline,
            "{what}: groups never read {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alua_groups_follow_membership_and_discovery_drops_an_unavailable_controller() {
    let mut c = start_cluster();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = Vec::new();
    for ctrl in &c {
        s.push(connect(ctrl.portal, deadline).await);
    }
    let healthy = [(1, 0), (2, 0), (3, 0)];
    // Every portal reports every controller's group, active/optimized, and SendTargets
    // through any portal lists all three.
    for (n, i) in s.iter_mut().enumerate() {
        until_groups(
            i,
            &healthy,
            &format!("healthy, through controller {}", n + 1),
        )
        .await;
    }
    for ctrl in &c {
        assert_eq!(discovered(ctrl.portal).await.len(), 3);
    }
    // Controller 3 dies: the survivors report its group unavailable, each of their nexuses
    // gets ASYMMETRIC ACCESS STATE CHANGED exactly once, and discovery leaves its portal out.
    c[2].kill9();
    let without3 = [(1, 0), (2, 0), (3, 3)];
    for (n, i) in s.iter_mut().take(2).enumerate() {
        let uas = until_groups(i, &without3, &format!("controller 3 down, via {}", n + 1)).await;
        assert_eq!(
            uas,
            1,
            "unit attentions through controller {}: {}",
            n + 1,
            c[n].log()
        );
        for _ in 0..3 {
            let r = i.command(0, &TUR, &[], 0).await.expect("tur");
            assert_eq!(r.status, 0, "a second unit attention: {:02x?}", r.sense);
        }
    }
    for ctrl in &c[..2] {
        let portals = discovered(ctrl.portal).await;
        assert_eq!(portals.len(), 2, "{portals:?}");
        assert!(
            !portals
                .iter()
                .any(|p| p.starts_with(&c[2].portal.to_string())),
            "{portals:?}"
        );
    }
    // It returns: after catching up it is active/optimized again everywhere and listed again.
    c[2].child = Some(spawn(c[2].dir.path()));
    until_groups(&mut s[0], &healthy, "controller 3 back, via 1").await;
    let mut back = connect(c[2].portal, Instant::now() + Duration::from_secs(90)).await;
    until_groups(&mut back, &healthy, "controller 3 back, via 3").await;
    assert_eq!(discovered(c[0].portal).await.len(), 3);
}

/// A session of initiator `name` through `addr`, past its first unit attentions.
async fn session_of(addr: SocketAddr, name: &str) -> Initiator {
    let opts = LoginOptions {
        initiator_name: format!("iqn.2026-11.io.rainio:{name}"),
        ..LoginOptions::normal(IQN)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut i) = Initiator::login(addr, &opts).await {
            // TEST UNIT READY until GOOD: past POWER ON and any ALUA unit attention, and the
            // volume served.
            loop {
                match i.command(0, &TUR, &[], 0).await {
                    Ok(r) if r.status == 0 => return i,
                    Ok(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => break,
                }
            }
        }
        assert!(Instant::now() < deadline, "no usable session on {addr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// PERSISTENT RESERVE OUT: `sa` service action, `ty` type, with `key` and `sa_key`.
async fn pr_out(i: &mut Initiator, sa: u8, ty: u8, key: u64, sa_key: u64) -> (u8, Vec<u8>) {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5f;
    cdb[1] = sa;
    cdb[2] = ty;
    cdb[8] = 24;
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    let r = i.command(0, &cdb, &p, 24).await.expect("PR OUT");
    (r.status, r.sense)
}

/// PERSISTENT RESERVE IN, READ RESERVATION: (key, type) of the reservation, if any.
async fn read_reservation(i: &mut Initiator) -> Option<(u64, u8)> {
    let cdb = [0x5e, 1, 0, 0, 0, 0, 0, 0, 64, 0];
    let r = i.command(0, &cdb, &[], 64).await.expect("PR IN");
    assert_eq!(r.status, 0, "PR IN: {:02x?}", r.sense);
    let len = u32::from_be_bytes(r.data[4..8].try_into().unwrap());
    (len >= 16).then(|| {
        (
            u64::from_be_bytes(r.data[8..16].try_into().unwrap()),
            r.data[21] & 0x0f,
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_taken_through_one_controller_is_enforced_through_the_others_at_once() {
    let c = start_cluster();
    const REGISTER: u8 = 0;
    const RESERVE: u8 = 1;
    const RELEASE: u8 = 2;
    const WRITE_EXCLUSIVE: u8 = 1;
    const CONFLICT: u8 = 0x18;
    let key = 0xabcd;
    // Host H registers its key through controller A (1) and through B (2), and reserves
    // Write Exclusive through B.
    let mut h_a = session_of(c[0].portal, "host-h").await;
    let mut h_b = session_of(c[1].portal, "host-h").await;
    // Host X, never registered, on controller C (3).
    let mut x_c = session_of(c[2].portal, "host-x").await;
    let data = pattern(7, 0);
    assert_eq!(pr_out(&mut h_a, REGISTER, 0, 0, key).await.0, 0);
    assert_eq!(pr_out(&mut h_b, REGISTER, 0, 0, key).await.0, 0);
    let (st, sense) = pr_out(&mut h_b, RESERVE, WRITE_EXCLUSIVE, key, 0).await;
    assert_eq!(st, 0, "RESERVE through B: {sense:02x?}");
    // At once, through C: a write from X conflicts, reads pass, and the reservation shows.
    let r = x_c
        .command(0, &write16(lba(0), CHUNK_BLOCKS), &data, data.len() as u32)
        .await
        .unwrap();
    assert_eq!(
        r.status, CONFLICT,
        "X's write through C right after RESERVE through B"
    );
    let r = x_c
        .command(0, &read16(lba(0), CHUNK_BLOCKS), &[], data.len() as u32)
        .await
        .unwrap();
    assert_eq!(r.status, 0, "reads pass Write Exclusive: {:02x?}", r.sense);
    assert_eq!(
        read_reservation(&mut x_c).await,
        Some((key, WRITE_EXCLUSIVE))
    );
    // The holder writes through B; a registered but non-holding nexus (H through A) is
    // refused under Write Exclusive, like any other.
    let r = h_b
        .command(0, &write16(lba(0), CHUNK_BLOCKS), &data, data.len() as u32)
        .await
        .unwrap();
    assert_eq!(r.status, 0, "the holder writes: {:02x?}", r.sense);
    let r = h_a
        .command(0, &write16(lba(1), CHUNK_BLOCKS), &data, data.len() as u32)
        .await
        .unwrap();
    assert_eq!(
        r.status, CONFLICT,
        "H through A does not hold the reservation"
    );
    // X cannot release what it does not hold (no effect), H releases through B, and X's
    // write through C goes through at once.
    assert_eq!(
        pr_out(&mut x_c, RELEASE, WRITE_EXCLUSIVE, 0, 0).await.0,
        CONFLICT
    );
    assert_eq!(
        pr_out(&mut h_b, RELEASE, WRITE_EXCLUSIVE, key, 0).await.0,
        0
    );
    let r = x_c
        .command(0, &write16(lba(0), CHUNK_BLOCKS), &data, data.len() as u32)
        .await
        .unwrap();
    assert_eq!(r.status, 0, "after RELEASE: {:02x?}", r.sense);
    assert_eq!(read_reservation(&mut h_a).await, None);
}

/// Runs `iscsi-test-cu` on `tests` with its two paths through portals `a` and `b` of `urls`;
/// returns the parsed results (and keeps the log under target/conformance).
fn run_cu(
    portals: &[SocketAddr],
    tests: &str,
    a: usize,
    b: usize,
) -> Vec<tests::cunit::TestResult> {
    let url = |i: usize| format!("iscsi://{}/{IQN}/0", portals[i]);
    let (_, out) = tests::appliance::run_tool(
        "iscsi-test-cu",
        &[
            "--dataloss",
            "--verbose",
            "--initiator-name",
            "iqn.2026-11.io.rainio:cluster-cu-1",
            "--initiator-name-2",
            "iqn.2026-11.io.rainio:cluster-cu-2",
            "--test",
            tests,
            &url(a),
            &url(b),
        ],
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance");
    std::fs::create_dir_all(&dir).expect("results dir");
    let name = tests.replace('*', "_");
    std::fs::write(
        dir.join(format!("cluster-{name}-{}-{}.log", a + 1, b + 1)),
        &out,
    )
    .expect("write log");
    tests::cunit::parse(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iscsi_test_cu_with_its_paths_on_different_controllers() {
    use tests::cunit::Outcome;
    let c = start_cluster();
    // Wait until every controller serves (the suite's first commands would see NOT READY).
    for ctrl in &c {
        drop(connect(ctrl.portal, Instant::now() + Duration::from_secs(60)).await);
    }
    let expected: std::collections::BTreeMap<String, String> = tests::cunit::parse_expected(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../conformance/expected-failures-cluster.txt"
        ))
        .expect("conformance/expected-failures-cluster.txt"),
    )
    .expect("every line has a reason")
    .into_iter()
    .collect();
    // Everything, its second path (MultipathIO, the second initiator of the reservation
    // tests) on another controller; then the multipath and reservation suites between the
    // other pairs, so every controller is on both ends.
    let plan: [(usize, usize, &str); 5] = [
        (0, 2, "ALL"),
        (1, 2, "ALL.MultipathIO"),
        (1, 0, "ALL.MultipathIO"),
        (1, 2, "ALL.Pr*"),
        (2, 1, "ALL.Reserve6"),
    ];
    let portals: Vec<SocketAddr> = c.iter().map(|c| c.portal).collect();
    let mut runs = Vec::new();
    for (a, b, t) in plan {
        // MultipathIO.CompareAndWrite in libiscsi 1.19 zeroes LBAs 0-255 with WRITE SAME but
        // then expects zeros at LBAs 0-256: LBA 256 must be zero before each run (it is on a
        // fresh LU; an earlier run leaves it written).
        let mut z = connect(c[a].portal, Instant::now() + Duration::from_secs(90)).await;
        let r = z
            .command(0, &write16(256, 1), &[0u8; BS], BS as u32)
            .await
            .expect("zero LBA 256");
        assert_eq!(r.status, 0, "zero LBA 256: {:02x?}", r.sense);
        drop(z);
        let p = portals.clone();
        let results = tokio::task::spawn_blocking(move || run_cu(&p, t, a, b))
            .await
            .expect("iscsi-test-cu runs");
        runs.push((a, b, t, results));
    }
    let mut problems = Vec::new();
    let mut total = 0;
    for (a, b, t, results) in runs {
        assert!(
            !results.is_empty(),
            "{t} through {} and {} ran nothing",
            a + 1,
            b + 1
        );
        if t == "ALL" {
            assert!(
                results.len() >= 200,
                "the whole ALL family: {}",
                results.len()
            );
        }
        for r in &results {
            total += 1;
            let listed = expected.contains_key(&r.name);
            if r.outcome == Outcome::Fail && !listed {
                problems.push(format!(
                    "{} failed (paths on controllers {} and {}); not in conformance/expected-failures-cluster.txt",
                    r.name,
                    a + 1,
                    b + 1
                ));
            }
            if r.outcome != Outcome::Fail && listed {
                problems.push(format!(
                    "{} no longer fails: remove it from conformance/expected-failures-cluster.txt",
                    r.name
                ));
            }
        }
    }
    eprintln!("iscsi-test-cu across controllers: {total} results");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_abort_through_one_controller_aborts_tasks_queued_on_another() {
    let c = start_cluster();
    const REGISTER: u8 = 0;
    const RESERVE: u8 = 1;
    const PREEMPT_AND_ABORT: u8 = 5;
    const WRITE_EXCLUSIVE: u8 = 1;
    let (kx, ky) = (0x1111, 0x2222);
    // X registers and reserves through A; Y registers through C.
    let mut x_a = session_of(c[0].portal, "host-x").await;
    let mut y_c = session_of(c[2].portal, "host-y").await;
    assert_eq!(pr_out(&mut x_a, REGISTER, 0, 0, kx).await.0, 0);
    assert_eq!(pr_out(&mut x_a, RESERVE, WRITE_EXCLUSIVE, kx, 0).await.0, 0);
    assert_eq!(pr_out(&mut y_c, REGISTER, 0, 0, ky).await.0, 0);
    // On A: seven 8 MiB WRITE SAMEs (SIMPLE; 8 MiB is the most one may cover), and an
    // ORDERED TEST UNIT READY queued behind them in the task set.
    let per = (8u64 << 20) / BS as u64;
    let mut long = Vec::new();
    for i in 0..7u64 {
        let mut ws = [0u8; 16];
        ws[0] = 0x93; // WRITE SAME(16)
        ws[2..10].copy_from_slice(&(i * per).to_be_bytes());
        ws[10..14].copy_from_slice(&(per as u32).to_be_bytes());
        long.push(
            x_a.send_write_same(0, &ws, &[0u8; BS])
                .await
                .expect("write same"),
        );
    }
    let queued = x_a
        .send_command(0, &[0; 6], 2, 0)
        .await
        .expect("ordered tur");
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Y preempts X's registration and reservation, and aborts its tasks, through C.
    let (st, sense) = pr_out(&mut y_c, PREEMPT_AND_ABORT, WRITE_EXCLUSIVE, ky, kx).await;
    assert_eq!(st, 0, "PREEMPT AND ABORT through C: {sense:02x?}");
    // Aborted tasks end without a response (TAS=0; the host learns from the unit attention):
    // collect what answers until A has been quiet for 5 s.
    let mut got = BTreeMap::new();
    while let Ok(r) = tokio::time::timeout(Duration::from_secs(5), x_a.recv_status()).await {
        let (itt, status) = r.expect("status");
        got.insert(itt, status);
    }
    assert!(
        !got.contains_key(&queued),
        "the task queued on A behind the long writes must be aborted, not answered: {got:?}"
    );
    for itt in &long {
        // Each long write completed before the abort, or was aborted (no response).
        assert!(got.get(itt).is_none_or(|&s| s == 0), "{got:?}");
    }
    eprintln!(
        "on A: {} of 7 long writes answered GOOD before the abort; the queued task was aborted",
        got.len()
    );
    // The session on A is alive and its nexus learns why: REGISTRATIONS PREEMPTED.
    let r = x_a
        .command(0, &[0; 6], &[], 0)
        .await
        .expect("tur after the abort");
    assert_eq!(
        (r.status, r.sense.get(12).copied(), r.sense.get(13).copied()),
        (2, Some(0x2a), Some(0x05)),
        "X through A must see REGISTRATIONS PREEMPTED: {:02x?}",
        r.sense
    );
    // X is preempted everywhere: its write through A conflicts, Y holds the reservation.
    let r = x_a
        .command(
            0,
            &write16(lba(0), CHUNK_BLOCKS),
            &pattern(1, 0),
            (CHUNK_BLOCKS as usize * BS) as u32,
        )
        .await
        .unwrap();
    assert!(
        r.status == 0x18 || (r.status == 2 && r.sense.get(2).map(|k| k & 0xf) == Some(6)),
        "X after the preemption: {:#x} {:02x?}",
        r.status,
        r.sense
    );
    assert_eq!(
        read_reservation(&mut y_c).await,
        Some((ky, WRITE_EXCLUSIVE))
    );
}

/// Points controller `c`'s config at the certificate directory `dir`.
fn set_pki(c: &Ctrl, dir: &std::path::Path) {
    let path = c.dir.path().join("appliance.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("pki = ") {
                format!("pki = \"{}\"", dir.display())
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
}

/// How many lines of `c`'s log contain `text`.
fn log_count(c: &Ctrl, text: &str) -> usize {
    c.log().matches(text).count()
}

fn state_of(s: &serde_json::Value, id: u32) -> String {
    s["controllers"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e[0] == id))
        .and_then(|e| e[1].as_str())
        .unwrap_or("?")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_with_a_foreign_certificate_is_refused_by_the_cluster() {
    let mut c = start_cluster();
    wait_status(&c[0], "a healthy volume", |s| {
        vol0(s)["health"] == "healthy"
    })
    .await;
    let mut w = connect(c[0].portal, Instant::now() + Duration::from_secs(60)).await;
    assert!(write(&mut w, 0, 1, Instant::now() + Duration::from_secs(30)).await);
    // Controller 3 comes back with a certificate of another CA (same name, same id).
    c[2].kill9();
    wait_log(&c[..2], "membership change controller=3 state=Down").await;
    let foreign = make_pki(&[3]);
    set_pki(&c[2], foreign.path());
    let refused_before: usize = c[..2]
        .iter()
        .map(|c| log_count(c, "TLS handshake failed"))
        .sum();
    c[2].child = Some(spawn(c[2].dir.path()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while c[..2]
        .iter()
        .map(|c| log_count(c, "TLS handshake failed"))
        .sum::<usize>()
        <= refused_before
    {
        assert!(Instant::now() < deadline, "no refused handshake logged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It stays out: the others keep it down, and it cannot serve writes (no lease).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let s = status(&c[0]).expect("status of controller 1");
    assert_eq!(state_of(&s, 3), "down", "{s}");
    assert_eq!(vol0(&s)["health"], "degraded", "{s}");
    let attempt = async {
        let mut i = Initiator::login(c[2].portal, &LoginOptions::normal(IQN))
            .await
            .ok()?;
        let data = pattern(9, 1);
        i.command(0, &write16(lba(1), CHUNK_BLOCKS), &data, data.len() as u32)
            .await
            .ok()
    };
    if let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(20), attempt).await {
        assert_ne!(
            r.status, 0,
            "controller 3 acknowledged a write without being admitted"
        );
    }
    // The same controller with the cluster's own certificate is admitted again.
    c[2].kill9();
    set_pki(&c[2], c[2].pki.path());
    // The metadata leader logs membership changes; under load leadership may have moved.
    let ups = |c: &[Ctrl]| -> usize {
        c[..2]
            .iter()
            .map(|c| log_count(c, "membership change controller=3 state=Up"))
            .sum()
    };
    let up_before = ups(&c);
    c[2].child = Some(spawn(c[2].dir.path()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while ups(&c) <= up_before {
        assert!(
            Instant::now() < deadline,
            "controller 3 with its own certificate never came back:\n{}",
            c[2].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_status(&c[0], "a healthy volume again", |s| {
        vol0(s)["health"] == "healthy"
    })
    .await;
}

/// tcpdump on `lo` for `ports`, writing to `file`; returns once it captures.
fn start_capture(file: &std::path::Path, ports: &[u16]) -> Child {
    use std::io::BufRead as _;
    let filter = ports
        .iter()
        .map(|p| format!("tcp port {p}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let mut child = std::process::Command::new("tcpdump")
        .args(["-i", "lo", "-U", "-s", "0", "-Z", "root", "-w"])
        .arg(file)
        .arg(filter)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("tcpdump is not installed ({e}): run scripts/test.sh, which installs it")
        });
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "tcpdump stopped before capturing (is this running as root?)"
        );
        if line.contains("listening on") {
            break;
        }
    }
    // Keep draining its messages so it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    child
}

/// A block pattern no shard header or protocol field contains.
const CANARY: &[u8; 32] = b"RAINIO-PLAINTEXT-CANARY-7f3a9c1e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_traffic_captured_on_loopback_shows_no_plaintext_shard_data() {
    let data: Vec<u8> = CANARY
        .iter()
        .copied()
        .cycle()
        .take(CHUNK_BLOCKS as usize * BS)
        .collect();
    // Plaintext first, as the control: the same capture finds the pattern there.
    for tls in [false, true] {
        let c = start_cluster_with(3, 2, 1, tls);
        wait_status(&c[0], "a healthy volume", |s| {
            vol0(s)["health"] == "healthy"
        })
        .await;
        let work = tempfile::tempdir().unwrap();
        let pcap = work.path().join("peers.pcap");
        let ports: Vec<u16> = c.iter().map(|c| c.peer.port()).collect();
        let mut dump = start_capture(&pcap, &ports);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut w = connect(c[0].portal, deadline).await;
        for n in 0..8u64 {
            let cdb = write16(lba(n), CHUNK_BLOCKS);
            let r = retrying(&mut w, &cdb, &data, data.len() as u32, deadline).await;
            assert_eq!(r.status, 0, "write {n}: {:02x?}", r.sense);
        }
        // Read back through another controller, so chunks also cross the peer links.
        let mut r2 = connect(c[1].portal, deadline).await;
        for n in 0..8u64 {
            let cdb = read16(lba(n), CHUNK_BLOCKS);
            let r = retrying(&mut r2, &cdb, &[], data.len() as u32, deadline).await;
            assert_eq!(r.status, 0, "read {n}: sense {:02x?}", r.sense);
            assert!(r.data == data, "block {n} read back wrong");
        }
        std::process::Command::new("kill")
            .args(["-INT", &dump.id().to_string()])
            .status()
            .unwrap();
        dump.wait().unwrap();
        let captured = std::fs::read(&pcap).unwrap();
        // `scripts/pcap-to-seeds.py` turns a kept plaintext capture into fuzz seeds.
        if let Some(keep) = std::env::var_os("RAINIO_KEEP_PCAP").filter(|_| !tls) {
            std::fs::copy(&pcap, keep).unwrap();
        }
        let hits = captured
            .windows(CANARY.len())
            .filter(|w| *w == CANARY)
            .count();
        eprintln!(
            "tls={tls}: captured {} bytes of peer traffic, the pattern {hits} times",
            captured.len()
        );
        assert!(
            captured.len() > 8 * data.len(),
            "the capture holds {} bytes, less than the data written: nothing to judge",
            captured.len()
        );
        if tls {
            assert_eq!(hits, 0, "plaintext shard data on a TLS peer link");
        } else {
            assert!(
                hits > 100,
                "the control capture shows the pattern only {hits} times"
            );
        }
    }
}

/// Flips bytes in the payload of the first `count` chunk copies in a controller's shard file
/// (4 KiB superblock, then slots of a 4 KiB header and a 16 KiB payload), behind its back.
/// Returns how many were damaged.
fn damage_chunks(dir: &std::path::Path, count: usize) -> usize {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    let (page, chunk) = (4096u64, 16384u64);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("shards.img"))
        .unwrap();
    let slots = (f.metadata().unwrap().len() - page) / (page + chunk);
    let mut damaged = 0;
    for slot in 0..slots {
        if damaged == count {
            break;
        }
        let at = page + slot * (page + chunk);
        let mut magic = [0u8; 4];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut magic).unwrap();
        if &magic != b"RNCH" {
            continue;
        }
        let mut payload = vec![0u8; chunk as usize];
        f.seek(SeekFrom::Start(at + page)).unwrap();
        f.read_exact(&mut payload).unwrap();
        for b in payload.iter_mut().skip(100).step_by(997) {
            *b ^= 0x5a;
        }
        f.seek(SeekFrom::Start(at + page)).unwrap();
        f.write_all(&payload).unwrap();
        damaged += 1;
    }
    f.sync_all().unwrap();
    damaged
}

fn api_cli(c: &Ctrl, api: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(tests::appliance::binary())
        .args(args)
        .args(["--api", &format!("http://{api}")])
        .env("APPLIANCE_PASSWORD", "scrub-test-password")
        .output()
        .unwrap();
    let _ = c;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// An `[api]` section per controller (ids `1..=n`) on a free loopback port, with the admin
/// password `api_cli` uses: `(api address per id, config text per id)`.
fn api_sections(n: u32) -> (BTreeMap<u32, SocketAddr>, BTreeMap<u32, String>) {
    let hash = {
        use std::io::Write as _;
        let mut child = std::process::Command::new(tests::appliance::binary())
            .arg("hash-password")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"scrub-test-password\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let apis: BTreeMap<u32, SocketAddr> = (1..=n)
        .map(|i| (i, format!("127.0.0.1:{}", free_port()).parse().unwrap()))
        .collect();
    let sections = apis
        .iter()
        .map(|(&i, a)| {
            (
                i,
                format!("[api]\nlisten = \"{a}\"\nadmin_password_hash = \"{hash}\"\n"),
            )
        })
        .collect();
    (apis, sections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_bytes_flipped_on_disk_and_repairs_them_while_reads_stay_correct() {
    let (apis, sections) = api_sections(3);
    let mut c = start_cluster_extra(3, 2, 1, true, &|i| sections[&i].clone());
    wait_status(&c[0], "a healthy volume", |s| {
        vol0(s)["health"] == "healthy"
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut w = connect(c[0].portal, deadline).await;
    let mut want = BTreeMap::new();
    for n in 0..WRITES {
        assert!(write(&mut w, n, 7, deadline).await, "write {n}");
        want.insert(n, vec![7]);
    }
    // Flip bytes in 12 chunk copies on controller 2's disk.
    let damaged = damage_chunks(c[1].dir.path(), 12);
    assert_eq!(
        damaged, 12,
        "the writes left too few chunks on controller 2"
    );
    // Reads in between return the right bytes (a copy failing its checksum is reconstructed),
    // through every controller, the damaged one included.
    for (i, ctrl) in c.iter().enumerate() {
        verify_any(
            ctrl.portal,
            &want,
            &format!("with damaged copies, through controller {}", i + 1),
        )
        .await;
    }
    let (ok, text) = api_cli(&c[0], apis[&1], &["job", "scrub"]);
    assert!(ok && text.contains("scrub requested"), "{text}");
    // Every controller scrubs the rows it leads; together they find every damaged copy.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (bad, repaired) = loop {
        let lasts: Vec<serde_json::Value> = c
            .iter()
            .filter_map(status)
            .map(|s| s["scrub"]["last"].clone())
            .collect();
        if lasts.len() == 3 && lasts.iter().all(|l| !l.is_null()) {
            let sum = |k: &str| lasts.iter().map(|l| l[k].as_u64().unwrap()).sum::<u64>();
            break (sum("bad_chunks"), sum("repaired"));
        }
        assert!(Instant::now() < deadline, "scrub never finished: {lasts:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!("scrub: {bad} bad copies found, {repaired} chunks rewritten");
    assert_eq!(
        bad, damaged as u64,
        "scrub found {bad} bad copies; {damaged} were damaged"
    );
    assert!(repaired >= bad, "{repaired} rewritten for {bad} bad");
    let (ok, text) = api_cli(&c[0], apis[&2], &["job", "list"]);
    assert!(ok, "{text}");
    // A second pass finds nothing.
    let (ok, text) = api_cli(&c[0], apis[&3], &["job", "scrub"]);
    assert!(ok, "{text}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let served: Vec<u64> = c
            .iter()
            .filter_map(status)
            .map(|s| s["scrub"]["requests_served"].as_u64().unwrap_or(0))
            .collect();
        if served.len() == 3 && served.iter().all(|&n| n >= 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "second scrub never finished: {served:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let again: u64 = c
        .iter()
        .filter_map(status)
        .map(|s| s["scrub"]["last"]["bad_chunks"].as_u64().unwrap())
        .sum();
    assert_eq!(again, 0, "the second scrub still found bad copies");
    // Redundancy is really back: with controller 1 gone, every row needs controller 2's copy.
    c[0].kill9();
    verify_any(
        c[1].portal,
        &want,
        "after the repair, with controller 1 killed",
    )
    .await;
}

/// Host writes of generation `gen` cycling over writes `range` through `i` for `secs`;
/// returns the writes acknowledged (recorded in `want`).
async fn write_for(
    i: &mut Initiator,
    range: std::ops::Range<u64>,
    gen: u32,
    secs: f64,
    want: &mut BTreeMap<u64, Vec<u32>>,
) -> u64 {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut acked = 0;
    let mut w = range.start;
    while Instant::now() < until {
        assert!(
            write(i, w, gen, Instant::now() + Duration::from_secs(30)).await,
            "host write {w} failed"
        );
        want.insert(w, vec![gen]);
        acked += 1;
        w = if w + 1 >= range.end {
            range.start
        } else {
            w + 1
        };
    }
    acked
}

/// Six controllers (k=3, m=2; six, not five: with five, one out leaves four controllers for
/// five-wide rows, so no placement could restore full redundancy). Data written through
/// iSCSI; one controller is killed and marked out through the CLI; the rebuild moves its
/// positions to the five survivors (declustered: every survivor receives rows) while a host
/// keeps writing; then two more controllers are killed and every block still reads back
/// correct, which needs every rebuilt chunk. Prints the rebuild rate and the host write rate
/// kept during the rebuild (docs/benchmarks.md, with `APPLIANCE_BIN` set to a release build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_marked_out_is_rebuilt_on_the_survivors_and_two_more_can_then_fail() {
    let writes: u64 = std::env::var("REBUILD_TEST_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(384);
    let (apis, sections) = api_sections(6);
    let mut c = start_cluster_extra(6, 3, 2, true, &|i| {
        // 3 MiB extents: 22 of them, so every controller holds some of the out one's.
        "extent = \"3MiB\"\nout_after_secs = 0\nrebuild_share_pct = 50\n".to_string()
            + &sections[&i]
    });
    wait_status(&c[0], "a healthy volume", |s| {
        vol0(s)["health"] == "healthy"
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut host = connect(c[0].portal, deadline).await;
    let mut want: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for w in 0..writes {
        assert!(write(&mut host, w, 1, deadline).await, "write {w}");
        want.insert(w, vec![1]);
    }
    // The host's write rate with every controller up.
    let hot = writes..writes + 32;
    let healthy_secs = 4.0;
    let healthy = write_for(&mut host, hot.clone(), 5, healthy_secs, &mut want).await;
    // Controller 6 dies; out_after_secs = 0, so only an operator marks it out.
    c[5].kill9();
    wait_log(&c[..5], "membership change controller=6 state=Down").await;
    // The host's write rate with one controller down (written around: each write that
    // misses it records a write-intent mark).
    // (After a warm-up: the first accesses in the new epoch reload their rows.)
    write_for(&mut host, hot.clone(), 2, 2.0, &mut want).await;
    let before_secs = 4.0;
    let before = write_for(&mut host, hot.clone(), 2, before_secs, &mut want).await;
    // A second mark-out would leave four controllers for five-wide rows: refused, with the fix.
    let (ok, text) = api_cli(&c[0], apis[&1], &["controller", "mark-out", "6"]);
    assert!(ok && text.contains("rebuilt"), "{text}");
    let (ok, text) = api_cli(&c[0], apis[&1], &["controller", "mark-out", "5"]);
    assert!(
        !ok && text.contains("add a controller first"),
        "a second mark-out was not refused: {text}"
    );
    // The host keeps writing (and every write is acknowledged) while the rebuild runs.
    let started = Instant::now();
    let mut during = 0;
    let mut during_secs = 0.0;
    let mut seen_progress = false;
    let mut seen_moves = false;
    loop {
        let s = status(&c[0]).expect("status");
        // Done when the moves, once planned, are gone (or, if they came and went between two
        // samples, when the survivors have copied chunks and none are left).
        let moved: u64 = c[..5]
            .iter()
            .filter_map(status)
            .map(|s| s["moved_chunks"].as_u64().unwrap_or(0))
            .sum();
        if s["moves"].is_null()
            && (seen_moves || (moved > 0 && started.elapsed() > Duration::from_secs(5)))
        {
            break;
        }
        seen_moves |= !s["moves"].is_null();
        seen_progress |= s["moves"]["rows_done"].as_u64().unwrap_or(0) > 0;
        let t = Instant::now();
        during += write_for(&mut host, hot.clone(), 3, 0.5, &mut want).await;
        during_secs += t.elapsed().as_secs_f64();
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "rebuild did not finish: {s}"
        );
    }
    let rebuild_secs = started.elapsed().as_secs_f64();
    let s = status(&c[0]).expect("status");
    assert_eq!(state_of(&s, 6), "out", "{s}");
    // Every survivor received rebuilt rows, each copied by its extent's primary.
    let mut moved_total = 0;
    for ctrl in &c[..5] {
        let s = status(ctrl).expect("status");
        moved_total += s["moved_chunks"].as_u64().unwrap();
    }
    let chunk_bytes = 16384u64;
    eprintln!(
        "rebuild: {moved_total} chunks ({:.1} MiB) in {rebuild_secs:.1} s = {:.1} MiB/s; host writes {:.1}/s healthy ({:.2}x of it during the rebuild), {:.1}/s with controller 6 down, {:.1}/s during ({:.2}x){}",
        (moved_total * chunk_bytes) as f64 / 1048576.0,
        (moved_total * chunk_bytes) as f64 / 1048576.0 / rebuild_secs,
        healthy as f64 / healthy_secs,
        (during as f64 / during_secs.max(0.001)) / (healthy as f64 / healthy_secs),
        before as f64 / before_secs,
        during as f64 / during_secs.max(0.001),
        (during as f64 / during_secs.max(0.001)) / (before as f64 / before_secs),
        if seen_progress { "" } else { " (no partial progress sampled)" }
    );
    assert!(
        moved_total > 0,
        "the rebuild copied nothing: {}",
        c[0].log()
    );
    let receivers: std::collections::BTreeSet<u32> = c
        .iter()
        .flat_map(|x| {
            x.log()
                .lines()
                .filter(|l| l.contains("moved position copied"))
                .filter_map(|l| {
                    l.split("to=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
                .collect::<Vec<u32>>()
        })
        .collect();
    let receivers: Vec<u32> = receivers.into_iter().collect();
    assert_eq!(
        receivers,
        vec![1, 2, 3, 4, 5],
        "every survivor receives part of the rebuild (declustered)"
    );
    // Redundancy is back to k + m: two more controllers die and every block reads back.
    c[3].kill9();
    c[4].kill9();
    for (i, ctrl) in c[..3].iter().enumerate() {
        verify_any(
            ctrl.portal,
            &want,
            &format!(
                "after the rebuild, with controllers 4, 5 and 6 gone, through controller {}",
                i + 1
            ),
        )
        .await;
    }
}

/// Writes and reads back, round after round, until told to stop: every write acknowledged,
/// every read equal to the last acknowledged write (unit attentions and NOT READY are retried
/// as hosts do). Returns (writes, verified reads, the last generation of each write).
async fn write_and_verify_until(
    addr: SocketAddr,
    range: std::ops::Range<u64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64, BTreeMap<u64, u32>) {
    let mut i = connect(addr, Instant::now() + Duration::from_secs(60)).await;
    let (mut writes, mut reads) = (0, 0);
    let mut last: BTreeMap<u64, u32> = BTreeMap::new();
    let mut gen = 100;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        gen += 1;
        for w in range.clone() {
            let deadline = Instant::now() + Duration::from_secs(60);
            let data = pattern(gen, w);
            let cdb = write16(lba(w), CHUNK_BLOCKS);
            let r = retrying(&mut i, &cdb, &data, data.len() as u32, deadline).await;
            assert_eq!(r.status, 0, "host write {w}: sense {:02x?}", r.sense);
            writes += 1;
            last.insert(w, gen);
            let cdb = read16(lba(w), CHUNK_BLOCKS);
            let r = retrying(&mut i, &cdb, &[], data.len() as u32, deadline).await;
            assert_eq!(r.status, 0, "host read {w}: sense {:02x?}", r.sense);
            assert!(r.data == data, "write {w} generation {gen} read back wrong");
            reads += 1;
        }
    }
    (writes, reads, last)
}

/// Positions (shards) per controller from `appliance status`, and whether they are within
/// 10% of an even spread over the controllers holding any.
fn spread(s: &serde_json::Value) -> (BTreeMap<u32, u64>, bool) {
    let p: BTreeMap<u32, u64> = s["positions"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_u64()?)))
                .filter(|(_, n)| *n > 0)
                .collect()
        })
        .unwrap_or_default();
    let mean = p.values().sum::<u64>() as f64 / p.len().max(1) as f64;
    let even = !p.is_empty() && p.values().all(|&n| (n as f64 - mean).abs() <= 0.1 * mean);
    (p, even)
}

/// Issue 5's elastic cluster: a fourth controller is added to three (k=2, m=1) and shards are
/// rebalanced onto it, then an original one is drained (its ports report transitioning, its
/// shards move away, then it leaves), while a host writes and reads back continuously through
/// another controller: no error, no wrong byte, and the shards end within 10% of even. The
/// drained controller then holds nothing needed: with it and one more killed, every block
/// still reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_added_then_an_original_drained_while_a_host_writes_and_verifies() {
    let (apis, sections) = api_sections(4);
    let mut c = start_cluster_founded(4, 3, 2, 1, true, &|i| {
        // 1 MiB extents: 64 of them, so the spread is measurable.
        "extent = \"1MiB\"\nout_after_secs = 0\n".to_string() + &sections[&i]
    });
    wait_status(&c[0], "a healthy volume", |s| {
        vol0(s)["health"] == "healthy"
    })
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let host = tokio::spawn(write_and_verify_until(c[1].portal, 0..48, stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Controller 4 starts and is added through the CLI.
    c[3].child = Some(spawn(c[3].dir.path()));
    let peer = c[3].peer.to_string();
    let (ok, text) = api_cli(
        &c[0],
        apis[&1],
        &["controller", "add", "4", "--peer", &peer],
    );
    assert!(ok && text.contains("joins"), "{text}");
    let (ok, text) = api_cli(
        &c[0],
        apis[&1],
        &["controller", "add", "4", "--peer", &peer],
    );
    assert!(!ok && text.contains("already a member"), "{text}");
    let t = Instant::now();
    let s = wait_status(&c[0], "shards rebalanced onto controller 4", |s| {
        let (p, even) = spread(s);
        state_of(s, 4) == "up" && s["moves"].is_null() && p.len() == 4 && even
    })
    .await;
    let rebalanced = t.elapsed();
    let (added, _) = spread(&s);
    eprintln!("rebalance onto controller 4 took {rebalanced:?}: positions {added:?}");
    // Drain controller 1: it reports transitioning while its shards move, then leaves.
    let transitioning =
        |c: &[Ctrl]| -> usize { c.iter().map(|c| log_count(c, "1: Transitioning")).sum() };
    let before = transitioning(&c);
    let (ok, text) = api_cli(&c[0], apis[&2], &["controller", "drain", "1"]);
    assert!(ok && text.contains("draining"), "{text}");
    let t = Instant::now();
    let s = wait_status(&c[1], "controller 1 drained and out", |s| {
        let (p, even) = spread(s);
        state_of(s, 1) == "out" && s["moves"].is_null() && !p.contains_key(&1) && even
    })
    .await;
    // Shown out means it no longer counts towards the metadata log's majority.
    assert!(
        !voters(&s).contains(&1),
        "controller 1 is shown out but still votes: {}",
        s["log"]
    );
    let drained = t.elapsed();
    let (after, _) = spread(&s);
    eprintln!("drain of controller 1 took {drained:?}: positions {after:?}");
    assert_eq!(after.keys().copied().collect::<Vec<_>>(), vec![2, 3, 4]);
    assert!(
        transitioning(&c) > before,
        "controller 1's ports never reported transitioning during its drain"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let (writes, reads, last) = host.await.expect("host task");
    eprintln!("host: {writes} writes and {reads} verified reads, no error, throughout");
    assert!(writes > 0 && reads == writes);
    // Controller 1 holds nothing needed: with it and controller 2 gone, all reads back.
    c[0].kill9();
    c[1].kill9();
    let want: BTreeMap<u64, Vec<u32>> = last.iter().map(|(&w, &g)| (w, vec![g])).collect();
    verify_any(
        c[2].portal,
        &want,
        "after the drain, with controllers 1 and 2 killed",
    )
    .await;
}

/// Preemptive migration: a controller whose shard device keeps failing (here: chunk copies
/// damaged behind its back, found as checksum failures when hosts read) drains its shards to
/// the others before the device fails for good; status says why; reads stay correct
/// throughout, and once it has left, it and one more controller can be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_whose_device_fails_migrates_its_shards_away_first() {
    let (apis, sections) = api_sections(4);
    let mut c = start_cluster_extra(4, 2, 1, true, &|i| {
        "extent = \"1MiB\"\nout_after_secs = 0\nmigrate_after_errors = 4\n".to_string()
            + &sections[&i]
    });
    wait_status(&c[0], "a healthy volume", |s| {
        vol0(s)["health"] == "healthy"
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut w = connect(c[0].portal, deadline).await;
    let mut want = BTreeMap::new();
    for n in 0..WRITES {
        assert!(write(&mut w, n, 5, deadline).await, "write {n}");
        want.insert(n, vec![5]);
    }
    let damaged = damage_chunks(c[3].dir.path(), 24);
    assert!(damaged >= 8, "only {damaged} chunk copies on controller 4");
    // Reads are right (damaged copies are reconstructed); a scrub reads every copy, and
    // controller 4's device counts the damaged ones.
    verify_any(c[0].portal, &want, "with damaged copies on controller 4").await;
    let (ok, text) = api_cli(&c[0], apis[&1], &["job", "scrub"]);
    assert!(ok, "{text}");
    let s = wait_status(&c[3], "controller 4 migrating", |s| {
        !s["migration"].is_null()
    })
    .await;
    eprintln!("controller 4: {}", s["migration"]);
    assert!(
        s["migration"]
            .as_str()
            .unwrap()
            .contains("checksum failures"),
        "{s}"
    );
    wait_log(&c[3..], "preemptive migration").await;
    let s = wait_status(&c[0], "controller 4 drained and out", |s| {
        let (p, even) = spread(s);
        state_of(s, 4) == "out" && s["moves"].is_null() && !p.contains_key(&4) && even
    })
    .await;
    eprintln!("after migration: positions {:?}", spread(&s).0);
    // Shown out means it no longer counts towards the metadata log's majority.
    assert!(
        !voters(&s).contains(&4),
        "controller 4 is shown out but still votes: {}",
        s["log"]
    );
    verify_any(c[1].portal, &want, "after the migration").await;
    c[3].kill9();
    c[0].kill9();
    verify_any(
        c[2].portal,
        &want,
        "with controllers 4 (migrated) and 1 killed",
    )
    .await;
}

//! Three controllers in one process, each with its own shard file (io_uring) and metadata
//! store (redb), joined over loopback TCP by the peer transport and the Raft metadata log: data written through any controller reads back through any other, a
//! controller that stops is written around (write-intent marks committed to the log), and when
//! it comes back only the rows written meanwhile are copied to it; afterwards any one
//! controller can be lost and every block still reads back. The peer links run mutual TLS
//! with certificates from `appliance::peer::tls::issue`, as in production.

use appliance::meta::{MetaCommand, StoredState};
use appliance::node::{ControllerNode, MembershipTimers, NodeConfig};
use appliance::peer::PeerLimits;
use raid_engine::cluster::ControllerState;
use raid_engine::cluster::VolumeMeta;
use raid_engine::codec::CodecKind;
use raid_engine::disk_store::{store_bytes, DiskShardStore, VolumeSlots};
use raid_engine::layout::{Geometry, Layout};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

const VOL: u32 = 1;
const BLOCK: usize = 4096;

fn volume() -> VolumeMeta {
    let g = Geometry::new(2, 1, 4096, 8, CodecKind::GfMatrix, None).unwrap();
    let layout = Layout {
        size_bytes: 6 * g.extent_bytes(),
        geometry: g,
    };
    VolumeMeta::rotated(VOL, layout, &[1, 2, 3]).unwrap()
}

fn block(gen: u8, b: u64) -> Vec<u8> {
    let mut v = vec![gen; BLOCK];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v
}

struct Harness {
    cfg: BTreeMap<u32, NodeConfig>,
    dirs: BTreeMap<u32, tempfile::TempDir>,
    nodes: BTreeMap<u32, ControllerNode>,
    _pki: tempfile::TempDir,
}

impl Harness {
    /// Three controllers formed into a cluster (the metadata leader brings every answering
    /// controller up on its own), all up, the volume served.
    async fn formed() -> Self {
        let h = Self::new().await;
        h.nodes[&1].initialize(&[1, 2, 3]).await.unwrap();
        for id in 1..=3 {
            h.wait_state(id, ControllerState::Up).await;
        }
        h.wait_volume().await;
        h
    }

    async fn new() -> Self {
        let mut listeners = BTreeMap::new();
        let mut peers: BTreeMap<u32, SocketAddr> = BTreeMap::new();
        for id in 1..=3u32 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            peers.insert(id, l.local_addr().unwrap());
            listeners.insert(id, l);
        }
        let limits = PeerLimits {
            max_in_flight: 64,
            request_timeout: Duration::from_millis(800),
            connect_timeout: Duration::from_millis(500),
        };
        let pki = tempfile::tempdir().unwrap();
        appliance::peer::tls::issue(pki.path(), &[1, 2, 3]).unwrap();
        let mut h = Self {
            cfg: BTreeMap::new(),
            dirs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            _pki: pki,
        };
        for (id, l) in listeners {
            let cfg = NodeConfig {
                id,
                peers: peers.clone(),
                limits,
                timers: MembershipTimers {
                    heartbeat: Duration::from_millis(100),
                    lease: Duration::from_millis(1000),
                    down_after: Duration::from_millis(1500),
                    resync_every: Duration::from_millis(200),
                    ..MembershipTimers::default()
                },
                tls: Some(Arc::new(
                    appliance::peer::tls::PeerTls::load(h._pki.path(), id).unwrap(),
                )),
                scrub: appliance::node::ScrubSchedule {
                    every: None,
                    pause: Duration::ZERO,
                },
                bootstrap: id == 1,
            };
            h.cfg.insert(id, cfg);
            h.dirs.insert(id, tempfile::tempdir().unwrap());
            h.start(id, l).await;
        }
        h
    }

    /// Starts controller `id` on its shard file (created on first start, reopened after).
    async fn start(&mut self, id: u32, l: TcpListener) {
        self.start_with(id, l, volume()).await;
    }

    /// Like [`Self::start`], with its own definition of the volume.
    async fn start_with(&mut self, id: u32, l: TcpListener, v: VolumeMeta) {
        let slots = [VolumeSlots {
            volume: VOL,
            extents: v.placement.len() as u64,
            rows_per_extent: v.layout.geometry.rows_per_extent,
        }];
        let chunk = v.layout.geometry.chunk_bytes as usize;
        let mut dc = disk_io::DeviceConfig::file(
            self.dirs[&id].path().join("shards.img"),
            store_bytes(chunk, &slots),
        );
        dc.pool_bytes = 16 << 20;
        let dev = Arc::new(disk_io::Device::open(&dc).unwrap());
        let store = DiskShardStore::open(dev, chunk, &slots, false)
            .await
            .unwrap();
        let node = ControllerNode::start(
            &self.cfg[&id],
            self.dirs[&id].path(),
            l,
            Arc::new(store),
            vec![("vol".into(), v)],
        )
        .await
        .unwrap();
        self.nodes.insert(id, node);
    }

    /// Waits until every running controller's view has `id` in `state`.
    async fn wait_state(&self, id: u32, state: ControllerState) {
        for _ in 0..500 {
            if self
                .nodes
                .values()
                .all(|n| n.engine.view().state(id) == state)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("controller {id} never became {state:?}");
    }

    fn resynced(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| n.engine.stats().resync_chunks)
            .sum()
    }

    #[allow(dead_code)]
    async fn set_state(&self, via: u32, id: u32, state: StoredState) -> u64 {
        let r = self.nodes[&via]
            .env
            .propose(MetaCommand::SetState { id, state })
            .await
            .unwrap();
        let appliance::meta::MetaResponse::Ok { epoch } = r else {
            panic!("membership change refused: {r:?}")
        };
        // Every running controller installs the new epoch.
        for _ in 0..200 {
            if self.nodes.values().all(|n| n.engine.view().epoch >= epoch) {
                return epoch;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("epoch {epoch} not installed everywhere");
    }

    /// Waits until every running controller serves the volume (its record is in the log).
    async fn wait_volume(&self) {
        for _ in 0..300 {
            if self
                .nodes
                .values()
                .all(|n| n.engine.backlog().iter().any(|b| b.volume == VOL))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the volume was never adopted from the metadata log");
    }

    async fn write(&self, via: u32, b: u64, gen: u8) -> Result<(), String> {
        let e = &self.nodes[&via].engine;
        let data = block(gen, b);
        retrying(|| e.write(VOL, b * BLOCK as u64, &data))
            .await
            .map_err(|e| e.to_string())
    }

    async fn check_all(&self, via: u32, want: &BTreeMap<u64, u8>) {
        let e = &self.nodes[&via].engine;
        for (&b, &gen) in want {
            let got = retrying(|| e.read(VOL, b * BLOCK as u64, BLOCK as u64)).await;
            assert_eq!(
                got.as_deref().map_err(|e| e.to_string()),
                Ok(&block(gen, b)[..]),
                "block {b} through controller {via}"
            );
        }
    }
}

/// Runs `op` again (every 20 ms, for up to 2 s) while it is refused the way a host answers by
/// retrying (the target reports NOT READY): a membership change during the request, or a lease
/// that lapsed because heartbeat answers were late on a loaded machine (the next answered round
/// renews it). Both refuse before any chunk is read or written.
async fn retrying<T, F>(mut op: impl FnMut() -> F) -> Result<T, raid_engine::cluster::VolError>
where
    F: std::future::Future<Output = Result<T, raid_engine::cluster::VolError>>,
{
    use raid_engine::cluster::VolError;
    let mut got = op().await;
    for _ in 0..100 {
        if !matches!(got, Err(VolError::Epoch { .. } | VolError::Fenced)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        got = op().await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_controllers_write_around_a_stopped_one_and_resync_it() {
    let mut h = Harness::formed().await;
    let blocks = volume().layout.size_bytes / BLOCK as u64;
    let mut want = BTreeMap::new();
    // Healthy: every block written through a rotating controller, read through another.
    for b in 0..blocks {
        h.write(1 + (b % 3) as u32, b, 1).await.unwrap();
        want.insert(b, 1u8);
    }
    h.check_all(2, &want).await;

    // Controller 2 stops; the leader declares it down once it has been silent long enough.
    let n2 = h.nodes.remove(&2).unwrap();
    n2.shutdown().await;
    h.wait_state(2, ControllerState::Down).await;
    // Writes continue around it: every third row. A row is two 4 KiB blocks (k = 2 columns
    // of 4 KiB); controller 2 holds one position of every row and every write reaches the
    // parity column, so each row written now leaves exactly one chunk behind on controller 2.
    let mut rows_written_while_down = std::collections::BTreeSet::new();
    for b in (0..blocks).filter(|b| (b / 2) % 3 == 0) {
        h.write(if b % 2 == 0 { 1 } else { 3 }, b, 2).await.unwrap();
        want.insert(b, 2);
        rows_written_while_down.insert(b / 2);
    }
    // Reading everything while it is down marks nothing more.
    h.check_all(3, &want).await;
    let marks = h.nodes[&1].env.intents_len(VOL);
    assert_eq!(
        marks,
        rows_written_while_down.len(),
        "{:?}",
        h.nodes[&1].env.marks(VOL)
    );
    let before = h.resynced();

    // It comes back on the same address with its data: the leader moves it to resyncing, the
    // primaries copy what it missed, and it is up again with nothing left to copy.
    let addr = h.cfg[&2].peers[&2];
    let l = TcpListener::bind(addr).await.unwrap();
    h.start(2, l).await;
    h.wait_state(2, ControllerState::Up).await;
    h.wait_volume().await;
    assert_eq!(
        h.nodes[&1].env.intents_len(VOL),
        0,
        "marks left after resync"
    );
    assert_eq!(
        h.resynced() - before,
        rows_written_while_down.len() as u64,
        "resync must copy exactly the rows written while controller 2 was down"
    );
    h.check_all(2, &want).await;

    // Full redundancy again: lose controller 3 and everything still reads through 1 and 2.
    let n3 = h.nodes.remove(&3).unwrap();
    n3.shutdown().await;
    h.wait_state(3, ControllerState::Down).await;
    h.check_all(1, &want).await;
    h.check_all(2, &want).await;
    for (_, n) in std::mem::take(&mut h.nodes) {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_whose_volume_differs_from_the_log_refuses_to_serve_it() {
    let mut h = Harness::formed().await;
    h.write(1, 0, 1).await.unwrap();
    // Controller 3 comes back with a different geometry for the same volume (k=1, m=2): the
    // log's record wins, so it must not serve the volume, and it says why.
    let n3 = h.nodes.remove(&3).unwrap();
    n3.shutdown().await;
    let g = Geometry::new(1, 2, 4096, 8, CodecKind::GfMatrix, None).unwrap();
    let layout = Layout {
        size_bytes: 6 * g.extent_bytes(),
        geometry: g,
    };
    let other = VolumeMeta::rotated(VOL, layout, &[1, 2, 3]).unwrap();
    let addr = h.cfg[&3].peers[&3];
    let l = TcpListener::bind(addr).await.unwrap();
    // Its metadata replica stays (a controller never rejoins with a wiped log); its shard
    // file is laid out afresh for the other geometry.
    std::fs::remove_file(h.dirs[&3].path().join("shards.img")).unwrap();
    h.start_with(3, l, other).await;
    h.wait_state(3, ControllerState::Up).await;
    let mut problems = Vec::new();
    for _ in 0..300 {
        problems = h.nodes[&3].env.problems();
        if !problems.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("k is 1 here but 2 in the cluster"),
        "{problems:?}"
    );
    assert!(
        h.nodes[&3].engine.backlog().is_empty(),
        "it must not serve the volume"
    );
    let r = h.nodes[&3].engine.read(VOL, 0, BLOCK as u64).await;
    assert!(
        matches!(r, Err(raid_engine::cluster::VolError::NoVolume(VOL))),
        "{r:?}"
    );
    // The others keep serving the volume as recorded.
    h.check_all(2, &BTreeMap::from([(0, 1)])).await;
    for (_, n) in std::mem::take(&mut h.nodes) {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_rewrites_parity_that_disagrees_with_its_data() {
    let h = Harness::formed().await;
    let mut want = BTreeMap::new();
    for b in 0..8 {
        h.write(1, b, 3).await.unwrap();
        want.insert(b, 3u8);
    }
    // Extent 0, row 1: the parity holder's copy gets other bytes under the same version (a
    // parity computed wrongly, or damaged before it was checksummed).
    let v = volume();
    let set = &v.placement[0];
    let (primary, parity) = (set[0], set[2]);
    let addr = raid_engine::shard::ChunkAddr {
        volume: VOL,
        extent: 0,
        row: 1,
        pos: 2,
    };
    let holder = h.nodes[&parity].engine.clone();
    let epoch = holder.view().epoch;
    let good = holder.handle_read_chunk(epoch, addr).await.unwrap()[0].clone();
    let mut bad = good.clone();
    bad.data.iter_mut().for_each(|b| *b = !*b);
    holder.handle_write_chunk(epoch, addr, bad).await.unwrap();
    let nothing =
        |_: u64, _: u64| -> raid_engine::shard::BoxFut<'static, ()> { Box::pin(async {}) };
    let counts = h.nodes[&primary].engine.scrub(&nothing).await.unwrap();
    assert_eq!(counts.parity_rewritten, 1, "{counts:?}");
    assert_eq!(counts.bad_chunks, 0, "{counts:?}");
    assert!(counts.rows >= 8, "{counts:?}");
    let now = holder.handle_read_chunk(epoch, addr).await.unwrap()[0].clone();
    assert_eq!(now.data, good.data, "the parity copy was not restored");
    // And a second pass finds nothing more.
    let again = h.nodes[&primary].engine.scrub(&nothing).await.unwrap();
    assert_eq!(again.parity_rewritten, 0, "{again:?}");
    h.check_all(2, &want).await;
}

/// Read leases over the real peer protocol: a controller that does not lead an extent reads
/// it without asking the primary once leased, and a write through a third controller revokes
/// the lease before it is answered, so the next read sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_lease_is_used_and_a_write_through_another_controller_revokes_it() {
    let h = Harness::formed().await;
    // Extent 0 is placed on [1, 2, 3]: controller 1 leads it, and block 1 (column 1 of row 0)
    // is held by controller 2, which reads it: the primary answers with where the block is
    // (a located read, which may carry a lease), not with the bytes.
    let v = volume();
    assert_eq!(v.placement[0], vec![1, 2, 3]);
    h.write(1, 1, 1).await.unwrap();
    // No lease is granted on an extent written within the last lease period (0.5 s here).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let read2 = |h: &Harness| {
        let e = h.nodes[&2].engine.clone();
        async move {
            retrying(|| e.read(VOL, BLOCK as u64, BLOCK as u64))
                .await
                .unwrap()
        }
    };
    assert_eq!(read2(&h).await, block(1, 1));
    let leased = h.nodes[&2].engine.stats().leased_reads;
    assert_eq!(read2(&h).await, block(1, 1));
    assert_eq!(
        h.nodes[&2].engine.stats().leased_reads,
        leased + 1,
        "the second read did not use the lease the first one brought"
    );
    // A write through controller 3 goes to the primary, which revokes 2's lease first.
    let revoked = h.nodes[&1].engine.stats().leases_revoked;
    h.write(3, 1, 2).await.unwrap();
    assert_eq!(h.nodes[&1].engine.stats().leases_revoked, revoked + 1);
    assert_eq!(
        read2(&h).await,
        block(2, 1),
        "a read after the write saw the old data"
    );
}

/// A leased read of a whole row at the controller holding the row's parity fetches one data
/// chunk and decodes the other from its own parity copy, and after a write (which revokes the
/// lease) the decoded bytes are the new ones, never the old parity's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_row_read_decodes_from_the_readers_own_parity() {
    let h = Harness::formed().await;
    // Row 0 of extent 0: column 0 (block 0) on controller 1, its primary; column 1 (block 1)
    // on 2; parity on 3, which reads the row.
    assert_eq!(volume().placement[0], vec![1, 2, 3]);
    h.write(1, 0, 1).await.unwrap();
    h.write(1, 1, 1).await.unwrap();
    let read3 = |h: &Harness| {
        let e = h.nodes[&3].engine.clone();
        async move { retrying(|| e.read(VOL, 0, 2 * BLOCK as u64)).await.unwrap() }
    };
    let row = |gen0: u8, gen1: u8| [block(gen0, 0), block(gen1, 1)].concat();
    // No lease is granted on an extent written within the last lease period (0.5 s here).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(read3(&h).await, row(1, 1));
    let before = h.nodes[&3].engine.stats();
    assert_eq!(read3(&h).await, row(1, 1));
    let after = h.nodes[&3].engine.stats();
    assert_eq!(after.leased_reads, before.leased_reads + 1, "{after:?}");
    assert_eq!(
        after.leased_rows_decoded,
        before.leased_rows_decoded + 1,
        "the leased read did not decode the row from controller 3's parity: {after:?}"
    );
    // Block 1 is the column decoded (the last one held elsewhere): change it, and block 0.
    h.write(2, 1, 2).await.unwrap();
    h.write(2, 0, 3).await.unwrap();
    assert_eq!(
        read3(&h).await,
        row(3, 2),
        "a read after the writes saw old data"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(read3(&h).await, row(3, 2));
    let before = h.nodes[&3].engine.stats();
    assert_eq!(read3(&h).await, row(3, 2));
    let after = h.nodes[&3].engine.stats();
    assert_eq!(
        after.leased_rows_decoded,
        before.leased_rows_decoded + 1,
        "{after:?}"
    );
}

//! Deterministic simulation of a cluster's data path: N controllers' [`Engine`]s in one
//! thread, driven by one seeded random generator.
//!
//! What is simulated: the network (every peer request and chunk-write reply is a message the
//! simulation delivers in random order, drops, or loses when a controller crashes or is
//! isolated), the disks (in-memory two-slot stores; read errors; writes torn by a crash), the
//! metadata log (an ideal replicated log: membership, epochs and write-intent marks, reachable
//! only from the majority side), and the hosts (random reads and writes through random
//! controllers, at most a few in flight). Faults: crash + restart, isolation + fencing + heal,
//! dropped messages, read errors; never more than `m` controllers impaired at once, the
//! budget the durability invariant allows. Rebuild: with a spare controller, a crashed one may
//! be marked out instead of restarted; its positions move to the least-loaded up controllers
//! under a new epoch and the primaries copy the rows (`Engine::copy_moved`) while hosts keep
//! writing and faults continue (the moves count as one impairment until they finish).
//!
//! The checker asserts `../shared/DESIGN.md` invariants 1-3 as the run goes and at the end:
//! every read returns, per 512-byte block, a write that is not superseded (one that was
//! resolved, then overwritten by a write issued later and acknowledged before the read
//! began, must never reappear); every chunk a holder applies carries an epoch no older than the
//! newest view installed at that holder; after the run, with every controller back and
//! resynced, and then with `m` controllers killed, every block still reads back as checked.
//!
//! Determinism: no clocks, no threads, no hash-order iteration over anything that affects the
//! schedule; the same seed replays the same run.

use futures::channel::oneshot;
use futures::executor::LocalPool;
use futures::future::{AbortHandle, Abortable};
use futures::task::LocalSpawnExt;
use futures::FutureExt;
use raid_engine::cluster::{
    ClusterEnv, ClusterView, ControllerState, IntentMark, ReadAnswer, RowIntent, VolError,
    VolumeMeta,
};
use raid_engine::codec::CodecKind;
use raid_engine::engine::Engine;
use raid_engine::layout::{ControllerId, Geometry, Layout};
use raid_engine::shard::{BoxFut, Chunk, ChunkAddr, MemShardStore, ShardError, VolumeId};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

const BLOCK: usize = 512;
const VOLUME: VolumeId = 1;

/// A small, seedable generator (SplitMix64): the whole schedule comes from it.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `p` percent.
    pub fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

/// Parameters of one run.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Seed of everything.
    pub seed: u64,
    /// Controllers.
    pub controllers: u32,
    /// Data columns.
    pub k: usize,
    /// Parity columns.
    pub m: usize,
    /// Scheduler steps with faults.
    pub steps: u64,
    /// Host operations in flight at most.
    pub max_in_flight: usize,
}

/// What a run did (for the test's sanity checks and the log).
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    /// Host writes acknowledged.
    pub writes_acked: u64,
    /// Host writes that failed or were cut off.
    pub writes_failed: u64,
    /// Host reads checked.
    pub reads_checked: u64,
    /// Host reads that failed.
    pub reads_failed: u64,
    /// Crashes injected.
    pub crashes: u64,
    /// Isolations injected.
    pub isolations: u64,
    /// Chunk writes torn by a crash.
    pub torn: u64,
    /// Epoch at the end.
    pub epoch: u64,
    /// Chunks copied by resync.
    pub resynced: u64,
    /// Rows read through reconstruction.
    pub degraded_reads: u64,
    /// Row writes committed as patches.
    pub patched_writes: u64,
    /// Forwarded reads answered with where the bytes are, and read from their holders.
    pub located_reads: u64,
    /// Forwarded reads served under a read lease, without asking the primary.
    pub leased_reads: u64,
    /// Rows of leased reads decoded from the reader's own parity copy.
    pub leased_rows_decoded: u64,
    /// Lessees asked to drop their leases before a write was answered.
    pub leases_revoked: u64,
    /// Controllers marked out (their positions rebuilt on the others).
    pub marked_out: u64,
    /// Chunks copied to new holders by moves.
    pub moved: u64,
    /// Controllers added at run time.
    pub added: u64,
    /// Positions moved by planned moves (rebalance and drain).
    pub planned_moves: u64,
    /// Controllers drained (their positions moved away while they served), then out.
    pub drained: u64,
}

impl SimReport {
    /// Adds one engine's counters.
    fn absorb(&mut self, s: &raid_engine::engine::EngineStats) {
        self.resynced += s.resync_chunks;
        self.moved += s.moved_chunks;
        self.degraded_reads += s.degraded_reads;
        self.patched_writes += s.patched_writes;
        self.located_reads += s.located_reads;
        self.leased_reads += s.leased_reads;
        self.leased_rows_decoded += s.leased_rows_decoded;
        self.leases_revoked += s.leases_revoked;
    }
}

type Reply<T> = oneshot::Sender<T>;

enum Msg {
    Read(
        ControllerId,
        u64,
        ChunkAddr,
        Reply<Result<Vec<Chunk>, ShardError>>,
    ),
    Write(
        ControllerId,
        u64,
        ChunkAddr,
        Chunk,
        Reply<Result<(), ShardError>>,
    ),
    /// A chunk write that reached its holder and is going to its disk: reads meanwhile see
    /// the old copies; a crash now leaves it unwritten or torn.
    WriteApply(u64, ChunkAddr, Chunk, Reply<Result<(), ShardError>>),
    FwdWrite(ControllerId, u64, u64, Vec<u8>, Reply<Result<(), VolError>>),
    FwdRead(
        ControllerId,
        u64,
        u64,
        u64,
        Reply<Result<Vec<u8>, VolError>>,
    ),
    /// A forwarded read the primary may answer with where the bytes are.
    FwdLocate(
        ControllerId,
        u64,
        u64,
        u64,
        Reply<Result<ReadAnswer, VolError>>,
    ),
    /// Set (true, with the missed version) or clear (false, up to a version) a mark.
    Mark(IntentMark, bool, u64, u64, Reply<Result<(), VolError>>),
    /// Record a served floor: row, content version, epoch.
    Served((VolumeId, u64, u32), u64, u64, Reply<Result<(), VolError>>),
    /// A move copied rows `..n` of (extent, position) to controller `to`, at an epoch.
    MoveDone(
        (u64, u8),
        ControllerId,
        u32,
        u64,
        Reply<Result<(), VolError>>,
    ),
    /// Drop the read leases on an extent.
    Revoke(ControllerId, u64, Reply<Result<(), VolError>>),
    /// Record a repair decision: row, chosen columns, abandoned-up-to version, epoch.
    Repair(
        (VolumeId, u64, u32),
        Vec<u64>,
        u64,
        u64,
        Reply<Result<(), VolError>>,
    ),
}

struct Pending {
    from: ControllerId,
    msg: Msg,
}

/// The ideal metadata log.
#[derive(Debug)]
struct Meta {
    view: ClusterView,
    /// Write-intent marks and the highest version each missed.
    intents: BTreeMap<IntentMark, u64>,
    /// Repair decisions per row.
    repairs: BTreeMap<(VolumeId, u64, u32), (Vec<u64>, u64)>,
    /// Served floors per row.
    served: BTreeMap<(VolumeId, u64, u32), u64>,
    /// Moves in progress: (extent, position) -> (new holder, rows copied).
    moves: BTreeMap<(u64, u8), (ControllerId, u32)>,
    /// Controllers marked out.
    out: BTreeSet<ControllerId>,
}

#[derive(Clone)]
struct Shared {
    queue: Arc<Mutex<Vec<Pending>>>,
    meta: Arc<Mutex<Meta>>,
    clock: Arc<Mutex<Clock>>,
}

/// Simulated time for read leases: one millisecond per scheduler step, from a fixed base.
struct Clock {
    base: std::time::Instant,
    tick: u64,
    /// Waits: (tick to fire at, waker), in the order they were made.
    timers: Vec<(u64, Reply<()>)>,
}

/// How long read leases last in the simulation, in steps (operations take tens of steps, so
/// leases are used, revoked and run out).
const LEASE_TICKS: u64 = 100;

/// One controller's window on the simulated cluster.
struct SimEnv {
    me: ControllerId,
    shared: Shared,
}

impl std::fmt::Debug for SimEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEnv").field("me", &self.me).finish()
    }
}

impl SimEnv {
    fn send<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Msg,
        lost: T,
    ) -> BoxFut<'_, T> {
        let (tx, rx) = oneshot::channel();
        self.shared.queue.lock().expect("queue").push(Pending {
            from: self.me,
            msg: make(tx),
        });
        Box::pin(rx.map(|r| r.unwrap_or(lost)))
    }
}

fn unreachable_vol(to: ControllerId) -> VolError {
    VolError::Peer(format!("controller {to} unreachable"))
}

impl ClusterEnv for SimEnv {
    fn read_lease_ttl(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_millis(LEASE_TICKS))
    }
    /// Leases are granted right after writes too, so revocations race with reads and writes
    /// as often as possible.
    fn read_lease_quiet(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::ZERO)
    }
    fn now(&self) -> std::time::Instant {
        let c = self.shared.clock.lock().expect("clock");
        c.base + std::time::Duration::from_millis(c.tick)
    }
    fn wait_until(&self, t: std::time::Instant) -> BoxFut<'_, ()> {
        let mut c = self.shared.clock.lock().expect("clock");
        let at = u64::try_from(
            t.saturating_duration_since(c.base)
                .as_nanos()
                .div_ceil(1_000_000),
        )
        .expect("simulated time fits");
        if at <= c.tick {
            return Box::pin(std::future::ready(()));
        }
        let (tx, rx) = oneshot::channel();
        c.timers.push((at, tx));
        Box::pin(rx.map(|_| ()))
    }
    fn revoke_leases(
        &self,
        to: ControllerId,
        _epoch: u64,
        _volume: VolumeId,
        extent: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        self.send(|r| Msg::Revoke(to, extent, r), Err(unreachable_vol(to)))
    }
    fn read_chunk(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        self.send(
            |r| Msg::Read(to, epoch, addr, r),
            Err(ShardError::Unreachable(to)),
        )
    }
    fn write_chunk(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
        chunk: Chunk,
    ) -> BoxFut<'_, Result<(), ShardError>> {
        self.send(
            |r| Msg::Write(to, epoch, addr, chunk, r),
            Err(ShardError::Unreachable(to)),
        )
    }
    fn forward_write(
        &self,
        to: ControllerId,
        epoch: u64,
        _volume: VolumeId,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'_, Result<(), VolError>> {
        self.send(
            |r| Msg::FwdWrite(to, epoch, offset, data, r),
            Err(unreachable_vol(to)),
        )
    }
    fn forward_read(
        &self,
        to: ControllerId,
        epoch: u64,
        _volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> BoxFut<'_, Result<Vec<u8>, VolError>> {
        self.send(
            |r| Msg::FwdRead(to, epoch, offset, len, r),
            Err(unreachable_vol(to)),
        )
    }
    fn forward_locate(
        &self,
        to: ControllerId,
        epoch: u64,
        _volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> BoxFut<'_, Result<ReadAnswer, VolError>> {
        self.send(
            |r| Msg::FwdLocate(to, epoch, offset, len, r),
            Err(unreachable_vol(to)),
        )
    }
    fn mark_intent(
        &self,
        mark: IntentMark,
        missed: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        self.send(
            |r| Msg::Mark(mark, true, missed, epoch, r),
            Err(VolError::Peer("metadata log unreachable".into())),
        )
    }
    fn clear_intent(
        &self,
        mark: IntentMark,
        upto: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        self.send(
            |r| Msg::Mark(mark, false, upto, epoch, r),
            Err(VolError::Peer("metadata log unreachable".into())),
        )
    }
    fn intents(&self, volume: VolumeId) -> Vec<IntentMark> {
        let m = self.shared.meta.lock().expect("meta");
        m.intents
            .keys()
            .filter(|i| i.volume == volume)
            .copied()
            .collect()
    }
    fn row_intent(&self, volume: VolumeId, extent: u64, row: u32) -> RowIntent {
        let m = self.shared.meta.lock().expect("meta");
        let (marked, floor) = m
            .intents
            .iter()
            .filter(|(i, _)| i.volume == volume && i.extent == extent && i.row == row)
            .fold((0, 0), |(mask, floor), (i, v)| {
                (mask | 1 << i.pos, floor.max(*v))
            });
        RowIntent {
            marked,
            floor,
            repair: m.repairs.get(&(volume, extent, row)).cloned(),
            served: m.served.get(&(volume, extent, row)).copied().unwrap_or(0),
            moving: m
                .moves
                .range((extent, 0)..=(extent, u8::MAX))
                .filter(|(_, (_, done))| row >= *done)
                .fold(0, |acc, ((_, pos), _)| acc | 1 << pos),
        }
    }
    fn record_served(
        &self,
        volume: VolumeId,
        extent: u64,
        row: u32,
        content: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        self.send(
            |r| Msg::Served((volume, extent, row), content, epoch, r),
            Err(VolError::Peer("metadata log unreachable".into())),
        )
    }
    fn record_repair(
        &self,
        volume: VolumeId,
        extent: u64,
        row: u32,
        cols: Vec<u64>,
        upto: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        self.send(
            |r| Msg::Repair((volume, extent, row), cols, upto, epoch, r),
            Err(VolError::Peer("metadata log unreachable".into())),
        )
    }
}

struct Node {
    engine: Arc<Engine>,
    store: Arc<MemShardStore>,
    alive: bool,
    isolated: bool,
    tasks: Vec<AbortHandle>,
    /// Epoch of the newest view installed here (for the stale-epoch check).
    installed_epoch: u64,
    /// Epoch of the last chunk write applied here.
    last_applied_epoch: u64,
}

/// One host write as the checker knows it.
#[derive(Debug, Clone)]
struct WriteRec {
    issued: u64,
    resolved: Option<u64>,
    acked: bool,
}

#[derive(Debug, Default)]
struct History {
    writes: BTreeMap<u64, WriteRec>,
    /// Per block: ids of writes that covered it.
    by_block: BTreeMap<u64, Vec<u64>>,
}

impl History {
    /// Whether block `b` may read as write `w` for a read over `[start, end]`.
    fn allowed(&self, b: u64, w: u64, start: u64, end: u64) -> Result<(), String> {
        let ids = self.by_block.get(&b).map(Vec::as_slice).unwrap_or(&[]);
        let rec = |id: u64| self.writes.get(&id);
        // Write 0 is the volume's initial zeros: issued and acked at time 0.
        let (w_issued, w_resolved) = if w == 0 {
            (0, Some(0))
        } else {
            let r = rec(w).ok_or_else(|| format!("block {b} holds unknown write {w}"))?;
            if !ids.contains(&w) {
                return Err(format!("block {b} holds write {w}, which never covered it"));
            }
            (r.issued, r.resolved)
        };
        if w_issued > end {
            return Err(format!(
                "block {b} holds write {w} issued after the read ended"
            ));
        }
        if let Some(res) = w_resolved {
            for &a in ids {
                let ar = rec(a).expect("recorded");
                if a != w && ar.acked && ar.issued > res && ar.resolved.is_some_and(|t| t < start) {
                    return Err(format!(
                        "block {b} reads as write {w} (resolved at {res}), but write {a} \
                         (issued {}, acked {:?}) superseded it before the read began at {start}",
                        ar.issued, ar.resolved
                    ));
                }
            }
        }
        Ok(())
    }
}

fn pattern(id: u64, block: u64) -> [u8; BLOCK] {
    let mut out = [0u8; BLOCK];
    if id == 0 {
        return out;
    }
    out[..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block;
    for b in &mut out[16..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    out
}

/// Decodes which write a block came from, checking every byte.
fn decode(block: u64, data: &[u8]) -> Result<u64, String> {
    let id = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if data == pattern(id, block) {
        Ok(id)
    } else {
        Err(format!(
            "block {block} is corrupt: claims write {id}, bytes do not match its pattern"
        ))
    }
}

enum HostDone {
    Write(u64, Result<(), VolError>),
    Read(u64, u64, u64, Result<Vec<u8>, VolError>),
}

/// One simulation run.
pub struct Sim {
    cfg: SimConfig,
    rng: Rng,
    pool: LocalPool,
    shared: Shared,
    nodes: BTreeMap<ControllerId, Node>,
    vol: VolumeMeta,
    history: History,
    now: u64,
    next_write: u64,
    in_flight: usize,
    done: Rc<RefCell<Vec<HostDone>>>,
    limbo: Rc<RefCell<Vec<(ControllerId, HostDone)>>>,
    report: SimReport,
    trace: Vec<String>,
    /// A controller being drained during the faulty phase (its positions move batch by
    /// batch; out once none is left).
    draining: Option<ControllerId>,
    /// The controller and first block of the last host operation: some operations follow
    /// it (same controller, nearby blocks), as a host's sequential I/O does, so read leases
    /// are used and revoked.
    last_op: Option<(ControllerId, u64)>,
    /// Controllers crashed and not yet restarted, or isolated, or not yet up again.
    blocks: u64,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("cfg", &self.cfg).finish()
    }
}

impl Sim {
    /// A fresh cluster: every controller up at epoch 1, one volume.
    ///
    /// # Panics
    /// On a geometry the engine refuses.
    pub fn new(cfg: SimConfig) -> Self {
        let geometry = Geometry::new(cfg.k, cfg.m, 4096, 4, CodecKind::GfMatrix, None)
            .expect("simulation geometry");
        let extents = 2 * u64::from(cfg.controllers);
        let layout = Layout {
            size_bytes: extents * geometry.extent_bytes(),
            geometry,
        };
        let ids: Vec<ControllerId> = (1..=cfg.controllers).collect();
        let vol = VolumeMeta::rotated(VOLUME, layout, &ids).expect("placement");
        let view = ClusterView {
            epoch: 1,
            controllers: ids.iter().map(|&c| (c, ControllerState::Up)).collect(),
        };
        let shared = Shared {
            queue: Arc::new(Mutex::new(Vec::new())),
            meta: Arc::new(Mutex::new(Meta {
                view: view.clone(),
                intents: BTreeMap::new(),
                repairs: BTreeMap::new(),
                served: BTreeMap::new(),
                moves: BTreeMap::new(),
                out: BTreeSet::new(),
            })),
            clock: Arc::new(Mutex::new(Clock {
                base: std::time::Instant::now(),
                tick: 0,
                timers: Vec::new(),
            })),
        };
        let mut sim = Self {
            cfg,
            rng: Rng::new(cfg.seed),
            pool: LocalPool::new(),
            shared,
            nodes: BTreeMap::new(),
            blocks: layout.size_bytes / BLOCK as u64,
            vol,
            history: History::default(),
            now: 0,
            next_write: 1,
            in_flight: 0,
            done: Rc::new(RefCell::new(Vec::new())),
            limbo: Rc::new(RefCell::new(Vec::new())),
            report: SimReport::default(),
            trace: Vec::new(),
            draining: None,
            last_op: None,
        };
        for id in ids {
            sim.new_node(id, 1);
        }
        sim
    }

    /// A controller with an empty store, its engine started at `epoch`.
    fn new_node(&mut self, id: ControllerId, epoch: u64) {
        let store = Arc::new(MemShardStore::default());
        let engine = self.start_engine(id, store.clone());
        self.nodes.insert(
            id,
            Node {
                engine,
                store,
                alive: true,
                isolated: false,
                tasks: Vec::new(),
                installed_epoch: epoch,
                last_applied_epoch: 0,
            },
        );
    }

    fn start_engine(&self, id: ControllerId, store: Arc<MemShardStore>) -> Arc<Engine> {
        let env = Arc::new(SimEnv {
            me: id,
            shared: self.shared.clone(),
        });
        let view = self.shared.meta.lock().expect("meta").view.clone();
        let e = Arc::new(Engine::new(id, store, env, view));
        e.add_volume(self.vol.clone()).expect("volume");
        e
    }

    fn log(&mut self, s: String) {
        self.trace.push(format!("[{}] {s}", self.now));
        if self.trace.len() > 400 {
            self.trace.remove(0);
        }
    }

    fn fail(&self, what: &str) -> ! {
        let c = &self.cfg;
        panic!(
            "simulation invariant violated: {what}\nlast events:\n  {}\nreplay: SIM_SEED={} SIM_CONTROLLERS={} SIM_K={} SIM_M={} SIM_STEPS={} cargo test -p tests --test simulation replay -- --nocapture",
            self.trace.join("\n  "),
            c.seed, c.controllers, c.k, c.m, c.steps
        );
    }

    fn spawn_on(&mut self, id: ControllerId, fut: impl std::future::Future<Output = ()> + 'static) {
        let (h, reg) = AbortHandle::new_pair();
        self.pool
            .spawner()
            .spawn_local(Abortable::new(fut, reg).map(|_| ()))
            .expect("spawn");
        self.nodes.get_mut(&id).expect("node").tasks.push(h);
    }

    /// Whether a message from `a` (possibly crashed since it sent it: packets on the wire
    /// still arrive) reaches `b`.
    fn connected(&self, a: ControllerId, b: ControllerId) -> bool {
        let to_ok = self
            .nodes
            .get(&b)
            .is_some_and(|n| n.alive && (!n.isolated || a == b));
        let from_ok = self.nodes.get(&a).is_some_and(|n| !n.isolated || a == b);
        to_ok && from_ok
    }

    fn majority(&self, a: ControllerId) -> bool {
        self.nodes.get(&a).is_some_and(|n| n.alive && !n.isolated)
    }

    /// Impaired: crashed, isolated, or not up in the metadata view (controllers marked out
    /// hold nothing and do not count), plus one while moves are copying.
    fn impaired(&self) -> usize {
        let meta = self.shared.meta.lock().expect("meta");
        self.nodes
            .iter()
            .filter(|(id, n)| {
                !meta.out.contains(id)
                    && (!n.alive || n.isolated || meta.view.state(**id) != ControllerState::Up)
            })
            .count()
            + usize::from(!meta.moves.is_empty())
    }

    fn placements(&self) -> std::collections::HashMap<VolumeId, Vec<Vec<ControllerId>>> {
        std::iter::once((VOLUME, self.vol.placement.clone())).collect()
    }

    /// Marks crashed controller `id` out if the others can take its positions (each to the
    /// up, reachable controller outside the extent's set holding fewest positions). Returns
    /// whether it did.
    fn mark_out(&mut self, id: ControllerId) -> bool {
        let (view, others_behind) = {
            let m = self.shared.meta.lock().expect("meta");
            let behind = m
                .intents
                .keys()
                .any(|mk| self.vol.placement[mk.extent as usize][mk.pos as usize] != id);
            (m.view.clone(), behind)
        };
        // Losing a controller for good while another holder still misses rows it holds would
        // be two failures of those rows: beyond the fault budget for m = 1 (and the model
        // keeps one impairment at a time here).
        if others_behind || self.unmarked_lagging_besides(id) {
            return false;
        }
        let candidates: Vec<ControllerId> = self
            .nodes
            .iter()
            .filter(|(c, n)| {
                **c != id && n.alive && !n.isolated && view.state(**c) == ControllerState::Up
            })
            .map(|(c, _)| *c)
            .collect();
        let mut load: BTreeMap<ControllerId, usize> = candidates.iter().map(|&c| (c, 0)).collect();
        for h in self.vol.placement.iter().flatten() {
            if let Some(n) = load.get_mut(h) {
                *n += 1;
            }
        }
        let mut placement = self.vol.placement.clone();
        let mut moves = Vec::new();
        for (e, set) in placement.iter_mut().enumerate() {
            for pos in 0..set.len() {
                if set[pos] != id {
                    continue;
                }
                let Some(to) = load
                    .iter()
                    .filter(|(c, _)| !set.contains(c))
                    .min_by_key(|(c, n)| (**n, **c))
                    .map(|(c, _)| *c)
                else {
                    return false;
                };
                *load.get_mut(&to).expect("candidate") += 1;
                set[pos] = to;
                moves.push(((e as u64, pos as u8), to));
            }
        }
        self.report.marked_out += 1;
        self.log(format!("mark out {id}: moves {moves:?}"));
        self.vol.placement = placement;
        {
            let mut meta = self.shared.meta.lock().expect("meta");
            meta.out.insert(id);
            for (key, to) in moves {
                meta.moves.insert(key, (to, 0));
            }
        }
        self.install_view(|_| {});
        true
    }

    /// A new controller joins (an empty store, up at once), as `appliance controller add`.
    fn add_controller(&mut self) -> ControllerId {
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        self.log(format!("add {id}"));
        self.report.added += 1;
        let epoch = self.shared.meta.lock().expect("meta").view.epoch;
        self.new_node(id, epoch);
        self.install_view(|v| {
            v.controllers.insert(id, ControllerState::Up);
        });
        id
    }

    /// Plans up to eight moves as the metadata leader does (`MetaState::plan_drain` and
    /// `plan_rebalance`): the positions of `drain` to the up controllers holding the fewest
    /// outside each extent's set, or, with `None`, from the controller holding the most to the
    /// one holding the fewest while they differ by more than one. Returns how many.
    fn plan_moves(&mut self, drain: Option<ControllerId>) -> usize {
        let (view, out) = {
            let m = self.shared.meta.lock().expect("meta");
            (m.view.clone(), m.out.clone())
        };
        let mut load: BTreeMap<ControllerId, usize> = self
            .nodes
            .iter()
            .filter(|(c, n)| {
                n.alive
                    && !n.isolated
                    && view.state(**c) == ControllerState::Up
                    && !out.contains(c)
                    && Some(**c) != drain
            })
            .map(|(c, _)| (*c, 0))
            .collect();
        let mut placement = self.vol.placement.clone();
        for h in placement.iter().flatten() {
            if let Some(n) = load.get_mut(h) {
                *n += 1;
            }
        }
        // Extents with a lagging holder wait for resync (as `MetaState::extent_marked`).
        let marked: BTreeSet<u64> = self
            .shared
            .meta
            .lock()
            .expect("meta")
            .intents
            .keys()
            .map(|mk| mk.extent)
            .collect();
        let mut moves: Vec<((u64, u8), ControllerId)> = Vec::new();
        while moves.len() < 8 {
            let found = match drain {
                Some(d) => placement
                    .iter()
                    .enumerate()
                    .filter(|(e, _)| !marked.contains(&(*e as u64)))
                    .find_map(|(e, set)| set.iter().position(|h| *h == d).map(|p| (e, p)))
                    .and_then(|(e, pos)| {
                        load.iter()
                            .filter(|(c, _)| !placement[e].contains(c))
                            .min_by_key(|(c, n)| (**n, **c))
                            .map(|(c, _)| (e, pos, *c))
                    }),
                None => {
                    let hi = load.iter().max_by_key(|(c, n)| (**n, u32::MAX - **c));
                    let lo = load.iter().min_by_key(|(c, n)| (**n, **c));
                    match (hi, lo) {
                        (Some((&hi, &most)), Some((&lo, &fewest))) if most > fewest + 1 => {
                            placement.iter().enumerate().find_map(|(e, set)| {
                                let free = !moves.iter().any(|(k, _)| k.0 == e as u64)
                                    && !marked.contains(&(e as u64));
                                let pos = set.iter().position(|h| *h == hi)?;
                                (free && !set.contains(&lo)).then_some((e, pos, lo))
                            })
                        }
                        _ => None,
                    }
                }
            };
            let Some((e, pos, to)) = found else { break };
            if let Some(n) = load.get_mut(&placement[e][pos]) {
                *n -= 1;
            }
            *load.get_mut(&to).expect("candidate") += 1;
            placement[e][pos] = to;
            moves.push(((e as u64, pos as u8), to));
        }
        if moves.is_empty() {
            return 0;
        }
        self.report.planned_moves += moves.len() as u64;
        self.log(format!("planned moves (drain {drain:?}): {moves:?}"));
        self.vol.placement = placement;
        {
            let mut meta = self.shared.meta.lock().expect("meta");
            for &(key, to) in &moves {
                meta.moves.insert(key, (to, 0));
            }
        }
        self.install_view(|_| {});
        moves.len()
    }

    /// Planned moves batch by batch until none is left, hosts writing and reading meanwhile
    /// (messages reordered). With `m >= 2` a holder sometimes crashes while positions move
    /// and comes back (with `m = 1` a moving position already spends the fault budget).
    fn planned_moves(&mut self, drain: Option<ControllerId>) {
        for _ in 0..200 {
            if self.plan_moves(drain) == 0 {
                return;
            }
            for _ in 0..10 {
                self.issue_host_op();
            }
            self.move_pass();
            if self.cfg.m >= 2 && self.rng.pct(30) {
                let out = self.shared.meta.lock().expect("meta").out.clone();
                let alive: Vec<ControllerId> = self
                    .nodes
                    .iter()
                    .filter(|(c, n)| n.alive && !out.contains(c) && Some(**c) != drain)
                    .map(|(c, _)| *c)
                    .collect();
                let victim = alive[self.rng.below(alive.len() as u64) as usize];
                for _ in 0..self.rng.below(30) {
                    self.deliver(false);
                    self.pool.run_until_stalled();
                }
                self.crash(victim);
                self.install_view(|v| {
                    v.controllers.insert(victim, ControllerState::Down);
                });
            }
            self.heal_all();
        }
        self.fail("planned moves did not finish");
    }

    /// Whether some row held by `id` has another position whose newest copy is not the row's
    /// newest state, unmarked. The engine marks such a holder only when it answers a load (a
    /// write it missed while its primary crashed, first read while it was down, is not
    /// marked: docs/architecture.md), so losing `id` for good would lose the row. Known gap;
    /// the simulation does not mark out then.
    fn unmarked_lagging_besides(&self, id: ControllerId) -> bool {
        let g = self.vol.layout.geometry;
        for (e, set) in self.vol.placement.iter().enumerate() {
            if !set.contains(&id) {
                continue;
            }
            for row in 0..g.rows_per_extent {
                let copies: Vec<Vec<Chunk>> = (0..g.width())
                    .map(|pos| {
                        self.nodes[&set[pos]].store.read_now(ChunkAddr {
                            volume: VOLUME,
                            extent: e as u64,
                            row,
                            pos: pos as u8,
                        })
                    })
                    .collect();
                let Some(cols) = copies
                    .iter()
                    .flatten()
                    .max_by_key(|c| c.cols.iter().copied().max().unwrap_or(0))
                    .map(|c| c.cols.clone())
                else {
                    continue;
                };
                for (pos, cs) in copies.iter().enumerate() {
                    if set[pos] == id {
                        continue;
                    }
                    let ok = match cols.get(pos) {
                        Some(&v) => v == 0 || cs.first().is_some_and(|c| c.version == v),
                        None => cs.first().is_some_and(|c| c.cols == cols),
                    };
                    if !ok {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Each live controller copies the moved rows of the extents it leads, then records the
    /// progress in the log.
    fn move_pass(&mut self) {
        let moves: Vec<((u64, u8), (ControllerId, u32))> = self
            .shared
            .meta
            .lock()
            .expect("meta")
            .moves
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        let rows = self.vol.layout.geometry.rows_per_extent;
        let ids: Vec<ControllerId> = self.nodes.keys().copied().collect();
        for id in ids {
            let n = &self.nodes[&id];
            if !n.alive || n.isolated {
                continue;
            }
            let e = n.engine.clone();
            let shared = self.shared.clone();
            let moves = moves.clone();
            self.spawn_on(id, async move {
                for ((extent, pos), (to, done)) in moves {
                    let epoch = e.view().epoch;
                    let r = e
                        .copy_moved(VOLUME, extent, usize::from(pos), done..rows)
                        .await;
                    if std::env::var("SIM_DEBUG_MOVES").is_ok() {
                        eprintln!("move ({extent},{pos}) on {id}: {r:?}");
                    }
                    if r.is_err() {
                        continue; // not its extent, or a holder failed: a later pass retries
                    }
                    let (tx, rx) = oneshot::channel();
                    shared.queue.lock().expect("queue").push(Pending {
                        from: id,
                        msg: Msg::MoveDone((extent, pos), to, rows, epoch, tx),
                    });
                    let _ = rx.await;
                }
            });
        }
    }

    fn install_view(&mut self, change: impl FnOnce(&mut ClusterView)) {
        let view = {
            let mut meta = self.shared.meta.lock().expect("meta");
            change(&mut meta.view);
            meta.view.epoch += 1;
            meta.view.clone()
        };
        self.log(format!("epoch {} {:?}", view.epoch, view.controllers));
        let ids: Vec<ControllerId> = self.nodes.keys().copied().collect();
        // Host commands cut off by a controller's crash resolve (for the checker) when the
        // cluster declares it gone: hosts retry on another path only after their session
        // replacement timeout, which exceeds `down_after` (docs/architecture.md).
        let gone: Vec<ControllerId> = ids
            .iter()
            .copied()
            .filter(|id| view.state(*id) != ControllerState::Up)
            .collect();
        {
            let mut limbo = self.limbo.borrow_mut();
            let mut done = self.done.borrow_mut();
            let (now_done, keep): (Vec<_>, Vec<_>) =
                limbo.drain(..).partition(|(via, _)| gone.contains(via));
            done.extend(now_done.into_iter().map(|(_, d)| d));
            *limbo = keep;
        }
        let placements = self.placements();
        for id in ids {
            if self.majority(id) {
                let n = self.nodes.get_mut(&id).expect("node");
                n.engine.set_view_and_placement(view.clone(), &placements);
                n.installed_epoch = view.epoch;
            }
        }
    }

    /// Delivers one random message; with `faults`, drops some and fails some disk reads.
    fn deliver(&mut self, faults: bool) {
        let drop_pct = if faults { 3 } else { 0 };
        let p = {
            let mut q = self.shared.queue.lock().expect("queue");
            if q.is_empty() {
                return;
            }
            let i = self.rng.below(q.len() as u64) as usize;
            q.swap_remove(i)
        };
        let drop = self.rng.pct(drop_pct);
        match p.msg {
            Msg::Read(to, epoch, addr, r) => {
                if drop || !self.connected(p.from, to) {
                    return;
                }
                let n = &self.nodes[&to];
                let res = if faults && self.rng.pct(2) {
                    Err(ShardError::Io("simulated read error".into()))
                } else {
                    n.engine
                        .handle_read_chunk(epoch, addr)
                        .now_or_never()
                        .expect("memory store is immediate")
                };
                let _ = r.send(res);
            }
            Msg::Write(to, epoch, addr, chunk, r) => {
                if drop || !self.connected(p.from, to) {
                    return;
                }
                self.shared.queue.lock().expect("queue").push(Pending {
                    from: to,
                    msg: Msg::WriteApply(epoch, addr, chunk, r),
                });
            }
            Msg::WriteApply(epoch, addr, chunk, r) => {
                let to = p.from;
                if std::env::var("SIM_DEBUG_ROW")
                    .is_ok_and(|r| r == format!("{}/{}", addr.extent, addr.row))
                {
                    eprintln!("APPLY [{}] on {to} pos {} v={:x} cols={:x?} epoch {epoch} drop_reply={drop}", self.now, addr.pos, chunk.version, chunk.cols);
                }
                let n = self.nodes.get_mut(&to).expect("node");
                if !n.alive {
                    return;
                }
                let res = n
                    .engine
                    .handle_write_chunk(epoch, addr, chunk)
                    .now_or_never()
                    .expect("memory store is immediate");
                if res.is_ok() {
                    if epoch < n.installed_epoch || epoch < n.last_applied_epoch {
                        let what = format!(
                            "controller {to} applied a chunk write of epoch {epoch} after installing epoch {} / applying epoch {}",
                            n.installed_epoch, n.last_applied_epoch
                        );
                        self.fail(&what);
                    }
                    n.last_applied_epoch = epoch;
                }
                if !drop {
                    let _ = r.send(res);
                }
            }
            Msg::FwdWrite(to, epoch, off, data, r) => {
                if drop || !self.connected(p.from, to) {
                    return;
                }
                let e = self.nodes[&to].engine.clone();
                self.spawn_on(to, async move {
                    let _ = r.send(e.primary_write(epoch, VOLUME, off, &data).await);
                });
            }
            Msg::FwdRead(to, epoch, off, len, r) => {
                if drop || !self.connected(p.from, to) {
                    return;
                }
                let e = self.nodes[&to].engine.clone();
                self.spawn_on(to, async move {
                    let _ = r.send(e.primary_read(epoch, VOLUME, off, len).await);
                });
            }
            Msg::Revoke(to, extent, r) => {
                if drop || !self.connected(p.from, to) {
                    return;
                }
                self.nodes[&to].engine.revoke_leases(VOLUME, extent);
                let _ = r.send(Ok(()));
            }
            Msg::FwdLocate(to, epoch, off, len, r) => {
                if drop || !self.connected(p.from, to) {
                    return;
                }
                let e = self.nodes[&to].engine.clone();
                self.spawn_on(to, async move {
                    let _ = r.send(e.primary_locate(p.from, epoch, VOLUME, off, len).await);
                });
            }
            Msg::Served(key, content, epoch, r) => {
                if std::env::var("SIM_DEBUG_ROW").is_ok_and(|r| r == format!("{}/{}", key.1, key.2))
                {
                    eprintln!(
                        "SERVED [{}] from {} v={content:x} epoch {epoch} drop={drop}",
                        self.now, p.from
                    );
                }
                self.log_op(p.from, drop, epoch, r, |meta| {
                    let e = meta.served.entry(key).or_insert(content);
                    *e = (*e).max(content);
                });
            }
            Msg::MoveDone(key, to, done, epoch, r) => {
                let rows = self.vol.layout.geometry.rows_per_extent;
                self.log_op(p.from, drop, epoch, r, |meta| {
                    if let Some(m) = meta.moves.get_mut(&key).filter(|m| m.0 == to) {
                        m.1 = m.1.max(done);
                        if m.1 >= rows {
                            meta.moves.remove(&key);
                        }
                    }
                });
            }
            Msg::Repair(key, cols, upto, epoch, r) => {
                self.log_op(p.from, drop, epoch, r, |meta| {
                    meta.repairs.insert(key, (cols, upto));
                });
            }
            Msg::Mark(mark, set, v, epoch, r) => {
                let now = self.now;
                self.log_op(p.from, drop, epoch, r, |meta| {
                    if std::env::var("SIM_DEBUG_ROW")
                        .is_ok_and(|r| r == format!("{}/{}", mark.extent, mark.row))
                    {
                        eprintln!(
                            "MARK [{now}] from {} {mark:?} set={set} v={v:x} had={:x?}",
                            p.from,
                            meta.intents.get(&mark)
                        );
                    }
                    if set {
                        let e = meta.intents.entry(mark).or_insert(v);
                        *e = (*e).max(v);
                    } else if let Some(missed) =
                        meta.intents.get(&mark).copied().filter(|&m| m <= v)
                    {
                        // As the appliance's log: the floor the mark set outlives it.
                        meta.intents.remove(&mark);
                        if missed > 0 {
                            let e = meta
                                .served
                                .entry((mark.volume, mark.extent, mark.row))
                                .or_insert(missed);
                            *e = (*e).max(missed);
                        }
                    }
                });
            }
        }
    }

    /// Applies a metadata-log command from `from`: lost when dropped or when `from` cannot
    /// reach the majority, refused at a stale epoch, else applied by `f`.
    fn log_op(
        &self,
        from: ControllerId,
        drop: bool,
        epoch: u64,
        r: Reply<Result<(), VolError>>,
        f: impl FnOnce(&mut Meta),
    ) {
        if drop || !self.majority(from) {
            return;
        }
        let mut meta = self.shared.meta.lock().expect("meta");
        if epoch != meta.view.epoch {
            let ours = meta.view.epoch;
            drop_guard(meta);
            let _ = r.send(Err(VolError::Epoch {
                ours,
                theirs: epoch,
            }));
            return;
        }
        f(&mut meta);
        drop_guard(meta);
        let _ = r.send(Ok(()));
    }

    fn issue_host_op(&mut self) {
        let ids: Vec<ControllerId> = self.nodes.keys().copied().collect();
        let (via, first) = match self.last_op {
            Some((via, b)) if self.rng.pct(40) => (via, (b + self.rng.below(24)) % self.blocks),
            _ => (
                ids[self.rng.below(ids.len() as u64) as usize],
                self.rng.below(self.blocks),
            ),
        };
        if !self.nodes.get(&via).is_some_and(|n| n.alive) {
            return;
        }
        self.last_op = Some((via, first));
        let max = (self.blocks - first).min(40);
        let blocks = 1 + self.rng.below(max);
        let engine = self.nodes[&via].engine.clone();
        let done = self.done.clone();
        let limbo = self.limbo.clone();
        self.in_flight += 1;
        if self.rng.pct(55) {
            let id = self.next_write;
            self.next_write += 1;
            let mut data = Vec::with_capacity(blocks as usize * BLOCK);
            for b in first..first + blocks {
                data.extend_from_slice(&pattern(id, b));
                self.history.by_block.entry(b).or_default().push(id);
            }
            self.history.writes.insert(
                id,
                WriteRec {
                    issued: self.now,
                    resolved: None,
                    acked: false,
                },
            );
            self.log(format!("write {id} blocks {first}+{blocks} via {via}"));
            let guard = DoneGuard {
                done: done.clone(),
                limbo: limbo.clone(),
                via,
                op: Some(HostDone::Write(
                    id,
                    Err(VolError::Peer("controller crashed".into())),
                )),
            };
            self.spawn_on(via, async move {
                let r = engine.write(VOLUME, first * BLOCK as u64, &data).await;
                guard.finish(HostDone::Write(id, r));
            });
        } else {
            let start = self.now;
            let guard = DoneGuard {
                done: done.clone(),
                limbo: limbo.clone(),
                via,
                op: Some(HostDone::Read(
                    first,
                    start,
                    blocks,
                    Err(VolError::Peer("controller crashed".into())),
                )),
            };
            self.spawn_on(via, async move {
                let r = engine
                    .read(VOLUME, first * BLOCK as u64, blocks * BLOCK as u64)
                    .await;
                guard.finish(HostDone::Read(first, start, blocks, r));
            });
        }
    }

    fn settle_host_ops(&mut self) {
        let done: Vec<HostDone> = self.done.borrow_mut().drain(..).collect();
        for d in done {
            self.in_flight -= 1;
            match d {
                HostDone::Write(id, r) => {
                    let now = self.now;
                    let rec = self.history.writes.get_mut(&id).expect("write");
                    rec.resolved = Some(now);
                    rec.acked = r.is_ok();
                    if r.is_ok() {
                        self.report.writes_acked += 1;
                    } else {
                        self.report.writes_failed += 1;
                    }
                    self.log(format!("write {id} -> {r:?}"));
                }
                HostDone::Read(first, start, blocks, r) => match r {
                    Ok(data) => {
                        self.report.reads_checked += 1;
                        self.check_read(first, blocks, start, &data);
                    }
                    Err(_) => self.report.reads_failed += 1,
                },
            }
        }
    }

    fn check_read(&mut self, first: u64, blocks: u64, start: u64, data: &[u8]) {
        for i in 0..blocks {
            let b = first + i;
            let block = &data[i as usize * BLOCK..(i as usize + 1) * BLOCK];
            let res = decode(b, block).and_then(|w| self.history.allowed(b, w, start, self.now));
            if let Err(e) = res {
                let what = format!("{e}\n{}", self.dump(b * BLOCK as u64, BLOCK as u64));
                self.fail(&what);
            }
        }
    }

    fn crash(&mut self, id: ControllerId) {
        self.report.crashes += 1;
        self.log(format!("crash {id}"));
        let n = self.nodes.get_mut(&id).expect("node");
        n.alive = false;
        for t in n.tasks.drain(..) {
            t.abort();
        }
        // Chunk writes on their way to this controller's disk are lost or torn.
        let mut q = self.shared.queue.lock().expect("queue");
        let mut cut = Vec::new();
        let mut i = 0;
        while i < q.len() {
            if q[i].from == id && matches!(q[i].msg, Msg::WriteApply(..)) {
                if let Msg::WriteApply(_, addr, chunk, _) = q.swap_remove(i).msg {
                    cut.push((addr, chunk));
                }
            } else {
                i += 1;
            }
        }
        drop(q);
        for (addr, chunk) in cut {
            if self.rng.pct(50) {
                let store = &self.nodes[&id].store;
                store.write_now(addr, chunk);
                store.tear_newest(addr);
                self.report.torn += 1;
            }
        }
        // Let aborted tasks finish unwinding so their host ops resolve now.
        self.pool.run_until_stalled();
    }

    fn restart(&mut self, id: ControllerId) {
        self.log(format!("restart {id}"));
        // The crashed engine's counters count too.
        let s = self.nodes[&id].engine.stats();
        self.report.absorb(&s);
        let store = self.nodes[&id].store.clone();
        let engine = self.start_engine(id, store);
        let n = self.nodes.get_mut(&id).expect("node");
        n.engine = engine;
        n.alive = true;
        n.isolated = false;
        n.installed_epoch = self.shared.meta.lock().expect("meta").view.epoch;
        n.last_applied_epoch = 0;
        self.install_view(|v| {
            v.controllers.insert(id, ControllerState::Resyncing);
        });
    }

    /// Planned moves among the faults: the next batch of a drain, a drain started on an up
    /// controller when one can be spared, or a rebalance batch. Only with nothing moving and
    /// fewer than `m` impairments (a moving position spends one failure of the budget; no new
    /// fault is injected while it copies). Returns whether it acted.
    fn planned_step(&mut self) -> bool {
        let (moving, out) = {
            let m = self.shared.meta.lock().expect("meta");
            (!m.moves.is_empty(), m.out.clone())
        };
        // With m = 1 a moving position spends the whole fault budget, and the faulty phase
        // still drops messages: planned moves wait for the healed phase there (docs:
        // "moves keep full redundancy" is not built).
        if moving || self.impaired() >= self.cfg.m || self.cfg.m < 2 {
            return false;
        }
        if let Some(d) = self.draining {
            if out.contains(&d) || !self.nodes[&d].alive {
                self.draining = None; // marked out or crashed meanwhile: a rebuild takes over
                return false;
            }
            if self.plan_moves(Some(d)) == 0 {
                if self.vol.placement.iter().flatten().any(|h| *h == d) {
                    return false; // its other extents wait for resync
                }
                self.log(format!("drained {d}: out"));
                self.report.drained += 1;
                self.draining = None;
                self.shared.meta.lock().expect("meta").out.insert(d);
                self.crash(d);
                self.install_view(|v| {
                    v.controllers.insert(d, ControllerState::Down);
                });
            } else {
                self.move_pass();
            }
            return true;
        }
        let holders: Vec<ControllerId> = self
            .nodes
            .keys()
            .copied()
            .filter(|id| !out.contains(id))
            .collect();
        if holders.len() > self.vol.layout.geometry.width() && self.rng.pct(30) {
            let d = holders[self.rng.below(holders.len() as u64) as usize];
            self.log(format!("drain {d} (among faults)"));
            if std::env::var("SIM_DEBUG_MOVES").is_ok() {
                eprintln!("drain {d} among faults at step {}", self.now);
            }
            self.draining = Some(d);
            return true;
        }
        if self.plan_moves(None) > 0 {
            self.move_pass();
            return true;
        }
        false
    }

    /// One fault or membership action.
    fn membership_step(&mut self) {
        if (self.draining.is_some() || self.rng.pct(25)) && self.planned_step() {
            return;
        }
        let (states, marks): (BTreeMap<ControllerId, ControllerState>, Vec<IntentMark>) = {
            let m = self.shared.meta.lock().expect("meta");
            (
                m.view.controllers.clone(),
                m.intents.keys().copied().collect(),
            )
        };
        let ids: Vec<ControllerId> = self.nodes.keys().copied().collect();
        let id = ids[self.rng.below(ids.len() as u64) as usize];
        let n = &self.nodes[&id];
        let state = states[&id];
        match (n.alive, n.isolated, state) {
            (true, false, ControllerState::Up) => {
                if self.impaired() < self.cfg.m {
                    if self.rng.pct(70) {
                        self.crash(id);
                    } else {
                        self.report.isolations += 1;
                        self.log(format!("isolate {id}"));
                        self.nodes.get_mut(&id).expect("node").isolated = true;
                    }
                }
            }
            (true, true, ControllerState::Up) => {
                // The lease runs out before the metadata side declares it down.
                self.log(format!("fence {id}"));
                self.nodes[&id].engine.set_fenced(true);
                self.install_view(|v| {
                    v.controllers.insert(id, ControllerState::Down);
                });
            }
            (false, _, ControllerState::Up | ControllerState::Resyncing) => {
                self.install_view(|v| {
                    v.controllers.insert(id, ControllerState::Down);
                });
            }
            (false, _, ControllerState::Down) => {
                let (out, moving) = {
                    let m = self.shared.meta.lock().expect("meta");
                    (m.out.contains(&id), !m.moves.is_empty())
                };
                let spare = self.nodes.len() - self.shared.meta.lock().expect("meta").out.len()
                    > self.vol.layout.geometry.width();
                if out {
                    // Gone for good.
                } else if spare && !moving && self.rng.pct(50) && self.mark_out(id) {
                    self.move_pass();
                } else {
                    self.restart(id);
                }
            }
            (true, true, _) => {
                self.log(format!("heal {id}"));
                let n = self.nodes.get_mut(&id).expect("node");
                n.isolated = false;
                n.engine.set_fenced(false);
                self.install_view(|v| {
                    v.controllers.insert(id, ControllerState::Resyncing);
                });
            }
            (true, false, ControllerState::Resyncing) => {
                let behind = marks
                    .iter()
                    .any(|mk| self.vol.placement[mk.extent as usize][mk.pos as usize] == id);
                if !behind {
                    self.install_view(|v| {
                        v.controllers.insert(id, ControllerState::Up);
                    });
                } else {
                    self.resync_pass();
                }
            }
            (true, false, ControllerState::Down) => {
                self.install_view(|v| {
                    v.controllers.insert(id, ControllerState::Resyncing);
                });
            }
        }
    }

    fn resync_pass(&mut self) {
        let ids: Vec<ControllerId> = self.nodes.keys().copied().collect();
        for id in ids {
            if self.nodes[&id].alive && !self.nodes[&id].isolated {
                let e = self.nodes[&id].engine.clone();
                self.spawn_on(id, async move {
                    let r = e.resync().await;
                    if std::env::var("SIM_DEBUG_RESYNC").is_ok() && r.is_err() {
                        eprintln!("resync: {r:?}");
                    }
                });
            }
        }
    }

    /// Advances simulated time by one step and fires the waits that are due.
    fn tick(&mut self) {
        self.now += 1;
        let due: Vec<Reply<()>> = {
            let mut c = self.shared.clock.lock().expect("clock");
            c.tick = self.now;
            let now = self.now;
            let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut c.timers)
                .into_iter()
                .partition(|(at, _)| *at <= now);
            c.timers = wait;
            due.into_iter().map(|(_, r)| r).collect()
        };
        for r in due {
            let _ = r.send(());
        }
    }

    fn step(&mut self, faults: bool) {
        self.tick();
        let r = self.rng.below(100);
        if r < 12 && self.in_flight < self.cfg.max_in_flight && faults {
            self.issue_host_op();
        } else if r < 14 && faults {
            self.membership_step();
        } else if r < 15 && faults {
            self.resync_pass();
            self.move_pass();
            if self.draining.is_some() {
                self.planned_step();
            }
        } else {
            self.deliver(faults);
        }
        self.pool.run_until_stalled();
        self.settle_host_ops();
    }

    /// Runs the faulty phase, then heals everything and checks the whole volume, then kills
    /// `m` controllers and checks it again.
    pub fn run(mut self) -> SimReport {
        for _ in 0..self.cfg.steps {
            self.step(true);
        }
        self.log("healing".into());
        self.heal_all();
        // With a spare controller: once everything is settled, one more controller dies and
        // is marked out; its positions are rebuilt on the others while hosts keep writing
        // (messages reordered, no new faults), then everything must still hold after losing
        // m more.
        let out = self.shared.meta.lock().expect("meta").out.clone();
        let alive: Vec<ControllerId> = self
            .nodes
            .keys()
            .copied()
            .filter(|id| !out.contains(id))
            .collect();
        if alive.len() > self.vol.layout.geometry.width() {
            let id = alive[self.rng.below(alive.len() as u64) as usize];
            self.crash(id);
            self.install_view(|v| {
                v.controllers.insert(id, ControllerState::Down);
            });
            if self.mark_out(id) {
                for _ in 0..20 {
                    self.issue_host_op();
                }
                self.move_pass();
            }
            self.heal_all();
        }
        // Elastic: a controller joins and positions are rebalanced onto it; then an original
        // controller is drained (it serves while its positions move) and leaves.
        let added = self.add_controller();
        self.planned_moves(None);
        let out = self.shared.meta.lock().expect("meta").out.clone();
        let originals: Vec<ControllerId> = self
            .nodes
            .keys()
            .copied()
            .filter(|id| *id != added && !out.contains(id))
            .collect();
        let victim = originals[self.rng.below(originals.len() as u64) as usize];
        self.log(format!("drain {victim}"));
        self.planned_moves(Some(victim));
        if self.vol.placement.iter().flatten().any(|h| *h == victim) {
            self.fail(&format!(
                "controller {victim} still holds positions after its drain"
            ));
        }
        self.report.drained += 1;
        self.shared.meta.lock().expect("meta").out.insert(victim);
        self.crash(victim);
        self.install_view(|v| {
            v.controllers.insert(victim, ControllerState::Down);
        });
        let full = self.read_all("after healing");
        // Lose m controllers: everything must still read back the same (redundancy was
        // restored, rebuilt positions included).
        let out = self.shared.meta.lock().expect("meta").out.clone();
        let ids: Vec<ControllerId> = self
            .nodes
            .keys()
            .copied()
            .filter(|id| !out.contains(id))
            .collect();
        let mut victims = BTreeSet::new();
        while victims.len() < self.cfg.m {
            victims.insert(ids[self.rng.below(ids.len() as u64) as usize]);
        }
        for &v in &victims {
            self.crash(v);
            self.install_view(|view| {
                view.controllers.insert(v, ControllerState::Down);
            });
        }
        let degraded = self.read_all(&format!("with {victims:?} down"));
        if full != degraded {
            let b = full
                .iter()
                .zip(&degraded)
                .position(|(a, b)| a != b)
                .expect("differ");
            let what = format!(
                "with {victims:?} down, block {b} reads as write {} instead of {}",
                degraded[b], full[b]
            );
            self.fail(&what);
        }
        self.report.epoch = self.shared.meta.lock().expect("meta").view.epoch;
        for n in self.nodes.values() {
            self.report.absorb(&n.engine.stats());
        }
        self.report
    }

    fn quiesce(&mut self) {
        for _ in 0..1_000_000 {
            self.pool.run_until_stalled();
            self.settle_host_ops();
            let empty = self.shared.queue.lock().expect("queue").is_empty();
            // A task may be waiting for time to pass (a read lease to run out) while it holds a
            // row lock: time goes on until no wait is left.
            let waiting = !self.shared.clock.lock().expect("clock").timers.is_empty();
            // Commands cut off by a crash wait in limbo until the controller is declared gone.
            if empty && !waiting && self.in_flight == self.limbo.borrow().len() {
                return;
            }
            self.step(false);
        }
        self.fail("the cluster did not quiesce after healing (hung operation)");
    }

    fn heal_all(&mut self) {
        self.quiesce();
        let ids: Vec<ControllerId> = self.nodes.keys().copied().collect();
        let placements = self.placements();
        let out = self.shared.meta.lock().expect("meta").out.clone();
        for &id in &ids {
            if out.contains(&id) {
                continue;
            }
            if !self.nodes[&id].alive {
                self.restart(id);
            } else if self.nodes[&id].isolated {
                let n = self.nodes.get_mut(&id).expect("node");
                n.isolated = false;
                n.engine.set_fenced(false);
                let view = self.shared.meta.lock().expect("meta").view.clone();
                n.engine.set_view_and_placement(view.clone(), &placements);
                n.installed_epoch = view.epoch;
                self.install_view(|v| {
                    v.controllers.insert(id, ControllerState::Resyncing);
                });
            } else if self.shared.meta.lock().expect("meta").view.state(id) == ControllerState::Down
            {
                self.install_view(|v| {
                    v.controllers.insert(id, ControllerState::Resyncing);
                });
            }
        }
        // The primaries re-read the rows they lead: rows a crashed primary left half-written
        // are settled and their stale positions marked for resync.
        let ids: Vec<ControllerId> = self.nodes.keys().copied().collect();
        for id in ids {
            let e = self.nodes[&id].engine.clone();
            self.spawn_on(id, async move {
                let _ = e.verify_led_rows().await;
            });
        }
        self.quiesce();
        for round in 0..20 {
            self.resync_pass();
            self.move_pass();
            self.quiesce();
            let pending: Vec<IntentMark> = self
                .shared
                .meta
                .lock()
                .expect("meta")
                .intents
                .keys()
                .copied()
                .collect();
            let behind: BTreeSet<ControllerId> = pending
                .iter()
                .map(|mk| self.vol.placement[mk.extent as usize][mk.pos as usize])
                .collect();
            let states = self
                .shared
                .meta
                .lock()
                .expect("meta")
                .view
                .controllers
                .clone();
            for (id, s) in states {
                if s != ControllerState::Up && !behind.contains(&id) && !out.contains(&id) {
                    self.install_view(|v| {
                        v.controllers.insert(id, ControllerState::Up);
                    });
                }
            }
            if pending.is_empty() && self.impaired() == 0 {
                let moves = self.shared.meta.lock().expect("meta").moves.len();
                assert_eq!(moves, 0, "impaired() counts pending moves");
                return;
            }
            if round == 19 {
                let g = self.vol.layout.geometry;
                let dumps: String = pending
                    .iter()
                    .map(|mk| {
                        let row = mk.extent * u64::from(g.rows_per_extent) + u64::from(mk.row);
                        self.dump(row * g.row_bytes(), 1)
                    })
                    .collect();
                let moves = self.shared.meta.lock().expect("meta").moves.clone();
                let dumps: String = dumps
                    + &moves
                        .keys()
                        .map(|(e, _)| {
                            let first = e * u64::from(g.rows_per_extent);
                            self.dump(first * g.row_bytes(), g.extent_bytes())
                        })
                        .collect::<String>();
                let what = format!(
                    "resync did not converge: marks left {pending:?}, moves left {moves:?}\n{dumps}"
                );
                self.fail(&what);
            }
        }
    }

    /// Every copy of every chunk of the rows under a byte range, for failure reports.
    fn dump(&self, offset: u64, len: u64) -> String {
        let mut out = String::new();
        let g = self.vol.layout.geometry;
        let meta = self.shared.meta.lock().expect("meta");
        for span in self.vol.layout.spans(offset, len) {
            let _ = writeln!(out, "extent {} row {}:", span.extent, span.row);
            for pos in 0..g.width() {
                let holder = self.vol.placement[span.extent as usize][pos];
                let addr = ChunkAddr {
                    volume: VOLUME,
                    extent: span.extent,
                    row: span.row,
                    pos: pos as u8,
                };
                let copies: Vec<(u64, Vec<u64>)> = self.nodes[&holder]
                    .store
                    .read_now(addr)
                    .into_iter()
                    .map(|c| (c.version, c.cols))
                    .collect();
                let marked = meta
                    .intents
                    .iter()
                    .find(|(m, _)| {
                        m.extent == span.extent && m.row == span.row && m.pos as usize == pos
                    })
                    .map(|(_, v)| format!(" (marked, missed {v:x})"))
                    .unwrap_or_default();
                let _ = writeln!(out, "  pos {pos} on {holder}: {copies:x?}{marked}");
            }
        }
        out
    }

    /// Reads every block through a random live controller; returns each block's write id.
    fn read_all(&mut self, when: &str) -> Vec<u64> {
        let mut out = Vec::new();
        let mut first = 0;
        while first < self.blocks {
            // Reads of 1 to 64 blocks: consecutive reads share rows and extents, so read
            // leases are taken and used.
            let n = (1 + self.rng.below(64)).min(self.blocks - first);
            let live: Vec<ControllerId> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.alive)
                .map(|(id, _)| *id)
                .collect();
            let via = live[self.rng.below(live.len() as u64) as usize];
            let e = self.nodes[&via].engine.clone();
            let slot = Rc::new(RefCell::new(None));
            let s2 = slot.clone();
            self.spawn_on(via, async move {
                *s2.borrow_mut() =
                    Some(e.read(VOLUME, first * BLOCK as u64, n * BLOCK as u64).await);
            });
            for _ in 0..1_000_000 {
                self.pool.run_until_stalled();
                if slot.borrow().is_some() {
                    break;
                }
                self.tick();
                self.deliver(false);
            }
            let r = slot.borrow_mut().take();
            let data = match r {
                Some(Ok(d)) => d,
                other => {
                    let what = format!(
                        "{when}: reading blocks {first}+{n} via {via} failed: {other:?}\n{}",
                        self.dump(first * BLOCK as u64, n * BLOCK as u64)
                    );
                    self.fail(&what)
                }
            };
            let start = self.now;
            self.check_read(first, n, start, &data);
            for i in 0..n {
                let b = &data[i as usize * BLOCK..(i as usize + 1) * BLOCK];
                out.push(decode(first + i, b).expect("checked"));
            }
            first += n;
        }
        // Every acknowledged write's blocks were checked above; make sure there were some.
        let mut s = String::new();
        let _ = write!(s, "{when}: {} blocks read", out.len());
        self.log(s);
        out
    }
}

fn drop_guard<T>(_: T) {}

/// Resolves a host op exactly once, also when its task is aborted by a crash.
struct DoneGuard {
    done: Rc<RefCell<Vec<HostDone>>>,
    limbo: Rc<RefCell<Vec<(ControllerId, HostDone)>>>,
    via: ControllerId,
    op: Option<HostDone>,
}

impl DoneGuard {
    fn finish(mut self, op: HostDone) {
        self.done.borrow_mut().push(op);
        self.op = None;
    }
}

impl Drop for DoneGuard {
    /// Dropped without [`DoneGuard::finish`]: the task was cut off by a crash.
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            self.limbo.borrow_mut().push((self.via, op));
        }
    }
}

impl std::fmt::Debug for DoneGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DoneGuard")
    }
}

/// The seeds a run covers: `SIM_SEED` alone, or `SIM_SEEDS` (default `default_count`) seeds
/// from `SIM_SEED_BASE` (default 1).
pub fn seeds(default_count: u64) -> Vec<u64> {
    let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(s) = var("SIM_SEED") {
        return vec![s];
    }
    let base = var("SIM_SEED_BASE").unwrap_or(1);
    (base..base + var("SIM_SEEDS").unwrap_or(default_count)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_decode_and_detect_damage() {
        let p = pattern(42, 7);
        assert_eq!(decode(7, &p), Ok(42));
        assert!(decode(8, &p).is_err());
        let mut bad = p;
        bad[300] ^= 1;
        assert!(decode(7, &bad).is_err());
        assert_eq!(decode(3, &[0u8; BLOCK]), Ok(0));
    }

    #[test]
    fn history_refuses_superseded_writes() {
        let mut h = History::default();
        h.by_block.insert(5, vec![1, 2]);
        let w = |issued, resolved, acked| WriteRec {
            issued,
            resolved: Some(resolved),
            acked,
        };
        h.writes.insert(1, w(10, 20, true));
        h.writes.insert(2, w(30, 40, true));
        assert!(h.allowed(5, 2, 50, 60).is_ok());
        assert!(
            h.allowed(5, 1, 50, 60).is_err(),
            "overwritten and acked before the read"
        );
        assert!(
            h.allowed(5, 1, 35, 60).is_ok(),
            "concurrent with the overwrite"
        );
        assert!(
            h.allowed(5, 0, 50, 60).is_err(),
            "zeros after an acked write"
        );
        assert!(h.allowed(6, 1, 50, 60).is_err(), "never covered block 6");
    }
}

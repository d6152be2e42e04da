//! One controller of a cluster, assembled: the data-path engine, the metadata log replica and
//! the peer transport that joins them to the other controllers.
//!
//! - [`NodeEnv`] is the engine's `ClusterEnv`: chunk and forwarded I/O go to peers over
//!   [`crate::peer`] (or straight to this controller's own engine), write-intent marks and
//!   repairs are commands on the metadata log (sent to the leader when this replica is not),
//!   and reads of marks come from this replica's state machine.
//! - [`ControllerNode`] answers peers ([`PeerHandler`]), carries Raft RPCs for openraft, and
//!   feeds each newly applied membership view to the engine.
//!
//! Invariants:
//! - A mark is acknowledged to the engine only once the log has committed it.
//! - The engine's view is never older than what this replica has applied: a watcher installs
//!   every new epoch as it is applied (so a controller that stops receiving the log keeps its
//!   old epoch, and holders refuse its requests once they have seen a newer one).

use crate::meta::store::{self, Applied};
use crate::meta::{MetaCommand, MetaResponse, MetaTypes, StoredState};
use crate::peer::wire::{MetaOp, RemoteError, Reply, Request};
use crate::peer::{self, CallError, PeerClient, PeerHandler, PeerLimits};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, Raft};
use raid_engine::cluster::{ClusterEnv, IntentMark, ReadAnswer, RowIntent, VolError, VolumeMeta};
use raid_engine::engine::Engine;
use raid_engine::layout::ControllerId;
use raid_engine::shard::{
    BoxFut, Chunk, ChunkAddr, Patch, RangeRead, ShardError, ShardStore, VolumeId,
};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::net::TcpListener;

/// How one controller finds the others.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This controller's id.
    pub id: ControllerId,
    /// Peer address of every controller, this one included.
    pub peers: BTreeMap<ControllerId, SocketAddr>,
    /// Transport bounds.
    pub limits: PeerLimits,
    /// Membership timers.
    pub timers: MembershipTimers,
    /// Mutual TLS on every peer link (`None`: plaintext, `cluster.tls = false`).
    pub tls: Option<Arc<crate::peer::tls::PeerTls>>,
    /// When this controller scrubs the rows it leads.
    pub scrub: ScrubSchedule,
    /// Whether this controller forms the cluster: it records its config's volumes in the
    /// metadata log. The others serve a volume once the log's record matches their own.
    pub bootstrap: bool,
}

/// Heartbeats, leases and failure detection (`../shared/DESIGN.md` defaults: heartbeat 500 ms,
/// `down_after` 3 s).
#[derive(Debug, Clone, Copy)]
pub struct MembershipTimers {
    /// Interval of heartbeats to every peer.
    pub heartbeat: Duration,
    /// How long a majority's answers keep this controller's lease (must be below
    /// `down_after`, so a cut-off controller stops serving before the others write around it).
    pub lease: Duration,
    /// A controller silent this long is declared down by the metadata leader.
    pub down_after: Duration,
    /// Interval of resync passes (copying marked rows this controller leads).
    pub resync_every: Duration,
    /// A controller down this long is marked out by the metadata leader and its positions are
    /// rebuilt on the others (`None`: only when an operator marks it out).
    pub out_after: Option<Duration>,
    /// Share of time rebuild copies may take (0 < share <= 1): after each batch of rows it
    /// pauses for `batch time * (1 - share) / share`, so host I/O keeps the rest.
    pub rebuild_share: f64,
}

impl Default for MembershipTimers {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            lease: Duration::from_secs(2),
            down_after: Duration::from_secs(3),
            resync_every: Duration::from_secs(1),
            out_after: Some(Duration::from_secs(600)),
            rebuild_share: 0.5,
        }
    }
}

/// When scrubs run: on request (`MetaCommand::RequestScrub`, through the API or CLI) and every
/// `every` since the last pass ended; `pause` is slept after each row so host I/O keeps most
/// of the devices.
#[derive(Debug, Clone, Copy)]
pub struct ScrubSchedule {
    /// Interval between scheduled passes (`None`: on request only).
    pub every: Option<Duration>,
    /// Pause after each row.
    pub pause: Duration,
}

impl Default for ScrubSchedule {
    fn default() -> Self {
        Self {
            every: Some(Duration::from_secs(7 * 24 * 3600)),
            pause: Duration::from_millis(1),
        }
    }
}

/// A scrub as `appliance status` and the API show it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScrubStatus {
    /// The pass running now: rows done and total, rate and time left.
    pub running: Option<ScrubProgress>,
    /// The last pass that finished.
    pub last: Option<ScrubResult>,
    /// Scrub requests from the log this controller has served.
    pub requests_served: u64,
}

/// Moves in progress cluster-wide (rebuild after a controller was marked out), from the
/// metadata log; rate and time left as measured by the controller that answers.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MovesStatus {
    /// Positions (one extent's column each) still being copied.
    pub positions: u64,
    /// Rows of those positions in all.
    pub rows_total: u64,
    /// Rows already copied.
    pub rows_done: u64,
    /// Rows per second since this controller first saw these moves.
    pub rows_per_sec: f64,
    /// Seconds left at that rate.
    pub eta_secs: Option<f64>,
    /// Bytes of one row's chunk summed over positions (for MB/s): rows * chunk bytes.
    pub bytes_done: u64,
    /// What the moves are for: `rebuild`, `drain` or `rebalance` (the first of them if
    /// several kinds run at once).
    #[serde(default)]
    pub kind: String,
}

/// Progress of a running scrub pass.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScrubProgress {
    /// Rows checked.
    pub done: u64,
    /// Rows this controller leads.
    pub total: u64,
    /// Average rate since the pass started.
    pub rows_per_sec: f64,
    /// Seconds left at that rate.
    pub eta_secs: Option<f64>,
}

/// What a finished scrub pass found and did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScrubResult {
    /// When it ended (seconds since the Unix epoch).
    pub finished_unix: u64,
    /// How long it ran.
    pub secs: f64,
    /// Rows checked.
    pub rows: u64,
    /// Copies found damaged (checksum), missing or stale.
    pub bad_chunks: u64,
    /// Chunks rewritten by resync from the pass's start to its end (the bad copies it found,
    /// and any a host write left behind meanwhile).
    pub repaired: u64,
    /// Parity copies that disagreed with their data and were rewritten.
    pub parity_rewritten: u64,
    /// Rows too few holders answered for.
    pub unreadable_rows: u64,
}

/// The other controllers' peer clients: the founding ones from the config, the ones added at
/// run time (`appliance controller add`) from the metadata log as it is applied. Clients are
/// never removed (a controller that left just stops answering).
pub struct Peers {
    me: ControllerId,
    limits: PeerLimits,
    tls: Option<Arc<crate::peer::tls::PeerTls>>,
    map: std::sync::RwLock<BTreeMap<ControllerId, Arc<PeerClient>>>,
}

impl Peers {
    fn new(cfg: &NodeConfig) -> Self {
        let p = Self {
            me: cfg.id,
            limits: cfg.limits,
            tls: cfg.tls.clone(),
            map: std::sync::RwLock::new(BTreeMap::new()),
        };
        for (&id, &addr) in &cfg.peers {
            p.ensure(id, addr);
        }
        p
    }

    /// The client of controller `id`.
    pub fn get(&self, id: ControllerId) -> Option<Arc<PeerClient>> {
        self.map.read().expect("peers").get(&id).cloned()
    }

    /// The client of controller `id`, made for `addr` when there is none yet.
    fn ensure(&self, id: ControllerId, addr: SocketAddr) -> Option<Arc<PeerClient>> {
        if id == self.me {
            return None;
        }
        if let Some(c) = self.get(id) {
            return Some(c);
        }
        let c = PeerClient::new(self.me, addr, self.limits);
        let c = Arc::new(match &self.tls {
            Some(t) => c.with_tls(t, Some(id)),
            None => c,
        });
        self.map
            .write()
            .expect("peers")
            .entry(id)
            .or_insert(c)
            .clone()
            .into()
    }

    /// Every other controller's client, by id.
    pub fn all(&self) -> Vec<(ControllerId, Arc<PeerClient>)> {
        self.map
            .read()
            .expect("peers")
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect()
    }

    /// Ids of every other controller.
    pub fn ids(&self) -> Vec<ControllerId> {
        self.map.read().expect("peers").keys().copied().collect()
    }
}

/// The engine's window on a real cluster.
pub struct NodeEnv {
    me: ControllerId,
    clients: Arc<Peers>,
    engine: OnceLock<Weak<Engine>>,
    raft: OnceLock<Raft<MetaTypes>>,
    applied: Arc<Mutex<Applied>>,
    /// Resync progress per volume (see [`ResyncJob`]).
    jobs: Mutex<BTreeMap<VolumeId, ResyncJob>>,
    /// Volumes this controller does not serve, and why (for status).
    problems: Mutex<BTreeMap<VolumeId, String>>,
    /// Logical units whose reservation state comes from the log, by key.
    luns: Mutex<BTreeMap<u64, Weak<lun::LogicalUnit>>>,
    /// The log index up to which reservation state is installed in those logical units.
    installed: std::sync::atomic::AtomicU64,
    /// The reservation version last installed (`u64::MAX`: none yet).
    installed_version: std::sync::atomic::AtomicU64,
    /// Membership timers (for how long a reservation change waits for the others).
    timers: MembershipTimers,
    /// Where volumes created at run time (recorded in the log, not in the config) go to be
    /// served; unset: such volumes are reported as problems.
    runtime_volumes: OnceLock<tokio::sync::mpsc::UnboundedSender<RuntimeVolume>>,
    /// This controller's live figures (I/O, sessions, portals) for status answers.
    live: OnceLock<LiveSource>,
    /// The access states this controller's ports report (set by
    /// [`ControllerNode::publish_access_states`]), for status answers.
    alua: OnceLock<Arc<lun::alua::AccessStates>>,
    /// Scrub progress and the last result.
    scrub: Mutex<ScrubStatus>,
    /// When the moves now in the log started to be watched here, and the rows copied then
    /// (for the rate and time left in status).
    move_watch: Mutex<Option<(std::time::Instant, u64)>>,
    /// Why this controller's shards are being migrated away before its device fails, once
    /// that was decided (preemptive migration).
    migration: Mutex<Option<String>>,
}

/// A change to the volumes created at run time, for the server to act on.
#[derive(Debug, Clone)]
pub enum RuntimeVolume {
    /// Serve this volume (its record is in the log).
    Serve(crate::meta::VolumeRecord),
    /// Stop serving this volume and delete its shards (its record left the log).
    Drop(u32),
}

/// Produces a controller's live figures (installed by the server, which owns the portals).
pub type LiveSource = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// One volume's resync, as far as this replica of the log shows it: it starts when chunks are
/// behind on reachable holders and ends when none are left. `peak` is the largest such backlog
/// seen since it started, so `peak - behind` is what has been copied (new writes around a
/// holder raise the peak).
#[derive(Debug, Clone, Copy)]
struct ResyncJob {
    started: std::time::Instant,
    peak: usize,
}

impl ResyncJob {
    /// Updates `volume`'s job for a backlog of `behind` chunks on reachable holders at `now`
    /// and returns its progress (none when nothing is behind: the job is over).
    fn track(
        jobs: &mut BTreeMap<VolumeId, ResyncJob>,
        volume: VolumeId,
        behind: usize,
        now: std::time::Instant,
    ) -> Option<ResyncProgress> {
        if behind == 0 {
            jobs.remove(&volume);
            return None;
        }
        let job = jobs.entry(volume).or_insert(ResyncJob {
            started: now,
            peak: behind,
        });
        job.peak = job.peak.max(behind);
        let done = job.peak - behind;
        let secs = now.saturating_duration_since(job.started).as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        Some(ResyncProgress {
            total: job.peak,
            done,
            chunks_per_sec: rate,
            eta_secs: (rate > 0.0).then(|| behind as f64 / rate),
        })
    }
}

/// Health of one volume in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeStatus {
    /// Volume id.
    pub id: VolumeId,
    /// Logical size in bytes.
    pub size_bytes: u64,
    /// `healthy`; `degraded` (a holder is down: reduced redundancy, writes go around it);
    /// `resyncing` (every holder is back; chunks they missed are being copied).
    pub health: String,
    /// Stripe rows with at least one chunk behind.
    pub rows_behind: usize,
    /// Chunks behind, per holder.
    pub chunks_behind: Vec<(ControllerId, usize)>,
    /// The running resync, if chunks are behind on reachable holders.
    pub resync: Option<ResyncProgress>,
}

/// Progress of a running resync.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResyncProgress {
    /// Chunks to copy since the job started (the largest backlog seen).
    pub total: usize,
    /// Chunks copied so far.
    pub done: usize,
    /// Average rate since the job started.
    pub chunks_per_sec: f64,
    /// Seconds left at that rate (none before the first copy).
    pub eta_secs: Option<f64>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("ids", &self.ids()).finish()
    }
}

impl std::fmt::Debug for NodeEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEnv")
            .field("me", &self.me)
            .field("peers", &self.clients.ids())
            .finish()
    }
}

fn vol_err(e: CallError) -> VolError {
    match e {
        CallError::Remote(RemoteError::Epoch { ours, theirs }) => VolError::Epoch { ours, theirs },
        CallError::Remote(RemoteError::NotPrimary(x)) => VolError::NotPrimary(x),
        CallError::Remote(RemoteError::Fenced) => VolError::Fenced,
        other => VolError::Peer(other.to_string()),
    }
}

/// A holder's refusal, as the peer sees it (a stale epoch keeps its figures).
fn shard_remote(e: ShardError) -> RemoteError {
    match e {
        ShardError::StaleEpoch { ours, theirs } => RemoteError::StaleEpoch { ours, theirs },
        e => remote(e),
    }
}

fn shard_err(to: ControllerId, e: CallError) -> ShardError {
    match e {
        CallError::Remote(RemoteError::StaleEpoch { ours, theirs }) => {
            ShardError::StaleEpoch { ours, theirs }
        }
        CallError::Transport { .. } => ShardError::Unreachable(to),
        other => ShardError::Io(other.to_string()),
    }
}

fn unexpected() -> ShardError {
    ShardError::Io("unexpected reply".into())
}

/// A shard request (chunk read, write, ranged read, patch) served by `engine`: what a peer's
/// request reaches, and what this controller's own requests call directly.
async fn serve_shard(engine: &Engine, epoch: u64, req: Request) -> Result<Reply, ShardError> {
    match req {
        Request::ReadChunk(a) => engine.handle_read_chunk(epoch, a).await.map(Reply::Copies),
        Request::WriteChunk(a, c) => engine
            .handle_write_chunk(epoch, a, c)
            .await
            .map(|()| Reply::Done),
        Request::ReadRange(a, read) => engine
            .handle_read_range(epoch, a, read)
            .await
            .map(Reply::Copies),
        Request::PatchChunk(a, patch) => engine
            .handle_patch_chunk(epoch, a, patch)
            .await
            .map(Reply::Data),
        _ => Err(ShardError::Io("not a shard request".into())),
    }
}

impl NodeEnv {
    /// A shard request to controller `to`: this controller's engine directly, another's over
    /// the peer transport.
    async fn shard_call(
        &self,
        to: ControllerId,
        epoch: u64,
        req: Request,
    ) -> Result<Reply, ShardError> {
        if to == self.me {
            let e = self.engine().ok_or(ShardError::Unreachable(to))?;
            return serve_shard(&e, epoch, req).await;
        }
        self.client(to)?
            .call(epoch, req)
            .await
            .map_err(|e| shard_err(to, e))
    }

    /// A forwarded host request to the extent's primary `to`.
    async fn forward_call(
        &self,
        to: ControllerId,
        epoch: u64,
        req: Request,
    ) -> Result<Reply, VolError> {
        let c = self.client(to).map_err(|e| VolError::Peer(e.to_string()))?;
        c.call(epoch, req).await.map_err(vol_err)
    }

    fn engine(&self) -> Option<Arc<Engine>> {
        self.engine.get().and_then(Weak::upgrade)
    }

    fn client(&self, to: ControllerId) -> Result<Arc<PeerClient>, ShardError> {
        self.clients.get(to).ok_or(ShardError::Unreachable(to))
    }

    /// Commits `cmd` to the metadata log: directly when this replica leads, else through the
    /// leader (one retry after a leadership change).
    pub async fn propose(&self, cmd: MetaCommand) -> Result<MetaResponse, VolError> {
        self.propose_at(cmd).await.map(|(_, r)| r)
    }

    /// Like [`Self::propose`], also returning the entry's log index.
    pub async fn propose_at(&self, cmd: MetaCommand) -> Result<(u64, MetaResponse), VolError> {
        let raft = self
            .raft
            .get()
            .ok_or_else(|| VolError::Peer("metadata log not started".into()))?;
        for _ in 0..3 {
            // A leader that lost its majority waits for a commit that cannot come: give up
            // after `down_after`, so the host command that needed it gets NOT READY instead of
            // hanging.
            let write =
                tokio::time::timeout(self.timers.down_after, raft.client_write(cmd.clone()));
            match write.await {
                Err(_) => {
                    return Err(VolError::Peer(
                        "the metadata log did not commit in time: a majority of its members is not reachable".into(),
                    ))
                }
                Ok(Ok(r)) => return Ok((r.log_id.index, r.data)),
                Ok(Err(e)) => {
                    let leader = e
                        .forward_to_leader()
                        .and_then(|f| f.leader_id)
                        .map(|l| l as ControllerId);
                    let Some(leader) = leader.filter(|&l| l != self.me) else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let body =
                        serde_json::to_vec(&cmd).map_err(|e| VolError::Peer(e.to_string()))?;
                    let c = self
                        .client(leader)
                        .map_err(|e| VolError::Peer(e.to_string()))?;
                    match c.call(0, Request::Meta(MetaOp::Write, body)).await {
                        Ok(Reply::Data(d)) => {
                            return serde_json::from_slice(&d)
                                .map_err(|e| VolError::Peer(format!("leader reply: {e}")));
                        }
                        Ok(_) => {
                            return Err(VolError::Peer("leader sent an unexpected reply".into()))
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        }
        Err(VolError::Peer(
            "metadata log has no reachable leader: check that a majority of controllers is up"
                .into(),
        ))
    }

    /// Moves in progress in this replica of the log, with the rate seen here.
    pub fn moves_status(&self) -> Option<MovesStatus> {
        let (positions, rows_total, rows_done, bytes_done, kind) = {
            let a = self.applied.lock().expect("state");
            let kind = a
                .state
                .moves
                .values()
                .map(|m| format!("{:?}", m.reason).to_lowercase())
                .min()
                .unwrap_or_default();
            let mut t = (0u64, 0u64, 0u64, 0u64, kind);
            for ((vol, _, _), m) in &a.state.moves {
                let v = a.state.volumes.get(vol);
                let rows = v.map_or(0, |v| u64::from(v.rows_per_extent));
                let chunk = v.map_or(0, |v| u64::from(v.chunk_bytes));
                t.0 += 1;
                t.1 += rows;
                t.2 += u64::from(m.rows_done).min(rows);
                t.3 += u64::from(m.rows_done).min(rows) * chunk;
            }
            t
        };
        let mut watch = self.move_watch.lock().expect("move watch");
        if positions == 0 {
            *watch = None;
            return None;
        }
        let (since, at) = *watch.get_or_insert((std::time::Instant::now(), rows_done));
        let secs = since.elapsed().as_secs_f64();
        let rate = if secs > 0.5 {
            rows_done.saturating_sub(at) as f64 / secs
        } else {
            0.0
        };
        Some(MovesStatus {
            positions,
            rows_total,
            rows_done,
            rows_per_sec: rate,
            eta_secs: (rate > 0.0).then(|| (rows_total - rows_done) as f64 / rate),
            bytes_done,
            kind,
        })
    }

    /// Write-intent marks of `volume` in this replica.
    pub fn intents_len(&self, volume: VolumeId) -> usize {
        self.marks(volume).len()
    }

    /// Health and resync progress of every volume `engine` serves, from this replica of the
    /// log and its view of membership; updates the progress tracking.
    pub fn volume_status(&self, engine: &Engine) -> Vec<VolumeStatus> {
        use raid_engine::cluster::ControllerState as S;
        let view = engine.view();
        let now = std::time::Instant::now();
        let mut jobs = self.jobs.lock().expect("jobs");
        engine
            .backlog()
            .into_iter()
            .map(|b| {
                let down = b.holders.iter().any(|&c| view.state(c) == S::Down);
                let reachable: usize = b
                    .chunks_by
                    .iter()
                    .filter(|(&c, _)| view.state(c) != S::Down)
                    .map(|(_, n)| n)
                    .sum();
                let resync = ResyncJob::track(&mut jobs, b.volume, reachable, now);
                let health = if down {
                    "degraded"
                } else if b.rows_behind > 0 {
                    "resyncing"
                } else {
                    "healthy"
                };
                VolumeStatus {
                    id: b.volume,
                    size_bytes: b.size_bytes,
                    health: health.into(),
                    rows_behind: b.rows_behind,
                    chunks_behind: b.chunks_by.into_iter().collect(),
                    resync,
                }
            })
            .collect()
    }

    /// Takes the reservation state of `lu` (key `key`) from the log from now on; it refuses
    /// commands until the first install (next pass of the installer, within milliseconds).
    pub fn register_lu(&self, key: u64, lu: &Arc<lun::LogicalUnit>) {
        self.luns
            .lock()
            .expect("luns")
            .insert(key, Arc::downgrade(lu));
        // Make the installer visit every logical unit again.
        self.installed_version
            .store(u64::MAX, std::sync::atomic::Ordering::Release);
    }

    /// Installs the applied reservation state in every registered logical unit when it has
    /// changed, raises the unit attentions of changes applied since, and records the log
    /// index that is now installed.
    fn install_scsi(&self) {
        use std::sync::atomic::Ordering as O;
        let (version, index, states, events) = {
            let mut a = self.applied.lock().expect("state");
            let events = std::mem::take(&mut a.state.scsi_events);
            let version = a.state.scsi_version;
            let states =
                (version != self.installed_version.load(O::Acquire)).then(|| a.state.scsi.clone());
            (version, a.last.map_or(0, |l| l.index), states, events)
        };
        if let Some(states) = states {
            let luns = self.luns.lock().expect("luns").clone();
            for (key, lu) in luns {
                let Some(lu) = lu.upgrade() else { continue };
                let mine: Vec<lun::shared::LuEvents> = events
                    .iter()
                    .filter(|(k, _)| *k == key)
                    .map(|(_, e)| e.clone())
                    .collect();
                lu.install_shared(&states.get(&key).cloned().unwrap_or_default(), &mine);
            }
            self.installed_version.store(version, O::Release);
        }
        self.installed.fetch_max(index, O::AcqRel);
    }

    /// Waits until every controller that may accept I/O (up in this view) has installed the
    /// reservation state up to log `index`. One that has not confirmed within `down_after` is
    /// declared down, and the wait goes on for a lease period (its lease cannot be renewed
    /// while it is down: peers refuse its heartbeats), so it serves nothing older.
    async fn await_installed(&self, index: u64) -> Result<(), lun::SenseReason> {
        use raid_engine::cluster::ControllerState as S;
        use std::sync::atomic::Ordering as O;
        let engine = self
            .engine()
            .ok_or(lun::SenseReason::NotReadyTransitioning)?;
        let deadline = tokio::time::Instant::now() + self.timers.down_after;
        loop {
            let view = engine.view();
            let mut behind = Vec::new();
            for (&id, &st) in &view.controllers {
                if st != S::Up {
                    continue;
                }
                let done = if id == self.me {
                    self.installed.load(O::Acquire) >= index
                } else {
                    let Ok(c) = self.client(id) else { continue };
                    match tokio::time::timeout(
                        self.timers.heartbeat,
                        c.call(0, Request::Meta(MetaOp::Installed, Vec::new())),
                    )
                    .await
                    {
                        Ok(Ok(Reply::Data(d))) => {
                            serde_json::from_slice::<u64>(&d).is_ok_and(|i| i >= index)
                        }
                        _ => false,
                    }
                };
                if !done {
                    behind.push(id);
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                if behind.contains(&self.me) {
                    return Err(lun::SenseReason::NotReadyTransitioning);
                }
                for id in behind {
                    tracing::warn!(
                        controller = id,
                        index,
                        "did not confirm a reservation change in time; declaring it down"
                    );
                    let _ = self
                        .propose(MetaCommand::SetState {
                            id,
                            state: StoredState::Down,
                        })
                        .await;
                }
                tokio::time::sleep(self.timers.lease + self.timers.heartbeat).await;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Volumes this controller does not serve, and why.
    pub fn problems(&self) -> Vec<String> {
        self.problems
            .lock()
            .expect("problems")
            .values()
            .cloned()
            .collect()
    }

    /// The write-intent marks of `volume` in this replica.
    pub fn marks(&self, volume: VolumeId) -> Vec<IntentMark> {
        self.applied.lock().expect("state").state.marks(volume)
    }

    async fn propose_checked(&self, cmd: MetaCommand) -> Result<(), VolError> {
        match self.propose(cmd).await? {
            MetaResponse::Ok { .. } | MetaResponse::Scsi(_) => Ok(()),
            MetaResponse::StaleEpoch { ours, theirs } => Err(VolError::Epoch { ours, theirs }),
            MetaResponse::Refused(why) => Err(VolError::Peer(why)),
        }
    }
}

impl lun::shared::SharedScsi for NodeEnv {
    fn submit(&self, lu: u64, change: lun::shared::ScsiChange) -> lun::shared::ChangeFuture<'_> {
        use lun::SenseReason as R;
        Box::pin(async move {
            let engine = self.engine().ok_or(R::NotReadyTransitioning)?;
            if engine.is_fenced() {
                return Err(R::NotReadyUnavailable);
            }
            let epoch = engine.view().epoch;
            let (index, resp) = self
                .propose_at(MetaCommand::Scsi { lu, change, epoch })
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "reservation change not ordered; the host retries");
                    R::NotReadyTransitioning
                })?;
            let outcome = match resp {
                MetaResponse::Scsi(o) => o,
                MetaResponse::StaleEpoch { .. } => return Err(R::NotReadyTransitioning),
                MetaResponse::Ok { .. } | MetaResponse::Refused(_) => {
                    return Err(R::InternalTargetFailure)
                }
            };
            self.await_installed(index).await?;
            Ok(outcome)
        })
    }
}

impl ClusterEnv for NodeEnv {
    fn read_chunk(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        Box::pin(async move {
            match self.shard_call(to, epoch, Request::ReadChunk(addr)).await? {
                Reply::Copies(c) => Ok(c),
                _ => Err(unexpected()),
            }
        })
    }
    fn write_chunk(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
        chunk: Chunk,
    ) -> BoxFut<'_, Result<(), ShardError>> {
        Box::pin(async move {
            self.shard_call(to, epoch, Request::WriteChunk(addr, chunk))
                .await
                .map(|_| ())
        })
    }
    fn read_range(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
        read: RangeRead,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        Box::pin(async move {
            match self
                .shard_call(to, epoch, Request::ReadRange(addr, read))
                .await?
            {
                Reply::Copies(c) => Ok(c),
                _ => Err(unexpected()),
            }
        })
    }
    fn patch_chunk(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
        patch: Patch,
    ) -> BoxFut<'_, Result<Vec<u8>, ShardError>> {
        Box::pin(async move {
            match self
                .shard_call(to, epoch, Request::PatchChunk(addr, patch))
                .await?
            {
                Reply::Data(old) => Ok(old),
                _ => Err(unexpected()),
            }
        })
    }
    fn forward_write(
        &self,
        to: ControllerId,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'_, Result<(), VolError>> {
        Box::pin(async move {
            let req = Request::ForwardWrite {
                volume,
                offset,
                data,
            };
            self.forward_call(to, epoch, req).await.map(|_| ())
        })
    }
    fn forward_locate(
        &self,
        to: ControllerId,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> BoxFut<'_, Result<ReadAnswer, VolError>> {
        Box::pin(async move {
            let len = u32::try_from(len).map_err(|_| VolError::OutOfRange { offset, len })?;
            let req = Request::ForwardLocate {
                volume,
                offset,
                len,
            };
            match self.forward_call(to, epoch, req).await? {
                Reply::Answer(a) => Ok(a),
                _ => Err(VolError::Peer("unexpected reply".into())),
            }
        })
    }
    fn forward_read(
        &self,
        to: ControllerId,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> BoxFut<'_, Result<Vec<u8>, VolError>> {
        Box::pin(async move {
            let len = u32::try_from(len).map_err(|_| VolError::OutOfRange { offset, len })?;
            let req = Request::ForwardRead {
                volume,
                offset,
                len,
            };
            match self.forward_call(to, epoch, req).await? {
                Reply::Data(d) => Ok(d),
                _ => Err(VolError::Peer("unexpected reply".into())),
            }
        })
    }
    fn mark_intent(
        &self,
        mark: IntentMark,
        missed: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        Box::pin(self.propose_checked(MetaCommand::Mark {
            mark: (mark.volume, mark.extent, mark.row, mark.pos),
            missed,
            epoch,
        }))
    }
    fn clear_intent(
        &self,
        mark: IntentMark,
        upto: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        Box::pin(self.propose_checked(MetaCommand::Clear {
            mark: (mark.volume, mark.extent, mark.row, mark.pos),
            upto,
            epoch,
        }))
    }
    fn intents(&self, volume: VolumeId) -> Vec<IntentMark> {
        self.applied.lock().expect("state").state.marks(volume)
    }
    fn row_intent(&self, volume: VolumeId, extent: u64, row: u32) -> RowIntent {
        let a = self.applied.lock().expect("state");
        let s = &a.state;
        let (marked, floor) = s
            .intents
            .range((volume, extent, row, 0)..=(volume, extent, row, u8::MAX))
            .fold((0u32, 0u64), |(m, f), (k, v)| (m | 1 << k.3, f.max(*v)));
        RowIntent {
            marked,
            floor,
            repair: s.repairs.get(&(volume, extent, row)).cloned(),
            served: s.served.get(&(volume, extent, row)).copied().unwrap_or(0),
            moving: s.moving(volume, extent, row),
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
        Box::pin(self.propose_checked(MetaCommand::Served {
            row: (volume, extent, row),
            content,
            epoch,
        }))
    }
    fn sleep(&self, d: Duration) -> BoxFut<'_, ()> {
        Box::pin(tokio::time::sleep(d))
    }
    fn read_lease_ttl(&self) -> Option<Duration> {
        read_lease(&self.timers)
    }
    fn wait_until(&self, t: std::time::Instant) -> BoxFut<'_, ()> {
        Box::pin(tokio::time::sleep_until(t.into()))
    }
    fn revoke_leases(
        &self,
        to: ControllerId,
        epoch: u64,
        volume: VolumeId,
        extent: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        Box::pin(async move {
            self.forward_call(to, epoch, Request::RevokeLeases { volume, extent })
                .await
                .map(|_| ())
        })
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
        Box::pin(self.propose_checked(MetaCommand::Repair {
            row: (volume, extent, row),
            cols,
            upto,
            epoch,
        }))
    }
}

/// Raft RPCs over the peer transport.
#[derive(Debug, Clone)]
struct RaftNet {
    clients: Arc<Peers>,
}

struct RaftConn {
    client: Option<Arc<PeerClient>>,
}

impl RaftNetworkFactory<MetaTypes> for RaftNet {
    type Network = RaftConn;
    async fn new_client(&mut self, target: u64, node: &BasicNode) -> RaftConn {
        // A controller added at run time is known by the address its membership entry
        // carries until the applied state records it.
        let id = u32::try_from(target).ok();
        let client = id.and_then(|t| {
            self.clients.get(t).or_else(|| {
                node.addr
                    .parse()
                    .ok()
                    .and_then(|a| self.clients.ensure(t, a))
            })
        });
        RaftConn { client }
    }
}

fn unreachable<E: std::error::Error>(what: impl ToString) -> RPCError<u64, BasicNode, E> {
    let e = std::io::Error::other(what.to_string());
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftConn {
    async fn rpc<Req: serde::Serialize, Resp: serde::de::DeserializeOwned, E>(
        &self,
        op: MetaOp,
        req: &Req,
    ) -> Result<Result<Resp, E>, RPCError<u64, BasicNode, E>>
    where
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let c = self
            .client
            .as_ref()
            .ok_or_else(|| unreachable("no such peer"))?;
        let body = serde_json::to_vec(req).map_err(unreachable)?;
        match c.call(0, Request::Meta(op, body)).await {
            Ok(Reply::Data(d)) => serde_json::from_slice(&d).map_err(unreachable),
            Ok(_) => Err(unreachable("unexpected reply")),
            Err(e) => Err(unreachable(e)),
        }
    }
}

impl RaftNetwork<MetaTypes> for RaftConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<MetaTypes>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.rpc(MetaOp::Append, &rpc)
            .await?
            .map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(0, e)))
    }
    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<MetaTypes>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.rpc(MetaOp::Snapshot, &rpc)
            .await?
            .map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(0, e)))
    }
    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.rpc(MetaOp::Vote, &rpc)
            .await?
            .map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(0, e)))
    }
}

/// One running controller.
pub struct ControllerNode {
    /// Id.
    pub id: ControllerId,
    /// The data path.
    pub engine: Arc<Engine>,
    /// The engine's environment (also used to propose membership changes).
    pub env: Arc<NodeEnv>,
    raft: Raft<MetaTypes>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The metadata store, to wait for its closing at shutdown.
    database: std::sync::Weak<redb::Database>,
}

impl std::fmt::Debug for ControllerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerNode")
            .field("id", &self.id)
            .finish()
    }
}

fn remote(e: impl std::fmt::Display) -> RemoteError {
    RemoteError::Other(e.to_string())
}

fn vol_remote(e: VolError) -> RemoteError {
    match e {
        VolError::Epoch { ours, theirs } => RemoteError::Epoch { ours, theirs },
        VolError::NotPrimary(x) => RemoteError::NotPrimary(x),
        VolError::Fenced => RemoteError::Fenced,
        other => RemoteError::Other(other.to_string()),
    }
}

/// Heartbeats every peer, renews this controller's lease while a majority answers, and — on
/// the metadata leader — turns silence and return into membership changes: silent past
/// `down_after` → down; answering again → resyncing; nothing left to copy → up.
async fn membership(
    cfg: NodeConfig,
    engine: Weak<Engine>,
    env: Arc<NodeEnv>,
    raft: Raft<MetaTypes>,
) {
    use raid_engine::cluster::ControllerState as S;
    use tokio::time::Instant;
    let t = cfg.timers;
    let started = Instant::now();
    let mut last_ok: BTreeMap<ControllerId, Instant> =
        cfg.peers.keys().map(|&id| (id, started)).collect();
    let mut out_refused = std::collections::BTreeSet::new();
    let mut plan_refused = String::new();
    loop {
        tokio::time::sleep(t.heartbeat).await;
        let Some(engine) = engine.upgrade() else {
            break;
        };
        let epoch = engine.view().epoch;
        // Controllers added at run time are watched from when this replica first knows them.
        let peers = env.clients.all();
        for (id, _) in &peers {
            last_ok.entry(*id).or_insert_with(Instant::now);
        }
        // Leases count from when the heartbeats left, not from when the answers arrived.
        let sent = Instant::now();
        let beats = peers.iter().map(|(id, c)| async move {
            let id = *id;
            let ok = tokio::time::timeout(t.heartbeat * 2, c.call(epoch, Request::Heartbeat))
                .await
                .is_ok_and(|r| r.is_ok());
            (id, ok)
        });
        let results = futures::future::join_all(beats).await;
        let now = Instant::now();
        for (id, ok) in results {
            if ok {
                last_ok.insert(id, sent);
            }
        }
        last_ok.insert(cfg.id, sent);
        // The majority is of the members that still vote: controllers marked out leave the
        // metadata log (below), so they count neither way. A controller that is out itself
        // (drained, or marked out while it still runs) serves nothing: no lease.
        let (members, me_out) = {
            let a = env.applied.lock().expect("state");
            let all: std::collections::BTreeSet<ControllerId> = cfg
                .peers
                .keys()
                .chain(a.state.controllers.keys())
                .copied()
                .collect();
            let members: Vec<ControllerId> = all
                .into_iter()
                .filter(|id| a.state.controllers.get(id) != Some(&StoredState::Out))
                .collect();
            (
                members,
                a.state.controllers.get(&cfg.id) == Some(&StoredState::Out),
            )
        };
        let majority = members.len() / 2 + 1;
        let answering = members
            .iter()
            .filter(|id| last_ok.get(id) == Some(&sent))
            .count();
        if answering >= majority && !me_out {
            engine.renew_lease((sent + t.lease).into_std());
        }
        if raft.metrics().borrow().current_leader == Some(u64::from(cfg.id)) {
            let view = engine.view();
            let stored = env.applied.lock().expect("state").state.controllers.clone();
            for (&id, &at) in &last_ok {
                let silent = now.duration_since(at);
                if stored.get(&id) == Some(&StoredState::Out) {
                    continue; // gone for good: it does not come back by answering
                }
                if view.state(id) == S::Down && t.out_after.is_some_and(|o| silent > o) {
                    let why = env.applied.lock().expect("state").state.check_mark_out(id);
                    match why {
                        Ok(()) => {
                            tracing::warn!(controller = id, silent_secs = silent.as_secs(), "controller down longer than out_after: marking it out; its shards are rebuilt on the others");
                            if let Err(e) = env.propose(MetaCommand::MarkOut { id }).await {
                                tracing::warn!(controller = id, error = %e, "mark-out not committed");
                            }
                        }
                        Err(why) => {
                            if out_refused.insert(id) {
                                tracing::error!(controller = id, "controller down longer than out_after but cannot be marked out: {why}");
                            }
                        }
                    }
                    continue;
                }
                let next = match view.state(id) {
                    S::Up | S::Resyncing if silent > t.down_after => Some(StoredState::Down),
                    S::Down if silent < t.heartbeat * 3 => Some(StoredState::Resyncing),
                    S::Resyncing if engine.marks_held_by(id) == 0 => Some(StoredState::Up),
                    _ => None,
                };
                if let Some(state) = next {
                    tracing::info!(controller = id, ?state, "membership change");
                    if let Err(e) = env.propose(MetaCommand::SetState { id, state }).await {
                        tracing::warn!(controller = id, error = %e, "membership change not committed");
                    }
                }
            }
            // Controllers marked out stop voting in the metadata log, so that the remaining
            // ones keep a majority when more fail.
            let voters = log_voters(&raft);
            let keep: std::collections::BTreeSet<u64> = voters
                .iter()
                .copied()
                .filter(|&v| {
                    u32::try_from(v).is_ok_and(|id| {
                        env.applied
                            .lock()
                            .expect("state")
                            .state
                            .controllers
                            .get(&id)
                            != Some(&StoredState::Out)
                    })
                })
                .collect();
            if keep.len() < voters.len() && !keep.is_empty() {
                tracing::warn!(
                    ?keep,
                    "removing controllers marked out from the metadata log's voters"
                );
                if let Err(e) = set_log_voters(&raft, keep, t.down_after).await {
                    tracing::warn!(error = %e, "metadata log membership change not done; retrying");
                }
            }
            join_metadata_log(&env, &raft, &voters, t.down_after).await;
            // Drained controllers (nothing left on them) are out.
            let drained = env.applied.lock().expect("state").state.drained();
            for id in drained {
                // It leaves the log's voters first, so that by the time any replica shows it
                // out (an operator's cue to stop its process) it no longer counts towards the
                // log's majority.
                let mut voters = log_voters(&raft);
                if voters.remove(&u64::from(id)) {
                    if voters.is_empty() {
                        continue;
                    }
                    tracing::info!(
                        controller = id,
                        "drained controller leaves the metadata log's voters"
                    );
                    if let Err(e) = set_log_voters(&raft, voters, t.down_after).await {
                        tracing::warn!(controller = id, error = %e, "drained controller still votes; retrying");
                        continue;
                    }
                }
                tracing::warn!(
                    controller = id,
                    "controller drained: it holds nothing any more and leaves the cluster"
                );
                let cmd = MetaCommand::SetState {
                    id,
                    state: StoredState::Out,
                };
                if let Err(e) = env.propose(cmd).await {
                    tracing::warn!(controller = id, error = %e, "drained controller not yet out");
                }
            }
            // Drains, then rebalancing, a few positions at a time.
            let (drain, rebalance, epoch) = {
                let a = env.applied.lock().expect("state");
                (
                    a.state.plan_drain(),
                    a.state.plan_rebalance(),
                    a.state.epoch,
                )
            };
            let planned = match drain {
                Ok(moves) if !moves.is_empty() => Some((moves, crate::meta::MoveReason::Drain)),
                Ok(_) => (!rebalance.is_empty())
                    .then_some((rebalance, crate::meta::MoveReason::Rebalance)),
                Err(why) => {
                    if plan_refused != why {
                        tracing::error!("drain cannot be planned: {why}");
                        plan_refused = why;
                    }
                    None
                }
            };
            if let Some((moves, reason)) = planned {
                tracing::info!(positions = moves.len(), ?reason, "moving positions");
                let cmd = MetaCommand::Move {
                    moves,
                    reason,
                    epoch,
                };
                match env.propose(cmd).await {
                    Ok(MetaResponse::Ok { .. }) => {}
                    other => tracing::info!(?other, "move plan not applied; planning again"),
                }
            }
            // Positions of controllers marked out get new holders (rebuild).
            let (plan, epoch) = {
                let a = env.applied.lock().expect("state");
                (a.state.plan_rebuild(), a.state.epoch)
            };
            match plan {
                Ok(moves) if moves.is_empty() => plan_refused.clear(),
                Ok(moves) => {
                    tracing::warn!(
                        positions = moves.len(),
                        "rebuild: moving the positions of controllers marked out to the survivors"
                    );
                    let cmd = MetaCommand::Move {
                        moves,
                        reason: crate::meta::MoveReason::Rebuild,
                        epoch,
                    };
                    match env.propose(cmd).await {
                        Ok(MetaResponse::Ok { .. }) => {}
                        other => tracing::info!(?other, "rebuild plan not applied; planning again"),
                    }
                }
                Err(why) => {
                    if plan_refused != why {
                        tracing::error!("rebuild cannot be planned: {why}");
                        plan_refused = why;
                    }
                }
            }
        }
    }
}

/// The controllers voting in the metadata log, as this replica knows them.
fn log_voters(raft: &Raft<MetaTypes>) -> std::collections::BTreeSet<u64> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

/// Makes `voters` the metadata log's voters (the leader's job), giving up after `within`.
async fn set_log_voters(
    raft: &Raft<MetaTypes>,
    voters: std::collections::BTreeSet<u64>,
    within: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(within, raft.change_membership(voters, false)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("not committed within {within:?}")),
    }
}

/// On the metadata leader: controllers added at run time join the log, as learners as soon
/// as they are recorded (they catch up on the log), as voters once they are up (a voter
/// that cannot answer would only lower the log's tolerance of failures).
async fn join_metadata_log(
    env: &NodeEnv,
    raft: &Raft<MetaTypes>,
    voters: &std::collections::BTreeSet<u64>,
    wait: Duration,
) {
    let (added, states) = {
        let a = env.applied.lock().expect("state");
        (a.state.members.clone(), a.state.controllers.clone())
    };
    for (id, addr) in added {
        let node = u64::from(id);
        let state = states.get(&id).copied();
        if voters.contains(&node) || state == Some(StoredState::Out) {
            continue;
        }
        let known = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node)
            .is_some();
        if !known {
            tracing::info!(controller = id, %addr, "adding the new controller to the metadata log (learner)");
            let add = raft.add_learner(node, BasicNode::new(addr), false);
            match tokio::time::timeout(wait, add).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(controller = id, error = %e, "learner not added; retrying")
                }
                Err(_) => tracing::warn!(controller = id, "adding the learner timed out; retrying"),
            }
            continue;
        }
        if state == Some(StoredState::Up) {
            let mut all = voters.clone();
            all.insert(node);
            tracing::info!(
                controller = id,
                "the new controller votes in the metadata log"
            );
            match tokio::time::timeout(wait, raft.change_membership(all, false)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(controller = id, error = %e, "voter not added; retrying")
                }
                Err(_) => tracing::warn!(controller = id, "adding the voter timed out; retrying"),
            }
        }
    }
}

/// Serves the volumes of this controller's config once the metadata log agrees on them: the
/// bootstrap controller records each in the log (the first record of an id wins, so a
/// misconfigured controller joining later cannot redefine one), and each is served only if the log's
/// record is the same as ours, geometry, codec and placement included (they are an on-disk
/// format; serving a different one would write chunks the others cannot read). A difference,
/// or a volume the log has and the config lacks, is logged with the fix and shown in status.
async fn adopt_volumes(
    wanted: Vec<(String, VolumeMeta)>,
    define: bool,
    engine: Weak<Engine>,
    env: Arc<NodeEnv>,
) {
    let mut pending: Vec<crate::meta::VolumeRecord> = wanted
        .iter()
        .map(|(name, meta)| crate::meta::VolumeRecord::new(name, meta))
        .collect();
    let mut foreign_reported = std::collections::BTreeSet::new();
    let mut runtime_served = std::collections::BTreeSet::new();
    let mut proposed = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        let Some(engine) = engine.upgrade() else {
            break;
        };
        let in_log = env.applied.lock().expect("state").state.volumes.clone();
        let mut propose = Vec::new();
        pending.retain(|ours| {
            let Some(theirs) = in_log.get(&ours.id) else {
                propose.push(ours.clone());
                return true;
            };
            // A controller added at run time takes the log's placement (its config's peers
            // are not the founding set the placement was computed from).
            let joined = env
                .applied
                .lock()
                .expect("state")
                .state
                .members
                .contains_key(&env.me);
            let mut ours_cmp = ours.clone();
            if joined {
                ours_cmp.placement.clone_from(&theirs.placement);
            }
            let diff = ours_cmp.differences(theirs);
            let outcome = if diff.is_empty() {
                theirs
                    .meta()
                    .and_then(|m| engine.add_volume(m).map_err(|e| e.to_string()))
            } else {
                Err(format!(
                    "volume {}: this controller's config differs from the cluster's record ({}); make its [[volume]] and [cluster] settings match the other controllers' and restart it",
                    ours.name,
                    diff.join("; ")
                ))
            };
            match outcome {
                Ok(()) => tracing::info!(volume = %ours.name, id = ours.id, "serving volume (as recorded in the metadata log)"),
                Err(e) => {
                    tracing::error!("{e}");
                    env.problems.lock().expect("problems").insert(ours.id, e);
                }
            }
            false
        });
        // Run-time volumes whose record left the log (deleted): stop serving them.
        if let Some(tx) = env.runtime_volumes.get() {
            let gone: Vec<u32> = runtime_served
                .iter()
                .filter(|id| !in_log.contains_key(id))
                .copied()
                .collect();
            for id in gone {
                runtime_served.remove(&id);
                foreign_reported.remove(&id);
                let _ = tx.send(RuntimeVolume::Drop(id));
            }
        }
        for (id, v) in &in_log {
            if wanted.iter().any(|(_, m)| m.id == *id) {
                continue;
            }
            // Created at run time (through the API): served by every controller from the
            // log's record alone, once the server listens for such volumes.
            if v.lun.is_some() {
                if let Some(tx) = env.runtime_volumes.get() {
                    if foreign_reported.insert(*id) {
                        let _ = tx.send(RuntimeVolume::Serve(v.clone()));
                        runtime_served.insert(*id);
                    }
                }
                continue;
            }
            if foreign_reported.insert(*id) {
                let e = format!(
                    "volume {} is in the cluster but not in this controller's config; add the same [[volume]] entry as on the other controllers and restart it",
                    v.name
                );
                tracing::warn!("{e}");
                env.problems.lock().expect("problems").insert(*id, e);
            }
        }
        drop(engine);
        if define && !propose.is_empty() && proposed.elapsed() > Duration::from_secs(1) {
            proposed = std::time::Instant::now();
            for v in propose {
                if let Err(e) = env.propose(MetaCommand::CreateVolume(v)).await {
                    tracing::debug!(error = %e, "volume not yet recorded (metadata log not ready)");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resync passes for the extents this controller leads, in their own task so a long pass
/// never delays heartbeats (and with them this controller's lease). Each pass also updates
/// the progress figures `appliance status` shows.
async fn resync_loop(every: Duration, engine: Weak<Engine>, env: Arc<NodeEnv>) {
    loop {
        tokio::time::sleep(every).await;
        let Some(engine) = engine.upgrade() else {
            break;
        };
        env.volume_status(&engine);
        match engine.resync().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(chunks = n, "resync copied chunks"),
            Err(e) => tracing::debug!(error = %e, "resync pass stopped"),
        }
        env.volume_status(&engine);
    }
}

/// Scrub passes over the rows this controller leads: when the log holds more scrub requests
/// than this controller has served, or when the schedule says so. A pass ends with a resync,
/// which rewrites the copies it found bad.
async fn scrub_loop(schedule: ScrubSchedule, engine: Weak<Engine>, env: Arc<NodeEnv>) {
    let mut last_end = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let requested = env.applied.lock().expect("state").state.scrub_requests;
        let served = env.scrub.lock().expect("scrub").requests_served;
        let due = schedule.every.is_some_and(|e| last_end.elapsed() >= e);
        if requested <= served && !due {
            continue;
        }
        let Some(engine) = engine.upgrade() else {
            break;
        };
        let started = std::time::Instant::now();
        let copied_before = engine.stats().resync_chunks;
        tracing::info!(requested, "scrub started");
        let (env2, pause) = (env.clone(), schedule.pause);
        let after_row = move |done: u64, total: u64| -> BoxFut<'static, ()> {
            let secs = started.elapsed().as_secs_f64();
            let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
            env2.scrub.lock().expect("scrub").running = Some(ScrubProgress {
                done,
                total,
                rows_per_sec: rate,
                eta_secs: (rate > 0.0).then(|| (total - done) as f64 / rate),
            });
            Box::pin(tokio::time::sleep(pause))
        };
        let result = engine.scrub(&after_row).await;
        env.scrub.lock().expect("scrub").running = None;
        let counts = match result {
            Ok(c) => c,
            Err(e) => {
                // An epoch change: the next turn starts over with the new view.
                tracing::info!(error = %e, "scrub pass stopped; it will start again");
                drop(engine);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Repair what the pass marked now (the resync loop would too, within a second).
        for _ in 0..5 {
            match engine.resync().await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "resync after scrub stopped");
                    break;
                }
            }
        }
        let repaired = engine.stats().resync_chunks - copied_before;
        let r = ScrubResult {
            finished_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            secs: started.elapsed().as_secs_f64(),
            rows: counts.rows,
            bad_chunks: counts.bad_chunks,
            repaired,
            parity_rewritten: counts.parity_rewritten,
            unreadable_rows: counts.unreadable_rows,
        };
        if r.bad_chunks + r.parity_rewritten + r.unreadable_rows > 0 {
            tracing::warn!(
                rows = r.rows,
                bad_chunks = r.bad_chunks,
                repaired = r.repaired,
                parity_rewritten = r.parity_rewritten,
                unreadable_rows = r.unreadable_rows,
                "scrub finished: found damage"
            );
        } else {
            tracing::info!(rows = r.rows, secs = r.secs, "scrub finished: no damage");
        }
        let mut st = env.scrub.lock().expect("scrub");
        st.last = Some(r);
        st.requests_served = st.requests_served.max(requested);
        last_end = std::time::Instant::now();
    }
}

/// Rows copied per step of a move; progress is committed to the log after each.
const MOVE_BATCH: u32 = 64;

/// The longest read lease (raid_engine::lease): a controller that does not lead an extent
/// reads its rows from their holders without asking the primary for this long.
const READ_LEASE_MAX: Duration = Duration::from_secs(1);

/// How long read leases last with these timers: at most [`READ_LEASE_MAX`] and at most the
/// gap between a controller's own lease running out and the others declaring it down, so the
/// read leases a failed primary granted have run out by the time its extents get a new
/// primary. It is also how long a controller that newly leads an extent (or restarted) waits
/// before serving it, and the longest a write waits for a lessee that does not answer its
/// revocation. `None` (no read leases) when that gap is zero.
fn read_lease(t: &MembershipTimers) -> Option<Duration> {
    Some(READ_LEASE_MAX.min(t.down_after.saturating_sub(t.lease))).filter(|d| !d.is_zero())
}

/// Copies the rows of moved positions (rebuild) whose extents this controller leads, batch by
/// batch, recording each batch in the metadata log; pauses after each batch so the copies
/// take at most `share` of the time.
async fn move_loop(share: f64, engine: Weak<Engine>, env: Arc<NodeEnv>) {
    let share = share.clamp(0.01, 1.0);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(engine) = engine.upgrade() else {
            break;
        };
        let view = engine.view();
        let (moves, rows_per) = {
            let a = env.applied.lock().expect("state");
            let rows: BTreeMap<u32, u32> = a
                .state
                .volumes
                .iter()
                .map(|(id, v)| (*id, v.rows_per_extent))
                .collect();
            (a.state.moves.clone(), rows)
        };
        let mine: Vec<_> = moves
            .into_iter()
            .filter(|((vol, extent, _), m)| {
                view.reachable(m.to)
                    && engine.placement(*vol).is_some_and(|p| {
                        p.get(*extent as usize)
                            .is_some_and(|set| view.primary(set) == Some(env.me))
                    })
            })
            .collect();
        for (key, m) in mine {
            let rows = rows_per.get(&key.0).copied().unwrap_or(0);
            let mut done = m.rows_done;
            while done < rows {
                let end = (done + MOVE_BATCH).min(rows);
                let t0 = std::time::Instant::now();
                let copied = engine
                    .copy_moved(key.0, key.1, usize::from(key.2), done..end)
                    .await;
                let elapsed = t0.elapsed();
                if let Err(e) = copied {
                    tracing::info!(?key, error = %e, "move copy stopped; it resumes from the last recorded row");
                    break;
                }
                let cmd = MetaCommand::MoveProgress {
                    key,
                    to: m.to,
                    rows_done: end,
                    epoch: view.epoch,
                };
                if !matches!(env.propose(cmd).await, Ok(MetaResponse::Ok { .. })) {
                    break; // an epoch change: start again under the new view
                }
                done = end;
                tokio::time::sleep(elapsed.mul_f64((1.0 - share) / share)).await;
            }
            if done >= rows {
                tracing::info!(
                    volume = key.0,
                    extent = key.1,
                    pos = key.2,
                    to = m.to,
                    "moved position copied"
                );
            }
        }
    }
}

/// Answers peers on behalf of a node (holds only what it needs, so the node can shut down).
struct Handler {
    engine: Arc<Engine>,
    raft: Raft<MetaTypes>,
    env: Arc<NodeEnv>,
}

/// What the operator API needs of a node: its status, its peers' and the volume records.
#[derive(Clone)]
pub struct NodeHandle {
    engine: Arc<Engine>,
    env: Arc<NodeEnv>,
    raft: Raft<MetaTypes>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("id", &self.env.me)
            .finish()
    }
}

impl NodeHandle {
    /// The data path (to serve a volume created at run time).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// The node's environment (the shared SCSI state of its logical units).
    pub fn env(&self) -> Arc<NodeEnv> {
        self.env.clone()
    }

    /// This controller's status, as `appliance status` shows it.
    pub fn status(&self) -> StatusReport {
        status_of(&self.engine, &self.env, &self.raft)
    }

    /// Every other controller's status, asked over the peer transport (at most `wait` each,
    /// all at once), with the round trip; a controller that does not answer gets the reason.
    pub async fn peer_statuses(&self, wait: Duration) -> Vec<PeerStatus> {
        let peers = self.env.clients.all();
        let asks = peers.iter().map(|(id, c)| async move {
            let t0 = std::time::Instant::now();
            let r =
                tokio::time::timeout(wait, c.call(0, Request::Meta(MetaOp::Status, Vec::new())))
                    .await;
            let report = match r {
                Err(_) => Err(format!("no answer within {} ms", wait.as_millis())),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(Reply::Data(d))) => {
                    serde_json::from_slice(&d).map_err(|e| format!("unreadable status: {e}"))
                }
                Ok(Ok(_)) => Err("unexpected reply".to_string()),
            };
            PeerStatus {
                id: *id,
                report,
                rtt: t0.elapsed(),
            }
        });
        futures::future::join_all(asks).await
    }

    /// Marks controller `id` out: its positions are rebuilt on the others. `Err((true, why))`
    /// when the cluster refuses (not a member, already out, too few controllers would remain);
    /// `Err((false, why))` when the metadata log could not be reached.
    pub async fn mark_out(&self, id: u32) -> Result<(), (bool, String)> {
        self.check_leaving(id, "marking")?;
        self.operator_change(MetaCommand::MarkOut { id }).await
    }

    /// Whether `id` may leave (be marked out or drained), worded for `action`.
    fn check_leaving(&self, id: u32, action: &str) -> Result<(), (bool, String)> {
        let check = self
            .env
            .applied
            .lock()
            .expect("state")
            .state
            .check_mark_out(id);
        check.map_err(|why| (true, why.replace("marking", action)))
    }

    /// Records controller `id` (peer address `peer`) as a new member: it joins the metadata
    /// log and positions are rebalanced onto it once it is up. Errors as for
    /// [`NodeHandle::mark_out`].
    pub async fn add_controller(&self, id: u32, peer: String) -> Result<(), (bool, String)> {
        self.operator_change(MetaCommand::AddController { id, peer })
            .await
    }

    /// Drains controller `id`: its positions move to the others while it serves, then it is
    /// out. Errors as for [`NodeHandle::mark_out`].
    pub async fn drain(&self, id: u32) -> Result<(), (bool, String)> {
        self.check_leaving(id, "draining")?;
        self.operator_change(MetaCommand::Drain { id }).await
    }

    /// Preemptive migration: drains this controller because its device is failing (`why`,
    /// for status and the log). Errors as for [`NodeHandle::mark_out`]; a refusal (too few
    /// controllers) can be retried later.
    pub async fn migrate_away(&self, why: String) -> Result<(), (bool, String)> {
        let me = self.env.me;
        let state = self
            .env
            .applied
            .lock()
            .expect("state")
            .state
            .controllers
            .get(&me)
            .copied();
        if matches!(state, Some(StoredState::Draining | StoredState::Out)) {
            return Ok(());
        }
        self.drain(me).await?;
        tracing::error!(controller = me, "preemptive migration: {why}; draining this controller's shards to the others before its device fails");
        *self.env.migration.lock().expect("migration") = Some(why);
        Ok(())
    }

    /// Whether controller `id` has left the cluster (drained or marked out).
    pub fn has_left(&self, id: u32) -> bool {
        self.env
            .applied
            .lock()
            .expect("state")
            .state
            .controllers
            .get(&id)
            == Some(&StoredState::Out)
    }

    async fn operator_change(&self, cmd: MetaCommand) -> Result<(), (bool, String)> {
        let what = format!("{cmd:?}");
        match self.env.propose(cmd).await {
            Ok(MetaResponse::Ok { .. }) => {
                tracing::warn!(change = %what, "cluster change by an operator");
                Ok(())
            }
            Ok(MetaResponse::Refused(why)) => Err((true, why)),
            Ok(other) => Err((
                false,
                format!("unexpected answer from the metadata log: {other:?}"),
            )),
            Err(e) => Err((
                false,
                format!("the metadata log did not take the change: {e}"),
            )),
        }
    }

    /// Asks every controller (through the metadata log) to scrub the rows it leads once more.
    ///
    /// # Errors
    /// When the log has no reachable leader.
    pub async fn request_scrub(&self) -> Result<(), String> {
        self.env
            .propose(MetaCommand::RequestScrub)
            .await
            .map(|_| ())
            .map_err(|e| format!("the metadata log did not take the request: {e}"))
    }

    /// Removes a volume created at run time from the metadata log; every controller then stops
    /// serving it and deletes its shards.
    ///
    /// # Errors
    /// When the log has no reachable leader.
    pub async fn delete_volume(&self, id: u32) -> Result<(), String> {
        self.env
            .propose(MetaCommand::DeleteVolume { id })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The volumes recorded in the metadata log, by id.
    pub fn volume_records(&self) -> BTreeMap<u32, crate::meta::VolumeRecord> {
        self.env
            .applied
            .lock()
            .expect("state")
            .state
            .volumes
            .clone()
    }

    /// Records a new volume in the metadata log; every controller then serves it. Returns the
    /// record the log holds for that id (the first one recorded wins).
    ///
    /// # Errors
    /// When the log has no reachable leader.
    pub async fn create_volume(
        &self,
        rec: crate::meta::VolumeRecord,
    ) -> Result<crate::meta::VolumeRecord, String> {
        let id = rec.id;
        self.env
            .propose(MetaCommand::CreateVolume(rec))
            .await
            .map_err(|e| e.to_string())?;
        // Committed by the leader; this replica applies it a moment later.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.volume_records().remove(&id) {
                return Ok(r);
            }
            if std::time::Instant::now() > deadline {
                return Err("the volume is recorded in the metadata log but this controller has not applied the record within 10 s; check its log".to_string());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A peer's status answer (or why there is none) and how long it took.
#[derive(Debug)]
pub struct PeerStatus {
    /// The peer.
    pub id: ControllerId,
    /// Its status.
    pub report: Result<StatusReport, String>,
    /// Round trip of the status call.
    pub rtt: Duration,
}

/// One controller's answer to `appliance status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StatusReport {
    /// The controller that answered.
    pub id: ControllerId,
    /// Its view's epoch.
    pub epoch: u64,
    /// The metadata log's leader, as it knows it.
    pub leader: Option<u64>,
    /// Every controller and its state (up, resyncing, down).
    pub controllers: Vec<(ControllerId, String)>,
    /// Every volume's health, rows behind and resync progress.
    pub volumes: Vec<VolumeStatus>,
    /// Whether this controller refuses host I/O now (no lease, or not up).
    pub fenced: bool,
    /// Chunks this controller has copied by resync since it started.
    pub resync_chunks: u64,
    /// Reads this controller hedged (a holder slower than the threshold) since it started.
    #[serde(default)]
    pub hedged_reads: u64,
    /// Volumes this controller does not serve, and why.
    #[serde(default)]
    pub problems: Vec<String>,
    /// The metadata log as this replica sees it.
    #[serde(default)]
    pub log: LogFigures,
    /// Live figures from the server (I/O per volume, sessions, portals); `null` when none.
    #[serde(default)]
    pub live: serde_json::Value,
    /// What this controller's ports report for each controller's target port group
    /// ("active/optimized", "transitioning", "unavailable"); empty until it first set them.
    /// A host's commands through a port run only where its group is active/optimized.
    #[serde(default)]
    pub access_states: Vec<(ControllerId, String)>,
    /// Scrub of the rows this controller leads: the running pass and the last result.
    #[serde(default)]
    pub scrub: ScrubStatus,
    /// Positions being moved (rebuild); `None` when nothing moves.
    #[serde(default)]
    pub moves: Option<MovesStatus>,
    /// Chunks this controller has copied to new holders of moved positions since it started.
    #[serde(default)]
    pub moved_chunks: u64,
    /// Extent positions (shards) each controller holds, over every volume (controllers that
    /// may hold some; draining and out ones only while they still do).
    #[serde(default)]
    pub positions: BTreeMap<ControllerId, usize>,
    /// Why this controller's shards are being migrated away before its device fails, if so.
    #[serde(default)]
    pub migration: Option<String>,
}

/// The metadata log's progress on one replica.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LogFigures {
    /// Current term.
    pub term: u64,
    /// Index of the last log entry.
    pub last_index: u64,
    /// Index of the last applied entry.
    pub applied: u64,
    /// Controllers that vote in the log (a drained or marked-out one leaves them).
    #[serde(default)]
    pub voters: Vec<u64>,
}

fn status_of(engine: &Engine, env: &NodeEnv, raft: &Raft<MetaTypes>) -> StatusReport {
    let view = engine.view();
    let m = raft.metrics().borrow().clone();
    StatusReport {
        id: env.me,
        epoch: view.epoch,
        leader: m.current_leader,
        controllers: {
            let stored = env.applied.lock().expect("state").state.controllers.clone();
            view.controllers
                .iter()
                .map(|(id, s)| match stored.get(id) {
                    Some(StoredState::Out) => (*id, "out".to_string()),
                    Some(StoredState::Draining) => (*id, "draining".to_string()),
                    _ => (*id, format!("{s:?}").to_lowercase()),
                })
                .collect()
        },
        volumes: env.volume_status(engine),
        fenced: engine.is_fenced(),
        resync_chunks: engine.stats().resync_chunks,
        hedged_reads: engine.stats().hedged_reads,
        problems: env.problems(),
        log: LogFigures {
            term: m.current_term,
            last_index: m.last_log_index.unwrap_or(0),
            applied: m.last_applied.map_or(0, |l| l.index),
            voters: m.membership_config.membership().voter_ids().collect(),
        },
        live: env.live.get().map_or(serde_json::Value::Null, |f| f()),
        access_states: env.alua.get().map_or_else(Vec::new, |a| {
            a.snapshot()
                .into_iter()
                .map(|(g, a)| (ControllerId::from(g), a.name().to_string()))
                .collect()
        }),
        scrub: env.scrub.lock().expect("scrub").clone(),
        moves: env.moves_status(),
        moved_chunks: engine.stats().moved_chunks,
        positions: env.applied.lock().expect("state").state.load(),
        migration: env.migration.lock().expect("migration").clone(),
    }
}

impl Handler {
    fn status(&self) -> StatusReport {
        status_of(&self.engine, &self.env, &self.raft)
    }
}

impl PeerHandler for Handler {
    fn handle(
        &self,
        sender: u32,
        epoch: u64,
        req: Request,
    ) -> BoxFut<'_, Result<Reply, RemoteError>> {
        Box::pin(async move {
            match req {
                req @ (Request::ReadChunk(_)
                | Request::WriteChunk(..)
                | Request::ReadRange(..)
                | Request::PatchChunk(..)) => serve_shard(&self.engine, epoch, req)
                    .await
                    .map_err(shard_remote),
                Request::ForwardWrite {
                    volume,
                    offset,
                    data,
                } => self
                    .engine
                    .primary_write(epoch, volume, offset, &data)
                    .await
                    .map(|()| Reply::Done)
                    .map_err(vol_remote),
                Request::ForwardRead {
                    volume,
                    offset,
                    len,
                } => self
                    .engine
                    .primary_read(epoch, volume, offset, u64::from(len))
                    .await
                    .map(Reply::Data)
                    .map_err(vol_remote),
                Request::ForwardLocate {
                    volume,
                    offset,
                    len,
                } => self
                    .engine
                    .primary_locate(sender, epoch, volume, offset, u64::from(len))
                    .await
                    .map(Reply::Answer)
                    .map_err(vol_remote),
                // A controller the log has declared down gets no answer that would renew its
                // lease: it stops serving within a lease period even if it never hears why.
                Request::Heartbeat
                    if self.engine.view().state(sender)
                        == raid_engine::cluster::ControllerState::Down =>
                {
                    Err(RemoteError::Fenced)
                }
                // Dropping leases is always safe, whatever the epoch.
                Request::RevokeLeases { volume, extent } => {
                    self.engine.revoke_leases(volume, extent);
                    Ok(Reply::Done)
                }
                Request::Heartbeat => Ok(Reply::Done),
                Request::Meta(op, body) => {
                    let out = match op {
                        MetaOp::Append => {
                            let rpc = serde_json::from_slice(&body).map_err(remote)?;
                            serde_json::to_vec(&self.raft.append_entries(rpc).await)
                        }
                        MetaOp::Vote => {
                            let rpc = serde_json::from_slice(&body).map_err(remote)?;
                            serde_json::to_vec(&self.raft.vote(rpc).await)
                        }
                        MetaOp::Snapshot => {
                            let rpc = serde_json::from_slice(&body).map_err(remote)?;
                            serde_json::to_vec(&self.raft.install_snapshot(rpc).await)
                        }
                        MetaOp::Write => {
                            let cmd: MetaCommand = serde_json::from_slice(&body).map_err(remote)?;
                            let r = self.raft.client_write(cmd).await.map_err(remote)?;
                            serde_json::to_vec(&(r.log_id.index, r.data))
                        }
                        MetaOp::Status => serde_json::to_vec(&self.status()),
                        MetaOp::Installed => serde_json::to_vec(
                            &self
                                .env
                                .installed
                                .load(std::sync::atomic::Ordering::Acquire),
                        ),
                    };
                    out.map(Reply::Data).map_err(remote)
                }
            }
        })
    }
}

impl ControllerNode {
    /// Starts a controller: opens its metadata store in `dir`, listens for peers on
    /// `listener`, and serves `volumes` from `shards`.
    ///
    /// # Errors
    /// A message naming what failed (store, volume geometry, Raft start).
    pub async fn start(
        cfg: &NodeConfig,
        dir: &Path,
        listener: TcpListener,
        shards: Arc<dyn ShardStore>,
        volumes: Vec<(String, VolumeMeta)>,
    ) -> Result<Self, String> {
        let (log, sm) = store::open(&dir.join("metadata.redb"))?;
        let database = log.database();
        let applied = sm.shared();
        let clients = Arc::new(Peers::new(cfg));
        let env = Arc::new(NodeEnv {
            me: cfg.id,
            clients: clients.clone(),
            engine: OnceLock::new(),
            raft: OnceLock::new(),
            applied: applied.clone(),
            jobs: Mutex::new(BTreeMap::new()),
            problems: Mutex::new(BTreeMap::new()),
            luns: Mutex::new(BTreeMap::new()),
            installed: std::sync::atomic::AtomicU64::new(0),
            installed_version: std::sync::atomic::AtomicU64::new(u64::MAX),
            timers: cfg.timers,
            runtime_volumes: OnceLock::new(),
            live: OnceLock::new(),
            alua: OnceLock::new(),
            scrub: Mutex::new(ScrubStatus::default()),
            move_watch: Mutex::new(None),
            migration: Mutex::new(None),
        });
        let view = applied.lock().expect("state").state.view();
        let engine = Arc::new(Engine::new(cfg.id, shards, env.clone(), view));
        env.engine
            .set(Arc::downgrade(&engine))
            .expect("engine set once");
        let config = Config {
            heartbeat_interval: 100,
            election_timeout_min: 400,
            election_timeout_max: 800,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())?;
        let raft = Raft::new(
            u64::from(cfg.id),
            Arc::new(config),
            RaftNet { clients },
            log,
            sm,
        )
        .await
        .map_err(|e| format!("metadata log: {e}"))?;
        if env.raft.set(raft.clone()).is_err() {
            return Err("metadata log started twice".into());
        }
        let handler = Arc::new(Handler {
            engine: engine.clone(),
            raft: raft.clone(),
            env: env.clone(),
        });
        let mut tasks = vec![tokio::spawn(peer::serve(
            listener,
            cfg.id,
            handler,
            cfg.limits,
            cfg.tls.clone(),
        ))];
        // Install every newly applied membership view in the engine, and reservation state
        // in the logical units (that first: a controller that sees itself up again has the
        // reservations of everything before).
        let (e2, a2, env2) = (Arc::downgrade(&engine), applied, env.clone());
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            loop {
                env2.install_scsi();
                let added = a2.lock().expect("state").state.members.clone();
                for (id, addr) in added {
                    if env2.clients.get(id).is_none() {
                        match addr.parse() {
                            Ok(a) => {
                                tracing::info!(controller = id, %addr, "a controller joined the cluster");
                                env2.clients.ensure(id, a);
                            }
                            Err(e) => tracing::error!(controller = id, %addr, error = %e, "unusable peer address in the metadata log"),
                        }
                    }
                }
                let (view, placements) = {
                    let a = a2.lock().expect("state");
                    let view = a.state.view();
                    let placements: std::collections::HashMap<_, _> = if view.epoch != last {
                        a.state
                            .volumes
                            .iter()
                            .map(|(id, v)| (*id, v.placement.clone()))
                            .collect()
                    } else {
                        Default::default()
                    };
                    (view, placements)
                };
                let Some(e) = e2.upgrade() else { break };
                if view.epoch != last {
                    last = view.epoch;
                    e.set_view_and_placement(view, &placements);
                }
                drop(e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
        tasks.push(tokio::spawn(membership(
            cfg.clone(),
            Arc::downgrade(&engine),
            env.clone(),
            raft.clone(),
        )));
        tasks.push(tokio::spawn(adopt_volumes(
            volumes,
            cfg.bootstrap,
            Arc::downgrade(&engine),
            env.clone(),
        )));
        tasks.push(tokio::spawn(resync_loop(
            cfg.timers.resync_every,
            Arc::downgrade(&engine),
            env.clone(),
        )));
        tasks.push(tokio::spawn(scrub_loop(
            cfg.scrub,
            Arc::downgrade(&engine),
            env.clone(),
        )));
        tasks.push(tokio::spawn(move_loop(
            cfg.timers.rebuild_share,
            Arc::downgrade(&engine),
            env.clone(),
        )));
        Ok(Self {
            id: cfg.id,
            engine,
            env,
            raft,
            tasks,
            database,
        })
    }

    /// Keeps `alua` (the access states this controller's ports report) in step with the
    /// cluster: a controller that is up is active/optimized, one resyncing transitioning, one
    /// down unavailable; this controller's own group is unavailable while it refuses I/O
    /// (no lease, fenced) even before the others declare it down.
    pub fn publish_access_states(&mut self, alua: Arc<lun::alua::AccessStates>) {
        use lun::alua::AccessState as A;
        use raid_engine::cluster::ControllerState as S;
        let engine = Arc::downgrade(&self.engine);
        let me = self.id;
        let _ = self.env.alua.set(alua.clone());
        let env = Arc::downgrade(&self.env);
        self.tasks.push(tokio::spawn(async move {
            loop {
                let Some(e) = engine.upgrade() else { break };
                let Some(env) = env.upgrade() else { break };
                let members: Vec<ControllerId> =
                    env.clients.ids().into_iter().chain([me]).collect();
                let stored = env.applied.lock().expect("state").state.controllers.clone();
                drop(env);
                let view = e.view();
                // A controller the log has not placed yet (before the cluster forms) is
                // becoming ready: transitioning.
                let states = members
                    .iter()
                    .map(|&id| {
                        let a = match view.controllers.get(&id) {
                            Some(S::Up) => A::ActiveOptimized,
                            Some(S::Resyncing) | None => A::Transitioning,
                            Some(S::Down) => A::Unavailable,
                        };
                        // A controller being drained hands its paths over (hosts move their
                        // I/O to the others) before it leaves; one that left is unavailable.
                        let a = match stored.get(&id) {
                            Some(StoredState::Draining) => A::Transitioning,
                            Some(StoredState::Out) => A::Unavailable,
                            _ => a,
                        };
                        let a = if id == me && a == A::ActiveOptimized && e.is_fenced() {
                            A::Unavailable
                        } else {
                            a
                        };
                        (u16::try_from(id).unwrap_or(u16::MAX), a)
                    })
                    .collect();
                drop(e);
                let shown = format!("{states:?}");
                if alua.set_all(states) {
                    tracing::info!(
                        generation = alua.generation(),
                        states = %shown,
                        "target port group access states changed"
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    /// Forms a new cluster of `members` (run once, on one controller).
    ///
    /// # Errors
    /// When the log was already initialized or no quorum forms.
    pub async fn initialize(&self, members: &[ControllerId]) -> Result<(), String> {
        let m: BTreeMap<u64, BasicNode> = members
            .iter()
            .map(|&id| (u64::from(id), BasicNode::default()))
            .collect();
        self.raft.initialize(m).await.map_err(|e| e.to_string())
    }

    /// Volumes created at run time arrive here (each once, when this replica first sees its
    /// record), to be opened and served by the caller. Call once, right after `start`.
    pub fn runtime_volumes(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<RuntimeVolume>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.env.runtime_volumes.set(tx).ok().map(|()| rx)
    }

    /// Installs the source of this controller's live figures in its status answers.
    pub fn set_live(&self, f: LiveSource) {
        let _ = self.env.live.set(f);
    }

    /// A handle for the operator API (clone it freely; drop every clone before
    /// [`ControllerNode::shutdown`], which waits for the metadata store to close).
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            engine: self.engine.clone(),
            env: self.env.clone(),
            raft: self.raft.clone(),
        }
    }

    /// Stops serving peers and the log replica (the data stays on disk).
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        // Wait for the tasks to be gone, so what they hold (the metadata store among it) is
        // released when this returns and the controller can be started again at once.
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.raft.shutdown().await;
        let database = self.database;
        drop((self.engine, self.env, self.raft));
        // openraft's workers drop their handles on the store as they wind down.
        for _ in 0..500 {
            if database.strong_count() == 0 {
                // The last handle is gone; its drop (which releases the file lock) may still
                // be finishing on another thread.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!("the metadata store is still open 5 s after shutdown");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn resync_progress_counts_copies_against_the_largest_backlog() {
        let mut jobs = BTreeMap::new();
        let t0 = Instant::now();
        let p = ResyncJob::track(&mut jobs, 7, 40, t0).expect("running");
        assert_eq!((p.total, p.done, p.eta_secs), (40, 0, None));
        // New writes around a holder raise the total; copies lower the backlog.
        ResyncJob::track(&mut jobs, 7, 50, t0 + Duration::from_secs(1));
        let p = ResyncJob::track(&mut jobs, 7, 30, t0 + Duration::from_secs(4)).expect("running");
        assert_eq!((p.total, p.done), (50, 20));
        assert!((p.chunks_per_sec - 5.0).abs() < 1e-9, "{p:?}");
        assert!(
            (p.eta_secs.expect("rate known") - 6.0).abs() < 1e-9,
            "{p:?}"
        );
        // Done: the job ends, and a later backlog starts a new one.
        assert_eq!(
            ResyncJob::track(&mut jobs, 7, 0, t0 + Duration::from_secs(9)),
            None
        );
        let p = ResyncJob::track(&mut jobs, 7, 3, t0 + Duration::from_secs(10)).expect("new");
        assert_eq!((p.total, p.done), (3, 0));
    }
}

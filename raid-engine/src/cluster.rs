//! What the engine needs from the cluster: the membership view, volume placement, the
//! write-intent log, and a way to reach peers.
//!
//! The engine is a library: the appliance supplies these from its metadata log (Raft) and peer
//! transport; the simulation in `tests/` supplies them from a seeded, single-threaded model.
//!
//! Invariants:
//! - A [`ClusterView`] is immutable and versioned by its epoch; a newer view has a larger
//!   epoch. Every peer request carries the sender's epoch.
//! - The primary of an extent is the first controller of its placement set that is
//!   [`ControllerState::Up`] in the view; a controller that is resyncing holds shards and takes
//!   writes but is never primary.
//! - [`ClusterEnv::mark_intent`] returns only once the mark is durable and visible to whichever
//!   controller becomes primary next (replicated through the metadata log).

use crate::layout::{ControllerId, Layout, LayoutError};
use crate::shard::{BoxFut, Chunk, ChunkAddr, Patch, RangeRead, ShardError, VolumeId, Want};
use std::collections::BTreeMap;
use std::fmt;

/// A controller's membership state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerState {
    /// Serving: holds its shards, may be primary, accepts host I/O.
    Up,
    /// Back after being down: takes new writes while the rows it missed are copied to it; not
    /// primary; its shards are read only where known current.
    Resyncing,
    /// Missing heartbeats: its shards are written around (write-intent maps).
    Down,
}

/// Membership at one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// Version of membership + placement.
    pub epoch: u64,
    /// Every member and its state.
    pub controllers: BTreeMap<ControllerId, ControllerState>,
}

impl ClusterView {
    /// The state of `id` (absent members are down).
    pub fn state(&self, id: ControllerId) -> ControllerState {
        self.controllers
            .get(&id)
            .copied()
            .unwrap_or(ControllerState::Down)
    }
    /// Whether `id` holds shards that can be written now (up or resyncing).
    pub fn reachable(&self, id: ControllerId) -> bool {
        self.state(id) != ControllerState::Down
    }
    /// The primary of a placement set.
    pub fn primary(&self, set: &[ControllerId]) -> Option<ControllerId> {
        set.iter()
            .copied()
            .find(|&c| self.state(c) == ControllerState::Up)
    }
}

/// A volume as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Cluster-wide id.
    pub id: VolumeId,
    /// Size and geometry.
    pub layout: Layout,
    /// Placement set of each extent.
    pub placement: Vec<Vec<ControllerId>>,
}

impl VolumeMeta {
    /// A volume with rotated placement over `controllers`.
    ///
    /// # Errors
    /// [`LayoutError::TooFewControllers`].
    pub fn rotated(
        id: VolumeId,
        layout: Layout,
        controllers: &[ControllerId],
    ) -> Result<Self, LayoutError> {
        let mut sorted = controllers.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let placement = (0..layout.extent_count())
            .map(|e| crate::layout::rotated_placement(e, &sorted, layout.geometry.width()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            id,
            layout,
            placement,
        })
    }
}

/// One write-intent mark: the holder of `pos` missed a write to `row` of `extent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntentMark {
    /// Volume.
    pub volume: VolumeId,
    /// Extent.
    pub extent: u64,
    /// Row.
    pub row: u32,
    /// Position in the placement set.
    pub pos: u8,
}

/// The metadata log's knowledge of one row (see [`ClusterEnv::row_intent`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowIntent {
    /// Positions with a write-intent mark (bit mask).
    pub marked: u32,
    /// Highest version any marked position missed: the row's state is at least that new.
    pub floor: u64,
    /// The last rollback: the state chosen (its column versions) and the highest version
    /// abandoned.
    pub repair: Option<(Vec<u64>, u64)>,
    /// Highest content version served after a roll-forward: never rolled back below.
    pub served: u64,
    /// Positions (bit mask) that moved to a new holder which has not been given this row yet
    /// (see `Engine::copy_moved`).
    pub moving: u32,
}

/// Why a volume operation failed. Each maps to a SCSI status in `lun`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolError {
    /// Outside the volume.
    #[error("range offset {offset} length {len} is outside the volume")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// No such volume on this controller.
    #[error("volume {0} is not known to this controller")]
    NoVolume(VolumeId),
    /// This controller may not serve I/O (no lease, not a member, catching up).
    #[error("controller is fenced: it has no valid lease from the metadata majority")]
    Fenced,
    /// The request was made under another epoch; retry with the current view.
    #[error("epoch mismatch: request {theirs}, controller {ours}")]
    Epoch {
        /// This controller's epoch.
        ours: u64,
        /// The request's.
        theirs: u64,
    },
    /// This controller is not the extent's primary in its view.
    #[error("controller is not the primary of extent {0}")]
    NotPrimary(u64),
    /// No controller of the placement set is up.
    #[error("extent {0} has no live primary")]
    NoPrimary(u64),
    /// Fewer than `k` consistent shards could be read: the row cannot be served now.
    #[error("row unreadable: {have} consistent shards reachable, {need} needed")]
    TooFewShards {
        /// Consistent shards reached.
        have: usize,
        /// `k`.
        need: usize,
    },
    /// The write reached fewer holders than `write_quorum`: not acknowledged.
    #[error("write reached {have} holders, write_quorum is {need}")]
    NoQuorum {
        /// Holders with the write.
        have: usize,
        /// Quorum.
        need: usize,
    },
    /// A peer or metadata failure.
    #[error("{0}")]
    Peer(String),
}

impl From<ShardError> for VolError {
    fn from(e: ShardError) -> Self {
        Self::Peer(e.to_string())
    }
}

/// One piece of a host read, as the extent's primary locates it: read `read` of `addr` from
/// `holder` ([`Want::Zero`]: no read, the bytes are zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPart {
    /// The column's holder.
    pub holder: ControllerId,
    /// The chunk.
    pub addr: ChunkAddr,
    /// The copy (by version) and byte range.
    pub read: RangeRead,
}

/// A read lease: rows of one extent whose copies the asking controller may read from their
/// holders without asking the primary, until `ttl` has passed since it sent the request that
/// brought the lease (its own clock; the primary counts from the grant, which is later). The
/// primary revokes the lease ([`ClusterEnv::revoke_leases`]) or waits it out before it
/// acknowledges a write of the extent, so a leased read never returns bytes a write
/// acknowledged before the read began has replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadLease {
    /// The extent the rows belong to.
    pub extent: u64,
    /// How long the lease lasts, in milliseconds.
    pub ttl_ms: u32,
    /// The rows granted, each with the copy of every data column in order
    /// ([`Want::Version`], or [`Want::Zero`] for a column never written).
    pub rows: Vec<(u32, Vec<Want>)>,
}

/// A primary's answer to a host read forwarded by another controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAnswer {
    /// The bytes.
    Data(Vec<u8>),
    /// Where they are, in request order: the asking controller reads them from their holders
    /// itself (so bytes held elsewhere than at the primary cross the network once), falling
    /// back to asking for [`ReadAnswer::Data`] when a copy has changed meanwhile; with a
    /// lease on these and the following rows of the extent, when the primary grants one.
    Located(Vec<ReadPart>, Option<ReadLease>),
}

/// The engine's window on the cluster: peers and the replicated write-intent log.
pub trait ClusterEnv: Send + Sync + fmt::Debug {
    /// Reads every valid copy of a chunk from controller `to`.
    fn read_chunk(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>>;
    /// Writes a chunk to controller `to` (durable on `Ok`).
    fn write_chunk(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
        chunk: Chunk,
    ) -> BoxFut<'_, Result<(), ShardError>>;
    /// Part of the copies of a chunk at controller `to` (see [`RangeRead`]); the holder checks
    /// what it returns. The default reads whole copies and cuts them here.
    fn read_range(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
        read: RangeRead,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        Box::pin(async move { Ok(read.cut(self.read_chunk(to, epoch, addr).await?)) })
    }
    /// Makes a new copy of a chunk at controller `to` from one it holds (see [`Patch`]);
    /// durable on `Ok`, which carries the bytes the patch replaced. The default reads the
    /// base copy here and writes the whole chunk.
    fn patch_chunk(
        &self,
        to: ControllerId,
        epoch: u64,
        addr: ChunkAddr,
        patch: Patch,
    ) -> BoxFut<'_, Result<Vec<u8>, ShardError>> {
        Box::pin(async move {
            let copies = if patch.base == Want::Zero {
                Vec::new()
            } else {
                self.read_chunk(to, epoch, addr).await?
            };
            let (chunk, old) = patch.apply(copies)?;
            self.write_chunk(to, epoch, addr, chunk).await?;
            Ok(old)
        })
    }
    /// Hands a host write to the extent's primary `to`.
    fn forward_write(
        &self,
        to: ControllerId,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'_, Result<(), VolError>>;
    /// Hands a host read to the extent's primary `to`.
    fn forward_read(
        &self,
        to: ControllerId,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> BoxFut<'_, Result<Vec<u8>, VolError>>;
    /// Hands a host read to the extent's primary `to`, which may answer with where the bytes
    /// are rather than the bytes. The default asks for the bytes.
    fn forward_locate(
        &self,
        to: ControllerId,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> BoxFut<'_, Result<ReadAnswer, VolError>> {
        Box::pin(async move {
            self.forward_read(to, epoch, volume, offset, len)
                .await
                .map(ReadAnswer::Data)
        })
    }
    /// Records durably, cluster-wide, that a holder missed the row state of version
    /// `missed` (a mark keeps the highest version it was set with).
    /// Refused (an error) when `epoch` is no longer the cluster's: a write of a fenced primary
    /// must neither be acknowledged nor leave marks that later loads would trust.
    fn mark_intent(
        &self,
        mark: IntentMark,
        missed: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>>;
    /// Clears a mark once the holder has the row again (state version `upto`).
    /// Only a mark whose missed version is at most `upto` is cleared: a mark set again by a
    /// newer write stays.
    /// Refused when `epoch` is no longer the cluster's.
    fn clear_intent(
        &self,
        mark: IntentMark,
        upto: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>>;
    /// Marks of `volume` (this controller's replica of the log).
    fn intents(&self, volume: VolumeId) -> Vec<IntentMark>;
    /// What the log says about one row: marks, the version floor they set, and the last
    /// repair decision.
    fn row_intent(&self, volume: VolumeId, extent: u64, row: u32) -> RowIntent;
    /// Records durably, before a primary rewrites a row it rolled back, which state it chose
    /// (`cols`) and the highest version it gave up (`upto`): no later load may bring back a
    /// state with other columns and content at or below `upto`. Refused when `epoch` is no
    /// longer the cluster's.
    fn record_repair(
        &self,
        volume: VolumeId,
        extent: u64,
        row: u32,
        cols: Vec<u64>,
        upto: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>>;
    /// Records durably, before a primary serves a row state no chunk yet calls acknowledged
    /// (a roll-forward after a crash), that the row is at least at `content`. Refused when
    /// `epoch` is no longer the cluster's.
    fn record_served(
        &self,
        volume: VolumeId,
        extent: u64,
        row: u32,
        content: u64,
        epoch: u64,
    ) -> BoxFut<'_, Result<(), VolError>>;
    /// Resolves after `d`; the engine hedges slow reads with it. The default never resolves,
    /// which turns hedging off (the deterministic simulation has no clock).
    fn sleep(&self, d: std::time::Duration) -> BoxFut<'_, ()> {
        let _ = d;
        Box::pin(std::future::pending())
    }
    /// How long read leases last ([`ReadLease`]); `None` (the default) grants none. An
    /// environment that returns `Some` must also provide [`ClusterEnv::now`],
    /// [`ClusterEnv::wait_until`] and [`ClusterEnv::revoke_leases`].
    fn read_lease_ttl(&self) -> Option<std::time::Duration> {
        None
    }
    /// How long after a change of an extent no read lease is granted on it (so extents that
    /// are written as well as read pay no revocations); the default is the lease period.
    fn read_lease_quiet(&self) -> Option<std::time::Duration> {
        self.read_lease_ttl()
    }
    /// The clock read leases are counted on (monotonic).
    fn now(&self) -> std::time::Instant {
        std::time::Instant::now()
    }
    /// Resolves once [`ClusterEnv::now`] has reached `t`. The default resolves at once: it is
    /// only called when [`ClusterEnv::read_lease_ttl`] is `Some`.
    fn wait_until(&self, t: std::time::Instant) -> BoxFut<'_, ()> {
        let _ = t;
        Box::pin(std::future::ready(()))
    }
    /// Asks controller `to` to drop its read leases on `extent` of `volume`; `Ok` once it has
    /// (it reads those rows through the primary from then on). The default fails, so the
    /// primary waits the leases out.
    fn revoke_leases(
        &self,
        to: ControllerId,
        epoch: u64,
        volume: VolumeId,
        extent: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        let _ = (epoch, volume, extent);
        Box::pin(std::future::ready(Err(VolError::Peer(format!(
            "controller {to}: no way to revoke read leases"
        )))))
    }
}

//! One controller's share of the distributed data path: host reads and writes, the primary's
//! row work (encode, write, degraded read, repair), the holder's chunk service, and resync.
//!
//! The engine is IO-agnostic: it reaches every shard, its own included, through
//! [`ClusterEnv`], which the appliance backs with its peer transport and metadata log and the
//! simulation with a seeded model.
//!
//! Row protocol (the primary holds the row lock throughout):
//! 1. *Load*: the first touch of a row in an epoch reads every reachable position, finds the
//!    newest row state that at least `k` valid copies describe (a crash mid-write leaves newer
//!    but incomplete copies: they are rolled back; holders keep the previous copy for this),
//!    and records which positions are *behind* (their newest copy is not valid for that
//!    state). Behind positions that are reachable get a write-intent mark, so resync fixes them.
//! 2. *Write*: builds the new content of the touched data columns (reading the other columns
//!    of a partial row), encodes parity, and writes the touched columns and every parity
//!    column at a new version `(epoch << 32) + n`. Holders that fail get a write-intent mark,
//!    durable before the host is answered; the write is acknowledged when the positions
//!    holding the new state reach `write_quorum`.
//! 3. *Read*: reads the needed data columns from their holders (checking versions); a missing,
//!    stale or failing column is reconstructed from the first `k` valid answers of all the
//!    other positions. A holder slower than the hedging threshold (twice the 99th percentile
//!    of recent chunk reads) is hedged: the row is also decoded from the other holders and
//!    the first complete answer wins.
//! 4. *Scrub*: reloads every row it leads (damaged, missing or stale copies get marks) and
//!    rewrites parity copies that disagree with the data columns.
//! 5. *Move* (rebuild, drain, rebalance): the metadata log gives a position of an extent a new
//!    holder under a new epoch and records the move; until the primary has copied a row to the
//!    new holder ([`Engine::copy_moved`]), the log reports that position as moving for the
//!    row, and loads treat it like a marked one (never vouching, read only by version), so a
//!    half-copied extent can never roll a row back.
//!
//! Invariants:
//! - Only the primary of an extent, at the epoch of its view, writes chunks of that extent;
//!   a holder refuses requests whose epoch is below the highest it has seen.
//! - Versions of one row are unique: a new primary's versions exceed every older epoch's.
//! - A host write returns `Ok` only when `write_quorum` positions hold it and every position
//!   that missed it is marked in the write-intent log.

use crate::cluster::{
    ClusterEnv, ClusterView, ControllerState, IntentMark, ReadAnswer, ReadLease, ReadPart,
    VolError, VolumeMeta,
};
use crate::codec::{new_codec, ErasureCodec, DELTA_ALIGN};
use crate::gather::{merge, Gather, Joined, Outcome};
use crate::layout::{ControllerId, RowSpan};
use crate::lease::{Grants, Held, Lessee, READAHEAD_ROWS};
use crate::range_lock::RangeLock;
use crate::shard::{
    Chunk, ChunkAddr, Patch, PatchOp, RangeRead, ShardError, ShardStore, VolumeId, Want,
};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type Result<T> = std::result::Result<T, VolError>;

/// What the primary knows about one row in the current epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowMeta {
    version: u64,
    cols: Vec<u64>,
    /// Bit `p`: position `p` is known not to hold this state (its newest copy is another
    /// state's, or a write to it failed).
    behind: u32,
    /// Bit `p`: position `p` did not answer when the row was loaded; it is read (copies are
    /// checked by version) but not counted as holding the state.
    unknown: u32,
    /// Newest version of this row known to have been acknowledged to a host. Every chunk
    /// written carries it, so no later load rolls the row back below it.
    acked: u64,
    /// Column versions of that state (holders keep the copy valid for it); empty if unknown.
    acked_cols: Vec<u64>,
}

impl RowMeta {
    fn is_behind(&self, pos: usize) -> bool {
        self.behind & (1 << pos) != 0
    }
    fn is_unknown(&self, pos: usize) -> bool {
        self.unknown & (1 << pos) != 0
    }
    /// Positions known to hold the state.
    fn holding(&self, width: usize) -> usize {
        width - (self.behind | self.unknown).count_ones() as usize
    }
    /// The newest data version in this state: what marks and acknowledgements refer to.
    fn content(&self) -> u64 {
        self.cols.iter().copied().max().unwrap_or(0)
    }
    /// The version a copy written for this state at `pos` carries.
    fn want(&self, pos: usize) -> u64 {
        self.cols.get(pos).copied().unwrap_or(self.version)
    }
    /// Whether copy `c` at `pos` holds this state's content: a data copy iff it is the version
    /// the state names for its column; a parity copy iff it was computed from the same data
    /// (same column versions), whatever its own version.
    fn valid(&self, pos: usize, c: &Chunk) -> bool {
        match self.cols.get(pos) {
            Some(&v) => c.version == v,
            None => c.cols == self.cols,
        }
    }
    /// Whether this state's content at `pos` is all zeros (never written).
    fn is_zero(&self, pos: usize) -> bool {
        match self.cols.get(pos) {
            Some(&v) => v == 0,
            None => self.cols.iter().all(|&v| v == 0),
        }
    }
    /// The copy of data column `pos` a reader may take from its holder without decoding
    /// (zeros, or the state's version); `None` when the position is behind or did not answer.
    fn current_copy(&self, pos: usize) -> Option<Want> {
        if self.is_behind(pos) || self.is_unknown(pos) {
            None
        } else if self.is_zero(pos) {
            Some(Want::Zero)
        } else {
            Some(Want::Version(self.want(pos)))
        }
    }
    /// The payload of a valid copy, if any.
    fn pick(&self, pos: usize, copies: &[Chunk], len: usize) -> Option<Vec<u8>> {
        if self.is_zero(pos) {
            return Some(zeros(len));
        }
        copies
            .iter()
            .find(|c| self.valid(pos, c) && c.data.len() == len)
            .map(|c| c.data.clone())
    }
    /// Whether the most recently written copy (or "never written") is valid.
    fn newest_valid(&self, pos: usize, copies: &[Chunk]) -> bool {
        copies
            .first()
            .map_or(self.is_zero(pos), |c| self.valid(pos, c))
    }
}

/// A row this controller leads: its volume, extent and row.
type LedRow = (Arc<Vol>, u64, u32);

/// Row states known in one epoch, and the read leases granted on the extents (kept across
/// epochs; see [`crate::lease`]). One lock, so a grant reads the states it names atomically
/// with registering the lessee, and a write changes a state atomically with taking the
/// lessees it must revoke.
#[derive(Debug, Default)]
struct RowCache {
    epoch: u64,
    rows: HashMap<(u64, u32), RowMeta>,
    grants: Grants,
}

impl RowCache {
    /// The row states of `epoch` (those of an older epoch are dropped).
    fn rows_of(&mut self, epoch: u64) -> Option<&mut HashMap<(u64, u32), RowMeta>> {
        if self.epoch < epoch {
            self.epoch = epoch;
            self.rows.clear();
        }
        (self.epoch == epoch).then_some(&mut self.rows)
    }
}

#[derive(Debug)]
struct Vol {
    meta: VolumeMeta,
    codec: Box<dyn ErasureCodec>,
    /// Shared with the `Vol` that replaces this one when the placement moves, so row locks
    /// and cached row states span the change.
    rows: Arc<RangeLock>,
    cache: Arc<Mutex<RowCache>>,
    /// Writes queued for rows another write of this volume is committing (see
    /// [`crate::gather`]). Not carried to a replacing `Vol`: writes queued on the old one
    /// finish there, and the row lock orders them with the new one's.
    gather: Gather<Result<()>>,
}

impl Vol {
    fn k(&self) -> usize {
        self.meta.layout.geometry.k
    }
    fn width(&self) -> usize {
        self.meta.layout.geometry.width()
    }
    /// The data columns a row span touches: (column, first byte in the chunk, bytes).
    fn span_columns(&self, span: &RowSpan) -> impl Iterator<Item = (usize, u32, u32)> {
        let cb = self.chunk();
        let start = span.offset_in_row as usize;
        let end = start + span.len as usize;
        (start / cb..=(end - 1) / cb).map(move |c| {
            let from = start.max(c * cb) - c * cb;
            let to = end.min((c + 1) * cb) - c * cb;
            (c, from as u32, (to - from) as u32)
        })
    }
    fn chunk(&self) -> usize {
        self.meta.layout.geometry.chunk_bytes as usize
    }
    fn global_row(&self, extent: u64, row: u32) -> u64 {
        extent * u64::from(self.meta.layout.geometry.rows_per_extent) + u64::from(row)
    }
}

#[derive(Debug)]
struct Inner {
    view: Arc<ClusterView>,
    fenced: bool,
    /// With a lease: host I/O stops at this instant unless the lease is renewed.
    lease_until: Option<std::time::Instant>,
    volumes: HashMap<VolumeId, Arc<Vol>>,
}

/// Counters for status and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EngineStats {
    /// Rows read through reconstruction.
    pub degraded_reads: u64,
    /// Rows whose load found positions behind.
    pub rows_behind_found: u64,
    /// Chunks copied by resync.
    pub resync_chunks: u64,
    /// Reads whose holder was slower than the hedging threshold, so the row was also decoded
    /// from the other holders.
    pub hedged_reads: u64,
    /// Hedged reads the decode answered first.
    pub hedges_won: u64,
    /// Chunks copied to the new holders of moved positions (rebuild, drain, rebalance).
    pub moved_chunks: u64,
    /// Row writes committed as patches (changed bytes and parity deltas, not whole chunks).
    pub patched_writes: u64,
    /// Host writes committed together with another write of the same row (see
    /// [`crate::gather`]), counted for each write taken into a leader's batch.
    pub gathered_writes: u64,
    /// Host reads whose primary located the bytes, read here from their holders.
    pub located_reads: u64,
    /// Host reads served under a read lease (no round trip to the primary).
    pub leased_reads: u64,
    /// Rows of leased reads decoded from this controller's own parity copy instead of
    /// fetching a data chunk from another controller.
    pub leased_rows_decoded: u64,
    /// Lessees asked to drop their leases before a change was acknowledged.
    pub leases_revoked: u64,
}

/// A piece of a leased read's answer: part `i` as read, or column `c` of decode `d`.
enum Piece {
    Part(usize),
    Decoded(usize, usize),
}

/// A whole row of a leased read decoded with this controller's parity copy: the part read
/// for each position (`None`: not read), the parity copy's part, the data column left out,
/// and the part that reads it from its holder should the parity copy not be here.
struct LocalDecode {
    at: Vec<Option<usize>>,
    parity: usize,
    skip: usize,
    fallback: ReadPart,
}

/// Recent chunk read latencies, and the hedging threshold derived from them: twice their
/// 99th percentile, at least [`HEDGE_FLOOR`], once [`HEDGE_MIN_SAMPLES`] reads were seen.
#[derive(Debug, Default)]
struct ReadLatency {
    inner: Mutex<LatencyRing>,
}

#[derive(Debug, Default)]
struct LatencyRing {
    micros: Vec<u32>,
    next: usize,
    since: usize,
    threshold: Option<std::time::Duration>,
}

/// Samples kept.
const HEDGE_SAMPLES: usize = 256;
/// Samples needed before reads are hedged.
const HEDGE_MIN_SAMPLES: usize = 64;
/// The threshold is recomputed after this many samples (a sort of 256 numbers).
const HEDGE_RECOMPUTE: usize = 32;
/// Never hedge a read sooner than this.
pub const HEDGE_FLOOR: std::time::Duration = std::time::Duration::from_millis(2);

impl ReadLatency {
    fn record(&self, d: std::time::Duration) {
        let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let mut r = self.inner.lock().expect("latency");
        if r.micros.len() < HEDGE_SAMPLES {
            r.micros.push(us);
        } else {
            let i = r.next;
            r.micros[i] = us;
        }
        r.next = (r.next + 1) % HEDGE_SAMPLES;
        r.since += 1;
        if r.since >= HEDGE_RECOMPUTE && r.micros.len() >= HEDGE_MIN_SAMPLES {
            r.since = 0;
            let mut sorted = r.micros.clone();
            sorted.sort_unstable();
            let p99 = sorted[sorted.len() * 99 / 100];
            let t = std::time::Duration::from_micros(u64::from(p99) * 2);
            r.threshold = Some(t.max(HEDGE_FLOOR));
        }
    }

    fn threshold(&self) -> Option<std::time::Duration> {
        self.inner.lock().expect("latency").threshold
    }
}

/// What one scrub pass found (see [`Engine::scrub`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubCounts {
    /// Rows checked.
    pub rows: u64,
    /// Copies found damaged, missing or stale (marked for resync to rewrite).
    pub bad_chunks: u64,
    /// Parity copies that disagreed with their data columns (rewritten).
    pub parity_rewritten: u64,
    /// Rows that could not be read (too few holders answered).
    pub unreadable_rows: u64,
}

/// What one volume still has to copy, from the replicated write-intent log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeBacklog {
    /// Volume.
    pub volume: VolumeId,
    /// Its logical size.
    pub size_bytes: u64,
    /// Every controller holding some of its shards.
    pub holders: std::collections::BTreeSet<ControllerId>,
    /// Stripe rows with at least one position behind.
    pub rows_behind: usize,
    /// Chunks behind, per holder.
    pub chunks_by: std::collections::BTreeMap<ControllerId, usize>,
}

/// Rows one resync pass copies at a time.
const RESYNC_PARALLEL: usize = 16;

/// One controller's data path.
#[derive(Debug)]
pub struct Engine {
    id: ControllerId,
    store: Arc<dyn ShardStore>,
    env: Arc<dyn ClusterEnv>,
    inner: Mutex<Inner>,
    seen_epoch: AtomicU64,
    next_version: AtomicU64,
    stats: Mutex<EngineStats>,
    latency: ReadLatency,
    /// Read leases this controller holds as a lessee.
    held: Mutex<Held>,
    /// When this engine started (on the lease clock): what it granted before a restart is
    /// unknown, so it serves as primary only a lease period later.
    started: std::time::Instant,
}

/// The first version a primary may use in `epoch`.
fn epoch_base(epoch: u64) -> u64 {
    epoch << 32
}

/// The pieces of a read side by side in one buffer (no copy when there is one piece).
fn join(mut pieces: Vec<Vec<u8>>) -> Vec<u8> {
    if pieces.len() == 1 {
        return pieces.pop().expect("one piece");
    }
    let mut out = Vec::with_capacity(pieces.iter().map(Vec::len).sum());
    for p in pieces {
        out.extend_from_slice(&p);
    }
    out
}

/// A chunk of zeros: the content of anything never written (version 0).
fn zeros(len: usize) -> Vec<u8> {
    vec![0; len]
}

impl Engine {
    /// An engine for controller `id`, holding its shards in `store`.
    pub fn new(
        id: ControllerId,
        store: Arc<dyn ShardStore>,
        env: Arc<dyn ClusterEnv>,
        view: ClusterView,
    ) -> Self {
        let epoch = view.epoch;
        let started = env.now();
        Self {
            id,
            store,
            env,
            inner: Mutex::new(Inner {
                view: Arc::new(view),
                fenced: false,
                lease_until: None,
                volumes: HashMap::new(),
            }),
            seen_epoch: AtomicU64::new(epoch),
            next_version: AtomicU64::new(0),
            stats: Mutex::new(EngineStats::default()),
            latency: ReadLatency::default(),
            held: Mutex::default(),
            started,
        }
    }

    /// This controller's id.
    pub fn id(&self) -> ControllerId {
        self.id
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().expect("stats")
    }

    /// Serves `meta` from now on.
    ///
    /// # Errors
    /// [`VolError::Peer`] when the codec refuses the geometry.
    pub fn add_volume(&self, meta: VolumeMeta) -> Result<()> {
        let g = meta.layout.geometry;
        let codec = new_codec(g.codec, g.k, g.m).map_err(|e| VolError::Peer(e.to_string()))?;
        let vol = Arc::new(Vol {
            meta,
            codec,
            rows: Arc::default(),
            cache: Arc::default(),
            gather: Gather::default(),
        });
        self.lock().volumes.insert(vol.meta.id, vol);
        Ok(())
    }

    /// Stops serving `volume` (deleted): later reads and writes of it fail; ones in flight
    /// finish on the state they hold.
    pub fn remove_volume(&self, volume: VolumeId) {
        self.lock().volumes.remove(&volume);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("engine state")
    }

    /// The current view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.lock().view.clone()
    }

    /// Installs a newer view (older ones are ignored). Row knowledge of older epochs is
    /// dropped, so every row is re-verified by its (possibly new) primary.
    pub fn set_view(&self, view: ClusterView) {
        self.set_view_and_placement(view, &HashMap::new());
    }

    /// Installs a newer view together with the placement of the volumes that moved in it (a
    /// rebuild, drain or rebalance gave some positions new holders). Both change under one
    /// lock, so an operation sees the placement of the epoch it runs in. Placements that do
    /// not fit a volume's geometry are ignored (logged).
    pub fn set_view_and_placement(
        &self,
        view: ClusterView,
        placements: &HashMap<VolumeId, Vec<Vec<ControllerId>>>,
    ) {
        let mut g = self.lock();
        if view.epoch <= g.view.epoch {
            return;
        }
        self.seen_epoch.fetch_max(view.epoch, Ordering::SeqCst);
        let old_view = std::mem::replace(&mut g.view, Arc::new(view));
        let old_vols = g.volumes.clone();
        for (id, placement) in placements {
            let Some(old) = g.volumes.get(id) else {
                continue;
            };
            if old.meta.placement == *placement {
                continue;
            }
            let fits = placement.len() == old.meta.placement.len()
                && placement.iter().all(|s| s.len() == old.width());
            let g2 = old.meta.layout.geometry;
            let codec = match new_codec(g2.codec, g2.k, g2.m) {
                Ok(c) if fits => c,
                _ => {
                    tracing::error!(volume = id, "a placement from the metadata log does not fit the volume; keeping the old one");
                    continue;
                }
            };
            let mut meta = old.meta.clone();
            meta.placement.clone_from(placement);
            let vol = Arc::new(Vol {
                meta,
                codec,
                rows: old.rows.clone(),
                cache: old.cache.clone(),
                gather: Gather::default(),
            });
            g.volumes.insert(*id, vol);
        }
        self.gate_takeovers(&old_view, &old_vols, &g.view, &g.volumes);
    }

    /// After a view change: every extent this controller leads now but did not lead in the
    /// view before (or every extent, when epochs were skipped: a view in between may have
    /// had another primary) waits one lease period before primary work, since the leases
    /// another primary granted are unknown here.
    fn gate_takeovers(
        &self,
        old_view: &ClusterView,
        old_vols: &HashMap<VolumeId, Arc<Vol>>,
        view: &ClusterView,
        vols: &HashMap<VolumeId, Arc<Vol>>,
    ) {
        let Some(ttl) = self.env.read_lease_ttl() else {
            return;
        };
        let until = self.env.now() + ttl;
        let skipped = view.epoch != old_view.epoch + 1;
        for (id, vol) in vols {
            let old = old_vols.get(id);
            let mut c = vol.cache.lock().expect("row cache");
            for (e, set) in vol.meta.placement.iter().enumerate() {
                if view.primary(set) != Some(self.id) {
                    continue;
                }
                let led =
                    old.is_some_and(|o| old_view.primary(&o.meta.placement[e]) == Some(self.id));
                if skipped || !led {
                    let g = c.grants.extent(e as u64);
                    g.gate = Some(g.gate.map_or(until, |t| t.max(until)));
                }
            }
        }
    }

    /// The placement this controller serves `volume` with.
    pub fn placement(&self, volume: VolumeId) -> Option<Vec<Vec<ControllerId>>> {
        self.lock()
            .volumes
            .get(&volume)
            .map(|v| v.meta.placement.clone())
    }

    /// Stops (or resumes) host I/O: a controller without a lease must not serve.
    pub fn set_fenced(&self, fenced: bool) {
        self.lock().fenced = fenced;
    }

    /// Renews this controller's lease: host I/O is refused after `until` unless renewed again
    /// (the appliance renews it while a majority answers its heartbeats). Time-based, so a
    /// process that was frozen past its lease refuses I/O the moment it resumes.
    pub fn renew_lease(&self, until: std::time::Instant) {
        let mut g = self.lock();
        g.lease_until = Some(g.lease_until.map_or(until, |u| u.max(until)));
    }

    /// Whether host I/O is refused.
    pub fn is_fenced(&self) -> bool {
        let g = self.lock();
        g.fenced
            || g.lease_until.is_some_and(|u| std::time::Instant::now() > u)
            || g.view.state(self.id) != ControllerState::Up
    }

    /// Write-intent marks whose position `id` holds: the chunks it still has to receive.
    pub fn marks_held_by(&self, id: ControllerId) -> usize {
        let vols: Vec<Arc<Vol>> = self.lock().volumes.values().cloned().collect();
        vols.iter()
            .map(|v| {
                self.env
                    .intents(v.meta.id)
                    .iter()
                    .filter(|m| {
                        v.meta
                            .placement
                            .get(m.extent as usize)
                            .and_then(|set| set.get(m.pos as usize))
                            == Some(&id)
                    })
                    .count()
            })
            .sum()
    }

    /// Per volume: the controllers holding its shards, the rows with a write-intent mark, and
    /// the marked chunks per holder (what each still has to receive).
    pub fn backlog(&self) -> Vec<VolumeBacklog> {
        let vols: Vec<Arc<Vol>> = self.lock().volumes.values().cloned().collect();
        let mut out: Vec<VolumeBacklog> = vols
            .iter()
            .map(|v| {
                let marks = self.env.intents(v.meta.id);
                let mut chunks_by = std::collections::BTreeMap::new();
                let mut rows = std::collections::BTreeSet::new();
                for m in &marks {
                    if let Some(&c) = v
                        .meta
                        .placement
                        .get(m.extent as usize)
                        .and_then(|set| set.get(m.pos as usize))
                    {
                        *chunks_by.entry(c).or_insert(0) += 1;
                    }
                    rows.insert((m.extent, m.row));
                }
                VolumeBacklog {
                    volume: v.meta.id,
                    size_bytes: v.meta.layout.size_bytes,
                    holders: v.meta.placement.iter().flatten().copied().collect(),
                    rows_behind: rows.len(),
                    chunks_by,
                }
            })
            .collect();
        out.sort_by_key(|b| b.volume);
        out
    }

    fn volume(&self, id: VolumeId) -> Result<(Arc<ClusterView>, Arc<Vol>)> {
        let g = self.lock();
        let vol = g.volumes.get(&id).cloned().ok_or(VolError::NoVolume(id))?;
        Ok((g.view.clone(), vol))
    }

    fn host_entry(
        &self,
        id: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<(Arc<ClusterView>, Arc<Vol>)> {
        if self.is_fenced() {
            return Err(VolError::Fenced);
        }
        let (view, vol) = self.volume(id)?;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > vol.meta.layout.size_bytes)
        {
            return Err(VolError::OutOfRange { offset, len });
        }
        Ok((view, vol))
    }

    /// Splits a request at extent boundaries: (extent, offset, len, offset in request).
    fn extent_parts(vol: &Vol, offset: u64, len: u64) -> Vec<(u64, u64, u64, u64)> {
        let eb = vol.meta.layout.geometry.extent_bytes();
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let e = pos / eb;
            let n = ((e + 1) * eb).min(offset + len) - pos;
            out.push((e, pos, n, pos - offset));
            pos += n;
        }
        out
    }

    /// A host write arriving at this controller: each extent's part goes to its primary.
    ///
    /// # Errors
    /// See [`VolError`]; on error nothing is acknowledged, though part of the data may be
    /// visible (as with any failed SCSI write).
    pub async fn write(&self, volume: VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        let (view, vol) = self.host_entry(volume, offset, data.len() as u64)?;
        for (e, off, n, at) in Self::extent_parts(&vol, offset, data.len() as u64) {
            let part = &data[at as usize..(at + n) as usize];
            let primary = view
                .primary(&vol.meta.placement[e as usize])
                .ok_or(VolError::NoPrimary(e))?;
            if primary == self.id {
                self.primary_write(view.epoch, volume, off, part).await?;
            } else {
                self.env
                    .forward_write(primary, view.epoch, volume, off, part.to_vec())
                    .await?;
            }
        }
        Ok(())
    }

    /// A host read arriving at this controller, as one buffer (see [`Engine::read_segments`]).
    ///
    /// # Errors
    /// See [`VolError`].
    pub async fn read(&self, volume: VolumeId, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.read_segments(volume, offset, len).await.map(join)
    }

    /// A host read arriving at this controller: the bytes in order, as the buffers they came
    /// in (a column range from a holder, a primary's answer), so a read that spans several
    /// chunks is never copied just to put its pieces side by side.
    ///
    /// # Errors
    /// See [`VolError`].
    pub async fn read_segments(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Vec<u8>>> {
        let (view, vol) = self.host_entry(volume, offset, len)?;
        let mut out = Vec::new();
        for (e, off, n, _) in Self::extent_parts(&vol, offset, len) {
            let primary = view
                .primary(&vol.meta.placement[e as usize])
                .ok_or(VolError::NoPrimary(e))?;
            let part = if primary == self.id {
                self.primary_read_segments(view.epoch, volume, off, n)
                    .await?
            } else if let Some(d) = self.read_leased(&view, &vol, e, off, n).await {
                d
            } else {
                let key = (volume, e);
                let ticket = self.held.lock().expect("leases").ticket(key);
                let sent = self.env.now();
                match self
                    .env
                    .forward_locate(primary, view.epoch, volume, off, n)
                    .await?
                {
                    ReadAnswer::Data(d) => vec![d],
                    ReadAnswer::Located(parts, lease) => {
                        if let Some(l) = lease.filter(|l| l.extent == e) {
                            self.held
                                .lock()
                                .expect("leases")
                                .install(volume, view.epoch, ticket, sent, &l);
                        }
                        match self.read_located(&view, &parts).await {
                            Some(d) => {
                                self.stats.lock().expect("stats").located_reads += 1;
                                d
                            }
                            // A copy changed since the primary located it: ask for the bytes.
                            None => {
                                self.held.lock().expect("leases").forget(key);
                                vec![
                                    self.env
                                        .forward_read(primary, view.epoch, volume, off, n)
                                        .await?,
                                ]
                            }
                        }
                    }
                }
            };
            let got: usize = part.iter().map(Vec::len).sum();
            if got as u64 != n {
                return Err(VolError::Peer(format!(
                    "primary {primary} returned {got} bytes for a {n}-byte read"
                )));
            }
            out.extend(part);
        }
        Ok(out)
    }

    /// Reads the parts a primary located, from their holders, one buffer per part; `None`
    /// when any holder fails or no longer has the copy named.
    async fn read_located(&self, view: &ClusterView, parts: &[ReadPart]) -> Option<Vec<Vec<u8>>> {
        self.read_parts(view, parts).await.into_iter().collect()
    }

    /// Each of `parts` (zeros for [`Want::Zero`]), or `None` where its holder is down, fails
    /// or no longer has the copy named.
    async fn read_parts(&self, view: &ClusterView, parts: &[ReadPart]) -> Vec<Option<Vec<u8>>> {
        let reads = parts.iter().map(|p| async move {
            let len = p.read.len as usize;
            if p.read.want == Want::Zero {
                return Some(zeros(len));
            }
            if !view.reachable(p.holder) {
                return None;
            }
            let copies = self
                .env
                .read_range(p.holder, view.epoch, p.addr, p.read.clone())
                .await
                .ok()?;
            copies
                .into_iter()
                .find(|c| c.data.len() == len)
                .map(|c| c.data)
        });
        futures::future::join_all(reads).await
    }

    /// The primary's answer to a host read another controller forwarded: where the bytes
    /// are ([`ReadAnswer::Located`]: the state's copy of each column range, as of now) when
    /// some are held elsewhere than here and every column needed is healthy; otherwise the
    /// bytes. A located read is linearized here: the copies named are those of the state
    /// current now, and holders keep them until two newer writes (the asker falls back to the
    /// bytes if one is gone).
    ///
    /// # Errors
    /// See [`VolError`].
    pub async fn primary_locate(
        &self,
        asker: ControllerId,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<ReadAnswer> {
        let (view, vol) = self.as_primary(epoch, volume, offset, len)?;
        self.lease_gate(&view, &vol, offset, len).await?;
        let mut parts = Vec::new();
        let mut healthy = true;
        let spans = vol.meta.layout.spans(offset, len);
        for span in &spans {
            let g = vol.global_row(span.extent, span.row);
            let _row = vol.rows.lock(g, g + 1).await;
            self.still(epoch)?;
            let meta = self.row_meta(&view, &vol, span.extent, span.row).await?;
            for (c, from, n) in vol.span_columns(span) {
                let copy = meta
                    .current_copy(c)
                    .filter(|_| view.reachable(vol.meta.placement[span.extent as usize][c]));
                let Some(want) = copy else {
                    healthy = false;
                    break;
                };
                parts.push(Self::part(&vol, span, c, want, from, n));
            }
            if !healthy {
                break;
            }
        }
        let elsewhere = parts
            .iter()
            .any(|p| p.holder != self.id && p.read.want != Want::Zero);
        if healthy && elsewhere {
            // A lease covers one extent: the rows this read spans, when it spans one.
            let lease = match (spans.first(), spans.last()) {
                (Some(a), Some(b)) if a.extent == b.extent => {
                    self.grant(&view, &vol, asker, a.extent, a.row..b.row + 1)
                }
                _ => None,
            };
            return Ok(ReadAnswer::Located(parts, lease));
        }
        self.primary_read(epoch, volume, offset, len)
            .await
            .map(ReadAnswer::Data)
    }

    /// Checks that this controller may act as primary for `[offset, offset+len)` at `epoch`.
    fn as_primary(
        &self,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<(Arc<ClusterView>, Arc<Vol>)> {
        let g = self.lock();
        let expired = g.lease_until.is_some_and(|u| std::time::Instant::now() > u);
        if g.fenced || expired {
            return Err(VolError::Fenced);
        }
        if g.view.epoch != epoch {
            return Err(VolError::Epoch {
                ours: g.view.epoch,
                theirs: epoch,
            });
        }
        let vol = g
            .volumes
            .get(&volume)
            .cloned()
            .ok_or(VolError::NoVolume(volume))?;
        if offset
            .checked_add(len)
            .is_none_or(|e| e > vol.meta.layout.size_bytes)
        {
            return Err(VolError::OutOfRange { offset, len });
        }
        for (e, ..) in Self::extent_parts(&vol, offset, len) {
            if g.view.primary(&vol.meta.placement[e as usize]) != Some(self.id) {
                return Err(VolError::NotPrimary(e));
            }
        }
        Ok((g.view.clone(), vol))
    }

    /// Re-checks the epoch after waiting for a row lock.
    fn still(&self, epoch: u64) -> Result<()> {
        let ours = self.lock().view.epoch;
        if ours == epoch {
            Ok(())
        } else {
            Err(VolError::Epoch {
                ours,
                theirs: epoch,
            })
        }
    }

    /// The primary's write of a range inside extents it leads (local or forwarded).
    ///
    /// # Errors
    /// See [`VolError`].
    pub async fn primary_write(
        &self,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let (view, vol) = self.as_primary(epoch, volume, offset, data.len() as u64)?;
        self.lease_gate(&view, &vol, offset, data.len() as u64)
            .await?;
        // Rows are independent (each under its own lock): a multi-row write commits them
        // concurrently, so its latency is one row's, not the sum.
        let rows = vol
            .meta
            .layout
            .spans(offset, data.len() as u64)
            .into_iter()
            .map(|span| {
                let (view, vol) = (&view, &vol);
                async move {
                    let bytes = &data[span.request_offset as usize..][..span.len as usize];
                    self.gathered_write(epoch, view, vol, span, bytes).await
                }
            });
        futures::future::join_all(rows)
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()?;
        Ok(())
    }

    /// Writes `bytes` into `span`'s row, together with the writes that queue for the row
    /// meanwhile (see [`crate::gather`]): the first write leads, may yield once so writes
    /// already received can queue (below), takes the row lock and commits
    /// its bytes and every queued write's, merged into runs, one row write per run; then
    /// hands the turn to whatever queued since. A write queued behind a leader gets the
    /// outcome of the run it was merged into. Only a write that fills a column but not its row
    /// yields, and only when other writes are in progress at this primary (at queue depth 1
    /// nothing could join it).
    async fn gathered_write(
        &self,
        epoch: u64,
        view: &ClusterView,
        vol: &Vol,
        span: RowSpan,
        bytes: &[u8],
    ) -> Result<()> {
        let g = vol.global_row(span.extent, span.row);
        let at = span.offset_in_row as usize;
        let active = vol.gather.enter();
        let lead = match vol.gather.join((g, epoch), at, bytes) {
            Joined::Lead(lead) => lead,
            Joined::Wait(w) => match w.wait().await {
                Some(Outcome::Done(r)) => return r,
                Some(Outcome::Lead(lead)) => lead,
                None => {
                    return Err(VolError::Peer(
                        "the write this one was committed with was cancelled; whether it landed is unknown".into(),
                    ))
                }
            },
        };
        // Waiting for company pays only for a write that fills a column but not the row: the
        // rest of the row may be on its way. Smaller writes still gather with whatever
        // queues while the row is being written.
        let cb = vol.chunk();
        let fills_column = at.div_ceil(cb) * cb + cb <= at + bytes.len();
        if fills_column && bytes.len() < vol.k() * cb && active.others() {
            tokio::task::yield_now().await;
        }
        let _row = vol.rows.lock(g, g + 1).await;
        let queued = lead.take();
        if queued.is_empty() {
            return self.load_and_write_row(epoch, view, vol, span, bytes).await;
        }
        self.stats.lock().expect("stats").gathered_writes += queued.len() as u64;
        let writes =
            std::iter::once((at, bytes.to_vec(), None)).chain(queued.into_iter().map(|mut q| {
                let b = std::mem::take(&mut q.bytes);
                (q.at, b, Some(q))
            }));
        let mut own = Ok(());
        for run in merge(writes) {
            let span = RowSpan {
                offset_in_row: run.at as u32,
                len: run.bytes.len() as u32,
                request_offset: 0,
                ..span
            };
            let done = self
                .load_and_write_row(epoch, view, vol, span, &run.bytes)
                .await;
            for tag in run.tags {
                match tag {
                    Some(q) => q.answer(done.clone()),
                    None => own = done.clone(),
                }
            }
        }
        own
    }

    /// Writes `bytes` into `span`'s row at the row's current state (row lock held), unless
    /// the epoch moved on.
    async fn load_and_write_row(
        &self,
        epoch: u64,
        view: &ClusterView,
        vol: &Vol,
        span: RowSpan,
        bytes: &[u8],
    ) -> Result<()> {
        self.still(epoch)?;
        let meta = self.row_meta(view, vol, span.extent, span.row).await?;
        self.write_row(view, vol, span, meta, bytes).await
    }

    /// The primary's read of a range inside extents it leads, as one buffer (a forwarded
    /// read's answer).
    ///
    /// # Errors
    /// See [`VolError`].
    pub async fn primary_read(
        &self,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        self.primary_read_segments(epoch, volume, offset, len)
            .await
            .map(join)
    }

    /// The primary's read of a range inside extents it leads: the column ranges in order, each
    /// the buffer its holder answered with.
    ///
    /// # Errors
    /// See [`VolError`].
    pub async fn primary_read_segments(
        &self,
        epoch: u64,
        volume: VolumeId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Vec<u8>>> {
        let (view, vol) = self.as_primary(epoch, volume, offset, len)?;
        self.lease_gate(&view, &vol, offset, len).await?;
        // Rows are read concurrently, each under its own lock; each needs only the byte
        // ranges of the columns it covers.
        let rows = vol.meta.layout.spans(offset, len).into_iter().map(|span| {
            let (view, vol) = (&view, &vol);
            async move {
                let g = vol.global_row(span.extent, span.row);
                let _row = vol.rows.lock(g, g + 1).await;
                self.still(epoch)?;
                let meta = self.row_meta(view, vol, span.extent, span.row).await?;
                let need: Vec<(usize, Range<usize>)> = vol
                    .span_columns(&span)
                    .map(|(c, from, n)| (c, from as usize..(from + n) as usize))
                    .collect();
                let mut cols = self
                    .read_cols(view, vol, span.extent, span.row, &meta, &need)
                    .await?;
                Ok::<_, VolError>(
                    need.into_iter()
                        .map(|(c, _)| cols[c].take().expect("requested column"))
                        .collect::<Vec<_>>(),
                )
            }
        });
        let mut out = Vec::new();
        for row in futures::future::join_all(rows).await {
            out.extend(row?);
        }
        Ok(out)
    }

    /// Bytes `[from, from+len)` of data column `c` of `span`'s row, copy `want`, at its holder.
    fn part(vol: &Vol, span: &RowSpan, c: usize, want: Want, from: u32, len: u32) -> ReadPart {
        ReadPart {
            holder: vol.meta.placement[span.extent as usize][c],
            addr: Self::addr(vol, span.extent, span.row, c),
            read: RangeRead {
                want,
                off: from,
                len,
            },
        }
    }

    fn addr(vol: &Vol, extent: u64, row: u32, pos: usize) -> ChunkAddr {
        ChunkAddr {
            volume: vol.meta.id,
            extent,
            row,
            pos: pos as u8,
        }
    }

    /// Reads every copy at `pos`, or `None` when its holder is down or fails.
    async fn read_pos(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        pos: usize,
    ) -> Option<Vec<Chunk>> {
        self.read_pos_range(view, vol, extent, row, pos, None).await
    }

    /// Part of the copies at `pos` (see [`RangeRead`]; every copy whole without one), or
    /// `None` when its holder is down or fails. Answer times feed the hedging threshold.
    async fn read_pos_range(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        pos: usize,
        read: Option<RangeRead>,
    ) -> Option<Vec<Chunk>> {
        let holder = vol.meta.placement[extent as usize][pos];
        if !view.reachable(holder) {
            return None;
        }
        let addr = Self::addr(vol, extent, row, pos);
        let t0 = std::time::Instant::now();
        let got = match read {
            None => self.env.read_chunk(holder, view.epoch, addr).await,
            Some(read) => self.env.read_range(holder, view.epoch, addr, read).await,
        }
        .ok();
        if got.is_some() {
            self.latency.record(t0.elapsed());
        }
        got
    }

    /// The hedging threshold now (`None` until enough reads were seen).
    pub fn hedge_threshold(&self) -> Option<std::time::Duration> {
        self.latency.threshold()
    }

    /// Bytes `range` of data column `c` at state `meta`, from its holder (only the copy
    /// valid for the state is sent); `None` when the holder lacks it or fails.
    #[allow(clippy::too_many_arguments)]
    async fn read_col_range(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        meta: &RowMeta,
        c: usize,
        range: Range<usize>,
    ) -> Option<Vec<u8>> {
        if meta.is_zero(c) {
            return Some(zeros(range.len()));
        }
        let len = range.len();
        let read = RangeRead {
            want: Want::Version(meta.want(c)),
            off: u32::try_from(range.start).ok()?,
            len: u32::try_from(len).ok()?,
        };
        let copies = self
            .read_pos_range(view, vol, extent, row, c, Some(read))
            .await?;
        copies
            .into_iter()
            .find(|x| x.data.len() == len)
            .map(|x| x.data)
    }

    /// The row's state in this epoch: cached, or loaded from every reachable position.
    async fn row_meta(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
    ) -> Result<RowMeta> {
        {
            let mut c = vol.cache.lock().expect("row cache");
            if let Some(m) = c.rows_of(view.epoch).and_then(|r| r.get(&(extent, row))) {
                return Ok(m.clone());
            }
        }
        let meta = self.load_row(view, vol, extent, row).await?;
        self.cache_row(view, vol, extent, row, &meta);
        Ok(meta)
    }

    /// Drops the row's cached state (its next access loads it again, which may settle on
    /// another state: a write that failed may be rolled forward), and first has the extent's
    /// lessees drop their leases, which may name the state dropped.
    async fn forget_row(&self, view: &ClusterView, vol: &Vol, extent: u64, row: u32) {
        let lessees = self.row_changed(view, vol, extent, row, None);
        self.revoke(view, vol.meta.id, extent, lessees).await;
    }

    fn cache_row(&self, view: &ClusterView, vol: &Vol, extent: u64, row: u32, meta: &RowMeta) {
        let mut c = vol.cache.lock().expect("row cache");
        if let Some(rows) = c.rows_of(view.epoch) {
            rows.insert((extent, row), meta.clone());
        }
    }

    /// A write of the row has ended (`new`: the state it committed, to serve from now on;
    /// `None`: what the row holds is for a reload to settle). Returns the extent's lessees,
    /// whose leases must be gone before the write is answered: they are taken under the same
    /// lock as the state changes, so a grant either names the new state or is taken here.
    fn row_changed(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        new: Option<&RowMeta>,
    ) -> Vec<Lessee> {
        let mut c = vol.cache.lock().expect("row cache");
        if let Some(rows) = c.rows_of(view.epoch) {
            match new {
                Some(m) => rows.insert((extent, row), m.clone()),
                None => rows.remove(&(extent, row)),
            };
        }
        if self.env.read_lease_ttl().is_none() {
            return Vec::new();
        }
        c.grants.extent(extent).take_for_change(self.env.now())
    }

    /// Has every lessee in `lessees` drop its lease on `extent`: asked (concurrently), or,
    /// when one does not answer first, its lease waited out.
    async fn revoke(
        &self,
        view: &ClusterView,
        volume: VolumeId,
        extent: u64,
        lessees: Vec<Lessee>,
    ) {
        if lessees.is_empty() {
            return;
        }
        self.stats.lock().expect("stats").leases_revoked += lessees.len() as u64;
        // A primary never leases to itself (see `grant`), so every lessee is a peer.
        let calls = lessees.into_iter().map(|l| async move {
            let ask = self.env.revoke_leases(l.id, view.epoch, volume, extent);
            let out = self.env.wait_until(l.until);
            futures::pin_mut!(ask, out);
            if let futures::future::Either::Left((Err(_), _)) =
                futures::future::select(ask, out.as_mut()).await
            {
                out.await;
            }
        });
        futures::future::join_all(calls).await;
    }

    /// Drops this controller's read leases on `extent` of `volume` (the primary revokes
    /// them); replies to requests sent before this carry no lease that would be installed.
    pub fn revoke_leases(&self, volume: VolumeId, extent: u64) {
        self.held.lock().expect("leases").revoke((volume, extent));
    }

    /// Waits, before primary work on `[offset, offset+len)` in `view`'s epoch, until no
    /// read lease of an older epoch on those extents can be in use: this controller's own
    /// older lessees are revoked (or waited out), and an extent it newly leads (or any, right
    /// after it started) waits one lease period, since others' grants are unknown to it.
    async fn lease_gate(&self, view: &ClusterView, vol: &Vol, offset: u64, len: u64) -> Result<()> {
        let Some(ttl) = self.env.read_lease_ttl() else {
            return Ok(());
        };
        for (e, ..) in Self::extent_parts(vol, offset, len) {
            let (older, wait) = {
                let mut c = vol.cache.lock().expect("row cache");
                let g = c.grants.extent(e);
                if g.ready >= view.epoch {
                    continue;
                }
                let now = self.env.now();
                let older = g.take_older(view.epoch, now);
                let wait = g
                    .gate
                    .into_iter()
                    .chain([self.started + ttl])
                    .max()
                    .filter(|t| *t > now);
                (older, wait)
            };
            self.revoke(view, vol.meta.id, e, older).await;
            if let Some(t) = wait {
                self.env.wait_until(t).await;
            }
            self.still(view.epoch)?;
            let mut c = vol.cache.lock().expect("row cache");
            let g = c.grants.extent(e);
            g.ready = g.ready.max(view.epoch);
        }
        Ok(())
    }

    /// A lease for controller `asker` on rows `rows` of `extent` (which it asked to read)
    /// and up to [`READAHEAD_ROWS`] rows after them: the rows whose state is known here,
    /// with every data column current at a reachable holder. `None` when leases are off,
    /// the extent changed within a lease period, or no row qualifies.
    fn grant(
        &self,
        view: &ClusterView,
        vol: &Vol,
        asker: ControllerId,
        extent: u64,
        rows: Range<u32>,
    ) -> Option<ReadLease> {
        let ttl = self.env.read_lease_ttl()?;
        let k = vol.k();
        let set = &vol.meta.placement[extent as usize];
        if asker == self.id || !set[..k].iter().all(|h| view.reachable(*h)) {
            return None;
        }
        let quiet = self.env.read_lease_quiet().unwrap_or(ttl);
        let now = self.env.now();
        let mut c = vol.cache.lock().expect("row cache");
        if c.epoch != view.epoch || !c.grants.extent(extent).may_grant(view.epoch, now, quiet) {
            return None;
        }
        let last = rows
            .end
            .saturating_add(READAHEAD_ROWS)
            .min(vol.meta.layout.geometry.rows_per_extent);
        let granted: Vec<(u32, Vec<Want>)> = (rows.start..last)
            .filter_map(|r| {
                let m = c.rows.get(&(extent, r))?;
                let wants: Option<Vec<Want>> = (0..k).map(|col| m.current_copy(col)).collect();
                wants.map(|w| (r, w))
            })
            .collect();
        if granted.is_empty() {
            return None;
        }
        c.grants.extent(extent).grant(asker, view.epoch, now + ttl);
        Some(ReadLease {
            extent,
            ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            rows: granted,
        })
    }

    /// A host read of `[off, off+n)` inside `extent` served under this controller's read
    /// lease, when it holds one for every row and every copy named is still there.
    ///
    /// A whole row whose data this controller does not hold but one of whose parity chunks it
    /// does is read with one chunk fewer from other controllers: the parity copy of the
    /// leased state (the one computed from the column versions the lease names) is read
    /// here and the last other-held data column decoded from it. A parity copy is valid for
    /// a state exactly when its column vector is the state's, so the decoded bytes are the
    /// leased state's; when the copy is not here (its parity is behind, or two newer writes
    /// replaced it) that column is fetched from its holder after all.
    async fn read_leased(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        off: u64,
        n: u64,
    ) -> Option<Vec<Vec<u8>>> {
        self.env.read_lease_ttl()?;
        let spans = vol.meta.layout.spans(off, n);
        let key = (vol.meta.id, extent);
        let wants = self.held.lock().expect("leases").rows(
            key,
            view.epoch,
            spans.iter().map(|s| s.row),
            self.env.now(),
        )?;
        let (k, cb) = (vol.k(), vol.chunk());
        let set = &vol.meta.placement[extent as usize];
        let own_parity = (k..vol.width()).find(|&p| set[p] == self.id);
        let mut parts = Vec::new();
        // Per piece of the answer, in order: a part read as is, or a column of a decode.
        let mut plan = Vec::new();
        let mut decodes: Vec<LocalDecode> = Vec::new();
        for (span, wants) in spans.iter().zip(&wants) {
            if span.extent != extent {
                return None;
            }
            let whole = span.offset_in_row == 0 && span.len as usize == k * cb;
            let decode = own_parity.filter(|_| whole).and_then(|p| {
                let skip = (0..k)
                    .rev()
                    .find(|&c| set[c] != self.id && wants[c] != Want::Zero)?;
                Some((p, skip))
            });
            let Some((parity, skip)) = decode else {
                for (c, from, len) in vol.span_columns(span) {
                    plan.push(Piece::Part(parts.len()));
                    parts.push(Self::part(vol, span, c, wants[c].clone(), from, len));
                }
                continue;
            };
            let mut at = vec![None; vol.width()];
            for c in 0..k {
                plan.push(Piece::Decoded(decodes.len(), c));
                if c != skip {
                    at[c] = Some(parts.len());
                    parts.push(Self::part(vol, span, c, wants[c].clone(), 0, cb as u32));
                }
            }
            // The parity copy of the leased state: computed from these column versions.
            let cols_of_state = wants
                .iter()
                .map(|w| match w {
                    Want::Version(v) => *v,
                    _ => 0,
                })
                .collect();
            at[parity] = Some(parts.len());
            parts.push(ReadPart {
                holder: self.id,
                addr: Self::addr(vol, extent, span.row, parity),
                read: RangeRead {
                    want: Want::Cols(cols_of_state),
                    off: 0,
                    len: cb as u32,
                },
            });
            decodes.push(LocalDecode {
                parity: parts.len() - 1,
                at,
                skip,
                fallback: Self::part(vol, span, skip, wants[skip].clone(), 0, cb as u32),
            });
        }
        let mut got = self.read_parts(view, &parts).await;
        let mut decoded = Vec::with_capacity(decodes.len());
        let mut fetched = Vec::new();
        for d in &decodes {
            if got[d.parity].is_none() {
                fetched.push(d.fallback.clone());
            }
        }
        // In the order of `decodes`, one for each decode whose parity copy was not here.
        let mut fetched = self.read_parts(view, &fetched).await.into_iter();
        let mut from_parity = 0;
        for d in decodes {
            let parity_here = got[d.parity].is_some();
            let mut shards: Vec<Option<Vec<u8>>> =
                d.at.iter().map(|i| i.and_then(|i| got[i].take())).collect();
            if !parity_here {
                // The column comes from its holder instead.
                shards[d.skip] = fetched.next().flatten();
                if shards[..k].iter().any(Option::is_none) {
                    return self.lease_failed(key);
                }
            } else {
                if vol.codec.reconstruct(&mut shards).is_err() {
                    return self.lease_failed(key);
                }
                from_parity += 1;
            }
            shards.truncate(k);
            decoded.push(shards);
        }
        let mut out = Vec::with_capacity(plan.len());
        for piece in plan {
            let bytes = match piece {
                Piece::Part(i) => got[i].take(),
                Piece::Decoded(d, c) => decoded[d][c].take(),
            };
            match bytes {
                Some(b) => out.push(b),
                None => return self.lease_failed(key),
            }
        }
        let mut st = self.stats.lock().expect("stats");
        st.leased_reads += 1;
        st.leased_rows_decoded += from_parity;
        Some(out)
    }

    /// A leased read found a copy the lease names gone: the lease is dropped, and the read
    /// goes to the primary.
    fn lease_failed(&self, key: (VolumeId, u64)) -> Option<Vec<Vec<u8>>> {
        self.held.lock().expect("leases").forget(key);
        None
    }

    /// Reads every position and settles the row's current state (see the module doc).
    async fn load_row(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
    ) -> Result<RowMeta> {
        let (k, n, cb) = (vol.k(), vol.width(), vol.chunk());
        let reads = (0..n).map(|p| self.read_pos(view, vol, extent, row, p));
        let copies: Vec<Option<Vec<Chunk>>> = futures::future::join_all(reads).await;
        // Marked positions missed a write: their copies may be read (versions are checked)
        // but never vouch for which state is the newest.
        let intent = self.env.row_intent(vol.meta.id, extent, row);
        // A position whose move has not reached this row is a new holder without the row yet:
        // like a marked one, it never vouches.
        let (marked, mark_floor) = (intent.marked | intent.moving, intent.floor);
        // Every chunk names the newest acknowledged version its writer knew of.
        let acked = copies
            .iter()
            .flatten()
            .flatten()
            .map(|c| c.acked)
            .max()
            .unwrap_or(0);
        let floor = mark_floor.max(acked).max(intent.served);
        // Candidate states (distinct column-version vectors), newest first; "never written"
        // is always a candidate.
        let mut cands: Vec<(u64, Vec<u64>)> = copies
            .iter()
            .flatten()
            .flatten()
            .filter(|c| c.cols.len() == k)
            .map(|c| {
                let newest_col = c.cols.iter().copied().max().unwrap_or(0);
                (c.version.max(newest_col), c.cols.clone())
            })
            .collect();
        cands.push((0, vec![0; k]));
        cands.sort_by_key(|c| std::cmp::Reverse(c.0));
        let mut seen = std::collections::HashSet::new();
        cands.retain(|c| seen.insert(c.1.clone()));
        let mut best = 0;
        let mut rolled_back = false;
        for (version, cols) in cands {
            // States are compared by content: the newest data version they include (a repair
            // re-commits a state's content under a new parity version).
            let content = cols.iter().copied().max().unwrap_or(0);
            if intent
                .repair
                .as_ref()
                .is_some_and(|(chosen, upto)| *chosen != cols && content <= *upto)
            {
                continue; // abandoned by an earlier repair
            }
            if content < floor {
                // A state at least `floor` was written; older ones are stale, whatever their
                // copies say. Without it the row cannot be served now.
                break;
            }
            let probe = RowMeta {
                version,
                cols,
                behind: 0,
                unknown: 0,
                acked,
                acked_cols: Vec::new(),
            };
            // A moving position's new holder answering "nothing here" is not evidence that
            // the column was never written: it vouches only with a real copy of the state.
            let valid = copies
                .iter()
                .enumerate()
                .filter(|(p, c)| {
                    c.as_ref().is_some_and(|c| {
                        if intent.moving & (1 << p) != 0 {
                            c.iter().any(|x| probe.valid(*p, x) && x.data.len() == cb)
                        } else {
                            probe.pick(*p, c, cb).is_some()
                        }
                    })
                })
                .count();
            best = best.max(valid);
            if valid < k {
                // Roll back past this state only when it provably never reached
                // `write_quorum` (so was never acknowledged): enough positions answered
                // without a valid copy. Otherwise holders that did not answer may hold it.
                // An acknowledged state's missing positions were all marked before the
                // acknowledgement, so an unmarked position without a valid copy also proves
                // the state was never acknowledged (a primary crashed mid-write).
                let lacking: Vec<usize> = (0..n)
                    .filter(|&p| {
                        copies[p]
                            .as_ref()
                            .is_some_and(|c| probe.pick(p, c, cb).is_none())
                    })
                    .collect();
                let unmarked_lacking = lacking.iter().any(|&p| marked & (1 << p) == 0);
                // So does a marked position the state's writer wrote (every parity position,
                // and a data column at the state's newest version), when every mark of the
                // row names a version below the state's content (checked below with
                // `content > floor`): acknowledging it would have marked that position with
                // the state's content first. A moving position's new holder proves nothing
                // (the state may have been written to the old holder). Without this, a
                // never-acknowledged write that reached one data column, while the parity
                // write failed and the other column was moving, left a row nothing could
                // settle (found by the simulation, four controllers, k=2, m=1).
                let written_lacking = lacking.iter().any(|&p| {
                    intent.moving & (1 << p) == 0 && probe.cols.get(p).is_none_or(|&v| v == content)
                });
                let refuted = unmarked_lacking
                    || written_lacking
                    || lacking.len() > n - vol.meta.layout.geometry.write_quorum;
                // A state a later chunk or a mark says was acknowledged is never rolled back.
                if refuted && content > floor {
                    rolled_back = true;
                    continue;
                }
                return Err(VolError::TooFewShards {
                    have: valid,
                    need: k,
                });
            }
            let mut meta = probe;
            meta.behind = marked;
            for (p, c) in copies.iter().enumerate() {
                match c {
                    None if marked & (1 << p) == 0 => meta.unknown |= 1 << p,
                    None => {}
                    Some(c) if !meta.newest_valid(p, c) => meta.behind |= 1 << p,
                    Some(_) => {}
                }
            }
            if rolled_back {
                // Copies of a newer, never-acknowledged state exist: re-commit this state at
                // a version above them, so no later load can mistake them for the newest.
                self.stats.lock().expect("stats").rows_behind_found += 1;
                let mut shards: Vec<Option<Vec<u8>>> = copies
                    .iter()
                    .enumerate()
                    .map(|(p, c)| c.as_ref().and_then(|c| meta.pick(p, c, cb)))
                    .collect();
                vol.codec
                    .reconstruct(&mut shards)
                    .map_err(|e| VolError::Peer(e.to_string()))?;
                let data: Vec<Vec<u8>> = shards
                    .into_iter()
                    .take(k)
                    .map(|s| s.expect("reconstructed"))
                    .collect();
                // Stale data columns get this state's content under its own versions (so
                // their copies stay valid for it); parity gets a new version above the
                // rolled-back state.
                let touched: Vec<usize> = (0..k).filter(|&c| meta.is_behind(c)).collect();
                // Everything issued before now, seen here or not, is below a fresh version.
                let upto = self.new_version(view, &meta);
                self.env
                    .record_repair(
                        vol.meta.id,
                        extent,
                        row,
                        meta.cols.clone(),
                        upto,
                        view.epoch,
                    )
                    .await?;
                let mut meta = self
                    .commit_row(view, vol, extent, row, &meta, &touched, data, false)
                    .await?;
                // Served from now on, so never rolled back: later writes say so.
                meta.acked = meta.acked.max(content);
                meta.acked_cols = meta.cols.clone();
                return Ok(meta);
            }
            // A state no chunk yet calls acknowledged is about to be served: the log records
            // that the row is at least this new, so no later load rolls it back. Before that,
            // reachable positions that are behind are marked for resync (again, if marked
            // already, so their marks name this state): marks first, so a crash between the
            // two never leaves a served state with a lagging holder unmarked.
            // (A moving position is copied by its move, not marked.) Serving a new state that
            // fewer than `write_quorum` answering positions hold (so it may never have been
            // acknowledged, and holders that did not answer may lack it unmarked) also marks
            // those holders: a mark is what keeps planned moves off the extent until resync has
            // checked them (found by the simulation: a drain among faults took away one of the
            // only `k` copies of such a row). A state held by a quorum is as safe as an
            // acknowledged write, and reading rows during an outage marks nothing.
            let serve_new = content > floor;
            let thin = valid < vol.meta.layout.geometry.write_quorum;
            let to_mark: Vec<usize> = (0..n)
                .filter(|&p| intent.moving & (1 << p) == 0)
                .filter(|&p| {
                    (copies[p].is_some() && meta.is_behind(p))
                        || (serve_new && thin && meta.is_unknown(p))
                })
                .collect();
            let mut newly_marked = 0;
            for p in to_mark {
                self.mark(view, vol, extent, row, p, meta.content()).await?;
                meta.behind |= 1 << p;
                meta.unknown &= !(1 << p);
                newly_marked += 1;
            }
            if serve_new {
                self.env
                    .record_served(vol.meta.id, extent, row, content, view.epoch)
                    .await?;
            }
            if newly_marked > 0 {
                self.stats.lock().expect("stats").rows_behind_found += 1;
            }
            // Served from now on, so never rolled back: later writes say so.
            meta.acked = meta.acked.max(content);
            meta.acked_cols = meta.cols.clone();
            return Ok(meta);
        }
        Err(VolError::TooFewShards {
            have: best,
            need: k,
        })
    }

    /// Byte ranges of data columns of the row at state `meta` (`need`: column and range in
    /// it): straight from their holders, or reconstructed when any is behind, down or
    /// failing. Entry `c` of the result is column `c`'s range when asked for, else `None`.
    async fn read_cols(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        meta: &RowMeta,
        need: &[(usize, Range<usize>)],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let mut out: Vec<Option<Vec<u8>>> = vec![None; vol.k()];
        let direct = need.iter().map(|(c, range)| async move {
            if meta.is_behind(*c) {
                return (*c, None);
            }
            let got = self
                .read_col_range(view, vol, extent, row, meta, *c, range.clone())
                .await;
            (*c, got)
        });
        let direct = futures::future::join_all(direct);
        let answers = match self.latency.threshold() {
            None => direct.await,
            Some(after) => {
                // A holder slower than the threshold: also decode the row from the others;
                // the first complete answer wins and the other is dropped (its replies are
                // discarded when they arrive).
                futures::pin_mut!(direct);
                match futures::future::select(direct.as_mut(), self.env.sleep(after)).await {
                    futures::future::Either::Left((answers, _)) => answers,
                    futures::future::Either::Right(((), direct)) => {
                        self.stats.lock().expect("stats").hedged_reads += 1;
                        let hedge = self.reconstruct(view, vol, extent, row, meta);
                        futures::pin_mut!(hedge);
                        match futures::future::select(direct, hedge).await {
                            futures::future::Either::Left((answers, _)) => answers,
                            futures::future::Either::Right((Ok(full), _)) => {
                                self.stats.lock().expect("stats").hedges_won += 1;
                                for (c, range) in need {
                                    out[*c] = Some(full[*c][range.clone()].to_vec());
                                }
                                return Ok(out);
                            }
                            futures::future::Either::Right((Err(_), direct)) => direct.await,
                        }
                    }
                }
            }
        };
        let mut missing = false;
        for (c, d) in answers {
            missing |= d.is_none();
            out[c] = d;
        }
        if missing {
            let full = self.reconstruct(view, vol, extent, row, meta).await?;
            for (c, range) in need {
                if out[*c].is_none() {
                    out[*c] = Some(full[*c][range.clone()].to_vec());
                }
            }
        }
        Ok(out)
    }

    /// Every column of the row at state `meta`, decoded from the first `k` valid answers of
    /// all positions.
    async fn reconstruct(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        meta: &RowMeta,
    ) -> Result<Vec<Vec<u8>>> {
        let (k, n, cb) = (vol.k(), vol.width(), vol.chunk());
        self.stats.lock().expect("stats").degraded_reads += 1;
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; n];
        let mut have = 0;
        // Behind positions are asked too: their older slot may still hold a valid copy (every
        // copy is checked against the version the state wants).
        let mut order: Vec<usize> = (0..n).filter(|&p| !meta.is_behind(p)).collect();
        order.extend((0..n).filter(|&p| meta.is_behind(p)));
        let mut pending: FuturesUnordered<_> = order
            .into_iter()
            .map(|p| async move {
                if meta.is_zero(p) {
                    return (p, Some(zeros(cb)));
                }
                let got = self.read_pos(view, vol, extent, row, p).await;
                (p, got.and_then(|copies| meta.pick(p, &copies, cb)))
            })
            .collect();
        while let Some((p, d)) = pending.next().await {
            if let Some(d) = d {
                shards[p] = Some(d);
                have += 1;
                if have == k {
                    break; // first k win; the rest are dropped
                }
            }
        }
        drop(pending);
        if have < k {
            return Err(VolError::TooFewShards { have, need: k });
        }
        vol.codec
            .reconstruct(&mut shards)
            .map_err(|e| VolError::Peer(e.to_string()))?;
        Ok(shards
            .into_iter()
            .map(|s| s.expect("reconstructed"))
            .collect())
    }

    /// Writes `bytes` into the row described by `span` (row lock held).
    async fn write_row(
        &self,
        view: &ClusterView,
        vol: &Vol,
        span: RowSpan,
        meta: RowMeta,
        bytes: &[u8],
    ) -> Result<()> {
        let cb = vol.chunk();
        let start = span.offset_in_row as usize;
        let end = start + span.len as usize;
        let first = start / cb;
        let last = (end - 1) / cb;
        // A write inside one column of a row every position holds patches it: the column's
        // old bytes are read, and only the new bytes and the parity change travel; unless
        // whole chunks move fewer bytes between controllers (a whole column written where
        // the other columns are held here).
        let delta = first == last
            && meta.behind == 0
            && meta.unknown == 0
            && start.is_multiple_of(DELTA_ALIGN)
            && end.is_multiple_of(DELTA_ALIGN)
            && self.patching_is_cheaper(vol, span.extent, first, end - start);
        let patched = if delta {
            self.commit_delta(
                view,
                vol,
                span.extent,
                span.row,
                &meta,
                first,
                start - first * cb,
                bytes,
            )
            .await
        } else {
            Ok(None)
        };
        let commit = match patched {
            Ok(Some(new)) => Ok(new),
            Err(e) => Err(e),
            Ok(None) => self.write_row_whole(view, vol, span, &meta, bytes).await,
        };
        let mut new = match commit {
            Ok(new) => new,
            Err(e) => {
                // Some chunks may have landed: what the row holds now is for a reload to
                // settle, not the state cached before this write (a reload may settle on
                // this write, so read leases go too).
                self.forget_row(view, vol, span.extent, span.row).await;
                return Err(e);
            }
        };
        let holding = new.holding(vol.width());
        let quorum = vol.meta.layout.geometry.write_quorum;
        if holding >= quorum {
            new.acked = new.content();
            new.acked_cols = new.cols.clone();
        }
        // With too few copies to decode the new state, the next access reloads the row and
        // settles on the newest state that can be decoded (this write or the one before).
        let lessees = self.row_changed(
            view,
            vol,
            span.extent,
            span.row,
            (holding >= vol.k()).then_some(&new),
        );
        // No lessee may read the old state once the write is answered.
        self.revoke(view, vol.meta.id, span.extent, lessees).await;
        if holding < quorum {
            return Err(VolError::NoQuorum {
                have: holding,
                need: quorum,
            });
        }
        Ok(())
    }

    /// Whether a write of `len` bytes inside data column `c` of a row of `extent` moves no
    /// more bytes between controllers as patches (the new bytes to the column's holder and
    /// the old ones back, a parity delta to each parity holder) than as whole chunks (the
    /// other data columns read, and the column, the rest of a partly written column, and
    /// every parity column written whole). Holders that are this controller cost nothing:
    /// its own store is reached without the network. Both paths make the same copies, so
    /// this only chooses the cheaper one; ties go to patches, which also touch fewer bytes
    /// on the holders' disks.
    fn patching_is_cheaper(&self, vol: &Vol, extent: u64, c: usize, len: usize) -> bool {
        let set = &vol.meta.placement[extent as usize];
        let (k, cb) = (vol.k(), vol.chunk());
        let remote = |pos: usize| usize::from(set.get(pos).is_some_and(|&h| h != self.id));
        let parity: usize = (k..set.len()).map(remote).sum();
        let patch = 2 * len * remote(c) + len * parity;
        let others: usize = (0..k).filter(|&d| d != c).map(remote).sum();
        let rest = if len < cb { cb * remote(c) } else { 0 };
        let whole = cb * (others + remote(c) + parity) + rest;
        patch <= whole
    }

    /// Writes `bytes` into the row by writing whole chunks: the touched data columns (old
    /// content read where a column is only partly written) and every parity column,
    /// re-encoded from all data columns.
    async fn write_row_whole(
        &self,
        view: &ClusterView,
        vol: &Vol,
        span: RowSpan,
        meta: &RowMeta,
        bytes: &[u8],
    ) -> Result<RowMeta> {
        let (k, cb) = (vol.k(), vol.chunk());
        let start = span.offset_in_row as usize;
        let end = start + span.len as usize;
        let first = start / cb;
        let last = (end - 1) / cb;
        // Columns whose old content is needed: untouched ones (for parity) and partial ones.
        let need: Vec<(usize, Range<usize>)> = (0..k)
            .filter(|&c| {
                c < first
                    || c > last
                    || (c == first && !start.is_multiple_of(cb))
                    || (c == last && !end.is_multiple_of(cb))
            })
            .map(|c| (c, 0..cb))
            .collect();
        let mut cols = if need.is_empty() {
            vec![None; k]
        } else {
            self.read_cols(view, vol, span.extent, span.row, meta, &need)
                .await?
        };
        let mut data: Vec<Vec<u8>> = cols
            .iter_mut()
            .map(|c| c.take().unwrap_or_else(|| zeros(cb)))
            .collect();
        for c in first..=last {
            let from = (c * cb).max(start);
            let to = ((c + 1) * cb).min(end);
            data[c][from - c * cb..to - c * cb].copy_from_slice(&bytes[from - start..to - start]);
        }
        let touched: Vec<usize> = (first..=last).collect();
        self.commit_row(view, vol, span.extent, span.row, meta, &touched, data, true)
            .await
    }

    /// Writes `bytes` at offset `off` of data column `c` as patches: the column's holder
    /// replaces the range in its copy of `meta`'s state and answers with the bytes it
    /// replaced; then each parity holder applies its column's change (the codec's parity
    /// delta of old XOR new) to its copy of the state. The copies made are exactly those a
    /// whole-chunk write would make, and only the changed bytes travel. `None` when the data
    /// column's patch fails (the caller writes whole chunks instead).
    #[allow(clippy::too_many_arguments)]
    async fn commit_delta(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        meta: &RowMeta,
        c: usize,
        off: usize,
        bytes: &[u8],
    ) -> Result<Option<RowMeta>> {
        let (k, cb) = (vol.k(), vol.chunk());
        let version = self.new_version(view, meta);
        let mut new = meta.clone();
        new.version = version;
        new.cols[c] = version;
        let (chunk_len, off) = (cb as u32, off as u32);
        let patch = |p: usize, base: Want, op: PatchOp, data: Vec<u8>| Patch {
            base: if meta.is_zero(p) { Want::Zero } else { base },
            chunk_len,
            off,
            op,
            head: Chunk {
                version: new.want(p),
                cols: new.cols.clone(),
                acked: meta.acked,
                acked_cols: meta.acked_cols.clone(),
                data,
            },
        };
        let set = &vol.meta.placement[extent as usize];
        let send = |p: usize, patch: Patch| {
            let holder = set[p];
            let addr = Self::addr(vol, extent, row, p);
            async move {
                if !view.reachable(holder) {
                    return Err(ShardError::Unreachable(holder));
                }
                self.env.patch_chunk(holder, view.epoch, addr, patch).await
            }
        };
        // The data column's holder swaps in the new bytes and answers with the old ones.
        let data = patch(
            c,
            Want::Version(meta.want(c)),
            PatchOp::Replace,
            bytes.to_vec(),
        );
        let mut delta = match send(c, data).await {
            Ok(old) if old.len() == bytes.len() => old,
            other => {
                // Nothing is known to have landed: the whole-chunk path writes the row under
                // a newer version (reconstructing the column if its holder is gone).
                tracing::debug!(extent, row, pos = c, result = ?other.map(|o| o.len()), "patch of a data column failed; writing whole chunks");
                return Ok(None);
            }
        };
        for (d, b) in delta.iter_mut().zip(bytes) {
            *d ^= b;
        }
        let parity = vol
            .codec
            .parity_delta(c, &delta)
            .map_err(|e| VolError::Peer(e.to_string()))?;
        // Each parity holder XORs in its column's change.
        let sends = parity.into_iter().enumerate().map(|(j, d)| {
            let p = k + j;
            let sent = send(p, patch(p, Want::Cols(meta.cols.clone()), PatchOp::Xor, d));
            async move { (p, sent.await.map(|_| ())) }
        });
        let mut results = vec![(c, Ok(()))];
        results.extend(futures::future::join_all(sends).await);
        self.stats.lock().expect("stats").patched_writes += 1;
        self.settle(view, vol, extent, row, meta, new, results)
            .await
            .map(Some)
    }

    /// A version for a new state of a row: above its current state, and from this primary's
    /// counter for the epoch (a reload in the same epoch may not see every version issued), so
    /// above anything issued before, in this epoch or earlier ones.
    fn new_version(&self, view: &ClusterView, meta: &RowMeta) -> u64 {
        let next = self.next_version.fetch_add(1, Ordering::SeqCst) & 0xffff_ffff;
        (meta.version + 1).max(epoch_base(view.epoch) + next)
    }

    /// Encodes and writes a new state: the `touched` data columns (under a new version when
    /// `new_data`, else under the versions `meta` names for them, as repair does) and every
    /// parity column under a new version; positions not known to hold it afterwards are marked
    /// (durably) before returning.
    #[allow(clippy::too_many_arguments)]
    async fn commit_row(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        meta: &RowMeta,
        touched: &[usize],
        data: Vec<Vec<u8>>,
        new_data: bool,
    ) -> Result<RowMeta> {
        let (k, n, cb) = (vol.k(), vol.width(), vol.chunk());
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let mut parity = vec![zeros(cb); n - k];
        vol.codec
            .encode(&refs, &mut parity)
            .map_err(|e| VolError::Peer(e.to_string()))?;
        let version = self.new_version(view, meta);
        let mut new = meta.clone();
        new.version = version;
        if new_data {
            for &c in touched {
                new.cols[c] = version;
            }
        }
        let set = &vol.meta.placement[extent as usize];
        let mut payloads: Vec<Option<Vec<u8>>> = data.into_iter().map(Some).collect();
        payloads.extend(parity.into_iter().map(Some));
        let targets: Vec<usize> = touched.iter().copied().chain(k..n).collect();
        let sends = targets.iter().map(|&p| {
            let chunk = Chunk {
                version: new.want(p),
                cols: new.cols.clone(),
                acked: meta.acked,
                acked_cols: meta.acked_cols.clone(),
                data: payloads[p].take().expect("payload once"),
            };
            let holder = set[p];
            let addr = Self::addr(vol, extent, row, p);
            async move {
                if !view.reachable(holder) {
                    return (p, Err(ShardError::Unreachable(holder)));
                }
                (
                    p,
                    self.env.write_chunk(holder, view.epoch, addr, chunk).await,
                )
            }
        });
        let results = futures::future::join_all(sends).await;
        self.settle(view, vol, extent, row, meta, new, results)
            .await
    }

    /// Accounts for the writes of a new state `new` (from `meta`): positions whose write
    /// failed, and those not known to hold the state, are marked (durably) before returning.
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        meta: &RowMeta,
        mut new: RowMeta,
        results: Vec<(usize, std::result::Result<(), ShardError>)>,
    ) -> Result<RowMeta> {
        let n = vol.width();
        let mut missed = Vec::new();
        for (p, r) in results {
            new.unknown &= !(1 << p);
            match r {
                Ok(()) => new.behind &= !(1 << p),
                Err(e) => {
                    tracing::debug!(extent, row, pos = p, error = %e, "shard write missed; marking write intent");
                    new.behind |= 1 << p;
                    missed.push(p);
                }
            }
        }
        // A mark tells later loads that the row's state is at least what it names: this write
        // when it is acknowledged, else the newest state already acknowledged or served (an
        // unacknowledged write may still be rolled back, and holders do not protect its
        // copies).
        let floor = if new.holding(n) >= vol.meta.layout.geometry.write_quorum {
            new.content()
        } else {
            meta.acked
        };
        // Every position not known to hold the new state is marked, not only the targets that
        // failed: an untouched column that did not answer when the row was loaded may be stale,
        // and later loads rely on "unmarked and lacking it" proving a state was never
        // acknowledged.
        missed.extend((0..n).filter(|&p| new.is_unknown(p)));
        new.behind |= new.unknown;
        new.unknown = 0;
        for p in missed {
            self.mark(view, vol, extent, row, p, floor).await?;
        }
        Ok(new)
    }

    /// Records durably that position `pos` of a row missed state `missed`.
    async fn mark(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        pos: usize,
        missed: u64,
    ) -> Result<()> {
        let mark = IntentMark {
            volume: vol.meta.id,
            extent,
            row,
            pos: pos as u8,
        };
        self.env.mark_intent(mark, missed, view.epoch).await
    }

    /// A chunk read from a peer (or this controller) at `epoch`.
    ///
    /// # Errors
    /// [`ShardError::StaleEpoch`] when the sender is behind; device errors.
    pub async fn handle_read_chunk(
        &self,
        epoch: u64,
        addr: ChunkAddr,
    ) -> std::result::Result<Vec<Chunk>, ShardError> {
        self.admit(epoch)?;
        self.store.read(addr).await
    }

    /// A chunk write from the extent's primary at `epoch`.
    ///
    /// # Errors
    /// [`ShardError::StaleEpoch`] when the sender is behind; device errors.
    pub async fn handle_write_chunk(
        &self,
        epoch: u64,
        addr: ChunkAddr,
        chunk: Chunk,
    ) -> std::result::Result<(), ShardError> {
        self.admit(epoch)?;
        self.store.write(addr, chunk).await
    }

    /// A ranged chunk read (see [`RangeRead`]) from a peer or this controller at `epoch`: only
    /// the range of the wanted copies is read and returned, checked by the store (per sector).
    ///
    /// # Errors
    /// [`ShardError::StaleEpoch`] when the sender is behind; device errors.
    pub async fn handle_read_range(
        &self,
        epoch: u64,
        addr: ChunkAddr,
        read: RangeRead,
    ) -> std::result::Result<Vec<Chunk>, ShardError> {
        self.admit(epoch)?;
        self.store.read_range(addr, read).await
    }

    /// A patch (see [`Patch`]) from the extent's primary at `epoch`: the base copy is read
    /// here, so only the changed bytes crossed the network; the store reads and writes the
    /// chunk once, under its per-chunk lock. Returns the bytes the patch replaced.
    ///
    /// # Errors
    /// [`ShardError::StaleEpoch`] when the sender is behind; [`ShardError::Mismatch`] when
    /// the base copy is not here or the patch does not fit the volume's chunks; device errors.
    pub async fn handle_patch_chunk(
        &self,
        epoch: u64,
        addr: ChunkAddr,
        patch: Patch,
    ) -> std::result::Result<Vec<u8>, ShardError> {
        self.admit(epoch)?;
        // The chunk length comes from the volume, never from the request alone (a patch
        // from zeros allocates it).
        let chunk = self.lock().volumes.get(&addr.volume).map(|v| v.chunk());
        if chunk != Some(patch.chunk_len as usize) {
            return Err(ShardError::Mismatch(format!(
                "patch for {}-byte chunks of volume {}, which has {chunk:?}",
                patch.chunk_len, addr.volume
            )));
        }
        self.store.patch(addr, patch).await
    }

    /// Refuses epochs below the highest seen; remembers newer ones (a newer primary fences
    /// older ones at this holder from its first request on).
    fn admit(&self, epoch: u64) -> std::result::Result<(), ShardError> {
        let seen = self.seen_epoch.fetch_max(epoch, Ordering::SeqCst);
        if epoch < seen {
            return Err(ShardError::StaleEpoch {
                ours: seen,
                theirs: epoch,
            });
        }
        Ok(())
    }

    /// Re-reads every row of every extent this controller leads, settling each (rolling back
    /// or forward what a crashed primary left in flight) and marking positions found behind,
    /// so resync restores full redundancy even for rows no host touches. Run after taking
    /// over extents from a controller that went down. Returns the rows read.
    ///
    /// # Errors
    /// An epoch change stops the pass; it can simply be run again.
    pub async fn verify_led_rows(&self) -> Result<u64> {
        let (view, rows) = self.led_rows();
        let mut verified = 0;
        for (vol, e, row) in rows {
            let (_row, meta) = self.reload_row(&view, &vol, e, row).await?;
            verified += u64::from(meta.is_some());
        }
        Ok(verified)
    }

    /// Locks a row, forgets what this epoch cached of it and loads it again from every holder
    /// (marking positions found behind). `None` (logged) when too few holders answer; epoch
    /// changes are errors.
    async fn reload_row<'v>(
        &self,
        view: &ClusterView,
        vol: &'v Vol,
        extent: u64,
        row: u32,
    ) -> Result<(crate::range_lock::RangeGuard<'v>, Option<RowMeta>)> {
        let g = vol.global_row(extent, row);
        let guard = vol.rows.lock(g, g + 1).await;
        self.still(view.epoch)?;
        self.forget_row(view, vol, extent, row).await;
        match self.row_meta(view, vol, extent, row).await {
            Ok(meta) => Ok((guard, Some(meta))),
            Err(e @ VolError::Epoch { .. }) => Err(e),
            Err(err) => {
                tracing::warn!(extent, row, error = %err, "row could not be read from its holders");
                Ok((guard, None))
            }
        }
    }

    /// Every row of every volume whose extent this controller leads in the current view.
    fn led_rows(&self) -> (Arc<ClusterView>, Vec<LedRow>) {
        let (view, vols) = {
            let g = self.lock();
            (
                g.view.clone(),
                g.volumes.values().cloned().collect::<Vec<_>>(),
            )
        };
        let mut rows = Vec::new();
        for vol in vols {
            let rows_per_extent = vol.meta.layout.geometry.rows_per_extent;
            for (e, set) in vol.meta.placement.iter().enumerate() {
                if view.primary(set) == Some(self.id) {
                    rows.extend((0..rows_per_extent).map(|r| (vol.clone(), e as u64, r)));
                }
            }
        }
        (view, rows)
    }

    /// Scrubs every row this controller leads: reloads the row from every holder (each copy's
    /// checksum is checked where it is stored; a holder whose newest copy is damaged, missing
    /// or stale is marked behind in the write-intent log, for [`Self::resync`] to rewrite),
    /// then, for a row every holder holds, recomputes parity from the data columns and
    /// rewrites any parity copy that disagrees (data copies carry the host's bytes, so they
    /// are the reference). `after_row(done, total)` is awaited after each row: it reports
    /// progress and paces the pass (the caller sleeps there, so host I/O keeps its share).
    /// Call [`Self::resync`] afterwards to repair what was marked.
    ///
    /// # Errors
    /// An epoch change stops the pass (run it again); unreadable rows are counted, not fatal.
    pub async fn scrub(
        &self,
        after_row: &(dyn Fn(u64, u64) -> crate::shard::BoxFut<'static, ()> + Send + Sync),
    ) -> Result<ScrubCounts> {
        let (view, rows) = self.led_rows();
        let total = rows.len() as u64;
        let mut counts = ScrubCounts::default();
        for (vol, e, row) in rows {
            {
                let (_row, meta) = self.reload_row(&view, &vol, e, row).await?;
                match meta {
                    Some(meta) => {
                        counts.bad_chunks += u64::from(meta.behind.count_ones());
                        if meta.behind == 0 && meta.unknown == 0 && meta.content() != 0 {
                            counts.parity_rewritten +=
                                self.check_parity(&view, &vol, e, row, &meta).await?;
                        }
                    }
                    None => counts.unreadable_rows += 1,
                }
            }
            counts.rows += 1;
            after_row(counts.rows, total).await;
        }
        Ok(counts)
    }

    /// Recomputes a fully held row's parity from its data columns and rewrites every parity
    /// copy that differs (row lock held). Returns the copies rewritten.
    async fn check_parity(
        &self,
        view: &ClusterView,
        vol: &Vol,
        extent: u64,
        row: u32,
        meta: &RowMeta,
    ) -> Result<u64> {
        let (k, n, cb) = (vol.k(), vol.width(), vol.chunk());
        let reads = (0..n).map(|p| async move {
            if meta.is_zero(p) {
                return Some(zeros(cb));
            }
            let copies = self.read_pos(view, vol, extent, row, p).await?;
            meta.pick(p, &copies, cb)
        });
        let got: Vec<Option<Vec<u8>>> = futures::future::join_all(reads).await;
        if got.iter().any(Option::is_none) {
            // A holder stopped answering or changed since the load: the next pass sees it.
            return Ok(0);
        }
        let got: Vec<Vec<u8>> = got.into_iter().map(|g| g.expect("checked")).collect();
        let refs: Vec<&[u8]> = got[..k].iter().map(Vec::as_slice).collect();
        let mut parity = vec![vec![0u8; cb]; n - k];
        vol.codec
            .encode(&refs, &mut parity)
            .map_err(|e| VolError::Peer(e.to_string()))?;
        let set = &vol.meta.placement[extent as usize];
        let mut rewritten = 0;
        for (i, want) in parity.into_iter().enumerate() {
            let p = k + i;
            if got[p] == want {
                continue;
            }
            tracing::warn!(
                volume = vol.meta.id,
                extent,
                row,
                pos = p,
                holder = set[p],
                "scrub: parity disagrees with the data columns; rewriting it"
            );
            let chunk = Chunk {
                version: meta.want(p),
                cols: meta.cols.clone(),
                acked: meta.acked,
                acked_cols: meta.acked_cols.clone(),
                data: want,
            };
            self.env
                .write_chunk(set[p], view.epoch, Self::addr(vol, extent, row, p), chunk)
                .await?;
            rewritten += 1;
        }
        Ok(rewritten)
    }

    /// Copies every row marked in the write-intent log whose extent this controller leads and
    /// whose holder is reachable, then clears the mark. Returns the chunks copied.
    ///
    /// # Errors
    /// Epoch changes and metadata failures stop the pass; it can simply be run again.
    pub async fn resync(&self) -> Result<u64> {
        let (view, vols) = {
            let g = self.lock();
            (
                g.view.clone(),
                g.volumes.values().cloned().collect::<Vec<_>>(),
            )
        };
        let mut todo = Vec::new();
        for vol in vols {
            let mut marks = self.env.intents(vol.meta.id);
            marks.sort_unstable();
            for mark in marks {
                let set = &vol.meta.placement[mark.extent as usize];
                if view.primary(set) == Some(self.id) && view.reachable(set[mark.pos as usize]) {
                    todo.push((vol.clone(), mark));
                }
            }
        }
        // Rows are copied RESYNC_PARALLEL at a time (each under its row lock), so the pass is
        // not bounded by one round trip per chunk.
        let view = &view;
        let results: Vec<Result<u64>> = futures::stream::iter(todo)
            .map(|(vol, mark)| async move {
                let g = vol.global_row(mark.extent, mark.row);
                let _row = vol.rows.lock(g, g + 1).await;
                self.still(view.epoch)?;
                self.resync_row(view, &vol, mark)
                    .await
                    .inspect_err(|e| {
                        if !matches!(e, VolError::Epoch { .. }) {
                            tracing::warn!(?mark, error = %e, "resync of a row failed; it stays marked");
                        }
                    })
            })
            .buffer_unordered(RESYNC_PARALLEL)
            .collect()
            .await;
        let copied: u64 = results.iter().filter_map(|r| r.as_ref().ok()).sum();
        self.stats.lock().expect("stats").resync_chunks += copied;
        if let Some(Err(e)) = results
            .into_iter()
            .find(|r| matches!(r, Err(VolError::Epoch { .. } | VolError::Fenced)))
        {
            return Err(e);
        }
        Ok(copied)
    }

    /// Copies rows `rows` of position `pos` of an extent this controller leads to the
    /// position's holder, after a move gave it that position: each row is loaded (under its
    /// row lock), and if the holder's newest copy is not the row's current state, the chunk
    /// is decoded from the other positions and written to it. `RESYNC_PARALLEL` rows are in
    /// flight; rows finish in order. Returns the chunks written. The caller then records the
    /// progress in the metadata log, which stops reporting those rows as moving.
    ///
    /// # Errors
    /// [`VolError::NotPrimary`] when another controller leads the extent now; epoch changes
    /// (run it again under the new view); a row that cannot be decoded (fewer than `k`
    /// holders answer) stops the copy at that row.
    pub async fn copy_moved(
        &self,
        volume: VolumeId,
        extent: u64,
        pos: usize,
        rows: std::ops::Range<u32>,
    ) -> Result<u64> {
        let (view, vol) = self.volume(volume)?;
        let set = vol
            .meta
            .placement
            .get(extent as usize)
            .ok_or(VolError::OutOfRange {
                offset: extent,
                len: 0,
            })?;
        if view.primary(set) != Some(self.id) {
            return Err(VolError::NotPrimary(extent));
        }
        let holder = *set.get(pos).ok_or(VolError::OutOfRange {
            offset: extent,
            len: pos as u64,
        })?;
        if !view.reachable(holder) {
            return Err(VolError::Peer(format!(
                "controller {holder}, the new holder of extent {extent} position {pos}, is down"
            )));
        }
        let (view, vol) = (&view, &vol);
        let mut done = futures::stream::iter(rows)
            .map(|row| async move {
                let g = vol.global_row(extent, row);
                let _row = vol.rows.lock(g, g + 1).await;
                self.still(view.epoch)?;
                let mut meta = self.row_meta(view, vol, extent, row).await?;
                if meta.is_unknown(pos) {
                    self.forget_row(view, vol, extent, row).await;
                    meta = self.row_meta(view, vol, extent, row).await?;
                }
                if !meta.is_behind(pos) && !meta.is_unknown(pos) {
                    return Ok(0);
                }
                if let Some(copies) = self.read_pos(view, vol, extent, row, pos).await {
                    if meta.newest_valid(pos, &copies) {
                        return Ok(0); // a host write since the move already gave it the row
                    }
                }
                let full = self.reconstruct(view, vol, extent, row, &meta).await?;
                let chunk = Chunk {
                    version: meta.want(pos),
                    cols: meta.cols.clone(),
                    acked: meta.acked,
                    acked_cols: meta.acked_cols.clone(),
                    data: full[pos].clone(),
                };
                self.env
                    .write_chunk(holder, view.epoch, Self::addr(vol, extent, row, pos), chunk)
                    .await?;
                meta.behind &= !(1 << pos);
                meta.unknown &= !(1 << pos);
                self.cache_row(view, vol, extent, row, &meta);
                Ok::<u64, VolError>(1)
            })
            .buffered(RESYNC_PARALLEL);
        let mut copied = 0;
        while let Some(r) = done.next().await {
            copied += r?;
        }
        self.stats.lock().expect("stats").moved_chunks += copied;
        Ok(copied)
    }

    /// Copies one marked chunk to its holder if it is behind (row lock held); clears the mark.
    async fn resync_row(&self, view: &ClusterView, vol: &Vol, mark: IntentMark) -> Result<u64> {
        let pos = mark.pos as usize;
        let set = &vol.meta.placement[mark.extent as usize];
        let mut copied = 0;
        let mut meta = self.row_meta(view, vol, mark.extent, mark.row).await?;
        if meta.is_unknown(pos) {
            // Did not answer at load: ask again before deciding anything.
            self.forget_row(view, vol, mark.extent, mark.row).await;
            meta = self.row_meta(view, vol, mark.extent, mark.row).await?;
            if meta.is_unknown(pos) {
                return Err(VolError::Peer(format!(
                    "controller {} did not answer for {mark:?}",
                    set[pos]
                )));
            }
        }
        {
            {
                if meta.is_behind(pos) {
                    let full = self
                        .reconstruct(view, vol, mark.extent, mark.row, &meta)
                        .await?;
                    let chunk = Chunk {
                        version: meta.want(pos),
                        cols: meta.cols.clone(),
                        acked: meta.acked,
                        acked_cols: meta.acked_cols.clone(),
                        data: full[pos].clone(),
                    };
                    let addr = Self::addr(vol, mark.extent, mark.row, pos);
                    self.env
                        .write_chunk(set[pos], view.epoch, addr, chunk)
                        .await?;
                    meta.behind &= !(1 << pos);
                    self.cache_row(view, vol, mark.extent, mark.row, &meta);
                    copied += 1;
                }
                self.env
                    .clear_intent(mark, meta.content(), view.epoch)
                    .await?;
            }
        }
        Ok(copied)
    }
}

//! The shard store on a local device: every chunk this controller holds, in two slots, with a
//! checksummed and versioned superblock and per-slot checksums, through `disk-io` (io_uring).
//!
//! Layout (all offsets 4 KiB aligned, so `O_DIRECT` works):
//!
//! | offset | content |
//! | --- | --- |
//! | 0 | superblock (4 KiB): magic `RNSS`, format, chunk size, chunk capacity, mount count, CRC32C |
//! | 4096 + (i * 2 + s) * (4096 + chunk) | slot `s` of chunk index `i`: a 4 KiB header, then the payload |
//!
//! A chunk's index comes from its volume's base index plus `extent * rows_per_extent + row`
//! (a controller holds at most one position of a row, so the position is not part of the
//! index; the header records it and reads check it). Slot allocation is therefore static:
//! capacity is decided when the store is formatted.
//!
//! Invariants (the `shard` module's store contract, on disk):
//! - Slot headers carry a write sequence number (`mount count << 40 | counter`); the newest
//!   copy is the one with the highest. The slot replaced follows the two-slot rule of
//!   [`crate::shard`].
//! - Every header and payload is checked (CRC32C) when read; a slot that fails is not returned
//!   (a torn write reads as the copy it was replacing, or as nothing). Headers (format 2)
//!   carry a checksum per 4 KiB sector of the payload, so a ranged read checks just the
//!   sectors it returns; format 1 headers (one payload checksum) are still read.
//! - A write decides its slot from the two headers and checks the payload of the copy it
//!   leaves in place, unless that copy was written or checked whole since the open (torn
//!   copies only come from before it): a torn copy behind a good header is never kept over a
//!   good one. Headers are cached in memory (`HeadCache`), sound because the store is its
//!   device's only writer; any checksum failure drops the chunk from the cache.
//! - A patch checks the base's sectors under its range before applying it (no damage sealed
//!   under a new checksum). One made from the copy in the other slot records where the two
//!   differ (format 3), so the next patch from it updates that older slot in place, writing
//!   only those sectors and its own; a torn in-place write fails its sector checksums.
//! - A write returns once it is on stable storage (`RWF_DSYNC`); writes to one chunk are
//!   serialised (read the two headers, pick the slot, write).
//! - The superblock is checked at open: wrong magic, format, chunk size or checksum refuses
//!   the store with the likely cause.

use crate::range_lock::RangeLock;
use crate::shard::{
    BoxFut, Chunk, ChunkAddr, Patch, RangeRead, ShardError, ShardStore, VolumeId, Want,
};
use disk_io::{Device, PooledBuf};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const PAGE: usize = 4096;
const SB_MAGIC: &[u8; 4] = b"RNSS";
const SLOT_MAGIC: &[u8; 4] = b"RNCH";
const FORMAT: u32 = 1;
/// Slot headers with per-sector payload checksums (format 1 headers, which have none, are
/// still read: their payload is checked whole).
const SLOT_FORMAT_SECTORS: u32 = 2;
/// Format 2 headers with a difference record ([`Header`]'s `diff`): written by patches from
/// the other slot's copy (earlier versions of the appliance do not read them).
const SLOT_FORMAT_DIFF: u32 = 3;
/// Bytes each per-sector checksum covers.
const SECTOR: usize = 4096;
/// Most sectors in a payload (a 1 MiB chunk).
const MAX_SECTORS: usize = (1 << 20) / SECTOR;
const MAX_COLS: usize = crate::codec::SHARDS_MAX;
/// Most chunk indexes whose headers are kept in memory ([`HeadCache`]; a few hundred bytes
/// each).
const HEAD_CACHE_WAYS: u64 = 1 << 16;

/// Why a store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    /// Device I/O failed.
    #[error("shard store device: {0}")]
    Io(#[from] disk_io::IoError),
    /// Not formatted as a shard store, or damaged.
    #[error("shard store superblock: {0}")]
    Superblock(String),
    /// The device is too small for the chunks it must hold.
    #[error("shard store needs {need} bytes but the device has {have}: enlarge the backing file or device")]
    TooSmall {
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
}

/// One volume's share of the store.
#[derive(Debug, Clone, Copy)]
pub struct VolumeSlots {
    /// Volume.
    pub volume: VolumeId,
    /// Extents of the volume.
    pub extents: u64,
    /// Rows per extent.
    pub rows_per_extent: u32,
}

/// The on-disk shard store.
#[derive(Debug)]
pub struct DiskShardStore {
    dev: Arc<Device>,
    chunk: usize,
    bases: BTreeMap<VolumeId, (u64, VolumeSlots)>,
    capacity: u64,
    seq: AtomicU64,
    locks: RangeLock,
    checksum_failures: AtomicU64,
    heads: HeadCache,
    caught_up: AtomicU64,
}

/// A valid slot header as this process last saw it on disk, and whether the copy it
/// describes was written, or checked whole, since the store was opened.
#[derive(Debug, Clone)]
struct SlotState {
    /// Shared, so the cache hands out headers without copying their vectors.
    head: Arc<Header>,
    checked: bool,
}

/// Both slots of one chunk index (`None`: no valid header there).
#[derive(Debug, Clone)]
struct Known {
    index: u64,
    slots: [Option<SlotState>; 2],
}

impl Known {
    /// The slots' headers for `addr`, newest first, with their checked flags.
    fn heads_for(&self, addr: &ChunkAddr) -> Vec<(u64, Arc<Header>, bool)> {
        let mut heads: Vec<_> = (0..2u64)
            .filter_map(|slot| {
                let st = self.slots[slot as usize].as_ref()?;
                (st.head.addr == *addr).then(|| (slot, st.head.clone(), st.checked))
            })
            .collect();
        heads.sort_by_key(|(_, h, _)| std::cmp::Reverse(h.seq));
        heads
    }
}

#[derive(Debug, Default)]
struct Way {
    /// Bumped by every change a writer makes, so a reader's late fill cannot undo it.
    gen: u64,
    known: Option<Known>,
}

/// What this process knows of the slot headers, direct-mapped by chunk index: reads and
/// writes skip the two header reads on a hit, and the copies written or checked whole since
/// the store was opened are not checked again before a write keeps them.
///
/// Invariants: an entry is what the device holds, because this process is the device's only
/// writer and every write replaces its entry when it completes (or drops it when it fails);
/// a fill from a read made without the chunk's lock lands only if no writer touched the way
/// since the fill began (`gen`). A torn copy (a write cut short by a crash) can only predate
/// the open, so the checked flag never vouches for one; damage after a write is the scrub's
/// to find, as it reads the device, not this cache.
#[derive(Debug)]
struct HeadCache {
    ways: Vec<std::sync::Mutex<Way>>,
}

impl HeadCache {
    fn new(capacity: u64) -> Self {
        let n = capacity.clamp(1, HEAD_CACHE_WAYS) as usize;
        Self {
            ways: (0..n).map(|_| Default::default()).collect(),
        }
    }

    fn way(&self, index: u64) -> std::sync::MutexGuard<'_, Way> {
        let w = &self.ways[(index % self.ways.len() as u64) as usize];
        w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The entry for `index`, or the way's generation to fill it with.
    fn get(&self, index: u64) -> Result<Known, u64> {
        let w = self.way(index);
        match &w.known {
            Some(k) if k.index == index => Ok(k.clone()),
            _ => Err(w.gen),
        }
    }

    /// Stores what a read found, unless a writer changed the way since `gen`.
    fn fill(&self, gen: u64, k: Known) {
        let mut w = self.way(k.index);
        if w.gen == gen {
            w.known = Some(k);
        }
    }

    /// Stores what a write left (the caller holds the chunk's lock).
    fn put(&self, k: Known) {
        let mut w = self.way(k.index);
        w.gen += 1;
        w.known = Some(k);
    }

    /// Forgets `index` (a write failed: the slot's content is unknown).
    fn forget(&self, index: u64) {
        let mut w = self.way(index);
        w.gen += 1;
        if w.known.as_ref().is_some_and(|k| k.index == index) {
            w.known = None;
        }
    }

    /// Records that the copy with header sequence `seq` in `slot` checked whole.
    fn checked(&self, index: u64, slot: u64, seq: u64) {
        let mut w = self.way(index);
        if let Some(Some(st)) = w
            .known
            .as_mut()
            .filter(|k| k.index == index)
            .map(|k| &mut k.slots[slot as usize])
        {
            if st.head.seq == seq {
                st.checked = true;
            }
        }
    }
}

/// Bytes a store needs for `volumes` with `chunk_bytes` chunks.
pub fn store_bytes(chunk_bytes: usize, volumes: &[VolumeSlots]) -> u64 {
    let chunks: u64 = volumes
        .iter()
        .map(|v| v.extents * u64::from(v.rows_per_extent))
        .sum();
    PAGE as u64 + chunks * 2 * (PAGE + chunk_bytes) as u64
}

/// A slot's header as stored (public for the fuzz target, which checks that whatever decodes
/// encodes back to the same bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    seq: u64,
    addr: ChunkAddr,
    version: u64,
    acked: u64,
    cols: Vec<u64>,
    acked_cols: Vec<u64>,
    data_len: u32,
    /// CRC32C of the whole payload in format 1 headers; format 2 headers write 0 here and
    /// never check it (the sector checksums cover the payload, and keeping a whole-payload
    /// one would cost a patch a pass over the whole chunk).
    data_crc: u32,
    /// CRC32C of each [`SECTOR`] of the payload (empty in format 1 headers): a ranged read
    /// checks only the sectors it returns.
    sector_crcs: Vec<u32>,
    /// Format 3: the header sequence number of the copy in the other slot this one was
    /// patched from, and the sectors in which the two differ (bit `s % 8` of byte `s / 8`).
    /// While that copy is still there, the next patch made from this one brings that slot
    /// up to date by writing only those sectors and its own.
    diff: Option<(u64, Vec<u8>)>,
}

/// The per-sector checksums of a payload.
fn sector_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(SECTOR).map(crc32c::crc32c).collect()
}

/// Whether `data` (the whole payload) is what header `h` describes.
fn payload_ok(h: &Header, data: &[u8]) -> bool {
    if h.sector_crcs.is_empty() {
        crc32c::crc32c(data) == h.data_crc
    } else {
        data.len() == h.data_len as usize
            && data
                .chunks(SECTOR)
                .zip(&h.sector_crcs)
                .all(|(d, &c)| crc32c::crc32c(d) == c)
    }
}

impl Header {
    /// The copy this header describes, without its payload (for the two-slot rule).
    fn as_chunk(&self) -> Chunk {
        Chunk {
            version: self.version,
            cols: self.cols.clone(),
            acked: self.acked,
            acked_cols: self.acked_cols.clone(),
            data: Vec::new(),
        }
    }
}

/// Writes `h` at the start of `out` (a slot's 4 KiB header page).
///
/// # Panics
/// If `out` is shorter than the encoded header (at most 102 + 2 x 16 x 8 + 256 x 4 + 8 + 32 bytes).
pub fn put_header(h: &Header, out: &mut [u8]) {
    let mut v = Vec::with_capacity(128 + 4 * h.sector_crcs.len());
    v.extend_from_slice(SLOT_MAGIC);
    let format = if h.sector_crcs.is_empty() {
        FORMAT
    } else if h.diff.is_some() {
        SLOT_FORMAT_DIFF
    } else {
        SLOT_FORMAT_SECTORS
    };
    v.extend_from_slice(&format.to_le_bytes());
    v.extend_from_slice(&h.seq.to_le_bytes());
    v.extend_from_slice(&h.addr.volume.to_le_bytes());
    v.extend_from_slice(&h.addr.extent.to_le_bytes());
    v.extend_from_slice(&h.addr.row.to_le_bytes());
    v.push(h.addr.pos);
    v.extend_from_slice(&h.version.to_le_bytes());
    v.extend_from_slice(&h.acked.to_le_bytes());
    v.push(h.cols.len() as u8);
    for c in &h.cols {
        v.extend_from_slice(&c.to_le_bytes());
    }
    v.push(h.acked_cols.len() as u8);
    for c in &h.acked_cols {
        v.extend_from_slice(&c.to_le_bytes());
    }
    v.extend_from_slice(&h.data_len.to_le_bytes());
    v.extend_from_slice(&h.data_crc.to_le_bytes());
    if !h.sector_crcs.is_empty() {
        v.extend_from_slice(&(h.sector_crcs.len() as u16).to_le_bytes());
        for c in &h.sector_crcs {
            v.extend_from_slice(&c.to_le_bytes());
        }
        if let Some((seq, bits)) = &h.diff {
            v.extend_from_slice(&seq.to_le_bytes());
            v.extend_from_slice(bits);
        }
    }
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    out[..v.len()].copy_from_slice(&v);
}

/// Decodes a slot header; `None` for anything that is not a whole, checksummed header of this
/// format (never panics, fuzzed).
pub fn get_header(b: &[u8]) -> Option<Header> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let le64 = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8"));
    let le32 = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4"));
    if take(4)? != SLOT_MAGIC {
        return None;
    }
    let format = le32(take(4)?);
    if format != FORMAT && format != SLOT_FORMAT_SECTORS && format != SLOT_FORMAT_DIFF {
        return None;
    }
    let seq = le64(take(8)?);
    let volume = le32(take(4)?);
    let extent = le64(take(8)?);
    let row = le32(take(4)?);
    let pos = take(1)?[0];
    let version = le64(take(8)?);
    let acked = le64(take(8)?);
    let n = take(1)?[0] as usize;
    if n > MAX_COLS {
        return None;
    }
    let mut cols = Vec::with_capacity(n);
    for _ in 0..n {
        cols.push(le64(take(8)?));
    }
    let na = take(1)?[0] as usize;
    if na > MAX_COLS {
        return None;
    }
    let mut acked_cols = Vec::with_capacity(na);
    for _ in 0..na {
        acked_cols.push(le64(take(8)?));
    }
    let data_len = le32(take(4)?);
    let data_crc = le32(take(4)?);
    let mut sector_crcs = Vec::new();
    let mut diff = None;
    if format != FORMAT {
        let ns = u16::from_le_bytes(take(2)?.try_into().expect("2")) as usize;
        if ns == 0 || ns > MAX_SECTORS || ns != (data_len as usize).div_ceil(SECTOR) {
            return None;
        }
        sector_crcs.reserve(ns);
        for _ in 0..ns {
            sector_crcs.push(le32(take(4)?));
        }
        if format == SLOT_FORMAT_DIFF {
            let seq = le64(take(8)?);
            diff = Some((seq, take(ns.div_ceil(8))?.to_vec()));
        }
    }
    let crc = le32(take(4)?);
    // magic, format, seq, volume, extent, row, pos, version, acked, ncols, cols, nacked,
    // acked cols, len, data crc [, sectors, sector crcs [, diff seq, diff bits]], crc
    let mut end = 4 + 4 + 8 + 4 + 8 + 4 + 1 + 8 + 8 + 1 + 8 * n + 1 + 8 * na + 4 + 4;
    if format != FORMAT {
        end += 2 + 4 * sector_crcs.len();
    }
    if let Some((_, bits)) = &diff {
        end += 8 + bits.len();
    }
    if crc32c::crc32c(&b[..end]) != crc {
        return None;
    }
    Some(Header {
        seq,
        addr: ChunkAddr {
            volume,
            extent,
            row,
            pos,
        },
        version,
        acked,
        cols,
        acked_cols,
        data_len,
        data_crc,
        sector_crcs,
        diff,
    })
}

/// Checks a store's first page: `Ok(mount count to record)` for a store of this format,
/// chunk size and at least `capacity` chunks, or for an empty one (or any, with `format`);
/// otherwise the likely cause. Never panics on any bytes (fuzzed).
///
/// # Errors
/// [`StoreOpenError::Superblock`].
pub fn check_superblock(
    s: &[u8],
    chunk_bytes: usize,
    capacity: u64,
    format: bool,
) -> Result<u64, StoreOpenError> {
    if s.len() < PAGE {
        return Err(StoreOpenError::Superblock(format!(
            "the first page holds {} bytes, not {PAGE}",
            s.len()
        )));
    }
    if &s[..4] == SB_MAGIC {
        let le32 = |r: std::ops::Range<usize>| u32::from_le_bytes(s[r].try_into().expect("4"));
        let le64 = |r: std::ops::Range<usize>| u64::from_le_bytes(s[r].try_into().expect("8"));
        if crc32c::crc32c(&s[..32]) != le32(32..36) {
            return Err(StoreOpenError::Superblock(
                "checksum mismatch: the store's first page is damaged".into(),
            ));
        }
        if le32(4..8) != FORMAT {
            return Err(StoreOpenError::Superblock(format!(
                "format {} is not {FORMAT}: written by another version of the appliance",
                le32(4..8)
            )));
        }
        if le32(8..12) as usize != chunk_bytes {
            return Err(StoreOpenError::Superblock(format!(
                "chunk size {} on disk, {chunk_bytes} configured: the volume geometry changed; use the original chunk size",
                le32(8..12)
            )));
        }
        if le64(12..20) < capacity {
            return Err(StoreOpenError::Superblock(format!(
                "formatted for {} chunks, {capacity} needed: volumes were added or grown; this needs a rebalance, not a reformat",
                le64(12..20)
            )));
        }
        // Write sequence numbers are `mount count << 40 | counter`.
        let mounts = le64(20..28);
        if mounts >= (1 << 24) - 1 {
            return Err(StoreOpenError::Superblock(format!(
                "mount count {mounts} is implausible: the first page is damaged"
            )));
        }
        Ok(mounts + 1)
    } else if format || s.iter().all(|&b| b == 0) {
        Ok(1)
    } else {
        Err(StoreOpenError::Superblock(
            "no shard-store superblock and the device is not empty: refusing to overwrite it (check the configured path)".into(),
        ))
    }
}

impl DiskShardStore {
    /// Opens the store on `dev`, formatting it when it carries no superblock (`format`) or
    /// checking it otherwise.
    ///
    /// # Errors
    /// [`StoreOpenError`] naming the problem.
    pub async fn open(
        dev: Arc<Device>,
        chunk_bytes: usize,
        volumes: &[VolumeSlots],
        format: bool,
    ) -> Result<Self, StoreOpenError> {
        let need = store_bytes(chunk_bytes, volumes);
        if dev.size_bytes() < need {
            return Err(StoreOpenError::TooSmall {
                need,
                have: dev.size_bytes(),
            });
        }
        let capacity = (need - PAGE as u64) / (2 * (PAGE + chunk_bytes) as u64);
        let sb = dev.read_into(0, dev.pool().take(PAGE).await).await?;
        let mounts = check_superblock(sb.as_slice(), chunk_bytes, capacity, format)?;
        // Write the superblock with the new mount count.
        let mut b = dev.pool().take(PAGE).await;
        let o = b.as_mut_slice();
        o.fill(0);
        o[..4].copy_from_slice(SB_MAGIC);
        o[4..8].copy_from_slice(&FORMAT.to_le_bytes());
        o[8..12].copy_from_slice(&(chunk_bytes as u32).to_le_bytes());
        o[12..20].copy_from_slice(&capacity.to_le_bytes());
        o[20..28].copy_from_slice(&mounts.to_le_bytes());
        let crc = crc32c::crc32c(&o[..32]);
        o[32..36].copy_from_slice(&crc.to_le_bytes());
        dev.write_from(0, b, true).await?;
        let mut bases = BTreeMap::new();
        let mut next = 0u64;
        for v in volumes {
            bases.insert(v.volume, (next, *v));
            next += v.extents * u64::from(v.rows_per_extent);
        }
        Ok(Self {
            dev,
            chunk: chunk_bytes,
            bases,
            capacity,
            seq: AtomicU64::new(mounts << 40),
            locks: RangeLock::default(),
            checksum_failures: AtomicU64::new(0),
            heads: HeadCache::new(capacity),
            caught_up: AtomicU64::new(0),
        })
    }

    fn index(&self, a: &ChunkAddr) -> Result<u64, ShardError> {
        let (base, v) = self.bases.get(&a.volume).ok_or_else(|| {
            ShardError::Io(format!("volume {} has no slots in this store", a.volume))
        })?;
        if a.extent >= v.extents || a.row >= v.rows_per_extent {
            return Err(ShardError::Io(format!("chunk {a:?} is outside its volume")));
        }
        Ok(base + a.extent * u64::from(v.rows_per_extent) + u64::from(a.row))
    }

    fn slot_offset(&self, index: u64, slot: u64) -> u64 {
        PAGE as u64 + (index * 2 + slot) * (PAGE + self.chunk) as u64
    }

    /// Both slots, decoded and checked: `(slot, header, payload)` for each valid one.
    async fn read_slots(&self, a: &ChunkAddr) -> Result<Vec<(u64, Header, Vec<u8>)>, ShardError> {
        let index = self.index(a)?;
        let mut out = Vec::new();
        // The two slots are adjacent: one read fetches both (two when the pair is larger
        // than the biggest buffer the device's pool hands out).
        let len = PAGE + self.chunk;
        debug_assert_eq!(
            self.slot_offset(index, 1),
            self.slot_offset(index, 0) + len as u64
        );
        let pieces = if 2 * len <= self.dev.pool().max_bytes() {
            vec![(0, 2 * len)]
        } else {
            vec![(0, len), (1, len)]
        };
        let mut bufs = Vec::with_capacity(pieces.len());
        for (slot, n) in pieces {
            bufs.push(self.read_at(self.slot_offset(index, slot), n).await?);
        }
        let slots = bufs.iter().flat_map(|b| b.as_slice().chunks(len));
        for (slot, s) in (0..2u64).zip(slots) {
            let Some(h) = get_header(&s[..PAGE]) else {
                // A slot never written has no magic; one with the magic but a bad header is
                // damage.
                if &s[..4] == SLOT_MAGIC {
                    self.damaged(index);
                }
                continue;
            };
            let data = &s[PAGE..PAGE + (h.data_len as usize).min(self.chunk)];
            if h.addr != *a || h.data_len as usize > self.chunk || !payload_ok(&h, data) {
                self.damaged(index);
                continue;
            }
            out.push((slot, h, data.to_vec()));
        }
        out.sort_by_key(|(_, h, _)| std::cmp::Reverse(h.seq));
        Ok(out)
    }

    /// Reads `n` bytes at `at` of the device.
    async fn read_at(&self, at: u64, n: usize) -> Result<PooledBuf, ShardError> {
        self.dev
            .read_into(at, self.dev.pool().take(n).await)
            .await
            .map_err(|e| ShardError::Io(e.to_string()))
    }

    /// Counts a copy of chunk `index` that failed its checks, and drops what the header
    /// cache knows of the chunk: the next write reads the headers again and checks whatever
    /// it keeps.
    fn damaged(&self, index: u64) {
        self.checksum_failures.fetch_add(1, Ordering::Relaxed);
        self.heads.forget(index);
    }

    /// Number of chunks the store can hold.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Slots read whose header or payload failed its checksum (or named another chunk) since
    /// the store was opened.
    pub fn checksum_failures(&self) -> u64 {
        self.checksum_failures.load(Ordering::Relaxed)
    }

    /// Patches that brought the replaced copy up to date in place (wrote only the sectors
    /// that differ) since the store was opened.
    pub fn patches_in_place(&self) -> u64 {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// The device the store is on.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }
}

impl DiskShardStore {
    /// Slot `slot`'s header when it is a valid one for `addr`'s chunk index; a damaged one
    /// (or one naming another chunk) counts as a checksum failure. A valid header of another
    /// position of the same row is returned (the cache holds what the device holds); callers
    /// filter by address.
    async fn read_header(
        &self,
        addr: &ChunkAddr,
        index: u64,
        slot: u64,
    ) -> Result<Option<Header>, ShardError> {
        let b = self.read_at(self.slot_offset(index, slot), PAGE).await?;
        let page = &b.as_slice()[..PAGE];
        match get_header(page) {
            Some(h) if h.addr == *addr && h.data_len as usize <= self.chunk => Ok(Some(h)),
            Some(h)
                if ChunkAddr {
                    pos: addr.pos,
                    ..h.addr
                } == *addr
                    && h.data_len as usize <= self.chunk =>
            {
                self.checksum_failures.fetch_add(1, Ordering::Relaxed);
                Ok(Some(h))
            }
            None if &page[..4] != SLOT_MAGIC => Ok(None),
            _ => {
                self.checksum_failures.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Both slots of `addr`'s chunk index: from the header cache, or read (and cached).
    async fn known(&self, addr: &ChunkAddr, index: u64) -> Result<Known, ShardError> {
        let gen = match self.heads.get(index) {
            Ok(k) => return Ok(k),
            Err(gen) => gen,
        };
        let mut k = Known {
            index,
            slots: [None, None],
        };
        for slot in 0..2u64 {
            k.slots[slot as usize] =
                self.read_header(addr, index, slot)
                    .await?
                    .map(|head| SlotState {
                        head: Arc::new(head),
                        checked: false,
                    });
        }
        self.heads.fill(gen, k.clone());
        Ok(k)
    }

    /// Both slots' valid headers for `addr`, newest first (payloads not read).
    async fn read_heads(
        &self,
        addr: &ChunkAddr,
        index: u64,
    ) -> Result<Vec<(u64, Arc<Header>, bool)>, ShardError> {
        Ok(self.known(addr, index).await?.heads_for(addr))
    }

    /// Whether slot `slot`'s payload verifies against its header `h` (a damaged one counts
    /// as a checksum failure).
    async fn payload_checks(&self, index: u64, slot: u64, h: &Header) -> Result<bool, ShardError> {
        let n = h.data_len as usize;
        let at = self.slot_offset(index, slot) + PAGE as u64;
        let b = self.read_at(at, n.div_ceil(SECTOR) * SECTOR).await?;
        if payload_ok(h, &b.as_slice()[..n]) {
            self.heads.checked(index, slot, h.seq);
            Ok(true)
        } else {
            self.damaged(index);
            Ok(false)
        }
    }

    /// The slot a write of `incoming` replaces, by the two-slot rule (`shard::keep_newest`)
    /// over the copies in `heads` (valid headers, newest first, with their checked flags).
    /// The copy the write leaves in place must verify whole (a torn payload behind a good
    /// header is never kept): it is checked, unless it already was ([`HeadCache`]), and when
    /// damaged it is left out and the rule applied again.
    async fn choose_slot(
        &self,
        index: u64,
        pos: u8,
        mut heads: Vec<(u64, Arc<Header>, bool)>,
        incoming: &Chunk,
    ) -> Result<u64, ShardError> {
        loop {
            let target = match heads.first() {
                None => 0,
                Some((newest_slot, h, _)) => {
                    let older = heads.get(1).map(|(_, o, _)| o.as_chunk());
                    if crate::shard::keep_newest(pos, incoming, &h.as_chunk(), older.as_ref()) {
                        1 - newest_slot
                    } else {
                        *newest_slot
                    }
                }
            };
            let Some(i) = heads.iter().position(|(s, _, _)| *s != target) else {
                return Ok(target);
            };
            let (slot, h, checked) = &heads[i];
            if *checked || self.payload_checks(index, *slot, h).await? {
                return Ok(target);
            }
            heads.remove(i);
        }
    }

    /// The header of a new copy `meta` (its payload, `len` bytes, described by
    /// `sector_crcs`).
    fn new_header(
        &self,
        addr: ChunkAddr,
        meta: Chunk,
        len: usize,
        sector_crcs: Vec<u32>,
    ) -> Header {
        Header {
            seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
            addr,
            version: meta.version,
            acked: meta.acked,
            cols: meta.cols,
            acked_cols: meta.acked_cols,
            data_len: len as u32,
            // Not kept in format 2 and 3; only an empty payload has no sectors and so a
            // format 1 header, whose whole-payload checksum (of no bytes) is 0 as well.
            data_crc: 0,
            sector_crcs,
            diff: None,
        }
    }

    /// Writes `b` (a header page and the payload after it) into `slot` (the caller holds the
    /// chunk's lock and chose the slot); durable on return.
    /// `k` is what the chunk's slots held before (read under the lock); the header cache
    /// gets `header` in `slot` once the write is durable, and forgets the chunk if it fails.
    async fn write_buf(
        &self,
        mut k: Known,
        slot: u64,
        header: Header,
        b: PooledBuf,
    ) -> Result<(), ShardError> {
        let index = k.index;
        if let Err(e) = self
            .dev
            .write_from(self.slot_offset(index, slot), b, true)
            .await
        {
            self.heads.forget(index);
            return Err(ShardError::Io(e.to_string()));
        }
        k.slots[slot as usize] = Some(SlotState {
            head: Arc::new(header),
            checked: true,
        });
        self.heads.put(k);
        Ok(())
    }

    /// Writes `chunk` into `slot` (the caller holds the chunk's lock, read `k` under it and
    /// chose the slot).
    async fn write_slot(
        &self,
        addr: ChunkAddr,
        k: Known,
        slot: u64,
        mut chunk: Chunk,
    ) -> Result<(), ShardError> {
        let data = std::mem::take(&mut chunk.data);
        let crcs = sector_crcs(&data);
        let header = self.new_header(addr, chunk, data.len(), crcs);
        let mut b = self
            .dev
            .pool()
            .take(PAGE + data.len().div_ceil(SECTOR) * SECTOR)
            .await;
        let o = b.as_mut_slice();
        o[..PAGE].fill(0);
        put_header(&header, &mut o[..PAGE]);
        o[PAGE..PAGE + data.len()].copy_from_slice(&data);
        o[PAGE + data.len()..].fill(0);
        self.write_buf(k, slot, header, b).await
    }

    /// Whether a copy of `len` payload bytes with `chunk`'s column vectors fits a slot.
    fn check_fits(&self, len: usize, chunk: &Chunk) -> Result<(), ShardError> {
        if len > self.chunk || chunk.cols.len() > MAX_COLS || chunk.acked_cols.len() > MAX_COLS {
            return Err(ShardError::Io(format!(
                "chunk of {len} bytes does not fit {}-byte slots",
                self.chunk
            )));
        }
        Ok(())
    }
}

/// Sectors read for a ranged read: into a vector of their own, or into a pooled buffer.
enum Sectors {
    Owned(Vec<u8>),
    Pooled(PooledBuf),
}

impl Sectors {
    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Pooled(b) => b.as_slice(),
        }
    }

    /// `len` bytes from `start`: the vector itself when it is exactly those, else a copy.
    fn into_range(self, start: usize, len: usize) -> Vec<u8> {
        match self {
            Self::Owned(v) if start == 0 && v.len() == len => v,
            s => s.as_slice()[start..][..len].to_vec(),
        }
    }
}

fn to_chunk(h: &Header, data: Vec<u8>) -> Chunk {
    Chunk {
        version: h.version,
        cols: h.cols.clone(),
        acked: h.acked,
        acked_cols: h.acked_cols.clone(),
        data,
    }
}

impl ShardStore for DiskShardStore {
    fn read(&self, addr: ChunkAddr) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        Box::pin(async move {
            Ok(self
                .read_slots(&addr)
                .await?
                .into_iter()
                .map(|(_, h, data)| to_chunk(&h, data))
                .collect())
        })
    }

    /// Reads the two header pages, then only the sectors under the range of the wanted
    /// copies, and checks those sectors' checksums (a copy whose header has none, written
    /// before they existed, is read and checked whole).
    fn read_range(
        &self,
        addr: ChunkAddr,
        read: RangeRead,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        Box::pin(async move {
            let index = self.index(&addr)?;
            let (off, len) = (read.off as usize, read.len as usize);
            if len == 0 || off + len > self.chunk {
                return Ok(Vec::new());
            }
            let heads = self.read_heads(&addr, index).await?;
            let mut out = Vec::with_capacity(1);
            for (slot, h, _) in heads {
                let data_len = h.data_len as usize;
                if !read.want.matches_header(h.version, &h.cols) || off + len > data_len {
                    continue;
                }
                // Sectors under the range, or the whole payload for a header without
                // per-sector checksums.
                let (s0, s1) = if h.sector_crcs.is_empty() {
                    (0, data_len.div_ceil(SECTOR))
                } else {
                    (off / SECTOR, (off + len).div_ceil(SECTOR))
                };
                let at = self.slot_offset(index, slot) + (PAGE + s0 * SECTOR) as u64;
                let n = (s1 - s0) * SECTOR;
                // A range of whole sectors (a whole chunk, as located reads ask) is read into
                // the vector that goes out: one copy less on a mapped store.
                let b = if off == s0 * SECTOR && len == n {
                    Sectors::Owned(
                        self.dev
                            .read_vec(at, n)
                            .await
                            .map_err(|e| ShardError::Io(e.to_string()))?,
                    )
                } else {
                    Sectors::Pooled(self.read_at(at, n).await?)
                };
                let bytes = b.as_slice();
                let ok = if h.sector_crcs.is_empty() {
                    payload_ok(&h, &bytes[..data_len])
                } else {
                    (s0..s1).all(|s| {
                        let n = SECTOR.min(data_len - s * SECTOR);
                        crc32c::crc32c(&bytes[(s - s0) * SECTOR..][..n]) == h.sector_crcs[s]
                    })
                };
                if !ok {
                    self.damaged(index);
                    continue;
                }
                let data = b.into_range(off - s0 * SECTOR, len);
                out.push(to_chunk(&h, data));
            }
            Ok(out)
        })
    }

    /// Reads the two headers, and a payload only to check the copy the write leaves in
    /// place.
    fn write(&self, addr: ChunkAddr, chunk: Chunk) -> BoxFut<'_, Result<(), ShardError>> {
        Box::pin(async move {
            self.check_fits(chunk.data.len(), &chunk)?;
            let index = self.index(&addr)?;
            let _g = self.locks.lock(index, index + 1).await;
            let k = self.known(&addr, index).await?;
            let slot = self
                .choose_slot(index, addr.pos, k.heads_for(&addr), &chunk)
                .await?;
            self.write_slot(addr, k, slot, chunk).await
        })
    }

    /// Applies a patch. The slot to replace is chosen as [`ShardStore::write`] does. When
    /// the base is the copy kept in the other slot, was made from the copy being replaced
    /// and says where the two differ (its `diff`), and both were written or checked whole
    /// since the open, only those sectors and the patched ones are read from the base and
    /// written over the replaced copy, then its header. Otherwise the base's whole slot is
    /// read into the buffer the new copy is written from. The base is checked whole unless
    /// it was written or checked since the open, and its sectors under the patch always, so
    /// no damage is sealed under a new checksum; only the sector checksums under the patch
    /// are recomputed.
    fn patch(&self, addr: ChunkAddr, patch: Patch) -> BoxFut<'_, Result<Vec<u8>, ShardError>> {
        Box::pin(async move {
            let index = self.index(&addr)?;
            let range = patch.range()?;
            let len = patch.chunk_len as usize;
            let meta = Chunk {
                data: Vec::new(),
                ..patch.head.clone()
            };
            if len == 0 {
                // Nothing to patch in place: the generic path handles the degenerate chunk.
                let (chunk, old) = patch.apply(self.read(addr).await?)?;
                self.write(addr, chunk).await?;
                return Ok(old);
            }
            self.check_fits(len, &meta)?;
            let _g = self.locks.lock(index, index + 1).await;
            let mut k = self.known(&addr, index).await?;
            let heads = k.heads_for(&addr);
            let size = PAGE + len.div_ceil(SECTOR) * SECTOR;
            let touched = range.start / SECTOR..range.end.div_ceil(SECTOR);
            let sectors = len.div_ceil(SECTOR);
            let base = match patch.base {
                Want::Zero => None,
                _ => Some(
                    heads
                        .iter()
                        .find(|(_, h, _)| {
                            patch.base.matches_header(h.version, &h.cols)
                                && h.data_len as usize == len
                        })
                        .cloned()
                        .ok_or_else(|| {
                            ShardError::Mismatch(format!("no copy matching {:?}", patch.base))
                        })?,
                ),
            };
            let target = self
                .choose_slot(index, addr.pos, heads.clone(), &meta)
                .await?;
            let replaced = heads.iter().find(|(s, _, _)| *s == target);
            // The sectors to write besides the patched ones, when the replaced copy can be
            // brought up to date in place.
            let catch_up = match (&base, replaced) {
                (Some((bs, bh, true)), Some((_, rh, true)))
                    if *bs != target
                        && rh.data_len as usize == len
                        && bh.diff.as_ref().is_some_and(|(seq, _)| *seq == rh.seq) =>
                {
                    bh.diff.as_ref().map(|(_, bits)| bits.clone())
                }
                _ => None,
            };
            if let (Some((bs, bh, _)), Some(bits)) = (&base, catch_up) {
                // Sectors to write: those the base differs in, and the patched ones; read
                // from the base and checked, one buffer per run.
                let write: Vec<usize> = (0..sectors)
                    .filter(|&s| touched.contains(&s) || bits[s / 8] & (1 << (s % 8)) != 0)
                    .collect();
                let mut bufs = Vec::with_capacity(2);
                for run in runs(&write) {
                    let at = self.slot_offset(index, *bs) + (PAGE + run.start * SECTOR) as u64;
                    let got = self.read_at(at, run.len() * SECTOR).await?;
                    if let Some(s) = run
                        .clone()
                        .find(|&s| !sector_ok(bh, got.as_slice(), run.start, s, len))
                    {
                        self.damaged(index);
                        return Err(ShardError::Mismatch(format!(
                            "no copy matching {:?} (sector {s} damaged)",
                            patch.base
                        )));
                    }
                    bufs.push((run, got));
                }
                // The patched sectors are consecutive: one run holds them all.
                let (run, b) = bufs
                    .iter_mut()
                    .find(|(r, _)| r.contains(&touched.start))
                    .expect("the patched sectors are among those written");
                let old = patch.apply_to(b.as_mut_slice(), run.start * SECTOR)?;
                let mut crcs = bh.sector_crcs.clone();
                recompute_crcs(&mut crcs, b.as_slice(), run.start, touched.clone(), len);
                let mut header = self.new_header(addr, meta, len, crcs);
                header.diff = Some((bh.seq, bitmap(sectors, touched)));
                for (run, b) in bufs {
                    let at = self.slot_offset(index, target) + (PAGE + run.start * SECTOR) as u64;
                    if let Err(e) = self.dev.write_from(at, b, true).await {
                        self.heads.forget(index);
                        return Err(ShardError::Io(e.to_string()));
                    }
                }
                let mut hb = self.dev.pool().take(PAGE).await;
                hb.as_mut_slice().fill(0);
                put_header(&header, hb.as_mut_slice());
                self.write_buf(k, target, header, hb).await?;
                self.caught_up.fetch_add(1, Ordering::Relaxed);
                return Ok(old);
            }
            // The whole base slot (or zeros) into the buffer the new copy is written from.
            let mut b = match &base {
                None => {
                    let mut z = self.dev.pool().take(size).await;
                    z.as_mut_slice().fill(0);
                    z
                }
                Some((slot, h, checked)) => {
                    let got = self.read_at(self.slot_offset(index, *slot), size).await?;
                    let data = &got.as_slice()[PAGE..PAGE + len];
                    let ok = if *checked && !h.sector_crcs.is_empty() {
                        touched.clone().all(|s| sector_ok(h, data, 0, s, len))
                    } else {
                        payload_ok(h, data)
                    };
                    if !ok {
                        self.damaged(index);
                        return Err(ShardError::Mismatch(format!(
                            "no copy matching {:?}",
                            patch.base
                        )));
                    }
                    if let Some(st) = k.slots[*slot as usize].as_mut() {
                        st.checked = true;
                    }
                    got
                }
            };
            let o = b.as_mut_slice();
            let old = patch.apply_to(&mut o[PAGE..PAGE + len], 0)?;
            let data = &o[PAGE..PAGE + len];
            // The base's sector checksums hold outside the patched range (format 1 bases
            // have none: all are computed).
            let crcs = match &base {
                Some((_, h, _)) if !h.sector_crcs.is_empty() => {
                    let mut crcs = h.sector_crcs.clone();
                    recompute_crcs(&mut crcs, data, 0, touched.clone(), len);
                    crcs
                }
                _ => sector_crcs(data),
            };
            let mut header = self.new_header(addr, meta, len, crcs);
            if let Some((bs, bh, _)) = &base {
                if *bs != target && !header.sector_crcs.is_empty() {
                    // Made from the copy kept: the next patch can catch this slot up.
                    header.diff = Some((bh.seq, bitmap(sectors, touched)));
                }
            }
            o[..PAGE].fill(0);
            put_header(&header, &mut o[..PAGE]);
            self.write_buf(k, target, header, b).await?;
            Ok(old)
        })
    }
}

/// Whether sector `s` of a payload of `len` bytes matches its checksum in `h`; `data` holds
/// the payload from sector `first` on.
fn sector_ok(h: &Header, data: &[u8], first: usize, s: usize, len: usize) -> bool {
    let at = (s - first) * SECTOR;
    crc32c::crc32c(&data[at..at + SECTOR.min(len - s * SECTOR)]) == h.sector_crcs[s]
}

/// Recomputes `crcs[s]` for the sectors `touched` of a payload of `len` bytes; `data` holds
/// the payload from sector `first` on.
fn recompute_crcs(
    crcs: &mut [u32],
    data: &[u8],
    first: usize,
    touched: std::ops::Range<usize>,
    len: usize,
) {
    for s in touched {
        let at = (s - first) * SECTOR;
        crcs[s] = crc32c::crc32c(&data[at..at + SECTOR.min(len - s * SECTOR)]);
    }
}

/// Consecutive runs of the ascending sector numbers in `s`.
fn runs(s: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for &x in s {
        match out.last_mut() {
            Some(r) if r.end == x => r.end += 1,
            _ => out.push(x..x + 1),
        }
    }
    out
}

/// A bitmap of `sectors` bits with those in `set` on.
fn bitmap(sectors: usize, set: std::ops::Range<usize>) -> Vec<u8> {
    let mut bits = vec![0u8; sectors.div_ceil(8)];
    for s in set {
        bits[s / 8] |= 1 << (s % 8);
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_io::DeviceConfig;

    const VOLS: [VolumeSlots; 1] = [VolumeSlots {
        volume: 7,
        extents: 3,
        rows_per_extent: 4,
    }];

    fn device(dir: &tempfile::TempDir) -> Arc<Device> {
        let mut cfg = DeviceConfig::file(dir.path().join("shards.img"), store_bytes(4096, &VOLS));
        cfg.pool_bytes = 8 << 20;
        cfg.reserve = true; // as the appliance opens stores (mapped on tmpfs)
        Arc::new(Device::open(&cfg).unwrap())
    }

    fn addr(row: u32) -> ChunkAddr {
        ChunkAddr {
            volume: 7,
            extent: 2,
            row,
            pos: 1,
        }
    }

    fn chunk(v: u64, acked: u64) -> Chunk {
        Chunk {
            version: v,
            cols: vec![v, 1],
            acked,
            acked_cols: Vec::new(),
            data: vec![v as u8; 4096],
        }
    }

    fn versions(c: &[Chunk]) -> Vec<u64> {
        c.iter().map(|c| c.version).collect()
    }

    #[tokio::test]
    async fn keeps_two_slots_by_the_store_contract_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir);
        let s = DiskShardStore::open(dev.clone(), 4096, &VOLS, false)
            .await
            .unwrap();
        assert!(s.read(addr(1)).await.unwrap().is_empty());
        s.write(addr(1), chunk(5, 5)).await.unwrap();
        s.write(addr(1), chunk(7, 7)).await.unwrap();
        assert_eq!(versions(&s.read(addr(1)).await.unwrap()), vec![7, 5]);
        // Unacknowledged writes replace the newest slot; the acknowledged copy stays.
        s.write(addr(1), chunk(9, 7)).await.unwrap();
        s.write(addr(1), chunk(10, 7)).await.unwrap();
        assert_eq!(versions(&s.read(addr(1)).await.unwrap()), vec![10, 7]);
        let got = s.read(addr(1)).await.unwrap();
        assert_eq!(got[0].data, vec![10; 4096]);
        assert_eq!(got[0].cols, vec![10, 1]);
        drop(s);
        // Reopened: same contents, and new writes are newer than old ones.
        let s = DiskShardStore::open(dev, 4096, &VOLS, false).await.unwrap();
        assert_eq!(versions(&s.read(addr(1)).await.unwrap()), vec![10, 7]);
        s.write(addr(1), chunk(11, 11)).await.unwrap();
        assert_eq!(versions(&s.read(addr(1)).await.unwrap()), vec![11, 10]);
        // Outside the volume: refused.
        assert!(s.read(ChunkAddr { row: 4, ..addr(0) }).await.is_err());
    }

    /// A patch lands exactly as a write of the patched chunk would (same slot rule, same
    /// bytes), on this store and on the in-memory one; ranged reads return only the wanted
    /// copy's range.
    #[tokio::test]
    async fn patches_and_ranged_reads_match_whole_chunk_operations() {
        use crate::shard::{MemShardStore, PatchOp, Want};
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskShardStore::open(device(&dir), 4096, &VOLS, false)
            .await
            .unwrap();
        let mem = MemShardStore::default();
        let stores: [&dyn ShardStore; 2] = [&disk, &mem];
        for s in stores {
            s.write(addr(2), chunk(5, 5)).await.unwrap();
            s.write(addr(2), chunk(7, 7)).await.unwrap();
            let mut head = chunk(9, 7);
            head.data = vec![0x0f; 512];
            let patch = |base, op, head: &Chunk| Patch {
                base,
                chunk_len: 4096,
                off: 1024,
                op,
                head: head.clone(),
            };
            s.patch(addr(2), patch(Want::Version(7), PatchOp::Xor, &head))
                .await
                .unwrap();
            let got = s.read(addr(2)).await.unwrap();
            assert_eq!(versions(&got), vec![9, 7]);
            assert_eq!(got[0].data[1023..1025], [7, 7 ^ 0x0f]);
            assert_eq!(got[0].data[1536..1537], [7]);
            assert_eq!(got[0].cols, vec![9, 1]);
            // Unacknowledged again: replaces the newest, from the acknowledged base.
            head.version = 10;
            s.patch(addr(2), patch(Want::Version(7), PatchOp::Replace, &head))
                .await
                .unwrap();
            let got = s.read(addr(2)).await.unwrap();
            assert_eq!(versions(&got), vec![10, 7]);
            assert_eq!(got[0].data[1023..1025], [7, 0x0f]);
            // A base the store does not hold is refused and changes nothing.
            assert!(matches!(
                s.patch(addr(2), patch(Want::Version(9), PatchOp::Replace, &head))
                    .await,
                Err(ShardError::Mismatch(_))
            ));
            assert_eq!(versions(&s.read(addr(2)).await.unwrap()), vec![10, 7]);
            let read = |want, off, len| RangeRead { want, off, len };
            let r = s
                .read_range(addr(2), read(Want::Version(7), 1020, 8))
                .await
                .unwrap();
            assert_eq!((versions(&r), r[0].data.clone()), (vec![7], vec![7; 8]));
            let r = s
                .read_range(addr(2), read(Want::Any, 1020, 8))
                .await
                .unwrap();
            assert_eq!(versions(&r), vec![10, 7]);
            assert_eq!(r[0].data, [7, 7, 7, 7, 0x0f, 0x0f, 0x0f, 0x0f]);
            let r = s
                .read_range(addr(2), read(Want::Cols(vec![3, 1]), 0, 8))
                .await
                .unwrap();
            assert!(r.is_empty());
        }
    }

    /// One step of the model test below: a whole write, or a patch of `len` bytes at `off`
    /// from the newest (`base` 0) or older (1) copy held, or from zeros (2).
    #[derive(Debug, Clone)]
    enum Step {
        Reopen,
        Write {
            fill: u8,
            acked_back: u64,
        },
        Patch {
            base: usize,
            xor: bool,
            off: usize,
            len: usize,
            fill: u8,
            acked_back: u64,
        },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            1 => Just(Step::Reopen),
            3 => (any::<u8>(), 0..3u64).prop_map(|(fill, acked_back)| Step::Write { fill, acked_back }),
            8 => (
                0..3usize,
                any::<bool>(),
                0..CHUNK16,
                1..9000usize,
                any::<u8>(),
                0..3u64
            )
                .prop_map(|(base, xor, off, len, fill, acked_back)| Step::Patch {
                    base,
                    xor,
                    off,
                    len: len.min(CHUNK16 - off),
                    fill,
                    acked_back,
                }),
        ]
    }

    const CHUNK16: usize = 4 * SECTOR;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Multi-sector chunks: any sequence of writes and patches (any range, any base)
        /// leaves the disk store holding exactly what the in-memory model holds, and every
        /// copy it returns checks (patches recompute only the sector checksums under their
        /// range; a wrong one would hide the copy from the next read).
        #[test]
        fn patches_keep_sector_checksums_true_to_the_payload(
            steps in proptest::collection::vec(step(), 1..24),
            probe in (0..CHUNK16, 1..CHUNK16),
        ) {
            use crate::shard::{MemShardStore, PatchOp};
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let mut cfg = DeviceConfig::file(
                    dir.path().join("shards.img"),
                    store_bytes(CHUNK16, &VOLS),
                );
                cfg.pool_bytes = 8 << 20;
                cfg.reserve = true; // as the appliance opens stores (mapped on tmpfs)
                let dev = Arc::new(Device::open(&cfg).unwrap());
                let mut disk = DiskShardStore::open(dev.clone(), CHUNK16, &VOLS, false).await.unwrap();
                let mem = MemShardStore::default();
                let mut failures = 0;
                let a = addr(2);
                for (i, st) in steps.iter().enumerate() {
                    let version = i as u64 + 1;
                    let held = mem.read(a).await.unwrap();
                    let head = |acked_back: u64, data: Vec<u8>| Chunk {
                        version,
                        cols: vec![version, 1],
                        acked: version.saturating_sub(acked_back),
                        acked_cols: Vec::new(),
                        data,
                    };
                    let (d, m) = match st {
                        Step::Reopen => {
                            failures += disk.checksum_failures();
                            drop(disk);
                            disk = DiskShardStore::open(dev.clone(), CHUNK16, &VOLS, false)
                                .await
                                .unwrap();
                            (Ok(Vec::new()), Ok(Vec::new()))
                        }
                        Step::Write { fill, acked_back } => {
                            let c = head(*acked_back, vec![*fill; CHUNK16]);
                            (
                                disk.write(a, c.clone()).await.map(|()| Vec::new()),
                                mem.write(a, c).await.map(|()| Vec::new()),
                            )
                        }
                        Step::Patch { base, xor, off, len, fill, acked_back } => {
                            let base = match held.get(*base) {
                                Some(c) if *base < 2 => Want::Version(c.version),
                                _ => Want::Zero,
                            };
                            let p = Patch {
                                base,
                                chunk_len: CHUNK16 as u32,
                                off: *off as u32,
                                op: if *xor { PatchOp::Xor } else { PatchOp::Replace },
                                head: head(*acked_back, vec![*fill; *len]),
                            };
                            (disk.patch(a, p.clone()).await, mem.patch(a, p).await)
                        }
                    };
                    assert_eq!(d, m, "step {i}: {st:?}");
                    let (dc, mc) = (disk.read(a).await.unwrap(), mem.read(a).await.unwrap());
                    assert_eq!(dc, mc, "step {i}: {st:?}");
                    let r = RangeRead { want: Want::Any, off: probe.0 as u32, len: probe.1.min(CHUNK16 - probe.0) as u32 };
                    assert_eq!(
                        disk.read_range(a, r.clone()).await.unwrap(),
                        mem.read_range(a, r).await.unwrap()
                    );
                }
                assert_eq!(failures + disk.checksum_failures(), 0);
                // And the same after a reopen.
                let before = disk.read(a).await.unwrap();
                drop(disk);
                let disk = DiskShardStore::open(dev, CHUNK16, &VOLS, false).await.unwrap();
                assert_eq!(disk.read(a).await.unwrap(), before);
            });
        }
    }

    /// Patches from the newest copy alternate slots and, after the first in each slot, write
    /// only the sectors that differ; the copies read back as the model's, also after reopen
    /// (when the first patch reads whole again).
    #[tokio::test]
    async fn steady_patches_write_only_the_sectors_that_differ() {
        use crate::shard::{MemShardStore, PatchOp};
        let dir = tempfile::tempdir().unwrap();
        let mut cfg =
            DeviceConfig::file(dir.path().join("shards.img"), store_bytes(CHUNK16, &VOLS));
        cfg.pool_bytes = 8 << 20;
        cfg.reserve = true; // as the appliance opens stores (mapped on tmpfs)
        let dev = Arc::new(Device::open(&cfg).unwrap());
        let mut disk = DiskShardStore::open(dev.clone(), CHUNK16, &VOLS, false)
            .await
            .unwrap();
        let mem = MemShardStore::default();
        let first = Chunk {
            data: vec![1; CHUNK16],
            ..chunk(1, 1)
        };
        disk.write(addr(0), first.clone()).await.unwrap();
        mem.write(addr(0), first).await.unwrap();
        for v in 2..=20u64 {
            if v == 12 {
                drop(disk);
                disk = DiskShardStore::open(dev.clone(), CHUNK16, &VOLS, false)
                    .await
                    .unwrap();
            }
            let p = Patch {
                base: Want::Version(v - 1),
                chunk_len: CHUNK16 as u32,
                off: ((v as usize * 5000) % (CHUNK16 - 600)) as u32,
                op: PatchOp::Replace,
                head: Chunk {
                    data: vec![v as u8; 600],
                    ..chunk(v, v - 1)
                },
            };
            assert_eq!(
                disk.patch(addr(0), p.clone()).await.unwrap(),
                mem.patch(addr(0), p).await.unwrap()
            );
            assert_eq!(
                disk.read(addr(0)).await.unwrap(),
                mem.read(addr(0)).await.unwrap(),
                "after version {v}"
            );
        }
        // Since the reopen (versions 12 to 20): the first reads its base whole (checking
        // it), the other eight write in place.
        assert_eq!(disk.patches_in_place(), 8);
        assert_eq!(disk.checksum_failures(), 0);
    }

    fn poke(dir: &tempfile::TempDir, off: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let path = dir.path().join("shards.img");
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, off).unwrap();
    }

    /// A ranged read checks the sectors it returns: damage elsewhere in the copy does not
    /// hide it, damage under the range does. Headers without per-sector checksums (format 1)
    /// are still read, their payload checked whole.
    #[tokio::test]
    async fn ranged_reads_check_their_sectors_and_old_headers_whole() {
        use crate::shard::Want;
        let dir = tempfile::tempdir().unwrap();
        let cb = 4 * SECTOR;
        let mut cfg = DeviceConfig::file(dir.path().join("shards.img"), store_bytes(cb, &VOLS));
        cfg.pool_bytes = 8 << 20;
        cfg.reserve = true; // as the appliance opens stores (mapped on tmpfs)
        let dev = Arc::new(Device::open(&cfg).unwrap());
        let s = DiskShardStore::open(dev.clone(), cb, &VOLS, false)
            .await
            .unwrap();
        let big = |v: u64| Chunk {
            data: (0..cb).map(|i| (i / SECTOR) as u8 ^ v as u8).collect(),
            ..chunk(v, v)
        };
        s.write(addr(1), big(3)).await.unwrap();
        s.write(addr(1), big(4)).await.unwrap();
        let index = s.index(&addr(1)).unwrap();
        let slots = s.read_slots(&addr(1)).await.unwrap();
        let (newest, older) = (slots[0].0, slots[1].0);
        assert_eq!(slots[0].1.sector_crcs.len(), 4);
        poke(
            &dir,
            s.slot_offset(index, newest) + (PAGE + 2 * SECTOR + 7) as u64,
            &[0xee],
        );
        let any = |off: usize, len| RangeRead {
            want: Want::Any,
            off: off as u32,
            len,
        };
        let got = s.read_range(addr(1), any(SECTOR + 8, 100)).await.unwrap();
        assert_eq!(versions(&got), vec![4, 3]);
        assert_eq!(got[0].data, vec![1 ^ 4; 100]);
        assert_eq!(got[1].data, vec![1 ^ 3; 100]);
        assert_eq!(s.checksum_failures(), 0);
        let got = s
            .read_range(addr(1), any(2 * SECTOR - 8, 16))
            .await
            .unwrap();
        assert_eq!(versions(&got), vec![3]);
        assert_eq!(got[0].data, [vec![1 ^ 3; 8], vec![2 ^ 3; 8]].concat());
        assert_eq!(s.checksum_failures(), 1);
        assert_eq!(versions(&s.read(addr(1)).await.unwrap()), vec![3]);
        // The older copy's header rewritten as format 1 (no per-sector checksums).
        let mut h = slots[1].1.clone();
        h.sector_crcs.clear();
        h.data_crc = crc32c::crc32c(&slots[1].2);
        let mut page = vec![0u8; PAGE];
        put_header(&h, &mut page);
        assert_eq!(get_header(&page), Some(h));
        let at = s.slot_offset(index, older);
        poke(&dir, at, &page);
        // As written by an older version before this open (the store caches headers).
        drop(s);
        let s = DiskShardStore::open(dev, cb, &VOLS, false).await.unwrap();
        let v3 = RangeRead {
            want: Want::Version(3),
            off: 0,
            len: 8,
        };
        let got = s.read_range(addr(1), v3.clone()).await.unwrap();
        assert_eq!(got[0].data, vec![3; 8]);
        // Checked whole: damage in its last sector hides it from a read of its first.
        poke(&dir, at + (PAGE + 3 * SECTOR) as u64, &[0xee]);
        assert!(s.read_range(addr(1), v3).await.unwrap().is_empty());
    }

    /// Writes decide from the headers but never leave a torn copy in place of a good one.
    /// (A torn copy is a write cut short by a crash, so it predates the store's open: the
    /// store is reopened after the damage.)
    #[tokio::test]
    async fn a_write_does_not_keep_a_torn_copy_behind_a_good_header() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir);
        let s = DiskShardStore::open(dev.clone(), 4096, &VOLS, false)
            .await
            .unwrap();
        s.write(addr(3), chunk(3, 3)).await.unwrap();
        s.write(addr(3), chunk(4, 4)).await.unwrap();
        let index = s.index(&addr(3)).unwrap();
        let newest = s.read_slots(&addr(3)).await.unwrap()[0].0;
        poke(
            &dir,
            s.slot_offset(index, newest) + PAGE as u64 + 9,
            &[0xee],
        );
        drop(s);
        let s = DiskShardStore::open(dev, 4096, &VOLS, false).await.unwrap();
        // By its header, copy 4 (acknowledged) would be kept and copy 3 replaced; its payload
        // is torn, so copy 3 stays and the torn slot is replaced.
        s.write(addr(3), chunk(5, 4)).await.unwrap();
        assert_eq!(versions(&s.read(addr(3)).await.unwrap()), vec![5, 3]);
        assert!(s.checksum_failures() >= 1);
    }

    #[tokio::test]
    async fn damaged_slots_and_superblocks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir);
        let s = DiskShardStore::open(dev.clone(), 4096, &VOLS, false)
            .await
            .unwrap();
        s.write(addr(2), chunk(3, 3)).await.unwrap();
        s.write(addr(2), chunk(4, 4)).await.unwrap();
        // Flip a payload byte of the newest slot, as a torn write would.
        let index = s.index(&addr(2)).unwrap();
        let newest = s.read_slots(&addr(2)).await.unwrap()[0].0;
        let off = s.slot_offset(index, newest) + PAGE as u64 + 100;
        let path = dir.path().join("shards.img");
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&[0xee], off).unwrap();
        }
        let dev2 = device(&dir);
        let s2 = DiskShardStore::open(dev2.clone(), 4096, &VOLS, false)
            .await
            .unwrap();
        assert_eq!(versions(&s2.read(addr(2)).await.unwrap()), vec![3]);
        assert_eq!(s2.checksum_failures(), 1, "the damaged slot is counted");
        assert_eq!(s.checksum_failures(), 0);
        // Wrong chunk size: refused with the cause named.
        let e = DiskShardStore::open(dev2, 8192, &VOLS, false)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("chunk size") || e.to_string().contains("needs"),
            "{e}"
        );
    }
}

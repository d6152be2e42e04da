//! Chunks, their addresses and the shard-store contract, plus an in-memory store.
//!
//! A *chunk* is one column of one stripe row. Every chunk written carries the row *version* it
//! was written at and the version vector `cols` of the row state it belongs to (for each data
//! column, the version at which that column was last written). That makes every copy
//! self-describing: a data chunk is valid for row state `S` iff its version equals
//! `S.cols[column]`; a parity chunk iff its version equals `S.version`. Repair after a crash
//! mid-write needs nothing else ([`crate::engine`]).
//!
//! Store contract (every implementation: memory, local disk, remote peer):
//! - A holder keeps two copies of each chunk (two slots) and a write always becomes the newest.
//!   It replaces the older slot when the current newest copy belongs to a state the writer
//!   knows to be acknowledged (its content version is at most the incoming `acked`), and the
//!   newest slot otherwise: a copy of the last acknowledged state is never pushed out by
//!   writes that were not acknowledged, so a primary can always roll a row back to it.
//! - A write is durable when it returns `Ok` (no acknowledged-but-volatile state).
//! - A copy whose checksum does not verify is never returned (torn write, bit rot).
//! - A chunk never written reads as no copies.

use crate::layout::ControllerId;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

/// A boxed, sendable future (the store and peer traits are object-safe).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Volume id, cluster-wide.
pub type VolumeId = u32;

/// Where one chunk lives, independent of which controller holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkAddr {
    /// Volume.
    pub volume: VolumeId,
    /// Extent index.
    pub extent: u64,
    /// Row within the extent.
    pub row: u32,
    /// Position in the placement set (`0..k` data, `k..k+m` parity).
    pub pos: u8,
}

/// One stored copy of a chunk.
#[derive(Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Row version this copy was written at.
    pub version: u64,
    /// Version of each data column in the row state this copy belongs to (length `k`).
    pub cols: Vec<u64>,
    /// Newest row version the writer knew to be acknowledged to a host (never rolled back).
    pub acked: u64,
    /// Column versions of that acknowledged (or served) state; empty when unknown. A holder
    /// keeps the copy valid for it (see [`keep_newest`]).
    pub acked_cols: Vec<u64>,
    /// Payload (`chunk_bytes`).
    pub data: Vec<u8>,
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("version", &self.version)
            .field("cols", &self.cols)
            .field("acked", &self.acked)
            .field("acked_cols", &self.acked_cols)
            .field("len", &self.data.len())
            .finish()
    }
}

impl Chunk {
    /// The newest data version of the row state this copy belongs to.
    pub fn content(&self) -> u64 {
        self.cols.iter().copied().max().unwrap_or(0)
    }

    /// CRC32C over version, column vector and payload: what a store records and checks.
    pub fn checksum(&self) -> u32 {
        let mut c = crc32c::crc32c(&self.version.to_le_bytes());
        c = crc32c::crc32c_append(c, &self.acked.to_le_bytes());
        for v in &self.acked_cols {
            c = crc32c::crc32c_append(c, &v.to_le_bytes());
        }
        for v in &self.cols {
            c = crc32c::crc32c_append(c, &v.to_le_bytes());
        }
        crc32c::crc32c_append(c, &self.data)
    }
}

/// The two-slot rule, shared by every store: whether a write of `incoming` at position `pos`
/// keeps the current `newest` copy (replacing the older slot) or replaces `newest` (keeping
/// the older). The copy valid for the acknowledged state the writer names is always kept;
/// without that information, the newest is kept when its content is at most `acked`.
pub fn keep_newest(pos: u8, incoming: &Chunk, newest: &Chunk, older: Option<&Chunk>) -> bool {
    let a = &incoming.acked_cols;
    if !a.is_empty() {
        let valid = |c: &Chunk| match a.get(pos as usize) {
            Some(&v) => c.version == v,
            None => c.cols == *a,
        };
        if valid(newest) {
            return true;
        }
        if older.is_some_and(valid) {
            return false;
        }
    }
    newest.content() <= incoming.acked
}

/// Why a shard operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    /// The request's epoch is older than one this holder has seen: the sender is fenced.
    #[error("stale epoch {theirs}: holder has seen epoch {ours}")]
    StaleEpoch {
        /// Holder's epoch.
        ours: u64,
        /// Request's epoch.
        theirs: u64,
    },
    /// The holder did not answer (down, partitioned, timed out).
    #[error("controller {0} unreachable")]
    Unreachable(ControllerId),
    /// The holder's device failed.
    #[error("device error: {0}")]
    Io(String),
    /// A patch named a base copy the holder does not have, or a range outside the chunk: the
    /// holder's copies are not what the primary believes (the position is marked for resync).
    #[error("holder's copies do not match the request: {0}")]
    Mismatch(String),
}

/// Which copy of a chunk a ranged read returns or a patch starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Every valid copy (reads only).
    Any,
    /// No copy: the state's content here is all zeros (never written); a patch starts from
    /// zeros.
    Zero,
    /// The copy written at this version (a data column of the state).
    Version(u64),
    /// The copy belonging to the row state with these column versions (a parity column).
    Cols(Vec<u64>),
}

impl Want {
    /// Whether copy `c` is the one wanted.
    pub fn matches(&self, c: &Chunk) -> bool {
        self.matches_header(c.version, &c.cols)
    }

    /// Whether a copy with this version and column vector is the one wanted.
    pub fn matches_header(&self, version: u64, cols: &[u64]) -> bool {
        match self {
            Self::Any => true,
            Self::Zero => false,
            Self::Version(v) => version == *v,
            Self::Cols(want) => cols == want.as_slice(),
        }
    }
}

/// How a patch's bytes combine with its base copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchOp {
    /// The bytes replace the range (a data column's new content).
    Replace,
    /// The bytes are XOR-ed into the range (a parity column's change).
    Xor,
}

/// A ranged read: bytes `[off, off + len)` of the copies `want` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRead {
    /// Which copies.
    pub want: Want,
    /// First byte.
    pub off: u32,
    /// Bytes.
    pub len: u32,
}

impl RangeRead {
    /// The copies this read names, each cut to its range: what the holder returns. Copies
    /// shorter than the range are left out.
    pub fn cut(&self, copies: Vec<Chunk>) -> Vec<Chunk> {
        let (off, len) = (self.off as usize, self.len as usize);
        copies
            .into_iter()
            .filter(|c| self.want.matches(c) && off + len <= c.data.len())
            .map(|mut c| {
                if off > 0 || len < c.data.len() {
                    c.data = c.data[off..off + len].to_vec();
                }
                c
            })
            .collect()
    }
}

/// A patch: a new copy of a chunk made at its holder from the copy `base` names, with
/// `head.data` applied at `off` by `op`, under `head`'s version and column vectors. A small
/// write sends the changed bytes instead of whole chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    /// The copy it starts from.
    pub base: Want,
    /// The chunk's full length.
    pub chunk_len: u32,
    /// Where `head.data` goes.
    pub off: u32,
    /// How it combines.
    pub op: PatchOp,
    /// Header of the new copy; its `data` is the patch's bytes.
    pub head: Chunk,
}

impl Patch {
    /// The copy the patch produces from the holder's `copies`, and the bytes it replaced
    /// ([`PatchOp::Replace`]; empty for [`PatchOp::Xor`]).
    ///
    /// # Errors
    /// [`ShardError::Mismatch`] when no copy matches `base` at `chunk_len` bytes, or the range
    /// does not fit.
    pub fn apply(self, copies: Vec<Chunk>) -> Result<(Chunk, Vec<u8>), ShardError> {
        let chunk_len = self.chunk_len as usize;
        self.range()?;
        let mut data = match &self.base {
            Want::Zero => vec![0; chunk_len],
            Want::Any => return Err(ShardError::Mismatch("a patch needs a named base".into())),
            base => {
                copies
                    .into_iter()
                    .find(|c| base.matches(c) && c.data.len() == chunk_len)
                    .ok_or_else(|| ShardError::Mismatch(format!("no copy matching {base:?}")))?
                    .data
            }
        };
        let old = self.apply_to(&mut data, 0)?;
        Ok((Chunk { data, ..self.head }, old))
    }

    /// The byte range of the chunk the patch changes.
    ///
    /// # Errors
    /// [`ShardError::Mismatch`] when it does not fit the chunk.
    pub fn range(&self) -> Result<std::ops::Range<usize>, ShardError> {
        let (off, chunk_len) = (self.off as usize, self.chunk_len as usize);
        let end = off
            .checked_add(self.head.data.len())
            .filter(|&e| e <= chunk_len)
            .ok_or_else(|| {
                ShardError::Mismatch(format!(
                    "range {off}+{} outside a {chunk_len}-byte chunk",
                    self.head.data.len()
                ))
            })?;
        Ok(off..end)
    }

    /// Applies the patch's bytes in place to `data`, the base copy's payload from byte `at`
    /// of the chunk on (the whole payload with `at` 0); returns the bytes replaced
    /// ([`PatchOp::Replace`]; empty for [`PatchOp::Xor`]).
    ///
    /// # Errors
    /// [`ShardError::Mismatch`] when the range does not fit `data`.
    pub fn apply_to(&self, data: &mut [u8], at: usize) -> Result<Vec<u8>, ShardError> {
        let r = self.range()?;
        let Some(target) = r
            .start
            .checked_sub(at)
            .and_then(|from| data.get_mut(from..from + r.len()))
        else {
            return Err(ShardError::Mismatch(format!(
                "range {r:?} outside {} bytes from {at}",
                data.len()
            )));
        };
        Ok(match self.op {
            PatchOp::Replace => {
                let old = target.to_vec();
                target.copy_from_slice(&self.head.data);
                old
            }
            PatchOp::Xor => {
                for (d, p) in target.iter_mut().zip(&self.head.data) {
                    *d ^= p;
                }
                Vec::new()
            }
        })
    }
}

/// A controller's local chunk storage.
pub trait ShardStore: Send + Sync + fmt::Debug {
    /// Every valid copy, newest-written first (0, 1 or 2 of them).
    fn read(&self, addr: ChunkAddr) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>>;
    /// Stores `chunk` as the newest copy, replacing the older slot; durable on `Ok`.
    fn write(&self, addr: ChunkAddr, chunk: Chunk) -> BoxFut<'_, Result<(), ShardError>>;
    /// The copies `read` names, cut to its range. A store may skip checking the copies not
    /// wanted; the ones returned are checked whole.
    fn read_range(
        &self,
        addr: ChunkAddr,
        read: RangeRead,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        Box::pin(async move { Ok(read.cut(self.read(addr).await?)) })
    }
    /// Stores the copy `patch` makes from the copies held (see [`Patch::apply`]) as a
    /// [`ShardStore::write`] of it would; durable on `Ok`. Returns the bytes it replaced.
    fn patch(&self, addr: ChunkAddr, patch: Patch) -> BoxFut<'_, Result<Vec<u8>, ShardError>> {
        Box::pin(async move {
            let copies = if patch.base == Want::Zero {
                Vec::new()
            } else {
                self.read(addr).await?
            };
            let (chunk, old) = patch.apply(copies)?;
            self.write(addr, chunk).await?;
            Ok(old)
        })
    }
}

#[derive(Debug, Clone)]
struct Slot {
    chunk: Chunk,
    crc: u32,
}

/// Two slots per chunk in memory; used by the simulation and unit tests. Crash behaviour
/// (torn writes) is injected through [`MemShardStore::tear_newest`].
#[derive(Debug, Default)]
pub struct MemShardStore {
    slots: Mutex<HashMap<ChunkAddr, Vec<Slot>>>,
}

impl MemShardStore {
    /// Stores synchronously (the simulation applies deliveries in its own order).
    pub fn write_now(&self, addr: ChunkAddr, chunk: Chunk) {
        let crc = chunk.checksum();
        let mut s = self.slots.lock().expect("store");
        let v = s.entry(addr).or_default();
        let keep = v
            .first()
            .is_none_or(|n| keep_newest(addr.pos, &chunk, &n.chunk, v.get(1).map(|o| &o.chunk)));
        if keep {
            v.insert(0, Slot { chunk, crc });
            v.truncate(2);
        } else {
            v[0] = Slot { chunk, crc };
        }
    }
    /// Reads synchronously.
    pub fn read_now(&self, addr: ChunkAddr) -> Vec<Chunk> {
        let s = self.slots.lock().expect("store");
        s.get(&addr)
            .map(|v| {
                v.iter()
                    .filter(|sl| sl.chunk.checksum() == sl.crc)
                    .map(|sl| sl.chunk.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
    /// Damages the newest copy's payload as a write torn by power loss would.
    pub fn tear_newest(&self, addr: ChunkAddr) {
        let mut s = self.slots.lock().expect("store");
        if let Some(sl) = s.get_mut(&addr).and_then(|v| v.first_mut()) {
            let n = sl.chunk.data.len();
            for b in &mut sl.chunk.data[n / 2..] {
                *b ^= 0xa5;
            }
        }
    }
    /// Number of chunks with at least one copy.
    pub fn chunk_count(&self) -> usize {
        self.slots.lock().expect("store").len()
    }
}

impl ShardStore for MemShardStore {
    fn read(&self, addr: ChunkAddr) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        let r = self.read_now(addr);
        Box::pin(async move { Ok(r) })
    }
    fn write(&self, addr: ChunkAddr, chunk: Chunk) -> BoxFut<'_, Result<(), ShardError>> {
        self.write_now(addr, chunk);
        Box::pin(async { Ok(()) })
    }
}

/// Several stores behind one: a volume's chunks go to the store registered for it, every
/// other volume's to the base store. Volumes created at run time get a store of their own
/// (the base store's slots are fixed when it is formatted).
#[derive(Debug)]
pub struct StoreSet {
    base: std::sync::Arc<dyn ShardStore>,
    extra: std::sync::RwLock<HashMap<VolumeId, std::sync::Arc<dyn ShardStore>>>,
}

impl StoreSet {
    /// Every volume in `base` until [`StoreSet::add`] says otherwise.
    pub fn new(base: std::sync::Arc<dyn ShardStore>) -> Self {
        Self {
            base,
            extra: std::sync::RwLock::default(),
        }
    }

    /// Routes `volume`'s chunks to `store` from now on.
    pub fn add(&self, volume: VolumeId, store: std::sync::Arc<dyn ShardStore>) {
        self.extra
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(volume, store);
    }

    /// Stops routing `volume` (it was deleted); returns its store.
    pub fn remove(&self, volume: VolumeId) -> Option<std::sync::Arc<dyn ShardStore>> {
        self.extra
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&volume)
    }

    fn pick(&self, volume: VolumeId) -> std::sync::Arc<dyn ShardStore> {
        self.extra
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&volume)
            .unwrap_or(&self.base)
            .clone()
    }
}

impl ShardStore for StoreSet {
    fn read(&self, addr: ChunkAddr) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        let s = self.pick(addr.volume);
        Box::pin(async move { s.read(addr).await })
    }

    fn write(&self, addr: ChunkAddr, chunk: Chunk) -> BoxFut<'_, Result<(), ShardError>> {
        let s = self.pick(addr.volume);
        Box::pin(async move { s.write(addr, chunk).await })
    }

    fn read_range(
        &self,
        addr: ChunkAddr,
        read: RangeRead,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        let s = self.pick(addr.volume);
        Box::pin(async move { s.read_range(addr, read).await })
    }

    fn patch(&self, addr: ChunkAddr, patch: Patch) -> BoxFut<'_, Result<Vec<u8>, ShardError>> {
        let s = self.pick(addr.volume);
        Box::pin(async move { s.patch(addr, patch).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> ChunkAddr {
        ChunkAddr {
            volume: 1,
            extent: 2,
            row: 3,
            pos: 0,
        }
    }
    fn chunk(v: u64) -> Chunk {
        Chunk {
            version: v,
            cols: vec![v, 0],
            acked: v,
            acked_cols: Vec::new(),
            data: vec![v as u8; 16],
        }
    }

    #[test]
    fn ranged_reads_and_patches_start_from_the_named_copy() {
        let copies = vec![chunk(7), chunk(5)];
        let read = |want, off, len| RangeRead { want, off, len };
        let cut = read(Want::Version(5), 4, 8).cut(copies.clone());
        assert_eq!(cut.len(), 1);
        assert_eq!((cut[0].version, cut[0].data.clone()), (5, vec![5; 8]));
        assert_eq!(read(Want::Any, 0, 16).cut(copies.clone()).len(), 2);
        assert!(read(Want::Any, 8, 9).cut(copies.clone()).is_empty());
        assert!(read(Want::Cols(vec![9, 0]), 0, 4)
            .cut(copies.clone())
            .is_empty());
        let mut head = chunk(9);
        head.data = vec![0xff; 4];
        let patch = |base, chunk_len, off, op| Patch {
            base,
            chunk_len,
            off,
            op,
            head: head.clone(),
        };
        let (p, old) = patch(Want::Cols(vec![5, 0]), 16, 2, PatchOp::Xor)
            .apply(copies.clone())
            .unwrap();
        assert!(old.is_empty());
        assert_eq!(p.version, 9);
        assert_eq!(p.data[..8], [5, 5, 0xfa, 0xfa, 0xfa, 0xfa, 5, 5]);
        let (p, old) = patch(Want::Zero, 16, 12, PatchOp::Replace)
            .apply(Vec::new())
            .unwrap();
        assert_eq!(old, vec![0; 4]);
        let (_, old) = patch(Want::Version(7), 16, 1, PatchOp::Replace)
            .apply(copies.clone())
            .unwrap();
        assert_eq!(old, vec![7; 4]);
        assert_eq!(p.data, [vec![0; 12], vec![0xff; 4]].concat());
        assert!(matches!(
            patch(Want::Version(6), 16, 0, PatchOp::Replace).apply(copies.clone()),
            Err(ShardError::Mismatch(_))
        ));
        let refused = [
            patch(Want::Version(7), 16, 13, PatchOp::Replace),
            patch(Want::Version(7), 8, 0, PatchOp::Replace),
            patch(Want::Any, 16, 0, PatchOp::Replace),
            patch(Want::Version(7), 16, u32::MAX, PatchOp::Xor),
        ];
        for p in refused {
            assert!(p.apply(copies.clone()).is_err());
        }
    }

    #[test]
    fn keeps_two_newest_written_and_drops_torn_copies() {
        let s = MemShardStore::default();
        assert!(s.read_now(addr()).is_empty());
        s.write_now(addr(), chunk(5));
        s.write_now(addr(), chunk(7));
        let mut c = chunk(6);
        c.acked = 7;
        s.write_now(addr(), c); // newest by write order, not by version
        let got: Vec<u64> = s.read_now(addr()).iter().map(|c| c.version).collect();
        assert_eq!(got, vec![6, 7]);
        // Writes not known to follow an acknowledged newest copy replace it, keeping the
        // older slot (the last acknowledged state).
        let mut unacked = chunk(9);
        unacked.acked = 3;
        s.write_now(addr(), unacked.clone());
        unacked.version = 10;
        s.write_now(addr(), unacked);
        let got: Vec<u64> = s.read_now(addr()).iter().map(|c| c.version).collect();
        assert_eq!(got, vec![10, 7]);
        // Naming the acknowledged state's columns keeps exactly the copy valid for it, even
        // when it is not the newest (position 0 wants version 7).
        let mut named = chunk(12);
        named.acked = 100;
        named.acked_cols = vec![7, 0];
        s.write_now(addr(), named.clone());
        named.version = 13;
        s.write_now(addr(), named);
        let got: Vec<u64> = s.read_now(addr()).iter().map(|c| c.version).collect();
        assert_eq!(got, vec![13, 7]);
        s.tear_newest(addr());
        let got: Vec<u64> = s.read_now(addr()).iter().map(|c| c.version).collect();
        assert_eq!(got, vec![7]);
    }
}

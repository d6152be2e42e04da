//! Volumes over backing devices and across controllers.
//!
//! Two forms of a volume live here:
//! - [`engine::Engine`]: one controller's share of a volume erasure-coded across controllers
//!   (extents, placement, stripe rows, the primary's write path, degraded reads, write-intent
//!   marks, resync), reaching every shard through [`cluster::ClusterEnv`]. Exercised by the
//!   deterministic simulation in `tests/`; the appliance wires it to its peer transport and
//!   metadata log.
//! - [`LocalVolume`]: one volume stored contiguously on one local [`disk_io::Device`] (a single
//!   shard, no redundancy), with byte-granular reads and writes turned into aligned device I/O,
//!   and writes serialised per aligned range so a read-modify-write of a partial page never
//!   loses a concurrent update. It serves the LUN of a single controller today.
//!
//! Invariants (of [`LocalVolume`]; the engine's are in its module doc):
//! - Every device request is aligned to [`disk_io::IO_ALIGN_BYTES`]; a write that covers part of
//!   a page reads and rewrites the whole page while holding that page's range lock.
//! - Two writes whose aligned spans overlap never run at the same time ([`range_lock`]).
//! - A request outside the volume is refused before any I/O.
//!
//! Not here: SCSI (that is `lun`), the transport and the metadata log (`appliance`).

#![forbid(unsafe_code)]

pub mod cluster;
pub mod codec;
pub mod disk_store;
pub mod engine;
mod gather;
pub mod layout;
pub mod lease;
pub mod range_lock;
pub mod shard;

use disk_io::{Device, PooledBuf, IO_ALIGN_BYTES, IO_SIZE_MAX_BYTES};
use range_lock::{RangeGuard, RangeLock};
use std::sync::Arc;

/// Errors of the volume layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The byte range lies (partly) outside the volume.
    #[error("range offset {offset} length {len} is outside the volume of {size} bytes")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// The backing device failed.
    #[error("backing device: {0}")]
    Io(#[from] disk_io::IoError),
    /// The distributed volume could not serve the request now.
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::VolError),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Refuses `[offset, offset + len)` unless it lies inside a volume of `size` bytes.
fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(Error::OutOfRange { offset, len, size });
    }
    Ok(())
}

/// Data read from a volume: a window into pooled aligned buffers (no copy), or the buffers a
/// cluster read's pieces came in, in order (never joined by a copy).
#[derive(Debug)]
pub struct ReadData {
    bufs: Vec<PooledBuf>,
    /// A cluster read's pieces (`bufs` is then empty and `start` 0).
    owned: Vec<Vec<u8>>,
    start: usize,
    len: usize,
}

impl ReadData {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copies `out.len()` bytes starting at `at` (relative to the read) into `out`.
    ///
    /// # Panics
    /// If the range is outside the data.
    pub fn copy_to(&self, at: usize, out: &mut [u8]) {
        let mut done = 0;
        self.slices(at, out.len(), |s| {
            out[done..done + s.len()].copy_from_slice(s);
            done += s.len();
        });
    }
    /// Appends `len` bytes starting at `at` to `out` (no zero-filling of `out` first).
    ///
    /// # Panics
    /// If the range is outside the data.
    pub fn extend_into(&self, at: usize, len: usize, out: &mut Vec<u8>) {
        out.reserve(len);
        self.slices(at, len, |s| out.extend_from_slice(s));
    }
    /// Hands `f` the bytes `[at, at + len)` in order, as the slices they are stored in (for a
    /// vectored send straight from the read's buffers).
    ///
    /// # Panics
    /// If the range is outside the data.
    pub fn slices<'a>(&'a self, at: usize, len: usize, mut f: impl FnMut(&'a [u8])) {
        assert!(at + len <= self.len);
        let pooled = self.bufs.iter().map(PooledBuf::as_slice);
        let pieces = self.owned.iter().map(Vec::as_slice);
        let mut pos = self.start + at;
        let mut done = 0;
        for s in pooled.chain(pieces) {
            if done == len {
                break;
            }
            if pos >= s.len() {
                pos -= s.len();
                continue;
            }
            let n = (s.len() - pos).min(len - done);
            f(&s[pos..pos + n]);
            done += n;
            pos = 0;
        }
        assert_eq!(done, len);
    }
    /// The bytes as one vector (copies; tests and small replies).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.copy_to(0, &mut v);
        v
    }
}

/// One volume stored contiguously on one device starting at `base`.
#[derive(Debug)]
pub struct LocalVolume {
    dev: Arc<Device>,
    base: u64,
    size_bytes: u64,
    locks: RangeLock,
}

impl LocalVolume {
    /// A volume of `size_bytes` at byte `base` of `dev`.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] when the volume does not fit on the device or `base` is unaligned.
    pub fn new(dev: Arc<Device>, base: u64, size_bytes: u64) -> Result<Self> {
        let fits = base
            .checked_add(size_bytes)
            .is_some_and(|end| end <= dev.size_bytes());
        if !fits || !base.is_multiple_of(IO_ALIGN_BYTES as u64) {
            return Err(Error::OutOfRange {
                offset: base,
                len: size_bytes,
                size: dev.size_bytes(),
            });
        }
        Ok(Self {
            dev,
            base,
            size_bytes,
            locks: RangeLock::default(),
        })
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size_bytes)
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// # Errors
    /// Out-of-range requests and device errors.
    pub async fn read(&self, offset: u64, len: usize) -> Result<ReadData> {
        self.check(offset, len as u64)?;
        let (a0, a1) = Self::aligned_span(offset, len as u64);
        let mut bufs = Vec::new();
        let mut pos = a0;
        while pos < a1 {
            let n = ((a1 - pos) as usize).min(IO_SIZE_MAX_BYTES);
            let b = self.dev.pool().take(n).await;
            bufs.push(self.dev.read_into(self.base + pos, b).await?);
            pos += n as u64;
        }
        Ok(ReadData {
            bufs,
            owned: Vec::new(),
            start: (offset - a0) as usize,
            len,
        })
    }

    fn aligned_span(offset: u64, len: u64) -> (u64, u64) {
        let align = IO_ALIGN_BYTES as u64;
        let a0 = offset - offset % align;
        let a1 = (offset + len).div_ceil(align) * align;
        (a0, a1)
    }

    /// Checks `[offset, offset + len)` against the volume and, unless it is empty, locks its
    /// page-aligned span. `None` means there is nothing to do.
    async fn lock_span(&self, offset: u64, len: u64) -> Result<Option<RangeGuard<'_>>> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        let (a0, a1) = Self::aligned_span(offset, len);
        Ok(Some(self.locks.lock(a0, a1).await))
    }

    /// Writes `data` at `offset`; with `fua` it is on stable storage on return.
    ///
    /// # Errors
    /// Out-of-range requests and device errors.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let Some(_guard) = self.lock_span(offset, data.len() as u64).await? else {
            return Ok(());
        };
        self.write_locked(offset, data, fua).await
    }

    /// The write itself; the caller holds the range lock over the aligned span.
    async fn write_locked(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let align = IO_ALIGN_BYTES as u64;
        let end = offset + data.len() as u64;
        let (a0, a1) = Self::aligned_span(offset, data.len() as u64);
        let mut pos = a0;
        while pos < a1 {
            let n = ((a1 - pos) as usize).min(IO_SIZE_MAX_BYTES);
            let mut b = self.dev.pool().take(n).await;
            let chunk_end = pos + n as u64;
            // Partial first or last page: fetch the current contents first.
            if offset > pos {
                let head = self
                    .dev
                    .read_into(self.base + pos, self.dev.pool().take(IO_ALIGN_BYTES).await)
                    .await?;
                b.as_mut_slice()[..IO_ALIGN_BYTES].copy_from_slice(head.as_slice());
            }
            if end < chunk_end {
                let tail_at = chunk_end - align;
                let tail = self
                    .dev
                    .read_into(
                        self.base + tail_at,
                        self.dev.pool().take(IO_ALIGN_BYTES).await,
                    )
                    .await?;
                b.as_mut_slice()[n - IO_ALIGN_BYTES..].copy_from_slice(tail.as_slice());
            }
            let src_from = pos.max(offset);
            let src_to = chunk_end.min(end);
            b.as_mut_slice()[(src_from - pos) as usize..(src_to - pos) as usize]
                .copy_from_slice(&data[(src_from - offset) as usize..(src_to - offset) as usize]);
            self.dev.write_from(self.base + pos, b, fua).await?;
            pos = chunk_end;
        }
        Ok(())
    }

    /// Reads `verify.len()` bytes at `offset` and, only if they equal `verify`, writes `data`
    /// there, atomically with respect to every other write through this volume (the range
    /// lock is held from the read to the end of the write). Returns the offset of the first
    /// differing byte when the compare fails (nothing written).
    ///
    /// # Errors
    /// Out-of-range requests and device errors.
    ///
    /// # Panics
    /// If `verify` and `data` differ in length.
    pub async fn compare_and_write(
        &self,
        offset: u64,
        verify: &[u8],
        data: &[u8],
        fua: bool,
    ) -> Result<Option<usize>> {
        assert_eq!(verify.len(), data.len());
        let Some(_guard) = self.lock_span(offset, data.len() as u64).await? else {
            return Ok(None);
        };
        let current = self.read(offset, verify.len()).await?.to_vec();
        if let Some(i) = current.iter().zip(verify).position(|(a, b)| a != b) {
            return Ok(Some(i));
        }
        self.write_locked(offset, data, fua).await?;
        Ok(None)
    }

    /// ORs `data` into the bytes at `offset` (SBC-3 ORWRITE), atomically with respect to every
    /// other write through this volume.
    ///
    /// # Errors
    /// Out-of-range requests and device errors.
    pub async fn or_write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let Some(_guard) = self.lock_span(offset, data.len() as u64).await? else {
            return Ok(());
        };
        let mut merged = self.read(offset, data.len()).await?.to_vec();
        for (m, d) in merged.iter_mut().zip(data) {
            *m |= d;
        }
        self.write_locked(offset, &merged, fua).await
    }

    /// Whether [`Self::unmap`] frees space (otherwise it writes zeros).
    pub fn supports_unmap(&self) -> bool {
        self.dev.supports_discard()
    }

    /// Deallocates `[offset, offset + len)`: later reads return zeros. Whole pages are
    /// released to the device; partial pages at the edges are zeroed.
    ///
    /// # Errors
    /// Out-of-range requests and device errors.
    pub async fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        let Some(_guard) = self.lock_span(offset, len).await? else {
            return Ok(());
        };
        let align = IO_ALIGN_BYTES as u64;
        let end = offset + len;
        // Whole pages inside the range.
        let inner0 = offset.div_ceil(align) * align;
        let inner1 = end - end % align;
        if inner0 < inner1 && self.dev.supports_discard() {
            self.dev
                .discard(self.base + inner0, inner1 - inner0)
                .await?;
            if offset < inner0 {
                self.write_locked(offset, &vec![0; (inner0 - offset) as usize], false)
                    .await?;
            }
            if inner1 < end {
                self.write_locked(inner1, &vec![0; (end - inner1) as usize], false)
                    .await?;
            }
        } else {
            let mut pos = offset;
            while pos < end {
                let n = (end - pos).min(IO_SIZE_MAX_BYTES as u64);
                self.write_locked(pos, &vec![0; n as usize], false).await?;
                pos += n;
            }
        }
        Ok(())
    }

    /// Allocation runs of `[offset, offset + len)` as `(start, len, allocated)`, relative to
    /// the volume.
    ///
    /// # Errors
    /// Out-of-range requests and device errors.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        self.check(offset, len)?;
        Ok(self
            .dev
            .allocation(self.base + offset, len)?
            .into_iter()
            .map(|(s, l, a)| (s - self.base, l, a))
            .collect())
    }

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// Device errors.
    pub async fn flush(&self) -> Result<()> {
        Ok(self.dev.flush().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_io::DeviceConfig;
    use proptest::prelude::*;

    fn volume(dir: &tempfile::TempDir, size: u64) -> LocalVolume {
        let mut cfg = DeviceConfig::file(dir.path().join("v.img"), size + 8192);
        cfg.pool_bytes = 64 << 20;
        let dev = Arc::new(Device::open(&cfg).unwrap());
        LocalVolume::new(dev, 8192, size).unwrap()
    }

    #[tokio::test]
    async fn read_data_hands_out_the_bytes_across_its_buffers() {
        // A read longer than one device I/O spans two pooled buffers; every window, whether
        // copied into a slice or appended to a vector, must be the bytes written there.
        let dir = tempfile::tempdir().unwrap();
        let size = 40u64 << 20;
        let v = volume(&dir, size);
        let pattern: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
        v.write(0, &pattern, false).await.unwrap();
        let (off, len) = (1000usize, IO_SIZE_MAX_BYTES + 5000);
        let r = v.read(off as u64, len).await.unwrap();
        let want = &pattern[off..off + len];
        let edge = IO_SIZE_MAX_BYTES - off;
        for (at, n) in [
            (0, 10),
            (edge - 7, 20),
            (edge, 9),
            (len - 3, 3),
            (0, len),
            (5, 0),
        ] {
            let mut copied = vec![0xee; n];
            r.copy_to(at, &mut copied);
            assert_eq!(copied, want[at..at + n], "copy_to({at}, {n})");
            let mut appended = vec![1, 2, 3];
            r.extend_into(at, n, &mut appended);
            assert_eq!(appended[..3], [1, 2, 3]);
            assert_eq!(appended[3..], want[at..at + n], "extend_into({at}, {n})");
        }
    }

    #[test]
    fn read_data_hands_out_a_cluster_reads_pieces_in_order() {
        // A cluster read keeps the buffers its pieces came in (of any sizes, an empty one
        // included); every window must be the bytes of the pieces side by side.
        let sizes = [4096usize, 0, 65536, 1, 3000];
        let mut whole = Vec::new();
        let mut owned = Vec::new();
        for (i, n) in sizes.into_iter().enumerate() {
            let piece: Vec<u8> = (0..n).map(|b| (b * 7 + i * 31) as u8).collect();
            whole.extend_from_slice(&piece);
            owned.push(piece);
        }
        let r = ReadData {
            bufs: Vec::new(),
            owned,
            start: 0,
            len: whole.len(),
        };
        let len = whole.len();
        for (at, n) in [
            (0, len),
            (0, 4096),
            (4095, 2),
            (4096, 65536),
            (4096 + 65535, 2),
            (4096 + 65536, 1),
            (len - 3000, 3000),
            (len, 0),
            (100, len - 200),
        ] {
            let mut copied = vec![0xee; n];
            r.copy_to(at, &mut copied);
            assert_eq!(copied, whole[at..at + n], "copy_to({at}, {n})");
            let mut appended = vec![9];
            r.extend_into(at, n, &mut appended);
            assert_eq!(appended[1..], whole[at..at + n], "extend_into({at}, {n})");
        }
        assert_eq!(r.to_vec(), whole);
    }

    #[tokio::test]
    async fn compare_and_write_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(&dir, 1 << 20);
        v.write(512, &[1; 1024], false).await.unwrap();
        let mut verify = vec![1u8; 1024];
        verify[700] = 9;
        assert_eq!(
            v.compare_and_write(512, &verify, &[2; 1024], false)
                .await
                .unwrap(),
            Some(700)
        );
        assert!(v
            .read(512, 1024)
            .await
            .unwrap()
            .to_vec()
            .iter()
            .all(|&b| b == 1));
        assert_eq!(
            v.compare_and_write(512, &[1; 1024], &[2; 1024], false)
                .await
                .unwrap(),
            None
        );
        assert!(v
            .read(512, 1024)
            .await
            .unwrap()
            .to_vec()
            .iter()
            .all(|&b| b == 2));
    }

    #[tokio::test]
    async fn unmap_reads_zero_and_frees_whole_pages() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(&dir, 1 << 20);
        v.write(0, &[7; 65536], false).await.unwrap();
        v.unmap(1000, 20_000).await.unwrap();
        let got = v.read(0, 65536).await.unwrap().to_vec();
        assert!(got[..1000].iter().all(|&b| b == 7));
        assert!(got[1000..21_000].iter().all(|&b| b == 0));
        assert!(got[21_000..].iter().all(|&b| b == 7));
        let map = v.allocation(0, 65536).unwrap();
        assert!(map.contains(&(4096, 16384, false)), "{map:?}");
    }

    #[tokio::test]
    async fn out_of_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(&dir, 1 << 20);
        assert!(matches!(
            v.read((1 << 20) - 511, 512).await,
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            v.write(u64::MAX - 10, &[0; 512], false).await,
            Err(Error::OutOfRange { .. })
        ));
    }

    #[tokio::test]
    async fn concurrent_partial_writes_to_one_page_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let v = volume(&dir, 1 << 20);
        let futs = (0..8u64).map(|i| {
            let v = &v;
            async move { v.write(i * 512, &[i as u8 + 1; 512], false).await.unwrap() }
        });
        futures::future::join_all(futs).await;
        let got = v.read(0, 4096).await.unwrap().to_vec();
        for i in 0..8 {
            assert!(
                got[i * 512..(i + 1) * 512]
                    .iter()
                    .all(|&b| b == i as u8 + 1),
                "sector {i}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// The volume behaves like a byte array for any sequence of writes and reads.
        #[test]
        fn behaves_like_a_byte_array(ops in proptest::collection::vec((0u64..60_000, 1usize..20_000, any::<u8>()), 1..12)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let size = 80_000u64 - 80_000 % 4096;
                let v = volume(&dir, size);
                let mut model = vec![0u8; size as usize];
                for (off, len, val) in ops {
                    let len = len.min((size - off) as usize);
                    let data: Vec<u8> = (0..len).map(|i| val.wrapping_add(i as u8)).collect();
                    v.write(off, &data, false).await.unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    let got = v.read(off.saturating_sub(100), len + 100).await.unwrap().to_vec();
                    let from = off.saturating_sub(100) as usize;
                    prop_assert_eq!(&got[..], &model[from..from + len + 100]);
                }
                let all = v.read(0, size as usize).await.unwrap().to_vec();
                prop_assert_eq!(all, model);
                Ok(())
            })?;
        }
    }
}

/// A volume as the device server sees it: stored on this controller, or erasure-coded across
/// the cluster through an [`engine::Engine`].
#[derive(Debug)]
pub enum Volume {
    /// One local device (a single controller).
    Local(LocalVolume),
    /// Spread over the cluster.
    Cluster(ClusterVolume),
}

/// A cluster volume as seen from one controller.
///
/// Read-modify-write commands (COMPARE AND WRITE, ORWRITE) are atomic against other commands
/// through this controller only; across controllers they are not yet (docs/architecture.md).
#[derive(Debug)]
pub struct ClusterVolume {
    engine: Arc<engine::Engine>,
    id: shard::VolumeId,
    size_bytes: u64,
    locks: RangeLock,
}

impl ClusterVolume {
    /// Volume `id` of `engine`, `size_bytes` long.
    pub fn new(engine: Arc<engine::Engine>, id: shard::VolumeId, size_bytes: u64) -> Self {
        Self {
            engine,
            id,
            size_bytes,
            locks: RangeLock::default(),
        }
    }
}

impl Volume {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        match self {
            Self::Local(v) => v.size_bytes(),
            Self::Cluster(c) => c.size_bytes,
        }
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// # Errors
    /// Out-of-range requests, device and cluster errors.
    pub async fn read(&self, offset: u64, len: usize) -> Result<ReadData> {
        match self {
            Self::Local(v) => v.read(offset, len).await,
            Self::Cluster(c) => {
                let pieces = c.engine.read_segments(c.id, offset, len as u64).await?;
                Ok(ReadData {
                    bufs: Vec::new(),
                    len: pieces.iter().map(Vec::len).sum(),
                    owned: pieces,
                    start: 0,
                })
            }
        }
    }

    /// Writes `data` at `offset`; with `fua` it is on stable storage on return (cluster
    /// writes always are: holders acknowledge only durable chunks).
    ///
    /// # Errors
    /// Out-of-range requests, device and cluster errors.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        match self {
            Self::Local(v) => v.write(offset, data, fua).await,
            Self::Cluster(c) => {
                let _g = c.lock(offset, data.len() as u64).await;
                Ok(c.engine.write(c.id, offset, data).await?)
            }
        }
    }

    /// See [`LocalVolume::compare_and_write`].
    ///
    /// # Errors
    /// Out-of-range requests, device and cluster errors.
    ///
    /// # Panics
    /// If `verify` and `data` differ in length.
    pub async fn compare_and_write(
        &self,
        offset: u64,
        verify: &[u8],
        data: &[u8],
        fua: bool,
    ) -> Result<Option<usize>> {
        match self {
            Self::Local(v) => v.compare_and_write(offset, verify, data, fua).await,
            Self::Cluster(c) => {
                assert_eq!(verify.len(), data.len());
                let _g = c.lock(offset, data.len() as u64).await;
                let current = c.engine.read(c.id, offset, verify.len() as u64).await?;
                if let Some(i) = current.iter().zip(verify).position(|(a, b)| a != b) {
                    return Ok(Some(i));
                }
                c.engine.write(c.id, offset, data).await?;
                Ok(None)
            }
        }
    }

    /// See [`LocalVolume::or_write`].
    ///
    /// # Errors
    /// Out-of-range requests, device and cluster errors.
    pub async fn or_write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        match self {
            Self::Local(v) => v.or_write(offset, data, fua).await,
            Self::Cluster(c) => {
                let _g = c.lock(offset, data.len() as u64).await;
                let mut merged = c.engine.read(c.id, offset, data.len() as u64).await?;
                for (m, d) in merged.iter_mut().zip(data) {
                    *m |= d;
                }
                Ok(c.engine.write(c.id, offset, &merged).await?)
            }
        }
    }

    /// Whether [`Self::unmap`] frees space (otherwise it writes zeros).
    pub fn supports_unmap(&self) -> bool {
        match self {
            Self::Local(v) => v.supports_unmap(),
            Self::Cluster(_) => false,
        }
    }

    /// Deallocates `[offset, offset + len)`: later reads return zeros.
    ///
    /// # Errors
    /// Out-of-range requests, device and cluster errors.
    pub async fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Self::Local(v) => v.unmap(offset, len).await,
            Self::Cluster(c) => {
                let _g = c.lock(offset, len).await;
                let mut pos = offset;
                while pos < offset + len {
                    let n = (offset + len - pos).min(1 << 20);
                    c.engine.write(c.id, pos, &vec![0; n as usize]).await?;
                    pos += n;
                }
                Ok(())
            }
        }
    }

    /// Allocation runs of `[offset, offset + len)` as `(start, len, allocated)`.
    ///
    /// # Errors
    /// Out-of-range requests and device errors.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        match self {
            Self::Local(v) => v.allocation(offset, len),
            Self::Cluster(c) => {
                check_range(offset, len, c.size_bytes)?;
                Ok(vec![(offset, len, true)])
            }
        }
    }

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// Device errors.
    pub async fn flush(&self) -> Result<()> {
        match self {
            Self::Local(v) => v.flush().await,
            // Holders acknowledge chunk writes only once they are durable.
            Self::Cluster(_) => Ok(()),
        }
    }
}

impl ClusterVolume {
    /// Serialises this controller's writes to overlapping ranges (whole 4 KiB pages).
    async fn lock(&self, offset: u64, len: u64) -> Option<RangeGuard<'_>> {
        if len == 0 {
            return None;
        }
        let (a0, a1) = LocalVolume::aligned_span(offset, len);
        Some(self.locks.lock(a0, a1).await)
    }
}

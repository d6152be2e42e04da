//! A backing device (file or block device) and the engine that performs its I/O.
//!
//! [`Device::open`] picks io_uring when the kernel offers it and otherwise a thread pool with
//! `pread`/`pwrite`, logging the likely cause of the fallback. Callers are async and engine
//! agnostic: requests go through a bounded channel and answers come back on a oneshot.
//!
//! A file on a memory file system (tmpfs, ramfs) is read and written inline, in the calling
//! task, for requests up to [`INLINE_MAX_BYTES`]: such I/O is a memory copy that never waits
//! for a device, and tmpfs cannot do non-blocking I/O, so io_uring would hand every request to
//! an io-wq kernel thread and back (two thread switches per I/O, the largest cost of a QD1
//! read in the profile; docs/benchmarks.md). A reserved file ([`DeviceConfig::reserve`]: no
//! holes) is mapped for that ([`crate::mapped`]): an inline request is one copy, without a
//! system call or page-cache lookups (`pread` and `pwrite` for other files, and if the mapping
//! fails). Memory is the only storage such a file has, so a FUA write
//! there needs no sync. Larger requests still go to the engine, so a 1 MiB copy runs beside
//! the network work instead of in its task.
//!
//! Invariants:
//! - Every request is aligned to [`IO_ALIGN_BYTES`] in offset and length and lies inside the
//!   device; this is checked here, before the kernel sees it.
//! - A write with `fua` is on stable storage when its future resolves (`RWF_DSYNC` on io_uring,
//!   `fdatasync` on the fallback); [`Device::flush`] makes every completed write stable.
//! - A buffer handed to an engine is owned by it until the kernel has finished with it, even if
//!   the caller's future is dropped.

use crate::buf::{AlignedBuf, BufferPool, PooledBuf};
use crate::constants::{FALLBACK_THREADS, IO_ALIGN_BYTES, IO_SIZE_MAX_BYTES, QUEUE_DEPTH_DEFAULT};
use crate::error::{IoError, Result};
use crate::{threads, uring};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Which engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring when available, else the fallback.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// The portable thread-pool engine.
    Threads,
}

/// The engine a device ended up with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring.
    Uring,
    /// Thread pool with pread/pwrite.
    Threads,
}

/// How to open a backing device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// File or block device path.
    pub path: PathBuf,
    /// For files: create or grow the file to this size. Ignored for block devices.
    pub size_bytes: Option<u64>,
    /// Open with `O_DIRECT` (falls back to buffered I/O with a warning where unsupported).
    pub direct: bool,
    /// Engine selection.
    pub engine: EngineChoice,
    /// io_uring queue depth.
    pub queue_depth: u32,
    /// Bytes of aligned buffers this device's pool may hand out at once.
    pub pool_bytes: usize,
    /// For files: reserve the whole size on the file system when opening (`fallocate`), so a
    /// full file system refuses the device now rather than failing writes later, and no
    /// write pays for allocating its blocks. File systems that cannot reserve space leave
    /// the file sparse, with a warning.
    pub reserve: bool,
}

impl DeviceConfig {
    /// Defaults for a file at `path` of `size_bytes`.
    pub fn file(path: impl Into<PathBuf>, size_bytes: u64) -> Self {
        Self {
            path: path.into(),
            size_bytes: Some(size_bytes),
            direct: true,
            engine: EngineChoice::Auto,
            queue_depth: QUEUE_DEPTH_DEFAULT,
            pool_bytes: 256 * 1024 * 1024,
            reserve: false,
        }
    }
}

pub(crate) enum Op {
    Read {
        buf: AlignedBuf,
        offset: u64,
    },
    Write {
        buf: AlignedBuf,
        offset: u64,
        fua: bool,
    },
    Flush,
    /// Deallocate (punch a hole); reads of the range return zeros afterwards.
    Discard {
        offset: u64,
        len: u64,
    },
}

/// `fallocate` mode that deallocates a range and keeps the file size.
pub(crate) const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

pub(crate) struct Request {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Completion>,
}

pub(crate) struct Completion {
    pub(crate) result: std::io::Result<()>,
    pub(crate) buf: Option<AlignedBuf>,
}

enum Engine {
    Uring(uring::UringEngine),
    Threads(threads::ThreadEngine),
}

/// An open backing device.
pub struct Device {
    engine: Engine,
    file: Arc<File>,
    regular_file: bool,
    size_bytes: u64,
    path: PathBuf,
    direct: bool,
    pool: BufferPool,
    health: crate::health::DeviceHealth,
    /// On a memory file system and opened with [`EngineChoice::Auto`]: small requests inline.
    inline: bool,
    /// The file mapped, for inline requests (`None`: they use `pread`/`pwrite`).
    map: Option<crate::mapped::Mapping>,
}

/// Largest request done inline on a memory-backed file (see the module doc): a shard store
/// reads two 68 KiB slots at once, so 256 KiB keeps the cluster's chunk I/O inline.
pub const INLINE_MAX_BYTES: usize = 256 * 1024;

/// Whether `file` lives on a memory file system (tmpfs or ramfs).
fn memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes one `statfs` into the pointer we pass, which points at memory of
    // that type we own; the descriptor stays open for the call (borrowed from `file`).
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return false;
    }
    // SAFETY: fstatfs returned 0, so it initialized the struct (zeroed before, in any case).
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's integer type differs between targets
    let kind = st.f_type as i64;
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("path", &self.path)
            .field("size_bytes", &self.size_bytes)
            .field("engine", &self.engine_kind())
            .field("direct", &self.direct)
            .field("inline", &self.inline)
            .field("mapped", &self.map.is_some())
            .finish()
    }
}

impl Device {
    /// Opens (creating a file if needed) and starts the engine.
    ///
    /// Called inside a tokio runtime, the io_uring engine reaps asynchronous completions in a
    /// task on that runtime (which must have I/O enabled and outlive the device's use);
    /// outside one, in a thread of its own.
    ///
    /// # Errors
    /// [`IoError::Open`] when the path cannot be opened, sized, or io_uring was required but
    /// is unavailable.
    pub fn open(cfg: &DeviceConfig) -> Result<Self> {
        let open_err = |source| IoError::Open {
            path: cfg.path.clone(),
            source,
        };
        if let Some(parent) = cfg.path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(open_err)?;
            }
        }
        let (mut file, direct) = open_file(&cfg.path, cfg.direct).map_err(open_err)?;
        // Whether the whole file is allocated (no holes), as `reserve` made it.
        let mut reserved = false;
        let meta = file.metadata().map_err(open_err)?;
        if meta.is_file() {
            if let Some(want) = cfg.size_bytes {
                if meta.len() < want {
                    file.set_len(want).map_err(open_err)?;
                }
                reserved = cfg.reserve && reserve(&file, &cfg.path, want)?;
            }
        }
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        let size_bytes = size - size % IO_ALIGN_BYTES as u64;
        let regular_file = meta.is_file();
        let inline = cfg.engine == EngineChoice::Auto && regular_file && memory_backed(&file);
        // Only a file reserved whole is mapped: it has no holes, and a read through a shared
        // mapping of a hole would allocate the page (a `pread` of it does not), undoing thin
        // provisioning and growing memory on reads (ramfs, which cannot reserve, stays unmapped).
        let map = if inline && reserved {
            match usize::try_from(size).map(|n| crate::mapped::Mapping::new(&file, n)) {
                Ok(Ok(m)) => Some(m),
                Ok(Err(e)) => {
                    tracing::warn!(path = %cfg.path.display(), error = %e, "cannot map the memory-backed file; its small requests use pread/pwrite");
                    None
                }
                Err(_) => None,
            }
        } else {
            None
        };
        let file = Arc::new(file);
        let engine = match cfg.engine {
            EngineChoice::Threads => Engine::Threads(threads::ThreadEngine::start(
                Arc::clone(&file),
                FALLBACK_THREADS,
            )),
            EngineChoice::Uring => Engine::Uring(
                uring::UringEngine::start(Arc::clone(&file), cfg.queue_depth).map_err(open_err)?,
            ),
            EngineChoice::Auto => {
                match uring::UringEngine::start(Arc::clone(&file), cfg.queue_depth) {
                    Ok(e) => Engine::Uring(e),
                    Err(e) => {
                        tracing::warn!(
                            path = %cfg.path.display(),
                            cause = %e,
                            "io_uring is unavailable; using the thread-pool fallback. Likely cause: a kernel older than 5.6, \
                             io_uring disabled (sysctl kernel.io_uring_disabled), or a container seccomp profile that blocks it"
                        );
                        Engine::Threads(threads::ThreadEngine::start(
                            Arc::clone(&file),
                            FALLBACK_THREADS,
                        ))
                    }
                }
            }
        };
        let dev = Self {
            engine,
            file,
            regular_file,
            size_bytes,
            path: cfg.path.clone(),
            direct,
            pool: BufferPool::new(cfg.pool_bytes.max(IO_SIZE_MAX_BYTES)),
            health: crate::health::DeviceHealth::default(),
            inline,
            map,
        };
        tracing::info!(path = %dev.path.display(), size_bytes, engine = ?dev.engine_kind(), direct, memory_inline = inline, "backing device open");
        Ok(dev)
    }

    /// Error and latency counters.
    pub fn health(&self) -> crate::health::HealthSnapshot {
        self.health.snapshot()
    }

    /// The file or block device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The engine in use.
    pub fn engine_kind(&self) -> EngineKind {
        match self.engine {
            Engine::Uring(_) => EngineKind::Uring,
            Engine::Threads(_) => EngineKind::Threads,
        }
    }

    /// Whether small requests are done inline (a memory-backed file; see the module doc).
    pub fn is_inline(&self) -> bool {
        self.inline
    }

    /// Whether `O_DIRECT` is in effect.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Usable size in bytes (a multiple of the alignment).
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The pool that buffers for this device should come from.
    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        if !offset.is_multiple_of(IO_ALIGN_BYTES as u64)
            || !len.is_multiple_of(IO_ALIGN_BYTES)
            || len > IO_SIZE_MAX_BYTES
        {
            return Err(IoError::Misaligned {
                offset,
                len,
                align: IO_ALIGN_BYTES,
            });
        }
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(IoError::OutOfRange {
                offset,
                len,
                size: self.size_bytes,
            });
        }
        Ok(())
    }

    async fn submit(&self, op: Op) -> Result<Completion> {
        let (tx, rx) = oneshot::channel();
        let req = Request { op, reply: tx };
        match &self.engine {
            Engine::Uring(e) => e.send(req)?,
            Engine::Threads(e) => e.send(req)?,
        }
        rx.await.map_err(|_| IoError::EngineStopped)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    ///
    /// # Errors
    /// Misaligned or out-of-range requests, and kernel errors.
    pub async fn read_into(&self, offset: u64, mut buf: PooledBuf) -> Result<PooledBuf> {
        self.check(offset, buf.len())?;
        let t0 = std::time::Instant::now();
        let result = if self.inline_fits(buf.len()) {
            match &self.map {
                Some(m) => m.read(offset, buf.as_mut_slice()),
                None => std::os::unix::fs::FileExt::read_exact_at(
                    &*self.file,
                    buf.as_mut_slice(),
                    offset,
                ),
            }
        } else {
            let c = self
                .submit(Op::Read {
                    buf: buf.take_buf(),
                    offset,
                })
                .await?;
            buf.put_buf(c.buf.expect("engine returns the buffer"));
            c.result
        };
        self.finish(crate::health::IoOp::Read, offset, t0, result)?;
        Ok(buf)
    }

    /// Reads `len` bytes at `offset` into a new vector, for callers that hand the bytes on
    /// (a shard sent to a peer): a mapped file copies once, straight into the vector; any
    /// other goes through a pooled buffer, as [`Self::read_into`] does, and copies out of it.
    ///
    /// # Errors
    /// As [`Self::read_into`].
    pub async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        match &self.map {
            Some(m) if self.inline_fits(len) => {
                self.check(offset, len)?;
                let t0 = std::time::Instant::now();
                let mut out = Vec::new();
                let result = m.read_vec(offset, len).map(|v| out = v);
                self.finish(crate::health::IoOp::Read, offset, t0, result)?;
                Ok(out)
            }
            _ => {
                let buf = self.read_into(offset, self.pool.take(len).await).await?;
                Ok(buf.as_slice().to_vec())
            }
        }
    }

    /// Writes `buf` at `offset`; with `fua` the data is on stable storage on return.
    ///
    /// # Errors
    /// Misaligned or out-of-range requests, and kernel errors.
    pub async fn write_from(
        &self,
        offset: u64,
        mut buf: PooledBuf,
        fua: bool,
    ) -> Result<PooledBuf> {
        self.check(offset, buf.len())?;
        let t0 = std::time::Instant::now();
        let result = if self.inline_fits(buf.len()) {
            match &self.map {
                // Memory is this file's only storage: the copy is the write, FUA or not.
                Some(m) => m.write(offset, buf.as_slice()),
                None => {
                    std::os::unix::fs::FileExt::write_all_at(&*self.file, buf.as_slice(), offset)
                        .and_then(|()| if fua { self.file.sync_data() } else { Ok(()) })
                }
            }
        } else {
            let c = self
                .submit(Op::Write {
                    buf: buf.take_buf(),
                    offset,
                    fua,
                })
                .await?;
            buf.put_buf(c.buf.expect("engine returns the buffer"));
            c.result
        };
        self.finish(crate::health::IoOp::Write, offset, t0, result)?;
        Ok(buf)
    }

    /// Whether a request of `len` bytes is done inline (see the module doc).
    fn inline_fits(&self, len: usize) -> bool {
        self.inline && len <= INLINE_MAX_BYTES
    }

    /// Counts a finished request in the device's health and names a kernel error.
    fn finish(
        &self,
        op: crate::health::IoOp,
        offset: u64,
        t0: std::time::Instant,
        result: std::io::Result<()>,
    ) -> Result<()> {
        self.health.record(op, t0.elapsed(), result.is_ok());
        let name = match op {
            crate::health::IoOp::Read => "read",
            crate::health::IoOp::Write => "write",
            crate::health::IoOp::Flush => "flush",
            crate::health::IoOp::Other => "discard",
        };
        result.map_err(|source| IoError::Os {
            op: name,
            offset,
            source,
        })
    }

    /// Whether [`Self::discard`] deallocates space (regular files: punch hole). Block devices
    /// report false until discard is wired to `BLKDISCARD`.
    pub fn supports_discard(&self) -> bool {
        self.regular_file
    }

    /// Deallocates `[offset, offset + len)`: later reads return zeros.
    ///
    /// # Errors
    /// Misaligned or out-of-range requests, and kernel errors (e.g. a file system without
    /// hole punching).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(IO_ALIGN_BYTES as u64)
            || !len.is_multiple_of(IO_ALIGN_BYTES as u64)
        {
            return Err(IoError::Misaligned {
                offset,
                len: len as usize,
                align: IO_ALIGN_BYTES,
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.size_bytes)
        {
            return Err(IoError::OutOfRange {
                offset,
                len: len as usize,
                size: self.size_bytes,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let c = self.submit(Op::Discard { offset, len }).await?;
        c.result.map_err(|source| IoError::Os {
            op: "discard",
            offset,
            source,
        })
    }

    /// Allocation map of `[offset, offset + len)`: runs of `(start, len, allocated)` from
    /// `SEEK_DATA`/`SEEK_HOLE`, in order, covering the range. Devices without holes report
    /// one allocated run.
    ///
    /// # Errors
    /// Kernel errors.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let end = offset.saturating_add(len).min(self.size_bytes);
        if !self.regular_file || offset >= end {
            return Ok(vec![(offset, end.saturating_sub(offset), true)]);
        }
        let fd = self.file.as_raw_fd();
        let seek = |pos: u64, whence: i32| -> Result<Option<u64>> {
            // SAFETY: lseek on a file descriptor we own (kept alive by self.file); it reads no
            // memory of ours.
            let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    return Ok(None); // no more data (or hole) after pos
                }
                return Err(IoError::Os {
                    op: "lseek",
                    offset: pos,
                    source: e,
                });
            }
            Ok(Some(r as u64))
        };
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = seek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                runs.push((pos, data - pos, false));
                pos = data;
                continue;
            }
            let hole = seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            runs.push((pos, hole - pos, true));
            pos = hole;
        }
        Ok(runs)
    }

    /// Makes every completed write durable (`fdatasync`).
    ///
    /// # Errors
    /// Kernel errors.
    pub async fn flush(&self) -> Result<()> {
        let t0 = std::time::Instant::now();
        let c = self.submit(Op::Flush).await?;
        self.finish(crate::health::IoOp::Flush, 0, t0, c.result)
    }
}

/// Allocates `[0, len)` of `file` on its file system (blocks already allocated, and their
/// data, are left as they are); `false` when the file system cannot reserve space.
fn reserve(file: &File, path: &Path, len: u64) -> Result<bool> {
    let Ok(n) = libc::off_t::try_from(len) else {
        return Err(IoError::NoSpace {
            path: path.to_owned(),
            need: len,
        });
    };
    // SAFETY: fallocate on a descriptor this function borrows for the call; it reads and
    // writes no memory of ours.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, n) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EFBIG) => Err(IoError::NoSpace {
            path: path.to_owned(),
            need: len,
        }),
        Some(libc::EOPNOTSUPP) => {
            tracing::warn!(path = %path.display(), "the file system cannot reserve space (no fallocate): the file stays sparse, so writes may fail later if it fills up");
            Ok(false)
        }
        _ => Err(IoError::Open {
            path: path.to_owned(),
            source: e,
        }),
    }
}

fn open_file(path: &Path, direct: bool) -> std::io::Result<(File, bool)> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    if direct {
        let mut d = opts.clone();
        d.custom_flags(libc::O_DIRECT);
        match d.open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "O_DIRECT is not supported by this file system (tmpfs or overlayfs?); using buffered I/O, \
                     durability then relies on fdatasync. Put the backing file on ext4/xfs or a block device for direct I/O"
                );
            }
            Err(e) => return Err(e),
        }
    }
    opts.open(path).map(|f| (f, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes the file system has allocated to `path`.
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[tokio::test]
    async fn reserve_allocates_the_whole_file_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.img");
        let mut cfg = DeviceConfig::file(&path, 8 << 20);
        cfg.pool_bytes = 1 << 20;
        {
            let dev = Device::open(&cfg).unwrap();
            let mut w = dev.pool().take(4096).await;
            w.as_mut_slice().fill(0x5a);
            dev.write_from(4096, w, true).await.unwrap();
        }
        // Sparse without reserving: only what was written is allocated.
        assert!(allocated(&path) < 1 << 20, "{} bytes", allocated(&path));
        cfg.reserve = true;
        let dev = Device::open(&cfg).unwrap();
        assert!(allocated(&path) >= 8 << 20, "{} bytes", allocated(&path));
        let r = dev.read_into(0, dev.pool().take(8192).await).await.unwrap();
        assert!(r.as_slice()[..4096].iter().all(|&b| b == 0));
        assert!(r.as_slice()[4096..].iter().all(|&b| b == 0x5a));
        assert_eq!(dev.read_vec(0, 8192).await.unwrap(), r.as_slice());
    }

    #[test]
    fn reserving_more_than_the_file_system_holds_names_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.img");
        let f = File::create(&path).unwrap();
        // Far beyond any test machine's disk (and over what off_t holds).
        for len in [1u64 << 60, u64::MAX] {
            let e = reserve(&f, &path, len).unwrap_err();
            assert!(
                matches!(e, IoError::NoSpace { need, .. } if need == len),
                "{e}"
            );
            assert!(e.to_string().contains("file system is full"), "{e}");
        }
    }

    async fn roundtrip(engine: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = DeviceConfig::file(dir.path().join("dev.img"), 1 << 20);
        cfg.engine = engine;
        cfg.pool_bytes = 1 << 20;
        let dev = Device::open(&cfg).unwrap();
        exercise(&dev).await;
    }

    async fn exercise(dev: &Device) {
        assert_eq!(dev.size_bytes(), 1 << 20);
        let mut w = dev.pool().take(8192).await;
        for (i, b) in w.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let expect = w.as_slice().to_vec();
        dev.write_from(4096, w, true).await.unwrap();
        dev.flush().await.unwrap();
        let r = dev
            .read_into(4096, dev.pool().take(8192).await)
            .await
            .unwrap();
        assert_eq!(r.as_slice(), &expect[..]);
        assert_eq!(dev.read_vec(4096, 8192).await.unwrap(), expect);
        // Misaligned and out-of-range requests never reach the kernel.
        assert!(matches!(
            dev.read_vec(4096, 100).await,
            Err(IoError::Misaligned { .. })
        ));
        assert!(matches!(
            dev.read_vec(1 << 20, 4096).await,
            Err(IoError::OutOfRange { .. })
        ));
        assert!(matches!(
            dev.read_into(100, dev.pool().take(4096).await).await,
            Err(IoError::Misaligned { .. })
        ));
        assert!(matches!(
            dev.read_into(1 << 20, dev.pool().take(4096).await).await,
            Err(IoError::OutOfRange { .. })
        ));
        // Many concurrent requests complete.
        let futs: Vec<_> = (0..64u64)
            .map(|i| {
                let dev = &dev;
                async move {
                    let mut b = dev.pool().take(4096).await;
                    b.as_mut_slice().fill(i as u8);
                    dev.write_from(i * 4096, b, false).await.unwrap();
                }
            })
            .collect();
        futures::future::join_all(futs).await;
        for i in 0..64u64 {
            let r = dev
                .read_into(i * 4096, dev.pool().take(4096).await)
                .await
                .unwrap();
            assert!(r.as_slice().iter().all(|&b| b == i as u8));
        }
    }

    /// A file in /dev/shm (tmpfs) opened with `Auto` is inline for small requests and still
    /// uses the engine for large ones; both see each other's data.
    #[tokio::test]
    async fn memory_backed_file_is_inline_and_agrees_with_the_engine() {
        let shm = Path::new("/dev/shm");
        assert!(
            shm.is_dir(),
            "this test needs /dev/shm (tmpfs), which Linux hosts mount"
        );
        let dir = tempfile::tempdir_in(shm).unwrap();
        let mut cfg = DeviceConfig::file(dir.path().join("m.img"), 4 << 20);
        cfg.pool_bytes = 4 << 20;
        let sparse = Device::open(&cfg).unwrap();
        assert!(
            sparse.is_inline() && sparse.map.is_none(),
            "a sparse file is not mapped"
        );
        drop(sparse);
        cfg.reserve = true;
        let dev = Device::open(&cfg).unwrap();
        assert!(dev.is_inline(), "tmpfs is recognised as memory-backed");
        assert!(
            dev.map.is_some(),
            "a reserved one is mapped for its inline requests"
        );
        // A large write goes through the engine; small reads of it are inline.
        let mut big = dev.pool().take(1 << 20).await;
        for (i, b) in big.as_mut_slice().iter_mut().enumerate() {
            *b = (i / 4096) as u8 ^ 0x5a;
        }
        let expect = big.as_slice().to_vec();
        dev.write_from(1 << 20, big, true).await.unwrap();
        for blk in [0usize, 7, 255] {
            let r = dev
                .read_into(((1 << 20) + blk * 4096) as u64, dev.pool().take(4096).await)
                .await
                .unwrap();
            assert_eq!(r.as_slice(), &expect[blk * 4096..(blk + 1) * 4096]);
        }
        // Small inline writes are seen by a large read through the engine.
        let mut w = dev.pool().take(INLINE_MAX_BYTES).await;
        w.as_mut_slice().fill(0xc3);
        dev.write_from((1 << 20) + 4096, w, false).await.unwrap();
        let r = dev
            .read_into(1 << 20, dev.pool().take(1 << 20).await)
            .await
            .unwrap();
        assert_eq!(&r.as_slice()[..4096], &expect[..4096]);
        assert!(r.as_slice()[4096..4096 + INLINE_MAX_BYTES]
            .iter()
            .all(|&b| b == 0xc3));
        assert_eq!(
            &r.as_slice()[4096 + INLINE_MAX_BYTES..],
            &expect[4096 + INLINE_MAX_BYTES..]
        );
        assert_eq!(
            dev.health().ios,
            6,
            "inline I/O is counted like the engine's"
        );
        // The shared checks still apply inline.
        assert!(matches!(
            dev.read_into(100, dev.pool().take(4096).await).await,
            Err(IoError::Misaligned { .. })
        ));
        // An explicit engine choice keeps every request on that engine.
        cfg.engine = EngineChoice::Uring;
        cfg.path = dir.path().join("u.img");
        assert!(!Device::open(&cfg).unwrap().is_inline());
    }

    async fn discard_reads_zero(engine: EngineChoice) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = DeviceConfig::file(dir.path().join("d.img"), 1 << 20);
        cfg.engine = engine;
        cfg.pool_bytes = 1 << 20;
        let dev = Device::open(&cfg).unwrap();
        assert!(dev.supports_discard());
        let mut w = dev.pool().take(64 << 10).await;
        w.as_mut_slice().fill(0xee);
        dev.write_from(0, w, true).await.unwrap();
        assert_eq!(
            dev.allocation(0, 64 << 10).unwrap(),
            vec![(0, 64 << 10, true)]
        );
        dev.discard(16 << 10, 32 << 10).await.unwrap();
        let r = dev
            .read_into(0, dev.pool().take(64 << 10).await)
            .await
            .unwrap();
        assert!(r.as_slice()[..16 << 10].iter().all(|&b| b == 0xee));
        assert!(r.as_slice()[16 << 10..48 << 10].iter().all(|&b| b == 0));
        assert!(r.as_slice()[48 << 10..].iter().all(|&b| b == 0xee));
        let map = dev.allocation(0, 64 << 10).unwrap();
        assert_eq!(
            map,
            vec![
                (0, 16 << 10, true),
                (16 << 10, 32 << 10, false),
                (48 << 10, 16 << 10, true)
            ]
        );
        assert!(matches!(
            dev.discard(100, 4096).await,
            Err(IoError::Misaligned { .. })
        ));
    }

    #[tokio::test]
    async fn discard_threads() {
        discard_reads_zero(EngineChoice::Threads).await;
    }

    #[tokio::test]
    async fn discard_uring() {
        discard_reads_zero(EngineChoice::Uring).await;
    }

    #[tokio::test]
    async fn threads_roundtrip() {
        roundtrip(EngineChoice::Threads).await;
    }

    /// io_uring is part of the product on these machines: fail loudly if it is missing.
    #[tokio::test]
    async fn uring_roundtrip() {
        roundtrip(EngineChoice::Uring).await;
    }

    /// A queue depth of 2 with 64 requests at once: most wait for a slot and are pushed as
    /// completions free them, from several worker threads at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_queues_requests_beyond_its_depth() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = DeviceConfig::file(dir.path().join("q.img"), 1 << 20);
        cfg.engine = EngineChoice::Uring;
        cfg.queue_depth = 2;
        cfg.pool_bytes = 1 << 20;
        let dev = Arc::new(Device::open(&cfg).unwrap());
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let dev = Arc::clone(&dev);
                tokio::spawn(async move {
                    let mut b = dev.pool().take(8192).await;
                    b.as_mut_slice().fill(i as u8 ^ 0x5a);
                    dev.write_from(i * 8192, b, i % 7 == 0).await.unwrap();
                    let r = dev
                        .read_into(i * 8192, dev.pool().take(8192).await)
                        .await
                        .unwrap();
                    assert!(r.as_slice().iter().all(|&b| b == i as u8 ^ 0x5a));
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        exercise(&dev).await;
    }

    /// Opened outside any runtime, the engine reaps in a thread of its own, and serves
    /// callers on a runtime created later.
    #[test]
    fn uring_opened_outside_a_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = DeviceConfig::file(dir.path().join("o.img"), 1 << 20);
        cfg.engine = EngineChoice::Uring;
        cfg.pool_bytes = 1 << 20;
        let dev = Device::open(&cfg).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(exercise(&dev));
    }

    #[tokio::test]
    async fn auto_roundtrip() {
        roundtrip(EngineChoice::Auto).await;
    }
}

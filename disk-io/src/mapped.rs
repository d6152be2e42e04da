//! A memory-backed file (tmpfs, ramfs) mapped into the process, for the device's inline I/O.
//!
//! On such a file every `pread`/`pwrite` is a system call, a page-cache lookup per page and a
//! copy; the call and the lookups cost more than the copy of a 4 KiB block (in the cluster's
//! 4K write profile the shard store's file calls were 15% of the samples, the page-cache
//! lookups alone 5%). Mapped, an inline read or write is one copy.
//!
//! Invariants:
//! - The mapping covers the file's size when mapped; every copy is bounds-checked against it
//!   before any byte moves. The device never shrinks the file, and the data dir's lock keeps
//!   other appliance processes from opening it, so the mapped pages stay backed (a file
//!   truncated by someone else would fault the process, as it would any program mapping it).
//! - The mapped bytes are only ever touched through raw-pointer copies, never as Rust
//!   references, and copies that overlap the same stripe (64 KiB, hashed onto a fixed set of
//!   locks) exclude each other: readers share a stripe, a writer holds it alone. So two
//!   threads of this process never access the same mapped byte with one of them writing.
//!   (Kernel-side writers, the engine's large requests and hole punches, interleave with
//!   copies as concurrent `pread`/`pwrite` calls on the same range already did.)

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::{PoisonError, RwLock};

/// Bytes per stripe of the lock table.
const STRIPE_SHIFT: u32 = 16;
/// Locks in the table (stripes are hashed onto them).
const LOCKS: usize = 256;

/// A shared, read-write mapping of a whole file.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    locks: Box<[RwLock<()>]>,
}

// SAFETY: the mapping is plain memory owned by this value until drop; every access goes
// through `read`/`write`, which exclude concurrent writers of the same bytes (module doc).
unsafe impl Send for Mapping {}
// SAFETY: as above: shared access is coordinated by the stripe locks.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file` (which must be at least that long), shared, with
    /// its page tables filled.
    pub(crate) fn new(file: &File, len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "empty file",
            ));
        }
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address), of a descriptor
        // borrowed for the call; the kernel keeps its own reference to the file, and the
        // result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                // Page tables filled now, not by a fault on each page's first copy (5% of a
                // cluster 4K write profile before).
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self {
            ptr,
            len,
            locks: (0..LOCKS).map(|_| RwLock::new(())).collect(),
        })
    }

    /// The lock indexes of the stripes `[offset, offset + len)` touches, ascending and
    /// distinct (the order every copy takes them in, so no two copies deadlock), without
    /// allocating: the stripes are consecutive, so their locks are one range of the table or,
    /// where they wrap around its end, two.
    fn stripes(offset: usize, len: usize) -> impl Iterator<Item = usize> {
        let first = offset >> STRIPE_SHIFT;
        let last = (offset + len.max(1) - 1) >> STRIPE_SHIFT;
        let (a, b) = (first % LOCKS, last % LOCKS);
        let (low, high) = if last - first + 1 >= LOCKS {
            (0..LOCKS, 0..0)
        } else if a <= b {
            (a..b + 1, 0..0)
        } else {
            (0..b + 1, a..LOCKS)
        };
        low.chain(high)
    }

    /// Checks that `[offset, offset + len)` lies inside the mapping, then takes its stripes'
    /// locks with `lock` (shared or exclusive); the offset as an index, and the guards.
    fn locked<'a, G>(
        &'a self,
        offset: u64,
        len: usize,
        lock: impl Fn(&'a RwLock<()>) -> G,
    ) -> std::io::Result<(usize, Vec<G>)> {
        let at = usize::try_from(offset)
            .ok()
            .filter(|&o| o.checked_add(len).is_some_and(|e| e <= self.len))
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{len} bytes at {offset} run past the mapping's {} bytes",
                        self.len
                    ),
                )
            })?;
        let held = Self::stripes(at, len)
            .map(|i| lock(&self.locks[i]))
            .collect();
        Ok((at, held))
    }

    /// Copies `buf.len()` bytes at `offset` of the file into `buf`.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let (at, _held) = self.locked(offset, buf.len(), |l| {
            l.read().unwrap_or_else(PoisonError::into_inner)
        })?;
        // SAFETY: `at + buf.len() <= self.len` (checked), so the source lies inside the live
        // mapping; `buf` is a distinct, exclusively borrowed allocation; no thread writes
        // these mapped bytes meanwhile (their stripes are held shared).
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }

    /// Copies `len` bytes at `offset` of the file into a new vector: one copy, and no zeroing
    /// of the vector first.
    pub(crate) fn read_vec(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let (at, _held) = self.locked(offset, len, |l| {
            l.read().unwrap_or_else(PoisonError::into_inner)
        })?;
        let mut v = Vec::with_capacity(len);
        // SAFETY: `at + len <= self.len` (checked), so the source lies inside the live
        // mapping; `v` is a distinct allocation with room for `len` bytes, all of which the
        // copy initializes before `set_len` exposes them; no thread writes these mapped bytes
        // meanwhile (their stripes are held shared).
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), v.as_mut_ptr(), len);
            v.set_len(len);
        }
        Ok(v)
    }

    /// Copies `buf` into the file at `offset`.
    pub(crate) fn write(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        let (at, _held) = self.locked(offset, buf.len(), |l| {
            l.write().unwrap_or_else(PoisonError::into_inner)
        })?;
        // SAFETY: the destination lies inside the live mapping (checked); `buf` is a
        // distinct allocation; no other thread of this process reads or writes these mapped
        // bytes meanwhile (their stripes are held exclusively).
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr().add(at), buf.len());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the region `new` mapped, unmapped once; no copy is in flight (they
        // borrow `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(len: usize) -> (tempfile::TempDir, File, Mapping) {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("m.img"))
            .unwrap();
        f.set_len(len as u64).unwrap();
        let m = Mapping::new(&f, len).unwrap();
        (dir, f, m)
    }

    #[test]
    fn copies_agree_with_the_file_both_ways() {
        use std::os::unix::fs::FileExt;
        let (_d, f, m) = mapped(1 << 20);
        m.write(4096, &[7u8; 8192]).unwrap();
        let mut b = vec![0u8; 8192];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        f.write_all_at(&[9u8; 100], (1 << 20) - 100).unwrap();
        let mut r = vec![0u8; 200];
        m.read((1 << 20) - 200, &mut r).unwrap();
        assert!(r[..100].iter().all(|&x| x == 0) && r[100..].iter().all(|&x| x == 9));
        assert_eq!(m.read_vec((1 << 20) - 200, 200).unwrap(), r);
        assert_eq!(m.read_vec(4096, 8192).unwrap(), b);
    }

    #[test]
    fn copies_past_the_end_are_refused_untouched() {
        let (_d, _f, m) = mapped(65536);
        let mut b = vec![1u8; 4096];
        assert!(m.read(65536 - 4095, &mut b).is_err());
        assert!(b.iter().all(|&x| x == 1));
        assert!(m.write(65536, &b).is_err());
        assert!(m.write(u64::MAX, &b).is_err());
        assert!(m.read(0, &mut []).is_ok());
        assert!(m.read_vec(65536 - 4095, 4096).is_err());
        assert!(m.read_vec(u64::MAX, 1).is_err());
        assert_eq!(m.read_vec(65536, 0).unwrap(), Vec::<u8>::new());
        assert!(Mapping::new(&_f, 0).is_err());
    }

    #[test]
    fn stripes_are_ascending_and_distinct() {
        let s = |off: usize, len: usize| Mapping::stripes(off, len).collect::<Vec<_>>();
        assert_eq!(s(0, 4096), vec![0]);
        assert_eq!(s(65535, 2), vec![0, 1]);
        // Wrapping onto the lock table: stripe 256 is lock 0 again.
        assert_eq!(s(255 << STRIPE_SHIFT, 2 << STRIPE_SHIFT), vec![0, 255]);
        // More stripes than locks: every lock once.
        assert_eq!(
            s(3 << STRIPE_SHIFT, 300 << STRIPE_SHIFT),
            (0..LOCKS).collect::<Vec<_>>()
        );
        for off in [0, 4096, 17 << STRIPE_SHIFT, 250 << STRIPE_SHIFT] {
            for len in [1, 65536, 300_000, 9 << STRIPE_SHIFT] {
                let v = s(off, len);
                assert!(v.windows(2).all(|w| w[0] < w[1]), "{off} {len}: {v:?}");
            }
        }
    }

    #[test]
    fn concurrent_writers_and_readers_never_see_a_torn_block() {
        // Writers fill a 4 KiB block with one byte value at a time; readers must always see
        // one value throughout the block.
        let (_d, _f, m) = mapped(1 << 20);
        let m = std::sync::Arc::new(m);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut hs = Vec::new();
        for w in 0..2u8 {
            let (m, stop) = (m.clone(), stop.clone());
            hs.push(std::thread::spawn(move || {
                let mut v = w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    m.write(61440, &[v; 8192]).unwrap(); // spans stripes 0 and 1
                    v = v.wrapping_add(2);
                }
            }));
        }
        let mut b = vec![0u8; 8192];
        for _ in 0..20_000 {
            m.read(61440, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == b[0]), "torn block");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for h in hs {
            h.join().unwrap();
        }
    }
}

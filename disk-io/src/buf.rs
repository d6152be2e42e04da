//! Page-aligned I/O buffers and a bounded pool of them.
//!
//! `O_DIRECT` needs buffers aligned to the device's logical block size; every [`AlignedBuf`]
//! is aligned to [`IO_ALIGN_BYTES`] and its capacity is a multiple of it.
//!
//! Invariants:
//! - An `AlignedBuf` owns exactly one allocation of `cap` bytes with `IO_ALIGN_BYTES`
//!   alignment; `len <= cap`; the first `cap` bytes are always initialised (zeroed at
//!   allocation), so handing them to the kernel or to safe code never exposes uninit memory.
//! - A [`BufferPool`] never has more than `max_bytes` of buffers handed out: callers wait
//!   (back-pressure) instead of growing memory.

use crate::constants::{IO_ALIGN_BYTES, POOL_FREE_PER_CLASS_MAX};
use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A heap buffer aligned to [`IO_ALIGN_BYTES`], suitable for `O_DIRECT` I/O.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Vec<u8>); no interior aliasing.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reading the initialised bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; capacity is `len` rounded up to the alignment.
    ///
    /// # Panics
    /// If the allocation fails (as `Vec` does).
    pub fn zeroed(len: usize) -> Self {
        let cap = round_up(len.max(1), IO_ALIGN_BYTES);
        let layout = Layout::from_size_align(cap, IO_ALIGN_BYTES).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in bytes (a multiple of the alignment).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length. Bytes between the old and new length keep their previous contents
    /// (always initialised).
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "len {len} exceeds capacity {}", self.cap);
        self.len = len;
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes, uniquely borrowed via &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for the kernel. Valid while `self` is alive and not moved out of its box.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, IO_ALIGN_BYTES).expect("valid layout");
        // SAFETY: allocated in `zeroed` with exactly this layout; dropped once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two).
pub fn round_up(v: usize, align: usize) -> usize {
    debug_assert!(align.is_power_of_two());
    (v + align - 1) & !(align - 1)
}

/// A bounded pool of aligned buffers, reused by power-of-two size class.
#[derive(Clone, Debug)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    permits: Arc<Semaphore>,
    max_pages: usize,
    free: Mutex<Vec<Vec<AlignedBuf>>>,
}

/// A buffer on loan from a [`BufferPool`]; returns to the pool when dropped.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    _permit: OwnedSemaphorePermit,
    pool: Arc<PoolInner>,
}

impl BufferPool {
    /// A pool that hands out at most `max_bytes` (rounded to pages) at once.
    ///
    /// # Panics
    /// If `max_bytes` is smaller than one page.
    pub fn new(max_bytes: usize) -> Self {
        let max_pages = max_bytes / IO_ALIGN_BYTES;
        assert!(max_pages > 0, "pool must hold at least one page");
        Self {
            inner: Arc::new(PoolInner {
                permits: Arc::new(Semaphore::new(max_pages)),
                max_pages,
                free: Mutex::new((0..usize::BITS as usize).map(|_| Vec::new()).collect()),
            }),
        }
    }

    /// Largest single buffer this pool can hand out.
    pub fn max_bytes(&self) -> usize {
        self.inner.max_pages * IO_ALIGN_BYTES
    }

    /// Takes a zero-filled-or-reused buffer of `len` bytes, waiting while the pool is exhausted.
    /// Reused buffers keep old contents: callers overwrite what they use.
    ///
    /// # Panics
    /// If `len` exceeds [`Self::max_bytes`] (a caller bug: limits are checked upstream).
    pub async fn take(&self, len: usize) -> PooledBuf {
        let class_cap = round_up(len.max(1), IO_ALIGN_BYTES).next_power_of_two();
        let pages = class_cap / IO_ALIGN_BYTES;
        assert!(
            pages <= self.inner.max_pages,
            "buffer of {len} bytes exceeds pool"
        );
        let permit = Arc::clone(&self.inner.permits)
            .acquire_many_owned(u32::try_from(pages).expect("pages fit u32"))
            .await
            .expect("pool semaphore never closed");
        let class = class_cap.trailing_zeros() as usize;
        let reused = self
            .inner
            .free
            .lock()
            .expect("pool lock")
            .get_mut(class)
            .and_then(Vec::pop);
        let mut buf = reused.unwrap_or_else(|| AlignedBuf::zeroed(class_cap));
        buf.set_len(len);
        PooledBuf {
            buf: Some(buf),
            _permit: permit,
            pool: Arc::clone(&self.inner),
        }
    }

    /// Bytes currently available without waiting.
    pub fn available_bytes(&self) -> usize {
        self.inner.permits.available_permits() * IO_ALIGN_BYTES
    }
}

impl PooledBuf {
    /// The buffer.
    pub fn buf(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("present until drop")
    }
    /// The buffer, mutable.
    pub fn buf_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("present until drop")
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.buf().as_slice()
    }
    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf_mut().as_mut_slice()
    }
    /// Length.
    pub fn len(&self) -> usize {
        self.buf().len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.buf().is_empty()
    }
    pub(crate) fn take_buf(&mut self) -> AlignedBuf {
        self.buf.take().expect("present until drop")
    }
    pub(crate) fn put_buf(&mut self, b: AlignedBuf) {
        self.buf = Some(b);
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let class = buf.capacity().trailing_zeros() as usize;
            let mut free = self.pool.free.lock().expect("pool lock");
            if free[class].len() < POOL_FREE_PER_CLASS_MAX {
                free[class].push(buf);
            }
        }
    }
}

fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<AlignedBuf>();
    is::<PooledBuf>();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_slice().as_ptr() as usize % IO_ALIGN_BYTES, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }

    #[tokio::test]
    async fn pool_reuses_and_bounds() {
        let pool = BufferPool::new(4 * IO_ALIGN_BYTES);
        let a = pool.take(4096).await;
        let p = a.as_slice().as_ptr();
        assert_eq!(pool.available_bytes(), 3 * IO_ALIGN_BYTES);
        drop(a);
        let b = pool.take(100).await;
        assert_eq!(b.as_slice().as_ptr(), p, "same size class is reused");
        assert_eq!(b.len(), 100);
        let _c = pool.take(2 * 4096 - 1).await; // rounds to a 2-page class
        assert_eq!(pool.available_bytes(), IO_ALIGN_BYTES);
        drop(b);
        assert_eq!(pool.available_bytes(), 2 * IO_ALIGN_BYTES);
    }
}

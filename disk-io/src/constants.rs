//! Limits of the disk layer, in one place, with their compile-time relations.
//!
//! Every queue and pool in this crate is bounded by one of these values.

/// Alignment of every buffer and of every offset and length handed to the kernel.
/// 4096 satisfies O_DIRECT on every block device and file system we target.
pub const IO_ALIGN_BYTES: usize = 4096;

/// Largest single read or write request accepted by a [`crate::Device`].
pub const IO_SIZE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Default io_uring submission queue depth (and in-flight requests per engine).
pub const QUEUE_DEPTH_DEFAULT: u32 = 256;

/// Requests that may wait in an engine's channel before callers are back-pressured.
pub const CHANNEL_DEPTH_MAX: usize = 1024;

/// Worker threads of the portable fallback engine.
pub const FALLBACK_THREADS: usize = 4;

/// Buffers of one size class kept for reuse by a [`crate::BufferPool`].
pub const POOL_FREE_PER_CLASS_MAX: usize = 64;

const _: () = assert!(IO_ALIGN_BYTES.is_power_of_two());
const _: () = assert!(IO_SIZE_MAX_BYTES.is_multiple_of(IO_ALIGN_BYTES));
const _: () = assert!(QUEUE_DEPTH_DEFAULT as usize <= CHANNEL_DEPTH_MAX);

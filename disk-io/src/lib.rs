//! The disk layer: the only crate of the workspace with `unsafe` code.
//!
//! It opens backing devices (regular files or block devices) and performs aligned I/O on them
//! through io_uring with `O_DIRECT`, or through a portable thread pool where io_uring is
//! unavailable. Buffers come from a bounded pool of page-aligned allocations.
//!
//! Invariants:
//! - Every `unsafe` block carries a `// SAFETY:` comment.
//! - Callers see one async API regardless of engine; durability semantics are identical:
//!   FUA writes and [`Device::flush`] reach stable storage before they resolve.
//!
//! Not here: what the bytes mean (shards, checksums, volumes): that is `raid-engine`.

pub mod buf;
pub mod constants;
mod device;
mod error;
pub mod health;
mod mapped;
mod threads;
mod uring;

pub use buf::{round_up, AlignedBuf, BufferPool, PooledBuf};
pub use constants::{IO_ALIGN_BYTES, IO_SIZE_MAX_BYTES};
pub use device::{Device, DeviceConfig, EngineChoice, EngineKind};
pub use error::{IoError, Result};
pub use health::{DeviceHealth, HealthSnapshot};

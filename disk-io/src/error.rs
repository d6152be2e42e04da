//! Errors of the disk layer. Each variant says what failed; `Display` names the likely cause.

use std::path::PathBuf;

/// An operating error of a backing device.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The backing file or device could not be opened or created.
    #[error("cannot open backing store {path}: {source} (check that the path exists, that the data dir is writable, and that no other process holds it)")]
    Open {
        /// The path that failed.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A read, write or flush failed in the kernel.
    #[error("{op} at offset {offset} failed: {source}")]
    Os {
        /// Which operation.
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The request is not aligned to [`crate::IO_ALIGN_BYTES`] or is too large.
    #[error("request offset {offset} length {len} is not aligned to {align} or exceeds the limit")]
    Misaligned {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: usize,
        /// Required alignment.
        align: usize,
    },
    /// The request runs past the end of the device.
    #[error("request offset {offset} length {len} runs past the device end {size}")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: usize,
        /// Device size in bytes.
        size: u64,
    },
    /// The engine's thread is gone (the device is shutting down).
    #[error("the I/O engine has stopped (device closed or its thread died)")]
    EngineStopped,
    /// The file system could not reserve the file's whole size.
    #[error("cannot reserve {need} bytes for {path}: the file system is full (free space there, move the data dir to a larger file system, or make the volumes smaller)")]
    NoSpace {
        /// The file.
        path: PathBuf,
        /// Bytes it needs.
        need: u64,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, IoError>;

//! Limits of the device server.

/// Largest data transfer of one READ or WRITE (also advertised in VPD 0xB0).
pub const TRANSFER_BYTES_MAX: u32 = 8 * 1024 * 1024;

/// LUNs one target may export.
pub const LUNS_MAX: usize = 256;

/// Logical block sizes a volume may use.
pub const BLOCK_SIZES: [u32; 2] = [512, 4096];

/// Physical block size reported for every volume (the shard store's page size).
pub const PHYSICAL_BLOCK_BYTES: u32 = 4096;

const _: () = assert!(TRANSFER_BYTES_MAX.is_multiple_of(PHYSICAL_BLOCK_BYTES));
const _: () = assert!(TRANSFER_BYTES_MAX as usize <= disk_io::IO_SIZE_MAX_BYTES);

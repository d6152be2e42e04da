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

/// UNMAP: most block descriptors in one command (VPD 0xB0).
pub const UNMAP_DESCRIPTORS_MAX: u32 = 256;

/// UNMAP: most bytes in one command (VPD 0xB0 MAXIMUM UNMAP LBA COUNT; 1 Mi blocks of 512).
pub const UNMAP_BYTES_MAX: u64 = 1 << 29;

/// WRITE SAME: most bytes one command may write (VPD 0xB0 MAXIMUM WRITE SAME LENGTH). Kept at
/// the transfer limit: hosts (and libiscsi's tests) write a range with WRITE before they
/// WRITE SAME over it.
pub const WRITE_SAME_BYTES_MAX: u64 = TRANSFER_BYTES_MAX as u64;

/// COMPARE AND WRITE: most blocks per command (VPD 0xB0 byte 5; one byte).
pub const COMPARE_AND_WRITE_BLOCKS_MAX: u8 = 255;

//! The one place where volume (raid-engine) errors become SCSI sense.

use crate::sense::SenseReason;

/// Maps a volume error of a read starting at `lba`.
pub fn read_error(e: &raid_engine::Error, lba: u64) -> SenseReason {
    match e {
        raid_engine::Error::OutOfRange { .. } => SenseReason::LbaOutOfRange,
        raid_engine::Error::Io(err) => {
            tracing::error!(cause = %err, lba, "read failed on the backing device");
            SenseReason::UnrecoveredReadError { lba }
        }
    }
}

/// Maps a volume error of a write (or flush) starting at `lba`.
pub fn write_error(e: &raid_engine::Error, lba: u64) -> SenseReason {
    match e {
        raid_engine::Error::OutOfRange { .. } => SenseReason::LbaOutOfRange,
        raid_engine::Error::Io(err) => {
            tracing::error!(cause = %err, lba, "write failed on the backing device");
            SenseReason::WriteError { lba }
        }
    }
}

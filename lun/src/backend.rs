//! The one place where volume (raid-engine) errors become SCSI sense.

use crate::sense::SenseReason;

/// Maps a cluster (distributed volume) error; `None` for the ones that are plain I/O errors.
fn cluster_error(e: &raid_engine::cluster::VolError, lba: u64) -> SenseReason {
    use raid_engine::cluster::VolError as V;
    match e {
        V::OutOfRange { .. } => SenseReason::LbaOutOfRange,
        V::Fenced => SenseReason::NotReadyUnavailable,
        V::NoVolume(_) => SenseReason::NotReadyBecomingReady,
        other => {
            tracing::warn!(cause = %other, lba, "volume I/O must be retried (cluster state)");
            SenseReason::NotReadyTransitioning
        }
    }
}

/// Maps a volume error of a read starting at `lba`.
pub fn read_error(e: &raid_engine::Error, lba: u64) -> SenseReason {
    match e {
        raid_engine::Error::Cluster(c) => cluster_error(c, lba),
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
        raid_engine::Error::Cluster(c) => cluster_error(c, lba),
        raid_engine::Error::OutOfRange { .. } => SenseReason::LbaOutOfRange,
        raid_engine::Error::Io(err) => {
            tracing::error!(cause = %err, lba, "write failed on the backing device");
            SenseReason::WriteError { lba }
        }
    }
}

//! The iSCSI fabric (RFC 7143, error recovery level 0).
//!
//! A sans-IO protocol core ([`proto`]) and a thin tokio driver ([`driver`]). The core turns
//! bytes into decoded SCSI commands for the device server (`lun`) and outcomes back into
//! PDUs; it never sees LBAs, shards or sockets.

#![forbid(unsafe_code)]

pub mod config;
pub mod constants;
pub mod driver;
pub mod proto;

pub use config::{
    ChapChallengeHistory, FabricConfig, InitiatorPatterns, Portal, SessionLimits, SessionSlot,
    TargetInfo, Timers,
};
pub use proto::chap::{ChapConfig, ChapSecret};
pub use proto::connection::{Connection, ConnectionError, Event, Transmit};

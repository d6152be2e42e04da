//! What the fabric hands the device server, and what it gets back.
//!
//! The fabric (iscsi-target) knows ITTs, CmdSNs and R2Ts; the device server knows none of
//! that. A [`ScsiCommand`] carries the I_T nexus, the LUN, the CDB and all Data-Out bytes the
//! initiator sent (its expected transfer length); a [`CommandOutcome`] carries status, sense
//! and Data-In, and for writes how many bytes the CDB wanted, so the fabric can set residuals.

use crate::sense::{CommandStatus, SenseReason};

/// An I_T nexus: one initiator port (name + ISID) through one target port.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ItNexus {
    /// iSCSI initiator name.
    pub initiator_name: String,
    /// Initiator session id (48 bits).
    pub isid: u64,
    /// Relative target port identifier of the port the session came in on.
    pub relative_port: u16,
}

/// SAM task attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TaskAttr {
    /// Untagged (treated as simple).
    Untagged,
    /// SIMPLE.
    #[default]
    Simple,
    /// ORDERED.
    Ordered,
    /// HEAD OF QUEUE.
    HeadOfQueue,
    /// ACA.
    Aca,
}

/// A SCSI command as the device server sees it.
#[derive(Debug)]
pub struct ScsiCommand {
    /// Who sent it, through which port.
    pub nexus: ItNexus,
    /// The 64-bit LUN field as sent (SAM-5 format).
    pub lun: u64,
    /// The CDB (16 bytes or longer with an extended CDB AHS).
    pub cdb: Vec<u8>,
    /// Task attribute.
    pub attr: TaskAttr,
    /// Every Data-Out byte received (length = the initiator's expected transfer length).
    pub data_out: Vec<u8>,
    /// The initiator's expected Data-In length (its buffer size).
    pub data_in_len: u32,
}

/// Data returned to the initiator.
#[derive(Debug, Default)]
pub enum DataIn {
    /// None.
    #[default]
    None,
    /// Bytes built by the device server (INQUIRY, MODE SENSE, ...).
    Bytes(Vec<u8>),
    /// Blocks read from the volume.
    Read(raid_engine::ReadData),
}

impl DataIn {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::None => 0,
            Self::Bytes(b) => b.len(),
            Self::Read(r) => r.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends `len` bytes from offset `at` to `out`.
    ///
    /// # Panics
    /// If the range lies outside the data.
    pub fn extend_into(&self, at: usize, len: usize, out: &mut Vec<u8>) {
        match self {
            Self::None => assert!(len == 0 && at == 0),
            Self::Bytes(b) => out.extend_from_slice(&b[at..at + len]),
            Self::Read(r) => r.extend_into(at, len, out),
        }
    }
    /// Hands `f` the bytes `[at, at + len)` in order, as the slices they are held in (no
    /// copy: a vectored send takes them from here).
    ///
    /// # Panics
    /// If the range lies outside the data.
    pub fn slices<'a>(&'a self, at: usize, len: usize, mut f: impl FnMut(&'a [u8])) {
        match self {
            Self::None => assert!(len == 0 && at == 0),
            Self::Bytes(b) => f(&b[at..at + len]),
            Self::Read(r) => r.slices(at, len, f),
        }
    }
}

/// How a command ended.
#[derive(Debug)]
pub struct CommandOutcome {
    /// Status (with the reason for CHECK CONDITION).
    pub status: CommandStatus,
    /// Encoded sense data (empty unless CHECK CONDITION).
    pub sense: Vec<u8>,
    /// Data-In; the fabric sends at most the initiator's expected length and reports the
    /// rest as residual overflow.
    pub data_in: DataIn,
    /// For commands with Data-Out: the bytes the CDB asked for (SPDTL), so the fabric can
    /// report residuals against the initiator's expected transfer length.
    pub data_out_wanted: Option<u64>,
}

impl CommandOutcome {
    /// GOOD with optional data.
    pub fn good(data_in: DataIn) -> Self {
        Self {
            status: CommandStatus::Good,
            sense: Vec::new(),
            data_in,
            data_out_wanted: None,
        }
    }

    /// A status with neither data nor sense (RESERVATION CONFLICT, TASK SET FULL, ...).
    pub fn status(status: CommandStatus) -> Self {
        Self {
            status,
            sense: Vec::new(),
            data_in: DataIn::None,
            data_out_wanted: None,
        }
    }

    /// CHECK CONDITION with `reason`, sense encoded in descriptor or fixed format.
    pub fn check(reason: SenseReason, descriptor: bool) -> Self {
        Self {
            status: CommandStatus::CheckCondition(reason),
            sense: reason.encode(descriptor),
            data_in: DataIn::None,
            data_out_wanted: None,
        }
    }
}

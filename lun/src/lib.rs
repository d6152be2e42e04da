//! The SCSI device server (SPC-4, SBC-3): what a host talks to once the fabric has delivered
//! a command.
//!
//! The fabric hands [`DeviceServer::execute`] a [`ScsiCommand`] (I_T nexus, LUN, CDB, Data-Out)
//! and gets a [`CommandOutcome`] back (status, sense, Data-In). This crate knows LBAs, sense and
//! I_T nexuses, never sockets, ITTs or CmdSNs.
//!
//! Layout: `cdb` decodes, `device` executes, `inquiry` and `mode` build reply pages, `sense`
//! is the one table of sense codes, `backend` maps volume errors to sense.

#![forbid(unsafe_code)]

pub mod alua;
pub mod backend;
pub mod cdb;
pub mod command;
pub mod constants;
pub mod device;
pub mod inquiry;
pub mod mode;
pub mod opcodes;
pub mod params;
pub mod pr;
pub mod pr_store;
pub mod sense;
pub mod serde_pairs;
pub mod shared;
pub mod stats;
pub mod task_set;

pub use command::{CommandOutcome, DataIn, ItNexus, ScsiCommand, TaskAttr};
pub use device::{
    decode_lun, encode_lun, Admitted, DeviceServer, LogicalUnit, LuIdentity, TargetPort,
};
pub use sense::{CommandStatus, SenseKey, SenseReason};

//! What the fabric needs to know about the targets it serves: names, CHAP, portals, and the
//! device server behind each target. Built by the appliance from its validated config.

use crate::proto::chap::ChapConfig;
use std::sync::Arc;

/// One portal of a target as SendTargets reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Portal {
    /// `ip:port` (IPv6 in brackets).
    pub address: String,
    /// Target portal group tag.
    pub tpgt: u16,
}

/// One iSCSI target.
#[derive(Debug)]
pub struct TargetInfo {
    /// iSCSI qualified name.
    pub name: String,
    /// Optional alias.
    pub alias: Option<String>,
    /// CHAP required for normal sessions to this target.
    pub chap: Option<ChapConfig>,
    /// Every portal that serves this target (reported by SendTargets).
    pub portals: Vec<Portal>,
    /// The device server (LUNs) of this target on this controller.
    pub device: Arc<lun::DeviceServer>,
}

/// Timers of a connection, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    /// Time allowed to complete login.
    pub login_timeout_ms: u64,
    /// Idle time before a NOP-In ping.
    pub nop_interval_ms: u64,
    /// Time to answer a NOP-In ping.
    pub nop_timeout_ms: u64,
}

impl Default for Timers {
    fn default() -> Self {
        use crate::constants::*;
        Self {
            login_timeout_ms: LOGIN_TIMEOUT_MS,
            nop_interval_ms: NOP_INTERVAL_MS,
            nop_timeout_ms: NOP_TIMEOUT_MS,
        }
    }
}

/// Everything one portal's connections share.
#[derive(Debug)]
pub struct FabricConfig {
    /// Targets served.
    pub targets: Vec<TargetInfo>,
    /// CHAP required for discovery sessions.
    pub discovery_chap: Option<ChapConfig>,
    /// This portal's target portal group tag.
    pub tpgt: u16,
    /// This portal's relative target port identifier.
    pub relative_port: u16,
    /// Timers.
    pub timers: Timers,
}

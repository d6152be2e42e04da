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
    /// Initiator names allowed to discover and log in; `None` allows every initiator.
    pub allowed_initiators: Option<InitiatorPatterns>,
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

/// Initiator name patterns: exact names, or a prefix ending in `*` (`iqn.1994-05.com.redhat:*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitiatorPatterns(pub Vec<String>);

impl InitiatorPatterns {
    /// Whether `name` matches a pattern. Names compare case-insensitively (RFC 3722 iSCSI names
    /// are normalised to lower case).
    pub fn allows(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.0.iter().any(|p| {
            let p = p.to_ascii_lowercase();
            match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == p,
            }
        })
    }
}

impl TargetInfo {
    /// Whether `initiator` may see and log in to this target.
    pub fn allows(&self, initiator: &str) -> bool {
        self.allowed_initiators
            .as_ref()
            .is_none_or(|p| p.allows(initiator))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = InitiatorPatterns(vec![
            "iqn.1994-05.com.redhat:*".into(),
            "iqn.2026-11.x:host1".into(),
        ]);
        assert!(p.allows("iqn.1994-05.com.redhat:abc"));
        assert!(p.allows("IQN.2026-11.X:HOST1"));
        assert!(!p.allows("iqn.2026-11.x:host10"));
        assert!(!p.allows("iqn.1991-05.com.microsoft:win"));
    }
}

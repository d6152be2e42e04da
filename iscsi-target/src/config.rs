//! What the fabric needs to know about the targets it serves: names, CHAP, portals, and the
//! device server behind each target. Built by the appliance from its validated config.

use crate::proto::chap::ChapConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
    /// Bounds on concurrent normal sessions.
    pub limits: Arc<SessionLimits>,
    /// Mutual-CHAP challenges already answered; shared by every portal of a controller so a
    /// challenge replayed on another portal is refused too.
    pub chap_challenges: Arc<ChapChallengeHistory>,
}

/// Recent initiator challenges (mutual CHAP), oldest first.
#[derive(Debug, Default)]
pub struct ChapChallengeHistory {
    seen: Mutex<std::collections::VecDeque<Vec<u8>>>,
}

impl ChapChallengeHistory {
    /// Records an initiator's mutual-CHAP challenge; false if it was seen among the last
    /// [`crate::constants::CHAP_CHALLENGES_REMEMBERED`] (a replay: answering it again would
    /// hand out a response an attacker already holds).
    pub fn note(&self, challenge: &[u8]) -> bool {
        let mut seen = self.seen.lock().expect("challenge lock");
        if seen.iter().any(|c| c.as_slice() == challenge) {
            return false;
        }
        if seen.len() == crate::constants::CHAP_CHALLENGES_REMEMBERED {
            seen.pop_front();
        }
        seen.push_back(challenge.to_vec());
        true
    }
}

/// Bounds on concurrent normal sessions, per target and per initiator name, shared by every
/// connection of a portal. A login that would exceed one is refused with status 0x0302 (out of
/// resources) before it completes.
#[derive(Debug)]
pub struct SessionLimits {
    per_target: usize,
    per_initiator: usize,
    counts: Mutex<(HashMap<usize, usize>, HashMap<String, usize>)>,
}

/// A session's place within the limits; given back on drop.
#[derive(Debug)]
pub struct SessionSlot {
    limits: Arc<SessionLimits>,
    target: usize,
    initiator: String,
}

impl SessionLimits {
    /// Limits of `per_target` sessions per target and `per_initiator` per initiator name.
    pub fn new(per_target: usize, per_initiator: usize) -> Arc<Self> {
        Arc::new(Self {
            per_target,
            per_initiator,
            counts: Mutex::new((HashMap::new(), HashMap::new())),
        })
    }

    /// Takes a slot for `initiator` on `target`, or `None` when a limit is reached.
    pub fn try_acquire(self: &Arc<Self>, target: usize, initiator: &str) -> Option<SessionSlot> {
        let mut c = self.counts.lock().expect("limits lock");
        let t = c.0.get(&target).copied().unwrap_or(0);
        let i = c.1.get(initiator).copied().unwrap_or(0);
        if t >= self.per_target || i >= self.per_initiator {
            return None;
        }
        *c.0.entry(target).or_default() += 1;
        *c.1.entry(initiator.to_owned()).or_default() += 1;
        Some(SessionSlot {
            limits: Arc::clone(self),
            target,
            initiator: initiator.to_owned(),
        })
    }
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            per_target: crate::constants::SESSIONS_PER_TARGET_MAX,
            per_initiator: crate::constants::SESSIONS_PER_INITIATOR_MAX,
            counts: Mutex::new((HashMap::new(), HashMap::new())),
        }
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut c = self.limits.counts.lock().expect("limits lock");
        if let Some(n) = c.0.get_mut(&self.target) {
            *n -= 1;
        }
        if let Some(n) = c.1.get_mut(&self.initiator) {
            *n -= 1;
            if *n == 0 {
                c.1.remove(&self.initiator);
            }
        }
    }
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

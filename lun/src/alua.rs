//! Asymmetric logical unit access (SPC-4 §5.16): the access state of every target port group.
//!
//! Why it exists: in a cluster every controller is one target port group, and hosts choose
//! paths by these states (Linux's ALUA device handler, Windows MPIO, ESXi's VMW_SATP_ALUA).
//! The appliance sets them from the cluster's membership: a serving controller is
//! active/optimized, one catching up is transitioning, a fenced or down one unavailable.
//!
//! Invariants:
//! - One [`AccessStates`] is shared by every device server of a controller, so REPORT TARGET
//!   PORT GROUPS through any of its ports agrees, and a group not (yet) known is reported
//!   active/optimized (the single-controller case).
//! - Every change of any group's state bumps [`AccessStates::generation`]; each logical unit
//!   compares it with the generation it last announced and raises ASYMMETRIC ACCESS STATE
//!   CHANGED once per I_T nexus it knows (see `LogicalUnit`).
//! - Through a port whose group is transitioning or unavailable only the commands SPC-4
//!   allows in that state run ([`gate`]); the rest get NOT READY with the state's sense.

use crate::cdb::Cdb;
use crate::sense::SenseReason;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// An asymmetric access state (SPC-4 table 307; only those the appliance uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessState {
    /// Serving with full performance.
    ActiveOptimized,
    /// Changing state (catching up, draining); retry.
    Transitioning,
    /// Not serving (fenced, down).
    Unavailable,
}

impl AccessState {
    /// The ASYMMETRIC ACCESS STATE code of REPORT TARGET PORT GROUPS.
    pub fn code(self) -> u8 {
        match self {
            Self::ActiveOptimized => 0x0,
            Self::Unavailable => 0x3,
            Self::Transitioning => 0xf,
        }
    }

    /// The state's name as SPC-4 spells it, for status reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::ActiveOptimized => "active/optimized",
            Self::Unavailable => "unavailable",
            Self::Transitioning => "transitioning",
        }
    }
}

/// The access states of all target port groups of a cluster, as one controller knows them.
#[derive(Debug, Default)]
pub struct AccessStates {
    states: RwLock<BTreeMap<u16, AccessState>>,
    generation: AtomicU64,
}

impl AccessStates {
    /// The state of `group` (active/optimized when unknown).
    pub fn state(&self, group: u16) -> AccessState {
        self.states
            .read()
            .expect("alua lock")
            .get(&group)
            .copied()
            .unwrap_or(AccessState::ActiveOptimized)
    }

    /// Installs the states of every group; returns whether any changed (and if so bumps the
    /// generation, which makes every logical unit announce the change).
    pub fn set_all(&self, states: BTreeMap<u16, AccessState>) -> bool {
        let mut g = self.states.write().expect("alua lock");
        // Unknown groups read as active/optimized: compare what a reader would see.
        let seen = |m: &BTreeMap<u16, AccessState>, k: &u16| {
            m.get(k).copied().unwrap_or(AccessState::ActiveOptimized)
        };
        let changed = g
            .keys()
            .chain(states.keys())
            .any(|k| seen(&g, k) != seen(&states, k));
        *g = states;
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        changed
    }

    /// Every group's state as last installed (empty before the first [`Self::set_all`]).
    pub fn snapshot(&self) -> BTreeMap<u16, AccessState> {
        self.states.read().expect("alua lock").clone()
    }

    /// Advances on every change of any group's state.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// The commands that only report and so run whatever the port's state (and before a
/// cluster LU's shared state is installed): INQUIRY, REPORT LUNS, REPORT TARGET PORT GROUPS,
/// REQUEST SENSE and the command and TMF reports.
pub fn reporting(c: &Cdb) -> bool {
    matches!(
        c,
        Cdb::Inquiry { .. }
            | Cdb::ReportLuns { .. }
            | Cdb::ReportTargetPortGroups { .. }
            | Cdb::RequestSense { .. }
            | Cdb::ReportSupportedOpcodes { .. }
            | Cdb::ReportSupportedTmfs { .. }
    )
}

/// Whether `c` may run through a port whose group is in state `s`: SPC-4 §5.16.2.4 lets
/// INQUIRY, REPORT LUNS, REPORT TARGET PORT GROUPS, REQUEST SENSE and the command/TMF
/// reports through in the transitioning and unavailable states; everything else gets NOT
/// READY, ASYMMETRIC ACCESS STATE TRANSITION (04/0A) or TARGET PORT IN UNAVAILABLE STATE
/// (04/0C), so multipath hosts retry or move to another path.
///
/// # Errors
/// The sense for a refused command.
pub fn gate(s: AccessState, c: &Cdb) -> Result<(), SenseReason> {
    match s {
        _ if reporting(c) => Ok(()),
        AccessState::ActiveOptimized => Ok(()),
        AccessState::Transitioning => Err(SenseReason::NotReadyTransitioning),
        AccessState::Unavailable => Err(SenseReason::NotReadyUnavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_bump_the_generation_once_and_unknown_groups_are_active() {
        let a = AccessStates::default();
        assert_eq!(a.state(7), AccessState::ActiveOptimized);
        let g0 = a.generation();
        // Declaring what readers already see is no change.
        assert!(!a.set_all(BTreeMap::from([(1, AccessState::ActiveOptimized)])));
        assert_eq!(a.generation(), g0);
        assert!(a.set_all(BTreeMap::from([
            (1, AccessState::ActiveOptimized),
            (2, AccessState::Unavailable),
        ])));
        assert_eq!(a.generation(), g0 + 1);
        assert_eq!(a.state(2), AccessState::Unavailable);
        assert!(!a.set_all(BTreeMap::from([
            (1, AccessState::ActiveOptimized),
            (2, AccessState::Unavailable),
        ])));
        assert_eq!(a.generation(), g0 + 1);
        // A group that disappears reads as active/optimized again: a change.
        assert!(a.set_all(BTreeMap::from([(1, AccessState::ActiveOptimized)])));
        assert_eq!(a.state(2), AccessState::ActiveOptimized);
    }

    #[test]
    fn only_reporting_commands_pass_a_port_that_is_not_active() {
        let read = Cdb::TestUnitReady;
        let inq = Cdb::Inquiry {
            evpd: false,
            page: 0,
            alloc: 96,
        };
        assert_eq!(gate(AccessState::ActiveOptimized, &read), Ok(()));
        assert_eq!(
            gate(AccessState::Transitioning, &read),
            Err(SenseReason::NotReadyTransitioning)
        );
        assert_eq!(
            gate(AccessState::Unavailable, &read),
            Err(SenseReason::NotReadyUnavailable)
        );
        assert_eq!(gate(AccessState::Unavailable, &inq), Ok(()));
        assert_eq!(
            gate(
                AccessState::Transitioning,
                &Cdb::ReportTargetPortGroups {
                    extended: false,
                    alloc: 64
                }
            ),
            Ok(())
        );
    }
}

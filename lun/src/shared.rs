//! Reservation state (and the changeable mode values) shared by every controller of a cluster.
//!
//! Why it exists: a host that reserves a LUN through one controller must see the reservation
//! enforced through every other controller from the moment its command completes. So PR OUT,
//! RESERVE and RELEASE on a logical unit with a [`SharedScsi`] do not change local state:
//! they become [`ScsiChange`]s in the cluster's metadata log, and every controller applies
//! the same changes in the same order to its [`SharedLuState`] with [`SharedLuState::apply`],
//! then installs the result in its logical unit (`LogicalUnit::install_shared`).
//!
//! Invariants:
//! - [`SharedLuState::apply`] is a pure function of the state and the change: every
//!   controller computes the same state and the same outcome (GOOD, RESERVATION CONFLICT or
//!   the sense), so the controller that submitted the command can answer with the outcome the
//!   log's leader computed.
//! - Unit attentions that follow from a change are named by I_T nexus (or, for a reset, are
//!   for every nexus); each controller raises those of the nexuses it knows (its own), once,
//!   and on a reset aborts its own tasks of the LU.
//! - A submitted change completes only after every controller that may accept I/O has
//!   installed it (the `SharedScsi` implementation waits, or fences the laggard).

use crate::command::ItNexus;
use crate::pr::{PrError, PrOut, PrState};
use crate::sense::SenseReason;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;

/// One change of a logical unit's shared state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScsiChange {
    /// PERSISTENT RESERVE OUT from `nexus`.
    PrOut {
        /// Issuer.
        nexus: ItNexus,
        /// Decoded service action.
        op: PrOut,
    },
    /// SPC-2 RESERVE from `nexus`.
    Reserve {
        /// Issuer.
        nexus: ItNexus,
    },
    /// SPC-2 RELEASE from `nexus` (also sent when its session ends).
    Release {
        /// Issuer.
        nexus: ItNexus,
    },
    /// MODE SELECT from `nexus` changing the changeable values (None: unchanged).
    ModeSelect {
        /// Issuer (it gets no MODE PARAMETERS CHANGED unit attention).
        nexus: ItNexus,
        /// Caching page WCE.
        wce: Option<bool>,
        /// Control page D_SENSE.
        d_sense: Option<bool>,
    },
    /// LOGICAL UNIT RESET (or a target reset) from `by`: the SPC-2 reservation is released,
    /// every controller aborts the LU's tasks and raises BUS DEVICE RESET for every nexus.
    Reset {
        /// Issuer.
        by: ItNexus,
    },
}

/// What an applied change asks every controller to do besides installing the new state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LuEvents {
    /// Unit attentions for these nexuses (each controller raises those it knows).
    pub unit_attentions: Vec<(ItNexus, SenseReason)>,
    /// A reset: abort the tasks admitted so far and raise BUS DEVICE RESET for every nexus
    /// (the issuer's included, SAM-5 §6.3.3).
    pub reset: Option<ItNexus>,
    /// PREEMPT AND ABORT: abort the tasks of these nexuses (on whichever controller they are).
    pub abort: Vec<ItNexus>,
    /// Mode parameters changed by this nexus: every other nexus gets MODE PARAMETERS
    /// CHANGED.
    pub mode_changed_by: Option<ItNexus>,
}

/// How a change ended for the command that asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeOutcome {
    /// GOOD.
    Done,
    /// RESERVATION CONFLICT.
    Conflict,
    /// CHECK CONDITION with this sense.
    Sense(SenseReason),
}

/// The part of a logical unit's state that is the same on every controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedLuState {
    /// Persistent reservations and registrations.
    pub pr: PrState,
    /// SPC-2 reservation holder.
    pub spc2: Option<ItNexus>,
    /// Caching page WCE cleared (the write cache is on by default).
    #[serde(default)]
    pub write_cache_off: bool,
    /// Control page D_SENSE: descriptor-format sense.
    #[serde(default)]
    pub d_sense: bool,
}

impl SharedLuState {
    /// Applies `change`: the outcome for its issuer, and the unit attentions it causes (by
    /// nexus; each controller raises those of its own nexuses).
    pub fn apply(&mut self, change: &ScsiChange) -> (ChangeOutcome, LuEvents) {
        let none = LuEvents::default();
        match change {
            ScsiChange::PrOut { nexus, op } => match self.pr.apply(nexus, op.clone()) {
                Ok(effects) => (
                    ChangeOutcome::Done,
                    LuEvents {
                        unit_attentions: effects.unit_attentions,
                        abort: effects.abort,
                        ..LuEvents::default()
                    },
                ),
                Err(PrError::Conflict) => (ChangeOutcome::Conflict, none),
                Err(PrError::Sense(r)) => (ChangeOutcome::Sense(r), none),
            },
            ScsiChange::Reserve { nexus } => {
                // SPC-4 §5.12.3: with persistent registrations present, RESERVE conflicts.
                if !self.pr.registrations.is_empty() {
                    return (ChangeOutcome::Conflict, none);
                }
                match &self.spc2 {
                    Some(h) if h != nexus => (ChangeOutcome::Conflict, none),
                    _ => {
                        self.spc2 = Some(nexus.clone());
                        (ChangeOutcome::Done, none)
                    }
                }
            }
            ScsiChange::Release { nexus } => {
                if self.spc2.as_ref() == Some(nexus) {
                    self.spc2 = None;
                }
                (ChangeOutcome::Done, none)
            }
            ScsiChange::ModeSelect {
                nexus,
                wce,
                d_sense,
            } => {
                let before = (self.write_cache_off, self.d_sense);
                if let Some(w) = wce {
                    self.write_cache_off = !w;
                }
                if let Some(d) = d_sense {
                    self.d_sense = *d;
                }
                let changed = before != (self.write_cache_off, self.d_sense);
                (
                    ChangeOutcome::Done,
                    LuEvents {
                        mode_changed_by: changed.then(|| nexus.clone()),
                        ..LuEvents::default()
                    },
                )
            }
            ScsiChange::Reset { by } => {
                self.spc2 = None;
                (
                    ChangeOutcome::Done,
                    LuEvents {
                        reset: Some(by.clone()),
                        ..LuEvents::default()
                    },
                )
            }
        }
    }
}

/// A boxed future of a submitted change.
pub type ChangeFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ChangeOutcome, SenseReason>> + Send + 'a>>;

/// Where a logical unit's shared changes go: the cluster's metadata log.
pub trait SharedScsi: Send + Sync + std::fmt::Debug {
    /// Orders `change` of logical unit `lu` after every earlier one, cluster-wide, and
    /// resolves with its outcome once every controller that may accept I/O has installed it.
    ///
    /// # Errors
    /// The sense to answer with when the change could not be ordered (no quorum, fenced):
    /// typically NOT READY, which hosts retry.
    fn submit(&self, lu: u64, change: ScsiChange) -> ChangeFuture<'_>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pr::PrType;

    fn n(name: &str) -> ItNexus {
        ItNexus {
            initiator_name: name.into(),
            isid: 1,
            relative_port: 1,
        }
    }

    #[test]
    fn changes_apply_deterministically_and_survive_the_log_encoding() {
        let changes = vec![
            ScsiChange::PrOut {
                nexus: n("a"),
                op: PrOut::Register {
                    key: 0,
                    sa_key: 7,
                    ignore: false,
                    all_tg_pt: false,
                    aptpl: false,
                },
            },
            ScsiChange::PrOut {
                nexus: n("a"),
                op: PrOut::Reserve {
                    key: 7,
                    ty: PrType::WriteExclusive,
                },
            },
            ScsiChange::Reserve { nexus: n("b") },
            ScsiChange::PrOut {
                nexus: n("b"),
                op: PrOut::Reserve {
                    key: 9,
                    ty: PrType::WriteExclusive,
                },
            },
        ];
        let mut one = SharedLuState::default();
        let mut two = SharedLuState::default();
        let mut outcomes = Vec::new();
        for c in &changes {
            // Through the log's encoding, as another controller receives it.
            let json = serde_json::to_string(c).unwrap();
            let c2: ScsiChange = serde_json::from_str(&json).unwrap();
            outcomes.push(one.apply(c).0);
            assert_eq!(two.apply(&c2).0, *outcomes.last().unwrap());
        }
        assert_eq!(
            outcomes,
            vec![
                ChangeOutcome::Done,
                ChangeOutcome::Done,
                ChangeOutcome::Conflict,
                ChangeOutcome::Conflict
            ]
        );
        assert_eq!(one, two);
        let json = serde_json::to_string(&one).unwrap();
        assert_eq!(serde_json::from_str::<SharedLuState>(&json).unwrap(), one);
        assert!(one.pr.conflicts(&n("c"), crate::pr::Access::Write));
    }
}

//! The cluster's metadata log: membership, epochs, write-intent marks and repair records,
//! replicated by openraft and kept in a redb file per controller.
//!
//! Why openraft 0.9: maintained, Jepsen-style tested, and its storage and network are ours to
//! plug (redb here; the peer transport next); the 0.10 line's simulation runtime is not
//! released as stable. Nothing here implements consensus: this module is the deterministic
//! state machine ([`MetaState::apply`]) and the storage adaptor ([`store`]).
//!
//! Invariants:
//! - [`MetaState::apply`] is a pure function of the state and the command: every replica that
//!   applies the same log has the same state.
//! - Commands that carry an epoch ([`MetaCommand::Mark`], [`MetaCommand::Clear`],
//!   [`MetaCommand::Repair`]) are refused unless it is the current epoch, so a fenced primary
//!   cannot leave marks behind.
//! - Every membership change ([`MetaCommand::SetState`]) advances the epoch by one.

pub mod store;

#[cfg(test)]
mod cluster_tests;

use raid_engine::cluster::{ClusterView, ControllerState, IntentMark};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Cursor;

openraft::declare_raft_types!(
    /// The metadata log's type configuration.
    pub MetaTypes: D = MetaCommand, R = MetaResponse
);

/// A controller state as stored in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredState {
    /// Serving.
    Up,
    /// Catching up.
    Resyncing,
    /// Missing.
    Down,
}

impl From<StoredState> for ControllerState {
    fn from(s: StoredState) -> Self {
        match s {
            StoredState::Up => Self::Up,
            StoredState::Resyncing => Self::Resyncing,
            StoredState::Down => Self::Down,
        }
    }
}

/// Write-intent mark key: (volume, extent, row, position).
pub type MarkKey = (u32, u64, u32, u8);
/// Row key: (volume, extent, row).
pub type RowKey = (u32, u64, u32);

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// A controller's state changes; the epoch advances.
    SetState {
        /// Controller.
        id: u32,
        /// New state.
        state: StoredState,
    },
    /// A holder missed a row (see `raid_engine::cluster::ClusterEnv::mark_intent`).
    Mark {
        /// Which chunk.
        mark: MarkKey,
        /// Version it missed.
        missed: u64,
        /// Writer's epoch.
        epoch: u64,
    },
    /// A holder has the row again.
    Clear {
        /// Which chunk.
        mark: MarkKey,
        /// Cleared only if the mark's version is at most this.
        upto: u64,
        /// Writer's epoch.
        epoch: u64,
    },
    /// A primary serves a rolled-forward row state: the row is at least this new.
    Served {
        /// Which row.
        row: RowKey,
        /// Content version served.
        content: u64,
        /// Writer's epoch.
        epoch: u64,
    },
    /// A primary rolled a row back.
    Repair {
        /// Which row.
        row: RowKey,
        /// Chosen column versions.
        cols: Vec<u64>,
        /// Highest version abandoned.
        upto: u64,
        /// Writer's epoch.
        epoch: u64,
    },
}

/// What applying a command returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    /// Applied; the epoch after it.
    Ok {
        /// Epoch after the command.
        epoch: u64,
    },
    /// Refused: the command named another epoch.
    StaleEpoch {
        /// The log's epoch.
        ours: u64,
        /// The command's.
        theirs: u64,
    },
}

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    /// Epoch of membership.
    pub epoch: u64,
    /// Controllers and their states.
    pub controllers: BTreeMap<u32, StoredState>,
    /// Write-intent marks with the version each missed.
    #[serde(with = "pairs")]
    pub intents: BTreeMap<MarkKey, u64>,
    /// Last repair per row.
    #[serde(with = "pairs")]
    pub repairs: BTreeMap<RowKey, (Vec<u64>, u64)>,
    /// Served floor per row.
    #[serde(with = "pairs")]
    pub served: BTreeMap<RowKey, u64>,
}

/// Maps with composite keys as lists of pairs (JSON objects need string keys).
mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

impl MetaState {
    /// Applies one command.
    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaResponse {
        let stale = |ours: u64, theirs: u64| MetaResponse::StaleEpoch { ours, theirs };
        match cmd {
            MetaCommand::SetState { id, state } => {
                self.controllers.insert(*id, *state);
                self.epoch += 1;
            }
            MetaCommand::Mark {
                mark,
                missed,
                epoch,
            } => {
                if *epoch != self.epoch {
                    return stale(self.epoch, *epoch);
                }
                let e = self.intents.entry(*mark).or_insert(*missed);
                *e = (*e).max(*missed);
            }
            MetaCommand::Clear { mark, upto, epoch } => {
                if *epoch != self.epoch {
                    return stale(self.epoch, *epoch);
                }
                if self.intents.get(mark).is_some_and(|m| m <= upto) {
                    self.intents.remove(mark);
                }
            }
            MetaCommand::Served {
                row,
                content,
                epoch,
            } => {
                if *epoch != self.epoch {
                    return stale(self.epoch, *epoch);
                }
                let e = self.served.entry(*row).or_insert(*content);
                *e = (*e).max(*content);
            }
            MetaCommand::Repair {
                row,
                cols,
                upto,
                epoch,
            } => {
                if *epoch != self.epoch {
                    return stale(self.epoch, *epoch);
                }
                self.repairs.insert(*row, (cols.clone(), *upto));
            }
        }
        MetaResponse::Ok { epoch: self.epoch }
    }

    /// The membership view this state describes.
    pub fn view(&self) -> ClusterView {
        ClusterView {
            epoch: self.epoch,
            controllers: self
                .controllers
                .iter()
                .map(|(id, s)| (*id, (*s).into()))
                .collect(),
        }
    }

    /// Marks of a volume.
    pub fn marks(&self, volume: u32) -> Vec<IntentMark> {
        self.intents
            .keys()
            .filter(|k| k.0 == volume)
            .map(|&(volume, extent, row, pos)| IntentMark {
                volume,
                extent,
                row,
                pos,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_gate_marks_and_membership_advances_them() {
        let mut s = MetaState::default();
        assert_eq!(
            s.apply(&MetaCommand::SetState {
                id: 1,
                state: StoredState::Up
            }),
            MetaResponse::Ok { epoch: 1 }
        );
        let mark = (1, 2, 3, 0);
        assert_eq!(
            s.apply(&MetaCommand::Mark {
                mark,
                missed: 10,
                epoch: 0
            }),
            MetaResponse::StaleEpoch { ours: 1, theirs: 0 }
        );
        s.apply(&MetaCommand::Mark {
            mark,
            missed: 10,
            epoch: 1,
        });
        s.apply(&MetaCommand::Mark {
            mark,
            missed: 7,
            epoch: 1,
        });
        assert_eq!(s.intents[&mark], 10, "a mark keeps its highest version");
        s.apply(&MetaCommand::Clear {
            mark,
            upto: 9,
            epoch: 1,
        });
        assert!(s.intents.contains_key(&mark), "a newer miss is not cleared");
        s.apply(&MetaCommand::Clear {
            mark,
            upto: 10,
            epoch: 1,
        });
        assert!(s.intents.is_empty());
        assert_eq!(s.view().state(1), ControllerState::Up);
    }
}

//! The cluster's metadata log: membership, epochs, volumes (geometry and placement),
//! write-intent marks and repair records, replicated by openraft and kept in a redb file per
//! controller.
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
//! - A volume's record, once in the log, is never replaced: its geometry and codec are an
//!   on-disk format.

pub mod store;

#[cfg(test)]
mod cluster_tests;

use lun::shared::{ChangeOutcome, LuEvents, ScsiChange, SharedLuState};
use raid_engine::cluster::{ClusterView, ControllerState, IntentMark, VolumeMeta};
use raid_engine::codec::CodecKind;
use raid_engine::layout::{Geometry, Layout};
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
    /// Marked out (by an operator, or down longer than `out_after`), or drained: holds
    /// nothing any more; its positions move to the others (rebuild). It does not come back by
    /// answering again.
    Out,
    /// Being drained by an operator: still serving and holding its positions while they move
    /// to the others (its ports report transitioning, so hosts use other paths); out once
    /// none is left.
    Draining,
}

impl From<StoredState> for ControllerState {
    fn from(s: StoredState) -> Self {
        match s {
            StoredState::Up | StoredState::Draining => Self::Up,
            StoredState::Resyncing => Self::Resyncing,
            StoredState::Down | StoredState::Out => Self::Down,
        }
    }
}

/// Write-intent mark key: (volume, extent, row, position).
pub type MarkKey = (u32, u64, u32, u8);
/// Row key: (volume, extent, row).
pub type RowKey = (u32, u64, u32);
/// Position key: (volume, extent, position).
pub type PosKey = (u32, u64, u8);

/// One position of one extent given to a new holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveSpec {
    /// Which position.
    pub key: PosKey,
    /// Its holder before.
    pub from: u32,
    /// Its holder after.
    pub to: u32,
}

/// A move in progress: rows below `rows_done` have been copied to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    /// Holder before.
    pub from: u32,
    /// Holder now (receiving the rows).
    pub to: u32,
    /// Rows copied, from row 0.
    pub rows_done: u32,
    /// Why it moves.
    pub reason: MoveReason,
}

/// Why positions move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveReason {
    /// The holder was marked out: its chunks are rebuilt from the others.
    Rebuild,
    /// The holder is being drained: its positions move away while it still serves.
    Drain,
    /// Positions move from the controllers holding the most to those holding the fewest
    /// (after a controller was added, or a rebuild left the load uneven).
    Rebalance,
}

/// How many positions a drain or rebalance moves at once. A position being moved has one
/// valid copy fewer until its rows are copied, so planned (not forced) moves go a few at a
/// time; a rebuild moves everything at once (those positions are lost already).
pub const PLANNED_MOVES_AT_ONCE: usize = 8;

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
    /// A reservation change of a logical unit (PR OUT, RESERVE, RELEASE), applied by every
    /// controller to the same state.
    Scsi {
        /// The logical unit's key.
        lu: u64,
        /// The change.
        change: ScsiChange,
        /// Submitter's epoch.
        epoch: u64,
    },
    /// A volume joins the cluster. The first record for an id wins; a later one for the same
    /// id changes nothing (controllers compare their own definition with the winner's).
    CreateVolume(VolumeRecord),
    /// A volume created at run time leaves the cluster: its record, write-intent marks, repair
    /// records, served floors and reservation state go (the controllers then delete its
    /// shards).
    DeleteVolume {
        /// Volume id.
        id: u32,
    },
    /// An operator asked for a scrub: every controller scrubs the rows it leads once more.
    RequestScrub,
    /// A controller joins the cluster (an operator ran `appliance controller add`): it is
    /// recorded down with its peer address, comes up through the usual membership changes
    /// once it answers heartbeats, joins the metadata log's voters, and positions are then
    /// rebalanced onto it. The epoch advances.
    AddController {
        /// Its id (not used by any controller before).
        id: u32,
        /// Its peer address (`ip:port`).
        peer: String,
    },
    /// An operator drains a controller: its positions move to the others while it keeps
    /// serving, then it is out. Refused like [`MetaCommand::MarkOut`]. The epoch advances.
    Drain {
        /// Controller.
        id: u32,
    },
    /// A controller is marked out: it holds nothing from now on and its positions are
    /// rebuilt on the others. Refused when too few controllers would remain to hold every
    /// volume's `k + m` positions on distinct controllers. The epoch advances.
    MarkOut {
        /// Controller.
        id: u32,
    },
    /// Positions get new holders (all or none); the epoch advances. Each is refused unless
    /// `from` holds it now and `to` holds no other position of the extent.
    Move {
        /// The moves.
        moves: Vec<MoveSpec>,
        /// Why.
        reason: MoveReason,
        /// Planner's epoch: a plan made under an older one is refused.
        epoch: u64,
    },
    /// The primary copied rows `..rows_done` of a moved position to `to`; a move whose every
    /// row is copied is finished.
    MoveProgress {
        /// Which position.
        key: PosKey,
        /// The holder the rows went to (progress for an older move of the key is ignored).
        to: u32,
        /// Rows copied from row 0.
        rows_done: u32,
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

/// A volume as the log records it: what every controller must serve identically (its
/// geometry and codec are an on-disk format, its placement says who holds what).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Cluster-wide id.
    pub id: u32,
    /// Name in the config.
    pub name: String,
    /// Logical size in bytes.
    pub size_bytes: u64,
    /// Data columns per row.
    pub k: usize,
    /// Parity columns per row.
    pub m: usize,
    /// Bytes per chunk.
    pub chunk_bytes: u32,
    /// Rows per extent.
    pub rows_per_extent: u32,
    /// Erasure code (`raid_engine::codec::CodecKind::code`).
    pub codec: u8,
    /// Shards that must hold a write before it is acknowledged.
    pub write_quorum: usize,
    /// Placement set of each extent.
    pub placement: Vec<Vec<u32>>,
    /// LUN of a volume created at run time (config volumes take theirs from the config).
    #[serde(default)]
    pub lun: Option<u16>,
    /// Logical block size of a volume created at run time.
    #[serde(default)]
    pub block_size: Option<u32>,
    /// Random per creation of a run-time volume, so a volume deleted and created again under
    /// the same name never reuses an old shard store file.
    #[serde(default)]
    pub incarnation: u64,
    /// Move commands applied to the placement (rebuilds, drains, rebalances). Once nonzero the
    /// log's placement is no longer the one a config computes, and is not compared with it.
    #[serde(default)]
    pub placement_moves: u64,
}

impl VolumeRecord {
    /// The record of `meta`, named `name`.
    pub fn new(name: &str, meta: &VolumeMeta) -> Self {
        let g = meta.layout.geometry;
        Self {
            id: meta.id,
            name: name.to_string(),
            size_bytes: meta.layout.size_bytes,
            k: g.k,
            m: g.m,
            chunk_bytes: g.chunk_bytes,
            rows_per_extent: g.rows_per_extent,
            codec: g.codec.code(),
            write_quorum: g.write_quorum,
            placement: meta.placement.clone(),
            lun: None,
            block_size: None,
            incarnation: 0,
            placement_moves: 0,
        }
    }

    /// The engine's form.
    ///
    /// # Errors
    /// A description of what is invalid (an unknown codec, a bad geometry, a placement that
    /// does not cover the volume).
    pub fn meta(&self) -> Result<VolumeMeta, String> {
        let codec = CodecKind::from_code(self.codec)
            .ok_or_else(|| format!("volume {}: unknown codec {}", self.name, self.codec))?;
        let geometry = Geometry::new(
            self.k,
            self.m,
            self.chunk_bytes,
            self.rows_per_extent,
            codec,
            Some(self.write_quorum),
        )
        .map_err(|e| format!("volume {}: {e}", self.name))?;
        let layout = Layout {
            size_bytes: self.size_bytes,
            geometry,
        };
        if self.placement.len() as u64 != layout.extent_count()
            || self.placement.iter().any(|s| s.len() != geometry.width())
        {
            return Err(format!(
                "volume {}: placement does not match its {} extents of {} shards",
                self.name,
                layout.extent_count(),
                geometry.width()
            ));
        }
        Ok(VolumeMeta {
            id: self.id,
            layout,
            placement: self.placement.clone(),
        })
    }

    /// How `self` (this controller's definition) differs from `cluster` (the log's), one
    /// phrase per field, for an operator.
    pub fn differences(&self, cluster: &Self) -> Vec<String> {
        let mut d = Vec::new();
        let mut cmp = |what: &str, ours: String, theirs: String| {
            if ours != theirs {
                d.push(format!("{what} is {ours} here but {theirs} in the cluster"));
            }
        };
        cmp("name", self.name.clone(), cluster.name.clone());
        cmp(
            "size",
            self.size_bytes.to_string(),
            cluster.size_bytes.to_string(),
        );
        cmp("k", self.k.to_string(), cluster.k.to_string());
        cmp("m", self.m.to_string(), cluster.m.to_string());
        cmp(
            "chunk",
            self.chunk_bytes.to_string(),
            cluster.chunk_bytes.to_string(),
        );
        cmp(
            "rows per extent",
            self.rows_per_extent.to_string(),
            cluster.rows_per_extent.to_string(),
        );
        cmp("codec", self.codec.to_string(), cluster.codec.to_string());
        cmp(
            "write_quorum",
            self.write_quorum.to_string(),
            cluster.write_quorum.to_string(),
        );
        if self.placement != cluster.placement && cluster.placement_moves == 0 {
            let first = self
                .placement
                .iter()
                .zip(&cluster.placement)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            d.push(format!(
                "placement of extent {first} is {:?} here but {:?} in the cluster (are cluster.peers the same everywhere?)",
                self.placement.get(first),
                cluster.placement.get(first)
            ));
        }
        d
    }
}

/// What applying a command returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    /// Applied; the epoch after it.
    Ok {
        /// Epoch after the command.
        epoch: u64,
    },
    /// A reservation change was applied (or refused by the reservation rules): its outcome.
    Scsi(ChangeOutcome),
    /// Refused, with the reason for an operator.
    Refused(String),
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
    #[serde(with = "lun::serde_pairs")]
    pub intents: BTreeMap<MarkKey, u64>,
    /// Last repair per row.
    #[serde(with = "lun::serde_pairs")]
    pub repairs: BTreeMap<RowKey, (Vec<u64>, u64)>,
    /// Served floor per row.
    #[serde(with = "lun::serde_pairs")]
    pub served: BTreeMap<RowKey, u64>,
    /// Volumes by id.
    #[serde(default)]
    pub volumes: BTreeMap<u32, VolumeRecord>,
    /// Reservation state per logical unit key.
    #[serde(default)]
    pub scsi: BTreeMap<u64, SharedLuState>,
    /// Advances with every applied reservation change (controllers install on change).
    #[serde(default)]
    pub scsi_version: u64,
    /// Scrubs requested so far; a controller that has served fewer runs one more.
    #[serde(default)]
    pub scrub_requests: u64,
    /// Positions moved to a new holder that has not received every row yet.
    #[serde(default, with = "lun::serde_pairs")]
    pub moves: BTreeMap<PosKey, MoveRecord>,
    /// Peer addresses of controllers added at run time (the founding ones are in every
    /// controller's config).
    #[serde(default)]
    pub members: BTreeMap<u32, String>,
    /// Unit attentions from changes applied by this replica and not yet raised by its
    /// controller (not replicated: each replica produces its own as it applies).
    #[serde(skip)]
    pub scsi_events: Vec<(u64, LuEvents)>,
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
                if let Some(missed) = self.intents.get(mark).copied().filter(|m| m <= upto) {
                    self.intents.remove(mark);
                    // The mark said the row's state is at least `missed` (an acknowledged or
                    // served state): that stays known after the mark goes, so no later load
                    // rolls the row back below it.
                    if missed > 0 {
                        let row = (mark.0, mark.1, mark.2);
                        let e = self.served.entry(row).or_insert(missed);
                        *e = (*e).max(missed);
                    }
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
            MetaCommand::Scsi { lu, change, epoch } => {
                if *epoch != self.epoch {
                    return stale(self.epoch, *epoch);
                }
                let (outcome, events) = self.scsi.entry(*lu).or_default().apply(change);
                self.scsi_version += 1;
                if events != LuEvents::default() {
                    self.scsi_events.push((*lu, events));
                }
                return MetaResponse::Scsi(outcome);
            }
            MetaCommand::CreateVolume(v) => {
                self.volumes.entry(v.id).or_insert_with(|| v.clone());
            }
            MetaCommand::RequestScrub => {
                self.scrub_requests += 1;
            }
            MetaCommand::DeleteVolume { id } => {
                self.volumes.remove(id);
                self.intents.retain(|k, _| k.0 != *id);
                self.repairs.retain(|k, _| k.0 != *id);
                self.served.retain(|k, _| k.0 != *id);
                self.moves.retain(|k, _| k.0 != *id);
                // Logical-unit keys are 64-bit; a volume's id is the key's low 32 bits.
                self.scsi.retain(|k, _| *k as u32 != *id);
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
            MetaCommand::MarkOut { id } => {
                if let Err(why) = self.check_mark_out(*id) {
                    return MetaResponse::Refused(why);
                }
                self.controllers.insert(*id, StoredState::Out);
                self.epoch += 1;
            }
            MetaCommand::AddController { id, peer } => {
                if *id == 0 {
                    return MetaResponse::Refused(
                        "controller id 0 is the operator's; pick an id from 1".into(),
                    );
                }
                if self.controllers.contains_key(id) || self.members.contains_key(id) {
                    return MetaResponse::Refused(format!(
                        "controller {id} is already a member of the cluster (an id is never reused: pick a new one)"
                    ));
                }
                if peer.parse::<std::net::SocketAddr>().is_err() {
                    return MetaResponse::Refused(format!("peer address `{peer}` is not ip:port"));
                }
                self.controllers.insert(*id, StoredState::Down);
                self.members.insert(*id, peer.clone());
                self.epoch += 1;
            }
            MetaCommand::Drain { id } => {
                if let Err(why) = self.check_mark_out(*id) {
                    return MetaResponse::Refused(why.replace("marking", "draining"));
                }
                if self.controllers.get(id) == Some(&StoredState::Draining) {
                    return MetaResponse::Refused(format!("controller {id} is draining already"));
                }
                self.controllers.insert(*id, StoredState::Draining);
                self.epoch += 1;
            }
            MetaCommand::Move {
                moves,
                reason,
                epoch,
            } => {
                if *epoch != self.epoch {
                    return stale(self.epoch, *epoch);
                }
                if let Err(why) = self.check_moves(moves) {
                    return MetaResponse::Refused(why);
                }
                for m in moves {
                    let v = self.volumes.get_mut(&m.key.0).expect("checked");
                    v.placement[m.key.1 as usize][usize::from(m.key.2)] = m.to;
                    v.placement_moves += 1;
                    self.moves.insert(
                        m.key,
                        MoveRecord {
                            from: m.from,
                            to: m.to,
                            rows_done: 0,
                            reason: *reason,
                        },
                    );
                }
                self.epoch += 1;
            }
            MetaCommand::MoveProgress {
                key,
                to,
                rows_done,
                epoch,
            } => {
                if *epoch != self.epoch {
                    return stale(self.epoch, *epoch);
                }
                let rows = self.volumes.get(&key.0).map_or(0, |v| v.rows_per_extent);
                if let Some(m) = self.moves.get_mut(key).filter(|m| m.to == *to) {
                    m.rows_done = m.rows_done.max(*rows_done);
                    if m.rows_done >= rows {
                        self.moves.remove(key);
                    }
                }
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

    /// Controllers that may hold positions (not marked out, not draining).
    pub fn holders(&self) -> Vec<u32> {
        self.controllers
            .iter()
            .filter(|(_, s)| !matches!(s, StoredState::Out | StoredState::Draining))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Positions held per controller that may hold them (zero for one holding none).
    pub fn load(&self) -> BTreeMap<u32, usize> {
        let mut load: BTreeMap<u32, usize> = self.holders().iter().map(|&id| (id, 0)).collect();
        for v in self.volumes.values() {
            for &h in v.placement.iter().flatten() {
                *load.entry(h).or_default() += 1;
            }
        }
        load
    }

    /// Draining controllers that hold no position any more and whose moves are copied: each
    /// can now be out.
    pub fn drained(&self) -> Vec<u32> {
        self.controllers
            .iter()
            .filter(|(_, s)| **s == StoredState::Draining)
            .map(|(id, _)| *id)
            .filter(|id| {
                !self
                    .volumes
                    .values()
                    .any(|v| v.placement.iter().flatten().any(|h| h == id))
                    && !self.moves.values().any(|m| m.from == *id)
            })
            .collect()
    }

    /// Why `id` may not be marked out now, if it may not.
    pub fn check_mark_out(&self, id: u32) -> Result<(), String> {
        match self.controllers.get(&id) {
            None => return Err(format!("controller {id} is not a member of the cluster")),
            Some(StoredState::Out) => return Err(format!("controller {id} is already out")),
            Some(_) => {}
        }
        let left = self.holders().iter().filter(|h| **h != id).count();
        if let Some(v) = self.volumes.values().find(|v| v.k + v.m > left) {
            return Err(format!(
                "marking controller {id} out would leave {left} controllers, but volume {} keeps k + m = {} shards of every row on distinct controllers; add a controller first (appliance controller add), then mark this one out",
                v.name,
                v.k + v.m
            ));
        }
        Ok(())
    }

    fn check_moves(&self, moves: &[MoveSpec]) -> Result<(), String> {
        let mut after: BTreeMap<(u32, u64), Vec<u32>> = BTreeMap::new();
        for m in moves {
            let (vol, extent, pos) = m.key;
            let v = self
                .volumes
                .get(&vol)
                .ok_or_else(|| format!("move of volume {vol}: no such volume"))?;
            let set = after.entry((vol, extent)).or_insert_with(|| {
                v.placement
                    .get(extent as usize)
                    .cloned()
                    .unwrap_or_default()
            });
            match set.get(usize::from(pos)) {
                Some(&h) if h == m.from => {}
                Some(&h) => {
                    return Err(format!(
                        "move of volume {vol} extent {extent} position {pos}: held by {h}, not {}",
                        m.from
                    ))
                }
                None => {
                    return Err(format!(
                        "move of volume {vol} extent {extent} position {pos}: no such position"
                    ))
                }
            }
            if set.contains(&m.to) {
                return Err(format!(
                    "move of volume {vol} extent {extent}: controller {} already holds a position of it",
                    m.to
                ));
            }
            if self.controllers.get(&m.to) != Some(&StoredState::Up) {
                return Err(format!("move to controller {}: it is not up", m.to));
            }
            set[usize::from(pos)] = m.to;
        }
        Ok(())
    }

    /// The moves that rebuild every position held by a controller marked out: each goes to
    /// the up controller, not already in the extent's set, that holds the fewest positions
    /// (counting the moves planned before it), so rebuild writes spread over every survivor.
    ///
    /// # Errors
    /// A position no up controller can take (too few up controllers outside its extent's set).
    pub fn plan_rebuild(&self) -> Result<Vec<MoveSpec>, String> {
        self.plan_away(StoredState::Out, usize::MAX)
    }

    /// The next moves of a drain: like [`MetaState::plan_rebuild`] for positions of draining
    /// controllers, at most [`PLANNED_MOVES_AT_ONCE`] in flight.
    ///
    /// # Errors
    /// As [`MetaState::plan_rebuild`].
    pub fn plan_drain(&self) -> Result<Vec<MoveSpec>, String> {
        self.plan_away(
            StoredState::Draining,
            PLANNED_MOVES_AT_ONCE.saturating_sub(self.moves.len()),
        )
    }

    /// Moves that even out the positions held: from the controller holding the most to the
    /// one holding the fewest, while they differ by more than one, at most
    /// [`PLANNED_MOVES_AT_ONCE`] at a time. Nothing while any controller is not up (a
    /// rebuild, resync or drain comes first) or any move is still copying.
    pub fn plan_rebalance(&self) -> Vec<MoveSpec> {
        let settled = self
            .controllers
            .values()
            .all(|s| matches!(s, StoredState::Up | StoredState::Out));
        if !settled || !self.moves.is_empty() {
            return Vec::new();
        }
        let mut load = self.load();
        let mut sets: BTreeMap<(u32, u64), Vec<u32>> = BTreeMap::new();
        for v in self.volumes.values() {
            for (e, set) in v.placement.iter().enumerate() {
                if set.iter().any(|h| !load.contains_key(h)) {
                    return Vec::new(); // a position of an out controller: rebuild first
                }
                if !self.extent_marked(v.id, e as u64) {
                    sets.insert((v.id, e as u64), set.clone());
                }
            }
        }
        let mut plan = Vec::new();
        while plan.len() < PLANNED_MOVES_AT_ONCE {
            let Some((&hi, &most)) = load.iter().max_by_key(|(id, n)| (**n, u32::MAX - **id))
            else {
                break;
            };
            let Some((&lo, &fewest)) = load.iter().min_by_key(|(id, n)| (**n, **id)) else {
                break;
            };
            if most <= fewest + 1 {
                break;
            }
            let planned: Vec<(u32, u64)> =
                plan.iter().map(|m: &MoveSpec| (m.key.0, m.key.1)).collect();
            let Some((&(vol, extent), set)) = sets
                .iter_mut()
                .find(|(k, set)| set.contains(&hi) && !set.contains(&lo) && !planned.contains(k))
            else {
                break;
            };
            let pos = set.iter().position(|h| *h == hi).expect("holds it");
            set[pos] = lo;
            *load.get_mut(&hi).expect("loaded") -= 1;
            *load.get_mut(&lo).expect("loaded") += 1;
            plan.push(MoveSpec {
                key: (vol, extent, pos as u8),
                from: hi,
                to: lo,
            });
        }
        plan
    }

    /// Whether some row of an extent has a write-intent mark (a holder lagging): a planned
    /// move of another of its positions would leave such a row a second copy short, so drains
    /// and rebalances wait for resync there (a rebuild cannot wait).
    fn extent_marked(&self, volume: u32, extent: u64) -> bool {
        self.intents
            .range((volume, extent, 0, 0)..=(volume, extent, u32::MAX, u8::MAX))
            .next()
            .is_some()
    }

    /// Moves of the positions held by controllers in state `away` to up controllers, at most
    /// `limit` of them.
    fn plan_away(&self, away: StoredState, limit: usize) -> Result<Vec<MoveSpec>, String> {
        let out: Vec<u32> = self
            .controllers
            .iter()
            .filter(|(_, s)| **s == away)
            .map(|(id, _)| *id)
            .collect();
        let up: Vec<u32> = self
            .controllers
            .iter()
            .filter(|(_, s)| **s == StoredState::Up)
            .map(|(id, _)| *id)
            .collect();
        let mut load: BTreeMap<u32, usize> = up.iter().map(|&id| (id, 0)).collect();
        for v in self.volumes.values() {
            for &h in v.placement.iter().flatten() {
                if let Some(n) = load.get_mut(&h) {
                    *n += 1;
                }
            }
        }
        let mut plan = Vec::new();
        for v in self.volumes.values() {
            for (e, set) in v.placement.iter().enumerate() {
                let mut set = set.clone();
                for pos in 0..set.len() {
                    if !out.contains(&set[pos]) {
                        continue;
                    }
                    if plan.len() >= limit {
                        return Ok(plan);
                    }
                    if away == StoredState::Draining && self.extent_marked(v.id, e as u64) {
                        continue;
                    }
                    let to = load
                        .iter()
                        .filter(|(id, _)| !set.contains(id))
                        .min_by_key(|(id, n)| (**n, **id))
                        .map(|(id, _)| *id)
                        .ok_or_else(|| {
                            format!(
                                "volume {} extent {e}: no up controller outside its placement {set:?} can take position {pos} of controller {}; bring a controller back or add one",
                                v.name, set[pos]
                            )
                        })?;
                    *load.get_mut(&to).expect("up") += 1;
                    plan.push(MoveSpec {
                        key: (v.id, e as u64, pos as u8),
                        from: set[pos],
                        to,
                    });
                    set[pos] = to;
                }
            }
        }
        Ok(plan)
    }

    /// Positions of `(volume, extent, row)` whose move has not copied that row yet (bit mask).
    pub fn moving(&self, volume: u32, extent: u64, row: u32) -> u32 {
        self.moves
            .range((volume, extent, 0)..=(volume, extent, u8::MAX))
            .filter(|(_, m)| row >= m.rows_done)
            .fold(0, |acc, (k, _)| acc | 1 << k.2)
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
        assert_eq!(
            s.served[&(1, 2, 3)],
            10,
            "the floor a cleared mark set outlives it"
        );
        assert_eq!(s.view().state(1), ControllerState::Up);
    }

    fn record(k: usize, m: usize) -> VolumeRecord {
        let geometry = Geometry::new(k, m, 4096, 8, CodecKind::default(), None).unwrap();
        let layout = Layout {
            size_bytes: 3 * geometry.extent_bytes(),
            geometry,
        };
        VolumeRecord::new(
            "vol0",
            &VolumeMeta::rotated(9, layout, &[1, 2, 3, 4, 5]).unwrap(),
        )
    }

    /// Applies planned moves and finishes copying them, as the primaries would.
    fn finish_moves(s: &mut MetaState, moves: Vec<MoveSpec>, reason: MoveReason) {
        let r = s.apply(&MetaCommand::Move {
            moves: moves.clone(),
            reason,
            epoch: s.epoch,
        });
        assert!(matches!(r, MetaResponse::Ok { .. }), "{r:?}");
        for m in moves {
            let rows = s.volumes[&m.key.0].rows_per_extent;
            s.apply(&MetaCommand::MoveProgress {
                key: m.key,
                to: m.to,
                rows_done: rows,
                epoch: s.epoch,
            });
        }
        assert!(s.moves.is_empty());
    }

    #[test]
    fn an_added_controller_gets_an_even_share_and_a_drained_one_leaves_with_nothing() {
        let mut s = MetaState::default();
        for id in 1..=3 {
            s.apply(&MetaCommand::SetState {
                id,
                state: StoredState::Up,
            });
        }
        let geometry = Geometry::new(2, 1, 4096, 8, CodecKind::default(), None).unwrap();
        let layout = Layout {
            size_bytes: 40 * geometry.extent_bytes(),
            geometry,
        };
        let v = VolumeRecord::new("vol0", &VolumeMeta::rotated(9, layout, &[1, 2, 3]).unwrap());
        s.apply(&MetaCommand::CreateVolume(v));
        assert!(s.plan_rebalance().is_empty(), "three of three: even");
        // Bad additions are refused with the reason.
        for (id, peer) in [(0, "127.0.0.1:1"), (2, "127.0.0.1:1"), (4, "nowhere")] {
            let cmd = MetaCommand::AddController {
                id,
                peer: peer.into(),
            };
            assert!(matches!(s.apply(&cmd), MetaResponse::Refused(_)), "{id}");
        }
        let epoch = s.epoch;
        let add = MetaCommand::AddController {
            id: 4,
            peer: "127.0.0.1:4004".into(),
        };
        assert_eq!(s.apply(&add), MetaResponse::Ok { epoch: epoch + 1 });
        assert_eq!(s.members[&4], "127.0.0.1:4004");
        assert!(s.plan_rebalance().is_empty(), "not before it is up");
        s.apply(&MetaCommand::SetState {
            id: 4,
            state: StoredState::Up,
        });
        // An extent with a lagging holder (a write-intent mark) waits for resync.
        let mark = MetaCommand::Mark {
            mark: (9, 0, 3, 1),
            missed: 7,
            epoch: s.epoch,
        };
        s.apply(&mark);
        let plan = s.plan_rebalance();
        assert!(
            !plan.is_empty() && plan.iter().all(|m| m.key.1 != 0),
            "{plan:?}"
        );
        s.apply(&MetaCommand::Clear {
            mark: (9, 0, 3, 1),
            upto: 7,
            epoch: s.epoch,
        });
        // Rebalance a few at a time until even: 120 positions over 4 = 30 each.
        let mut rounds = 0;
        loop {
            let plan = s.plan_rebalance();
            if plan.is_empty() {
                break;
            }
            assert!(plan.len() <= PLANNED_MOVES_AT_ONCE);
            assert!(plan.iter().all(|m| m.to == 4), "{plan:?}");
            finish_moves(&mut s, plan, MoveReason::Rebalance);
            rounds += 1;
            assert!(rounds < 100);
        }
        assert_eq!(
            s.load().values().copied().collect::<Vec<_>>(),
            vec![30, 30, 30, 30]
        );
        for set in &s.volumes[&9].placement {
            let mut d = set.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 3, "distinct holders: {set:?}");
        }
        // Drain controller 1: it keeps serving (up for the engine) while its positions move.
        let epoch = s.epoch;
        assert_eq!(
            s.apply(&MetaCommand::Drain { id: 1 }),
            MetaResponse::Ok { epoch: epoch + 1 }
        );
        assert_eq!(s.view().state(1), ControllerState::Up);
        assert!(s.plan_rebalance().is_empty(), "no rebalance during a drain");
        assert!(
            matches!(
                s.apply(&MetaCommand::Drain { id: 2 }),
                MetaResponse::Refused(_)
            ),
            "a second drain would leave two controllers for three shards"
        );
        while s.drained().is_empty() {
            let plan = s.plan_drain().unwrap();
            assert!(!plan.is_empty() && plan.len() <= PLANNED_MOVES_AT_ONCE);
            assert!(plan.iter().all(|m| m.from == 1 && m.to != 1));
            finish_moves(&mut s, plan, MoveReason::Drain);
        }
        assert_eq!(s.drained(), vec![1]);
        s.apply(&MetaCommand::SetState {
            id: 1,
            state: StoredState::Out,
        });
        assert_eq!(
            s.load().values().copied().collect::<Vec<_>>(),
            vec![40, 40, 40]
        );
        assert!(s.plan_rebalance().is_empty());
    }

    #[test]
    fn marking_out_plans_a_declustered_rebuild_and_moves_finish_row_by_row() {
        let mut s = MetaState::default();
        for id in 1..=6 {
            s.apply(&MetaCommand::SetState {
                id,
                state: StoredState::Up,
            });
        }
        let geometry = Geometry::new(3, 2, 4096, 8, CodecKind::default(), None).unwrap();
        let layout = Layout {
            size_bytes: 60 * geometry.extent_bytes(),
            geometry,
        };
        let v = VolumeRecord::new(
            "vol0",
            &VolumeMeta::rotated(9, layout, &[1, 2, 3, 4, 5, 6]).unwrap(),
        );
        s.apply(&MetaCommand::CreateVolume(v));
        assert!(s.plan_rebuild().unwrap().is_empty(), "nothing is out");
        let epoch = s.epoch;
        assert_eq!(
            s.apply(&MetaCommand::MarkOut { id: 4 }),
            MetaResponse::Ok { epoch: epoch + 1 }
        );
        assert_eq!(s.view().state(4), ControllerState::Down);
        let held_by_4 = s.volumes[&9]
            .placement
            .iter()
            .flatten()
            .filter(|&&h| h == 4)
            .count();
        let plan = s.plan_rebuild().unwrap();
        assert_eq!(plan.len(), held_by_4);
        // Every survivor takes a share (declustered), within one of each other.
        let mut per: BTreeMap<u32, usize> = BTreeMap::new();
        for m in &plan {
            assert_eq!(m.from, 4);
            *per.entry(m.to).or_default() += 1;
        }
        assert_eq!(per.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 5, 6]);
        let (lo, hi) = (per.values().min().unwrap(), per.values().max().unwrap());
        assert!(hi - lo <= 1, "{per:?}");
        // A plan from an older epoch is refused; the current one applies all at once.
        let stale_cmd = MetaCommand::Move {
            moves: plan.clone(),
            reason: MoveReason::Rebuild,
            epoch,
        };
        assert!(matches!(
            s.apply(&stale_cmd),
            MetaResponse::StaleEpoch { .. }
        ));
        let r = s.apply(&MetaCommand::Move {
            moves: plan.clone(),
            reason: MoveReason::Rebuild,
            epoch: s.epoch,
        });
        assert_eq!(r, MetaResponse::Ok { epoch: epoch + 2 });
        let placement = &s.volumes[&9].placement;
        assert!(placement.iter().flatten().all(|&h| h != 4));
        assert!(placement.iter().all(|set| {
            let mut d = set.clone();
            d.sort_unstable();
            d.dedup();
            d.len() == 5
        }));
        assert!(s.plan_rebuild().unwrap().is_empty(), "planned once");
        // The same plan again no longer fits (4 holds nothing): refused, nothing changes.
        let again = s.apply(&MetaCommand::Move {
            moves: plan.clone(),
            reason: MoveReason::Rebuild,
            epoch: s.epoch,
        });
        assert!(matches!(again, MetaResponse::Refused(_)), "{again:?}");
        // Rows below the progress stop reporting the position as moving; the last batch ends
        // the move.
        let m = plan[0];
        let (vol, extent, pos) = m.key;
        assert_eq!(s.moving(vol, extent, 0), 1 << pos);
        s.apply(&MetaCommand::MoveProgress {
            key: m.key,
            to: m.to,
            rows_done: 5,
            epoch: s.epoch,
        });
        assert_eq!(s.moving(vol, extent, 4), 0);
        assert_eq!(s.moving(vol, extent, 5), 1 << pos);
        s.apply(&MetaCommand::MoveProgress {
            key: m.key,
            to: 99,
            rows_done: 8,
            epoch: s.epoch,
        });
        assert!(
            s.moves.contains_key(&m.key),
            "progress for another holder is ignored"
        );
        s.apply(&MetaCommand::MoveProgress {
            key: m.key,
            to: m.to,
            rows_done: 8,
            epoch: s.epoch,
        });
        assert!(!s.moves.contains_key(&m.key));
        assert_eq!(s.moves.len(), plan.len() - 1);
        // Five controllers are left for five-wide rows: a second mark-out is refused with
        // the fix, and the state is unchanged.
        let before = s.clone();
        match s.apply(&MetaCommand::MarkOut { id: 5 }) {
            MetaResponse::Refused(why) => {
                assert!(why.contains("add a controller first"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s, before);
        assert!(s.check_mark_out(4).unwrap_err().contains("already out"));
        assert!(s.check_mark_out(42).unwrap_err().contains("not a member"));
        // The record no longer matches the placement a config computes, and says so.
        let mut ours = s.volumes[&9].clone();
        ours.placement = VolumeMeta::rotated(9, layout, &[1, 2, 3, 4, 5, 6])
            .unwrap()
            .placement;
        ours.placement_moves = 0;
        assert!(ours.differences(&s.volumes[&9]).is_empty());
    }

    #[test]
    fn the_first_volume_record_wins_and_round_trips_to_the_engine_form() {
        let mut s = MetaState::default();
        let first = record(2, 1);
        s.apply(&MetaCommand::CreateVolume(first.clone()));
        let mut other = record(3, 2);
        other.name = "vol0-renamed".into();
        s.apply(&MetaCommand::CreateVolume(other.clone()));
        assert_eq!(s.volumes[&9], first, "an on-disk format is never replaced");
        // Deleting takes its record, marks and reservation state; others stay.
        let mut d = s.clone();
        d.intents.insert((9, 0, 1, 0), 3);
        d.intents.insert((8, 0, 1, 0), 3);
        d.scsi
            .insert(0xffff_0000_0000_0009, SharedLuState::default());
        d.scsi
            .insert(0xffff_0000_0000_0008, SharedLuState::default());
        d.apply(&MetaCommand::DeleteVolume { id: 9 });
        assert!(d.volumes.is_empty());
        assert_eq!(d.intents.keys().map(|k| k.0).collect::<Vec<_>>(), vec![8]);
        assert_eq!(d.scsi.len(), 1);
        let meta = first.meta().unwrap();
        assert_eq!(VolumeRecord::new("vol0", &meta), first);
        let d = other.differences(&first);
        assert!(
            d.iter().any(|x| x == "k is 3 here but 2 in the cluster"),
            "{d:?}"
        );
        assert!(
            d.iter().any(|x| x.starts_with("name is vol0-renamed")),
            "{d:?}"
        );
        assert!(first.differences(&first).is_empty());
        // A record that does not describe a usable volume is refused with the reason.
        let mut bad = first.clone();
        bad.placement.pop();
        assert!(bad.meta().unwrap_err().contains("placement"));
        bad = first.clone();
        bad.codec = 77;
        assert!(bad.meta().unwrap_err().contains("unknown codec"));
    }
}

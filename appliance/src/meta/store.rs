//! openraft storage on redb: the log, the vote and the applied state machine in one file per
//! controller.
//!
//! Invariants:
//! - An append is reported flushed only after its redb transaction committed (durable, with
//!   two-phase commit).
//! - The vote is durable before `save_vote` returns.
//! - The applied state (data, last applied log id, membership) is written in the same
//!   transaction as its change, so after a restart the state machine is exactly the state at
//!   its recorded last-applied id, and openraft re-applies only what follows.
//! - Entries and state are JSON inside redb (readable with any redb tool; small: marks and
//!   membership only).

// openraft's traits fix the error type (`StorageError`, a large enum); the helpers return it
// so `?` works inside the trait methods.
#![allow(clippy::result_large_err)]

use super::{MetaState, MetaTypes};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

type Nid = u64;
type SErr = StorageError<Nid>;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const APPLIED: &str = "applied";
const SNAPSHOT: &str = "snapshot";

fn w(e: impl std::error::Error + 'static) -> SErr {
    StorageIOError::write(&e).into()
}
fn r(e: impl std::error::Error + 'static) -> SErr {
    StorageIOError::read(&e).into()
}

/// The state machine as persisted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    /// Last applied log id.
    pub last: Option<LogId<Nid>>,
    /// Membership as of `last`.
    pub membership: StoredMembership<Nid, openraft::BasicNode>,
    /// The data.
    pub state: MetaState,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotBlob {
    meta: SnapshotMeta<Nid, openraft::BasicNode>,
    data: Vec<u8>,
}

/// Opens (or creates) the store at `path`: the log side and the state machine side.
///
/// # Errors
/// redb errors, with the path named.
pub fn open(path: &Path) -> Result<(LogStore, StateMachine), String> {
    let db = Database::create(path).map_err(|e| {
        format!(
            "metadata store {}: {e} (is another controller using this data dir?)",
            path.display()
        )
    })?;
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        txn.open_table(LOG).map_err(|e| e.to_string())?;
        txn.open_table(META).map_err(|e| e.to_string())?;
    }
    txn.commit().map_err(|e| e.to_string())?;
    let db = Arc::new(db);
    let applied: Applied = get_json(&db, APPLIED)
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let sm = StateMachine {
        db: db.clone(),
        applied: Arc::new(Mutex::new(applied)),
        snapshot_seq: Arc::new(Mutex::new(0)),
    };
    Ok((LogStore { db }, sm))
}

fn get_json<T: for<'de> Deserialize<'de>>(db: &Database, key: &str) -> Result<Option<T>, SErr> {
    let txn = db.begin_read().map_err(r)?;
    let t = txn.open_table(META).map_err(r)?;
    match t.get(key).map_err(r)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(r)?)),
        None => Ok(None),
    }
}

fn put_json<T: Serialize>(db: &Database, key: &str, v: &T) -> Result<(), SErr> {
    let bytes = serde_json::to_vec(v).map_err(w)?;
    let mut txn = db.begin_write().map_err(w)?;
    txn.set_two_phase_commit(true);
    {
        let mut t = txn.open_table(META).map_err(w)?;
        t.insert(key, bytes.as_slice()).map_err(w)?;
    }
    txn.commit().map_err(w)
}

/// The log side (also its own reader).
#[derive(Debug, Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl RaftLogReader<MetaTypes> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<MetaTypes>>, SErr> {
        let txn = self.db.begin_read().map_err(r)?;
        let t = txn.open_table(LOG).map_err(r)?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(r)? {
            let (_, v) = item.map_err(r)?;
            out.push(serde_json::from_slice(v.value()).map_err(r)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<MetaTypes> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<MetaTypes>, SErr> {
        let purged: Option<LogId<Nid>> = get_json(&self.db, PURGED)?;
        let txn = self.db.begin_read().map_err(r)?;
        let t = txn.open_table(LOG).map_err(r)?;
        let last = match t.last().map_err(r)? {
            Some((_, v)) => {
                let e: Entry<MetaTypes> = serde_json::from_slice(v.value()).map_err(r)?;
                Some(e.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<Nid>) -> Result<(), SErr> {
        put_json(&self.db, VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<Nid>>, SErr> {
        get_json(&self.db, VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<Nid>>) -> Result<(), SErr> {
        put_json(&self.db, COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<Nid>>, SErr> {
        Ok(get_json::<Option<LogId<Nid>>>(&self.db, COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<MetaTypes>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<MetaTypes>> + Send,
        I::IntoIter: Send,
    {
        let mut txn = self.db.begin_write().map_err(w)?;
        txn.set_two_phase_commit(true);
        {
            let mut t = txn.open_table(LOG).map_err(w)?;
            for e in entries {
                let bytes = serde_json::to_vec(&e).map_err(w)?;
                t.insert(e.log_id.index, bytes.as_slice()).map_err(w)?;
            }
        }
        txn.commit().map_err(w)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<Nid>) -> Result<(), SErr> {
        self.remove_range(log_id.index..)
    }

    async fn purge(&mut self, log_id: LogId<Nid>) -> Result<(), SErr> {
        put_json(&self.db, PURGED, &Some(log_id))?;
        self.remove_range(..=log_id.index)
    }
}

impl LogStore {
    fn remove_range(&self, range: impl RangeBounds<u64> + Clone) -> Result<(), SErr> {
        let mut txn = self.db.begin_write().map_err(w)?;
        txn.set_two_phase_commit(true);
        {
            let mut t = txn.open_table(LOG).map_err(w)?;
            let keys: Vec<u64> = t
                .range(range)
                .map_err(w)?
                .map(|i| i.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(w)?;
            for k in keys {
                t.remove(k).map_err(w)?;
            }
        }
        txn.commit().map_err(w)
    }
}

/// The state machine side.
#[derive(Debug, Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    applied: Arc<Mutex<Applied>>,
    snapshot_seq: Arc<Mutex<u64>>,
}

impl StateMachine {
    /// A copy of the current state (for the engine's view and marks).
    pub fn state(&self) -> Applied {
        self.applied.lock().expect("state machine").clone()
    }
    /// A handle sharing the live state (readers keep it after the store moves into openraft).
    pub fn shared(&self) -> Arc<Mutex<Applied>> {
        self.applied.clone()
    }
}

impl RaftSnapshotBuilder<MetaTypes> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MetaTypes>, SErr> {
        let a = self.state();
        let data = serde_json::to_vec(&a).map_err(r)?;
        let seq = {
            let mut s = self.snapshot_seq.lock().expect("seq");
            *s += 1;
            *s
        };
        let meta = SnapshotMeta {
            last_log_id: a.last,
            last_membership: a.membership.clone(),
            snapshot_id: format!("{}-{seq}", a.last.map_or(0, |l| l.index)),
        };
        put_json(
            &self.db,
            SNAPSHOT,
            &SnapshotBlob {
                meta: meta.clone(),
                data: data.clone(),
            },
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<MetaTypes> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<Nid>>,
            StoredMembership<Nid, openraft::BasicNode>,
        ),
        SErr,
    > {
        let a = self.applied.lock().expect("state machine");
        Ok((a.last, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<super::MetaResponse>, SErr>
    where
        I: IntoIterator<Item = Entry<MetaTypes>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let snapshot = {
            let mut a = self.applied.lock().expect("state machine");
            for e in entries {
                a.last = Some(e.log_id);
                let resp = match &e.payload {
                    EntryPayload::Blank => super::MetaResponse::Ok {
                        epoch: a.state.epoch,
                    },
                    EntryPayload::Normal(cmd) => a.state.apply(cmd),
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(e.log_id), m.clone());
                        super::MetaResponse::Ok {
                            epoch: a.state.epoch,
                        }
                    }
                };
                out.push(resp);
            }
            a.clone()
        };
        put_json(&self.db, APPLIED, &snapshot)?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<Nid, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let a: Applied = serde_json::from_slice(&data).map_err(r)?;
        put_json(
            &self.db,
            SNAPSHOT,
            &SnapshotBlob {
                meta: meta.clone(),
                data,
            },
        )?;
        put_json(&self.db, APPLIED, &a)?;
        *self.applied.lock().expect("state machine") = a;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<MetaTypes>>, SErr> {
        Ok(
            get_json::<SnapshotBlob>(&self.db, SNAPSHOT)?.map(|b| Snapshot {
                meta: b.meta,
                snapshot: Box::new(Cursor::new(b.data)),
            }),
        )
    }
}

impl LogStore {
    /// The store's database, without keeping it open: it is closed once every reader and
    /// writer openraft holds is gone.
    pub fn database(&self) -> std::sync::Weak<Database> {
        Arc::downgrade(&self.db)
    }
}

//! The events log: an append-only record of state changes (controllers up and down, volume
//! health, volumes created), with timestamps, for the console and `GET /api/v1/events`.
//!
//! It exists so an operator can tell what happened while nobody watched. Each controller
//! keeps its own (what it saw and did), in memory for the API and appended as JSON lines to
//! `events.jsonl` in its data directory, so the history survives restarts.
//!
//! Invariants:
//! - Ids grow by one per event and are never reused, also across restarts (the next id
//!   follows the file's last line).
//! - A failed append to the file is logged and does not lose the in-memory event or block the
//!   caller (the log is for people, not for recovery).
//! - Memory is bounded: the newest [`KEEP`] events stay in memory.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Weak};

/// Events kept in memory.
pub const KEEP: usize = 1000;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number on this controller.
    pub id: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Dotted kind, e.g. `controller.down`, `volume.degraded`.
    pub kind: String,
    /// What happened, for people.
    pub message: String,
}

/// The log.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    inner: Mutex<(u64, VecDeque<Event>)>,
}

impl EventLog {
    /// Opens (or starts) the log at `path`, loading its newest events.
    pub fn open(path: &Path) -> Self {
        let mut recent = VecDeque::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines() {
                if let Ok(e) = serde_json::from_str::<Event>(line) {
                    recent.push_back(e);
                    if recent.len() > KEEP {
                        recent.pop_front();
                    }
                }
            }
        }
        let next = recent.back().map_or(1, |e| e.id + 1);
        Self {
            path: path.to_owned(),
            inner: Mutex::new((next, recent)),
        }
    }

    /// Records an event.
    pub fn push(&self, kind: &str, message: impl Into<String>) {
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut g = self.inner.lock().expect("events");
        let e = Event {
            id: g.0,
            at_unix_ms,
            kind: kind.to_string(),
            message: message.into(),
        };
        g.0 += 1;
        tracing::info!(kind, "{}", e.message);
        if let Ok(line) = serde_json::to_string(&e) {
            let r = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(err) = r {
                tracing::warn!(path = %self.path.display(), cause = %err, "cannot append to the events log");
            }
        }
        g.1.push_back(e);
        if g.1.len() > KEEP {
            g.1.pop_front();
        }
    }

    /// Events with an id above `after`, oldest first, at most `limit`.
    pub fn since(&self, after: u64, limit: usize) -> Vec<Event> {
        let g = self.inner.lock().expect("events");
        let newer: Vec<Event> = g.1.iter().filter(|e| e.id > after).cloned().collect();
        let skip = newer.len().saturating_sub(limit);
        newer.into_iter().skip(skip).collect()
    }
}

/// Turns what this controller sees of the cluster into events: controllers changing state,
/// volumes changing health. Polls its own replica's status once a second until the
/// controller is gone.
pub async fn watch_cluster(shared: Weak<crate::server::Shared>) {
    let mut controllers: BTreeMap<u32, String> = BTreeMap::new();
    let mut health: BTreeMap<u32, String> = BTreeMap::new();
    let mut first = true;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let Some(s) = shared.upgrade() else { break };
        let Some(node) = s.node() else { continue };
        let st = node.status();
        for (id, state) in &st.controllers {
            let old = controllers.insert(*id, state.clone());
            if !first && old.as_deref() != Some(state.as_str()) {
                s.events.push(
                    &format!("controller.{state}"),
                    format!(
                        "controller {id} is {state} (was {})",
                        old.as_deref().unwrap_or("unknown")
                    ),
                );
            }
        }
        let names: BTreeMap<u32, String> = node
            .volume_records()
            .into_values()
            .map(|r| (r.id, r.name))
            .collect();
        for v in &st.volumes {
            let old = health.insert(v.id, v.health.clone());
            // A volume seen for the first time has its own `volume.created` event.
            if !first && old.is_some() && old.as_deref() != Some(v.health.as_str()) {
                let name = names
                    .get(&v.id)
                    .cloned()
                    .unwrap_or_else(|| v.id.to_string());
                s.events.push(
                    &format!("volume.{}", v.health),
                    format!(
                        "volume {name} is {} (was {}){}",
                        v.health,
                        old.as_deref().unwrap_or("unknown"),
                        if v.rows_behind > 0 {
                            format!(", {} rows behind", v.rows_behind)
                        } else {
                            String::new()
                        }
                    ),
                );
            }
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_continue_across_reopen_and_memory_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let log = EventLog::open(&p);
        log.push("a.b", "first");
        log.push("a.c", "second");
        assert_eq!(log.since(0, 10).len(), 2);
        assert_eq!(log.since(1, 10)[0].message, "second");
        let again = EventLog::open(&p);
        again.push("a.d", "third");
        let all = again.since(0, 10);
        assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2, 3]);
        for i in 0..(KEEP + 5) {
            again.push("x", format!("{i}"));
        }
        assert_eq!(again.since(0, usize::MAX).len(), KEEP);
        assert_eq!(again.since(0, 3).len(), 3, "limit keeps the newest");
        assert_eq!(
            again.since(0, 1)[0].message,
            format!("{}", KEEP + 4),
            "the newest"
        );
    }
}

//! The task set of a logical unit (SAM-5 §8.6): the order in which admitted commands may
//! start, by task attribute.
//!
//! Commands are admitted synchronously in the order the fabric delivers them (CmdSN order),
//! each getting a sequence number; a command starts when its attribute allows:
//! - HEAD OF QUEUE starts at once;
//! - SIMPLE (and untagged) starts when no older ORDERED task is still in the set;
//! - ORDERED starts when no older task of any kind is still in the set.
//!
//! Invariants:
//! - At most [`TASK_SET_MAX`] tasks are in the set; admission beyond that is refused (the
//!   command ends in TASK SET FULL) instead of growing memory.
//! - A ticket leaves the set when dropped, whether its command finished or was abandoned
//!   (closed connection), so an ORDERED task never waits for a task that will not finish.

use crate::command::{ItNexus, TaskAttr};
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Tasks one logical unit holds at once: 64 hosts at queue depth 64 (ESXi and Linux default to
/// 32-128 per device) fit. A waiting task holds its command only; a write's data buffer is
/// counted against its connection's budget, so this bounds bookkeeping, not data.
pub const TASK_SET_MAX: usize = 4096;

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    active: BTreeMap<u64, (TaskAttr, ItNexus)>,
}

/// One logical unit's task set.
#[derive(Debug, Default)]
pub struct TaskSet {
    state: Mutex<State>,
    changed: Notify,
}

/// A place in the task set; leaves it on drop.
#[derive(Debug)]
pub struct Ticket {
    set: Arc<TaskSet>,
    seq: u64,
}

impl TaskSet {
    /// Admits a task, or `None` when the set is full.
    pub fn admit(self: &Arc<Self>, attr: TaskAttr, nexus: &ItNexus) -> Option<Ticket> {
        let mut s = self.state.lock().expect("task set lock");
        if s.active.len() >= TASK_SET_MAX {
            return None;
        }
        let seq = s.next_seq;
        s.next_seq += 1;
        s.active.insert(seq, (attr, nexus.clone()));
        Some(Ticket {
            set: Arc::clone(self),
            seq,
        })
    }

    fn may_start(s: &State, seq: u64) -> bool {
        let attr = s.active[&seq].0;
        let mut older = s.active.range(..seq).map(|(_, (a, _))| *a);
        match attr {
            TaskAttr::HeadOfQueue => true,
            TaskAttr::Ordered => older.next().is_none(),
            TaskAttr::Simple | TaskAttr::Untagged | TaskAttr::Aca => {
                older.all(|a| a != TaskAttr::Ordered)
            }
        }
    }

    /// The nexuses with tasks in the set.
    pub fn nexuses(&self) -> BTreeSet<ItNexus> {
        self.state
            .lock()
            .expect("task set lock")
            .active
            .values()
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Tasks in the set.
    pub fn len(&self) -> usize {
        self.state.lock().expect("task set lock").active.len()
    }

    /// True when no task is in the set.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// Whether the task may start now.
    pub fn may_start(&self) -> bool {
        TaskSet::may_start(&self.set.state.lock().expect("task set lock"), self.seq)
    }

    /// Waits until the task may start.
    pub async fn wait_turn(&self) {
        loop {
            let mut notified = std::pin::pin!(self.set.changed.notified());
            notified.as_mut().enable();
            if self.may_start() {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.set
            .state
            .lock()
            .expect("task set lock")
            .active
            .remove(&self.seq);
        self.set.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nx() -> ItNexus {
        ItNexus {
            initiator_name: "iqn.t:a".into(),
            isid: 1,
            relative_port: 1,
        }
    }

    #[test]
    fn ordering_by_attribute() {
        let set = Arc::new(TaskSet::default());
        let s1 = set.admit(TaskAttr::Simple, &nx()).unwrap();
        let s2 = set.admit(TaskAttr::Simple, &nx()).unwrap();
        let o3 = set.admit(TaskAttr::Ordered, &nx()).unwrap();
        let s4 = set.admit(TaskAttr::Simple, &nx()).unwrap();
        let h5 = set.admit(TaskAttr::HeadOfQueue, &nx()).unwrap();
        assert!(s1.may_start() && s2.may_start());
        assert!(!o3.may_start(), "ORDERED waits for older tasks");
        assert!(!s4.may_start(), "SIMPLE waits for an older ORDERED");
        assert!(h5.may_start(), "HEAD OF QUEUE never waits");
        drop(s1);
        assert!(!o3.may_start());
        drop(s2);
        assert!(o3.may_start());
        assert!(!s4.may_start());
        drop(o3);
        assert!(s4.may_start());
        drop((s4, h5));
        assert!(set.is_empty());
    }

    #[test]
    fn full_set_refuses() {
        let set = Arc::new(TaskSet::default());
        let tickets: Vec<Ticket> = (0..TASK_SET_MAX)
            .map(|_| set.admit(TaskAttr::Simple, &nx()).unwrap())
            .collect();
        assert!(set.admit(TaskAttr::Simple, &nx()).is_none());
        drop(tickets);
        assert!(set.admit(TaskAttr::Simple, &nx()).is_some());
    }

    #[tokio::test]
    async fn waiters_wake_when_older_tasks_leave() {
        let set = Arc::new(TaskSet::default());
        let s1 = set.admit(TaskAttr::Simple, &nx()).unwrap();
        let o2 = set.admit(TaskAttr::Ordered, &nx()).unwrap();
        let mut wait = std::pin::pin!(o2.wait_turn());
        assert!(futures_poll(wait.as_mut()).is_pending());
        drop(s1);
        wait.await;
    }

    fn futures_poll<F: std::future::Future>(
        f: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        f.poll(&mut cx)
    }
}

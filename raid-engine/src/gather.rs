//! Write gathering at a row's primary: host writes that queue for the same row while one is
//! being committed are committed together, as one write of the bytes they cover.
//!
//! Why: a write that fills one column of a row needs the parity changed, so it costs either
//! the column's old bytes or the other columns; two writes that fill the whole row between
//! them (a sequential stream of chunk-sized writes at any queue depth above one) cost
//! neither when committed as one: the row is encoded from their bytes. Gathering is only
//! opportunistic: a write never waits for one that has not arrived, beyond yielding once
//! (see the engine) so writes already received can join.
//!
//! Invariants:
//! - A row has at most one leader per epoch: the write that found no queue, or the queued
//!   write a leader handed the turn to. Only the leader commits, under the row lock.
//! - Writes are applied in arrival order: the leader's first (it is the oldest write not yet
//!   committed), then the queued ones in the order they joined; a merged group is written
//!   before any later write that overlaps it.
//! - A leader that stops (done, failed, or cancelled) hands the turn to the oldest queued
//!   write still waiting, or removes the queue: no write waits on a leader that is gone.
//! - A queued write taken into a batch is answered with its group's outcome; one whose
//!   leader was cancelled mid-batch learns that its outcome is unknown (an error).

use futures::channel::oneshot;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// A row's queue: the row's index in the volume and the epoch of the writes.
pub(crate) type Key = (u64, u64);

/// What a queued write is told.
#[derive(Debug)]
enum Turn<T> {
    /// Committed with a leader's batch, with this outcome.
    Done(T),
    /// The leader is gone and this write is the oldest waiting: it leads now.
    Lead,
}

/// A write waiting in a row's queue: where in the row, its bytes, and how to answer it.
#[derive(Debug)]
pub(crate) struct Queued<T> {
    /// Offset in the row's data.
    pub at: usize,
    /// The bytes (a copy: the writer keeps its own until answered).
    pub bytes: Vec<u8>,
    tx: oneshot::Sender<Turn<T>>,
}

impl<T> Queued<T> {
    /// Answers the write (ignored when its writer is gone: the bytes were committed anyway,
    /// as a cancelled write's may be).
    pub fn answer(self, outcome: T) {
        let _ = self.tx.send(Turn::Done(outcome));
    }
}

/// Every row's queue of one volume.
#[derive(Debug)]
pub(crate) struct Gather<T> {
    queues: Mutex<HashMap<Key, VecDeque<Queued<T>>>>,
    /// Writes of the volume between [`Gather::enter`] and their end.
    active: AtomicUsize,
}

impl<T> Default for Gather<T> {
    fn default() -> Self {
        Self {
            queues: Mutex::default(),
            active: AtomicUsize::new(0),
        }
    }
}

/// A write of the volume in progress (see [`Gather::enter`]).
pub(crate) struct Active<'g>(&'g AtomicUsize);

impl Active<'_> {
    /// Whether other writes of the volume are in progress: without them there is nothing
    /// to wait for.
    pub fn others(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 1
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a write joined its row.
pub(crate) enum Joined<'g, T> {
    /// No write leads the row: this one does.
    Lead(Lead<'g, T>),
    /// Another write leads it: wait for the outcome or the turn.
    Wait(Waiter<'g, T>),
}

/// What a waiting write ends with.
pub(crate) enum Outcome<'g, T> {
    /// Committed with a leader's batch.
    Done(T),
    /// It leads the row now.
    Lead(Lead<'g, T>),
}

impl<T> Gather<T> {
    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<Key, VecDeque<Queued<T>>>> {
        // A panic while holding the lock leaves the map consistent (every change is one
        // call), so a poisoned lock is still usable.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a write of the volume as in progress until the guard is dropped.
    pub fn enter(&self) -> Active<'_> {
        self.active.fetch_add(1, Ordering::SeqCst);
        Active(&self.active)
    }

    /// A write of `bytes` at offset `at` of row `key`: it leads, or waits behind the leader
    /// (keeping a copy of its bytes in the queue).
    pub fn join(&self, key: Key, at: usize, bytes: &[u8]) -> Joined<'_, T> {
        match self.queues().entry(key) {
            Entry::Occupied(mut q) => {
                let (tx, rx) = oneshot::channel();
                q.get_mut().push_back(Queued {
                    at,
                    bytes: bytes.to_vec(),
                    tx,
                });
                Joined::Wait(Waiter {
                    gather: self,
                    key,
                    rx,
                })
            }
            Entry::Vacant(v) => {
                v.insert(VecDeque::new());
                Joined::Lead(Lead { gather: self, key })
            }
        }
    }

    /// Gives the turn to the oldest write still waiting, or ends the row's queue.
    fn hand_off(&self, key: Key) {
        let mut queues = self.queues();
        let Some(q) = queues.get_mut(&key) else {
            return;
        };
        while let Some(next) = q.pop_front() {
            if next.tx.send(Turn::Lead).is_ok() {
                return;
            }
        }
        queues.remove(&key);
    }
}

/// The right to commit a row's writes; dropping it hands the turn on.
pub(crate) struct Lead<'g, T> {
    gather: &'g Gather<T>,
    key: Key,
}

impl<T> Lead<'_, T> {
    /// Takes every write queued for the row so far, oldest first.
    pub fn take(&self) -> Vec<Queued<T>> {
        self.gather
            .queues()
            .get_mut(&self.key)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }
}

impl<T> Drop for Lead<'_, T> {
    fn drop(&mut self) {
        self.gather.hand_off(self.key);
    }
}

/// A write waiting behind a row's leader.
pub(crate) struct Waiter<'g, T> {
    gather: &'g Gather<T>,
    key: Key,
    rx: oneshot::Receiver<Turn<T>>,
}

impl<'g, T> Waiter<'g, T> {
    /// Waits for the write's outcome or the turn to lead. `None` when the leader that took
    /// the write into its batch was cancelled: whether it was committed is unknown.
    pub async fn wait(mut self) -> Option<Outcome<'g, T>> {
        match (&mut self.rx).await {
            Ok(Turn::Done(t)) => Some(Outcome::Done(t)),
            Ok(Turn::Lead) => Some(Outcome::Lead(Lead {
                gather: self.gather,
                key: self.key,
            })),
            Err(oneshot::Canceled) => None,
        }
    }
}

impl<T> Drop for Waiter<'_, T> {
    fn drop(&mut self) {
        // Given the turn but cancelled before taking it: pass it on.
        if let Ok(Some(Turn::Lead)) = self.rx.try_recv() {
            self.gather.hand_off(self.key);
        }
    }
}

/// Merges writes, in arrival order, into runs that keep that order: each write
/// joins the run before it when their ranges overlap or touch (its bytes over the run's),
/// else starts a new run. Writing the runs in order leaves the same bytes as writing the
/// writes in order. Each run carries the tags of the writes in it.
pub(crate) fn merge<W>(writes: impl IntoIterator<Item = (usize, Vec<u8>, W)>) -> Vec<Run<W>> {
    let mut runs: Vec<Run<W>> = Vec::new();
    for (at, bytes, tag) in writes {
        let end = at + bytes.len();
        match runs.last_mut() {
            Some(run) if at <= run.end() && run.at <= end => {
                if at == run.end() {
                    run.bytes.extend_from_slice(&bytes);
                } else if at >= run.at && end <= run.end() {
                    run.bytes[at - run.at..end - run.at].copy_from_slice(&bytes);
                } else {
                    let from = run.at.min(at);
                    let mut all = vec![0; run.end().max(end) - from];
                    all[run.at - from..run.end() - from].copy_from_slice(&run.bytes);
                    all[at - from..end - from].copy_from_slice(&bytes);
                    run.at = from;
                    run.bytes = all;
                }
                run.tags.push(tag);
            }
            _ => runs.push(Run {
                at,
                bytes,
                tags: vec![tag],
            }),
        }
    }
    runs
}

/// Consecutive bytes of a row made of one or more writes.
#[derive(Debug)]
pub(crate) struct Run<W> {
    /// Offset in the row.
    pub at: usize,
    /// The bytes, later writes over earlier ones.
    pub bytes: Vec<u8>,
    /// The writes in it.
    pub tags: Vec<W>,
}

impl<W> Run<W> {
    fn end(&self) -> usize {
        self.at + self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> Key {
        (7, 1)
    }

    #[test]
    fn runs_leave_the_bytes_of_the_writes_in_order() {
        proptest!(|(writes in proptest::collection::vec((0usize..64, 1usize..24, any::<u8>()), 1..12))| {
            let writes: Vec<(usize, Vec<u8>, usize)> = writes
                .into_iter()
                .enumerate()
                .map(|(i, (at, len, fill))| (at, vec![fill; len], i))
                .collect();
            let mut want = vec![0u8; 96];
            for (at, b, _) in &writes {
                want[*at..at + b.len()].copy_from_slice(b);
            }
            let runs = merge(writes.clone());
            let mut got = vec![0u8; 96];
            for r in &runs {
                got[r.at..r.end()].copy_from_slice(&r.bytes);
            }
            prop_assert_eq!(got, want);
            // Every write is in exactly one run, in arrival order, and a run only holds
            // writes that overlap or touch what came before it in the run.
            let tags: Vec<usize> = runs.iter().flat_map(|r| r.tags.clone()).collect();
            prop_assert_eq!(tags, (0..writes.len()).collect::<Vec<_>>());
            for pair in runs.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                let first = &writes[b.tags[0]];
                prop_assert!(first.0 > a.end() || first.0 + first.1.len() < a.at);
            }
        });
    }

    #[test]
    fn adjacent_writes_make_one_run() {
        let runs = merge([
            (0, vec![1; 4], 'a'),
            (4, vec![2; 4], 'b'),
            (12, vec![3; 2], 'c'),
        ]);
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].at, runs[0].bytes.as_slice()),
            (0, &[1, 1, 1, 1, 2, 2, 2, 2][..])
        );
        assert_eq!(runs[0].tags, ['a', 'b']);
        assert_eq!((runs[1].at, runs[1].tags.as_slice()), (12, &['c'][..]));
    }

    #[test]
    fn the_first_write_leads_and_the_turn_passes_to_the_oldest_waiting() {
        let g: Gather<u32> = Gather::default();
        let Joined::Lead(lead) = g.join(key(), 0, &[1]) else {
            panic!("the first write leads");
        };
        let Joined::Wait(second) = g.join(key(), 1, &[2]) else {
            panic!("the second waits");
        };
        let Joined::Wait(third) = g.join(key(), 2, &[3]) else {
            panic!("the third waits");
        };
        // Another row, or the same row in another epoch, has its own leader.
        assert!(matches!(g.join((8, 1), 0, &[1]), Joined::Lead(_)));
        assert!(matches!(g.join((7, 2), 0, &[1]), Joined::Lead(_)));
        // The second gives up before its turn; the third gets it.
        drop(second);
        drop(lead);
        let Some(Outcome::Lead(lead)) = futures::executor::block_on(third.wait()) else {
            panic!("the third leads");
        };
        // Nothing waits now: the leader's batch is empty, and once it is done the row has
        // no queue, so the next write leads.
        assert!(lead.take().is_empty());
        drop(lead);
        assert!(matches!(g.join(key(), 0, &[1]), Joined::Lead(_)));
    }

    #[test]
    fn a_batched_write_gets_its_outcome_or_learns_it_is_unknown() {
        let g: Gather<Result<(), String>> = Gather::default();
        let Joined::Lead(lead) = g.join(key(), 0, &[1]) else {
            panic!("the first write leads");
        };
        let Joined::Wait(a) = g.join(key(), 1, &[2, 3]) else {
            panic!("waits");
        };
        let Joined::Wait(b) = g.join(key(), 3, &[4]) else {
            panic!("waits");
        };
        let mut batch = lead.take();
        assert_eq!(
            batch
                .iter()
                .map(|q| (q.at, q.bytes.clone()))
                .collect::<Vec<_>>(),
            [(1, vec![2, 3]), (3, vec![4])]
        );
        let lost = batch.pop().expect("two queued");
        batch.pop().expect("two queued").answer(Ok(()));
        assert!(matches!(
            futures::executor::block_on(a.wait()),
            Some(Outcome::Done(Ok(())))
        ));
        // The leader is cancelled before answering the other: it does not hang.
        drop(lost);
        drop(lead);
        assert!(futures::executor::block_on(b.wait()).is_none());
        assert!(matches!(g.join(key(), 0, &[1]), Joined::Lead(_)));
    }

    #[test]
    fn a_write_knows_whether_others_are_in_progress() {
        let g: Gather<()> = Gather::default();
        let a = g.enter();
        assert!(!a.others());
        let b = g.enter();
        assert!(a.others() && b.others());
        drop(a);
        assert!(!b.others());
    }

    #[test]
    fn a_turn_given_to_a_write_that_is_gone_passes_on() {
        let g: Gather<()> = Gather::default();
        let Joined::Lead(lead) = g.join(key(), 0, &[1]) else {
            panic!("leads");
        };
        let Joined::Wait(second) = g.join(key(), 1, &[2]) else {
            panic!("waits");
        };
        let Joined::Wait(third) = g.join(key(), 2, &[3]) else {
            panic!("waits");
        };
        // The turn reaches the second, which is dropped before it looks: the third leads.
        drop(lead);
        drop(second);
        assert!(matches!(
            futures::executor::block_on(third.wait()),
            Some(Outcome::Lead(_))
        ));
    }
}

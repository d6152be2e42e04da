//! An async lock over byte ranges: holders of overlapping ranges run one at a time.
//!
//! Used to serialise read-modify-write of partial pages today, and stripe rows later.
//!
//! Invariants:
//! - No two live [`RangeGuard`]s have overlapping ranges.
//! - Dropping a guard wakes every waiter, which re-checks; no waiter sleeps forever while the
//!   range it wants is free.

use std::sync::Mutex;
use tokio::sync::Notify;

/// The lock table.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Waits until `[start, end)` overlaps no held range, then holds it.
    ///
    /// # Panics
    /// If `start >= end`.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        assert!(start < end, "empty range");
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().expect("range lock table");
                if held.iter().all(|&(s, e)| e <= start || end <= s) {
                    held.push((start, end));
                    return RangeGuard {
                        lock: self,
                        range: (start, end),
                    };
                }
            }
            notified.await;
        }
    }

    /// Number of ranges held (for tests and metrics).
    pub fn held_count(&self) -> usize {
        self.held.lock().expect("range lock table").len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().expect("range lock table");
        let i = held
            .iter()
            .position(|&r| r == self.range)
            .expect("guard's range is held");
        held.swap_remove(i);
        drop(held);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_waits_disjoint_does_not() {
        let l = RangeLock::default();
        let a = l.lock(0, 10).await;
        let _b = l.lock(10, 20).await; // disjoint: immediate
        let waiter = l.lock(5, 6);
        tokio::pin!(waiter);
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        drop(a);
        let _c = waiter.await;
        assert_eq!(l.held_count(), 2);
    }
}

//! Read leases: the bookkeeping of both sides, without I/O (the engine drives it).
//!
//! Why: a host read arriving at a controller that does not lead the extent costs a round trip
//! to the primary to learn which copies are current (a located read) before the bytes are
//! read from their holders; on the 2-core bench machine that round trip was 15% of the
//! cluster's 64 KiB read throughput (docs/benchmarks.md). A lease lets the asking controller
//! (the lessee) read the rows it names from their holders without asking, for a short time.
//!
//! The primary's side is [`Grants`] (kept with its row cache, under the same lock, so a grant
//! reads the row states it names atomically with registering the lessee); the lessee's side
//! is [`Held`].
//!
//! Invariants:
//! - A lessee's deadline is counted from when it sent the request that brought the lease, less
//!   a margin; the primary's from the grant, which happens later. So the lessee stops using a
//!   lease before the primary considers it run out.
//! - Before the primary acknowledges a change of an extent's content, every lessee of the
//!   extent has dropped its lease (a revocation answered) or the lease has run out
//!   ([`ExtentGrants::take_for_change`]); no lease is granted on an extent that changed within
//!   the last lease period, so mixed read/write extents pay no revocations.
//! - Before a primary serves an extent in a new epoch, leases granted in older epochs are
//!   revoked or run out ([`ExtentGrants::take_older`] closes the door on late grants of older
//!   epochs first), and a controller that newly leads the extent (or restarted, or skipped an
//!   epoch) waits one lease period ([`ExtentGrants::gate`]): it cannot know what others
//!   granted.
//! - A lessee installs a lease only if no revocation of the extent arrived after it sent the
//!   request (a revocation may overtake the reply that carries the lease), and uses it only in
//!   the epoch it was granted in.

use crate::cluster::ReadLease;
use crate::layout::ControllerId;
use crate::shard::{VolumeId, Want};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Rows a lease covers beyond the ones a located read asked for (sequential readers then ask
/// the primary once per this many rows, not once per row).
pub const READAHEAD_ROWS: u32 = 32;

/// One lessee of an extent, as its primary records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lessee {
    /// The controller holding the lease.
    pub id: ControllerId,
    /// When the lease runs out on the primary's clock.
    pub until: Instant,
    /// The epoch the newest lease of this lessee was granted in.
    pub epoch: u64,
}

/// The leases a primary granted on one extent, and when it may serve it.
#[derive(Debug, Default)]
pub struct ExtentGrants {
    lessees: Vec<Lessee>,
    /// The last change of the extent's content.
    changed: Option<Instant>,
    /// Grants of epochs below this are refused (older leases are being revoked).
    floor: u64,
    /// The epoch in which older leases are known gone: primary work of it may proceed.
    pub ready: u64,
    /// Primary work waits until this instant (this controller newly leads the extent).
    pub gate: Option<Instant>,
}

impl ExtentGrants {
    /// Whether a lease may be granted in `epoch` at `now` (no change within `quiet`).
    pub fn may_grant(&self, epoch: u64, now: Instant, quiet: Duration) -> bool {
        epoch >= self.floor && self.changed.is_none_or(|c| now >= c + quiet)
    }

    /// Records a lease to `id` in `epoch`, running out at `until`.
    pub fn grant(&mut self, id: ControllerId, epoch: u64, until: Instant) {
        match self.lessees.iter_mut().find(|l| l.id == id) {
            Some(l) => {
                l.until = l.until.max(until);
                l.epoch = l.epoch.max(epoch);
            }
            None => self.lessees.push(Lessee { id, until, epoch }),
        }
    }

    /// The content changes at `now`: every live lessee, to be revoked before the change is
    /// acknowledged. Leases that ran out are forgotten.
    pub fn take_for_change(&mut self, now: Instant) -> Vec<Lessee> {
        self.changed = Some(now);
        std::mem::take(&mut self.lessees)
            .into_iter()
            .filter(|l| l.until > now)
            .collect()
    }

    /// Primary work is about to start in `epoch`: the live lessees of older epochs, to be
    /// revoked first; grants of older epochs are refused from now on.
    pub fn take_older(&mut self, epoch: u64, now: Instant) -> Vec<Lessee> {
        self.floor = self.floor.max(epoch);
        let (older, keep): (Vec<Lessee>, Vec<Lessee>) = std::mem::take(&mut self.lessees)
            .into_iter()
            .filter(|l| l.until > now)
            .partition(|l| l.epoch < epoch);
        self.lessees = keep;
        older
    }

    /// Lessees recorded (live or not).
    #[cfg(test)]
    fn lessees(&self) -> &[Lessee] {
        &self.lessees
    }
}

/// A primary's grants, per extent (kept across epochs).
#[derive(Debug, Default)]
pub struct Grants {
    extents: HashMap<u64, ExtentGrants>,
}

impl Grants {
    /// The grants of `extent`.
    pub fn extent(&mut self, extent: u64) -> &mut ExtentGrants {
        self.extents.entry(extent).or_default()
    }
}

/// One extent's leased rows at the lessee.
#[derive(Debug)]
struct HeldExtent {
    epoch: u64,
    /// Row -> (the copy of each data column, deadline on the lessee's clock).
    rows: HashMap<u32, (Vec<Want>, Instant)>,
}

/// The leases this controller holds, per (volume, extent).
#[derive(Debug, Default)]
pub struct Held {
    extents: HashMap<(VolumeId, u64), HeldExtent>,
    /// Revocations received per extent: a reply sent before the last one carries no lease.
    revoked: HashMap<(VolumeId, u64), u64>,
    /// Installs since rows that ran out were last swept.
    since_sweep: u32,
}

/// Every this many installs, rows that ran out are dropped from every extent (a sequential
/// reader of a large volume would otherwise leave a lease record per row behind).
const SWEEP_EVERY: u32 = 256;

impl Held {
    /// Taken before asking the primary; [`Held::install`] needs it.
    pub fn ticket(&self, key: (VolumeId, u64)) -> u64 {
        self.revoked.get(&key).copied().unwrap_or(0)
    }

    /// Installs `lease` (granted in `epoch` for a request sent at `sent`, when `ticket` was
    /// taken); false when a revocation arrived since, or the lease is for another extent.
    pub fn install(
        &mut self,
        volume: VolumeId,
        epoch: u64,
        ticket: u64,
        sent: Instant,
        lease: &ReadLease,
    ) -> bool {
        let key = (volume, lease.extent);
        if self.ticket(key) != ticket || lease.ttl_ms == 0 {
            return false;
        }
        let ttl = Duration::from_millis(u64::from(lease.ttl_ms));
        // The margin covers clock rates that differ between controllers.
        let deadline = sent + ttl - ttl / 8;
        let held = self.extents.entry(key).or_insert_with(|| HeldExtent {
            epoch,
            rows: HashMap::new(),
        });
        if held.epoch != epoch {
            if held.epoch > epoch {
                return false;
            }
            held.epoch = epoch;
            held.rows.clear();
        }
        for (row, wants) in &lease.rows {
            held.rows.insert(*row, (wants.clone(), deadline));
        }
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY {
            self.since_sweep = 0;
            self.extents.retain(|_, h| {
                h.rows.retain(|_, (_, d)| *d > sent);
                !h.rows.is_empty()
            });
        }
        true
    }

    /// Rows held (live or run out but not yet swept).
    #[cfg(test)]
    fn rows_held(&self) -> usize {
        self.extents.values().map(|h| h.rows.len()).sum()
    }

    /// The copies of `rows` of an extent, if every one is leased in `epoch` and not run out
    /// at `now`.
    pub fn rows(
        &self,
        key: (VolumeId, u64),
        epoch: u64,
        rows: impl IntoIterator<Item = u32>,
        now: Instant,
    ) -> Option<Vec<Vec<Want>>> {
        let held = self.extents.get(&key).filter(|h| h.epoch == epoch)?;
        rows.into_iter()
            .map(|r| {
                held.rows
                    .get(&r)
                    .filter(|(_, d)| *d > now)
                    .map(|(w, _)| w.clone())
            })
            .collect()
    }

    /// The primary revoked the extent's leases: drop them, and refuse leases in replies to
    /// requests sent before now.
    pub fn revoke(&mut self, key: (VolumeId, u64)) {
        self.extents.remove(&key);
        *self.revoked.entry(key).or_insert(0) += 1;
    }

    /// A leased read failed (a copy is gone or a holder did not answer): drop the extent's
    /// leases.
    pub fn forget(&mut self, key: (VolumeId, u64)) {
        self.extents.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(extent: u64, ttl_ms: u32, rows: &[u32]) -> ReadLease {
        ReadLease {
            extent,
            ttl_ms,
            rows: rows
                .iter()
                .map(|r| (*r, vec![Want::Version(u64::from(*r) + 1), Want::Zero]))
                .collect(),
        }
    }

    #[test]
    fn a_lessee_uses_rows_until_its_deadline_which_is_before_the_primarys() {
        let t0 = Instant::now();
        let mut h = Held::default();
        let t = h.ticket((1, 0));
        assert!(h.install(1, 5, t, t0, &lease(0, 800, &[3, 4])));
        let got = h.rows((1, 0), 5, [3, 4], t0).expect("leased");
        assert_eq!(got[0], vec![Want::Version(4), Want::Zero]);
        // Another epoch, a row not granted, another extent: no lease.
        assert!(h.rows((1, 0), 6, [3], t0).is_none());
        assert!(h.rows((1, 0), 5, [3, 5], t0).is_none());
        assert!(h.rows((1, 1), 5, [3], t0).is_none());
        // Deadline: sent + ttl - ttl/8 = 700 ms; the primary's count starts later.
        assert!(h
            .rows((1, 0), 5, [3], t0 + Duration::from_millis(699))
            .is_some());
        assert!(h
            .rows((1, 0), 5, [3], t0 + Duration::from_millis(700))
            .is_none());
    }

    #[test]
    fn a_revocation_overtaking_the_reply_keeps_its_lease_out() {
        let t0 = Instant::now();
        let mut h = Held::default();
        let t = h.ticket((1, 2));
        // The revocation arrives before the reply that carries the lease.
        h.revoke((1, 2));
        assert!(!h.install(1, 5, t, t0, &lease(2, 1000, &[0])));
        assert!(h.rows((1, 2), 5, [0], t0).is_none());
        // A request sent after it installs its lease; a revocation drops it.
        let t = h.ticket((1, 2));
        assert!(h.install(1, 5, t, t0, &lease(2, 1000, &[0])));
        assert!(h.rows((1, 2), 5, [0], t0).is_some());
        h.revoke((1, 2));
        assert!(h.rows((1, 2), 5, [0], t0).is_none());
        // A lease of an older epoch than the one held is refused; a newer one replaces it.
        let t = h.ticket((1, 2));
        assert!(h.install(1, 6, t, t0, &lease(2, 1000, &[0])));
        assert!(!h.install(1, 5, t, t0, &lease(2, 1000, &[1])));
        assert!(h.install(1, 7, t, t0, &lease(2, 1000, &[1])));
        assert!(h.rows((1, 2), 7, [0], t0).is_none());
        assert!(h.rows((1, 2), 7, [1], t0).is_some());
    }

    #[test]
    fn rows_that_ran_out_are_swept_from_every_extent() {
        let t0 = Instant::now();
        let mut h = Held::default();
        // A sequential reader: one extent after another, each leased once.
        for e in 0..u64::from(SWEEP_EVERY) * 4 {
            let sent = t0 + Duration::from_millis(e * 10);
            let t = h.ticket((1, e));
            assert!(h.install(1, 5, t, sent, &lease(e, 100, &[0, 1, 2, 3])));
        }
        // Leases of 100 ms, one install every 10 ms: at most the last sweep period's worth
        // (SWEEP_EVERY installs of 4 rows) plus those still live are kept, not all 4096 rows.
        assert!(
            h.rows_held() <= (SWEEP_EVERY as usize + 10) * 4,
            "{} rows held",
            h.rows_held()
        );
    }

    #[test]
    fn a_change_takes_every_live_lessee_and_stops_grants_for_a_while() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut g = ExtentGrants::default();
        assert!(g.may_grant(5, t0, ms(1000)));
        g.grant(2, 5, t0 + ms(1000));
        g.grant(3, 5, t0 + ms(10));
        g.grant(2, 5, t0 + ms(500));
        assert_eq!(g.lessees().len(), 2);
        assert_eq!(
            g.lessees()[0].until,
            t0 + ms(1000),
            "the later deadline is kept"
        );
        let taken = g.take_for_change(t0 + ms(20));
        assert_eq!(
            taken.iter().map(|l| l.id).collect::<Vec<_>>(),
            vec![2],
            "3's lease ran out"
        );
        assert!(g.lessees().is_empty());
        assert!(!g.may_grant(5, t0 + ms(500), ms(1000)));
        assert!(g.may_grant(5, t0 + ms(1020), ms(1000)));
    }

    #[test]
    fn a_new_epoch_takes_older_lessees_and_refuses_their_late_grants() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut g = ExtentGrants::default();
        g.grant(2, 5, t0 + ms(1000));
        g.grant(3, 6, t0 + ms(1000));
        let older = g.take_older(6, t0);
        assert_eq!(older.iter().map(|l| l.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(g.lessees().len(), 1);
        // A locate of epoch 5 still in flight may not grant any more.
        assert!(!g.may_grant(5, t0, ms(1000)));
        assert!(g.may_grant(6, t0, ms(1000)));
    }
}

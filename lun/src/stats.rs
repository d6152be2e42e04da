//! I/O counters of one logical unit on one controller: operations, bytes, errors, commands in
//! flight and a latency histogram, for the operator's metrics and charts.
//!
//! They exist so an operator can see where the load is (per volume, per controller) without a
//! profiler. Every field is a relaxed atomic: recording costs a few uncontended increments on
//! the command path, and a snapshot may be a few increments apart between fields (counters are
//! only ever read as rates or totals, never reconciled with each other).
//!
//! Invariants:
//! - Counters only grow (Prometheus counters); `in_flight` returns to zero when idle.
//! - The histogram's buckets are fixed ([`LATENCY_BUCKETS_US`]); the last bucket is +Inf, so
//!   the bucket counts sum to the number of completed commands.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (inclusive, microseconds) of the latency buckets; a last bucket holds the rest.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    5_000_000,
];

/// What kind of command was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Reads (READ 6/10/12/16, COMPARE AND WRITE's read half is counted as a write).
    Read,
    /// Writes (WRITE *, WRITE SAME, COMPARE AND WRITE, UNMAP).
    Write,
    /// Everything else (INQUIRY, TEST UNIT READY, reservations, ...).
    Other,
}

/// The live counters.
#[derive(Debug, Default)]
pub struct IoStats {
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    other_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    errors: AtomicU64,
    in_flight: AtomicU64,
    latency_sum_us: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoSnapshot {
    /// Completed reads.
    pub read_ops: u64,
    /// Completed writes.
    pub write_ops: u64,
    /// Completed other commands.
    pub other_ops: u64,
    /// Bytes returned by reads.
    pub read_bytes: u64,
    /// Bytes received by writes.
    pub write_bytes: u64,
    /// Commands that ended other than GOOD.
    pub errors: u64,
    /// Commands running now.
    pub in_flight: u64,
    /// Sum of the latencies of completed commands, microseconds.
    pub latency_sum_us: u64,
    /// Completed commands per latency bucket ([`LATENCY_BUCKETS_US`], then +Inf); not
    /// cumulative.
    pub latency_buckets: Vec<u64>,
}

/// Marks one command in flight until dropped or [`InFlight::finish`]ed.
#[derive(Debug)]
pub struct InFlight<'a> {
    stats: &'a IoStats,
    started: std::time::Instant,
}

impl IoStats {
    /// Counts a command as started.
    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: self,
            started: std::time::Instant::now(),
        }
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> IoSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoSnapshot {
            read_ops: l(&self.read_ops),
            write_ops: l(&self.write_ops),
            other_ops: l(&self.other_ops),
            read_bytes: l(&self.read_bytes),
            write_bytes: l(&self.write_bytes),
            errors: l(&self.errors),
            in_flight: l(&self.in_flight),
            latency_sum_us: l(&self.latency_sum_us),
            latency_buckets: self.buckets.iter().map(l).collect(),
        }
    }
}

impl InFlight<'_> {
    /// Counts the command as completed: `bytes` moved, `ok` when it ended GOOD.
    pub fn finish(self, kind: IoKind, bytes: u64, ok: bool) {
        let s = self.stats;
        let us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let (ops, b) = match kind {
            IoKind::Read => (&s.read_ops, Some(&s.read_bytes)),
            IoKind::Write => (&s.write_ops, Some(&s.write_bytes)),
            IoKind::Other => (&s.other_ops, None),
        };
        ops.fetch_add(1, Ordering::Relaxed);
        if let (Some(b), true) = (b, ok) {
            b.fetch_add(bytes, Ordering::Relaxed);
        }
        if !ok {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        s.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&ub| us <= ub)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        s.buckets[i].fetch_add(1, Ordering::Relaxed);
        // Drop decrements in_flight.
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl IoSnapshot {
    /// Adds `o` into `self` (a controller's total over its volumes, a volume's over its
    /// controllers).
    pub fn add(&mut self, o: &IoSnapshot) {
        self.read_ops += o.read_ops;
        self.write_ops += o.write_ops;
        self.other_ops += o.other_ops;
        self.read_bytes += o.read_bytes;
        self.write_bytes += o.write_bytes;
        self.errors += o.errors;
        self.in_flight += o.in_flight;
        self.latency_sum_us += o.latency_sum_us;
        if self.latency_buckets.len() < o.latency_buckets.len() {
            self.latency_buckets.resize(o.latency_buckets.len(), 0);
        }
        for (a, b) in self.latency_buckets.iter_mut().zip(&o.latency_buckets) {
            *a += b;
        }
    }
}

/// Classifies a CDB by its operation code.
pub fn kind_of(cdb: &[u8]) -> IoKind {
    use crate::cdb::op;
    match cdb.first().copied() {
        Some(op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16) => IoKind::Read,
        Some(
            op::WRITE_6
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_SAME_10
            | op::WRITE_SAME_16
            | op::COMPARE_AND_WRITE
            | op::UNMAP
            | op::ORWRITE_16
            | op::WRITE_AND_VERIFY_10
            | op::WRITE_AND_VERIFY_12
            | op::WRITE_AND_VERIFY_16,
        ) => IoKind::Write,
        _ => IoKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ops_bytes_errors_and_buckets() {
        let s = IoStats::default();
        let a = s.start();
        assert_eq!(s.snapshot().in_flight, 1);
        a.finish(IoKind::Read, 4096, true);
        s.start().finish(IoKind::Write, 8192, true);
        s.start().finish(IoKind::Write, 512, false);
        drop(s.start());
        let n = s.snapshot();
        assert_eq!((n.read_ops, n.write_ops, n.other_ops), (1, 2, 0));
        assert_eq!((n.read_bytes, n.write_bytes), (4096, 8192));
        assert_eq!(n.errors, 1);
        assert_eq!(n.in_flight, 0);
        assert_eq!(n.latency_buckets.iter().sum::<u64>(), 3);
        let mut t = n.clone();
        t.add(&n);
        assert_eq!(t.write_ops, 4);
        assert_eq!(t.latency_buckets.iter().sum::<u64>(), 6);
    }

    #[test]
    fn classifies_by_opcode() {
        assert_eq!(kind_of(&[crate::cdb::op::READ_16]), IoKind::Read);
        assert_eq!(kind_of(&[crate::cdb::op::WRITE_10]), IoKind::Write);
        assert_eq!(kind_of(&[crate::cdb::op::INQUIRY]), IoKind::Other);
        assert_eq!(kind_of(&[]), IoKind::Other);
    }
}

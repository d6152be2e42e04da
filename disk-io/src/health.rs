//! Error and latency counters of one backing device: what an operator (and later the
//! preemptive-migration policy) needs to see a disk going bad before it fails.
//!
//! Invariants: counters only grow; every completed request is counted once in `ios`, and once
//! more in the matching error counter when the kernel refused it, and in `slow_ios` when it
//! took longer than [`SLOW_IO`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A request slower than this counts as slow.
pub const SLOW_IO: Duration = Duration::from_millis(500);

/// Live counters.
#[derive(Debug, Default)]
pub struct DeviceHealth {
    ios: AtomicU64,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
    flush_errors: AtomicU64,
    slow_ios: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// Completed requests.
    pub ios: u64,
    /// Reads the kernel refused.
    pub read_errors: u64,
    /// Writes the kernel refused.
    pub write_errors: u64,
    /// Flushes the kernel refused.
    pub flush_errors: u64,
    /// Requests slower than [`SLOW_IO`].
    pub slow_ios: u64,
}

/// What kind of request completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A flush.
    Flush,
    /// Anything else (discard).
    Other,
}

impl DeviceHealth {
    /// Counts a completed request.
    pub fn record(&self, op: IoOp, took: Duration, ok: bool) {
        self.ios.fetch_add(1, Ordering::Relaxed);
        if took > SLOW_IO {
            self.slow_ios.fetch_add(1, Ordering::Relaxed);
        }
        if !ok {
            let c = match op {
                IoOp::Read => &self.read_errors,
                IoOp::Write => &self.write_errors,
                IoOp::Flush | IoOp::Other => &self.flush_errors,
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> HealthSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HealthSnapshot {
            ios: l(&self.ios),
            read_errors: l(&self.read_errors),
            write_errors: l(&self.write_errors),
            flush_errors: l(&self.flush_errors),
            slow_ios: l(&self.slow_ios),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_errors_by_kind_and_slow_requests() {
        let h = DeviceHealth::default();
        h.record(IoOp::Read, Duration::from_millis(1), true);
        h.record(IoOp::Read, Duration::from_millis(1), false);
        h.record(IoOp::Write, SLOW_IO * 2, false);
        h.record(IoOp::Flush, Duration::ZERO, false);
        let s = h.snapshot();
        assert_eq!(
            s,
            HealthSnapshot {
                ios: 4,
                read_errors: 1,
                write_errors: 1,
                flush_errors: 1,
                slow_ios: 1
            }
        );
    }
}

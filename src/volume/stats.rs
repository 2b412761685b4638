//! Counters of the data path: plain atomics, so recording costs a few relaxed adds and never
//! takes a lock. The agent's `/metrics` endpoint reads them (`crate::agent::metrics`).

use crate::engine::VolId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the histogram buckets, in seconds (Prometheus `le`), 10 µs to 10 s.
pub const BUCKETS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// [`BUCKETS`] in nanoseconds, for the comparison on the hot path.
const BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A duration histogram with the fixed [`BUCKETS`], one atomic per bucket.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is above the largest bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// A consistent-enough copy of a [`Histogram`] for exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative count per bound of [`BUCKETS`] (observations `<=` the bound).
    pub cumulative: Vec<u64>,
    /// Every observation (the `+Inf` bucket).
    pub count: u64,
    /// Sum of the observations in seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS.partition_point(|b| *b < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The histogram now. The count is the sum of the buckets, so the two always agree.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(BUCKETS.len());
        let mut acc = 0;
        for c in &self.counts[..BUCKETS.len()] {
            acc += c.load(Ordering::Relaxed);
            cumulative.push(acc);
        }
        let count = acc + self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        HistogramSnapshot {
            cumulative,
            count,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A kind of host I/O request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush (sync).
    Flush,
    /// Trim (discard).
    Trim,
    /// Write zeroes.
    WriteZeroes,
}

impl IoOp {
    /// Every op, in exposition order.
    pub const ALL: [IoOp; 5] = [
        IoOp::Read,
        IoOp::Write,
        IoOp::Flush,
        IoOp::Trim,
        IoOp::WriteZeroes,
    ];

    /// The `op` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Trim => "trim",
            IoOp::WriteZeroes => "write_zeroes",
        }
    }
}

/// Counters of one kind of host I/O request.
#[derive(Debug, Default)]
pub struct OpStats {
    /// Requests completed (successfully or not).
    pub requests: AtomicU64,
    /// Bytes of the successful requests (the range length for trim and write zeroes).
    pub bytes: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Time to complete, successful or not.
    pub latency: Histogram,
}

/// Host I/O counters by request kind.
#[derive(Debug, Default)]
pub struct IoStats {
    ops: [OpStats; 5],
}

impl IoStats {
    /// The counters of `op`.
    pub fn op(&self, op: IoOp) -> &OpStats {
        &self.ops[op as usize]
    }

    /// Records one completed request of `bytes` that took `took`.
    pub fn record(&self, op: IoOp, bytes: u64, took: Duration, ok: bool) {
        let s = self.op(op);
        s.requests.fetch_add(1, Ordering::Relaxed);
        if ok {
            s.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            s.errors.fetch_add(1, Ordering::Relaxed);
        }
        s.latency.observe(took);
    }
}

/// Why a grain was copied (or a copy failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyKind {
    /// Copy-on-write before a host write.
    CopyOnWrite,
    /// Background copy of a copying mapping.
    Background,
    /// Cleaning of a stopping mapping.
    Cleaning,
}

impl CopyKind {
    /// Every kind, in exposition order.
    pub const ALL: [CopyKind; 3] = [
        CopyKind::CopyOnWrite,
        CopyKind::Background,
        CopyKind::Cleaning,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyKind::CopyOnWrite => "copy_on_write",
            CopyKind::Background => "background",
            CopyKind::Cleaning => "cleaning",
        }
    }
}

impl std::fmt::Display for CopyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CopyKind::CopyOnWrite => "copy-on-write",
            CopyKind::Background => "background copy",
            CopyKind::Cleaning => "cleaning",
        })
    }
}

/// Counters of the data path.
#[derive(Debug, Default)]
pub struct Stats {
    /// Grains copied to preserve a point in time before a write.
    pub cow_grains: AtomicU64,
    /// Grains copied by background copy.
    pub background_grains: AtomicU64,
    /// Grains copied by cleaning.
    pub clean_grains: AtomicU64,
    /// Grain copies that failed on a store, by [`CopyKind`] (each stopped its mapping).
    pub copy_errors: [AtomicU64; 3],
    /// Host I/O served over NBD.
    pub io: IoStats,
    /// Pause windows of single-mapping starts.
    pub start_pause_mapping: Histogram,
    /// Pause windows of consistency-group starts.
    pub start_pause_group: Histogram,
    /// Open NBD export handles by volume: a volume with any is attached somewhere, so its
    /// clients saw the size it had when they connected.
    clients: Mutex<HashMap<VolId, u32>>,
}

impl Stats {
    /// Grains copied for `kind`.
    pub fn copied(&self, kind: CopyKind) -> u64 {
        match kind {
            CopyKind::CopyOnWrite => &self.cow_grains,
            CopyKind::Background => &self.background_grains,
            CopyKind::Cleaning => &self.clean_grains,
        }
        .load(Ordering::Relaxed)
    }

    /// NBD clients that have `vol` open.
    pub fn clients(&self, vol: VolId) -> u32 {
        self.clients_lock().get(&vol).copied().unwrap_or(0)
    }

    /// Counts an opened export handle of `vol` (undone by [`Stats::client_closed`]).
    pub fn client_opened(&self, vol: VolId) {
        *self.clients_lock().entry(vol).or_default() += 1;
    }

    /// Uncounts an export handle of `vol`.
    pub fn client_closed(&self, vol: VolId) {
        let mut c = self.clients_lock();
        if let Some(n) = c.get_mut(&vol) {
            *n -= 1;
            if *n == 0 {
                c.remove(&vol);
            }
        }
    }

    fn clients_lock(&self) -> std::sync::MutexGuard<'_, HashMap<VolId, u32>> {
        // A counter map cannot be left inconsistent by a panic: keep using it.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Failed grain copies for `kind`.
    pub fn copy_errors(&self, kind: CopyKind) -> u64 {
        self.copy_errors[kind as usize].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10)); // exactly on the first bound: counted there
        h.observe(Duration::from_micros(11));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60)); // above every bound: only in +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.cumulative[0], 1, "le=1e-05");
        assert_eq!(s.cumulative[1], 2, "le=2.5e-05");
        assert_eq!(s.cumulative[7], 2, "le=0.0025");
        assert_eq!(s.cumulative[8], 3, "le=0.005");
        assert_eq!(*s.cumulative.last().unwrap(), 3, "le=10");
        assert!(
            (s.sum_seconds - 60.003021).abs() < 1e-9,
            "{}",
            s.sum_seconds
        );
    }

    #[test]
    fn bounds_match_the_exposed_buckets() {
        for (b, ns) in BUCKETS.iter().zip(BOUNDS_NS) {
            assert_eq!((b * 1e9).round() as u64, ns);
        }
    }
}

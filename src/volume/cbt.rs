//! Changed-block tracking over the pool: byte extents of a snapshot that hold data, and of the
//! grains where two snapshots may differ, listed a page at a time.
//!
//! The engine says where every grain of a snapshot lives and where two snapshots part
//! ([`crate::engine::SnapshotView`]); this layer turns grain runs into byte extents (merged
//! where adjacent, clipped to the image) and, for "allocated", asks the store that holds a
//! grain whether it holds data there (a hole of a sparse file reads as zeros and is left out).
//! A scan works one chunk of grains at a time under the engine's read lock, so its memory is
//! one chunk whatever the size of the volume, and I/O is never blocked for long.

use super::{Pool, VolumeError};
use crate::engine::{EngineError, MapId, SnapshotView, VolId};
use std::collections::VecDeque;
use std::ops::Range;

/// Grains looked at per engine lock (16 GiB of image at 256 KiB grains).
const CHUNK: u64 = 1 << 16;

#[derive(Clone, Debug)]
enum Kind {
    Allocated(SnapshotView),
    Delta(SnapshotView, SnapshotView),
}

/// A listing in progress (see [`Pool::scan_allocated`], [`Pool::scan_delta`]).
#[derive(Debug)]
pub struct ExtentScan {
    kind: Kind,
    next: u64,
    end: u64,
    pending: Option<Range<u64>>,
    ready: VecDeque<Range<u64>>,
    /// Size of the image listed, in bytes (the target snapshot's for a delta).
    pub capacity: u64,
    /// Grain size in bytes: every extent starts on a grain boundary and is whole grains, except
    /// that the last one ends at `capacity`.
    pub grain: u64,
}

impl ExtentScan {
    fn new(kind: Kind, from: u64) -> Result<Self, EngineError> {
        let view = match &kind {
            Kind::Allocated(v) | Kind::Delta(_, v) => *v,
        };
        if from >= view.size {
            return Err(EngineError::OffsetPastEnd {
                offset: from,
                size: view.size,
            });
        }
        Ok(Self {
            kind,
            // The extent that holds `from` starts at its grain.
            next: from / view.grain,
            end: view.grains(),
            pending: None,
            ready: VecDeque::new(),
            capacity: view.size,
            grain: view.grain,
        })
    }

    /// Adds grains `r` to the listing.
    fn push(&mut self, r: Range<u64>) {
        let bytes = r.start * self.grain..(r.end * self.grain).min(self.capacity);
        match &mut self.pending {
            Some(p) if p.end == bytes.start => p.end = bytes.end,
            p => {
                if let Some(done) = p.replace(bytes) {
                    self.ready.push_back(done);
                }
            }
        }
    }
}

impl Pool {
    /// Starts listing the extents of snapshot mapping `map`'s image that hold data, from the
    /// grain that holds byte `from`. Held data: the grain's bytes live in a store range that
    /// is not a hole (ever written or copied there; a store that cannot tell counts all).
    pub fn scan_allocated(&self, map: MapId, from: u64) -> Result<ExtentScan, VolumeError> {
        let view = self.engine().snapshot_view(map)?;
        Ok(ExtentScan::new(Kind::Allocated(view), from)?)
    }

    /// Starts listing the extents where snapshot `target` may differ from the older snapshot
    /// `base` of the same source, from the grain that holds byte `from` of `target`'s image.
    pub fn scan_delta(
        &self,
        base: MapId,
        target: MapId,
        from: u64,
    ) -> Result<ExtentScan, VolumeError> {
        let (b, t) = self.engine().delta_views(base, target)?;
        Ok(ExtentScan::new(Kind::Delta(b, t), from)?)
    }

    /// The next at most `max` extents (byte ranges) of a scan; empty when it is over.
    pub fn next_extents(
        &self,
        scan: &mut ExtentScan,
        max: usize,
    ) -> Result<Vec<Range<u64>>, VolumeError> {
        let max = max.max(1);
        while scan.ready.len() < max && scan.next < scan.end {
            let (first, n) = (scan.next, CHUNK.min(scan.end - scan.next));
            let runs = match &scan.kind {
                Kind::Delta(b, t) => {
                    let mut out = Vec::new();
                    // The views may have been deleted since the scan began: check again.
                    let e = self.engine();
                    let (b, t) = e.delta_views(b.map, t.map)?;
                    e.delta_grains(&b, &t, first, n, &mut out);
                    out
                }
                Kind::Allocated(v) => self.allocated_grains(v.map, first, n)?,
            };
            for r in runs {
                scan.push(r);
            }
            scan.next = first + n;
        }
        if scan.next >= scan.end
            && let Some(p) = scan.pending.take()
        {
            scan.ready.push_back(p);
        }
        let n = max.min(scan.ready.len());
        Ok(scan.ready.drain(..n).collect())
    }

    /// The runs of grains in `first..first + n` of `map`'s image whose store holds data.
    fn allocated_grains(
        &self,
        map: MapId,
        first: u64,
        n: u64,
    ) -> Result<Vec<Range<u64>>, VolumeError> {
        let landing = |out: &mut Vec<(Range<u64>, VolId)>| -> Result<u64, VolumeError> {
            let e = self.engine();
            let v = e.snapshot_view(map)?;
            e.landing_runs(&v, first, n, out);
            Ok(v.grain)
        };
        let mut before = Vec::new();
        let grain = landing(&mut before)?;
        let mut held = Vec::new();
        for (r, vol) in &before {
            // Gone meanwhile (only after the mapping changed): count the run as held.
            let Some(store) = self.stores.read().get(vol).cloned() else {
                held.push(r.clone());
                continue;
            };
            let end = (r.end * grain).min(store.len());
            let mut at = r.start * grain;
            while at < end {
                let Some(d) = store.data_extent(at)? else {
                    break;
                };
                if d.start >= end {
                    break;
                }
                let g = d.start / grain..d.end.min(end).div_ceil(grain);
                at = g.end * grain;
                held.push(g);
            }
        }
        let held = union(held, Vec::new());
        // A grain copied away and then discarded while its store was asked would read as a
        // hole: grains whose landing moved meanwhile count as held.
        let mut after = Vec::new();
        landing(&mut after)?;
        let moved = moved_grains(&before, &after);
        Ok(union(held, moved))
    }
}

/// Grains whose landing volume differs between two run lists over the same grains.
fn moved_grains(a: &[(Range<u64>, VolId)], b: &[(Range<u64>, VolId)]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (ra, va) = &a[i];
        let (rb, vb) = &b[j];
        let lo = ra.start.max(rb.start);
        let hi = ra.end.min(rb.end);
        if lo < hi && va != vb {
            match out.last_mut() {
                Some(r) if r.end == lo => r.end = hi,
                _ => out.push(lo..hi),
            }
        }
        if ra.end <= rb.end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The union of two sorted lists of disjoint ranges, sorted and merged.
fn union(a: Vec<Range<u64>>, b: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.into_iter().chain(b).collect();
    all.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(o) if o.end >= r.start => o.end = o.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_and_union() {
        let (x, y) = (VolId(1), VolId(2));
        let a = vec![(0..4, x), (4..8, y)];
        let b = vec![(0..2, x), (2..6, y), (6..8, y)];
        assert_eq!(moved_grains(&a, &b), vec![2..4]);
        assert_eq!(
            union(vec![0..1, 5..6], vec![1..3, 9..10]),
            vec![0..3, 5..6, 9..10]
        );
    }
}

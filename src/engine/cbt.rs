//! Changed-block tracking: which grains of a snapshot may differ from another snapshot of the
//! same source, and where each grain of a snapshot is stored (for "allocated").
//!
//! A snapshot's image at grain `g` is the physical grain `g` of the volume a read lands on (the
//! cascade walk of [`Engine::resolve`]). Two views that land on the same volume read the same
//! bytes, so the delta of base A and target B is every grain where their walks land on different
//! volumes (or where one of them does not cover the grain). This is exact wherever the cascade
//! knows: A linked below B (every copy-rate-0 snapshot started later takes the older ones below
//! it) lands apart from B exactly where A is split, i.e. where the source was written between
//! the two starts, a target written, or a newer snapshot's grain handed over by cleaning
//! (which was itself written between the starts). It is conservative (unchanged grains listed)
//! only where data was copied without being changed:
//! - a restore onto the source: snapshots taken before it read the source's own data, later ones
//!   read through the restore mapping, so every grain the restore has not copied yet differs;
//!   and the two cascades are siblings, so every grain split in either since its start is listed;
//! - snapshots with background copy (copy rate > 0) or incremental mappings, which are linked as
//!   leaves or start pre-split: every copied grain lands on the snapshot's own target;
//! - a mapping that completed (idle_or_copied): its target is independent, every grain differs.
//!
//! Grains are computed a chunk at a time from the bitmaps, so memory is bounded by the chunk,
//! not by the volume.

use super::*;

/// A volume of a snapshot view (the target of its mapping), as the delta needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotView {
    /// The snapshot mapping.
    pub map: MapId,
    /// Its source volume.
    pub source: VolId,
    /// Its target volume: the image.
    pub target: VolId,
    /// Size of the image (the target's size) in bytes.
    pub size: u64,
    /// Grain size in bytes of the snapshot's cascade.
    pub grain: u64,
    /// Start order: start time, then id.
    pub started: (u64, MapId),
}

impl SnapshotView {
    /// Number of grains of the image (the last may be partial).
    pub fn grains(&self) -> u64 {
        self.size.div_ceil(self.grain)
    }
}

/// One level of a cascade walk: the volume, and the mapping the walk continues through when
/// this volume does not own the grain (`None`: the walk ends here).
struct Level<'a> {
    vol: VolId,
    up: Option<&'a Mapping>,
}

impl Engine {
    /// The image of a started snapshot mapping whose target is readable (copying, or
    /// idle_or_copied after a start).
    pub fn snapshot_view(&self, map: MapId) -> Result<SnapshotView, EngineError> {
        let m = self.get_map_ref(map)?;
        let readable = matches!(m.state, MapState::Copying | MapState::IdleOrCopied);
        let Some(start) = m.start_time.filter(|_| readable) else {
            return Err(EngineError::NotAPointInTime {
                map,
                state: m.state,
            });
        };
        let t = &self.volumes[&m.target];
        Ok(SnapshotView {
            map,
            source: m.source,
            target: m.target,
            size: t.size,
            grain: m.grain.bytes(),
            started: (start, map),
        })
    }

    /// Checks a delta request: both images readable, the same source, the base started first.
    pub fn delta_views(
        &self,
        base: MapId,
        target: MapId,
    ) -> Result<(SnapshotView, SnapshotView), EngineError> {
        let (b, t) = (self.snapshot_view(base)?, self.snapshot_view(target)?);
        if b.source != t.source {
            return Err(EngineError::DifferentSources {
                base,
                base_source: b.source,
                target,
                target_source: t.source,
            });
        }
        if b.started >= t.started {
            return Err(EngineError::BaseNotOlder { base, target });
        }
        Ok((b, t))
    }

    fn get_map_ref(&self, id: MapId) -> Result<&Mapping, EngineError> {
        self.mappings.get(&id).ok_or(EngineError::NoSuchMapping(id))
    }

    /// The cascade walk of reads of `vol` (see [`Engine::resolve`]): every grain stops at the
    /// first level that owns it, or at the last. Restores can make the links a ring that every
    /// grain leaves at a split mapping; the walk is cut after one round.
    fn walk(&self, vol: VolId) -> Vec<Level<'_>> {
        let mut out = Vec::new();
        let (mut v, mut through) = (vol, self.volumes[&vol].up);
        for _ in 0..=self.volumes.len() {
            let Some(up) = self.volumes[&v].up.filter(|u| Some(*u) == through) else {
                out.push(Level { vol: v, up: None });
                return out;
            };
            let m = &self.mappings[&up];
            out.push(Level {
                vol: v,
                up: Some(m),
            });
            let link = m.link.expect("a volume's up mapping is linked");
            (v, through) = (link.up, link.through);
        }
        out
    }

    fn land(walk: &[Level<'_>], g: u64) -> VolId {
        walk.iter()
            .find(|l| l.up.is_none_or(|m| m.owns(g)))
            .or(walk.last())
            .map(|l| l.vol)
            .expect("a walk has a level")
    }

    /// Appends to `out` the runs of grains in `first..first + n` (clipped to `target`'s image)
    /// where `base` and `target` may differ, as grain ranges, merged where adjacent.
    pub fn delta_grains(
        &self,
        base: &SnapshotView,
        target: &SnapshotView,
        first: u64,
        n: u64,
        out: &mut Vec<std::ops::Range<u64>>,
    ) {
        let end = (first + n).min(target.grains());
        if first >= end {
            return;
        }
        let (wb, wt) = (self.walk(base.target), self.walk(target.target));
        let gs = target.grain;
        let cover = |size: u64, g: u64| ((g + 1) * gs).min(size).saturating_sub(g * gs);
        for g in first..end {
            let differs = cover(base.size, g) != cover(target.size, g)
                || Self::land(&wb, g) != Self::land(&wt, g);
            if differs {
                push_run(out, g);
            }
        }
    }

    /// Appends to `out` the runs of grains in `first..first + n` (clipped to the image) of
    /// `snap` with the volume whose physical grains hold them, merged where adjacent.
    pub fn landing_runs(
        &self,
        snap: &SnapshotView,
        first: u64,
        n: u64,
        out: &mut Vec<(std::ops::Range<u64>, VolId)>,
    ) {
        let end = (first + n).min(snap.grains());
        let w = self.walk(snap.target);
        for g in first..end {
            let v = Self::land(&w, g);
            match out.last_mut() {
                Some((r, lv)) if r.end == g && *lv == v => r.end = g + 1,
                _ => out.push((g..g + 1, v)),
            }
        }
    }
}

fn push_run(out: &mut Vec<std::ops::Range<u64>>, g: u64) {
    match out.last_mut() {
        Some(r) if r.end == g => r.end = g + 1,
        _ => out.push(g..g + 1),
    }
}

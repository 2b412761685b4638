//! The data-path side: cascade links, reads, copy-on-write, background copy and cleaning plans
//! (FLASHCOPY.md §3). Nothing here moves bytes; the volume layer executes the plans.

use super::*;
use std::collections::{BTreeMap, BTreeSet};

/// One grain copy: read the grain from `from`'s store, write it to `to`'s store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrainCopy {
    /// Volume whose physical data is read.
    pub from: VolId,
    /// Volume whose physical data is written.
    pub to: VolId,
}

/// What one grain of I/O needs before (or after) the data moves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrainPlan {
    /// Grain index.
    pub grain: u64,
    /// Copies, in the order they must run (each reads before anything later overwrites it).
    pub copies: Vec<GrainCopy>,
    /// `MarkSplit` / `MarkDiff` ops, in the order they must become durable.
    pub marks: Vec<Op>,
    /// For writes: the written grain is visible to readers now, so `marks` must be durable
    /// before the write is issued. Otherwise the write goes first and `marks` publish it.
    pub visible: bool,
}

impl GrainPlan {
    /// Nothing to copy and nothing to mark: the I/O goes straight to the store.
    pub fn is_noop(&self) -> bool {
        self.copies.is_empty() && self.marks.is_empty()
    }

    /// The volume that holds `v`'s physical grain as it was when the plan began, at this point
    /// of the plan: `v` itself until a copy overwrites it, then a volume an earlier copy gave
    /// that grain to (and nothing overwrote since). Restores in a ring can make two volumes read
    /// each other's physical data; the first copy into one of them must not lose what the
    /// other still reads.
    fn holder(&self, v: VolId) -> Option<VolId> {
        let Some(over) = self.copies.iter().position(|c| c.to == v) else {
            return Some(v);
        };
        self.copies[..over].iter().enumerate().find_map(|(i, c)| {
            (c.from == v && self.copies[i + 1..].iter().all(|d| d.to != c.to)).then_some(c.to)
        })
    }

    /// Appends a copy of `from`'s grain as it was when the plan began into `to`.
    fn push_copy(&mut self, from: VolId, to: VolId) {
        let held = self.holder(from);
        debug_assert!(
            held.is_some(),
            "copy source overwritten earlier in the plan"
        );
        let from = held.unwrap_or(from);
        if from != to {
            self.copies.push(GrainCopy { from, to });
        }
    }
}

/// How I/O to a volume must be carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoShape {
    /// `None`: no mapping touches the volume, I/O goes straight to its store. Otherwise the lock
    /// domain (one per connected set of mappings) and its grain size.
    pub domain: Option<(VolId, GrainSize)>,
}

impl Engine {
    /// Checks that `vol` is online and `offset+len` inside it, and says how to do the I/O.
    pub fn check_io(&self, vol: VolId, offset: u64, len: u64) -> Result<IoShape, EngineError> {
        let v = self
            .volumes
            .get(&vol)
            .ok_or(EngineError::NoSuchVolume(vol))?;
        if offset.checked_add(len).is_none_or(|end| end > v.size) {
            return Err(EngineError::OutOfRange {
                vol,
                offset,
                len,
                size: v.size,
            });
        }
        if let Some(reason) = &v.offline {
            return Err(EngineError::VolumeOffline {
                vol,
                reason: reason.clone(),
            });
        }
        Ok(IoShape { domain: v.domain })
    }

    /// The lock domain of a volume (one per connected set of mappings) and its grain size;
    /// `None` when no mapping uses the volume.
    pub fn lock_domain(&self, vol: VolId) -> Option<(VolId, GrainSize)> {
        self.volumes.get(&vol).and_then(|v| v.domain)
    }

    /// Volumes directly related to `vol`, with the mapping that relates them: both ends of its
    /// own mappings, and the volumes those mappings (and the ones linked below `vol`) read
    /// through. Links count because a mapping can keep reading through a volume after the
    /// mapping that put it there was deleted.
    pub(super) fn neighbours(&self, vol: VolId) -> Vec<(MapId, VolId)> {
        let v = &self.volumes[&vol];
        let mut out = Vec::new();
        for id in v.maps.iter().chain(&v.downs) {
            let m = &self.mappings[id];
            out.extend([(*id, m.source), (*id, m.target)]);
            if let Some(l) = m.link {
                out.push((*id, l.up));
            }
        }
        out
    }

    /// `start` and every volume connected to it (volumes that no longer exist are left out).
    pub(super) fn component(&self, start: impl IntoIterator<Item = VolId>) -> BTreeSet<VolId> {
        let mut seen: BTreeSet<VolId> = start
            .into_iter()
            .filter(|v| self.volumes.contains_key(v))
            .collect();
        let mut todo: Vec<VolId> = seen.iter().copied().collect();
        while let Some(x) = todo.pop() {
            for (_, w) in self.neighbours(x) {
                if seen.insert(w) {
                    todo.push(w);
                }
            }
        }
        seen
    }

    /// Recomputes the per-volume facts the I/O path reads (lock domains: the lowest volume id
    /// of each connected set; offline reasons; the incremental mappings to record into) for
    /// the connected sets of `around`. Only the sets an op touched: a refresh of every volume
    /// made each command cost time linear in the mappings of the whole agent.
    pub(super) fn refresh_derived(&mut self, around: BTreeSet<VolId>) {
        let scope = self.component(around);
        let mut domain: BTreeMap<VolId, (VolId, GrainSize)> = BTreeMap::new();
        for &id in &scope {
            let v = &self.volumes[&id];
            let Some(first) = v.maps.first().or(v.downs.first()) else {
                continue;
            };
            if domain.contains_key(&id) {
                continue;
            }
            let grain = self.mappings[first].grain;
            // `id` is the lowest id of its set: the scope holds whole sets, visited in id order.
            for w in self.component([id]) {
                domain.insert(w, (id, grain));
            }
        }
        for &id in &scope {
            self.volumes.get_mut(&id).unwrap().domain = domain.get(&id).copied();
        }
        self.refresh_facts(&scope.into_iter().collect::<Vec<_>>());
    }

    /// Recomputes the offline reasons and recorders of `vols` (those that still exist): the
    /// facts that depend only on a volume's own mappings.
    pub(super) fn refresh_facts(&mut self, vols: &[VolId]) {
        for &id in vols {
            if !self.volumes.contains_key(&id) {
                continue;
            }
            let offline = self.offline_reason(id);
            let recorders = self
                .mappings_of(id)
                .filter(|m| m.diff.is_some())
                .map(|m| m.id)
                .collect();
            let v = self.volumes.get_mut(&id).unwrap();
            v.offline = offline;
            v.recorders = recorders;
        }
    }

    /// After a new mapping joined the sets of `ends` (whose domains were `before`): the set's
    /// lowest id stays the domain. When that is one end's existing domain and the other end
    /// was alone (a new snapshot's target), only that end changes; otherwise the whole joined
    /// set is relabelled.
    pub(super) fn join_sets(&mut self, ends: [VolId; 2], before: [Option<(VolId, GrainSize)>; 2]) {
        let [a, b] = ends;
        let (vols, d) = match before {
            [Some(x), Some(y)] if x == y => (vec![], x),
            [Some(d), None] if d.0 < b => (vec![b], d),
            [None, Some(d)] if d.0 < a => (vec![a], d),
            // The new mapping is the only one of either: a set of two.
            [None, None] => {
                let grain = self.mappings[&self.volumes[&a].maps[0]].grain;
                (vec![a, b], (a.min(b), grain))
            }
            _ => return self.refresh_derived(BTreeSet::from(ends)),
        };
        for v in vols {
            self.volumes.get_mut(&v).unwrap().domain = Some(d);
        }
        self.refresh_facts(&ends);
    }

    /// Why host I/O to `vol` must fail now (FLASHCOPY.md §2.1), if it must.
    pub(super) fn offline_reason(&self, vol: VolId) -> Option<String> {
        for m in self.mappings_of(vol) {
            let as_target = m.target == vol;
            let why = match m.state {
                MapState::Suspended => Some("its mapping's metadata is offline (suspended)"),
                _ if m.bitmap_offline && m.incremental => Some("its mapping's metadata is offline"),
                MapState::Preparing | MapState::Prepared if as_target => {
                    Some("it is the target of a mapping being prepared")
                }
                MapState::Stopped if as_target => Some(
                    "it is the target of a stopped mapping; restart or delete --force the mapping",
                ),
                MapState::Stopping if as_target && !m.split.all() => {
                    Some("it is the target of a stopping mapping with an incomplete copy")
                }
                _ => None,
            };
            if let Some(why) = why {
                return Some(format!("{why} ({} {})", m.id, m.state));
            }
        }
        None
    }

    /// The volume whose physical data holds grain `g` as seen from `vol` by a reader that
    /// continues past `vol` only through mapping `through` (see [`Link`]).
    fn view(&self, vol: VolId, g: u64, through: Option<MapId>) -> VolId {
        let (mut v, mut through) = (vol, through);
        for _ in 0..=self.volumes.len() {
            let Some(up) = self.volumes[&v].up else {
                return v;
            };
            let m = &self.mappings[&up];
            if through != Some(up) || m.owns(g) {
                return v;
            }
            let link = m.link.expect("a volume's up mapping is linked");
            (v, through) = (link.up, link.through);
        }
        unreachable!("cascade walk from {vol} at grain {g} does not end")
    }

    /// The volume whose physical grain `g` a read of `vol` must use (§3.4).
    pub fn resolve(&self, vol: VolId, g: u64) -> VolId {
        self.view(vol, g, self.volumes[&vol].up)
    }

    /// Before `vol`'s grain `g` changes, give each dependant that would see the change its
    /// current view (§3.6 step 1). `all`: every unsplit dependant sees it (a host write);
    /// otherwise only those that read `vol`'s physical data (it gets its own view written).
    fn protect(
        &self,
        vol: VolId,
        g: u64,
        all: bool,
        seen: &mut BTreeSet<MapId>,
        plan: &mut GrainPlan,
    ) {
        for &d in &self.volumes[&vol].downs {
            let dm = &self.mappings[&d];
            if dm.owns(g) || seen.contains(&d) {
                continue;
            }
            let from = self.view(vol, g, dm.link.expect("downs are linked").through);
            if !all && from != vol {
                continue;
            }
            seen.insert(d);
            // The dependant's own readers of its physical data go first: they read it before
            // this copy overwrites it.
            self.protect(dm.target, g, false, seen, plan);
            plan.push_copy(from, dm.target);
            plan.marks.push(Op::MarkSplit { map: d, grain: g });
        }
    }

    /// Plan for a host write to grain `g` of `vol`; `whole` when it covers the whole grain
    /// (§3.5, §3.6). Call with the grain lock held exclusively.
    pub fn plan_write(&self, vol: VolId, g: u64, whole: bool) -> GrainPlan {
        let v = &self.volumes[&vol];
        let own = v.up.filter(|m| !self.mappings[m].owns(g));
        let mut plan = GrainPlan {
            grain: g,
            visible: own.is_none(),
            ..Default::default()
        };
        let mut seen: BTreeSet<MapId> = own.into_iter().collect();
        self.protect(vol, g, true, &mut seen, &mut plan);
        if own.is_some() && !whole {
            plan.push_copy(self.resolve(vol, g), vol);
        }
        for m in v.recorders.iter().map(|id| &self.mappings[id]) {
            if m.recording && g < m.grains() && m.diff.as_ref().is_some_and(|d| !d.get(g)) {
                plan.marks.push(Op::MarkDiff {
                    map: m.id,
                    grain: g,
                });
            }
        }
        if let Some(m) = own {
            plan.marks.push(Op::MarkSplit { map: m, grain: g });
        }
        plan
    }

    /// Plan that copies grain `g` into mapping `map`'s target and marks it split (background
    /// copy, cleaning). `None` when the grain is already split or the mapping is not linked.
    fn plan_materialize(&self, map: MapId, g: u64) -> Option<GrainPlan> {
        let m = &self.mappings[&map];
        if m.link.is_none() || m.owns(g) {
            return None;
        }
        let mut plan = GrainPlan {
            grain: g,
            ..Default::default()
        };
        let mut seen = BTreeSet::from([map]);
        self.protect(m.target, g, false, &mut seen, &mut plan);
        plan.push_copy(self.resolve(m.target, g), m.target);
        plan.marks.push(Op::MarkSplit { map, grain: g });
        Some(plan)
    }

    /// The next background-copy step of a copying mapping at or after grain `from` (wrapping):
    /// copy the grain's current image into the target (§3.7). `None` when every grain is split.
    pub fn plan_background(&self, map: MapId, from: u64) -> Option<GrainPlan> {
        let m = self.mappings.get(&map)?;
        if m.state != MapState::Copying {
            return None;
        }
        let g = m.split.next_zero(from)?;
        self.plan_materialize(map, g)
    }

    /// Whether dependant `d` of stopping mapping `map` still needs grain data from its target:
    /// the target holds the grain, or `d` reads the target's physical data directly.
    fn clean_needed(&self, t: &Mapping, d: &Mapping, g: u64) -> bool {
        !d.owns(g) && (t.owns(g) || d.link.unwrap().through != Some(t.id))
    }

    /// Whether a stopping mapping still has grains its dependants need (§3.7).
    pub fn needs_cleaning(&self, map: MapId) -> bool {
        let Some(m) = self.mappings.get(&map) else {
            return false;
        };
        if m.link.is_none() {
            return false;
        }
        // A dependant may map more grains than this mapping (its source, this target, is
        // larger): past this mapping's range the target owns its data, so those count as split.
        self.volumes[&m.target].downs.iter().any(|d| {
            let dm = &self.mappings[d];
            if dm.link.unwrap().through != Some(map) {
                !dm.split.all()
            } else {
                m.split.prev_set_and_clear_in(&dm.split, u64::MAX).is_some()
            }
        })
    }

    /// The next cleaning step of a stopping mapping: the highest grain at or below `from`
    /// (wrapping) that a dependant still needs, with the copies that hand it over.
    pub fn plan_clean(&self, map: MapId, from: u64) -> Option<GrainPlan> {
        let m = self.mappings.get(&map)?;
        m.link?;
        if m.state != MapState::Stopping {
            return None;
        }
        let downs = &self.volumes[&m.target].downs;
        // Closest candidate at or below `from`, else the highest one (wrap).
        let key = |g: u64| if g <= from { (1, g) } else { (0, g) };
        let g = downs
            .iter()
            .filter_map(|d| {
                let dm = &self.mappings[d];
                if dm.link.unwrap().through != Some(map) {
                    dm.split.prev_zero(from)
                } else {
                    m.split.prev_set_and_clear_in(&dm.split, from)
                }
            })
            .max_by_key(|g| key(*g))?;
        let mut plan = GrainPlan {
            grain: g,
            ..Default::default()
        };
        for d in downs {
            let dm = &self.mappings[d];
            if self.clean_needed(m, dm, g)
                && let Some(p) = self.plan_materialize(*d, g)
            {
                plan.copies.extend(p.copies);
                plan.marks.extend(p.marks);
            }
        }
        Some(plan)
    }

    /// CopyComplete may be applied: every grain split and no dependant reads through the target.
    pub fn copy_complete_ready(&self, map: MapId) -> bool {
        let Some(m) = self.mappings.get(&map) else {
            return false;
        };
        m.state == MapState::Copying
            && m.split.all()
            && self.volumes[&m.target]
                .downs
                .iter()
                .all(|d| self.mappings[d].split.all())
    }

    /// The grains for which a read of `src` lands on `tgt`'s physical data. Every grain's walk
    /// visits the same volumes and only stops at different ones, so this runs word by word
    /// along the walk instead of grain by grain.
    fn lands_on(&self, src: VolId, tgt: VolId, n: u64) -> Bitmap {
        let mut out = Bitmap::zeros(n);
        let mut open = Bitmap::ones(n);
        let (mut v, mut through) = (src, self.volumes[&src].up);
        for _ in 0..=self.volumes.len() {
            let Some(up) = self.volumes[&v].up.filter(|u| Some(*u) == through) else {
                if v == tgt {
                    out.or(&open);
                }
                return out;
            };
            let m = &self.mappings[&up];
            if v == tgt {
                out.or_and(&open, &m.split);
            }
            open.and_not(&m.split);
            // Every grain has found its volume. The links can form a ring (a restore between
            // snapshots of each other) that each grain leaves at a split mapping of its own.
            if open.none() {
                return out;
            }
            let link = m.link.expect("a volume's up mapping is linked");
            (v, through) = (link.up, link.through);
        }
        unreachable!("cascade walk from {src} does not end")
    }

    /// Links a prepared mapping into the cascade and initialises its bitmaps (T1 step 3).
    pub(super) fn link_and_init(&mut self, id: MapId) {
        let (src, tgt, n) = {
            let m = &self.mappings[&id];
            (m.source, m.target, m.grains())
        };
        let mut split = Bitmap::zeros(n);
        {
            let m = self.mappings.get_mut(&id).unwrap();
            if let Some(diff) = m.diff.as_mut() {
                // Incremental (§3.8): only grains changed since a complete copy need copying.
                if m.baseline && m.recording {
                    split.assign_not(diff);
                }
                diff.fill(false);
                m.recording = true;
            }
        }
        // A restore: grains whose new image already sits in the target's own data are split.
        if !self.volumes[&tgt].downs.is_empty() {
            let lands = self.lands_on(src, tgt, n);
            debug_assert!(
                n > 4096 || (0..n).all(|g| lands.get(g) == (self.resolve(src, g) == tgt))
            );
            split.or(&lands);
        }
        // Incremental mappings that use the target see its content change where unsplit.
        let others: Vec<MapId> = self
            .mappings_of(tgt)
            .filter(|o| o.id != id && o.incremental)
            .map(|o| o.id)
            .collect();
        for o in &others {
            let om = self.mappings.get_mut(o).unwrap();
            if let Some(d) = om.diff.as_mut() {
                d.or_not(&split);
            }
            // More than 4 other incremental mappings on one target: recording stops (§2.3 T1).
            if others.len() > 4 {
                om.recording = false;
            }
        }
        // Older mappings of the source move below the new target, which holds exactly the
        // source's image now, so a source write copies a grain once whatever the number of
        // snapshots. Those that read the source's own data (a restore made it a target after
        // they were linked) must keep reading it and stay. A mapping with background copy (a
        // clone, a restore) takes over no one: it is meant to complete, and a copy-rate-0
        // snapshot reading through it would keep it from ever completing.
        // Only mappings whose reads the new target holds move: their range within the new
        // one's, and no byte they read past the new target's end (a source that grew since
        // they started is mapped further by the new one; never the reverse).
        let takes_over = self.mappings[&id].copy_rate == 0;
        let (src_up, tgt_size) = (self.volumes[&src].up, self.volumes[&tgt].size);
        let downs = std::mem::take(&mut self.volumes.get_mut(&src).unwrap().downs);
        let (moved, kept): (Vec<MapId>, Vec<MapId>) = downs.into_iter().partition(|d| {
            let dm = &self.mappings[d];
            let reads = self.volumes[&dm.target]
                .size
                .min(dm.grains() * dm.grain.bytes());
            takes_over
                && dm.link.unwrap().through == src_up
                && dm.grains() <= n
                && reads <= tgt_size
        });
        for d in &moved {
            self.mappings.get_mut(d).unwrap().link = Some(Link {
                up: tgt,
                through: Some(id),
            });
        }
        self.volumes.get_mut(&tgt).unwrap().downs.extend(moved);
        let s = self.volumes.get_mut(&src).unwrap();
        s.downs = kept;
        s.downs.push(id);
        self.volumes.get_mut(&tgt).unwrap().up = Some(id);
        let m = self.mappings.get_mut(&id).unwrap();
        m.link = Some(Link {
            up: src,
            through: src_up,
        });
        m.split = split;
    }

    /// Removes an active mapping from the cascade; its dependants read through its upstream.
    pub(super) fn unlink(&mut self, id: MapId) {
        let Some(link) = self.mappings[&id].link else {
            return;
        };
        let t = self.mappings[&id].target;
        let mut downs = std::mem::take(&mut self.volumes.get_mut(&t).unwrap().downs);
        // After a restore completes, the restore mapping can read through its own target; it
        // must not come back as its own dependant.
        downs.retain(|d| *d != id);
        for d in &downs {
            // The walk continues exactly as it did through the removed link.
            self.mappings.get_mut(d).unwrap().link = Some(link);
        }
        let u = self.volumes.get_mut(&link.up).unwrap();
        u.downs.retain(|x| *x != id);
        u.downs.extend(downs);
        self.volumes.get_mut(&t).unwrap().up = None;
        self.mappings.get_mut(&id).unwrap().link = None;
    }
}

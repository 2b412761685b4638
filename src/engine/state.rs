//! The command side: validation and the state machine (FLASHCOPY.md §2, §4, §6, §8).
//! Every handler checks everything first and mutates only after the last check passed.

use super::*;
use std::collections::BTreeSet;

fn check_name(name: &str) -> Result<(), EngineError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidName(name.to_string()))
    }
}

fn check_rate(r: u8) -> Result<(), EngineError> {
    if r <= MAX_RATE {
        Ok(())
    } else {
        Err(EngineError::InvalidRate(r))
    }
}

fn bad(m: &Mapping, action: &'static str) -> EngineError {
    EngineError::BadState {
        map: m.id,
        state: m.state,
        action,
    }
}

impl Engine {
    pub(super) fn apply_inner(&mut self, op: &Op, ev: &mut Vec<Event>) -> Result<(), EngineError> {
        match op {
            Op::CreateVolume {
                id,
                name,
                size,
                origin,
            } => self.create_volume(*id, name, *size, origin),
            Op::DeleteVolume { id } => self.delete_volume(*id),
            Op::ResizeVolume { id, size } => self.resize_volume(*id, *size),
            Op::RenameVolume { id, name } => self.rename_volume(*id, name),
            Op::CreateMapping { id, spec } => self.create_mapping(*id, spec),
            Op::Prepare { map, restore } => {
                let m = self.standalone(*map, "prepare")?;
                self.check_prepare(m, *restore)?;
                self.prepare(*map, *restore, ev);
                Ok(())
            }
            Op::FlushDone { map } => {
                let m = self.standalone(*map, "flush done")?;
                if m.state != MapState::Preparing {
                    return Err(bad(m, "flush done"));
                }
                self.set_state(*map, MapState::Prepared, ev);
                Ok(())
            }
            Op::FlushFailed { map } => {
                let m = self.standalone(*map, "flush failed")?;
                if m.state != MapState::Preparing {
                    return Err(bad(m, "flush failed"));
                }
                self.set_state(*map, MapState::Stopped, ev);
                Ok(())
            }
            Op::Start { map, now } => {
                let m = self.standalone(*map, "start")?;
                if m.state != MapState::Prepared {
                    return Err(bad(m, "start (prepare it first)"));
                }
                self.start(&[*map], *now, ev);
                Ok(())
            }
            Op::Stop { map, force, split } => {
                let m = self.standalone(*map, "stop")?;
                self.check_stop(m, *split)?;
                self.stop(*map, *force, ev);
                Ok(())
            }
            Op::DeleteMapping { map, force } => {
                let m = self.get_map(*map)?;
                match m.state {
                    MapState::IdleOrCopied => {}
                    MapState::Stopped if *force => {}
                    MapState::Stopped => return Err(EngineError::DeleteNeedsForce(*map)),
                    _ => return Err(bad(m, "delete (stop it first)")),
                }
                self.delete_mapping(*map, ev);
                Ok(())
            }
            Op::Modify { map, change } => self.modify(*map, change, ev),
            Op::IoError { map } => {
                let m = self.get_map(*map)?;
                // §2.3: an I/O error stops a preparing, copying or stopping mapping.
                if !matches!(
                    m.state,
                    MapState::Preparing | MapState::Copying | MapState::Stopping
                ) {
                    return Err(bad(m, "I/O error"));
                }
                // §4.4: the group is the unit of state, so every member stops.
                let ids = self.unit_of(*map);
                for id in ids {
                    if self.mappings[&id].state != MapState::Stopped {
                        self.stop(id, true, ev);
                    }
                }
                Ok(())
            }
            Op::BitmapOffline { map } => {
                let m = self.get_map(*map)?;
                match m.state {
                    MapState::Copying | MapState::Stopping => {
                        let from = m.state;
                        self.mappings.get_mut(map).unwrap().suspended_from = Some(from);
                        self.set_state(*map, MapState::Suspended, ev);
                    }
                    MapState::Suspended => {}
                    _ => self.mappings.get_mut(map).unwrap().bitmap_offline = true,
                }
                Ok(())
            }
            Op::BitmapOnline { map } => {
                let m = self.get_map(*map)?;
                // §2.3: n/a while copying or stopping (metadata loss there means suspended),
                // except to clear a flag left by a BitmapOffline before the mapping started.
                if matches!(m.state, MapState::Copying | MapState::Stopping) && !m.bitmap_offline {
                    return Err(bad(m, "bitmap online"));
                }
                if m.state == MapState::Suspended {
                    let back = m.suspended_from.unwrap_or(MapState::Copying);
                    self.mappings.get_mut(map).unwrap().suspended_from = None;
                    self.set_state(*map, back, ev);
                } else {
                    self.mappings.get_mut(map).unwrap().bitmap_offline = false;
                }
                Ok(())
            }
            Op::CopyComplete { map } => {
                let m = self.get_map(*map)?;
                if m.state != MapState::Copying || !self.copy_complete_ready(*map) {
                    return Err(bad(m, "copy complete (grains left or dependants remain)"));
                }
                self.unlink(*map);
                self.finish_complete(*map, ev);
                Ok(())
            }
            Op::CleanComplete { map } => {
                let m = self.get_map(*map)?;
                if m.state != MapState::Stopping || self.needs_cleaning(*map) {
                    return Err(bad(m, "clean complete (grains left to clean)"));
                }
                self.finish_stopping(*map, ev);
                Ok(())
            }
            Op::CreateGroup {
                id,
                name,
                autodelete,
            } => {
                if self.groups.len() >= self.limits.groups_total {
                    return Err(EngineError::TooManyGroups(self.groups.len()));
                }
                if id.0 < self.next_group {
                    return Err(EngineError::IdInUse(id.0));
                }
                let name = name.clone().unwrap_or_else(|| id.to_string());
                check_name(&name)?;
                if self.group_by_name(&name).is_some() {
                    return Err(EngineError::NameInUse(name));
                }
                self.next_group = id.0 + 1;
                let g = Group {
                    id: *id,
                    name,
                    autodelete: *autodelete,
                    members: Vec::new(),
                };
                self.groups.insert(*id, g);
                Ok(())
            }
            Op::PrepareGroup { group, restore } => {
                let members = self.group_members(*group, "prepare")?;
                for id in &members {
                    self.check_prepare(&self.mappings[id], *restore)?;
                }
                for id in members {
                    self.prepare(id, *restore, ev);
                }
                Ok(())
            }
            Op::GroupFlushDone { group } | Op::GroupFlushFailed { group } => {
                let members = self.group_members(*group, "flush done")?;
                if members
                    .iter()
                    .any(|id| self.mappings[id].state != MapState::Preparing)
                {
                    return Err(self.bad_group(*group, "flush done"));
                }
                let to = match op {
                    Op::GroupFlushDone { .. } => MapState::Prepared,
                    _ => MapState::Stopped,
                };
                for id in members {
                    self.set_state(id, to, ev);
                }
                Ok(())
            }
            Op::StartGroup { group, now } => {
                let members = self.group_members(*group, "start")?;
                if members
                    .iter()
                    .any(|id| self.mappings[id].state != MapState::Prepared)
                {
                    return Err(self.bad_group(*group, "start (every member must be prepared)"));
                }
                self.start(&members, *now, ev);
                Ok(())
            }
            Op::StopGroup {
                group,
                force,
                split,
            } => {
                let members = self.group_members(*group, "stop")?;
                let state = self.group_state(*group);
                let stoppable = [
                    MapState::Prepared,
                    MapState::Copying,
                    MapState::Stopping,
                    MapState::Suspended,
                    MapState::Preparing,
                ];
                if !matches!(state, Some(GroupState::Map(s)) if stoppable.contains(&s)) {
                    // Stop of an idle or stopped group is a no-op, as for a mapping (S0).
                    return Ok(());
                }
                if *split
                    && let Some(m) = members
                        .iter()
                        .map(|id| &self.mappings[id])
                        .find(|m| m.progress() < 100)
                {
                    return Err(EngineError::SplitIncomplete(m.id, m.progress()));
                }
                for id in members {
                    if self
                        .mappings
                        .get(&id)
                        .is_some_and(|m| stoppable.contains(&m.state))
                    {
                        self.stop(id, *force, ev);
                    }
                }
                Ok(())
            }
            Op::DeleteGroup { group, force } => {
                let g = self
                    .groups
                    .get(group)
                    .ok_or(EngineError::NoSuchGroup(*group))?;
                if !g.members.is_empty() {
                    if !force {
                        return Err(EngineError::GroupNotEmpty(*group, g.members.len()));
                    }
                    let st = self.group_state(*group);
                    if !matches!(
                        st,
                        Some(GroupState::Map(MapState::IdleOrCopied | MapState::Stopped))
                    ) {
                        return Err(self.bad_group(*group, "delete (stop it first)"));
                    }
                }
                for id in self.groups.remove(group).unwrap().members {
                    self.mappings.get_mut(&id).unwrap().group = None;
                }
                ev.push(Event::GroupDeleted { group: *group });
                Ok(())
            }
            Op::MarkSplit { map, grain } => {
                let m = self.get_map(*map)?;
                if m.link.is_none() || *grain >= m.grains() {
                    return Err(bad(m, "mark split"));
                }
                self.mappings.get_mut(map).unwrap().split.set(*grain);
                Ok(())
            }
            Op::MarkDiff { map, grain } => {
                let m = self.get_map(*map)?;
                if m.diff.is_none() || *grain >= m.grains() {
                    return Err(bad(m, "mark difference"));
                }
                self.mappings
                    .get_mut(map)
                    .unwrap()
                    .diff
                    .as_mut()
                    .unwrap()
                    .set(*grain);
                Ok(())
            }
        }
    }

    fn get_map(&self, id: MapId) -> Result<&Mapping, EngineError> {
        self.mappings.get(&id).ok_or(EngineError::NoSuchMapping(id))
    }

    /// A mapping that may be driven on its own (not through a group).
    fn standalone(&self, id: MapId, _action: &'static str) -> Result<&Mapping, EngineError> {
        let m = self.get_map(id)?;
        match m.group {
            Some(g) => Err(EngineError::InGroup(id, g)),
            None => Ok(m),
        }
    }

    fn group_members(&self, id: GroupId, action: &'static str) -> Result<Vec<MapId>, EngineError> {
        let g = self.groups.get(&id).ok_or(EngineError::NoSuchGroup(id))?;
        if g.members.is_empty() {
            return Err(EngineError::BadGroupState {
                group: id,
                state: "empty".into(),
                action,
            });
        }
        Ok(g.members.clone())
    }

    fn bad_group(&self, id: GroupId, action: &'static str) -> EngineError {
        let state = self
            .group_state(id)
            .map_or("deleted".into(), |s| s.to_string());
        EngineError::BadGroupState {
            group: id,
            state,
            action,
        }
    }

    /// The mappings that change state together: the whole group, or the mapping alone.
    fn unit_of(&self, id: MapId) -> Vec<MapId> {
        match self.mappings[&id].group {
            Some(g) => self.groups[&g].members.clone(),
            None => vec![id],
        }
    }

    fn set_state(&mut self, id: MapId, to: MapState, ev: &mut Vec<Event>) {
        let m = self.mappings.get_mut(&id).unwrap();
        if m.state != to {
            ev.push(Event::MapState {
                map: id,
                from: m.state,
                to,
            });
            m.state = to;
            if to == MapState::Stopped {
                // Whatever the target held is no longer a known image.
                m.baseline = false;
            }
        }
    }

    /// Validates a volume op without applying it (the volume layer creates or resizes the
    /// store first). Other ops are accepted here and validated by [`Engine::apply`].
    pub fn check_volume_op(&self, op: &Op) -> Result<(), EngineError> {
        match op {
            Op::CreateVolume {
                id,
                name,
                size,
                origin,
            } => self.check_create_volume(*id, name, *size, origin),
            Op::ResizeVolume { id, size } => self.check_resize(*id, *size),
            Op::DeleteVolume { id } => self.volume_unused(*id).map(|_| ()),
            _ => Ok(()),
        }
    }

    fn check_create_volume(
        &self,
        id: VolId,
        name: &str,
        size: u64,
        origin: &str,
    ) -> Result<(), EngineError> {
        if id.0 < self.next_vol {
            return Err(EngineError::IdInUse(id.0));
        }
        check_name(name)?;
        if origin.len() > 1024 || !origin.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(EngineError::InvalidOrigin(origin.to_string()));
        }
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(EngineError::InvalidSize(size));
        }
        if self.volume_by_name(name).is_some() {
            return Err(EngineError::NameInUse(name.to_string()));
        }
        Ok(())
    }

    fn create_volume(
        &mut self,
        id: VolId,
        name: &str,
        size: u64,
        origin: &str,
    ) -> Result<(), EngineError> {
        self.check_create_volume(id, name, size, origin)?;
        self.next_vol = id.0 + 1;
        let v = Volume {
            id,
            name: name.to_string(),
            size,
            origin: origin.to_string(),
            maps: Vec::new(),
            up: None,
            downs: Vec::new(),
            domain: None,
            offline: None,
            recorders: Vec::new(),
        };
        self.volumes.insert(id, v);
        Ok(())
    }

    /// A volume that mappings use may grow but not shrink: every mapping keeps the range it
    /// mapped when it was created, and bytes past it are the target's own (FLASHCOPY.md §1.1
    /// extension: volumes of different sizes). A volume that ends inside the last grain of a
    /// range it is the target of may not grow, as the grown bytes of that grain would show the
    /// source's data until split and zeros after.
    fn check_resize(&self, id: VolId, size: u64) -> Result<(), EngineError> {
        let v = self.volumes.get(&id).ok_or(EngineError::NoSuchVolume(id))?;
        if size == 0 || !size.is_multiple_of(SECTOR) {
            return Err(EngineError::InvalidSize(size));
        }
        if size < v.size {
            return self.volume_unused(id).map(|_| ());
        }
        if size == v.size {
            return Ok(());
        }
        match self
            .mappings_of(id)
            .find(|m| m.target == id && m.grains() * m.grain.bytes() > v.size)
        {
            Some(m) => Err(EngineError::GrowInsideGrain {
                vol: id,
                size: v.size,
                map: m.id,
                grain: m.grain.bytes(),
            }),
            None => Ok(()),
        }
    }

    fn volume_unused(&self, id: VolId) -> Result<&Volume, EngineError> {
        let v = self.volumes.get(&id).ok_or(EngineError::NoSuchVolume(id))?;
        // A volume is in use while a mapping names it, or while an older snapshot still reads
        // through it after its own mapping was deleted.
        match v.maps.first().or(v.downs.first()) {
            Some(m) => Err(EngineError::VolumeInUse(id, *m)),
            None => Ok(v),
        }
    }

    fn delete_volume(&mut self, id: VolId) -> Result<(), EngineError> {
        self.volume_unused(id)?;
        self.volumes.remove(&id);
        Ok(())
    }

    fn rename_volume(&mut self, id: VolId, name: &str) -> Result<(), EngineError> {
        if !self.volumes.contains_key(&id) {
            return Err(EngineError::NoSuchVolume(id));
        }
        check_name(name)?;
        match self.volume_by_name(name) {
            Some(v) if v.id == id => return Ok(()),
            Some(_) => return Err(EngineError::NameInUse(name.to_string())),
            None => {}
        }
        self.volumes.get_mut(&id).unwrap().name = name.to_string();
        Ok(())
    }

    fn resize_volume(&mut self, id: VolId, size: u64) -> Result<(), EngineError> {
        self.check_volume_op(&Op::ResizeVolume { id, size })?;
        self.volumes.get_mut(&id).unwrap().size = size;
        Ok(())
    }

    /// Mappings connected to `start` through shared volumes (any state).
    fn connected(&self, start: &[VolId]) -> BTreeSet<MapId> {
        let mut seen_v: BTreeSet<VolId> = start.iter().copied().collect();
        let mut todo: Vec<VolId> = start.to_vec();
        let mut maps = BTreeSet::new();
        while let Some(v) = todo.pop() {
            for (m, w) in self.neighbours(v) {
                maps.insert(m);
                if seen_v.insert(w) {
                    todo.push(w);
                }
            }
        }
        maps
    }

    fn create_mapping(&mut self, id: MapId, spec: &MappingSpec) -> Result<(), EngineError> {
        if id.0 < self.next_map {
            return Err(EngineError::IdInUse(id.0));
        }
        let src = self
            .volumes
            .get(&spec.source)
            .ok_or(EngineError::NoSuchVolume(spec.source))?;
        let tgt = self
            .volumes
            .get(&spec.target)
            .ok_or(EngineError::NoSuchVolume(spec.target))?;
        if spec.source == spec.target {
            return Err(EngineError::SameVolume(spec.source));
        }
        check_rate(spec.copy_rate)?;
        check_rate(spec.clean_rate)?;
        let name = spec.name.clone().unwrap_or_else(|| id.to_string());
        check_name(&name)?;
        if self.mapping_by_name(&name).is_some() {
            return Err(EngineError::NameInUse(name));
        }
        if let Some(other) = self.mappings_of(tgt.id).find(|m| m.target == tgt.id) {
            return Err(EngineError::TargetInUse(tgt.id, other.id));
        }
        let per_source = self
            .mappings_of(src.id)
            .filter(|m| m.source == src.id)
            .count();
        if per_source >= self.limits.maps_per_source {
            return Err(EngineError::TooManyMapsForSource(src.id, per_source));
        }
        if self.mappings.len() >= self.limits.maps_total {
            return Err(EngineError::TooManyMaps(self.mappings.len()));
        }
        let connected = self.connected(&[src.id, tgt.id]);
        if connected.len() + 1 > self.limits.maps_per_connected_set {
            return Err(EngineError::ConnectedSetFull(
                self.limits.maps_per_connected_set,
            ));
        }
        // One grain size per connected cascade: the new mapping may join two sets only when
        // they agree, and inherits their size when none is asked for.
        let inherited = connected
            .iter()
            .map(|m| &self.mappings[m])
            .next()
            .map(|m| (m.grain, m.id));
        let grain = spec
            .grain
            .or(inherited.map(|(g, _)| g))
            .unwrap_or(GrainSize::K256);
        if let Some(m) = connected
            .iter()
            .map(|m| &self.mappings[m])
            .find(|m| m.grain != grain)
        {
            return Err(EngineError::GrainSizeConflict {
                requested: grain.bytes() / 1024,
                existing: m.grain.bytes() / 1024,
                mapping: m.id,
            });
        }
        if let Some(g) = spec.group {
            let grp = self.groups.get(&g).ok_or(EngineError::NoSuchGroup(g))?;
            self.check_group_joinable(g)?;
            if grp.members.len() >= self.limits.maps_per_group {
                return Err(EngineError::GroupFull(g, grp.members.len()));
            }
        }
        // The mapped range (an extension of FlashCopy, which needs equal sizes): the first
        // min(source, target) bytes, rounded up to whole grains; a larger target owns
        // everything past the range. Only equal sizes may end inside a grain: a larger reader
        // would otherwise read through bytes past the smaller volume's end, which its store
        // does not hold.
        let mapped = src.size.min(tgt.size);
        if src.size != tgt.size && !mapped.is_multiple_of(grain.bytes()) {
            return Err(EngineError::SizeMismatch {
                src: src.id,
                source_size: src.size,
                target: tgt.id,
                target_size: tgt.size,
                grain: grain.bytes(),
            });
        }
        let need = bitmap_bytes(mapped, grain, spec.incremental);
        let free = self
            .limits
            .bitmap_budget_bytes
            .saturating_sub(self.bitmap_used);
        if need > free {
            return Err(EngineError::BitmapBudget {
                need,
                free,
                budget: self.limits.bitmap_budget_bytes,
            });
        }
        // All checks passed.
        let grains = grain.grains(mapped);
        let m = Mapping {
            id,
            name,
            source: spec.source,
            target: spec.target,
            grain,
            copy_rate: spec.copy_rate,
            clean_rate: spec.clean_rate,
            incremental: spec.incremental,
            autodelete: spec.autodelete,
            group: spec.group,
            state: MapState::IdleOrCopied,
            restoring: false,
            start_time: None,
            complete: false,
            bitmap_offline: false,
            split: Bitmap::zeros(grains),
            diff: spec.incremental.then(|| Bitmap::zeros(grains)),
            recording: true,
            baseline: false,
            link: None,
            suspended_from: None,
        };
        self.next_map = id.0 + 1;
        self.bitmap_used += need;
        for v in [spec.source, spec.target] {
            self.volumes.get_mut(&v).unwrap().maps.push(id);
        }
        if let Some(g) = spec.group {
            self.groups.get_mut(&g).unwrap().members.push(id);
        }
        self.mappings.insert(id, m);
        Ok(())
    }

    /// Group membership may change only while the group is idle, stopped or empty (M1).
    fn check_group_joinable(&self, g: GroupId) -> Result<(), EngineError> {
        match self.group_state(g) {
            None => Err(EngineError::NoSuchGroup(g)),
            Some(
                GroupState::Empty | GroupState::Map(MapState::IdleOrCopied | MapState::Stopped),
            ) => Ok(()),
            Some(s) => Err(EngineError::GroupBusy(g, s.to_string())),
        }
    }

    fn check_prepare(&self, m: &Mapping, restore: bool) -> Result<(), EngineError> {
        if !matches!(m.state, MapState::IdleOrCopied | MapState::Stopped) {
            return Err(bad(m, "prepare"));
        }
        if !restore && let Some(active) = self.active_reader_of(m.target) {
            return Err(EngineError::TargetIsActiveSource {
                target: m.target,
                active,
            });
        }
        Ok(())
    }

    /// An active mapping that reads from `vol` (its source, or a link up to it).
    fn active_reader_of(&self, vol: VolId) -> Option<MapId> {
        let v = &self.volumes[&vol];
        v.downs.first().copied().or_else(|| {
            self.mappings_of(vol)
                .find(|o| o.source == vol && o.state.is_active())
                .map(|o| o.id)
        })
    }

    fn prepare(&mut self, id: MapId, restore: bool, ev: &mut Vec<Event>) {
        let target = self.mappings[&id].target;
        let restoring = restore && self.active_reader_of(target).is_some();
        let m = self.mappings.get_mut(&id).unwrap();
        m.restoring = restoring;
        m.complete = false;
        self.set_state(id, MapState::Preparing, ev);
    }

    /// T1 for one mapping or a whole group: every member switches inside this one call.
    fn start(&mut self, ids: &[MapId], now: u64, ev: &mut Vec<Event>) {
        for &id in ids {
            self.link_and_init(id);
            let m = self.mappings.get_mut(&id).unwrap();
            m.start_time = Some(now);
            self.set_state(id, MapState::Copying, ev);
        }
    }

    fn check_stop(&self, m: &Mapping, split: bool) -> Result<(), EngineError> {
        if split && m.progress() < 100 {
            return Err(EngineError::SplitIncomplete(m.id, m.progress()));
        }
        Ok(())
    }

    /// S0/S1/S2 for one mapping (already validated).
    fn stop(&mut self, id: MapId, force: bool, ev: &mut Vec<Event>) {
        let state = self.mappings[&id].state;
        match state {
            MapState::IdleOrCopied | MapState::Stopped => {}
            MapState::Preparing | MapState::Prepared => self.set_state(id, MapState::Stopped, ev),
            MapState::Copying | MapState::Stopping if !force => {
                self.set_state(id, MapState::Stopping, ev);
                if !self.needs_cleaning(id) {
                    self.finish_stopping(id, ev);
                }
            }
            // Forced, or suspended (its metadata is unreachable, so it cannot clean): the
            // mapping and everything that still depends on its target stop at once.
            _ => {
                for d in self.dependants_closure(id) {
                    self.unlink(d);
                    self.set_state(d, MapState::Stopped, ev);
                }
            }
        }
    }

    /// `id` plus every active mapping below it that still reads through it, deepest first.
    fn dependants_closure(&self, id: MapId) -> Vec<MapId> {
        let mut out = Vec::new();
        // Restores make cycles of links: visit each mapping once.
        let mut seen = BTreeSet::from([id]);
        let mut walk = vec![(id, false)];
        while let Some((m, expanded)) = walk.pop() {
            if expanded {
                out.push(m);
                continue;
            }
            walk.push((m, true));
            let t = self.mappings[&m].target;
            for d in &self.volumes[&t].downs {
                if !self.mappings[d].split.all() && seen.insert(*d) {
                    walk.push((*d, false));
                }
            }
        }
        out
    }

    /// Stopping → stopped, or idle_or_copied when the target holds a complete image (S3).
    fn finish_stopping(&mut self, id: MapId, ev: &mut Vec<Event>) {
        let full = self.mappings[&id].split.all();
        self.unlink(id);
        if full {
            self.finish_complete(id, ev);
        } else {
            self.set_state(id, MapState::Stopped, ev);
        }
    }

    /// The target now holds a complete, independent copy (C1).
    fn finish_complete(&mut self, id: MapId, ev: &mut Vec<Event>) {
        let m = self.mappings.get_mut(&id).unwrap();
        m.complete = true;
        m.baseline = true;
        self.set_state(id, MapState::IdleOrCopied, ev);
        if self.mappings[&id].autodelete {
            self.delete_mapping(id, ev);
        }
    }

    fn delete_mapping(&mut self, id: MapId, ev: &mut Vec<Event>) {
        let m = self.mappings.remove(&id).unwrap();
        debug_assert!(m.link.is_none());
        self.bitmap_used -= m.bitmap_bytes();
        for v in [m.source, m.target] {
            self.volumes.get_mut(&v).unwrap().maps.retain(|x| *x != id);
        }
        ev.push(Event::MapDeleted { map: id });
        if let Some(g) = m.group {
            self.leave_group(id, g, ev);
        }
    }

    fn leave_group(&mut self, id: MapId, g: GroupId, ev: &mut Vec<Event>) {
        let grp = self.groups.get_mut(&g).unwrap();
        grp.members.retain(|x| *x != id);
        if grp.members.is_empty() && grp.autodelete {
            self.groups.remove(&g);
            ev.push(Event::GroupDeleted { group: g });
        }
    }

    fn modify(
        &mut self,
        id: MapId,
        c: &MappingChange,
        ev: &mut Vec<Event>,
    ) -> Result<(), EngineError> {
        let m = self.get_map(id)?;
        if let Some(name) = &c.name {
            if c.copy_rate.is_some()
                || c.clean_rate.is_some()
                || c.autodelete.is_some()
                || c.group.is_some()
            {
                return Err(EngineError::NameWithOtherChanges);
            }
            check_name(name)?;
            if self.mapping_by_name(name).is_some_and(|o| o.id != id) {
                return Err(EngineError::NameInUse(name.clone()));
            }
        }
        if let Some(r) = c.copy_rate {
            check_rate(r)?;
        }
        if let Some(r) = c.clean_rate {
            check_rate(r)?;
        }
        if let Some(new_group) = c.group
            && new_group != m.group
        {
            if !matches!(m.state, MapState::IdleOrCopied | MapState::Stopped) {
                return Err(bad(m, "change of consistency group"));
            }
            for g in [m.group, new_group].into_iter().flatten() {
                self.check_group_joinable(g)?;
            }
            if let Some(g) = new_group {
                let n = self.groups[&g].members.len();
                if n >= self.limits.maps_per_group {
                    return Err(EngineError::GroupFull(g, n));
                }
            }
        }
        // All checks passed.
        let old_group = m.group;
        let m = self.mappings.get_mut(&id).unwrap();
        if let Some(name) = &c.name {
            m.name = name.clone();
        }
        if let Some(r) = c.copy_rate {
            m.copy_rate = r;
        }
        if let Some(r) = c.clean_rate {
            m.clean_rate = r;
        }
        if let Some(a) = c.autodelete {
            m.autodelete = a;
        }
        if let Some(new_group) = c.group
            && new_group != old_group
        {
            m.group = new_group;
            if let Some(g) = new_group {
                self.groups.get_mut(&g).unwrap().members.push(id);
            }
            if let Some(g) = old_group {
                self.leave_group(id, g, ev);
            }
        }
        // `chfcmap -autodelete on` on a complete mapping deletes it at once.
        let m = &self.mappings[&id];
        if c.autodelete == Some(true) && m.state == MapState::IdleOrCopied && m.complete {
            self.delete_mapping(id, ev);
        }
        Ok(())
    }
}

//! The FlashCopy engine: volumes, mappings, consistency groups, the state machine of FLASHCOPY.md
//! §2 and the copy-on-write planner of §3. Pure: no I/O, no clocks, no threads; time comes in with
//! the commands.
//!
//! Every change goes through [`Engine::apply`] with an [`Op`]. Ops are serialisable and the engine
//! is deterministic, so the metadata journal simply records the ops that were applied and replays
//! them after a crash. A rejected op returns an [`EngineError`] and changes nothing.
//!
//! # The cascade model
//!
//! Each *active* mapping (copying, stopping, suspended) has a link to the volume its target reads
//! through for grains that are not split: its `up`. For a lone snapshot `up` is the source; when a
//! newer mapping of the same source starts, the older ones are re-linked below the newer target, so
//! a source write copies a grain once, to the newest target, and older targets read through newer
//! ones (§3.3). A target that is itself used as a source gets its own mappings inserted directly
//! below it, which is the same rule.
//!
//! A read walks up from a volume while its grain is not split. Each link remembers which mapping
//! its upstream volume was itself a target of when the link was made, and the walk continues past
//! that volume only through that same mapping. This keeps a volume's older readers on its physical
//! data when the volume later becomes a target itself (a restore), and ends every walk even though
//! restores create cycles of links.
//!
//! Before anything changes what a dependant reads at a grain (a host write, a fill, a background or
//! cleaning copy), the planner first copies the dependant's current view into it and marks it
//! split (§3.6 step 1). The plans list copies in the order they must run and the split/difference
//! marks in the order they must become durable.

mod bitmap;
mod cbt;
mod error;
mod plan;
mod state;
mod types;

pub use bitmap::{Bitmap, decode_bounded};
pub use cbt::SnapshotView;
pub use error::EngineError;
pub use plan::{GrainCopy, GrainPlan, IoShape};
pub use types::*;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A volume as the engine sees it: an id, a name and a size. Its bytes live in a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Id.
    pub id: VolId,
    /// Unique name.
    pub name: String,
    /// Size in bytes, a multiple of 512.
    pub size: u64,
    /// What the volume was made from, as its creator recorded it (the CSI controller: the id of
    /// the snapshot or volume it was cloned from); empty for a blank volume. The engine gives it
    /// no meaning; it outlives the mapping that filled the volume, for idempotent re-creates.
    pub origin: String,
    /// Every mapping that uses this volume as source or target, in id order.
    maps: Vec<MapId>,
    /// The active mapping whose target this volume is.
    up: Option<MapId>,
    /// Active mappings whose link points at this volume.
    downs: Vec<MapId>,
    /// Derived after every command (so the I/O path costs the same with 1 or 256 mappings):
    /// the lock domain of the connected set and its grain size.
    domain: Option<(VolId, GrainSize)>,
    /// Derived: why host I/O must fail now, if it must.
    offline: Option<String>,
    /// Derived: incremental mappings that record writes to this volume.
    recorders: Vec<MapId>,
}

/// Where an active mapping's target reads unsplit grains from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Link {
    /// The volume read through.
    up: VolId,
    /// `up`'s own up mapping when this link was made. A read walk continues past `up` only
    /// while that is still `up`'s up mapping; if `up` has since become the target of another
    /// mapping (a restore), this mapping reads `up`'s physical data, which is what it saw.
    through: Option<MapId>,
}

/// A FlashCopy mapping (FLASHCOPY.md §1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Id.
    pub id: MapId,
    /// Unique name.
    pub name: String,
    /// Source volume.
    pub source: VolId,
    /// Target volume.
    pub target: VolId,
    /// Grain size (fixed).
    pub grain: GrainSize,
    /// Background copy rate 0–150.
    pub copy_rate: u8,
    /// Cleaning rate 0–150.
    pub clean_rate: u8,
    /// Incremental (fixed).
    pub incremental: bool,
    /// Delete when the copy completes.
    pub autodelete: bool,
    /// Consistency group.
    pub group: Option<GroupId>,
    /// State.
    pub state: MapState,
    /// Started with restore semantics (the target fed other active mappings).
    pub restoring: bool,
    /// Time of the last start (as passed in by the caller).
    pub start_time: Option<u64>,
    /// The target holds a complete copy (the last run completed).
    pub complete: bool,
    /// Metadata of this mapping is offline (idle/stopped incremental maps: volumes offline).
    pub bitmap_offline: bool,
    split: Bitmap,
    diff: Option<Bitmap>,
    /// Difference recording is on (off after too many incremental maps shared the target).
    recording: bool,
    /// Incremental: the target holds the image of the last completed run, plus the grains
    /// marked in `diff`, so a restart need copy only those.
    baseline: bool,
    link: Option<Link>,
    suspended_from: Option<MapState>,
}

impl Mapping {
    /// Number of grains of the mapped range: the first `min(source size, target size)` bytes
    /// when the mapping was created, rounded up to whole grains.
    pub fn grains(&self) -> u64 {
        self.split.len()
    }
    /// Whether grain `g` is split (the target holds its own data).
    pub fn is_split(&self, g: u64) -> bool {
        self.split.get(g)
    }
    /// Whether the target reads its own data at grain `g`: the grain is split, or lies past
    /// the mapped range (a target larger than its source owns the rest).
    pub fn owns(&self, g: u64) -> bool {
        g >= self.split.len() || self.split.get(g)
    }
    /// Whether every grain is split (stops at the first one that is not).
    pub fn split_all(&self) -> bool {
        self.split.all()
    }
    /// Split grains.
    pub fn split_count(&self) -> u64 {
        self.split.count_ones()
    }
    /// Background-copy progress in percent, floored so 100 means every grain is split (§5.2).
    pub fn progress(&self) -> u8 {
        if self.complete && !self.state.is_active() {
            return 100;
        }
        match self.grains() {
            0 => 100,
            n => (self.split_count() * 100 / n) as u8,
        }
    }
    /// Grains marked changed since the last start (incremental mappings).
    pub fn diff_count(&self) -> Option<u64> {
        self.diff.as_ref().map(Bitmap::count_ones)
    }
    /// Whether grain `g` is marked changed (incremental mappings).
    pub fn is_diff(&self, g: u64) -> bool {
        self.diff.as_ref().is_some_and(|d| d.get(g))
    }
    /// The volume this mapping's target reads through while active.
    pub fn upstream(&self) -> Option<VolId> {
        self.link.map(|l| l.up)
    }
    /// Bitmap bytes this mapping is charged (for its mapped range).
    pub fn bitmap_bytes(&self) -> u64 {
        bitmap_bytes(
            self.grains() * self.grain.bytes(),
            self.grain,
            self.incremental,
        )
    }
}

/// A consistency group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Id.
    pub id: GroupId,
    /// Unique name.
    pub name: String,
    /// Delete the group when its last mapping leaves.
    pub autodelete: bool,
    /// Member mappings.
    pub members: Vec<MapId>,
}

/// A command or data-path fact. The journal records exactly the ops the engine accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a volume (id from [`Engine::next_volume_id`]).
    CreateVolume {
        /// New id.
        id: VolId,
        /// Name.
        name: String,
        /// Size in bytes.
        size: u64,
        /// See [`Volume::origin`].
        origin: String,
    },
    /// Delete a volume that no mapping uses.
    DeleteVolume {
        /// Volume.
        id: VolId,
    },
    /// Resize a volume. One that mappings use may only grow (see [`Mapping::grains`]).
    ResizeVolume {
        /// Volume.
        id: VolId,
        /// New size in bytes.
        size: u64,
    },
    /// `mkfcmap`.
    CreateMapping {
        /// New id (from [`Engine::next_mapping_id`]).
        id: MapId,
        /// Attributes.
        spec: MappingSpec,
    },
    /// `prestartfcmap [-restore]`: → preparing; the data path flushes, then sends `FlushDone`.
    Prepare {
        /// Mapping.
        map: MapId,
        /// Allow a target that feeds active mappings.
        restore: bool,
    },
    /// The source was flushed: preparing → prepared.
    FlushDone {
        /// Mapping.
        map: MapId,
    },
    /// The flush failed: preparing → stopped.
    FlushFailed {
        /// Mapping.
        map: MapId,
    },
    /// `startfcmap`: prepared → copying; the point in time is `now`.
    Start {
        /// Mapping.
        map: MapId,
        /// Start time (caller's clock).
        now: u64,
    },
    /// `stopfcmap [-force] [-split]`.
    Stop {
        /// Mapping.
        map: MapId,
        /// Skip cleaning; also stops dependants.
        force: bool,
        /// Only at 100% progress.
        split: bool,
    },
    /// `rmfcmap [-force]`.
    DeleteMapping {
        /// Mapping.
        map: MapId,
        /// Needed for a stopped mapping.
        force: bool,
    },
    /// `chfcmap`.
    Modify {
        /// Mapping.
        map: MapId,
        /// What changes.
        change: MappingChange,
    },
    /// An I/O error while copying or stopping: → stopped (the whole group).
    IoError {
        /// Mapping.
        map: MapId,
    },
    /// Metadata access lost.
    BitmapOffline {
        /// Mapping.
        map: MapId,
    },
    /// Metadata access regained.
    BitmapOnline {
        /// Mapping.
        map: MapId,
    },
    /// Every grain split and no dependant: copying → idle_or_copied (or deleted with autodelete).
    CopyComplete {
        /// Mapping.
        map: MapId,
    },
    /// Nothing left to clean: stopping → stopped (or idle_or_copied when the target is complete).
    CleanComplete {
        /// Mapping.
        map: MapId,
    },
    /// `mkfcconsistgrp`.
    CreateGroup {
        /// New id (from [`Engine::next_group_id`]).
        id: GroupId,
        /// Name; `fccstgrp<id>` when absent.
        name: Option<String>,
        /// Delete when the last mapping leaves.
        autodelete: bool,
    },
    /// `prestartfcconsistgrp [-restore]`.
    PrepareGroup {
        /// Group.
        group: GroupId,
        /// Allow targets that feed active mappings.
        restore: bool,
    },
    /// Every member's source was flushed.
    GroupFlushDone {
        /// Group.
        group: GroupId,
    },
    /// A member's flush failed: every member → stopped.
    GroupFlushFailed {
        /// Group.
        group: GroupId,
    },
    /// `startfcconsistgrp`: every member switches at one instant.
    StartGroup {
        /// Group.
        group: GroupId,
        /// Start time.
        now: u64,
    },
    /// `stopfcconsistgrp [-force | -split]`.
    StopGroup {
        /// Group.
        group: GroupId,
        /// Skip cleaning.
        force: bool,
        /// Only when every member is at 100%.
        split: bool,
    },
    /// `rmfcconsistgrp [-force]`: with force, members become stand-alone.
    DeleteGroup {
        /// Group.
        group: GroupId,
        /// Needed when the group has members.
        force: bool,
    },
    /// Data path: grain `grain` of the mapping's target now holds its own data (durably).
    MarkSplit {
        /// Mapping.
        map: MapId,
        /// Grain.
        grain: u64,
    },
    /// Data path: grain `grain` changed on the source or target of an incremental mapping.
    MarkDiff {
        /// Mapping.
        map: MapId,
        /// Grain.
        grain: u64,
    },
    /// Rename a volume (its data and mappings are untouched). Appended last so journals
    /// written before it existed still decode.
    RenameVolume {
        /// Volume.
        id: VolId,
        /// New unique name.
        name: String,
    },
}

/// What an accepted op did, for event streams and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A mapping changed state.
    MapState {
        /// Mapping.
        map: MapId,
        /// Old state.
        from: MapState,
        /// New state.
        to: MapState,
    },
    /// A mapping was deleted (by command or autodelete).
    MapDeleted {
        /// Mapping.
        map: MapId,
    },
    /// A group was deleted (by command or autodelete).
    GroupDeleted {
        /// Group.
        group: GroupId,
    },
}

/// The derived facts an op can change (see [`Engine::apply`]).
enum Refresh {
    /// A grain split: only a stopping mapping's target can come online.
    Split { map: MapId },
    /// Nothing.
    Nothing,
    /// The offline reasons and recorders of these volumes; the sets keep their members.
    Facts(Vec<VolId>),
    /// A new mapping joined the sets of its ends, whose domains were `before`.
    Join {
        ends: [VolId; 2],
        before: [Option<(VolId, GrainSize)>; 2],
    },
    /// Everything of the connected sets of these volumes (taken before the op).
    Sets(BTreeSet<VolId>),
}

/// The FlashCopy engine of one agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Engine {
    limits: Limits,
    volumes: BTreeMap<VolId, Volume>,
    mappings: BTreeMap<MapId, Mapping>,
    groups: BTreeMap<GroupId, Group>,
    next_vol: u64,
    next_map: u64,
    next_group: u64,
    bitmap_used: u64,
}

impl Engine {
    /// An empty engine with the given limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            next_vol: 1,
            next_map: 1,
            next_group: 1,
            ..Default::default()
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
    /// Replaces the limits (configuration change on restart); existing objects are kept.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }
    /// Id the next `CreateVolume` must use.
    pub fn next_volume_id(&self) -> VolId {
        VolId(self.next_vol)
    }
    /// Id the next `CreateMapping` must use.
    pub fn next_mapping_id(&self) -> MapId {
        MapId(self.next_map)
    }
    /// Id the next `CreateGroup` must use.
    pub fn next_group_id(&self) -> GroupId {
        GroupId(self.next_group)
    }
    /// A volume.
    pub fn volume(&self, id: VolId) -> Option<&Volume> {
        self.volumes.get(&id)
    }
    /// A volume by name.
    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|v| v.name == name)
    }
    /// All volumes in id order.
    pub fn volumes(&self) -> impl Iterator<Item = &Volume> {
        self.volumes.values()
    }
    /// A mapping.
    pub fn mapping(&self, id: MapId) -> Option<&Mapping> {
        self.mappings.get(&id)
    }
    /// A mapping by name.
    pub fn mapping_by_name(&self, name: &str) -> Option<&Mapping> {
        self.mappings.values().find(|m| m.name == name)
    }
    /// All mappings in id order.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> {
        self.mappings.values()
    }
    /// Mappings that use `vol` as source or target.
    pub fn mappings_of(&self, vol: VolId) -> impl Iterator<Item = &Mapping> {
        self.volumes
            .get(&vol)
            .into_iter()
            .flat_map(|v| v.maps.iter())
            .map(|id| &self.mappings[id])
    }
    /// A group.
    pub fn group(&self, id: GroupId) -> Option<&Group> {
        self.groups.get(&id)
    }
    /// A group by name.
    pub fn group_by_name(&self, name: &str) -> Option<&Group> {
        self.groups.values().find(|g| g.name == name)
    }
    /// All groups in id order.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.values()
    }
    /// Bitmap bytes charged to all mappings.
    pub fn bitmap_used(&self) -> u64 {
        self.bitmap_used
    }
    /// Mappings whose target reads through this mapping's target (`lsfcmapdependentmaps`).
    pub fn dependent_mappings(&self, map: MapId) -> Vec<MapId> {
        match self.mappings.get(&map) {
            Some(m) if m.link.is_some() => self.volumes[&m.target].downs.clone(),
            _ => Vec::new(),
        }
    }

    /// The group's state: `Empty`, or its members' common state. Mixed members report the most
    /// significant state (a copying member keeps the group copying until all complete).
    pub fn group_state(&self, id: GroupId) -> Option<GroupState> {
        let g = self.groups.get(&id)?;
        const ORDER: [MapState; 7] = [
            MapState::Suspended,
            MapState::Stopping,
            MapState::Copying,
            MapState::Prepared,
            MapState::Preparing,
            MapState::Stopped,
            MapState::IdleOrCopied,
        ];
        let states: Vec<MapState> = g.members.iter().map(|m| self.mappings[m].state).collect();
        Some(
            ORDER
                .iter()
                .find(|s| states.contains(s))
                .map_or(GroupState::Empty, |s| GroupState::Map(*s)),
        )
    }

    /// Applies an op. On error nothing changed.
    pub fn apply(&mut self, op: &Op) -> Result<Vec<Event>, EngineError> {
        // What to refresh is worked out before the op runs: a deletion can split a set.
        let refresh = self.refresh_for(op);
        let mut ev = Vec::new();
        self.apply_inner(op, &mut ev)?;
        match refresh {
            Refresh::Split { map } => {
                // A split can bring the target of a stopping mapping online (100% copied).
                if let Some(m) = self
                    .mappings
                    .get(&map)
                    .filter(|m| m.state == MapState::Stopping)
                {
                    let t = m.target;
                    let why = self.offline_reason(t);
                    self.volumes.get_mut(&t).unwrap().offline = why;
                }
            }
            Refresh::Nothing => {}
            Refresh::Facts(vols) => self.refresh_facts(&vols),
            Refresh::Join { ends, before } => self.join_sets(ends, before),
            Refresh::Sets(around) => self.refresh_derived(around),
        }
        // Small engines (every test's) check the result against a refresh of everything.
        debug_assert!(
            self.volumes.len() > 64
                || matches!(op, Op::MarkSplit { .. } | Op::MarkDiff { .. })
                || self.derived_match_full(),
            "derived facts are stale after {op:?}"
        );
        Ok(ev)
    }

    /// What `op` can change of the derived facts. Only the connected sets it touches, and
    /// for most commands (a start above all) only the facts of the volumes of its mappings:
    /// refreshing every volume after every command made each one cost time linear in the
    /// mappings of the whole agent, and a BFS of the set time linear in a source's snapshots.
    fn refresh_for(&self, op: &Op) -> Refresh {
        match op {
            Op::MarkSplit { map, .. } => Refresh::Split { map: *map },
            Op::MarkDiff { .. } => Refresh::Nothing,
            // Only states and flags change: links move within a cascade (a start links the
            // mapping to its own source and moves older ones below its target), so every
            // set keeps its members.
            Op::CreateVolume { .. }
            | Op::DeleteVolume { .. }
            | Op::ResizeVolume { .. }
            | Op::RenameVolume { .. }
            | Op::CreateGroup { .. }
            | Op::DeleteGroup { .. }
            | Op::Prepare { .. }
            | Op::FlushDone { .. }
            | Op::FlushFailed { .. }
            | Op::Start { .. }
            | Op::BitmapOffline { .. }
            | Op::BitmapOnline { .. }
            | Op::PrepareGroup { .. }
            | Op::GroupFlushDone { .. }
            | Op::GroupFlushFailed { .. }
            | Op::StartGroup { .. } => Refresh::Facts(self.touches(op)),
            Op::CreateMapping { spec, .. } => {
                let domain = |v: VolId| self.volumes.get(&v).and_then(|v| v.domain);
                Refresh::Join {
                    ends: [spec.source, spec.target],
                    before: [domain(spec.source), domain(spec.target)],
                }
            }
            // Deletions and unlinks can split a set, and an autodelete can hide in a modify.
            Op::DeleteMapping { .. }
            | Op::Modify { .. }
            | Op::Stop { .. }
            | Op::StopGroup { .. }
            | Op::IoError { .. }
            | Op::CopyComplete { .. }
            | Op::CleanComplete { .. } => Refresh::Sets(self.component(self.touches(op))),
        }
    }

    /// The volumes whose mappings `op` may change (its volume, the ends of its mapping and of
    /// the mapping's group, or of its group's members). Whatever else it changes is connected
    /// to them: a start or stop relinks only mappings of the same cascade.
    fn touches(&self, op: &Op) -> Vec<VolId> {
        let ends = |maps: &[MapId]| -> Vec<VolId> {
            maps.iter()
                .filter_map(|m| self.mappings.get(m))
                .flat_map(|m| [m.source, m.target])
                .collect()
        };
        let members = |g: &GroupId| self.groups.get(g).map_or(Vec::new(), |g| ends(&g.members));
        match op {
            Op::CreateVolume { .. } | Op::CreateGroup { .. } => Vec::new(),
            Op::DeleteVolume { id } | Op::ResizeVolume { id, .. } | Op::RenameVolume { id, .. } => {
                vec![*id]
            }
            Op::CreateMapping { spec, .. } => vec![spec.source, spec.target],
            Op::Prepare { map, .. }
            | Op::FlushDone { map }
            | Op::FlushFailed { map }
            | Op::Start { map, .. }
            | Op::Stop { map, .. }
            | Op::DeleteMapping { map, .. }
            | Op::Modify { map, .. }
            | Op::IoError { map }
            | Op::BitmapOffline { map }
            | Op::BitmapOnline { map }
            | Op::CopyComplete { map }
            | Op::CleanComplete { map }
            | Op::MarkSplit { map, .. }
            | Op::MarkDiff { map, .. } => {
                let group = self.mappings.get(map).and_then(|m| m.group);
                let mut v = ends(&[*map]);
                v.extend(group.map_or(Vec::new(), |g| members(&g)));
                v
            }
            Op::PrepareGroup { group, .. }
            | Op::GroupFlushDone { group }
            | Op::GroupFlushFailed { group }
            | Op::StartGroup { group, .. }
            | Op::StopGroup { group, .. }
            | Op::DeleteGroup { group, .. } => members(group),
        }
    }

    /// Whether the derived facts equal a refresh of every volume (checked in debug builds).
    fn derived_match_full(&self) -> bool {
        let mut full = self.clone();
        full.refresh_derived(self.volumes.keys().copied().collect());
        full.volumes == self.volumes
    }
}

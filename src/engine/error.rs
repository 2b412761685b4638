//! Typed engine errors: one variant per rule of FLASHCOPY.md §8. A rejected command changes nothing.

use super::types::{GroupId, MapId, MapState, VolId};

/// Why the engine rejected a command or an I/O.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No such volume.
    #[error("volume {0} does not exist")]
    NoSuchVolume(VolId),
    /// No such mapping.
    #[error("mapping {0} does not exist")]
    NoSuchMapping(MapId),
    /// No such consistency group.
    #[error("consistency group {0} does not exist")]
    NoSuchGroup(GroupId),
    /// Ids are allocated in order; a command carried a stale or reused id.
    #[error("id {0} is already in use or out of order")]
    IdInUse(u64),
    /// Names are unique per object kind.
    #[error("name {0:?} is already in use")]
    NameInUse(String),
    /// Names must be usable on a command line.
    #[error(
        "invalid name {0:?}: use 1-63 characters from [A-Za-z0-9._-], not starting with a digit"
    )]
    InvalidName(String),
    /// A volume's origin is a short printable label.
    #[error("invalid origin {0:?}: use at most 1024 printable ASCII characters")]
    InvalidOrigin(String),
    /// Volume sizes must be positive multiples of 512 bytes.
    #[error("invalid volume size {0}: must be a positive multiple of 512 bytes")]
    InvalidSize(u64),
    /// A volume that belongs to a mapping cannot be deleted or shrunk.
    #[error("volume {0} belongs to mapping {1}: delete the mapping first")]
    VolumeInUse(VolId, MapId),
    /// CMMVC5924E, relaxed: volumes of different sizes may be mapped only when the smaller one
    /// is a whole number of grains (a reader never continues through a volume that ends
    /// inside the grain it reads).
    #[error(
        "CMMVC5924E source {src} has {source_size} bytes but target {target} has {target_size}: volumes of different sizes can be mapped only when the smaller one is a whole number of {grain}-byte grains"
    )]
    SizeMismatch {
        /// Source volume.
        src: VolId,
        /// Its size.
        source_size: u64,
        /// Target volume.
        target: VolId,
        /// Its size.
        target_size: u64,
        /// Grain size in bytes.
        grain: u64,
    },
    /// A target that ends inside the last grain of its mapping's range cannot grow.
    #[error(
        "volume {vol} ({size} bytes) ends inside the last {grain}-byte grain mapped by {map}: it can grow only after the mapping is deleted"
    )]
    GrowInsideGrain {
        /// Volume.
        vol: VolId,
        /// Its size.
        size: u64,
        /// The mapping whose range ends past the volume.
        map: MapId,
        /// Grain size in bytes.
        grain: u64,
    },
    /// CMMVC6303E: source and target are the same volume.
    #[error("CMMVC6303E source and target are the same volume {0}")]
    SameVolume(VolId),
    /// A volume can be the target of one mapping only.
    #[error("volume {0} is already the target of mapping {1}")]
    TargetInUse(VolId, MapId),
    /// 256 mappings per source.
    #[error("source {0} already has {1} mappings (the limit)")]
    TooManyMapsForSource(VolId, usize),
    /// 256 mappings per connected set.
    #[error("the connected set of mappings would exceed {0} mappings")]
    ConnectedSetFull(usize),
    /// 4096 mappings per agent.
    #[error("the agent already has {0} mappings (the limit)")]
    TooManyMaps(usize),
    /// 255 groups per agent.
    #[error("the agent already has {0} consistency groups (the limit)")]
    TooManyGroups(usize),
    /// 512 mappings per group.
    #[error("consistency group {0} already has {1} mappings (the limit)")]
    GroupFull(GroupId, usize),
    /// The bitmap budget would be exceeded.
    #[error("not enough bitmap memory: need {need} bytes, {free} of {budget} free")]
    BitmapBudget {
        /// Bytes the new mapping needs.
        need: u64,
        /// Bytes still free.
        free: u64,
        /// The configured budget.
        budget: u64,
    },
    /// Copy and clean rates are 0–150.
    #[error("rate {0} is outside 0-150")]
    InvalidRate(u8),
    /// One grain size per connected cascade.
    #[error(
        "grain size {requested} KiB conflicts with {existing} KiB used by connected mapping {mapping}"
    )]
    GrainSizeConflict {
        /// Grain size asked for (KiB).
        requested: u64,
        /// Grain size of the connected cascade (KiB).
        existing: u64,
        /// A mapping of that cascade.
        mapping: MapId,
    },
    /// CMMVC5903E: the command is not allowed in the current state.
    #[error("CMMVC5903E mapping {map} is {state}: {action} is not allowed in this state")]
    BadState {
        /// The mapping.
        map: MapId,
        /// Its state.
        state: MapState,
        /// What was attempted.
        action: &'static str,
    },
    /// A group command found a member in the wrong state.
    #[error("consistency group {group} is {state}: {action} is not allowed in this state")]
    BadGroupState {
        /// The group.
        group: GroupId,
        /// Its state.
        state: String,
        /// What was attempted.
        action: &'static str,
    },
    /// Grouped mappings are driven through their group.
    #[error("mapping {0} belongs to consistency group {1}: use the group command")]
    InGroup(MapId, GroupId),
    /// A group command named a mapping of another group.
    #[error("mapping {map} belongs to {actual:?}, not to consistency group {group}")]
    NotInGroup {
        /// The mapping.
        map: MapId,
        /// The group named in the command.
        group: GroupId,
        /// The group it is in.
        actual: Option<GroupId>,
    },
    /// The target feeds active mappings; only a restore may overwrite it.
    #[error("target {target} is the source of active mapping {active}: prepare with --restore")]
    TargetIsActiveSource {
        /// The target volume.
        target: VolId,
        /// The active mapping reading from it.
        active: MapId,
    },
    /// Stop --split needs a complete copy.
    #[error("mapping {0} is at {1}% progress: --split needs 100%")]
    SplitIncomplete(MapId, u8),
    /// Delete of a stopped mapping needs --force.
    #[error("mapping {0} is stopped: its target is incomplete, delete with --force")]
    DeleteNeedsForce(MapId),
    /// A group with members needs --force to be deleted.
    #[error("consistency group {0} still has {1} mappings: delete with --force")]
    GroupNotEmpty(GroupId, usize),
    /// `chfcmap --name` cannot be combined with other changes.
    #[error("a name change cannot be combined with other changes")]
    NameWithOtherChanges,
    /// The group of a mapping cannot change while either group is active.
    #[error("consistency group {0} is {1}: its membership cannot change now")]
    GroupBusy(GroupId, String),
    /// Host I/O to a volume that is offline or inaccessible.
    #[error("volume {vol} is offline: {reason}")]
    VolumeOffline {
        /// The volume.
        vol: VolId,
        /// Why.
        reason: String,
    },
    /// Host I/O outside the volume.
    #[error("range {offset}+{len} is outside volume {vol} of {size} bytes")]
    OutOfRange {
        /// The volume.
        vol: VolId,
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// Changed-block tracking reads the image of a started snapshot whose target is readable.
    #[error("mapping {map} is {state}: its target does not hold a readable point-in-time image")]
    NotAPointInTime {
        /// The mapping.
        map: MapId,
        /// Its state.
        state: MapState,
    },
    /// A delta compares two snapshots of one source volume.
    #[error(
        "mappings {base} and {target} are snapshots of different volumes ({base_source} and {target_source})"
    )]
    DifferentSources {
        /// Base mapping.
        base: MapId,
        /// Its source.
        base_source: VolId,
        /// Target mapping.
        target: MapId,
        /// Its source.
        target_source: VolId,
    },
    /// A delta goes from an older snapshot to a newer one.
    #[error("base mapping {base} did not start before target mapping {target}")]
    BaseNotOlder {
        /// Base mapping.
        base: MapId,
        /// Target mapping.
        target: MapId,
    },
    /// A listing starts inside the image.
    #[error("starting offset {offset} is not inside the image of {size} bytes")]
    OffsetPastEnd {
        /// Requested offset.
        offset: u64,
        /// Image size.
        size: u64,
    },
}

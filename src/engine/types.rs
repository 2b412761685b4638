//! Identifiers, attributes, states and limits of FlashCopy objects (FLASHCOPY.md §1, §2, §5, §6).

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub u64);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}
id_type!(/// A volume id.
    VolId, "vol");
id_type!(/// A FlashCopy mapping id.
    MapId, "fcmap");
id_type!(/// A consistency group id.
    GroupId, "fccstgrp");

/// Logical block size: volume sizes and (in later layers) I/O are multiples of it.
pub const SECTOR: u64 = 512;

/// The copy unit of a mapping, fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
pub enum GrainSize {
    /// 64 KiB grains.
    K64,
    /// 256 KiB grains (IBM's default).
    K256,
}

impl GrainSize {
    /// Grain size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            GrainSize::K64 => 64 * 1024,
            GrainSize::K256 => 256 * 1024,
        }
    }
    /// Parses a size given in KiB (64 or 256).
    pub fn from_kib(kib: u64) -> Option<Self> {
        match kib {
            64 => Some(GrainSize::K64),
            256 => Some(GrainSize::K256),
            _ => None,
        }
    }
    /// Number of grains covering `bytes` (the last one may be partial).
    pub const fn grains(self, bytes: u64) -> u64 {
        bytes.div_ceil(self.bytes())
    }
}

impl fmt::Display for GrainSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes() / 1024)
    }
}

/// Mapping state (FLASHCOPY.md §2.3), with IBM's spelling in `Display`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum MapState {
    /// No copy in progress; the target is either untouched or a complete copy.
    IdleOrCopied,
    /// The source is being flushed; the target is inaccessible.
    Preparing,
    /// Ready for an instant start; the target is inaccessible.
    Prepared,
    /// The point in time exists; copy-on-write (and background copy) are active.
    Copying,
    /// Cleaning: grains that older mappings still need are being handed over.
    Stopping,
    /// Stopped; the target is offline unless it held a complete copy.
    Stopped,
    /// Metadata unreachable; source and target offline.
    Suspended,
}

impl MapState {
    /// All states, in the order of the transition table.
    pub const ALL: [MapState; 7] = [
        MapState::IdleOrCopied,
        MapState::Preparing,
        MapState::Prepared,
        MapState::Copying,
        MapState::Stopping,
        MapState::Stopped,
        MapState::Suspended,
    ];
    /// Active = participates in the cascade (copying, stopping, suspended).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            MapState::Copying | MapState::Stopping | MapState::Suspended
        )
    }
    /// IBM's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            MapState::IdleOrCopied => "idle_or_copied",
            MapState::Preparing => "preparing",
            MapState::Prepared => "prepared",
            MapState::Copying => "copying",
            MapState::Stopping => "stopping",
            MapState::Stopped => "stopped",
            MapState::Suspended => "suspended",
        }
    }
}

impl fmt::Display for MapState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Consistency-group state: the members' common state, or `Empty`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupState {
    /// No members.
    Empty,
    /// The state the members are in (see [`MapState`]).
    Map(MapState),
}

impl fmt::Display for GroupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupState::Empty => f.write_str("empty"),
            GroupState::Map(s) => s.fmt(f),
        }
    }
}

/// Highest copy or clean rate.
pub const MAX_RATE: u8 = 150;
/// Default copy and clean rate.
pub const DEFAULT_RATE: u8 = 50;

/// Bytes per second of a copy or clean rate (FLASHCOPY.md §5.1): 0 = no copy; 1–10 = 128 KiB/s,
/// doubling every 10 up to 2 GiB/s at 141–150.
pub fn rate_bytes_per_sec(rate: u8) -> u64 {
    if rate == 0 {
        0
    } else {
        let step = (u64::from(rate.min(MAX_RATE)) - 1) / 10;
        (128 * 1024) << step
    }
}

/// Per-agent limits (FLASHCOPY.md §6), defaults at least IBM's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Mappings that may share one source volume.
    pub maps_per_source: usize,
    /// Mappings in one connected set (cascade / tree).
    pub maps_per_connected_set: usize,
    /// Mappings in the whole agent.
    pub maps_total: usize,
    /// Consistency groups in the whole agent.
    pub groups_total: usize,
    /// Mappings per consistency group.
    pub maps_per_group: usize,
    /// Bytes of bitmap memory all mappings together may use.
    pub bitmap_budget_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            maps_per_source: 256,
            maps_per_connected_set: 256,
            maps_total: 4096,
            groups_total: 255,
            maps_per_group: 512,
            // IBM's per-I/O-group maximum (Gen1); covers 256 TiB of source at 64 KiB grains.
            bitmap_budget_bytes: 512 * 1024 * 1024,
        }
    }
}

/// Bitmap bytes a mapping costs (FLASHCOPY.md §6.2): one bit per grain, at least 4 KiB,
/// doubled for incremental mappings (difference bitmap).
pub fn bitmap_bytes(volume_bytes: u64, grain: GrainSize, incremental: bool) -> u64 {
    let bits = grain.grains(volume_bytes);
    let bytes = bits.div_ceil(8).div_ceil(8) * 8;
    bytes.max(4096) * if incremental { 2 } else { 1 }
}

/// What `mkfcmap` asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingSpec {
    /// Name; `fcmap<id>` when absent.
    pub name: Option<String>,
    /// Source volume.
    pub source: VolId,
    /// Target volume.
    pub target: VolId,
    /// Background copy rate 0–150.
    pub copy_rate: u8,
    /// Cleaning rate 0–150.
    pub clean_rate: u8,
    /// Grain size; inherited from the connected mappings (else 256 KiB) when absent.
    pub grain: Option<GrainSize>,
    /// Keep a difference bitmap so restarts copy only what changed.
    pub incremental: bool,
    /// Delete the mapping when its background copy completes.
    pub autodelete: bool,
    /// Consistency group to join.
    pub group: Option<GroupId>,
}

impl MappingSpec {
    /// `mkfcmap -source -target` with IBM's defaults: copy rate 50, clean rate 50, grain
    /// inherited (else 256 KiB), not incremental, no autodelete, stand-alone.
    pub fn new(source: VolId, target: VolId) -> Self {
        Self {
            copy_rate: DEFAULT_RATE,
            ..Self::snapshot(source, target)
        }
    }

    /// A snapshot (copy rate 0: copy-on-write only, no background copy); otherwise as [`MappingSpec::new`].
    pub fn snapshot(source: VolId, target: VolId) -> Self {
        Self {
            name: None,
            source,
            target,
            copy_rate: 0,
            clean_rate: DEFAULT_RATE,
            grain: None,
            incremental: false,
            autodelete: false,
            group: None,
        }
    }
}

/// What `chfcmap` changes; absent fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingChange {
    /// New name (may not be combined with other changes).
    pub name: Option<String>,
    /// New copy rate.
    pub copy_rate: Option<u8>,
    /// New clean rate.
    pub clean_rate: Option<u8>,
    /// New autodelete flag.
    pub autodelete: Option<bool>,
    /// `Some(None)` makes the mapping stand-alone; `Some(Some(g))` moves it into group g.
    pub group: Option<Option<GroupId>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_table_matches_ibm() {
        assert_eq!(rate_bytes_per_sec(0), 0);
        assert_eq!(rate_bytes_per_sec(1), 128 * 1024);
        assert_eq!(rate_bytes_per_sec(10), 128 * 1024);
        assert_eq!(rate_bytes_per_sec(11), 256 * 1024);
        assert_eq!(rate_bytes_per_sec(50), 2 << 20);
        assert_eq!(rate_bytes_per_sec(100), 64 << 20);
        assert_eq!(rate_bytes_per_sec(101), 128 << 20);
        assert_eq!(rate_bytes_per_sec(150), 2 << 30);
    }

    #[test]
    fn bitmap_cost() {
        // One bit per grain: 1 TiB at 64 KiB grains = 16 Mi bits = 2 MiB.
        assert_eq!(bitmap_bytes(1 << 40, GrainSize::K64, false), 2 << 20);
        assert_eq!(bitmap_bytes(1 << 40, GrainSize::K64, true), 4 << 20);
        // The 4 KiB minimum covers 8 GiB at 256 KiB grains.
        assert_eq!(bitmap_bytes(1 << 20, GrainSize::K256, false), 4096);
        assert_eq!(bitmap_bytes(16 << 30, GrainSize::K256, false), 8192);
    }
}

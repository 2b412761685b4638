//! Between the engine's types and the wire: object views, states, events, and the resolution of
//! the `id or name` references that requests carry.

use super::status::AgentError;
use crate::engine::{
    Engine, Event, GrainSize, GroupId, GroupState, MapId, MapState, Mapping, VolId, Volume,
};
use crate::proto::agent::v1 as pb;

/// A volume as the API shows it; `stats` tells its NBD clients.
pub fn volume(e: &Engine, v: &Volume, stats: &crate::volume::Stats) -> pb::Volume {
    let offline_reason = match e.check_io(v.id, 0, 0) {
        Err(crate::engine::EngineError::VolumeOffline { reason, .. }) => reason,
        _ => String::new(),
    };
    pb::Volume {
        id: v.id.0,
        name: v.name.clone(),
        size_bytes: v.size,
        nbd_export: v.id.0.to_string(),
        mappings: e.mappings_of(v.id).map(|m| m.id.0).collect(),
        offline_reason,
        origin: v.origin.clone(),
        nbd_clients: stats.clients(v.id),
    }
}

fn vol_name(e: &Engine, v: VolId) -> String {
    e.volume(v)
        .map_or_else(|| v.to_string(), |v| v.name.clone())
}

/// A mapping as the API shows it.
pub fn mapping(e: &Engine, m: &Mapping) -> pb::Mapping {
    pb::Mapping {
        id: m.id.0,
        name: m.name.clone(),
        source_id: m.source.0,
        source_name: vol_name(e, m.source),
        target_id: m.target.0,
        target_name: vol_name(e, m.target),
        group_id: m.group.map(|g| g.0),
        group_name: m
            .group
            .and_then(|g| e.group(g))
            .map(|g| g.name.clone())
            .unwrap_or_default(),
        state: map_state(m.state) as i32,
        progress: u32::from(m.progress()),
        copy_rate: u32::from(m.copy_rate),
        clean_rate: u32::from(m.clean_rate),
        grain_kib: (m.grain.bytes() / 1024) as u32,
        incremental: m.incremental,
        autodelete: m.autodelete,
        start_time: m.start_time,
        restoring: m.restoring,
        complete: m.complete,
        grains: m.grains(),
        split_grains: m.split_count(),
        dependent_mappings: e.dependent_mappings(m.id).iter().map(|d| d.0).collect(),
    }
}

/// A mapping by id, or `NoSuchMapping`.
pub fn mapping_by_id(e: &Engine, id: MapId) -> Result<pb::Mapping, AgentError> {
    let m = e
        .mapping(id)
        .ok_or(crate::engine::EngineError::NoSuchMapping(id))?;
    Ok(mapping(e, m))
}

/// A group as the API shows it.
pub fn group(e: &Engine, id: GroupId) -> Result<pb::Group, AgentError> {
    let g = e
        .group(id)
        .ok_or(crate::engine::EngineError::NoSuchGroup(id))?;
    let state = match e.group_state(id) {
        Some(GroupState::Map(s)) => group_state(s),
        _ => pb::GroupState::Empty,
    };
    Ok(pb::Group {
        id: g.id.0,
        name: g.name.clone(),
        state: state as i32,
        autodelete: g.autodelete,
        members: g.members.iter().map(|m| m.0).collect(),
        start_time: g
            .members
            .iter()
            .filter_map(|m| e.mapping(*m)?.start_time)
            .max(),
    })
}

/// The wire form of a mapping state.
pub fn map_state(s: MapState) -> pb::MappingState {
    match s {
        MapState::IdleOrCopied => pb::MappingState::IdleOrCopied,
        MapState::Preparing => pb::MappingState::Preparing,
        MapState::Prepared => pb::MappingState::Prepared,
        MapState::Copying => pb::MappingState::Copying,
        MapState::Stopping => pb::MappingState::Stopping,
        MapState::Stopped => pb::MappingState::Stopped,
        MapState::Suspended => pb::MappingState::Suspended,
    }
}

fn group_state(s: MapState) -> pb::GroupState {
    match s {
        MapState::IdleOrCopied => pb::GroupState::IdleOrCopied,
        MapState::Preparing => pb::GroupState::Preparing,
        MapState::Prepared => pb::GroupState::Prepared,
        MapState::Copying => pb::GroupState::Copying,
        MapState::Stopping => pb::GroupState::Stopping,
        MapState::Stopped => pb::GroupState::Stopped,
        MapState::Suspended => pb::GroupState::Suspended,
    }
}

/// The wire form of an engine event.
pub fn event(ev: &Event) -> pb::event::Kind {
    match *ev {
        Event::MapState { map, from, to } => {
            pb::event::Kind::MappingState(pb::MappingStateChanged {
                mapping: map.0,
                from: map_state(from) as i32,
                to: map_state(to) as i32,
            })
        }
        Event::MapDeleted { map } => {
            pb::event::Kind::MappingDeleted(pb::MappingDeleted { mapping: map.0 })
        }
        Event::GroupDeleted { group } => {
            pb::event::Kind::GroupDeleted(pb::GroupDeleted { group: group.0 })
        }
    }
}

/// A copy or clean rate from the wire (the engine checks the 0-150 rule).
pub fn rate(what: &str, v: u32) -> Result<u8, AgentError> {
    u8::try_from(v).map_err(|_| AgentError::InvalidArgument(format!("{what} {v} is outside 0-150")))
}

/// A grain size from the wire.
pub fn grain(kib: u32) -> Result<GrainSize, AgentError> {
    GrainSize::from_kib(u64::from(kib))
        .ok_or_else(|| AgentError::InvalidArgument(format!("grain size {kib} KiB: use 64 or 256")))
}

/// Resolves an `id or name` reference: a decimal id, a name, or a default-style name
/// (`<prefix><id>`) that no object carries as its name.
fn resolve<T>(
    kind: &'static str,
    prefix: &str,
    reference: &str,
    by_id: impl Fn(u64) -> Option<T>,
    by_name: impl Fn(&str) -> Option<T>,
) -> Result<T, AgentError> {
    let r = reference.trim();
    if r.is_empty() {
        return Err(AgentError::InvalidArgument(format!("no {kind} given")));
    }
    let found = if r.bytes().all(|b| b.is_ascii_digit()) {
        r.parse().ok().and_then(&by_id)
    } else {
        by_name(r).or_else(|| {
            r.strip_prefix(prefix)
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .and_then(&by_id)
        })
    };
    found.ok_or_else(|| AgentError::NotFound {
        kind,
        reference: r.to_string(),
    })
}

/// The volume a request names.
pub fn volume_ref(e: &Engine, r: &str) -> Result<VolId, AgentError> {
    resolve(
        "volume",
        "vol",
        r,
        |id| e.volume(VolId(id)).map(|v| v.id),
        |n| e.volume_by_name(n).map(|v| v.id),
    )
}

/// The mapping a request names.
pub fn mapping_ref(e: &Engine, r: &str) -> Result<MapId, AgentError> {
    resolve(
        "mapping",
        "fcmap",
        r,
        |id| e.mapping(MapId(id)).map(|m| m.id),
        |n| e.mapping_by_name(n).map(|m| m.id),
    )
}

/// The consistency group a request names.
pub fn group_ref(e: &Engine, r: &str) -> Result<GroupId, AgentError> {
    resolve(
        "consistency group",
        "fccstgrp",
        r,
        |id| e.group(GroupId(id)).map(|g| g.id),
        |n| e.group_by_name(n).map(|g| g.id),
    )
}

//! Store failures during grain copies (FLASHCOPY.md §2.3 `IoError`, §8 "runtime"): a copy that
//! cannot read its upstream or write its target stops the mapping (and, §4.4, its whole group);
//! the target goes offline, the source stays online. The copy-on-write that failed is then
//! retried: with the mapping stopped it needs no copy, so the host write to the source succeeds.
//!
//! Failures are handled with no pool lock held (the state change is a control op, which
//! pauses I/O), and reported to the listener the agent installs, since no command is there to
//! carry the events back.

use super::{CopyKind, Pool, VolumeError};
use crate::engine::{Event, GrainPlan, MapId, Op, VolId};
use crate::store::StoreError;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

/// A grain copy failed on a store and its mapping was stopped.
#[derive(Clone, Debug)]
pub struct CopyFailure {
    /// The mapping whose copy failed.
    pub map: MapId,
    /// What was copying.
    pub kind: CopyKind,
    /// The store's error, for people.
    pub message: String,
    /// The state changes the failure caused (empty if the mapping had stopped already).
    pub events: Vec<Event>,
}

type Callback = Box<dyn Fn(&CopyFailure) + Send + Sync>;

/// Where copy failures are reported (set once).
#[derive(Default)]
pub(super) struct Listener(OnceLock<Callback>);

/// Writes that may fail over to a retry, one per mapping stopped on the way, up to this many.
const MAX_RETRIES: usize = 8;

/// Runs a write; when one of its copies fails, stops that mapping and runs it again.
pub(super) fn retry_after_copy_failure(
    pool: &Pool,
    mut write: impl FnMut() -> Result<(), VolumeError>,
) -> Result<(), VolumeError> {
    let mut last = None;
    for _ in 0..MAX_RETRIES {
        match write() {
            Err(VolumeError::CopyIo { map, source }) => {
                last = Some(pool.copy_failed(map, CopyKind::CopyOnWrite, source.into()));
            }
            done => return done,
        }
    }
    Err(last.expect("at least one attempt"))
}

impl Pool {
    /// Calls `f` for every copy failure, from the thread that met it, with no pool lock held.
    /// Only the first listener is kept; returns false if one was set already.
    pub fn on_copy_failure(&self, f: impl Fn(&CopyFailure) + Send + Sync + 'static) -> bool {
        self.failure_listener.0.set(Box::new(f)).is_ok()
    }

    /// The error of a copy-on-write copy to `to`: names the mapping whose target `to` is.
    pub(super) fn copy_io(&self, to: VolId, plan: &GrainPlan, source: StoreError) -> VolumeError {
        let e = self.engine.read();
        let by_target = e
            .mappings()
            .find(|m| m.target == to && m.state.is_active())
            .map(|m| m.id);
        let by_mark = plan.marks.iter().find_map(|op| match op {
            Op::MarkSplit { map, .. } => Some(*map),
            _ => None,
        });
        match by_target.or(by_mark) {
            Some(map) => VolumeError::CopyIo { map, source },
            None => VolumeError::Store(source),
        }
    }

    /// Handles an error met while `map` copied for `kind`: a store failure stops the mapping,
    /// is counted and reported, and comes back as [`VolumeError::CopyIo`]; anything else (a
    /// metadata failure) is returned as it is. Call with no pool lock held.
    pub(super) fn copy_failed(&self, map: MapId, kind: CopyKind, err: VolumeError) -> VolumeError {
        let source = match err {
            VolumeError::Store(s) | VolumeError::CopyIo { source: s, .. } => s,
            other => return other,
        };
        self.stats.copy_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        tracing::error!(map = %map, %kind, error = %source, "grain copy failed; stopping the mapping");
        let events = match self.control(&[Op::IoError { map }]) {
            Ok(ev) => ev,
            Err(e) => {
                // Stopped meanwhile (another failure, a command): nothing left to change.
                tracing::warn!(map = %map, error = %e, "the failed mapping was not stopped");
                Vec::new()
            }
        };
        let failure = CopyFailure {
            map,
            kind,
            message: format!("{kind} failed: {source}"),
            events,
        };
        if let Some(f) = self.failure_listener.0.get() {
            f(&failure);
        }
        VolumeError::CopyIo { map, source }
    }
}

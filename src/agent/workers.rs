//! Background copy and cleaning workers.
//!
//! A supervisor task watches for mappings that need a worker (copying with a copy rate above
//! zero, or stopping) and starts one task per mapping. A worker runs [`Pool::run_copy`] on the
//! blocking pool in slices of at most [`SLICE`], so a rate change, a state change or a shutdown
//! is seen within one slice; the pool paces each slice at the mapping's rate. The supervisor is
//! woken after every command and also looks on its own every [`SCAN`].

use super::convert;
use super::events::EventHub;
use crate::engine::{Engine, GroupId, MapId, MapState, Mapping};
use crate::proto::agent::v1 as pb;
use crate::volume::{Pool, VolumeError};
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

/// Longest stretch a worker copies before it looks at the mapping again.
pub const SLICE: Duration = Duration::from_millis(500);
/// How often the supervisor looks for work without being woken.
pub const SCAN: Duration = Duration::from_millis(500);
/// Pause after a failed slice before the next attempt.
const RETRY: Duration = Duration::from_secs(1);

/// Handle on the workers: wake them after a command, count them.
#[derive(Debug)]
pub struct Workers {
    pool: Arc<Pool>,
    events: Arc<EventHub>,
    running: Mutex<BTreeSet<MapId>>,
    wake: Notify,
}

/// Whether a mapping needs a worker now. A copying mapping at copy rate 0 needs one only to
/// complete, once host writes have split every grain. The supervisor asks this of every
/// mapping after every command: the cheap tests go first (a rate-0 snapshot with a grain left
/// to split costs one word compare, no lookup).
fn needs_worker(e: &Engine, m: &Mapping) -> bool {
    match m.state {
        MapState::Copying => m.copy_rate > 0 || (m.split_all() && e.copy_complete_ready(m.id)),
        MapState::Stopping => true,
        _ => false,
    }
}

/// What a worker compares before and after a slice to report state changes.
#[derive(Clone, Copy)]
struct Seen {
    state: Option<MapState>,
    autodelete: bool,
    group: Option<GroupId>,
    group_exists: bool,
}

fn seen(e: &Engine, map: MapId, group: Option<GroupId>) -> Seen {
    let m = e.mapping(map);
    let group = m.and_then(|m| m.group).or(group);
    Seen {
        state: m.map(|m| m.state),
        autodelete: m.is_some_and(|m| m.autodelete),
        group,
        group_exists: group.is_some_and(|g| e.group(g).is_some()),
    }
}

impl Workers {
    /// Workers for `pool`, reporting to `events`; call [`Workers::run`] to start them.
    pub fn new(pool: Arc<Pool>, events: Arc<EventHub>) -> Arc<Self> {
        Arc::new(Self {
            pool,
            events,
            running: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
        })
    }

    /// Asks the supervisor to look for work now (after a command).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Mappings with a running worker.
    pub fn active(&self) -> usize {
        self.running.lock().len()
    }

    /// The supervisor: runs until `shutdown` turns true, then waits for every worker to finish
    /// its current slice.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tasks = JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let todo: Vec<MapId> = {
                let e = self.pool.engine();
                e.mappings()
                    .filter(|m| needs_worker(&e, m))
                    .map(|m| m.id)
                    .collect()
            };
            for map in todo {
                if self.running.lock().insert(map) {
                    tracing::debug!(mapping = %map, "copy worker started");
                    tasks.spawn(self.clone().work(map, shutdown.clone()));
                }
            }
            // Reap finished workers so the set does not grow.
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(SCAN) => {}
                _ = shutdown.changed() => {}
            }
        }
        while tasks.join_next().await.is_some() {}
        tracing::debug!("copy workers stopped");
    }

    /// One mapping's worker: slices of background copy or cleaning until it needs none.
    async fn work(self: Arc<Self>, map: MapId, shutdown: watch::Receiver<bool>) {
        loop {
            let before = {
                let e = self.pool.engine();
                if *shutdown.borrow() || !e.mapping(map).is_some_and(|m| needs_worker(&e, m)) {
                    break;
                }
                seen(&e, map, None)
            };
            let pool = self.pool.clone();
            let span = tracing::info_span!("copy", mapping = %map);
            let res = tokio::task::spawn_blocking(move || {
                span.in_scope(|| pool.run_copy(map, Some(Instant::now() + SLICE)))
            })
            .await;
            let after = seen(&self.pool.engine(), map, before.group);
            self.report(map, before, after);
            let failure = match res {
                Ok(Ok(_bytes)) => None,
                // The mapping stopped; the pool reported it (see `Pool::on_copy_failure`).
                Ok(Err(VolumeError::CopyIo { .. })) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("copy task failed: {e}")),
            };
            if let Some(message) = failure {
                tracing::warn!(mapping = %map, error = %message, "background copy failed; retrying");
                self.events
                    .publish(pb::event::Kind::CopyFailed(pb::CopyFailed {
                        mapping: map.0,
                        message,
                    }));
                tokio::time::sleep(RETRY).await;
            }
        }
        self.running.lock().remove(&map);
        // The mapping may need a worker again at once (a restart): let the supervisor look.
        self.wake();
    }

    /// Publishes what a slice changed: a completion (`copying -> idle_or_copied`, or deleted
    /// by autodelete), the end of cleaning (`stopping -> stopped` or `idle_or_copied`), and a
    /// group deleted by autodelete. Transitions made by commands meanwhile are the commands'
    /// to report (the hub drops repeats).
    fn report(&self, map: MapId, before: Seen, after: Seen) {
        use MapState::*;
        match (before.state, after.state) {
            (Some(from @ Copying), Some(to @ IdleOrCopied))
            | (Some(from @ Stopping), Some(to @ (Stopped | IdleOrCopied))) => {
                tracing::info!(mapping = %map, %from, %to, "copy worker: mapping state");
                self.events
                    .publish(pb::event::Kind::MappingState(pb::MappingStateChanged {
                        mapping: map.0,
                        from: convert::map_state(from) as i32,
                        to: convert::map_state(to) as i32,
                    }));
            }
            (Some(Copying), None) if before.autodelete => {
                // The engine completed the copy, then deleted the mapping.
                self.events
                    .publish(pb::event::Kind::MappingState(pb::MappingStateChanged {
                        mapping: map.0,
                        from: convert::map_state(Copying) as i32,
                        to: convert::map_state(IdleOrCopied) as i32,
                    }));
                tracing::info!(mapping = %map, "copy worker: mapping deleted (autodelete)");
                self.events
                    .publish(pb::event::Kind::MappingDeleted(pb::MappingDeleted {
                        mapping: map.0,
                    }));
                if let Some(g) = before.group
                    && before.group_exists
                    && !after.group_exists
                {
                    self.events
                        .publish(pb::event::Kind::GroupDeleted(pb::GroupDeleted {
                            group: g.0,
                        }));
                }
            }
            _ => {}
        }
    }
}

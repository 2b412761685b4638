//! The volume layer: reads and writes volumes by byte range with full FlashCopy semantics by
//! executing engine plans against block stores, and persists every engine change.
//!
//! Concurrency:
//! - the *gate* (a read-write lock) is held shared by every I/O and exclusively by every
//!   control op, so a control op (a start above all) pauses new I/O and drains in-flight I/O
//!   before it switches, then resumes (FLASHCOPY.md §4.2);
//! - *grain locks*, one per (connected set, grain), serialise a grain copy with the write that
//!   caused it and with reads that are redirected through the cascade (§3.11); I/O on different
//!   grains runs in parallel. A grain's split bits change only under its exclusive lock (every
//!   copier holds it until its marks are applied), so a plan made under the lock holds until
//!   its copies have run; writes that need no copy take no lock;
//! - the *committer* batches the durability steps of concurrent copy-on-writes (group commit).
//!
//! Durability order for a copy-on-write: the grain copy is durable on the target, then its split
//! bit is durable in the journal, and only then is the triggering write issued.

mod backend;
mod cbt;
mod commit;
mod copier;
mod failure;
mod hook;
mod stats;

pub use backend::{Backend, DirBackend, FaultBackend, MemBackend};
pub use cbt::ExtentScan;
pub use copier::{RateLimiter, Step};
pub use failure::CopyFailure;
pub use hook::HookPoint;
pub use stats::{BUCKETS, CopyKind, Histogram, HistogramSnapshot, IoOp, IoStats, OpStats, Stats};

use crate::engine::{
    Engine, EngineError, Event, GroupId, Limits, MapId, MapState, MappingChange, MappingSpec, Op,
    VolId, decode_bounded,
};
use crate::meta::{Journal, MetaError, MetaFiles, Recovered};
use crate::store::{BlockStore, StoreError};
use commit::{Batch, CommitError, Committer};
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Errors of the volume layer.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The engine rejected the command or I/O; nothing changed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A block store failed.
    #[error("block store: {0}")]
    Store(#[from] StoreError),
    /// The metadata journal failed or is corrupt.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A journal record or checkpoint does not decode.
    #[error("metadata record does not decode: {0}; refusing to start")]
    Decode(String),
    /// A volume known to the metadata has no store.
    #[error("volume {vol} has no backing store: {source}")]
    MissingStore {
        /// The volume.
        vol: VolId,
        /// Why opening it failed.
        source: StoreError,
    },
    /// An earlier metadata write failed; the pool must be reopened.
    #[error("pool refuses changes after a failed metadata write ({0}); restart to recover")]
    Poisoned(String),
    /// A two-phase group start was committed after its freeze ended (I/O resumed, nothing
    /// started).
    #[error("the group freeze ended before the commit (it expired or was thawed): nothing started")]
    FreezeOver,
    /// `start --prep` of a mapping that was already prepared explicitly (FLASHCOPY.md §2.3 P2).
    #[error("mapping {0} is already prepared: start it without --prep")]
    AlreadyPrepared(MapId),
    /// A grain copy for a mapping failed on a store; the mapping (and its group) was stopped
    /// (FLASHCOPY.md §2.3 `IoError`).
    #[error("a grain copy for mapping {map} failed ({source}); the mapping is stopped")]
    CopyIo {
        /// The mapping whose copy failed.
        map: MapId,
        /// The store's error.
        source: StoreError,
    },
}

/// Pool settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Engine limits.
    pub limits: Limits,
    /// Checkpoint the metadata when the journal grows past this many bytes.
    pub checkpoint_after: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            checkpoint_after: 64 << 20,
        }
    }
}

/// What a start did.
#[derive(Clone, Debug)]
pub struct StartReport {
    /// How long host I/O to the pool was held (pause + drain + switch).
    pub pause: Duration,
    /// State changes.
    pub events: Vec<Event>,
}

const LOCK_SHARDS: usize = 1024;

/// Volumes with FlashCopy semantics on top of block stores, with crash-safe metadata.
pub struct Pool {
    engine: RwLock<Engine>,
    gate: RwLock<()>,
    control: Mutex<()>,
    stores: RwLock<BTreeMap<VolId, Arc<dyn BlockStore>>>,
    grain_locks: Vec<RwLock<()>>,
    committer: Committer,
    backend: Arc<dyn Backend>,
    /// Data-path counters.
    pub stats: Stats,
    failure_listener: failure::Listener,
    hook: hook::Hook,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

type Commit = std::sync::mpsc::SyncSender<Result<StartReport, VolumeError>>;

/// A group held frozen by [`Pool::freeze_group`]. Dropping it thaws the group (I/O resumes,
/// nothing starts).
#[derive(Debug)]
pub struct FrozenGroup {
    cmd: Option<std::sync::mpsc::SyncSender<Commit>>,
    thread: std::thread::JoinHandle<()>,
}

impl FrozenGroup {
    /// Phase two: every member switches at one instant, then I/O resumes. Fails (and nothing
    /// starts) when the hold time has already passed.
    pub fn commit(mut self) -> Result<StartReport, VolumeError> {
        let expired = || VolumeError::FreezeOver;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let cmd = self.cmd.take().ok_or_else(expired)?;
        cmd.send(tx).map_err(|_| expired())?;
        rx.recv().map_err(|_| expired())?
    }

    /// Whether the freeze already ended (committed, thawed or expired).
    pub fn is_over(&self) -> bool {
        self.thread.is_finished()
    }
}

/// The engine the metadata describes: the checkpoint (or a fresh engine) with the journal's
/// records replayed. Every byte here comes from disk: a bad one is an error, never a panic.
pub(crate) fn recover_engine(rec: &Recovered, limits: &Limits) -> Result<Engine, VolumeError> {
    let mut engine = match &rec.checkpoint {
        // The bitmaps of a checkpoint together fit the budget they were charged to (the
        // default one, or a larger one configured here).
        Some(bytes) => decode_bounded(
            limits
                .bitmap_budget_bytes
                .max(Limits::default().bitmap_budget_bytes)
                * 8,
            || bincode::deserialize(bytes),
        )
        .map_err(|e| {
            VolumeError::Decode(format!("checkpoint generation {}: {e}", rec.generation))
        })?,
        None => Engine::new(limits.clone()),
    };
    for (i, r) in rec.records.iter().enumerate() {
        let op: Op = bincode::deserialize(r)
            .map_err(|e| VolumeError::Decode(format!("journal record {i}: {e}")))?;
        if let Err(e) = engine.apply(&op) {
            tracing::warn!(?op, error = %e, "journal op rejected on replay");
        }
    }
    engine.set_limits(limits.clone());
    Ok(engine)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Pool {
    /// Opens (or creates) a pool under `dir`: metadata in `dir/meta`, volumes in `dir/volumes`.
    pub fn open_dir(dir: &Path, cfg: PoolConfig) -> Result<Self, VolumeError> {
        let files = MetaFiles::open_dir(&dir.join("meta"))?;
        let backend = Arc::new(DirBackend::new(dir.join("volumes"))?);
        Self::open(files, backend, cfg)
    }

    /// Opens a pool: recovers the engine from the newest checkpoint plus the journal, opens every
    /// volume's store, removes stores left by interrupted creates, and finishes interrupted
    /// prepares.
    pub fn open(
        files: MetaFiles,
        backend: Arc<dyn Backend>,
        cfg: PoolConfig,
    ) -> Result<Self, VolumeError> {
        let (journal, rec) = Journal::open(files)?;
        let engine = recover_engine(&rec, &cfg.limits)?;
        let mut stores = BTreeMap::new();
        for v in engine.volumes() {
            let s = backend
                .open(v.id)
                .map_err(|source| VolumeError::MissingStore { vol: v.id, source })?;
            if s.len() != v.size {
                // A resize whose journal record did not persist (or did, before the store's
                // size did): the metadata is the truth.
                tracing::warn!(vol = %v.id, store = s.len(), size = v.size, "store size differs from metadata; resizing the store");
                s.resize(v.size)?;
                s.flush()?;
            }
            stores.insert(v.id, s);
        }
        for orphan in backend.list()? {
            if !stores.contains_key(&orphan) {
                tracing::info!(vol = %orphan, "removing the store of an interrupted volume create");
                backend.remove(orphan)?;
            }
        }
        let replayed = rec.records.len();
        tracing::info!(
            generation = rec.generation,
            replayed,
            discarded_tail_bytes = rec.discarded_tail_bytes,
            volumes = engine.volumes().count(),
            mappings = engine.mappings().count(),
            "metadata recovered"
        );
        let pool = Pool {
            engine: RwLock::new(engine),
            gate: RwLock::new(()),
            control: Mutex::new(()),
            stores: RwLock::new(stores),
            grain_locks: (0..LOCK_SHARDS).map(|_| RwLock::new(())).collect(),
            committer: Committer::new(journal, cfg.checkpoint_after),
            backend,
            stats: Stats::default(),
            failure_listener: failure::Listener::default(),
            hook: hook::Hook::default(),
        };
        if replayed > 0 {
            pool.committer.checkpoint(&pool.engine)?;
        }
        pool.finish_interrupted_prepares()?;
        Ok(pool)
    }

    fn finish_interrupted_prepares(&self) -> Result<(), VolumeError> {
        let (maps, groups): (Vec<MapId>, Vec<GroupId>) = {
            let e = self.engine.read();
            let preparing = |m: &&crate::engine::Mapping| m.state == MapState::Preparing;
            let maps = e
                .mappings()
                .filter(preparing)
                .filter(|m| m.group.is_none())
                .map(|m| m.id)
                .collect();
            let mut groups: Vec<GroupId> = e
                .mappings()
                .filter(preparing)
                .filter_map(|m| m.group)
                .collect();
            groups.dedup();
            (maps, groups)
        };
        for m in maps {
            self.flush_sources(&[m], Op::FlushDone { map: m }, Op::FlushFailed { map: m })?;
        }
        for g in groups {
            let members = self
                .engine
                .read()
                .group(g)
                .map(|g| g.members.clone())
                .unwrap_or_default();
            self.flush_sources(
                &members,
                Op::GroupFlushDone { group: g },
                Op::GroupFlushFailed { group: g },
            )?;
        }
        Ok(())
    }

    /// Read access to the engine (listings, progress). Do not hold it across I/O.
    pub fn engine(&self) -> RwLockReadGuard<'_, Engine> {
        self.engine.read()
    }

    /// Journal commit rounds so far (each is one journal sync).
    pub fn commit_rounds(&self) -> u64 {
        self.committer.rounds.load(Ordering::Relaxed)
    }

    fn store(&self, vol: VolId) -> Arc<dyn BlockStore> {
        self.stores.read()[&vol].clone()
    }

    /// Applies a control op: I/O is paused and drained while it switches; durable on return.
    fn control(&self, ops: &[Op]) -> Result<Vec<Event>, VolumeError> {
        let _c = self.control.lock();
        self.control_locked(ops).map(|(ev, _)| ev)
    }

    /// As [`Pool::control`] with the control lock held; also returns how long I/O was held.
    fn control_locked(&self, ops: &[Op]) -> Result<(Vec<Event>, Duration), VolumeError> {
        let t0 = Instant::now();
        let _gate = self.gate.write();
        let mut events = Vec::new();
        let mut applied = Vec::new();
        {
            let mut e = self.engine.write();
            for op in ops {
                match e.apply(op) {
                    Ok(ev) => {
                        events.extend(ev);
                        applied.push(op.clone());
                    }
                    // Ops in one call come as a unit: the first is the command, later ones are
                    // its follow-ups, so a failure of the first leaves everything as it was.
                    Err(err) if applied.is_empty() => return Err(err.into()),
                    Err(err) => {
                        tracing::warn!(?op, error = %err, "follow-up op rejected");
                        break;
                    }
                }
            }
        }
        self.committer.commit(
            &self.engine,
            Batch {
                ops: applied,
                stores: Vec::new(),
                apply: false,
            },
        )?;
        log_events(&events);
        Ok((events, t0.elapsed()))
    }

    /// Creates a blank volume of `size` bytes.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<VolId, VolumeError> {
        self.create_volume_from(name, size, "")
    }

    /// Creates a volume of `size` bytes that records its `origin` (see
    /// [`crate::engine::Volume::origin`]).
    pub fn create_volume_from(
        &self,
        name: &str,
        size: u64,
        origin: &str,
    ) -> Result<VolId, VolumeError> {
        let _c = self.control.lock();
        let id = self.engine.read().next_volume_id();
        // Validate before touching the backend; the store exists before the op is durable, so a
        // crash in between leaves only an orphan store, removed on open.
        let op = Op::CreateVolume {
            id,
            name: name.into(),
            size,
            origin: origin.into(),
        };
        self.engine.read().check_volume_op(&op)?;
        let store = self.backend.create(id, size)?;
        self.stores.write().insert(id, store);
        match self.control_locked(&[op]) {
            Ok(_) => Ok(id),
            Err(e) => {
                // Only a rejection proves the op is not in the journal; after an I/O failure it
                // may be, so the store stays and `open` removes it if the op did not persist.
                if matches!(e, VolumeError::Engine(_)) {
                    self.stores.write().remove(&id);
                    let _ = self.backend.remove(id);
                }
                Err(e)
            }
        }
    }

    /// Deletes a volume that no mapping uses.
    pub fn delete_volume(&self, vol: VolId) -> Result<(), VolumeError> {
        let _c = self.control.lock();
        self.control_locked(&[Op::DeleteVolume { id: vol }])?;
        self.stores.write().remove(&vol);
        self.backend.remove(vol)?;
        Ok(())
    }

    /// Renames a volume; mappings and I/O are not affected.
    pub fn rename_volume(&self, vol: VolId, name: &str) -> Result<(), VolumeError> {
        self.control(&[Op::RenameVolume {
            id: vol,
            name: name.into(),
        }])
        .map(|_| ())
    }

    /// Resizes a volume. A volume that mappings use may grow (the mappings keep their range;
    /// see [`crate::engine::Mapping::grains`]) but not shrink.
    pub fn resize_volume(&self, vol: VolId, size: u64) -> Result<(), VolumeError> {
        let _c = self.control.lock();
        let old = self
            .engine
            .read()
            .volume(vol)
            .map(|v| v.size)
            .ok_or(EngineError::NoSuchVolume(vol))?;
        self.engine
            .read()
            .check_volume_op(&Op::ResizeVolume { id: vol, size })?;
        let store = self.store(vol);
        store.resize(size)?;
        store.flush()?;
        if let Err(e) = self.control_locked(&[Op::ResizeVolume { id: vol, size }]) {
            // After an I/O failure the op may be durable; `open` reconciles the store's size.
            if matches!(e, VolumeError::Engine(_)) {
                let _ = store.resize(old);
            }
            return Err(e);
        }
        Ok(())
    }

    /// `mkfcmap`.
    pub fn create_mapping(&self, spec: MappingSpec) -> Result<MapId, VolumeError> {
        let _c = self.control.lock();
        let id = self.engine.read().next_mapping_id();
        self.control_locked(&[Op::CreateMapping { id, spec }])?;
        Ok(id)
    }

    /// `chfcmap`.
    pub fn modify_mapping(
        &self,
        map: MapId,
        change: MappingChange,
    ) -> Result<Vec<Event>, VolumeError> {
        self.control(&[Op::Modify { map, change }])
    }

    /// `rmfcmap`.
    pub fn delete_mapping(&self, map: MapId, force: bool) -> Result<Vec<Event>, VolumeError> {
        self.control(&[Op::DeleteMapping { map, force }])
    }

    /// `stopfcmap`.
    pub fn stop_mapping(
        &self,
        map: MapId,
        force: bool,
        split: bool,
    ) -> Result<Vec<Event>, VolumeError> {
        self.control(&[Op::Stop { map, force, split }])
    }

    /// `mkfcconsistgrp`.
    pub fn create_group(
        &self,
        name: Option<&str>,
        autodelete: bool,
    ) -> Result<GroupId, VolumeError> {
        let _c = self.control.lock();
        let id = self.engine.read().next_group_id();
        self.control_locked(&[Op::CreateGroup {
            id,
            name: name.map(Into::into),
            autodelete,
        }])?;
        Ok(id)
    }

    /// `stopfcconsistgrp`.
    pub fn stop_group(
        &self,
        group: GroupId,
        force: bool,
        split: bool,
    ) -> Result<Vec<Event>, VolumeError> {
        self.control(&[Op::StopGroup {
            group,
            force,
            split,
        }])
    }

    /// `rmfcconsistgrp`.
    pub fn delete_group(&self, group: GroupId, force: bool) -> Result<Vec<Event>, VolumeError> {
        self.control(&[Op::DeleteGroup { group, force }])
    }

    /// Flushes the sources of `maps` (prepare step 1), then applies `done` or `failed`.
    fn flush_sources(
        &self,
        maps: &[MapId],
        done: Op,
        failed: Op,
    ) -> Result<Vec<Event>, VolumeError> {
        let sources: Vec<VolId> = {
            let e = self.engine.read();
            maps.iter()
                .filter_map(|m| e.mapping(*m))
                .map(|m| m.source)
                .collect()
        };
        let res: Result<(), StoreError> = sources.iter().try_for_each(|v| self.store(*v).flush());
        match res {
            Ok(()) => self.control_locked(&[done]).map(|(e, _)| e),
            Err(err) => {
                tracing::warn!(error = %err, "flush failed while preparing");
                self.control_locked(&[failed])?;
                Err(err.into())
            }
        }
    }

    /// `prestartfcmap [-restore]`: preparing, flush the source, prepared.
    pub fn prepare_mapping(&self, map: MapId, restore: bool) -> Result<Vec<Event>, VolumeError> {
        let _c = self.control.lock();
        self.prepare_locked(map, restore)
    }

    fn prepare_locked(&self, map: MapId, restore: bool) -> Result<Vec<Event>, VolumeError> {
        let mut ev = self.control_locked(&[Op::Prepare { map, restore }])?.0;
        ev.extend(self.flush_sources(&[map], Op::FlushDone { map }, Op::FlushFailed { map })?);
        Ok(ev)
    }

    /// `prestartfcconsistgrp [-restore]`.
    pub fn prepare_group(&self, group: GroupId, restore: bool) -> Result<Vec<Event>, VolumeError> {
        let _c = self.control.lock();
        self.prepare_group_locked(group, restore)
    }

    fn prepare_group_locked(
        &self,
        group: GroupId,
        restore: bool,
    ) -> Result<Vec<Event>, VolumeError> {
        let mut ev = self
            .control_locked(&[Op::PrepareGroup { group, restore }])?
            .0;
        let members = self
            .engine
            .read()
            .group(group)
            .map(|g| g.members.clone())
            .unwrap_or_default();
        ev.extend(self.flush_sources(
            &members,
            Op::GroupFlushDone { group },
            Op::GroupFlushFailed { group },
        )?);
        Ok(ev)
    }

    /// `startfcmap [-prep] [-restore]`.
    pub fn start_mapping(
        &self,
        map: MapId,
        prep: bool,
        restore: bool,
    ) -> Result<StartReport, VolumeError> {
        let _c = self.control.lock();
        let mut events = Vec::new();
        if prep {
            let state = self
                .engine
                .read()
                .mapping(map)
                .map(|m| m.state)
                .ok_or(EngineError::NoSuchMapping(map))?;
            if state == MapState::Prepared {
                return Err(VolumeError::AlreadyPrepared(map));
            }
            events.extend(self.prepare_locked(map, restore)?);
        }
        let source = self
            .engine
            .read()
            .mapping(map)
            .map(|m| m.source)
            .ok_or(EngineError::NoSuchMapping(map))?;
        self.start_locked(
            &[source],
            Op::Start {
                map,
                now: now_secs(),
            },
            events,
        )
    }

    /// `startfcconsistgrp [-prep] [-restore]`: every member's point in time is the same instant.
    pub fn start_group(
        &self,
        group: GroupId,
        prep: bool,
        restore: bool,
    ) -> Result<StartReport, VolumeError> {
        let _c = self.control.lock();
        let mut events = Vec::new();
        if prep {
            events.extend(self.prepare_group_locked(group, restore)?);
        }
        let sources: Vec<VolId> = {
            let e = self.engine.read();
            let g = e.group(group).ok_or(EngineError::NoSuchGroup(group))?;
            g.members
                .iter()
                .filter_map(|m| e.mapping(*m))
                .map(|m| m.source)
                .collect()
        };
        self.start_locked(
            &sources,
            Op::StartGroup {
                group,
                now: now_secs(),
            },
            events,
        )
    }

    /// Phase one of a group start that spans agents (ARCHITECTURE.md decision 5): on a thread
    /// of its own, take the control lock, pause and drain I/O, flush every member source, and
    /// hold there until [`FrozenGroup::commit`] switches the group (phase two), or until the
    /// handle is dropped or `hold` passes, whichever comes first: then I/O resumes unchanged.
    /// So a controller that dies between the phases never leaves I/O paused for long.
    /// The group must be prepared.
    pub fn freeze_group(
        self: &Arc<Self>,
        group: GroupId,
        hold: Duration,
    ) -> Result<FrozenGroup, VolumeError> {
        use std::sync::mpsc::{RecvTimeoutError, sync_channel};
        let (ready_tx, ready_rx) = sync_channel::<Result<(), VolumeError>>(1);
        let (cmd_tx, cmd_rx) = sync_channel::<Commit>(1);
        let pool = self.clone();
        let thread = std::thread::Builder::new()
            .name("group-freeze".into())
            .spawn(move || {
                let _c = pool.control.lock();
                let t0 = Instant::now();
                let sources = {
                    let e = pool.engine.read();
                    match e.group(group) {
                        None => Err(EngineError::NoSuchGroup(group)),
                        Some(_)
                            if e.group_state(group)
                                != Some(crate::engine::GroupState::Map(MapState::Prepared)) =>
                        {
                            Err(EngineError::BadGroupState {
                                group,
                                state: e
                                    .group_state(group)
                                    .map_or("deleted".into(), |s| s.to_string()),
                                action: "freeze (prepare the group first)",
                            })
                        }
                        Some(g) => Ok(g
                            .members
                            .iter()
                            .filter_map(|m| e.mapping(*m))
                            .map(|m| m.source)
                            .collect::<Vec<_>>()),
                    }
                };
                let sources = match sources {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let gate = pool.gate.write();
                if let Err(e) = pool.flush_all(&sources) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                tracing::info!(group = %group, hold_ms = hold.as_millis() as u64, "group frozen: I/O paused until commit or thaw");
                if ready_tx.send(Ok(())).is_err() {
                    return;
                }
                match cmd_rx.recv_timeout(hold) {
                    Ok(reply) => {
                        let res = pool.switch_locked(Op::StartGroup {
                            group,
                            now: now_secs(),
                        });
                        drop(gate);
                        let pause = t0.elapsed();
                        tracing::info!(group = %group, pause_us = pause.as_micros() as u64, "point in time taken for the group (two-phase)");
                        let _ = reply.send(res.map(|events| StartReport { pause, events }));
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        drop(gate);
                        tracing::warn!(group = %group, "group freeze expired without a commit: I/O resumed, nothing started");
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        drop(gate);
                        tracing::info!(group = %group, "group thawed: I/O resumed, nothing started");
                    }
                }
            })
            .map_err(|e| VolumeError::Store(StoreError::Io(e)))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(FrozenGroup {
                cmd: Some(cmd_tx),
                thread,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(VolumeError::Poisoned("the freeze thread failed".into())),
        }
    }

    /// Flushes the stores of `vols` concurrently: I/O is held for the slowest flush rather than
    /// the sum of them (the file system batches concurrent syncs into one journal commit).
    fn flush_all(&self, vols: &[VolId]) -> Result<(), VolumeError> {
        let stores: Vec<_> = vols.iter().map(|v| self.store(*v)).collect();
        if stores.len() <= 1 {
            for s in &stores {
                s.flush()?;
            }
            return Ok(());
        }
        std::thread::scope(|sc| {
            // Without a thread (resource exhaustion) a store is flushed here instead.
            let flushes: Vec<_> = stores
                .iter()
                .map(|s| {
                    std::thread::Builder::new()
                        .spawn_scoped(sc, || s.flush())
                        .map_err(|_| s)
                })
                .collect();
            let mut res = Ok(());
            for f in flushes {
                let r = match f {
                    Ok(t) => match t.join() {
                        Ok(r) => r.map_err(VolumeError::from),
                        Err(_) => Err(VolumeError::Poisoned("a flush thread panicked".into())),
                    },
                    Err(s) => s.flush().map_err(VolumeError::from),
                };
                if res.is_ok() {
                    res = r;
                }
            }
            res
        })
    }

    /// Applies a start op and makes it durable; the caller holds the gate.
    fn switch_locked(&self, op: Op) -> Result<Vec<Event>, VolumeError> {
        let ev = self.engine.write().apply(&op)?;
        self.committer.commit(
            &self.engine,
            Batch {
                ops: vec![op],
                stores: Vec::new(),
                apply: false,
            },
        )?;
        log_events(&ev);
        Ok(ev)
    }

    /// The trigger (FLASHCOPY.md §4.2): pause and drain I/O, make every write completed so far
    /// durable on the sources, switch, resume.
    fn start_locked(
        &self,
        sources: &[VolId],
        op: Op,
        mut events: Vec<Event>,
    ) -> Result<StartReport, VolumeError> {
        let t0 = Instant::now();
        let gate = self.gate.write();
        self.flush_all(sources)?;
        let ev = self.engine.write().apply(&op)?;
        self.committer.commit(
            &self.engine,
            Batch {
                ops: vec![op.clone()],
                stores: Vec::new(),
                apply: false,
            },
        )?;
        drop(gate);
        let pause = t0.elapsed();
        match op {
            Op::Start { map, .. } => {
                self.stats.start_pause_mapping.observe(pause);
                tracing::info!(map = %map, pause_us = pause.as_micros() as u64, "point in time taken")
            }
            Op::StartGroup { group, .. } => {
                self.stats.start_pause_group.observe(pause);
                tracing::info!(group = %group, pause_us = pause.as_micros() as u64, "point in time taken for the group")
            }
            _ => {}
        }
        log_events(&ev);
        events.extend(ev);
        Ok(StartReport { pause, events })
    }

    fn grain_lock(&self, domain: VolId, grain: u64) -> &RwLock<()> {
        &self.grain_locks[self.grain_shard(domain, grain)]
    }

    fn grain_shard(&self, domain: VolId, grain: u64) -> usize {
        let h = domain.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ grain.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        (h >> 17) as usize % LOCK_SHARDS
    }

    /// Locks the grain-lock shards of `grains` exclusively, all at once and in index order: the
    /// one order every holder of several shards uses, so no two of them deadlock.
    fn lock_grains(
        &self,
        domain: VolId,
        grains: impl IntoIterator<Item = u64>,
    ) -> Vec<RwLockWriteGuard<'_, ()>> {
        let mut shards: Vec<usize> = grains
            .into_iter()
            .map(|g| self.grain_shard(domain, g))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        shards
            .iter()
            .map(|&i| {
                self.grain_locks[i].try_write().unwrap_or_else(|| {
                    self.at(HookPoint::LockWait);
                    self.grain_locks[i].write()
                })
            })
            .collect()
    }

    /// Reads `buf.len()` bytes of `vol` at `offset`.
    pub fn read(&self, vol: VolId, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let _gate = self.gate.read();
        let shape = self.engine.read().check_io(vol, offset, buf.len() as u64)?;
        let Some((domain, grain)) = shape.domain else {
            return Ok(self.store(vol).read_at(buf, offset)?);
        };
        let own = self.store(vol);
        for (g, range) in grain_segments(offset, buf.len() as u64, grain.bytes()) {
            let piece = &mut buf[(range.start - offset) as usize..(range.end - offset) as usize];
            if self.engine.read().resolve(vol, g) == vol {
                // Split (or not a target): the data is ours and stays ours.
                own.read_at(piece, range.start)?;
                continue;
            }
            let _l = self.grain_lock(domain, g).read();
            let from = self.engine.read().resolve(vol, g);
            read_padded(&*self.store(from), piece, range.start)?;
        }
        Ok(())
    }

    /// Writes `data` to `vol` at `offset`, copying grains first where a point in time needs them.
    pub fn write(&self, vol: VolId, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        failure::retry_after_copy_failure(self, || self.write_once(vol, offset, data))
    }

    fn write_once(&self, vol: VolId, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        let _gate = self.gate.read();
        let (shape, size) = {
            let e = self.engine.read();
            (
                e.check_io(vol, offset, data.len() as u64)?,
                e.volume(vol).map_or(0, |v| v.size),
            )
        };
        let own = self.store(vol);
        let Some((domain, grain)) = shape.domain else {
            return Ok(own.write_at(data, offset)?);
        };
        let gb = grain.bytes();
        let whole = |g: u64, r: &Range<u64>| r.start == g * gb && r.end == ((g + 1) * gb).min(size);
        let piece = |r: &Range<u64>| &data[(r.start - offset) as usize..(r.end - offset) as usize];
        // Grains that need a copy or a mark. The others are written as they are: a split grain
        // stays split while the gate is held.
        let slow: Vec<(u64, Range<u64>)> = {
            let e = self.engine.read();
            grain_segments(offset, data.len() as u64, gb)
                .filter(|(g, r)| !e.plan_write(vol, *g, whole(*g, r)).is_noop())
                .collect()
        };
        if slow.is_empty() {
            return Ok(own.write_at(data, offset)?);
        }
        self.at(HookPoint::WriteChecked { vol });
        // All of them at once, so that the request's copies share one commit round (one set
        // of syncs, not one per grain).
        let _locks = self.lock_grains(domain, slow.iter().map(|(g, _)| *g));
        let plans: Vec<_> = {
            let e = self.engine.read();
            slow.iter()
                .map(|(g, r)| e.plan_write(vol, *g, whole(*g, r)))
                .collect()
        };
        self.at(HookPoint::WritePlanned { vol });
        let (mut marks, mut dirty, mut hidden) = (Vec::new(), Vec::new(), Vec::new());
        // The volume each dirty store belongs to, to tell a target's failed flush (the mapping
        // stops, as for a failed copy) from this volume's own.
        let mut dirty_vols = Vec::new();
        for ((g, r), plan) in slow.iter().zip(plans) {
            for (v, s) in self.run_copies(&plan, gb)?.0 {
                dirty_vols.push(v);
                dirty.push(s);
            }
            self.stats
                .cow_grains
                .fetch_add(plan.copies.len() as u64, Ordering::Relaxed);
            if !plan.visible {
                // A target grain nobody reads from this volume until its mark is durable: the
                // data goes first and is synced with the mark.
                own.write_at(piece(r), r.start)?;
                hidden.push(*g);
            }
            marks.extend(plan.marks);
        }
        if !hidden.is_empty() {
            dirty.push(own.clone());
            dirty_vols.push(vol);
        }
        match self.commit_marks(marks, dirty) {
            Err(CommitError::Refused { store, source }) if dirty_vols[store] != vol => {
                return Err(self.copy_io(
                    dirty_vols[store],
                    &crate::engine::GrainPlan::default(),
                    source,
                ));
            }
            r => r?,
        }
        if hidden.is_empty() {
            return Ok(own.write_at(data, offset)?);
        }
        for (g, r) in grain_segments(offset, data.len() as u64, gb) {
            if !hidden.contains(&g) {
                own.write_at(piece(&r), r.start)?;
            }
        }
        Ok(())
    }

    /// Makes every completed write to `vol` durable.
    pub fn flush(&self, vol: VolId) -> Result<(), VolumeError> {
        let _gate = self.gate.read();
        self.engine
            .read()
            .volume(vol)
            .ok_or(EngineError::NoSuchVolume(vol))?;
        Ok(self.store(vol).flush()?)
    }

    /// Executes a plan's copies in order; returns the volumes written with their stores, and
    /// the bytes copied.
    /// Volumes of one cascade may differ in size: each copy reads the grain with zeros past
    /// the source store's end and writes what fits in the target store.
    fn run_copies(
        &self,
        plan: &crate::engine::GrainPlan,
        gb: u64,
    ) -> Result<(Written, u64), VolumeError> {
        let start = plan.grain * gb;
        let mut buf = vec![
            0u8;
            if plan.copies.is_empty() {
                0
            } else {
                gb as usize
            }
        ];
        let (mut dirty, mut bytes) = (Vec::new(), 0);
        for c in &plan.copies {
            if c.from == c.to {
                continue;
            }
            let to = self.store(c.to);
            let res = read_padded(&*self.store(c.from), &mut buf, start);
            let n = res
                .and_then(|()| write_clipped(&*to, &buf, start))
                .map_err(|e| self.copy_io(c.to, plan, e))?;
            bytes += n;
            dirty.push((c.to, to));
        }
        Ok((dirty, bytes))
    }

    fn commit_marks(
        &self,
        marks: Vec<Op>,
        stores: Vec<Arc<dyn BlockStore>>,
    ) -> Result<(), CommitError> {
        if marks.is_empty() {
            return Ok(());
        }
        self.committer.commit_or_refuse(
            &self.engine,
            Batch {
                ops: marks,
                stores,
                apply: true,
            },
        )
    }

    /// Writes a checkpoint of the metadata now (clean shutdown).
    pub fn checkpoint(&self) -> Result<(), VolumeError> {
        let _gate = self.gate.write();
        self.committer.checkpoint(&self.engine)
    }
}

/// The volumes a plan's copies wrote, each with its store (to flush before the marks commit).
type Written = Vec<(VolId, Arc<dyn BlockStore>)>;

/// Reads `buf` from `store` at `offset`, with zeros past the store's end: a mapping between
/// volumes of different sizes maps whole grains, and the last one may end past the smaller
/// volume.
pub(crate) fn read_padded(
    store: &dyn BlockStore,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), StoreError> {
    let have = store.len().saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[have..].fill(0);
    if have > 0 {
        store.read_at(&mut buf[..have], offset)?;
    }
    Ok(())
}

/// Writes the part of `buf` that lies inside `store` at `offset`; returns the bytes written.
pub(crate) fn write_clipped(
    store: &dyn BlockStore,
    buf: &[u8],
    offset: u64,
) -> Result<u64, StoreError> {
    let n = store.len().saturating_sub(offset).min(buf.len() as u64) as usize;
    if n > 0 {
        store.write_at(&buf[..n], offset)?;
    }
    Ok(n as u64)
}

fn log_events(events: &[Event]) {
    for e in events {
        match e {
            Event::MapState { map, from, to } => {
                tracing::info!(map = %map, %from, %to, "mapping state")
            }
            Event::MapDeleted { map } => tracing::info!(map = %map, "mapping deleted"),
            Event::GroupDeleted { group } => {
                tracing::info!(group = %group, "consistency group deleted")
            }
        }
    }
}

/// Splits `offset..offset+len` at grain boundaries: (grain index, byte range).
fn grain_segments(
    offset: u64,
    len: u64,
    gb: u64,
) -> impl Iterator<Item = (u64, std::ops::Range<u64>)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        (pos < end).then(|| {
            let g = pos / gb;
            let stop = ((g + 1) * gb).min(end);
            let r = pos..stop;
            pos = stop;
            (g, r)
        })
    })
}

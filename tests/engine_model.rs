//! Model-based property test: random interleavings of writes, reads, mapping and group commands,
//! background copy and cleaning steps and restarts, checked after every step against a naive
//! reference model in which a start takes a full copy of the source.
//!
//! Volumes have different sizes and grow and shrink, so mappings join volumes of different sizes:
//! the model copies the mapped range (the first min(source, target) bytes at mkfcmap, rounded up
//! to whole grains, zeros past the source's end) and leaves the rest of a larger target alone.

use flashcopy_csi::engine::{
    Engine, EngineError, Event, GrainPlan, GrainSize, GroupId, MapId, MapState, MappingChange,
    MappingSpec, VolId,
};
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::volume::{MemBackend, Pool, PoolConfig, Step, VolumeError};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

const SECTOR: usize = 512;
/// One full 64 KiB grain and a partial one; a single partial grain at 256 KiB.
const VOL_SIZE: usize = 96 * 1024;
const K: usize = 1024;
/// Initial sizes: mostly `VOL_SIZE` (sources are drawn mostly from the first three), larger
/// and smaller ones, grain-aligned or not.
const SIZES: [usize; 10] = [
    VOL_SIZE,
    128 * K,
    160 * K,
    VOL_SIZE,
    64 * K,
    40 * K + 512,
    VOL_SIZE,
    192 * K,
    VOL_SIZE,
    128 * K + 512,
];
const N_VOLS: usize = SIZES.len();
/// Writes and reads reach this far (clamped to each volume's size).
const MAX_SIZE: usize = 256 * K;

#[derive(Clone, Debug)]
enum Cmd {
    Write {
        vol: usize,
        sector: usize,
        sectors: usize,
        whole_grain: bool,
    },
    Read {
        vol: usize,
        sector: usize,
        sectors: usize,
    },
    Snap {
        src: usize,
        tgt: usize,
        copy_rate: u8,
        incremental: bool,
    },
    Mkmap {
        src: usize,
        tgt: usize,
        copy_rate: u8,
        grain: Option<GrainSize>,
        incremental: bool,
        autodelete: bool,
    },
    Prepare {
        map: usize,
        restore: bool,
    },
    Start {
        map: usize,
        prep: bool,
        restore: bool,
    },
    Stop {
        map: usize,
        force: bool,
        split: bool,
    },
    Delete {
        map: usize,
        force: bool,
    },
    Mkgrp,
    Join {
        map: usize,
        group: usize,
    },
    Leave {
        map: usize,
    },
    StartGroup {
        group: usize,
        prep: bool,
        restore: bool,
    },
    StopGroup {
        group: usize,
        force: bool,
    },
    Background {
        map: usize,
        steps: usize,
    },
    Rate {
        map: usize,
        copy_rate: u8,
    },
    /// Grow (or shrink) a volume by `delta` bytes.
    Resize {
        vol: usize,
        delta: i64,
    },
    Reopen,
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let v = 0..N_VOLS;
    let m = 0..64usize;
    prop_oneof![
        12 => (prop_oneof![1 => 0..3usize, 1 => v.clone()], 0..MAX_SIZE / SECTOR, 1..=(2 * 64 * 1024 / SECTOR), prop::bool::weighted(0.3))
            .prop_map(|(vol, sector, sectors, whole_grain)| Cmd::Write { vol, sector, sectors, whole_grain }),
        2 => (v.clone(), 0..MAX_SIZE / SECTOR, 1..=(2 * 64 * 1024 / SECTOR))
            .prop_map(|(vol, sector, sectors)| Cmd::Read { vol, sector, sectors }),
        5 => (prop_oneof![3 => 0..2usize, 1 => v.clone()], v.clone(), prop_oneof![3 => Just(0u8), 1 => Just(150u8)], prop::bool::weighted(0.2))
            .prop_map(|(src, tgt, copy_rate, incremental)| Cmd::Snap { src, tgt, copy_rate, incremental }),
        3 => (prop_oneof![3 => 0..3usize, 1 => v.clone()], v.clone(), prop_oneof![3 => Just(0u8), 1 => Just(150u8)],
              prop_oneof![4 => Just(Some(GrainSize::K64)), 1 => Just(Some(GrainSize::K256)), 1 => Just(None)],
              prop::bool::weighted(0.3), prop::bool::weighted(0.2))
            .prop_map(|(src, tgt, copy_rate, grain, incremental, autodelete)| Cmd::Mkmap { src, tgt, copy_rate, grain, incremental, autodelete }),
        2 => (m.clone(), prop::bool::weighted(0.3)).prop_map(|(map, restore)| Cmd::Prepare { map, restore }),
        5 => (m.clone(), prop::bool::weighted(0.8), prop::bool::weighted(0.3)).prop_map(|(map, prep, restore)| Cmd::Start { map, prep, restore }),
        2 => (m.clone(), prop::bool::weighted(0.3), prop::bool::weighted(0.1)).prop_map(|(map, force, split)| Cmd::Stop { map, force, split }),
        2 => (m.clone(), any::<bool>()).prop_map(|(map, force)| Cmd::Delete { map, force }),
        1 => Just(Cmd::Mkgrp),
        2 => (m.clone(), 0..4usize).prop_map(|(map, group)| Cmd::Join { map, group }),
        1 => m.clone().prop_map(|map| Cmd::Leave { map }),
        2 => (0..4usize, prop::bool::weighted(0.8), prop::bool::weighted(0.2)).prop_map(|(group, prep, restore)| Cmd::StartGroup { group, prep, restore }),
        1 => (0..4usize, any::<bool>()).prop_map(|(group, force)| Cmd::StopGroup { group, force }),
        4 => (m.clone(), 1..4usize).prop_map(|(map, steps)| Cmd::Background { map, steps }),
        1 => (m, prop_oneof![Just(0u8), Just(150u8)]).prop_map(|(map, copy_rate)| Cmd::Rate { map, copy_rate }),
        2 => (v.clone(), prop_oneof![Just(64 * 1024i64), Just(32 * 1024), Just(512), Just(32 * 1024 + 512), Just(-32 * 1024)])
            .prop_map(|(vol, delta)| Cmd::Resize { vol, delta }),
        1 => Just(Cmd::Reopen),
    ]
}

/// The reference: every volume's bytes, and which sectors have a defined value.
#[derive(Clone)]
struct Model {
    data: BTreeMap<VolId, Vec<u8>>,
    defined: BTreeMap<VolId, Vec<bool>>,
}

impl Model {
    /// The target's bytes in the mapped range become unknown (a stopped or preparing target).
    fn undefine(&mut self, v: VolId, mapped: usize) {
        let d = self.defined.get_mut(&v).unwrap();
        let end = (mapped / SECTOR).min(d.len());
        d[..end].fill(false);
    }
    /// A start: the target's mapped range becomes the source's image, zeros past its end.
    fn copy(&mut self, from: VolId, to: VolId, mapped: usize) {
        let end = mapped.min(self.data[&to].len());
        let (src, def) = (self.data[&from].clone(), self.defined[&from].clone());
        let data = self.data.get_mut(&to).unwrap();
        for (i, b) in data[..end].iter_mut().enumerate() {
            *b = src.get(i).copied().unwrap_or(0);
        }
        let d = self.defined.get_mut(&to).unwrap();
        for (s, x) in d[..end / SECTOR].iter_mut().enumerate() {
            *x = def.get(s).copied().unwrap_or(true);
        }
    }
    fn resize(&mut self, v: VolId, size: usize) {
        self.data.get_mut(&v).unwrap().resize(size, 0);
        self.defined
            .get_mut(&v)
            .unwrap()
            .resize(size / SECTOR, true);
    }
    fn size(&self, v: VolId) -> usize {
        self.data[&v].len()
    }
}

struct World {
    meta: MetaFiles,
    backend: Arc<MemBackend>,
    pool: Pool,
    vols: Vec<VolId>,
    model: Model,
    cursors: BTreeMap<MapId, (u64, u64)>,
    writes: u8,
}

fn open(meta: &MetaFiles, backend: &Arc<MemBackend>) -> Pool {
    // A tiny checkpoint threshold exercises checkpoint + replay on every reopen.
    let cfg = PoolConfig {
        checkpoint_after: 4096,
        ..PoolConfig::default()
    };
    Pool::open(meta.clone(), backend.clone(), cfg).expect("pool opens")
}

impl World {
    fn new() -> Self {
        let meta = MetaFiles::in_memory();
        let backend = Arc::new(MemBackend::default());
        let pool = open(&meta, &backend);
        let mut vols = Vec::new();
        let mut model = Model {
            data: BTreeMap::new(),
            defined: BTreeMap::new(),
        };
        for (i, size) in SIZES.into_iter().enumerate() {
            let v = pool.create_volume(&format!("v{i}"), size as u64).unwrap();
            model.data.insert(v, vec![0; size]);
            model.defined.insert(v, vec![true; size / SECTOR]);
            vols.push(v);
        }
        World {
            meta,
            backend,
            pool,
            vols,
            model,
            cursors: BTreeMap::new(),
            writes: 0,
        }
    }

    fn maps(&self) -> Vec<MapId> {
        self.pool.engine().mappings().map(|m| m.id).collect()
    }
    fn map(&self, i: usize) -> Option<MapId> {
        let ms = self.maps();
        (!ms.is_empty()).then(|| ms[i % ms.len()])
    }
    fn group(&self, i: usize) -> Option<GroupId> {
        let gs: Vec<GroupId> = self.pool.engine().groups().map(|g| g.id).collect();
        (!gs.is_empty()).then(|| gs[i % gs.len()])
    }

    /// Applies the data effect of state changes, in the order they happened.
    fn apply_events(&mut self, events: &[Event], before: &Engine) {
        for e in events {
            if let Event::MapState { map, from, to } = e {
                // Source and target never change; a mapping may be new in this step, or gone
                // (autodelete) after it.
                let now = self.pool.engine().mapping(*map).cloned();
                let m = before
                    .mapping(*map)
                    .cloned()
                    .or(now)
                    .expect("mapping known");
                let mapped = (m.grains() * m.grain.bytes()) as usize;
                match (from, to) {
                    (MapState::Prepared, MapState::Copying) => {
                        self.model.copy(m.source, m.target, mapped)
                    }
                    (_, MapState::Preparing) | (_, MapState::Stopped) => {
                        self.model.undefine(m.target, mapped)
                    }
                    _ => {}
                }
            }
        }
    }

    /// State changes between two engines (for steps that report no events).
    fn diff_events(before: &Engine, after: &Engine) -> Vec<Event> {
        before
            .mappings()
            .filter_map(|m| {
                let to = after.mapping(m.id).map(|a| a.state)?;
                (to != m.state).then_some(Event::MapState {
                    map: m.id,
                    from: m.state,
                    to,
                })
            })
            .collect()
    }

    fn step(&mut self, c: &Cmd) {
        let before = self.pool.engine().clone();
        let res: Result<Vec<Event>, VolumeError> = match c.clone() {
            Cmd::Write {
                vol,
                sector,
                sectors,
                whole_grain,
            } => {
                let v = self.vols[vol];
                let size = self.model.size(v);
                let (off, len) = if whole_grain {
                    let g = 64 * 1024;
                    let off = (sector * SECTOR % size) / g * g;
                    (off, (g).min(size - off))
                } else {
                    let off = sector * SECTOR % size;
                    (off, (sectors * SECTOR).min(size - off))
                };
                self.writes = self.writes.wrapping_add(1).max(1);
                let data = vec![self.writes; len];
                match self.pool.write(v, off as u64, &data) {
                    Ok(()) => {
                        self.model.data.get_mut(&v).unwrap()[off..off + len].copy_from_slice(&data);
                        self.model.defined.get_mut(&v).unwrap()[off / SECTOR..(off + len) / SECTOR]
                            .fill(true);
                        Ok(vec![])
                    }
                    Err(e) => Err(e),
                }
            }
            Cmd::Read {
                vol,
                sector,
                sectors,
            } => {
                let v = self.vols[vol];
                let size = self.model.size(v);
                let off = sector * SECTOR % size;
                let len = (sectors * SECTOR).min(size - off);
                let mut buf = vec![0u8; len];
                match self.pool.read(v, off as u64, &mut buf) {
                    Ok(()) => {
                        let want = &self.model.data[&v][off..off + len];
                        let def = &self.model.defined[&v][off / SECTOR..(off + len) / SECTOR];
                        for (i, d) in def.iter().enumerate() {
                            let r = i * SECTOR..(i + 1) * SECTOR;
                            assert!(
                                !d || buf[r.clone()] == want[r],
                                "partial read of {v} at {off}+{len} differs at sector {i}"
                            );
                        }
                        Ok(vec![])
                    }
                    Err(e) => Err(e),
                }
            }
            Cmd::Snap {
                src,
                tgt,
                copy_rate,
                incremental,
            } => {
                let mut spec = MappingSpec::snapshot(self.vols[src], self.vols[tgt]);
                spec.copy_rate = copy_rate;
                spec.incremental = incremental;
                spec.grain = Some(GrainSize::K64);
                match self.pool.create_mapping(spec) {
                    Ok(m) => match self.pool.start_mapping(m, true, false) {
                        Ok(r) => Ok(r.events),
                        // The mapping exists now even though it could not start.
                        Err(VolumeError::Engine(_)) => {
                            Ok(Self::diff_events(&before, &self.pool.engine()))
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            Cmd::Mkmap {
                src,
                tgt,
                copy_rate,
                grain,
                incremental,
                autodelete,
            } => {
                let mut spec = MappingSpec::snapshot(self.vols[src], self.vols[tgt]);
                spec.copy_rate = copy_rate;
                spec.grain = grain;
                spec.incremental = incremental;
                spec.autodelete = autodelete;
                self.pool.create_mapping(spec).map(|_| vec![])
            }
            Cmd::Prepare { map, restore } => match self.map(map) {
                Some(m) => self.pool.prepare_mapping(m, restore),
                None => Ok(vec![]),
            },
            Cmd::Start { map, prep, restore } => match self.map(map) {
                Some(m) => self.pool.start_mapping(m, prep, restore).map(|r| r.events),
                None => Ok(vec![]),
            },
            Cmd::Stop { map, force, split } => match self.map(map) {
                Some(m) => self.pool.stop_mapping(m, force, split),
                None => Ok(vec![]),
            },
            Cmd::Delete { map, force } => match self.map(map) {
                Some(m) => self.pool.delete_mapping(m, force),
                None => Ok(vec![]),
            },
            Cmd::Mkgrp => self.pool.create_group(None, false).map(|_| vec![]),
            Cmd::Join { map, group } => match (self.map(map), self.group(group)) {
                (Some(m), Some(g)) => self.pool.modify_mapping(
                    m,
                    MappingChange {
                        group: Some(Some(g)),
                        ..Default::default()
                    },
                ),
                _ => Ok(vec![]),
            },
            Cmd::Leave { map } => match self.map(map) {
                Some(m) => self.pool.modify_mapping(
                    m,
                    MappingChange {
                        group: Some(None),
                        ..Default::default()
                    },
                ),
                None => Ok(vec![]),
            },
            Cmd::StartGroup {
                group,
                prep,
                restore,
            } => match self.group(group) {
                Some(g) => self.pool.start_group(g, prep, restore).map(|r| r.events),
                None => Ok(vec![]),
            },
            Cmd::StopGroup { group, force } => match self.group(group) {
                Some(g) => self.pool.stop_group(g, force, false),
                None => Ok(vec![]),
            },
            Cmd::Rate { map, copy_rate } => match self.map(map) {
                Some(m) => self.pool.modify_mapping(
                    m,
                    MappingChange {
                        copy_rate: Some(copy_rate),
                        ..Default::default()
                    },
                ),
                None => Ok(vec![]),
            },
            Cmd::Background { map, steps } => {
                if let Some(m) = self.map(map) {
                    for _ in 0..steps {
                        let state = self.pool.engine().mapping(m).map(|x| x.state);
                        let (bg, cl) = *self.cursors.entry(m).or_insert((0, u64::MAX));
                        let r = match state {
                            Some(MapState::Copying) => self.pool.background_step(m, bg),
                            Some(MapState::Stopping) => self.pool.clean_step(m, cl),
                            _ => break,
                        };
                        match r.expect("background step") {
                            Step::Copied { next, .. } => {
                                let c = self.cursors.get_mut(&m).unwrap();
                                if state == Some(MapState::Copying) {
                                    c.0 = next
                                } else {
                                    c.1 = next
                                }
                            }
                            _ => break,
                        }
                    }
                }
                let after = self.pool.engine().clone();
                Ok(Self::diff_events(&before, &after))
            }
            Cmd::Resize { vol, delta } => {
                let v = self.vols[vol];
                let size = (self.model.size(v) as i64 + delta).max(512) as usize;
                match self.pool.resize_volume(v, size as u64) {
                    Ok(()) => {
                        self.model.resize(v, size);
                        Ok(vec![])
                    }
                    Err(e) => Err(e),
                }
            }
            Cmd::Reopen => {
                let engine_before = self.pool.engine().clone();
                // Drop the pool first: a restarted agent finds only what was made durable.
                let pool = std::mem::replace(
                    &mut self.pool,
                    open(&MetaFiles::in_memory(), &Arc::new(MemBackend::default())),
                );
                drop(pool);
                self.pool = open(&self.meta, &self.backend);
                let after = self.pool.engine().clone();
                assert_eq!(
                    engine_before, after,
                    "recovered engine differs from the one before restart"
                );
                Ok(vec![])
            }
        };
        if std::env::var("MODEL_STATS").is_ok() {
            let k = format!("{:?}", c)
                .split([' ', '{'])
                .next()
                .unwrap()
                .to_string();
            let ok = if res.is_ok() { "ok" } else { "err" };
            let mut st = STATS.lock().unwrap();
            *st.entry(format!("{k}-{ok}")).or_default() += 1;
            // How often mappings join volumes of different sizes while active.
            let e = self.pool.engine();
            let size = |v| e.volume(v).map_or(0, |v| v.size);
            let unequal = e
                .mappings()
                .filter(|m| m.state.is_active() && size(m.source) != size(m.target))
                .count();
            *st.entry("active-unequal-mappings".into()).or_default() += unequal;
            let e = self.pool.engine();
            for m in e.mappings() {
                *st.entry(format!("state-{}", m.state)).or_default() += 1;
                if m.restoring {
                    *st.entry("restoring".into()).or_default() += 1;
                }
                if !e.dependent_mappings(m.id).is_empty() {
                    *st.entry("has-dependants".into()).or_default() += 1;
                }
            }
            let cow = self
                .pool
                .stats
                .cow_grains
                .swap(0, std::sync::atomic::Ordering::Relaxed) as usize;
            *st.entry("cow-grains".into()).or_default() += cow;
            if e.mappings().filter(|m| m.state.is_active()).count() >= 3 {
                *st.entry("3+active".into()).or_default() += 1;
            }
        }
        match res {
            Ok(events) => self.apply_events(&events, &before),
            Err(VolumeError::Engine(_)) | Err(VolumeError::AlreadyPrepared(_)) => {
                // A rejected command changes nothing.
                assert_eq!(
                    *self.pool.engine(),
                    before,
                    "rejected {c:?} changed the engine"
                );
            }
            Err(e) => panic!("{c:?} failed unexpectedly: {e}"),
        }
        self.check(c);
    }

    fn check(&self, c: &Cmd) {
        // Every grain of every volume and mapping has a valid plan now, not only those the
        // commands happened to reach. Executed symbolically (each volume's physical grain is
        // a token; a copy moves tokens) and followed by its marks, a plan leaves every volume
        // reading the image it read before, except that a write's volume reads its own
        // physical grain (the written data) and nobody else does.
        {
            let e = self.pool.engine();
            let check_plan = |dom: VolId,
                              plan: &GrainPlan,
                              written: Option<(VolId, bool)>|
             -> Result<(), String> {
                let g = plan.grain;
                // Grain numbers count in the lock domain's grain size.
                let vols: Vec<VolId> = e
                    .volumes()
                    .map(|v| v.id)
                    .filter(|v| e.lock_domain(*v).is_some_and(|(d, _)| d == dom))
                    .collect();
                let before: BTreeMap<VolId, VolId> =
                    vols.iter().map(|v| (*v, e.resolve(*v, g))).collect();
                let mut phys: BTreeMap<VolId, VolId> = vols.iter().map(|v| (*v, *v)).collect();
                for c in &plan.copies {
                    let token = phys[&c.from];
                    phys.insert(c.to, token);
                }
                let mut after = e.clone();
                for op in &plan.marks {
                    after
                        .apply(op)
                        .map_err(|err| format!("mark {op:?} rejected: {err}"))?;
                }
                for &v in &vols {
                    let r = after.resolve(v, g);
                    match written {
                        Some((w, whole)) if w == v => {
                            if r != v {
                                return Err(format!("{v} does not read its own write (reads {r})"));
                            }
                            if !whole && phys[&v] != before[&v] {
                                return Err(format!("{v} lost the rest of its grain"));
                            }
                        }
                        Some((w, _)) if r == w => {
                            return Err(format!("{v} would read the write to {w}"));
                        }
                        _ if phys[&r] != before[&v] => {
                            return Err(format!(
                                "{v} read {}'s grain before and reads {}'s after",
                                before[&v], phys[&r]
                            ));
                        }
                        _ => {}
                    }
                }
                Ok(())
            };
            let valid = |what: &str,
                         dom: VolId,
                         written: Option<(VolId, bool)>,
                         plan: &dyn Fn() -> Option<GrainPlan>| {
                let plan = std::panic::catch_unwind(std::panic::AssertUnwindSafe(plan));
                let verdict = match &plan {
                    Err(_) => Err("the planner panicked".to_string()),
                    Ok(None) => Ok(()),
                    Ok(Some(p)) => check_plan(dom, p, written),
                };
                if let Err(why) = verdict {
                    panic!(
                        "after {c:?}: invalid plan for {what}: {why}\n{plan:?}\n{:#?}",
                        e.mappings().collect::<Vec<_>>()
                    );
                }
            };
            for &v in &self.vols {
                let Some((dom, gs)) = e.lock_domain(v) else {
                    continue;
                };
                let size = e.volume(v).map_or(0, |x| x.size);
                for g in 0..size.div_ceil(gs.bytes()) {
                    for whole in [false, true] {
                        valid(
                            &format!("a write to {v} grain {g}"),
                            dom,
                            Some((v, whole)),
                            &|| Some(e.plan_write(v, g, whole)),
                        );
                    }
                    for m in e.mappings_of(v).filter(|m| m.source == v) {
                        valid(&format!("copying {} grain {g}", m.id), dom, None, &|| {
                            e.plan_background(m.id, g)
                        });
                        valid(&format!("cleaning {} grain {g}", m.id), dom, None, &|| {
                            e.plan_clean(m.id, g)
                        });
                    }
                }
            }
        }
        for &v in &self.vols {
            let mut buf = vec![0u8; self.model.size(v)];
            match self.pool.read(v, 0, &mut buf) {
                Ok(()) => {
                    let want = &self.model.data[&v];
                    for (s, def) in self.model.defined[&v].iter().enumerate() {
                        let r = s * SECTOR..(s + 1) * SECTOR;
                        if *def && buf[r.clone()] != want[r.clone()] {
                            panic!(
                                "after {c:?}: {v} sector {s} reads {:?}.. but the model says {:?}..\n{:#?}",
                                &buf[r.start..r.start + 4],
                                &want[r.start..r.start + 4],
                                self.pool.engine().mappings().collect::<Vec<_>>()
                            );
                        }
                    }
                }
                Err(VolumeError::Engine(EngineError::VolumeOffline { .. })) => {
                    let e = self.pool.engine();
                    let transitional = e.mappings_of(v).any(|m| {
                        m.target == v
                            && matches!(
                                m.state,
                                MapState::Stopping | MapState::Preparing | MapState::Prepared
                            )
                    });
                    assert!(
                        transitional || self.model.defined[&v].iter().any(|d| !d),
                        "after {c:?}: {v} is offline but the model holds a complete image"
                    );
                }
                Err(e) => panic!("read of {v} failed: {e}"),
            }
        }
    }
}

static STATS: std::sync::Mutex<BTreeMap<String, usize>> = std::sync::Mutex::new(BTreeMap::new());

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 20_000,
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            "tests/engine_model.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn volumes_always_read_their_point_in_time(cmds in prop::collection::vec(cmd(), 1..60)) {
        let mut w = World::new();
        for c in &cmds {
            w.step(c);
        }
        if std::env::var("MODEL_STATS").is_ok() { eprintln!("{:?}", STATS.lock().unwrap()); }
    }
}

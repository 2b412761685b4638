//! Crash test: every store (volumes and metadata) loses its unsynced writes at a random crash
//! point — all of them, or a random subset (a disk may write back any dirty page). After recovery
//! every volume must hold, sector by sector, its last flushed value or a value written after it,
//! and every started snapshot must read exactly its source as of the start: so no split bit can
//! claim a grain whose copy was lost, and no source write can land before its copy.

use flashcopy_csi::engine::{GrainSize, MapId, MapState, MappingSpec, VolId};
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::store::{BlockStore, CrashPoint, FaultStore};
use flashcopy_csi::volume::{FaultBackend, Pool, PoolConfig, Step};
use std::collections::BTreeMap;
use std::sync::Arc;

const SECTOR: usize = 512;
const GRAIN: usize = 64 * 1024;
const VOL_SIZE: usize = 4 * GRAIN;
const SECTORS: usize = VOL_SIZE / SECTOR;
const N_VOLS: usize = 6;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What a sector may hold after a crash: its last durable value, or any value written since.
#[derive(Clone, Debug, Default)]
struct Sector {
    stable: u32,
    recent: Vec<u32>,
}

#[derive(Clone, Debug)]
struct VolModel(Vec<Sector>);

impl VolModel {
    fn new() -> Self {
        VolModel(vec![Sector::default(); SECTORS])
    }
    fn latest(&self) -> Vec<u32> {
        self.0
            .iter()
            .map(|s| *s.recent.last().unwrap_or(&s.stable))
            .collect()
    }
    fn flushed(&mut self) {
        for s in &mut self.0 {
            if let Some(v) = s.recent.pop() {
                s.stable = v;
            }
            s.recent.clear();
        }
    }
    fn exact(image: &[u32]) -> Self {
        VolModel(
            image
                .iter()
                .map(|v| Sector {
                    stable: *v,
                    recent: vec![],
                })
                .collect(),
        )
    }
}

fn meta_files(stores: &[Arc<FaultStore>; 3]) -> MetaFiles {
    let d = |s: &Arc<FaultStore>| s.clone() as Arc<dyn BlockStore>;
    MetaFiles {
        checkpoint_a: d(&stores[0]),
        checkpoint_b: d(&stores[1]),
        journal: d(&stores[2]),
    }
}

fn config() -> PoolConfig {
    // Small: checkpoints happen inside the workload too.
    PoolConfig {
        checkpoint_after: 2048,
        ..PoolConfig::default()
    }
}

struct Run {
    /// `None` when the crash hit while the pool was being created.
    pool: Option<Pool>,
    backend: Arc<FaultBackend>,
    meta: [Arc<FaultStore>; 3],
    vols: Vec<VolId>,
    model: BTreeMap<VolId, VolModel>,
    /// Started snapshots: what the target must read (unless written since).
    snaps: BTreeMap<MapId, (VolId, VolModel)>,
    /// A start that failed in the crash: checked only if recovery shows it happened.
    pending: Vec<(MapId, VolId, Vec<u32>)>,
    /// A volume written by the op that crashed: any of its written sectors may hold the new value.
    crashed_write: Option<(VolId, usize, usize, u32)>,
    next_value: u32,
}

fn fill(value: u32, sectors: usize) -> Vec<u8> {
    value
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(sectors * SECTOR)
        .collect()
}

impl Run {
    /// Runs the workload of `seed` until it ends or the crash point fires.
    fn workload(seed: u64, point: Arc<CrashPoint>) -> Run {
        let backend = Arc::new(FaultBackend::new(point.clone()));
        let meta = [(); 3].map(|_| Arc::new(FaultStore::with_crash_point(0, point.clone())));
        let pool = Pool::open(meta_files(&meta), backend.clone(), config()).ok();
        let mut run = Run {
            pool,
            backend,
            meta,
            vols: vec![],
            model: BTreeMap::new(),
            snaps: BTreeMap::new(),
            pending: vec![],
            crashed_write: None,
            next_value: 1,
        };
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let Some(pool) = &run.pool else { return run };
        for i in 0..N_VOLS {
            match pool.create_volume(&format!("v{i}"), VOL_SIZE as u64) {
                Ok(v) => {
                    run.vols.push(v);
                    run.model.insert(v, VolModel::new());
                }
                Err(_) => return run,
            }
        }
        for _ in 0..40 {
            if run.step(&mut rng).is_err() {
                break;
            }
        }
        run
    }

    fn step(&mut self, rng: &mut Rng) -> Result<(), ()> {
        let p = self.pool.as_ref().unwrap();
        match rng.below(10) {
            0..=4 => {
                // A write of 1..=160 sectors; sources more often than targets.
                let v = self.vols[if rng.below(3) > 0 {
                    rng.below(2)
                } else {
                    rng.below(N_VOLS)
                }];
                if p.engine().check_io(v, 0, 0).is_err() {
                    return Ok(());
                }
                let s = rng.below(SECTORS);
                let n = (1 + rng.below(160)).min(SECTORS - s);
                let value = self.next_value;
                self.next_value += 1;
                match p.write(v, (s * SECTOR) as u64, &fill(value, n)) {
                    Ok(()) => {
                        for sec in &mut self.model.get_mut(&v).unwrap().0[s..s + n] {
                            sec.recent.push(value);
                        }
                        Ok(())
                    }
                    Err(_) => {
                        self.crashed_write = Some((v, s, n, value));
                        Err(())
                    }
                }
            }
            5 => {
                let v = self.vols[rng.below(N_VOLS)];
                if p.engine().check_io(v, 0, 0).is_err() {
                    return Ok(());
                }
                p.flush(v).map_err(|_| ())?;
                self.model.get_mut(&v).unwrap().flushed();
                Ok(())
            }
            6 | 7 => {
                // A snapshot of a source into a free target.
                let src = self.vols[rng.below(2)];
                let Some(tgt) = self.free_target(rng) else {
                    return Ok(());
                };
                let mut spec = MappingSpec::snapshot(src, tgt);
                spec.grain = Some(GrainSize::K64);
                spec.copy_rate = if rng.below(2) == 0 { 0 } else { 150 };
                let m = p.create_mapping(spec).map_err(|_| ())?;
                let image = self.model[&src].latest();
                match p.start_mapping(m, true, false) {
                    Ok(_) => {
                        self.model.get_mut(&src).unwrap().flushed();
                        self.model.insert(tgt, VolModel::exact(&image));
                        self.snaps.insert(m, (tgt, VolModel::exact(&image)));
                        Ok(())
                    }
                    Err(_) => {
                        self.pending.push((m, tgt, image));
                        Err(())
                    }
                }
            }
            8 => {
                // Background copy of a random started mapping.
                let maps: Vec<MapId> = self.snaps.keys().copied().collect();
                if maps.is_empty() {
                    return Ok(());
                }
                let m = maps[rng.below(maps.len())];
                for i in 0..3 {
                    match p.background_step(m, i) {
                        Ok(Step::Copied { .. }) => {}
                        Ok(_) => break,
                        Err(_) => return Err(()),
                    }
                }
                Ok(())
            }
            _ => {
                // A group snapshot of both sources.
                let (Some(t1), Some(t2)) = (self.free_target(rng), self.free_target(rng)) else {
                    return Ok(());
                };
                if t1 == t2 {
                    return Ok(());
                }
                let g = p.create_group(None, false).map_err(|_| ())?;
                let mut ms = vec![];
                for (src, tgt) in [(self.vols[0], t1), (self.vols[1], t2)] {
                    let mut spec = MappingSpec::snapshot(src, tgt);
                    spec.grain = Some(GrainSize::K64);
                    spec.group = Some(g);
                    ms.push((p.create_mapping(spec).map_err(|_| ())?, src, tgt));
                }
                let images: Vec<Vec<u32>> =
                    ms.iter().map(|(_, s, _)| self.model[s].latest()).collect();
                match p.start_group(g, true, false) {
                    Ok(_) => {
                        for ((m, src, tgt), image) in ms.into_iter().zip(images) {
                            self.model.get_mut(&src).unwrap().flushed();
                            self.model.insert(tgt, VolModel::exact(&image));
                            self.snaps.insert(m, (tgt, VolModel::exact(&image)));
                        }
                        Ok(())
                    }
                    Err(_) => {
                        for ((m, _, tgt), image) in ms.into_iter().zip(images) {
                            self.pending.push((m, tgt, image));
                        }
                        Err(())
                    }
                }
            }
        }
    }

    /// A volume other than the two sources that is not yet a target.
    fn free_target(&self, rng: &mut Rng) -> Option<VolId> {
        let t = self.vols[2 + rng.below(N_VOLS - 2)];
        let e = self.pool.as_ref().unwrap().engine();
        e.mappings_of(t).next().is_none().then_some(t)
    }

    /// Power loss: rebuild every store from what reached the disk, reopen, and check.
    fn crash_and_check(self, keep: &mut dyn FnMut() -> bool, what: &str) {
        let backend = Arc::new(self.backend.reboot(keep));
        let meta = self
            .meta
            .each_ref()
            .map(|s| Arc::new(FaultStore::from_vec(s.crash_image(keep))));
        let meta = meta_files(&meta);
        drop(self.pool);
        let pool = Pool::open(meta, backend, config())
            .unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
        let e = pool.engine().clone();
        let mut model = self.model;
        if let Some((v, s, n, value)) = self.crashed_write {
            for sec in &mut model.get_mut(&v).unwrap().0[s..s + n] {
                sec.recent.push(value);
            }
        }
        for (m, tgt, image) in self.pending {
            if e.mapping(m).is_some_and(|m| {
                m.state == MapState::Copying || m.state == MapState::IdleOrCopied && m.complete
            }) {
                model.insert(tgt, VolModel::exact(&image));
            }
        }
        let mut buf = vec![0u8; VOL_SIZE];
        for (v, vm) in &model {
            if e.volume(*v).is_none() || e.check_io(*v, 0, 0).is_err() {
                continue;
            }
            pool.read(*v, 0, &mut buf)
                .unwrap_or_else(|err| panic!("{what}: read {v}: {err}"));
            for (i, sec) in vm.0.iter().enumerate() {
                let bytes = &buf[i * SECTOR..(i + 1) * SECTOR];
                let got = u32::from_le_bytes(bytes[..4].try_into().unwrap());
                assert!(
                    bytes.chunks(4).all(|c| c == &bytes[..4]),
                    "{what}: {v} sector {i} is torn"
                );
                assert!(
                    got == sec.stable || sec.recent.contains(&got),
                    "{what}: {v} sector {i} holds {got}, expected {} or one of {:?}\nmappings: {:#?}",
                    sec.stable,
                    sec.recent,
                    e.mappings().collect::<Vec<_>>()
                );
            }
        }
        // The recovered pool keeps working: one more write and snapshot.
        let v0 = self.vols.first().copied();
        if let Some(v0) = v0.filter(|v| e.check_io(*v, 0, 0).is_ok()) {
            pool.write(v0, 0, &fill(7, 1))
                .unwrap_or_else(|err| panic!("{what}: write after recovery: {err}"));
        }
    }
}

#[test]
fn every_snapshot_survives_a_crash_at_any_point() {
    let points: u64 = std::env::var("CRASH_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let per_seed = 4;
    let mut checked = 0;
    for seed in 0..points.div_ceil(per_seed) {
        // Count the store operations of this workload, then crash at random ones.
        let counter = Arc::new(CrashPoint::never());
        let full = Run::workload(seed, counter.clone());
        let total = counter.ops();
        drop(full);
        let mut rng = Rng(seed ^ 0xDEAD_BEEF);
        for i in 0..per_seed {
            let at = rng.next() % total.max(1);
            let run = Run::workload(seed, Arc::new(CrashPoint::new(at)));
            let mut r2 = Rng(rng.next() | 1);
            let what = format!(
                "seed {seed} crash at op {at}/{total} ({})",
                if i % 2 == 0 {
                    "unsynced lost"
                } else {
                    "random unsynced kept"
                }
            );
            if i % 2 == 0 {
                run.crash_and_check(&mut || false, &what);
            } else {
                run.crash_and_check(&mut || r2.next().is_multiple_of(2), &what);
            }
            checked += 1;
        }
    }
    assert!(checked >= points, "checked {checked} crash points");
}

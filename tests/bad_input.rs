//! Bad input through the real `Pool` (FLASHCOPY.md §8: "reject ⇒ no state change"): every
//! rejected command or I/O returns its typed error, its message names the problem, and nothing
//! changed — not the engine (compared with `==` to a clone from before), not one byte of any
//! volume (read back through the pool and straight from the stores), not the set of stores.

use flashcopy_csi::engine::{
    Engine, EngineError, GrainSize, GroupId, Limits, MapId, MapState, MappingChange, MappingSpec,
    VolId,
};
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::volume::{Backend, MemBackend, Pool, PoolConfig, VolumeError};
use std::fmt::Debug;
use std::sync::Arc;

const K: u64 = 1024;
/// Two 64 KiB grains (one partial 256 KiB grain).
const SIZE: u64 = 128 * K;

struct World {
    pool: Pool,
    backend: Arc<MemBackend>,
}

/// Everything a rejected command must leave as it was.
#[derive(PartialEq, Eq)]
struct Snapshot {
    engine: Engine,
    /// Each volume read fully through the pool (offline volumes: the error text).
    logical: Vec<(VolId, Result<Vec<u8>, String>)>,
    /// Each volume's store, read directly.
    physical: Vec<(VolId, Vec<u8>)>,
    /// Volumes that have a store.
    stores: Vec<VolId>,
}

impl World {
    fn new() -> Self {
        Self::with(PoolConfig::default())
    }

    fn with(cfg: PoolConfig) -> Self {
        let backend = Arc::new(MemBackend::default());
        let pool = Pool::open(MetaFiles::in_memory(), backend.clone(), cfg).expect("open pool");
        World { pool, backend }
    }

    /// A volume filled with a pattern of its own.
    fn vol(&self, name: &str, size: u64) -> VolId {
        let v = self.pool.create_volume(name, size).expect("create volume");
        let data: Vec<u8> = (0..size)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(v.0 as u8 * 17 + 1))
            .collect();
        self.pool.write(v, 0, &data).expect("fill volume");
        v
    }

    fn map(&self, spec: MappingSpec) -> MapId {
        self.pool.create_mapping(spec).expect("create mapping")
    }

    /// A copy-rate-0 mapping with 64 KiB grains.
    fn snap(&self, source: VolId, target: VolId) -> MapId {
        self.map(spec(source, target))
    }

    fn snapshot(&self) -> Snapshot {
        let engine = self.pool.engine().clone();
        let vols: Vec<(VolId, u64)> = engine.volumes().map(|v| (v.id, v.size)).collect();
        let logical = vols
            .iter()
            .map(|&(v, size)| {
                let mut buf = vec![0u8; size as usize];
                let r = self.pool.read(v, 0, &mut buf).map(|()| buf);
                (v, r.map_err(|e| e.to_string()))
            })
            .collect();
        let physical = vols
            .iter()
            .map(|&(v, size)| {
                let store = self.backend.open(v).expect("store");
                let mut buf = vec![0u8; size as usize];
                store.read_at(&mut buf, 0).expect("store read");
                (v, buf)
            })
            .collect();
        let mut stores = self.backend.list().expect("list stores");
        stores.sort();
        Snapshot {
            engine,
            logical,
            physical,
            stores,
        }
    }

    /// Runs `f`, which must fail with an engine error, and checks that nothing changed.
    /// Returns the error; checks that the pool's message is the engine's.
    fn rejects<T: Debug>(
        &self,
        what: &str,
        f: impl FnOnce(&Pool) -> Result<T, VolumeError>,
    ) -> EngineError {
        let before = self.snapshot();
        let err = match f(&self.pool) {
            Ok(v) => panic!("{what}: accepted ({v:?})"),
            Err(VolumeError::Engine(e)) => e,
            Err(other) => panic!("{what}: not an engine error: {other:?}"),
        };
        let after = self.snapshot();
        assert_unchanged(what, &before, &after);
        let pool_text = VolumeError::Engine(err.clone()).to_string();
        assert_eq!(pool_text, err.to_string(), "{what}: message");
        err
    }
}

fn spec(source: VolId, target: VolId) -> MappingSpec {
    MappingSpec {
        grain: Some(GrainSize::K64),
        ..MappingSpec::snapshot(source, target)
    }
}

fn assert_unchanged(what: &str, before: &Snapshot, after: &Snapshot) {
    assert!(before.engine == after.engine, "{what}: engine changed");
    assert_eq!(before.stores, after.stores, "{what}: stores changed");
    for (b, a) in before.logical.iter().zip(&after.logical) {
        assert_eq!(b.0, a.0, "{what}: volume list changed");
        match (&b.1, &a.1) {
            (Ok(x), Ok(y)) => assert!(x == y, "{what}: {} reads differently", b.0),
            (x, y) => assert_eq!(
                x.as_ref().err(),
                y.as_ref().err(),
                "{what}: {} readability changed",
                b.0
            ),
        }
    }
    assert_eq!(before.logical.len(), after.logical.len(), "{what}: volumes");
    for (b, a) in before.physical.iter().zip(&after.physical) {
        assert!(b == a, "{what}: store of {} changed", b.0);
    }
}

/// The message names every fragment.
fn says(err: &EngineError, fragments: &[&str]) {
    let text = err.to_string();
    for f in fragments {
        assert!(text.contains(f), "message {text:?} does not mention {f:?}");
    }
}

#[test]
fn unequal_sizes_need_whole_grains_and_mapped_volumes_do_not_shrink() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE / 2 + 512);
    let c = w.vol("c", SIZE / 2 + 512);
    let d = w.vol("d", 2 * SIZE);
    // Sizes may differ only when the smaller one is a whole number of grains.
    let err = w.rejects("mkfcmap a→b", |p| p.create_mapping(spec(a, b)));
    assert_eq!(
        err,
        EngineError::SizeMismatch {
            src: a,
            source_size: SIZE,
            target: b,
            target_size: SIZE / 2 + 512,
            grain: 64 * K,
        }
    );
    says(
        &err,
        &["CMMVC5924E", "vol1", "vol2", "131072", "66048", "65536"],
    );
    let m = w.snap(b, c);
    let big = w.snap(a, d);
    assert_eq!(w.pool.engine().mapping(big).unwrap().grains(), 2);
    for v in [b, c] {
        let err = w.rejects("shrink a mapped volume", |p| p.resize_volume(v, 512));
        assert_eq!(err, EngineError::VolumeInUse(v, m));
        says(
            &err,
            &[&v.to_string(), "fcmap1", "delete the mapping first"],
        );
    }
    let err = w.rejects("grow a target ending inside a mapped grain", |p| {
        p.resize_volume(c, SIZE)
    });
    assert!(matches!(err, EngineError::GrowInsideGrain { vol, map, .. } if vol == c && map == m));
    says(&err, &["vol3", "fcmap1", "65536", "grow"]);
    // Sources grow freely, and so does a target past its mapped range.
    w.pool.resize_volume(b, 2 * SIZE).unwrap();
    w.pool.resize_volume(d, 3 * SIZE).unwrap();
}

#[test]
fn same_source_and_target() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let err = w.rejects("mkfcmap a→a", |p| p.create_mapping(spec(a, a)));
    assert_eq!(err, EngineError::SameVolume(a));
    says(&err, &["CMMVC6303E", "vol1"]);
}

#[test]
fn target_already_in_use() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let c = w.vol("c", SIZE);
    let m = w.snap(a, b);
    let err = w.rejects("mkfcmap c→b", |p| p.create_mapping(spec(c, b)));
    assert_eq!(err, EngineError::TargetInUse(b, m));
    says(&err, &["vol2", "fcmap1", "target"]);
}

#[test]
fn the_257th_mapping_of_a_source() {
    let w = World::new();
    const SMALL: u64 = 4 * K;
    let src = w.vol("src", SMALL);
    for i in 0..256 {
        let t = w.pool.create_volume(&format!("t{i}"), SMALL).unwrap();
        w.snap(src, t);
    }
    let last = w.vol("t256", SMALL);
    let err = w.rejects("mkfcmap #257", |p| p.create_mapping(spec(src, last)));
    assert_eq!(err, EngineError::TooManyMapsForSource(src, 256));
    says(&err, &["vol1", "256"]);
}

#[test]
fn invalid_rates() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let c = w.vol("c", SIZE);
    let err = w.rejects("mkfcmap -copyrate 151", |p| {
        p.create_mapping(MappingSpec {
            copy_rate: 151,
            ..spec(a, b)
        })
    });
    assert_eq!(err, EngineError::InvalidRate(151));
    says(&err, &["151", "0-150"]);
    let err = w.rejects("mkfcmap -cleanrate 151", |p| {
        p.create_mapping(MappingSpec {
            clean_rate: 151,
            ..spec(a, b)
        })
    });
    assert_eq!(err, EngineError::InvalidRate(151));
    let m = w.snap(a, c);
    let err = w.rejects("chfcmap -copyrate 151", |p| {
        p.modify_mapping(
            m,
            MappingChange {
                copy_rate: Some(151),
                ..Default::default()
            },
        )
    });
    assert_eq!(err, EngineError::InvalidRate(151));
    let err = w.rejects("chfcmap -cleanrate 255", |p| {
        p.modify_mapping(
            m,
            MappingChange {
                clean_rate: Some(255),
                ..Default::default()
            },
        )
    });
    assert_eq!(err, EngineError::InvalidRate(255));
}

#[test]
fn grain_size_conflicting_with_the_cascade() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let c = w.vol("c", SIZE);
    let m = w.snap(a, b);
    // Another target of the same source ...
    let err = w.rejects("mkfcmap a→c -grainsize 256", |p| {
        p.create_mapping(MappingSpec {
            grain: Some(GrainSize::K256),
            ..spec(a, c)
        })
    });
    let want = EngineError::GrainSizeConflict {
        requested: 256,
        existing: 64,
        mapping: m,
    };
    assert_eq!(err, want);
    says(&err, &["256 KiB", "64 KiB", "fcmap1"]);
    // ... and a cascaded mapping from the target.
    let err = w.rejects("mkfcmap b→c -grainsize 256", |p| {
        p.create_mapping(MappingSpec {
            grain: Some(GrainSize::K256),
            ..spec(b, c)
        })
    });
    assert_eq!(err, want);
}

#[test]
fn bitmap_budget_exceeded() {
    let w = World::with(PoolConfig {
        limits: Limits {
            bitmap_budget_bytes: 6 * K,
            ..Limits::default()
        },
        ..PoolConfig::default()
    });
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let c = w.vol("c", SIZE);
    let d = w.vol("d", SIZE);
    w.snap(a, b); // 4 KiB (the minimum bitmap)
    let err = w.rejects("mkfcmap c→d", |p| p.create_mapping(spec(c, d)));
    assert_eq!(
        err,
        EngineError::BitmapBudget {
            need: 4096,
            free: 2048,
            budget: 6144
        }
    );
    says(&err, &["bitmap", "4096", "2048", "6144"]);
    // Incremental mappings cost twice as much.
    let err = w.rejects("mkfcmap c→d -incremental", |p| {
        p.create_mapping(MappingSpec {
            incremental: true,
            ..spec(c, d)
        })
    });
    assert!(matches!(err, EngineError::BitmapBudget { need: 8192, .. }));
}

#[test]
fn start_of_an_unprepared_mapping() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let m = w.snap(a, b);
    let err = w.rejects("startfcmap", |p| p.start_mapping(m, false, false));
    assert!(
        matches!(err, EngineError::BadState { map, state: MapState::IdleOrCopied, .. } if map == m),
        "{err:?}"
    );
    says(&err, &["CMMVC5903E", "fcmap1", "idle_or_copied", "start"]);
    // From stopped as well.
    w.pool.start_mapping(m, true, false).unwrap();
    w.pool.stop_mapping(m, true, false).unwrap();
    let err = w.rejects("startfcmap (stopped)", |p| p.start_mapping(m, false, false));
    assert!(matches!(
        err,
        EngineError::BadState {
            state: MapState::Stopped,
            ..
        }
    ));
}

#[test]
fn delete_of_a_copying_mapping() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let m = w.snap(a, b);
    w.pool.start_mapping(m, true, false).unwrap();
    // A copy-on-write so the target holds data of its own.
    w.pool.write(a, 0, &[0xEE; 4096]).unwrap();
    for force in [false, true] {
        let err = w.rejects("rmfcmap", |p| p.delete_mapping(m, force));
        assert!(
            matches!(err, EngineError::BadState { map, state: MapState::Copying, .. } if map == m),
            "force={force}: {err:?}"
        );
        says(&err, &["CMMVC5903E", "fcmap1", "copying", "delete"]);
    }
}

#[test]
fn grouped_mapping_driven_on_its_own() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let g = w.pool.create_group(Some("cg"), false).unwrap();
    let m = w.map(MappingSpec {
        group: Some(g),
        ..spec(a, b)
    });
    let in_group = EngineError::InGroup(m, g);
    let err = w.rejects("prestartfcmap", |p| p.prepare_mapping(m, false));
    assert_eq!(err, in_group);
    says(&err, &["fcmap1", "fccstgrp1", "group command"]);
    let err = w.rejects("startfcmap -prep", |p| p.start_mapping(m, true, false));
    assert_eq!(err, in_group);
    w.pool.start_group(g, true, false).unwrap();
    let err = w.rejects("stopfcmap", |p| p.stop_mapping(m, false, false));
    assert_eq!(err, in_group);
    let err = w.rejects("stopfcmap -force", |p| p.stop_mapping(m, true, false));
    assert_eq!(err, in_group);
}

#[test]
fn moving_a_mapping_into_a_busy_group() {
    let w = World::new();
    let [a, b, c, d, e, f] = ["a", "b", "c", "d", "e", "f"].map(|n| w.vol(n, SIZE));
    let idle: GroupId = w.pool.create_group(Some("idle"), false).unwrap();
    let busy: GroupId = w.pool.create_group(Some("busy"), false).unwrap();
    let grouped = w.map(MappingSpec {
        group: Some(idle),
        ..spec(a, b)
    });
    w.map(MappingSpec {
        group: Some(busy),
        ..spec(c, d)
    });
    let lone = w.snap(e, f);
    w.pool.prepare_group(busy, false).unwrap();
    let into_busy = MappingChange {
        group: Some(Some(busy)),
        ..Default::default()
    };
    let want = EngineError::GroupBusy(busy, "prepared".into());
    let err = w.rejects("chfcmap -consistgrp busy (stand-alone)", |p| {
        p.modify_mapping(lone, into_busy.clone())
    });
    assert_eq!(err, want);
    says(&err, &["fccstgrp2", "prepared"]);
    let err = w.rejects("chfcmap -consistgrp busy (from another group)", |p| {
        p.modify_mapping(grouped, into_busy.clone())
    });
    assert_eq!(err, want);
    // Leaving a busy group is refused too.
    w.pool.prepare_group(idle, false).unwrap();
    let err = w.rejects("chfcmap -consistgrp 0 (busy group)", |p| {
        p.modify_mapping(
            grouped,
            MappingChange {
                group: Some(None),
                ..Default::default()
            },
        )
    });
    // The member itself is prepared, so the engine names its state (CMMVC5903E).
    assert!(
        matches!(&err, EngineError::BadState { map, state: MapState::Prepared, .. } if *map == grouped),
        "{err:?}"
    );
    // A new mapping cannot join a busy group either.
    let x = w.vol("x", SIZE);
    let y = w.vol("y", SIZE);
    let err = w.rejects("mkfcmap -consistgrp busy", |p| {
        p.create_mapping(MappingSpec {
            group: Some(busy),
            ..spec(x, y)
        })
    });
    assert_eq!(err, want);
}

#[test]
fn out_of_range_io() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let lone = w.vol("lone", SIZE);
    let m = w.snap(a, b);
    w.pool.start_mapping(m, true, false).unwrap();
    for v in [a, b, lone] {
        let err = w.rejects("write past the end", |p| p.write(v, SIZE - 512, &[1; 1024]));
        assert_eq!(
            err,
            EngineError::OutOfRange {
                vol: v,
                offset: SIZE - 512,
                len: 1024,
                size: SIZE
            }
        );
        says(&err, &[&v.to_string(), "131072", "outside"]);
        let err = w.rejects("read past the end", |p| p.read(v, SIZE, &mut [0; 512]));
        assert!(matches!(err, EngineError::OutOfRange { .. }), "{err:?}");
        let err = w.rejects("offset overflow", |p| p.write(v, u64::MAX - 100, &[1; 512]));
        assert!(matches!(err, EngineError::OutOfRange { .. }), "{err:?}");
    }
}

#[test]
fn io_to_the_target_of_a_prepared_mapping() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let m = w.snap(a, b);
    w.pool.prepare_mapping(m, false).unwrap();
    let err = w.rejects("write to a prepared target", |p| p.write(b, 0, &[7; 512]));
    assert!(
        matches!(&err, EngineError::VolumeOffline { vol, .. } if *vol == b),
        "{err:?}"
    );
    says(&err, &["vol2", "offline", "fcmap1"]);
    let err = w.rejects("read of a prepared target", |p| p.read(b, 0, &mut [0; 512]));
    assert!(matches!(err, EngineError::VolumeOffline { .. }), "{err:?}");
    // The source stays usable; a stopped mapping's target is offline as well.
    w.pool.write(a, 0, &[9; 512]).unwrap();
    w.pool.stop_mapping(m, false, false).unwrap();
    let err = w.rejects("write to a stopped target", |p| p.write(b, 0, &[7; 512]));
    assert!(matches!(err, EngineError::VolumeOffline { .. }), "{err:?}");
    says(&err, &["vol2", "stopped"]);
}

#[test]
fn invalid_volume_size() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    for size in [1000, 0, 513] {
        let err = w.rejects("create volume", |p| p.create_volume("x", size));
        assert_eq!(err, EngineError::InvalidSize(size));
        says(&err, &[&size.to_string(), "512"]);
    }
    let err = w.rejects("resize volume", |p| p.resize_volume(a, 1000));
    assert_eq!(err, EngineError::InvalidSize(1000));
}

#[test]
fn invalid_volume_origin() {
    let w = World::new();
    for origin in ["line\nbreak".to_string(), "x".repeat(1025), "é".into()] {
        let err = w.rejects("create volume", |p| {
            p.create_volume_from("x", SIZE, &origin)
        });
        assert_eq!(err, EngineError::InvalidOrigin(origin.clone()));
        says(&err, &["origin", "1024"]);
    }
    let ok = w
        .pool
        .create_volume_from("x", SIZE, "snap:node-1:7")
        .unwrap();
    assert_eq!(w.pool.engine().volume(ok).unwrap().origin, "snap:node-1:7");
}

#[test]
fn duplicate_names() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let c = w.vol("c", SIZE);
    let err = w.rejects("create volume a again", |p| p.create_volume("a", SIZE));
    assert_eq!(err, EngineError::NameInUse("a".into()));
    says(&err, &["\"a\"", "in use"]);
    w.map(MappingSpec {
        name: Some("snap".into()),
        ..spec(a, b)
    });
    let err = w.rejects("mkfcmap -name snap again", |p| {
        p.create_mapping(MappingSpec {
            name: Some("snap".into()),
            ..spec(a, c)
        })
    });
    assert_eq!(err, EngineError::NameInUse("snap".into()));
    says(&err, &["\"snap\""]);
    let other = w.snap(c, a);
    let err = w.rejects("chfcmap -name snap", |p| {
        p.modify_mapping(
            other,
            MappingChange {
                name: Some("snap".into()),
                ..Default::default()
            },
        )
    });
    assert_eq!(err, EngineError::NameInUse("snap".into()));
    w.pool.create_group(Some("cg"), false).unwrap();
    let err = w.rejects("mkfcconsistgrp -name cg again", |p| {
        p.create_group(Some("cg"), false)
    });
    assert_eq!(err, EngineError::NameInUse("cg".into()));
    says(&err, &["\"cg\""]);
}

/// The before/after comparison itself notices a changed byte, a changed engine and a new store.
#[test]
fn snapshot_notices_changes() {
    let w = World::new();
    let a = w.vol("a", SIZE);
    let b = w.vol("b", SIZE);
    let s0 = w.snapshot();
    w.pool.write(a, SIZE - 1, &[0]).unwrap();
    let s1 = w.snapshot();
    assert!(s0.engine == s1.engine && s0.logical != s1.logical && s0.physical != s1.physical);
    w.snap(a, b);
    let s2 = w.snapshot();
    assert!(s1.engine != s2.engine && s1.physical == s2.physical);
    w.pool.create_volume("c", SIZE).unwrap();
    let s3 = w.snapshot();
    assert!(s2.stores != s3.stores);
}

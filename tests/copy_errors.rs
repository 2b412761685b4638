//! Store failures during grain copies (FLASHCOPY.md §2.3 `IoError`): copy-on-write, background
//! copy and cleaning that cannot write (or read) stop their mapping and its group, the failure
//! reaches the pool's listener with the state changes, and host writes to the source go on.

use flashcopy_csi::engine::{Event, GrainSize, MapId, MapState, MappingSpec, VolId};
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::store::CrashPoint;
use flashcopy_csi::volume::{
    CopyFailure, CopyKind, FaultBackend, Pool, PoolConfig, Step, VolumeError,
};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::Ordering;

const MIB: u64 = 1 << 20;
const GRAIN: u64 = 64 << 10;

struct Fixture {
    pool: Pool,
    backend: Arc<FaultBackend>,
    failures: Arc<Mutex<Vec<CopyFailure>>>,
}

fn fixture() -> Fixture {
    let backend = Arc::new(FaultBackend::new(Arc::new(CrashPoint::never())));
    let pool = Pool::open(
        MetaFiles::in_memory(),
        backend.clone(),
        PoolConfig::default(),
    )
    .unwrap();
    let failures = Arc::new(Mutex::new(Vec::new()));
    let sink = failures.clone();
    assert!(pool.on_copy_failure(move |f| sink.lock().push(f.clone())));
    assert!(!pool.on_copy_failure(|_| {}), "only one listener");
    Fixture {
        pool,
        backend,
        failures,
    }
}

impl Fixture {
    fn vol(&self, name: &str, fill: u8) -> VolId {
        let v = self.pool.create_volume(name, MIB).unwrap();
        if fill != 0 {
            self.pool.write(v, 0, &vec![fill; MIB as usize]).unwrap();
        }
        v
    }

    fn map(&self, src: VolId, tgt: VolId, copy_rate: u8) -> MapId {
        let mut spec = MappingSpec::snapshot(src, tgt);
        spec.grain = Some(GrainSize::K64);
        spec.copy_rate = copy_rate;
        self.pool.create_mapping(spec).unwrap()
    }

    fn state(&self, m: MapId) -> MapState {
        self.pool.engine().mapping(m).unwrap().state
    }

    fn fail_writes(&self, v: VolId) {
        self.backend.store(v).unwrap().fail_io(false, true);
    }

    fn read(&self, v: VolId, offset: u64, len: usize) -> Result<Vec<u8>, VolumeError> {
        let mut buf = vec![0; len];
        self.pool.read(v, offset, &mut buf).map(|()| buf)
    }
}

fn stopped(map: MapId, from: MapState) -> Event {
    Event::MapState {
        map,
        from,
        to: MapState::Stopped,
    }
}

#[test]
fn a_failed_copy_on_write_stops_the_mapping_and_the_source_write_succeeds() {
    let f = fixture();
    let (src, tgt) = (f.vol("src", 1), f.vol("tgt", 0));
    let m = f.map(src, tgt, 0);
    f.pool.start_mapping(m, true, false).unwrap();
    // A first write after the snapshot copies its grain; that works.
    f.pool.write(src, 0, &[2; 512]).unwrap();
    assert_eq!(f.pool.stats.cow_grains.load(Ordering::Relaxed), 1);
    f.fail_writes(tgt);

    // The next first write to a grain cannot preserve it: the mapping stops, the write lands.
    f.pool.write(src, 3 * GRAIN + 100, &[3; 1000]).unwrap();
    assert_eq!(f.state(m), MapState::Stopped);
    assert_eq!(f.read(src, 3 * GRAIN + 100, 1000).unwrap(), vec![3; 1000]);
    assert_eq!(f.read(src, 0, 512).unwrap(), vec![2; 512]);
    assert!(
        f.read(tgt, 0, 512).is_err(),
        "the target of a stopped mapping is offline"
    );
    assert_eq!(f.pool.stats.copy_errors(CopyKind::CopyOnWrite), 1);
    assert_eq!(f.pool.stats.cow_grains.load(Ordering::Relaxed), 1);

    let failures = f.failures.lock().clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].map, m);
    assert_eq!(failures[0].kind, CopyKind::CopyOnWrite);
    assert!(
        failures[0].message.contains("copy-on-write failed"),
        "{}",
        failures[0].message
    );
    assert_eq!(failures[0].events, vec![stopped(m, MapState::Copying)]);

    // Later writes need no copy: no more failures.
    f.pool.write(src, 5 * GRAIN, &[4; 512]).unwrap();
    assert_eq!(f.failures.lock().len(), 1);

    // Once the disk is back the mapping can be restarted (a new point in time).
    f.backend.store(tgt).unwrap().fail_io(false, false);
    f.pool.start_mapping(m, true, false).unwrap();
    assert_eq!(f.read(tgt, 5 * GRAIN, 512).unwrap(), vec![4; 512]);
}

#[test]
fn a_failed_source_read_during_copy_on_write_stops_the_mapping_too() {
    let f = fixture();
    let (src, tgt) = (f.vol("src", 1), f.vol("tgt", 0));
    let m = f.map(src, tgt, 0);
    f.pool.start_mapping(m, true, false).unwrap();
    f.backend.store(src).unwrap().fail_io(true, false);
    f.pool.write(src, 0, &[2; 512]).unwrap();
    assert_eq!(f.state(m), MapState::Stopped);
    assert_eq!(f.failures.lock()[0].kind, CopyKind::CopyOnWrite);
}

#[test]
fn a_copy_failure_stops_every_member_of_the_group() {
    let f = fixture();
    let (s1, t1, s2, t2) = (
        f.vol("s1", 1),
        f.vol("t1", 0),
        f.vol("s2", 1),
        f.vol("t2", 0),
    );
    let g = f.pool.create_group(Some("g"), false).unwrap();
    let (m1, m2) = (f.map(s1, t1, 0), f.map(s2, t2, 0));
    for m in [m1, m2] {
        f.pool
            .modify_mapping(
                m,
                flashcopy_csi::engine::MappingChange {
                    group: Some(Some(g)),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    f.pool.start_group(g, true, false).unwrap();
    f.fail_writes(t2);
    f.pool.write(s2, GRAIN, &[9; 4096]).unwrap();
    assert_eq!(f.state(m1), MapState::Stopped);
    assert_eq!(f.state(m2), MapState::Stopped);
    let failures = f.failures.lock().clone();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].map, m2);
    let mut events = failures[0].events.clone();
    events.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        events,
        vec![
            stopped(m1, MapState::Copying),
            stopped(m2, MapState::Copying)
        ]
    );
    // The untouched member's source is fine too.
    f.pool.write(s1, GRAIN, &[9; 4096]).unwrap();
}

#[test]
fn a_failed_background_copy_stops_the_mapping() {
    let f = fixture();
    let (src, tgt) = (f.vol("src", 1), f.vol("tgt", 0));
    let m = f.map(src, tgt, 100);
    f.pool.start_mapping(m, true, false).unwrap();
    f.fail_writes(tgt);
    let err = f.pool.run_copy(m, None).unwrap_err();
    assert!(
        matches!(err, VolumeError::CopyIo { map, .. } if map == m),
        "{err}"
    );
    assert!(err.to_string().contains("is stopped"), "{err}");
    assert_eq!(f.state(m), MapState::Stopped);
    assert_eq!(f.pool.stats.copy_errors(CopyKind::Background), 1);
    assert_eq!(
        f.pool.stats.background_grains.load(Ordering::Relaxed),
        0,
        "failed grains are not counted as copied"
    );
    assert_eq!(f.pool.background_step(m, 0).unwrap(), Step::Idle);
    let failures = f.failures.lock().clone();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].kind, CopyKind::Background);
    assert_eq!(failures[0].events, vec![stopped(m, MapState::Copying)]);
    // Nothing is left to copy for a stopped mapping.
    assert_eq!(f.pool.run_copy(m, None).unwrap(), 0);
}

#[test]
fn a_failed_cleaning_stops_the_mapping_and_its_dependants() {
    let f = fixture();
    let (src, old, new) = (f.vol("src", 1), f.vol("old", 0), f.vol("new", 0));
    let m_old = f.map(src, old, 0);
    f.pool.start_mapping(m_old, true, false).unwrap();
    let m_new = f.map(src, new, 0);
    f.pool.start_mapping(m_new, true, false).unwrap();
    // The write copies grain 0 to the newest target only; the older one reads it through.
    f.pool.write(src, 0, &[2; 512]).unwrap();
    f.pool.stop_mapping(m_new, false, false).unwrap();
    assert_eq!(f.state(m_new), MapState::Stopping);
    // Cleaning must hand grain 0 to the older target, whose disk now fails.
    f.fail_writes(old);
    let err = f.pool.run_copy(m_new, None).unwrap_err();
    assert!(matches!(err, VolumeError::CopyIo { .. }), "{err}");
    assert_eq!(f.state(m_new), MapState::Stopped);
    assert_eq!(
        f.state(m_old),
        MapState::Stopped,
        "the older mapping lost the data it depended on"
    );
    assert_eq!(f.pool.stats.copy_errors(CopyKind::Cleaning), 1);
    let failures = f.failures.lock().clone();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].map, m_new);
    assert_eq!(failures[0].kind, CopyKind::Cleaning);
    assert!(
        failures[0]
            .events
            .contains(&stopped(m_new, MapState::Stopping)),
        "{:?}",
        failures[0].events
    );
    assert!(
        failures[0]
            .events
            .contains(&stopped(m_old, MapState::Copying)),
        "{:?}",
        failures[0].events
    );
}

#[test]
fn a_target_that_fails_to_flush_stops_its_mapping_and_the_source_write_succeeds() {
    let f = fixture();
    let (src, tgt, other) = (f.vol("src", 1), f.vol("tgt", 0), f.vol("other", 0));
    let m = f.map(src, tgt, 0);
    f.pool.start_mapping(m, true, false).unwrap();
    f.backend.store(tgt).unwrap().fail_flush(true);

    // The preserved grain cannot be made durable: as for a failed copy, the mapping stops and
    // the source write lands.
    f.pool.write(src, 0, &[2; 512]).unwrap();
    assert_eq!(f.state(m), MapState::Stopped);
    assert_eq!(f.read(src, 0, 512).unwrap(), vec![2; 512]);
    let failures = f.failures.lock().clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].map, m);
    assert_eq!(failures[0].kind, CopyKind::CopyOnWrite);
    // One disk does not poison the pool.
    f.pool.write(other, 0, &[5; 512]).unwrap();
    f.pool.create_volume("later", MIB).unwrap();
}

#[test]
fn a_volume_that_fails_to_flush_refuses_the_write_and_a_retry_is_durable() {
    let f = fixture();
    let (src, tgt, other) = (f.vol("src", 1), f.vol("tgt", 0), f.vol("other", 0));
    let m = f.map(src, tgt, 0);
    f.pool.start_mapping(m, true, false).unwrap();
    f.backend.store(tgt).unwrap().fail_flush(true);

    // A partial write to the snapshot fills its grain from the source first; that cannot be
    // made durable, so the write is refused and nothing changed.
    assert!(matches!(
        f.pool.write(tgt, 100, &[7; 512]),
        Err(VolumeError::Store(_))
    ));
    assert_eq!(f.read(tgt, 0, 1024).unwrap(), vec![1; 1024]);
    assert!(!f.pool.engine().mapping(m).unwrap().is_split(0));
    assert_eq!(f.state(m), MapState::Copying);
    f.pool.write(other, 0, &[5; 512]).unwrap();

    // Once the disk is back the write fills the grain again: the failed flush lost that copy
    // (as Linux may after a writeback error), so only a new one can be durable.
    f.backend.store(tgt).unwrap().fail_flush(false);
    f.pool.write(tgt, 100, &[7; 512]).unwrap();
    let mut want = vec![1u8; GRAIN as usize];
    want[100..612].fill(7);
    assert_eq!(f.read(tgt, 0, GRAIN as usize).unwrap(), want);
    let durable = f.backend.store(tgt).unwrap().durable_image();
    assert_eq!(
        &durable[..GRAIN as usize],
        &want[..],
        "the grain survives a crash"
    );
}

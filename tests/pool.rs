//! The pool on real files and with slow syncs: restart, corrupt or missing metadata, and group
//! commit.

use flashcopy_csi::engine::{GrainSize, MapState, MappingSpec, VolId};
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::store::{BlockStore, MemStore, StoreError};
use flashcopy_csi::volume::{Backend, Pool, PoolConfig};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn snapshot(pool: &Pool, src: VolId, tgt: VolId) -> flashcopy_csi::engine::MapId {
    let mut spec = MappingSpec::snapshot(src, tgt);
    spec.grain = Some(GrainSize::K64);
    let m = pool.create_mapping(spec).unwrap();
    pool.start_mapping(m, true, false).unwrap();
    m
}

fn read_all(pool: &Pool, v: VolId) -> Vec<u8> {
    let size = pool.engine().volume(v).unwrap().size;
    let mut buf = vec![0; size as usize];
    pool.read(v, 0, &mut buf).unwrap();
    buf
}

/// A data directory with a source, a snapshot of it and writes after the snapshot.
fn populated(dir: &Path) -> (VolId, VolId) {
    let pool = Pool::open_dir(dir, PoolConfig::default()).unwrap();
    let src = pool.create_volume("src", 2 * MIB).unwrap();
    let snap = pool.create_volume("snap", 2 * MIB).unwrap();
    pool.write(src, 0, &vec![1; 2 * MIB as usize]).unwrap();
    snapshot(&pool, src, snap);
    pool.write(src, 4096, &vec![2; 300_000]).unwrap();
    pool.flush(src).unwrap();
    (src, snap)
}

#[test]
fn a_restarted_pool_has_every_volume_mapping_and_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (src, snap) = populated(dir.path());
    for _ in 0..2 {
        let pool = Pool::open_dir(dir.path(), PoolConfig::default()).unwrap();
        let m = pool.engine().mappings().next().cloned().unwrap();
        assert_eq!(m.state, MapState::Copying);
        assert_eq!(read_all(&pool, snap), vec![1; 2 * MIB as usize]);
        let s = read_all(&pool, src);
        assert!(s[4096..304_096].iter().all(|b| *b == 2) && s[..4096].iter().all(|b| *b == 1));
    }
    // Volumes of different sizes: the source grows under its snapshot, and a larger snapshot
    // of it maps the 3 MiB the source has then; the mappings keep their lengths across a
    // restart and every volume reads its own image and size.
    let big = {
        let pool = Pool::open_dir(dir.path(), PoolConfig::default()).unwrap();
        pool.resize_volume(src, 3 * MIB).unwrap();
        pool.write(src, 2 * MIB, &vec![3; MIB as usize]).unwrap();
        let big = pool.create_volume("big", 4 * MIB).unwrap();
        snapshot(&pool, src, big);
        for v in [src, snap, big] {
            pool.flush(v).unwrap();
        }
        big
    };
    let mut src_image = vec![1; 3 * MIB as usize];
    src_image[4096..304_096].fill(2);
    src_image[2 * MIB as usize..].fill(3);
    let mut big_image = src_image.clone();
    big_image.resize(4 * MIB as usize, 0);
    for round in 0..2 {
        let pool = Pool::open_dir(dir.path(), PoolConfig::default()).unwrap();
        let grains: Vec<u64> = pool.engine().mappings().map(|m| m.grains()).collect();
        assert_eq!(grains, vec![32, 48], "64 KiB grains over 2 MiB and 3 MiB");
        assert_eq!(read_all(&pool, snap), vec![1; 2 * MIB as usize]);
        assert_eq!(read_all(&pool, big), big_image);
        assert_eq!(read_all(&pool, src), src_image);
        if round == 0 {
            // Writes after the restart move the old data to the right snapshot.
            pool.write(src, 0, &vec![9; 3 * MIB as usize]).unwrap();
            src_image.fill(9);
            pool.flush(src).unwrap();
        }
    }
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

fn open_err(dir: &Path) -> String {
    match Pool::open_dir(dir, PoolConfig::default()) {
        Ok(_) => panic!("a damaged data directory opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_corrupt_checkpoint_is_reported_by_name_and_never_reset() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path());
    // Reopening replays the journal and writes a checkpoint.
    drop(Pool::open_dir(dir.path(), PoolConfig::default()).unwrap());
    let meta = dir.path().join("meta");
    let ckpt = ["checkpoint.a", "checkpoint.b"]
        .iter()
        .map(|n| meta.join(n))
        .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .expect("a checkpoint was written");
    let before: Vec<Vec<u8>> = ["checkpoint.a", "checkpoint.b", "journal"]
        .iter()
        .map(|n| std::fs::read(meta.join(n)).unwrap())
        .collect();
    flip_byte(&ckpt, 40);
    let err = open_err(dir.path());
    let name = ckpt.file_name().unwrap().to_string_lossy().to_string();
    assert!(err.contains(&name) && err.contains("corrupt"), "{err}");
    // The failed open wrote nothing: the damage is still there to be repaired, nothing reset.
    let after: Vec<Vec<u8>> = ["checkpoint.a", "checkpoint.b", "journal"]
        .iter()
        .map(|n| std::fs::read(meta.join(n)).unwrap())
        .collect();
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(changed, 1, "only the flipped byte differs");
    assert!(open_err(dir.path()).contains("corrupt"));
}

#[test]
fn a_truncated_journal_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path());
    let journal = dir.path().join("meta/journal");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len(10)
        .unwrap();
    let err = open_err(dir.path());
    assert!(err.contains("journal"), "{err}");
}

#[test]
fn a_missing_volume_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, snap) = populated(dir.path());
    std::fs::remove_file(dir.path().join(format!("volumes/{}.img", snap.0))).unwrap();
    let err = open_err(dir.path());
    assert!(
        err.contains(&snap.to_string()) && err.contains("no backing store"),
        "{err}"
    );
}

/// A memory store whose flush takes a while, like a disk's.
#[derive(Debug)]
struct Slow(MemStore);
impl BlockStore for Slow {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StoreError> {
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), StoreError> {
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.0.discard(offset, len)
    }
    fn resize(&self, new_len: u64) -> Result<(), StoreError> {
        self.0.resize(new_len)
    }
}

#[derive(Debug, Default)]
struct SlowBackend(Mutex<BTreeMap<VolId, Arc<Slow>>>);
impl Backend for SlowBackend {
    fn create(&self, vol: VolId, size: u64) -> Result<Arc<dyn BlockStore>, StoreError> {
        let s = Arc::new(Slow(MemStore::new(size)));
        self.0.lock().insert(vol, s.clone());
        Ok(s)
    }
    fn open(&self, vol: VolId) -> Result<Arc<dyn BlockStore>, StoreError> {
        Ok(self.0.lock()[&vol].clone())
    }
    fn remove(&self, vol: VolId) -> Result<(), StoreError> {
        self.0.lock().remove(&vol);
        Ok(())
    }
    fn list(&self) -> Result<Vec<VolId>, StoreError> {
        Ok(self.0.lock().keys().copied().collect())
    }
}

#[test]
fn concurrent_first_writes_share_syncs() {
    let slow = || Arc::new(Slow(MemStore::new(0))) as Arc<dyn BlockStore>;
    let meta = MetaFiles {
        checkpoint_a: slow(),
        checkpoint_b: slow(),
        journal: slow(),
    };
    let pool = Pool::open(
        meta,
        Arc::new(SlowBackend::default()),
        PoolConfig::default(),
    )
    .unwrap();
    let src = pool.create_volume("src", 8 * MIB).unwrap();
    let snap = pool.create_volume("snap", 8 * MIB).unwrap();
    pool.write(src, 0, &vec![9; 8 * MIB as usize]).unwrap();
    snapshot(&pool, src, snap);
    let writers = 8;
    let rounds = pool.commit_rounds();
    let barrier = Barrier::new(writers);
    std::thread::scope(|s| {
        for i in 0..writers as u64 {
            let (pool, barrier) = (&pool, &barrier);
            // Each writer touches its own untouched grain: every write needs a copy-on-write.
            s.spawn(move || {
                barrier.wait();
                pool.write(src, i * 64 * 1024, &[i as u8; 4096]).unwrap();
            });
        }
    });
    let used = pool.commit_rounds() - rounds;
    assert_eq!(
        pool.stats
            .cow_grains
            .load(std::sync::atomic::Ordering::Relaxed),
        writers as u64
    );
    assert!(
        used < writers as u64,
        "{writers} concurrent copy-on-writes took {used} commit rounds"
    );
    assert_eq!(
        read_all(&pool, snap),
        vec![9; 8 * MIB as usize],
        "the snapshot kept its point in time"
    );
}

/// A restore onto a source that grew since the snapshot: the snapshot's range (its size) is
/// restored, the grown region keeps its data, and a snapshot taken before the restore keeps
/// the source's image, grown region included.
#[test]
fn a_restore_onto_a_grown_source_restores_the_snapshots_range() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open_dir(dir.path(), PoolConfig::default()).unwrap();
    let src = pool.create_volume("src", 2 * MIB).unwrap();
    let snap = pool.create_volume("snap", 2 * MIB).unwrap();
    let before = pool.create_volume("before", 3 * MIB).unwrap();
    pool.write(src, 0, &vec![1; 2 * MIB as usize]).unwrap();
    snapshot(&pool, src, snap);
    pool.resize_volume(src, 3 * MIB).unwrap();
    pool.write(src, 0, &vec![2; 3 * MIB as usize]).unwrap();
    snapshot(&pool, src, before);
    let mut spec = MappingSpec::snapshot(snap, src);
    spec.grain = Some(GrainSize::K64);
    let restore = pool.create_mapping(spec).unwrap();
    pool.start_mapping(restore, true, true).unwrap();
    let mut want = vec![1; 2 * MIB as usize];
    want.resize(3 * MIB as usize, 2);
    assert_eq!(read_all(&pool, src), want);
    assert_eq!(read_all(&pool, snap), vec![1; 2 * MIB as usize]);
    assert_eq!(read_all(&pool, before), vec![2; 3 * MIB as usize]);
    // Writes after the restore reach only the source.
    pool.write(src, MIB, &vec![3; 2 * MIB as usize]).unwrap();
    want[MIB as usize..].fill(3);
    assert_eq!(read_all(&pool, src), want);
    assert_eq!(read_all(&pool, snap), vec![1; 2 * MIB as usize]);
    assert_eq!(read_all(&pool, before), vec![2; 3 * MIB as usize]);
}

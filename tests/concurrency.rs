//! Snapshots taken while several threads write, with background copy running beside them.
//! For every snapshot and every 4 KiB chunk: every write that completed before the start began
//! is in the image, no write that began after the start returned is, and no chunk is torn.

use flashcopy_csi::engine::{GrainSize, MapId, MappingSpec, VolId};
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::volume::{MemBackend, Pool, PoolConfig};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CHUNK: usize = 4096;
const CHUNKS: usize = 512; // 2 MiB: 32 grains of 64 KiB
const WRITERS: usize = 4;

/// One write: its value and the global sequence numbers at its start and end.
#[derive(Clone, Copy)]
struct W {
    value: u32,
    begin: u64,
    end: u64,
}

struct Snap {
    map: MapId,
    target: VolId,
    begin: u64,
    end: u64,
}

#[test]
fn snapshots_under_concurrent_writes_hold_exactly_their_point_in_time() {
    let pool = Pool::open(
        MetaFiles::in_memory(),
        Arc::new(MemBackend::default()),
        PoolConfig::default(),
    )
    .unwrap();
    let size = (CHUNK * CHUNKS) as u64;
    let src = pool.create_volume("src", size).unwrap();
    let seq = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let log: Vec<Mutex<Vec<W>>> = (0..CHUNKS).map(|_| Mutex::new(Vec::new())).collect();
    let snaps: Mutex<Vec<Snap>> = Mutex::new(Vec::new());
    let deadline = Instant::now() + Duration::from_millis(1500);

    std::thread::scope(|s| {
        for t in 0..WRITERS {
            let (pool, seq, stop, log) = (&pool, &seq, &stop, &log);
            s.spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t as u64;
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Thread t owns the chunks c with c % WRITERS == t.
                    let c = (x as usize % (CHUNKS / WRITERS)) * WRITERS + t;
                    n += 1;
                    let value = (t as u32) << 24 | n;
                    let data: Vec<u8> = value
                        .to_le_bytes()
                        .iter()
                        .copied()
                        .cycle()
                        .take(CHUNK)
                        .collect();
                    let begin = seq.fetch_add(1, Ordering::SeqCst);
                    pool.write(src, (c * CHUNK) as u64, &data).unwrap();
                    let end = seq.fetch_add(1, Ordering::SeqCst);
                    log[c].lock().push(W { value, begin, end });
                }
            });
        }
        // Background copy of the snapshots taken so far, racing the writers.
        {
            let (pool, stop, snaps) = (&pool, &stop, &snaps);
            s.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let m = snaps.lock().get(i % 7).map(|s| s.map);
                    if let Some(m) = m {
                        let _ = pool.background_step(m, (i * 5 % 32) as u64).unwrap();
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_micros(300));
                }
            });
        }
        let mut k = 0;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let target = pool.create_volume(&format!("snap{k}"), size).unwrap();
            let mut spec = MappingSpec::snapshot(src, target);
            spec.grain = Some(GrainSize::K64);
            let map = pool.create_mapping(spec).unwrap();
            let begin = seq.fetch_add(1, Ordering::SeqCst);
            pool.start_mapping(map, true, false).unwrap();
            let end = seq.fetch_add(1, Ordering::SeqCst);
            snaps.lock().push(Snap {
                map,
                target,
                begin,
                end,
            });
            k += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });

    let snaps = snaps.into_inner();
    assert!(
        snaps.len() >= 10,
        "only {} snapshots were taken",
        snaps.len()
    );
    let writes: usize = log.iter().map(|l| l.lock().len()).sum();
    assert!(writes > 1000, "only {writes} writes ran");
    let mut buf = vec![0u8; size as usize];
    for snap in &snaps {
        pool.read(snap.target, 0, &mut buf).unwrap();
        for (c, writes) in log.iter().enumerate() {
            let writes = writes.lock();
            let chunk = &buf[c * CHUNK..(c + 1) * CHUNK];
            let got = u32::from_le_bytes(chunk[..4].try_into().unwrap());
            assert!(
                chunk.chunks(4).all(|w| w == &chunk[..4]),
                "{}: chunk {c} is torn",
                snap.target
            );
            // The newest write that completed before the start began, and everything after it
            // that had begun before the start returned.
            let floor = writes.iter().rposition(|w| w.end < snap.begin);
            let mut allowed: Vec<u32> = writes[floor.unwrap_or(0)..]
                .iter()
                .filter(|w| w.begin < snap.end)
                .map(|w| w.value)
                .collect();
            if floor.is_none() {
                allowed.push(0);
            }
            assert!(
                allowed.contains(&got),
                "{} chunk {c} holds {got:#x}; allowed {allowed:#x?} (snapshot seq {}..{})",
                snap.target,
                snap.begin,
                snap.end
            );
        }
    }
    // The source holds every chunk's last write.
    pool.read(src, 0, &mut buf).unwrap();
    for (c, writes) in log.iter().enumerate() {
        let last = writes.lock().last().map_or(0, |w| w.value);
        let got = u32::from_le_bytes(buf[c * CHUNK..c * CHUNK + 4].try_into().unwrap());
        assert_eq!(got, last, "source chunk {c}");
    }
}

/// A database's dependent writes: step k writes k to the log volume (k odd) or the data volume
/// (k even), each after the previous completed. A group snapshot taken meanwhile must hold two
/// adjacent steps, never a later step without an earlier one.
#[test]
fn group_snapshots_never_tear_dependent_writes() {
    let pool = Pool::open(
        MetaFiles::in_memory(),
        Arc::new(MemBackend::default()),
        PoolConfig::default(),
    )
    .unwrap();
    let size = 1 << 20;
    let (log, data) = (
        pool.create_volume("log", size).unwrap(),
        pool.create_volume("data", size).unwrap(),
    );
    let stop = AtomicBool::new(false);
    let mut images = Vec::new();
    std::thread::scope(|s| {
        let (pool, stop) = (&pool, &stop);
        s.spawn(move || {
            let mut k = 0u32;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let vol = if k % 2 == 1 { log } else { data };
                // The same grain every time, so every step after a snapshot copies on write.
                pool.write(vol, 0, &k.to_le_bytes().repeat(1024)).unwrap();
            }
        });
        for i in 0..40 {
            let g = pool.create_group(None, false).unwrap();
            let mut targets = Vec::new();
            for (src, name) in [(log, "l"), (data, "d")] {
                let t = pool.create_volume(&format!("{name}{i}"), size).unwrap();
                let mut spec = MappingSpec::snapshot(src, t);
                spec.group = Some(g);
                pool.create_mapping(spec).unwrap();
                targets.push(t);
            }
            pool.start_group(g, true, false).unwrap();
            images.push((targets[0], targets[1]));
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let read = |v| {
        let mut b = [0u8; 4];
        pool.read(v, 0, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    let mut moving = 0;
    for (l, d) in images {
        let (l, d) = (read(l), read(d));
        assert!(
            l.abs_diff(d) <= 1,
            "group image holds log step {l} with data step {d}"
        );
        moving += usize::from(l + d > 0);
    }
    assert!(
        moving > 30,
        "the writer barely ran ({moving} images after its first write)"
    );
}

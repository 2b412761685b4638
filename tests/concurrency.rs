//! Snapshots taken while many threads write, with background copy and cleaning running beside
//! them on several mappings of the cascade. For every snapshot and every 4 KiB chunk: every write
//! that completed before the start began is in the image, no write that began after the start
//! returned is, and no chunk is torn.

use flashcopy_csi::engine::{GrainSize, MapId, MapState, MappingSpec, VolId};
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::volume::{HookPoint, MemBackend, Pool, PoolConfig, Step};
use parking_lot::Mutex;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CHUNK: usize = 4096;
const CHUNKS: usize = 512; // 2 MiB: 32 grains of 64 KiB
const HOT: usize = 128; // the first 8 grains

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

/// A small per-thread random generator (xorshift), seeded from the thread's id.
fn rand() -> u64 {
    thread_local!(static X: Cell<u64> = Cell::new({
        let id = format!("{:?}", std::thread::current().id());
        id.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3))
    }));
    X.with(|x| {
        let mut v = x.get();
        v ^= v << 13;
        v ^= v >> 7;
        v ^= v << 17;
        x.set(v);
        v
    })
}

/// Yields (or, now and then, sleeps briefly) at the pool's risky points: between a write's
/// unlocked check and its locks, between a plan and its copies, between a copy step's choice,
/// copies and commit. More interleavings per second than the scheduler alone gives.
fn stir(p: HookPoint) {
    let r = rand();
    let sleep_one_in = match p {
        HookPoint::WritePlanned { .. } | HookPoint::BatchCopied { .. } => 8,
        _ => 32,
    };
    if r.is_multiple_of(sleep_one_in) {
        std::thread::sleep(Duration::from_micros(r >> 58));
    } else if r.is_multiple_of(2) {
        std::thread::yield_now();
    }
}

/// Threads beyond the cores, so that any of them can be preempted at any point.
fn writers() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (2 * cores).next_power_of_two().clamp(8, 64)
}

#[test]
fn snapshots_under_concurrent_writes_hold_exactly_their_point_in_time() {
    let pool = Pool::open(
        MetaFiles::in_memory(),
        Arc::new(MemBackend::default()),
        PoolConfig::default(),
    )
    .unwrap();
    pool.set_test_hook(stir);
    let size = (CHUNK * CHUNKS) as u64;
    let src = pool.create_volume("src", size).unwrap();
    let writers = writers();
    let seq = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let log: Vec<Mutex<Vec<W>>> = (0..CHUNKS).map(|_| Mutex::new(Vec::new())).collect();
    let snaps: Mutex<Vec<Snap>> = Mutex::new(Vec::new());
    let stopped: Mutex<Vec<MapId>> = Mutex::new(Vec::new());
    let (bg_steps, clean_steps) = (AtomicU64::new(0), AtomicU64::new(0));
    // CONCURRENCY_MS runs it longer by hand; CI runs the default in several instances at once.
    let ms = std::env::var("CONCURRENCY_MS").map_or(1500, |v| v.parse().unwrap());
    let deadline = Instant::now() + Duration::from_millis(ms);

    std::thread::scope(|s| {
        for t in 0..writers {
            let (pool, seq, stop, log) = (&pool, &seq, &stop, &log);
            s.spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    // Thread t owns the chunks c with c % writers == t. Most writes go to the
                    // first HOT chunks, so first writes race the starts and the copies there,
                    // while the other grains stay unsplit for a while and need cleaning.
                    let r = rand() as usize;
                    let span = if r.is_multiple_of(4096) { CHUNKS } else { HOT };
                    let c = (r / 4096 % (span / writers)) * writers + t;
                    n += 1;
                    let value = (t as u32) << 24 | n;
                    let data = value.to_le_bytes().repeat(CHUNK / 4);
                    let begin = seq.fetch_add(1, Ordering::SeqCst);
                    pool.write(src, (c * CHUNK) as u64, &data).unwrap();
                    let end = seq.fetch_add(1, Ordering::SeqCst);
                    log[c].lock().push(W { value, begin, end });
                }
            });
        }
        // Background copy: one thread on the newest snapshots (a copy into the target that
        // first writes also copy into), one on any snapshot of the cascade. Snapshots 3, 7,
        // 11... are never copied: the cleaning of the snapshot above each fills them.
        for newest in [true, false] {
            let (pool, stop, snaps, bg_steps) = (&pool, &stop, &snaps, &bg_steps);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let m = {
                        let snaps = snaps.lock();
                        let n = snaps.len() as u64;
                        let k = match newest {
                            _ if n == 0 => None,
                            true => Some(n - 1 - rand() % n.min(3)),
                            false => Some(rand() % n),
                        };
                        k.filter(|k| k % 4 != 3).map(|k| snaps[k as usize].map)
                    };
                    if let Some(m) = m {
                        let cursor = rand() % 32;
                        if let Step::Copied { .. } = pool.background_step(m, cursor).unwrap() {
                            bg_steps.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_micros(rand() % 400));
                }
            });
        }
        // Cleaning of the snapshots the main thread stops, into the older ones below them.
        {
            let (pool, stop, stopped, clean_steps) = (&pool, &stop, &stopped, &clean_steps);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let m = {
                        let st = stopped.lock();
                        (!st.is_empty()).then(|| st[rand() as usize % st.len()])
                    };
                    if let Some(m) = m
                        && let Step::Copied { .. } = pool.clean_step(m, rand() % 32).unwrap()
                    {
                        clean_steps.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_micros(rand() % 400));
                }
            });
        }
        let mut k = 0;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            let target = pool.create_volume(&format!("snap{k}"), size).unwrap();
            let mut spec = MappingSpec::snapshot(src, target);
            spec.grain = Some(GrainSize::K64);
            let map = pool.create_mapping(spec).unwrap();
            let begin = seq.fetch_add(1, Ordering::SeqCst);
            pool.start_mapping(map, true, false).unwrap();
            let end = seq.fetch_add(1, Ordering::SeqCst);
            // Snapshots 0, 4, 8... are stopped again two starts later: their cleaning into the
            // older snapshot below races the writes, the copies and the starts.
            let mut snaps = snaps.lock();
            if k >= 2 && k % 4 == 2 {
                let m = snaps[k - 2].map;
                pool.stop_mapping(m, false, false).unwrap();
                stopped.lock().push(m);
            }
            snaps.push(Snap {
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
    let writes: usize = log.iter().map(|l| l.lock().len()).sum();
    let (bg_steps, clean_steps) = (bg_steps.into_inner(), clean_steps.into_inner());
    eprintln!(
        "{} snapshots, {writes} writes by {writers} threads, {bg_steps} background and \
         {clean_steps} cleaning steps",
        snaps.len()
    );
    assert!(
        snaps.len() >= 10,
        "only {} snapshots were taken",
        snaps.len()
    );
    assert!(writes > 1000, "only {writes} writes ran");
    assert!(bg_steps > 10, "only {bg_steps} background steps copied");
    assert!(clean_steps > 0, "no cleaning step copied");
    let mut buf = vec![0u8; size as usize];
    let mut checked = 0;
    for snap in &snaps {
        // A stopped snapshot's target is offline, unless it was complete when it stopped.
        let state = pool.engine().mapping(snap.map).map(|m| m.state);
        if matches!(state, Some(MapState::Stopped | MapState::Stopping)) {
            continue;
        }
        pool.read(snap.target, 0, &mut buf).unwrap();
        checked += 1;
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
                "{} chunk {c} holds {got:#x}; allowed {allowed:#x?} (snapshot seq {}..{}, {state:?})",
                snap.target,
                snap.begin,
                snap.end
            );
        }
    }
    assert!(checked >= 10, "only {checked} snapshots could be read");
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

/// A one-grain volume whose chunk c holds c, and a snapshot of it with 64 KiB grains, started.
fn one_grain_snapshot(pool: &Pool, name: &str) -> (VolId, MapId) {
    let size = GRAIN as u64;
    let existing = pool.engine().volume_by_name("src").map(|v| v.id);
    let src = match existing {
        Some(v) => v,
        None => {
            let src = pool.create_volume("src", size).unwrap();
            for c in 0..GRAIN / CHUNK {
                pool.write(src, (c * CHUNK) as u64, &chunk(c as u32))
                    .unwrap();
            }
            src
        }
    };
    let target = pool.create_volume(name, size).unwrap();
    let mut spec = MappingSpec::snapshot(src, target);
    spec.grain = Some(GrainSize::K64);
    let map = pool.create_mapping(spec).unwrap();
    pool.start_mapping(map, true, false).unwrap();
    (target, map)
}

const GRAIN: usize = 64 << 10;

fn chunk(v: u32) -> Vec<u8> {
    v.to_le_bytes().repeat(CHUNK / 4)
}

/// The value of each chunk of `vol`, which must not be torn.
fn chunks(pool: &Pool, vol: VolId) -> Vec<u32> {
    let mut buf = vec![0u8; GRAIN];
    pool.read(vol, 0, &mut buf).unwrap();
    buf.chunks(CHUNK)
        .map(|c| {
            let v = u32::from_le_bytes(c[..4].try_into().unwrap());
            assert_eq!(c, &chunk(v)[..], "a torn chunk of {vol}");
            v
        })
        .collect()
}

/// Issue 10, part 1, forced step by step: a copy `step` (background copy or cleaning) copies
/// the grain into `image`; a first write to `written` plans the copy-on-write into `image`; the
/// step's mark becomes visible; a second write to the grain, which now needs no copy, changes
/// `written`; the first write's copy runs. `image` must still hold its point in time (chunk c
/// holds c), whether or not the pool lets the first write plan before the step's mark commits.
fn force_mark_between_plan_and_copy(
    pool: &Pool,
    step: impl FnOnce() -> Step + Send,
    written: VolId,
    image: VolId,
) {
    use std::sync::mpsc::{Receiver, channel};
    // The step parks before its commit, the first write after its plan; the test hears where
    // the writer stopped (planned, or about to wait for a grain lock) and lets each go.
    let (step_parked, step_parked_rx) = channel();
    let (step_go, step_go_rx) = channel::<()>();
    let (writer_at, writer_at_rx) = channel();
    let (writer_go, writer_go_rx) = channel::<()>();
    let gates = Mutex::new((step_go_rx, writer_go_rx));
    let wait = |rx: &Receiver<()>| rx.recv_timeout(Duration::from_secs(20)).unwrap();
    pool.set_test_hook(move |p| {
        let me = std::thread::current();
        match (me.name(), p) {
            (Some("step"), HookPoint::BatchCopied { .. }) => {
                step_parked.send(()).unwrap();
                wait(&gates.lock().0);
            }
            (Some("writer"), HookPoint::LockWait) => writer_at.send(p).unwrap(),
            (Some("writer"), HookPoint::WritePlanned { .. }) => {
                writer_at.send(p).unwrap();
                wait(&gates.lock().1);
            }
            _ => {}
        }
    });
    let timeout = Duration::from_secs(20);
    std::thread::scope(|s| {
        let step = std::thread::Builder::new()
            .name("step".into())
            .spawn_scoped(s, step)
            .unwrap();
        step_parked_rx
            .recv_timeout(timeout)
            .expect("the step copies");
        let writer = std::thread::Builder::new()
            .name("writer".into())
            .spawn_scoped(s, || {
                pool.write(written, CHUNK as u64, &chunk(0xA1)).unwrap()
            })
            .unwrap();
        let first = writer_at_rx
            .recv_timeout(timeout)
            .expect("the writer plans or waits");
        step_go.send(()).unwrap();
        assert!(matches!(step.join().unwrap(), Step::Copied { .. }));
        // The grain is split now: this write needs no copy and goes straight to the store.
        pool.write(written, 2 * CHUNK as u64, &chunk(0xB2)).unwrap();
        writer_go.send(()).unwrap();
        writer.join().unwrap();
        eprintln!("the writer first stopped at {first:?}");
    });
    let before: Vec<u32> = (0..(GRAIN / CHUNK) as u32).collect();
    assert_eq!(
        chunks(pool, image),
        before,
        "{image} holds chunks written after its start"
    );
    assert_eq!(chunks(pool, written)[1..3], [0xA1, 0xB2]);
}

/// The step is a background copy of the newest snapshot; the writes go to the source.
#[test]
fn a_background_mark_never_lands_between_a_writes_plan_and_its_copy() {
    let pool = Pool::open(
        MetaFiles::in_memory(),
        Arc::new(MemBackend::default()),
        PoolConfig::default(),
    )
    .unwrap();
    let (target, map) = one_grain_snapshot(&pool, "snap");
    let src = pool.engine().volume_by_name("src").unwrap().id;
    let step = || pool.background_step(map, 0).unwrap();
    force_mark_between_plan_and_copy(&pool, step, src, target);
}

/// The step is the cleaning of a stopped snapshot (complete, so its target stays online) into
/// the older snapshot that reads through it; the writes go to the stopped snapshot's target.
#[test]
fn a_cleaning_mark_never_lands_between_a_writes_plan_and_its_copy() {
    let pool = Pool::open(
        MetaFiles::in_memory(),
        Arc::new(MemBackend::default()),
        PoolConfig::default(),
    )
    .unwrap();
    let (older, _) = one_grain_snapshot(&pool, "older");
    let (newer, map) = one_grain_snapshot(&pool, "newer");
    let src = pool.engine().volume_by_name("src").unwrap().id;
    // The newer snapshot takes the grain; the older one reads it through the newer one.
    pool.write(src, 0, &chunk(0x50)).unwrap();
    pool.stop_mapping(map, false, false).unwrap();
    assert_eq!(
        pool.engine().mapping(map).unwrap().state,
        MapState::Stopping
    );
    let step = || pool.clean_step(map, 0).unwrap();
    force_mark_between_plan_and_copy(&pool, step, newer, older);
}

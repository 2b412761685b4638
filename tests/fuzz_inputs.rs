//! The fuzz targets' inputs in the normal test suite (issue 12): every committed seed under
//! `fuzz/corpus/TARGET/` and every input that once crashed a target (`fuzz/regressions/TARGET/`)
//! goes through the same entry point as in `fuzz/` (`flashcopy_csi::fuzzing`), which panics
//! when a property breaks. No input may make the process allocate more than [`MALLOC_LIMIT`]
//! at once (libFuzzer's `-malloc_limit_mb` in `ci/fuzz.sh`) nor hold more than [`LIVE_LIMIT`]
//! more at any time (its `-rss_limit_mb`), which a counting allocator checks here. `write_seeds` (ignored) regenerates the seeds from the real code.
// The counting allocator: implementing GlobalAlloc is unsafe by definition.
#![allow(unsafe_code)]

use flashcopy_csi::engine::{GrainSize, MappingSpec};
use flashcopy_csi::fuzzing;
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::store::{BlockStore, MemStore};
use flashcopy_csi::volume::{MemBackend, Pool, PoolConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

type Target = fn(&[u8]);

/// The largest single allocation an input may cause (as `-malloc_limit_mb=1024`).
const MALLOC_LIMIT: usize = 1 << 30;

/// The most an input may add to the bytes allocated at one time: the engine's bitmap budget
/// (512 MiB) and room for the rest, well under `-rss_limit_mb=2048`.
const LIVE_LIMIT: usize = 1 << 30;

/// The system allocator, remembering the largest request it saw and the peak of the bytes
/// allocated at one time.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        grew(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        grew(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const TARGETS: [(&str, Target); 7] = [
    ("nbd_handshake", fuzzing::nbd_handshake),
    ("nbd_transmission", fuzzing::nbd_transmission),
    ("journal", fuzzing::journal),
    ("checkpoint", fuzzing::checkpoint),
    ("csi_ids", fuzzing::csi_ids),
    ("csi_params", fuzzing::csi_params),
    ("fc_size", fuzzing::fc_size),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.expect("dir entry").path()).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn replay(kind: &str, min_per_target: usize) {
    for (name, target) in TARGETS {
        let inputs = files(&fuzz_dir().join(kind).join(name));
        assert!(
            inputs.len() >= min_per_target,
            "{kind}/{name}: {} inputs, expected at least {min_per_target}",
            inputs.len()
        );
        for path in inputs {
            let data = std::fs::read(&path).expect("read input");
            eprintln!("{}", path.display());
            let before = LIVE.load(Ordering::Relaxed);
            PEAK.fetch_min(before, Ordering::Relaxed);
            target(&data);
            let largest = LARGEST.load(Ordering::Relaxed);
            assert!(
                largest <= MALLOC_LIMIT,
                "{}: an allocation of {largest} bytes",
                path.display()
            );
            // The other test of this binary runs beside this one: its inputs stay far below.
            let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
            assert!(
                peak <= LIVE_LIMIT,
                "{}: {peak} more bytes allocated at one time",
                path.display()
            );
        }
    }
}

#[test]
fn every_seed_passes() {
    // Seeds are what the fuzzer starts from: each target has some, and none breaks a property.
    replay("corpus", 3);
}

#[test]
fn every_past_crash_passes() {
    replay("regressions", 0);
}

/// Regenerates the seed corpora from the real code: `cargo test --test fuzz_inputs --
/// --ignored write_seeds`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when a format changes"]
fn write_seeds() {
    let corpus = fuzz_dir().join("corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    };
    nbd_seeds(&|n, b| put("nbd_handshake", n, b), &|n, b| {
        put("nbd_transmission", n, b)
    });
    meta_seeds(&|n, b| put("journal", n, b), &|n, b| {
        put("checkpoint", n, b)
    });
    for (n, s) in [
        ("vol", "vol:node-1:1"),
        ("snap", "snap:worker.example.com:4096"),
        ("group", "group:g.my-group_1"),
        ("group-hash", "group:g-0123456789abcdef0123456789abcdef"),
        ("name", "pvc-2f1c1b8e-6a4b-4c49-9a0e-000000000001"),
        ("zero", "vol:n:0"),
        ("max", "snap:n:18446744073709551615"),
    ] {
        put("csi_ids", n, s.as_bytes());
    }
    for (n, s) in [
        ("snapshot-class", "copyRate=0\nincremental=false"),
        (
            "storage-class",
            "copyRate=50\ncleanRate=50\ngrainSize=256\ncsi.storage.k8s.io/fstype=ext4",
        ),
        ("incremental", "incremental=true\ngrainSize=64"),
        ("empty", ""),
    ] {
        put("csi_params", n, s.as_bytes());
    }
    for s in ["10G", "64M", "1GiB", "1.5T", "512", "4 kib", "0.25g"] {
        put("fc_size", &s.replace([' ', '.'], "_"), s.as_bytes());
    }
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// A request header.
fn req(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&be32(len));
    b
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&be32(code));
    b.extend_from_slice(&be32(data.len() as u32));
    b.extend_from_slice(data);
    b
}

fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut d = be32(name.len() as u32).to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// A session of requests: write, read it, FUA write, flush, trim, write zeroes, cache, an
/// out-of-range read, an unknown command, disconnect.
fn session() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(req(0, 1, 1, 4096, 512));
    b.extend((0..512u32).map(|i| i as u8));
    b.extend(req(0, 0, 2, 4096, 512));
    b.extend(req(1, 1, 3, 0, 16));
    b.extend([0xa5; 16]);
    b.extend(req(0, 3, 4, 0, 0));
    b.extend(req(0, 4, 5, 65536, 65536));
    b.extend(req(2, 6, 6, 131072, 4096));
    b.extend(req(0, 5, 7, 0, 4096));
    b.extend(req(0, 0, 8, fuzzing::NBD_EXPORT_SIZE, 512));
    b.extend(req(0, 9, 9, 0, 0));
    b.extend(req(0, 2, 10, 0, 0));
    b
}

fn nbd_seeds(handshake: &dyn Fn(&str, &[u8]), transmission: &dyn Fn(&str, &[u8])) {
    let flags = be32(3);
    let go = [
        &flags[..],
        &option(7, &info_data(fuzzing::NBD_EXPORT, &[1, 2, 3])),
        &session(),
    ]
    .concat();
    handshake("go-session", &go);
    handshake(
        "export-name-session",
        &[&fuzzing::nbd_handshake_prefix()[..], &session()].concat(),
    );
    handshake(
        "list-info-abort",
        &[
            &be32(1)[..],
            &option(3, &[]),
            &option(6, &info_data(fuzzing::NBD_EXPORT, &[0])),
            &option(6, &info_data("nosuch", &[])),
            &option(8, &[]), // structured replies: unsupported
            &option(2, &[]),
        ]
        .concat(),
    );
    transmission("session", &session());
    let mut small = Vec::new();
    for i in 0..8u64 {
        small.extend(req(0, 0, i, i * 512, 512));
    }
    transmission("reads", &small);
    transmission("large-write", &req(0, 1, 1, 0, 64 << 20));
}

fn meta_seeds(journal: &dyn Fn(&str, &[u8]), checkpoint: &dyn Fn(&str, &[u8])) {
    let (a, j) = (Arc::new(MemStore::new(0)), Arc::new(MemStore::new(0)));
    let files = MetaFiles {
        checkpoint_a: a.clone(),
        checkpoint_b: Arc::new(MemStore::new(0)),
        journal: j.clone(),
    };
    let backend = Arc::new(MemBackend::default());
    let bytes = |s: &MemStore| {
        let mut v = vec![0u8; s.len() as usize];
        s.read_at(&mut v, 0).expect("read store");
        v
    };
    // The journal's frames: (start, length) of each after the start marker; the zeros after
    // them are the file's unused room, not worth a seed's bytes.
    let frames = |raw: &[u8]| {
        let mut v = Vec::new();
        let mut at = 40;
        while at + 24 <= raw.len() {
            let len = u32::from_le_bytes(raw[at..at + 4].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            v.push((at, len));
            at += len;
        }
        (v, at)
    };
    {
        let pool = Pool::open(files.clone(), backend.clone(), PoolConfig::default()).unwrap();
        let src = pool.create_volume("src", 1 << 20).unwrap();
        let snap = pool.create_volume("snap", 1 << 20).unwrap();
        let clone = pool.create_volume("clone", 1 << 20).unwrap();
        pool.write(src, 0, &[7; 4096]).unwrap();
        let m = pool
            .create_mapping(MappingSpec {
                grain: Some(GrainSize::K64),
                ..MappingSpec::snapshot(src, snap)
            })
            .unwrap();
        pool.start_mapping(m, true, false).unwrap();
        let g = pool.create_group(Some("cg"), false).unwrap();
        pool.create_mapping(MappingSpec {
            copy_rate: 50,
            incremental: true,
            group: Some(g),
            ..MappingSpec::new(src, clone)
        })
        .unwrap();
        pool.write(src, 65536, &[9; 512]).unwrap();
        pool.flush(src).unwrap();
        let raw = bytes(&j);
        let (records, end) = frames(&raw);
        journal("raw-journal", &[&[0u8][..], &raw[..end]].concat());
        // The same records, for the framed form: frame headers stripped, length-prefixed.
        let mut framed = vec![1u8];
        for (at, len) in records {
            let record = &raw[at + 24..at + len];
            framed.extend_from_slice(&(record.len() as u16).to_le_bytes());
            framed.extend_from_slice(record);
        }
        journal("records", &framed);
        pool.checkpoint().unwrap();
        pool.rename_volume(snap, "snap-1").unwrap();
        pool.create_volume("more", 4096).unwrap();
        pool.flush(src).unwrap();
        let raw = bytes(&j);
        journal(
            "raw-journal-gen1",
            &[&[0u8][..], &raw[..frames(&raw).1]].concat(),
        );
    }
    let mut image = bytes(&a);
    image.truncate(32 + u64::from_le_bytes(image[24..32].try_into().unwrap()) as usize);
    checkpoint("raw-checkpoint", &[&[0u8][..], &image].concat());
    checkpoint("payload", &[&[1u8][..], &image[32..]].concat());
    checkpoint("empty-engine-payload", &[1u8]);
}

//! Benchmarks of the FlashCopy engine (see /work/shared/docs/BENCHMARKS.md).
//!
//! `cargo bench --bench engine [-- --quick] [--no-disk | --disk] [--only=cow,bitmap,copy]
//! [--reps=N]`
//!
//! Pools live in tempdirs on /dev/shm (tmpfs) when it exists and, unless `--quick` or
//! `--no-disk`, also on the normal temp dir (the disk). Quick mode shrinks sizes and durations
//! (about 15 s); the full run takes about 3-4 minutes.
//!
//! Prints tables and never asserts timings. Every figure is the median of at least three
//! repetitions, and peers are measured in the same run, interleaved with what they are compared
//! with, so a noisy neighbour hits both sides alike. Every measurement is bounded in time; a row
//! that hit its time cap is marked with `*` and reports the part that was done.
//!
//! 1. copy-on-write first-write and rewrite cost with 0, 1, 16 and 256 snapshots of one source;
//! 2. bitmap memory per 1 TiB mapping (engine accounting and resident memory);
//! 3. background copy throughput at the top rate against a plain file copy, and the accuracy
//!    of lower rates against the rate table (FLASHCOPY.md §5.1).

use anyhow::{Context, Result};
use flashcopy_csi::engine::{
    GrainSize, MapId, MapState, MappingSpec, VolId, bitmap_bytes, rate_bytes_per_sec,
};
use flashcopy_csi::volume::{Pool, PoolConfig};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// What to run, from the command line.
struct Cfg {
    quick: bool,
    disk: bool,
    cow: bool,
    bitmap: bool,
    copy: bool,
    reps: usize,
}

impl Cfg {
    fn from_args() -> Self {
        let mut c = Cfg {
            quick: false,
            disk: true,
            cow: true,
            bitmap: true,
            copy: true,
            reps: 0,
        };
        let mut disk = None;
        for a in std::env::args().skip(1) {
            match a.as_str() {
                "--quick" => c.quick = true,
                "--disk" => disk = Some(true),
                "--no-disk" => disk = Some(false),
                _ => {
                    if let Some(list) = a.strip_prefix("--only=") {
                        c.cow = list.contains("cow");
                        c.bitmap = list.contains("bitmap");
                        c.copy = list.contains("copy");
                    } else if let Some(n) = a.strip_prefix("--reps=") {
                        c.reps = n.parse().unwrap_or(3).max(3);
                    }
                    // Anything else (cargo's `--bench`, name filters) is ignored.
                }
            }
        }
        // The normal disk is a second, slower environment: quick runs skip it unless asked.
        c.disk = disk.unwrap_or(!c.quick);
        if c.reps == 0 {
            c.reps = if c.quick { 3 } else { 5 };
        }
        c
    }
}

/// A place to put pools: a label, a directory and its file-system type.
struct Place {
    label: &'static str,
    base: PathBuf,
    fs: String,
}

fn places(cfg: &Cfg) -> Vec<Place> {
    let mut out = Vec::new();
    let shm = Path::new("/dev/shm");
    let tmp = std::env::temp_dir();
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        out.push(Place {
            label: "shm",
            base: shm.to_path_buf(),
            fs: fs_type(shm),
        });
    }
    if out.is_empty() || cfg.disk {
        out.push(Place {
            label: "disk",
            fs: fs_type(&tmp),
            base: tmp,
        });
    }
    out
}

/// File-system type of the mount holding `p` (longest mount point that is a prefix).
fn fs_type(p: &Path) -> String {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, String, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = f[1].replace("\\040", " ");
        if p.starts_with(&mp) && best.as_ref().is_none_or(|b| mp.len() >= b.0) {
            best = Some((mp.len(), f[2].to_string(), f[0].to_string()));
        }
    }
    best.map_or_else(|| "?".into(), |(_, t, dev)| format!("{t} ({dev})"))
}

fn env_report(cfg: &Cfg, places: &[Place]) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("== flashcopy-csi engine benchmarks ==");
    println!(
        "mode: {}   repetitions: {} (medians shown)",
        if cfg.quick { "quick" } else { "full" },
        cfg.reps
    );
    println!(
        "nproc: {}   cpu: {cpu}   kernel: {}   loadavg: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    for p in places {
        println!("dir [{}]: {}  fs: {}", p.label, p.base.display(), p.fs);
    }
    if !cfg.disk {
        println!("(normal disk skipped; pass --disk to include it)");
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// Small helpers.

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// splitmix64: a tiny deterministic generator for shuffles and fill patterns.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Non-zero bytes that differ per call (`seed`).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&(r.next() | 0x0101_0101_0101_0101).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Fills `vol` (of `size` bytes) with non-zero data through the pool, then flushes it.
fn fill(pool: &Pool, vol: VolId, size: u64, seed: u64) -> Result<()> {
    let chunk = MIB.min(size);
    let data = pattern(chunk as usize, seed);
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        pool.write(vol, off, &data[..n])?;
        off += n as u64;
    }
    pool.flush(vol)?;
    Ok(())
}

/// Resident set size of this process in bytes (VmRSS).
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn open_pool(base: &Path) -> Result<(tempfile::TempDir, Pool)> {
    let dir = tempfile::Builder::new()
        .prefix("fcbench-")
        .tempdir_in(base)
        .with_context(|| format!("tempdir in {}", base.display()))?;
    let pool = Pool::open_dir(dir.path(), PoolConfig::default())?;
    Ok((dir, pool))
}

fn spec(src: VolId, tgt: VolId, grain: GrainSize, rate: u8, incremental: bool) -> MappingSpec {
    let mut s = MappingSpec::snapshot(src, tgt);
    s.grain = Some(grain);
    s.copy_rate = rate;
    s.incremental = incremental;
    s
}

/// A plain text table with right-aligned columns.
struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&str]) -> Self {
        Self {
            head: head.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }
    fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }
    fn print(&self) {
        let n = self.head.len();
        let w: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .chain([&self.head[i]])
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |r: &[String]| {
            let cells: Vec<String> = (0..n)
                .map(|i| {
                    let s = r.get(i).map_or("", String::as_str);
                    if i == 0 {
                        format!("{s:<w$}", w = w[i])
                    } else {
                        format!("{s:>w$}", w = w[i])
                    }
                })
                .collect();
            println!("  {}", cells.join(" | "));
        };
        line(&self.head);
        println!(
            "  {}",
            w.iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("-+-")
        );
        for r in &self.rows {
            line(r);
        }
    }
}

fn f1(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "-".into()
    }
}

fn f2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "-".into()
    }
}

/// "min-max" of the repetitions, to show how noisy a median is.
fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if lo.is_finite() && hi.is_finite() {
        format!("{lo:.0}-{hi:.0}")
    } else {
        "-".into()
    }
}

fn star(capped: bool) -> &'static str {
    if capped { "*" } else { "" }
}

// ---------------------------------------------------------------------------------------------
// Row 1: copy-on-write first write and rewrite.

const THREADS: usize = 4;
const IO: usize = 4096;
/// Each rewrite pass writes the offsets of its first-write pass this many times.
const REWRITE_ROUNDS: usize = 8;

/// The physical floor of a copy-on-write, without the engine: on plain files in the same
/// directory, read the 64 KiB grain from the source file, write it to a fresh sparse target file,
/// fdatasync it, append a 44-byte record to a journal file and fdatasync that, then write the
/// 4 KiB (FLASHCOPY.md §3.2 ordering). A rewrite is the 4 KiB write alone.
struct Raw {
    src: File,
    tgt: File,
    journal: File,
    jpos: AtomicU64,
}

impl Raw {
    fn new(dir: &Path, size: u64, seed: u64) -> Result<Self> {
        let open = |name: &str| -> Result<File> {
            Ok(std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(name))?)
        };
        let (src, tgt, journal) = (open("src.img")?, open("tgt.img")?, open("journal")?);
        let chunk = pattern(MIB as usize, seed);
        let mut off = 0;
        while off < size {
            src.write_all_at(&chunk, off)?;
            off += MIB;
        }
        src.sync_all()?;
        tgt.set_len(size)?;
        tgt.sync_all()?;
        Ok(Self {
            src,
            tgt,
            journal,
            jpos: AtomicU64::new(0),
        })
    }

    fn first_write(&self, off: u64, data: &[u8]) -> Result<()> {
        let gb = GrainSize::K64.bytes();
        let g = off / gb * gb;
        let mut buf = vec![0u8; gb as usize];
        self.src.read_exact_at(&mut buf, g)?;
        self.tgt.write_all_at(&buf, g)?;
        self.tgt.sync_data()?;
        let rec = [0x5Au8; 44];
        let at = self.jpos.fetch_add(rec.len() as u64, Ordering::Relaxed);
        self.journal.write_all_at(&rec, at)?;
        self.journal.sync_data()?;
        self.src.write_all_at(data, off)?;
        Ok(())
    }
}

/// What a row of table 1 writes to.
enum Subject {
    /// A pool whose source has `n` started snapshots.
    Pool {
        pool: Box<Pool>,
        src: VolId,
        n: usize,
        setup_per_snap: Duration,
        last_pause: Duration,
    },
    /// The raw-file floor.
    Raw(Raw),
}

/// One row of table 1: a subject in its own directory, with untouched grains to hand out.
struct CowSetup {
    _dir: tempfile::TempDir,
    subject: Subject,
    /// Untouched grains in random order; consumed from the front.
    order: Vec<u64>,
    next: usize,
}

impl CowSetup {
    /// A pool with a filled source and `n` snapshots created and started one after another.
    fn pool(base: &Path, size: u64, n: usize, seed: u64) -> Result<Self> {
        let (dir, pool) = open_pool(base)?;
        let src = pool.create_volume("src", size)?;
        fill(&pool, src, size, seed)?;
        let t0 = Instant::now();
        let mut last_pause = Duration::ZERO;
        for i in 0..n {
            let t = pool.create_volume(&format!("snap{i:03}"), size)?;
            let m = pool.create_mapping(spec(src, t, GrainSize::K64, 0, false))?;
            last_pause = pool.start_mapping(m, true, false)?.pause;
        }
        let setup_per_snap = if n == 0 {
            Duration::ZERO
        } else {
            t0.elapsed() / n as u32
        };
        let subject = Subject::Pool {
            pool: Box::new(pool),
            src,
            n,
            setup_per_snap,
            last_pause,
        };
        Ok(Self::with(dir, subject, size, seed))
    }

    fn raw(base: &Path, size: u64, seed: u64) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fcbench-raw-")
            .tempdir_in(base)?;
        let raw = Raw::new(dir.path(), size, seed)?;
        Ok(Self::with(dir, Subject::Raw(raw), size, seed))
    }

    fn with(dir: tempfile::TempDir, subject: Subject, size: u64, seed: u64) -> Self {
        let mut order: Vec<u64> = (0..GrainSize::K64.grains(size)).collect();
        Rng(seed ^ 0xC0DE).shuffle(&mut order);
        Self {
            _dir: dir,
            subject,
            order,
            next: 0,
        }
    }

    /// Offsets of `k` untouched grains (a random 4 KiB block inside each).
    fn take(&mut self, k: usize, rng: &mut Rng) -> Vec<u64> {
        let gb = GrainSize::K64.bytes();
        let end = (self.next + k).min(self.order.len());
        let v = self.order[self.next..end]
            .iter()
            .map(|g| g * gb + rng.below(gb / IO as u64) * IO as u64)
            .collect();
        self.next = end;
        v
    }

    fn cow_grains(&self) -> u64 {
        match &self.subject {
            Subject::Pool { pool, .. } => pool.stats.cow_grains.load(Ordering::Relaxed),
            Subject::Raw(_) => 0,
        }
    }

    fn snapshots(&self) -> Option<usize> {
        match &self.subject {
            Subject::Pool { n, .. } => Some(*n),
            Subject::Raw(_) => None,
        }
    }

    /// One 4 KiB write; `first`: the grain is untouched (the raw floor then copies it).
    fn write(&self, off: u64, data: &[u8], first: bool) -> Result<()> {
        match &self.subject {
            Subject::Pool { pool, src, .. } => Ok(pool.write(*src, off, data)?),
            Subject::Raw(r) if first => r.first_write(off, data),
            Subject::Raw(r) => Ok(r.src.write_all_at(data, off)?),
        }
    }
}

/// Writes 4 KiB at each offset with `threads` threads, stopping at `cap`. Returns the offsets
/// actually written (for the rewrite pass), the wall time and whether the cap was hit.
fn write_pass(
    s: &CowSetup,
    first: bool,
    offsets: &[u64],
    threads: usize,
    cap: Duration,
) -> Result<(Vec<u64>, Duration, bool)> {
    let data = pattern(IO, offsets.first().copied().unwrap_or(7));
    let chunk = offsets.len().div_ceil(threads).max(1);
    let t0 = Instant::now();
    let stop = t0 + cap;
    let parts: Vec<Result<(Vec<u64>, bool)>> = std::thread::scope(|sc| {
        let hs: Vec<_> = offsets
            .chunks(chunk)
            .map(|part| {
                let data = &data;
                sc.spawn(move || -> Result<(Vec<u64>, bool)> {
                    let mut done = Vec::with_capacity(part.len());
                    for &off in part {
                        if Instant::now() >= stop {
                            return Ok((done, true));
                        }
                        s.write(off, data, first)?;
                        done.push(off);
                    }
                    Ok((done, false))
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect()
    });
    let wall = t0.elapsed();
    let mut done = Vec::new();
    let mut capped = false;
    for p in parts {
        let (d, c) = p?;
        done.extend(d);
        capped |= c;
    }
    Ok((done, wall, capped))
}

fn per_write_us(wall: Duration, n: usize) -> f64 {
    if n == 0 {
        f64::NAN
    } else {
        wall.as_secs_f64() * 1e6 / n as f64
    }
}

#[derive(Default)]
struct CowSamples {
    st_first: Vec<f64>,
    st_re: Vec<f64>,
    mt_first: Vec<f64>,
    mt_re: Vec<f64>,
    capped: bool,
    cow_missing: u64,
}

fn bench_cow(cfg: &Cfg, place: &Place) -> Result<()> {
    let size = if cfg.quick { 256 * MIB } else { 512 * MIB };
    let per = if cfg.quick { 512 } else { 1024 };
    let cap = Duration::from_secs(if cfg.quick { 2 } else { 5 });
    let ns = [0usize, 1, 16, 256];
    let grains = GrainSize::K64.grains(size) as usize;
    let per = per.min(grains / (2 * cfg.reps));
    println!(
        "[1] copy-on-write: 4 KiB writes to untouched 64 KiB grains of a {} MiB source, random \
         order; {per} first writes per pass, then {REWRITE_ROUNDS}x as many rewrites of the same \
         offsets; {THREADS} threads for MT; dir [{}] {}",
        size / MIB,
        place.label,
        place.fs
    );
    let t_setup = Instant::now();
    let mut setups = vec![CowSetup::raw(&place.base, size, 0x5EED)?];
    for (i, &n) in ns.iter().enumerate() {
        setups.push(CowSetup::pool(&place.base, size, n, 0x5EED + 1 + i as u64)?);
    }
    println!(
        "    setup (fill sources, create+start snapshots): {:.1} s",
        t_setup.elapsed().as_secs_f64()
    );
    let mut samples: Vec<CowSamples> = setups.iter().map(|_| CowSamples::default()).collect();
    let mut rng = Rng(42);
    for rep in 0..cfg.reps {
        // Interleave the rows inside each repetition, starting each repetition with a
        // different one, so noise and order effects hit all of them alike.
        for k in 0..setups.len() {
            let i = (k + rep) % setups.len();
            let (s, smp) = (&mut setups[i], &mut samples[i]);
            let expect_cow = s.snapshots().unwrap_or(0) > 0;
            for threads in [1, THREADS] {
                let offs = s.take(per, &mut rng);
                let before = s.cow_grains();
                let (done, wall, c1) = write_pass(s, true, &offs, threads, cap)?;
                let cows = s.cow_grains() - before;
                if expect_cow {
                    smp.cow_missing += (done.len() as u64).saturating_sub(cows);
                }
                let first = per_write_us(wall, done.len());
                // Rewrites are cheap: repeat the offsets so a pass lasts long enough to measure.
                let again: Vec<u64> = (0..REWRITE_ROUNDS)
                    .flat_map(|_| done.iter().copied())
                    .collect();
                let (re_done, re_wall, c2) = write_pass(s, false, &again, threads, cap)?;
                let re = per_write_us(re_wall, re_done.len());
                smp.capped |= c1 | c2;
                if threads == 1 {
                    smp.st_first.push(first);
                    smp.st_re.push(re);
                } else {
                    smp.mt_first.push(first);
                    smp.mt_re.push(re);
                }
            }
        }
    }
    let mut t = Table::new(&[
        "snapshots",
        "create+start ms/snap",
        "last start pause ms",
        "ST first µs",
        "(min-max)",
        "vs floor",
        "ST rewrite µs",
        "ST first/rewrite",
        "MT first µs",
        "vs floor",
        "MT rewrite µs",
        "MT first/rewrite",
    ]);
    let med: Vec<[f64; 4]> = samples
        .iter()
        .map(|s| {
            [
                median(&s.st_first),
                median(&s.st_re),
                median(&s.mt_first),
                median(&s.mt_re),
            ]
        })
        .collect();
    let floor = med[0];
    for ((s, smp), m) in setups.iter().zip(&samples).zip(&med) {
        let (label, setup, pause) = match &s.subject {
            Subject::Raw(_) => ("floor: raw file ops".to_string(), "-".into(), "-".into()),
            Subject::Pool { n: 0, .. } => ("0 (no mapping)".to_string(), "-".into(), "-".into()),
            Subject::Pool {
                n,
                setup_per_snap,
                last_pause,
                ..
            } => (
                n.to_string(),
                f2(setup_per_snap.as_secs_f64() * 1e3),
                f2(last_pause.as_secs_f64() * 1e3),
            ),
        };
        t.row(vec![
            format!("{label}{}", star(smp.capped)),
            setup,
            pause,
            f1(m[0]),
            spread(&smp.st_first),
            f2(m[0] / floor[0]),
            f1(m[1]),
            f2(m[0] / m[1]),
            f1(m[2]),
            f2(m[2] / floor[2]),
            f1(m[3]),
            f2(m[2] / m[3]),
        ]);
    }
    t.print();
    let idx = |n: usize| {
        setups
            .iter()
            .position(|s| s.snapshots() == Some(n))
            .unwrap()
    };
    let (m1, m16, m256) = (med[idx(1)], med[idx(16)], med[idx(256)]);
    println!(
        "    ratio 256/1  first write: ST {} MT {}   (target <= 1.2)   rewrite: ST {} MT {}",
        f2(m256[0] / m1[0]),
        f2(m256[2] / m1[2]),
        f2(m256[1] / m1[1]),
        f2(m256[3] / m1[3]),
    );
    println!(
        "    ratio 16/1   first write: ST {} MT {}                     rewrite: ST {} MT {}",
        f2(m16[0] / m1[0]),
        f2(m16[2] / m1[2]),
        f2(m16[1] / m1[1]),
        f2(m16[3] / m1[3]),
    );
    println!(
        "    floor = the same file operations without the engine (read grain, write it to a \
         fresh sparse file, fdatasync, 44-byte journal append, fdatasync, 4 KiB write)"
    );
    let missing: u64 = samples.iter().map(|s| s.cow_missing).sum();
    if missing > 0 {
        println!("    NOTE: {missing} first writes did not count a copy-on-write grain");
    }
    if samples.iter().any(|s| s.capped) {
        println!(
            "    * hit the {} s time cap per pass: figures from the writes done",
            cap.as_secs()
        );
    }
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Row 2: bitmap memory.

fn bench_bitmap(place: &Place) -> Result<()> {
    let maps = 16usize;
    let size = TIB;
    println!(
        "[2] bitmap memory: {maps} mappings of one 1 TiB sparse source to 1 TiB sparse targets per \
         configuration; dir [{}]",
        place.label
    );
    let (_dir, pool) = open_pool(&place.base)?;
    let configs = [
        (GrainSize::K64, false),
        (GrainSize::K64, true),
        (GrainSize::K256, false),
        (GrainSize::K256, true),
    ];
    let mut t = Table::new(&[
        "grain",
        "incremental",
        "bitmap_used Δ/map",
        "MiB per TiB",
        "bitmap_bytes()",
        "RSS Δ/map",
        "create ms/map",
        "start pause ms",
        "start total ms",
        "RSS Δ start",
    ]);
    let mut k64 = f64::NAN;
    for (ci, &(grain, inc)) in configs.iter().enumerate() {
        let src = pool.create_volume(&format!("bsrc{ci}"), size)?;
        let tgts: Vec<VolId> = (0..maps)
            .map(|i| pool.create_volume(&format!("btgt{ci}-{i:02}"), size))
            .collect::<Result<_, _>>()?;
        let used0 = pool.engine().bitmap_used();
        let rss0 = rss_bytes();
        let t0 = Instant::now();
        let mut ids: Vec<MapId> = Vec::new();
        for &tg in &tgts {
            ids.push(pool.create_mapping(spec(src, tg, grain, 0, inc))?);
        }
        let create = t0.elapsed();
        let rss1 = rss_bytes();
        let used1 = pool.engine().bitmap_used();
        let per_map = (used1 - used0) as f64 / maps as f64;
        let per_tib = per_map / (size as f64 / TIB as f64) / MIB as f64;
        if grain == GrainSize::K64 && !inc {
            k64 = per_tib;
        }
        let rss_per = match (rss0, rss1) {
            (Some(a), Some(b)) => format!(
                "{:.2} MiB",
                (b as f64 - a as f64) / maps as f64 / MIB as f64
            ),
            _ => "-".into(),
        };
        // Starting needs no data copy: its cost should not depend on the size.
        let t1 = Instant::now();
        let rep = pool.start_mapping(ids[0], true, false)?;
        let start_total = t1.elapsed();
        let rss2 = rss_bytes();
        let rss_start = match (rss1, rss2) {
            (Some(a), Some(b)) => format!("{:.2} MiB", (b as f64 - a as f64) / MIB as f64),
            _ => "-".into(),
        };
        t.row(vec![
            format!("{} KiB", grain.bytes() / KIB),
            inc.to_string(),
            format!("{:.2} MiB", per_map / MIB as f64),
            f2(per_tib),
            format!(
                "{:.2} MiB",
                bitmap_bytes(size, grain, inc) as f64 / MIB as f64
            ),
            rss_per,
            f2(create.as_secs_f64() * 1e3 / maps as f64),
            f2(rep.pause.as_secs_f64() * 1e3),
            f2(start_total.as_secs_f64() * 1e3),
            rss_start,
        ]);
    }
    t.print();
    println!(
        "    64 KiB non-incremental: {} MiB per TiB (target <= 2)",
        f2(k64)
    );
    println!(
        "    (RSS Δ/map: VmRSS growth over creating the {maps} mappings / {maps}; start: one mapping \
         of each configuration started with prep, pause = I/O held)"
    );
    println!();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Row 3: background copy.

/// Copies `from` to a new file next to it with `std::io::copy` (copy_file_range), then fsyncs.
fn peer_io_copy(from: &Path, to: &Path) -> Result<(u64, Duration)> {
    let t0 = Instant::now();
    let mut r = File::open(from)?;
    let mut w = File::create(to)?;
    let n = std::io::copy(&mut r, &mut w)?;
    w.sync_all()?;
    let d = t0.elapsed();
    drop(w);
    std::fs::remove_file(to)?;
    Ok((n, d))
}

/// Copies `from` to a new file with `cp --sparse=never`, then fsyncs the copy.
fn peer_cp(from: &Path, to: &Path) -> Result<(u64, Duration)> {
    let t0 = Instant::now();
    let st = std::process::Command::new("cp")
        .arg("--sparse=never")
        .arg(from)
        .arg(to)
        .status()?;
    anyhow::ensure!(st.success(), "cp failed: {st}");
    File::open(to)?.sync_all()?;
    let d = t0.elapsed();
    let n = std::fs::metadata(to)?.len();
    std::fs::remove_file(to)?;
    Ok((n, d))
}

/// Copies `from` to a new file with a 1 MiB read/write loop (like `dd bs=1M`), then fsyncs.
fn peer_rw_copy(from: &Path, to: &Path) -> Result<(u64, Duration)> {
    let t0 = Instant::now();
    let mut r = File::open(from)?;
    let mut w = File::create(to)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        w.write_all(&buf[..k])?;
        n += k as u64;
    }
    w.sync_all()?;
    let d = t0.elapsed();
    drop(w);
    std::fs::remove_file(to)?;
    Ok((n, d))
}

/// Creates a target and a mapping at `rate`, starts it and runs background copy to completion
/// or `cap`; then removes mapping and target. Returns (bytes, time, capped).
fn top_rate_copy(
    pool: &Pool,
    src: VolId,
    size: u64,
    grain: GrainSize,
    name: &str,
    cap: Duration,
) -> Result<(u64, Duration, bool)> {
    let tgt = pool.create_volume(name, size)?;
    let map = pool.create_mapping(spec(src, tgt, grain, 150, false))?;
    pool.start_mapping(map, true, false)?;
    let t0 = Instant::now();
    let bytes = pool.run_copy(map, Some(t0 + cap))?;
    let d = t0.elapsed();
    let state = pool.engine().mapping(map).map(|m| m.state);
    let capped = state == Some(MapState::Copying);
    if capped {
        pool.stop_mapping(map, true, false)?;
        pool.delete_mapping(map, true)?;
    } else {
        pool.delete_mapping(map, false)?;
    }
    pool.delete_volume(tgt)?;
    Ok((bytes, d, capped))
}

fn mibs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn bench_copy(cfg: &Cfg, place: &Place, rates_too: bool) -> Result<()> {
    let size = if cfg.quick { 256 * MIB } else { GIB };
    let cap = Duration::from_secs(if cfg.quick { 6 } else { 25 });
    println!(
        "[3a] background copy at rate 150 (2 GiB/s cap) of a {} MiB volume of non-zero data \
         vs a plain file copy of its backing file; dir [{}] {}",
        size / MIB,
        place.label,
        place.fs
    );
    let (dir, pool) = open_pool(&place.base)?;
    let src = pool.create_volume("src", size)?;
    fill(&pool, src, size, 0xF111)?;
    let src_file = dir.path().join("volumes").join(format!("{}.img", src.0));
    let peer_src = if src_file.is_file() {
        src_file
    } else {
        // The backend's naming changed: make an equal file by reading the volume.
        let p = dir.path().join("peer-src.img");
        let mut f = File::create(&p)?;
        let mut buf = vec![0u8; MIB as usize];
        let mut off = 0;
        while off < size {
            pool.read(src, off, &mut buf)?;
            f.write_all(&buf)?;
            off += MIB;
        }
        f.sync_all()?;
        p
    };
    let peer_dst = dir.path().join("peer-dst.img");
    let has_cp = std::process::Command::new("cp")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    // The variants, measured interleaved; each repetition starts with a different one.
    #[derive(Clone, Copy, PartialEq)]
    enum V {
        IoCopy,
        Cp,
        Rw,
        Fc(GrainSize),
    }
    let mut variants = vec![
        V::IoCopy,
        V::Fc(GrainSize::K256),
        V::Rw,
        V::Fc(GrainSize::K64),
    ];
    if has_cp {
        variants.insert(2, V::Cp);
    }
    let mut res: Vec<(Vec<f64>, bool)> = variants.iter().map(|_| (Vec::new(), false)).collect();
    for rep in 0..cfg.reps {
        for k in 0..variants.len() {
            let i = (k + rep) % variants.len();
            let (bytes, d, capped) = match variants[i] {
                V::IoCopy => {
                    let (n, d) = peer_io_copy(&peer_src, &peer_dst)?;
                    (n, d, false)
                }
                V::Cp => {
                    let (n, d) = peer_cp(&peer_src, &peer_dst)?;
                    (n, d, false)
                }
                V::Rw => {
                    let (n, d) = peer_rw_copy(&peer_src, &peer_dst)?;
                    (n, d, false)
                }
                V::Fc(g) => top_rate_copy(&pool, src, size, g, &format!("top{rep}-{k}"), cap)?,
            };
            res[i].0.push(mibs(bytes, d));
            res[i].1 |= capped;
        }
    }
    let med = |v: V| {
        variants
            .iter()
            .position(|x| *x == v)
            .map_or(f64::NAN, |i| median(&res[i].0))
    };
    let peer = med(V::IoCopy);
    let rw = med(V::Rw);
    let cp = med(V::Cp);
    let mut t = Table::new(&[
        "what",
        "MiB/s",
        "(min-max)",
        "ratio to io::copy",
        "ratio to cp",
        "ratio to 1 MiB r/w",
    ]);
    for (i, v) in variants.iter().enumerate() {
        let name = match v {
            V::IoCopy => "peer: std::io::copy + fsync".to_string(),
            V::Cp => "peer: cp --sparse=never + fsync".to_string(),
            V::Rw => "peer: 1 MiB read/write + fsync".to_string(),
            V::Fc(g) => format!(
                "run_copy rate 150, {} KiB grains{}",
                g.bytes() / KIB,
                star(res[i].1)
            ),
        };
        let x = median(&res[i].0);
        t.row(vec![
            name,
            f1(x),
            spread(&res[i].0),
            f2(x / peer),
            f2(x / cp),
            f2(x / rw),
        ]);
    }
    t.print();
    let cap_mibs = rate_bytes_per_sec(150) as f64 / MIB as f64;
    let bound = cap_mibs / peer;
    println!(
        "    target: run_copy / plain copy >= 0.90; the rate-150 limit of {cap_mibs:.0} MiB/s {}",
        if bound < 1.0 {
            format!("alone bounds the ratio to io::copy at {} here", f2(bound))
        } else {
            "is above the peer here (not binding)".to_string()
        }
    );
    if res.iter().any(|r| r.1) {
        println!(
            "    * did not finish within the {} s cap: MiB/s of the part copied",
            cap.as_secs()
        );
    }
    println!();
    drop(pool);
    drop(dir);
    if rates_too {
        bench_rates(cfg, place)?;
    }
    Ok(())
}

fn bench_rates(cfg: &Cfg, place: &Place) -> Result<()> {
    let window = Duration::from_secs(if cfg.quick { 2 } else { 4 });
    let rates: [u8; 5] = [50, 60, 70, 80, 90];
    let top = rate_bytes_per_sec(*rates.iter().max().unwrap());
    // Large enough that no mapping can finish inside the window.
    let size = (top * window.as_secs() * 2)
        .next_power_of_two()
        .max(64 * MIB);
    println!(
        "[3b] rate accuracy: run_copy with a {} s deadline, 64 KiB grains, {} MiB volume, the \
         {} rates run concurrently (one thread each); dir [{}] {}",
        window.as_secs(),
        size / MIB,
        rates.len(),
        place.label,
        place.fs
    );
    let (_dir, pool) = open_pool(&place.base)?;
    let src = pool.create_volume("src", size)?;
    fill(&pool, src, size, 0xA7E)?;
    let mut got: Vec<Vec<f64>> = rates.iter().map(|_| Vec::new()).collect();
    let mut prog: Vec<Vec<f64>> = rates.iter().map(|_| Vec::new()).collect();
    for rep in 0..cfg.reps {
        let mut maps = Vec::new();
        for &r in &rates {
            let t = pool.create_volume(&format!("rate{rep}-{r}"), size)?;
            let m = pool.create_mapping(spec(src, t, GrainSize::K64, r, false))?;
            pool.start_mapping(m, true, false)?;
            maps.push(m);
        }
        let res: Vec<Result<(u64, Duration)>> = std::thread::scope(|s| {
            let hs: Vec<_> = maps
                .iter()
                .map(|&m| {
                    let pool = &pool;
                    s.spawn(move || -> Result<(u64, Duration)> {
                        let t0 = Instant::now();
                        let b = pool.run_copy(m, Some(t0 + window))?;
                        Ok((b, t0.elapsed()))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("copy thread panicked"))
                .collect()
        });
        for (i, r) in res.into_iter().enumerate() {
            let (b, d) = r?;
            got[i].push(b as f64 / d.as_secs_f64());
            let e = pool.engine();
            if let Some(m) = e.mapping(maps[i]) {
                let gb = m.grain.bytes() as f64;
                prog[i].push(m.split_count() as f64 * gb / d.as_secs_f64());
            }
        }
    }
    let mut t = Table::new(&[
        "rate",
        "table",
        "achieved (bytes returned)",
        "deviation",
        "achieved (split grains)",
        "deviation",
    ]);
    for (i, &r) in rates.iter().enumerate() {
        let want = rate_bytes_per_sec(r) as f64;
        let a = median(&got[i]);
        let p = median(&prog[i]);
        let kib = |x: f64| format!("{:.0} KiB/s", x / KIB as f64);
        t.row(vec![
            r.to_string(),
            kib(want),
            kib(a),
            format!("{:+.1} %", (a - want) / want * 100.0),
            kib(p),
            format!("{:+.1} %", (p - want) / want * 100.0),
        ]);
    }
    t.print();
    println!("    target: within ±10 % of the table (FLASHCOPY.md §5.1)");
    println!();
    Ok(())
}

fn main() -> Result<()> {
    let cfg = Cfg::from_args();
    let places = places(&cfg);
    env_report(&cfg, &places);
    let t0 = Instant::now();
    for (i, p) in places.iter().enumerate() {
        if cfg.cow {
            bench_cow(&cfg, p)?;
        }
        // Bitmap memory does not depend on the file system: measure it once.
        if cfg.bitmap && i == 0 {
            bench_bitmap(p)?;
        }
        if cfg.copy {
            bench_copy(&cfg, p, true)?;
        }
    }
    println!("total time: {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

//! The embedded default: a walk through FlashCopy on a local data directory, and an
//! `lsfcmap`-style listing of what a data directory holds.

use crate::cli::Output;
use crate::engine::{Engine, GrainSize, MapId, MapState, MappingSpec, VolId};
use crate::fc::output::{LSFCMAP_COLUMNS, table};
use crate::volume::{Pool, PoolConfig};
use anyhow::{Context, bail, ensure};
use std::path::Path;
use std::time::Instant;

const CHUNK: u64 = 1 << 20;

/// Deterministic, incompressible content: which write (`tag`) put which byte where.
fn pattern(tag: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i) / 8;
            let h = (x ^ u64::from(tag) << 56).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (h >> ((offset + i) % 8 * 8)) as u8
        })
        .collect()
}

fn fill(pool: &Pool, vol: VolId, tag: u8, from: u64, to: u64) -> anyhow::Result<()> {
    let mut off = from;
    while off < to {
        let len = CHUNK.min(to - off);
        pool.write(vol, off, &pattern(tag, off, len as usize))?;
        off += len;
    }
    pool.flush(vol)?;
    Ok(())
}

/// Checks that `vol` holds `tag`'s pattern on each of `ranges`.
fn verify(pool: &Pool, vol: VolId, ranges: &[(u8, u64, u64)]) -> anyhow::Result<()> {
    let name = pool
        .engine()
        .volume(vol)
        .map(|v| v.name.clone())
        .unwrap_or_default();
    let mut buf = vec![0u8; CHUNK as usize];
    for &(tag, from, to) in ranges {
        let mut off = from;
        while off < to {
            let len = CHUNK.min(to - off) as usize;
            pool.read(vol, off, &mut buf[..len])?;
            ensure!(
                buf[..len] == pattern(tag, off, len)[..],
                "{name}: bytes at {off}..{} are not what write {tag} put there",
                off + len as u64
            );
            off += len as u64;
        }
    }
    println!("  verified {name}: {}", describe(ranges));
    Ok(())
}

fn describe(ranges: &[(u8, u64, u64)]) -> String {
    ranges
        .iter()
        .map(|(t, a, b)| format!("write {} at {}-{} MiB", *t as char, a >> 20, b >> 20))
        .collect::<Vec<_>>()
        .join(", ")
}

fn snapshot_spec(src: VolId, tgt: VolId, name: &str) -> MappingSpec {
    let mut spec = MappingSpec::snapshot(src, tgt);
    spec.name = Some(name.into());
    spec.grain = Some(GrainSize::K64);
    spec
}

/// Runs the demo; every step is verified, and any difference is an error.
pub fn run(dir: &Path, size: u64) -> anyhow::Result<()> {
    ensure!(
        size >= 2 * CHUNK && size.is_multiple_of(CHUNK),
        "--size-mib must be at least 2"
    );
    let pool = Pool::open_dir(dir, PoolConfig::default())
        .with_context(|| format!("opening {}", dir.display()))?;
    let run = 1 + pool
        .engine()
        .volumes()
        .filter(|v| v.name.ends_with("-data"))
        .count();
    let n = |s: &str| format!("run{run}-{s}");
    let half = size / 2;
    println!(
        "flashcopy-csi demo in {} (run {run}, volumes of {} MiB)",
        dir.display(),
        size >> 20
    );

    println!("1. two volumes, as a database would have: data and log");
    let data = pool.create_volume(&n("data"), size)?;
    let log = pool.create_volume(&n("log"), size)?;
    fill(&pool, data, b'A', 0, size)?;
    fill(&pool, log, b'A', 0, size)?;

    println!(
        "2. a snapshot of data (FlashCopy mapping, copy rate 0): ready at once, whatever the size"
    );
    let snap = pool.create_volume(&n("data-snap"), size)?;
    let m = pool.create_mapping(snapshot_spec(data, snap, &n("snap")))?;
    let t = Instant::now();
    let report = pool.start_mapping(m, true, false)?;
    println!(
        "  started in {:?} (I/O paused {:?})",
        t.elapsed(),
        report.pause
    );
    fill(&pool, data, b'B', 0, half)?;
    verify(&pool, data, &[(b'B', 0, half), (b'A', half, size)])?;
    verify(&pool, snap, &[(b'A', 0, size)])?;

    println!("3. a consistency-group snapshot of data and log: one instant for both");
    let g = pool.create_group(Some(&n("grp")), false)?;
    let mut members = Vec::new();
    for (src, s) in [(data, "data-g"), (log, "log-g")] {
        let tgt = pool.create_volume(&n(s), size)?;
        let mut spec = snapshot_spec(src, tgt, &n(&format!("{s}-map")));
        spec.group = Some(g);
        members.push((pool.create_mapping(spec)?, tgt));
    }
    let report = pool.start_group(g, true, false)?;
    println!("  group started, I/O paused {:?}", report.pause);
    fill(&pool, log, b'C', 0, half)?;
    fill(&pool, data, b'C', half, size)?;
    verify(&pool, members[0].1, &[(b'B', 0, half), (b'A', half, size)])?;
    verify(&pool, members[1].1, &[(b'A', 0, size)])?;

    println!("4. restore data in place from the first snapshot (reverse mapping, --restore)");
    let back = pool.create_mapping(snapshot_spec(snap, data, &n("restore")))?;
    pool.start_mapping(back, true, true)?;
    verify(&pool, data, &[(b'A', 0, size)])?;
    println!("  the group snapshot still reads its own point in time:");
    verify(&pool, members[0].1, &[(b'B', 0, half), (b'A', half, size)])?;

    println!("5. a clone of the group's data image by background copy (copy rate 100, autodelete)");
    let clone = pool.create_volume(&n("data-clone"), size)?;
    let mut spec = snapshot_spec(members[0].1, clone, &n("clone"));
    spec.copy_rate = 100;
    spec.autodelete = true;
    let cm = pool.create_mapping(spec)?;
    pool.start_mapping(cm, true, false)?;
    let t = Instant::now();
    let bytes = pool.run_copy(cm, None)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  copied {} MiB in {secs:.2} s ({:.0} MiB/s at rate 100 = 64 MiB/s)",
        bytes >> 20,
        (bytes >> 20) as f64 / secs
    );
    ensure!(
        pool.engine().mapping(cm).is_none(),
        "the clone mapping should have deleted itself"
    );
    verify(&pool, clone, &[(b'B', 0, half), (b'A', half, size)])?;

    println!();
    print!("{}", lsfcmap(&pool.engine()));
    println!("\ndemo OK: every volume read back exactly its point in time");
    Ok(())
}

/// Lists the data directory's mappings, groups and volumes.
pub fn ls(dir: &Path, output: Output) -> anyhow::Result<()> {
    if !dir.join("meta").exists() {
        bail!(
            "{} holds no flashcopy-csi data (no meta/ directory)",
            dir.display()
        );
    }
    let pool = Pool::open_dir(dir, PoolConfig::default())?;
    let e = pool.engine();
    match output {
        Output::Table => print!("{}", lsfcmap(&e)),
        Output::Json => {
            for m in e.mappings() {
                println!("{}", mapping_json(&e, m.id));
            }
        }
    }
    Ok(())
}

fn vol_name(e: &Engine, v: VolId) -> String {
    e.volume(v)
        .map_or_else(|| v.to_string(), |v| v.name.clone())
}

fn mapping_json(e: &Engine, id: MapId) -> String {
    let m = e.mapping(id).expect("listed mapping exists");
    let group = m.group.and_then(|g| e.group(g)).map(|g| g.name.clone());
    format!(
        r#"{{"id":{},"name":{:?},"source":{:?},"target":{:?},"group":{},"state":"{}","progress":{},"copy_rate":{},"clean_rate":{},"grain_kib":{},"incremental":{},"autodelete":{},"start_time":{}}}"#,
        m.id.0,
        m.name,
        vol_name(e, m.source),
        vol_name(e, m.target),
        group.map_or("null".into(), |g| format!("{g:?}")),
        m.state,
        m.progress(),
        m.copy_rate,
        m.clean_rate,
        m.grain,
        m.incremental,
        m.autodelete,
        m.start_time.map_or("null".into(), |t| t.to_string()),
    )
}

/// Aligned `lsfcmap`-style table of every mapping.
pub fn lsfcmap(e: &Engine) -> String {
    let yes = |b: bool| if b { "on" } else { "off" }.to_string();
    let rows: Vec<Vec<String>> = e
        .mappings()
        .map(|m| {
            let group = m
                .group
                .and_then(|g| e.group(g))
                .map_or(String::new(), |g| g.name.clone());
            let restoring = if m.restoring && m.state == MapState::Copying {
                " (restoring)"
            } else {
                ""
            };
            vec![
                m.id.0.to_string(),
                m.name.clone(),
                vol_name(e, m.source),
                vol_name(e, m.target),
                group,
                m.state.to_string() + restoring,
                m.progress().to_string(),
                m.copy_rate.to_string(),
                m.clean_rate.to_string(),
                m.grain.to_string(),
                yes(m.incremental),
                yes(m.autodelete),
                m.start_time.map_or(String::new(), |t| t.to_string()),
            ]
        })
        .collect();
    table(&LSFCMAP_COLUMNS, &rows)
}

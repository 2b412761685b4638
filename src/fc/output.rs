//! How `fc` shows things: aligned tables with IBM-like columns, detailed key/value views, JSON
//! objects, sizes, times and the progress bar of `wait`.

use crate::proto::agent::v1 as pb;
use serde_json::{Value, json};
use std::io::Write;

/// The columns of `lsfcmap` listings, IBM's order.
pub const LSFCMAP_COLUMNS: [&str; 13] = [
    "id",
    "name",
    "source",
    "target",
    "group",
    "state",
    "progress",
    "copy_rate",
    "clean_rate",
    "grain",
    "incremental",
    "autodelete",
    "start_time",
];

/// An aligned table: a header row and data rows, columns separated by one space at least.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([headers[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let l: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(l.join(" ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// A detailed view: one `key value` line per field, values aligned.
pub fn detail(fields: &[(&str, String)]) -> String {
    let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    fields
        .iter()
        .map(|(k, v)| format!("{k:<w$} {v}").trim_end().to_string() + "\n")
        .collect()
}

/// A byte count as IBM shows capacities: `64.00MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.2}{}", UNITS[u])
    }
}

/// Parses a size: a number of bytes, or a number with a binary unit (`k`, `m`, `g`, `t`, with
/// an optional `i`/`ib`/`b`: `64m`, `1GiB`, `512K`). Decimal fractions are allowed with a unit.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        "t" | "tb" | "ti" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: use bytes or a unit like 64M, 1G, 1GiB"
            ));
        }
    };
    let bad = || format!("invalid size {s:?}: use bytes or a unit like 64M, 1G, 1GiB");
    // Exact decimal arithmetic: a fraction must come to whole bytes ("1.5k"), and binary
    // floating point would silently round one that does not ("1.00000000000000001G").
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let frac = frac.trim_end_matches('0');
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(bad());
    }
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let mut bytes = whole.checked_mul(mult).ok_or_else(bad)?;
    if !frac.is_empty() {
        // digits / 10^k * mult, with mult a power of two: whole only if 5^k divides the
        // digits and 2^k what is left times mult. k <= 40 for any whole result (mult <= 2^40).
        let k = u32::try_from(frac.len()).map_err(|_| bad())?;
        if k > 38 {
            return Err(bad());
        }
        let digits: u128 = frac.parse().map_err(|_| bad())?;
        let five = 5u128.pow(k);
        if !digits.is_multiple_of(five) {
            return Err(bad());
        }
        // digits / 5^k < 2^k <= 2^38, times mult <= 2^40: fits.
        let scaled = digits / five * u128::from(mult);
        if !scaled.is_multiple_of(1u128 << k) {
            return Err(bad());
        }
        let extra = u64::try_from(scaled >> k).map_err(|_| bad())?;
        bytes = bytes.checked_add(extra).ok_or_else(bad)?;
    }
    Ok(bytes)
}

/// IBM's time format (`YYMMDDHHMMSS`, UTC here) of unix seconds.
pub fn ibm_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{:02}{m:02}{d:02}{:02}{:02}{:02}",
        y.rem_euclid(100),
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// IBM's spelling of a mapping state.
pub fn map_state(s: i32) -> &'static str {
    match pb::MappingState::try_from(s).unwrap_or_default() {
        pb::MappingState::Unspecified => "unknown",
        pb::MappingState::IdleOrCopied => "idle_or_copied",
        pb::MappingState::Preparing => "preparing",
        pb::MappingState::Prepared => "prepared",
        pb::MappingState::Copying => "copying",
        pb::MappingState::Stopping => "stopping",
        pb::MappingState::Stopped => "stopped",
        pb::MappingState::Suspended => "suspended",
    }
}

/// IBM's spelling of a group state.
pub fn group_state(s: i32) -> &'static str {
    match pb::GroupState::try_from(s).unwrap_or_default() {
        pb::GroupState::Unspecified => "unknown",
        pb::GroupState::Empty => "empty",
        pb::GroupState::IdleOrCopied => "idle_or_copied",
        pb::GroupState::Preparing => "preparing",
        pb::GroupState::Prepared => "prepared",
        pb::GroupState::Copying => "copying",
        pb::GroupState::Stopping => "stopping",
        pb::GroupState::Stopped => "stopped",
        pb::GroupState::Suspended => "suspended",
    }
}

fn on_off(b: bool) -> String {
    if b { "on" } else { "off" }.into()
}

fn opt_time(t: Option<u64>) -> String {
    t.map_or(String::new(), ibm_time)
}

fn ids(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn status(v: &pb::Volume) -> &'static str {
    if v.offline_reason.is_empty() {
        "online"
    } else {
        "offline"
    }
}

/// `lsvol` table.
pub fn volumes_table(vols: &[pb::Volume]) -> String {
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.id.to_string(),
                v.name.clone(),
                size(v.size_bytes),
                v.mappings.len().to_string(),
                status(v).into(),
                v.nbd_export.clone(),
            ]
        })
        .collect();
    table(
        &[
            "id",
            "name",
            "capacity",
            "fc_map_count",
            "status",
            "nbd_export",
        ],
        &rows,
    )
}

/// `lsvol VOL` detailed view.
pub fn volume_detail(v: &pb::Volume) -> String {
    detail(&[
        ("id", v.id.to_string()),
        ("name", v.name.clone()),
        ("capacity", size(v.size_bytes)),
        ("capacity_bytes", v.size_bytes.to_string()),
        ("status", status(v).into()),
        ("offline_reason", v.offline_reason.clone()),
        ("nbd_export", v.nbd_export.clone()),
        ("fc_map_count", v.mappings.len().to_string()),
        ("fc_map_ids", ids(&v.mappings)),
    ])
}

/// A volume as JSON.
pub fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "size_bytes": v.size_bytes,
        "status": status(v),
        "offline_reason": (!v.offline_reason.is_empty()).then_some(&v.offline_reason),
        "nbd_export": v.nbd_export,
        "mappings": v.mappings,
    })
}

/// `lsfcmap` table.
pub fn mappings_table(maps: &[pb::Mapping]) -> String {
    let rows: Vec<Vec<String>> = maps
        .iter()
        .map(|m| {
            let mut state = map_state(m.state).to_string();
            if m.restoring && m.state == pb::MappingState::Copying as i32 {
                state.push_str("(restoring)");
            }
            vec![
                m.id.to_string(),
                m.name.clone(),
                m.source_name.clone(),
                m.target_name.clone(),
                m.group_name.clone(),
                state,
                m.progress.to_string(),
                m.copy_rate.to_string(),
                m.clean_rate.to_string(),
                m.grain_kib.to_string(),
                on_off(m.incremental),
                on_off(m.autodelete),
                opt_time(m.start_time),
            ]
        })
        .collect();
    table(&LSFCMAP_COLUMNS, &rows)
}

/// `lsfcmap MAP` detailed view.
pub fn mapping_detail(m: &pb::Mapping) -> String {
    detail(&[
        ("id", m.id.to_string()),
        ("name", m.name.clone()),
        ("source_vdisk_id", m.source_id.to_string()),
        ("source_vdisk_name", m.source_name.clone()),
        ("target_vdisk_id", m.target_id.to_string()),
        ("target_vdisk_name", m.target_name.clone()),
        (
            "group_id",
            m.group_id.map_or(String::new(), |g| g.to_string()),
        ),
        ("group_name", m.group_name.clone()),
        ("status", map_state(m.state).into()),
        ("progress", m.progress.to_string()),
        ("copy_rate", m.copy_rate.to_string()),
        ("clean_rate", m.clean_rate.to_string()),
        ("grain_size", m.grain_kib.to_string()),
        ("incremental", on_off(m.incremental)),
        ("autodelete", on_off(m.autodelete)),
        ("restoring", if m.restoring { "yes" } else { "no" }.into()),
        ("complete", if m.complete { "yes" } else { "no" }.into()),
        ("start_time", opt_time(m.start_time)),
        ("grains", m.grains.to_string()),
        ("split_grains", m.split_grains.to_string()),
        ("dependent_mappings", ids(&m.dependent_mappings)),
    ])
}

/// A mapping as JSON.
pub fn mapping_json(m: &pb::Mapping) -> Value {
    json!({
        "id": m.id,
        "name": m.name,
        "source_id": m.source_id,
        "source": m.source_name,
        "target_id": m.target_id,
        "target": m.target_name,
        "group_id": m.group_id,
        "group": m.group_id.map(|_| &m.group_name),
        "state": map_state(m.state),
        "progress": m.progress,
        "copy_rate": m.copy_rate,
        "clean_rate": m.clean_rate,
        "grain_kib": m.grain_kib,
        "incremental": m.incremental,
        "autodelete": m.autodelete,
        "restoring": m.restoring,
        "complete": m.complete,
        "start_time": m.start_time,
        "grains": m.grains,
        "split_grains": m.split_grains,
        "dependent_mappings": m.dependent_mappings,
    })
}

/// `lsfcconsistgrp` table.
pub fn groups_table(groups: &[pb::Group]) -> String {
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.id.to_string(),
                g.name.clone(),
                group_state(g.state).into(),
                g.members.len().to_string(),
                on_off(g.autodelete),
                opt_time(g.start_time),
            ]
        })
        .collect();
    table(
        &[
            "id",
            "name",
            "state",
            "mappings",
            "autodelete",
            "start_time",
        ],
        &rows,
    )
}

/// `lsfcconsistgrp GRP` detailed view, followed by its mappings.
pub fn group_detail(g: &pb::Group, members: &[pb::Mapping]) -> String {
    let mut out = detail(&[
        ("id", g.id.to_string()),
        ("name", g.name.clone()),
        ("status", group_state(g.state).into()),
        ("autodelete", on_off(g.autodelete)),
        ("start_time", opt_time(g.start_time)),
    ]);
    for m in members {
        out.push_str(&detail(&[
            ("FC_mapping_id", m.id.to_string()),
            ("FC_mapping_name", m.name.clone()),
        ]));
    }
    out
}

/// A group as JSON.
pub fn group_json(g: &pb::Group) -> Value {
    json!({
        "id": g.id,
        "name": g.name,
        "state": group_state(g.state),
        "autodelete": g.autodelete,
        "mappings": g.members,
        "start_time": g.start_time,
    })
}

/// An event as one line of text.
pub fn event_line(e: &pb::Event) -> String {
    use pb::event::Kind;
    let what = match &e.kind {
        Some(Kind::MappingState(c)) => format!(
            "fcmap {} {} -> {}",
            c.mapping,
            map_state(c.from),
            map_state(c.to)
        ),
        Some(Kind::MappingDeleted(d)) => format!("fcmap {} deleted", d.mapping),
        Some(Kind::GroupDeleted(d)) => format!("fcconsistgrp {} deleted", d.group),
        Some(Kind::Started(s)) => match (s.mapping, s.group) {
            (_, Some(g)) => format!("fcconsistgrp {g} started, I/O paused {} us", s.pause_micros),
            (Some(m), None) => format!("fcmap {m} started, I/O paused {} us", s.pause_micros),
            (None, None) => format!("started, I/O paused {} us", s.pause_micros),
        },
        Some(Kind::CopyFailed(f)) => format!("fcmap {} copy failed: {}", f.mapping, f.message),
        Some(Kind::Created(c)) => match (c.mapping, c.group) {
            (Some(m), _) => format!("fcmap {m} created"),
            (None, Some(g)) => format!("fcconsistgrp {g} created"),
            (None, None) => "created".into(),
        },
        None => "unknown event".into(),
    };
    format!("{} {what}", e.seq)
}

/// An event as JSON.
pub fn event_json(e: &pb::Event) -> Value {
    use pb::event::Kind;
    let (kind, body) = match &e.kind {
        Some(Kind::MappingState(c)) => (
            "mapping_state",
            json!({"mapping": c.mapping, "from": map_state(c.from), "to": map_state(c.to)}),
        ),
        Some(Kind::MappingDeleted(d)) => ("mapping_deleted", json!({"mapping": d.mapping})),
        Some(Kind::GroupDeleted(d)) => ("group_deleted", json!({"group": d.group})),
        Some(Kind::Started(s)) => (
            "started",
            json!({"mapping": s.mapping, "group": s.group, "pause_micros": s.pause_micros}),
        ),
        Some(Kind::Created(c)) => ("created", json!({"mapping": c.mapping, "group": c.group})),
        Some(Kind::CopyFailed(f)) => (
            "copy_failed",
            json!({"mapping": f.mapping, "message": f.message}),
        ),
        None => ("unknown", json!({})),
    };
    json!({"seq": e.seq, "time_millis": e.time_millis, "kind": kind, "event": body})
}

/// A one-line progress bar redrawn in place on a terminal.
#[derive(Debug)]
pub struct ProgressBar {
    enabled: bool,
    drawn: bool,
}

impl ProgressBar {
    /// A bar on stderr, drawn only if stderr is a terminal.
    pub fn new() -> Self {
        use std::io::IsTerminal;
        Self {
            enabled: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// Redraws: `label state [#####.....]  45%  28.80/64.00MiB`.
    pub fn draw(&mut self, label: &str, state: &str, percent: u32, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        const WIDTH: usize = 30;
        let filled = (percent.min(100) as usize * WIDTH) / 100;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K{label} {state} [{}{}] {percent:>3}%  {}/{}",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            size(done),
            size(total)
        );
        let _ = err.flush();
        self.drawn = true;
    }

    /// Clears the bar.
    pub fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

impl Default for ProgressBar {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("2 mb"), Ok(2 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1.5").is_err());
        assert_eq!(parse_size("0.25g"), Ok(1 << 28));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("1.50M"), Ok(3 << 19));
        assert_eq!(
            parse_size("16777215.999999940395355224609375T"),
            Ok(u64::MAX - (1 << 16) + 1)
        );
        // Not whole bytes, though binary floating point rounds them to whole numbers (the
        // parser used f64 until fuzzing found it).
        assert!(parse_size("1.00000000000000001G").is_err());
        assert_eq!(parse_size("4503599627370496.5k"), Ok((1 << 62) + 512));
        assert!(parse_size("16777216T").is_err());
        assert!(parse_size(".").is_err());
        assert!(parse_size("1.2.3k").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(size(64 << 20), "64.00MiB");
        assert_eq!(size(100), "100B");
    }

    #[test]
    fn times() {
        assert_eq!(ibm_time(0), "700101000000");
        // 2024-02-29 12:34:56 UTC
        assert_eq!(ibm_time(1_709_210_096), "240229123456");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["id", "name"],
            &[vec!["1".into(), "a".into()], vec!["10".into(), "bb".into()]],
        );
        assert_eq!(t, "id name\n1  a\n10 bb\n");
    }
}

/// Listing formats (`fc -o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// JSON.
    Json,
}

//! `agent --metrics-listen`: what a Prometheus scrape shows after real NBD I/O from `qemu-io`,
//! snapshots and group starts, and that bad HTTP requests get 4xx and change nothing.

mod agent_common;
mod skip;

use agent_common::{Agent, http_raw, metric, scrape};
use flashcopy_csi::agent::Config;
use skip::have;
use std::collections::BTreeMap;
use std::process::Command;

const STATES: [&str; 7] = [
    "idle_or_copied",
    "preparing",
    "prepared",
    "copying",
    "stopping",
    "stopped",
    "suspended",
];

fn qemu_io(a: &Agent, export: &str, cmds: &[&str]) {
    let uri = format!(
        "nbd+unix:///{export}?socket={}",
        a.cfg.nbd_socket_path().display()
    );
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.arg(&uri).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!("$ qemu-io {cmds:?} {uri}\n{text}");
    assert!(o.status.success(), "{text}");
    assert!(!text.contains("fail") && !text.contains("error"), "{text}");
}

fn states(m: &BTreeMap<String, f64>, family: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in STATES.iter().chain(if family == "flashcopy_groups" {
        &["empty"][..]
    } else {
        &[][..]
    }) {
        out.insert(
            s.to_string(),
            metric(m, &format!("{family}{{state=\"{s}\"}}")),
        );
    }
    out
}

fn only(state: &str, n: f64, extra: &[&str]) -> BTreeMap<String, f64> {
    STATES
        .iter()
        .chain(extra)
        .map(|s| (s.to_string(), if *s == state { n } else { 0.0 }))
        .collect()
}

fn io(m: &BTreeMap<String, f64>, what: &str, op: &str) -> f64 {
    metric(m, &format!("flashcopy_io_{what}{{op=\"{op}\"}}"))
}

#[test]
fn scrape_after_nbd_io_snapshots_and_group_starts() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let addr = agent_common::free_local_addr();
    let a = Agent::start_with(Config {
        metrics_listen: Some(addr),
        ..Config::new(dir.path())
    });
    for v in ["src", "snap", "db", "db-s"] {
        a.fc_ok(&["mkvol", v, "4M"]);
    }

    let m0 = scrape(addr);
    assert_eq!(metric(&m0, "flashcopy_volumes"), 4.0);
    assert_eq!(states(&m0, "flashcopy_mappings"), only("", 0.0, &[]));
    assert_eq!(states(&m0, "flashcopy_groups"), only("", 0.0, &["empty"]));
    for op in ["read", "write", "flush", "trim", "write_zeroes"] {
        assert_eq!(io(&m0, "requests_total", op), 0.0, "{op}");
        assert_eq!(io(&m0, "bytes_total", op), 0.0, "{op}");
        assert_eq!(io(&m0, "errors_total", op), 0.0, "{op}");
    }

    // Exports are named by volume id: src=1, snap=2, db=3, db-s=4.
    qemu_io(&a, "1", &["write -P 0x11 0 1M", "write -P 0x12 1M 1M"]);
    let m1 = scrape(addr);
    assert_eq!(io(&m1, "bytes_total", "write"), (2 << 20) as f64);
    let writes = io(&m1, "requests_total", "write");
    assert!(writes >= 2.0, "{writes}");
    assert_eq!(
        metric(&m1, "flashcopy_io_duration_seconds_count{op=\"write\"}"),
        writes,
        "every request is timed"
    );
    assert_eq!(
        metric(
            &m1,
            "flashcopy_io_duration_seconds_bucket{op=\"write\",le=\"+Inf\"}"
        ),
        writes
    );
    assert!(metric(&m1, "flashcopy_io_duration_seconds_sum{op=\"write\"}") > 0.0);
    assert_eq!(
        metric(
            &m1,
            "flashcopy_copied_grains_total{reason=\"copy_on_write\"}"
        ),
        0.0,
        "no snapshot yet"
    );

    // A snapshot (copy rate 0, 64 KiB grains): one mapping copying, one start paused I/O.
    a.fc_ok(&[
        "mkfcmap",
        "--source",
        "src",
        "--target",
        "snap",
        "--copyrate",
        "0",
        "--grainsize",
        "64",
    ]);
    let m2 = scrape(addr);
    assert_eq!(
        states(&m2, "flashcopy_mappings"),
        only("idle_or_copied", 1.0, &[])
    );
    a.fc_ok(&["startfcmap", "--prep", "fcmap1"]);
    let m3 = scrape(addr);
    assert_eq!(states(&m3, "flashcopy_mappings"), only("copying", 1.0, &[]));
    assert_eq!(
        metric(&m3, "flashcopy_start_pause_seconds_count{kind=\"mapping\"}"),
        1.0
    );
    assert_eq!(
        metric(&m3, "flashcopy_start_pause_seconds_count{kind=\"group\"}"),
        0.0
    );

    // Writes after the snapshot: first writes to grains 0, 3, 16, 17 and 48 copy them once
    // each (the second write to grain 0 copies nothing).
    let after = [
        "write -P 0x22 0 4k",
        "write -P 0x22 8k 4k",
        "write -P 0x22 200k 4k",
        "write -P 0x22 1M 128k",
        "write -P 0x22 3M 4k",
    ];
    qemu_io(&a, "1", &after);
    let m4 = scrape(addr);
    assert_eq!(
        metric(
            &m4,
            "flashcopy_copied_grains_total{reason=\"copy_on_write\"}"
        ),
        5.0
    );
    assert_eq!(
        io(&m4, "bytes_total", "write") - io(&m1, "bytes_total", "write"),
        (4 * 4096 + 128 * 1024) as f64
    );
    assert_eq!(
        io(&m4, "requests_total", "write") - io(&m1, "requests_total", "write"),
        5.0
    );
    // The snapshot still reads as before; reads are counted.
    qemu_io(&a, "2", &["read -P 0x11 0 1M", "read -P 0x12 1M 1M"]);
    let m5 = scrape(addr);
    assert_eq!(io(&m5, "bytes_total", "read"), (2 << 20) as f64);
    assert!(io(&m5, "requests_total", "read") >= 2.0);

    // Flush, trim and write zeroes are counted by their own names.
    qemu_io(&a, "3", &["flush", "discard 0 64k", "write -z 64k 64k"]);
    let m6 = scrape(addr);
    assert!(io(&m6, "requests_total", "flush") >= 1.0);
    assert_eq!(io(&m6, "requests_total", "trim"), 1.0);
    assert_eq!(io(&m6, "bytes_total", "trim"), 65536.0);
    assert_eq!(io(&m6, "requests_total", "write_zeroes"), 1.0);
    assert_eq!(io(&m6, "bytes_total", "write_zeroes"), 65536.0);
    for op in ["read", "write", "flush", "trim", "write_zeroes"] {
        assert_eq!(io(&m6, "errors_total", op), 0.0, "{op}");
    }

    // A consistency group start: counted as a group pause; the group shows as copying.
    a.fc_ok(&["mkfcconsistgrp", "--name", "cg"]);
    let m7 = scrape(addr);
    assert_eq!(
        states(&m7, "flashcopy_groups"),
        only("empty", 1.0, &["empty"])
    );
    a.fc_ok(&[
        "mkfcmap",
        "--source",
        "db",
        "--target",
        "db-s",
        "--copyrate",
        "0",
        "--consistgrp",
        "cg",
    ]);
    a.fc_ok(&["startfcconsistgrp", "--prep", "cg"]);
    let m8 = scrape(addr);
    assert_eq!(states(&m8, "flashcopy_mappings"), only("copying", 2.0, &[]));
    assert_eq!(
        states(&m8, "flashcopy_groups"),
        only("copying", 1.0, &["empty"])
    );
    assert_eq!(
        metric(&m8, "flashcopy_start_pause_seconds_count{kind=\"group\"}"),
        1.0
    );
    assert_eq!(
        metric(&m8, "flashcopy_start_pause_seconds_count{kind=\"mapping\"}"),
        1.0
    );
    // Histogram buckets are cumulative.
    let buckets: Vec<f64> = m8
        .iter()
        .filter(|(k, _)| k.starts_with("flashcopy_start_pause_seconds_bucket{kind=\"group\""))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(buckets.len(), 20);
    assert!(buckets.iter().all(|b| *b <= 1.0));
    assert_eq!(
        metric(
            &m8,
            "flashcopy_start_pause_seconds_bucket{kind=\"group\",le=\"10\"}"
        ),
        1.0,
        "a start pauses I/O for far less than 10 s"
    );

    // What Prometheus needs and nothing more: aggregate counts by a fixed vocabulary of labels;
    // no volume, mapping or group name or id (the endpoint has no authentication).
    let (_, raw) = agent_common::http_raw(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: agent\r\nAccept: text/plain\r\n\r\n",
    );
    let vols: serde_json::Value = serde_json::from_str(&a.fc_ok(&["-o", "json", "lsvol"])).unwrap();
    let names: Vec<String> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.len() >= 4, "{names:?}");
    for key in m8.keys() {
        let Some((_, labels)) = key.split_once('{') else {
            continue;
        };
        for pair in labels.trim_end_matches('}').split(',') {
            let (k, v) = pair.split_once('=').unwrap();
            assert!(
                ["op", "reason", "state", "kind", "le"].contains(&k),
                "label {k} in {key}"
            );
            assert!(!names.iter().any(|n| v.trim_matches('"') == n), "{key}");
        }
    }
    for n in &names {
        assert!(
            !raw.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
                .any(|w| w == n),
            "volume name {n:?} in the metrics"
        );
    }

    a.stop().unwrap();
}

#[test]
fn bad_http_requests_get_4xx_and_the_agent_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let addr = agent_common::free_local_addr();
    let a = Agent::start_with(Config {
        metrics_listen: Some(addr),
        ..Config::new(dir.path())
    });
    let (s, t) = http_raw(addr, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(s, 200);
    assert!(t.ends_with("\r\n\r\nok\n"), "{t:?}");

    let cases: [(&[u8], u16); 7] = [
        (
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            405,
        ),
        (b"DELETE / HTTP/1.1\r\n\r\n", 405),
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics/../etc HTTP/1.1\r\n\r\n", 404),
        (b"\x00\x01\x02\xff\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
    ];
    for (req, want) in cases {
        let (s, t) = http_raw(addr, req);
        assert_eq!(s, want, "{:?} -> {t}", String::from_utf8_lossy(req));
        assert!(t.contains("Connection: close"), "{t}");
        if want == 405 {
            assert!(t.contains("Allow: GET"), "{t}");
        }
    }
    // A head that never ends: refused once it passes the limit.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 20_000));
    let (s, _) = http_raw(addr, &huge);
    assert_eq!(s, 431);
    // Clients that connect and leave, or send half a request and leave.
    for partial in [&b""[..], b"GET /met"] {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.write_all(partial).unwrap();
        drop(c);
    }

    // Still serving: metrics, health and the agent API.
    a.fc_ok(&["mkvol", "v", "1M"]);
    let m = scrape(addr);
    assert_eq!(metric(&m, "flashcopy_volumes"), 1.0);
    assert_eq!(http_raw(addr, b"GET /healthz HTTP/1.0\r\n\r\n").0, 200);
    a.stop().unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the endpoint closes with the agent"
    );
}

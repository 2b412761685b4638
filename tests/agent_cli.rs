//! The real `flashcopy-csi fc` binary against an in-process agent: IBM verbs, aligned tables,
//! `-o json`, clear errors with a non-zero exit, `wait` on a clone, and NBD data through
//! `qemu-io` around an atomic group start.

mod agent_common;
mod skip;

use agent_common::{Agent, fc};
use serde_json::Value;
use skip::have;
use std::process::Command;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn ibm_verbs_tables_json_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::start(dir.path());

    assert_eq!(
        a.fc_ok(&["mkvol", "db", "4M"]),
        "Virtual Disk, id [1], successfully created\n"
    );
    a.fc_ok(&["mkvol", "db-copy", "4MiB"]);
    a.fc_ok(&["mkvol", "tiny", "1049088"]);

    // lsvol: a table with IBM-like columns, and JSON.
    let t = a.fc_ok(&["lsvol"]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "id",
            "name",
            "capacity",
            "fc_map_count",
            "status",
            "nbd_export"
        ]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["1", "db", "4.00MiB", "0", "online", "1"]
    );
    let v = json(&a.fc_ok(&["-o", "json", "lsvol"]));
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert_eq!(v[2]["size_bytes"], (1 << 20) + 512);

    // Unequal sizes where the smaller ends inside a grain: the rule and its IBM id, exit 1,
    // nothing created.
    let o = a.fc(&["mkfcmap", "--source", "db", "--target", "tiny"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("CMMVC5924E") && e.contains("whole number of 262144-byte grains"),
        "{e}"
    );
    assert!(e.starts_with("error: "), "{e}");
    assert_eq!(
        json(&a.fc_ok(&["lsfcmap", "-o", "json"])),
        Value::Array(vec![])
    );

    // Unknown names are named.
    let o = a.fc(&["mkfcmap", "--source", "nosuch", "--target", "tiny"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("volume \"nosuch\" does not exist"));

    assert_eq!(
        a.fc_ok(&[
            "mkfcmap",
            "--source",
            "db",
            "--target",
            "2",
            "--name",
            "clone",
            "--copyrate",
            "100",
            "--grainsize",
            "64",
            "--autodelete",
        ]),
        "FlashCopy Mapping, id [1], successfully created\n"
    );

    // lsfcmap: the columns, one row per mapping; JSON parses and carries the same.
    let t = a.fc_ok(&["lsfcmap"]);
    let head: Vec<&str> = t.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        [
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
            "start_time"
        ]
    );
    let row: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row,
        [
            "1",
            "clone",
            "db",
            "db-copy",
            "idle_or_copied",
            "0",
            "100",
            "50",
            "64",
            "off",
            "on"
        ]
    );
    // Columns line up: every field of the row starts where its header does.
    let header_line = t.lines().next().unwrap();
    let row_line = t.lines().nth(1).unwrap();
    for col in ["name", "source", "target", "state", "copy_rate"] {
        let at = header_line.find(col).unwrap();
        assert_ne!(
            row_line.as_bytes()[at],
            b' ',
            "column {col} misaligned:\n{t}"
        );
        assert_eq!(row_line.as_bytes()[at - 1], b' ');
    }
    let m = json(&a.fc_ok(&["-o", "json", "lsfcmap"]));
    assert_eq!(m[0]["name"], "clone");
    assert_eq!(m[0]["state"], "idle_or_copied");
    assert_eq!(m[0]["grain_kib"], 64);
    assert_eq!(m[0]["start_time"], Value::Null);

    // Start before prepare: exit 1, the rule, and a hint.
    let o = a.fc(&["startfcmap", "clone"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("CMMVC5903E") && e.contains("idle_or_copied"),
        "{e}"
    );
    assert!(
        e.contains("hint: prepare it first (prestartfcmap clone)"),
        "{e}"
    );

    a.fc_ok(&["prestartfcmap", "1"]);
    let d = a.fc_ok(&["lsfcmap", "clone"]);
    assert!(
        d.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["status", "prepared"]),
        "{d}"
    );
    let out = a.fc_ok(&["startfcmap", "clone"]);
    assert!(out.starts_with("clone started, host I/O paused "), "{out}");

    // wait: returns when the copy-rate-100 clone completes (and autodeletes itself).
    let w = a.fc_ok(&["wait", "clone", "--timeout", "30"]);
    assert!(w.contains("clone: copied"), "{w}");
    assert_eq!(
        json(&a.fc_ok(&["lsfcmap", "-o", "json"])),
        Value::Array(vec![])
    );

    // wait on a snapshot (copy rate 0) says why it would never end.
    a.fc_ok(&[
        "mkfcmap",
        "--source",
        "db",
        "--target",
        "db-copy",
        "--copyrate",
        "0",
    ]);
    a.fc_ok(&["startfcmap", "--prep", "fcmap2"]);
    let o = a.fc(&["wait", "fcmap2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("copy rate 0"), "{}", stderr(&o));

    // chfcmap, then wait sees the copy through.
    a.fc_ok(&[
        "chfcmap",
        "fcmap2",
        "--copyrate",
        "120",
        "--cleanrate",
        "10",
    ]);
    let m = json(&a.fc_ok(&["lsfcmap", "fcmap2", "-o", "json"]));
    assert_eq!(
        (m["copy_rate"].as_u64(), m["clean_rate"].as_u64()),
        (Some(120), Some(10))
    );
    let w = json(&a.fc_ok(&["-o", "json", "wait", "fcmap2", "--timeout", "30"]));
    assert_eq!(w["state"], "idle_or_copied");
    assert_eq!(w["progress"], 100);

    // rmvol of a volume in a mapping: refused with the reason and a hint.
    let o = a.fc(&["rmvol", "db"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("belongs to mapping"), "{}", stderr(&o));
    a.fc_ok(&["rmfcmap", "fcmap2"]);
    a.fc_ok(&["rmvol", "db-copy"]);
    a.fc_ok(&["resizevol", "tiny", "2M"]);
    let v = json(&a.fc_ok(&["lsvol", "tiny", "-o", "json"]));
    assert_eq!(v["size_bytes"], 2 << 20);

    // Input errors caught before the agent, and usage errors from clap.
    let o = a.fc(&["mkvol", "x", "lots"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("invalid size \"lots\""),
        "{}",
        stderr(&o)
    );
    let o = a.fc(&["mkfcmap", "--source", "db"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--target"), "{}", stderr(&o));
    let o = a.fc(&["chfcmap", "1"]);
    assert_eq!(o.status.code(), Some(1));

    a.stop().unwrap();
}

#[test]
fn consistency_group_verbs() {
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::start(dir.path());
    for v in ["d", "l", "d-s", "l-s"] {
        a.fc_ok(&["mkvol", v, "2M"]);
    }
    assert_eq!(
        a.fc_ok(&["mkfcconsistgrp", "--name", "cg"]),
        "FlashCopy Consistency Group, id [1], successfully created\n"
    );
    a.fc_ok(&[
        "mkfcmap",
        "--source",
        "d",
        "--target",
        "d-s",
        "--copyrate",
        "0",
        "--consistgrp",
        "cg",
    ]);
    a.fc_ok(&[
        "mkfcmap",
        "--source",
        "l",
        "--target",
        "l-s",
        "--copyrate",
        "0",
    ]);
    a.fc_ok(&["chfcmap", "fcmap2", "--consistgrp", "1"]);
    let g = json(&a.fc_ok(&["-o", "json", "lsfcconsistgrp"]));
    assert_eq!(g[0]["name"], "cg");
    assert_eq!(g[0]["state"], "idle_or_copied");
    assert_eq!(g[0]["mappings"], serde_json::json!([1, 2]));
    let t = a.fc_ok(&["lsfcconsistgrp"]);
    assert_eq!(
        t.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        [
            "id",
            "name",
            "state",
            "mappings",
            "autodelete",
            "start_time"
        ]
    );

    // A grouped mapping is started through its group.
    let o = a.fc(&["startfcmap", "--prep", "fcmap1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("consistency group"), "{}", stderr(&o));
    let o = a.fc(&["startfcconsistgrp", "cg"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("hint: prepare it first (prestartfcconsistgrp cg)"),
        "{}",
        stderr(&o)
    );

    a.fc_ok(&["prestartfcconsistgrp", "cg"]);
    let out = a.fc_ok(&["startfcconsistgrp", "cg"]);
    assert!(
        out.contains("cg started (2 mappings, one point in time), host I/O paused"),
        "{out}"
    );
    let ms = json(&a.fc_ok(&["lsfcmap", "--consistgrp", "cg", "-o", "json"]));
    assert_eq!(ms.as_array().unwrap().len(), 2);
    assert_eq!(ms[0]["state"], "copying");
    assert_eq!(ms[0]["start_time"], ms[1]["start_time"]);
    assert_eq!(ms[0]["group"], "cg");
    let d = a.fc_ok(&["lsfcconsistgrp", "cg"]);
    assert!(
        d.contains("FC_mapping_name") && d.contains("copying"),
        "{d}"
    );
    let info = json(&a.fc_ok(&["lssystem", "-o", "json"]));
    assert_eq!(info["starts"], 1);

    let o = a.fc(&["rmfcconsistgrp", "cg"]);
    assert_eq!(o.status.code(), Some(1));
    a.fc_ok(&["stopfcconsistgrp", "cg", "--force"]);
    let g = json(&a.fc_ok(&["lsfcconsistgrp", "1", "-o", "json"]));
    assert_eq!(g["state"], "stopped");
    a.fc_ok(&["rmfcconsistgrp", "cg", "--force"]);
    let ms = json(&a.fc_ok(&["lsfcmap", "-o", "json"]));
    assert_eq!(ms[0]["group"], Value::Null);
    a.fc_ok(&["rmfcmap", "--force", "1"]);
    a.fc_ok(&["rmfcmap", "--force", "fcmap2"]);
    a.stop().unwrap();
}

#[test]
fn unreachable_agent_and_missing_agent() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let o = fc(&format!("unix://{}", sock.display()), &["lsfcmap"]);
    assert_eq!(o.status.code(), Some(3));
    let e = stderr(&o);
    assert!(e.contains("cannot reach the agent at unix://"), "{e}");
    let o = Command::new(env!("CARGO_BIN_EXE_flashcopy-csi"))
        .args(["fc", "lsvol"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--agent"), "{}", stderr(&o));
}

/// Dependent writes across two volumes, through NBD, around an atomic group start: the group
/// targets hold both first writes and neither second write.
#[test]
fn group_snapshot_through_nbd_with_qemu_io() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::start(dir.path());
    for v in ["data", "log", "data-s", "log-s"] {
        a.fc_ok(&["mkvol", v, "4M"]);
    }
    let nbd = a.cfg.nbd_socket_path();
    let qemu_io = |export: &str, cmd: &str| {
        let uri = format!("nbd+unix:///{export}?socket={}", nbd.display());
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &uri])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        println!("$ qemu-io {cmd} {uri}\n{text}");
        assert!(o.status.success(), "{text}");
        assert!(!text.contains("fail") && !text.contains("error"), "{text}");
    };
    // Exports are named by volume id: data=1, log=2, data-s=3, log-s=4.
    qemu_io("1", "write -P 0x11 0 4M");
    qemu_io("2", "write -P 0x21 0 4M");
    a.fc_ok(&["mkfcconsistgrp", "--name", "cg"]);
    a.fc_ok(&[
        "mkfcmap",
        "--source",
        "data",
        "--target",
        "data-s",
        "--copyrate",
        "0",
        "--consistgrp",
        "cg",
    ]);
    a.fc_ok(&[
        "mkfcmap",
        "--source",
        "log",
        "--target",
        "log-s",
        "--copyrate",
        "0",
        "--consistgrp",
        "cg",
    ]);
    a.fc_ok(&["startfcconsistgrp", "--prep", "cg"]);
    qemu_io("2", "write -P 0x22 0 1M");
    qemu_io("1", "write -P 0x12 1M 2M");
    qemu_io("3", "read -P 0x11 0 4M");
    qemu_io("4", "read -P 0x21 0 4M");
    qemu_io("1", "read -P 0x12 1M 2M");
    a.stop().unwrap();
}

#[test]
fn changed_block_verbs_table_and_json() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::start(dir.path());
    for v in ["db", "db-s1", "db-s2", "other", "other-s"] {
        a.fc_ok(&["mkvol", v, "4M"]);
    }
    let nbd = a.cfg.nbd_socket_path();
    let write = |export: &str, cmd: &str| {
        let uri = format!("nbd+unix:///{export}?socket={}", nbd.display());
        let o = Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, &uri])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let snap = |src: &str, tgt: &str, name: &str| {
        a.fc_ok(&[
            "mkfcmap",
            "--source",
            src,
            "--target",
            tgt,
            "--copyrate",
            "0",
            "--name",
            name,
        ]);
        a.fc_ok(&["startfcmap", "--prep", name]);
    };
    write("1", "write -P 0x11 0 64k");
    write("1", "write -P 0x12 1M 1M");
    snap("db", "db-s1", "s1");
    write("1", "write -P 0x13 3M 4k");
    write("1", "write -P 0x14 256k 4k");
    snap("db", "db-s2", "s2");
    snap("other", "other-s", "o1");

    // Allocated: the grains written before the snapshot, and those copied into its target
    // since (copy-on-write of grains 1 and 12, zeros here: held data all the same), merged
    // (256 KiB grains).
    let t = a.fc_ok(&["lsfcmapallocated", "s1"]);
    let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [
            vec!["offset", "length"],
            vec!["0", "524288"],
            vec!["1048576", "1048576"],
            vec!["3145728", "262144"]
        ]
    );
    // The newest snapshot reads the source: only what was written.
    let v = json(&a.fc_ok(&["-o", "json", "lsfcmapallocated", "s2"]));
    assert_eq!(
        v,
        serde_json::json!([
            {"offset": 0, "length": 524288},
            {"offset": 1048576, "length": 1048576},
            {"offset": 3145728, "length": 262144}
        ])
    );
    // Delta: grains 1 and 12, not merged (not adjacent); as JSON too; from an offset.
    let v = json(&a.fc_ok(&["-o", "json", "lsfcmapdelta", "s1", "s2"]));
    assert_eq!(
        v,
        serde_json::json!([
            {"offset": 262144, "length": 262144},
            {"offset": 3145728, "length": 262144}
        ])
    );
    let v = json(&a.fc_ok(&["lsfcmapdelta", "s1", "s2", "--from", "524288", "-o", "json"]));
    assert_eq!(
        v,
        serde_json::json!([{"offset": 3145728, "length": 262144}])
    );
    assert_eq!(
        json(&a.fc_ok(&["-o", "json", "lsfcmapallocated", "o1"])),
        serde_json::json!([])
    );
    // Refusals name the rule and exit 1.
    for (args, text) in [
        (vec!["lsfcmapdelta", "s2", "s1"], "did not start before"),
        (vec!["lsfcmapdelta", "s1", "o1"], "different volumes"),
        (vec!["lsfcmapdelta", "s1", "nosuch"], "does not exist"),
        (
            vec!["lsfcmapallocated", "s1", "--from", "4194304"],
            "not inside the image",
        ),
    ] {
        let o = a.fc(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).contains(text), "{args:?}: {}", stderr(&o));
    }
    a.stop().unwrap();
}

//! The one way a test says it cannot run here. [`skip`] prints the reason, appends
//! "crate::test: reason" to the file named by `FLASHCOPY_SKIP_LOG` (ci/test.sh sets it and lists
//! the lines at the end of the run, so a skip is never silent) and, under CI, fails instead:
//! ci/test.sh installs every tool the tests need, so a skip there is a broken machine.
//!
//! Included by the test crates (`mod skip;`) and by the crate's own unit tests (`#[path]`).

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

/// The test running on this thread, as `cargo test` names it ("csi_node::some_test").
fn test_name() -> String {
    format!(
        "{}::{}",
        env!("CARGO_CRATE_NAME"),
        std::thread::current().name().unwrap_or("(unnamed thread)")
    )
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn record(why: &str, tag: &str) {
    let test = test_name();
    println!("skipped: {why}");
    if let Some(log) = std::env::var_os("FLASHCOPY_SKIP_LOG") {
        // One append of one line: lines of tests running in parallel do not interleave.
        let line = format!("{test}: {why}{tag}\n");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| panic!("writing FLASHCOPY_SKIP_LOG {log:?}: {e}"));
    }
}

/// The test (or the part of it after this call) does not run, for `why`. Fails under CI.
pub fn skip(why: &str) {
    assert!(!under_ci(), "{} cannot run under CI: {why}", test_name());
    record(why, "");
}

/// Marks what [`skip_machine_limit`] logs; ci/test.sh lets these pass under CI.
pub const MACHINE_LIMIT: &str = " [a limit of this machine no package lifts]";

/// Like [`skip`], for a limit no package can lift (a capability the sandbox drops): listed at
/// the end of the run like every skip, but not a failure under CI.
pub fn skip_machine_limit(why: &str) {
    record(why, MACHINE_LIMIT);
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(bin).is_file()))
}

/// True when `bin` is on PATH; otherwise [`skip`]s.
pub fn have(bin: &str) -> bool {
    have_all(&[bin])
}

/// True when every one of `bins` is on PATH; otherwise [`skip`]s once, naming every missing one.
pub fn have_all(bins: &[&str]) -> bool {
    let missing: Vec<&str> = bins.iter().copied().filter(|b| !on_path(b)).collect();
    if missing.is_empty() {
        return true;
    }
    skip(&format!("{} not installed", missing.join(", ")));
    false
}

/// Effective uid 0, read from /proc (no unsafe `geteuid`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// True when running as root with every one of `devices` (e.g. /dev/loop-control, /dev/fuse);
/// otherwise [`skip`]s, naming what is missing.
pub fn root_with(devices: &[&str]) -> bool {
    let mut missing: Vec<String> = Vec::new();
    if !is_root() {
        missing.push("root".into());
    }
    missing.extend(
        devices
            .iter()
            .filter(|d| !Path::new(d).exists())
            .map(|d| d.to_string()),
    );
    if missing.is_empty() {
        return true;
    }
    skip(&format!("needs {}", missing.join(", ")));
    false
}

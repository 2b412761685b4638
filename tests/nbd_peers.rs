//! The NBD server against real clients nobody here wrote: `nbdinfo`, `qemu-io`, `qemu-img` and
//! `nbdcopy`. Each test serves a pool on a Unix socket in a temporary directory.
//!
//! A missing client binary skips the test (listed by ci/test.sh), except under CI, where it fails.

mod skip;

use flashcopy_csi::engine::{MappingSpec, VolId};
use flashcopy_csi::nbd::{Exports, ServerConfig, Shutdown, serve_unix};
use flashcopy_csi::volume::{Pool, PoolConfig};
use skip::{have, have_all};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;

const MIB: u64 = 1 << 20;

/// A pool on a temporary directory served on `DIR/nbd.sock` by a background thread.
struct Served {
    pool: Arc<Pool>,
    sock: PathBuf,
    shutdown: Shutdown,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    dir: tempfile::TempDir,
}

impl Served {
    fn start(volumes: &[(&str, u64)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pool =
            Arc::new(Pool::open_dir(&dir.path().join("pool"), PoolConfig::default()).unwrap());
        for (name, size) in volumes {
            pool.create_volume(name, *size).unwrap();
        }
        let sock = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let shutdown = Shutdown::new();
        let exports: Arc<dyn Exports> = Arc::new(pool.clone());
        let sd = shutdown.clone();
        let thread =
            std::thread::spawn(move || serve_unix(listener, exports, ServerConfig::default(), sd));
        Self {
            pool,
            sock,
            shutdown,
            thread: Some(thread),
            dir,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn vol(&self, name: &str) -> VolId {
        self.pool.engine().volume_by_name(name).unwrap().id
    }

    fn read_all(&self, name: &str) -> Vec<u8> {
        let v = self.vol(name);
        let size = self.pool.engine().volume(v).unwrap().size;
        let mut buf = vec![0; size as usize];
        self.pool.read(v, 0, &mut buf).unwrap();
        buf
    }

    /// Starts a copy-on-write snapshot of `src` onto `tgt`.
    fn snapshot(&self, src: &str, tgt: &str) {
        let m = self
            .pool
            .create_mapping(MappingSpec::snapshot(self.vol(src), self.vol(tgt)))
            .unwrap();
        self.pool.start_mapping(m, true, false).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            let res = t.join().expect("server thread panicked");
            if !std::thread::panicking() {
                res.expect("server failed");
            }
        }
    }
}

fn run(bin: &str, args: &[&str]) -> Output {
    let out = Command::new(bin).args(args).output().unwrap();
    println!(
        "$ {bin} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `qemu-io` on an export with the given commands; asserts it succeeded without any
/// failed pattern check.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = run("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io failed: {text}");
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io reported a failure: {text}"
    );
    text
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The value of `"key": value` in nbdinfo's JSON output (flat enough for a text search).
fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\":");
    let at = json
        .find(&pat)
        .unwrap_or_else(|| panic!("{key} missing in {json}"));
    json[at + pat.len()..]
        .trim_start()
        .split([',', '\n', '}'])
        .next()
        .unwrap()
        .trim()
}

#[test]
fn nbdinfo_sees_size_and_capabilities() {
    if !have("nbdinfo") {
        return;
    }
    let s = Served::start(&[("data", 8 * MIB), ("other", 2 * MIB)]);
    let out = run("nbdinfo", &["--json", &s.uri("data")]);
    assert!(out.status.success());
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(json_field(&json, "export-size"), (8 * MIB).to_string());
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(json_field(&json, cap), "true", "{cap} in {json}");
    }
    assert_eq!(json_field(&json, "is_read_only"), "false");
    assert_eq!(json_field(&json, "block_size_minimum"), "512");
    assert_eq!(json_field(&json, "block_size_preferred"), "4096");
    assert_eq!(
        json_field(&json, "block_size_maximum"),
        (32 * MIB).to_string()
    );

    // The numeric volume id names the same export.
    let id = s.vol("data").0.to_string();
    let out = run("nbdinfo", &["--size", &s.uri(&id)]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        (8 * MIB).to_string()
    );

    // NBD_OPT_LIST lists every volume.
    let out = run("nbdinfo", &["--list", "--json", &s.uri("")]);
    assert!(out.status.success());
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(
        list.contains("\"data\"") && list.contains("\"other\""),
        "{list}"
    );

    // An unknown export is refused during the handshake.
    let out = run("nbdinfo", &["--size", &s.uri("nope")]);
    assert!(!out.status.success());
}

#[test]
fn qemu_io_writes_and_reads_back() {
    if !have("qemu-io") {
        return;
    }
    let s = Served::start(&[("disk", 4 * MIB)]);
    let uri = s.uri("disk");
    qemu_io(
        &uri,
        &["write -P 0xab 0 1M", "read -P 0xab 0 1M", "read -P 0 1M 3M"],
    );
    // FUA writes, write-zeroes (with and without unmap), discard, flush, unaligned I/O
    // (qemu reads and rewrites the 512-byte sectors around it), all in one session.
    qemu_io(
        &uri,
        &[
            "write -f -P 0x11 1M 64k",
            "write -z 0 4k",
            "write -z -u 8k 4k",
            "discard 2M 1M",
            "flush",
            "write -P 0x22 3000 100",
            "read -P 0 0 3000",
            "read -P 0x22 3000 100",
            "read -P 0 3100 996",
            "read -P 0xab 4k 4k",
            "read -P 0 8k 4k",
            "read -P 0xab 12k 1012k",
            "read -P 0x11 1M 64k",
        ],
    );
    let data = s.read_all("disk");
    assert!(data[..3000].iter().all(|b| *b == 0));
    assert!(data[3000..3100].iter().all(|b| *b == 0x22));
    assert!(data[4096..8192].iter().all(|b| *b == 0xab));
    assert!(
        data[MIB as usize..(MIB + 65536) as usize]
            .iter()
            .all(|b| *b == 0x11)
    );
}

#[test]
fn snapshots_through_qemu_io_keep_their_point_in_time() {
    if !have("qemu-io") {
        return;
    }
    let s = Served::start(&[("src", 4 * MIB), ("snap", 4 * MIB)]);
    qemu_io(
        &s.uri("src"),
        &["write -P 0xab 0 2M", "write -P 0x5a 2M 2M"],
    );
    s.snapshot("src", "snap");
    // Partial grains, whole grains and a range across the old pattern boundary.
    qemu_io(
        &s.uri("src"),
        &[
            "write -P 0xcd 0 4k",
            "write -P 0xcd 1M 512k",
            "write -P 0xcd 1920k 256k",
        ],
    );
    qemu_io(
        &s.uri("src"),
        &[
            "read -P 0xcd 0 4k",
            "read -P 0xab 4k 1020k",
            "read -P 0xcd 1M 512k",
            "read -P 0xab 1536k 384k",
            "read -P 0xcd 1920k 256k",
            "read -P 0x5a 2176k 1920k",
        ],
    );
    qemu_io(&s.uri("snap"), &["read -P 0xab 0 2M", "read -P 0x5a 2M 2M"]);
    // The snapshot is writable; that does not touch the source.
    qemu_io(
        &s.uri("snap"),
        &["write -P 0xee 3M 4k", "read -P 0xee 3M 4k"],
    );
    qemu_io(&s.uri("src"), &["read -P 0x5a 3M 4k"]);
}

#[test]
fn qemu_img_compare_finds_the_snapshot_image() {
    if !have_all(&["qemu-img", "qemu-io"]) {
        return;
    }
    let size = 4 * MIB as usize;
    let s = Served::start(&[("src", size as u64), ("snap", size as u64)]);
    let before = random_bytes(size, 7);
    s.pool.write(s.vol("src"), 0, &before).unwrap();
    s.snapshot("src", "snap");
    qemu_io(
        &s.uri("src"),
        &["write -P 0x77 100k 1M", "write -z 3M 512k"],
    );

    let expected = s.path("expected.raw");
    std::fs::write(&expected, &before).unwrap();
    let ex = expected.to_str().unwrap();
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", ex, &s.uri("snap")],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the snapshot differs from its point in time"
    );
    // The comparison is real: the source now differs.
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", ex, &s.uri("src")],
    );
    assert_eq!(out.status.code(), Some(1), "the source should differ");

    let mut after = before.clone();
    after[100 << 10..(100 << 10) + MIB as usize].fill(0x77);
    after[3 * MIB as usize..(3 * MIB + 512 * 1024) as usize].fill(0);
    std::fs::write(&expected, &after).unwrap();
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", ex, &s.uri("src")],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the source differs from what was written"
    );
}

#[test]
fn nbdcopy_round_trips_an_image() {
    if !have("nbdcopy") {
        return;
    }
    let size = 24 * MIB as usize;
    let s = Served::start(&[("disk", size as u64), ("copy", size as u64)]);
    let image = random_bytes(size, 42);
    let file = s.path("image.raw");
    std::fs::write(&file, &image).unwrap();

    // Into the export: several connections (multi-conn) with many requests in flight.
    let out = run(
        "nbdcopy",
        &["--flush", file.to_str().unwrap(), &s.uri("disk")],
    );
    assert!(out.status.success());
    assert!(
        s.read_all("disk") == image,
        "export content differs after nbdcopy"
    );

    // Export to export, then out to a file.
    let out = run("nbdcopy", &[&s.uri("disk"), &s.uri("copy")]);
    assert!(out.status.success());
    let back = s.path("back.raw");
    let out = run("nbdcopy", &[&s.uri("copy"), back.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        std::fs::read(&back).unwrap() == image,
        "copied image differs"
    );
}

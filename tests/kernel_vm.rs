//! The kernel paths on a real Linux kernel. `kernel_vm` boots Debian's kernel under QEMU
//! (`ci/vm/run.sh`, host `/usr` shared read-only) and runs this binary's ignored `vm_*` tests
//! inside it, as root, with the nbd module loaded: the node plugin attaches volumes through the
//! kernel nbd driver (netlink), and the agent and the plugin are killed under mounted file
//! systems while writers run.
//!
//! Outside CI the outer test says so and skips where qemu cannot run; under CI it must run.
//! Timings inside the VM are emulated (TCG): they compare restarts with each other, nothing more.

mod csi_common;
mod skip;

use csi::volume_capability::access_mode::Mode;
use csi_common::{block_cap, create_req, mount_cap};
use flashcopy_csi::proto::csi::v1 as csi;
use flashcopy_csi::proto::csi::v1::controller_client::ControllerClient;
use flashcopy_csi::proto::csi::v1::node_client::NodeClient;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_flashcopy-csi");
const NODE: &str = "vm-node";
const MIB: i64 = 1 << 20;

fn in_vm() -> bool {
    std::env::var_os("FLASHCOPY_IN_VM").is_some()
}

// ---------------------------------------------------------------------------------------------
// Outside: boot the VM and run the vm_* tests in it.

#[test]
fn kernel_vm() {
    if in_vm() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // ci/test.sh installs these with ci/vm/setup.sh (as root with apt).
    if !skip::have_all(&["qemu-system-x86_64", "busybox", "cpio"]) {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    // The build directory (target/debug/deps/..) must be visible inside at the same path.
    let target = exe.ancestors().nth(3).unwrap().to_path_buf();
    // The stall benchmark runs only when asked for (FLASHCOPY_VM_TESTS=vm_bench).
    let filter: Vec<String> = match std::env::var("FLASHCOPY_VM_TESTS") {
        Ok(f) => vec![f],
        Err(_) => ["vm_", "--skip", "vm_bench"].map(String::from).to_vec(),
    };
    let t0 = Instant::now();
    let st = Command::new(root.join("ci/vm/run.sh"))
        .args(["--timeout", "900", "--share"])
        .arg(&target)
        .arg("--")
        .arg(&exe)
        .args(["--ignored", "--test-threads", "1", "--nocapture"])
        .args(&filter)
        .env("FLASHCOPY_IN_VM", "1")
        .current_dir(root)
        .status()
        .unwrap();
    println!("kernel VM run: {st} in {:.0?}", t0.elapsed());
    assert!(st.success(), "the tests inside the kernel VM failed: {st}");
}

// ---------------------------------------------------------------------------------------------
// Inside: the agent, the CSI controller and the CSI node plugin as separate processes.

struct Node {
    dir: PathBuf,
    agent: Option<Child>,
    node: Option<Child>,
    ctl: Child,
    node_args: Vec<String>,
}

fn wait_for_socket(p: &Path, child: &mut Child, what: &str) {
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "{what} exited while starting"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .unwrap()
        .into()
}

impl Node {
    fn start(node_args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vm-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let ctl = Command::new(BIN)
            .args(["csi", "controller", "--endpoint"])
            .arg(format!("unix://{}/ctl.sock", dir.display()))
            .arg("--agent")
            .arg(format!("{NODE}=unix://{}/data/agent.sock", dir.display()))
            .stdout(Stdio::null())
            .stderr(log_file(&dir, "ctl.log"))
            .spawn()
            .unwrap();
        let mut n = Self {
            dir,
            agent: None,
            node: None,
            ctl,
            node_args: node_args.iter().map(|s| s.to_string()).collect(),
        };
        n.start_agent();
        n.start_node();
        wait_for_socket(&n.dir.join("ctl.sock"), &mut n.ctl, "csi controller");
        n
    }

    fn start_agent(&mut self) {
        self.start_agent_from(Path::new(BIN));
    }

    fn start_agent_from(&mut self, bin: &Path) {
        let mut c = Command::new(bin)
            .args(["agent", "--data-dir"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir, "agent.log"))
            .spawn()
            .unwrap();
        wait_for_socket(&self.dir.join("data/nbd.sock"), &mut c, "agent");
        wait_for_socket(&self.dir.join("data/agent.sock"), &mut c, "agent");
        self.agent = Some(c);
    }

    fn kill_agent(&mut self) {
        let mut c = self.agent.take().expect("the agent runs");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM: the agent finishes what it received and exits (an upgrade's first half).
    fn stop_agent(&mut self) {
        let mut c = self.agent.take().expect("the agent runs");
        signal(c.id(), "TERM");
        c.wait().unwrap();
    }

    fn start_node(&mut self) {
        let mut c = Command::new(BIN)
            .args(["csi", "node", "--endpoint"])
            .arg(format!("unix://{}/node.sock", self.dir.display()))
            .args(["--node-id", NODE, "--agent"])
            .arg(format!("unix://{}/data/agent.sock", self.dir.display()))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(&self.node_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir, "node.log"))
            .spawn()
            .unwrap();
        wait_for_socket(&self.dir.join("node.sock"), &mut c, "csi node");
        self.node = Some(c);
    }

    fn kill_node(&mut self) {
        let mut c = self.node.take().expect("the node plugin runs");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    async fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(channel(&self.dir.join("ctl.sock")).await)
    }

    async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(channel(&self.dir.join("node.sock")).await)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for c in [self.agent.as_mut(), self.node.as_mut(), Some(&mut self.ctl)]
            .into_iter()
            .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn channel(sock: &Path) -> Channel {
    Endpoint::from_shared(format!("unix://{}", sock.display()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kernel log lines that mean a workload saw an error.
const KERNEL_ERRORS: &[&str] = &[
    "I/O error",
    "EXT4-fs error",
    "Aborting journal",
    "aborted journal",
    "Remounting filesystem read-only",
    "XFS (",
    "potential data loss",
];

fn clear_dmesg() {
    sh("dmesg", &["-C"]);
}

fn kernel_errors() -> Vec<String> {
    sh("dmesg", &[])
        .lines()
        .filter(|l| {
            KERNEL_ERRORS.iter().any(|e| l.contains(e))
                && !l.contains("Mounting V5 Filesystem")
                && !l.contains("Ending clean mount")
                && !l.contains("Unmounting Filesystem")
        })
        .map(str::to_string)
        .collect()
}

async fn create(n: &Node, name: &str, bytes: i64) -> String {
    let mut ctl = n.ctl().await;
    ctl.create_volume(create_req(name, bytes))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

fn fs_cap(fs: &str) -> csi::VolumeCapability {
    let mut c = mount_cap(Mode::SingleNodeWriter);
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut c.access_type {
        m.fs_type = fs.into();
    }
    c
}

async fn stage(n: &Node, vol: &str, cap: &csi::VolumeCapability, staging: &Path) {
    n.node()
        .await
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn publish(n: &Node, vol: &str, cap: &csi::VolumeCapability, staging: &Path, target: &Path) {
    n.node()
        .await
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
}

async fn unpublish(n: &Node, vol: &str, target: &Path) {
    n.node()
        .await
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: vol.into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
}

async fn unstage(n: &Node, vol: &str, staging: &Path) {
    n.node()
        .await
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
}

/// The block device mounted at `p`.
fn source_of(p: &Path) -> PathBuf {
    let out = sh("findmnt", &["-n", "-o", "SOURCE", &p.display().to_string()]);
    PathBuf::from(out.trim())
}

/// The kernel nbd device the node plugin attached for `vol`, from its record.
fn device_of(n: &Node, vol: &str) -> PathBuf {
    let key = flashcopy_csi::csi::node::attach::key_dir(vol);
    let rec = std::fs::read_to_string(
        n.dir
            .join("state/kernel-nbd")
            .join(key)
            .join("attachment.json"),
    )
    .unwrap_or_else(|e| panic!("no kernel nbd record for {vol}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&rec).unwrap();
    PathBuf::from(format!("/dev/nbd{}", v["index"]))
}

// ---------------------------------------------------------------------------------------------
// A writer with its own record of acknowledged writes.

fn pattern(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const FILE_LEN: usize = 64 * 1024;

/// What a writer saw: files acknowledged (fsync returned) with the instant each was, and the
/// longest time one write + fsync took.
#[derive(Default)]
struct Written {
    acked: Vec<(u64, Instant)>,
    longest: Duration,
    /// (start, duration) of every write over 1 s: the stalls.
    stalls: Vec<(Instant, Duration)>,
    error: Option<String>,
}

/// Writes `dir/f<i>` (64 KiB, fsync'd) in a loop until `stop`; files rotate over 64 names so the
/// file system keeps rewriting and freeing blocks.
fn writer(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Written> {
    std::thread::spawn(move || {
        let mut w = Written::default();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let r = (|| -> std::io::Result<()> {
                let mut f = std::fs::File::create(dir.join(format!("f{}", i % 64)))?;
                f.write_all(&i.to_le_bytes())?;
                f.write_all(&pattern(i, FILE_LEN - 8))?;
                f.sync_all()?;
                Ok(())
            })();
            let took = t.elapsed();
            if let Err(e) = r {
                w.error = Some(format!("write {i}: {e}"));
                break;
            }
            w.acked.push((i, Instant::now()));
            w.longest = w.longest.max(took);
            if took >= Duration::from_secs(1) {
                w.stalls.push((t, took));
            }
            i += 1;
        }
        w
    })
}

/// Every file holds the last acknowledged write of its name, whole.
fn check_files(dir: &Path, acked: &[(u64, Instant)]) {
    let mut last = std::collections::BTreeMap::new();
    for (i, _) in acked {
        last.insert(i % 64, *i);
    }
    for (slot, i) in last {
        let mut b = Vec::new();
        std::fs::File::open(dir.join(format!("f{slot}")))
            .unwrap_or_else(|e| panic!("f{slot} (write {i}): {e}"))
            .read_to_end(&mut b)
            .unwrap();
        assert_eq!(b.len(), FILE_LEN, "f{slot}");
        let got = u64::from_le_bytes(b[..8].try_into().unwrap());
        // A write after the last acknowledged one may have landed too (not acknowledged yet
        // when the writer stopped); anything older is a lost write.
        assert!(
            got >= i,
            "f{slot} holds write {got}, write {i} was acknowledged"
        );
        assert_eq!(
            b[8..],
            pattern(got, FILE_LEN - 8)[..],
            "f{slot} write {got} is torn"
        );
    }
}

/// The files acknowledged before `t` must be in the snapshot mounted at `dir`, as written
/// then or later (a file rewritten between the acknowledgement and the snapshot).
fn check_point_in_time(dir: &Path, acked: &[(u64, Instant)], t: Instant) {
    let mut last = std::collections::BTreeMap::new();
    for (i, at) in acked {
        if *at < t {
            last.insert(i % 64, *i);
        }
    }
    assert!(
        !last.is_empty(),
        "no write was acknowledged before the snapshot"
    );
    for (slot, i) in last {
        let mut b = Vec::new();
        std::fs::File::open(dir.join(format!("f{slot}")))
            .unwrap_or_else(|e| panic!("snapshot: f{slot} (write {i}): {e}"))
            .read_to_end(&mut b)
            .unwrap();
        let got = u64::from_le_bytes(b[..8].try_into().unwrap());
        assert!(
            got >= i,
            "snapshot: f{slot} holds write {got}, write {i} preceded the start"
        );
        assert_eq!(
            b[8..],
            pattern(got, FILE_LEN - 8)[..],
            "snapshot: f{slot} torn"
        );
    }
}

fn rand_ms(seed: &mut u64, lo: u64, hi: u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    Duration::from_millis(lo + *seed % (hi - lo))
}

// ---------------------------------------------------------------------------------------------
// The tests run inside the VM.

/// Stage (ext4, xfs, Block), publish, write, unstage, expand offline, stage again at the new
/// size, grow the file system, unstage: all on /dev/nbdN through netlink.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel VM (kernel_vm)"]
async fn vm_stage_publish_expand_unstage() {
    assert!(in_vm());
    clear_dmesg();
    let n = Node::start(&[]);
    assert!(
        n.log("node.log").contains("kernel-nbd"),
        "{}",
        n.log("node.log")
    );
    // mkfs.xfs wants 300 MiB at least.
    for (fs, size, grown) in [("ext4", 64 * MIB, 128 * MIB), ("xfs", 320 * MIB, 400 * MIB)] {
        let vol = create(&n, &format!("fs-{fs}"), size).await;
        let cap = fs_cap(fs);
        let (staging, target) = (n.path(&format!("st-{fs}")), n.path(&format!("tg-{fs}")));
        stage(&n, &vol, &cap, &staging).await;
        let dev = device_of(&n, &vol);
        assert!(
            dev.to_string_lossy().starts_with("/dev/nbd"),
            "{}",
            dev.display()
        );
        assert_eq!(source_of(&staging), dev);
        publish(&n, &vol, &cap, &staging, &target).await;
        std::fs::write(target.join("hello"), b"kernel nbd").unwrap();
        let size_before = df_size(&target);
        unpublish(&n, &vol, &target).await;
        unstage(&n, &vol, &staging).await;
        assert!(
            !Path::new(&format!(
                "/sys/block/{}/pid",
                dev.file_name().unwrap().to_string_lossy()
            ))
            .exists()
        );
        // Offline expansion, then the next stage sees the new size and the file system grows.
        n.ctl()
            .await
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: vol.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: grown,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        stage(&n, &vol, &cap, &staging).await;
        publish(&n, &vol, &cap, &staging, &target).await;
        n.node()
            .await
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: vol.clone(),
                volume_path: target.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: grown,
                    limit_bytes: 0,
                }),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        let size = df_size(&target);
        assert!(
            size > size_before,
            "{fs} did not grow: {size_before} -> {size}"
        );
        assert_eq!(std::fs::read(target.join("hello")).unwrap(), b"kernel nbd");
        unpublish(&n, &vol, &target).await;
        unstage(&n, &vol, &staging).await;
        n.ctl()
            .await
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: vol.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Block: the device itself is published.
    let vol = create(&n, "raw", 64 * MIB).await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let (staging, target) = (n.path("st-raw"), n.path("tg-raw"));
    stage(&n, &vol, &cap, &staging).await;
    publish(&n, &vol, &cap, &staging, &target).await;
    let data = pattern(7, 1 << 20);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&target)
        .unwrap();
    let mut buf = AlignedBuf::new(1 << 20);
    buf.as_mut().copy_from_slice(&data);
    f.write_all(buf.as_ref()).unwrap();
    f.sync_all().unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut back = AlignedBuf::new(1 << 20);
    f.read_exact(back.as_mut()).unwrap();
    assert_eq!(back.as_ref(), &data[..]);
    drop(f);
    // Read-only beside it: the node of a read-only loop device over the nbd device, whose
    // writes the kernel fails.
    let ro = n.path("tg-raw-ro");
    n.node()
        .await
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: ro.display().to_string(),
            volume_capability: Some(cap.clone()),
            readonly: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut head = vec![0u8; 4096];
    std::fs::File::open(&ro)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(head, data[..4096]);
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(&ro)
        .and_then(|mut f| {
            f.write_all(&[0u8; 4096])?;
            f.sync_all()
        });
    assert!(write.is_err(), "a read-only Block publish took a write");
    unpublish(&n, &vol, &ro).await;
    unpublish(&n, &vol, &target).await;
    unstage(&n, &vol, &staging).await;
    assert_eq!(kernel_errors(), Vec::<String>::new());
}

/// The file system size at `p`, in bytes.
fn df_size(p: &Path) -> i64 {
    let df = sh("df", &["-B1", "--output=size", &p.display().to_string()]);
    df.lines().nth(1).unwrap().trim().parse().unwrap()
}

/// A page-aligned buffer for O_DIRECT.
struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096);
        Self { v, off, len }
    }
    fn as_ref(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// kill -9 of the agent at random moments under a mounted ext4 with an fsync'ing writer; a
/// snapshot started and a restore's background copy running across kills; every acknowledged
/// write survives, the writer sees no error, the kernel logs none, and e2fsck finds the file
/// system clean; the snapshot and the restore hold the snapshot's point in time.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel VM (kernel_vm)"]
async fn vm_agent_kill_under_mounted_ext4() {
    assert!(in_vm());
    clear_dmesg();
    // Two connections per device: both are replaced after each kill.
    let mut n = Node::start(&["--nbd-connections", "2"]);
    let vol = create(&n, "db", 128 * MIB).await;
    let cap = fs_cap("ext4");
    let (staging, target) = (n.path("st"), n.path("tg"));
    stage(&n, &vol, &cap, &staging).await;
    publish(&n, &vol, &cap, &staging, &target).await;
    let dev = device_of(&n, &vol);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(target.clone(), stop.clone());
    let mut seed = 0x5EED_u64 ^ std::process::id() as u64;
    let mut kills = Vec::new();
    // Plain kills.
    for _ in 0..3 {
        std::thread::sleep(rand_ms(&mut seed, 300, 1500));
        let t = Instant::now();
        n.kill_agent();
        std::thread::sleep(rand_ms(&mut seed, 0, 1000));
        n.start_agent();
        kills.push(t);
    }
    // A snapshot, then kills while copy-on-write runs for it.
    std::thread::sleep(Duration::from_millis(500));
    let before_snap = Instant::now();
    let snap = n
        .ctl()
        .await
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "db-snap".into(),
            source_volume_id: vol.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    for _ in 0..2 {
        std::thread::sleep(rand_ms(&mut seed, 300, 1500));
        kills.push(Instant::now());
        n.kill_agent();
        n.start_agent();
    }
    // A restore of the snapshot (background copy at a low rate), killed while it copies.
    let mut req = create_req("db-restore", 128 * MIB);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    req.parameters.insert("copyRate".into(), "30".into());
    let restore = n
        .ctl()
        .await
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    for _ in 0..2 {
        std::thread::sleep(rand_ms(&mut seed, 300, 1500));
        kills.push(Instant::now());
        n.kill_agent();
        n.start_agent();
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let w = w.join().unwrap();
    assert_eq!(
        w.error,
        None,
        "the writer saw an error; node log:\n{}",
        n.log("node.log")
    );
    assert!(w.acked.len() > 20, "only {} writes", w.acked.len());
    println!(
        "{} writes across {} agent kills; longest write+fsync {:?}; stalls over 1 s: {:?}",
        w.acked.len(),
        kills.len(),
        w.longest,
        w.stalls.iter().map(|s| s.1).collect::<Vec<_>>()
    );
    check_files(&target, &w.acked);
    let opts = sh(
        "findmnt",
        &["-n", "-o", "OPTIONS", &staging.display().to_string()],
    );
    assert!(
        opts.split(',').any(|o| o.trim() == "rw"),
        "no longer read-write: {opts}"
    );
    assert_eq!(
        kernel_errors(),
        Vec::<String>::new(),
        "node log:\n{}",
        n.log("node.log")
    );
    assert!(n.log("node.log").contains("NBD connections restored"));
    assert!(
        n.log("node.log").contains("connections=2"),
        "{}",
        n.log("node.log")
    );
    // Clean after unmount (the staging mount is the file system; unpublish first).
    unpublish(&n, &vol, &target).await;
    sh("umount", &[&staging.display().to_string()]);
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&dev)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn {}: {}\n{}",
        dev.display(),
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout)
    );
    unstage(&n, &vol, &staging).await;
    // The restore (still copying or done) holds the snapshot's point in time.
    let (rs, rt) = (n.path("st-restore"), n.path("tg-restore"));
    stage(&n, &restore, &cap, &rs).await;
    publish(&n, &restore, &cap, &rs, &rt).await;
    check_point_in_time(&rt, &w.acked, before_snap);
    unpublish(&n, &restore, &rt).await;
    unstage(&n, &restore, &rs).await;
    assert_eq!(kernel_errors(), Vec::<String>::new());
}

/// The node plugin restarts under a mounted volume (and the agent restarts while no plugin
/// runs): the new plugin finds its device, reconnects it, reports it healthy, and unstages it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel VM (kernel_vm)"]
async fn vm_node_plugin_restart() {
    assert!(in_vm());
    clear_dmesg();
    let mut n = Node::start(&[]);
    let vol = create(&n, "app", 64 * MIB).await;
    let cap = fs_cap("ext4");
    let (staging, target) = (n.path("st"), n.path("tg"));
    stage(&n, &vol, &cap, &staging).await;
    publish(&n, &vol, &cap, &staging, &target).await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(target.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    n.kill_node();
    // The agent goes away and comes back while no plugin watches.
    n.kill_agent();
    n.start_agent();
    n.start_node();
    std::thread::sleep(Duration::from_secs(1));
    let stats = n
        .node()
        .await
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: vol.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(!cond.abnormal, "{}", cond.message);
    // And it still watches: one more agent kill.
    n.kill_agent();
    n.start_agent();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let w = w.join().unwrap();
    assert_eq!(w.error, None, "node log:\n{}", n.log("node.log"));
    check_files(&target, &w.acked);
    unpublish(&n, &vol, &target).await;
    unstage(&n, &vol, &staging).await;
    assert_eq!(
        kernel_errors(),
        Vec::<String>::new(),
        "node log:\n{}",
        n.log("node.log")
    );
}

/// Past the dead-connection timeout the device fails I/O, the plugin's log and the volume's
/// condition say why, and once the agent is back the device serves again.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs inside the kernel VM (kernel_vm)"]
async fn vm_past_the_dead_connection_timeout() {
    assert!(in_vm());
    clear_dmesg();
    let mut n = Node::start(&["--nbd-dead-timeout", "3"]);
    let vol = create(&n, "gone", 64 * MIB).await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let (staging, target) = (n.path("st"), n.path("tg"));
    stage(&n, &vol, &cap, &staging).await;
    publish(&n, &vol, &cap, &staging, &target).await;
    n.kill_agent();
    let t = Instant::now();
    let r = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&target)
        .and_then(|mut f| {
            let mut b = AlignedBuf::new(4096);
            f.read_exact(b.as_mut())
        });
    let waited = t.elapsed();
    let e = r.expect_err("a read past the dead-connection timeout fails");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        waited >= Duration::from_secs(2),
        "failed after {waited:?}, before the timeout"
    );
    println!("read failed with {e} after {waited:?} (dead-connection timeout 3 s)");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        n.log("node.log")
            .contains("did not come back within the dead-connection timeout"),
        "{}",
        n.log("node.log")
    );
    let stats = n
        .node()
        .await
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: vol.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(
        cond.abnormal && cond.message.contains("dead-connection timeout"),
        "{cond:?}"
    );
    assert!(sh("dmesg", &[]).contains("I/O error"));
    // The agent returns: the device serves again.
    n.start_agent();
    std::thread::sleep(Duration::from_secs(1));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&target)
        .unwrap();
    let mut b = AlignedBuf::new(4096);
    f.read_exact(b.as_mut()).unwrap();
    drop(f);
    unpublish(&n, &vol, &target).await;
    unstage(&n, &vol, &staging).await;
}

/// Figures, printed: the longest stall a writer sees across an agent kill -9 + restart and
/// across an upgrade (SIGTERM, then a new binary), p50/p99 over `FLASHCOPY_VM_RESTARTS`
/// restarts (default 20). Emulated timings: for comparing restarts with each other only.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: runs inside the kernel VM with FLASHCOPY_VM_TESTS=vm_bench"]
async fn vm_bench_restart_stall() {
    assert!(in_vm());
    let rounds: usize = std::env::var("FLASHCOPY_VM_RESTARTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut n = Node::start(&[]);
    let vol = create(&n, "bench", 64 * MIB).await;
    let cap = fs_cap("ext4");
    let (staging, target) = (n.path("st"), n.path("tg"));
    stage(&n, &vol, &cap, &staging).await;
    publish(&n, &vol, &cap, &staging, &target).await;
    // The "new binary" of an upgrade: a copy at another path.
    let new_bin = n.path("flashcopy-csi-new");
    std::fs::copy(BIN, &new_bin).unwrap();
    let mut seed = 0xBE4C_u64;
    for kind in ["kill -9", "upgrade"] {
        let mut worst = Vec::new();
        for _ in 0..rounds {
            let stop = Arc::new(AtomicBool::new(false));
            let w = writer(target.clone(), stop.clone());
            std::thread::sleep(rand_ms(&mut seed, 200, 600));
            if kind == "kill -9" {
                n.kill_agent();
                n.start_agent();
            } else {
                n.stop_agent();
                n.start_agent_from(&new_bin);
            }
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Relaxed);
            let w = w.join().unwrap();
            assert_eq!(w.error, None);
            worst.push(w.longest);
        }
        worst.sort();
        let p = |q: f64| worst[((worst.len() - 1) as f64 * q).round() as usize];
        println!(
            "BENCH longest writer stall across an agent {kind} ({rounds} restarts, emulated): p50 {:?} p99 {:?} max {:?}",
            p(0.5),
            p(0.99),
            worst.last().unwrap()
        );
    }
    unpublish(&n, &vol, &target).await;
    unstage(&n, &vol, &staging).await;
}

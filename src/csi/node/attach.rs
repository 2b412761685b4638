//! Attaching an agent's NBD export as a local block device.
//!
//! Two implementations of [`Attacher`]:
//! - [`FuseLoop`]: `nbdfuse` exposes the export as a file on a FUSE mount under the state
//!   directory, and `losetup --direct-io=on` turns that file into a loop device. Works on any
//!   host with FUSE and loop devices.
//! - [`super::kernel::KernelNbd`]: the kernel nbd driver, where `/dev/nbd*` exists.
//!
//! Both are idempotent (attaching an attached volume returns its device, detaching a detached
//! one succeeds) and find their attachments again after a restart of the node plugin: the state
//! lives in the system (processes, mounts, loop devices) plus a small per-volume directory.

use super::error::{Error, Result, io_err, run};
use super::mount;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// An NBD export of the local agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The agent's NBD Unix socket.
    pub socket: PathBuf,
    /// The export name (the agent's volume id).
    pub name: String,
}

impl Export {
    /// The NBD URI (`nbd+unix:///NAME?socket=PATH`).
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            uri_escape(&self.name),
            uri_escape(&self.socket.to_string_lossy())
        )
    }
}

fn uri_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A file-name-safe form of a volume id (ids may contain `/`, `:`, ...): unreserved characters
/// stay, everything else becomes `%XX`.
pub fn key_dir(volume: &str) -> String {
    volume
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Makes the agent's exports available as block devices.
pub trait Attacher: Send + Sync + std::fmt::Debug {
    /// "fuse-loop" or "kernel-nbd".
    fn kind(&self) -> &'static str;
    /// Attaches `export` for `volume` and returns the block device; returns the existing device
    /// when `volume` is attached and healthy, and replaces a broken attachment.
    fn attach(&self, volume: &str, export: &Export) -> Result<PathBuf>;
    /// Detaches `volume`; succeeds when it is not attached. Fails with [`Error::Busy`] while the
    /// device is mounted.
    fn detach(&self, volume: &str) -> Result<()>;
    /// The device of `volume` when it is attached: `Ok(Some)` healthy, `Err(Unhealthy)` when
    /// something of it is left but broken, `Ok(None)` when nothing is.
    fn device(&self, volume: &str) -> Result<Option<PathBuf>>;
    /// The volumes with something attached (healthy or not), from the state directory.
    fn volumes(&self) -> Result<Vec<String>>;
    /// After a restart: detaches every broken attachment that nothing has mounted; returns
    /// the volumes cleaned up.
    fn recover(&self) -> Result<Vec<String>> {
        let mut cleaned = Vec::new();
        for v in self.volumes()? {
            if let Err(Error::Unhealthy(why)) = self.device(&v) {
                tracing::warn!(volume = %v, %why, "cleaning up a broken attachment");
                match self.detach(&v) {
                    Ok(()) => cleaned.push(v),
                    Err(e) => tracing::warn!(volume = %v, error = %e, "left in place"),
                }
            }
        }
        Ok(cleaned)
    }
}

/// Fails with [`Error::Busy`] when `dev` (or its device node) is mounted anywhere.
pub fn ensure_unmounted(dev: &Path) -> Result<()> {
    let mut m = mount::mounts_of(dev)?;
    m.extend(mount::binds_of_node(dev)?);
    match m.first() {
        Some(m) => Err(Error::Busy {
            device: dev.to_path_buf(),
            at: m.mount_point.clone(),
        }),
        None => Ok(()),
    }
}

/// Loop devices whose backing file is `file` (from /sys/block/loop*/loop/backing_file).
pub fn loops_backed_by(file: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim_end_matches('\n')) == file)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect();
    out.sort();
    out
}

/// A new read-only loop device over the attached device `dev`, for one read-only Block
/// publish. Binding `dev`'s node read-only would not do: a device node opens for writing on a
/// read-only mount, and a container runtime makes its own node from the device numbers. The
/// kernel itself refuses writes to a read-only loop device.
pub fn read_only_loop(dev: &Path) -> Result<PathBuf> {
    let out = run(
        "losetup",
        &[
            "--read-only".as_ref(),
            "--find".as_ref(),
            "--show".as_ref(),
            dev.as_os_str(),
        ],
    )?;
    Ok(PathBuf::from(out.trim()))
}

/// The read-only loop devices over the attached device `dev` ([`read_only_loop`]).
pub fn read_only_loops(dev: &Path) -> Vec<PathBuf> {
    let dev = std::fs::canonicalize(dev).unwrap_or_else(|_| dev.to_path_buf());
    loops_backed_by(&dev)
        .into_iter()
        .filter(|l| is_read_only_loop(l))
        .collect()
}

/// A read-only loop device over a block device: what [`read_only_loop`] makes.
fn is_read_only_loop(l: &Path) -> bool {
    let Some(name) = l.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return false;
    };
    let sys = Path::new("/sys/block").join(&name);
    let ro = std::fs::read_to_string(sys.join("ro")).is_ok_and(|r| r.trim() == "1");
    let backing = std::fs::read_to_string(sys.join("loop/backing_file")).unwrap_or_default();
    name.starts_with("loop") && ro && backing.starts_with("/dev/")
}

/// Detaches the read-only loop device `l` once no publish binds it; fails with
/// [`Error::Busy`] while one does. Anything but a [`read_only_loop`] is left alone.
pub fn release_read_only_loop(l: &Path) -> Result<()> {
    if !is_read_only_loop(l) {
        return Ok(());
    }
    ensure_unmounted(l)?;
    run("losetup", &[Path::new("-d"), l])?;
    tracing::debug!(device = %l.display(), "read-only loop detached");
    Ok(())
}

/// True when process `pid` is alive and its command line mentions `marker` (guards against a
/// recycled pid).
pub fn process_alive(pid: i32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}

/// Sends `sig` to `pid` (errors ignored: the process may be gone).
pub fn signal(pid: i32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t0.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long nbdfuse gets to connect and mount.
const NBDFUSE_START: Duration = Duration::from_secs(15);

/// `nbdfuse` + loop device. State per volume in `ROOT/<volume>/`: `fuse/` (the FUSE mount;
/// the export is `fuse/nbd`), `nbdfuse.pid`, `nbdfuse.log`.
#[derive(Debug)]
pub struct FuseLoop {
    root: PathBuf,
}

struct FuseState {
    pid: Option<i32>,
    fuse_mounted: bool,
    loops: Vec<PathBuf>,
}

impl FuseLoop {
    /// Keeps its state under `root` (created; resolved, since the kernel reports resolved
    /// paths).
    pub fn new(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(io_err("creating", root))?;
        let root = std::fs::canonicalize(root).map_err(io_err("resolving", root))?;
        Ok(Self { root })
    }

    fn dir(&self, volume: &str) -> PathBuf {
        self.root.join(key_dir(volume))
    }

    fn fuse_dir(&self, volume: &str) -> PathBuf {
        self.dir(volume).join("fuse")
    }

    fn file(&self, volume: &str) -> PathBuf {
        self.fuse_dir(volume).join("nbd")
    }

    fn state(&self, volume: &str) -> Result<FuseState> {
        let fuse = self.fuse_dir(volume);
        let marker = fuse.to_string_lossy().into_owned();
        let pid = std::fs::read_to_string(self.dir(volume).join("nbdfuse.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&p| process_alive(p, &marker));
        Ok(FuseState {
            pid,
            fuse_mounted: mount::mounted_at(&fuse)?.is_some_and(|m| m.fstype.starts_with("fuse")),
            loops: loops_backed_by(&self.file(volume)),
        })
    }

    fn start_nbdfuse(&self, volume: &str, export: &Export) -> Result<()> {
        let dir = self.dir(volume);
        let fuse = self.fuse_dir(volume);
        std::fs::create_dir_all(&fuse).map_err(io_err("creating", &fuse))?;
        let pidfile = dir.join("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let log_path = dir.join("nbdfuse.log");
        let log = std::fs::File::create(&log_path).map_err(io_err("creating", &log_path))?;
        let log2 = log.try_clone().map_err(io_err("opening", &log_path))?;
        let mut child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(format!("{}/", fuse.display()))
            .arg(export.uri())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a signal to the node plugin's group does not take the
            // volumes' data path down with it.
            .process_group(0)
            .spawn()
            .map_err(io_err("starting", Path::new("nbdfuse")))?;
        let mut exited = None;
        let ready = wait_until(NBDFUSE_START, || {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                return true;
            }
            std::fs::metadata(&pidfile).is_ok_and(|m| m.len() > 0)
        });
        if let Some(st) = exited {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(Error::Command {
                cmd: format!("nbdfuse {}", export.uri()),
                status: st.to_string(),
                stderr: log.trim().to_string(),
            });
        }
        // Reap it whenever it ends (after the unmount in detach).
        std::thread::spawn(move || child.wait());
        if !ready {
            return Err(Error::Timeout(format!(
                "nbdfuse did not mount {} within {NBDFUSE_START:?}",
                export.uri()
            )));
        }
        Ok(())
    }
}

impl Attacher for FuseLoop {
    fn kind(&self) -> &'static str {
        "fuse-loop"
    }

    fn attach(&self, volume: &str, export: &Export) -> Result<PathBuf> {
        match self.device(volume) {
            Ok(Some(dev)) => return Ok(dev),
            Ok(None) => {}
            Err(Error::Unhealthy(why)) => {
                tracing::warn!(volume, %why, "replacing a broken attachment");
                self.detach(volume)?;
            }
            Err(e) => return Err(e),
        }
        let attached = self.start_nbdfuse(volume, export).and_then(|()| {
            let file = self.file(volume);
            let size = std::fs::metadata(&file)
                .map_err(io_err("inspecting", &file))?
                .len();
            if size == 0 {
                return Err(Error::Unhealthy(format!("{} is empty", export.uri())));
            }
            let out = run(
                "losetup",
                &[
                    "--direct-io=on".as_ref(),
                    "--find".as_ref(),
                    "--show".as_ref(),
                    file.as_os_str(),
                ],
            )?;
            Ok(PathBuf::from(out.trim()))
        });
        match attached {
            Ok(dev) => {
                tracing::info!(volume, device = %dev.display(), uri = export.uri(), "attached");
                Ok(dev)
            }
            Err(e) => {
                let _ = self.detach(volume);
                Err(e)
            }
        }
    }

    fn detach(&self, volume: &str) -> Result<()> {
        let dir = self.dir(volume);
        if !dir.exists() {
            return Ok(());
        }
        let st = self.state(volume)?;
        for dev in &st.loops {
            ensure_unmounted(dev)?;
        }
        for dev in &st.loops {
            run("losetup", &[Path::new("-d"), dev])?;
        }
        let fuse = self.fuse_dir(volume);
        if st.fuse_mounted {
            // A clean unmount makes nbdfuse flush and exit; a dead one needs a lazy unmount.
            if mount::unmount(&fuse).is_err() {
                mount::unmount_lazy(&fuse)?;
            }
        }
        if let Some(pid) = st.pid {
            let marker = fuse.to_string_lossy().into_owned();
            if !wait_until(Duration::from_secs(5), || !process_alive(pid, &marker)) {
                signal(pid, rustix::process::Signal::KILL);
            }
        }
        for f in ["nbdfuse.pid", "nbdfuse.log"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        // Never recursive: a stale mount could still sit on `fuse`.
        let _ = std::fs::remove_dir(&fuse);
        std::fs::remove_dir(&dir).map_err(io_err("removing", &dir))?;
        tracing::info!(volume, "detached");
        Ok(())
    }

    fn device(&self, volume: &str) -> Result<Option<PathBuf>> {
        if !self.dir(volume).exists() {
            return Ok(None);
        }
        let st = self.state(volume)?;
        match (st.pid, st.fuse_mounted, st.loops.as_slice()) {
            (None, false, []) => Ok(None),
            (Some(_), true, [dev]) => Ok(Some(dev.clone())),
            (pid, fuse, loops) => Err(Error::Unhealthy(format!(
                "attachment of {volume} is broken: nbdfuse {}, FUSE mount {}, {} loop device(s)",
                if pid.is_some() {
                    "running"
                } else {
                    "not running"
                },
                if fuse { "present" } else { "absent" },
                loops.len()
            ))),
        }
    }

    fn volumes(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(&self.root).map_err(io_err("listing", &self.root))?;
        Ok(rd
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| unkey(&e.file_name().to_string_lossy()))
            .collect())
    }
}

/// Inverse of [`key_dir`].
pub fn unkey(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_are_file_names() {
        for v in ["node-a/3", "x:y%z", "plain-1.2_3", "späť"] {
            let k = key_dir(v);
            assert!(!k.contains('/'), "{k}");
            assert_eq!(unkey(&k).as_deref(), Some(v));
        }
    }

    #[test]
    fn uris_escape_names_and_paths() {
        let e = Export {
            socket: "/tmp/a b/nbd.sock".into(),
            name: "7".into(),
        };
        assert_eq!(e.uri(), "nbd+unix:///7?socket=/tmp/a%20b/nbd.sock");
    }
}

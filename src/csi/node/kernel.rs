//! The kernel nbd driver as an [`Attacher`], quarantined here. Everything goes through the
//! driver's generic netlink family (`nbd`, see [`super::genl`]); no `nbd-client` is needed.
//!
//! A device outlives the agent: it is attached with a dead-connection timeout, so when the
//! agent dies the kernel keeps the device and queues its I/O instead of failing it. A watcher
//! thread listens to the driver's `LINK_DEAD` notifications and, as soon as the agent serves
//! again, hands the kernel fresh connections to the same export (handshake done here, socket
//! passed by `NBD_CMD_RECONFIGURE`). Requests that were in flight when the agent died are
//! requeued by the kernel after the I/O timeout and sent on the new connections.
//!
//! What is on which device is recorded in `ROOT/<volume>/attachment.json` and in the device's
//! backend identifier (`/sys/block/nbdN/backend`), so a restarted node plugin finds its devices
//! again and reconnects any whose agent went away meanwhile.

use super::attach::{Attacher, Export, ensure_unmounted, key_dir, unkey};
use super::error::{Error, Result, io_err};
use super::genl::{self, Attrs};
use crate::nbd::{FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const FAMILY: &str = "nbd";
const MC_GROUP: &str = "nbd_mc_group";
const VERSION: u8 = 1;
const CMD_CONNECT: u8 = 1;
const CMD_DISCONNECT: u8 = 2;
const CMD_RECONFIGURE: u8 = 3;
const CMD_LINK_DEAD: u8 = 4;
const ATTR_INDEX: u16 = 1;
const ATTR_SIZE_BYTES: u16 = 2;
const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const ATTR_TIMEOUT: u16 = 4;
const ATTR_SERVER_FLAGS: u16 = 5;
const ATTR_SOCKETS: u16 = 7;
const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const ATTR_BACKEND_IDENTIFIER: u16 = 10;
const SOCK_ITEM: u16 = 1;
const SOCK_FD: u16 = 1;
const BLOCK_SIZE: u64 = 4096;
/// How long one connection's handshake may take before the attempt is retried.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(5);
/// How often a dead device is retried while its agent is away.
const RETRY: Duration = Duration::from_millis(100);

/// True when this host can attach through the kernel nbd driver (the module is loaded and its
/// netlink family answers).
pub fn available() -> bool {
    Path::new("/sys/module/nbd").exists()
        && genl::Socket::open(0)
            .and_then(|mut s| s.family(FAMILY))
            .is_ok()
}

/// How kernel devices are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelConfig {
    /// Connections per device: one per CPU up to this...
    pub max_connections: usize,
    /// ...unless this says how many.
    pub connections: Option<usize>,
    /// How long the kernel keeps a device's I/O queued while no connection is alive (the
    /// agent's restart budget); past it the device fails I/O.
    pub dead_timeout: Duration,
    /// How long a request may go unanswered before the kernel drops its connection and sends
    /// it again on a new one (also how long a request caught in an agent crash waits).
    pub io_timeout: Duration,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            max_connections: 4,
            connections: None,
            dead_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(5),
        }
    }
}

impl KernelConfig {
    fn connections(&self) -> usize {
        if let Some(n) = self.connections {
            return n.max(1);
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        cpus.clamp(1, self.max_connections.max(1))
    }
}

/// What `ROOT/<volume>/attachment.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    index: u32,
    socket: PathBuf,
    export: String,
    size: u64,
    connections: usize,
}

impl Record {
    fn device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }
}

fn backend_id(volume: &str) -> String {
    format!("flashcopy-csi:{}", key_dir(volume))
}

fn sys(index: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/nbd{index}"))
}

/// True while the kernel holds a configuration for `nbdN` (it has connections, live or
/// waiting for a reconnect).
fn configured(index: u32) -> bool {
    sys(index).join("pid").exists()
}

/// The backend identifier the device was attached with, when the kernel reports one.
fn backend_of(index: u32) -> Option<String> {
    std::fs::read_to_string(sys(index).join("backend"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// Opens `n` connections to `export`, each past the NBD handshake; returns them with the
/// export's size and transmission flags.
fn connect(export: &Export, n: usize) -> std::io::Result<(Vec<UnixStream>, u64, u16)> {
    let mut socks = Vec::with_capacity(n);
    let mut info = (0, 0);
    for _ in 0..n {
        let mut s = UnixStream::connect(&export.socket)?;
        s.set_read_timeout(Some(HANDSHAKE_LIMIT))?;
        s.set_write_timeout(Some(HANDSHAKE_LIMIT))?;
        info = crate::nbd::client::handshake(&mut s, &export.name)?;
        // The kernel reads and writes this socket itself: it must block as the driver expects.
        s.set_read_timeout(None)?;
        s.set_write_timeout(None)?;
        socks.push(s);
    }
    Ok((socks, info.0, info.1))
}

fn sockets_attr(socks: &[UnixStream]) -> Attrs {
    let mut list = Attrs::default();
    for s in socks {
        let mut item = Attrs::default();
        item.u32(SOCK_FD, s.as_raw_fd() as u32);
        list.nested(SOCK_ITEM, &item);
    }
    list
}

/// The driver's netlink family, resolved once.
#[derive(Debug)]
struct Driver {
    family: u16,
    group: Option<u32>,
}

impl Driver {
    fn resolve() -> std::io::Result<Self> {
        let f = genl::Socket::open(0)?.family(FAMILY)?;
        let group = f.groups.iter().find(|(n, _)| n == MC_GROUP).map(|g| g.1);
        Ok(Self {
            family: f.id,
            group,
        })
    }

    fn request(&self, cmd: u8, attrs: &Attrs) -> std::io::Result<Vec<genl::Message>> {
        genl::Socket::open(0)?.request(self.family, cmd, VERSION, attrs)
    }

    /// Replaces the dead connections of `rec`'s device with fresh ones (live ones stay; the
    /// kernel drops the extra sockets).
    fn reconnect(&self, volume: &str, rec: &Record) -> std::result::Result<(), String> {
        let export = Export {
            socket: rec.socket.clone(),
            name: rec.export.clone(),
        };
        let (socks, size, _) =
            connect(&export, rec.connections).map_err(|e| format!("{}: {e}", export.uri()))?;
        if size != rec.size {
            return Err(format!(
                "{} is {size} bytes now, the device was attached at {}; not reconnecting",
                export.uri(),
                rec.size
            ));
        }
        let mut a = Attrs::default();
        a.u32(ATTR_INDEX, rec.index)
            .str(ATTR_BACKEND_IDENTIFIER, &backend_id(volume))
            .nested(ATTR_SOCKETS, &sockets_attr(&socks));
        self.request(CMD_RECONFIGURE, &a)
            .map(|_| ())
            .map_err(|e| format!("NBD_CMD_RECONFIGURE of /dev/nbd{}: {e}", rec.index))
    }
}

/// A device whose connections died: since when, and whether its timeout was reported.
#[derive(Debug, Clone, Copy)]
struct Dead {
    since: Instant,
    last_try: Option<Instant>,
    reported: bool,
    /// A check without a notification (start-up, missed notifications): the device may
    /// well be alive, and a reconnect then changes nothing.
    probe: bool,
}

impl Dead {
    fn now(probe: bool) -> Self {
        Self {
            since: Instant::now(),
            last_try: None,
            reported: false,
            probe,
        }
    }
}

/// State shared by the attacher and its watcher thread.
#[derive(Debug, Default)]
struct Shared {
    /// Devices waiting for their agent, by index.
    dead: Mutex<HashMap<u32, Dead>>,
    stop: AtomicBool,
}

/// Kernel nbd attachments, with their records under `root`.
#[derive(Debug)]
pub struct KernelNbd {
    root: PathBuf,
    cfg: KernelConfig,
    driver: Arc<Driver>,
    shared: Arc<Shared>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl KernelNbd {
    /// Keeps its records under `root` (created), starts the watcher and reconnects any device
    /// of an earlier run whose agent went away while nobody watched.
    pub fn new(root: &Path, cfg: KernelConfig) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(io_err("creating", root))?;
        let driver = Arc::new(Driver::resolve().map_err(|e| {
            Error::Unhealthy(format!("the kernel nbd driver's netlink family: {e}"))
        })?);
        let shared = Arc::new(Shared::default());
        let mut me = Self {
            root: root.to_path_buf(),
            cfg,
            driver,
            shared,
            watcher: None,
        };
        me.watcher = Some(me.start_watcher()?);
        // Notifications missed while no plugin ran: a reconnect replaces only dead connections.
        sweep(&me.root, &me.shared);
        Ok(me)
    }

    fn dir(&self, volume: &str) -> PathBuf {
        self.root.join(key_dir(volume))
    }

    fn record_path(&self, volume: &str) -> PathBuf {
        self.dir(volume).join(RECORD)
    }

    fn record(&self, volume: &str) -> Option<Record> {
        read_record(&self.dir(volume))
    }

    fn start_watcher(&self) -> Result<std::thread::JoinHandle<()>> {
        let mc = match self.driver.group {
            Some(g @ 1..=32) => genl::Socket::open(1 << (g - 1)),
            Some(g) => Err(std::io::Error::other(format!(
                "multicast group {g} is beyond the bind mask"
            ))),
            None => Err(std::io::Error::other(
                "the nbd family has no multicast group",
            )),
        };
        let mc = match mc {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no LINK_DEAD notifications: sweeping every device each second instead");
                None
            }
        };
        if let Some(s) = &mc {
            s.set_recv_timeout(Some(RETRY))
                .map_err(|e| Error::Unhealthy(format!("netlink receive timeout: {e}")))?;
        }
        let (root, cfg, driver, shared) = (
            self.root.clone(),
            self.cfg,
            self.driver.clone(),
            self.shared.clone(),
        );
        std::thread::Builder::new()
            .name("nbd-watch".into())
            .spawn(move || watch(root, cfg, driver, shared, mc))
            .map_err(|e| Error::Unhealthy(format!("starting the nbd watcher: {e}")))
    }
}

impl Drop for KernelNbd {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

const RECORD: &str = "attachment.json";

fn read_record(dir: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()
}

/// Every attachment recorded under `root`: `(volume, record)`.
fn records(root: &Path) -> Vec<(String, Record)> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let v = unkey(&e.file_name().to_string_lossy())?;
            Some((v, read_record(&e.path())?))
        })
        .collect()
}

/// The volume whose record names device `index`, with the record.
fn owner(root: &Path, index: u32) -> Option<(String, Record)> {
    records(root)
        .into_iter()
        .find(|(_, rec)| rec.index == index)
}

/// The watcher: marks devices dead on the driver's notifications and reconnects them as soon
/// as their agent answers; reports a device whose agent stays away past the dead timeout.
fn watch(
    root: PathBuf,
    cfg: KernelConfig,
    driver: Arc<Driver>,
    shared: Arc<Shared>,
    mut mc: Option<genl::Socket>,
) {
    let mut last_sweep = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        match &mut mc {
            Some(s) => match s.recv() {
                Ok(Some(m)) if m.cmd == CMD_LINK_DEAD => {
                    if let Some(i) = genl::attr(&m.attrs, ATTR_INDEX).and_then(genl::as_u32) {
                        tracing::warn!(device = %format!("/dev/nbd{i}"), "NBD connection lost; waiting for the agent");
                        let mut dead = shared.dead.lock();
                        let d = dead.entry(i).or_insert(Dead::now(false));
                        d.probe = false;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // Notifications may have been dropped (ENOBUFS): check every device.
                    tracing::warn!(error = %e, "netlink notifications interrupted; checking every device");
                    sweep(&root, &shared);
                }
            },
            None => {
                std::thread::sleep(RETRY);
                if last_sweep.elapsed() >= Duration::from_secs(1) {
                    last_sweep = Instant::now();
                    sweep(&root, &shared);
                }
            }
        }
        let due: Vec<(u32, Dead)> = shared
            .dead
            .lock()
            .iter()
            .filter(|(_, d)| d.last_try.is_none_or(|t| t.elapsed() >= RETRY))
            .map(|(i, d)| (*i, *d))
            .collect();
        for (index, d) in due {
            let Some((volume, rec)) = owner(&root, index).filter(|_| configured(index)) else {
                // Detached meanwhile, or not ours.
                shared.dead.lock().remove(&index);
                continue;
            };
            match driver.reconnect(&volume, &rec) {
                Ok(()) if d.probe => {
                    shared.dead.lock().remove(&index);
                    tracing::debug!(volume, device = %rec.device().display(), "connections checked");
                }
                Ok(()) => {
                    shared.dead.lock().remove(&index);
                    tracing::info!(
                        volume,
                        device = %rec.device().display(),
                        waited_ms = d.since.elapsed().as_millis() as u64,
                        connections = rec.connections,
                        "NBD connections restored"
                    );
                }
                Err(why) => {
                    let mut dead = shared.dead.lock();
                    let Some(e) = dead.get_mut(&index) else {
                        continue;
                    };
                    e.last_try = Some(Instant::now());
                    // No agent answering means the connections are dead, whatever sent us.
                    e.probe = false;
                    if !e.reported && !e.probe && e.since.elapsed() >= cfg.dead_timeout {
                        e.reported = true;
                        tracing::error!(
                            volume,
                            device = %rec.device().display(),
                            timeout_s = cfg.dead_timeout.as_secs(),
                            %why,
                            "the agent did not come back within the dead-connection timeout: \
                             the kernel now fails I/O on this device until it does"
                        );
                    } else {
                        tracing::debug!(volume, %why, "agent not back yet");
                    }
                }
            }
        }
    }
}

/// Marks every recorded, configured device for a reconnect attempt (replaces only dead
/// connections).
fn sweep(root: &Path, shared: &Shared) {
    for (_, rec) in records(root) {
        if configured(rec.index) {
            shared
                .dead
                .lock()
                .entry(rec.index)
                .or_insert(Dead::now(true));
        }
    }
}

impl Attacher for KernelNbd {
    fn kind(&self) -> &'static str {
        "kernel-nbd"
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
        let n = self.cfg.connections();
        let (socks, size, flags) = connect(export, n)
            .map_err(|e| Error::Unhealthy(format!("connecting to {}: {e}", export.uri())))?;
        let n = if flags & FLAG_CAN_MULTI_CONN == 0 {
            1
        } else {
            n
        };
        let mut a = Attrs::default();
        a.u64(ATTR_SIZE_BYTES, size)
            .u64(ATTR_BLOCK_SIZE_BYTES, BLOCK_SIZE)
            .u64(ATTR_TIMEOUT, self.cfg.io_timeout.as_secs().max(1))
            .u64(ATTR_DEAD_CONN_TIMEOUT, self.cfg.dead_timeout.as_secs())
            .u64(ATTR_SERVER_FLAGS, u64::from(flags))
            .str(ATTR_BACKEND_IDENTIFIER, &backend_id(volume))
            .nested(ATTR_SOCKETS, &sockets_attr(&socks[..n]));
        let replies = self
            .driver
            .request(CMD_CONNECT, &a)
            .map_err(|e| Error::Unhealthy(format!("NBD_CMD_CONNECT of {}: {e}", export.uri())))?;
        let index = replies
            .iter()
            .find_map(|m| genl::attr(&m.attrs, ATTR_INDEX).and_then(genl::as_u32))
            .ok_or_else(|| Error::Unhealthy("NBD_CMD_CONNECT returned no device index".into()))?;
        // The kernel holds its own references to the sockets now.
        drop(socks);
        let rec = Record {
            index,
            socket: export.socket.clone(),
            export: export.name.clone(),
            size,
            connections: n,
        };
        let dir = self.dir(volume);
        let written = std::fs::create_dir_all(&dir)
            .map_err(io_err("creating", &dir))
            .and_then(|()| {
                let path = self.record_path(volume);
                let tmp = path.with_extension("tmp");
                let body = serde_json::to_vec(&rec).unwrap_or_default();
                std::fs::write(&tmp, body).map_err(io_err("writing", &tmp))?;
                std::fs::rename(&tmp, &path).map_err(io_err("writing", &path))
            });
        if let Err(e) = written {
            let _ = disconnect(&self.driver, index);
            return Err(e);
        }
        tracing::info!(
            volume,
            device = %rec.device().display(),
            uri = export.uri(),
            connections = n,
            read_only = flags & FLAG_READ_ONLY != 0,
            "attached (kernel nbd)"
        );
        Ok(rec.device())
    }

    fn detach(&self, volume: &str) -> Result<()> {
        let Some(rec) = self.record(volume) else {
            let dir = self.dir(volume);
            if dir.exists() {
                let _ = std::fs::remove_file(self.record_path(volume));
                let _ = std::fs::remove_dir(&dir);
            }
            return Ok(());
        };
        let dev = rec.device();
        if configured(rec.index) && backend_of(rec.index).is_none_or(|b| b == backend_id(volume)) {
            ensure_unmounted(&dev)?;
            disconnect(&self.driver, rec.index).map_err(|e| {
                Error::Unhealthy(format!("NBD_CMD_DISCONNECT of {}: {e}", dev.display()))
            })?;
            // The kernel tears the configuration down once its last user is gone.
            super::attach::wait_until(Duration::from_secs(5), || !configured(rec.index));
        }
        self.shared.dead.lock().remove(&rec.index);
        let path = self.record_path(volume);
        std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
        let _ = std::fs::remove_dir(self.dir(volume));
        tracing::info!(volume, device = %dev.display(), "detached (kernel nbd)");
        Ok(())
    }

    fn device(&self, volume: &str) -> Result<Option<PathBuf>> {
        let Some(rec) = self.record(volume) else {
            return Ok(None);
        };
        let dev = rec.device();
        if !configured(rec.index) {
            return Err(Error::Unhealthy(format!(
                "{} of {volume} is no longer connected",
                dev.display()
            )));
        }
        if backend_of(rec.index).is_some_and(|b| b != backend_id(volume)) {
            return Err(Error::Unhealthy(format!(
                "{} now serves another backend",
                dev.display()
            )));
        }
        if let Some(d) = self.shared.dead.lock().get(&rec.index)
            && !d.probe
            && d.since.elapsed() >= self.cfg.dead_timeout
        {
            return Err(Error::Unhealthy(format!(
                "{} of {volume} has had no agent for {} s (dead-connection timeout {} s): \
                     the kernel fails its I/O until the agent is back",
                dev.display(),
                d.since.elapsed().as_secs(),
                self.cfg.dead_timeout.as_secs()
            )));
        }
        Ok(Some(dev))
    }

    fn volumes(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(&self.root).map_err(io_err("listing", &self.root))?;
        Ok(rd
            .flatten()
            .filter_map(|e| unkey(&e.file_name().to_string_lossy()))
            .collect())
    }
}

fn disconnect(driver: &Driver, index: u32) -> std::io::Result<()> {
    let mut a = Attrs::default();
    a.u32(ATTR_INDEX, index);
    driver.request(CMD_DISCONNECT, &a).map(|_| ())
}

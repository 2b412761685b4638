//! What the server serves ([`Export`], [`Exports`], with implementations over the volume
//! [`Pool`]) and how connections are accepted ([`serve_unix`], [`serve_tcp`],
//! [`serve_connection`]).

use super::{handshake, transmission};
use crate::engine::{EngineError, VolId};
use crate::store::StoreError;
use crate::volume::{Pool, VolumeError};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Why an export refused or failed an operation. The server turns it into an NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The range reaches past the end of the export (`NBD_ENOSPC` for writes, `NBD_EINVAL`
    /// otherwise).
    #[error("range {offset}+{len} is outside the export of {size} bytes")]
    OutOfRange {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// A write to a read-only export (`NBD_EPERM`).
    #[error("the export is read-only")]
    ReadOnly,
    /// The request is not acceptable, e.g. misaligned for the backing device (`NBD_EINVAL`).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The backing storage is full (`NBD_ENOSPC`).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The backing storage failed or is offline (`NBD_EIO`).
    #[error("I/O error: {0}")]
    Io(String),
}

impl From<StoreError> for ExportError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::OutOfRange { offset, len, size } => {
                ExportError::OutOfRange { offset, len, size }
            }
            StoreError::Unaligned { .. } => ExportError::Invalid(e.to_string()),
            StoreError::Io(ref io)
                if matches!(
                    io.raw_os_error(),
                    Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
                ) =>
            {
                ExportError::NoSpace(e.to_string())
            }
            other => ExportError::Io(other.to_string()),
        }
    }
}

impl From<VolumeError> for ExportError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::Engine(EngineError::OutOfRange {
                offset, len, size, ..
            }) => ExportError::OutOfRange { offset, len, size },
            VolumeError::Store(s) => s.into(),
            // Offline volumes, volumes deleted under a connection, a poisoned pool: the data
            // cannot be reached, which the client sees as an I/O error.
            other => ExportError::Io(other.to_string()),
        }
    }
}

/// One exported block device: a range of bytes with read, write and flush.
///
/// Called from several threads at once (one connection runs requests in parallel, and several
/// connections may serve the same export); writes to overlapping ranges in flight at the same
/// time may land in either order, as on any disk.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;
    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError>;
    /// Makes every completed write durable, whichever connection issued it.
    fn flush(&self) -> Result<(), ExportError>;
    /// The client no longer needs the range (advisory: doing nothing is correct).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    /// The range reads as zeros afterwards; with `fua` that is durable on return.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError>;
    /// Writes are refused with `NBD_EPERM` and the export is advertised read-only.
    fn read_only(&self) -> bool {
        false
    }
    /// The smallest addressable unit advertised to clients (a power of two, 1..=65536).
    fn min_block_size(&self) -> u32 {
        1
    }
    /// The canonical name, when it may differ from the name the client asked for.
    fn canonical_name(&self) -> Option<String> {
        None
    }
    /// A human-readable description (`NBD_INFO_DESCRIPTION`).
    fn description(&self) -> Option<String> {
        None
    }
}

/// The exports a server offers, by name.
pub trait Exports: Send + Sync {
    /// The export called `name` (the empty name asks for a default export, if any).
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Names of all exports (`NBD_OPT_LIST`).
    fn list(&self) -> Vec<String>;
}

/// A volume of a [`Pool`] as an export. Reads and writes go through the pool, so FlashCopy
/// semantics hold for everything the client does.
#[derive(Clone, Debug)]
pub struct PoolExport {
    pool: Arc<Pool>,
    vol: VolId,
    read_only: bool,
}

/// Largest zero buffer used for `write_zeroes`; also the alignment of its chunks, so that
/// every chunk but the first and the last covers whole grains.
const ZERO_CHUNK: u64 = 1 << 20;

impl PoolExport {
    /// Exports `vol` read-write.
    pub fn new(pool: Arc<Pool>, vol: VolId) -> Self {
        Self {
            pool,
            vol,
            read_only: false,
        }
    }

    /// Makes the export read-only (or not).
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The exported volume.
    pub fn volume(&self) -> VolId {
        self.vol
    }

    fn writable(&self) -> Result<(), ExportError> {
        if self.read_only {
            Err(ExportError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl Export for PoolExport {
    fn size(&self) -> u64 {
        self.pool.engine().volume(self.vol).map_or(0, |v| v.size)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        Ok(self.pool.read(self.vol, offset, buf)?)
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.writable()?;
        self.pool.write(self.vol, offset, data)?;
        if fua {
            self.pool.flush(self.vol)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        Ok(self.pool.flush(self.vol)?)
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), ExportError> {
        self.writable()?;
        // Advisory. Discarding the store directly would bypass copy-on-write and change what
        // snapshots of this volume read, so nothing is dropped.
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ExportError::OutOfRange { offset, len, size }),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), ExportError> {
        self.writable()?;
        let size = self.size();
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= size)
            .ok_or(ExportError::OutOfRange { offset, len, size })?;
        // Zeros go through `Pool::write` like any data so that snapshots keep their images.
        let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut pos = offset;
        while pos < end {
            let stop = ((pos / ZERO_CHUNK + 1) * ZERO_CHUNK).min(end);
            self.pool
                .write(self.vol, pos, &zeros[..(stop - pos) as usize])?;
            pos = stop;
        }
        if fua {
            self.pool.flush(self.vol)?;
        }
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn min_block_size(&self) -> u32 {
        // Volumes are sized in sectors; a raw block device store needs sector alignment.
        crate::engine::SECTOR as u32
    }

    fn canonical_name(&self) -> Option<String> {
        self.pool.engine().volume(self.vol).map(|v| v.name.clone())
    }

    fn description(&self) -> Option<String> {
        let e = self.pool.engine();
        let v = e.volume(self.vol)?;
        Some(format!(
            "flashcopy-csi volume {} ({}), {} bytes",
            v.name, v.id, v.size
        ))
    }
}

/// Every volume of the pool, by name; a volume can also be named by its numeric id (`"3"` for
/// `vol3`). There is no default export.
impl Exports for Arc<Pool> {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        let vol = {
            let e = self.engine();
            match e.volume_by_name(name) {
                Some(v) => v.id,
                None => {
                    let id = name.parse::<u64>().ok().map(VolId)?;
                    e.volume(id)?.id
                }
            }
        };
        Some(Arc::new(super::metered::Metered::new(
            PoolExport::new(self.clone(), vol),
            self.clone(),
            vol,
        )))
    }

    fn list(&self) -> Vec<String> {
        self.engine().volumes().map(|v| v.name.clone()).collect()
    }
}

/// Tuning of a connection.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Threads per connection that execute requests and send replies (at least 1).
    pub workers: usize,
    /// Write payload bytes a connection may hold in flight (received, not yet answered) before
    /// it stops reading from the client. One request of up to 32 MiB is always admitted.
    pub max_in_flight_bytes: usize,
    /// Requests a connection may hold in flight before it stops reading from the client.
    pub max_in_flight_requests: usize,
    /// READs and WRITEs up to this many bytes (without FUA) are executed by the thread that
    /// reads the connection, with their replies batched, as long as such requests take less
    /// than [`ServerConfig::inline_max_latency`] on average; everything else goes to the
    /// workers. 0 sends every request to the workers.
    pub inline_max_len: u32,
    /// See [`ServerConfig::inline_max_len`].
    pub inline_max_latency: Duration,
    /// On shutdown, how long connections may take to answer the requests they have received
    /// before they are closed outright (a client that does not read its replies would
    /// otherwise hold them forever).
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            // As many as a client's usual queue depth: slow writes (first writes after a
            // snapshot, each waiting for a sync) then share commit rounds instead of queueing
            // behind four. Idle workers only sleep; small fast requests never reach them.
            workers: 16,
            max_in_flight_bytes: 64 << 20,
            max_in_flight_requests: 512,
            inline_max_len: 64 << 10,
            inline_max_latency: Duration::from_micros(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

type Waker = Box<dyn Fn() + Send>;

#[derive(Default)]
struct ShutdownInner {
    triggered: AtomicBool,
    wakers: Mutex<(u64, BTreeMap<u64, Waker>)>,
}

/// Stops a server: [`Shutdown::trigger`] makes `serve_unix` / `serve_tcp` stop accepting, lets
/// every connection finish the requests it has already received, closes the connections and
/// returns. Clones share the same signal.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<ShutdownInner>);

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("triggered", &self.is_triggered())
            .finish()
    }
}

impl Shutdown {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the signal (idempotent).
    pub fn trigger(&self) {
        if self.0.triggered.swap(true, Ordering::SeqCst) {
            return;
        }
        let wakers = std::mem::take(&mut self.0.wakers.lock().1);
        for w in wakers.into_values() {
            w();
        }
    }

    /// True once [`Shutdown::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.0.triggered.load(Ordering::SeqCst)
    }

    /// Runs `f` when the signal fires (at once if it already has), unless the guard is dropped
    /// first.
    fn on_trigger(&self, f: Waker) -> WakerGuard<'_> {
        let id = {
            let mut w = self.0.wakers.lock();
            w.0 += 1;
            let id = w.0;
            w.1.insert(id, f);
            id
        };
        // A trigger between the check and the insert would have missed this waker.
        let missed = if self.is_triggered() {
            self.0.wakers.lock().1.remove(&id)
        } else {
            None
        };
        if let Some(f) = missed {
            f();
        }
        WakerGuard { shutdown: self, id }
    }
}

struct WakerGuard<'a> {
    shutdown: &'a Shutdown,
    id: u64,
}

impl Drop for WakerGuard<'_> {
    fn drop(&mut self) {
        self.shutdown.0.wakers.lock().1.remove(&self.id);
    }
}

/// Serves one connection: the handshake, then requests until the client disconnects.
///
/// `reader` and `writer` are the two directions of the same connection (for a socket, pass
/// `s.try_clone()?` and `s`): requests are read by the calling thread while
/// [`ServerConfig::workers`] threads execute them and write the replies, possibly out of order.
/// Returns `Ok` when the client ends the session cleanly (`NBD_OPT_ABORT`, `NBD_CMD_DISC`, or
/// closing between messages) and an error for I/O failures and protocol violations (the
/// connection must then be dropped). Requests received before the end are always answered.
pub fn serve_connection<R, W>(
    reader: R,
    writer: W,
    exports: &dyn Exports,
    config: &ServerConfig,
) -> io::Result<()>
where
    R: Read + Send,
    W: Write + Send,
{
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let mut writer = writer;
    match handshake::negotiate(&mut reader, &mut writer, exports)? {
        handshake::Outcome::Closed => Ok(()),
        handshake::Outcome::Transmission {
            export,
            size,
            flags,
        } => transmission::run(reader, writer, &*export, size, flags, config),
    }
}

/// A socket the accept loop can serve.
trait Socket: Read + Write + Send + Sync + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn shut(&self, how: std::net::Shutdown);
}

impl Socket for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shut(&self, how: std::net::Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl Socket for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn shut(&self, how: std::net::Shutdown) {
        let _ = self.shutdown(how);
    }
}

/// Accepts NBD connections on a Unix socket until `shutdown` fires; each connection gets its
/// own thread. Returns after every connection has ended.
///
/// Shutdown wakes the blocked `accept` by connecting to the listener's path, so the socket
/// file must stay in place until this returns.
pub fn serve_unix(
    listener: UnixListener,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    shutdown: Shutdown,
) -> io::Result<()> {
    let path = listener.local_addr()?.as_pathname().map(|p| p.to_owned());
    let wake: Waker = Box::new(move || {
        if let Some(p) = &path {
            let _ = UnixStream::connect(p);
        }
    });
    accept_loop(
        || listener.accept().map(|(s, _)| s),
        |_| {},
        wake,
        exports,
        config,
        shutdown,
    )
}

/// Accepts NBD connections on TCP until `shutdown` fires (see [`serve_unix`]). Nagle's
/// algorithm is disabled on every connection, as the protocol recommends.
pub fn serve_tcp(
    listener: TcpListener,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    shutdown: Shutdown,
) -> io::Result<()> {
    let mut addr = listener.local_addr()?;
    match addr {
        SocketAddr::V4(ref mut a) if a.ip().is_unspecified() => a.set_ip(Ipv4Addr::LOCALHOST),
        SocketAddr::V6(ref mut a) if a.ip().is_unspecified() => a.set_ip(Ipv6Addr::LOCALHOST),
        _ => {}
    }
    let wake: Waker = Box::new(move || {
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    });
    accept_loop(
        || listener.accept().map(|(s, _)| s),
        |s: &TcpStream| {
            let _ = s.set_nodelay(true);
        },
        wake,
        exports,
        config,
        shutdown,
    )
}

static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

fn accept_loop<S: Socket>(
    accept: impl Fn() -> io::Result<S>,
    prepare: impl Fn(&S),
    wake: Waker,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    shutdown: Shutdown,
) -> io::Result<()> {
    let _wake = shutdown.on_trigger(wake);
    // Each running connection with a handle on its socket, to force it closed at the end.
    let mut conns: Vec<(JoinHandle<()>, S)> = Vec::new();
    let result = loop {
        let accepted = accept();
        if shutdown.is_triggered() {
            break Ok(());
        }
        let stream = match accepted {
            Ok(s) => s,
            Err(e) if transient_accept_error(&e) => {
                tracing::warn!(error = %e, "nbd: accept failed; retrying");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => break Err(e),
        };
        prepare(&stream);
        let (finished, running): (Vec<_>, Vec<_>) =
            conns.into_iter().partition(|(h, _)| h.is_finished());
        conns = running;
        for (h, _) in finished {
            let _ = h.join();
        }
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "nbd: cannot clone an accepted socket");
                continue;
            }
        };
        let id = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        let (exports, config, shutdown) = (exports.clone(), config.clone(), shutdown.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || connection(id, stream, &*exports, &config, &shutdown));
        match spawned {
            Ok(h) => conns.push((h, handle)),
            Err(e) => tracing::warn!(error = %e, "nbd: cannot start a connection thread"),
        }
    };
    // Connections still running were woken by the same signal (or, after an accept error,
    // are told now) and end once their in-flight requests are answered.
    shutdown.trigger();
    let deadline = std::time::Instant::now() + config.shutdown_grace;
    while conns.iter().any(|(h, _)| !h.is_finished()) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    for (h, socket) in conns {
        if !h.is_finished() {
            tracing::warn!("nbd: closing a connection that did not finish within the grace period");
            socket.shut(std::net::Shutdown::Both);
        }
        let _ = h.join();
    }
    result
}

fn transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

fn connection<S: Socket>(
    id: u64,
    stream: S,
    exports: &dyn Exports,
    config: &ServerConfig,
    shutdown: &Shutdown,
) {
    let (reader, control) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(r), Ok(c)) => (r, Arc::new(c)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(conn = id, error = %e, "nbd: cannot clone the connection socket");
            return;
        }
    };
    // On shutdown the reader sees end-of-stream; requests already read are still answered.
    let waker = control.clone();
    let _guard = shutdown.on_trigger(Box::new(move || waker.shut(std::net::Shutdown::Read)));
    tracing::debug!(conn = id, "nbd: connection opened");
    let result = serve_connection(reader, stream, exports, config);
    // Close now: the accept loop still holds a descriptor of this socket.
    control.shut(std::net::Shutdown::Both);
    match result {
        Ok(()) => tracing::debug!(conn = id, "nbd: connection closed"),
        Err(e) => tracing::info!(conn = id, error = %e, "nbd: connection dropped"),
    }
}

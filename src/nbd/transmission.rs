//! The transmission phase of one connection.
//!
//! The calling thread reads requests (buffered) and queues them; a few worker threads execute
//! them against the export and write the replies. A reply (header and data) is written with a
//! single `write_all` under the connection's write lock, so replies never interleave; they may
//! leave in a different order than the requests came, which the protocol allows (the client
//! matches them by cookie).
//!
//! Small plain READs and WRITEs skip the handoff while the export answers them quickly: the
//! reader executes them itself and sends their replies in one write once it has no complete
//! request left in its buffer (before any read that could block). Waking a worker costs more
//! than such a request on a fast store; on a slow one the smoothed latency rises above
//! [`ServerConfig::inline_max_latency`] and the requests go to the workers again, so that they
//! overlap (and copy-on-write commits are grouped).
//!
//! Memory is bounded: a WRITE payload is read only if it is at most 32 MiB (larger ones are
//! skipped in small pieces and answered with `NBD_EINVAL`), and the reader stops reading while
//! the requests in flight hold more than [`ServerConfig::max_in_flight_bytes`] of payload or
//! number more than [`ServerConfig::max_in_flight_requests`].

use super::proto::*;
use super::server::{Export, ExportError, ServerConfig};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A request handed to the workers.
enum Work {
    /// Execute it; `payload` is the WRITE data (empty for other commands).
    Run { req: Request, payload: Vec<u8> },
    /// Already decided by the reader: reply with this error.
    Fail { cookie: u64, error: u32 },
}

struct Job {
    work: Work,
    /// Payload bytes counted against the in-flight budget.
    bytes: usize,
}

struct State {
    jobs: VecDeque<Job>,
    /// Payload bytes of requests received and not yet answered.
    bytes: usize,
    /// Requests received and not yet answered.
    requests: usize,
    closed: bool,
}

/// Requests between the reader and the workers, with the in-flight budget.
struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    room: Condvar,
    max_bytes: usize,
    max_requests: usize,
}

impl Queue {
    fn new(cfg: &ServerConfig) -> Self {
        Self {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                bytes: 0,
                requests: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
            max_bytes: cfg.max_in_flight_bytes,
            max_requests: cfg.max_in_flight_requests.max(1),
        }
    }

    /// Queues a job, first waiting until the budget has room (a job is always admitted when
    /// nothing else is in flight).
    fn push(&self, job: Job) {
        let mut s = self.state.lock();
        while s.requests > 0
            && (s.requests >= self.max_requests || s.bytes + job.bytes > self.max_bytes)
        {
            self.room.wait(&mut s);
        }
        s.bytes += job.bytes;
        s.requests += 1;
        s.jobs.push_back(job);
        drop(s);
        self.ready.notify_one();
    }

    /// The next job; `None` once the queue is closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut s = self.state.lock();
        loop {
            if let Some(j) = s.jobs.pop_front() {
                return Some(j);
            }
            if s.closed {
                return None;
            }
            self.ready.wait(&mut s);
        }
    }

    /// A job was answered: its share of the budget is free again.
    fn done(&self, bytes: usize) {
        let mut s = self.state.lock();
        s.bytes -= bytes;
        s.requests -= 1;
        drop(s);
        self.room.notify_one();
    }

    /// No more jobs will come; workers exit once the queue is empty.
    fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_all();
    }
}

/// Buffers larger than this are not kept for reuse.
const KEEP_CAPACITY: usize = 4 << 20;
/// Bytes of idle payload buffers a connection keeps for reuse.
const KEEP_TOTAL: usize = 16 << 20;

/// Recycled WRITE payload buffers (reuse avoids zero-filling a fresh buffer per request).
#[derive(Default)]
struct Buffers {
    /// Idle buffers and the sum of their capacities.
    free: Mutex<(Vec<Vec<u8>>, usize)>,
}

impl Buffers {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = {
            let mut free = self.free.lock();
            let b = free.0.pop().unwrap_or_default();
            free.1 -= b.capacity();
            b
        };
        fit(&mut b, len);
        b
    }

    fn give(&self, b: Vec<u8>) {
        let cap = b.capacity();
        if cap == 0 || cap > KEEP_CAPACITY {
            return;
        }
        let mut free = self.free.lock();
        if free.1 + cap <= KEEP_TOTAL {
            free.1 += cap;
            free.0.push(b);
        }
    }
}

/// The write side of the connection; after a failed write nothing more is sent.
struct Sink<W> {
    w: W,
    broken: bool,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Inline replies are sent once this many bytes have accumulated.
const BATCH_BYTES: usize = 256 << 10;

/// The export as negotiated.
struct Target<'a> {
    export: &'a dyn Export,
    size: u64,
    read_only: bool,
}

/// State shared by the reader and the workers of one connection.
struct Conn<'a, W> {
    queue: Queue,
    out: Mutex<Sink<W>>,
    buffers: Buffers,
    target: Target<'a>,
    /// Smoothed execution time of small READs and of small WRITEs (nanoseconds): a write
    /// that copies a grain for a snapshot can be slow while reads stay fast.
    latency_ns: [AtomicU64; 2],
    inline_max_len: u32,
    inline_max_latency_ns: u64,
}

/// Serves requests on `export` (advertised with `size` and transmission `flags`) until the
/// client disconnects; every request read is answered before this returns.
pub(super) fn run<R: Read + Send, W: Write + Send>(
    mut reader: BufReader<R>,
    writer: W,
    export: &dyn Export,
    size: u64,
    flags: u16,
    cfg: &ServerConfig,
) -> io::Result<()> {
    let conn = Conn {
        queue: Queue::new(cfg),
        out: Mutex::new(Sink {
            w: writer,
            broken: false,
        }),
        buffers: Buffers::default(),
        target: Target {
            export,
            size,
            read_only: flags & FLAG_READ_ONLY != 0,
        },
        latency_ns: [AtomicU64::new(0), AtomicU64::new(0)],
        inline_max_len: cfg.inline_max_len.min(MAX_PAYLOAD),
        inline_max_latency_ns: u64::try_from(cfg.inline_max_latency.as_nanos()).unwrap_or(u64::MAX),
    };
    std::thread::scope(|s| {
        let mut workers = 0;
        for _ in 0..cfg.workers.max(1) {
            let spawned = std::thread::Builder::new()
                .name("nbd-worker".into())
                .spawn_scoped(s, || conn.worker());
            match spawned {
                Ok(_) => workers += 1,
                Err(e) => tracing::warn!(error = %e, "nbd: cannot start a worker thread"),
            }
        }
        let result = if workers == 0 {
            Err(io::Error::other("no worker thread could be started"))
        } else {
            conn.read_requests(&mut reader)
        };
        conn.queue.close();
        result
    })
}

impl<W: Write> Conn<'_, W> {
    fn send(&self, bytes: &[u8]) {
        let mut s = self.out.lock();
        if s.broken {
            return;
        }
        if let Err(e) = s.w.write_all(bytes).and_then(|()| s.w.flush()) {
            // The client is gone; the reader notices on its side and ends the connection.
            tracing::debug!(error = %e, "nbd: cannot send a reply");
            s.broken = true;
        }
    }

    /// Sends the replies of inline requests gathered so far.
    fn flush_batch(&self, batch: &mut Vec<u8>) {
        if !batch.is_empty() {
            self.send(batch);
            batch.clear();
        }
        if batch.capacity() > KEEP_CAPACITY {
            *batch = Vec::new();
        }
    }

    /// Whether the reader runs this request itself instead of handing it to a worker: small
    /// plain READs and WRITEs while the export answers them quickly. A handoff costs a thread
    /// wake-up per request, more than such a request takes; slow storage (or a flush, a FUA
    /// write, a large transfer) goes to the workers so that requests overlap.
    fn inline(&self, req: &Request) -> bool {
        matches!(req.kind, CMD_READ | CMD_WRITE)
            && req.flags == 0
            && req.len <= self.inline_max_len
            && self.latency(req).load(Ordering::Relaxed) <= self.inline_max_latency_ns
    }

    fn latency(&self, req: &Request) -> &AtomicU64 {
        &self.latency_ns[usize::from(req.kind == CMD_WRITE)]
    }

    /// Reads requests until `NBD_CMD_DISC` or end of stream. Inline replies are batched and
    /// sent before any read that could block, so the client never waits for a reply that is
    /// sitting in the batch.
    fn read_requests<R: Read>(&self, r: &mut BufReader<R>) -> io::Result<()> {
        let mut batch = Vec::new();
        let mut scratch = Vec::new();
        let result = self.read_loop(r, &mut batch, &mut scratch);
        self.flush_batch(&mut batch);
        result
    }

    fn read_loop<R: Read>(
        &self,
        r: &mut BufReader<R>,
        batch: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        loop {
            if r.buffer().len() < REQUEST_LEN {
                self.flush_batch(batch);
            }
            if r.fill_buf()?.is_empty() {
                // Closed between requests (or the server is shutting down).
                return Ok(());
            }
            let mut hdr = [0u8; REQUEST_LEN];
            r.read_exact(&mut hdr)?;
            let req = Request::parse(&hdr).ok_or_else(|| invalid("request without the magic"))?;
            let len = req.len as usize;
            if req.kind == CMD_WRITE && r.buffer().len() < len {
                self.flush_batch(batch);
            }
            match req.kind {
                CMD_DISC => return Ok(()),
                CMD_WRITE if req.len > MAX_PAYLOAD => {
                    // Too large to hold: skip the payload so the stream stays in step.
                    let n = u64::from(req.len);
                    if io::copy(&mut r.by_ref().take(n), &mut io::sink())? < n {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    self.queue.push(Job {
                        work: Work::Fail {
                            cookie: req.cookie,
                            error: EINVAL,
                        },
                        bytes: 0,
                    });
                }
                _ if self.inline(&req) => {
                    if req.kind == CMD_WRITE {
                        fit(scratch, len);
                        r.read_exact(scratch)?;
                    }
                    self.execute_into(&req, scratch, batch);
                    if batch.len() >= BATCH_BYTES {
                        self.flush_batch(batch);
                    }
                }
                CMD_WRITE => {
                    let mut payload = self.buffers.take(len);
                    r.read_exact(&mut payload)?;
                    self.queue.push(Job {
                        bytes: payload.len(),
                        work: Work::Run { req, payload },
                    });
                }
                _ => self.queue.push(Job {
                    work: Work::Run {
                        req,
                        payload: Vec::new(),
                    },
                    bytes: 0,
                }),
            }
        }
    }

    fn worker(&self) {
        // Reused for replies: header and READ data in one buffer, sent with one write.
        let mut reply = Vec::new();
        while let Some(job) = self.queue.pop() {
            match job.work {
                Work::Fail { cookie, error } => self.send(&simple_reply(error, cookie)),
                Work::Run { req, payload } => {
                    let checked = check(&self.target, &req);
                    // Sized without clearing: a reused buffer is not zero-filled again.
                    let data = match (&checked, req.kind) {
                        (Ok(()), CMD_READ) => req.len as usize,
                        _ => 0,
                    };
                    fit(&mut reply, REPLY_LEN + data);
                    let error = checked
                        .and_then(|()| self.perform(&req, &payload, &mut reply[REPLY_LEN..]));
                    match error {
                        Ok(()) => {
                            put_simple_reply(&mut reply, 0, req.cookie);
                            self.send(&reply);
                        }
                        Err(e) => self.send(&simple_reply(e, req.cookie)),
                    }
                    self.buffers.give(payload);
                    if reply.capacity() > KEEP_CAPACITY {
                        reply = Vec::new();
                    }
                }
            }
            self.queue.done(job.bytes);
        }
    }

    /// Executes a request and appends its reply (header and READ data) to `out`.
    fn execute_into(&self, req: &Request, payload: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        let checked = check(&self.target, req);
        let data = match (&checked, req.kind) {
            (Ok(()), CMD_READ) => req.len as usize,
            _ => 0,
        };
        out.resize(start + REPLY_LEN + data, 0);
        let result =
            checked.and_then(|()| self.perform(req, payload, &mut out[start + REPLY_LEN..]));
        match result {
            Ok(()) => put_simple_reply(&mut out[start..], 0, req.cookie),
            Err(e) => {
                out.truncate(start + REPLY_LEN);
                put_simple_reply(&mut out[start..], e, req.cookie);
            }
        }
    }

    /// Performs a checked request (READ data goes to `data`, exactly `req.len` bytes) and
    /// keeps the latency estimate up to date. A panic in the export is answered with
    /// `NBD_EIO`.
    fn perform(&self, req: &Request, payload: &[u8], data: &mut [u8]) -> Result<(), u32> {
        let timed = matches!(req.kind, CMD_READ | CMD_WRITE) && req.len <= self.inline_max_len;
        let t0 = timed.then(Instant::now);
        let result = catch_unwind(AssertUnwindSafe(|| {
            perform(&self.target, req, payload, data)
        }))
        .unwrap_or_else(|_| {
            tracing::error!(?req, "nbd: request handler panicked");
            Err(EIO)
        });
        if let Some(t0) = t0 {
            let sample = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            // An exponentially weighted average over about eight requests; racing updates
            // from several threads may drop a sample, which does not matter for a hint.
            let avg = self.latency(req);
            let old = avg.load(Ordering::Relaxed);
            avg.store(old - old / 8 + sample / 8, Ordering::Relaxed);
        }
        result
    }
}

/// Sizes `buf` to `len` bytes; a reused buffer keeps its old contents (the caller overwrites
/// them), only growth is zero-filled.
fn fit(buf: &mut Vec<u8>, len: usize) {
    if buf.len() >= len {
        buf.truncate(len);
    } else {
        buf.resize(len, 0);
    }
}

/// Checks a request against the negotiated export; `Err` is the NBD error value to reply.
fn check(t: &Target<'_>, req: &Request) -> Result<(), u32> {
    let allowed = match req.kind {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => return Err(EINVAL), // unknown command
    };
    if req.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    if t.read_only && matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return Err(EPERM);
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= t.size);
    match req.kind {
        CMD_READ if req.len > MAX_PAYLOAD || !in_range => Err(EINVAL),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Err(ENOSPC),
        CMD_TRIM | CMD_CACHE if !in_range => Err(EINVAL),
        _ => Ok(()),
    }
}

/// Performs a request that passed [`check`]; READ data goes to `data`.
fn perform(t: &Target<'_>, req: &Request, payload: &[u8], data: &mut [u8]) -> Result<(), u32> {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.len);
    let e = t.export;
    match req.kind {
        CMD_READ => e
            .read_at(req.offset, data)
            .map_err(|err| errno(err, req, EINVAL)),
        CMD_WRITE => e
            .write_at(req.offset, payload, fua)
            .map_err(|err| errno(err, req, ENOSPC)),
        CMD_FLUSH => e.flush().map_err(|err| errno(err, req, EINVAL)),
        CMD_TRIM => e
            .trim(req.offset, len, fua)
            .map_err(|err| errno(err, req, EINVAL)),
        CMD_WRITE_ZEROES => e
            .write_zeroes(req.offset, len, fua)
            .map_err(|err| errno(err, req, ENOSPC)),
        // CMD_CACHE is a hint: the data is read when asked for.
        _ => Ok(()),
    }
}

/// The NBD error value for an export error; `out_of_range` depends on the command.
fn errno(err: ExportError, req: &Request, out_of_range: u32) -> u32 {
    match err {
        ExportError::OutOfRange { .. } => out_of_range,
        ExportError::ReadOnly => EPERM,
        ExportError::Invalid(_) => EINVAL,
        ExportError::NoSpace(_) => ENOSPC,
        ExportError::Io(msg) => {
            tracing::warn!(?req, error = %msg, "nbd: request failed");
            EIO
        }
    }
}

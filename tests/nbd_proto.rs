//! The NBD server driven byte by byte over a raw socket: handshake options, error replies,
//! malformed and oversized requests, disconnects, read-only exports, shutdown, TCP.

use flashcopy_csi::engine::{MappingSpec, VolId};
use flashcopy_csi::meta::MetaFiles;
use flashcopy_csi::nbd::{
    Export, Exports, PoolExport, ServerConfig, Shutdown, serve_tcp, serve_unix,
};
use flashcopy_csi::volume::{MemBackend, Pool, PoolConfig};
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 4 * MIB;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const C_FIXED: u32 = 1;
const C_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;
const FLAG_DF: u16 = 4;

const FLAGS_RW: u16 = 0x16d; // HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES CAN_MULTI_CONN
const FLAG_READ_ONLY: u16 = 2;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Both execution paths of the server: small requests run by the thread reading the
/// connection (the default), and every request handed to the worker threads.
fn modes() -> [ServerConfig; 2] {
    [
        ServerConfig::default(),
        ServerConfig {
            inline_max_len: 0,
            ..ServerConfig::default()
        },
    ]
}

fn mem_pool() -> Arc<Pool> {
    Arc::new(
        Pool::open(
            MetaFiles::in_memory(),
            Arc::new(MemBackend::default()),
            PoolConfig::default(),
        )
        .unwrap(),
    )
}

/// A pool in memory with volumes `disk` and `other`, served on a Unix socket.
struct Served {
    pool: Arc<Pool>,
    sock: PathBuf,
    shutdown: Shutdown,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start() -> Self {
        Self::start_with(ServerConfig::default())
    }

    fn start_with(config: ServerConfig) -> Self {
        let pool = mem_pool();
        Self::with(pool.clone(), Arc::new(pool), config)
    }

    fn with(pool: Arc<Pool>, exports: Arc<dyn Exports>, config: ServerConfig) -> Self {
        for name in ["disk", "other"] {
            if pool.engine().volume_by_name(name).is_none() {
                pool.create_volume(name, SIZE).unwrap();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let shutdown = Shutdown::new();
        let sd = shutdown.clone();
        let thread = std::thread::spawn(move || serve_unix(listener, exports, config, sd));
        Self {
            pool,
            sock,
            shutdown,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn vol(&self, name: &str) -> VolId {
        self.pool.engine().volume_by_name(name).unwrap().id
    }

    fn raw(&self) -> Client {
        Client::new(UnixStream::connect(&self.sock).unwrap())
    }

    /// A client in transmission on `export` (via `NBD_OPT_GO`).
    fn go(&self, export: &str) -> Client {
        let mut c = self.raw();
        c.start(C_FIXED | C_NO_ZEROES);
        let (size, flags) = c.go(export);
        assert_eq!(size, SIZE);
        assert_eq!(flags & !FLAG_READ_ONLY, FLAGS_RW);
        c
    }

    /// Two clients on one connection in transmission: one to send, one to receive.
    fn go_pair(&self, export: &str) -> (Client, Client) {
        let sock = UnixStream::connect(&self.sock).unwrap();
        let other = Client::new(sock.try_clone().unwrap());
        let mut c = Client::new(sock);
        c.start(C_FIXED | C_NO_ZEROES);
        assert_eq!(c.go(export), (SIZE, FLAGS_RW));
        (c, other)
    }

    fn stop(&mut self) -> std::io::Result<()> {
        self.shutdown.trigger();
        self.thread.take().unwrap().join().unwrap()
    }

    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let res = self.stop();
            if !std::thread::panicking() {
                res.unwrap();
            }
        }
    }
}

trait Stream: Read + Write + Send {}
impl Stream for UnixStream {}
impl Stream for TcpStream {}

/// A hand-driven NBD client.
struct Client {
    s: Box<dyn Stream>,
}

impl Client {
    fn new(s: UnixStream) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self { s: Box::new(s) }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    /// Reads the greeting and sends the client flags.
    fn start(&mut self, client_flags: u32) {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        assert_eq!(self.u16(), 3, "FIXED_NEWSTYLE | NO_ZEROES");
        self.s.write_all(&client_flags.to_be_bytes()).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// One option reply: (option, reply type, data).
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32() as usize;
        assert!(len < 1 << 16, "reply length {len}");
        (opt, typ, self.bytes(len))
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// `NBD_OPT_INFO`/`GO`: every reply up to the final one.
    fn info(&mut self, opt: u32, name: &str, infos: &[u16]) -> Vec<(u32, Vec<u8>)> {
        self.option(opt, &Self::info_data(name, infos));
        let mut out = Vec::new();
        loop {
            let (o, typ, data) = self.opt_reply();
            assert_eq!(o, opt);
            out.push((typ, data));
            if typ != REP_INFO {
                return out;
            }
        }
    }

    /// `NBD_OPT_GO` that must succeed: (size, transmission flags).
    fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.info(OPT_GO, name, &[INFO_BLOCK_SIZE]);
        assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
        let export = replies
            .iter()
            .find(|(t, d)| *t == REP_INFO && d[..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        let d = &export.1;
        assert_eq!(d.len(), 12);
        (
            u64::from_be_bytes(d[2..10].try_into().unwrap()),
            u16::from_be_bytes(d[10..12].try_into().unwrap()),
        )
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&m).unwrap();
    }

    fn write_req(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        self.request(flags, CMD_WRITE, cookie, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
    }

    /// A simple reply header: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }

    /// Sends a request without payload and returns the error of its reply.
    fn call(&mut self, flags: u16, kind: u16, offset: u64, len: u32) -> u32 {
        self.request(flags, kind, 99, offset, len);
        let (err, cookie) = self.reply();
        assert_eq!(cookie, 99);
        err
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.write_req(0, 98, offset, data);
        let (err, cookie) = self.reply();
        assert_eq!(cookie, 98);
        err
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, 97, offset, len);
        match self.reply() {
            (0, 97) => Ok(self.bytes(len as usize)),
            (e, 97) => Err(e),
            (_, c) => panic!("reply for cookie {c}"),
        }
    }

    /// True when the server closed the connection (end of stream or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        }
    }
}

#[test]
fn go_returns_export_name_description_and_block_sizes() {
    let s = Served::start();
    let mut c = s.raw();
    c.start(C_FIXED | C_NO_ZEROES);
    // Named by numeric id: the canonical name comes back.
    let id = s.vol("disk").0.to_string();
    let replies = c.info(OPT_GO, &id, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]);
    assert_eq!(replies.last().unwrap(), &(REP_ACK, vec![]));
    let info = |t: u16| {
        replies
            .iter()
            .find(|(r, d)| *r == REP_INFO && d[..2] == t.to_be_bytes())
            .map(|(_, d)| d[2..].to_vec())
            .unwrap_or_else(|| panic!("info {t} missing in {replies:?}"))
    };
    let export = info(INFO_EXPORT);
    assert_eq!(export[..8], SIZE.to_be_bytes());
    assert_eq!(export[8..], FLAGS_RW.to_be_bytes());
    assert_eq!(info(INFO_NAME), b"disk");
    assert!(
        String::from_utf8(info(INFO_DESCRIPTION))
            .unwrap()
            .contains("disk")
    );
    let bs = info(INFO_BLOCK_SIZE);
    assert_eq!(bs[..4], 512u32.to_be_bytes());
    assert_eq!(bs[4..8], 4096u32.to_be_bytes());
    assert_eq!(bs[8..], (32u32 << 20).to_be_bytes());
    // Transmission works after GO.
    assert_eq!(c.write(0, &[7; 4096]), 0);
    assert_eq!(c.read(0, 4096).unwrap(), vec![7; 4096]);
}

#[test]
fn unknown_and_malformed_options_get_errors_and_the_session_goes_on() {
    let s = Served::start();
    let mut c = s.raw();
    c.start(C_FIXED);
    for opt in [0xdead_beef, OPT_STARTTLS, OPT_STRUCTURED_REPLY, 9, 10, 11] {
        c.option(opt, &[1, 2, 3]);
        let (o, typ, _) = c.opt_reply();
        assert_eq!((o, typ), (opt, REP_ERR_UNSUP), "option {opt}");
    }
    c.option(OPT_LIST, &[]);
    let mut names = BTreeSet::new();
    loop {
        let (o, typ, data) = c.opt_reply();
        assert_eq!(o, OPT_LIST);
        if typ == REP_ACK {
            break;
        }
        assert_eq!(typ, REP_SERVER);
        let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.insert(String::from_utf8(data[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, BTreeSet::from(["disk".into(), "other".into()]));
    c.option(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);

    let unknown = c.info(OPT_INFO, "nope", &[]);
    assert_eq!(unknown.len(), 1);
    assert_eq!(unknown[0].0, REP_ERR_UNKNOWN);
    assert_eq!(
        c.info(OPT_GO, "", &[])[0].0,
        REP_ERR_UNKNOWN,
        "no default export"
    );

    // Name lengths that disagree with the data, a dangling info count, bad UTF-8.
    let mut bad = Client::info_data("disk", &[INFO_NAME]);
    bad[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    for data in [
        bad,
        Client::info_data("disk", &[INFO_NAME])[..9].to_vec(),
        vec![0, 0],
        Client::info_data("\u{fffd}", &[])
            .iter()
            .map(|b| b ^ 0x80)
            .collect(),
    ] {
        c.option(OPT_GO, &data);
        let (o, typ, _) = c.opt_reply();
        assert_eq!((o, typ), (OPT_GO, REP_ERR_INVALID), "{data:?}");
    }
    // INFO then GO on the same connection.
    assert_eq!(c.info(OPT_INFO, "other", &[]).last().unwrap().0, REP_ACK);
    assert_eq!(c.go("other"), (SIZE, FLAGS_RW));
    assert_eq!(c.read(SIZE - 512, 512).unwrap(), vec![0; 512]);
}

#[test]
fn broken_handshakes_are_disconnected() {
    let s = Served::start();
    // Unknown client flags.
    let mut c = s.raw();
    c.start(C_FIXED | 4);
    assert!(c.closed());
    // Bad option magic.
    let mut c = s.raw();
    c.start(C_FIXED);
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(c.closed());
    // Option data over 64 KiB: refused without reading (or allocating) it.
    let mut c = s.raw();
    c.start(C_FIXED);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&m).unwrap();
    assert_eq!(c.opt_reply().1, REP_ERR_TOO_BIG);
    assert!(c.closed());
    // NBD_OPT_EXPORT_NAME of an unknown export cannot be answered: the session ends.
    let mut c = s.raw();
    c.start(C_FIXED);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // Closing in the middle of the handshake.
    let mut c = s.raw();
    c.start(C_FIXED);
    c.s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(c);
    assert!(s.running());
    s.go("disk");
}

#[test]
fn export_name_and_abort() {
    let s = Served::start();
    for (flags, tail) in [(C_FIXED, 124), (C_FIXED | C_NO_ZEROES, 0)] {
        let mut c = s.raw();
        c.start(flags);
        c.option(OPT_EXPORT_NAME, b"disk");
        assert_eq!(c.u64(), SIZE);
        assert_eq!(c.u16(), FLAGS_RW);
        assert_eq!(c.bytes(tail), vec![0; tail]);
        assert_eq!(c.write(512, &[3; 512]), 0);
        assert_eq!(c.read(512, 512).unwrap(), vec![3; 512]);
    }
    let mut c = s.raw();
    c.start(C_FIXED);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(), (OPT_ABORT, REP_ACK, vec![]));
    assert!(c.closed());
}

#[test]
fn out_of_range_and_invalid_requests_get_the_documented_errors() {
    for config in modes() {
        let s = Served::start_with(config);
        let mut c = s.go("disk");
        // Reads past the end, or whose end overflows: EINVAL.
        assert_eq!(c.read(SIZE - 512, 1024), Err(EINVAL));
        assert_eq!(c.read(SIZE, 512), Err(EINVAL));
        assert_eq!(c.read(u64::MAX - 10, 512), Err(EINVAL));
        // Writes past the end: ENOSPC, and the payload is consumed (the stream stays in step).
        assert_eq!(c.write(SIZE - 512, &[9; 1024]), ENOSPC);
        assert_eq!(c.write(u64::MAX - 10, &[9; 512]), ENOSPC);
        assert_eq!(c.call(0, CMD_WRITE_ZEROES, SIZE - 512, 1024), ENOSPC);
        assert_eq!(c.call(0, CMD_TRIM, SIZE, 512), EINVAL);
        // Nothing was written by the refused requests.
        assert_eq!(c.read(SIZE - 512, 512).unwrap(), vec![0; 512]);
        // Unknown command, unknown or misplaced flags.
        assert_eq!(c.call(0, 42, 0, 512), EINVAL);
        assert_eq!(c.call(FLAG_DF, CMD_READ, 0, 512), EINVAL);
        assert_eq!(c.call(1 << 9, CMD_FLUSH, 0, 0), EINVAL);
        assert_eq!(c.call(FLAG_NO_HOLE, CMD_TRIM, 0, 512), EINVAL);
        c.write_req(FLAG_NO_HOLE, 5, 0, &[1; 512]);
        assert_eq!(c.reply(), (EINVAL, 5));
        assert_eq!(c.read(0, 512).unwrap(), vec![0; 512]);
        // Payloads over 32 MiB: a read is refused; a write's payload is skipped, then refused.
        assert_eq!(c.read(0, (32 << 20) + 512), Err(EINVAL));
        let big = vec![0xee; (33 << 20) as usize];
        c.write_req(0, 6, 0, &big);
        assert_eq!(c.reply(), (EINVAL, 6));
        // Zero-length requests are harmless.
        assert_eq!(c.read(0, 0).unwrap(), Vec::<u8>::new());
        assert_eq!(c.write(0, &[]), 0);
        // The connection still works.
        assert_eq!(c.write(4096, &[5; 4096]), 0);
        assert_eq!(c.read(4096, 4096).unwrap(), vec![5; 4096]);
    }
}

#[test]
fn flush_fua_trim_and_write_zeroes() {
    for config in modes() {
        let s = Served::start_with(config);
        let mut c = s.go("disk");
        let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
        c.write_req(FLAG_FUA, 1, 0, &pattern);
        assert_eq!(c.reply(), (0, 1));
        assert_eq!(c.call(0, CMD_FLUSH, 0, 0), 0);
        assert_eq!(c.call(FLAG_FUA, CMD_FLUSH, 0, 0), 0);
        // Unaligned zeroing across chunk boundaries, with and without NO_HOLE and FUA.
        assert_eq!(c.call(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 1000, 70_000), 0);
        assert_eq!(c.call(FLAG_FUA, CMD_WRITE_ZEROES, 512 << 10, 512 << 10), 0);
        let mut expect = pattern.clone();
        expect[1000..71_000].fill(0);
        expect[512 << 10..].fill(0);
        assert!(c.read(0, MIB as u32).unwrap() == expect);
        // A zeroing request larger than the payload limit is fine (it carries no payload).
        assert_eq!(c.call(0, CMD_WRITE_ZEROES, 0, SIZE as u32), 0);
        assert!(c.read(0, SIZE as u32).unwrap().iter().all(|b| *b == 0));
        // Trim is advisory and accepted.
        assert_eq!(c.call(FLAG_FUA, CMD_TRIM, 0, SIZE as u32), 0);
    }
}

#[test]
fn write_zeroes_and_trim_keep_snapshots() {
    for config in modes() {
        let s = Served::start_with(config);
        let (src, snap) = (s.vol("disk"), s.vol("other"));
        s.pool.write(src, 0, &vec![0xab; SIZE as usize]).unwrap();
        let m = s
            .pool
            .create_mapping(MappingSpec::snapshot(src, snap))
            .unwrap();
        s.pool.start_mapping(m, true, false).unwrap();
        let mut c = s.go("disk");
        assert_eq!(c.call(0, CMD_WRITE_ZEROES, 4096, 3 * MIB as u32), 0);
        assert_eq!(c.call(0, CMD_TRIM, 0, SIZE as u32), 0);
        let mut d = s.go("other");
        assert!(d.read(0, SIZE as u32).unwrap().iter().all(|b| *b == 0xab));
        let now = c.read(0, SIZE as u32).unwrap();
        assert!(now[..4096].iter().all(|b| *b == 0xab));
        assert!(now[4096..4096 + 3 * MIB as usize].iter().all(|b| *b == 0));
    }
}

#[test]
fn pipelined_requests_are_all_answered_once() {
    for config in modes() {
        let s = Served::start_with(config);
        let mut c = s.go("disk");
        // 256 writes of 4 KiB (each its own pattern) without waiting, then the replies.
        for i in 0..256u64 {
            c.write_req(0, 1000 + i, i * 4096, &[i as u8; 4096]);
        }
        let mut seen = BTreeSet::new();
        for _ in 0..256 {
            let (err, cookie) = c.reply();
            assert_eq!(err, 0);
            assert!(seen.insert(cookie), "cookie {cookie} answered twice");
        }
        assert_eq!(seen, (1000..1256).collect());
        // Pipelined reads: each reply carries its own data.
        for i in 0..256u64 {
            c.request(0, CMD_READ, i, i * 4096, 4096);
        }
        let mut seen = BTreeSet::new();
        for _ in 0..256 {
            let (err, cookie) = c.reply();
            assert_eq!(err, 0);
            assert_eq!(c.bytes(4096), vec![cookie as u8; 4096]);
            assert!(seen.insert(cookie));
        }
        assert_eq!(seen.len(), 256);
    }
}

#[test]
fn a_small_in_flight_budget_still_answers_everything() {
    let pool = mem_pool();
    let config = ServerConfig {
        workers: 2,
        max_in_flight_bytes: 64 << 10,
        max_in_flight_requests: 4,
        inline_max_len: 0,
        ..ServerConfig::default()
    };
    let s = Served::with(pool.clone(), Arc::new(pool), config);
    let (mut c, mut w) = s.go_pair("disk");
    // Write 4 MiB as 64 KiB requests from another thread while this one reads replies.
    let writer = std::thread::spawn(move || {
        for i in 0..64u64 {
            w.write_req(0, i, i * 65536, &[i as u8 + 1; 65536]);
        }
        w
    });
    let mut seen = BTreeSet::new();
    for _ in 0..64 {
        let (err, cookie) = c.reply();
        assert_eq!(err, 0);
        seen.insert(cookie);
    }
    writer.join().unwrap();
    assert_eq!(seen.len(), 64);
    let data = c.read(0, SIZE as u32).unwrap();
    for (i, chunk) in data.chunks(65536).enumerate() {
        assert!(chunk.iter().all(|b| *b == i as u8 + 1));
    }
}

#[test]
fn disc_answers_outstanding_requests_then_closes() {
    for config in modes() {
        let s = Served::start_with(config);
        let mut c = s.go("disk");
        for i in 0..16u64 {
            c.write_req(0, i, i * 65536, &[0x42; 65536]);
        }
        c.request(0, CMD_DISC, 100, 0, 0);
        let mut seen = BTreeSet::new();
        for _ in 0..16 {
            let (err, cookie) = c.reply();
            assert_eq!(err, 0);
            seen.insert(cookie);
        }
        assert_eq!(seen, (0..16).collect());
        assert!(c.closed(), "no reply to DISC, then end of stream");
        let mut buf = vec![0; MIB as usize];
        s.pool.read(s.vol("disk"), 0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0x42));
    }
}

#[test]
fn bad_request_magic_disconnects() {
    let s = Served::start();
    let mut c = s.go("disk");
    c.s.write_all(&[0x55; 28]).unwrap();
    assert!(c.closed());
    let mut c = s.go("disk");
    assert_eq!(c.read(0, 512).unwrap(), vec![0; 512]);
}

#[test]
fn clients_vanishing_mid_request_do_not_hurt_the_server() {
    for config in modes() {
        let s = Served::start_with(config);
        let data = vec![0x99; MIB as usize];
        // Half a request header.
        let mut c = s.go("disk");
        c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
        drop(c);
        // A write header with half of its payload.
        let mut c = s.go("disk");
        c.request(0, CMD_WRITE, 1, 0, MIB as u32);
        c.s.write_all(&data[..1000]).unwrap();
        drop(c);
        // Many requests in flight, replies never read.
        for _ in 0..4 {
            let mut c = s.go("disk");
            for i in 0..64u64 {
                c.request(0, CMD_READ, i, 0, MIB as u32);
            }
            c.write_req(0, 77, MIB, &data);
            c.request(0, CMD_FLUSH, 78, 0, 0);
            drop(c);
        }
        // Replies pending on a connection whose client stops reading and closes.
        let mut c = s.go("disk");
        for i in 0..8u64 {
            c.request(0, CMD_READ, i, 0, 4 * MIB as u32);
        }
        std::thread::sleep(Duration::from_millis(50));
        drop(c);
        assert!(s.running());
        let mut c = s.go("disk");
        assert_eq!(c.write(0, &[1; 512]), 0);
        assert_eq!(c.read(0, 512).unwrap(), vec![1; 512]);
    }
}

/// Exports every volume of a pool read-only.
struct ReadOnly(Arc<Pool>);

impl Exports for ReadOnly {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        let vol = self.0.engine().volume_by_name(name)?.id;
        Some(Arc::new(
            PoolExport::new(self.0.clone(), vol).read_only(true),
        ))
    }
    fn list(&self) -> Vec<String> {
        self.0.list()
    }
}

#[test]
fn read_only_exports_refuse_writes_with_eperm() {
    for config in modes() {
        read_only(config);
    }
}

fn read_only(config: ServerConfig) {
    let pool = mem_pool();
    let s = Served::with(pool.clone(), Arc::new(ReadOnly(pool)), config);
    s.pool.write(s.vol("disk"), 0, &[8; 512]).unwrap();
    let mut c = s.raw();
    c.start(C_FIXED | C_NO_ZEROES);
    let (_, flags) = c.go("disk");
    assert_eq!(flags, FLAGS_RW | FLAG_READ_ONLY);
    assert_eq!(c.write(0, &[1; 512]), EPERM);
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, 0, 512), EPERM);
    assert_eq!(c.call(0, CMD_TRIM, 0, 512), EPERM);
    assert_eq!(c.call(0, CMD_FLUSH, 0, 0), 0);
    assert_eq!(c.read(0, 512).unwrap(), vec![8; 512]);
}

#[test]
fn shutdown_answers_in_flight_requests_then_closes_connections() {
    for config in modes() {
        let mut s = Served::start_with(config);
        let mut idle = s.go("disk");
        let mut busy = s.go("other");
        for i in 0..32u64 {
            busy.write_req(0, i, i * 65536, &[0x61; 65536]);
        }
        // Everything written is in the server or in its socket buffer: all of it is answered.
        let t0 = Instant::now();
        s.stop().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        let mut n = 0;
        while n < 32 {
            let (err, _) = busy.reply();
            assert_eq!(err, 0);
            n += 1;
        }
        assert!(busy.closed());
        assert!(idle.closed());
        assert!(UnixStream::connect(&s.sock).is_err(), "still accepting");
    }
}

#[test]
fn shutdown_closes_connections_that_stop_reading_after_the_grace_period() {
    let pool = mem_pool();
    let config = ServerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let mut s = Served::with(pool.clone(), Arc::new(pool), config);
    let (mut c, _keep) = s.go_pair("disk");
    // 128 MiB of replies queued that the client never reads: the workers block in send.
    for i in 0..32u64 {
        c.request(0, CMD_READ, i, 0, 4 * MIB as u32);
    }
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    s.stop().unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn tcp_serves_the_same_protocol() {
    let pool = mem_pool();
    pool.create_volume("disk", SIZE).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let sd = shutdown.clone();
    let exports: Arc<dyn Exports> = Arc::new(pool.clone());
    let t = std::thread::spawn(move || serve_tcp(listener, exports, ServerConfig::default(), sd));
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Client { s: Box::new(s) };
    c.start(C_FIXED | C_NO_ZEROES);
    assert_eq!(c.go("disk"), (SIZE, FLAGS_RW));
    assert_eq!(c.write(MIB, &[4; 8192]), 0);
    assert_eq!(c.read(MIB, 8192).unwrap(), vec![4; 8192]);
    c.request(0, CMD_DISC, 0, 0, 0);
    assert!(c.closed());
    shutdown.trigger();
    t.join().unwrap().unwrap();
}

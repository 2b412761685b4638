//! Entry points for the fuzz targets (`fuzz/`) and for replaying their corpora and crash
//! inputs in the normal tests (`tests/fuzz_inputs.rs`). Not an API: each function feeds one
//! input to one decoder of outside input and panics when a property the project relies on
//! breaks (a panic is what the fuzzer reports). Decoding errors are fine; panics, hangs and
//! unbounded allocations are not.

use crate::csi::{ids, params::Params};
use crate::engine::{Engine, Limits};
use crate::meta::format::{encode_checkpoint, encode_frame, encode_marker};
use crate::meta::{Journal, MetaFiles};
use crate::nbd::{self, ServerConfig, Shutdown};
use crate::store::MemStore;
use crate::volume::{MemBackend, Pool, PoolConfig};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown as Direction;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The export every NBD input talks to: small, so that whole-export reads stay cheap.
pub const NBD_EXPORT: &str = "disk";
/// Its size: two 256 KiB grains.
pub const NBD_EXPORT_SIZE: u64 = 512 << 10;
/// A connection that takes longer than this to end after its input is a hang.
const NBD_HANG: Duration = Duration::from_secs(20);

/// One NBD server for the whole process, like the agent's: every input is one more client of
/// it, so a client that breaks it breaks every later one.
struct NbdServer {
    socket: PathBuf,
    _pool: Arc<Pool>,
}

fn nbd_server() -> &'static NbdServer {
    static SERVER: OnceLock<NbdServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let pool = Arc::new(
            Pool::open(
                MetaFiles::in_memory(),
                Arc::new(MemBackend::default()),
                PoolConfig::default(),
            )
            .expect("in-memory pool"),
        );
        pool.create_volume(NBD_EXPORT, NBD_EXPORT_SIZE)
            .expect("export volume");
        let dir = std::env::temp_dir().join(format!("flashcopy-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("socket directory");
        let socket = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("bind the NBD socket");
        let config = ServerConfig {
            workers: 2,
            ..ServerConfig::default()
        };
        let exports: Arc<dyn nbd::Exports> = Arc::new(pool.clone());
        std::thread::Builder::new()
            .name("fuzz-nbd-server".into())
            .spawn(move || nbd::serve_unix(listener, exports, config, Shutdown::new()))
            .expect("server thread");
        NbdServer {
            socket,
            _pool: pool,
        }
    })
}

/// Sends `input` as one client (after `prefix`), closes the sending side and reads what the
/// server answers until it closes the connection. Panics if it does not within [`NBD_HANG`].
fn nbd_session(prefix: &[u8], input: &[u8]) {
    let server = nbd_server();
    let mut sock = UnixStream::connect(&server.socket).expect("connect to the NBD server");
    sock.set_read_timeout(Some(NBD_HANG)).expect("timeout");
    let mut writer = sock.try_clone().expect("clone the socket");
    let bytes = [prefix, input].concat();
    // Written from another thread: the server's replies must be drained meanwhile, or both
    // sides could block on full socket buffers.
    let sender = std::thread::spawn(move || {
        // The server may close early (a protocol violation): then the rest is not wanted.
        let _ = writer.write_all(&bytes);
        let _ = writer.shutdown(Direction::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the NBD server did not close a finished connection within {NBD_HANG:?}")
            }
            // Reset by the server after a protocol violation.
            Err(_) => break,
        }
    }
    sender.join().expect("sender thread");
    nbd_still_serves();
}

/// A well-formed client is still served: handshake, a write, a flush and a read of it back.
fn nbd_still_serves() {
    let server = nbd_server();
    let mut c = nbd::client::Client::connect(&server.socket, NBD_EXPORT)
        .expect("the NBD server refused a well-formed client after a fuzz input");
    assert_eq!(c.size(), NBD_EXPORT_SIZE);
    // The last sector: fuzz inputs may write anywhere, this client checks its own write.
    let at = NBD_EXPORT_SIZE - 512;
    let data: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    c.write_at(&data, at).expect("write after a fuzz input");
    c.flush().expect("flush after a fuzz input");
    let mut back = vec![0u8; 512];
    c.read_at(&mut back, at).expect("read after a fuzz input");
    assert_eq!(
        back, data,
        "the export returned other bytes than were written"
    );
}

/// The client's side of a handshake that selects [`NBD_EXPORT`] with `NBD_OPT_EXPORT_NAME`,
/// so that what follows is the transmission phase.
pub fn nbd_handshake_prefix() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&3u32.to_be_bytes()); // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    b.extend_from_slice(&(NBD_EXPORT.len() as u32).to_be_bytes());
    b.extend_from_slice(NBD_EXPORT.as_bytes());
    b
}

/// The bytes a client sends from the start of the handshake (after the server's greeting).
pub fn nbd_handshake(input: &[u8]) {
    nbd_session(&[], input);
}

/// The bytes a client sends in the transmission phase of [`NBD_EXPORT`].
pub fn nbd_transmission(input: &[u8]) {
    nbd_session(&nbd_handshake_prefix(), input);
}

/// Recovers an engine from metadata stores; a recovered engine must survive its own encoding.
fn recover(files: MetaFiles) {
    let Ok((_journal, rec)) = Journal::open(files) else {
        return;
    };
    let Ok(engine) = crate::volume::recover_engine(&rec, &Limits::default()) else {
        return;
    };
    let bytes = bincode::serialize(&engine).expect("a recovered engine serialises");
    let again: Engine = bincode::deserialize(&bytes).expect("a recovered engine decodes again");
    assert!(
        again == engine,
        "the engine changed through its own encoding"
    );
}

fn store(bytes: Vec<u8>) -> Arc<MemStore> {
    Arc::new(MemStore::from_vec(bytes))
}

/// Checkpoint input: the first byte picks the form of the rest. Even: the whole
/// `checkpoint.a` file (the journal's start marker names the crc the file claims). Odd: the
/// checkpoint payload (the engine encoding), framed with a valid header and crc so that the
/// fuzzer reaches the engine decoder.
pub fn checkpoint(input: &[u8]) {
    let Some((&mode, body)) = input.split_first() else {
        return;
    };
    let (image, crc) = if mode & 1 == 0 {
        let crc = body
            .get(12..16)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        (body.to_vec(), crc)
    } else {
        encode_checkpoint(1, body)
    };
    recover(MetaFiles {
        checkpoint_a: store(image),
        checkpoint_b: store(Vec::new()),
        journal: store(encode_marker(1, crc)),
    });
}

/// Journal input: the first byte picks the form of the rest. Even: the whole `journal` file
/// (no checkpoint). Odd: records (each a 2-byte little-endian length and its bytes, the last
/// one taking what is left), framed with valid crcs and sequence numbers after the start
/// marker of generation 0, so that the fuzzer reaches the op decoder and the replay.
pub fn journal(input: &[u8]) {
    let Some((&mode, mut body)) = input.split_first() else {
        return;
    };
    let journal = if mode & 1 == 0 {
        body.to_vec()
    } else {
        let mut out = encode_marker(0, 0);
        let mut seq = 1;
        while !body.is_empty() {
            let len = match body {
                [a, b, rest @ ..] => {
                    body = rest;
                    usize::from(u16::from_le_bytes([*a, *b])).min(rest.len())
                }
                // A lone last byte is a record of its own.
                _ => body.len(),
            };
            let (record, rest) = body.split_at(len);
            encode_frame(&mut out, 0, seq, record);
            seq += 1;
            body = rest;
        }
        out
    };
    recover(MetaFiles {
        checkpoint_a: store(Vec::new()),
        checkpoint_b: store(Vec::new()),
        journal: store(journal),
    });
}

/// Text input as a CSI id of every kind: parsing never panics, a parsed id prints back as the
/// same text (one object, one id), and every CSI name maps to a valid agent name.
pub fn csi_ids(input: &[u8]) {
    let Ok(s) = std::str::from_utf8(input) else {
        return;
    };
    for kind in [ids::Kind::Volume, ids::Kind::Snapshot] {
        if let Some(obj) = ids::parse(kind, s) {
            assert_eq!(obj.id_string(kind), s, "a parsed id prints differently");
        }
        let _ = ids::required("id", kind, s);
    }
    if let Some(name) = ids::parse_group(s) {
        assert_eq!(ids::group_id(name), s);
    }
    let _ = ids::valid_node(s);
    for prefix in [
        ids::VOLUME_PREFIX,
        ids::SNAPSHOT_PREFIX,
        ids::CLONE_PREFIX,
        ids::GROUP_PREFIX,
    ] {
        let name = ids::agent_name(prefix, s);
        assert!(
            (1..=63).contains(&name.len())
                && name.starts_with(prefix)
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "agent name {name:?} of {s:?} is not a valid agent name"
        );
        assert_eq!(name, ids::agent_name(prefix, s), "agent names are stable");
    }
    let group = ids::group_id(&ids::agent_name(ids::GROUP_PREFIX, s));
    assert!(
        ids::parse_group(&group).is_some(),
        "{group:?} does not parse"
    );
}

/// Text input as StorageClass parameters, one `key=value` per line: parsing never panics and
/// what it accepts is within the documented ranges.
pub fn csi_params(input: &[u8]) {
    let Ok(s) = std::str::from_utf8(input) else {
        return;
    };
    let map: HashMap<String, String> = s
        .split('\n')
        .map(|l| l.split_once('=').unwrap_or((l, "")))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    match Params::parse(&map) {
        Ok(p) => {
            assert!(p.copy_rate.is_none_or(|r| r <= 150));
            assert!(p.clean_rate.is_none_or(|r| r <= 150));
            assert!(p.grain_kib.is_none_or(|g| g == 64 || g == 256));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Text input as an `fc mkvol -size` argument: parsing never panics, and a size it accepts is
/// exactly the decimal number times the unit (checked in integers) and reads back as itself.
pub fn fc_size(input: &[u8]) {
    let Ok(s) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(n) = crate::fc::output::parse_size(s) else {
        return;
    };
    assert_eq!(crate::fc::output::parse_size(&n.to_string()), Ok(n));
    // The number and the unit as parse_size splits them.
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u128 = match unit.trim().to_ascii_lowercase().chars().next() {
        None | Some('b') => 1,
        Some('k') => 1 << 10,
        Some('m') => 1 << 20,
        Some('g') => 1 << 30,
        Some('t') => 1 << 40,
        Some(c) => panic!("{s:?} accepted with unit {c:?}"),
    };
    // n * 10^k == DIGITS * mult, where DIGITS is the number without its point.
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let frac = frac.trim_end_matches('0');
    let digits = format!("{int}{frac}");
    let (Ok(digits), Some(scale)) = (
        digits.trim_start_matches('0').parse::<u128>().or_else(|e| {
            if digits.bytes().all(|b| b == b'0') {
                Ok(0)
            } else {
                Err(e)
            }
        }),
        10u128.checked_pow(frac.len() as u32),
    ) else {
        return; // too many digits to check in 128 bits
    };
    if let (Some(lhs), Some(rhs)) = (u128::from(n).checked_mul(scale), digits.checked_mul(mult)) {
        assert_eq!(lhs, rhs, "{s:?} parsed as {n} bytes");
    }
}

//! The NBD wire format (NetworkBlockDevice `doc/proto.md`): magic numbers, flags, option and
//! command codes, and the encoders and decoders the server needs. No policy lives here: the
//! handshake and transmission modules decide what to answer.
//!
//! Every length that arrives from the wire is checked against a bound before anything is
//! allocated for it.

use std::io::{self, Read};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Several connections to the export see each other's completed writes and flushes.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Error values of replies.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// Largest READ or WRITE payload accepted (and advertised as the maximum payload): 32 MiB, the
/// size the protocol says a client may always use.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option data accepted during the handshake.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Preferred block size advertised.
pub const PREFERRED_BLOCK: u32 = 4096;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const REPLY_LEN: usize = 16;

/// The server's greeting: magic, newstyle magic, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option header as sent by the client (its data follows on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// `IHAVEOPT` unless the client is broken.
    pub magic: u64,
    /// The option code.
    pub option: u32,
    /// Length of the option data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Reads one option header.
    pub fn read(r: &mut impl Read) -> io::Result<Self> {
        let mut b = [0u8; 16];
        r.read_exact(&mut b)?;
        Ok(Self {
            magic: be64(&b[..8]),
            option: be32(&b[8..12]),
            len: be32(&b[12..16]),
        })
    }
}

/// Appends one option reply (header and data) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Reply data is produced by the server and always small (names and messages are capped).
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error reply carrying a human-readable message.
pub fn put_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    put_option_reply(out, option, reply, clip(message).as_bytes());
}

/// Appends an `NBD_REP_SERVER` entry for `name`.
pub fn put_server_entry(out: &mut Vec<u8>, option: u32, name: &str) {
    let name = clip(name).as_bytes();
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name);
    put_option_reply(out, option, REP_SERVER, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn put_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size.to_be_bytes());
    data[10..].copy_from_slice(&flags.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &data);
}

/// Appends `NBD_REP_INFO` with a string payload (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn put_info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    let s = clip(s).as_bytes();
    let mut data = Vec::with_capacity(2 + s.len());
    data.extend_from_slice(&info.to_be_bytes());
    data.extend_from_slice(s);
    put_option_reply(out, option, REP_INFO, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn put_info_block_size(
    out: &mut Vec<u8>,
    option: u32,
    minimum: u32,
    preferred: u32,
    maximum: u32,
) {
    let mut data = [0u8; 14];
    data[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&minimum.to_be_bytes());
    data[6..10].copy_from_slice(&preferred.to_be_bytes());
    data[10..].copy_from_slice(&maximum.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &data);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes unless the
/// client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(out.len() + 124, 0);
    }
    out
}

/// Why option data does not decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the information requested.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// Information types requested, in the client's order.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Decodes the option data; every length is checked against the data actually present.
    pub fn parse(data: &[u8]) -> Result<Self, Malformed> {
        let name_len = data
            .get(..4)
            .map(be32)
            .ok_or(Malformed("option data is shorter than a name length"))?
            as usize;
        let rest = &data[4..];
        // The name is followed by a 2-byte count of information requests, even when empty.
        let room = rest.len().checked_sub(2).ok_or(Malformed(
            "option data has no count of information requests",
        ))?;
        if name_len > room {
            return Err(Malformed("export name length exceeds the option data"));
        }
        if name_len > MAX_STRING {
            return Err(Malformed("export name is longer than 4096 bytes"));
        }
        let name = std::str::from_utf8(&rest[..name_len])
            .map_err(|_| Malformed("export name is not UTF-8"))?;
        if name.contains('\0') {
            return Err(Malformed("export name contains NUL"));
        }
        let rest = &rest[name_len..];
        let count = be16(&rest[..2]) as usize;
        let rest = &rest[2..];
        if rest.len() != count * 2 {
            return Err(Malformed(
                "number of information requests does not match the option data",
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            requests: rest.chunks_exact(2).map(be16).collect(),
        })
    }
}

/// Decodes the data of `NBD_OPT_EXPORT_NAME`: the whole data is the name.
pub fn parse_export_name(data: &[u8]) -> Result<String, Malformed> {
    if data.len() > MAX_STRING {
        return Err(Malformed("export name is longer than 4096 bytes"));
    }
    let name = std::str::from_utf8(data).map_err(|_| Malformed("export name is not UTF-8"))?;
    if name.contains('\0') {
        return Err(Malformed("export name contains NUL"));
    }
    Ok(name.to_owned())
}

/// A transmission request header (the WRITE payload follows on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length of the range (and of the WRITE payload).
    pub len: u32,
}

impl Request {
    /// Decodes a request header; `None` when the magic is wrong (the stream cannot be trusted
    /// any more: the caller disconnects).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        (be32(&b[..4]) == REQUEST_MAGIC).then(|| Self {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        })
    }

    /// Encodes a request header (for tests and clients).
    #[cfg(test)]
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Writes a simple reply header into the first [`REPLY_LEN`] bytes of `out`.
pub fn put_simple_reply(out: &mut [u8], error: u32, cookie: u64) {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// A simple reply header without data.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    put_simple_reply(&mut b, error, cookie);
    b
}

/// Cuts a string to the protocol's 4096-byte limit on a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn info_request_round_trips() {
        let r = InfoRequest::parse(&info_data(b"vol-a", &[INFO_BLOCK_SIZE, INFO_NAME])).unwrap();
        assert_eq!(r.name, "vol-a");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        let empty = InfoRequest::parse(&info_data(b"", &[])).unwrap();
        assert_eq!(empty.name, "");
        assert!(empty.requests.is_empty());
    }

    #[test]
    fn info_request_rejects_every_inconsistent_length() {
        let good = info_data(b"abc", &[INFO_EXPORT]);
        // Every truncation and every extension is malformed.
        for cut in 0..good.len() {
            assert!(InfoRequest::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(InfoRequest::parse(&longer).is_err());
        // A name length that claims more than the data holds, up to u32::MAX.
        for claimed in [4u32, 5, 1000, u32::MAX] {
            let mut d = good.clone();
            d[..4].copy_from_slice(&claimed.to_be_bytes());
            assert!(InfoRequest::parse(&d).is_err(), "claimed {claimed}");
        }
        // An empty name without the request count (found by fuzzing: it panicked).
        for cut in [4, 5] {
            let e = InfoRequest::parse(&info_data(b"", &[])[..cut]).unwrap_err();
            assert_eq!(e.0, "option data has no count of information requests");
        }
        assert!(InfoRequest::parse(&info_data(&[0xff, 0xfe], &[])).is_err());
        assert!(InfoRequest::parse(&info_data(b"a\0b", &[])).is_err());
    }

    #[test]
    fn request_header_round_trips_and_checks_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let mut b = r.encode();
        assert_eq!(Request::parse(&b), Some(r));
        b[0] ^= 1;
        assert_eq!(Request::parse(&b), None);
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let r = simple_reply(EINVAL, 7);
        assert_eq!(&r[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&r[4..8], &22u32.to_be_bytes());
        assert_eq!(&r[8..], &7u64.to_be_bytes());

        let mut out = Vec::new();
        put_info_block_size(&mut out, OPT_GO, 512, 4096, MAX_PAYLOAD);
        assert_eq!(out.len(), 20 + 14);
        assert_eq!(&out[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[16..20], &14u32.to_be_bytes());

        assert_eq!(export_name_reply(1, 3, false).len(), 134);
        assert_eq!(export_name_reply(1, 3, true).len(), 10);
        assert_eq!(greeting()[16..], [0, 3]);
    }

    #[test]
    fn strings_are_clipped_on_a_character_boundary() {
        let long = "é".repeat(3000); // 6000 bytes
        let c = clip(&long);
        assert!(c.len() <= MAX_STRING && c.len() >= MAX_STRING - 1);
        assert!(c.chars().all(|ch| ch == 'é'));
    }
}

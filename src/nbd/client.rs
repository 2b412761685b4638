//! A small blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies, one request at a
//! time) over a Unix socket: what the standalone walk-through and benchmarks need to read and
//! write an export without any tool installed. Tests use real clients (qemu-io, nbdcopy, ...).

use super::proto::*;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// One connection to one export.
pub struct Client {
    sock: UnixStream,
    size: u64,
    flags: u16,
    handle: u64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Client {
    /// Connects to `socket` and selects `export` with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> io::Result<Self> {
        let mut sock = UnixStream::connect(socket)?;
        let (size, flags) = handshake(&mut sock, export)?;
        Ok(Self {
            sock,
            size,
            flags,
            handle: 0,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags the server sent.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        self.handle += 1;
        let mut req = Vec::with_capacity(REQUEST_LEN + data.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.sock.write_all(&req)?;
        if read_u32(&mut self.sock)? != SIMPLE_REPLY_MAGIC {
            return Err(bad("bad reply magic"));
        }
        let error = read_u32(&mut self.sock)?;
        if read_u64(&mut self.sock)? != self.handle {
            return Err(bad("reply to another request"));
        }
        if error != 0 {
            return Err(io::Error::from_raw_os_error(error as i32));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (in requests of at most 32 MiB).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_PAYLOAD as usize);
            self.request(CMD_READ, 0, offset + done as u64, n as u32, &[])?;
            self.sock.read_exact(&mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset` (in requests of at most 32 MiB).
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        for (i, chunk) in data.chunks(MAX_PAYLOAD as usize).enumerate() {
            let at = offset + (i * MAX_PAYLOAD as usize) as u64;
            self.request(CMD_WRITE, 0, at, chunk.len() as u32, chunk)?;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])
    }
}

/// The fixed-newstyle handshake on `s`, selecting `export` with `NBD_OPT_GO`: returns the
/// export's size and transmission flags and leaves `s` in the transmission phase (where the
/// kernel nbd driver takes a connection over).
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> io::Result<(u64, u16)> {
    if read_u64(s)? != NBDMAGIC || read_u64(s)? != IHAVEOPT {
        return Err(bad("not a newstyle NBD server"));
    }
    let server_flags = read_u16(s)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the server does not speak fixed newstyle"));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&client_flags.to_be_bytes())?;
    // NBD_OPT_GO: name length, name, no information requests.
    let mut opt = Vec::with_capacity(export.len() + 6);
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    let mut msg = Vec::new();
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(opt.len() as u32).to_be_bytes());
    msg.extend_from_slice(&opt);
    s.write_all(&msg)?;
    let (mut size, mut flags) = (None, 0);
    loop {
        if read_u64(s)? != OPT_REPLY_MAGIC {
            return Err(bad("bad option reply magic"));
        }
        let _option = read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_DATA {
            return Err(bad("oversized option reply"));
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
            }
            REP_INFO => {}
            k if k & (1 << 31) != 0 => {
                let text = String::from_utf8_lossy(&data);
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("export {export:?}: {text} (reply {k:#x})"),
                ));
            }
            k => return Err(bad(format!("unexpected option reply {k:#x}"))),
        }
    }
    let size = size.ok_or_else(|| bad("the server sent no export information"))?;
    Ok((size, flags))
}

impl Drop for Client {
    fn drop(&mut self) {
        // NBD_CMD_DISC has no reply; the server closes after answering what is in flight.
        let mut req = Vec::with_capacity(REQUEST_LEN);
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&CMD_DISC.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&0u32.to_be_bytes());
        let _ = self.sock.write_all(&req);
    }
}

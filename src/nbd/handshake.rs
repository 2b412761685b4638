//! Fixed newstyle negotiation: greeting, client flags, then options until the client picks an
//! export (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`) or leaves.

use super::proto::*;
use super::server::{Export, Exports};
use std::io::{self, BufRead, Write};
use std::sync::Arc;

/// How the negotiation ended.
pub(super) enum Outcome {
    /// Enter transmission on `export` with these transmission flags.
    Transmission {
        export: Arc<dyn Export>,
        /// The size sent to the client; requests are checked against it.
        size: u64,
        flags: u16,
    },
    /// The client left (`NBD_OPT_ABORT`, or it closed the connection between options).
    Closed,
}

/// Options a client may send on one connection before it is considered abusive.
const MAX_OPTIONS: usize = 16 * 1024;

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Transmission flags of an export.
pub(super) fn transmission_flags(export: &dyn Export) -> u16 {
    let mut f = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    if export.read_only() {
        f |= FLAG_READ_ONLY;
    }
    f
}

/// Runs the handshake. Errors mean the connection must be dropped (a hard disconnect).
pub(super) fn negotiate<R: BufRead, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &dyn Exports,
) -> io::Result<Outcome> {
    w.write_all(&greeting())?;
    w.flush()?;
    let mut cf = [0u8; 4];
    r.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(invalid("client set unknown handshake flags"));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    for _ in 0..MAX_OPTIONS {
        if r.fill_buf()?.is_empty() {
            // The client went away between options.
            return Ok(Outcome::Closed);
        }
        let hdr = OptionHeader::read(r)?;
        if hdr.magic != IHAVEOPT {
            return Err(invalid("option without the IHAVEOPT magic"));
        }
        let mut out = Vec::new();
        if hdr.len > MAX_OPTION_DATA {
            // Refuse without reading the data: the client is told why, then dropped.
            put_option_error(
                &mut out,
                hdr.option,
                REP_ERR_TOO_BIG,
                "option data is larger than 64 KiB",
            );
            let _ = w.write_all(&out).and_then(|()| w.flush());
            return Err(invalid("option data larger than 64 KiB"));
        }
        let mut data = vec![0u8; hdr.len as usize];
        r.read_exact(&mut data)?;

        match hdr.option {
            OPT_EXPORT_NAME => {
                // This option cannot fail politely: an unknown export ends the session.
                let name = parse_export_name(&data).map_err(|m| invalid(m.0))?;
                let export = exports
                    .lookup(&name)
                    .ok_or_else(|| invalid("NBD_OPT_EXPORT_NAME named an unknown export"))?;
                let (size, flags) = (export.size(), transmission_flags(&*export));
                w.write_all(&export_name_reply(size, flags, no_zeroes))?;
                w.flush()?;
                return Ok(Outcome::Transmission {
                    export,
                    size,
                    flags,
                });
            }
            OPT_ABORT => {
                put_option_reply(&mut out, hdr.option, REP_ACK, &[]);
                // The client may close without waiting for the acknowledgement.
                let _ = w.write_all(&out).and_then(|()| w.flush());
                return Ok(Outcome::Closed);
            }
            OPT_LIST if !data.is_empty() => {
                put_option_error(
                    &mut out,
                    hdr.option,
                    REP_ERR_INVALID,
                    "NBD_OPT_LIST takes no data",
                );
            }
            OPT_LIST => {
                for name in exports.list() {
                    put_server_entry(&mut out, hdr.option, &name);
                }
                put_option_reply(&mut out, hdr.option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => {
                if let Some(outcome) = info(&mut out, hdr.option, &data, exports) {
                    w.write_all(&out)?;
                    w.flush()?;
                    if hdr.option == OPT_GO {
                        return Ok(outcome);
                    }
                    continue;
                }
            }
            other => {
                put_option_error(
                    &mut out,
                    other,
                    REP_ERR_UNSUP,
                    "option not supported by this server",
                );
            }
        }
        w.write_all(&out)?;
        w.flush()?;
    }
    Err(invalid("too many options"))
}

/// Answers `NBD_OPT_INFO` / `NBD_OPT_GO` into `out`; returns the export on success.
fn info(out: &mut Vec<u8>, option: u32, data: &[u8], exports: &dyn Exports) -> Option<Outcome> {
    let req = match InfoRequest::parse(data) {
        Ok(r) => r,
        Err(m) => {
            put_option_error(out, option, REP_ERR_INVALID, m.0);
            return None;
        }
    };
    let Some(export) = exports.lookup(&req.name) else {
        let msg = if req.name.is_empty() {
            "this server has no default export: name one".to_owned()
        } else {
            format!("no export named {:?}", req.name)
        };
        put_option_error(out, option, REP_ERR_UNKNOWN, &msg);
        return None;
    };
    let (size, flags) = (export.size(), transmission_flags(&*export));
    put_info_export(out, option, size, flags);
    if req.requests.contains(&INFO_NAME) {
        let name = export.canonical_name().unwrap_or(req.name);
        put_info_string(out, option, INFO_NAME, &name);
    }
    if req.requests.contains(&INFO_DESCRIPTION)
        && let Some(d) = export.description()
    {
        put_info_string(out, option, INFO_DESCRIPTION, &d);
    }
    // Sent whether asked or not (the protocol allows unrequested information).
    let min = export.min_block_size().clamp(1, 1 << 16);
    put_info_block_size(out, option, min, PREFERRED_BLOCK.max(min), MAX_PAYLOAD);
    put_option_reply(out, option, REP_ACK, &[]);
    Some(Outcome::Transmission {
        export,
        size,
        flags,
    })
}

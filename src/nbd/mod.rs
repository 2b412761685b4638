//! NBD server: exports volumes to the kernel `nbd` driver, `nbdfuse`, `qemu` and `libnbd`
//! clients over Unix or TCP sockets (NetworkBlockDevice `doc/proto.md`).
//!
//! - Handshake: fixed newstyle only, with `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`,
//!   `NBD_OPT_LIST`, `NBD_OPT_INFO` and `NBD_OPT_GO` (`NBD_INFO_EXPORT`, `NBD_INFO_NAME`,
//!   `NBD_INFO_DESCRIPTION`, `NBD_INFO_BLOCK_SIZE`); any other option gets
//!   `NBD_REP_ERR_UNSUP`. No TLS, no structured replies.
//! - Transmission: simple replies to `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM`,
//!   `WRITE_ZEROES` (with `NO_HOLE`), `CACHE` (accepted, a no-op) and `DISC`. Replies may be
//!   sent out of order. `NBD_FLAG_CAN_MULTI_CONN` is advertised: a flush syncs the export's
//!   whole store, covering writes from every connection.
//! - Limits: 32 MiB payloads, 64 KiB option data; requests outside them get an error reply
//!   (`NBD_EINVAL`, `NBD_ENOSPC` for writes past the end, `NBD_EPERM` for writes to read-only
//!   exports, `NBD_EIO` for storage failures) or, where the stream cannot be trusted any more
//!   (a bad magic), a disconnect.
//!
//! A volume of a [`crate::volume::Pool`] is served by [`PoolExport`]; `Arc<Pool>` implements
//! [`Exports`], naming exports by volume name (or numeric volume id), and counts every request
//! in the pool's stats ([`Metered`]).

pub mod client;
mod handshake;
mod metered;
mod proto;
mod server;
mod transmission;

pub use metered::Metered;
/// Transmission flags a client (the kernel attach) acts on.
pub use proto::{FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY};
pub use server::{
    Export, ExportError, Exports, PoolExport, ServerConfig, Shutdown, serve_connection, serve_tcp,
    serve_unix,
};

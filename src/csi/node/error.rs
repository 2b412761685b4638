//! What can go wrong on the node side, and the one helper that runs the system tools
//! (`mount`, `losetup`, `mkfs.*`, ...) and turns their failures into [`Error`]s.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A node-side failure (attaching, formatting, mounting). Mapped to a gRPC status by the node
/// service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system tool failed.
    #[error("{cmd} failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The device is still in use, so it may not be detached.
    #[error("{device} is still mounted at {at}")]
    Busy {
        /// The block device.
        device: PathBuf,
        /// Where it is mounted.
        at: PathBuf,
    },
    /// The device holds data that is not a filesystem we recognise: it is never formatted.
    #[error(
        "{device} is not blank and holds no filesystem we recognise ({found}); refusing to format it"
    )]
    NotBlank {
        /// The block device.
        device: PathBuf,
        /// What was found.
        found: String,
    },
    /// The device holds another filesystem than the one asked for.
    #[error("{device} holds {found}, not the requested {wanted}")]
    FsMismatch {
        /// The block device.
        device: PathBuf,
        /// The filesystem on the device.
        found: String,
        /// The requested filesystem.
        wanted: String,
    },
    /// A filesystem type we do not create.
    #[error("unsupported filesystem type {0:?} (supported: ext4, xfs)")]
    UnsupportedFs(String),
    /// The attachment is broken (e.g. its NBD client died).
    #[error("{0}")]
    Unhealthy(String),
}

/// Node-side result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an I/O error with what was done and where.
pub fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// Runs `cmd args` to completion (stdin closed); returns stdout, or [`Error::Command`].
pub fn run<S: AsRef<std::ffi::OsStr>>(cmd: &str, args: &[S]) -> Result<String> {
    let out = output(cmd, args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(failed(cmd, args, &out))
    }
}

/// Runs `cmd args` to completion (stdin closed), whatever its exit status.
pub fn output<S: AsRef<std::ffi::OsStr>>(cmd: &str, args: &[S]) -> Result<std::process::Output> {
    tracing::debug!(cmd, args = ?args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(), "run");
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("running", Path::new(cmd)))
}

/// The [`Error::Command`] for a finished command.
pub fn failed<S: AsRef<std::ffi::OsStr>>(
    cmd: &str,
    args: &[S],
    out: &std::process::Output,
) -> Error {
    let line = std::iter::once(cmd.to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    Error::Command {
        cmd: line,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}

/// True when `bin` is an executable on PATH.
pub fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(bin).is_file()))
}

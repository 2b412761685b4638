//! Crash-safe metadata: a write-ahead journal of opaque records plus two alternating checkpoints.
//!
//! The engine serializes its own state; this module only sees byte payloads. Three files (block
//! stores) make up the metadata: `checkpoint.a`, `checkpoint.b` and `journal`. Recovery
//! ([`Journal::open`]) returns the newest checkpoint and every record appended after it.
//!
//! # Format (version 2, all integers little-endian)
//!
//! **Checkpoint slot** — the whole file is one checkpoint (bytes after the payload are ignored):
//!
//! ```text
//! 0   magic        8  "FCCKPT\0\0"
//! 8   version      4  2
//! 12  crc32        4  over bytes 0..12, 16..32 and the payload
//! 16  generation   8  >= 1; odd generations live in checkpoint.a, even ones in checkpoint.b
//! 24  payload_len  8
//! 32  payload
//! ```
//!
//! An empty (zero-length) slot holds no checkpoint.
//!
//! **Journal** — a sequence of frames packed from offset 0; after the last frame the file is
//! zeros up to its size, which grows in [`JOURNAL_CHUNK`] steps:
//!
//! ```text
//! 0   frame_len    4  header + payload (never 0, so zeros end the log)
//! 4   crc32        4  over bytes 0..4 and 8..frame_len
//! 8   generation   8  generation of the checkpoint the record applies to
//! 16  sequence     8  0 for the start marker, then 1, 2, ...
//! 24  payload
//! ```
//!
//! The first frame is the *start marker* of the journal's generation (sequence 0, 40 bytes in
//! all): its payload is `"FCJRNL\0\0"`, the version (4 bytes) and the crc32 of the checkpoint it
//! continues (4 bytes, 0 for generation 0). Records follow with consecutive sequence numbers,
//! one batch per write. The marker proves which checkpoint the journal continues even when no
//! record has been written yet, which is what lets recovery tell an interrupted checkpoint
//! (harmless) from a lost one (fatal).
//!
//! # Checkpointing
//!
//! [`Journal::checkpoint`] (1) flushes pending records, (2) writes the new checkpoint into the
//! slot of generation + 1 and flushes it, (3) zeros the journal, writes the new start marker and
//! flushes. A crash before (2) is durable leaves the old checkpoint and its complete journal; a
//! crash after leaves a newer valid checkpoint whose journal is stale (older marker), zeroed or
//! already restarted — recovery then starts an empty journal for it.
//!
//! # Recovery rules
//!
//! - The newest valid slot is the candidate checkpoint; the journal marker's generation `J`
//!   must match it (then its records are replayed) or be older (stale journal, discarded).
//! - A marker newer than every valid checkpoint means a durable checkpoint was lost:
//!   [`MetaError::Corrupt`] naming the slot that should hold it. So is a broken start marker, a
//!   zero-length journal next to a checkpoint, and a broken slot with no valid alternative
//!   (except a torn `checkpoint.a` while the journal is still at generation 0: an interrupted
//!   first checkpoint).
//! - A broken slot next to a valid, newer-or-matching one is an interrupted or superseded
//!   checkpoint: tolerated with a warning.
//! - Records are replayed while they are intact, of generation `J`, and consecutive. The first
//!   one that is not ends the log: that is the torn tail a crash leaves. It is logged, counted in
//!   [`Recovered::discarded_tail_bytes`] and zeroed (durably) so the next append overwrites it
//!   and stale frames can never be revived.
//!
//! Lengths read from disk are bounded by the file size before anything is allocated; bad bytes
//! produce errors, never panics.

pub(crate) mod format;
mod journal;
#[cfg(test)]
mod tests;

pub use journal::{JOURNAL_CHUNK, Journal, Recovered};

use crate::store::{BlockStore, FileStore, MemStore, StoreError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the checkpoint slot holding odd generations.
pub const CHECKPOINT_A: &str = "checkpoint.a";
/// File name of the checkpoint slot holding even generations.
pub const CHECKPOINT_B: &str = "checkpoint.b";
/// File name of the journal.
pub const JOURNAL: &str = "journal";

/// Errors from the metadata journal.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A metadata file holds bytes that cannot be trusted; recovering would lose durable state.
    #[error(
        "metadata file {file} is corrupt: {reason}; refusing to start: restore it or remove the \
         data directory"
    )]
    Corrupt {
        /// Name of the file at fault (`checkpoint.a`, `checkpoint.b` or `journal`).
        file: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The underlying store failed.
    #[error("metadata store I/O failed: {0}")]
    Store(#[from] StoreError),
    /// Creating or inspecting the metadata directory failed.
    #[error("metadata directory {}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record or checkpoint is too large for the format.
    #[error("{what} ({len}) exceeds the limit of {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size (bytes, or the generation number).
        len: u64,
        /// The limit.
        max: u64,
    },
    /// An earlier store operation failed, so the on-disk state is unknown.
    #[error("metadata journal is unusable after an earlier I/O failure; reopen it to recover")]
    Poisoned,
}

/// The three stores that hold the metadata.
#[derive(Debug, Clone)]
pub struct MetaFiles {
    /// Checkpoint slot for odd generations.
    pub checkpoint_a: Arc<dyn BlockStore>,
    /// Checkpoint slot for even generations.
    pub checkpoint_b: Arc<dyn BlockStore>,
    /// The write-ahead journal.
    pub journal: Arc<dyn BlockStore>,
}

impl MetaFiles {
    /// Opens `checkpoint.a`, `checkpoint.b` and `journal` under `dir` as [`FileStore`]s,
    /// creating the directory and any missing file (empty).
    ///
    /// A missing file is only created when every existing one is empty (an interrupted first
    /// start); a file missing next to one that holds data is reported as [`MetaError::Corrupt`]
    /// rather than silently recreated.
    pub fn open_dir(dir: &Path) -> Result<Self, MetaError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MetaError::Io { path, source }
        };
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        if created_dir && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The new directory's own entry must be durable too.
            sync_dir(parent).map_err(io_err(parent))?;
        }
        let names = [CHECKPOINT_A, CHECKPOINT_B, JOURNAL];
        let paths = names.map(|n| dir.join(n));
        let mut sizes = [None; 3];
        for (size, path) in sizes.iter_mut().zip(&paths) {
            *size = match std::fs::metadata(path) {
                Ok(m) => Some(m.len()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(path)(e)),
            };
        }
        if let Some(missing) = sizes.iter().position(Option::is_none) {
            if let Some(full) = sizes.iter().position(|s| s.is_some_and(|n| n > 0)) {
                return Err(MetaError::Corrupt {
                    file: names[missing],
                    reason: format!("file is missing while {} holds data", names[full]),
                });
            }
            for (size, path) in sizes.iter().zip(&paths) {
                if size.is_none() {
                    // create_new: never truncate a file that appeared meanwhile.
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .map_err(io_err(path))?;
                }
            }
            // Make the new directory entries durable, or a crash could lose a whole file.
            sync_dir(dir).map_err(io_err(dir))?;
        }
        let [a, b, j] = paths;
        Ok(Self {
            checkpoint_a: Arc::new(FileStore::open(a)?),
            checkpoint_b: Arc::new(FileStore::open(b)?),
            journal: Arc::new(FileStore::open(j)?),
        })
    }

    /// Three empty in-memory stores (nothing survives the process).
    pub fn in_memory() -> Self {
        Self {
            checkpoint_a: Arc::new(MemStore::new(0)),
            checkpoint_b: Arc::new(MemStore::new(0)),
            journal: Arc::new(MemStore::new(0)),
        }
    }
}

/// Flushes a directory, making the entries created in it durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

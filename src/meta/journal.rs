//! The journal handle: recovery on open, appends, syncs and checkpoints.

use super::format::{
    CKPT_HEADER_LEN, FRAME_HEADER_LEN, Frame, MARKER_FRAME_LEN, MAX_RECORD_LEN, Slot,
    decode_marker, encode_checkpoint, encode_frame, encode_marker, last_nonzero_end,
    read_checkpoint, read_frame,
};
use super::{CHECKPOINT_A, CHECKPOINT_B, JOURNAL, MetaError, MetaFiles};
use crate::store::{BlockStore, StoreError};

/// The journal store grows in steps of this many bytes, so appends rarely resize it.
pub const JOURNAL_CHUNK: u64 = 1 << 20;

const SLOT_NAMES: [&str; 2] = [CHECKPOINT_A, CHECKPOINT_B];

/// Slot that holds checkpoint `generation`: odd generations go to `checkpoint.a`, even ones to
/// `checkpoint.b`, so consecutive checkpoints always alternate.
fn slot_index(generation: u64) -> usize {
    if generation % 2 == 1 { 0 } else { 1 }
}

/// What recovery found; see [`Journal::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Payload of the newest valid checkpoint; `None` before the first checkpoint.
    pub checkpoint: Option<Vec<u8>>,
    /// Records appended after that checkpoint, oldest first, to replay onto it.
    pub records: Vec<Vec<u8>>,
    /// Generation of the checkpoint (0 when there is none).
    pub generation: u64,
    /// Bytes of torn or stray journal tail found after the last good record and wiped.
    pub discarded_tail_bytes: u64,
}

/// The first frame of the journal.
enum Head {
    /// Zero-length journal file.
    Missing,
    /// Non-empty but all zeros: the start marker was never made durable.
    Zeroed,
    /// A valid start marker for `generation`, bound to the checkpoint with crc `checkpoint_crc`.
    Marker {
        generation: u64,
        checkpoint_crc: u32,
    },
    /// Anything else.
    Broken(String),
}

fn read_head(store: &dyn BlockStore) -> Result<Head, StoreError> {
    let size = store.len();
    if size == 0 {
        return Ok(Head::Missing);
    }
    Ok(match read_frame(store, 0, size)? {
        Ok(Frame {
            generation,
            seq: 0,
            payload,
            ..
        }) => match decode_marker(&payload) {
            Ok(checkpoint_crc) => Head::Marker {
                generation,
                checkpoint_crc,
            },
            Err(reason) => Head::Broken(reason),
        },
        Ok(Frame {
            generation, seq, ..
        }) => Head::Broken(format!(
            "first frame is record {seq} of generation {generation}, not a start marker"
        )),
        Err(reason) => match last_nonzero_end(store, 0, size)? {
            None => Head::Zeroed,
            Some(_) => Head::Broken(format!("no valid start marker: {reason}")),
        },
    })
}

/// How recovery continues once the checkpoint is chosen.
enum Plan {
    /// The journal belongs to the chosen checkpoint: replay its records.
    Replay,
    /// The journal is empty or belongs to an older generation: start it afresh (why, if worth a
    /// warning).
    Reset(Option<String>),
}

/// The crash-safe metadata journal: a write-ahead log of opaque records plus two alternating
/// checkpoint slots. See the [module docs](super) for the format and recovery rules.
#[derive(Debug)]
pub struct Journal {
    files: MetaFiles,
    /// Generation of the current checkpoint (0: none yet).
    generation: u64,
    /// CRC of the current checkpoint (0 for generation 0), echoed in the start marker.
    checkpoint_crc: u32,
    /// Offset just past the last appended record. Everything beyond it reads as zeros.
    end: u64,
    /// Sequence number of the next record (the start marker is 0).
    next_seq: u64,
    /// Appends not yet flushed.
    dirty: bool,
    /// Set by a failed store operation: what reached the disk is unknown, so refuse to go on.
    poisoned: bool,
}

impl Journal {
    /// Recovers the metadata: picks the newest valid checkpoint and returns it with every journal
    /// record written after it.
    ///
    /// A torn journal tail (the normal result of a crash) is reported in
    /// [`Recovered::discarded_tail_bytes`], logged, and wiped so the next append continues right
    /// after the last good record. A checkpoint slot that is broken is tolerated only when the
    /// journal shows it is not the newest (an interrupted checkpoint); anything that would lose
    /// durable state is refused with [`MetaError::Corrupt`]. Repairs (wiping a torn tail,
    /// restarting a superseded journal) are flushed before this returns.
    pub fn open(files: MetaFiles) -> Result<(Journal, Recovered), MetaError> {
        let mut slots = [
            read_checkpoint(&*files.checkpoint_a)?,
            read_checkpoint(&*files.checkpoint_b)?,
        ];
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Slot::Valid { generation, .. } = *slot
                && slot_index(generation) != i
            {
                // Only possible if files were swapped or copied around: never trust it.
                *slot = Slot::Broken(format!(
                    "holds generation {generation}, which belongs in {}",
                    SLOT_NAMES[slot_index(generation)]
                ));
            }
        }
        let best = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Valid {
                    generation, crc, ..
                } => Some((i, *generation, *crc)),
                _ => None,
            })
            .max_by_key(|&(_, g, _)| g);
        let head = read_head(&*files.journal)?;

        let first_broken = || {
            slots.iter().enumerate().find_map(|(i, s)| match s {
                Slot::Broken(r) => Some((SLOT_NAMES[i], r.clone())),
                _ => None,
            })
        };
        let corrupt = |file: &'static str, reason: String| MetaError::Corrupt { file, reason };

        let (chosen, plan) = match (head, best) {
            (Head::Broken(reason), _) => return Err(corrupt(JOURNAL, reason)),
            (Head::Missing, Some((i, g, _))) => {
                // A journal is created with its start marker before any checkpoint can exist.
                return Err(corrupt(
                    JOURNAL,
                    format!(
                        "file is empty (0 bytes) but {} holds checkpoint generation {g}: \
                         the journal was truncated",
                        SLOT_NAMES[i]
                    ),
                ));
            }
            (Head::Missing | Head::Zeroed, None) => {
                if let Some((file, reason)) = first_broken() {
                    return Err(corrupt(
                        file,
                        format!("{reason} (and no other valid checkpoint)"),
                    ));
                }
                (None, Plan::Reset(None))
            }
            (Head::Zeroed, Some(b)) => (
                Some(b),
                Plan::Reset(Some(format!(
                    "journal holds no start marker (interrupted checkpoint {}); starting it afresh",
                    b.1
                ))),
            ),
            (
                Head::Marker {
                    generation: j,
                    checkpoint_crc,
                },
                best,
            ) => match best {
                Some((i, h, crc)) if h == j => {
                    if crc != checkpoint_crc {
                        return Err(corrupt(
                            JOURNAL,
                            format!(
                                "its start marker belongs to a checkpoint of generation {j} with \
                                 crc {checkpoint_crc:#010x}, but {} holds one with crc {crc:#010x}",
                                SLOT_NAMES[i]
                            ),
                        ));
                    }
                    (best, Plan::Replay)
                }
                // A checkpoint was made durable but the crash came before its start marker: the
                // old journal's records are all inside that checkpoint.
                Some((_, h, _)) if h > j => (
                    best,
                    Plan::Reset(Some(format!(
                        "journal of generation {j} superseded by checkpoint {h} \
                         (interrupted checkpoint); starting it afresh"
                    ))),
                ),
                _ if j == 0 => {
                    // No valid checkpoint: only an interrupted first checkpoint may have left
                    // bytes, and only in its own slot.
                    if let Slot::Broken(r) = &slots[1] {
                        return Err(corrupt(
                            CHECKPOINT_B,
                            format!("{r} (and no other valid checkpoint)"),
                        ));
                    }
                    if checkpoint_crc != 0 {
                        return Err(corrupt(
                            JOURNAL,
                            format!(
                                "start marker of generation 0 names checkpoint crc \
                                 {checkpoint_crc:#010x}, but generation 0 has no checkpoint"
                            ),
                        ));
                    }
                    (None, Plan::Replay)
                }
                _ => {
                    // The journal continues generation j, so checkpoint j existed durably.
                    let file = SLOT_NAMES[slot_index(j)];
                    let reason = match &slots[slot_index(j)] {
                        Slot::Broken(r) => format!(
                            "{r}; it held checkpoint generation {j}, which the journal continues"
                        ),
                        Slot::Empty => format!(
                            "file is empty but the journal continues checkpoint generation {j} \
                             from it: the checkpoint was lost"
                        ),
                        Slot::Valid { generation, .. } => format!(
                            "holds generation {generation} but the journal continues generation \
                             {j}: the newer checkpoint was lost"
                        ),
                    };
                    return Err(corrupt(file, reason));
                }
            },
        };

        // A broken slot that got past the checks above is the one the next (or an interrupted)
        // checkpoint writes: harmless, and overwritten by the next checkpoint.
        if let Some((file, reason)) = first_broken() {
            tracing::warn!(
                file,
                %reason,
                "ignoring unusable checkpoint slot: it is an interrupted or superseded checkpoint"
            );
        }

        let (generation, checkpoint_crc) = chosen.map_or((0, 0), |(_, g, c)| (g, c));
        let checkpoint =
            chosen.map(
                |(i, _, _)| match std::mem::replace(&mut slots[i], Slot::Empty) {
                    Slot::Valid { payload, .. } => payload,
                    _ => unreachable!("chosen slot is valid"),
                },
            );
        let mut journal = Journal {
            files,
            generation,
            checkpoint_crc,
            end: MARKER_FRAME_LEN,
            next_seq: 1,
            dirty: false,
            poisoned: false,
        };
        let mut recovered = Recovered {
            checkpoint,
            records: Vec::new(),
            generation,
            discarded_tail_bytes: 0,
        };
        match plan {
            Plan::Replay => journal.replay(&mut recovered)?,
            Plan::Reset(why) => {
                if let Some(why) = why {
                    tracing::warn!(file = JOURNAL, generation, "{why}");
                }
                journal.restart_journal(journal.files.journal.len())?;
            }
        }
        Ok((journal, recovered))
    }

    /// Reads the records of the current generation, then wipes whatever follows them.
    fn replay(&mut self, recovered: &mut Recovered) -> Result<(), MetaError> {
        let store = &*self.files.journal;
        let size = store.len();
        let stop = loop {
            match read_frame(store, self.end, size)? {
                Err(reason) => break reason,
                Ok(f) if f.generation != self.generation => {
                    break format!(
                        "record at offset {} belongs to generation {}, not {}",
                        self.end, f.generation, self.generation
                    );
                }
                Ok(f) if f.seq != self.next_seq => {
                    break format!(
                        "sequence gap at offset {}: expected record {}, found {}",
                        self.end, self.next_seq, f.seq
                    );
                }
                Ok(f) => {
                    recovered.records.push(f.payload);
                    self.end += f.len;
                    self.next_seq += 1;
                }
            }
        };
        if let Some(last) = last_nonzero_end(store, self.end, size)? {
            let discarded = last - self.end;
            tracing::warn!(
                file = JOURNAL,
                offset = self.end,
                discarded_bytes = discarded,
                records = recovered.records.len(),
                %stop,
                "discarding torn journal tail (normal after a crash)"
            );
            recovered.discarded_tail_bytes = discarded;
            // Wipe the tail durably before appending: a later record of the same length could
            // otherwise re-validate stale frames that follow it.
            zero(store, self.end, size - self.end)?;
            store.flush()?;
        }
        Ok(())
    }

    /// Rewrites the journal as just the start marker of the current generation and flushes it.
    /// `used` bounds the bytes that may be non-zero.
    fn restart_journal(&mut self, used: u64) -> Result<(), MetaError> {
        let store = &*self.files.journal;
        if store.len() < JOURNAL_CHUNK {
            store.resize(JOURNAL_CHUNK)?;
        }
        // Zero first, marker second: the marker must win if both survive a crash.
        zero(store, 0, used.min(store.len()))?;
        store.write_at(&encode_marker(self.generation, self.checkpoint_crc), 0)?;
        store.flush()?;
        self.end = MARKER_FRAME_LEN;
        self.next_seq = 1;
        self.dirty = false;
        Ok(())
    }

    /// Appends records after the last one, in a single write; they are not durable until
    /// [`Journal::sync`]. Empty records are allowed.
    pub fn append(&mut self, records: &[Vec<u8>]) -> Result<(), MetaError> {
        self.check_usable()?;
        if records.is_empty() {
            return Ok(());
        }
        let mut total = 0u64;
        for r in records {
            let len = r.len() as u64;
            if len > MAX_RECORD_LEN {
                return Err(MetaError::TooLarge {
                    what: "journal record",
                    len,
                    max: MAX_RECORD_LEN,
                });
            }
            total += FRAME_HEADER_LEN + len;
        }
        let mut buf = Vec::with_capacity(total as usize);
        for (i, r) in records.iter().enumerate() {
            encode_frame(&mut buf, self.generation, self.next_seq + i as u64, r);
        }
        let new_end = self.end + total;
        self.guard(|j| {
            let store = &*j.files.journal;
            if new_end > store.len() {
                store.resize(new_end.div_ceil(JOURNAL_CHUNK) * JOURNAL_CHUNK)?;
            }
            store.write_at(&buf, j.end)?;
            Ok(())
        })?;
        self.end = new_end;
        self.next_seq += records.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// Makes everything appended so far durable (flushes the journal store).
    pub fn sync(&mut self) -> Result<(), MetaError> {
        self.check_usable()?;
        self.guard(Self::sync_inner)
    }

    fn sync_inner(&mut self) -> Result<(), MetaError> {
        if self.dirty {
            self.files.journal.flush()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Bytes of journal records (framing included) since the current checkpoint; the caller
    /// checkpoints when this grows large.
    pub fn journal_bytes(&self) -> u64 {
        self.end - MARKER_FRAME_LEN
    }

    /// Generation of the current checkpoint (0 before the first one).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Durably writes `payload` as checkpoint `generation + 1` into the other slot, then starts
    /// an empty journal for the new generation. After it returns, recovery yields exactly
    /// (`payload`, no records).
    ///
    /// Pending appends are synced first, so a crash anywhere in here recovers either the old
    /// checkpoint with all its records or the new checkpoint with none.
    pub fn checkpoint(&mut self, payload: &[u8]) -> Result<(), MetaError> {
        self.check_usable()?;
        // Only a hand-crafted checkpoint could get here, but bad bytes must never panic.
        let next = self.generation.checked_add(1).ok_or(MetaError::TooLarge {
            what: "checkpoint generation",
            len: self.generation,
            max: u64::MAX - 1,
        })?;
        let (image, crc) = encode_checkpoint(next, payload);
        debug_assert_eq!(image.len() as u64, CKPT_HEADER_LEN + payload.len() as u64);
        self.guard(|j| {
            j.sync_inner()?;
            let slot = match slot_index(next) {
                0 => &*j.files.checkpoint_a,
                _ => &*j.files.checkpoint_b,
            };
            if slot.len() != image.len() as u64 {
                slot.resize(image.len() as u64)?;
            }
            slot.write_at(&image, 0)?;
            slot.flush()?;
            // From here on the new checkpoint is durable; the start marker retires the old
            // journal (until it is durable, recovery sees the old generation and skips it).
            j.generation = next;
            j.checkpoint_crc = crc;
            let used = j.end;
            j.restart_journal(used)
        })
    }

    fn check_usable(&self) -> Result<(), MetaError> {
        if self.poisoned {
            Err(MetaError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Runs store operations, poisoning the journal if any fails: after a failed write or flush
    /// the on-disk state is unknown, and retrying could make stale bytes look valid.
    fn guard(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<(), MetaError>,
    ) -> Result<(), MetaError> {
        let r = op(self);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }
}

/// Zeros `offset..offset+len`, by discard where the backend supports it.
fn zero(store: &dyn BlockStore, offset: u64, len: u64) -> Result<(), StoreError> {
    if len == 0 {
        return Ok(());
    }
    match store.discard(offset, len) {
        Err(StoreError::Unsupported(_)) => {
            crate::store::write_zeros(offset, len, |b, o| store.write_at(b, o))
        }
        r => r,
    }
}

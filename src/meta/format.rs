//! On-disk encodings of checkpoint slots and journal frames (see the module docs of
//! [`crate::meta`] for the layout). Decoders never trust a length read from disk: every length is
//! checked against the size of the store before anything is allocated.

use crate::store::{BlockStore, StoreError};

/// Magic at the start of a checkpoint slot.
pub(crate) const CKPT_MAGIC: [u8; 8] = *b"FCCKPT\0\0";
/// Magic inside the journal start marker.
pub(crate) const JOURNAL_MAGIC: [u8; 8] = *b"FCJRNL\0\0";
/// Format version of both files.
// 2: bitmaps as runs of words.
pub(crate) const FORMAT_VERSION: u32 = 2;

/// Bytes of the checkpoint header.
pub(crate) const CKPT_HEADER_LEN: u64 = 32;
/// Bytes of a journal frame header.
pub(crate) const FRAME_HEADER_LEN: u64 = 24;
/// Bytes of the start-marker payload (magic, version, checkpoint crc).
const MARKER_PAYLOAD_LEN: usize = 16;
/// Bytes of a whole start-marker frame; the first record follows at this offset.
pub(crate) const MARKER_FRAME_LEN: u64 = FRAME_HEADER_LEN + MARKER_PAYLOAD_LEN as u64;
/// Largest record payload: the frame length must fit its `u32` field.
pub(crate) const MAX_RECORD_LEN: u64 = u32::MAX as u64 - FRAME_HEADER_LEN;

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Whole checkpoint slot image: header followed by the payload.
pub(crate) fn encode_checkpoint(generation: u64, payload: &[u8]) -> (Vec<u8>, u32) {
    let mut buf = Vec::with_capacity(CKPT_HEADER_LEN as usize + payload.len());
    buf.extend_from_slice(&CKPT_MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, filled below
    buf.extend_from_slice(&generation.to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = checkpoint_crc(&buf);
    buf[12..16].copy_from_slice(&crc.to_le_bytes());
    (buf, crc)
}

/// CRC of a checkpoint image: everything except the crc field itself.
fn checkpoint_crc(image: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&image[..12]);
    h.update(&image[16..]);
    h.finalize()
}

/// What a checkpoint slot holds.
#[derive(Debug)]
pub(crate) enum Slot {
    /// Zero-length file: no checkpoint was ever written here.
    Empty,
    /// A checkpoint that passed every check.
    Valid {
        generation: u64,
        crc: u32,
        payload: Vec<u8>,
    },
    /// Non-empty but unusable; the string says why.
    Broken(String),
}

/// Reads and validates one checkpoint slot. Only store I/O errors are `Err`; bad bytes are
/// reported as [`Slot::Broken`] so recovery can decide whether they are tolerable.
pub(crate) fn read_checkpoint(store: &dyn BlockStore) -> Result<Slot, StoreError> {
    let size = store.len();
    if size == 0 {
        return Ok(Slot::Empty);
    }
    if size < CKPT_HEADER_LEN {
        return Ok(Slot::Broken(format!(
            "truncated: {size} bytes, shorter than the {CKPT_HEADER_LEN}-byte header"
        )));
    }
    let mut header = [0u8; CKPT_HEADER_LEN as usize];
    store.read_at(&mut header, 0)?;
    if header[..8] != CKPT_MAGIC {
        return Ok(Slot::Broken(format!(
            "bad magic {:02x?} (expected {:02x?})",
            &header[..8],
            CKPT_MAGIC
        )));
    }
    let version = le_u32(&header[8..]);
    if version != FORMAT_VERSION {
        return Ok(Slot::Broken(format!(
            "unsupported format version {version} (this build reads {FORMAT_VERSION})"
        )));
    }
    let stored_crc = le_u32(&header[12..]);
    let generation = le_u64(&header[16..]);
    let payload_len = le_u64(&header[24..]);
    let room = size - CKPT_HEADER_LEN;
    if payload_len > room {
        return Ok(Slot::Broken(format!(
            "truncated: header announces a {payload_len}-byte payload but only {room} bytes follow it"
        )));
    }
    // Bounded by the store size checked above.
    let mut image = vec![0u8; (CKPT_HEADER_LEN + payload_len) as usize];
    store.read_at(&mut image, 0)?;
    let computed = checkpoint_crc(&image);
    if computed != stored_crc {
        return Ok(Slot::Broken(format!(
            "crc mismatch (stored {stored_crc:#010x}, computed {computed:#010x})"
        )));
    }
    if generation == 0 {
        return Ok(Slot::Broken(
            "checkpoint claims generation 0, which is never written".into(),
        ));
    }
    image.drain(..CKPT_HEADER_LEN as usize);
    Ok(Slot::Valid {
        generation,
        crc: stored_crc,
        payload: image,
    })
}

/// Appends one journal frame to `out`.
pub(crate) fn encode_frame(out: &mut Vec<u8>, generation: u64, seq: u64, payload: &[u8]) {
    let start = out.len();
    let frame_len = u32::try_from(FRAME_HEADER_LEN + payload.len() as u64)
        .expect("record length checked against MAX_RECORD_LEN");
    out.extend_from_slice(&frame_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // crc, filled below
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = frame_crc(&out[start..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The start marker that opens the journal of `generation`, bound to its checkpoint's crc.
pub(crate) fn encode_marker(generation: u64, checkpoint_crc: u32) -> Vec<u8> {
    let mut payload = Vec::with_capacity(MARKER_PAYLOAD_LEN);
    payload.extend_from_slice(&JOURNAL_MAGIC);
    payload.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    payload.extend_from_slice(&checkpoint_crc.to_le_bytes());
    let mut out = Vec::with_capacity(MARKER_FRAME_LEN as usize);
    encode_frame(&mut out, generation, 0, &payload);
    out
}

/// CRC of a frame: everything except the crc field itself.
fn frame_crc(frame: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&frame[..4]);
    h.update(&frame[8..]);
    h.finalize()
}

/// A journal frame that passed its length and crc checks.
#[derive(Debug)]
pub(crate) struct Frame {
    pub generation: u64,
    pub seq: u64,
    pub payload: Vec<u8>,
    /// Bytes the frame occupies, header included.
    pub len: u64,
}

/// Decodes the frame at `offset` of a journal of `size` bytes. `Ok(Err(reason))` means the bytes
/// there are not a whole, intact frame.
pub(crate) fn read_frame(
    store: &dyn BlockStore,
    offset: u64,
    size: u64,
) -> Result<Result<Frame, String>, StoreError> {
    let left = size.saturating_sub(offset);
    if left < FRAME_HEADER_LEN {
        return Ok(Err(format!(
            "{left} bytes left at offset {offset}, too few for a frame header"
        )));
    }
    let mut header = [0u8; FRAME_HEADER_LEN as usize];
    store.read_at(&mut header, offset)?;
    let frame_len = u64::from(le_u32(&header));
    if frame_len == 0 {
        return Ok(Err(format!("zero-length frame at offset {offset}")));
    }
    if frame_len < FRAME_HEADER_LEN {
        return Ok(Err(format!(
            "frame at offset {offset} claims {frame_len} bytes, shorter than its header"
        )));
    }
    if frame_len > left {
        return Ok(Err(format!(
            "frame at offset {offset} claims {frame_len} bytes but only {left} remain"
        )));
    }
    // Bounded by the store size checked above.
    let mut frame = vec![0u8; frame_len as usize];
    store.read_at(&mut frame, offset)?;
    let stored = le_u32(&frame[4..]);
    let computed = frame_crc(&frame);
    if stored != computed {
        return Ok(Err(format!(
            "frame at offset {offset}: crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    let generation = le_u64(&frame[8..]);
    let seq = le_u64(&frame[16..]);
    frame.drain(..FRAME_HEADER_LEN as usize);
    Ok(Ok(Frame {
        generation,
        seq,
        payload: frame,
        len: frame_len,
    }))
}

/// Decodes a start-marker payload into the checkpoint crc it carries.
pub(crate) fn decode_marker(payload: &[u8]) -> Result<u32, String> {
    if payload.len() != MARKER_PAYLOAD_LEN {
        return Err(format!(
            "start marker payload is {} bytes (expected {MARKER_PAYLOAD_LEN})",
            payload.len()
        ));
    }
    if payload[..8] != JOURNAL_MAGIC {
        return Err(format!("start marker has bad magic {:02x?}", &payload[..8]));
    }
    let version = le_u32(&payload[8..]);
    if version != FORMAT_VERSION {
        return Err(format!(
            "unsupported journal format version {version} (this build reads {FORMAT_VERSION})"
        ));
    }
    Ok(le_u32(&payload[12..]))
}

/// Offset one past the last non-zero byte in `from..to`, or `None` when the range is all zeros.
pub(crate) fn last_nonzero_end(
    store: &dyn BlockStore,
    from: u64,
    to: u64,
) -> Result<Option<u64>, StoreError> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK.min(to.saturating_sub(from)) as usize];
    let mut last = None;
    let mut pos = from;
    while pos < to {
        let n = CHUNK.min(to - pos) as usize;
        store.read_at(&mut buf[..n], pos)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b != 0) {
            last = Some(pos + i as u64 + 1);
        }
        pos += n as u64;
    }
    Ok(last)
}

use super::format::{CKPT_HEADER_LEN, FRAME_HEADER_LEN, MARKER_FRAME_LEN};
use super::*;
use crate::store::{CrashPoint, FaultStore};

fn recs(items: &[&str]) -> Vec<Vec<u8>> {
    items.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn open(files: &MetaFiles) -> (Journal, Recovered) {
    Journal::open(files.clone()).expect("open")
}

fn open_err(files: &MetaFiles) -> MetaError {
    Journal::open(files.clone()).expect_err("open must fail")
}

/// Asserts `err` is `Corrupt` about `file`, with a message naming it and containing `needle`.
fn assert_corrupt(err: &MetaError, file: &str, needle: &str) {
    let msg = err.to_string();
    match err {
        MetaError::Corrupt { file: f, reason } => {
            assert_eq!(*f, file, "wrong file in: {msg}");
            assert!(reason.contains(needle), "{needle:?} not in: {msg}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(
        msg.starts_with(&format!("metadata file {file} is corrupt: ")),
        "{msg}"
    );
    assert!(msg.contains("refusing to start"), "{msg}");
}

fn flip(store: &dyn BlockStore, offset: u64) {
    let mut b = [0u8];
    store.read_at(&mut b, offset).unwrap();
    store.write_at(&[b[0] ^ 0x40], offset).unwrap();
}

fn frame_len(payload: &str) -> u64 {
    FRAME_HEADER_LEN + payload.len() as u64
}

#[test]
fn fresh_files_recover_to_generation_zero() {
    let files = MetaFiles::in_memory();
    let (j, r) = open(&files);
    assert_eq!(
        r,
        Recovered {
            checkpoint: None,
            records: vec![],
            generation: 0,
            discarded_tail_bytes: 0
        }
    );
    assert_eq!((j.generation(), j.journal_bytes()), (0, 0));
    assert_eq!(
        files.journal.len(),
        JOURNAL_CHUNK,
        "journal created with its start marker"
    );
    assert!(files.checkpoint_a.is_empty() && files.checkpoint_b.is_empty());
    drop(j);
    assert_eq!(open(&files).1.records, Vec::<Vec<u8>>::new());
}

#[test]
fn append_sync_reopen_round_trip() {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    let batches = [
        recs(&["one", "two"]),
        recs(&[""]),
        recs(&["three", "four", "five"]),
    ];
    let mut all = Vec::new();
    for b in &batches {
        j.append(b).unwrap();
        all.extend(b.iter().cloned());
    }
    j.append(&[]).unwrap();
    j.sync().unwrap();
    let bytes: u64 = all.iter().map(|r| FRAME_HEADER_LEN + r.len() as u64).sum();
    assert_eq!(j.journal_bytes(), bytes);
    drop(j);

    for _ in 0..2 {
        let (j, r) = open(&files);
        assert_eq!(r.records, all);
        assert_eq!(
            (r.checkpoint, r.generation, r.discarded_tail_bytes),
            (None, 0, 0)
        );
        assert_eq!(j.journal_bytes(), bytes);
    }
}

#[test]
fn unsynced_appends_are_not_durable_and_synced_ones_are() {
    let journal = Arc::new(FaultStore::new(0));
    let files = MetaFiles {
        journal: journal.clone(),
        ..MetaFiles::in_memory()
    };
    let (mut j, _) = open(&files);
    j.append(&recs(&["durable"])).unwrap();
    j.sync().unwrap();
    j.append(&recs(&["volatile"])).unwrap();
    let lost = MetaFiles {
        journal: Arc::new(FaultStore::from_vec(journal.durable_image())),
        ..files
    };
    assert_eq!(open(&lost).1.records, recs(&["durable"]));
}

#[test]
fn appends_grow_the_journal_in_chunks() {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    let big = vec![7u8; 700_000];
    j.append(std::slice::from_ref(&big)).unwrap();
    j.append(&[big.clone(), big.clone()]).unwrap();
    j.sync().unwrap();
    assert_eq!(files.journal.len(), 3 * JOURNAL_CHUNK);
    assert_eq!(open(&files).1.records, vec![big; 3]);
}

#[test]
fn checkpoint_then_reopen() {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    j.append(&recs(&["a", "b"])).unwrap();
    // Not synced: the checkpoint must still leave exactly (payload, no records).
    j.checkpoint(b"state-1").unwrap();
    assert_eq!((j.generation(), j.journal_bytes()), (1, 0));
    drop(j);

    let (mut j, r) = open(&files);
    assert_eq!(
        r,
        Recovered {
            checkpoint: Some(b"state-1".to_vec()),
            records: vec![],
            generation: 1,
            discarded_tail_bytes: 0
        }
    );
    j.append(&recs(&["c"])).unwrap();
    j.sync().unwrap();
    drop(j);
    let r = open(&files).1;
    assert_eq!(
        (r.checkpoint.as_deref(), r.records),
        (Some(&b"state-1"[..]), recs(&["c"]))
    );
}

#[test]
fn many_checkpoints_alternate_slots() {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    for g in 1..=9u64 {
        j.append(&[format!("before {g}").into_bytes()]).unwrap();
        // Sizes go up and down so slots are both grown and shrunk.
        let payload = vec![g as u8; (g as usize * 37) % 100];
        j.checkpoint(&payload).unwrap();
        j.append(&[format!("after {g}").into_bytes()]).unwrap();
        j.sync().unwrap();

        let (slot, other) = if g % 2 == 1 {
            (&files.checkpoint_a, &files.checkpoint_b)
        } else {
            (&files.checkpoint_b, &files.checkpoint_a)
        };
        assert_eq!(
            slot.len(),
            CKPT_HEADER_LEN + payload.len() as u64,
            "generation {g}"
        );
        assert_eq!(
            other.is_empty(),
            g == 1,
            "older slot kept after generation {g}"
        );

        let (j2, r) = open(&files);
        assert_eq!(r.generation, g);
        assert_eq!(r.checkpoint, Some(payload));
        assert_eq!(r.records, vec![format!("after {g}").into_bytes()]);
        assert_eq!(j2.generation(), g);
        // Keep using the reopened handle half the time.
        if g % 2 == 0 {
            j = j2;
        }
    }
}

#[test]
fn torn_tail_truncated_record_is_discarded_and_appends_continue() {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    j.append(&recs(&["first", "second"])).unwrap();
    j.append(&recs(&["third"])).unwrap();
    j.sync().unwrap();
    drop(j);
    // Cut the file in the middle of the last record: it now runs past EOF.
    let end = MARKER_FRAME_LEN + frame_len("first") + frame_len("second") + frame_len("third");
    files.journal.resize(end - 3).unwrap();

    let (mut j, r) = open(&files);
    assert_eq!(r.records, recs(&["first", "second"]));
    assert_eq!(r.discarded_tail_bytes, frame_len("third") - 3);
    j.append(&recs(&["fourth"])).unwrap();
    j.sync().unwrap();
    drop(j);
    let r = open(&files).1;
    assert_eq!(r.records, recs(&["first", "second", "fourth"]));
    assert_eq!(r.discarded_tail_bytes, 0, "tail was wiped");
}

#[test]
fn torn_tail_garbled_record_is_discarded_and_appends_continue() {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    j.append(&recs(&["first", "second", "third"])).unwrap();
    j.sync().unwrap();
    drop(j);
    let third_at = MARKER_FRAME_LEN + frame_len("first") + frame_len("second");
    flip(&*files.journal, third_at + FRAME_HEADER_LEN + 2);

    let (mut j, r) = open(&files);
    assert_eq!(r.records, recs(&["first", "second"]));
    assert_eq!(r.discarded_tail_bytes, frame_len("third"));
    assert_eq!(j.journal_bytes(), frame_len("first") + frame_len("second"));
    // Same length as the garbled record: its stale bytes must not interfere.
    j.append(&recs(&["THIRD", "fourth"])).unwrap();
    j.sync().unwrap();
    drop(j);
    assert_eq!(
        open(&files).1.records,
        recs(&["first", "second", "THIRD", "fourth"])
    );
}

#[test]
fn lost_batch_does_not_revive_the_batch_after_it() {
    // Two unsynced batches; the disk cache persists only the second. Recovery must stop at the
    // hole, and a later record of the same size must not make the orphan batch valid again.
    let journal = Arc::new(FaultStore::new(0));
    let files = MetaFiles {
        journal: journal.clone(),
        ..MetaFiles::in_memory()
    };
    let (mut j, _) = open(&files);
    j.append(&recs(&["synced"])).unwrap();
    j.sync().unwrap();
    j.append(&recs(&["lost"])).unwrap();
    j.append(&recs(&["orphan"])).unwrap();
    let mut keep = [false, true].into_iter();
    let image = journal.crash_image(&mut || keep.next().unwrap());
    let files = MetaFiles {
        journal: Arc::new(FaultStore::from_vec(image)),
        ..files
    };

    let (mut j, r) = open(&files);
    assert_eq!(r.records, recs(&["synced"]));
    assert_eq!(
        r.discarded_tail_bytes,
        frame_len("lost") + frame_len("orphan")
    );
    j.append(&recs(&["LOST"])).unwrap();
    j.sync().unwrap();
    drop(j);
    let r = open(&files).1;
    assert_eq!(r.records, recs(&["synced", "LOST"]));
}

#[test]
fn sequence_gap_and_foreign_generation_end_the_log() {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    j.append(&recs(&["one"])).unwrap();
    j.sync().unwrap();
    drop(j);
    let end = MARKER_FRAME_LEN + frame_len("one");

    // Record 3 where 2 is expected.
    let mut stray = Vec::new();
    format::encode_frame(&mut stray, 0, 3, b"three");
    files.journal.write_at(&stray, end).unwrap();
    let r = open(&files).1;
    assert_eq!(
        (r.records, r.discarded_tail_bytes),
        (recs(&["one"]), stray.len() as u64)
    );

    // Record 2 but of generation 5.
    let mut stray = Vec::new();
    format::encode_frame(&mut stray, 5, 2, b"two");
    files.journal.write_at(&stray, end).unwrap();
    let r = open(&files).1;
    assert_eq!(
        (r.records, r.discarded_tail_bytes),
        (recs(&["one"]), stray.len() as u64)
    );
}

/// A journal with checkpoints 1 and 2 and records after 2.
fn two_checkpoints() -> MetaFiles {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    j.append(&recs(&["r0"])).unwrap();
    j.checkpoint(b"ckpt-1").unwrap();
    j.append(&recs(&["r1"])).unwrap();
    j.checkpoint(b"ckpt-2").unwrap();
    j.append(&recs(&["r2"])).unwrap();
    j.sync().unwrap();
    files
}

#[test]
fn flipped_byte_in_the_only_checkpoint_is_corrupt() {
    for with_records in [false, true] {
        let files = MetaFiles::in_memory();
        let (mut j, _) = open(&files);
        j.checkpoint(b"the only checkpoint").unwrap();
        if with_records {
            j.append(&recs(&["x"])).unwrap();
            j.sync().unwrap();
        }
        drop(j);
        flip(&*files.checkpoint_a, CKPT_HEADER_LEN + 4);
        let err = open_err(&files);
        assert_corrupt(&err, "checkpoint.a", "crc mismatch (stored 0x");
        // The file is left alone for the operator.
        assert!(!files.checkpoint_a.is_empty());
    }
}

#[test]
fn newer_checkpoint_garbled_while_journal_has_its_records_is_corrupt() {
    let files = two_checkpoints();
    flip(&*files.checkpoint_b, 3); // magic
    let err = open_err(&files);
    assert_corrupt(&err, "checkpoint.b", "bad magic");
    assert!(err.to_string().contains("generation 2"), "{err}");
}

#[test]
fn newer_checkpoint_lost_before_any_record_is_still_detected() {
    // The start marker proves checkpoint 2 completed even with no record after it.
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    j.checkpoint(b"ckpt-1").unwrap();
    j.checkpoint(b"ckpt-2").unwrap();
    drop(j);
    files.checkpoint_b.resize(0).unwrap();
    assert_corrupt(&open_err(&files), "checkpoint.b", "the checkpoint was lost");
}

#[test]
fn truncated_checkpoint_is_corrupt() {
    for cut in [10, CKPT_HEADER_LEN + 2] {
        let files = two_checkpoints();
        files.checkpoint_b.resize(cut).unwrap();
        assert_corrupt(&open_err(&files), "checkpoint.b", "truncated");
    }
}

#[test]
fn both_slots_garbage_is_corrupt() {
    let files = two_checkpoints();
    files.checkpoint_a.write_at(b"garbage!", 0).unwrap();
    files.checkpoint_b.write_at(b"rubbish!", 20).unwrap();
    let err = open_err(&files);
    assert!(matches!(err, MetaError::Corrupt { .. }), "{err}");

    // Even before any checkpoint completed, two broken slots cannot be an interrupted first one.
    let files = MetaFiles::in_memory();
    drop(open(&files));
    files.checkpoint_a.resize(100).unwrap();
    files.checkpoint_a.write_at(&[0xAA; 100], 0).unwrap();
    files.checkpoint_b.resize(50).unwrap();
    assert_corrupt(
        &open_err(&files),
        "checkpoint.b",
        "no other valid checkpoint",
    );
}

#[test]
fn journal_newer_than_every_checkpoint_is_corrupt() {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    j.checkpoint(b"ckpt-1").unwrap();
    j.append(&recs(&["r"])).unwrap();
    j.sync().unwrap();
    drop(j);
    files.checkpoint_a.resize(0).unwrap();
    // Both slots empty, journal at generation 1.
    assert_corrupt(&open_err(&files), "checkpoint.a", "generation 1");
}

#[test]
fn journal_damage_is_corrupt() {
    let files = two_checkpoints();
    files.journal.resize(0).unwrap();
    assert_corrupt(&open_err(&files), "journal", "truncated");

    let files = two_checkpoints();
    flip(&*files.journal, 10); // start marker
    assert_corrupt(&open_err(&files), "journal", "no valid start marker");
}

#[test]
fn journal_bound_to_another_checkpoint_is_corrupt() {
    // Same generation, different content: e.g. a slot restored from another machine.
    let files = two_checkpoints();
    let (image, _) = format::encode_checkpoint(2, b"impostor");
    files.checkpoint_b.resize(image.len() as u64).unwrap();
    files.checkpoint_b.write_at(&image, 0).unwrap();
    assert_corrupt(
        &open_err(&files),
        "journal",
        "belongs to a checkpoint of generation 2",
    );
}

#[test]
fn swapped_slots_are_not_trusted() {
    let files = two_checkpoints();
    let files = MetaFiles {
        checkpoint_a: files.checkpoint_b.clone(),
        checkpoint_b: files.checkpoint_a.clone(),
        ..files
    };
    assert_corrupt(&open_err(&files), "checkpoint.b", "belongs in checkpoint.a");
}

#[test]
fn broken_older_slot_is_tolerated() {
    let files = two_checkpoints();
    flip(&*files.checkpoint_a, CKPT_HEADER_LEN);
    let (mut j, r) = open(&files);
    assert_eq!(
        (r.checkpoint.as_deref(), r.records),
        (Some(&b"ckpt-2"[..]), recs(&["r2"]))
    );
    // The next checkpoint overwrites the broken slot.
    j.checkpoint(b"ckpt-3").unwrap();
    drop(j);
    assert_eq!(open(&files).1.checkpoint.as_deref(), Some(&b"ckpt-3"[..]));
}

#[test]
fn interrupted_first_checkpoint_is_tolerated() {
    let files = MetaFiles::in_memory();
    let (mut j, _) = open(&files);
    j.append(&recs(&["r"])).unwrap();
    j.sync().unwrap();
    drop(j);
    // Half of checkpoint 1 reached the disk.
    let (image, _) = format::encode_checkpoint(1, b"ckpt-1");
    files.checkpoint_a.resize(image.len() as u64).unwrap();
    files.checkpoint_a.write_at(&image[..20], 0).unwrap();
    let r = open(&files).1;
    assert_eq!(
        (r.checkpoint, r.generation, r.records),
        (None, 0, recs(&["r"]))
    );
}

#[test]
fn corrupt_message_names_the_file_and_the_problem() {
    let files = two_checkpoints();
    flip(&*files.checkpoint_b, CKPT_HEADER_LEN + 1);
    let msg = open_err(&files).to_string();
    assert!(
        msg.starts_with("metadata file checkpoint.b is corrupt: crc mismatch (stored 0x"),
        "{msg}"
    );
    assert!(
        msg.ends_with("refusing to start: restore it or remove the data directory"),
        "{msg}"
    );
}

/// Small deterministic PRNG (xorshift64*), so the property tests need no extra crate.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn damaged_bytes_never_panic_or_invent_records() {
    let files = two_checkpoints();
    let (mut j, _) = open(&files);
    j.append(&recs(&["r3", "r4"])).unwrap();
    j.sync().unwrap();
    drop(j);
    let all = recs(&["r2", "r3", "r4"]);
    let images = [&files.checkpoint_a, &files.checkpoint_b, &files.journal].map(|s| {
        let mut v = vec![0; s.len() as usize];
        s.read_at(&mut v, 0).unwrap();
        v
    });
    let used = [images[0].len(), images[1].len(), 400];
    let mut rng = Rng::new(7);
    for case in 0..3000 {
        let mut imgs = images.clone();
        let f = rng.below(3) as usize;
        match rng.below(4) {
            0 => {
                let i = rng.below(used[f] as u64) as usize;
                imgs[f][i] ^= 1 << rng.below(8);
            }
            1 => {
                let n = rng.below(used[f] as u64 + 1) as usize;
                imgs[f].truncate(n);
            }
            2 => {
                let n = rng.below(200) as usize;
                imgs[f] = rng.bytes(n);
            }
            _ => {
                // Absurd lengths in headers must be bounded by the file size.
                let i = rng.below(used[f] as u64) as usize & !7;
                let end = (i + 8).min(imgs[f].len());
                imgs[f][i..end].fill(0xFF);
            }
        }
        let damaged = imgs.map(|v| Arc::new(MemStore::from_vec(v)) as Arc<dyn BlockStore>);
        let [checkpoint_a, checkpoint_b, journal] = damaged;
        match Journal::open(MetaFiles {
            checkpoint_a,
            checkpoint_b,
            journal,
        }) {
            Ok((_, r)) => {
                if r.generation == 2 {
                    assert_eq!(r.checkpoint.as_deref(), Some(&b"ckpt-2"[..]), "case {case}");
                    assert!(all.starts_with(&r.records), "case {case}: {r:?}");
                } else {
                    // A wrong-looking but tolerated slot must still be one we wrote.
                    panic!("case {case}: unexpected recovery {r:?}");
                }
            }
            Err(MetaError::Corrupt { .. }) => {}
            Err(e) => panic!("case {case}: unexpected error {e}"),
        }
    }
}

/// What the disk may hold, as far as the caller of the journal can know.
#[derive(Debug, Default, Clone)]
struct Model {
    generation: u64,
    checkpoint: Option<Vec<u8>>,
    synced: Vec<Vec<u8>>,
    /// Appended but not synced: any prefix may survive a crash.
    unsynced: Vec<Vec<u8>>,
    /// A checkpoint that was started but did not return: it may or may not have happened.
    pending: Option<Vec<u8>>,
}

impl Model {
    fn check(&self, r: &Recovered, ctx: &str) {
        if let Some(p) = &self.pending
            && r.generation == self.generation + 1
        {
            assert_eq!(
                r.checkpoint.as_ref(),
                Some(p),
                "{ctx}: new checkpoint payload"
            );
            assert!(
                r.records.is_empty(),
                "{ctx}: records after the new checkpoint: {r:?}"
            );
            return;
        }
        assert_eq!(
            r.generation, self.generation,
            "{ctx}: generation ({self:?}, {r:?})"
        );
        assert_eq!(r.checkpoint, self.checkpoint, "{ctx}: checkpoint payload");
        let n = self.synced.len();
        assert!(
            r.records.len() >= n,
            "{ctx}: synced records lost: {self:?} vs {r:?}"
        );
        assert_eq!(r.records[..n], self.synced[..], "{ctx}: synced records");
        let extra = &r.records[n..];
        assert!(
            self.unsynced.starts_with(extra),
            "{ctx}: recovered records beyond a prefix of the unsynced ones: {self:?} vs {r:?}"
        );
    }

    fn recovered(&mut self, r: Recovered) {
        *self = Model {
            generation: r.generation,
            checkpoint: r.checkpoint,
            synced: r.records,
            unsynced: vec![],
            pending: None,
        };
    }
}

/// One boot of a simulated machine: recover, check against the model, then run a random
/// workload. Returns early with the crash error when the crash point fires.
fn life(files: MetaFiles, rng: &mut Rng, model: &mut Model, ctx: &str) -> Result<(), MetaError> {
    let (mut j, r) = Journal::open(files)?;
    model.check(&r, ctx);
    model.recovered(r);
    assert_eq!(j.generation(), model.generation);
    for _ in 0..rng.below(25) {
        match rng.below(10) {
            0..=5 => {
                let batch: Vec<Vec<u8>> = (0..1 + rng.below(3))
                    .map(|_| {
                        // Mostly one size, so a new record can line up with stale frames after
                        // a torn tail; occasionally large, to grow the journal past a chunk.
                        let n = match rng.below(60) {
                            0 => 400_000,
                            1..=30 => 8,
                            _ => rng.below(48),
                        };
                        rng.bytes(n as usize)
                    })
                    .collect();
                j.append(&batch)?;
                model.unsynced.extend(batch);
            }
            6..=7 => {
                j.sync()?;
                let u = std::mem::take(&mut model.unsynced);
                model.synced.extend(u);
            }
            _ => {
                let n = rng.below(300) as usize;
                let payload = rng.bytes(n);
                model.pending = Some(payload.clone());
                j.checkpoint(&payload)?;
                model.generation += 1;
                model.checkpoint = Some(payload);
                model.synced.clear();
                model.unsynced.clear();
                model.pending = None;
            }
        }
    }
    Ok(())
}

#[test]
fn crash_anywhere_recovers_synced_state() {
    for seed in 0..1000u64 {
        let mut rng = Rng::new(seed);
        let mut images: [Vec<u8>; 3] = Default::default();
        let mut model = Model::default();
        for boot in 0..6 {
            let ctx = format!("seed {seed} boot {boot}");
            let build = |images: &[Vec<u8>; 3], point: &Arc<CrashPoint>| {
                images
                    .clone()
                    .map(|img| Arc::new(FaultStore::from_vec_with_crash_point(img, point.clone())))
            };
            let as_files = |s: &[Arc<FaultStore>; 3]| MetaFiles {
                checkpoint_a: s[0].clone(),
                checkpoint_b: s[1].clone(),
                journal: s[2].clone(),
            };

            // Dry run to count this boot's operations, then rerun it with a crash at a random one
            // (or none: power is cut after the workload).
            let boot_seed = rng.next();
            let counter = Arc::new(CrashPoint::never());
            let mut dry_rng = Rng::new(boot_seed);
            let mut dry_model = model.clone();
            life(
                as_files(&build(&images, &counter)),
                &mut dry_rng,
                &mut dry_model,
                &ctx,
            )
            .unwrap_or_else(|e| panic!("{ctx}: dry run failed: {e}"));
            let ops = counter.ops();
            let crash_at = rng.below(ops + 1);

            let point = Arc::new(CrashPoint::new(crash_at));
            let stores = build(&images, &point);
            match life(
                as_files(&stores),
                &mut Rng::new(boot_seed),
                &mut model,
                &ctx,
            ) {
                Ok(()) => assert_eq!(crash_at, ops, "{ctx}: no crash before op {crash_at}"),
                Err(MetaError::Store(StoreError::Crashed)) => {}
                Err(e) => panic!("{ctx}: unexpected error (crash at op {crash_at}/{ops}): {e}"),
            }
            let keep_odds = rng.below(5);
            images = stores
                .each_ref()
                .map(|s| s.crash_image(&mut || rng.below(4) < keep_odds));
        }
        // Final boot without a crash must agree with the model too.
        let files = MetaFiles {
            checkpoint_a: Arc::new(MemStore::from_vec(images[0].clone())),
            checkpoint_b: Arc::new(MemStore::from_vec(images[1].clone())),
            journal: Arc::new(MemStore::from_vec(images[2].clone())),
        };
        let r = Journal::open(files)
            .unwrap_or_else(|e| panic!("seed {seed}: final open: {e}"))
            .1;
        model.check(&r, &format!("seed {seed} final"));
    }
}

#[test]
fn crash_at_every_op_of_a_checkpoint() {
    // Exhaustive over the ops of one checkpoint and over which unsynced mutations survive.
    let setup = |point: Arc<CrashPoint>| {
        let s: [Arc<FaultStore>; 3] =
            std::array::from_fn(|_| Arc::new(FaultStore::with_crash_point(0, point.clone())));
        let files = MetaFiles {
            checkpoint_a: s[0].clone(),
            checkpoint_b: s[1].clone(),
            journal: s[2].clone(),
        };
        (s, files)
    };
    let run = |files: MetaFiles| -> Result<(), MetaError> {
        let (mut j, _) = Journal::open(files)?;
        j.append(&recs(&["a"]))?;
        j.checkpoint(b"one")?;
        j.append(&recs(&["b", "c"]))?;
        j.sync()?;
        j.append(&recs(&["d"]))?; // unsynced on purpose
        j.checkpoint(b"two")
    };
    let counter = Arc::new(CrashPoint::never());
    run(setup(counter.clone()).1).unwrap();
    let ops = counter.ops();
    for k in 0..=ops {
        let (stores, files) = setup(Arc::new(CrashPoint::new(k)));
        let _ = run(files);
        for mask in 0..64u32 {
            let mut bit = 0;
            let images = stores.each_ref().map(|s| {
                s.crash_image(&mut || {
                    bit += 1;
                    (mask >> (bit % 6)) & 1 == 1
                })
            });
            let files = MetaFiles {
                checkpoint_a: Arc::new(MemStore::from_vec(images[0].clone())),
                checkpoint_b: Arc::new(MemStore::from_vec(images[1].clone())),
                journal: Arc::new(MemStore::from_vec(images[2].clone())),
            };
            let r = Journal::open(files)
                .unwrap_or_else(|e| panic!("crash at op {k}/{ops}, mask {mask:#x}: {e}"))
                .1;
            let ok = match r.generation {
                0 => r.checkpoint.is_none() && recs(&["a"]).starts_with(&r.records),
                1 => {
                    r.checkpoint.as_deref() == Some(b"one")
                        && recs(&["b", "c", "d"]).starts_with(&r.records)
                }
                2 => r.checkpoint.as_deref() == Some(b"two") && r.records.is_empty(),
                _ => false,
            };
            assert!(
                k < ops || r.generation == 2,
                "completed run recovered {r:?}"
            );
            assert!(ok, "crash at op {k}/{ops}, mask {mask:#x}: {r:?}");
        }
    }
}

#[test]
fn failed_io_poisons_the_journal() {
    let point = Arc::new(CrashPoint::never());
    let journal = Arc::new(FaultStore::with_crash_point(0, point.clone()));
    let files = MetaFiles {
        journal,
        ..MetaFiles::in_memory()
    };
    let (mut j, _) = open(&files);
    point.crash();
    assert!(matches!(
        j.append(&recs(&["x"])),
        Err(MetaError::Store(StoreError::Crashed))
    ));
    assert!(matches!(j.sync(), Err(MetaError::Poisoned)));
    assert!(matches!(j.checkpoint(b"p"), Err(MetaError::Poisoned)));
}

#[test]
fn real_files_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data").join("meta");
    {
        let (mut j, r) = Journal::open(MetaFiles::open_dir(&dir).unwrap()).unwrap();
        assert_eq!((r.generation, r.checkpoint, r.records.len()), (0, None, 0));
        j.append(&recs(&["one", "two"])).unwrap();
        j.checkpoint(b"ckpt").unwrap();
        j.append(&recs(&["three"])).unwrap();
        j.sync().unwrap();
    }
    for name in [CHECKPOINT_A, CHECKPOINT_B, JOURNAL] {
        assert!(dir.join(name).is_file(), "{name}");
    }
    {
        let (mut j, r) = Journal::open(MetaFiles::open_dir(&dir).unwrap()).unwrap();
        assert_eq!(r.checkpoint.as_deref(), Some(&b"ckpt"[..]));
        assert_eq!((r.generation, r.records), (1, recs(&["three"])));
        j.checkpoint(b"ckpt-2").unwrap();
    }
    let r = Journal::open(MetaFiles::open_dir(&dir).unwrap()).unwrap().1;
    assert_eq!(
        (r.generation, r.checkpoint.as_deref()),
        (2, Some(&b"ckpt-2"[..]))
    );

    // Damage on disk is reported, naming the file.
    let path = dir.join(CHECKPOINT_B);
    let mut bytes = std::fs::read(&path).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = Journal::open(MetaFiles::open_dir(&dir).unwrap()).unwrap_err();
    assert_corrupt(&err, CHECKPOINT_B, "crc mismatch");

    // A file missing next to files holding data is not silently recreated.
    std::fs::remove_file(dir.join(JOURNAL)).unwrap();
    assert_corrupt(&MetaFiles::open_dir(&dir).unwrap_err(), JOURNAL, "missing");
    assert!(!dir.join(JOURNAL).exists());
}

#[test]
fn open_dir_completes_an_interrupted_first_start() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(CHECKPOINT_A), b"").unwrap();
    let (_, r) = Journal::open(MetaFiles::open_dir(tmp.path()).unwrap()).unwrap();
    assert_eq!((r.generation, r.records.len()), (0, 0));
}

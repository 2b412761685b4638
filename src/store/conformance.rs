//! The one behavioural suite every [`BlockStore`] backend must pass, and its instantiations.
//!
//! Each check builds a fresh store with `make`, mirrors every successful mutation in a plain
//! `Vec<u8>` model and compares the whole store against the model afterwards, so a check also
//! catches writes that land in the wrong place.

use super::{BlockDevStore, BlockStore, FaultStore, FileStore, MemStore, StoreError};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs every check against stores from `make`.
///
/// `make(len)` must return a store of exactly `len` bytes reading as zeros. `align` is the
/// granularity the backend demands (1 for most, 512 for a raw device opened with `O_DIRECT`);
/// every offset and length the suite uses for in-range calls is a multiple of it, and with
/// `align == 1` the suite deliberately uses odd offsets and lengths. `len` must be a multiple of
/// `align` and at least 4 MiB.
pub(crate) fn run_all(len: u64, align: u64, make: &dyn Fn(u64) -> Box<dyn BlockStore>) {
    assert!(
        align > 0 && len.is_multiple_of(align) && len >= 4 << 20,
        "bad suite parameters"
    );
    let t = Suite { len, align, make };
    t.len_and_fresh_zeros();
    t.round_trip();
    t.concurrent_disjoint_writes();
    t.out_of_range();
    t.discard();
    t.flush();
    t.resize();
}

struct Suite<'a> {
    len: u64,
    align: u64,
    make: &'a dyn Fn(u64) -> Box<dyn BlockStore>,
}

/// Deterministic bytes for `seed`, never zero (so a zeroed byte is always detectable).
fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

fn read_all(s: &dyn BlockStore) -> Vec<u8> {
    let mut out = vec![0u8; s.len() as usize];
    // 1 MiB chunks: a multiple of any alignment, and it exercises multi-call reads.
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        s.read_at(chunk, (i << 20) as u64).expect("read_all");
    }
    out
}

#[track_caller]
fn assert_content(s: &dyn BlockStore, model: &[u8], what: &str) {
    assert_eq!(s.len(), model.len() as u64, "{what}: len");
    let got = read_all(s);
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], model[i]
        );
    }
}

#[track_caller]
fn assert_out_of_range(r: Result<(), StoreError>, what: &str) {
    match r {
        Err(StoreError::OutOfRange { .. }) => {}
        other => panic!("{what}: want OutOfRange, got {other:?}"),
    }
}

fn write(s: &dyn BlockStore, model: &mut [u8], offset: u64, data: &[u8]) {
    s.write_at(data, offset)
        .unwrap_or_else(|e| panic!("write {offset}+{}: {e}", data.len()));
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

impl Suite<'_> {
    fn down(&self, x: u64) -> u64 {
        x - x % self.align
    }

    fn up(&self, x: u64) -> u64 {
        x.next_multiple_of(self.align)
    }

    /// Ranges covering the start, the end, odd offsets/lengths (rounded to `align` when the
    /// backend needs it) and a length above the 1 MiB bounce/zero chunk.
    fn ranges(&self) -> Vec<(u64, u64)> {
        let len = self.len;
        let raw = [
            (0, 1),
            (1, 7),
            (511, 2),
            (513, 100),
            (4095, 4098),
            (4096, 4096),
            (8192, 65536),
            (12_345, (1 << 20) + 17),
            (3 << 20, (1 << 20) + 4096),
            (len - 5000, 5000),
            (len - 1, 1),
        ];
        raw.iter()
            .map(|&(o, n)| {
                let n = self.up(n);
                (self.down(o).min(len - n), n)
            })
            .collect()
    }

    fn filled(&self, seed: u64) -> (Box<dyn BlockStore>, Vec<u8>) {
        let s = (self.make)(self.len);
        let mut model = vec![0u8; self.len as usize];
        for (i, off) in (0..self.len).step_by(1 << 20).enumerate() {
            let n = (self.len - off).min(1 << 20) as usize;
            write(&*s, &mut model, off, &pattern(seed + i as u64, n));
        }
        (s, model)
    }

    fn len_and_fresh_zeros(&self) {
        let s = (self.make)(self.len);
        assert_eq!(s.len(), self.len, "len");
        assert!(!s.is_empty(), "is_empty");
        assert_content(&*s, &vec![0; self.len as usize], "fresh store");
    }

    fn round_trip(&self) {
        let s = (self.make)(self.len);
        let mut model = vec![0u8; self.len as usize];
        for (i, &(off, n)) in self.ranges().iter().enumerate() {
            let data = pattern(100 + i as u64, n as usize);
            write(&*s, &mut model, off, &data);
            let mut back = vec![0u8; n as usize];
            s.read_at(&mut back, off).unwrap();
            assert!(back == data, "round trip {off}+{n}");
            // A buffer at an odd address: direct-I/O backends must bounce it.
            let mut odd = vec![0u8; n as usize + 1];
            s.read_at(&mut odd[1..], off).unwrap();
            assert!(
                odd[1..] == data[..],
                "round trip into odd address {off}+{n}"
            );
            s.write_at(&odd[1..], off).unwrap();
        }
        assert_content(&*s, &model, "after round trips");
        // Zero-length requests are valid anywhere inside, including at the very end.
        s.read_at(&mut [], self.len).unwrap();
        s.write_at(&[], self.len).unwrap();
        assert_content(&*s, &model, "after zero-length requests");
    }

    fn concurrent_disjoint_writes(&self) {
        const THREADS: u64 = 8;
        const ROUNDS: u64 = 4;
        let s = (self.make)(self.len);
        // Odd-sized, interleaved chunks so neighbours share pages and sectors where allowed.
        let chunk = self.up(4099);
        let chunks = (self.len / chunk).min(THREADS * 64);
        let seed = |i: u64, r: u64| 1_000 + i * ROUNDS + r;
        std::thread::scope(|sc| {
            for t in 0..THREADS {
                let s = &*s;
                sc.spawn(move || {
                    for r in 0..ROUNDS {
                        for i in (t..chunks).step_by(THREADS as usize) {
                            let data = pattern(seed(i, r), chunk as usize);
                            s.write_at(&data, i * chunk).unwrap();
                            let mut back = vec![0u8; chunk as usize];
                            s.read_at(&mut back, i * chunk).unwrap();
                            assert!(back == data, "thread {t} chunk {i} round {r}");
                        }
                    }
                });
            }
        });
        let mut model = vec![0u8; self.len as usize];
        for i in 0..chunks {
            let o = (i * chunk) as usize;
            model[o..o + chunk as usize]
                .copy_from_slice(&pattern(seed(i, ROUNDS - 1), chunk as usize));
        }
        assert_content(&*s, &model, "after concurrent writes");
    }

    fn out_of_range(&self) {
        let (s, model) = self.filled(2_000);
        let (len, a) = (self.len, self.align);
        let buf = pattern(7, 2 * a as usize);
        let mut rbuf = vec![0u8; 2 * a as usize];

        assert_out_of_range(s.write_at(&buf, len - a), "write straddling the end");
        assert_out_of_range(s.write_at(&buf[..a as usize], len), "write at the end");
        assert_out_of_range(
            s.write_at(&buf, u64::MAX - a + 1),
            "write offset+len overflow",
        );
        assert_out_of_range(s.write_at(&buf[..1], u64::MAX), "write at u64::MAX");
        assert_out_of_range(s.read_at(&mut rbuf, len - a), "read straddling the end");
        assert_out_of_range(s.read_at(&mut rbuf[..a as usize], len), "read at the end");
        assert_out_of_range(
            s.read_at(&mut rbuf, u64::MAX - a + 1),
            "read offset+len overflow",
        );
        assert_out_of_range(s.read_at(&mut [], len + a), "empty read past the end");
        assert_out_of_range(s.discard(len - a, 2 * a), "discard straddling the end");
        assert_out_of_range(s.discard(len, a), "discard at the end");
        assert_out_of_range(s.discard(a, u64::MAX), "discard len overflow");
        assert_out_of_range(s.discard(u64::MAX, 1), "discard at u64::MAX");
        assert_out_of_range(
            s.discard(u64::MAX - a + 1, u64::MAX - a + 1),
            "discard both huge",
        );
        assert_content(&*s, &model, "after out-of-range requests");
    }

    fn discard(&self) {
        let (s, mut model) = self.filled(3_000);
        // The full-store comparison after each discard also catches overshoot into neighbours.
        for &(off, n) in &self.ranges() {
            s.discard(off, n)
                .unwrap_or_else(|e| panic!("discard {off}+{n}: {e}"));
            model[off as usize..(off + n) as usize].fill(0);
            assert_content(&*s, &model, &format!("after discard {off}+{n}"));
            // Rewrite part of it so later discards have data to clear again.
            let m = n.min(self.up(300));
            write(&*s, &mut model, off, &pattern(off, m as usize));
        }
        s.discard(5 * self.align, 0).unwrap();
        assert_content(&*s, &model, "after empty discard");
        s.discard(0, self.len).unwrap();
        assert_content(
            &*s,
            &vec![0; self.len as usize],
            "after discarding everything",
        );
        // The store stays usable after a discard.
        let mut model = vec![0u8; self.len as usize];
        write(
            &*s,
            &mut model,
            self.align,
            &pattern(9, self.up(10_000) as usize),
        );
        assert_content(&*s, &model, "write after discard");
    }

    fn flush(&self) {
        let s = (self.make)(self.len);
        s.flush().expect("flush of a fresh store");
        let mut model = vec![0u8; self.len as usize];
        write(
            &*s,
            &mut model,
            self.up(777),
            &pattern(11, self.up(70_000) as usize),
        );
        s.flush().expect("flush after a write");
        s.flush().expect("flush with nothing pending");
        assert_content(&*s, &model, "after flush");
    }

    fn resize(&self) {
        let (s, mut model) = self.filled(4_000);
        let a = self.align;
        let grown = self.len + self.up(12_347);
        match s.resize(grown) {
            Err(StoreError::Unsupported(_)) => {
                assert_content(&*s, &model, "after unsupported resize");
                return;
            }
            r => r.expect("grow"),
        }
        model.resize(grown as usize, 0);
        assert_content(&*s, &model, "after grow");
        write(&*s, &mut model, grown - a, &pattern(12, a as usize));
        assert_content(&*s, &model, "write into the grown tail");

        let half = self.down(self.len / 2 + 3);
        s.resize(half).expect("shrink");
        model.truncate(half as usize);
        assert_content(&*s, &model, "after shrink");
        assert_out_of_range(
            s.read_at(&mut vec![0; a as usize], half),
            "read past the shrunk end",
        );
        assert_out_of_range(
            s.write_at(&pattern(13, a as usize), half),
            "write past the shrunk end",
        );
        assert_content(
            &*s,
            &model,
            "after out-of-range requests on the shrunk store",
        );

        // Growing back must not resurrect the bytes cut off by the shrink.
        s.resize(self.len).expect("grow back");
        model.resize(self.len as usize, 0);
        assert_content(&*s, &model, "after growing back");

        s.resize(0).expect("shrink to zero");
        assert!(s.is_empty(), "is_empty after resize(0)");
        s.read_at(&mut [], 0).unwrap();
        s.resize(self.len).expect("grow from zero");
        assert_content(&*s, &vec![0; self.len as usize], "grown from zero");
    }
}

/// Odd on purpose: catches code that assumes sector- or page-sized stores.
const SUITE_LEN: u64 = (4 << 20) + 7;

#[test]
fn mem_store_conformance() {
    run_all(SUITE_LEN, 1, &|len| Box::new(MemStore::new(len)));
}

#[test]
fn fault_store_conformance() {
    run_all(SUITE_LEN, 1, &|len| Box::new(FaultStore::new(len)));
}

#[test]
fn file_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    run_all(SUITE_LEN, 1, &|len| {
        let path = dir
            .path()
            .join(format!("store-{}", n.fetch_add(1, Ordering::Relaxed)));
        Box::new(FileStore::create(path, len).unwrap())
    });
}

/// A loop device over a file, detached on drop (also when the test panics).
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(Self { path: path.into() })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// The tests' one way to say they cannot run here (listed by ci/test.sh, a failure under CI).
#[path = "../../tests/skip/mod.rs"]
mod skip;

#[test]
fn block_dev_store_conformance_on_loop_device() {
    const DEV_LEN: u64 = 16 << 20;
    if !(skip::root_with(&["/dev/loop-control"]) && skip::have("losetup")) {
        return;
    }
    let backing = tempfile::NamedTempFile::new().unwrap();
    backing.as_file().set_len(DEV_LEN).unwrap();
    let dev = match LoopDevice::attach(backing.path()) {
        Ok(d) => d,
        Err(e) => return skip::skip(&e),
    };
    println!("block-device conformance on {}", dev.path.display());

    for (direct, align) in [(false, 1), (true, 512)] {
        let make = |len: u64| -> Box<dyn BlockStore> {
            let s = BlockDevStore::open(&dev.path, direct).unwrap();
            assert_eq!(s.len(), len, "loop device size");
            assert_eq!(s.alignment(), align, "alignment with direct={direct}");
            s.discard(0, len).unwrap(); // a fresh store reads as zeros
            Box::new(s)
        };
        run_all(DEV_LEN, align, &make);
    }

    // Direct I/O rejects what the kernel would: unaligned offsets and lengths, checked after range.
    let s = BlockDevStore::open(&dev.path, true).unwrap();
    let before = read_all(&s);
    let unaligned = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::Unaligned { align: 512, .. }) => {}
        other => panic!("{what}: want Unaligned, got {other:?}"),
    };
    unaligned(s.write_at(&[1; 512], 1), "write at odd offset");
    unaligned(s.write_at(&[1; 100], 0), "write of odd length");
    unaligned(s.read_at(&mut [0; 512], 100), "read at odd offset");
    unaligned(s.discard(0, 4000), "discard of odd length");
    assert_out_of_range(
        s.write_at(&[1; 100], DEV_LEN),
        "range is checked before alignment",
    );
    assert!(matches!(
        s.resize(DEV_LEN * 2),
        Err(StoreError::Unsupported("resize"))
    ));
    assert_content(&s, &before, "rejected requests changed nothing");
}

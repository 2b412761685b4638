//! Per-grain bitmaps (split and difference), one bit per grain.

use bitvec::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A fixed-length bitmap over the grains of a volume.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bitmap(BitVec<u64, Lsb0>);

impl std::fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitmap({}/{} set)", self.count_ones(), self.len())
    }
}

impl Bitmap {
    /// All-zero bitmap of `len` bits.
    pub fn zeros(len: u64) -> Self {
        Self(bitvec![u64, Lsb0; 0; len as usize])
    }
    /// All-one bitmap of `len` bits.
    pub fn ones(len: u64) -> Self {
        Self(bitvec![u64, Lsb0; 1; len as usize])
    }
    /// Word `w` with every bit past the end set. Mappings of one cascade may map different
    /// numbers of grains (volumes of different sizes); a split bitmap reads as set past its end
    /// because its target owns every grain beyond the mapped range.
    fn word_ext(&self, w: usize) -> u64 {
        let len = self.0.len();
        let lo = w * 64;
        match self.0.as_raw_slice().get(w) {
            Some(&word) if lo + 64 <= len => word,
            Some(&word) if lo < len => word | (!0u64 << (len - lo)),
            _ => !0,
        }
    }
    /// self |= a & b; `a` has self's length, `b` reads as set past its end.
    pub fn or_and(&mut self, a: &Bitmap, b: &Bitmap) {
        let a = a.0.as_raw_slice();
        for (i, w) in self.0.as_raw_mut_slice().iter_mut().enumerate() {
            *w |= a[i] & b.word_ext(i);
        }
    }
    /// self |= other (same lengths).
    pub fn or(&mut self, other: &Bitmap) {
        for (w, o) in self
            .0
            .as_raw_mut_slice()
            .iter_mut()
            .zip(other.0.as_raw_slice())
        {
            *w |= *o;
        }
    }
    /// self &= !other; `other` reads as set past its end.
    pub fn and_not(&mut self, other: &Bitmap) {
        for (i, w) in self.0.as_raw_mut_slice().iter_mut().enumerate() {
            *w &= !other.word_ext(i);
        }
    }
    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }
    /// True for a bitmap of no bits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Bit `i`.
    pub fn get(&self, i: u64) -> bool {
        self.0[i as usize]
    }
    /// Sets bit `i`; returns whether it was already set.
    pub fn set(&mut self, i: u64) -> bool {
        self.0.replace(i as usize, true)
    }
    /// Sets or clears every bit.
    pub fn fill(&mut self, v: bool) {
        self.0.fill(v);
    }
    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.0.count_ones() as u64
    }
    /// True when every bit is set. Word by word, stopping at the first clear bit: the copy
    /// workers ask this of every rate-0 mapping, and bitvec's `all` visits every bit.
    pub fn all(&self) -> bool {
        let n = self.0.len();
        let words = self.0.as_raw_slice();
        let full = n / 64;
        if !words[..full].iter().all(|w| *w == u64::MAX) {
            return false;
        }
        // The last word's bits past the end (Lsb0: the high ones) are not ours.
        let rest = n % 64;
        rest == 0 || words[full] | (u64::MAX << rest) == u64::MAX
    }
    /// True when no bit is set.
    pub fn none(&self) -> bool {
        let n = self.0.len();
        let words = self.0.as_raw_slice();
        let full = n / 64;
        if words[..full].iter().any(|w| *w != 0) {
            return false;
        }
        // As in `all`: the last word's bits past the end are not ours.
        let rest = n % 64;
        rest == 0 || words[full] & !(u64::MAX << rest) == 0
    }
    /// Replaces this bitmap with the complement of `other` (same length).
    pub fn assign_not(&mut self, other: &Bitmap) {
        self.0.copy_from_bitslice(&other.0);
        let inv = !std::mem::take(&mut self.0);
        self.0 = inv;
    }
    /// Sets every bit that is clear in `other` (self |= !other); `other` reads as set past
    /// its end.
    pub fn or_not(&mut self, other: &Bitmap) {
        for (i, a) in self.0.as_raw_mut_slice().iter_mut().enumerate() {
            *a |= !other.word_ext(i);
        }
        // Bits past the logical end stay meaningless; BitVec ignores them.
    }
    /// The first clear bit at or after `from`, wrapping around once.
    pub fn next_zero(&self, from: u64) -> Option<u64> {
        let from = (from as usize).min(self.0.len());
        self.0[from..]
            .first_zero()
            .map(|i| (i + from) as u64)
            .or_else(|| self.0[..from].first_zero().map(|i| i as u64))
    }
    /// The last bit `<= from` (wrapping once, downwards) that is set here and clear in `other`.
    /// Both read as set past their ends, so the scan covers `other`'s length.
    pub fn prev_set_and_clear_in(&self, other: &Bitmap, from: u64) -> Option<u64> {
        scan_down(other.0.len(), from, |w| {
            self.word_ext(w) & !other.word_ext(w)
        })
    }
    /// The last clear bit `<= from`, wrapping once, downwards.
    pub fn prev_zero(&self, from: u64) -> Option<u64> {
        let a = self.0.as_raw_slice();
        scan_down(self.0.len(), from, |w| !a[w])
    }
    /// Raw 64-bit words (persistence).
    pub fn words(&self) -> &[u64] {
        self.0.as_raw_slice()
    }
    /// Builds a bitmap from raw words; `None` when the words cannot hold `len` bits.
    pub fn from_words(len: u64, words: Vec<u64>) -> Option<Self> {
        if (words.len() as u64) * 64 < len {
            return None;
        }
        let mut bv = BitVec::<u64, Lsb0>::from_vec(words);
        bv.truncate(len as usize);
        Some(Self(bv))
    }
}

/// Highest bit index `<= from` whose bit is set in `word(w)`, then wrapping to the top once.
/// Bits at or past `n` are ignored (the raw words may hold garbage there).
fn scan_down(n: usize, from: u64, word: impl Fn(usize) -> u64) -> Option<u64> {
    if n == 0 {
        return None;
    }
    let from = (from as usize).min(n - 1);
    let scan = |lo: usize, hi: usize| -> Option<u64> {
        let (wl, wh) = (lo / 64, hi / 64);
        for w in (wl..=wh).rev() {
            let mut m = word(w);
            if w == wh && hi % 64 < 63 {
                m &= (1u64 << (hi % 64 + 1)) - 1;
            }
            if w == wl {
                m &= !0u64 << (lo % 64);
            }
            if m != 0 {
                return Some((w * 64 + 63 - m.leading_zeros() as usize) as u64);
            }
        }
        None
    };
    scan(0, from).or_else(|| {
        if from + 1 < n {
            scan(from + 1, n - 1)
        } else {
            None
        }
    })
}

/// Serialized form: runs of words. The bitmaps of fresh or fully copied mappings are one run
/// each, so a checkpoint with 256 snapshots of a 1 TiB volume takes kilobytes, not 128 MiB.
#[derive(Serialize, Deserialize)]
enum Run {
    /// `count` copies of `word`.
    Same(u64, u64),
    /// Words as they are.
    Words(Vec<u64>),
}

/// Equal words worth a run of their own.
const MIN_RUN: usize = 4;
// Most bitmap words the decode running on this thread may still create, all bitmaps
// together; `None` outside `decode_bounded`. A thread-local, not a parameter: serde's derived
// decoders of the engine cannot pass one.
thread_local! {
    static WORDS_LEFT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Runs `decode` allowing at most `bits` of bitmap in all. [`MAX_BITS`] bounds each bitmap;
/// this bounds their sum, so that a damaged checkpoint listing many maximal bitmaps cannot
/// ask for many times the bitmap budget.
pub fn decode_bounded<T>(bits: u64, decode: impl FnOnce() -> T) -> T {
    struct Restore(Option<u64>);
    impl Drop for Restore {
        fn drop(&mut self) {
            WORDS_LEFT.set(self.0);
        }
    }
    let _restore = Restore(WORDS_LEFT.replace(Some(bits.div_ceil(64))));
    decode()
}

/// Longest bitmap decoded: 2^32 grains (256 TiB of 64 KiB grains), 512 MiB, the whole default
/// bitmap budget ([`crate::engine::Limits`]), which no mapping can exceed. A damaged length or
/// run cannot ask for more (2^36 let 17 bytes of a checkpoint allocate 8 GiB; found by fuzzing).
pub(crate) const MAX_BITS: u64 = 1 << 32;

impl Serialize for Bitmap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let w = self.words();
        let (mut runs, mut lit) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < w.len() {
            let j = i + w[i..].iter().take_while(|x| **x == w[i]).count();
            if j - i >= MIN_RUN {
                if !lit.is_empty() {
                    runs.push(Run::Words(std::mem::take(&mut lit)));
                }
                runs.push(Run::Same((j - i) as u64, w[i]));
            } else {
                lit.extend_from_slice(&w[i..j]);
            }
            i = j;
        }
        if !lit.is_empty() {
            runs.push(Run::Words(lit));
        }
        (self.len(), runs).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Bitmap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let (len, runs): (u64, Vec<Run>) = Deserialize::deserialize(d)?;
        if len > MAX_BITS {
            return Err(D::Error::custom(format!(
                "bitmap of {len} bits is too long"
            )));
        }
        let want = len.div_ceil(64) as usize;
        // Grown by the runs actually present, not by what the length claims.
        let mut words = Vec::new();
        for r in runs {
            let n = match &r {
                Run::Same(n, _) => *n,
                Run::Words(v) => v.len() as u64,
            };
            if words.len() as u64 + n > want as u64 {
                return Err(D::Error::custom("bitmap runs longer than its length"));
            }
            if let Some(left) = WORDS_LEFT.get() {
                let Some(rest) = left.checked_sub(n) else {
                    return Err(D::Error::custom(
                        "bitmaps longer in all than the bitmap budget",
                    ));
                };
                WORDS_LEFT.set(Some(rest));
            }
            match r {
                Run::Same(n, w) => words.resize(words.len() + n as usize, w),
                Run::Words(v) => words.extend(v),
            }
        }
        Bitmap::from_words(len, words)
            .ok_or_else(|| D::Error::custom("bitmap shorter than its length"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Limits;

    #[test]
    fn serialized_as_runs_and_back() {
        let enc = |b: &Bitmap| bincode::serialize(b).unwrap();
        let dec = |v: &[u8]| bincode::deserialize::<Bitmap>(v);
        // A 1 TiB volume of 256 KiB grains: a fresh and a full bitmap take bytes.
        let n = 1u64 << 22;
        for b in [Bitmap::zeros(n), Bitmap::ones(n)] {
            let v = enc(&b);
            assert!(v.len() < 64, "{} bytes", v.len());
            assert!(dec(&v).unwrap() == b);
        }
        // Mixed patterns, odd lengths: the same bits come back.
        let mut rng = 0x9e3779b97f4a7c15u64;
        for len in [0u64, 1, 64, 65, 300, 1000, 5000] {
            let mut b = Bitmap::zeros(len);
            for i in 0..len {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                // Stretches of set and clear bits, and some noise.
                if (i / 700) % 2 == 1 || rng.is_multiple_of(5) {
                    b.set(i);
                }
            }
            let got = dec(&enc(&b)).unwrap();
            assert_eq!(got.len(), len);
            assert!((0..len).all(|i| got.get(i) == b.get(i)), "{len}");
        }
        // Damaged input is an error, not an allocation of its claims.
        let lie = bincode::serialize(&(64u64, vec![Run::Same(1 << 40, 0)])).unwrap();
        assert!(dec(&lie).is_err());
        let huge = bincode::serialize(&(u64::MAX, Vec::<Run>::new())).unwrap();
        assert!(dec(&huge).is_err());
        let short = bincode::serialize(&(640u64, vec![Run::Same(2, 0)])).unwrap();
        assert!(dec(&short).is_err());
        // The cap covers the largest bitmap the default budget allows, and nothing beyond.
        let budget_bits = Limits::default().bitmap_budget_bytes * 8;
        assert!(MAX_BITS >= budget_bits);
        // 19 bytes that would fill 512 MiB: refused before anything is allocated.
        let over_words = (MAX_BITS + 1).div_ceil(64);
        let over = bincode::serialize(&(MAX_BITS + 1, vec![Run::Same(over_words, 0)])).unwrap();
        assert!(dec(&over).is_err());
    }

    #[test]
    fn decode_bounded_caps_all_bitmaps_together() {
        let one = bincode::serialize(&(640u64, vec![Run::Same(10, 0)])).unwrap();
        let two = bincode::serialize(&vec![
            (640u64, vec![Run::Same(10, 0)]),
            (640u64, vec![Run::Same(10, 0)]),
        ])
        .unwrap();
        let bounded = |v: &[u8]| decode_bounded(1000, || bincode::deserialize::<Vec<Bitmap>>(v));
        // Each bitmap fits the bound; the two together do not.
        assert!(decode_bounded(1000, || bincode::deserialize::<Bitmap>(&one)).is_ok());
        let err = bounded(&two).unwrap_err().to_string();
        assert!(err.contains("bitmap budget"), "{err}");
        // The bound ends with its decode, even a failed one.
        assert_eq!(bincode::deserialize::<Vec<Bitmap>>(&two).unwrap().len(), 2);
        assert!(decode_bounded(1280, || bincode::deserialize::<Vec<Bitmap>>(&two)).is_ok());
    }

    #[test]
    fn all_checks_every_bit_and_only_ours() {
        for len in [0u64, 1, 63, 64, 65, 127, 128, 200] {
            let mut b = Bitmap::ones(len);
            assert!(b.all(), "{len}");
            for i in 0..len {
                let mut c = b.clone();
                c.0.set(i as usize, false);
                assert!(!c.all(), "{len}: bit {i} clear");
            }
            // Bits past the end (set by word-wise ops) do not count.
            if len % 64 != 0 {
                b.fill(false);
                b.or(&Bitmap::ones(len));
                assert!(b.all(), "{len}");
            }
            assert_eq!(Bitmap::zeros(len).all(), len == 0);
        }
    }

    #[test]
    fn none_checks_every_bit_and_only_ours() {
        for len in [0u64, 1, 63, 64, 65, 127, 128, 200] {
            let mut b = Bitmap::zeros(len);
            assert!(b.none(), "{len}");
            for i in 0..len {
                let mut c = b.clone();
                c.set(i);
                assert!(!c.none(), "{len}: bit {i} set");
            }
            // Bits past the end (set by word-wise ops) do not count.
            b.or_not(&Bitmap::ones(len));
            assert!(b.none(), "{len}");
            assert_eq!(Bitmap::ones(len).none(), len == 0);
        }
    }

    #[test]
    fn next_zero_wraps() {
        let mut b = Bitmap::zeros(130);
        for i in 0..130 {
            if i != 5 && i != 100 {
                b.set(i);
            }
        }
        assert_eq!(b.next_zero(0), Some(5));
        assert_eq!(b.next_zero(6), Some(100));
        assert_eq!(b.next_zero(101), Some(5));
        b.set(5);
        b.set(100);
        assert_eq!(b.next_zero(7), None);
    }

    #[test]
    fn prev_set_and_clear_in_scans_down_and_wraps() {
        let mut a = Bitmap::zeros(200);
        let mut b = Bitmap::zeros(200);
        for i in [3, 64, 70, 150, 199] {
            a.set(i);
        }
        b.set(70);
        assert_eq!(a.prev_set_and_clear_in(&b, 199), Some(199));
        assert_eq!(a.prev_set_and_clear_in(&b, 149), Some(64));
        assert_eq!(a.prev_set_and_clear_in(&b, 63), Some(3));
        assert_eq!(a.prev_set_and_clear_in(&b, 2), Some(199));
        b.fill(true);
        assert_eq!(a.prev_set_and_clear_in(&b, 199), None);
    }

    #[test]
    fn shorter_operands_read_as_set_past_their_end() {
        let mut short = Bitmap::zeros(70);
        short.set(3);
        let long = Bitmap::zeros(130);
        // Set here (past the end of `short`) and clear in `long`: 129 down to 70, then 3.
        assert_eq!(short.prev_set_and_clear_in(&long, u64::MAX), Some(129));
        assert_eq!(short.prev_set_and_clear_in(&long, 69), Some(3));
        // Past the end of `long` nothing is clear in it.
        assert_eq!(long.prev_set_and_clear_in(&short, u64::MAX), None);
        let mut open = Bitmap::ones(130);
        open.and_not(&short);
        assert_eq!(open.count_ones(), 69, "grains 0..70 except 3 stay open");
        let mut out = Bitmap::zeros(130);
        out.or_and(&Bitmap::ones(130), &short);
        assert_eq!(out.count_ones(), 61);
        let mut diff = Bitmap::zeros(130);
        diff.or_not(&short);
        assert_eq!(diff.count_ones(), 69);
    }

    #[test]
    fn not_and_serde_round_trip() {
        let mut d = Bitmap::zeros(70);
        d.set(1);
        d.set(69);
        let mut s = Bitmap::zeros(70);
        s.assign_not(&d);
        assert_eq!(s.count_ones(), 68);
        assert!(!s.get(69) && s.get(68));
        let bytes = bincode::serialize(&s).unwrap();
        let back: Bitmap = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, s);
    }
}

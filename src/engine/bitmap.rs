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
    /// True when every bit is set.
    pub fn all(&self) -> bool {
        self.0.all()
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

impl Serialize for Bitmap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.len(), self.words()).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Bitmap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (len, words): (u64, Vec<u64>) = Deserialize::deserialize(d)?;
        Bitmap::from_words(len, words)
            .ok_or_else(|| serde::de::Error::custom("bitmap shorter than its length"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

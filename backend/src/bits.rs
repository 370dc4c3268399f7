//! [`AtomicBits`]: the one lock-free bitmap of the crate. Dirty bitmaps
//! (`dirty::DirtyBitmap`), the mirror's dirty and in-flight chunk bits and
//! its memory-mapped persistent bitmap are all this type.
//!
//! Bit `i % 64` of word `i / 64` is bit `i`, and there are
//! `max(ceil(len / 64), 1)` words: the layout of the last level of QEMU's
//! `HBitmap` on a 64-bit little-endian host, which is what makes a dirty
//! bitmap's SHA-256 equal QEMU's and what the sidecars store.
//!
//! Two helper levels ride along:
//! - a summary (one bit per word: "this word may be non-zero"), so that
//!   finding the next set bit skips 4096 clear bits per summary bit read;
//! - optionally, a "changed page" level (one bit per 4 KiB of words) so that
//!   a persistent bitmap's checkpoint writes out only the pages that changed.
//!
//! Every read-modify-write is `SeqCst`: the mirror's and the dirty tracker's
//! arguments about racing writers (mirror/hook.rs, dirty/tracker.rs) order
//! these bit operations against their other atomics. The count is kept with
//! wrapping arithmetic, adjusted by the bits each atomic operation actually
//! changed, so it is exact once writers are quiet.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of words covered by one bit of the changed-page level: the unit in
/// which a persistent bitmap is written to its sidecar.
pub const PAGE_BYTES: u64 = 4096;
/// Words per changed-page bit.
const WORDS_PER_PAGE: usize = (PAGE_BYTES / 8) as usize;

/// Number of 64-bit words for `len` bits (at least one, as QEMU allocates).
pub fn words_for(len: u64) -> usize {
    len.div_ceil(64).max(1) as usize
}

fn zeroed(len: usize) -> Box<[AtomicU64]> {
    (0..len).map(|_| AtomicU64::new(0)).collect()
}

/// Where the words live.
enum Words {
    Heap(Box<[AtomicU64]>),
    /// Words in a mapping owned elsewhere (a sidecar), valid for the
    /// lifetime of the `AtomicBits` (the owner keeps the mapping alive).
    Mapped(&'static [AtomicU64]),
}

/// A fixed number of bits as atomic words, settable and clearable from any
/// thread without a lock.
pub struct AtomicBits {
    len: u64,
    words: Words,
    /// Bit `w` set: word `w` may be non-zero (never clear while it is
    /// non-zero, except transiently inside a clear, which re-checks).
    summary: Box<[AtomicU64]>,
    /// Bit `p` set: words `[p*512, (p+1)*512)` changed since the last
    /// [`AtomicBits::take_changed_pages`].
    pages: Option<Box<[AtomicU64]>>,
    count: AtomicU64,
}

impl std::fmt::Debug for AtomicBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicBits")
            .field("len", &self.len)
            .field("set", &self.count())
            .finish()
    }
}

impl AtomicBits {
    /// `len` clear bits in the heap; `track_pages` keeps the changed-page
    /// level that persistence needs.
    pub fn new(len: u64, track_pages: bool) -> AtomicBits {
        let nwords = words_for(len);
        AtomicBits {
            len,
            words: Words::Heap(zeroed(nwords)),
            summary: zeroed(nwords.div_ceil(64)),
            pages: track_pages.then(|| zeroed(nwords.div_ceil(WORDS_PER_PAGE).div_ceil(64))),
            count: AtomicU64::new(0),
        }
    }

    /// Over existing words (a mapped sidecar, `words_for(len)` of them);
    /// the count and summary are computed from them.
    pub(crate) fn over(len: u64, words: &'static [AtomicU64]) -> AtomicBits {
        let b = AtomicBits {
            len,
            words: Words::Mapped(words),
            summary: zeroed(words.len().div_ceil(64)),
            pages: None,
            count: AtomicU64::new(0),
        };
        for (w, word) in words.iter().enumerate() {
            if word.load(Ordering::Acquire) != 0 {
                b.summary[w / 64].fetch_or(1 << (w % 64), Ordering::SeqCst);
            }
        }
        b.recount();
        b
    }

    #[inline]
    fn words(&self) -> &[AtomicU64] {
        match &self.words {
            Words::Heap(w) => w,
            Words::Mapped(w) => w,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of words.
    pub fn word_count(&self) -> usize {
        self.words().len()
    }

    /// Set bits (exact when quiet; a transiently "negative" count reads 0).
    pub fn count(&self) -> u64 {
        let c = self.count.load(Ordering::Relaxed);
        if (c as i64) < 0 {
            0
        } else {
            c.min(self.len)
        }
    }

    /// Counts the set bits in the words (O(size)), leaving the kept count.
    pub fn popcount(&self) -> u64 {
        self.words()
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Recomputes the kept count from the words (O(size)); only while
    /// nothing else writes.
    pub fn recount(&self) -> u64 {
        let total = self.popcount();
        self.count.store(total, Ordering::Relaxed);
        total
    }

    /// Calls `f(word, mask)` for each word overlapping bits `first..=last`,
    /// clipped to the bitmap.
    #[inline]
    fn for_words(&self, first: u64, last: u64, mut f: impl FnMut(usize, u64)) {
        if self.len == 0 || first >= self.len {
            return;
        }
        let last = last.min(self.len - 1);
        if first > last {
            return;
        }
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            f(w as usize, (u64::MAX >> (63 - hi)) & (u64::MAX << lo));
        }
    }

    /// Sets bits `first..=last` (clipped).
    #[inline]
    pub fn set(&self, first: u64, last: u64) {
        self.for_words(first, last, |w, m| self.set_word_bits(w, m));
    }

    /// Clears bits `first..=last` (clipped).
    pub fn clear(&self, first: u64, last: u64) {
        self.for_words(first, last, |w, m| {
            self.clear_word_bits(w, m);
        });
    }

    /// Sets every bit.
    pub fn set_all(&self) {
        if self.len > 0 {
            self.set(0, self.len - 1);
        }
    }

    /// Clears every bit.
    pub fn clear_all(&self) {
        for w in 0..self.word_count() {
            if self.words()[w].load(Ordering::Relaxed) != 0 {
                self.clear_word_bits(w, u64::MAX);
            }
        }
    }

    /// Clears bit `i` and returns whether it was set.
    pub fn test_and_clear(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let bit = 1u64 << (i % 64);
        self.clear_word_bits((i / 64) as usize, bit) & bit != 0
    }

    /// Whether bit `i` is set.
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        i < self.len
            && self.words()[(i / 64) as usize].load(Ordering::SeqCst) & (1 << (i % 64)) != 0
    }

    /// Whether any of bits `first..=last` is set.
    pub fn any(&self, first: u64, last: u64) -> bool {
        let mut found = false;
        self.for_words(first, last, |w, m| {
            found |= self.words()[w].load(Ordering::SeqCst) & m != 0
        });
        found
    }

    #[inline]
    fn set_word_bits(&self, w: usize, mask: u64) {
        let word = &self.words()[w];
        // A bit already set by another writer must be visible to whoever
        // this writer's later fences synchronise with (dirty/tracker.rs).
        if word.load(Ordering::Acquire) & mask == mask {
            return;
        }
        let old = word.fetch_or(mask, Ordering::SeqCst);
        let new = mask & !old;
        if new == 0 {
            return;
        }
        self.count
            .fetch_add(u64::from(new.count_ones()), Ordering::Relaxed);
        if old == 0 {
            self.summary[w / 64].fetch_or(1 << (w % 64), Ordering::SeqCst);
        }
        self.note_page(w);
    }

    /// Clears `mask` in word `w`; returns the bits it cleared.
    fn clear_word_bits(&self, w: usize, mask: u64) -> u64 {
        let word = &self.words()[w];
        if word.load(Ordering::Acquire) & mask == 0 {
            return 0;
        }
        let old = word.fetch_and(!mask, Ordering::SeqCst);
        let gone = old & mask;
        if gone == 0 {
            return 0;
        }
        self.count
            .fetch_sub(u64::from(gone.count_ones()), Ordering::Relaxed);
        if old & !mask == 0 {
            // The word became zero: drop its summary bit, then re-check, since
            // a concurrent setter that saw the zero word may have set the
            // summary bit just before we cleared it.
            let bit = 1u64 << (w % 64);
            self.summary[w / 64].fetch_and(!bit, Ordering::SeqCst);
            if word.load(Ordering::SeqCst) != 0 {
                self.summary[w / 64].fetch_or(bit, Ordering::SeqCst);
            }
        }
        self.note_page(w);
        gone
    }

    #[inline]
    fn note_page(&self, w: usize) {
        if let Some(pages) = &self.pages {
            let p = w / WORDS_PER_PAGE;
            let bit = 1u64 << (p % 64);
            let slot = &pages[p / 64];
            if slot.load(Ordering::Relaxed) & bit == 0 {
                slot.fetch_or(bit, Ordering::AcqRel);
            }
        }
    }

    /// The first set bit at or after `from`, using the summary to skip
    /// clear words.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let words = self.words();
        let within = |i: u64| (i < self.len).then_some(i);
        let mut w = (from / 64) as usize;
        let first = words[w].load(Ordering::Acquire) & (u64::MAX << (from % 64));
        if first != 0 {
            return within(w as u64 * 64 + u64::from(first.trailing_zeros()));
        }
        w += 1;
        while w < words.len() {
            let s = w / 64;
            let mut sum = self.summary[s].load(Ordering::Acquire) & (u64::MAX << (w % 64));
            while sum != 0 {
                let cand = s * 64 + sum.trailing_zeros() as usize;
                let word = words[cand].load(Ordering::Acquire);
                if word != 0 {
                    return within(cand as u64 * 64 + u64::from(word.trailing_zeros()));
                }
                sum &= sum - 1;
            }
            w = (s + 1) * 64;
        }
        None
    }

    /// The first clear bit at or after `from` (or `len()` if none).
    pub fn next_clear(&self, from: u64) -> u64 {
        let words = self.words();
        let mut i = from;
        while i < self.len {
            let w = (i / 64) as usize;
            let inv = !words[w].load(Ordering::Acquire) & (u64::MAX << (i % 64));
            if inv != 0 {
                return (w as u64 * 64 + u64::from(inv.trailing_zeros())).min(self.len);
            }
            i = (w as u64 + 1) * 64;
        }
        self.len
    }

    /// Copies every word of `other` (same length) into `self`; only while
    /// nothing else writes `self` (the mirror's checkpoint P := D).
    pub fn copy_from(&self, other: &AtomicBits) {
        for (w, (dst, src)) in self.words().iter().zip(other.words()).enumerate() {
            let v = src.load(Ordering::SeqCst);
            if dst.swap(v, Ordering::SeqCst) != v {
                let bit = 1u64 << (w % 64);
                if v != 0 {
                    self.summary[w / 64].fetch_or(bit, Ordering::SeqCst);
                } else {
                    self.summary[w / 64].fetch_and(!bit, Ordering::SeqCst);
                }
                self.note_page(w);
            }
        }
        self.recount();
    }

    /// ORs every word of `other` (same length) into `self`; safe beside
    /// other writers.
    pub fn or_from(&self, other: &AtomicBits) {
        for (w, src) in other.words().iter().enumerate().take(self.word_count()) {
            let v = src.load(Ordering::SeqCst);
            if v != 0 {
                self.set_word_bits(w, v);
            }
        }
    }

    /// Copies words `[first, first + out.len()/8)` as little-endian bytes
    /// into `out` (words past the end read as zero).
    pub fn read_words_le(&self, first: usize, out: &mut [u8]) {
        let words = self.words();
        for (i, dst) in out.chunks_mut(8).enumerate() {
            let v = words
                .get(first + i)
                .map_or(0, |w| w.load(Ordering::Acquire));
            dst.copy_from_slice(&v.to_le_bytes()[..dst.len()]);
        }
    }

    /// ORs little-endian words from `bytes` into the bitmap, ignoring bits
    /// past the last one (a damaged or foreign file cannot set them).
    pub fn or_le_bytes(&self, bytes: &[u8]) {
        let tail_bits = self.len % 64;
        let last_word = self.len.div_ceil(64) as usize;
        for (w, chunk) in bytes.chunks(8).enumerate().take(last_word) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let mut v = u64::from_le_bytes(b);
            if w + 1 == last_word && tail_bits != 0 {
                v &= (1u64 << tail_bits) - 1;
            }
            if v != 0 {
                self.set_word_bits(w, v);
            }
        }
    }

    /// Number of 4 KiB pages of words (the persistence unit).
    pub fn page_count(&self) -> usize {
        self.word_count().div_ceil(WORDS_PER_PAGE)
    }

    /// Takes (and resets) the set of pages changed since the last call.
    /// Without page tracking, every page is reported.
    pub fn take_changed_pages(&self) -> Vec<usize> {
        let Some(pages) = &self.pages else {
            return (0..self.page_count()).collect();
        };
        let mut out = Vec::new();
        for (i, slot) in pages.iter().enumerate() {
            if slot.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = slot.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let p = i * 64 + bits.trailing_zeros() as usize;
                if p < self.page_count() {
                    out.push(p);
                }
                bits &= bits - 1;
            }
        }
        out
    }

    /// Whether any page changed since the last [`AtomicBits::take_changed_pages`].
    pub fn has_changed_pages(&self) -> bool {
        self.pages
            .as_ref()
            .is_some_and(|p| p.iter().any(|s| s.load(Ordering::Relaxed) != 0))
    }

    /// Marks every page as changed (forces a full write-out).
    pub fn mark_all_pages_changed(&self) {
        if let Some(pages) = &self.pages {
            for (i, slot) in pages.iter().enumerate() {
                let n = self.page_count().saturating_sub(i * 64).min(64);
                let bits = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                slot.fetch_or(bits, Ordering::AcqRel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn set_clear_count_and_search() {
        let b = AtomicBits::new(200, false);
        assert_eq!(b.next_set(0), None);
        b.set(3, 70);
        assert_eq!(b.count(), 68);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(71), None);
        assert_eq!(b.next_clear(3), 71);
        assert!(b.any(60, 100) && !b.any(71, 199));
        b.clear(10, 69);
        assert_eq!(b.count(), 8);
        assert_eq!(b.next_set(10), Some(70));
        assert!(b.test_and_clear(70));
        assert!(!b.test_and_clear(70));
        b.set(150, 10_000); // clipped
        assert_eq!(b.count(), 7 + 50);
        assert_eq!(b.recount(), 57);
        b.set_all();
        assert_eq!(b.count(), 200);
        assert_eq!(b.next_clear(0), 200);
        let c = AtomicBits::new(200, false);
        c.copy_from(&b);
        assert_eq!(c.count(), 200);
        assert!(!b.get(200) && b.get(199));
        b.clear_all();
        assert_eq!((b.count(), b.next_set(0)), (0, None));
        c.clear(0, 198);
        assert_eq!(c.next_set(0), Some(199));
        b.or_from(&c);
        assert_eq!((b.count(), b.next_set(0)), (1, Some(199)));
    }

    #[test]
    fn copy_from_keeps_the_summary_for_searches() {
        let b = AtomicBits::new(1 << 20, false);
        b.set(900_000, 900_000);
        let c = AtomicBits::new(1 << 20, false);
        c.set(5, 5);
        c.copy_from(&b);
        assert_eq!(c.next_set(0), Some(900_000));
        assert_eq!(c.count(), 1);
    }

    #[test]
    fn summary_survives_concurrent_set_and_clear() {
        let b = Arc::new(AtomicBits::new(1 << 20, false));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let c = (i * 7919 + t * 104_729) % (1 << 20);
                        b.set(c, c);
                        if i % 3 == 0 {
                            b.clear(c, c);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut found = 0;
        let mut from = 0;
        while let Some(c) = b.next_set(from) {
            found += 1;
            from = c + 1;
        }
        assert_eq!(found, b.popcount());
        assert_eq!(b.count(), found);
    }

    #[test]
    fn changed_pages_track_writes() {
        // One page of words covers 32768 bits.
        let b = AtomicBits::new(4 * 32768, true);
        assert!(b.take_changed_pages().is_empty());
        b.set(5, 5);
        b.set(3 * 32768, 3 * 32768);
        assert_eq!(b.take_changed_pages(), vec![0, 3]);
        b.set(5, 5); // no change, no page
        assert!(!b.has_changed_pages());
        b.mark_all_pages_changed();
        assert_eq!(b.take_changed_pages().len(), b.page_count());
    }

    #[test]
    fn or_le_bytes_ignores_bits_past_the_end() {
        let b = AtomicBits::new(70, false);
        b.or_le_bytes(&[0xff; 24]);
        assert_eq!(b.recount(), 70);
        let mut out = [0u8; 16];
        b.read_words_le(0, &mut out);
        assert_eq!(out[8], 0x3f);
    }
}

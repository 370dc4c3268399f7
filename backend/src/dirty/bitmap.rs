//! [`DirtyBitmap`]: one bit per chunk of the disk, stored as `AtomicU64`
//! words so that every queue thread can mark it without a lock.
//!
//! The word array is laid out exactly like the last (finest) level of
//! QEMU's `HBitmap` on a 64-bit little-endian host: bit `i % 64` of word
//! `i / 64` is chunk `i`, and there are `max(ceil(chunks / 64), 1)` words.
//! That is what makes [`DirtyBitmap::sha256_hex`] equal to QEMU's
//! `x-debug-block-dirty-bitmap-sha256`, and it is also the on-disk layout
//! of a persistent bitmap's fine level (docs/bitmap-format.md).
//!
//! Two helper structures ride along:
//! - a summary level (one bit per word: "this word may be non-zero"), so
//!   that finding the next dirty chunk skips 4096 clean chunks per summary
//!   bit read;
//! - for persistent bitmaps, a "changed page" level (one bit per 4 KiB of
//!   words) so that a checkpoint writes out only the pages that changed.
//!
//! Counts are exact once writers are quiescent: every set or reset adjusts
//! the counter by the number of bits its atomic read-modify-write actually
//! changed.

use super::{DirtyError, MAX_GRANULARITY, MIN_GRANULARITY};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes of words covered by one bit of the changed-page level: the unit in
/// which a persistent bitmap's fine level is written to its sidecar.
pub const PAGE_BYTES: u64 = 4096;
/// Words per changed-page bit.
const WORDS_PER_PAGE: usize = (PAGE_BYTES / 8) as usize;

/// Number of 64-bit words QEMU allocates for `chunks` bits (at least one).
pub fn qemu_words(chunks: u64) -> u64 {
    chunks.div_ceil(64).max(1)
}

/// Checks a granularity the way QEMU's `block-dirty-bitmap-add` does, plus
/// vubd's upper bound (64 MiB).
pub fn check_granularity(granularity: u64) -> Result<(), DirtyError> {
    if granularity < MIN_GRANULARITY || !granularity.is_power_of_two() {
        return Err(DirtyError::BadGranularity);
    }
    if granularity > MAX_GRANULARITY {
        return Err(DirtyError::GranularityTooLarge);
    }
    Ok(())
}

fn new_atomic_vec(len: usize) -> Box<[AtomicU64]> {
    (0..len).map(|_| AtomicU64::new(0)).collect()
}

/// A dirty bitmap over a disk of a fixed size, at a power-of-two
/// granularity: bit *i* set means "bytes `[i*g, (i+1)*g)` may have changed".
pub struct DirtyBitmap {
    disk_size: u64,
    shift: u32,
    chunks: u64,
    words: Box<[AtomicU64]>,
    /// Bit `w` set: word `w` may be non-zero (never clear while it is non-zero,
    /// except transiently inside a reset, which re-checks).
    summary: Box<[AtomicU64]>,
    /// Bit `p` set: words `[p*512, (p+1)*512)` changed since the last
    /// [`DirtyBitmap::take_changed_pages`]. Only kept for persistent bitmaps.
    pages: Option<Box<[AtomicU64]>>,
    /// Number of set bits, kept with wrapping arithmetic (a reset racing the
    /// set of the same bit may run its decrement first).
    count: AtomicU64,
    recording: AtomicBool,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("disk_size", &self.disk_size)
            .field("granularity", &self.granularity())
            .field("dirty_chunks", &self.dirty_chunks())
            .field("recording", &self.is_recording())
            .finish()
    }
}

impl DirtyBitmap {
    /// An empty, recording bitmap over `disk_size` bytes. `track_pages`
    /// keeps the changed-page level that persistence needs.
    pub fn new(disk_size: u64, granularity: u64, track_pages: bool) -> Result<Self, DirtyError> {
        check_granularity(granularity)?;
        let shift = granularity.trailing_zeros();
        let chunks = disk_size.div_ceil(granularity);
        let nwords = usize::try_from(qemu_words(chunks)).map_err(|_| DirtyError::TooLarge)?;
        let pages =
            track_pages.then(|| new_atomic_vec(nwords.div_ceil(WORDS_PER_PAGE).div_ceil(64)));
        Ok(DirtyBitmap {
            disk_size,
            shift,
            chunks,
            words: new_atomic_vec(nwords),
            summary: new_atomic_vec(nwords.div_ceil(64)),
            pages,
            count: AtomicU64::new(0),
            recording: AtomicBool::new(true),
        })
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// The size of the disk the bitmap covers.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Number of chunks (bits) covering the disk; the last one may be partial.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Number of 64-bit words (QEMU's level size).
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Whether guest writes mark this bitmap (QMP `recording`).
    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    /// Starts or stops recording.
    pub fn set_recording(&self, on: bool) {
        self.recording.store(on, Ordering::Release);
    }

    /// Number of dirty chunks.
    pub fn dirty_chunks(&self) -> u64 {
        // Wrapping counter: a transiently "negative" value reads as 0.
        let c = self.count.load(Ordering::Relaxed);
        if c > self.chunks {
            if (c as i64) < 0 {
                0
            } else {
                self.chunks
            }
        } else {
            c
        }
    }

    /// Dirty bytes as QEMU reports them in `query-block`: dirty chunks times
    /// the granularity. QEMU does not clip the last, partial chunk to the
    /// disk size (`hbitmap_count` is `count << granularity`), so neither do we.
    pub fn count_bytes(&self) -> u64 {
        self.dirty_chunks() << self.shift
    }

    /// The chunk range `[first, last]` covering bytes `[offset, offset+len)`,
    /// clipped to the disk; `None` for an empty range or one past the end.
    pub fn chunk_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.disk_size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        Some((offset >> self.shift, (end - 1) >> self.shift))
    }

    /// Marks every chunk that bytes `[offset, offset+len)` touch (regardless
    /// of recording; see [`DirtyBitmap::mark_if_recording`]).
    pub fn set_range(&self, offset: u64, len: u64) {
        if let Some((first, last)) = self.chunk_range(offset, len) {
            self.set_chunks(first, last);
        }
    }

    /// Marks the range if the bitmap is recording; returns whether it was.
    pub fn mark_if_recording(&self, offset: u64, len: u64) -> bool {
        if !self.is_recording() {
            return false;
        }
        self.set_range(offset, len);
        true
    }

    /// Clears every chunk that bytes `[offset, offset+len)` touch.
    pub fn reset_range(&self, offset: u64, len: u64) {
        if let Some((first, last)) = self.chunk_range(offset, len) {
            self.reset_chunks(first, last);
        }
    }

    /// Sets chunks `first..=last` (clipped to the bitmap).
    pub fn set_chunks(&self, first: u64, last: u64) {
        let last = last.min(self.chunks.saturating_sub(1));
        if first > last || self.chunks == 0 {
            return;
        }
        for_each_word(first, last, |w, mask| self.set_word_bits(w, mask));
    }

    /// Clears chunks `first..=last` (clipped to the bitmap).
    pub fn reset_chunks(&self, first: u64, last: u64) {
        let last = last.min(self.chunks.saturating_sub(1));
        if first > last || self.chunks == 0 {
            return;
        }
        for_each_word(first, last, |w, mask| self.reset_word_bits(w, mask));
    }

    /// Whether chunk `chunk` is dirty.
    pub fn get_chunk(&self, chunk: u64) -> bool {
        if chunk >= self.chunks {
            return false;
        }
        self.words[(chunk / 64) as usize].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    /// Whether the chunk containing byte `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        self.get_chunk(offset >> self.shift)
    }

    /// Clears the whole bitmap.
    pub fn clear(&self) {
        for w in 0..self.words.len() {
            if self.words[w].load(Ordering::Relaxed) != 0 {
                self.reset_word_bits(w, u64::MAX);
            }
        }
    }

    fn set_word_bits(&self, w: usize, mask: u64) {
        let word = &self.words[w];
        // Acquire: a bit already set by another marker must be visible to
        // whoever our own later SeqCst fence synchronises with (see
        // tracker.rs, "Why a mark is never lost").
        if word.load(Ordering::Acquire) & mask == mask {
            return;
        }
        let old = word.fetch_or(mask, Ordering::AcqRel);
        let new = mask & !old;
        if new == 0 {
            return;
        }
        self.count
            .fetch_add(u64::from(new.count_ones()), Ordering::Relaxed);
        if old == 0 {
            self.summary[w / 64].fetch_or(1 << (w % 64), Ordering::AcqRel);
        }
        self.note_page(w);
    }

    fn reset_word_bits(&self, w: usize, mask: u64) {
        let word = &self.words[w];
        if word.load(Ordering::Acquire) & mask == 0 {
            return;
        }
        let old = word.fetch_and(!mask, Ordering::AcqRel);
        let gone = old & mask;
        if gone == 0 {
            return;
        }
        self.count
            .fetch_sub(u64::from(gone.count_ones()), Ordering::Relaxed);
        if old & !mask == 0 {
            // The word became zero: drop its summary bit, then re-check, since
            // a concurrent setter that saw the zero word may have set the
            // summary bit just before we cleared it.
            let bit = 1u64 << (w % 64);
            self.summary[w / 64].fetch_and(!bit, Ordering::AcqRel);
            if word.load(Ordering::Acquire) != 0 {
                self.summary[w / 64].fetch_or(bit, Ordering::AcqRel);
            }
        }
        self.note_page(w);
    }

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

    /// The first dirty chunk at or after `from`, using the summary level to
    /// skip clean words.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if from >= self.chunks {
            return None;
        }
        let mut w = (from / 64) as usize;
        let first = self.words[w].load(Ordering::Acquire) & (u64::MAX << (from % 64));
        if first != 0 {
            return self.within(w as u64 * 64 + u64::from(first.trailing_zeros()));
        }
        w += 1;
        while w < self.words.len() {
            let s = w / 64;
            let mut sum = self.summary[s].load(Ordering::Acquire) & (u64::MAX << (w % 64));
            while sum != 0 {
                let cand = s * 64 + sum.trailing_zeros() as usize;
                let word = self.words[cand].load(Ordering::Acquire);
                if word != 0 {
                    return self.within(cand as u64 * 64 + u64::from(word.trailing_zeros()));
                }
                sum &= sum - 1;
            }
            w = (s + 1) * 64;
        }
        None
    }

    fn within(&self, chunk: u64) -> Option<u64> {
        (chunk < self.chunks).then_some(chunk)
    }

    /// The first clean chunk at or after `from` (or `chunks()` if none).
    pub fn next_clean(&self, from: u64) -> u64 {
        let mut c = from;
        while c < self.chunks {
            let w = (c / 64) as usize;
            let inv = !self.words[w].load(Ordering::Acquire) & (u64::MAX << (c % 64));
            if inv != 0 {
                return (w as u64 * 64 + u64::from(inv.trailing_zeros())).min(self.chunks);
            }
            c = (w as u64 + 1) * 64;
        }
        self.chunks
    }

    /// The bitmap over `offset..offset + len` (clipped to the disk) as
    /// alternating runs `(length, dirty)`, whole chunks except where the
    /// range cuts one; at most `max` runs (the last one then ends early).
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.disk_size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let chunk = pos >> self.shift;
            let dirty = self.get_chunk(chunk);
            let next = if dirty {
                self.next_clean(chunk + 1)
            } else {
                self.next_dirty(chunk + 1).unwrap_or(self.chunks)
            };
            let run_end = (next << self.shift).min(end);
            out.push((run_end - pos, dirty));
            pos = run_end;
        }
        out
    }

    /// Iterates over maximal runs of dirty chunks as byte ranges
    /// `(offset, len)`, clipped to the disk size.
    pub fn dirty_ranges(&self) -> DirtyRanges<'_> {
        DirtyRanges {
            bitmap: self,
            next: 0,
        }
    }

    /// ORs `other` into this bitmap. Equal granularities OR word by word;
    /// different ones map each dirty run of `other` through its byte range
    /// (as QEMU's `hbitmap_sparse_merge`), so a coarse source marks every fine
    /// chunk it covers and a fine source marks the coarse chunk containing it.
    pub fn merge_from(&self, other: &DirtyBitmap) {
        if other.shift == self.shift && other.words.len() == self.words.len() {
            for (w, word) in other.words.iter().enumerate() {
                let bits = word.load(Ordering::Acquire);
                if bits != 0 {
                    self.set_word_bits(w, bits);
                }
            }
            return;
        }
        for (offset, len) in other.dirty_ranges() {
            self.set_range(offset, len);
        }
    }

    /// Lowercase hex SHA-256 of the words, little-endian, exactly the bytes
    /// QEMU's `hbitmap_sha256` hashes.
    pub fn sha256_hex(&self) -> String {
        let mut hasher = Sha256::new();
        let mut buf = Vec::with_capacity(WORDS_PER_PAGE * 8);
        for chunk in self.words.chunks(WORDS_PER_PAGE) {
            buf.clear();
            for w in chunk {
                buf.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
            }
            hasher.update(&buf);
        }
        hex(&hasher.finalize())
    }

    /// Copies words `[first, first + out.len()/8)` as little-endian bytes
    /// into `out` (words past the end read as zero).
    pub fn read_words_le(&self, first: usize, out: &mut [u8]) {
        for (i, dst) in out.chunks_mut(8).enumerate() {
            let v = self
                .words
                .get(first + i)
                .map_or(0, |w| w.load(Ordering::Acquire));
            let bytes = v.to_le_bytes();
            dst.copy_from_slice(&bytes[..dst.len()]);
        }
    }

    /// The words as little-endian bytes (QEMU's serialization of the level).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.words.len() * 8];
        self.read_words_le(0, &mut out);
        out
    }

    /// ORs little-endian words from `bytes` into the bitmap, ignoring bits
    /// past the last chunk (a damaged or foreign file cannot set them).
    pub fn or_le_bytes(&self, bytes: &[u8]) {
        let tail_bits = self.chunks % 64;
        let last_word = (self.chunks.div_ceil(64)) as usize;
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
        self.words.len().div_ceil(WORDS_PER_PAGE)
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

    /// Whether any page changed since the last [`DirtyBitmap::take_changed_pages`].
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

    /// Recounts the set bits from the words (for tests and consistency
    /// checks; O(size)).
    pub fn popcount(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }
}

/// Calls `f(word_index, mask)` for each word overlapping chunks `first..=last`.
fn for_each_word(first: u64, last: u64, mut f: impl FnMut(usize, u64)) {
    let (fw, lw) = (first / 64, last / 64);
    for w in fw..=lw {
        let lo = if w == fw { first % 64 } else { 0 };
        let hi = if w == lw { last % 64 } else { 63 };
        let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        f(w as usize, mask);
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Iterator over dirty runs of a [`DirtyBitmap`] as byte ranges.
pub struct DirtyRanges<'a> {
    bitmap: &'a DirtyBitmap,
    next: u64,
}

impl Iterator for DirtyRanges<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.bitmap.next_dirty(self.next)?;
        let end = self.bitmap.next_clean(start + 1);
        self.next = end;
        let g = self.bitmap.shift;
        let off = start << g;
        let end_b = (end << g).min(self.bitmap.disk_size);
        Some((off, end_b - off))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    #[test]
    fn extents_alternate_at_the_granularity_and_clip_to_the_range() {
        let b = DirtyBitmap::new(MIB, 64 * KIB, false).unwrap();
        b.set_range(64 * KIB + 1, 10);
        b.set_range(3 * 64 * KIB, 128 * KIB);
        assert_eq!(
            b.extents(0, MIB, usize::MAX),
            [
                (64 * KIB, false),
                (64 * KIB, true),
                (64 * KIB, false),
                (128 * KIB, true),
                (MIB - 5 * 64 * KIB, false)
            ]
        );
        assert_eq!(
            b.extents(100 * KIB, 200 * KIB, 2),
            [(28 * KIB, true), (64 * KIB, false)]
        );
        assert_eq!(b.extents(MIB - 512, 4096, 8), [(512, false)]);
        assert!(b.extents(MIB, 512, 8).is_empty());
    }

    fn sha_of(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    #[test]
    fn granularity_limits_follow_qemu_wording() {
        assert!(check_granularity(512).is_ok());
        assert!(check_granularity(64 * MIB).is_ok());
        for bad in [0, 1, 256, 511, 3000, 65537] {
            let e = check_granularity(bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                "Granularity must be power of 2 and at least 512"
            );
        }
        let e = check_granularity(128 * MIB).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Granularity exceeds maximum (67108864 bytes)"
        );
    }

    #[test]
    fn count_is_chunks_times_granularity_unclipped() {
        // 1 MiB + 512 bytes at 64 KiB: 17 chunks, the last one 512 bytes long.
        let b = DirtyBitmap::new(MIB + 512, 64 * KIB, false).unwrap();
        assert_eq!(b.chunks(), 17);
        b.set_range(MIB, 512);
        // QEMU 7.2 reports 65536 here (checked against qemu-storage-daemon).
        assert_eq!(b.count_bytes(), 64 * KIB);
        assert_eq!(b.dirty_chunks(), 1);
        b.set_range(0, 1);
        assert_eq!(b.count_bytes(), 128 * KIB);
        b.set_range(0, MIB + 512);
        assert_eq!(b.count_bytes(), 17 * 64 * KIB);
        assert_eq!(b.popcount(), 17);
    }

    #[test]
    fn range_spanning_chunks_marks_each_touched_chunk() {
        let b = DirtyBitmap::new(16 * MIB, 64 * KIB, false).unwrap();
        // 4 KiB write straddling the boundary between chunks 1 and 2.
        b.set_range(2 * 64 * KIB - 2048, 4096);
        assert!(!b.get_chunk(0));
        assert!(b.get_chunk(1));
        assert!(b.get_chunk(2));
        assert!(!b.get_chunk(3));
        assert_eq!(b.dirty_chunks(), 2);
        // Range spanning many words.
        b.set_range(64 * KIB * 60, 64 * KIB * 80);
        assert_eq!(b.dirty_chunks(), 2 + 80);
        assert_eq!(b.next_dirty(3), Some(60));
        assert_eq!(b.next_clean(60), 140);
        // Zero-length writes mark nothing, writes past the end are clipped.
        b.set_range(0, 0);
        b.set_range(16 * MIB, 4096);
        assert!(!b.get_chunk(0));
        assert_eq!(b.dirty_chunks(), 82);
    }

    #[test]
    fn every_granularity_from_512_to_64m() {
        let size = 200 * MIB + 4096;
        let mut g = 512;
        while g <= 64 * MIB {
            let b = DirtyBitmap::new(size, g, true).unwrap();
            assert_eq!(b.chunks(), size.div_ceil(g));
            b.set_range(100 * MIB + 1, 1);
            b.set_range(size - 1, 1);
            // Both bytes in one chunk (64 MiB granularity) or in two.
            let expect = if (100 * MIB + 1) / g == (size - 1) / g {
                1
            } else {
                2
            };
            assert_eq!(b.dirty_chunks(), expect, "granularity {g}");
            assert_eq!(b.count_bytes(), expect * g);
            assert!(b.get(100 * MIB));
            assert!(b.get(size - 1));
            let ranges: Vec<_> = b.dirty_ranges().collect();
            assert!(ranges.iter().all(|(o, l)| o + l <= size && o % g == 0));
            b.reset_range(0, size);
            assert_eq!(b.dirty_chunks(), 0);
            assert_eq!(b.next_dirty(0), None);
            g *= 2;
        }
    }

    #[test]
    fn sha256_matches_qemu_layout() {
        // Empty bitmap of 17 chunks: one zero word (QEMU hashes 8 zero bytes;
        // qemu-storage-daemon 7.2 prints this exact value).
        let b = DirtyBitmap::new(MIB + 512, 64 * KIB, false).unwrap();
        assert_eq!(
            b.sha256_hex(),
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
        b.set_chunks(16, 16);
        assert_eq!(b.sha256_hex(), sha_of(&(1u64 << 16).to_le_bytes()));
        // 130 chunks -> 3 words, little-endian.
        let b = DirtyBitmap::new(130 * 512, 512, false).unwrap();
        b.set_chunks(0, 0);
        b.set_chunks(64, 65);
        b.set_chunks(129, 129);
        let mut expect = Vec::new();
        for w in [1u64, 3, 2] {
            expect.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(b.sha256_hex(), sha_of(&expect));
        // A zero-sized disk still has one word.
        let z = DirtyBitmap::new(0, 65536, false).unwrap();
        assert_eq!(z.sha256_hex(), sha_of(&[0u8; 8]));
    }

    #[test]
    fn merge_across_granularities_maps_byte_ranges() {
        let size = 10 * MIB + 512;
        let fine = DirtyBitmap::new(size, 512, false).unwrap();
        let coarse = DirtyBitmap::new(size, MIB, false).unwrap();
        fine.set_range(3 * MIB + 4096, 512);
        fine.set_range(size - 512, 512);
        coarse.merge_from(&fine);
        assert_eq!(coarse.dirty_chunks(), 2);
        assert!(coarse.get_chunk(3) && coarse.get_chunk(10));

        let coarse2 = DirtyBitmap::new(size, MIB, false).unwrap();
        coarse2.set_chunks(1, 1);
        coarse2.set_chunks(10, 10); // the last chunk covers only 512 bytes
        let fine2 = DirtyBitmap::new(size, 512, false).unwrap();
        fine2.merge_from(&coarse2);
        assert_eq!(fine2.dirty_chunks(), 2048 + 1);
        assert_eq!(fine2.next_dirty(0), Some(2048));
        assert_eq!(fine2.next_clean(2048), 4096);

        // Same granularity: word OR, count stays exact with overlaps.
        let a = DirtyBitmap::new(size, 512, false).unwrap();
        a.set_range(3 * MIB, 8192);
        a.merge_from(&fine);
        assert_eq!(a.dirty_chunks(), 16 + 1);
        assert_eq!(a.popcount(), a.dirty_chunks());
    }

    #[test]
    fn clear_and_recording_flag() {
        let b = DirtyBitmap::new(MIB, 4096, false).unwrap();
        assert!(b.mark_if_recording(0, 8192));
        b.set_recording(false);
        assert!(!b.mark_if_recording(65536, 4096));
        assert_eq!(b.dirty_chunks(), 2);
        b.set_recording(true);
        assert!(b.mark_if_recording(65536, 4096));
        assert_eq!(b.dirty_chunks(), 3);
        b.clear();
        assert_eq!(b.dirty_chunks(), 0);
        assert_eq!(b.count_bytes(), 0);
        assert_eq!(b.next_dirty(0), None);
        assert_eq!(
            b.sha256_hex(),
            DirtyBitmap::new(MIB, 4096, false).unwrap().sha256_hex()
        );
    }

    #[test]
    fn summary_survives_concurrent_set_and_reset() {
        let b = std::sync::Arc::new(DirtyBitmap::new(64 * MIB, 512, false).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut x = 0x9e3779b97f4a7c15u64 ^ t;
                    for i in 0..20000u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let chunk = x % b.chunks();
                        if i % 3 == 0 {
                            b.reset_chunks(chunk, chunk);
                        } else {
                            b.set_chunks(chunk, chunk);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.dirty_chunks(), b.popcount());
        // Every dirty chunk is found by the summary-driven iteration.
        let mut found = 0;
        let mut c = 0;
        while let Some(d) = b.next_dirty(c) {
            assert!(b.get_chunk(d));
            found += 1;
            c = d + 1;
        }
        assert_eq!(found, b.popcount());
    }

    #[test]
    fn changed_pages_track_writes() {
        let b = DirtyBitmap::new(4096 * 512 * 40, 512, true).unwrap();
        // One page of words covers 32768 chunks.
        assert_eq!(b.take_changed_pages(), Vec::<usize>::new());
        b.set_chunks(5, 5);
        b.set_chunks(32768 * 3 + 1, 32768 * 3 + 1);
        assert_eq!(b.take_changed_pages(), vec![0, 3]);
        b.set_chunks(5, 5); // no change, no page
        assert!(!b.has_changed_pages());
        b.mark_all_pages_changed();
        assert_eq!(b.take_changed_pages().len(), b.page_count());
    }

    #[test]
    fn or_le_bytes_ignores_bits_past_the_end() {
        let b = DirtyBitmap::new(70 * 512, 512, false).unwrap();
        let mut bytes = vec![0xffu8; 16];
        bytes.extend_from_slice(&[0xff; 8]); // a third word that does not exist
        b.or_le_bytes(&bytes);
        assert_eq!(b.dirty_chunks(), 70);
        assert_eq!(b.popcount(), 70);
    }
}

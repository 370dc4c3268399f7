//! [`DirtyBitmap`]: one bit per chunk of the disk, over the crate's one
//! lock-free bitmap ([`AtomicBits`]), so that every queue thread can mark
//! it without a lock.
//!
//! The words are laid out exactly like the last (finest) level of QEMU's
//! `HBitmap` on a 64-bit little-endian host (see `bits.rs`). That is what
//! makes [`DirtyBitmap::sha256_hex`] equal to QEMU's
//! `x-debug-block-dirty-bitmap-sha256`, and it is also the on-disk layout
//! of a persistent bitmap's fine level (docs/bitmap-format.md). This type
//! adds what QMP bitmaps have on top of the bits: a granularity, a disk
//! size, byte ranges and the recording flag.

use super::{DirtyError, MAX_GRANULARITY, MIN_GRANULARITY};
pub use crate::bits::PAGE_BYTES;
use crate::bits::{words_for, AtomicBits};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};

/// Number of 64-bit words QEMU allocates for `chunks` bits (at least one).
pub fn qemu_words(chunks: u64) -> u64 {
    words_for(chunks) as u64
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

/// A dirty bitmap over a disk of a fixed size, at a power-of-two
/// granularity: bit *i* set means "bytes `[i*g, (i+1)*g)` may have changed".
pub struct DirtyBitmap {
    disk_size: u64,
    shift: u32,
    bits: AtomicBits,
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
        let chunks = disk_size.div_ceil(granularity);
        usize::try_from(qemu_words(chunks)).map_err(|_| DirtyError::TooLarge)?;
        Ok(DirtyBitmap {
            disk_size,
            shift: granularity.trailing_zeros(),
            bits: AtomicBits::new(chunks, track_pages),
            recording: AtomicBool::new(true),
        })
    }

    /// The bits themselves, one per chunk (word access for persistence).
    pub fn bits(&self) -> &AtomicBits {
        &self.bits
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
        self.bits.len()
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
        self.bits.count()
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
    #[inline]
    pub fn set_range(&self, offset: u64, len: u64) {
        if let Some((first, last)) = self.chunk_range(offset, len) {
            self.bits.set(first, last);
        }
    }

    /// Marks the range if the bitmap is recording; returns whether it was.
    #[inline]
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
            self.bits.clear(first, last);
        }
    }

    /// Sets chunks `first..=last` (clipped to the bitmap).
    pub fn set_chunks(&self, first: u64, last: u64) {
        self.bits.set(first, last);
    }

    /// Clears chunks `first..=last` (clipped to the bitmap).
    pub fn reset_chunks(&self, first: u64, last: u64) {
        self.bits.clear(first, last);
    }

    /// Whether chunk `chunk` is dirty.
    pub fn get_chunk(&self, chunk: u64) -> bool {
        self.bits.get(chunk)
    }

    /// Whether the chunk containing byte `offset` is dirty.
    pub fn get(&self, offset: u64) -> bool {
        self.get_chunk(offset >> self.shift)
    }

    /// Clears the whole bitmap.
    pub fn clear(&self) {
        self.bits.clear_all();
    }

    /// The first dirty chunk at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        self.bits.next_set(from)
    }

    /// The first clean chunk at or after `from` (or `chunks()` if none).
    pub fn next_clean(&self, from: u64) -> u64 {
        self.bits.next_clear(from)
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
                self.next_dirty(chunk + 1).unwrap_or(self.chunks())
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
        if other.shift == self.shift && other.chunks() == self.chunks() {
            self.bits.or_from(&other.bits);
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
        let mut buf = vec![0u8; PAGE_BYTES as usize];
        let words = self.bits.word_count();
        for first in (0..words).step_by(buf.len() / 8) {
            let n = (words - first).min(buf.len() / 8) * 8;
            self.bits.read_words_le(first, &mut buf[..n]);
            hasher.update(&buf[..n]);
        }
        hex(&hasher.finalize())
    }

    /// The words as little-endian bytes (QEMU's serialization of the level).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.bits.word_count() * 8];
        self.bits.read_words_le(0, &mut out);
        out
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
        assert_eq!(b.bits().popcount(), 17);
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
        assert_eq!(a.bits().popcount(), a.dirty_chunks());
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
}

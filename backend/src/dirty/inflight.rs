//! [`InFlightBitmap`]: the mirror's volatile "copy of this chunk in progress"
//! bits (DESIGN.md, "The two bitmaps of the mirror").
//!
//! The mirror sets a chunk's bit before it reads the source, and after it
//! has written the target it clears its dirty bit unless a guest write
//! raced the copy. A guest write clears the in-flight bits it touches, and
//! it must do so *after its data reached the image* and *before* it sets the
//! dirty bit again: otherwise a write that lands after the mirror's read but
//! whose marks happened before the mirror's check would be lost. So the data
//! path calls [`crate::dirty::DirtyTracker::mark`] before the write (clears the
//! bits and sets the dirty bits, as the design asks) and
//! [`crate::dirty::DirtyTracker::write_completed`] after it (clears them and
//! sets the dirty bits again, in that order). [`InFlightBitmap::finish_copy`]
//! is the mirror's side of the same protocol.

use super::{DirtyBitmap, DirtyError};
use std::sync::atomic::{AtomicU64, Ordering};

/// Volatile per-chunk "being copied" bits, lock-free.
pub struct InFlightBitmap {
    disk_size: u64,
    shift: u32,
    chunks: u64,
    words: Box<[AtomicU64]>,
}

impl std::fmt::Debug for InFlightBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlightBitmap")
            .field("granularity", &self.granularity())
            .field("chunks", &self.chunks)
            .finish()
    }
}

impl InFlightBitmap {
    /// An all-clear in-flight bitmap over `disk_size` bytes.
    pub fn new(disk_size: u64, granularity: u64) -> Result<Self, DirtyError> {
        super::check_granularity(granularity)?;
        let shift = granularity.trailing_zeros();
        let chunks = disk_size.div_ceil(granularity);
        let n = usize::try_from(chunks.div_ceil(64).max(1)).map_err(|_| DirtyError::TooLarge)?;
        Ok(InFlightBitmap {
            disk_size,
            shift,
            chunks,
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Mirror side: marks `chunk` as being copied (before reading the source).
    pub fn begin_copy(&self, chunk: u64) {
        if chunk < self.chunks {
            self.words[(chunk / 64) as usize].fetch_or(1 << (chunk % 64), Ordering::SeqCst);
        }
    }

    /// Whether `chunk` is marked in flight.
    pub fn is_set(&self, chunk: u64) -> bool {
        chunk < self.chunks
            && self.words[(chunk / 64) as usize].load(Ordering::SeqCst) & (1 << (chunk % 64)) != 0
    }

    /// Clears the bit of `chunk` and returns whether it was still set (no
    /// guest write touched the chunk since [`InFlightBitmap::begin_copy`]).
    pub fn test_and_clear(&self, chunk: u64) -> bool {
        if chunk >= self.chunks {
            return false;
        }
        let bit = 1u64 << (chunk % 64);
        self.words[(chunk / 64) as usize].fetch_and(!bit, Ordering::SeqCst) & bit != 0
    }

    /// Guest side: clears the bits of every chunk bytes `[offset, offset+len)`
    /// touch.
    pub fn clear_range(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_size {
            return;
        }
        let end = offset.saturating_add(len).min(self.disk_size);
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        for w in first / 64..=last / 64 {
            let lo = if w == first / 64 { first % 64 } else { 0 };
            let hi = if w == last / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let word = &self.words[w as usize];
            if word.load(Ordering::SeqCst) & mask != 0 {
                word.fetch_and(!mask, Ordering::SeqCst);
            }
        }
    }

    /// Mirror side, after the chunk's data was written to the target: clears
    /// the chunk in `dirty`, then, if a guest write raced the copy (the
    /// in-flight bit is gone), sets it again. Returns true if the chunk is
    /// now clean. Clearing before the check is what makes every interleaving
    /// with a guest write's "clear in-flight, then set dirty" end dirty.
    pub fn finish_copy(&self, chunk: u64, dirty: &DirtyBitmap) -> bool {
        dirty.reset_chunks(chunk, chunk);
        if self.test_and_clear(chunk) {
            true
        } else {
            dirty.set_chunks(chunk, chunk);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_write_during_copy_keeps_chunk_dirty() {
        let dirty = DirtyBitmap::new(1 << 20, 65536, false).unwrap();
        let inflight = InFlightBitmap::new(1 << 20, 65536).unwrap();
        dirty.set_chunks(3, 3);
        // Copy without interference: clean afterwards.
        inflight.begin_copy(3);
        assert!(inflight.finish_copy(3, &dirty));
        assert!(!dirty.get_chunk(3));
        // A guest write completes during the copy (clear in-flight, set dirty).
        inflight.begin_copy(3);
        inflight.clear_range(3 * 65536 + 100, 10);
        dirty.set_range(3 * 65536 + 100, 10);
        assert!(!inflight.finish_copy(3, &dirty));
        assert!(dirty.get_chunk(3));
        // Its completion races the check: clear in-flight after the mirror's
        // test-and-clear, dirty set afterwards still wins.
        inflight.begin_copy(3);
        dirty.reset_chunks(3, 3);
        assert!(inflight.test_and_clear(3));
        inflight.clear_range(3 * 65536, 1);
        dirty.set_range(3 * 65536, 1);
        assert!(dirty.get_chunk(3));
    }

    #[test]
    fn clear_range_spans_words_and_clips() {
        let f = InFlightBitmap::new(1000 * 512, 512).unwrap();
        for c in 0..1000 {
            f.begin_copy(c);
        }
        f.clear_range(60 * 512, 10 * 512);
        assert!(f.is_set(59) && !f.is_set(60) && !f.is_set(69) && f.is_set(70));
        f.clear_range(999 * 512, 1 << 30);
        assert!(!f.is_set(999));
        f.begin_copy(5000); // past the end: ignored
        assert!(!f.is_set(5000));
    }
}

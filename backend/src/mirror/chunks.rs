//! The mirror's per-chunk bookkeeping, all lock-free on the guest's path:
//!
//! - [`ChunkBits`]: a bitmap of atomic words, with a count and "next set
//!   bit" search: the job's dirty bitmap (D) and in-flight bitmap (I). The
//!   words may live in the heap or in a memory-mapped sidecar (the
//!   persistent bitmap P, see `state_file.rs`).
//! - [`Stripes`]: counters of guest writes between their `before_write` and
//!   `after_write`, hashed per chunk, each with a "contended" flag that
//!   stays set until its writers have all left; write-blocking mode uses it
//!   to notice two guest writes that overlapped in time, whose order on the
//!   target may differ from their order on the source.
//! - [`RangeLock`]: chunk-range locks between the copier and write-blocking
//!   guest writes, so that neither writes the target while the other is
//!   between reading the source and writing the target for the same chunk.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

/// Where a [`ChunkBits`] keeps its words.
enum Words {
    Heap(Box<[AtomicU64]>),
    /// Words in a mapping owned elsewhere (the sidecar), valid for the
    /// lifetime of the `ChunkBits` (the owner keeps the mapping alive).
    Mapped(&'static [AtomicU64]),
}

/// One bit per chunk of the disk, as atomic 64-bit words (bit `c % 64` of
/// word `c / 64` is chunk `c`), plus a count of set bits that is exact once
/// writers are quiet.
pub struct ChunkBits {
    chunks: u64,
    words: Words,
    count: AtomicU64,
}

impl std::fmt::Debug for ChunkBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkBits")
            .field("chunks", &self.chunks)
            .field("set", &self.count())
            .finish()
    }
}

/// Number of words for `chunks` bits.
pub fn words_for(chunks: u64) -> usize {
    chunks.div_ceil(64).max(1) as usize
}

fn mask(lo: u64, hi: u64) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

impl ChunkBits {
    /// All clear, in the heap.
    pub fn new(chunks: u64) -> ChunkBits {
        ChunkBits {
            chunks,
            words: Words::Heap((0..words_for(chunks)).map(|_| AtomicU64::new(0)).collect()),
            count: AtomicU64::new(0),
        }
    }

    /// Over existing words (a mapped sidecar); the count is computed.
    pub(crate) fn over(chunks: u64, words: &'static [AtomicU64]) -> ChunkBits {
        let b = ChunkBits {
            chunks,
            words: Words::Mapped(words),
            count: AtomicU64::new(0),
        };
        b.recount();
        b
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.words {
            Words::Heap(w) => w,
            Words::Mapped(w) => w,
        }
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Set bits (exact when quiet).
    pub fn count(&self) -> u64 {
        let c = self.count.load(Ordering::Relaxed);
        if (c as i64) < 0 {
            0
        } else {
            c.min(self.chunks)
        }
    }

    /// Recomputes the count from the words (O(size)).
    pub fn recount(&self) -> u64 {
        let tail = self.chunks % 64;
        let n = self.chunks.div_ceil(64) as usize;
        let mut total = 0u64;
        for (i, w) in self.words().iter().enumerate().take(n) {
            let mut v = w.load(Ordering::Acquire);
            if i + 1 == n && tail != 0 {
                v &= (1u64 << tail) - 1;
            }
            total += u64::from(v.count_ones());
        }
        self.count.store(total, Ordering::Relaxed);
        total
    }

    fn for_words(&self, first: u64, last: u64, mut f: impl FnMut(&AtomicU64, u64)) {
        if self.chunks == 0 || first >= self.chunks {
            return;
        }
        let last = last.min(self.chunks - 1);
        if first > last {
            return;
        }
        let words = self.words();
        for w in first / 64..=last / 64 {
            let lo = if w == first / 64 { first % 64 } else { 0 };
            let hi = if w == last / 64 { last % 64 } else { 63 };
            f(&words[w as usize], mask(lo, hi));
        }
    }

    /// Sets chunks `first..=last`.
    pub fn set(&self, first: u64, last: u64) {
        self.for_words(first, last, |w, m| {
            if w.load(Ordering::Acquire) & m == m {
                return;
            }
            let old = w.fetch_or(m, Ordering::SeqCst);
            let new = m & !old;
            if new != 0 {
                self.count
                    .fetch_add(u64::from(new.count_ones()), Ordering::Relaxed);
            }
        });
    }

    /// Clears chunks `first..=last`.
    pub fn clear(&self, first: u64, last: u64) {
        self.for_words(first, last, |w, m| {
            if w.load(Ordering::Acquire) & m == 0 {
                return;
            }
            let old = w.fetch_and(!m, Ordering::SeqCst);
            let gone = old & m;
            if gone != 0 {
                self.count
                    .fetch_sub(u64::from(gone.count_ones()), Ordering::Relaxed);
            }
        });
    }

    /// Clears chunk `c` and returns whether it was set.
    pub fn test_and_clear(&self, c: u64) -> bool {
        if c >= self.chunks {
            return false;
        }
        let bit = 1u64 << (c % 64);
        let old = self.words()[(c / 64) as usize].fetch_and(!bit, Ordering::SeqCst);
        if old & bit != 0 {
            self.count.fetch_sub(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Whether chunk `c` is set.
    pub fn get(&self, c: u64) -> bool {
        c < self.chunks
            && self.words()[(c / 64) as usize].load(Ordering::SeqCst) & (1 << (c % 64)) != 0
    }

    /// Whether any of chunks `first..=last` is set.
    pub fn any(&self, first: u64, last: u64) -> bool {
        let mut found = false;
        self.for_words(first, last, |w, m| {
            found |= w.load(Ordering::SeqCst) & m != 0
        });
        found
    }

    /// The first set chunk at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.chunks {
            return None;
        }
        let words = self.words();
        let mut w = (from / 64) as usize;
        let mut v = words[w].load(Ordering::Acquire) & (u64::MAX << (from % 64));
        loop {
            if v != 0 {
                let c = w as u64 * 64 + u64::from(v.trailing_zeros());
                return (c < self.chunks).then_some(c);
            }
            w += 1;
            if w >= words.len() {
                return None;
            }
            v = words[w].load(Ordering::Acquire);
        }
    }

    /// Sets every chunk.
    pub fn set_all(&self) {
        if self.chunks > 0 {
            self.set(0, self.chunks - 1);
        }
    }

    /// Copies every word of `other` (same size) into `self`; used for the
    /// sidecar checkpoint (P := D) while nothing else writes either.
    pub fn copy_from(&self, other: &ChunkBits) {
        for (dst, src) in self.words().iter().zip(other.words()) {
            dst.store(src.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        self.recount();
    }

    /// ORs every word of `other` (same size) into `self`.
    pub fn or_from(&self, other: &ChunkBits) {
        for (dst, src) in self.words().iter().zip(other.words()) {
            let v = src.load(Ordering::SeqCst);
            if v != 0 {
                dst.fetch_or(v, Ordering::SeqCst);
            }
        }
        self.recount();
    }
}

/// Number of [`Stripes`] slots: a power of two, so that a chunk maps with a
/// mask; collisions only make write-blocking more cautious.
const STRIPES: usize = 4096;

/// Bit of a stripe word that says "contended"; the bits below count writers.
const CONTENDED: u32 = 1 << 31;

/// Guest writes in progress, per chunk, hashed into a fixed set of slots.
///
/// Each slot is one atomic word: the number of writes between their
/// `before_write` and `after_write`, and a *contended* bit, set when a write
/// enters a slot that already has writers and cleared only when the count
/// returns to zero. So from the moment two writes overlap in time on a chunk
/// until both have left, every look at the slot says "contended", whichever
/// of them looks and whenever: a writer that is alone by the time it looks
/// still learns that another write overlapped it (issue 9, defect 2).
pub struct Stripes {
    slots: Box<[AtomicU32]>,
}

impl std::fmt::Debug for Stripes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stripes")
    }
}

impl Default for Stripes {
    fn default() -> Self {
        Stripes {
            slots: (0..STRIPES).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

impl Stripes {
    fn slot(&self, c: u64) -> &AtomicU32 {
        &self.slots[(c as usize) & (STRIPES - 1)]
    }

    /// Distinct slots of chunks `first..=last` (a range longer than the
    /// table touches every slot once).
    fn each(&self, first: u64, last: u64, mut f: impl FnMut(&AtomicU32)) {
        let n = (last - first + 1).min(STRIPES as u64);
        for c in first..first + n {
            f(self.slot(c));
        }
    }

    /// A guest write into chunks `first..=last` begins.
    pub fn enter(&self, first: u64, last: u64) {
        self.each(first, last, |s| {
            let _ = s.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                let count = v & !CONTENDED;
                // Saturate rather than spill into the flag (never reached:
                // one write per request in flight).
                let count = (count + 1).min(CONTENDED - 1);
                let contended = if count > 1 { CONTENDED } else { v & CONTENDED };
                Some(count | contended)
            });
        });
    }

    /// That write ends.
    pub fn leave(&self, first: u64, last: u64) {
        self.each(first, last, |s| {
            let _ = s.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                // Never wrap below zero, whatever a caller did.
                match (v & !CONTENDED).checked_sub(1)? {
                    0 => Some(0),
                    n => Some(n | (v & CONTENDED)),
                }
            });
        });
    }

    /// Guest writes in progress that may touch chunk `c`.
    pub fn writers(&self, c: u64) -> u32 {
        self.slot(c).load(Ordering::SeqCst) & !CONTENDED
    }

    /// Whether two guest writes that may touch chunk `c` have overlapped in
    /// time since its slot was last free of writers.
    pub fn contended(&self, c: u64) -> bool {
        self.slot(c).load(Ordering::SeqCst) & CONTENDED != 0
    }
}

/// Locks on ranges of chunks. Held only around a target write (guest side)
/// or a chunk copy (copier side), never across a guest's source write, so a
/// failed request can never leave one behind.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

impl std::fmt::Debug for RangeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RangeLock")
    }
}

/// A held range; dropping it releases the range.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    /// Waits until no held range overlaps `first..=last`, then holds it.
    pub fn lock(&self, first: u64, last: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while held.iter().any(|&(a, b)| a <= last && first <= b) {
            held = self.freed.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        held.push((first, last));
        RangeGuard {
            lock: self,
            range: (first, last),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        self.lock.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn set_clear_count_and_search() {
        let b = ChunkBits::new(200);
        assert_eq!(b.next_set(0), None);
        b.set(3, 70);
        assert_eq!(b.count(), 68);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(71), None);
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
        let c = ChunkBits::new(200);
        c.copy_from(&b);
        assert_eq!(c.count(), 200);
        assert!(!b.get(200) && b.get(199));
    }

    #[test]
    fn range_lock_excludes_overlaps_only() {
        let l = Arc::new(RangeLock::default());
        let g = l.lock(10, 20);
        let _other = l.lock(21, 30); // disjoint: no wait
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            let _g = l2.lock(15, 16);
            std::time::Instant::now()
        });
        std::thread::sleep(std::time::Duration::from_millis(30));
        let released = std::time::Instant::now();
        drop(g);
        assert!(t.join().unwrap() >= released);
    }

    #[test]
    fn stripes_count_and_never_underflow() {
        let s = Stripes::default();
        s.enter(5, 6);
        s.enter(5, 5);
        assert_eq!(s.writers(5), 2);
        assert_eq!(s.writers(6), 1);
        assert_eq!(s.writers(5 + 4096), 2, "hashed");
        s.leave(5, 6);
        s.leave(5, 5);
        s.leave(5, 5);
        assert_eq!(s.writers(5), 0);
        s.enter(0, 100_000);
        assert_eq!(s.writers(77), 1);
        s.leave(0, 100_000);
        assert_eq!(s.writers(77), 0);
    }

    #[test]
    fn contention_outlives_the_other_writer_until_the_slot_is_free() {
        let s = Stripes::default();
        s.enter(3, 3);
        assert!(!s.contended(3), "one writer alone");
        s.leave(3, 3);
        s.enter(3, 3);
        assert!(!s.contended(3), "writes one after the other");
        s.enter(3, 4);
        assert!(s.contended(3) && !s.contended(4));
        s.leave(3, 4);
        assert_eq!(s.writers(3), 1);
        assert!(
            s.contended(3),
            "the first writer, now alone, was overlapped"
        );
        s.enter(3 + 4096, 3 + 4096);
        s.leave(3 + 4096, 3 + 4096);
        assert!(s.contended(3), "still the first writer's overlap");
        s.leave(3, 3);
        assert!(!s.contended(3) && s.writers(3) == 0);
        s.leave(3, 3);
        assert!(!s.contended(3) && s.writers(3) == 0, "no underflow");
    }
}

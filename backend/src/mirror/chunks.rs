//! The mirror's per-chunk bookkeeping, all lock-free on the guest's path:
//!
//! - the job's dirty bitmap (D), in-flight bitmap (I) and persistent bitmap
//!   P (memory-mapped, see `state_file.rs`) are the crate's
//!   [`crate::bits::AtomicBits`];
//! - [`Stripes`]: counters of guest writes between their `before_write` and
//!   `after_write`, hashed per chunk, each with a "contended" flag that
//!   stays set until its writers have all left; write-blocking mode uses it
//!   to notice two guest writes that overlapped in time, whose order on the
//!   target may differ from their order on the source.
//! - [`RangeLock`]: chunk-range locks between the copier and write-blocking
//!   guest writes, so that neither writes the target while the other is
//!   between reading the source and writing the target for the same chunk.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};

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

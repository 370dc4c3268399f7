//! The mirror's view of guest writes: [`MirrorState`] (everything the copier
//! and the guest's threads share) and [`MirrorHook`], the disk write hook.
//!
//! # The race the hook closes (background mode)
//!
//! The copier copies chunk c as: set I[c]; read the source; write the
//! target; then "finish": clear D[c], test-and-clear I[c], and if I[c] was
//! already clear set D[c] again. A guest write marks (D set, I clear) both
//! *before* its data is issued and again *after* it landed.
//!
//! Marking only before the write (the design sketch) loses writes: the copier
//! may set I[c] after the guest's mark, read the source before the guest's
//! data lands, find I[c] still set and clear D[c]; the target then misses
//! the write for good. With the second mark after the data landed, any guest
//! write whose data the copier's read missed landed after that read, hence
//! after I[c] was set, so its after-mark either clears I[c] before the
//! copier's test-and-clear (the copier then re-dirties c) or sets D[c] after
//! the copier cleared it. Either way c stays dirty. (Testing I before
//! clearing D, as "if in-flight still set clear dirty" reads literally, has
//! its own window between the test and the clear; finish clears D first.)
//!
//! # Write-blocking mode
//!
//! The hook writes every guest write (and write-zeroes) to the target before
//! the request completes, holding the chunk range lock so it cannot interleave
//! with a chunk copy. The target write runs on the mirror's write-through
//! threads, and the request waits for it without holding its queue thread
//! (`through.rs`). A chunk that was clean stays clean; a chunk the write
//! covers completely becomes clean; one that is dirty, or *contended*, is
//! left for the copier. Discards are only marked: whether a discarded range
//! reads as zeroes depends on the storage. A target error never fails the
//! guest request (QEMU's behaviour too): the range is marked dirty and the
//! job applies `on-target-error`.
//!
//! Why "contended" and not "another writer is here now" (issue 9, defect
//! 2): the target receives the writes of a chunk in range-lock order, the
//! source in the order they landed, and two writes that overlap in time may
//! take the two orders differently: A (whole chunk) lands, B (inside it)
//! lands, B writes the target, then A does; the target holds A, the source
//! A+B, and when A decides, B has already left. So each chunk's stripe
//! keeps a flag, set when a write enters while another is in, cleared only
//! when the stripe is empty again ([`Stripes`]). Each decision falls between
//! its own write's entry and exit; of two overlapping writes, the one that
//! entered second sees the flag it set, and the first, if it decides after
//! the second's decision, decides after the second entered and before
//! itself left, so it sees the flag too. Decisions are ordered by the range
//! lock, so the last of them marks the chunk dirty, and the copier copies
//! it after both have landed. A write that overlapped no other one is
//! ordered alike on both sides: every earlier write of the chunk landed and
//! reached the target before it entered. Hashing only adds false contention
//! (a chunk marked dirty once more).
//!
//! The copier holds the same range lock from before its source read until
//! after it finished the chunks, so a write-through falls wholly before a
//! copy (the write landed before the copy's read, which carries it) or after
//! it (the copy may have missed the write's data, and the write then puts it
//! on the target after the copy). So a write that reaches the target needs
//! no I bit, and only the order among writes matters, as above. A write that does not
//! (a discard, a suspended write-through, a failed write) is marked after
//! it landed, which is the background rule above and needs no mark before.
//! The switch from background to write-blocking only adds target writes. The
//! test `backend/tests/mirror_interleave.rs` runs every order of two
//! overlapping writes and one copy, in every mode and across the switch.
//!
//! Guest writes also set the persistent bitmap P before the data is issued
//! (see `state_file.rs`).

use super::chunks::{RangeLock, Stripes};
use super::state_file::StateFile;
use super::through::{Payload, WriteThrough};
use super::{image_errno, CopyMode};
use crate::bits::AtomicBits;
use crate::disk::{block_on, Disk, DiskError, HookWork, WriteHook, WriteOp};
use crate::image::{Image, ImageError};
use crate::iobuf::{total_len, IoBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// State shared by the mirror job, its copier threads and the write hook.
pub struct MirrorState {
    /// The mirrored disk.
    pub disk: Arc<Disk>,
    /// The target image.
    pub target: Arc<dyn Image>,
    /// Disk size in bytes.
    pub size: u64,
    /// log2 of the granularity.
    pub shift: u32,
    /// D: chunks the target may lack.
    pub dirty: AtomicBits,
    /// I: chunks whose copy is in flight and not yet raced by a guest write.
    pub inflight: AtomicBits,
    /// P: the persistent superset of D (absent on a read-only disk).
    pub persist: Option<Arc<StateFile>>,
    /// Guest writes between before_write and after_write, per chunk.
    pub stripes: Stripes,
    /// Range locks between chunk copies and write-blocking guest writes.
    pub ranges: RangeLock,
    write_blocking: AtomicBool,
    /// Set on a write-blocking target error until the job has handled it;
    /// meanwhile guest writes are only marked.
    wb_suspended: AtomicBool,
    /// errno of the first unhandled write-blocking target error (0: none).
    wb_errno: AtomicI32,
    /// Write-blocking and in sync since READY (QEMU 8.2's `actively-synced`).
    pub actively_synced: AtomicBool,
    /// Guest writes seen (for tests and statistics).
    pub guest_writes: AtomicU64,
    /// Guest bytes written to the target directly (write-blocking).
    pub active_bytes: AtomicU64,
    /// The copier is idle waiting for dirty chunks (see [`MirrorState::wait_for_work`]).
    sleeping: AtomicBool,
    work_lock: Mutex<()>,
    work_cv: Condvar,
    /// Write-blocking writes to the target, off the guest's thread.
    through: WriteThrough,
}

impl std::fmt::Debug for MirrorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorState")
            .field("target", &self.target.path())
            .field("granularity", &self.granularity())
            .field("dirty", &self.dirty.count())
            .finish()
    }
}

impl MirrorState {
    /// New state for `disk` -> `target` at `granularity` (a power of two).
    /// A write-blocking guest write waits for the target at most
    /// `target_timeout` (`None`: as long as the target takes; see
    /// `through.rs`). Fails if the write-through threads cannot start.
    pub fn new(
        disk: Arc<Disk>,
        target: Arc<dyn Image>,
        granularity: u64,
        persist: Option<Arc<StateFile>>,
        (copy_mode, target_timeout): (CopyMode, Option<Duration>),
    ) -> std::io::Result<MirrorState> {
        let size = disk.size();
        let chunks = size.div_ceil(granularity);
        Ok(MirrorState {
            disk,
            target,
            size,
            shift: granularity.trailing_zeros(),
            dirty: AtomicBits::new(chunks, false),
            inflight: AtomicBits::new(chunks, false),
            persist,
            stripes: Stripes::default(),
            ranges: RangeLock::default(),
            write_blocking: AtomicBool::new(copy_mode == CopyMode::WriteBlocking),
            wb_suspended: AtomicBool::new(false),
            wb_errno: AtomicI32::new(0),
            actively_synced: AtomicBool::new(false),
            guest_writes: AtomicU64::new(0),
            active_bytes: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            work_lock: Mutex::new(()),
            work_cv: Condvar::new(),
            through: WriteThrough::new(target_timeout)?,
        })
    }

    /// Bytes per chunk.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.dirty.len()
    }

    /// Byte range of chunks `first..=last`, clipped to the disk.
    pub fn byte_range(&self, first: u64, last: u64) -> (u64, u64) {
        let start = first << self.shift;
        let end = ((last + 1) << self.shift).min(self.size);
        (start, end - start)
    }

    /// Chunks touched by bytes `[offset, offset+len)`, clipped.
    pub fn chunk_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset >> self.shift, (end - 1) >> self.shift))
    }

    /// Dirty bytes (the last chunk counted by its real length).
    pub fn dirty_bytes(&self) -> u64 {
        let n = self.dirty.count();
        let g = self.granularity();
        let mut bytes = n * g;
        let tail = self.size % g;
        if tail != 0 && n > 0 && self.dirty.get(self.chunks() - 1) {
            bytes -= g - tail;
        }
        bytes
    }

    /// The current copy mode.
    pub fn copy_mode(&self) -> CopyMode {
        if self.write_blocking.load(Ordering::SeqCst) {
            CopyMode::WriteBlocking
        } else {
            CopyMode::Background
        }
    }

    /// Switches background -> write-blocking (the only change QEMU offers).
    pub fn set_write_blocking(&self) {
        self.write_blocking.store(true, Ordering::SeqCst);
    }

    /// Takes the errno of an unhandled write-blocking target error.
    pub fn take_wb_error(&self) -> Option<i32> {
        match self.wb_errno.swap(0, Ordering::SeqCst) {
            0 => None,
            e => Some(e),
        }
    }

    /// Job side, in write-blocking mode with nothing dirty: the target is in
    /// sync. Unless a write-through error is pending: its path raises the
    /// suspension before it clears the flag, so whichever of the two
    /// stores the flag last, it ends false (the job may have seen nothing
    /// dirty just before the failed write marked its chunks).
    pub fn set_actively_synced(&self) {
        self.actively_synced.store(true, Ordering::SeqCst);
        if self.wb_suspended.load(Ordering::SeqCst) {
            self.actively_synced.store(false, Ordering::SeqCst);
        }
    }

    /// Lets write-blocking writes reach the target again after an error
    /// was handled (resume or ignore).
    pub fn clear_wb_suspension(&self) {
        // A write-through already under way when the first one failed may
        // have failed too: that belongs to the error just handled (its
        // chunks are dirty, and the copier reports its own errors), and
        // must not stop the job again right after a resume.
        self.wb_errno.store(0, Ordering::SeqCst);
        self.wb_suspended.store(false, Ordering::SeqCst);
    }

    /// Copier side after a successful chunk copy: clears D, then if a guest
    /// write raced the copy (I already clear) sets D again. True if clean.
    pub fn finish_copy(&self, c: u64) -> bool {
        self.dirty.clear(c, c);
        if self.inflight.test_and_clear(c) {
            true
        } else {
            self.dirty.set(c, c);
            false
        }
    }

    /// The checkpoint of the persistent bitmap: P := D. Only correct while
    /// guest I/O is paused at the gate and no chunk copy is in flight.
    pub fn checkpoint(&self) {
        if let Some(p) = &self.persist {
            p.bits().copy_from(&self.dirty);
            p.sync();
        }
    }

    fn mark(&self, first: u64, last: u64) {
        self.inflight.clear(first, last);
        self.dirty.set(first, last);
    }

    /// Wakes an idle copier (cheap unless it is actually waiting).
    fn wake_copier(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let _g = self.work_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.sleeping.store(false, Ordering::SeqCst);
            self.work_cv.notify_all();
        }
    }

    /// Copier side: waits up to `timeout` for a chunk to become dirty
    /// (returns at once if one is). A guest write that dirties a chunk wakes
    /// it: the target falls behind by one write, not by a polling interval.
    pub fn wait_for_work(&self, timeout: Duration) {
        let g = self.work_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.sleeping.store(true, Ordering::SeqCst);
        if self.dirty.count() == 0 {
            let _ = self.work_cv.wait_timeout(g, timeout);
        }
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// A guest write's end: it leaves its chunks' stripes, and a copy of
    /// them is useful now that its data has landed.
    pub(super) fn leave(&self, (first, last): (u64, u64)) {
        self.stripes.leave(first, last);
        self.wake_copier();
    }

    /// After a write-through's target write, under its chunks' range lock
    /// and with the guest's write still in its stripe: which of `chunks`
    /// are now clean, or the target's error.
    pub(super) fn decide_write_through(
        &self,
        offset: u64,
        len: u64,
        (first, last): (u64, u64),
        result: Result<(), ImageError>,
    ) {
        match result {
            Ok(()) => {
                self.active_bytes.fetch_add(len, Ordering::Relaxed);
                for c in first..=last {
                    let (cs, cl) = self.byte_range(c, c);
                    let covered = offset <= cs && cs + cl <= offset + len;
                    if self.stripes.contended(c) {
                        // Another guest write overlapped this one in time
                        // on this chunk (it may have finished already): the
                        // two may have reached source and target in
                        // different orders.
                        self.dirty.set(c, c);
                    } else if covered {
                        self.dirty.clear(c, c);
                    }
                }
            }
            Err(e) => {
                log::warn!("mirror: write-blocking target write failed: {e}");
                self.write_through_failed((first, last), image_errno(&e));
            }
        }
    }

    /// A write-through did not reach the target (`errno`): its chunks are
    /// dirty, write-blocking is suspended until the job handled the error.
    pub(super) fn write_through_failed(&self, (first, last): (u64, u64), errno: i32) {
        self.mark(first, last);
        self.wb_suspended.store(true, Ordering::SeqCst);
        let _ = self
            .wb_errno
            .compare_exchange(0, errno, Ordering::SeqCst, Ordering::SeqCst);
        // Last, after the suspension (see `set_actively_synced`).
        self.actively_synced.store(false, Ordering::SeqCst);
    }
}

/// A guest write's data, copied out of its buffers.
fn gather(bufs: &[IoBuf<'_>]) -> Vec<u8> {
    let mut data = Vec::with_capacity(total_len(bufs) as usize);
    for b in bufs {
        // SAFETY: an IoBuf is valid for reads of its length while it
        // lives, and it lives for this call.
        data.extend_from_slice(unsafe { std::slice::from_raw_parts(b.ptr(), b.len()) });
    }
    data
}

/// The write hook of one mirror job.
pub struct MirrorHook {
    state: Arc<MirrorState>,
}

impl MirrorHook {
    /// A hook over `state`.
    pub fn new(state: Arc<MirrorState>) -> MirrorHook {
        MirrorHook { state }
    }
}

impl WriteHook for MirrorHook {
    fn before_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let s = &*self.state;
        let Some((first, last)) = s.chunk_range(offset, len) else {
            return Ok(());
        };
        // Persistent first: recoverable before the data is issued.
        if let Some(p) = &s.persist {
            p.bits().set(first, last);
        }
        s.stripes.enter(first, last);
        if !s.write_blocking.load(Ordering::SeqCst) {
            s.mark(first, last);
        }
        Ok(())
    }

    fn after_write(&self, offset: u64, len: u64, op: WriteOp<'_>) -> Result<(), DiskError> {
        match self.after_write_nowait(offset, len, op)? {
            Some(work) => block_on(work),
            None => Ok(()),
        }
    }

    fn after_write_nowait(
        &self,
        offset: u64,
        len: u64,
        op: WriteOp<'_>,
    ) -> Result<Option<Box<dyn HookWork>>, DiskError> {
        let s = &self.state;
        let Some(chunks) = s.chunk_range(offset, len) else {
            return Ok(None);
        };
        s.guest_writes.fetch_add(1, Ordering::Relaxed);
        let through =
            s.write_blocking.load(Ordering::SeqCst) && !s.wb_suspended.load(Ordering::SeqCst);
        let payload = match op {
            WriteOp::Data(bufs) if through => Some(Payload::Data(gather(bufs))),
            WriteOp::Zeroes { unmap } if through => Some(Payload::Zeroes { unmap }),
            // Discards are only marked (see the module's notes).
            _ => None,
        };
        let Some(payload) = payload else {
            s.mark(chunks.0, chunks.1);
            s.leave(chunks);
            return Ok(None);
        };
        let len = len.min(s.size - offset);
        let wait = s.through.start(s, offset, len, chunks, payload);
        Ok(Some(Box::new(wait)))
    }

    /// Write-blocking writes wait for the target (off the queue thread).
    fn may_block(&self) -> bool {
        true
    }

    fn write_failed(&self, offset: u64, len: u64) {
        let s = &*self.state;
        let Some((first, last)) = s.chunk_range(offset, len) else {
            return;
        };
        // The source may hold part of the write: the target needs these
        // chunks again, whatever the copy mode.
        s.mark(first, last);
        s.leave((first, last));
    }
}

/// Before a mirror is resumed after a restart: keeps marking the persistent
/// bitmap, so that guest writes between the restart and the resume command
/// are not missed.
pub struct ResumeTracker {
    state: Arc<StateFile>,
    size: u64,
    shift: u32,
}

impl ResumeTracker {
    /// Tracks into `state`'s persistent bitmap.
    pub fn new(state: Arc<StateFile>) -> ResumeTracker {
        let size = state.header().disk_size;
        let shift = state.header().granularity.trailing_zeros();
        ResumeTracker { state, size, shift }
    }
}

impl WriteHook for ResumeTracker {
    fn before_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if len > 0 && offset < self.size {
            let end = offset.saturating_add(len).min(self.size);
            self.state
                .bits()
                .set(offset >> self.shift, (end - 1) >> self.shift);
        }
        Ok(())
    }
}

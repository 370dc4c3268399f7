//! [`CopyBeforeWrite`]: the filter in the guest's write path that keeps a
//! point-in-time view of the disk (QEMU 7.2's `copy-before-write`).
//!
//! Before a guest write, write-zeroes or discard lands on a range, the old
//! data of every cluster of it that is still only on the source is read
//! and written to the target, and the cluster is marked copied. From then
//! on the snapshot reads that cluster from the target; clusters never
//! written since the filter was inserted are read from the source.
//!
//! Ranges of clusters are locked while they are copied or read from the
//! source: a guest write waits for a snapshot read of its clusters (so
//! the read sees the old data), two writes on one cluster copy it once
//! (the second finds it copied once the first releases it), and no write
//! lands before its clusters' copies are on the target. A lock is a range
//! in a short list under a mutex held only to check and insert; nobody
//! holds the mutex during I/O or holds one range while waiting for another.
//!
//! A guest write's copy never runs on the queue thread: it is handed to a
//! small pool of copier threads per filter. The synchronous path
//! (`before_write`, `--aio sync`) waits for it; an engine that must not
//! block (`before_write_nowait`, the io_uring engine) parks the write and
//! is woken when the copy is done, serving its other requests meanwhile.
//! Either way the wait ends at `cbw-timeout`, and `on-cbw-error` applies
//! then even if the copy's I/O never answers (an abandoned copy goes on in
//! its thread, with its own buffer, holding its clusters until it ends).

use crate::dirty::DirtyBitmap;
use crate::disk::HookWork;
use crate::disk::{DiskError, WriteHook};
use crate::image::{Image, ImageError};
use crate::iobuf::IoBuf;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// QEMU's default copy-before-write cluster size.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;
/// Largest piece copied with one buffer: bounds the memory of one copy.
const COPY_PIECE: u64 = 1 << 20;
/// Copier threads per filter: copies of different clusters overlap, and
/// a copy stuck in a hung target does not hold up all the others.
const COPIERS: usize = 4;
/// How long an idle copier thread stays for the next copy.
const COPIER_IDLE: Duration = Duration::from_secs(5);

/// QEMU's `OnCbwError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCbwError {
    /// The guest write fails (EIO); the snapshot stays valid.
    #[default]
    BreakGuestWrite,
    /// The guest write goes on; every later snapshot read fails.
    BreakSnapshot,
}

/// How a filter is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CbwOptions {
    /// Copy granularity in bytes (a power of two).
    pub cluster: u64,
    /// What a failed copy does.
    pub on_error: OnCbwError,
    /// `cbw-timeout`: how long a write waits for a cluster (None: forever).
    pub timeout: Option<Duration>,
}

impl Default for CbwOptions {
    fn default() -> Self {
        CbwOptions {
            cluster: DEFAULT_CLUSTER,
            on_error: OnCbwError::BreakGuestWrite,
            timeout: None,
        }
    }
}

/// Why a snapshot read or status query failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The range is not part of the snapshot (discarded, or outside the
    /// filter's `bitmap`): QEMU's EACCES.
    #[error("Permission denied")]
    Access,
    /// A copy failed under `break-snapshot`, or the filter was removed:
    /// the view is no longer the point-in-time image.
    #[error("the snapshot is invalid: {0}")]
    Invalid(String),
    /// The range is not inside the snapshot.
    #[error("Invalid argument")]
    OutOfRange,
    /// Reading the source or the target failed.
    #[error(transparent)]
    Image(#[from] ImageError),
}

impl SnapshotError {
    /// The errno a client sees.
    pub fn errno(&self) -> i32 {
        match self {
            SnapshotError::Access => libc::EACCES,
            SnapshotError::OutOfRange => libc::EINVAL,
            SnapshotError::Invalid(_) | SnapshotError::Image(_) => libc::EIO,
        }
    }
}

/// A copy that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyError {
    /// The OS error number.
    pub errno: i32,
    /// Reading the source failed (else writing the target, or waiting).
    pub on_source: bool,
    /// What failed.
    pub message: String,
}

/// The copy-before-write state of one filter (see the module docs).
pub struct CopyBeforeWrite {
    source: Arc<dyn Image>,
    target: Arc<dyn Image>,
    size: u64,
    opts: CbwOptions,
    /// Set: the cluster's point-in-time data is still only on the source.
    to_copy: DirtyBitmap,
    /// Set: the cluster is part of the snapshot.
    access: DirtyBitmap,
    /// Locked cluster ranges `[first, end)`.
    locks: Mutex<Vec<(u64, u64)>>,
    unlocked: Condvar,
    waiting: AtomicU64,
    copied: AtomicU64,
    /// Told the bytes of each copy (the job's progress).
    on_copy: Mutex<Option<ProgressFn>>,
    /// errno of the copy that broke the snapshot (0: none).
    broken: AtomicI32,
    detached: AtomicBool,
    /// The filter itself, for the copier threads and parked writes.
    me: Weak<CopyBeforeWrite>,
    copiers: Arc<Copiers>,
}

/// The copies guest writes wait for, and the threads that run them.
#[derive(Default)]
struct Copiers {
    queue: Mutex<CopierQueue>,
    work: Condvar,
}

#[derive(Default)]
struct CopierQueue {
    jobs: VecDeque<Arc<CopyJob>>,
    threads: usize,
    idle: usize,
}

/// One guest write's copy of clusters `[first, last]`.
struct CopyJob {
    first: u64,
    last: u64,
    /// `cbw-timeout` from the write's start.
    deadline: Option<Instant>,
    state: Mutex<JobState>,
    done: Condvar,
}

#[derive(Default)]
struct JobState {
    result: Option<Result<(), CopyError>>,
    waker: Option<Waker>,
}

fn timed_out() -> CopyError {
    CopyError {
        errno: libc::ETIMEDOUT,
        on_source: false,
        message: "copy-before-write timed out".into(),
    }
}

impl CopyJob {
    fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self, r: Result<(), CopyError>) {
        let mut st = self.state();
        st.result = Some(r);
        let waker = st.waker.take();
        drop(st);
        self.done.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The copy's result, or the time-out once the deadline has passed;
    /// `None` (and `waker` kept) while neither.
    fn poll(&self, waker: Option<&Waker>) -> Option<Result<(), CopyError>> {
        let mut st = self.state();
        if let Some(r) = st.result.take() {
            return Some(r);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(Err(timed_out()));
        }
        if let Some(w) = waker {
            if !st.waker.as_ref().is_some_and(|old| old.will_wake(w)) {
                st.waker = Some(w.clone());
            }
        }
        None
    }

    /// Blocks until `poll` has an answer.
    fn wait(&self) -> Result<(), CopyError> {
        let mut st = self.state();
        loop {
            if let Some(r) = st.result.take() {
                return r;
            }
            st = match self.deadline {
                None => self.done.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(timed_out());
                    }
                    self.done
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

impl Copiers {
    fn queue(&self) -> MutexGuard<'_, CopierQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`, starting a thread if none is idle for it.
    fn submit(self: &Arc<Self>, cbw: Weak<CopyBeforeWrite>, job: Arc<CopyJob>) {
        let mut q = self.queue();
        q.jobs.push_back(job);
        if q.idle >= q.jobs.len() || q.threads >= COPIERS {
            drop(q);
            self.work.notify_one();
            return;
        }
        q.threads += 1;
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vubd-cbw".into())
            .spawn(move || {
                crate::thread_kind::started(crate::thread_kind::ThreadKind::Job);
                me.run(cbw)
            });
        if let Err(e) = spawned {
            q.threads -= 1;
            if q.threads == 0 {
                let msg = format!("cannot start a copy-before-write thread: {e}");
                for job in q.jobs.drain(..) {
                    job.finish(Err(CopyError {
                        errno: libc::EAGAIN,
                        on_source: false,
                        message: msg.clone(),
                    }));
                }
            }
        }
    }

    /// A copier thread: runs queued copies, ends after `COPIER_IDLE`
    /// without one or once the filter is gone.
    fn run(&self, cbw: Weak<CopyBeforeWrite>) {
        let mut q = self.queue();
        loop {
            let Some(job) = q.jobs.pop_front() else {
                q.idle += 1;
                let (next, wait) = self
                    .work
                    .wait_timeout(q, COPIER_IDLE)
                    .unwrap_or_else(|p| p.into_inner());
                q = next;
                q.idle -= 1;
                if wait.timed_out() && q.jobs.is_empty() {
                    break;
                }
                continue;
            };
            drop(q);
            let r = match cbw.upgrade() {
                Some(cbw) => cbw.copy_until(job.first, job.last, job.deadline),
                None => Err(CopyError {
                    errno: libc::EIO,
                    on_source: false,
                    message: "the copy-before-write filter is gone".into(),
                }),
            };
            job.finish(r);
            q = self.queue();
        }
        q.threads -= 1;
    }
}

/// A guest write parked on its copy (`before_write_nowait`).
struct CopyWait {
    cbw: Arc<CopyBeforeWrite>,
    job: Arc<CopyJob>,
}

impl HookWork for CopyWait {
    fn poll(&mut self, waker: &Waker) -> Poll<Result<(), DiskError>> {
        match self.job.poll(Some(waker)) {
            Some(r) => Poll::Ready(self.cbw.policy(r)),
            None => Poll::Pending,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.job.deadline
    }
}

impl std::fmt::Debug for CopyBeforeWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyBeforeWrite")
            .field("source", &self.source.path())
            .field("target", &self.target.path())
            .field("opts", &self.opts)
            .finish()
    }
}

/// Where the bytes of each copy are reported.
pub type ProgressFn = Box<dyn Fn(u64) + Send + Sync>;

/// A held cluster range; dropping it wakes the waiters.
struct RangeLock<'a> {
    cbw: &'a CopyBeforeWrite,
    range: (u64, u64),
}

impl Drop for RangeLock<'_> {
    fn drop(&mut self) {
        let mut locks = self.cbw.lock_list();
        if let Some(i) = locks.iter().position(|r| *r == self.range) {
            locks.swap_remove(i);
        }
        drop(locks);
        self.cbw.unlocked.notify_all();
    }
}

/// `bufs` from byte `start` for `len` bytes, as a new list.
fn sub_bufs<'a>(bufs: &[IoBuf<'a>], mut start: usize, mut len: usize) -> Vec<IoBuf<'a>> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        if start >= b.len() {
            start -= b.len();
            continue;
        }
        let piece = b.advance(start).truncate(len);
        start = 0;
        len -= piece.len();
        out.push(piece);
    }
    out
}

impl CopyBeforeWrite {
    /// A filter copying from `source` to `target` (same size); every
    /// cluster is part of the snapshot and still to copy, or only those
    /// set in `bitmap` (QEMU's `bitmap` option: its state now, at this
    /// instant; later changes to it do not matter).
    pub fn new(
        source: Arc<dyn Image>,
        target: Arc<dyn Image>,
        opts: CbwOptions,
        bitmap: Option<&DirtyBitmap>,
    ) -> Result<Arc<CopyBeforeWrite>, String> {
        let size = source.size();
        if target.size() != size {
            return Err("Source and target image have different sizes".into());
        }
        let make = || DirtyBitmap::new(size, opts.cluster, false).map_err(|e| e.to_string());
        let (to_copy, access) = (make()?, make()?);
        match bitmap {
            Some(b) => {
                to_copy.merge_from(b);
                access.merge_from(b);
            }
            None => {
                to_copy.set_range(0, size);
                access.set_range(0, size);
            }
        }
        Ok(Arc::new_cyclic(|me| CopyBeforeWrite {
            source,
            target,
            size,
            opts,
            to_copy,
            access,
            locks: Mutex::new(Vec::new()),
            unlocked: Condvar::new(),
            waiting: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            on_copy: Mutex::new(None),
            broken: AtomicI32::new(0),
            detached: AtomicBool::new(false),
            me: me.clone(),
            copiers: Arc::default(),
        }))
    }

    /// Narrows the snapshot and the copy to the clusters that touch a bit
    /// set in `bitmap` (a `sync: bitmap` backup's copy set, known only at
    /// its start instant). Call before the filter goes into the guest's path.
    pub fn limit_to(&self, bitmap: &DirtyBitmap) -> Result<(), String> {
        let keep =
            DirtyBitmap::new(self.size, self.opts.cluster, false).map_err(|e| e.to_string())?;
        keep.merge_from(bitmap);
        let n = self.clusters();
        let mut c = 0;
        while c < n {
            let a = keep.next_clean(c);
            if a >= n {
                break;
            }
            let b = keep.next_dirty(a).unwrap_or(n).min(n);
            self.to_copy.reset_chunks(a, b - 1);
            self.access.reset_chunks(a, b - 1);
            c = b;
        }
        Ok(())
    }

    /// The clusters still to copy (a failed `bitmap-mode: always` backup
    /// puts them back into its bitmap).
    pub fn pending(&self) -> &DirtyBitmap {
        &self.to_copy
    }

    /// Size of the source (and of the snapshot).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image the guest writes to.
    pub fn source(&self) -> &Arc<dyn Image> {
        &self.source
    }

    /// The image the old data goes to.
    pub fn target(&self) -> &Arc<dyn Image> {
        &self.target
    }

    /// The options it was made with.
    pub fn options(&self) -> CbwOptions {
        self.opts
    }

    /// Bytes copied to the target so far (whole clusters).
    pub fn copied_bytes(&self) -> u64 {
        self.copied.load(Ordering::Relaxed) * self.opts.cluster
    }

    /// Requests waiting for a cluster range someone else holds now: lets a
    /// test see that a request is blocked without guessing a time.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Reports the bytes of every copy to `f` from now on (`None`: stop);
    /// QEMU's fleecing job counts them as its progress.
    pub fn set_progress(&self, f: Option<ProgressFn>) {
        *self.on_copy.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// The filter left the guest's path (its job ended): the snapshot
    /// reads fail from now on, since writes no longer copy.
    pub fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
    }

    fn lock_list(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks clusters `[first, end)` once no other holder overlaps them;
    /// `None` if `deadline` passed first.
    fn lock(&self, first: u64, end: u64, deadline: Option<Instant>) -> Option<RangeLock<'_>> {
        let mut locks = self.lock_list();
        loop {
            if !locks.iter().any(|&(a, b)| a < end && first < b) {
                locks.push((first, end));
                return Some(RangeLock {
                    cbw: self,
                    range: (first, end),
                });
            }
            self.waiting.fetch_add(1, Ordering::SeqCst);
            locks = match deadline {
                None => self.unlocked.wait(locks).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.waiting.fetch_sub(1, Ordering::SeqCst);
                        return None;
                    }
                    self.unlocked
                        .wait_timeout(locks, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn has_to_copy(&self, first: u64, last: u64) -> bool {
        self.to_copy.next_dirty(first).is_some_and(|c| c <= last)
    }

    /// Byte range of clusters `[a, b)`, clipped to the disk.
    fn bytes(&self, a: u64, b: u64) -> (u64, u64) {
        let start = a * self.opts.cluster;
        let end = (b * self.opts.cluster).min(self.size);
        (start, end - start)
    }

    /// Number of clusters.
    pub fn clusters(&self) -> u64 {
        self.size.div_ceil(self.opts.cluster)
    }

    /// Copies the clusters of `[first, last]` still to copy, under a lock:
    /// a guest write's copy-before-write, or a push backup's background
    /// copy (both copy each cluster once, whichever comes first).
    pub fn copy_clusters(&self, first: u64, last: u64) -> Result<(), CopyError> {
        self.copy_until(first, last, self.opts.timeout.map(|t| Instant::now() + t))
    }

    /// `copy_clusters`, waiting for the clusters until `deadline`.
    fn copy_until(
        &self,
        first: u64,
        last: u64,
        deadline: Option<Instant>,
    ) -> Result<(), CopyError> {
        let Some(_lock) = self.lock(first, last + 1, deadline) else {
            return Err(timed_out());
        };
        let piece_clusters = (COPY_PIECE / self.opts.cluster).max(1);
        let mut buf = Vec::new();
        let mut c = first;
        while let Some(a) = self.to_copy.next_dirty(c).filter(|&a| a <= last) {
            let b = self
                .to_copy
                .next_clean(a)
                .min(last + 1)
                .min(a + piece_clusters);
            let (offset, len) = self.bytes(a, b);
            let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
            buf.resize(len_usize, 0);
            let err = |on_source| {
                move |e: ImageError| CopyError {
                    errno: crate::mirror::image_errno(&e),
                    on_source,
                    message: e.to_string(),
                }
            };
            let io = err(false);
            self.source
                .read_at(&[IoBuf::from_slice(&mut buf)], offset)
                .map_err(err(true))?;
            if buf.iter().all(|&x| x == 0) {
                // Keeps the target sparse where the snapshot reads zeroes.
                self.target.write_zeroes(offset, len, true).map_err(io)?;
            } else {
                self.target
                    .write_at(&[IoBuf::from_slice(&mut buf)], offset, false)
                    .map_err(io)?;
            }
            self.to_copy.reset_chunks(a, b - 1);
            self.copied.fetch_add(b - a, Ordering::Relaxed);
            if let Some(f) = self
                .on_copy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                f(len);
            }
            c = b;
        }
        Ok(())
    }

    /// Reads the snapshot at `offset` into `bufs` (range checked by the
    /// caller): copied clusters from the target, the others from the
    /// source while holding them against copy-before-write.
    pub fn read_snapshot(&self, bufs: &[IoBuf], offset: u64) -> Result<(), SnapshotError> {
        let len = crate::iobuf::total_len(bufs);
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(SnapshotError::OutOfRange);
        }
        let Some((first, last)) = self.to_copy.chunk_range(offset, len) else {
            return Ok(());
        };
        self.check_valid()?;
        if self.access.next_clean(first) <= last {
            return Err(SnapshotError::Access);
        }
        // Copied clusters never change again: no lock unless some are not.
        let _lock = match self.has_to_copy(first, last) {
            true => self.lock(first, last + 1, None),
            false => None,
        };
        self.check_valid()?;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let c = pos / self.opts.cluster;
            let on_source = self.to_copy.get_chunk(c);
            let next = if on_source {
                self.to_copy.next_clean(c)
            } else {
                self.to_copy.next_dirty(c).unwrap_or(u64::MAX)
            };
            let run_end = next.saturating_mul(self.opts.cluster).min(end);
            let start = usize::try_from(pos - offset).unwrap_or(usize::MAX);
            let n = usize::try_from(run_end - pos).unwrap_or(usize::MAX);
            let part = sub_bufs(bufs, start, n);
            let image = if on_source {
                &self.source
            } else {
                &self.target
            };
            image.read_at(&part, pos)?;
            pos = run_end;
        }
        Ok(())
    }

    /// Allocation of the snapshot at `offset` (< size), as
    /// [`Image::allocation`]: the source's where the data is still there,
    /// the target's where it was copied (a zero cluster is copied as a hole).
    pub fn snapshot_allocation(&self, offset: u64) -> Result<(bool, u64), SnapshotError> {
        if offset >= self.size {
            return Err(SnapshotError::OutOfRange);
        }
        let c = offset / self.opts.cluster;
        self.check_valid()?;
        if !self.access.get_chunk(c) {
            return Err(SnapshotError::Access);
        }
        // Held so that a write cannot change the source's allocation
        // (a discard) between the check and the query.
        let _lock = self.lock(c, c + 1, None);
        let on_source = self.to_copy.get_chunk(c);
        let run_end = if on_source {
            self.to_copy.next_clean(c).min(self.access.next_clean(c))
        } else {
            let copied_end = self.to_copy.next_dirty(c).unwrap_or(u64::MAX);
            copied_end.min(self.access.next_clean(c))
        };
        let limit = run_end
            .saturating_mul(self.opts.cluster)
            .min(self.size)
            .saturating_sub(offset);
        let image = if on_source {
            &self.source
        } else {
            &self.target
        };
        let (data, n) = image.allocation(offset)?;
        Ok((data, n.min(limit).max(1)))
    }

    /// Drops whole clusters of `[offset, offset+len)` from the snapshot
    /// (QEMU's discard on `snapshot-access`): no more copying for them,
    /// their copies are discarded, reads of them fail with EACCES.
    pub fn discard_snapshot(&self, offset: u64, len: u64) -> Result<(), SnapshotError> {
        let cl = self.opts.cluster;
        let first = offset.div_ceil(cl);
        let end = if offset.saturating_add(len) >= self.size {
            self.size.div_ceil(cl)
        } else {
            (offset + len) / cl
        };
        if first >= end {
            return Ok(());
        }
        let _lock = self.lock(first, end, None);
        self.access.reset_chunks(first, end - 1);
        self.to_copy.reset_chunks(first, end - 1);
        let (o, l) = self.bytes(first, end);
        self.target.discard(o, l)?;
        Ok(())
    }

    fn check_valid(&self) -> Result<(), SnapshotError> {
        if self.detached.load(Ordering::SeqCst) {
            return Err(SnapshotError::Invalid(
                "the copy-before-write filter was removed".into(),
            ));
        }
        match self.broken.load(Ordering::SeqCst) {
            0 => Ok(()),
            e => Err(SnapshotError::Invalid(format!(
                "a copy-before-write operation failed: {}",
                crate::mirror::strerror(e)
            ))),
        }
    }
}

impl CopyBeforeWrite {
    /// The clusters of a guest write that still need their copy; `None`
    /// in the common case once the guest has written them (one atomic
    /// scan, no lock) or once the snapshot is broken.
    fn clusters_to_copy(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let (first, last) = self.to_copy.chunk_range(offset, len)?;
        (self.has_to_copy(first, last) && self.broken.load(Ordering::Relaxed) == 0)
            .then_some((first, last))
    }

    /// Hands the copy of `[first, last]` to a copier thread.
    fn start_copy(&self, first: u64, last: u64) -> Arc<CopyJob> {
        let job = Arc::new(CopyJob {
            first,
            last,
            deadline: self.opts.timeout.map(|t| Instant::now() + t),
            state: Mutex::default(),
            done: Condvar::new(),
        });
        self.copiers.submit(self.me.clone(), job.clone());
        job
    }

    /// What a guest write does after its copy ended with `r`
    /// (`on-cbw-error`).
    fn policy(&self, r: Result<(), CopyError>) -> Result<(), DiskError> {
        match r {
            Ok(()) => Ok(()),
            Err(e) if self.opts.on_error == OnCbwError::BreakGuestWrite => {
                Err(DiskError::Hook(format!("copy-before-write: {}", e.message)))
            }
            Err(e) => {
                log::warn!(
                    "copy-before-write failed, the snapshot is now invalid: {}",
                    e.message
                );
                let _ = self.broken.compare_exchange(
                    0,
                    e.errno.max(1),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                Ok(())
            }
        }
    }
}

impl WriteHook for CopyBeforeWrite {
    fn before_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let Some((first, last)) = self.clusters_to_copy(offset, len) else {
            return Ok(());
        };
        self.policy(self.start_copy(first, last).wait())
    }

    fn before_write_nowait(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Box<dyn HookWork>>, DiskError> {
        let Some((first, last)) = self.clusters_to_copy(offset, len) else {
            return Ok(None);
        };
        let Some(cbw) = self.me.upgrade() else {
            return self.before_write(offset, len).map(|()| None);
        };
        let job = self.start_copy(first, last);
        Ok(Some(Box::new(CopyWait { cbw, job })))
    }

    fn may_block(&self) -> bool {
        true
    }
}

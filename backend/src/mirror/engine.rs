//! The copier: a dispatcher (the job's thread) that picks runs of dirty
//! chunks and a few worker threads that copy them.
//!
//! A copy of chunks `first..=last` (an *extent*, up to `buf-size / 16` or
//! [`super::MAX_EXTENT`] bytes, never below one chunk): take the chunk
//! range lock, set the in-flight bits, walk the source's allocation map and
//! for each data segment read it and write it to the target (large
//! sequential I/O), for each hole punch the target (or write zeroes with
//! `unmap: false`), then finish each chunk with the in-flight protocol
//! (`MirrorState::finish_copy`). Several extents are in flight at once (one
//! per worker), never two overlapping ones.
//!
//! The speed limit is a token bucket in debt form: each completed copy
//! charges its data bytes (holes are free, as in QEMU), and nothing new is
//! dispatched while the debt is positive; it drains at `speed` bytes per
//! second.

use super::hook::MirrorState;
use super::{image_errno, strerror, MAX_EXTENT};
use crate::iobuf::IoBuf;
use crate::jobs::IoOperation;
use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A failed copy.
#[derive(Debug, Clone)]
pub struct CopyError {
    /// Reading the source or writing the target.
    pub op: IoOperation,
    /// OS error number.
    pub errno: i32,
    /// QEMU-style text (`strerror`).
    pub message: String,
}

struct Task {
    first: u64,
    last: u64,
}

struct Done {
    first: u64,
    last: u64,
    result: Result<Copied, CopyError>,
}

#[derive(Default, Clone, Copy)]
struct Copied {
    bytes: u64,
    data_bytes: u64,
    clean_chunks: u64,
}

/// A buffer aligned for O_DIRECT.
struct Buffer {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: plain heap memory owned by one worker thread at a time.
unsafe impl Send for Buffer {}

impl Buffer {
    fn new(len: usize) -> Option<Buffer> {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).ok()?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        (!ptr.is_null()).then_some(Buffer { ptr, layout })
    }

    fn iobuf(&self, len: usize) -> IoBuf<'_> {
        // SAFETY: within the allocation, which lives as long as self.
        unsafe { IoBuf::new(self.ptr, len.min(self.layout.size())) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn copy_error(op: IoOperation, e: &crate::image::ImageError) -> CopyError {
    let errno = image_errno(e);
    log::debug!("mirror copy: {} failed: {e}", op.as_str());
    CopyError {
        op,
        errno,
        message: strerror(errno),
    }
}

/// A worker's memory of where the source holds data, so that a long data
/// run costs one SEEK_HOLE (which walks to the end of the run) rather than
/// one per extent. Only data runs are remembered: data that became a hole
/// since just reads as zeroes, which is still a correct copy, whereas a
/// remembered hole that became data would skip the guest's data. It is
/// forgotten after a second, so discards still end up as holes later.
#[derive(Default)]
struct DataRun {
    start: u64,
    end: u64,
    at: Option<Instant>,
}

impl DataRun {
    fn covers(&self, pos: u64) -> Option<u64> {
        let fresh = self
            .at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
        (fresh && self.start <= pos && pos < self.end).then(|| self.end - pos)
    }
}

/// Copies chunks `first..=last` (the caller guarantees no overlapping copy).
fn copy_extent(
    s: &MirrorState,
    buf: &Buffer,
    first: u64,
    last: u64,
    unmap: bool,
    known: &mut DataRun,
) -> Result<Copied, CopyError> {
    let _range = s.ranges.lock(first, last);
    for c in first..=last {
        s.inflight.set(c, c);
    }
    let (start, len) = s.byte_range(first, last);
    let end = start + len;
    let source = s.disk.image();
    let mut out = Copied {
        bytes: len,
        ..Copied::default()
    };
    let result = (|| {
        let mut pos = start;
        while pos < end {
            let (data, run) = match known.covers(pos) {
                Some(run) => (true, run),
                None => {
                    let (data, run) = source
                        .allocation(pos)
                        .map_err(|e| copy_error(IoOperation::Read, &e))?;
                    if data {
                        *known = DataRun {
                            start: pos,
                            end: pos.saturating_add(run),
                            at: Some(Instant::now()),
                        };
                    }
                    (data, run)
                }
            };
            let seg_end = if run == 0 { end } else { (pos + run).min(end) };
            let seg = seg_end - pos;
            if data {
                let mut p = pos;
                while p < seg_end {
                    let n = (seg_end - p).min(buf.layout.size() as u64) as usize;
                    let io = [buf.iobuf(n)];
                    source
                        .read_at(&io, p)
                        .map_err(|e| copy_error(IoOperation::Read, &e))?;
                    s.target
                        .write_at(&io, p, false)
                        .map_err(|e| copy_error(IoOperation::Write, &e))?;
                    p += n as u64;
                }
                out.data_bytes += seg;
            } else {
                s.target
                    .write_zeroes(pos, seg, unmap)
                    .map_err(|e| copy_error(IoOperation::Write, &e))?;
            }
            pos = seg_end;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            for c in first..=last {
                if s.finish_copy(c) {
                    out.clean_chunks += 1;
                }
            }
            Ok(out)
        }
        Err(e) => {
            // Leave the chunks dirty; a later pass retries them.
            s.inflight.clear(first, last);
            Err(e)
        }
    }
}

fn worker(
    s: Arc<MirrorState>,
    tasks: Arc<Mutex<Receiver<Task>>>,
    done: Sender<Done>,
    buf: Buffer,
    unmap: bool,
) {
    let mut known = DataRun::default();
    loop {
        let task = {
            let rx = tasks.lock().unwrap_or_else(|p| p.into_inner());
            rx.recv()
        };
        let Ok(task) = task else {
            return;
        };
        // A panic in a copy must not leave the dispatcher waiting for ever:
        // it becomes an I/O error of that extent (which stays dirty).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            copy_extent(&s, &buf, task.first, task.last, unmap, &mut known)
        }))
        .unwrap_or_else(|_| {
            s.inflight.clear(task.first, task.last);
            known = DataRun::default();
            Err(CopyError {
                op: IoOperation::Read,
                errno: libc::EIO,
                message: "internal error in the mirror copier".into(),
            })
        });
        if done
            .send(Done {
                first: task.first,
                last: task.last,
                result,
            })
            .is_err()
        {
            return;
        }
    }
}

/// The dispatcher side of the copier.
pub struct Engine {
    state: Arc<MirrorState>,
    tasks: Option<Sender<Task>>,
    results: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    /// Largest extent, in chunks.
    extent_chunks: u64,
    max_in_flight: usize,
    /// Where the search for dirty chunks continues.
    cursor: u64,
    in_flight: BTreeMap<u64, u64>,
    /// Rate-limit debt in bytes.
    debt: f64,
    debt_at: Instant,
    /// Bytes finished since the job last took them (for progress).
    done_bytes: u64,
    /// Data bytes copied in total.
    pub data_bytes: u64,
    errors: Vec<CopyError>,
    cleaned_since_checkpoint: u64,
    last_checkpoint: Instant,
    /// Wall time with copies in flight, and bytes finished meanwhile: the
    /// copy throughput, which sizes the last copy before a pivot.
    busy_time: Duration,
    busy_bytes: u64,
    busy_since: Option<Instant>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("in_flight", &self.in_flight.len())
            .field("extent_chunks", &self.extent_chunks)
            .finish()
    }
}

/// How often the persistent bitmap is brought down to D while copying.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

impl Engine {
    /// Starts the workers for `state` with `buf_size` bytes in flight.
    pub fn new(state: Arc<MirrorState>, buf_size: u64, unmap: bool) -> Result<Engine, String> {
        let g = state.granularity();
        let extent = (buf_size / 16).clamp(1 << 20, MAX_EXTENT).max(g);
        let extent_chunks = (extent / g).max(1);
        let extent_bytes = extent_chunks * g;
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        // A target without a plain file (an NBD export) is bound by round
        // trips, not by our CPUs: more copies in flight keep its link full.
        let workers = if state.target.async_fd(&[]).is_none() {
            super::MAX_REMOTE_WORKERS
        } else {
            super::MAX_WORKERS.min(cpus.max(2))
        };
        let max_in_flight = ((buf_size / extent_bytes).max(1) as usize).min(workers);
        let (task_tx, task_rx) = channel::<Task>();
        let task_rx = Arc::new(Mutex::new(task_rx));
        let (done_tx, done_rx) = channel::<Done>();
        let buf_len = extent_bytes.min(MAX_EXTENT) as usize;
        let mut workers = Vec::new();
        for i in 0..max_in_flight {
            let buf = Buffer::new(buf_len).ok_or("cannot allocate a copy buffer")?;
            let (s, rx, tx) = (state.clone(), task_rx.clone(), done_tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("mirror-copy-{i}"))
                .spawn(move || {
                    crate::thread_kind::started(crate::thread_kind::ThreadKind::Job);
                    worker(s, rx, tx, buf, unmap)
                })
                .map_err(|e| format!("cannot start a copy thread: {e}"))?;
            workers.push(handle);
        }
        Ok(Engine {
            state,
            tasks: Some(task_tx),
            results: done_rx,
            workers,
            extent_chunks,
            max_in_flight,
            cursor: 0,
            in_flight: BTreeMap::new(),
            debt: 0.0,
            debt_at: Instant::now(),
            done_bytes: 0,
            data_bytes: 0,
            errors: Vec::new(),
            cleaned_since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            busy_time: Duration::ZERO,
            busy_bytes: 0,
            busy_since: None,
        })
    }

    /// Copies in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Nothing in flight.
    pub fn idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Copy throughput so far in bytes per second (None before any copy).
    pub fn throughput(&self) -> Option<f64> {
        let t = self.busy_time.as_secs_f64();
        (t > 0.001 && self.busy_bytes > 0).then(|| self.busy_bytes as f64 / t)
    }

    fn account_busy(&mut self) {
        let now = Instant::now();
        if let Some(since) = self.busy_since.take() {
            self.busy_time += now - since;
        }
        if !self.in_flight.is_empty() {
            self.busy_since = Some(now);
        }
    }

    /// Takes the bytes finished since the last call.
    pub fn take_done_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.done_bytes)
    }

    /// Takes the copy errors since the last call.
    pub fn take_errors(&mut self) -> Vec<CopyError> {
        std::mem::take(&mut self.errors)
    }

    fn busy(&self, c: u64) -> Option<u64> {
        // The in-flight extent containing chunk c, if any: its last chunk.
        self.in_flight
            .range(..=c)
            .next_back()
            .and_then(|(_, &last)| (last >= c).then_some(last))
    }

    /// The next run of dirty chunks not in flight, from the cursor (wrapping
    /// once), at most `max_chunks` long.
    fn pick(&mut self, max_chunks: u64) -> Option<(u64, u64)> {
        let s = &self.state;
        let chunks = s.chunks();
        let mut from = self.cursor.min(chunks);
        let mut wrapped = false;
        loop {
            let c = match s.dirty.next_set(from) {
                Some(c) => c,
                None if !wrapped && self.cursor > 0 => {
                    wrapped = true;
                    from = 0;
                    continue;
                }
                None => return None,
            };
            if wrapped && c >= self.cursor {
                return None;
            }
            if let Some(last) = self.busy(c) {
                from = last + 1;
                continue;
            }
            let mut last = c;
            while last + 1 < chunks
                && last + 1 - c < max_chunks
                && s.dirty.get(last + 1)
                && self.busy(last + 1).is_none()
            {
                last += 1;
            }
            self.cursor = if last + 1 >= chunks { 0 } else { last + 1 };
            return Some((c, last));
        }
    }

    fn refill(&mut self, speed: u64) {
        let now = Instant::now();
        if speed > 0 {
            let dt = now.duration_since(self.debt_at).as_secs_f64();
            self.debt = (self.debt - dt * speed as f64).max(0.0);
        } else {
            self.debt = 0.0;
        }
        self.debt_at = now;
    }

    /// How long to wait before the speed limit allows more copying.
    pub fn rate_delay(&mut self, speed: u64) -> Option<Duration> {
        self.refill(speed);
        (speed > 0 && self.debt > 0.0).then(|| Duration::from_secs_f64(self.debt / speed as f64))
    }

    /// Dispatches dirty extents up to the in-flight limit and the speed
    /// limit; returns how many were dispatched.
    pub fn dispatch(&mut self, speed: u64) -> usize {
        let mut n = 0;
        // With a limit, keep single copies small so the rate stays smooth.
        let max_chunks = if speed > 0 {
            let g = self.state.granularity();
            (speed / 10 / g).clamp(1, self.extent_chunks)
        } else {
            self.extent_chunks
        };
        let max_in_flight = if speed > 0 { 1 } else { self.max_in_flight };
        while self.in_flight.len() < max_in_flight {
            if self.rate_delay(speed).is_some() {
                break;
            }
            let Some((first, last)) = self.pick(max_chunks) else {
                break;
            };
            let Some(tx) = &self.tasks else {
                break;
            };
            if tx.send(Task { first, last }).is_err() {
                break;
            }
            self.in_flight.insert(first, last);
            if self.busy_since.is_none() {
                self.busy_since = Some(Instant::now());
            }
            n += 1;
            if speed > 0 {
                // Charge up front what this extent may copy at most; the
                // completion corrects the charge to the real data bytes.
                let (_, len) = self.state.byte_range(first, last);
                self.debt += len as f64;
            }
        }
        n
    }

    fn handle(&mut self, d: Done, speed: u64) {
        self.in_flight.remove(&d.first);
        let (_, len) = self.state.byte_range(d.first, d.last);
        if speed > 0 {
            self.debt -= len as f64;
        }
        match d.result {
            Ok(c) => {
                self.done_bytes += c.bytes;
                self.busy_bytes += c.bytes;
                self.data_bytes += c.data_bytes;
                if speed > 0 {
                    self.debt += c.data_bytes as f64;
                }
                self.cleaned_since_checkpoint += c.clean_chunks;
            }
            Err(e) => self.errors.push(e),
        }
    }

    /// Handles finished copies, waiting up to `wait` for the first one.
    pub fn collect(&mut self, wait: Duration, speed: u64) {
        if self.in_flight.is_empty() {
            return;
        }
        match self.results.recv_timeout(wait) {
            Ok(d) => self.handle(d, speed),
            Err(RecvTimeoutError::Timeout) => return,
            Err(RecvTimeoutError::Disconnected) => {
                self.in_flight.clear();
                self.account_busy();
                return;
            }
        }
        while let Ok(d) = self.results.try_recv() {
            self.handle(d, speed);
        }
        self.account_busy();
    }

    /// Waits for every copy in flight.
    pub fn drain(&mut self, speed: u64) {
        while !self.in_flight.is_empty() {
            match self.results.recv() {
                Ok(d) => self.handle(d, speed),
                Err(_) => self.in_flight.clear(),
            }
        }
        self.account_busy();
    }

    /// Whether a checkpoint of the persistent bitmap is due.
    pub fn checkpoint_due(&self) -> bool {
        self.state.persist.is_some()
            && self.cleaned_since_checkpoint > 0
            && self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
    }

    /// P := D: drains the copies, pauses guest I/O for the copy of the
    /// words (no write may be between its mark and its landing), resumes.
    /// If the guest's requests in flight hold the pause off for longer than
    /// [`super::job::PAUSE_REACH_TIMEOUT`], the checkpoint is skipped and
    /// retried at the next interval: P only ever stays larger than D then.
    pub fn checkpoint(&mut self, speed: u64) {
        if self.state.persist.is_none() {
            return;
        }
        self.drain(speed);
        self.last_checkpoint = Instant::now();
        let Some(pause) = self
            .state
            .disk
            .gate()
            .pause_timeout(super::job::PAUSE_REACH_TIMEOUT)
        else {
            log::debug!("mirror checkpoint skipped: guest requests held the pause off");
            return;
        };
        self.state.checkpoint();
        drop(pause);
        self.cleaned_since_checkpoint = 0;
    }

    /// Copies until nothing is dirty, with every worker busy; for the pivot
    /// (guest I/O paused, so this terminates). Stops at the first error.
    pub fn sync_all(&mut self) -> Result<(), CopyError> {
        loop {
            self.dispatch(0);
            if self.in_flight.is_empty() {
                break;
            }
            self.collect(Duration::from_secs(3600), 0);
            if let Some(e) = self.errors.first().cloned() {
                self.drain(0);
                self.errors.clear();
                return Err(e);
            }
        }
        // `pick` found nothing dirty that is not in flight, and nothing is
        // in flight: with guest I/O paused, D is empty.
        Ok(())
    }

    /// Stops the workers (after draining what is in flight).
    pub fn shutdown(&mut self) {
        self.drain(0);
        self.tasks = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

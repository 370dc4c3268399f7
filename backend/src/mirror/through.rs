//! Write-blocking writes to the target off the guest's thread: a guest
//! write in write-blocking mode completes only once its data is on the
//! target too, but the queue thread that serves it must not wait for
//! that. It would stall every other request and queue of the thread,
//! and a target that hangs (a dead NFS server, a stalled array, an NBD
//! destination that stopped answering) would hold them for ever.
//!
//! So the target write is a task for one of a few threads of the mirror,
//! and the guest's write waits for it as a [`HookWork`]: the io_uring
//! engine parks the request and is woken when the task is done, serving
//! its other requests meanwhile; the synchronous path blocks on it. The
//! task carries a copy of the guest's data, because the guest's request
//! may complete before the task ends (below) and the guest may then reuse
//! its buffers.
//!
//! The thread takes the chunks' range lock, writes, and makes the
//! write-blocking decision (clean, dirty, or a target error) under the
//! task's lock, all while the guest's write is still inside its stripe:
//! the write leaves its stripe only when its wait ends (see `hook.rs` for
//! why the decision must fall there).
//!
//! With a target time-out (`x-target-timeout`), a wait whose deadline
//! passes first marks the task abandoned under that lock, marks the chunks
//! dirty (its data landed on the source: the background rule), suspends
//! write-blocking and reports ETIMEDOUT to the job, which applies
//! `on-target-error`; the guest's request completes. The late target
//! write, if it ever ends, decides nothing. Until it ends it holds the
//! chunks' range lock, so no copy of those chunks can run before it and
//! be overwritten by its stale data: every copy of them starts after it,
//! from the source.

use super::hook::MirrorState;
use crate::disk::{DiskError, HookWork};
use crate::image::ImageError;
use crate::iobuf::IoBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Threads writing through to the target: the target writes in flight at
/// once (more guest writes queue for them; none waits on a queue thread).
const THREADS: usize = 8;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a write-through writes.
pub(super) enum Payload {
    /// The guest's data, copied.
    Data(Vec<u8>),
    /// Zeroes.
    Zeroes {
        /// The range may be deallocated.
        unmap: bool,
    },
}

/// What the task and the guest's wait tell each other, under one lock.
#[derive(Default)]
struct Verdict {
    /// The thread made the decision.
    done: bool,
    /// The guest's wait gave up: the thread must not decide.
    abandoned: bool,
    /// Woken when the decision is made.
    waker: Option<Waker>,
}

struct Task {
    state: Arc<MirrorState>,
    offset: u64,
    len: u64,
    chunks: (u64, u64),
    payload: Payload,
    verdict: Arc<Mutex<Verdict>>,
}

/// The threads of one mirror; they end when it is dropped.
pub(super) struct WriteThrough {
    tasks: Sender<Task>,
    timeout: Option<Duration>,
}

impl WriteThrough {
    /// Starts the threads; a guest write waits at most `timeout` (`None`:
    /// for as long as the target takes).
    pub(super) fn new(timeout: Option<Duration>) -> std::io::Result<WriteThrough> {
        let (tx, rx) = channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("mirror-through-{i}"))
                .spawn(move || {
                    crate::thread_kind::started(crate::thread_kind::ThreadKind::Job);
                    run(&rx)
                })?;
        }
        Ok(WriteThrough { tasks: tx, timeout })
    }

    /// Starts writing `payload` at `offset` through to `state`'s target;
    /// the returned wait ends once the write-blocking decision for
    /// `chunks` is made, or, after the time-out, by giving up (the chunks
    /// are then dirty and the job hears ETIMEDOUT). Either way the guest's
    /// write then leaves its stripe.
    pub(super) fn start(
        &self,
        state: &Arc<MirrorState>,
        offset: u64,
        len: u64,
        chunks: (u64, u64),
        payload: Payload,
    ) -> ThroughWait {
        let verdict = Arc::new(Mutex::new(Verdict::default()));
        let task = Task {
            state: state.clone(),
            offset,
            len,
            chunks,
            payload,
            verdict: verdict.clone(),
        };
        if self.tasks.send(task).is_err() {
            // No thread left (they only end with the mirror).
            state.write_through_failed(chunks, libc::EIO);
            lock(&verdict).done = true;
        }
        ThroughWait {
            state: state.clone(),
            offset,
            chunks,
            verdict,
            deadline: self.timeout.map(|t| Instant::now() + t),
            timeout: self.timeout,
            ended: false,
        }
    }
}

/// A guest write waiting for its write-through.
pub(super) struct ThroughWait {
    state: Arc<MirrorState>,
    offset: u64,
    chunks: (u64, u64),
    verdict: Arc<Mutex<Verdict>>,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    /// The guest's write has left its stripe.
    ended: bool,
}

impl ThroughWait {
    /// Ends the wait: decided, or (`give_up`) given up on unless the
    /// decision was made meanwhile; the job then hears `errno`.
    fn end(&mut self, give_up: Option<i32>) {
        if let Some(errno) = give_up {
            let mut v = lock(&self.verdict);
            if !v.done {
                v.abandoned = true;
                drop(v);
                if errno == libc::ETIMEDOUT {
                    log::warn!(
                        "mirror: write-blocking target write at {} not done after {:?}: the guest goes on, the chunks stay dirty",
                        self.offset,
                        self.timeout.unwrap_or_default()
                    );
                }
                self.state.write_through_failed(self.chunks, errno);
            }
        }
        self.ended = true;
        self.state.leave(self.chunks);
    }
}

impl HookWork for ThroughWait {
    fn poll(&mut self, waker: &Waker) -> Poll<Result<(), DiskError>> {
        let mut v = lock(&self.verdict);
        let expired = self.deadline.is_some_and(|d| Instant::now() >= d);
        if !v.done && !expired {
            if !v.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                v.waker = Some(waker.clone());
            }
            return Poll::Pending;
        }
        drop(v);
        self.end(expired.then_some(libc::ETIMEDOUT));
        // A target error never fails the guest's write (QEMU's rule).
        Poll::Ready(Ok(()))
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

impl Drop for ThroughWait {
    fn drop(&mut self) {
        if !self.ended {
            // Given up on without a poll (an engine torn down): as a
            // time-out, so the chunks are dirty and the stripe is left.
            self.end(Some(libc::EIO));
        }
    }
}

/// One thread: runs tasks until the mirror's sender is gone.
fn run(tasks: &Mutex<Receiver<Task>>) {
    loop {
        let task = match lock(tasks).recv() {
            Ok(t) => t,
            Err(_) => return,
        };
        let s = &task.state;
        let (first, last) = task.chunks;
        let _range = s.ranges.lock(first, last);
        let result: Result<(), ImageError> = match task.payload {
            Payload::Data(mut data) => {
                s.target
                    .write_at(&[IoBuf::from_slice(&mut data)], task.offset, false)
            }
            Payload::Zeroes { unmap } => s.target.write_zeroes(task.offset, task.len, unmap),
        };
        let mut v = lock(&task.verdict);
        if v.abandoned {
            match result {
                Ok(()) => log::info!("mirror: a timed-out write-through ended after all"),
                Err(e) => log::warn!("mirror: a timed-out write-through failed: {e}"),
            }
            continue;
        }
        s.decide_write_through(task.offset, task.len, task.chunks, result);
        v.done = true;
        let waker = v.waker.take();
        drop(v);
        if let Some(w) = waker {
            w.wake();
        }
    }
}

//! Write-blocking writes to the target off the guest's thread, with a
//! bound on the wait: a target that hangs (a dead NFS server, a stalled
//! array) must not hold the guest's queue thread, and with it every queue
//! it serves, for ever.
//!
//! A guest write in write-blocking mode copies its data (the guest may
//! reuse its buffers once the request completes, which may happen before
//! the target write ends) and hands the target write to one of a few
//! threads. The guest's thread waits for it, at most the mirror's target
//! time-out. The thread takes the chunks' range lock, writes, and makes
//! the write-blocking decision (clean, dirty, or a target error) under the
//! task's lock, all while the guest's write is still inside its stripe,
//! since the guest's thread waits until the decision is made or it has
//! given up on it (see `hook.rs` for why the decision must fall there).
//!
//! When the time-out passes first, the guest's thread marks the task
//! abandoned under that lock, marks the chunks dirty (its data landed on
//! the source: the background rule), suspends write-blocking and reports
//! ETIMEDOUT to the job, which applies `on-target-error`; the guest's
//! request completes. The late target write, if it ever ends, decides
//! nothing. Until it ends it holds the chunks' range lock, so no copy of
//! those chunks can run before it and be overwritten by its stale data:
//! every copy of them starts after it, from the source.

use super::hook::MirrorState;
use crate::image::ImageError;
use crate::iobuf::IoBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Threads writing through to the target: the copies in flight at once.
const THREADS: usize = 4;

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

#[derive(Default)]
struct Verdict {
    /// The thread made the decision.
    done: bool,
    /// The guest's thread gave up waiting: the thread must not decide.
    abandoned: bool,
}

#[derive(Default)]
struct Reply {
    verdict: Mutex<Verdict>,
    cond: Condvar,
}

struct Task {
    state: Arc<MirrorState>,
    offset: u64,
    len: u64,
    chunks: (u64, u64),
    payload: Payload,
    reply: Arc<Reply>,
}

/// The threads of one mirror; they end when it is dropped.
pub(super) struct WriteThrough {
    tasks: Mutex<Sender<Task>>,
    timeout: Duration,
}

impl WriteThrough {
    /// Starts the threads; a guest write waits at most `timeout`.
    pub(super) fn new(timeout: Duration) -> std::io::Result<WriteThrough> {
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
        Ok(WriteThrough {
            tasks: Mutex::new(tx),
            timeout,
        })
    }

    /// Writes `payload` at `offset` through to `state`'s target and makes
    /// the write-blocking decision for `chunks`, or, after the time-out,
    /// gives up: the chunks are then dirty and the job hears ETIMEDOUT.
    pub(super) fn write(
        &self,
        state: &Arc<MirrorState>,
        offset: u64,
        len: u64,
        chunks: (u64, u64),
        payload: Payload,
    ) {
        let reply = Arc::new(Reply::default());
        let task = Task {
            state: state.clone(),
            offset,
            len,
            chunks,
            payload,
            reply: reply.clone(),
        };
        if lock(&self.tasks).send(task).is_err() {
            // No thread left (they only end with the mirror).
            state.write_through_failed(chunks, libc::EIO);
            return;
        }
        let deadline = Instant::now() + self.timeout;
        let mut v = lock(&reply.verdict);
        while !v.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                v.abandoned = true;
                drop(v);
                log::warn!(
                    "mirror: write-blocking target write at {offset} not done after {:?}: the guest goes on, the chunks stay dirty",
                    self.timeout
                );
                state.write_through_failed(chunks, libc::ETIMEDOUT);
                return;
            }
            v = reply
                .cond
                .wait_timeout(v, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
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
        let mut v = lock(&task.reply.verdict);
        if v.abandoned {
            match result {
                Ok(()) => log::info!("mirror: a timed-out write-through ended after all"),
                Err(e) => log::warn!("mirror: a timed-out write-through failed: {e}"),
            }
        } else {
            s.decide_write_through(task.offset, task.len, task.chunks, result);
            v.done = true;
            task.reply.cond.notify_all();
        }
    }
}

//! The vhost-user-blk device: feature negotiation, config space, and the
//! per-queue workers that pop requests from the guest's rings, run them on
//! the disk, and complete them.
//!
//! Queues are spread over worker threads (`--threads`, queue q on thread
//! q mod N); each thread has its own state behind its own lock, so threads
//! never wait for each other (vhost-user-backend's
//! `RwLock<VhostUserBackendMut>` adaptor would serialize them). The queues
//! of one thread share its engine: one ring, one set of requests in flight,
//! one wait for "a completion or a kick on any of them". Fewer threads than
//! queues leave cores to other work.
//!
//! A worker runs one of two engines:
//! - sync: each request is executed with blocking calls as it is popped.
//!   Cheap on the page cache, but a queue never has more than one request
//!   at the disk.
//! - io_uring: every available request is popped, validated and submitted
//!   to the worker's own ring; completions are reaped in batches and the
//!   guest is signalled once per batch. The worker stays in its handler
//!   while requests are in flight, sleeping in the ring on "a completion or
//!   a kick" (polls on its queues' kick eventfds sit in the same ring), so
//!   new requests are taken while others run; it goes back to the epoll loop
//!   only with nothing in flight. Keeping that wait inside the handler (not
//!   registering the ring's eventfd with vhost-user-backend's epoll) keeps
//!   the ring and every request's state on one thread, lets one
//!   `io_uring_enter` both submit and wait, and means a worker that has
//!   returned to epoll has nothing in flight, which is what the IoGate,
//!   GET_VRING_BASE and the SIGTERM drain rely on. On the page cache a
//!   request that arrives alone runs inline, and on tmpfs, when the queue
//!   threads take every core, all requests do (see `AioEngine`).
//!
//! A DISCARD or WRITE_ZEROES too large for one go (`ZEROES_STEP`), or
//! whose hooks may wait long (a copy-before-write filter, a write-blocking
//! mirror), is not run when popped: both engines keep it as a `Zeroing`
//! and do one step per round of their loop, taking and completing the
//! thread's other requests in between; it counts as in flight until its
//! last step. The io_uring engine runs each step as an engine request
//! (`UringEngine::zeroes`), which parks on its hooks' work instead of
//! blocking the thread.
//!
//! Both engines look at the disk's gate (a block job's pause, e.g. the
//! mirror's pivot) before each request they take, so a pause waits for the
//! requests under way, not for a busy ring to run dry. A worker that finds
//! I/O paused with nothing in flight returns from `serve`, releasing its
//! worker and vring locks, and waits for the resume in `handle_event`: the
//! control channel (GET_VRING_BASE) needs those locks meanwhile.
//!
//! Both engines count the available requests before they load the guest
//! memory map they parse them with: a frontend adds the memory region of a
//! new buffer before it publishes a request that uses it, so that order
//! guarantees the map has the buffer. Requests in flight keep the map they
//! were parsed with (`Pins`), so a region removed meanwhile stays mapped
//! until they complete.

use crate::config_space::{AioEngine, DeviceConfig};
use crate::inflight::proxy::Slot;
use crate::inflight::queues::Tracking;
use crate::request::{Completion, GuestBuf, GuestMemoryMmap, Prepared, RequestParser, Zeroes};
use log::{debug, trace, warn};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringStateMutGuard, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vubd_backend::disk::pins::{PinId, Pins};
use vubd_backend::disk::uring::UringEngine;
use vubd_backend::gate::BatchGuard;
use vubd_backend::Disk;

/// Guest memory shared with the frontend, swappable as regions come and go.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
/// A virtqueue with its kick/call eventfds.
pub type Vring = VringMutex<GuestMemory>;
/// The locked state of a vring.
type VringState<'a> = <Vring as VringStateMutGuard<'a, GuestMemory>>::G;

/// With a kick we may not drain pending (see `serve_uring`), how often a
/// worker waiting for completions looks at the avail ring anyway.
const KICK_PENDING_RECHECK: Duration = Duration::from_micros(200);

/// How a worker left its queues.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Served {
    /// Nothing more to do until the next kick.
    Done,
    /// A block job paused guest I/O: serve again once it resumes.
    Paused,
}

/// How a sync-engine drain of one queue ended.
enum Drain {
    /// The ring is empty (or the daemon is stopping).
    Empty,
    /// The ring is unusable (not ready, or a corrupted avail index).
    Unusable,
    /// Guest I/O is paused; requests may remain.
    Paused,
}

/// A request submitted to the io_uring engine, until it completes.
struct Pending {
    /// Position of its queue among the thread's queues.
    queue: usize,
    head: u16,
    status: GuestBuf,
    /// Bytes a successful request wrote to the driver (a read's length).
    data_len: u32,
    /// The guest memory snapshot its buffers point into.
    mem: PinId,
    /// Submission order within the worker (set by `Slab::insert`).
    seq: u64,
}

/// A DISCARD or WRITE_ZEROES run in steps (see the module's notes), a
/// step per round of the worker's loop, so that the thread's other
/// requests are taken and completed between its steps. It counts as in
/// flight: the worker does not leave its handler (nor lets a pause start)
/// before it is done.
struct Zeroing {
    /// Position of its queue among the thread's queues.
    queue: usize,
    head: u16,
    status: GuestBuf,
    job: Box<Zeroes>,
    /// The guest memory snapshot its status byte points into, held to
    /// keep it mapped.
    _mem: Arc<GuestMemoryMmap>,
    /// Its step on the io_uring engine (unused by the synchronous engine).
    step: Step,
}

/// Where a zeroing's step on the io_uring engine is.
enum Step {
    /// None started: start the next one on its turn.
    Idle,
    /// On the engine, under the zeroing's token.
    InFlight,
    /// Came back with this result.
    Done(Result<(), vubd_backend::DiskError>),
}

/// Tags the engine tokens of zeroing steps (request tokens are slab indices).
const ZEROING_TOKEN: u64 = 1 << 62;

impl Zeroing {
    /// The engine token of its steps: a queue and a head are unique among
    /// the requests under way.
    fn token(&self) -> u64 {
        ZEROING_TOKEN | (self.queue as u64) << 16 | u64::from(self.head)
    }

    /// Does the next step; the completion once the request is finished.
    fn step(&mut self, disk: &Disk) -> Option<Completion> {
        let result = self.job.step(disk)?;
        // The status byte lies in `self.mem`, mapped while we hold it.
        Some(RequestParser::finish(self.status, result, 0))
    }
}

/// A fixed-capacity slab: the token of a pending request is its index.
#[derive(Default)]
struct Slab {
    entries: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Requests submitted so far, and the latest of them completed: a
    /// completion behind it came out of order (traced under `vubd::reorder`,
    /// which the restart test counts).
    submitted: u64,
    latest_done: u64,
}

impl Slab {
    fn insert(&mut self, mut p: Pending) -> usize {
        self.submitted += 1;
        p.seq = self.submitted;
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(p);
                i
            }
            None => {
                self.entries.push(Some(p));
                self.entries.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) -> Option<Pending> {
        let p = self.entries.get_mut(i)?.take()?;
        self.free.push(i);
        if p.seq < self.latest_done {
            trace!(target: "vubd::reorder", "request {} completed after {}", p.seq, self.latest_done);
        }
        self.latest_done = self.latest_done.max(p.seq);
        Some(p)
    }
}

/// The engine a worker runs.
enum Engine {
    /// io_uring wanted, ring not created yet (it must be created on the
    /// worker thread: it is single-issuer).
    Untried,
    /// io_uring.
    Uring(Box<UringEngine>),
    /// Blocking calls.
    Sync,
}

/// Per-thread state: the queues a worker thread serves share its parser,
/// engine and requests in flight.
struct Worker {
    parser: RequestParser,
    mem: Option<GuestMemory>,
    engine: Engine,
    pending: Slab,
    /// Zeroings under way, oldest turn first.
    zeroing: Vec<Zeroing>,
    /// Guest memory snapshots that requests in flight point into.
    snapshots: Pins<Arc<GuestMemoryMmap>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Guest memory goes only after the engine is done with it, whatever
        // the field order: the engine waits for the kernel to finish every
        // request's buffers; if it cannot, the memory they point into stays
        // mapped for good rather than being unmapped under the kernel.
        if let Engine::Uring(engine) = &mut self.engine {
            if !engine.quiesce() {
                std::mem::forget(std::mem::take(&mut self.snapshots));
                std::mem::forget(self.mem.take());
            }
        }
        self.engine = Engine::Sync;
    }
}

/// One frontend session's vhost-user-blk device. A new one is made for each
/// connection; the `Disk` it serves outlives them all.
pub struct BlockDevice {
    disk: Arc<Disk>,
    cfg: DeviceConfig,
    workers: Vec<Mutex<Worker>>,
    /// The frontend's memory (shared, swappable); workers copy it once.
    mem: Mutex<Option<GuestMemory>>,
    event_idx: AtomicBool,
    /// The virtio features the driver of this session acknowledged.
    acked: AtomicU64,
    stopping: Arc<AtomicBool>,
    /// The frontend offered memory we must not touch (a region running past
    /// the end of its file, or in a file it may still shrink, would kill us
    /// with SIGBUS): serve nothing more in this session.
    memory_refused: AtomicBool,
    /// In-flight requests recorded for a restarted vubd (INFLIGHT_SHMFD).
    tracking: Tracking,
}

impl BlockDevice {
    /// A device serving `disk` with `cfg`; `stopping` is raised at shutdown,
    /// after which no new request is taken from any queue.
    pub fn new(disk: Arc<Disk>, cfg: DeviceConfig, stopping: Arc<AtomicBool>) -> BlockDevice {
        let workers = (0..cfg.num_threads())
            .map(|_| {
                Mutex::new(Worker {
                    parser: RequestParser::default(),
                    mem: None,
                    engine: match cfg.aio {
                        AioEngine::Sync => Engine::Sync,
                        AioEngine::IoUring { .. } => Engine::Untried,
                    },
                    pending: Slab::default(),
                    zeroing: Vec::new(),
                    snapshots: Pins::default(),
                })
            })
            .collect();
        // A new session starts from the default, not from the write cache
        // mode the previous guest left.
        disk.set_writeback(DeviceConfig::default_writeback(cfg.features()));
        let tracking = Tracking::new(Arc::default(), usize::from(cfg.num_queues));
        BlockDevice {
            disk,
            cfg,
            acked: AtomicU64::new(0),
            workers,
            mem: Mutex::new(None),
            memory_refused: AtomicBool::new(false),
            event_idx: AtomicBool::new(false),
            tracking,
            stopping,
        }
    }

    /// The device, tracking requests in flight in the region the frontend
    /// installs in `slot` (see `inflight`).
    pub fn with_inflight(self, slot: Arc<Slot>) -> BlockDevice {
        let tracking = Tracking::new(slot, usize::from(self.cfg.num_queues));
        BlockDevice { tracking, ..self }
    }

    fn worker(&self, thread: usize) -> Option<MutexGuard<'_, Worker>> {
        // A poisoned lock means a worker panicked mid-request; the state is
        // still usable (the parser is scratch space), so keep serving.
        self.workers
            .get(thread)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until no queue is in the middle of a request. Call after raising
    /// `stopping`: from then on every request taken has been completed.
    pub fn quiesce(&self) {
        for thread in 0..self.workers.len() {
            drop(self.worker(thread));
        }
    }

    /// Serves the queues of worker thread `thread` (`vrings`, in queue
    /// order) until they are empty and nothing is in flight (and, when
    /// polling, until they have stayed so for the poll window), then
    /// re-arms notifications; or until guest I/O is paused, with nothing in
    /// flight: then it returns `Paused` having released the worker and
    /// vring locks, and the caller waits for the pause to end.
    fn serve(&self, thread: usize, vrings: &[Vring]) -> Served {
        let Some(mut guard) = self.worker(thread) else {
            return Served::Done;
        };
        let worker = &mut *guard;
        if worker.mem.is_none() {
            worker.mem = self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone();
        }
        if matches!(worker.engine, Engine::Untried) {
            // Room for every request of every queue of the thread.
            let depth = u32::from(self.cfg.queue_size) * vrings.len().max(1) as u32;
            worker.engine = match UringEngine::new(depth) {
                Ok(mut engine) => {
                    engine.set_inline_memory(matches!(
                        self.cfg.aio,
                        AioEngine::IoUring {
                            inline_memory: true,
                            ..
                        }
                    ));
                    Engine::Uring(Box::new(engine))
                }
                Err(e) => {
                    warn!("thread {thread}: io_uring unavailable ({e}); using synchronous I/O");
                    Engine::Sync
                }
            };
        }
        if matches!(worker.engine, Engine::Uring(_)) {
            let served = self.serve_uring(thread, vrings, worker);
            // Going idle or waiting out a pause, with nothing in flight:
            // hold no image or memory map a pivot or the frontend may
            // replace meanwhile (the old image would stay open until the
            // next request).
            if let Engine::Uring(engine) = &mut worker.engine {
                engine.release_unused();
                // The vring locks go: the frontend may now replace a kick fd
                // with one of the same number.
                engine.disarm_kicks();
            }
            worker.snapshots.release_unused();
            served
        } else {
            self.serve_sync(thread, vrings, worker)
        }
    }

    /// The sync engine: executes requests one by one as they are popped,
    /// draining the thread's queues in turn.
    fn serve_sync(&self, thread: usize, vrings: &[Vring], worker: &mut Worker) -> Served {
        let Some(atomic) = worker.mem.as_ref() else {
            return Served::Done;
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let poll = Duration::from_micros(self.cfg.poll_us);
        let (indices, mut states): (Vec<usize>, Vec<VringState<'_>>) = served_vrings(vrings)
            .map(|(pos, state)| (self.cfg.queue_of(thread, pos), state))
            .unzip();
        let mut usable = vec![true; states.len()];
        // Held while zeroings are under way: a pause waits for them.
        let mut batch: Option<BatchGuard<'_>> = None;
        loop {
            let mut paused = false;
            for (pos, state) in states.iter_mut().enumerate() {
                let index = indices[pos];
                // Suppress kicks while we are looking at the ring anyway.
                if event_idx || !poll.is_zero() {
                    if let Err(e) = state.disable_notification() {
                        debug!("queue {index}: cannot disable notifications: {e}");
                    }
                }
                let parts = (&mut worker.parser, &mut worker.zeroing, &mut batch);
                match self.drain_sync((index, pos), state, atomic, parts) {
                    Drain::Empty => usable[pos] = true,
                    Drain::Unusable => usable[pos] = false,
                    Drain::Paused => paused = true,
                }
            }
            if let Some((pos, head, done)) = step_zeroing(&mut worker.zeroing, &self.disk) {
                if let Some(state) = states.get_mut(pos) {
                    let mem = atomic.memory();
                    let queue = state.get_queue_mut();
                    if let Err(e) =
                        self.tracking
                            .put_used(indices[pos], queue, &mem, head, done.used_len)
                    {
                        warn!(
                            "queue {}: cannot complete request {head}: {e}",
                            indices[pos]
                        );
                    }
                    signal_if_needed(indices[pos], state, &mem);
                }
            }
            if !worker.zeroing.is_empty() {
                continue;
            }
            batch = None;
            if paused {
                return Served::Paused;
            }
            if self.stopping.load(Ordering::Acquire) {
                return Served::Done;
            }
            if !poll.is_zero()
                && wait_for_work(&states, &usable, &atomic.memory(), poll, &self.stopping)
            {
                continue;
            }
            let mut more = false;
            for (pos, state) in states.iter_mut().enumerate() {
                if !usable[pos] {
                    // Looking again would spin on the same error; the next
                    // kick (the driver fixed or reset the ring) brings us back.
                    let _ = state.enable_notification();
                    continue;
                }
                if !event_idx && poll.is_zero() {
                    // Kicks were never suppressed.
                    continue;
                }
                // Re-enable kicks; if work slipped in meanwhile, go round again.
                match state.enable_notification() {
                    Ok(true) => more = true,
                    Ok(false) => {}
                    Err(e) => {
                        debug!("queue {}: cannot enable notifications: {e}", indices[pos]);
                    }
                }
            }
            if !more {
                return Served::Done;
            }
        }
    }

    /// Runs every request currently available on the ring, asking after
    /// each one whether the driver wants to be told (EVENT_IDX): the driver
    /// asks once per wake-up, so this signals early in a batch and lets it
    /// refill the ring while the rest runs (measured: batching the signal to
    /// the end of the drain cost 8-10% IOPS at QD32).
    /// Each request runs inside the disk's gate, entered anew for it: a
    /// block job's pause (mirror pivot, checkpoint) waits for at most the
    /// request under way, not for the ring to run dry, which a busy guest
    /// may never let happen (while the other queues wait at the gate).
    /// A DISCARD or WRITE_ZEROES too large for one go is only taken here
    /// (into `zeroing`, with its gate batch moved to `batch`): the caller
    /// does its steps between drains.
    fn drain_sync<'g>(
        &'g self,
        (index, pos): (usize, usize),
        state: &mut VringState<'_>,
        atomic: &GuestMemory,
        (parser, zeroing, batch): SyncParts<'_, 'g>,
    ) -> Drain {
        let gate = self.disk.gate();
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return Drain::Empty;
            }
            // Count the requests first, then load the memory map for them.
            let Some(count) =
                self.tracking
                    .available(index, state.get_queue_mut(), &atomic.memory())
            else {
                debug!("queue {index}: ring not ready or avail index corrupted");
                return Drain::Unusable;
            };
            if count == 0 {
                return Drain::Empty;
            }
            let mem = atomic.memory();
            let snapshot = mem.clone().into_inner();
            for _ in 0..count {
                if self.stopping.load(Ordering::Acquire) {
                    return Drain::Empty;
                }
                let Some(request_batch) = gate.try_enter() else {
                    return Drain::Paused;
                };
                let chain = match self.tracking.pop(index, state.get_queue_mut(), &snapshot) {
                    Ok(chain) => chain,
                    Err(e) => {
                        debug!("queue {index}: {e}");
                        return Drain::Unusable;
                    }
                };
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let prepared = parser.prepare(chain, &mem, &self.disk, &self.cfg);
                if let Prepared::Zeroes { job, status } = prepared {
                    zeroing.push(Zeroing {
                        queue: pos,
                        head,
                        status,
                        job,
                        _mem: snapshot.clone(),
                        step: Step::Idle,
                    });
                    batch.get_or_insert(request_batch);
                    continue;
                }
                let done = parser.run(prepared, &self.disk);
                let queue = state.get_queue_mut();
                if let Err(e) = self
                    .tracking
                    .put_used(index, queue, &mem, head, done.used_len)
                {
                    warn!("queue {index}: cannot complete request {head}: {e}");
                    continue;
                }
                signal_if_needed(index, state, &mem);
            }
        }
    }

    /// The io_uring engine: see the module documentation.
    fn serve_uring(&self, thread: usize, vrings: &[Vring], worker: &mut Worker) -> Served {
        let Worker {
            parser,
            mem: atomic,
            engine,
            pending,
            zeroing,
            snapshots,
        } = worker;
        let (Some(atomic), Engine::Uring(engine)) = (atomic.as_ref(), engine) else {
            return Served::Done;
        };
        let engine = &mut **engine;
        let gate = self.disk.gate();
        let poll = Duration::from_micros(self.cfg.poll_us);
        let mut queues: Vec<ServedQueue<'_>> = served_vrings(vrings)
            .map(|(pos, state)| {
                let kick = state.get_kick().as_ref().map(|k| k.as_raw_fd());
                ServedQueue {
                    index: self.cfg.queue_of(thread, pos),
                    state,
                    kick,
                    // The kick poll in the ring does not consume the eventfd;
                    // after it fires we must drain the eventfd ourselves. That
                    // is only safe if the epoll batch that called us holds no
                    // event for it: the epoll loop would then read a drained
                    // blocking eventfd and hang. An eventfd that is not
                    // readable now has no such event pending (the loop's own
                    // read_kick emptied it, or it was not readable when the
                    // batch was collected). Otherwise we leave it to the epoll
                    // loop and look at the ring on completions and on a short
                    // timer instead.
                    may_drain: kick.is_some_and(|fd| !fd_readable(fd)),
                    kick_pending: false,
                    notifications_on: true,
                    usable: true,
                    finished: 0,
                    count: None,
                }
            })
            .collect();
        let mut armed_kicks: Vec<RawFd> = Vec::with_capacity(queues.len());
        // Held while requests are in flight: a pause waits for them.
        let mut batch: Option<BatchGuard<'_>> = None;
        let mut last_work = Instant::now();
        loop {
            for q in queues.iter_mut().filter(|q| q.notifications_on) {
                if let Err(e) = q.state.disable_notification() {
                    debug!("queue {}: cannot disable notifications: {e}", q.index);
                }
                q.notifications_on = false;
            }
            // Count the requests first, then load the memory map for them:
            // a frontend adds the region of a new buffer before it publishes
            // a request using it, so the map loaded after seeing a request
            // has its buffers. Older maps stay pinned while requests issued
            // on them are in flight.
            let current = atomic.memory();
            for q in queues.iter_mut() {
                q.count = self
                    .tracking
                    .available(q.index, q.state.get_queue_mut(), &current);
            }
            drop(current);
            let current = atomic.memory();
            snapshots.refresh(
                |m| std::ptr::eq(&**m, &*current),
                || current.clone().into_inner(),
            );
            drop(current);
            let Some(mem) = snapshots.current().cloned() else {
                return Served::Done;
            };

            let stopping = self.stopping.load(Ordering::Acquire);
            let mut taken = 0;
            if !stopping {
                if batch.is_none() {
                    // Nothing in flight: while I/O is paused, leave the
                    // queues (their locks) and wait outside.
                    match gate.try_enter() {
                        Some(b) => batch = Some(b),
                        None => return Served::Paused,
                    }
                }
                for (pos, q) in queues.iter_mut().enumerate() {
                    q.usable = q.count.is_some();
                    let Some(count) = q.count else {
                        continue;
                    };
                    if gate.is_paused() {
                        continue;
                    }
                    let (t, f, usable) = self.take_requests(
                        (q.index, pos),
                        q.state.get_queue_mut(),
                        &mem,
                        count,
                        (parser, engine, pending, zeroing, snapshots),
                    );
                    taken += t;
                    q.finished += f;
                    q.usable = usable;
                }
            }
            engine.submit();
            self.reap(&mut queues, &mem, engine, pending, snapshots, zeroing);
            self.step_zeroing(&mut queues, &mem, engine, zeroing);
            for fd in engine.take_kicks() {
                if let Some(q) = queues.iter_mut().find(|q| q.kick == Some(fd)) {
                    if q.may_drain {
                        drain_eventfd(q.kick);
                    } else {
                        q.kick_pending = true;
                    }
                }
            }
            let mut finished = 0;
            for q in queues.iter_mut().filter(|q| q.finished > 0) {
                signal_if_needed(q.index, &mut q.state, &mem);
                finished += std::mem::take(&mut q.finished);
            }
            if engine.in_flight() == 0 && zeroing.is_empty() {
                // A pause may go ahead now.
                batch = None;
            }
            // A zeroing whose step is on the engine is waited for as the
            // engine's other requests are.
            let zeroing_ready = zeroing.iter().any(|z| match z.step {
                Step::Done(_) => true,
                Step::Idle => engine.has_room(),
                Step::InFlight => false,
            });
            if taken > 0 || finished > 0 || zeroing_ready {
                last_work = Instant::now();
                continue;
            }

            let in_flight = engine.in_flight() > 0;
            if !in_flight && stopping {
                return Served::Done;
            }
            let paused = gate.is_paused();
            if !poll.is_zero() && last_work.elapsed() < poll && !stopping && !paused {
                // Spin on every ring: new requests or completions.
                if !engine.poll()
                    && !queues
                        .iter()
                        .any(|q| avail_nonempty(q.state.get_queue(), &mem))
                {
                    std::hint::spin_loop();
                }
                continue;
            }
            // Re-enable kicks; if work slipped in meanwhile, go round again.
            // Not for an unusable ring (a corrupted avail index looks busy
            // forever).
            let mut more = false;
            for q in queues.iter_mut() {
                q.notifications_on = true;
                let has_more = q.state.enable_notification().unwrap_or_else(|e| {
                    debug!("queue {}: cannot enable notifications: {e}", q.index);
                    false
                });
                more |= has_more && q.usable;
            }
            // Go round again for requests we can take now. Not while
            // stopping or paused, nor with the engine full: then wait for
            // completions (or a kick) instead of spinning.
            if more && !paused && !stopping && engine.has_room() {
                continue;
            }
            if in_flight {
                // Sleep until a request completes or a driver kicks.
                armed_kicks.clear();
                if !paused && !stopping {
                    armed_kicks.extend(
                        queues
                            .iter()
                            .filter(|q| !q.kick_pending)
                            .filter_map(|q| q.kick),
                    );
                }
                let recheck = (!paused && !stopping && queues.iter().any(|q| q.kick_pending))
                    .then_some(KICK_PENDING_RECHECK);
                engine.wait(&armed_kicks, recheck);
                continue;
            }
            if paused && more {
                // Requests wait for the pause to end: leave at the top of
                // the loop (nothing is in flight now).
                continue;
            }
            return Served::Done;
        }
    }

    /// Pops and starts up to `count` available requests, as many as the
    /// engine has room for. Returns (requests taken, requests finished on
    /// the spot, false if the ring is unusable: not ready, or a corrupted
    /// avail index).
    fn take_requests(
        &self,
        (index, pos): (usize, usize),
        queue: &mut Queue,
        mem: &Arc<GuestMemoryMmap>,
        count: u16,
        (parser, engine, pending, zeroing, snapshots): WorkerParts<'_>,
    ) -> (usize, usize, bool) {
        let snapshot = mem;
        let mem: &GuestMemoryMmap = mem;
        let disk = &*self.disk;
        let inline_lone = matches!(
            self.cfg.aio,
            AioEngine::IoUring {
                inline_lone: true,
                ..
            }
        );
        let (mut taken, mut finished) = (0, 0);
        // Requests the engine runs inline (a memory-backed or non-async
        // image) take their time here: look at the gate before each one.
        while engine.has_room() && taken < usize::from(count) && !disk.gate().is_paused() {
            let chain = match self.tracking.pop(index, queue, snapshot) {
                Ok(chain) => chain,
                Err(e) => {
                    debug!("queue {index}: {e}");
                    return (taken, finished, false);
                }
            };
            let Some(chain) = chain else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let mut prepared = parser.prepare(chain, mem, disk, &self.cfg);
            if let Prepared::Zeroes { job, status } = prepared {
                zeroing.push(Zeroing {
                    queue: pos,
                    head,
                    status,
                    job,
                    _mem: snapshot.clone(),
                    step: Step::Idle,
                });
                continue;
            }
            let lone = inline_lone && count == 1 && engine.in_flight() == 0;
            // A write that may wait for a filter (a copy-before-write) goes
            // to the engine, which parks it instead of blocking the thread.
            let may_block = matches!(prepared, Prepared::Write { .. }) && disk.hooks_may_block();
            if lone && !may_block {
                // Nothing to overlap with: skip the ring (see AioEngine).
                prepared = Prepared::Done(parser.run(prepared, disk));
            }
            let (status, data_len) = match prepared {
                Prepared::Done(done) => {
                    finished += 1;
                    complete(&self.tracking, index, queue, mem, head, done);
                    continue;
                }
                Prepared::Read { status, len, .. } => (status, len),
                Prepared::Write { status, .. }
                | Prepared::Flush { status }
                | Prepared::Zeroes { status, .. } => (status, 0),
            };
            let Some(pin) = snapshots.pin() else {
                break;
            };
            let token = pending.insert(Pending {
                queue: pos,
                head,
                status,
                data_len,
                mem: pin,
                seq: 0,
            }) as u64;
            match prepared {
                // SAFETY: the buffers point into the guest memory snapshot
                // pinned for this request until its completion is reaped, and
                // this worker does not leave serve_uring (nor drop the engine)
                // while requests are in flight.
                Prepared::Read { offset, .. } => unsafe {
                    engine.read(disk, offset, parser.data(), token)
                },
                // SAFETY: as above.
                Prepared::Write { offset, .. } if lone => unsafe {
                    engine.write_inline(disk, offset, parser.data(), token)
                },
                // SAFETY: as above.
                Prepared::Write { offset, .. } => unsafe {
                    engine.write(disk, offset, parser.data(), token)
                },
                Prepared::Flush { .. } | Prepared::Done(_) | Prepared::Zeroes { .. } => {
                    engine.flush(disk, token)
                }
            }
        }
        (taken, finished, true)
    }

    /// Takes in the zeroing steps the engine finished, completing the
    /// zeroings that are done (counted in their queue's `finished`), and
    /// starts one step on the engine: of the first zeroing without one,
    /// which then goes last.
    fn step_zeroing(
        &self,
        queues: &mut [ServedQueue<'_>],
        mem: &GuestMemoryMmap,
        engine: &mut UringEngine,
        zeroing: &mut Vec<Zeroing>,
    ) {
        let mut i = 0;
        while i < zeroing.len() {
            let z = &mut zeroing[i];
            let result = match std::mem::replace(&mut z.step, Step::Idle) {
                Step::Done(result) => result,
                other => {
                    z.step = other;
                    i += 1;
                    continue;
                }
            };
            let Some(result) = z.job.step_done(result) else {
                i += 1;
                continue;
            };
            let z = zeroing.remove(i);
            // The status byte lies in `z._mem`, mapped while we hold it.
            let done = RequestParser::finish(z.status, result, 0);
            if let Some(q) = queues.get_mut(z.queue) {
                complete(
                    &self.tracking,
                    q.index,
                    q.state.get_queue_mut(),
                    mem,
                    z.head,
                    done,
                );
                q.finished += 1;
            }
        }
        if !engine.has_room() {
            return;
        }
        let Some(i) = zeroing.iter().position(|z| matches!(z.step, Step::Idle)) else {
            return;
        };
        let mut z = zeroing.remove(i);
        z.step = match z.job.next_step() {
            Some((offset, len, op)) => {
                engine.zeroes(&self.disk, offset, len, op, z.token());
                Step::InFlight
            }
            // Nothing left (no segment): finishes on the next round.
            None => Step::Done(Ok(())),
        };
        zeroing.push(z);
    }

    /// Completes every request the engine has finished, counting them in
    /// their queue's `finished`.
    fn reap(
        &self,
        queues: &mut [ServedQueue<'_>],
        mem: &GuestMemoryMmap,
        engine: &mut UringEngine,
        pending: &mut Slab,
        snapshots: &mut Pins<Arc<GuestMemoryMmap>>,
        zeroing: &mut [Zeroing],
    ) {
        engine.reap(&self.disk, |token, result| {
            if token & ZEROING_TOKEN != 0 {
                match zeroing.iter_mut().find(|z| z.token() == token) {
                    Some(z) => z.step = Step::Done(result),
                    None => warn!("completion of unknown zeroing step {token:#x}"),
                }
                return;
            }
            let Some(p) = pending.remove(token as usize) else {
                warn!("completion of unknown request {token}");
                return;
            };
            // Status first, while the request's snapshot is still pinned.
            let done = RequestParser::finish(p.status, result, p.data_len);
            snapshots.unpin(p.mem);
            if let Some(q) = queues.get_mut(p.queue) {
                let queue = q.state.get_queue_mut();
                complete(&self.tracking, q.index, queue, mem, p.head, done);
                q.finished += 1;
            }
        });
    }
}

/// One queue of a worker thread's io_uring loop.
struct ServedQueue<'a> {
    /// The queue's index on the device (for logs).
    index: usize,
    state: VringState<'a>,
    kick: Option<RawFd>,
    /// Whether a fired kick poll may be drained here (see `serve_uring`).
    may_drain: bool,
    /// A kick fired that only the epoll loop may drain: look at the ring
    /// on a timer instead of polling the fd.
    kick_pending: bool,
    notifications_on: bool,
    usable: bool,
    /// Requests completed since the guest was last signalled.
    finished: usize,
    /// Requests available at the top of the current round.
    count: Option<u16>,
}

/// The parts of a worker that `drain_sync` uses, and the gate batch that
/// its zeroings hold.
type SyncParts<'a, 'g> = (
    &'a mut RequestParser,
    &'a mut Vec<Zeroing>,
    &'a mut Option<BatchGuard<'g>>,
);

/// The parts of a worker that `take_requests` uses.
type WorkerParts<'a> = (
    &'a mut RequestParser,
    &'a mut UringEngine,
    &'a mut Slab,
    &'a mut Vec<Zeroing>,
    &'a mut Pins<Arc<GuestMemoryMmap>>,
);

/// Does one step of the zeroing whose turn it is; when that was its last,
/// removes it and returns its (queue position, head, completion).
fn step_zeroing(zeroing: &mut Vec<Zeroing>, disk: &Disk) -> Option<(usize, u16, Completion)> {
    let z = zeroing.first_mut()?;
    let Some(done) = z.step(disk) else {
        zeroing.rotate_left(1);
        return None;
    };
    let z = zeroing.remove(0);
    Some((z.queue, z.head, done))
}

/// Puts a finished request in the used ring.
fn complete(
    tracking: &Tracking,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    done: Completion,
) {
    if let Err(e) = tracking.put_used(index, queue, mem, head, done.used_len) {
        warn!("queue {index}: cannot complete request {head}: {e}");
    }
}

/// Signals the guest if it asked to be (EVENT_IDX) or always (without).
fn signal_if_needed(index: usize, state: &mut VringState<'_>, mem: &GuestMemoryMmap) {
    match state.get_queue_mut().needs_notification(mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = state.signal_used_queue() {
                debug!("queue {index}: cannot signal the frontend: {e}");
            }
        }
    }
}

/// True if the driver has made requests available that we have not taken.
fn avail_nonempty(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    matches!(queue.avail_idx(mem, Ordering::Acquire), Ok(idx) if idx.0 != queue.next_avail())
}

/// True if `fd` is readable now.
fn fd_readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLIN != 0 }
}

/// Empties a kick eventfd without ever blocking (it may be a blocking fd
/// whose count the epoll loop already consumed).
fn drain_eventfd(fd: Option<RawFd>) {
    let Some(fd) = fd else {
        return;
    };
    let mut count = [0u8; 8];
    let iov = libc::iovec {
        iov_base: count.as_mut_ptr().cast(),
        iov_len: count.len(),
    };
    // SAFETY: reads at most 8 bytes into `count`; RWF_NOWAIT never blocks.
    let n = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
    if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
        // Old kernels: look before reading.
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout; then a read of 8 bytes.
        unsafe {
            if libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLIN != 0 {
                libc::read(fd, count.as_mut_ptr().cast(), count.len());
            }
        }
    }
}

/// The vrings of a thread that may be served (the frontend enabled them),
/// locked, with their positions among the thread's vrings. The lock of a
/// vring also keeps the frontend from changing it while it is served.
fn served_vrings(vrings: &[Vring]) -> impl Iterator<Item = (usize, VringState<'_>)> {
    vrings
        .iter()
        .enumerate()
        .map(|(pos, vring)| (pos, vring.get_mut()))
        .filter(|(_, state)| state.is_enabled())
}

/// Spins for up to `window` waiting for new requests on any of the usable
/// queues (an unusable one, with a corrupted avail index, looks busy
/// forever); true if some arrived.
fn wait_for_work(
    states: &[VringState<'_>],
    usable: &[bool],
    mem: &GuestMemoryMmap,
    window: Duration,
    stopping: &AtomicBool,
) -> bool {
    let deadline = Instant::now() + window;
    let watched: Vec<&VringState<'_>> = states
        .iter()
        .zip(usable)
        .filter(|(_, &u)| u)
        .map(|(s, _)| s)
        .collect();
    if watched.is_empty() {
        return false;
    }
    loop {
        for state in &watched {
            let queue = state.get_queue();
            if matches!(queue.avail_idx(mem, Ordering::Acquire), Ok(idx) if idx.0 != queue.next_avail())
            {
                return true;
            }
        }
        if stopping.load(Ordering::Relaxed) || Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

impl VhostUserBackend for BlockDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        self.disk
            .set_writeback(DeviceConfig::default_writeback(features));
    }

    fn reset_device(&self) {
        self.acked.store(0, Ordering::Relaxed);
        self.disk
            .set_writeback(DeviceConfig::default_writeback(self.cfg.features()));
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.cfg.config_bytes(self.disk.writeback(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-back flag is writable (VIRTIO_BLK_F_CONFIG_WCE).
        match buf {
            [wce] if offset == DeviceConfig::wce_offset() => {
                let acked = self.acked.load(Ordering::Relaxed);
                // Without CONFIG_WCE the field is read-only: ignored (as
                // QEMU's devices do), not an error that ends the session.
                match DeviceConfig::writeback_from_wce(acked, *wce) {
                    Some(on) => {
                        debug!("write cache {}", if on { "on" } else { "off" });
                        self.disk.set_writeback(on);
                    }
                    None => debug!("wce written without CONFIG_WCE negotiated: ignored"),
                }
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only the writeback field of the config space is writable",
            )),
        }
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        if let Err(e) = check_regions(&mem.memory(), self.cfg.allow_unsealed_memory) {
            warn!("refusing the frontend's memory table: {e}; this session is not served");
            self.memory_refused.store(true, Ordering::Release);
            return Err(e);
        }
        // The atomic is shared and updated in place by vhost-user-backend:
        // keeping it once is enough for every later update to be seen. Not
        // stored in the workers: they may be busy, and this must not wait.
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let mut masks = vec![0u64; self.cfg.num_threads()];
        for q in 0..usize::from(self.cfg.num_queues) {
            masks[self.cfg.thread_of(q)] |= 1 << q;
        }
        masks
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the worker leaves its handler only with nothing in
        // flight, so taking its lock waits for every accepted request.
        drop(self.worker(self.cfg.thread_of(queue_index as usize)));
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Whichever of the thread's queues was kicked, the worker looks at
        // all of them: they share its engine.
        // vhost-user-backend starts these threads: confine them here.
        crate::seccomp::enter_once(crate::seccomp::Kind::Queue);
        if self.memory_refused.load(Ordering::Acquire) {
            return Ok(());
        }
        if usize::from(device_event) < vrings.len() {
            while self.serve(thread_id, vrings) == Served::Paused {
                // No lock held here: control messages (GET_VRING_BASE takes
                // the vring locks, `stop_vring` the worker's) go ahead.
                self.disk.gate().wait_resumed();
            }
        }
        // Never return an error: it would end this queue's worker thread.
        Ok(())
    }
}

/// Checks that every region of the frontend's memory lies inside its file:
/// mmap accepts a range past the end, but touching it raises SIGBUS. Unless
/// `allow_unsealed`, the file must also be sealed against shrinking, or the
/// frontend could cut it off later (seals are checked first: once sealed,
/// the length checked next can no longer drop).
fn check_regions(mem: &GuestMemoryMmap, allow_unsealed: bool) -> io::Result<()> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        if !allow_unsealed && !sealed_against_shrinking(fo.file()) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "memory region at guest address {:#x} is in a file not sealed against \
                     shrinking (F_SEAL_SHRINK), which the frontend could cut off under us; \
                     QEMU's memory-backend-memfd seals by default, --allow-unsealed-memory \
                     accepts such memory from a trusted frontend",
                    region.start_addr().0
                ),
            ));
        }
        let file_len = fo.file().metadata()?.len();
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > file_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "memory region at guest address {:#x} ({} bytes from file offset {}) runs past the end of its {}-byte file",
                    region.start_addr().0,
                    region.len(),
                    fo.start(),
                    file_len
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `file` carries F_SEAL_SHRINK (which can never be removed). Files
/// that cannot be sealed at all (not a memfd) answer no.
fn sealed_against_shrinking(file: &std::fs::File) -> bool {
    // SAFETY: F_GET_SEALS takes no argument and only reads the seals of an
    // open descriptor.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "device_teardown_tests.rs"]
mod teardown_tests;

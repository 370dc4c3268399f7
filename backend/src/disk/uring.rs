//! An io_uring engine: reads, writes and flushes of one queue worker
//! submitted asynchronously, so that one thread keeps many requests at the
//! disk at once (a synchronous `preadv2` per request leaves a queue with a
//! single request at the device: fast on tmpfs, slow on real disks with
//! O_DIRECT).
//!
//! One engine belongs to one thread (the ring is set up single-issuer, with
//! completion work deferred to the moments the thread waits for it), so it
//! needs no lock. The caller submits requests identified by a token of its
//! own and later reaps `(token, result)` pairs, each token exactly once.
//! The engine does everything the synchronous `Disk` methods do around the
//! transfer: range and read-only checks and `before_write` hooks at
//! submission, `after_write`/`after_flush` hooks at completion; it retries
//! short transfers and `EAGAIN`/`EINTR`. A request the image cannot take
//! asynchronously (no fd, O_DIRECT with misaligned buffers, more iovecs than
//! the kernel takes) runs synchronously at submission and is reaped like
//! the others; so does every request on a memory-backed image when the
//! engine is told to run those inline (`set_inline_memory`).
//!
//! A write whose hooks have long work to do first (a copy-before-write
//! filter's copy, run on the filter's own threads) is parked without a
//! slot in the ring until the work is done or its deadline passes; so is
//! a write that landed and whose hooks have long work to do before it may
//! complete (a write-blocking mirror's write to its target). An eventfd
//! polled in the ring wakes the thread for them, so the thread's other
//! requests go on meanwhile.
//!
//! Each request keeps the image it was issued on alive until it completes
//! (a mirror pivot may switch images; see `Pins`), and its buffers must stay
//! valid until it is reaped: submission is `unsafe` for that reason.

use super::pins::{PinId, Pins};
use super::{
    Disk, DiskError, PendingEnd, PendingWrite, WriteEnd, WriteOp, WriteStart, WriteTicket,
};
use crate::image::{Durable, Image, ImageError};
use crate::iobuf::{total_len, IoBuf};
use io_uring::{opcode, squeue, types, IoUring};
use log::{error, warn};
use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

/// Largest number of iovecs one READV/WRITEV takes (UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// Tag of the user_data of the kick poll (the low bits count generations).
const KICK_TAG: u64 = 1 << 63;
/// user_data of the poll on the wake-up eventfd of parked writes.
const PARK_TAG: u64 = 1 << 62;
/// Resubmissions of one request that made no progress (`EAGAIN`, `EINTR`)
/// before it fails; a transfer that moves bytes resets the count.
const MAX_RETRIES: u32 = 100_000;

/// What a slot is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write { fua: bool },
    Flush,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write { .. } => "write",
            Kind::Flush => "flush",
        }
    }
}

/// One request in the ring.
struct Slot {
    token: u64,
    kind: Kind,
    fd: RawFd,
    offset: u64,
    len: u64,
    /// The request's buffers as submitted (the `after_write` hooks see them);
    /// valid until the request is reaped, by `read`'s and `write`'s contract.
    bufs: Vec<IoBuf<'static>>,
    /// What is left after a short transfer (only used then).
    rest: Vec<IoBuf<'static>>,
    /// Bytes transferred so far.
    done: u64,
    retries: u32,
    image: Option<PinId>,
    /// A write's hooks, ended when the write is.
    ticket: Option<WriteTicket>,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            token: 0,
            kind: Kind::Flush,
            fd: -1,
            offset: 0,
            len: 0,
            bufs: Vec::new(),
            rest: Vec::new(),
            done: 0,
            retries: 0,
            image: None,
            ticket: None,
        }
    }
}

/// A write waiting for its hooks' work, before it is issued or after it
/// landed.
struct Parked {
    token: u64,
    offset: u64,
    body: Body,
    phase: Phase,
}

/// What a parked write writes.
enum Body {
    /// Data; valid until the request is reaped, by `write`'s contract.
    Data(Vec<IoBuf<'static>>),
    /// A discard or write-zeroes of this many bytes.
    Zeroes(u64, WriteOp<'static>),
}

impl Body {
    fn op(&self) -> WriteOp<'_> {
        match self {
            Body::Data(bufs) => WriteOp::Data(bufs),
            Body::Zeroes(_, op) => *op,
        }
    }
}

/// Which side of the transfer a parked write waits on.
enum Phase {
    /// Not issued yet.
    Start(PendingWrite),
    /// Landed on the image; the request completes when its hooks end.
    End(PendingEnd),
}

impl Phase {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Start(w) => w.deadline(),
            Phase::End(w) => w.deadline(),
        }
    }
}

/// Wakes the engine's thread for its parked writes: writes an eventfd
/// the ring polls.
struct EventWaker(OwnedFd);

impl Wake for EventWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. A
        // full counter (EAGAIN) is already readable: nothing is lost.
        unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}

/// A finished request: the caller's token and how it ended.
pub type Reaped = (u64, Result<(), DiskError>);

/// Per-thread io_uring submission and completion of disk requests.
pub struct UringEngine {
    /// Dropped only once the kernel is done with every request (see `Drop`).
    ring: ManuallyDrop<IoUring>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Requests finished at submission (synchronous fallback, refused
    /// before issue), reported by the next `reap`.
    ready: VecDeque<Reaped>,
    images: Pins<Arc<Box<dyn Image>>>,
    /// The kick fds a poll is armed on, with the generation of each poll.
    kick_armed: Vec<(RawFd, u64)>,
    kick_gen: u64,
    /// Kick fds whose poll fired since the last `take_kicks`.
    kicked: Vec<RawFd>,
    /// Completions copied out of the ring before they are processed (their
    /// processing may push new entries).
    cqes: Vec<(u64, i32)>,
    /// Run requests on memory-backed images synchronously.
    inline_memory: bool,
    stats: EngineStats,
    /// Writes waiting for their hooks' work (hold no slot).
    parked: VecDeque<Parked>,
    /// Wakes this thread when a parked write's work is done.
    waker: Waker,
    wake_fd: RawFd,
    /// A poll on `wake_fd` is in the ring.
    wake_armed: bool,
}

/// Counters of the unusual paths, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Transfers that came back short and were resubmitted for the rest.
    pub short_transfers: u64,
    /// Resubmissions after `EAGAIN`/`EINTR`.
    pub retries: u64,
    /// Requests run synchronously: the image could not take them
    /// asynchronously, or it is memory-backed and the engine runs those
    /// inline, or the caller asked (`write_inline`).
    pub synchronous: u64,
}

/// How an `io_uring_enter` failure is handled: these just mean "try later".
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY) | Some(libc::ETIME)
    )
}

impl UringEngine {
    /// An engine for up to `depth` requests in flight. Fails where io_uring
    /// is unavailable (old kernel, seccomp, `kernel.io_uring_disabled`).
    pub fn new(depth: u32) -> io::Result<UringEngine> {
        let depth = depth.clamp(1, 4096);
        // One entry more for the kick poll.
        let entries = (depth + 1).next_power_of_two().max(8);
        // Single issuer + deferred task work: completions are gathered only
        // when this thread waits for them, with no inter-processor
        // interrupts to tell it; kernels before 6.1 lack them, so fall back.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_submit_all()
            .setup_cqsize(entries * 2)
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))?;
        // SAFETY: plain eventfd creation; the fd is owned at once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nobody else owns.
        let wake = Arc::new(EventWaker(unsafe { OwnedFd::from_raw_fd(fd) }));
        Ok(UringEngine {
            ring: ManuallyDrop::new(ring),
            slots: (0..depth).map(|_| Slot::empty()).collect(),
            free: (0..depth).rev().collect(),
            ready: VecDeque::with_capacity(depth as usize),
            images: Pins::default(),
            kick_armed: Vec::new(),
            kick_gen: 0,
            kicked: Vec::new(),
            cqes: Vec::with_capacity(entries as usize * 2),
            inline_memory: false,
            stats: EngineStats::default(),
            parked: VecDeque::new(),
            wake_fd: wake.0.as_raw_fd(),
            waker: Waker::from(wake),
            wake_armed: false,
        })
    }

    /// Whether requests on a memory-backed image (`Image::memory_backed`)
    /// run synchronously at submission instead of going through the ring.
    /// The kernel cannot do a tmpfs transfer without blocking, so the ring
    /// hands each one to an io_uring worker thread: that pays where the
    /// workers have idle cores to copy on, and costs a context switch or
    /// two per request where the queue threads already keep every core
    /// busy (see `vubd`'s `--aio`).
    pub fn set_inline_memory(&mut self, on: bool) {
        self.inline_memory = on;
    }

    /// Lets go of every image no request in flight uses, the active one
    /// included: for a worker going idle, so that an image replaced while
    /// it sleeps (a mirror pivot) closes without waiting for its next
    /// request. The next request takes the active image again.
    pub fn release_unused(&mut self) {
        self.images.release_unused();
    }

    /// Counters of short transfers, retries and synchronous fallbacks.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Requests that may be in flight at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.ready.len() + self.parked.len()
    }

    /// True if another request can be submitted now.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty() && self.in_flight() < self.slots.len()
    }

    /// Pins the active image for a request on `bufs` and returns the fd to
    /// issue it on, or None if the request is to run synchronously (the
    /// image cannot take it asynchronously, or `set_inline_memory`).
    fn pin_image(&mut self, disk: &Disk, bufs: &[IoBuf]) -> Option<(RawFd, PinId)> {
        if bufs.len() > IOV_MAX {
            return None;
        }
        let images = &mut self.images;
        let inline_memory = self.inline_memory;
        disk.with_image(|img| {
            if inline_memory && img.memory_backed() {
                return None;
            }
            let fd = img.async_fd(bufs)?;
            images.refresh(|cur| Arc::ptr_eq(cur, img), || img.clone());
            images.pin().map(|id| (fd, id))
        })
    }

    /// Takes a free slot for a request (None: the caller overfilled us).
    fn take_slot(&mut self) -> Option<u32> {
        if self.in_flight() >= self.slots.len() {
            return None;
        }
        self.free.pop()
    }

    /// Starts a read of `bufs.len()` bytes at `offset` into `bufs`.
    ///
    /// # Safety
    /// Every buffer must stay valid (mapped, writable) until this token is
    /// reaped: the kernel writes into it asynchronously.
    pub unsafe fn read(&mut self, disk: &Disk, offset: u64, bufs: &[IoBuf], token: u64) {
        let len = total_len(bufs);
        if let Err(e) = disk.check_read(offset, len) {
            self.ready.push_back((token, Err(e)));
            return;
        }
        let Some((fd, image)) = self.pin_image(disk, bufs) else {
            self.stats.synchronous += 1;
            self.ready.push_back((token, disk.read(offset, bufs)));
            return;
        };
        // SAFETY: the caller keeps `bufs` valid until the token is reaped.
        unsafe { self.start(Kind::Read, (fd, image), offset, bufs, token, None) };
    }

    /// Starts a write of `bufs` at `offset`, durable on completion unless
    /// the disk is in write-back mode; `before_write` hooks run now,
    /// `after_write` hooks when it has landed.
    ///
    /// # Safety
    /// Every buffer must stay valid (mapped, readable, unchanged by us)
    /// until this token is reaped: the kernel reads it asynchronously.
    pub unsafe fn write(&mut self, disk: &Disk, offset: u64, bufs: &[IoBuf], token: u64) {
        // SAFETY: per this function's contract.
        unsafe { self.write_with(disk, offset, bufs, token, false) }
    }

    /// `write` for a request that is better run synchronously (a lone
    /// request on the page cache): the transfer runs at submission, but a
    /// write whose hooks have work to do first (a copy-before-write) is
    /// parked like any other instead of blocking the thread.
    ///
    /// # Safety
    /// As `write`.
    pub unsafe fn write_inline(&mut self, disk: &Disk, offset: u64, bufs: &[IoBuf], token: u64) {
        // SAFETY: per this function's contract.
        unsafe { self.write_with(disk, offset, bufs, token, true) }
    }

    /// # Safety
    /// As `write`.
    unsafe fn write_with(
        &mut self,
        disk: &Disk,
        offset: u64,
        bufs: &[IoBuf],
        token: u64,
        inline: bool,
    ) {
        let len = total_len(bufs);
        let start = match disk.hooks_may_block() {
            false => disk.start_write(offset, len).map(WriteStart::Ready),
            true => disk.start_write_nowait(offset, len, &self.waker),
        };
        match start {
            // SAFETY: per this function's contract.
            Ok(WriteStart::Ready(ticket)) => unsafe {
                self.issue_write(disk, (offset, bufs, token), ticket, inline)
            },
            Ok(WriteStart::Waiting(write)) => {
                // SAFETY: per this function's contract.
                let bufs = bufs.iter().map(|b| unsafe { b.extend::<'static>() });
                let body = Body::Data(bufs.collect());
                self.park(token, offset, body, Phase::Start(write));
            }
            Err(e) => self.ready.push_back((token, Err(e))),
        }
    }

    /// Starts a discard (`op` is `WriteOp::Discard`) or a write-zeroes
    /// (`WriteOp::Zeroes`) of `len` bytes at `offset`. The image's part
    /// runs at submission (a fallocate, or zeroes written on files that
    /// cannot deallocate); hooks with long work on either side park the
    /// request instead of blocking the thread.
    pub fn zeroes(&mut self, disk: &Disk, offset: u64, len: u64, op: WriteOp<'static>, token: u64) {
        if matches!(op, WriteOp::Data(_)) {
            let e = DiskError::Hook("engine: data given as a zeroes request".into());
            self.ready.push_back((token, Err(e)));
            return;
        }
        match disk.start_write_nowait(offset, len, &self.waker) {
            Ok(WriteStart::Ready(ticket)) => {
                self.run_zeroes(disk, (offset, len, op, token), ticket)
            }
            Ok(WriteStart::Waiting(write)) => {
                self.park(token, offset, Body::Zeroes(len, op), Phase::Start(write))
            }
            Err(e) => self.ready.push_back((token, Err(e))),
        }
    }

    /// The image's part of a zeroes request whose hooks have started.
    fn run_zeroes(
        &mut self,
        disk: &Disk,
        (offset, len, op, token): (u64, u64, WriteOp<'static>, u64),
        ticket: WriteTicket,
    ) {
        self.stats.synchronous += 1;
        // On error the ticket drops: the hooks hear the write failed.
        let result = match disk.write_image(offset, len, op) {
            Err(e) => Some(Err(e)),
            Ok(()) => self.end_write((offset, Body::Zeroes(len, op), token), ticket),
        };
        if let Some(result) = result {
            self.ready.push_back((token, result));
        }
    }

    fn park(&mut self, token: u64, offset: u64, body: Body, phase: Phase) {
        self.parked.push_back(Parked {
            token,
            offset,
            body,
            phase,
        });
        self.arm_wake();
    }

    /// Ends a write that landed: its outcome, or None if it is parked on
    /// its hooks' after-write work (reported once that is done).
    fn end_write(
        &mut self,
        (offset, body, token): (u64, Body, u64),
        ticket: WriteTicket,
    ) -> Option<Result<(), DiskError>> {
        match ticket.landed_nowait(body.op(), &self.waker) {
            WriteEnd::Done(result) => Some(result),
            WriteEnd::Waiting(end) => {
                self.park(token, offset, body, Phase::End(end));
                None
            }
        }
    }

    /// Polls the parked writes: those whose hooks are done are issued,
    /// fail or finish; the others stay parked.
    fn resume_parked(&mut self, disk: &Disk) {
        for _ in 0..self.parked.len() {
            let Some(Parked {
                token,
                offset,
                body,
                phase,
            }) = self.parked.pop_front()
            else {
                break;
            };
            match phase {
                Phase::Start(write) => match (write.poll(&self.waker), body) {
                    (Ok(WriteStart::Waiting(write)), body) => {
                        self.park(token, offset, body, Phase::Start(write))
                    }
                    // SAFETY: `bufs` are valid until the token is reaped, by
                    // `write`'s contract.
                    (Ok(WriteStart::Ready(ticket)), Body::Data(bufs)) => unsafe {
                        self.issue_write(disk, (offset, &bufs, token), ticket, false)
                    },
                    (Ok(WriteStart::Ready(ticket)), Body::Zeroes(len, op)) => {
                        self.run_zeroes(disk, (offset, len, op, token), ticket)
                    }
                    (Err(e), _) => self.ready.push_back((token, Err(e))),
                },
                Phase::End(end) => match end.poll(body.op(), &self.waker) {
                    WriteEnd::Waiting(end) => self.park(token, offset, body, Phase::End(end)),
                    WriteEnd::Done(result) => self.ready.push_back((token, result)),
                },
            }
        }
    }

    /// Puts a poll on the wake-up eventfd in the ring, if none is there.
    fn arm_wake(&mut self) {
        if !self.wake_armed {
            let poll = opcode::PollAdd::new(types::Fd(self.wake_fd), libc::POLLIN as u32)
                .build()
                .user_data(PARK_TAG);
            self.push(poll);
            self.wake_armed = true;
        }
    }

    /// The earliest deadline of the parked writes' hooks.
    fn parked_deadline(&self) -> Option<Instant> {
        self.parked.iter().filter_map(|p| p.phase.deadline()).min()
    }

    /// Issues a write whose hooks have all started, synchronously if
    /// `inline` or the image cannot take it asynchronously.
    ///
    /// # Safety
    /// As `write`.
    unsafe fn issue_write(
        &mut self,
        disk: &Disk,
        (offset, bufs, token): (u64, &[IoBuf], u64),
        ticket: WriteTicket,
        inline: bool,
    ) {
        let fua = !disk.writeback();
        let pinned = match inline {
            true => None,
            false => self.pin_image(disk, bufs),
        };
        let Some((fd, image)) = pinned else {
            self.stats.synchronous += 1;
            if let Err(e) = disk.with_image(|img| img.write_at(bufs, offset, fua)) {
                // The ticket drops: the hooks hear the write failed.
                self.ready.push_back((token, Err(e.into())));
                return;
            }
            // SAFETY: the caller keeps `bufs` valid until the token is reaped.
            let bufs = Body::Data(bufs.iter().map(|b| unsafe { b.extend() }).collect());
            if let Some(result) = self.end_write((offset, bufs, token), ticket) {
                self.ready.push_back((token, result));
            }
            return;
        };
        // SAFETY: the caller keeps `bufs` valid until the token is reaped.
        unsafe {
            self.start(
                Kind::Write { fua },
                (fd, image),
                offset,
                bufs,
                token,
                Some(ticket),
            )
        };
    }

    /// Starts a flush: every write completed before it becomes durable,
    /// then the `after_flush` hooks run. It does not wait for writes still
    /// in flight (virtio-blk promises durability for completed writes only).
    pub fn flush(&mut self, disk: &Disk, token: u64) {
        let Some((fd, image)) = self.pin_image(disk, &[]) else {
            self.stats.synchronous += 1;
            self.ready.push_back((token, disk.flush()));
            return;
        };
        // SAFETY: no buffers.
        unsafe { self.start(Kind::Flush, (fd, image), 0, &[], token, None) };
    }

    /// Puts a request in a free slot and queues it.
    ///
    /// # Safety
    /// `bufs` must stay valid until the request is reaped.
    unsafe fn start(
        &mut self,
        kind: Kind,
        (fd, image): (RawFd, PinId),
        offset: u64,
        bufs: &[IoBuf],
        token: u64,
        ticket: Option<WriteTicket>,
    ) {
        let Some(idx) = self.take_slot() else {
            // The ticket drops: a write's hooks hear it failed.
            self.images.unpin(image);
            let err = io::Error::other("io_uring engine overfilled");
            self.ready.push_back((
                token,
                Err(Self::image_err(kind, offset, total_len(bufs), err)),
            ));
            return;
        };
        let slot = &mut self.slots[idx as usize];
        slot.token = token;
        slot.kind = kind;
        slot.fd = fd;
        slot.offset = offset;
        slot.len = total_len(bufs);
        slot.bufs.clear();
        // SAFETY: per this function's contract.
        slot.bufs
            .extend(bufs.iter().map(|b| unsafe { b.extend::<'static>() }));
        slot.rest.clear();
        slot.done = 0;
        slot.retries = 0;
        slot.image = Some(image);
        slot.ticket = ticket;
        self.issue(idx);
    }

    /// Queues the (remaining) transfer of slot `idx` in the submission ring.
    fn issue(&mut self, idx: u32) {
        let slot = &self.slots[idx as usize];
        let fd = types::Fd(slot.fd);
        let iov: &[IoBuf<'_>] = if slot.done == 0 {
            &slot.bufs
        } else {
            &slot.rest
        };
        let pos = slot.offset + slot.done;
        let entry = match slot.kind {
            Kind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Read | Kind::Write { .. } => {
                let rw_flags = match slot.kind {
                    Kind::Write { fua: true } => libc::RWF_DSYNC,
                    _ => 0,
                };
                // One buffer (the common 4k request) needs no iovec import.
                match iov {
                    [one] if u32::try_from(one.len()).is_ok() => {
                        let len = one.len() as u32;
                        if slot.kind == Kind::Read {
                            opcode::Read::new(fd, one.ptr(), len)
                                .offset(pos)
                                .rw_flags(rw_flags)
                                .build()
                        } else {
                            opcode::Write::new(fd, one.ptr(), len)
                                .offset(pos)
                                .rw_flags(rw_flags)
                                .build()
                        }
                    }
                    _ => {
                        let ptr = iov.as_ptr().cast::<libc::iovec>();
                        let count = iov.len() as u32;
                        if slot.kind == Kind::Read {
                            opcode::Readv::new(fd, ptr, count)
                                .offset(pos)
                                .rw_flags(rw_flags)
                                .build()
                        } else {
                            opcode::Writev::new(fd, ptr, count)
                                .offset(pos)
                                .rw_flags(rw_flags)
                                .build()
                        }
                    }
                }
            }
        };
        self.push(entry.user_data(u64::from(idx)));
    }

    /// Puts an entry in the submission ring, making room if it is full.
    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: the buffers an entry points at (iovec arrays and data,
            // in a slot, or nothing) stay valid until its completion is
            // reaped: slots are reused only after that, and the caller of
            // `read`/`write` promised the data buffers.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Full: hand what is queued to the kernel. The ring has room for
            // every slot plus the kick poll, so this is a formality.
            if let Err(e) = self.ring.submit() {
                if !transient(&e) {
                    error!("io_uring submit failed: {e}");
                }
                std::thread::yield_now();
            }
        }
    }

    /// Hands every queued entry to the kernel without waiting, and has the
    /// kernel post the completions it is holding back (deferred task work).
    /// Requests that complete at once (page-cache hits) and those that
    /// completed meanwhile are ready to reap afterwards.
    pub fn submit(&mut self) {
        let idle = {
            let sq = self.ring.submission();
            sq.is_empty() && !sq.taskrun()
        };
        if idle {
            return;
        }
        if let Err(e) = self.ring.submit() {
            if !transient(&e) {
                error!("io_uring submit failed: {e}");
            }
        }
    }

    /// True if `reap` has something to report, after a non-blocking look
    /// (`submit`): for busy polling.
    pub fn poll(&mut self) -> bool {
        if !self.ready.is_empty() {
            return true;
        }
        self.submit();
        !self.ring.completion().is_empty()
    }

    /// Submits what is queued and sleeps until at least one request
    /// completes, or one of `kicks` becomes readable (virtqueue kick
    /// eventfds: new requests while others are in flight), or `timeout`
    /// passes. Returns at once if something is already there to reap.
    pub fn wait(&mut self, kicks: &[RawFd], timeout: Option<Duration>) {
        if !self.ready.is_empty() || !self.ring.completion().is_empty() {
            self.submit();
            return;
        }
        self.arm_kicks(kicks);
        // A parked write's deadline ends the wait too (its policy applies).
        let timeout = match self.parked_deadline() {
            None => timeout,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                Some(timeout.map_or(left, |t| t.min(left)))
            }
        };
        let result = match timeout {
            None => self.ring.submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        if let Err(e) = result {
            if !transient(&e) {
                error!("io_uring wait failed: {e}");
            }
        }
    }

    /// Arms a one-shot poll on each of `kicks` that has none, and removes
    /// the polls of fds no longer wanted (a queue that must not be woken by
    /// its fd now, or a kick fd the frontend replaced).
    fn arm_kicks(&mut self, kicks: &[RawFd]) {
        let mut armed = std::mem::take(&mut self.kick_armed);
        armed.retain(|&(fd, gen)| {
            let keep = kicks.contains(&fd);
            if !keep {
                // Generation 0 tags the removal's own completion.
                let remove = opcode::PollRemove::new(KICK_TAG | gen)
                    .build()
                    .user_data(KICK_TAG);
                self.push(remove);
            }
            keep
        });
        for &fd in kicks {
            if armed.iter().any(|&(a, _)| a == fd) {
                continue;
            }
            self.kick_gen += 1;
            let gen = self.kick_gen;
            let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .build()
                .user_data(KICK_TAG | gen);
            self.push(poll);
            armed.push((fd, gen));
        }
        self.kick_armed = armed;
    }

    /// Removes every kick poll. Polls are tracked by fd number, and a
    /// frontend may replace a kick fd with a new one under the same number
    /// (SET_VRING_KICK) while the poll still watches the old file: call
    /// this before letting go of what keeps the kick fds fixed (a worker
    /// releasing its vring locks); the next `wait` arms them anew. The
    /// removals go to the kernel with the next submission (no system call
    /// here): until then an old poll can only fire for a generation no
    /// longer tracked, which `reap` ignores.
    pub fn disarm_kicks(&mut self) {
        self.arm_kicks(&[]);
    }

    /// The kick fds that became readable since the last call, each once.
    /// The polls are one-shot and do not consume the eventfds: the caller
    /// drains an fd before passing it to `wait` again, or its poll fires at
    /// once.
    pub fn take_kicks(&mut self) -> std::vec::Drain<'_, RawFd> {
        self.kicked.drain(..)
    }

    /// Reports every finished request to `done`, running `after_write` /
    /// `after_flush` hooks on the way; resubmits the rest of short
    /// transfers. Returns the number of requests reported.
    pub fn reap(&mut self, disk: &Disk, mut done: impl FnMut(u64, Result<(), DiskError>)) -> usize {
        let mut reported = self.report_ready(disk, &mut done);
        let mut woken = false;
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if cqes.is_empty() {
                break;
            }
            for &(user_data, res) in &cqes {
                if user_data == PARK_TAG {
                    let mut count = 0u64;
                    // SAFETY: reads 8 bytes into a live u64 from our
                    // non-blocking eventfd (empties it; nothing to do on
                    // EAGAIN).
                    unsafe { libc::read(self.wake_fd, (&raw mut count).cast(), 8) };
                    self.wake_armed = false;
                    woken = true;
                    continue;
                }
                if user_data & KICK_TAG != 0 {
                    if let Some(i) = self
                        .kick_armed
                        .iter()
                        .position(|&(_, gen)| KICK_TAG | gen == user_data)
                    {
                        let (fd, _) = self.kick_armed.swap_remove(i);
                        self.kicked.push(fd);
                    }
                    continue;
                }
                let Ok(idx) = u32::try_from(user_data) else {
                    continue;
                };
                if let Some((token, result)) = self.complete(disk, idx, res) {
                    done(token, result);
                    reported += 1;
                }
            }
            // Resubmissions queued while processing go out now.
            self.submit();
        }
        self.cqes = cqes;
        if woken {
            reported += self.report_ready(disk, &mut done);
        }
        if !self.parked.is_empty() {
            self.arm_wake();
        }
        reported
    }

    /// Reports the requests finished at submission, after giving the
    /// parked writes a look (those that fail or run synchronously now are
    /// among them).
    fn report_ready(
        &mut self,
        disk: &Disk,
        done: &mut impl FnMut(u64, Result<(), DiskError>),
    ) -> usize {
        if !self.parked.is_empty() {
            self.resume_parked(disk);
        }
        let mut reported = 0;
        while let Some((token, result)) = self.ready.pop_front() {
            done(token, result);
            reported += 1;
        }
        reported
    }

    /// Handles the completion `res` of slot `idx`: either the request is
    /// finished (returned) or the rest of it is queued again.
    fn complete(&mut self, disk: &Disk, idx: u32, res: i32) -> Option<Reaped> {
        let slot = self.slots.get_mut(idx as usize)?;
        if slot.image.is_none() {
            // Not in use: a completion we cannot match (never expected).
            warn!("io_uring completion for idle slot {idx}");
            return None;
        }
        let outcome: Result<(), io::Error> = if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EAGAIN | libc::EINTR) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                self.stats.retries += 1;
                self.issue(idx);
                return None;
            }
            Err(io::Error::from_raw_os_error(errno))
        } else if slot.kind == Kind::Flush {
            Ok(())
        } else {
            let n = res as u64;
            slot.done += n;
            if slot.done >= slot.len {
                Ok(())
            } else if n == 0 {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "image ended early (truncated underneath us?)",
                ))
            } else {
                // Short transfer: queue the remainder.
                slot.retries = 0;
                self.stats.short_transfers += 1;
                let mut skip = slot.done as usize;
                slot.rest.clear();
                for b in &slot.bufs {
                    if skip >= b.len() {
                        skip -= b.len();
                        continue;
                    }
                    slot.rest.push(b.advance(skip));
                    skip = 0;
                }
                self.issue(idx);
                return None;
            }
        };
        let slot = &mut self.slots[idx as usize];
        let (kind, offset, len, token) = (slot.kind, slot.offset, slot.len, slot.token);
        // The image's flush latch sees every sync this engine ran.
        let durable = match kind {
            Kind::Flush => Some(Durable::Flush),
            Kind::Write { fua: true } => Some(Durable::WriteThrough),
            _ => None,
        };
        let outcome = match (durable, slot.image.and_then(|id| self.images.get(id))) {
            (Some(op), Some(image)) => image.durable_done(op, outcome),
            _ => outcome,
        };
        // A failed write drops its ticket here: its hooks hear of it.
        let ticket = slot.ticket.take();
        let image = slot.image.take();
        let result = match outcome {
            Err(e) => Some(Err(Self::image_err(kind, offset, len, e))),
            Ok(()) => match (kind, ticket) {
                (Kind::Read, _) => Some(Ok(())),
                (Kind::Write { .. }, Some(ticket)) => {
                    let landed = ticket.landed_nowait(WriteOp::Data(&slot.bufs), &self.waker);
                    match landed {
                        WriteEnd::Done(result) => Some(result),
                        WriteEnd::Waiting(end) => {
                            let body = Body::Data(slot.bufs.clone());
                            self.park(token, offset, body, Phase::End(end));
                            None
                        }
                    }
                }
                (Kind::Write { .. }, None) => Some(Ok(())),
                (Kind::Flush, _) => Some(disk.finish_flush()),
            },
        };
        if let Some(image) = image {
            self.images.unpin(image);
        }
        self.free.push(idx);
        result.map(|result| (token, result))
    }

    fn image_err(kind: Kind, offset: u64, len: u64, cause: io::Error) -> DiskError {
        DiskError::Image(ImageError::Io {
            op: kind.name(),
            offset,
            len,
            cause,
        })
    }
}

impl UringEngine {
    /// Waits until the kernel is done with every request in flight,
    /// discarding their results: for an engine being torn down. False if
    /// the ring failed for good with requests still in flight: the kernel
    /// may then still write into their buffers, which must never be freed
    /// (normally nothing is in flight: workers drain before they let go).
    pub fn quiesce(&mut self) -> bool {
        let mut busy = self.slots.iter().filter(|s| s.image.is_some()).count();
        while busy > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if !transient(&e) {
                    error!("io_uring engine torn down with {busy} request(s) in flight: {e}");
                    return false;
                }
            }
            for cqe in self.ring.completion() {
                let slot = (cqe.user_data() & KICK_TAG == 0)
                    .then(|| self.slots.get_mut(cqe.user_data() as usize))
                    .flatten();
                // Whatever the result, the kernel is done with this entry.
                if let Some(slot) = slot.filter(|s| s.image.is_some()) {
                    slot.image = None;
                    busy -= 1;
                }
            }
        }
        true
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        if self.quiesce() {
            // SAFETY: dropped once, here; nothing in flight uses it.
            unsafe { ManuallyDrop::drop(&mut self.ring) };
        } else {
            // Closing the ring would let the memory of requests in flight
            // be reused under the kernel: leak the ring and the iovec
            // arrays instead (the caller leaks the data buffers).
            std::mem::forget(std::mem::take(&mut self.slots));
            error!("io_uring ring and its buffers leaked");
        }
    }
}

#[cfg(test)]
#[path = "uring_tests.rs"]
mod tests;

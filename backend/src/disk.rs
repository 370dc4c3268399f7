//! The disk the guest sees: an image behind an atomic pointer (so a mirror
//! can switch images live), the write-back cache setting, and the hooks
//! that run before every write (dirty bitmaps today, copy-before-write for
//! backup views later).
//!
//! Requests run either synchronously through `Disk`'s methods or through
//! an asynchronous engine (`uring`), which uses the split halves of the
//! same steps (`start_write` and its `WriteTicket`, `finish_flush`).
//!
//! A write's hooks are fixed when it starts: the ticket holds the list it
//! began with, so a hook added or removed while the write is in flight
//! (a mirror starting or ending) never sees the end of a write whose start
//! it did not see, and every hook that saw a start sees exactly one end,
//! `after_write` or `write_failed`, even when the image fails the write.
//!
//! A hook may have long work to do on either side of the write: a
//! copy-before-write filter copies old data to its target before, a
//! write-blocking mirror writes the new data to its target after. An
//! engine that must not block its thread uses the `_nowait` forms, which
//! hand such work back as a [`HookWork`] to poll (`PendingWrite` before
//! the write, `PendingEnd` after it), so the thread serves its other
//! requests meanwhile; the synchronous forms wait for it ([`block_on`]).

pub mod pins;
pub mod uring;

use crate::gate::IoGate;
use crate::image::{Image, ImageError};
use crate::iobuf::{total_len, IoBuf};
use arc_swap::ArcSwap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

/// Errors a guest request can end with.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A write-type request on a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// The range is not inside the disk.
    #[error("range {offset}+{len} is outside the disk ({size} bytes)")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A write hook refused or failed (e.g. a bitmap could not be made durable).
    #[error("write hook failed: {0}")]
    Hook(String),
}

/// What a guest write-type request did to a range.
#[derive(Clone, Copy)]
pub enum WriteOp<'a> {
    /// New data, still in the guest's buffers.
    Data(&'a [IoBuf<'a>]),
    /// Zeroes (with `unmap`, possibly deallocated).
    Zeroes {
        /// The range may have been deallocated.
        unmap: bool,
    },
    /// Deallocated; contents unspecified (zeroes on raw files).
    Discard,
}

/// Code that must run around guest writes: before the data lands on the
/// image (dirty bitmaps), after it has landed (a mirror re-marking the chunk
/// or copying the data to its target), and after a guest flush.
/// Implementations must be cheap on the hot path and safe to call from
/// every queue thread at once.
pub trait WriteHook: Send + Sync {
    /// Called before a write, discard or write-zeroes of `len` bytes at
    /// `offset` is issued. An error fails the guest request (nothing is written).
    fn before_write(&self, _offset: u64, _len: u64) -> Result<(), DiskError> {
        Ok(())
    }
    /// Called after the request succeeded on the active image, before the
    /// guest is told. An error fails the guest request.
    fn after_write(&self, _offset: u64, _len: u64, _op: WriteOp<'_>) -> Result<(), DiskError> {
        Ok(())
    }
    /// Called instead of `after_write` when a write whose `before_write`
    /// succeeded on this hook did not complete: the image failed it, or a
    /// later hook refused it. The range may hold old data, new data or a mix.
    fn write_failed(&self, _offset: u64, _len: u64) {}
    /// Called after a guest flush has made the image durable.
    fn after_flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
    /// `before_write` for an engine that must not block its thread: work
    /// that may take long (a copy to a slow target) is started elsewhere
    /// and handed back to be polled; `None` means done. The default runs
    /// `before_write`.
    fn before_write_nowait(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Box<dyn HookWork>>, DiskError> {
        self.before_write(offset, len).map(|()| None)
    }
    /// `after_write` for an engine that must not block its thread: work
    /// that may take long (a write to a mirror target) is started
    /// elsewhere and handed back to be polled; the guest request completes
    /// when it is done. The default runs `after_write`.
    fn after_write_nowait(
        &self,
        offset: u64,
        len: u64,
        op: WriteOp<'_>,
    ) -> Result<Option<Box<dyn HookWork>>, DiskError> {
        self.after_write(offset, len, op).map(|()| None)
    }
    /// True if `before_write` or `after_write` may block for long: an
    /// engine then does not run writes synchronously on its thread (it
    /// uses the `_nowait` forms).
    fn may_block(&self) -> bool {
        false
    }
}

/// Work a hook's `before_write_nowait` or `after_write_nowait` started,
/// which the write waits for. Dropping it before it is done ends it by
/// its policy, as if its deadline had passed.
pub trait HookWork: Send {
    /// The outcome once the work is done, or once its deadline passed (the
    /// hook's policy decides; the work may go on in the background). While
    /// neither, `Pending`, and `waker` is woken when it is done.
    fn poll(&mut self, waker: &Waker) -> Poll<Result<(), DiskError>>;
    /// When `poll` gives its policy's answer if the work is not done.
    fn deadline(&self) -> Option<Instant>;
}

/// How `start_write_nowait` left a write.
pub enum WriteStart {
    /// Every `before_write` is done: issue the write.
    Ready(WriteTicket),
    /// A hook's work is under way: poll it until it is ready.
    Waiting(PendingWrite),
}

/// A write waiting for a hook's work before it may be issued.
pub struct PendingWrite {
    ticket: WriteTicket,
    work: Box<dyn HookWork>,
}

impl PendingWrite {
    /// When the work's policy applies if it is not done.
    pub fn deadline(&self) -> Option<Instant> {
        self.work.deadline()
    }

    /// Goes on with the write: `Waiting` again while a hook's work is not
    /// done, `Ready` once every hook has started; an error fails the write
    /// with nothing written (the hooks already started hear of it).
    pub fn poll(mut self, waker: &Waker) -> Result<WriteStart, DiskError> {
        match self.work.poll(waker) {
            Poll::Pending => Ok(WriteStart::Waiting(self)),
            Poll::Ready(r) => {
                r?;
                self.ticket.started += 1;
                self.ticket.start_rest(waker)
            }
        }
    }
}

/// Waits on this thread for `work`, at most until its deadline (its
/// policy then answers): for the synchronous forms of the hooks.
pub fn block_on(mut work: Box<dyn HookWork>) -> Result<(), DiskError> {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    loop {
        if let Poll::Ready(r) = work.poll(&waker) {
            return r;
        }
        match work.deadline() {
            Some(d) => std::thread::park_timeout(d.saturating_duration_since(Instant::now())),
            None => std::thread::park(),
        }
    }
}

/// How `WriteTicket::landed_nowait` left a write that landed.
pub enum WriteEnd {
    /// Every hook has ended: the request's outcome.
    Done(Result<(), DiskError>),
    /// A hook's after-write work is under way: poll it until it is done.
    Waiting(PendingEnd),
}

/// A landed write waiting for a hook's after-write work before the
/// request may complete.
pub struct PendingEnd {
    ticket: WriteTicket,
    work: Box<dyn HookWork>,
    /// The first error of the hooks ended so far.
    result: Result<(), DiskError>,
}

impl PendingEnd {
    /// When the work's policy applies if it is not done.
    pub fn deadline(&self) -> Option<Instant> {
        self.work.deadline()
    }

    /// Goes on ending the write; `op` is what `landed_nowait` was given.
    pub fn poll(mut self, op: WriteOp<'_>, waker: &Waker) -> WriteEnd {
        match self.work.poll(waker) {
            Poll::Pending => WriteEnd::Waiting(self),
            Poll::Ready(r) => {
                if self.result.is_ok() {
                    self.result = r;
                }
                self.ticket.end_rest(op, waker, self.result)
            }
        }
    }
}

type HookList = Vec<Arc<dyn WriteHook>>;

/// A write-type request that passed its checks and `before_write` hooks.
/// Consume it with `landed` once the data is on the image; dropping it
/// instead (the image failed, an early return) tells the hooks the write
/// failed.
#[must_use = "dropping a ticket reports the write as failed"]
pub struct WriteTicket {
    /// The hooks whose `before_write` succeeded, in order.
    hooks: Arc<HookList>,
    started: usize,
    /// The hooks `hooks[..ended]` have had their end (`ended <= started`).
    ended: usize,
    offset: u64,
    len: u64,
}

impl WriteTicket {
    /// Runs `before_write_nowait` on the hooks not started yet, until one
    /// hands back work (polled once at once, in case it is done already).
    fn start_rest(mut self, waker: &Waker) -> Result<WriteStart, DiskError> {
        while let Some(hook) = self.hooks.get(self.started) {
            // On error the ticket drops: the hooks already started hear of it.
            if let Some(work) = hook.before_write_nowait(self.offset, self.len)? {
                return PendingWrite { ticket: self, work }.poll(waker);
            }
            self.started += 1;
        }
        Ok(WriteStart::Ready(self))
    }

    /// The data has landed on the image: runs every started hook's
    /// `after_write` (all of them, even after one fails; the first error
    /// is returned and fails the guest request).
    pub fn landed(mut self, op: WriteOp<'_>) -> Result<(), DiskError> {
        let mut result = Ok(());
        while self.ended < self.started {
            let hook = &self.hooks[self.ended];
            self.ended += 1;
            let r = hook.after_write(self.offset, self.len, op);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// `landed` for an engine that must not block: a hook's long
    /// after-write work is handed back as `Waiting`, to be polled with
    /// `PendingEnd::poll` (woken through `waker`). Without such work it
    /// is `landed` (no allocation).
    pub fn landed_nowait(self, op: WriteOp<'_>, waker: &Waker) -> WriteEnd {
        self.end_rest(op, waker, Ok(()))
    }

    /// Runs `after_write_nowait` on the hooks not ended yet, until one
    /// hands back work; `result` is the first error so far.
    fn end_rest(
        mut self,
        op: WriteOp<'_>,
        waker: &Waker,
        mut result: Result<(), DiskError>,
    ) -> WriteEnd {
        while self.ended < self.started {
            let hook = self.hooks[self.ended].clone();
            // Ended now: from here the work, if any, owns the hook's end.
            self.ended += 1;
            match hook.after_write_nowait(self.offset, self.len, op) {
                Ok(None) => {}
                Ok(Some(work)) => {
                    let pending = PendingEnd {
                        ticket: self,
                        work,
                        result,
                    };
                    return pending.poll(op, waker);
                }
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        WriteEnd::Done(result)
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        // Not landed, or dropped part-way through its ends: the range may
        // hold anything, which is what `write_failed` tells a hook.
        for hook in &self.hooks[self.ended..self.started] {
            hook.write_failed(self.offset, self.len);
        }
    }
}

/// The guest-visible disk.
pub struct Disk {
    image: ArcSwap<Box<dyn Image>>,
    size: u64,
    read_only: bool,
    /// Write-back cache enabled (virtio-blk WCE); when off, writes are
    /// durable before they complete.
    writeback: AtomicBool,
    hooks: ArcSwap<HookList>,
    /// Some hook's `may_block` is true.
    hooks_may_block: AtomicBool,
    gate: IoGate,
}

impl Disk {
    /// Wraps an opened image.
    pub fn new(image: Box<dyn Image>, read_only: bool) -> Disk {
        let size = image.size();
        Disk {
            image: ArcSwap::from_pointee(image),
            size,
            read_only,
            writeback: AtomicBool::new(true),
            hooks: ArcSwap::from_pointee(Vec::new()),
            hooks_may_block: AtomicBool::new(false),
            gate: IoGate::default(),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True if the guest may not write.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Current write-back cache mode.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Switches between write-back (true) and write-through (false).
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// The current image.
    pub fn image(&self) -> Arc<Box<dyn Image>> {
        self.image.load_full()
    }

    /// Replaces the active image (the pivot of a mirror). Call with guest
    /// I/O paused; returns the previous image.
    pub fn replace_image(&self, image: Box<dyn Image>) -> Arc<Box<dyn Image>> {
        self.image.swap(Arc::new(image))
    }

    /// The gate queue workers enter per batch, and jobs pause I/O with.
    pub fn gate(&self) -> &IoGate {
        &self.gate
    }

    /// Adds a write hook; it sees every write issued from now on.
    pub fn add_hook(&self, hook: Arc<dyn WriteHook>) {
        self.hooks.rcu(|hooks| {
            let mut v = Vec::clone(hooks);
            v.push(hook.clone());
            v
        });
        self.note_blocking_hooks();
    }

    /// Removes a hook added with `add_hook` (compared by pointer).
    pub fn remove_hook(&self, hook: &Arc<dyn WriteHook>) {
        self.hooks.rcu(|hooks| {
            hooks
                .iter()
                .filter(|h| !Arc::ptr_eq(h, hook))
                .cloned()
                .collect::<Vec<_>>()
        });
        self.note_blocking_hooks();
    }

    fn note_blocking_hooks(&self) {
        let any = self.hooks.load().iter().any(|h| h.may_block());
        self.hooks_may_block.store(any, Ordering::Relaxed);
    }

    /// True if a hook's `before_write` may block for long (a
    /// copy-before-write filter): an engine that must not block then
    /// starts writes with `start_write_nowait` instead of running them
    /// synchronously.
    pub fn hooks_may_block(&self) -> bool {
        self.hooks_may_block.load(Ordering::Relaxed)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Everything that must happen before a write-type request of `len`
    /// bytes at `offset` is issued: read-only and range checks, then the
    /// `before_write` hooks. After `Ok`, issue the write on the image and
    /// call `landed` on the ticket once it succeeded; an error fails the
    /// request with nothing written.
    pub fn start_write(&self, offset: u64, len: u64) -> Result<WriteTicket, DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.check_range(offset, len)?;
        let mut ticket = WriteTicket {
            hooks: self.hooks.load_full(),
            started: 0,
            ended: 0,
            offset,
            len,
        };
        while let Some(hook) = ticket.hooks.get(ticket.started) {
            // On error the ticket drops: the hooks already started hear of it.
            hook.before_write(offset, len)?;
            ticket.started += 1;
        }
        Ok(ticket)
    }

    /// `start_write` for an engine that must not block: a hook's long
    /// work (a copy-before-write) is handed back as `Waiting`, to be
    /// polled with `PendingWrite::poll` (woken through `waker`). Without
    /// such work it is `start_write` (no allocation).
    pub fn start_write_nowait(
        &self,
        offset: u64,
        len: u64,
        waker: &Waker,
    ) -> Result<WriteStart, DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        self.check_range(offset, len)?;
        WriteTicket {
            hooks: self.hooks.load_full(),
            started: 0,
            ended: 0,
            offset,
            len,
        }
        .start_rest(waker)
    }

    /// Calls `f` with the active image without taking a reference count:
    /// the cheap way for an engine to look at it per request and clone the
    /// `Arc` only when it changed.
    pub fn with_image<R>(&self, f: impl FnOnce(&Arc<Box<dyn Image>>) -> R) -> R {
        f(&self.image.load())
    }

    /// The checks a read must pass before it is issued (the range is inside
    /// the disk); for engines that issue the I/O themselves.
    pub fn check_read(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.check_range(offset, len)
    }

    /// Runs the `after_flush` hooks, for an engine that made the image
    /// durable itself (an asynchronous fdatasync).
    pub fn finish_flush(&self) -> Result<(), DiskError> {
        for hook in self.hooks.load().iter() {
            hook.after_flush()?;
        }
        Ok(())
    }

    /// Reads into `bufs` from `offset`.
    pub fn read(&self, offset: u64, bufs: &[IoBuf]) -> Result<(), DiskError> {
        self.check_range(offset, total_len(bufs))?;
        Ok(self.image.load().read_at(bufs, offset)?)
    }

    /// Writes `bufs` at `offset`, honouring the write-back mode.
    pub fn write(&self, offset: u64, bufs: &[IoBuf]) -> Result<(), DiskError> {
        let len = total_len(bufs);
        let ticket = self.start_write(offset, len)?;
        self.write_image(offset, len, WriteOp::Data(bufs))?;
        ticket.landed(WriteOp::Data(bufs))
    }

    /// Makes all completed writes durable, then tells the hooks.
    pub fn flush(&self) -> Result<(), DiskError> {
        self.image.load().flush()?;
        self.finish_flush()
    }

    /// Deallocates a range (contents become unspecified; on raw files, zeroes).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let ticket = self.start_write(offset, len)?;
        self.write_image(offset, len, WriteOp::Discard)?;
        ticket.landed(WriteOp::Discard)
    }

    /// Zeroes a range, deallocating it if `unmap`.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        let ticket = self.start_write(offset, len)?;
        let op = WriteOp::Zeroes { unmap };
        self.write_image(offset, len, op)?;
        ticket.landed(op)
    }

    /// The image's part of a write-type request (`op`), honouring the
    /// write-back mode, for a request whose hooks have started.
    pub fn write_image(&self, offset: u64, len: u64, op: WriteOp<'_>) -> Result<(), DiskError> {
        let image = self.image.load();
        match op {
            WriteOp::Discard => image.discard(offset, len)?,
            WriteOp::Zeroes { unmap } => {
                image.write_zeroes(offset, len, unmap)?;
                if !self.writeback() {
                    image.flush()?;
                }
            }
            WriteOp::Data(bufs) => image.write_at(bufs, offset, !self.writeback())?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{RawImage, RawImageOptions};
    use std::sync::atomic::AtomicU64;

    fn temp_image(size: u64) -> (tempdir::Guard, std::path::PathBuf) {
        let dir = tempdir::Guard::new();
        let path = dir.0.join("img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        (dir, path)
    }

    mod tempdir {
        pub struct Guard(pub std::path::PathBuf);
        impl Guard {
            pub fn new() -> Guard {
                static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("vubd-disk-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Guard(p)
            }
        }
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn open(path: &std::path::Path, read_only: bool) -> Disk {
        let img = RawImage::open(
            path,
            RawImageOptions {
                read_only,
                direct: false,
            },
        )
        .unwrap();
        Disk::new(Box::new(img), read_only)
    }

    #[test]
    fn write_read_round_trip_scattered() {
        let (_d, path) = temp_image(1 << 20);
        let disk = open(&path, false);
        let mut a = vec![0xaau8; 512];
        let mut b = vec![0xbbu8; 1536];
        disk.write(
            4096,
            &[IoBuf::from_slice(&mut a), IoBuf::from_slice(&mut b)],
        )
        .unwrap();
        let mut out = vec![0u8; 2048];
        disk.read(4096, &[IoBuf::from_slice(&mut out)]).unwrap();
        assert!(out[..512].iter().all(|&x| x == 0xaa));
        assert!(out[512..].iter().all(|&x| x == 0xbb));
    }

    #[test]
    fn out_of_range_and_read_only_are_refused() {
        let (_d, path) = temp_image(8192);
        let disk = open(&path, false);
        let mut buf = vec![0u8; 512];
        let err = disk.write(8192 - 256, &[IoBuf::from_slice(&mut buf)]);
        assert!(matches!(err, Err(DiskError::OutOfRange { .. })));
        assert!(matches!(
            disk.read(u64::MAX - 10, &[IoBuf::from_slice(&mut buf)]),
            Err(DiskError::OutOfRange { .. })
        ));
        let ro = open(&path, true);
        assert!(matches!(
            ro.write(0, &[IoBuf::from_slice(&mut buf)]),
            Err(DiskError::ReadOnly)
        ));
        assert!(matches!(ro.discard(0, 512), Err(DiskError::ReadOnly)));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
    }

    struct Counter(AtomicU64);
    impl WriteHook for Counter {
        fn before_write(&self, _offset: u64, len: u64) -> Result<(), DiskError> {
            self.0.fetch_add(len, Ordering::Relaxed);
            Ok(())
        }
        fn after_write(&self, _offset: u64, len: u64, _op: WriteOp<'_>) -> Result<(), DiskError> {
            self.0.fetch_add(len << 32, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn hooks_see_every_write_type_before_it_lands() {
        let (_d, path) = temp_image(1 << 20);
        let disk = open(&path, false);
        let hook = Arc::new(Counter(AtomicU64::new(0)));
        disk.add_hook(hook.clone());
        let mut buf = vec![1u8; 4096];
        disk.write(0, &[IoBuf::from_slice(&mut buf)]).unwrap();
        disk.discard(8192, 4096).unwrap();
        disk.write_zeroes(16384, 8192, true).unwrap();
        disk.read(0, &[IoBuf::from_slice(&mut buf)]).unwrap();
        let total = 4096 + 4096 + 8192;
        assert_eq!(hook.0.load(Ordering::Relaxed), total | (total << 32));
        let as_dyn: Arc<dyn WriteHook> = hook.clone();
        disk.remove_hook(&as_dyn);
        disk.write(0, &[IoBuf::from_slice(&mut buf)]).unwrap();
        assert_eq!(
            hook.0.load(Ordering::Relaxed),
            total | (total << 32),
            "removed hook still called"
        );
    }

    /// Logs which of its callbacks ran; refuses writes at `refuse_at`.
    #[derive(Default)]
    struct Log {
        events: std::sync::Mutex<Vec<&'static str>>,
        refuse_at: Option<u64>,
    }
    impl Log {
        fn events(&self) -> Vec<&'static str> {
            self.events.lock().unwrap().clone()
        }
    }
    impl WriteHook for Log {
        fn before_write(&self, offset: u64, _len: u64) -> Result<(), DiskError> {
            if Some(offset) == self.refuse_at {
                return Err(DiskError::Hook("refused".into()));
            }
            self.events.lock().unwrap().push("before");
            Ok(())
        }
        fn after_write(&self, _offset: u64, _len: u64, _op: WriteOp<'_>) -> Result<(), DiskError> {
            self.events.lock().unwrap().push("after");
            Ok(())
        }
        fn write_failed(&self, _offset: u64, _len: u64) {
            self.events.lock().unwrap().push("failed");
        }
    }

    #[test]
    fn every_started_hook_sees_exactly_one_end() {
        let (_d, path) = temp_image(1 << 20);
        // The image fails every write (read-only fd under a writable disk).
        let failing = Disk::new(
            Box::new(
                RawImage::open(
                    &path,
                    RawImageOptions {
                        read_only: true,
                        direct: false,
                    },
                )
                .unwrap(),
            ),
            false,
        );
        let hook = Arc::new(Log::default());
        failing.add_hook(hook.clone());
        let mut buf = vec![1u8; 4096];
        assert!(failing.write(0, &[IoBuf::from_slice(&mut buf)]).is_err());
        assert!(failing.discard(0, 4096).is_err());
        assert_eq!(hook.events(), ["before", "failed", "before", "failed"]);

        // A later hook refuses: the earlier one hears of the failure, the
        // refusing one and those after it see nothing more.
        let disk = open(&path, false);
        let first = Arc::new(Log::default());
        let refusing = Arc::new(Log {
            refuse_at: Some(8192),
            ..Log::default()
        });
        let last = Arc::new(Log::default());
        disk.add_hook(first.clone());
        disk.add_hook(refusing.clone());
        disk.add_hook(last.clone());
        assert!(matches!(
            disk.write(8192, &[IoBuf::from_slice(&mut buf)]),
            Err(DiskError::Hook(_))
        ));
        assert_eq!(first.events(), ["before", "failed"]);
        assert!(refusing.events().is_empty());
        assert!(last.events().is_empty());
        disk.write(0, &[IoBuf::from_slice(&mut buf)]).unwrap();
        assert_eq!(first.events(), ["before", "failed", "before", "after"]);
        assert_eq!(last.events(), ["before", "after"]);
    }

    #[test]
    fn write_zeroes_and_discard_zero_the_range() {
        let (_d, path) = temp_image(1 << 20);
        let disk = open(&path, false);
        let mut buf = vec![7u8; 65536];
        disk.write(0, &[IoBuf::from_slice(&mut buf)]).unwrap();
        disk.write_zeroes(4096, 4096, false).unwrap();
        disk.write_zeroes(16384, 4096, true).unwrap();
        disk.discard(32768, 4096).unwrap();
        let mut out = vec![0u8; 65536];
        disk.read(0, &[IoBuf::from_slice(&mut out)]).unwrap();
        for (i, &x) in out.iter().enumerate() {
            let zeroed = (4096..8192).contains(&i)
                || (16384..20480).contains(&i)
                || (32768..36864).contains(&i);
            assert_eq!(x, if zeroed { 0 } else { 7 }, "byte {i}");
        }
    }

    #[test]
    fn direct_io_with_unaligned_buffers_goes_through_the_bounce_buffer() {
        let (_d, path) = temp_image(8 << 20);
        let img = RawImage::open(
            &path,
            RawImageOptions {
                read_only: false,
                direct: true,
            },
        );
        let Ok(img) = img else {
            // The temp directory's file system has no O_DIRECT (old tmpfs).
            eprintln!("SKIPPED: no O_DIRECT in {}", std::env::temp_dir().display());
            return;
        };
        let disk = Disk::new(Box::new(img), false);
        // 3 MiB + 512 of data starting one byte into an allocation: never aligned.
        let len = (3 << 20) + 512;
        let mut backing = vec![0u8; len + 1];
        for (i, b) in backing.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let data = &mut backing[1..];
        let (a, b) = data.split_at_mut(1000 * 512 + 3);
        disk.write(4096, &[IoBuf::from_slice(a), IoBuf::from_slice(b)])
            .unwrap();
        let mut out = vec![0u8; len + 7];
        disk.read(4096, &[IoBuf::from_slice(&mut out[7..])])
            .unwrap();
        assert!(out[7..] == backing[1..], "bounced round trip differs");
    }
}

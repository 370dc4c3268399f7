//! The transmission phase: the requests of one connection, checked
//! against the export (range, payload size, flags, writability) before
//! they touch the source; READ with structured (sparse: data and hole
//! chunks) or simple replies, BLOCK_STATUS with one chunk per selected
//! context.
//!
//! Requests of one connection are pipelined: the connection's thread reads
//! and checks them, up to [`MAX_WORKERS`] threads run them, and each reply
//! is written whole (one vectored write for headers and data) as soon as
//! its request is done, so a slow request does not hold up the others.
//! Memory per connection is bounded by [`MAX_IN_FLIGHT_BYTES`] of payloads
//! and [`MAX_IN_FLIGHT`] requests, plus the extent lists (at most
//! [`MAX_EXTENTS`] per context). A WRITE is checked before its payload
//! buffer exists: a refused one has its payload skipped in small pieces,
//! and one announcing more than [`MAX_PAYLOAD`] gets an error and the
//! connection is closed (skipping gigabytes is not worth it). Once a WRITE
//! header has arrived, its payload must follow within the payload
//! time-out; the idle time between requests is not bounded (as in QEMU).

use super::export::Export;
use super::handshake::{Context, Negotiated};
use super::proto::*;
use super::source::{Allocation, SourceError};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::Scope;
use std::time::{Duration, Instant};

/// Most extents in one BLOCK_STATUS chunk (QEMU's 1 MiB of extents).
pub const MAX_EXTENTS: usize = (1 << 20) / 8;

fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_TRIM => "NBD_CMD_TRIM",
        CMD_CACHE => "NBD_CMD_CACHE",
        CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown",
    }
}

/// Granularity of the holes a sparse READ reply reports.
const HOLE_BLOCK: u64 = 4096;

/// Splits data read at `offset` into runs of data and of zeroes, cut at
/// [`HOLE_BLOCK`] boundaries of the export, for a sparse READ reply. The
/// zeroes are found in the data itself: asking the file where its holes
/// are costs, on tmpfs, a scan to the end of the data run per request,
/// and written zeroes need not cross the wire either.
fn zero_runs(offset: u64, buf: &[u8]) -> Vec<(u64, Allocation)> {
    let mut out: Vec<(u64, Allocation)> = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let at = offset + pos as u64;
        let next = ((at / HOLE_BLOCK + 1) * HOLE_BLOCK - offset) as usize;
        let piece = &buf[pos..next.min(buf.len())];
        // 64-byte steps: vectorised, and a data block stops at its first.
        let zero = piece
            .chunks(64)
            .all(|c| c.iter().fold(0, |a, &b| a | b) == 0);
        let kind = if zero {
            Allocation::Hole
        } else {
            Allocation::Data
        };
        match out.last_mut() {
            Some((n, k)) if *k == kind => *n += piece.len() as u64,
            _ => out.push((piece.len() as u64, kind)),
        }
        pos += piece.len();
    }
    out
}

/// A request refused or failed: the error number and a message for
/// structured error chunks.
struct Failure(u32, String);

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        Failure(e.errno(), e.to_string())
    }
}

/// A request's answer, computed before anything is sent.
enum Reply {
    /// A simple success reply.
    Done,
    /// READ data and its allocation extents.
    Read(Vec<(u64, Allocation)>, Vec<u8>),
    /// BLOCK_STATUS chunk payloads.
    Status(Vec<Vec<u8>>),
}

/// A request stream whose reads can be given a deadline.
pub trait TimedRead: Read {
    /// Reads fail (`TimedOut` or `WouldBlock`) once `deadline` has
    /// passed; `None`: they wait as long as it takes.
    fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()>;
}

impl<T: TimedRead + ?Sized> TimedRead for &mut T {
    fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        (**self).set_deadline(deadline)
    }
}

/// Requests of one connection read and not yet answered, at most.
pub const MAX_IN_FLIGHT: usize = 16;
/// Payload bytes (READ data, WRITE data) of one connection's requests in
/// flight, at most; one request of any accepted size is always let in.
/// With [`MAX_IN_FLIGHT`] it bounds a connection that never reads its
/// replies: the reader stops taking requests, and the stalled reply write
/// ends the connection (the server's write time-out).
pub const MAX_IN_FLIGHT_BYTES: usize = MAX_PAYLOAD as usize;
/// Threads running one connection's requests, at most; started only when
/// requests wait and every running one is busy.
pub const MAX_WORKERS: usize = 2;
/// Largest buffer kept between requests (a 32 MiB one is given back).
const KEEP_BUFFER: usize = 4 << 20;
/// Buffers kept between requests: one per worker and one for the reader.
const SPARES: usize = MAX_WORKERS + 1;

/// What a connection's requests are checked and run against.
struct Conn<'a> {
    export: &'a Export,
    structured: bool,
    contexts: &'a [Context],
}

/// A request read and checked, waiting for a worker.
struct Job {
    req: Request,
    checked: Result<(), Failure>,
    /// A WRITE's data (empty for the other commands).
    payload: Vec<u8>,
    /// Bytes it holds against [`MAX_IN_FLIGHT_BYTES`].
    cost: usize,
}

/// The bookkeeping of one connection's requests in flight.
#[derive(Default)]
struct Flow {
    queue: VecDeque<Job>,
    /// Requests admitted whose reply is not written yet.
    in_flight: usize,
    /// Their [`Job::cost`], summed.
    bytes: usize,
    workers: usize,
    /// Workers waiting for a job.
    idle: usize,
    /// The reader waits for room for a request of this cost.
    wanted: Option<usize>,
    /// No more requests come: workers leave once the queue is empty.
    closed: bool,
    /// A reply could not be written: nothing more is run or sent.
    broken: Option<io::Error>,
    /// Buffers for the next READs and WRITEs.
    spares: Vec<Vec<u8>>,
}

/// One connection in transmission: the reader (the connection's thread)
/// parses requests and hands them to at most [`MAX_WORKERS`] workers, which
/// run them and write each reply whole under `out`, so that replies go out
/// as they complete, in any order, never interleaved.
struct Pipeline<'a, W> {
    conn: Conn<'a>,
    out: Mutex<W>,
    /// Lock-free copy of `flow.broken.is_some()` for the reply path.
    broken: AtomicBool,
    flow: Mutex<Flow>,
    /// A job was queued, or the reader has stopped.
    work: Condvar,
    /// A request was answered (room for another), or the connection broke.
    room: Condvar,
}

/// Serves requests until the client disconnects (or breaks the protocol,
/// or does not send a WRITE's payload within `payload_timeout`, or stops
/// taking replies). Requests run concurrently; `NBD_CMD_DISC` and the end
/// of the stream wait for those in flight to be answered. A FLUSH needs no
/// barrier: it must cover the writes whose replies were sent before it
/// came, and a reply is sent only once its write is done.
pub fn serve<R: TimedRead, W: Write + Send>(
    mut r: R,
    w: W,
    n: &Negotiated,
    payload_timeout: Duration,
) -> io::Result<()> {
    let p = Pipeline {
        conn: Conn {
            export: &n.export,
            structured: n.structured,
            contexts: &n.contexts,
        },
        out: Mutex::new(w),
        broken: AtomicBool::new(false),
        flow: Mutex::new(Flow::default()),
        work: Condvar::new(),
        room: Condvar::new(),
    };
    let read = std::thread::scope(|s| {
        let read = p.read_requests(&mut r, payload_timeout, s);
        p.flow().closed = true;
        p.work.notify_all();
        read
    });
    let broken = p.flow().broken.take();
    match (read, broken) {
        (Err(e), _) | (Ok(()), Some(e)) => Err(e),
        (Ok(()), None) => Ok(()),
    }
}

impl<'a, W: Write + Send> Pipeline<'a, W> {
    fn flow(&self) -> MutexGuard<'_, Flow> {
        self.flow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reader: parses requests and queues them, starting workers as
    /// needed, until the stream ends, DISC, a protocol error, or a broken
    /// reply path.
    fn read_requests<'s, R: TimedRead>(
        &'s self,
        r: &mut R,
        payload_timeout: Duration,
        s: &'s Scope<'s, '_>,
    ) -> io::Result<()> {
        loop {
            let mut head = [0u8; REQUEST_LEN];
            match r.read_exact(&mut head) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let Some(req) = Request::parse(&head) else {
                log::info!("NBD: bad request magic; disconnecting");
                return Ok(());
            };
            if req.kind == CMD_DISC {
                return Ok(());
            }
            if req.kind == CMD_WRITE && req.len > MAX_PAYLOAD {
                let msg = format!("len ({}) is larger than max len ({MAX_PAYLOAD})", req.len);
                self.answer(&req, Err(Failure(EINVAL, msg)));
                return Ok(());
            }
            let checked = self.conn.check(&req);
            let cost = match req.kind {
                CMD_READ | CMD_WRITE if checked.is_ok() => req.len as usize,
                _ => 0,
            };
            if !self.admit(cost) {
                return Ok(());
            }
            let mut job = Job {
                req,
                checked,
                payload: Vec::new(),
                cost,
            };
            if req.kind == CMD_WRITE {
                if let Err(e) = self.read_payload(r, &mut job, payload_timeout) {
                    self.finish(cost, Vec::new());
                    return Err(e);
                }
            }
            self.queue(job, s)?;
        }
    }

    /// Waits for room for a request holding `cost` bytes; false if the
    /// connection broke.
    fn admit(&self, cost: usize) -> bool {
        let mut f = self.flow();
        while f.broken.is_none()
            && f.in_flight > 0
            && (f.in_flight >= MAX_IN_FLIGHT || f.bytes + cost > MAX_IN_FLIGHT_BYTES)
        {
            f.wanted = Some(cost);
            f = self.room.wait(f).unwrap_or_else(|e| e.into_inner());
        }
        f.wanted = None;
        if f.broken.is_some() {
            return false;
        }
        f.in_flight += 1;
        f.bytes += cost;
        true
    }

    /// Reads a WRITE's payload (dropping it in small pieces if the WRITE
    /// was refused) within `timeout`.
    fn read_payload<R: TimedRead>(
        &self,
        r: &mut R,
        job: &mut Job,
        timeout: Duration,
    ) -> io::Result<()> {
        r.set_deadline(Some(Instant::now() + timeout))?;
        if job.checked.is_ok() {
            job.payload = self.buffer(job.req.len as usize);
            r.read_exact(&mut job.payload)?;
        } else {
            let len = u64::from(job.req.len);
            let skipped = io::copy(&mut r.take(len), &mut io::sink())?;
            if skipped < len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        r.set_deadline(None)
    }

    /// Queues `job`, starting a worker if none is free to take it.
    fn queue<'s>(&'s self, job: Job, s: &'s Scope<'s, '_>) -> io::Result<()> {
        let (start, wake) = {
            let mut f = self.flow();
            f.queue.push_back(job);
            let start = f.queue.len() > f.idle && f.workers < MAX_WORKERS;
            if start {
                f.workers += 1;
            }
            (start, f.idle > 0)
        };
        // Only a waiting worker needs a wake-up (a system call each).
        if wake {
            self.work.notify_one();
        }
        if start {
            let spawned = std::thread::Builder::new()
                .name("vubd-nbd-io".into())
                .spawn_scoped(s, || {
                    crate::thread_kind::started(crate::thread_kind::ThreadKind::Nbd);
                    self.work()
                });
            if let Err(e) = spawned {
                let mut f = self.flow();
                f.workers -= 1;
                if f.workers == 0 {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// A worker: runs queued requests until the reader has stopped and
    /// the queue is empty.
    fn work(&self) {
        loop {
            let job = {
                let mut f = self.flow();
                loop {
                    if let Some(job) = f.queue.pop_front() {
                        break job;
                    }
                    if f.closed {
                        f.workers -= 1;
                        return;
                    }
                    f.idle += 1;
                    f = self.work.wait(f).unwrap_or_else(|e| e.into_inner());
                    f.idle -= 1;
                }
            };
            let cost = job.cost;
            let buf = if self.broken.load(Ordering::Acquire) {
                job.payload
            } else {
                self.run(job)
            };
            self.finish(cost, buf);
        }
    }

    /// Runs a request and sends its reply; gives back its buffer.
    fn run(&self, job: Job) -> Vec<u8> {
        let Job {
            req,
            checked,
            mut payload,
            ..
        } = job;
        if req.kind == CMD_READ && checked.is_ok() {
            payload = self.buffer(req.len as usize);
        }
        let result = checked.and_then(|()| self.conn.execute(&req, &mut payload));
        let buf = self.answer(&req, result);
        if buf.capacity() > 0 {
            buf
        } else {
            payload
        }
    }

    /// Writes the reply of `req` whole; gives back a READ's buffer. A
    /// failed write breaks the connection (the server's writer has shut
    /// the socket down, which wakes the reader).
    fn answer(&self, req: &Request, result: Result<Reply, Failure>) -> Vec<u8> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let (sent, buf) = if self.broken.load(Ordering::Acquire) {
            (Ok(()), Vec::new())
        } else {
            match result {
                Ok(reply) => self.conn.send(&mut *out, req, reply),
                Err(f) => (self.conn.fail(&mut *out, req, f), Vec::new()),
            }
        };
        let sent = sent.and_then(|()| out.flush());
        drop(out);
        if let Err(e) = sent {
            let mut f = self.flow();
            if f.broken.is_none() {
                f.broken = Some(e);
                self.broken.store(true, Ordering::Release);
            }
            drop(f);
            self.room.notify_all();
        }
        buf
    }

    /// A buffer of `len` bytes, a spare one if there is one (a fresh
    /// large allocation costs page faults on every request). Its old bytes
    /// are not cleared: every user fills it completely (a READ from the
    /// source, a WRITE from the socket) or fails without sending it.
    fn buffer(&self, len: usize) -> Vec<u8> {
        let mut b = self.flow().spares.pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    /// A request is answered (or dropped): its room and buffer are free.
    fn finish(&self, cost: usize, buf: Vec<u8>) {
        let mut f = self.flow();
        f.in_flight -= 1;
        f.bytes -= cost;
        if buf.capacity() > 0 && buf.capacity() <= KEEP_BUFFER && f.spares.len() < SPARES {
            f.spares.push(buf);
        }
        // A waiting reader is woken once half the requests are answered,
        // not after each: it then reads a batch of them (fewer switches).
        let wake = f.wanted.is_some_and(|cost| {
            f.in_flight == 0
                || (f.in_flight <= MAX_IN_FLIGHT / 2 && f.bytes + cost <= MAX_IN_FLIGHT_BYTES)
        });
        drop(f);
        if wake {
            self.room.notify_one();
        }
    }
}

/// Writes all of `bufs`, as few calls as the writer takes (one `writev`
/// for a reply's headers and data).
fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Conn<'_> {
    fn check(&self, req: &Request) -> Result<(), Failure> {
        let mut valid = CMD_FLAG_FUA;
        match req.kind {
            CMD_READ if self.structured => valid |= CMD_FLAG_DF,
            CMD_WRITE_ZEROES => valid |= CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => valid |= CMD_FLAG_REQ_ONE,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
            k => {
                return Err(Failure(
                    EINVAL,
                    format!("invalid request type ({k}) received"),
                ))
            }
        }
        if req.flags & !valid != 0 {
            return Err(Failure(
                EINVAL,
                format!(
                    "unsupported flags for command {} (got {:#x})",
                    command_name(req.kind),
                    req.flags
                ),
            ));
        }
        let size = self.export.config.source.size();
        if req.offset > size || u64::from(req.len) > size - req.offset {
            // The NBD spec's SHOULD. QEMU 7.2 picks ENOSPC as well, then
            // sends every request error as EINVAL.
            let errno = match req.kind {
                CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
                _ => EINVAL,
            };
            return Err(Failure(errno, "operation past EOF".into()));
        }
        if matches!(req.kind, CMD_READ | CMD_CACHE) && req.len > MAX_PAYLOAD {
            return Err(Failure(
                EINVAL,
                format!("len ({}) is larger than max len ({MAX_PAYLOAD})", req.len),
            ));
        }
        if matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
            && !self.export.config.writable
        {
            return Err(Failure(EPERM, "export is read-only".into()));
        }
        Ok(())
    }

    /// Runs a checked request; nothing has been sent yet.
    fn execute(&self, req: &Request, payload: &mut Vec<u8>) -> Result<Reply, Failure> {
        let source = &self.export.config.source;
        let fua = req.flags & CMD_FLAG_FUA != 0 || self.export.config.writethrough;
        let (offset, len) = (req.offset, u64::from(req.len));
        match req.kind {
            CMD_READ => return self.read(req, std::mem::take(payload)),
            CMD_BLOCK_STATUS => return Ok(Reply::Status(self.block_status(req)?)),
            CMD_WRITE => source.write(offset, payload, fua)?,
            CMD_FLUSH => source.flush()?,
            CMD_TRIM => {
                source.trim(offset, len)?;
                if fua {
                    source.flush()?;
                }
            }
            CMD_WRITE_ZEROES => {
                source.write_zeroes(offset, len, req.flags & CMD_FLAG_NO_HOLE == 0)?;
                if fua {
                    source.flush()?;
                }
            }
            // A prefetch hint; the page cache does it on first read.
            _ => {}
        }
        Ok(Reply::Done)
    }

    /// Writes the reply; gives back a READ's buffer.
    fn send<W: Write>(&self, w: &mut W, req: &Request, reply: Reply) -> (io::Result<()>, Vec<u8>) {
        match reply {
            Reply::Done => (w.write_all(&simple_reply(0, req.handle)), Vec::new()),
            Reply::Read(extents, buf) => {
                let sent = self.send_read(w, req, &extents, &buf);
                (sent, buf)
            }
            Reply::Status(chunks) => {
                let last = chunks.len().saturating_sub(1);
                let heads: Vec<[u8; 20]> = chunks
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                        chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, req.handle, p.len() as u32)
                    })
                    .collect();
                let mut slices: Vec<IoSlice> = heads
                    .iter()
                    .zip(&chunks)
                    .flat_map(|(h, p)| [IoSlice::new(h), IoSlice::new(p)])
                    .collect();
                (write_all_vectored(w, &mut slices), Vec::new())
            }
        }
    }

    /// Writes the error reply of `req` (a structured error chunk where the
    /// client expects structured replies for this command).
    fn fail<W: Write>(&self, w: &mut W, req: &Request, f: Failure) -> io::Result<()> {
        log::debug!("NBD {}: {}", command_name(req.kind), f.1);
        if self.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
            let p = error_payload(f.0, &f.1);
            let h = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.handle,
                p.len() as u32,
            );
            write_all_vectored(w, &mut [IoSlice::new(&h), IoSlice::new(&p)])
        } else {
            w.write_all(&simple_reply(f.0, req.handle))
        }
    }

    /// The allocation extents of a range, merged, at most `max`.
    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, Allocation)>, Failure> {
        let source = &self.export.config.source;
        let end = offset + len;
        let mut out: Vec<(u64, Allocation)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (a, n) = source.block_status(pos, end - pos)?;
            let n = n.min(end - pos);
            let full = out.len() == max;
            match out.last_mut() {
                Some((l, prev)) if *prev == a => *l += n,
                _ if full => break,
                _ => out.push((n, a)),
            }
            pos += n;
        }
        Ok(out)
    }

    /// Reads the data of a READ (and, for a sparse reply, where the holes are).
    fn read(&self, req: &Request, mut buf: Vec<u8>) -> Result<Reply, Failure> {
        if !buf.is_empty() {
            self.export.config.source.read(req.offset, &mut buf)?;
        }
        let sparse = self.structured && req.flags & CMD_FLAG_DF == 0 && !buf.is_empty();
        let extents = if sparse {
            zero_runs(req.offset, &buf)
        } else {
            vec![(u64::from(req.len), Allocation::Data)]
        };
        Ok(Reply::Read(extents, buf))
    }

    /// A READ's reply: its chunks' headers and data in one vectored write.
    fn send_read<W: Write>(
        &self,
        w: &mut W,
        req: &Request,
        extents: &[(u64, Allocation)],
        buf: &[u8],
    ) -> io::Result<()> {
        if !self.structured {
            let h = simple_reply(0, req.handle);
            return write_all_vectored(w, &mut [IoSlice::new(&h), IoSlice::new(buf)]);
        }
        if buf.is_empty() {
            let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.handle, 0);
            return w.write_all(&h);
        }
        // Header, offset and (for a hole) its length: 32 bytes at most.
        let mut heads: Vec<([u8; 32], usize)> = Vec::with_capacity(extents.len());
        let mut pos = 0u64;
        for (i, (n, a)) in extents.iter().enumerate() {
            let flags = if i + 1 == extents.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let mut h = [0u8; 32];
            let (kind, len, used) = match a {
                Allocation::Hole => (REPLY_TYPE_OFFSET_HOLE, 12, 32),
                Allocation::Data => (REPLY_TYPE_OFFSET_DATA, 8 + *n as u32, 28),
            };
            h[..20].copy_from_slice(&chunk_header(flags, kind, req.handle, len));
            h[20..28].copy_from_slice(&(req.offset + pos).to_be_bytes());
            h[28..].copy_from_slice(&(*n as u32).to_be_bytes());
            heads.push((h, used));
            pos += n;
        }
        let mut slices = Vec::with_capacity(2 * extents.len());
        let mut pos = 0usize;
        for ((h, used), (n, a)) in heads.iter().zip(extents) {
            slices.push(IoSlice::new(&h[..*used]));
            let n = *n as usize;
            if *a == Allocation::Data {
                slices.push(IoSlice::new(&buf[pos..pos + n]));
            }
            pos += n;
        }
        write_all_vectored(w, &mut slices)
    }

    /// The BLOCK_STATUS chunk payloads, one per selected context.
    fn block_status(&self, req: &Request) -> Result<Vec<Vec<u8>>, Failure> {
        if req.len == 0 {
            return Err(Failure(EINVAL, "need non-zero length".into()));
        }
        if self.contexts.is_empty() {
            return Err(Failure(EINVAL, "CMD_BLOCK_STATUS not negotiated".into()));
        }
        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let (offset, len) = (req.offset, u64::from(req.len));
        // Compute every chunk first so that a failure is a clean error reply.
        let mut chunks = Vec::with_capacity(self.contexts.len());
        for ctx in self.contexts {
            let extents: Vec<(u32, u32)> = match *ctx {
                Context::BaseAllocation => self
                    .allocation(offset, len, max)?
                    .into_iter()
                    .map(|(n, a)| {
                        let flags = match a {
                            Allocation::Data => 0,
                            Allocation::Hole => STATE_HOLE | STATE_ZERO,
                        };
                        (n as u32, flags)
                    })
                    .collect(),
                // Nothing is layered below an exported node yet: every
                // byte is local (depth 1), as QEMU reports a file node.
                Context::AllocationDepth => vec![(req.len, 1)],
                Context::Bitmap(i) => {
                    let b = self
                        .export
                        .config
                        .bitmaps
                        .get(i)
                        .ok_or_else(|| Failure(EINVAL, "no such context".into()))?;
                    b.engine
                        .extents(&b.name, offset, len, max)
                        .map_err(|e| Failure(EIO, e.to_string()))?
                        .into_iter()
                        .map(|(n, dirty)| (n as u32, if dirty { STATE_DIRTY } else { 0 }))
                        .collect()
                }
            };
            chunks.push(block_status_payload(ctx.id(), &extents));
        }
        Ok(chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_cut_at_export_blocks_even_from_an_unaligned_offset() {
        let mut buf = vec![0u8; 3 * 4096];
        buf[4096 - 100 + 5000] = 1; // in the export's block 2 (8192..12288)
        let runs = zero_runs(100, &buf);
        assert_eq!(
            runs,
            [
                (8192 - 100, Allocation::Hole),
                (4096, Allocation::Data),
                (100, Allocation::Hole)
            ]
        );
        assert_eq!(zero_runs(0, &[0, 0, 1]), [(3, Allocation::Data)]);
    }
}

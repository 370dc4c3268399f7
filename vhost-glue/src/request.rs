//! Parsing, validating and executing one virtio-blk request.
//!
//! A descriptor chain is flattened into two lists of host buffers, the
//! driver-readable bytes and the device-writable bytes (virtio 1.x allows any
//! framing, so the 16-byte header and the status byte may share descriptors
//! with data). The header is the first 16 readable bytes, the status the last
//! writable byte; what is between is data, handed to the disk in place.
//!
//! Every malformed request ends with IOERR or UNSUPP, or, when the chain has
//! no usable status byte, is returned to the driver untouched.
//!
//! `RequestParser::prepare` does the parsing and validation and finishes
//! the cheap or rare request types on the spot; reads, writes and flushes
//! come back as `Prepared` for the caller to run, synchronously
//! (`RequestParser::process`) or on an asynchronous engine, and to finish
//! with `RequestParser::finish`. So does a DISCARD or WRITE_ZEROES larger
//! than `ZEROES_STEP` (up to 32 GiB): it runs in steps (`Zeroes`), so that a
//! worker can serve its other requests between them; and any DISCARD or
//! WRITE_ZEROES while the disk has hooks that may wait long (a
//! copy-before-write filter, a write-blocking mirror), so that an
//! asynchronous engine runs it without blocking its thread.

use crate::config_space::{DeviceConfig, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use log::{debug, warn};
use std::ops::Deref;
use virtio_bindings::virtio_blk::*;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

/// Guest memory as vubd maps it (no dirty-page log: vubd does not offer LOG_ALL).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
use vubd_backend::iobuf::total_len;
use vubd_backend::{Disk, DiskError, IoBuf, WriteOp};

const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 16;

/// The most bytes of a DISCARD or WRITE_ZEROES done in one go (on tmpfs,
/// where zeroes are written, tens of milliseconds).
pub const ZEROES_STEP: u64 = 64 << 20;

/// A validated DISCARD or WRITE_ZEROES, done in steps of at most
/// `ZEROES_STEP` bytes, each a complete disk operation of its own.
#[derive(Clone, Copy)]
pub struct Zeroes {
    discard: bool,
    /// (byte offset, length, unmap) per segment.
    segments: [(u64, u64, bool); MAX_DISCARD_SEGMENTS as usize],
    count: usize,
    /// The segment under way, and how much of it is done.
    next: usize,
    done: u64,
}

impl Zeroes {
    /// Total bytes of the request.
    fn bytes(&self) -> u64 {
        self.segments[..self.count].iter().map(|s| s.1).sum()
    }

    /// The next step, as (offset, length, operation), for a caller that
    /// runs it itself (an asynchronous engine) and then reports it with
    /// `step_done`; None once every segment is done.
    pub fn next_step(&self) -> Option<(u64, u64, WriteOp<'static>)> {
        let &(offset, len, unmap) = self.segments[..self.count].get(self.next)?;
        let n = (len - self.done).min(ZEROES_STEP);
        let op = match self.discard {
            true => WriteOp::Discard,
            false => WriteOp::Zeroes { unmap },
        };
        Some((offset + self.done, n, op))
    }

    /// Records how the step `next_step` gave ended; the result once the
    /// request is finished (or has failed: the rest is not attempted).
    pub fn step_done(&mut self, result: Result<(), DiskError>) -> Option<Result<(), DiskError>> {
        let Some((_, n, _)) = self.next_step() else {
            return Some(result);
        };
        if result.is_err() {
            return Some(result);
        }
        self.done += n;
        if self.done == self.segments[self.next].1 {
            self.next += 1;
            self.done = 0;
        }
        (self.next == self.count).then_some(Ok(()))
    }

    /// Does the next step; the result once the request is finished (or has
    /// failed: the rest is not attempted).
    pub fn step(&mut self, disk: &Disk) -> Option<Result<(), DiskError>> {
        let Some((at, n, op)) = self.next_step() else {
            return Some(Ok(()));
        };
        let result = match op {
            WriteOp::Zeroes { unmap } => disk.write_zeroes(at, n, unmap),
            _ => disk.discard(at, n),
        };
        self.step_done(result)
    }

    /// Does every remaining step.
    pub fn run(&mut self, disk: &Disk) -> Result<(), DiskError> {
        loop {
            if let Some(result) = self.step(disk) {
                return result;
            }
        }
    }
}

/// The outcome of one request: the status byte and the used length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// VIRTIO_BLK_S_* value, or None when the chain has nowhere to put it.
    pub status: Option<u8>,
    /// Bytes written into device-writable buffers (for the used ring).
    pub used_len: u32,
}

/// A buffer in guest memory. The borrow checker cannot see that memory, so
/// the lifetime says nothing: it stays valid as long as the guest memory
/// snapshot the request was parsed with is kept (see `device`'s `Pins`).
pub type GuestBuf = IoBuf<'static>;

/// A parsed, validated request, and what it still needs.
#[derive(Clone)]
pub enum Prepared {
    /// Finished (malformed, refused, GET_ID, DISCARD, WRITE_ZEROES): the
    /// status byte is written; put this in the used ring.
    Done(Completion),
    /// Read `len` bytes at `offset` into `RequestParser::data()`.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Data bytes (the used length on success, without the status byte).
        len: u32,
        /// Where the status byte goes.
        status: GuestBuf,
    },
    /// Write `RequestParser::data()` at `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Where the status byte goes.
        status: GuestBuf,
    },
    /// Make completed writes durable.
    Flush {
        /// Where the status byte goes.
        status: GuestBuf,
    },
    /// A DISCARD or WRITE_ZEROES too large for one go, or whose hooks may
    /// wait long: run its steps.
    Zeroes {
        /// The validated request (boxed: rare, and large).
        job: Box<Zeroes>,
        /// Where the status byte goes.
        status: GuestBuf,
    },
}

/// Reusable scratch space for parsing, so the steady state allocates nothing.
#[derive(Default)]
pub struct RequestParser {
    readable: Vec<GuestBuf>,
    writable: Vec<GuestBuf>,
    /// The last prepared request reads into `writable` (else writes `readable`).
    data_is_writable: bool,
}

/// What `execute` decided.
// Zeroes is large, but an Exec lives only until `prepare` looks at it:
// boxing would allocate for every DISCARD and WRITE_ZEROES.
#[allow(clippy::large_enum_variant)]
enum Exec {
    /// Finished: (status, bytes written to the driver).
    Status(u8, u32),
    /// A validated read at this offset.
    Read(u64),
    /// A validated write at this offset.
    Write(u64),
    /// A validated flush.
    Flush,
    /// A validated DISCARD or WRITE_ZEROES.
    Zeroes(Zeroes),
}

/// Why a chain could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Malformed {
    /// Chain loops, runs off the table, or points outside guest memory.
    Broken,
    /// Readable descriptor after a writable one.
    Order,
    /// No writable byte for the status.
    NoStatus,
    /// Fewer than 16 readable bytes.
    ShortHeader,
    /// More descriptors than a request may have (`seg_max` data segments
    /// plus header and status; the spec also bounds a chain by the queue
    /// size, which an indirect table could otherwise exceed).
    TooLong,
}

impl RequestParser {
    /// Flattens `chain` into host buffers. Returns the status byte location
    /// and whether the chain is well formed. From the first violation on,
    /// nothing more is mapped or collected: the rest of the chain is only
    /// followed to its end (at most its length limit), where the status
    /// byte is, so that the driver still learns of the error.
    fn flatten<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        max_descs: usize,
    ) -> (Option<GuestBuf>, Result<(), Malformed>)
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        self.readable.clear();
        self.writable.clear();
        let mut result = Ok(());
        let mut seen_writable = false;
        let mut last_has_next = false;
        let mut last_writable_ok = false;
        // The last descriptor seen past the first violation, if writable.
        let mut tail = None;
        let mut count = 0usize;
        for desc in chain {
            count += 1;
            if count > max_descs && result.is_ok() {
                result = Err(Malformed::TooLong);
            }
            last_has_next = desc.has_next();
            last_writable_ok = false;
            if result.is_err() {
                tail = (desc.len() > 0 && desc.is_write_only()).then(|| (desc.addr(), desc.len()));
                continue;
            }
            if desc.len() == 0 {
                continue;
            }
            let writable = desc.is_write_only();
            if writable {
                seen_writable = true;
            } else if seen_writable && result.is_ok() {
                result = Err(Malformed::Order);
            }
            let list = if writable {
                &mut self.writable
            } else {
                &mut self.readable
            };
            let mut ok = true;
            for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), desc.len() as usize) {
                match slice {
                    Ok(s) => {
                        let ptr = s.ptr_guard_mut().as_ptr();
                        // SAFETY: the slice is inside a mapped guest region, kept
                        // mapped by the memory guard for the request's lifetime.
                        list.push(unsafe { IoBuf::new(ptr, s.len()) });
                    }
                    Err(_) => {
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                result = Err(Malformed::Broken);
            }
            last_writable_ok = writable && ok;
        }
        if last_has_next {
            // The iterator stopped on a loop, an index past the table, or an
            // unreadable descriptor: we cannot know where the chain really ends.
            return (None, Err(Malformed::Broken));
        }
        if let (Err(e), Some((addr, len))) = (&result, tail) {
            use vm_memory::Address;
            let status = addr
                .checked_add(u64::from(len) - 1)
                .and_then(|at| GuestMemoryBackend::get_slices(mem, at, 1).next())
                .and_then(Result::ok)
                // SAFETY: one byte inside a mapped guest region, kept mapped
                // by the memory guard for the request's lifetime.
                .map(|s| unsafe { IoBuf::new(s.ptr_guard_mut().as_ptr(), 1) });
            let err = if status.is_some() {
                *e
            } else {
                Malformed::Broken
            };
            return (status, Err(err));
        }
        if !last_writable_ok {
            let err = if self.writable.is_empty() {
                Malformed::NoStatus
            } else {
                Malformed::Broken
            };
            return (None, Err(err));
        }
        let status = match self.writable.last_mut() {
            Some(last) => {
                let status = last.advance(last.len() - 1);
                *last = last.truncate(last.len() - 1);
                if last.is_empty() {
                    self.writable.pop();
                }
                Some(status)
            }
            None => None,
        };
        if result.is_ok() && total_len(&self.readable) < HEADER_LEN as u64 {
            result = Err(Malformed::ShortHeader);
        }
        (status, result)
    }

    /// Parses and executes the request in `chain` against `disk`, writes the
    /// status byte, and returns what to put in the used ring. `mem` is the
    /// guest memory the chain lives in; the caller keeps it mapped until the
    /// request is complete.
    pub fn process<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        disk: &Disk,
        cfg: &DeviceConfig,
    ) -> Completion
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let prepared = self.prepare(chain, mem, disk, cfg);
        self.run(prepared, disk)
    }

    /// Runs a request `prepare` returned, synchronously (a large DISCARD or
    /// WRITE_ZEROES in all its steps), and writes its status byte.
    pub fn run(&self, prepared: Prepared, disk: &Disk) -> Completion {
        match prepared {
            Prepared::Done(done) => done,
            Prepared::Read {
                offset,
                len,
                status,
            } => Self::finish(status, disk.read(offset, &self.writable), len),
            Prepared::Write { offset, status } => {
                Self::finish(status, disk.write(offset, &self.readable), 0)
            }
            Prepared::Flush { status } => Self::finish(status, disk.flush(), 0),
            Prepared::Zeroes { mut job, status } => Self::finish(status, job.run(disk), 0),
        }
    }

    /// Parses and validates the request in `chain`. Reads, writes and
    /// flushes are returned for the caller to run (their data buffers are
    /// `data()` until the next call); every other request is executed here
    /// and comes back `Done`. `mem` is the guest memory the chain lives in;
    /// the caller keeps it mapped until the request is finished.
    pub fn prepare<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        disk: &Disk,
        cfg: &DeviceConfig,
    ) -> Prepared
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let max_descs = cfg.seg_max() as usize + 2;
        let (status_buf, parsed) = self.flatten(chain, mem, max_descs);
        let Some(status_buf) = status_buf else {
            debug!("dropping descriptor chain without a usable status byte: {parsed:?}");
            return Prepared::Done(Completion {
                status: None,
                used_len: 0,
            });
        };
        let (status, data_written) = match parsed {
            Err(e) => {
                debug!("malformed descriptor chain: {e:?}");
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
            Ok(()) => {
                let mut header = [0u8; HEADER_LEN];
                copy_out(&self.readable, &mut header);
                consume_front(&mut self.readable, HEADER_LEN);
                let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
                match self.execute(req_type, sector, cfg) {
                    Exec::Status(status, written) => (status, written),
                    Exec::Read(offset) => {
                        self.data_is_writable = true;
                        return Prepared::Read {
                            offset,
                            // Bounded by max_request_bytes (< 4 GiB).
                            len: total_len(&self.writable) as u32,
                            status: status_buf,
                        };
                    }
                    Exec::Write(offset) => {
                        self.data_is_writable = false;
                        return Prepared::Write {
                            offset,
                            status: status_buf,
                        };
                    }
                    Exec::Flush => return Prepared::Flush { status: status_buf },
                    // Large ones run in steps; so do those whose hooks may
                    // wait long (an engine then runs them without blocking).
                    Exec::Zeroes(job) if job.bytes() > ZEROES_STEP || disk.hooks_may_block() => {
                        return Prepared::Zeroes {
                            job: Box::new(job),
                            status: status_buf,
                        }
                    }
                    Exec::Zeroes(mut job) => match job.run(disk) {
                        Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                        Err(e) => (io_status(&e), 0),
                    },
                }
            }
        };
        // SAFETY: status_buf is one byte of mapped guest memory (see flatten).
        unsafe { std::ptr::write_volatile(status_buf.ptr(), status) };
        Prepared::Done(Completion {
            status: Some(status),
            used_len: data_written.saturating_add(1),
        })
    }

    /// The data buffers of the last `Prepared::Read` (to fill) or
    /// `Prepared::Write` (to write out).
    pub fn data(&self) -> &[GuestBuf] {
        if self.data_is_writable {
            &self.writable
        } else {
            &self.readable
        }
    }

    /// Ends a prepared request: writes its status byte for `result` and
    /// returns the used-ring entry. `data_len` is what a successful request
    /// wrote into the driver's buffers (a read's length, else 0).
    ///
    /// `status` must still point into mapped guest memory (the caller keeps
    /// the request's memory snapshot until here).
    pub fn finish(status: GuestBuf, result: Result<(), DiskError>, data_len: u32) -> Completion {
        let (byte, written) = match result {
            Ok(()) => (VIRTIO_BLK_S_OK as u8, data_len),
            Err(e) => (io_status(&e), 0),
        };
        // SAFETY: status is one byte of mapped guest memory (see flatten),
        // kept mapped by the caller.
        unsafe { std::ptr::write_volatile(status.ptr(), byte) };
        Completion {
            status: Some(byte),
            used_len: written.saturating_add(1),
        }
    }

    /// Validates one parsed request; runs the types that are not reads,
    /// writes or flushes.
    fn execute(&mut self, req_type: u32, sector: u64, cfg: &DeviceConfig) -> Exec {
        let ok = VIRTIO_BLK_S_OK as u8;
        let ioerr = Exec::Status(VIRTIO_BLK_S_IOERR as u8, 0);
        let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
        let readable_len = total_len(&self.readable);
        let writable_len = total_len(&self.writable);
        match req_type {
            VIRTIO_BLK_T_IN => {
                if readable_len != 0 {
                    return ioerr;
                }
                match check_rw_range(sector, writable_len, cfg) {
                    Some(offset) => Exec::Read(offset),
                    None => ioerr,
                }
            }
            VIRTIO_BLK_T_OUT => {
                if writable_len != 0 || cfg.read_only {
                    return ioerr;
                }
                match check_rw_range(sector, readable_len, cfg) {
                    Some(offset) => Exec::Write(offset),
                    None => ioerr,
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if readable_len != 0 || writable_len != 0 {
                    return ioerr;
                }
                Exec::Flush
            }
            VIRTIO_BLK_T_GET_ID => {
                if readable_len != 0 {
                    return ioerr;
                }
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let serial = cfg.serial.as_bytes();
                let n = serial.len().min(id.len());
                id[..n].copy_from_slice(&serial[..n]);
                let len = (writable_len as usize).min(id.len());
                copy_in(&self.writable, &id[..len]);
                Exec::Status(ok, len as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = req_type == VIRTIO_BLK_T_DISCARD;
                if writable_len != 0 || cfg.read_only {
                    return ioerr;
                }
                match self.discard_or_zero(discard, cfg) {
                    Ok(job) => Exec::Zeroes(job),
                    Err(status) => Exec::Status(status, 0),
                }
            }
            other => {
                debug!("unsupported request type {other}");
                Exec::Status(unsupp, 0)
            }
        }
    }

    /// Validates every segment of a DISCARD or WRITE_ZEROES before any is
    /// done, so a bad segment fails the request without half of it done.
    fn discard_or_zero(&mut self, discard: bool, cfg: &DeviceConfig) -> Result<Zeroes, u8> {
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let len = total_len(&self.readable) as usize;
        if len == 0
            || !len.is_multiple_of(SEGMENT_LEN)
            || len / SEGMENT_LEN > MAX_DISCARD_SEGMENTS as usize
        {
            return Err(ioerr);
        }
        let mut raw = [0u8; SEGMENT_LEN * MAX_DISCARD_SEGMENTS as usize];
        copy_out(&self.readable, &mut raw[..len]);
        let mut segments = [(0u64, 0u64, false); MAX_DISCARD_SEGMENTS as usize];
        for (i, seg) in raw[..len].chunks_exact(SEGMENT_LEN).enumerate() {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
            let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let reserved = flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if reserved || (discard && unmap) {
                return Err(VIRTIO_BLK_S_UNSUPP as u8);
            }
            if num == 0 || num > MAX_DISCARD_SECTORS {
                return Err(ioerr);
            }
            // The segment limit is max_discard_sectors (checked above), not
            // the read/write transfer limit.
            let Some(offset) = check_range(sector, u64::from(num) * 512, cfg) else {
                return Err(ioerr);
            };
            segments[i] = (offset, u64::from(num) * 512, unmap);
        }
        Ok(Zeroes {
            discard,
            segments,
            count: len / SEGMENT_LEN,
            next: 0,
            done: 0,
        })
    }
}

/// Checks a read/write range: aligned to the logical block size, inside the
/// disk, not larger than a request may be. Returns the byte offset.
fn check_rw_range(sector: u64, len: u64, cfg: &DeviceConfig) -> Option<u64> {
    if len > cfg.max_request_bytes() {
        return None;
    }
    check_range(sector, len, cfg)
}

/// Checks that a range is aligned to the logical block size and inside the
/// disk. Returns the byte offset.
fn check_range(sector: u64, len: u64, cfg: &DeviceConfig) -> Option<u64> {
    let lbs = u64::from(cfg.logical_block_size);
    let offset = sector.checked_mul(512)?;
    let end = offset.checked_add(len)?;
    if !offset.is_multiple_of(lbs) || !len.is_multiple_of(lbs) || end > cfg.size {
        return None;
    }
    Some(offset)
}

fn io_status(err: &DiskError) -> u8 {
    match err {
        DiskError::Image(e) => warn!("I/O error: {e}"),
        other => debug!("request failed: {other}"),
    }
    VIRTIO_BLK_S_IOERR as u8
}

/// Copies the first `out.len()` bytes of `bufs` into `out` (bufs must hold them).
fn copy_out(bufs: &[IoBuf], out: &mut [u8]) {
    let mut done = 0;
    for b in bufs {
        if done == out.len() {
            break;
        }
        let n = b.len().min(out.len() - done);
        // SAFETY: b is valid guest memory of at least n bytes; out has room.
        unsafe { std::ptr::copy_nonoverlapping(b.ptr(), out[done..].as_mut_ptr(), n) };
        done += n;
    }
}

/// Copies `data` into the start of `bufs` (bufs must hold it).
fn copy_in(bufs: &[IoBuf], data: &[u8]) {
    let mut done = 0;
    for b in bufs {
        if done == data.len() {
            break;
        }
        let n = b.len().min(data.len() - done);
        // SAFETY: b is valid, writable guest memory of at least n bytes.
        unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), b.ptr(), n) };
        done += n;
    }
}

/// Drops the first `n` bytes of a buffer list.
fn consume_front(bufs: &mut Vec<GuestBuf>, mut n: usize) {
    let mut whole = 0;
    while whole < bufs.len() && n >= bufs[whole].len() {
        n -= bufs[whole].len();
        whole += 1;
    }
    bufs.drain(..whole);
    if n > 0 {
        if let Some(first) = bufs.first_mut() {
            *first = first.advance(n);
        }
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;

//! The transmission phase: one request at a time per connection, checked
//! against the export (range, payload size, flags, writability) before it
//! touches the source; READ with structured (sparse: data and hole chunks)
//! or simple replies, BLOCK_STATUS with one chunk per selected context.
//!
//! Memory per connection is bounded by one request's payload
//! ([`MAX_PAYLOAD`]) plus the extent lists (at most [`MAX_EXTENTS`] per
//! context). A WRITE is checked before its payload buffer exists: a
//! refused one has its payload skipped in small pieces, and one announcing
//! more than [`MAX_PAYLOAD`] gets an error and the connection is closed
//! (skipping gigabytes is not worth it). Once a WRITE header has arrived,
//! its payload must follow within the payload time-out; the idle time
//! between requests is not bounded (as in QEMU).

use super::export::Export;
use super::handshake::{Context, Negotiated};
use super::proto::*;
use super::source::{Allocation, SourceError};
use std::io::{self, Read, Write};
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

struct Conn<'a, R, W> {
    r: R,
    /// Time a WRITE's payload has to arrive, once its header has.
    payload_timeout: Duration,
    w: W,
    export: &'a Export,
    structured: bool,
    contexts: &'a [Context],
    /// The last payload buffer, reused: a fresh large allocation per
    /// request costs page faults (mmap) on every READ.
    spare: Vec<u8>,
}

/// Largest buffer kept between requests (a 32 MiB one is given back).
const KEEP_BUFFER: usize = 4 << 20;

/// Serves requests until the client disconnects (or breaks the protocol,
/// or does not send a WRITE's payload within `payload_timeout`).
pub fn serve<R: TimedRead, W: Write>(
    r: R,
    w: W,
    n: &Negotiated,
    payload_timeout: Duration,
) -> io::Result<()> {
    let mut c = Conn {
        r,
        payload_timeout,
        w,
        export: &n.export,
        structured: n.structured,
        contexts: &n.contexts,
        spare: Vec::new(),
    };
    loop {
        let mut head = [0u8; REQUEST_LEN];
        match c.r.read_exact(&mut head) {
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
        if !c.request(req)? {
            return Ok(());
        }
        c.w.flush()?;
    }
}

impl<R: TimedRead, W: Write> Conn<'_, R, W> {
    /// Handles one request; false: close the connection.
    fn request(&mut self, req: Request) -> io::Result<bool> {
        if req.kind == CMD_WRITE && req.len > MAX_PAYLOAD {
            let msg = format!("len ({}) is larger than max len ({MAX_PAYLOAD})", req.len);
            self.fail(&req, Failure(EINVAL, msg))?;
            return Ok(false);
        }
        let checked = self.check(&req);
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            self.r
                .set_deadline(Some(Instant::now() + self.payload_timeout))?;
            if checked.is_ok() {
                payload = self.buffer(req.len as usize);
                self.r.read_exact(&mut payload)?;
            } else {
                self.skip(req.len)?;
            }
            self.r.set_deadline(None)?;
        } else if req.kind == CMD_READ && checked.is_ok() {
            payload = self.buffer(req.len as usize);
        }
        match checked.and_then(|()| self.execute(&req, &mut payload)) {
            Ok(reply) => self.send(&req, reply)?,
            Err(f) => self.fail(&req, f)?,
        }
        self.recycle(payload);
        Ok(true)
    }

    /// A buffer of `len` bytes, reusing the spare one. Its old bytes are
    /// not cleared: every user fills it completely (a READ from the
    /// source, a WRITE from the socket) or fails without sending it.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.spare);
        b.resize(len, 0);
        b
    }

    /// Reads and drops the payload of a refused WRITE, through a small
    /// buffer: a refusal costs no memory.
    fn skip(&mut self, len: u32) -> io::Result<()> {
        let skipped = io::copy(&mut (&mut self.r).take(u64::from(len)), &mut io::sink())?;
        if skipped < u64::from(len) {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() <= KEEP_BUFFER && buf.capacity() >= self.spare.capacity() {
            self.spare = buf;
        }
    }

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

    fn send(&mut self, req: &Request, reply: Reply) -> io::Result<()> {
        match reply {
            Reply::Done => self.w.write_all(&simple_reply(0, req.handle)),
            Reply::Read(extents, buf) => {
                let sent = self.send_read(req, &extents, &buf);
                self.recycle(buf);
                sent
            }
            Reply::Status(chunks) => {
                let last = chunks.len().saturating_sub(1);
                for (i, p) in chunks.iter().enumerate() {
                    let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                    let h =
                        chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, req.handle, p.len() as u32);
                    self.w.write_all(&h)?;
                    self.w.write_all(p)?;
                }
                Ok(())
            }
        }
    }

    /// Sends the error reply of `req` (a structured error chunk where the
    /// client expects structured replies for this command).
    fn fail(&mut self, req: &Request, f: Failure) -> io::Result<()> {
        log::debug!("NBD {}: {}", command_name(req.kind), f.1);
        if self.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
            let p = error_payload(f.0, &f.1);
            self.w.write_all(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                req.handle,
                p.len() as u32,
            ))?;
            self.w.write_all(&p)
        } else {
            self.w.write_all(&simple_reply(f.0, req.handle))
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

    fn send_read(
        &mut self,
        req: &Request,
        extents: &[(u64, Allocation)],
        buf: &[u8],
    ) -> io::Result<()> {
        if !self.structured {
            self.w.write_all(&simple_reply(0, req.handle))?;
            return self.w.write_all(buf);
        }
        if buf.is_empty() {
            let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.handle, 0);
            return self.w.write_all(&h);
        }
        let mut pos = 0usize;
        for (i, (n, a)) in extents.iter().enumerate() {
            let n = *n as usize;
            let flags = if i + 1 == extents.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let at = (req.offset + pos as u64).to_be_bytes();
            match a {
                Allocation::Hole => {
                    let h = chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, req.handle, 12);
                    self.w.write_all(&h)?;
                    self.w.write_all(&at)?;
                    self.w.write_all(&(n as u32).to_be_bytes())?;
                }
                Allocation::Data => {
                    let h = chunk_header(flags, REPLY_TYPE_OFFSET_DATA, req.handle, 8 + n as u32);
                    self.w.write_all(&h)?;
                    self.w.write_all(&at)?;
                    self.w.write_all(&buf[pos..pos + n])?;
                }
            }
            pos += n;
        }
        Ok(())
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

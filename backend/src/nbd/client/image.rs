//! [`NbdImage`]: a remote export as an [`Image`]. Requests longer than the
//! server takes in one go are split, and the pieces go out together, so a
//! large transfer keeps the connection full too.

use super::conn::{Client, ClientOptions, Reply, Ticket};
use super::ClientError;
use crate::image::{Image, ImageError};
use crate::iobuf::{total_len, IoBuf};
use crate::nbd::proto::*;
use std::io;
use std::path::{Path, PathBuf};

/// Largest WRITE_ZEROES/TRIM sent at once (QEMU's client sends up to
/// about 2 GiB; servers take that as a length, not a payload).
const MAX_ZERO: u64 = 1 << 30;

/// A remote NBD export as an image node.
pub struct NbdImage {
    client: Client,
    /// The export's URI, shown as the node's file name.
    uri: PathBuf,
}

fn io_err(op: &'static str, offset: u64, len: u64, errno: u32) -> ImageError {
    ImageError::Io {
        op,
        offset,
        len,
        cause: io::Error::from_raw_os_error(errno as i32),
    }
}

impl NbdImage {
    /// Connects to the export.
    pub fn connect(opts: ClientOptions) -> Result<NbdImage, ClientError> {
        let uri = PathBuf::from(opts.addr.uri(&opts.export));
        Ok(NbdImage {
            client: Client::connect(opts)?,
            uri,
        })
    }

    /// The connection (for its counters).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends `[offset, offset+len)` as requests of at most `max` bytes,
    /// all in flight together, and waits for every one of them; `body`
    /// gives each piece's payload.
    fn pieces(
        &self,
        (op, kind, flags): (&'static str, u16, u16),
        offset: u64,
        len: u64,
        max: u64,
        mut body: impl FnMut(u64, u64) -> Option<Vec<u8>>,
    ) -> Result<Vec<Reply>, ImageError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(io_err(op, offset, len, libc::EINVAL as u32));
        }
        let mut tickets: Vec<Result<Ticket, u32>> = Vec::new();
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(max);
            tickets.push(
                self.client
                    .submit(kind, flags, offset + pos, n as u32, body(pos, n)),
            );
            pos += n;
        }
        // Every ticket is waited for, even after a failure: the pieces
        // may still be writing into buffers the caller owns.
        let mut out = Vec::with_capacity(tickets.len());
        let mut first_err = None;
        for t in tickets {
            match t.and_then(Ticket::wait) {
                Ok(r) => out.push(r),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(io_err(op, offset, len, e)),
            None => Ok(out),
        }
    }

    fn max_block(&self) -> u64 {
        u64::from(self.client.info().max_block)
    }

    fn has(&self, flag: u16) -> bool {
        self.client.info().has(flag)
    }
}

/// Copies `src` into `bufs` starting `at` bytes into them.
fn scatter(bufs: &[IoBuf], mut at: usize, mut src: &[u8]) {
    for b in bufs {
        if src.is_empty() {
            return;
        }
        if at >= b.len() {
            at -= b.len();
            continue;
        }
        let n = (b.len() - at).min(src.len());
        // SAFETY: IoBuf's contract: the buffer is valid for its length
        // while the request runs; we write within it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), b.ptr().add(at), n) };
        src = &src[n..];
        at = 0;
    }
}

/// Copies `len` bytes from `bufs`, starting `at` bytes into them.
fn gather(bufs: &[IoBuf], mut at: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for b in bufs {
        if out.len() == len {
            break;
        }
        if at >= b.len() {
            at -= b.len();
            continue;
        }
        let n = (b.len() - at).min(len - out.len());
        // SAFETY: as in `scatter`, reading within the buffer.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(b.ptr().add(at), n) });
        at = 0;
    }
    out
}

impl Image for NbdImage {
    fn size(&self) -> u64 {
        self.client.info().size
    }

    fn path(&self) -> &Path {
        &self.uri
    }

    fn read_at(&self, bufs: &[IoBuf], offset: u64) -> Result<(), ImageError> {
        let len = total_len(bufs);
        let replies = self.pieces(
            ("read", CMD_READ, 0),
            offset,
            len,
            self.max_block(),
            |_, _| None,
        )?;
        let mut at = 0;
        for r in replies {
            if let Reply::Data(d) = r {
                scatter(bufs, at, &d);
                at += d.len();
            }
        }
        Ok(())
    }

    fn write_at(&self, bufs: &[IoBuf], offset: u64, fua: bool) -> Result<(), ImageError> {
        if self.has(TF_READ_ONLY) {
            return Err(io_err("write", offset, total_len(bufs), libc::EROFS as u32));
        }
        let len = total_len(bufs);
        let native_fua = fua && self.has(TF_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        self.pieces(
            ("write", CMD_WRITE, flags),
            offset,
            len,
            self.max_block(),
            |at, n| Some(gather(bufs, at as usize, n as usize)),
        )?;
        if fua && !native_fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ImageError> {
        if !self.has(TF_SEND_FLUSH) {
            return Ok(());
        }
        self.client
            .call(CMD_FLUSH, 0, 0, 0, None)
            .map(drop)
            .map_err(|e| io_err("flush", 0, 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        if !self.has(TF_SEND_TRIM) || self.has(TF_READ_ONLY) {
            return Ok(());
        }
        self.pieces(("discard", CMD_TRIM, 0), offset, len, MAX_ZERO, |_, _| None)
            .map(drop)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), ImageError> {
        if self.has(TF_READ_ONLY) {
            return Err(io_err("write-zeroes", offset, len, libc::EROFS as u32));
        }
        if self.has(TF_SEND_WRITE_ZEROES) {
            let flags = if unmap { 0 } else { CMD_FLAG_NO_HOLE };
            return self
                .pieces(
                    ("write-zeroes", CMD_WRITE_ZEROES, flags),
                    offset,
                    len,
                    MAX_ZERO,
                    |_, _| None,
                )
                .map(drop);
        }
        // A server without WRITE_ZEROES gets the zeroes as data.
        let max = self.max_block();
        self.pieces(("write-zeroes", CMD_WRITE, 0), offset, len, max, |_, n| {
            Some(vec![0u8; n as usize])
        })
        .map(drop)
    }

    fn allocated_bytes(&self) -> u64 {
        // Not known over NBD (QEMU shows 0 too).
        0
    }

    fn allocation(&self, offset: u64) -> Result<(bool, u64), ImageError> {
        let size = self.size();
        if offset >= size {
            return Ok((false, 0));
        }
        let len = (size - offset).min(u64::from(u32::MAX) & !4095).max(1);
        if self.client.info().base_allocation.is_none() {
            return Ok((true, size - offset));
        }
        match self
            .client
            .call(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, len as u32, None)
        {
            Ok(Reply::Status(n, flags)) => Ok((flags & STATE_ZERO == 0, u64::from(n))),
            Ok(_) => Err(io_err("block-status", offset, len, libc::EIO as u32)),
            Err(e) => Err(io_err("block-status", offset, len, e)),
        }
    }
}

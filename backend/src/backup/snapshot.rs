//! [`SnapshotAccess`]: the `snapshot-access` node over a copy-before-write
//! filter, an [`Image`] that reads the point-in-time view. It cannot be
//! written (a mirror or an export that tries gets EPERM); a discard drops
//! clusters from the snapshot as QEMU's does.

use super::cbw::{CopyBeforeWrite, SnapshotError};
use crate::image::{Image, ImageError};
use crate::iobuf::{total_len, IoBuf};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// The point-in-time view of one filter.
#[derive(Debug)]
pub struct SnapshotAccess {
    cbw: Arc<CopyBeforeWrite>,
}

impl SnapshotAccess {
    /// The view of `cbw`.
    pub fn new(cbw: Arc<CopyBeforeWrite>) -> SnapshotAccess {
        SnapshotAccess { cbw }
    }

    /// The filter it reads through.
    pub fn filter(&self) -> &Arc<CopyBeforeWrite> {
        &self.cbw
    }
}

fn image_error(op: &'static str, offset: u64, len: u64, e: SnapshotError) -> ImageError {
    match e {
        SnapshotError::Image(e) => e,
        e => ImageError::Io {
            op,
            offset,
            len,
            cause: io::Error::from_raw_os_error(e.errno()),
        },
    }
}

fn read_only(op: &'static str, offset: u64, len: u64) -> ImageError {
    ImageError::Io {
        op,
        offset,
        len,
        cause: io::Error::from_raw_os_error(libc::EPERM),
    }
}

impl Image for SnapshotAccess {
    fn size(&self) -> u64 {
        self.cbw.size()
    }

    fn path(&self) -> &Path {
        self.cbw.source().path()
    }

    fn read_at(&self, bufs: &[IoBuf], offset: u64) -> Result<(), ImageError> {
        self.cbw
            .read_snapshot(bufs, offset)
            .map_err(|e| image_error("read", offset, total_len(bufs), e))
    }

    fn write_at(&self, bufs: &[IoBuf], offset: u64, _fua: bool) -> Result<(), ImageError> {
        Err(read_only("write", offset, total_len(bufs)))
    }

    fn flush(&self) -> Result<(), ImageError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.cbw
            .discard_snapshot(offset, len)
            .map_err(|e| image_error("discard", offset, len, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), ImageError> {
        Err(read_only("write-zeroes", offset, len))
    }

    fn allocated_bytes(&self) -> u64 {
        0
    }

    fn allocation(&self, offset: u64) -> Result<(bool, u64), ImageError> {
        self.cbw
            .snapshot_allocation(offset)
            .map_err(|e| image_error("block-status", offset, 0, e))
    }
}

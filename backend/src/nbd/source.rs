//! What an NBD export serves from: the narrow [`ExportSource`] trait, and
//! its implementation over the guest's [`Disk`].
//!
//! The trait is all the transmission phase needs, so that other nodes (a
//! snapshot-access node of the block-node graph) can be exported by
//! implementing it. Writes through [`DiskSource`] go through the `Disk`,
//! so dirty bitmaps and a running mirror see them exactly as guest writes,
//! and through its gate, so a mirror pivot waits for them.

use crate::disk::{Disk, DiskError};
use crate::iobuf::IoBuf;
use std::sync::Arc;

/// A failed export operation, as the NBD client will see it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// A write to something that cannot be written.
    #[error("read-only")]
    ReadOnly,
    /// The range is outside the export.
    #[error("out of range")]
    OutOfRange,
    /// The storage is full.
    #[error("no space left")]
    NoSpace,
    /// Any other failure.
    #[error("{0}")]
    Io(String),
}

impl SourceError {
    /// The NBD error number for this failure.
    pub fn errno(&self) -> u32 {
        use super::proto::{EINVAL, EIO, ENOSPC, EPERM};
        match self {
            SourceError::ReadOnly => EPERM,
            SourceError::OutOfRange => EINVAL,
            SourceError::NoSpace => ENOSPC,
            SourceError::Io(_) => EIO,
        }
    }
}

/// How a range is stored, for `base:allocation` and sparse reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Allocated data.
    Data,
    /// Not allocated; reads as zeroes.
    Hole,
}

/// What an export reads from and writes to. Ranges are always checked by
/// the caller against `size()`.
pub trait ExportSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// True if writes may be accepted at all (a writable export needs it).
    fn writable(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;
    /// The status of the range starting at `offset` (< size) and its
    /// length, which may run past `offset + len`.
    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64), SourceError>;
    /// Writes `data` at `offset`; with `fua`, durable on return. `data`
    /// is mutable only because the I/O layer's buffers are; it is not changed.
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), SourceError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), SourceError>;
    /// Deallocates a range (contents become zeroes on raw images).
    fn trim(&self, offset: u64, len: u64) -> Result<(), SourceError>;
    /// Zeroes a range; `may_unmap` lets it become a hole.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), SourceError>;
}

/// The guest's disk as an export source.
pub struct DiskSource {
    disk: Arc<Disk>,
}

impl DiskSource {
    /// Exports `disk`.
    pub fn new(disk: Arc<Disk>) -> DiskSource {
        DiskSource { disk }
    }
}

impl From<DiskError> for SourceError {
    fn from(e: DiskError) -> Self {
        match e {
            DiskError::ReadOnly => SourceError::ReadOnly,
            DiskError::OutOfRange { .. } => SourceError::OutOfRange,
            DiskError::Image(crate::image::ImageError::Io { ref cause, .. })
                if cause.raw_os_error() == Some(libc::ENOSPC) =>
            {
                SourceError::NoSpace
            }
            other => SourceError::Io(other.to_string()),
        }
    }
}

impl ExportSource for DiskSource {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn writable(&self) -> bool {
        !self.disk.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let _io = self.disk.gate().enter();
        Ok(self.disk.read(offset, &[IoBuf::from_slice(buf)])?)
    }

    fn block_status(&self, offset: u64, _len: u64) -> Result<(Allocation, u64), SourceError> {
        let _io = self.disk.gate().enter();
        let (data, n) = self
            .disk
            .with_image(|image| image.allocation(offset))
            .map_err(|e| SourceError::Io(e.to_string()))?;
        let status = if data {
            Allocation::Data
        } else {
            Allocation::Hole
        };
        // An image that reports no progress must not stall the caller.
        Ok((status, n.max(1)))
    }

    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), SourceError> {
        let _io = self.disk.gate().enter();
        self.disk.write(offset, &[IoBuf::from_slice(data)])?;
        if fua {
            self.disk.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), SourceError> {
        let _io = self.disk.gate().enter();
        Ok(self.disk.flush()?)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        let _io = self.disk.gate().enter();
        Ok(self.disk.discard(offset, len)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), SourceError> {
        let _io = self.disk.gate().enter();
        Ok(self.disk.write_zeroes(offset, len, may_unmap)?)
    }
}

//! What the management commands need from the rest of the daemon: the
//! "management context". The QMP layer knows nothing about how the disk or
//! the dirty bitmaps are implemented; the daemon implements these traits
//! (or adapts the dirty-bitmap engine to [`DirtyBitmaps`]) and the commands
//! stay testable with an in-memory double.

use super::error::QmpError;
use std::path::PathBuf;
use std::sync::Arc;

/// A snapshot of the disk for `query-block`; read on every query because a
/// mirror pivot can change the image behind the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The active image file.
    pub image: PathBuf,
    /// Size the guest sees, in bytes.
    pub size: u64,
    /// The guest may not write.
    pub read_only: bool,
    /// The image is opened with O_DIRECT (`cache.direct`).
    pub direct: bool,
    /// Write-back cache enabled (virtio-blk WCE; `cache.writeback`).
    pub writeback: bool,
}

/// The daemon as the management commands see it.
pub trait ManagementContext: Send + Sync {
    /// The disk's node name (`--node-name`, default `disk0`). Commands that
    /// take `node` or `device` accept exactly this name.
    fn node_name(&self) -> String;
    /// The current state of the disk.
    fn disk_info(&self) -> DiskInfo;
    /// The dirty bitmaps of the disk, if the daemon tracks them.
    fn bitmaps(&self) -> Option<Arc<dyn DirtyBitmaps>>;
    /// Asks the daemon to shut down as on SIGTERM. Called after the reply
    /// to `quit` and the SHUTDOWN event have been queued, on the client's
    /// thread: it must return promptly (signal the main loop; do not join
    /// the QMP server from here).
    fn quit(&self);
    /// Runs `f` while guest I/O is held (no guest write in progress, none
    /// starting), so that what `f` changes takes effect at one instant with
    /// respect to guest writes (`transaction`'s commit). An error means I/O
    /// could not be held (a request stuck in storage) and `f` did not run.
    /// The default suits a context without guest I/O (tests).
    fn with_guest_io_held(&self, f: &mut dyn FnMut()) -> Result<(), QmpError> {
        f();
        Ok(())
    }
}

/// One bitmap as `query-block` reports it (QEMU's `BlockDirtyInfo`): the
/// engine's own description, so nothing is copied field by field.
pub use crate::dirty::BitmapInfo;
use crate::dirty::{DirtyBitmap, Frozen};

/// A refusal from the bitmap engine; the `Display` texts are QEMU's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapOpError {
    /// No bitmap by that name.
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
    /// `add` of a name that exists.
    #[error("Bitmap already exists: {0}")]
    AlreadyExists(String),
    /// The bitmap is used by an operation (a job).
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    Busy(String),
    /// The bitmap may not be modified.
    #[error("Bitmap '{0}' is readonly and cannot be modified")]
    ReadOnly(String),
    /// The bitmap's stored state is not trusted.
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    Inconsistent(String),
    /// Any other failure (I/O on the sidecar, limits), reported verbatim.
    #[error("{0}")]
    Failed(String),
}

/// The narrow interface the QMP commands need from the dirty-bitmap engine.
/// Argument checks (empty or over-long names, granularity range) are done
/// by the commands before these calls; the engine checks state (exists,
/// busy, inconsistent). Names are unique per disk.
pub trait DirtyBitmaps: Send + Sync {
    /// Creates a bitmap (`disabled`: not recording yet).
    fn add(
        &self,
        name: &str,
        granularity: u64,
        persistent: bool,
        disabled: bool,
    ) -> Result<(), BitmapOpError>;
    /// Deletes a bitmap (and its stored copy if persistent).
    fn remove(&self, name: &str) -> Result<(), BitmapOpError>;
    /// Clears every bit.
    fn clear(&self, name: &str) -> Result<(), BitmapOpError>;
    /// Starts recording.
    fn enable(&self, name: &str) -> Result<(), BitmapOpError>;
    /// Stops recording.
    fn disable(&self, name: &str) -> Result<(), BitmapOpError>;
    /// ORs every bitmap in `sources` into `target`, atomically.
    fn merge(&self, target: &str, sources: &[String]) -> Result<(), BitmapOpError>;
    /// QEMU's `x-debug-block-dirty-bitmap-sha256`: lowercase hex SHA-256
    /// of the bitmap's bits.
    fn sha256(&self, name: &str) -> Result<String, BitmapOpError>;
    /// Every bitmap, newest first (QEMU's order).
    fn list(&self) -> Vec<BitmapInfo>;
    /// The bits of `name` over `offset..offset + len` as alternating runs
    /// `(length, dirty)` at the bitmap's granularity, at most `max` runs:
    /// how an NBD export reads `qemu:dirty-bitmap:NAME`.
    fn extents(
        &self,
        name: &str,
        _offset: u64,
        _len: u64,
        _max: usize,
    ) -> Result<Vec<(u64, bool)>, BitmapOpError> {
        Err(BitmapOpError::NotFound(name.to_string()))
    }
    /// Marks `name` as in use by an operation (an export: QMP may then not
    /// change it), or releases it.
    fn set_busy(&self, name: &str, _busy: bool) -> Result<(), BitmapOpError> {
        Err(BitmapOpError::NotFound(name.to_string()))
    }
    /// A backup job's start on `name` (with guest I/O held): see
    /// [`crate::dirty::DirtyTracker::begin_backup`].
    fn begin_backup(&self, name: &str) -> Result<Frozen, BitmapOpError> {
        Err(BitmapOpError::NotFound(name.to_string()))
    }
    /// A backup job's end (with guest I/O held): see
    /// [`crate::dirty::DirtyTracker::end_backup`].
    fn end_backup(&self, frozen: &Frozen, _new: Option<&DirtyBitmap>) -> Result<(), BitmapOpError> {
        let _ = frozen;
        Err(BitmapOpError::Failed("no bitmaps".into()))
    }
    /// Starts a transaction over the bitmaps (QMP `transaction`); `None`
    /// if this engine cannot change several bitmaps at one instant.
    fn begin_transaction(&self) -> Option<Box<dyn BitmapTransaction + '_>> {
        None
    }
}

/// Bitmap operations planned together: each is checked against the state
/// the earlier ones leave, none is visible before
/// [`BitmapTransaction::commit`], and dropping the plan changes nothing.
/// Argument checks are the caller's, as for [`DirtyBitmaps`].
pub trait BitmapTransaction {
    /// Plans [`DirtyBitmaps::add`].
    fn add(
        &mut self,
        name: &str,
        granularity: u64,
        persistent: bool,
        disabled: bool,
    ) -> Result<(), BitmapOpError>;
    /// Plans [`DirtyBitmaps::remove`]; the bitmap stays (busy) until the commit.
    fn remove(&mut self, name: &str) -> Result<(), BitmapOpError>;
    /// Plans [`DirtyBitmaps::clear`].
    fn clear(&mut self, name: &str) -> Result<(), BitmapOpError>;
    /// Plans [`DirtyBitmaps::enable`].
    fn enable(&mut self, name: &str) -> Result<(), BitmapOpError>;
    /// Plans [`DirtyBitmaps::disable`].
    fn disable(&mut self, name: &str) -> Result<(), BitmapOpError>;
    /// Plans [`DirtyBitmaps::merge`].
    fn merge(&mut self, target: &str, sources: &[String]) -> Result<(), BitmapOpError>;
    /// Does ahead of the commit what can fail (writing stored copies).
    fn prepare(&mut self) -> Result<(), BitmapOpError>;
    /// Makes everything take effect at once (call with guest I/O held);
    /// on error nothing changed.
    fn commit(self: Box<Self>) -> Result<(), BitmapOpError>;
}

//! Changed-block tracking: dirty bitmaps that guest writes mark from any
//! queue thread without a lock, and persistent bitmaps that come back
//! complete after kill -9 or a power loss.
//!
//! - [`DirtyBitmap`]: the bits (QEMU's layout, so counts and SHA-256 match
//!   QEMU's `query-block` and `x-debug-block-dirty-bitmap-sha256`).
//! - [`DirtyTracker`]: all bitmaps of one disk, the data-path calls
//!   ([`DirtyTracker::mark`] before each write) and the management operations
//!   (QMP's `block-dirty-bitmap-*`).
//! - [`MetaStore`]: the only way sidecar bytes reach storage, so that tests can
//!   substitute a store that loses unsynced writes.
//!
//! The on-disk format and the durability protocol (an activity log of coarse
//! extents made durable before the first write into them, a fine level written
//! lazily) are described in docs/bitmap-format.md.

mod bitmap;
mod format;
mod hook;
mod store;
mod tracker;

pub use bitmap::{check_granularity, hex, qemu_words, DirtyBitmap, DirtyRanges, PAGE_BYTES};
pub use format::{recover, sidecar_path, RecoveredBitmap, Recovery, FORMAT_VERSION};
pub use store::{took_effect, FileStore, MemStore, MetaStore, NotDurable};
pub use tracker::{
    BitmapInfo, BitmapTxn, DirtyTracker, Frozen, PreparedRelocation, TrackerConfig, TrackerStats,
};

/// Smallest granularity (QEMU's lower bound).
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity vubd accepts (64 MiB).
pub const MAX_GRANULARITY: u64 = 64 << 20;
/// Default granularity when `block-dirty-bitmap-add` gives none (QEMU's
/// default for a raw file: 64 KiB).
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Longest bitmap name in bytes (QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_NAME_LEN: usize = 1023;
/// Default activity-log extent: the unit made durable before the first write
/// into it (DRBD uses 4 MiB too). Bounds over-marking after a crash.
pub const DEFAULT_EXTENT_SIZE: u64 = 4 << 20;
/// Default interval of the lazy fine-level write-out.
pub const DEFAULT_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors of the dirty-tracking engine. Messages of the management
/// refusals are QEMU 7.2's own wording (checked against qemu-storage-daemon).
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// `add` with an empty name.
    #[error("Bitmap name cannot be empty")]
    EmptyName,
    /// `add` with a name over 1023 bytes.
    #[error("Bitmap name too long: {0}")]
    NameTooLong(String),
    /// `add` of a name that exists.
    #[error("Bitmap already exists: {0}")]
    AlreadyExists(String),
    /// No bitmap by that name.
    #[error("Dirty bitmap '{0}' not found")]
    NotFound(String),
    /// Granularity not a power of two, or under 512.
    #[error("Granularity must be power of 2 and at least 512")]
    BadGranularity,
    /// Granularity over 64 MiB (worded like QEMU's qcow2 limit message).
    #[error("Granularity exceeds maximum (67108864 bytes)")]
    GranularityTooLarge,
    /// The bitmap is used by an operation (a job) and may not be changed.
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    Busy(String),
    /// The bitmap belongs to a read-only disk.
    #[error("Bitmap '{0}' is readonly and cannot be modified")]
    ReadOnly(String),
    /// The bitmap's stored copy could not be trusted; it can only be removed.
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    Inconsistent(String),
    /// A persistent bitmap was requested where none can be stored.
    #[error("Can't store persistent bitmaps: {0}")]
    PersistenceUnavailable(String),
    /// Reading or writing the sidecar failed. On the data path this fails the
    /// guest request: the mark could not be made durable before the write.
    #[error("bitmap sidecar: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The sidecar has a format this build does not know (a newer vubd wrote
    /// it); refusing to start is safer than discarding it.
    #[error("bitmap sidecar: {0}")]
    UnsupportedFormat(String),
    /// The tracker was shut down; persistent bitmaps take no more marks.
    #[error("dirty tracking is shut down")]
    ShutDown,
    /// New bits for a bitmap have another size or granularity.
    #[error("bits of granularity {given} for a bitmap of granularity {bitmap} or another size")]
    ShapeMismatch {
        /// The granularity of the bits given.
        given: u64,
        /// The bitmap's granularity.
        bitmap: u64,
    },
    /// The bitmap would not fit in memory on this host.
    #[error("disk too large for a dirty bitmap at this granularity")]
    TooLarge,
}

impl DirtyError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        DirtyError::Io {
            what: what.into(),
            source,
        }
    }
}

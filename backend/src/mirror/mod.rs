//! The live mirror block job: copies the disk to a target image while the
//! guest runs, keeps the target in sync, and on `complete` switches the
//! guest's active image to the target (the pivot). QEMU's `mirror` job
//! semantics and QMP names; docs/mirror.md has the full story.
//!
//! Pieces:
//! - [`chunks`]: lock-free per-chunk bitmaps (dirty D, in-flight I),
//!   per-chunk writer counters and chunk range locks;
//! - [`state_file`]: the persistent bitmap P beside the source image, which
//!   lets a mirror resume after the daemon was killed;
//! - [`hook`]: the [`crate::WriteHook`] that marks guest writes (and, in
//!   write-blocking mode, writes them to the target too);
//! - [`through`]: those target writes off the guest's thread, bounded by
//!   the mirror's target time-out;
//! - [`engine`]: the copier: picks dirty extents, copies them with several
//!   workers in flight, holes as holes, at the job's speed;
//! - [`job`]: the job driver (phase 1, READY, pivot, cancel, errors);
//! - [`manager`]: one disk's mirror slot, start-up recovery, and the start
//!   of a job from QMP arguments;
//! - [`top`]: the job's filter node (`mirror_top`) in the graph, which is
//!   its write hook in the guest's path;
//! - [`pivot_marker`]: the marker a pivot leaves beside the old image, so
//!   that a restart on it does not roll the guest back;
//! - [`qmp`]: `blockdev-mirror` and `drive-mirror`.

pub mod chunks;
pub mod engine;
pub mod hook;
pub mod job;
pub mod manager;
pub mod pivot_marker;
pub mod qmp;
pub mod state_file;
pub mod through;
pub mod top;

pub use manager::{MirrorManager, MirrorRequest};

use crate::image::ImageError;
use crate::jobs::OnError;

/// Default bytes per dirty bit (QEMU's default for a raw target).
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Default `buf-size`: bytes of copies in flight (QEMU's default).
pub const DEFAULT_BUF_SIZE: u64 = 16 << 20;
/// Largest single copy (one read + one write).
pub const MAX_EXTENT: u64 = 4 << 20;
/// Copy workers (copies in flight at most).
pub const MAX_WORKERS: usize = 4;
/// Most copy workers for a target reached over the network (NBD).
pub const MAX_REMOTE_WORKERS: usize = 16;

/// Errors of the mirror that are not QMP argument errors.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The persistent state (sidecar) could not be created, read or trusted.
    #[error("mirror state: {0}")]
    State(String),
    /// The target image could not be opened or created.
    #[error("{0}")]
    Target(String),
    /// Image I/O failed.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// What the first pass copies (QAPI `MirrorSyncMode`, minus the
/// bitmap-driven modes vubd does not offer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// The whole disk (holes become holes or zeroes on the target).
    Full,
    /// The top image of the chain: a raw disk has no backing file, so this
    /// is the whole disk, as `Full` (QEMU: `base` is then NULL, and a hole
    /// of the source is part of the image; copying only the allocated data
    /// would leave a used target's old data where the source has holes).
    Top,
    /// Nothing at first: only what the guest writes from now on.
    None,
}

impl SyncMode {
    /// QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncMode::Full => "full",
            SyncMode::Top => "top",
            SyncMode::None => "none",
        }
    }
}

/// QAPI `MirrorCopyMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Guest writes only mark chunks dirty; the copier catches up.
    Background,
    /// Guest writes also go to the target before they complete.
    WriteBlocking,
}

impl CopyMode {
    /// QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }
}

/// The settled parameters of one mirror.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// First-pass scope.
    pub sync: SyncMode,
    /// Bytes per dirty bit.
    pub granularity: u64,
    /// Bytes of copies in flight.
    pub buf_size: u64,
    /// Initial copy mode.
    pub copy_mode: CopyMode,
    /// Policy for source read errors.
    pub on_source_error: OnError,
    /// Policy for target write errors.
    pub on_target_error: OnError,
    /// Holes on the source are punched on the target (else written as zeroes).
    pub unmap: bool,
    /// The job finalizes (pivots) by itself.
    pub auto_finalize: bool,
    /// Resumed from a persistent state: the dirty bitmap is loaded, not built.
    pub resumed: bool,
}

/// Text of an OS error as QEMU prints it (`strerror`, no "(os error N)").
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The errno inside an image error (EIO if there is none).
pub fn image_errno(e: &ImageError) -> i32 {
    match e {
        ImageError::Open { cause, .. } | ImageError::Io { cause, .. } => {
            cause.raw_os_error().unwrap_or(libc::EIO)
        }
        ImageError::Refused(_) => libc::EACCES,
    }
}

//! Backup: image fleecing for pull-mode backup, as QEMU 7.2 does it.
//!
//! - [`cbw`]: the copy-before-write filter, a write hook in the guest's
//!   path that copies old data to a target before a write overwrites it;
//! - [`snapshot`]: the `snapshot-access` node, the point-in-time view;
//! - [`job`]: the `blockdev-backup sync=none` job that owns the filter;
//! - [`qmp`]: `blockdev-backup` and its `transaction` action.
//!
//! The graph of a fleecing setup (docs/backup.md): the disk's node under
//! the filter node (`file` child) with the target node beside it
//! (`target`), and the snapshot-access node over the filter.

pub mod cbw;
pub mod job;
pub mod qmp;
pub mod snapshot;

pub use cbw::{CbwOptions, CopyBeforeWrite, OnCbwError, SnapshotError};
pub use snapshot::SnapshotAccess;

#[cfg(test)]
mod tests;

//! Connects the dirty tracker to the disk's write path.

use super::DirtyTracker;
use crate::disk::{DiskError, WriteHook, WriteOp};

impl WriteHook for DirtyTracker {
    fn before_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.mark(offset, len)
            .map_err(|e| DiskError::Hook(format!("dirty bitmap: {e}")))
    }

    fn after_write(&self, offset: u64, len: u64, _op: WriteOp<'_>) -> Result<(), DiskError> {
        self.write_completed(offset, len);
        Ok(())
    }

    fn write_failed(&self, offset: u64, len: u64) {
        // Part of the data may have landed: the same as a completed write.
        self.write_completed(offset, len);
    }

    fn after_flush(&self) -> Result<(), DiskError> {
        self.after_guest_flush()
            .map_err(|e| DiskError::Hook(format!("dirty bitmap: {e}")))
    }
}

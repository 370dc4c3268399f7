//! Connects the dirty tracker to the disk's write path.

use super::DirtyTracker;
use crate::disk::{DiskError, WriteHook};

impl WriteHook for DirtyTracker {
    fn before_write(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.mark(offset, len)
            .map_err(|e| DiskError::Hook(format!("dirty bitmap: {e}")))
    }

    fn after_flush(&self) -> Result<(), DiskError> {
        self.after_guest_flush()
            .map_err(|e| DiskError::Hook(format!("dirty bitmap: {e}")))
    }
}

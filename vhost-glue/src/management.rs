//! The daemon as the management plane sees it: the QMP commands' view of
//! the disk, its bitmaps, and the way to ask the daemon to quit.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vubd_backend::qmp::{DirtyBitmaps, DiskInfo, ManagementContext, QmpError};
use vubd_backend::Disk;

/// How long a command that must act at one instant with respect to guest
/// writes (`transaction`) first waits for the requests in flight; each
/// further attempt waits twice as long (100 ms .. 3.2 s, as a pivot does).
const HOLD_FIRST_TIMEOUT: Duration = Duration::from_millis(100);
const HOLD_ATTEMPTS: u32 = 6;

/// Why the daemon is shutting down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    /// SIGTERM or SIGINT.
    Signal,
    /// The QMP `quit` command.
    Quit,
}

/// The management context of one vubd process.
pub struct DaemonContext {
    /// The disk's node name.
    pub node_name: String,
    /// The disk.
    pub disk: Arc<Disk>,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// The dirty bitmaps, when tracked.
    pub bitmaps: Option<Arc<dyn DirtyBitmaps>>,
    /// Where shutdown requests go (the main thread's shutdown handler).
    pub shutdown: Mutex<Sender<ShutdownReason>>,
}

impl ManagementContext for DaemonContext {
    fn node_name(&self) -> String {
        self.node_name.clone()
    }

    fn disk_info(&self) -> DiskInfo {
        let image: PathBuf = self.disk.image().path().to_path_buf();
        DiskInfo {
            image,
            size: self.disk.size(),
            read_only: self.disk.read_only(),
            direct: self.direct,
            writeback: self.disk.writeback(),
        }
    }

    fn bitmaps(&self) -> Option<Arc<dyn DirtyBitmaps>> {
        self.bitmaps.clone()
    }

    fn with_guest_io_held(&self, f: &mut dyn FnMut()) -> Result<(), QmpError> {
        // Each attempt is bounded, so a request stuck in storage stalls the
        // guest's other queues only briefly and finally fails the command.
        let mut timeout = HOLD_FIRST_TIMEOUT;
        for _ in 0..HOLD_ATTEMPTS {
            if let Some(_pause) = self.disk.gate().pause_timeout(timeout) {
                f();
                return Ok(());
            }
            timeout *= 2;
        }
        Err(QmpError::generic(
            "guest I/O could not be held: a request is stuck in storage",
        ))
    }

    fn quit(&self) {
        let tx = self.shutdown.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(ShutdownReason::Quit);
    }
}

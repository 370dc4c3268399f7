//! The daemon as the management plane sees it: the QMP commands' view of
//! the disk, its bitmaps, and the way to ask the daemon to quit.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use vubd_backend::qmp::{DirtyBitmaps, DiskInfo, ManagementContext};
use vubd_backend::Disk;

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

    fn quit(&self) {
        let tx = self.shutdown.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(ShutdownReason::Quit);
    }
}

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
pub const HOLD_FIRST_TIMEOUT: Duration = Duration::from_millis(100);
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
    /// The first attempt's wait for guest requests in flight when a command
    /// holds guest I/O ([`HOLD_FIRST_TIMEOUT`]; a test that parks a request
    /// on purpose sets it long so that no attempt expires under load).
    pub hold_first_timeout: Duration,
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
        let mut timeout = self.hold_first_timeout;
        for _ in 0..HOLD_ATTEMPTS {
            if let Some(_pause) = self.disk.gate().pause_timeout(timeout) {
                let held = std::time::Instant::now();
                f();
                log::info!("guest I/O held for {:?}", held.elapsed());
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

#[cfg(test)]
mod tests {
    //! `transaction` through the daemon's context: its commit waits for
    //! the guest writes in flight and holds new ones, so each write is in
    //! the bitmaps of before or in those of after. A test image parks a
    //! write to force the interleaving.

    use super::*;
    use std::path::Path;
    use std::sync::{mpsc, Condvar, MutexGuard};
    use std::time::Instant;
    use vubd_backend::dirty::{DirtyTracker, TrackerConfig};
    use vubd_backend::image::ImageError;
    use vubd_backend::qmp::{standard_dispatcher, EventBus};
    use vubd_backend::IoBuf;

    const SIZE: u64 = 1 << 20;
    const CHUNK: u64 = 64 << 10;
    /// Only so that a broken build fails instead of hanging.
    const HANG: Duration = Duration::from_secs(20);

    #[derive(Default)]
    struct Park {
        parked: bool,
        release: bool,
    }

    /// Parks the first write to offset 0 until released.
    #[derive(Default)]
    struct ParkImage {
        state: Mutex<Park>,
        cv: Condvar,
    }

    impl ParkImage {
        fn lock(&self) -> MutexGuard<'_, Park> {
            self.state.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl vubd_backend::Image for ParkImage {
        fn size(&self) -> u64 {
            SIZE
        }
        fn path(&self) -> &Path {
            Path::new("/park-image")
        }
        fn read_at(&self, _bufs: &[IoBuf], _offset: u64) -> Result<(), ImageError> {
            Ok(())
        }
        fn write_at(&self, _bufs: &[IoBuf], offset: u64, _fua: bool) -> Result<(), ImageError> {
            let mut st = self.lock();
            if offset == 0 && !st.parked {
                st.parked = true;
                self.cv.notify_all();
                while !st.release {
                    st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            }
            Ok(())
        }
        fn flush(&self) -> Result<(), ImageError> {
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> Result<(), ImageError> {
            Ok(())
        }
        fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<(), ImageError> {
            Ok(())
        }
        fn allocated_bytes(&self) -> u64 {
            0
        }
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + HANG;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A queue worker's write: inside the gate, as the device runs it.
    fn guest_write(disk: &Disk, offset: u64) {
        let _batch = disk.gate().enter();
        let mut buf = vec![0xa5u8; 512];
        disk.write(offset, &[IoBuf::from_slice(&mut buf)])
            .expect("write");
    }

    #[test]
    fn transaction_commits_between_guest_writes() {
        let image = Arc::new(ParkImage::default());
        let disk = Arc::new(Disk::new(Box::new(image.clone()), false));
        let tracker = Arc::new(DirtyTracker::open(TrackerConfig::new(SIZE)).expect("tracker"));
        disk.add_hook(tracker.clone());
        let (tx, _rx) = mpsc::channel();
        let ctx = DaemonContext {
            node_name: "disk0".into(),
            disk: disk.clone(),
            direct: false,
            bitmaps: Some(tracker.clone()),
            shutdown: Mutex::new(tx),
            // The interleaving is forced by the parked write A: the
            // commit must wait for it however slowly B arrives.
            hold_first_timeout: HANG * 10,
        };
        let d = standard_dispatcher(Arc::new(ctx), EventBus::new());
        let run = move |cmd: &str, args: serde_json::Value| {
            let serde_json::Value::Object(m) = args else {
                unreachable!()
            };
            d.execute(cmd, m)
        };
        run(
            "block-dirty-bitmap-add",
            serde_json::json!({"node": "disk0", "name": "b0"}),
        )
        .expect("add b0");

        // Write A has marked b0 and is parked in the image.
        let w1 = {
            let disk = disk.clone();
            std::thread::spawn(move || guest_write(&disk, 0))
        };
        wait_for("write A to park", || image.lock().parked);
        let txn = std::thread::spawn(move || {
            run(
                "transaction",
                serde_json::json!({"actions": [
                    {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}},
                    {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b1"}}]}),
            )
        });
        wait_for("the transaction to hold guest I/O", || {
            disk.gate().is_paused()
        });
        // Write B arrives while the commit waits for A: it must wait too.
        let w2 = {
            let disk = disk.clone();
            std::thread::spawn(move || guest_write(&disk, CHUNK))
        };
        wait_for("write B to wait at the gate", || disk.gate().waiting() == 1);
        assert!(
            tracker.list().iter().all(|b| b.name != "b1"),
            "committed while a guest write was in flight"
        );
        image.lock().release = true;
        image.cv.notify_all();
        w1.join().expect("write A");
        txn.join().expect("transaction").expect("transaction ok");
        w2.join().expect("write B");

        let b0 = tracker.bitmap("b0").expect("b0");
        let b1 = tracker.bitmap("b1").expect("b1");
        assert!(!b0.is_recording() && b1.is_recording());
        assert_eq!(
            (b0.get(0), b0.get(CHUNK), b1.get(0), b1.get(CHUNK)),
            (true, false, false, true),
            "write A belongs to b0 only, write B to b1 only"
        );
    }
}

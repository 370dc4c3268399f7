//! The dirty-bitmap engine ([`DirtyTracker`]) seen through the narrow
//! [`DirtyBitmaps`] interface the QMP commands use, so the daemon wires
//! bitmaps into the monitor with `Some(tracker as Arc<dyn DirtyBitmaps>)`.
//! The engine already words its refusals as QEMU does; this only maps its
//! error type onto the QMP layer's.

use super::context::{BitmapInfo, BitmapOpError, BitmapTransaction, DirtyBitmaps};
use crate::dirty::{BitmapTxn, DirtyBitmap, DirtyError, DirtyTracker, Frozen};

impl From<DirtyError> for BitmapOpError {
    fn from(e: DirtyError) -> Self {
        match e {
            DirtyError::NotFound(n) => BitmapOpError::NotFound(n),
            DirtyError::AlreadyExists(n) => BitmapOpError::AlreadyExists(n),
            DirtyError::Busy(n) => BitmapOpError::Busy(n),
            DirtyError::ReadOnly(n) => BitmapOpError::ReadOnly(n),
            DirtyError::Inconsistent(n) => BitmapOpError::Inconsistent(n),
            other => BitmapOpError::Failed(other.to_string()),
        }
    }
}

impl DirtyBitmaps for DirtyTracker {
    fn add(
        &self,
        name: &str,
        granularity: u64,
        persistent: bool,
        disabled: bool,
    ) -> Result<(), BitmapOpError> {
        Ok(DirtyTracker::add(
            self,
            name,
            Some(granularity),
            persistent,
            disabled,
        )?)
    }

    fn remove(&self, name: &str) -> Result<(), BitmapOpError> {
        Ok(DirtyTracker::remove(self, name)?)
    }

    fn clear(&self, name: &str) -> Result<(), BitmapOpError> {
        Ok(DirtyTracker::clear(self, name)?)
    }

    fn enable(&self, name: &str) -> Result<(), BitmapOpError> {
        Ok(DirtyTracker::enable(self, name)?)
    }

    fn disable(&self, name: &str) -> Result<(), BitmapOpError> {
        Ok(DirtyTracker::disable(self, name)?)
    }

    fn merge(&self, target: &str, sources: &[String]) -> Result<(), BitmapOpError> {
        let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
        Ok(DirtyTracker::merge(self, target, &sources)?)
    }

    fn sha256(&self, name: &str) -> Result<String, BitmapOpError> {
        Ok(DirtyTracker::sha256(self, name)?)
    }

    fn list(&self) -> Vec<BitmapInfo> {
        DirtyTracker::list(self)
    }

    fn extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, bool)>, BitmapOpError> {
        Ok(DirtyTracker::bitmap(self, name)?.extents(offset, len, max))
    }

    fn set_busy(&self, name: &str, busy: bool) -> Result<(), BitmapOpError> {
        Ok(DirtyTracker::set_busy(self, name, busy)?)
    }

    fn begin_backup(&self, name: &str) -> Result<Frozen, BitmapOpError> {
        Ok(DirtyTracker::begin_backup(self, name)?)
    }

    fn end_backup(&self, frozen: &Frozen, new: Option<&DirtyBitmap>) -> Result<(), BitmapOpError> {
        Ok(DirtyTracker::end_backup(self, frozen, new)?)
    }

    fn begin_transaction(&self) -> Option<Box<dyn BitmapTransaction + '_>> {
        Some(Box::new(DirtyTracker::transaction(self)))
    }
}

impl BitmapTransaction for BitmapTxn<'_> {
    fn add(
        &mut self,
        name: &str,
        granularity: u64,
        persistent: bool,
        disabled: bool,
    ) -> Result<(), BitmapOpError> {
        Ok(BitmapTxn::add(
            self,
            name,
            Some(granularity),
            persistent,
            disabled,
        )?)
    }

    fn remove(&mut self, name: &str) -> Result<(), BitmapOpError> {
        Ok(BitmapTxn::remove(self, name)?)
    }

    fn clear(&mut self, name: &str) -> Result<(), BitmapOpError> {
        Ok(BitmapTxn::clear(self, name)?)
    }

    fn enable(&mut self, name: &str) -> Result<(), BitmapOpError> {
        Ok(BitmapTxn::enable(self, name)?)
    }

    fn disable(&mut self, name: &str) -> Result<(), BitmapOpError> {
        Ok(BitmapTxn::disable(self, name)?)
    }

    fn merge(&mut self, target: &str, sources: &[String]) -> Result<(), BitmapOpError> {
        let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
        Ok(BitmapTxn::merge(self, target, &sources)?)
    }

    fn prepare(&mut self) -> Result<(), BitmapOpError> {
        Ok(BitmapTxn::prepare(self)?)
    }

    fn commit(self: Box<Self>) -> Result<(), BitmapOpError> {
        Ok(BitmapTxn::commit(*self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::TrackerConfig;
    use crate::qmp::{standard_dispatcher, DiskInfo, EventBus, ManagementContext};
    use serde_json::{json, Value};
    use std::sync::Arc;

    struct Ctx(Arc<DirtyTracker>);

    impl ManagementContext for Ctx {
        fn node_name(&self) -> String {
            "disk0".into()
        }
        fn disk_info(&self) -> DiskInfo {
            DiskInfo {
                image: "/nonexistent".into(),
                size: self.0.disk_size(),
                read_only: false,
                direct: false,
                writeback: true,
            }
        }
        fn bitmaps(&self) -> Option<Arc<dyn DirtyBitmaps>> {
            Some(self.0.clone())
        }
        fn quit(&self) {}
    }

    /// The commands against the real engine (in memory): marks made by the
    /// data path show up in `count`, and QEMU's hash of an empty 1024-bit
    /// bitmap (128 zero bytes, checked against qemu-storage-daemon 7.2).
    #[test]
    fn commands_on_the_real_engine() {
        let tracker = Arc::new(DirtyTracker::open(TrackerConfig::new(64 << 20)).unwrap());
        let d = standard_dispatcher(Arc::new(Ctx(tracker.clone())), EventBus::new());
        let run = |cmd: &str, args: Value| {
            let Value::Object(m) = args else {
                unreachable!()
            };
            d.execute(cmd, m)
        };
        run(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b"}),
        )
        .unwrap();
        let sha = run(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "disk0", "name": "b"}),
        )
        .unwrap();
        assert_eq!(
            sha["sha256"],
            "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"
        );
        tracker.mark(65536 - 512, 1024).unwrap();
        let q = run("query-block", json!({})).unwrap();
        assert_eq!(q[0]["inserted"]["dirty-bitmaps"][0]["count"], 2 * 65536);
        let e = run(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b"}),
        )
        .unwrap_err();
        assert_eq!(e.desc, "Bitmap already exists: b");
        let e = run(
            "block-dirty-bitmap-merge",
            json!({"node": "disk0", "target": "b", "bitmaps": ["x"]}),
        )
        .unwrap_err();
        assert_eq!(e.desc, "Dirty bitmap 'x' not found");
        tracker.set_busy("b", true).unwrap();
        let e = run(
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "b"}),
        )
        .unwrap_err();
        assert_eq!(
            e.desc,
            "Bitmap 'b' is currently in use by another operation and cannot be used"
        );
    }
}

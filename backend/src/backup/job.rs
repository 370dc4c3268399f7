//! The backup job. With `sync: none` (fleecing) it copies nothing by
//! itself: its copy-before-write filter does the work on guest writes, and
//! it runs until `block-job-cancel`. With `sync: full` (push) it also
//! copies every cluster the guest has not made the filter copy yet, so
//! the target ends up as the point-in-time image, and then completes.
//! With `sync: bitmap` it copies only the clusters its bitmap had set at
//! its start (`top` copies all: vubd's disks have no backing file). Either
//! way, on its way out it settles its bitmap (`bitmap-mode`), takes the
//! filter out of the guest's path and out of the graph, and releases its
//! target.

use super::cbw::CopyBeforeWrite;
use crate::dirty::{DirtyBitmap, Frozen};
use crate::disk::{Disk, WriteHook};
use crate::graph::{Graph, User};
use crate::jobs::{ErrorAction, IoOperation, JobContext, JobDriver, OnError};
use crate::qmp::{DirtyBitmaps, ManagementContext};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The error policies of a push backup (`sync: full`).
#[derive(Debug, Clone, Copy)]
pub struct Push {
    /// `on-source-error`.
    pub on_source_error: OnError,
    /// `on-target-error`.
    pub on_target_error: OnError,
}

/// QEMU's `BitmapSyncMode`: what the job's end makes of its bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapMode {
    /// After a success, the writes since the start; else unchanged.
    OnSuccess,
    /// Unchanged (the bits at the start and the writes since).
    Never,
    /// The writes since the start and the clusters not copied.
    Always,
}

/// A job's bitmap (`bitmap`, `bitmap-mode`) from its start to its end.
pub struct SyncBitmap {
    /// The bitmaps, where the bitmap is settled at the end.
    pub bitmaps: Arc<dyn DirtyBitmaps>,
    /// Holds guest I/O for the end, so no write falls between the
    /// successor and the new bits.
    pub ctx: Arc<dyn ManagementContext>,
    /// The mode.
    pub mode: BitmapMode,
    /// The start's copy set and successor.
    pub frozen: Frozen,
}

/// What a backup job holds.
pub struct BackupJob {
    /// The guest's disk, whose hook list the filter is in.
    pub disk: Arc<Disk>,
    /// The graph holding the filter node and the target.
    pub graph: Arc<Graph>,
    /// The filter.
    pub cbw: Arc<CopyBeforeWrite>,
    /// The filter's node name.
    pub filter_node: String,
    /// The target's node name.
    pub target_node: String,
    /// `Some` for a push backup (`sync` other than `none`).
    pub push: Option<Push>,
    /// The bitmap, from the start instant to the end.
    pub bitmap: Mutex<Option<SyncBitmap>>,
}

impl BackupJob {
    /// Takes the filter out of the guest's path and the graph, and lets
    /// the target go (the job's end, or a transaction that did not commit).
    pub fn remove_filter(&self, job_id: &str) {
        let hook: Arc<dyn WriteHook> = self.cbw.clone();
        self.disk.remove_hook(&hook);
        self.cbw.detach();
        // The callback holds the job: drop it with the filter.
        self.cbw.set_progress(None);
        self.graph.drop_node(&self.filter_node);
        self.graph
            .release(&self.target_node, &User::BackupJob(job_id.to_string()));
        if let Some(target) = self.graph.lookup(&self.target_node) {
            target.image().unlock();
        }
    }

    /// The progress of a backup job is the bytes its filter copied
    /// (QEMU's `offset`), out of the bytes to copy (`len`): the disk's
    /// size, or the clusters of a `sync: bitmap` job's copy set. Set up
    /// before the filter goes in, so no copy goes uncounted.
    pub fn track_progress(&self, ctx: JobContext) {
        ctx.progress_set_remaining(self.cbw.pending().count_bytes().min(self.cbw.size()));
        self.cbw
            .set_progress(Some(Box::new(move |bytes| ctx.progress_update(bytes))));
    }
}

impl BackupJob {
    /// Settles the bitmap at the job's end, as QEMU's
    /// `backup_cleanup_sync_bitmap`: on success (unless `never`) or with
    /// `always`, the bitmap becomes the writes since the start, plus, after
    /// a failure, the clusters not copied; otherwise it is left as it is,
    /// which is the bits of the start and the writes since.
    fn settle_bitmap(&self, ok: bool) {
        let Some(s) = self.bitmap.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let replace = (ok || s.mode == BitmapMode::Always) && s.mode != BitmapMode::Never;
        let copy = &s.frozen.copy;
        let mut result = Ok(());
        let mut settle = || {
            let new = match replace {
                false => None,
                true => match DirtyBitmap::new(copy.disk_size(), copy.granularity(), false) {
                    Ok(new) => {
                        new.merge_from(&s.frozen.successor);
                        if !ok {
                            new.merge_from(self.cbw.pending());
                        }
                        Some(new)
                    }
                    Err(e) => {
                        result = Err(e.to_string());
                        None
                    }
                },
            };
            if let Err(e) = s.bitmaps.end_backup(&s.frozen, new.as_ref()) {
                result = Err(e.to_string());
            }
        };
        if let Err(e) = s.ctx.with_guest_io_held(&mut settle) {
            // Left as it is (a superset of what it should become).
            result = s
                .bitmaps
                .end_backup(&s.frozen, None)
                .map_err(|e| e.to_string());
            log::warn!("backup: guest I/O could not be held to settle the bitmap: {e}");
        }
        if let Err(e) = result {
            log::warn!("backup: the bitmap keeps its bits: {e}");
        }
    }

    /// A push backup's copy: every cluster in order, a piece at a time,
    /// with pause points, the speed limit and the error policies between
    /// pieces. A cluster the guest wrote meanwhile was copied by the filter
    /// and is skipped.
    fn copy_all(&self, ctx: &JobContext, push: Push) -> Result<(), String> {
        const PIECE: u64 = 1 << 20;
        let cluster = self.cbw.options().cluster;
        let step = (PIECE / cluster).max(1);
        let n = self.cbw.clusters();
        let mut c = 0;
        while c < n {
            ctx.pause_point();
            if ctx.is_cancelled() {
                return Ok(());
            }
            let end = (c + step).min(n);
            match self.cbw.copy_clusters(c, end - 1) {
                Ok(()) => c = end,
                Err(e) => {
                    let (policy, op) = if e.on_source {
                        (push.on_source_error, IoOperation::Read)
                    } else {
                        (push.on_target_error, IoOperation::Write)
                    };
                    match ctx.error_action(policy, op, e.errno) {
                        ErrorAction::Report => return Err(e.message),
                        // Retried after `job-resume`.
                        ErrorAction::Stop => continue,
                        // Retried, without spinning on a lasting error.
                        ErrorAction::Ignore => {
                            ctx.sleep(Duration::from_millis(100));
                            continue;
                        }
                    }
                }
            }
            let speed = ctx.speed();
            if speed > 0 {
                ctx.sleep(Duration::from_secs_f64(
                    (step * cluster) as f64 / speed as f64,
                ));
            }
        }
        Ok(())
    }
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    fn run(&self, ctx: &JobContext) -> Result<(), String> {
        match self.push {
            Some(push) => self.copy_all(ctx, push),
            None => loop {
                ctx.pause_point();
                if ctx.is_cancelled() {
                    return Ok(());
                }
                // Any management action wakes it.
                ctx.sleep(Duration::from_secs(3600));
            },
        }
    }

    fn commit(&self, _ctx: &JobContext) -> Result<(), String> {
        self.settle_bitmap(true);
        Ok(())
    }

    fn abort(&self, _ctx: &JobContext) {
        self.settle_bitmap(false);
    }

    fn clean(&self, ctx: &JobContext) {
        self.remove_filter(ctx.id());
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

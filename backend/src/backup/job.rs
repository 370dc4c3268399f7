//! The fleecing job (`blockdev-backup sync=none`): it copies nothing by
//! itself; its copy-before-write filter does the work on guest writes. It
//! runs until `block-job-cancel`, and on its way out takes the filter out
//! of the guest's path and out of the graph, and releases its target.

use super::cbw::CopyBeforeWrite;
use crate::disk::{Disk, WriteHook};
use crate::graph::{Graph, User};
use crate::jobs::{JobContext, JobDriver};
use std::sync::Arc;
use std::time::Duration;

/// What a fleecing job holds.
pub struct FleecingJob {
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
}

impl FleecingJob {
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
    }

    /// The progress of a fleecing job is the bytes its filter copied
    /// (QEMU's `offset`), out of the disk's size (`len`). Set up before
    /// the filter goes in, so no copy goes uncounted.
    pub fn track_progress(&self, ctx: JobContext) {
        ctx.progress_set_remaining(self.cbw.size());
        self.cbw
            .set_progress(Some(Box::new(move |bytes| ctx.progress_update(bytes))));
    }
}

impl JobDriver for FleecingJob {
    fn job_type(&self) -> &'static str {
        "backup"
    }

    fn run(&self, ctx: &JobContext) -> Result<(), String> {
        loop {
            ctx.pause_point();
            if ctx.is_cancelled() {
                return Ok(());
            }
            // Any management action wakes it.
            ctx.sleep(Duration::from_secs(3600));
        }
    }

    fn commit(&self, _ctx: &JobContext) -> Result<(), String> {
        Ok(())
    }

    fn abort(&self, _ctx: &JobContext) {}

    fn clean(&self, ctx: &JobContext) {
        self.remove_filter(ctx.id());
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

//! The backup job. With `sync: none` (fleecing) it copies nothing by
//! itself: its copy-before-write filter does the work on guest writes, and
//! it runs until `block-job-cancel`. With `sync: full` (push) it also
//! copies every cluster the guest has not made the filter copy yet, so
//! the target ends up as the point-in-time image, and then completes.
//! Either way, on its way out it takes the filter out of the guest's path
//! and out of the graph, and releases its target.

use super::cbw::CopyBeforeWrite;
use crate::disk::{Disk, WriteHook};
use crate::graph::{Graph, User};
use crate::jobs::{ErrorAction, IoOperation, JobContext, JobDriver, OnError};
use std::sync::Arc;
use std::time::Duration;

/// The error policies of a push backup (`sync: full`).
#[derive(Debug, Clone, Copy)]
pub struct Push {
    /// `on-source-error`.
    pub on_source_error: OnError,
    /// `on-target-error`.
    pub on_target_error: OnError,
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
    /// `Some` for a push backup, which copies everything.
    pub push: Option<Push>,
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

impl BackupJob {
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

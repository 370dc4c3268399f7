//! `blockdev-backup` as a command and as a `transaction` action, with
//! QEMU 7.2's arguments (schema order), checks and texts: fleecing
//! (`sync: none` with a copy-before-write filter) and push backups
//! (`full`, `top`, `bitmap`, `incremental`, with `bitmap-mode`).
//!
//! The action follows QEMU's phases: `prepare` checks everything, builds
//! the filter, adds its node to the graph and creates the job; `commit`,
//! with guest I/O held together with the transaction's bitmap changes,
//! puts the filter into the guest's write path and starts the job, so the
//! snapshot and a bitmap disabled or added in the same transaction agree
//! on every write; `abort` undoes the prepare.

use super::cbw::{CbwOptions, CopyBeforeWrite};
use super::job::{BackupJob, BitmapMode, Push, SyncBitmap};
use crate::disk::Disk;
use crate::graph::{Driver, Graph, GraphError, Node, NodeOptions, User};
use crate::image::Image;
use crate::jobs::{Job, JobError, JobOptions, JobRegistry, JobStatus, JobTxn, OnError};
use crate::qmp::transaction::{self, Action, CompletionMode, TxContext};
use crate::qmp::{Args, BitmapOpError, Call, Dispatcher, ManagementContext, QmpError};
use serde_json::json;
use std::sync::{Arc, Mutex};

const SYNC: &[&str] = &["top", "full", "none", "incremental", "bitmap"];
const BITMAP_MODES: &[&str] = &["on-success", "never", "always"];

/// What `blockdev-backup` needs of the daemon.
pub struct BackupService {
    /// The guest's disk.
    pub disk: Arc<Disk>,
    /// The block-node graph.
    pub graph: Arc<Graph>,
    /// The daemon's jobs.
    pub jobs: Arc<JobRegistry>,
    /// The management context (bitmaps, holding guest I/O).
    pub ctx: Arc<dyn ManagementContext>,
}

/// `blockdev-backup`'s arguments (QAPI `BlockdevBackup`).
#[derive(Debug, Clone)]
struct BackupArgs {
    job_id: Option<String>,
    device: String,
    sync: String,
    speed: i64,
    bitmap: Option<String>,
    bitmap_mode: Option<String>,
    compress: bool,
    on_source_error: OnError,
    on_target_error: OnError,
    auto_finalize: bool,
    auto_dismiss: bool,
    filter_node_name: Option<String>,
    target: String,
}

fn parse(mut args: Args) -> Result<BackupArgs, QmpError> {
    let job_id = args.opt_str("job-id")?;
    let device = args.req_str("device")?;
    let sync = args.req_enum("sync", SYNC)?;
    let speed = args.opt_i64("speed")?.unwrap_or(0);
    let bitmap = args.opt_str("bitmap")?;
    let bitmap_mode = args.opt_enum("bitmap-mode", BITMAP_MODES)?;
    let compress = args.opt_bool("compress")?.unwrap_or(false);
    let on_error = |args: &mut Args, name| -> Result<OnError, QmpError> {
        Ok(args
            .opt_enum(name, &OnError::NAMES)?
            .and_then(|s| OnError::parse(&s))
            .unwrap_or(OnError::Report))
    };
    let on_source_error = on_error(&mut args, "on-source-error")?;
    let on_target_error = on_error(&mut args, "on-target-error")?;
    let auto_finalize = args.opt_bool("auto-finalize")?.unwrap_or(true);
    let auto_dismiss = args.opt_bool("auto-dismiss")?.unwrap_or(true);
    let filter_node_name = args.opt_str("filter-node-name")?;
    if let Some(v) = args.take("x-perf") {
        let mut perf = Args::nested(&args.path("x-perf"), v)?;
        let _ = perf.opt_bool("use-copy-range")?;
        let _ = perf.opt_i64("max-workers")?;
        let _ = perf.opt_i64("max-chunk")?;
        perf.finish()?;
    }
    let target = args.req_str("target")?;
    args.finish()?;
    Ok(BackupArgs {
        job_id,
        device,
        sync,
        speed,
        bitmap,
        bitmap_mode,
        compress,
        on_source_error,
        on_target_error,
        auto_finalize,
        auto_dismiss,
        filter_node_name,
        target,
    })
}

fn generic(s: impl Into<String>) -> QmpError {
    QmpError::generic(s)
}

fn not_found(name: &str) -> QmpError {
    generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

/// What a prepared action made, for its commit or abort.
struct Prepared {
    job: Arc<Job>,
    driver: Arc<BackupJob>,
    started: bool,
    /// The bitmap the job made busy, and its mode.
    bitmap: Option<(String, BitmapMode)>,
}

/// The `blockdev-backup` action.
struct BackupAction {
    svc: Arc<BackupService>,
    args: BackupArgs,
    /// The job id (`job-id`, or the device name as in QEMU).
    job_id: String,
    /// The filter node and the claimed target, once made.
    partial: Option<Arc<BackupJob>>,
    prepared: Option<Prepared>,
}

impl BackupService {
    /// The disk's node if `device` names the guest's disk.
    fn source_node(&self, device: &str) -> Result<Arc<Node>, QmpError> {
        let disk = self.graph.disk_node().ok_or_else(|| not_found(device))?;
        if device == self.graph.device() || device == disk.name() {
            return Ok(disk);
        }
        match self.graph.lookup(device) {
            Some(_) => Err(generic(format!(
                "vubd backs up the guest's disk only, not node '{device}'"
            ))),
            None => Err(not_found(device)),
        }
    }

    /// QEMU's `do_backup_common` checks of the bitmap arguments.
    fn check_bitmap_args(&self, a: &BackupArgs) -> Result<(), QmpError> {
        if (a.sync == "bitmap" || a.sync == "incremental") && a.bitmap.is_none() {
            return Err(generic(format!(
                "must provide a valid bitmap name for '{}' sync mode",
                a.sync
            )));
        }
        let mut sync = a.sync.as_str();
        let mut mode = a.bitmap_mode.as_deref();
        if sync == "incremental" {
            if mode.is_some_and(|m| m != "on-success") {
                return Err(generic(
                    "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
                ));
            }
            sync = "bitmap";
            mode = Some("on-success");
        }
        if let Some(name) = &a.bitmap {
            let info = self
                .ctx
                .bitmaps()
                .and_then(|b| b.list().into_iter().find(|i| i.name == *name));
            let Some(info) = info else {
                return Err(generic(format!("Bitmap '{name}' could not be found")));
            };
            let Some(mode) = mode else {
                return Err(generic(
                    "Bitmap sync mode must be given when providing a bitmap",
                ));
            };
            if info.busy {
                return Err(generic(BitmapOpError::Busy(name.clone()).to_string()));
            }
            if info.inconsistent {
                return Err(generic(
                    BitmapOpError::Inconsistent(name.clone()).to_string(),
                ));
            }
            if sync == "none" {
                return Err(generic(
                    "sync mode 'none' does not produce meaningful bitmap outputs",
                ));
            }
            if mode == "never" && sync != "bitmap" {
                return Err(generic(format!(
                    "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{sync}'"
                )));
            }
        } else if mode.is_some() {
            return Err(generic("Cannot specify bitmap sync mode without a bitmap"));
        }
        Ok(())
    }
}

impl BackupAction {
    fn prepare_inner(&mut self, group: Option<Arc<JobTxn>>) -> Result<(), QmpError> {
        let svc = self.svc.clone();
        let a = &self.args;
        let source = svc.source_node(&a.device)?;
        let target = svc
            .graph
            .lookup(&a.target)
            .ok_or_else(|| not_found(&a.target))?;
        svc.check_bitmap_args(a)?;
        if Arc::ptr_eq(&source, &target) {
            return Err(generic("Source and target cannot be the same"));
        }
        if a.compress {
            // The target has no device name, as in QEMU (hence the space).
            return Err(generic("Compression is not supported for this drive "));
        }
        // QEMU's op blocker on the source: backups may share a disk, a
        // mirror may not (its pivot would swap the image under the filter).
        let busy = svc.jobs.list().into_iter().find(|j| {
            !matches!(j.status(), JobStatus::Concluded | JobStatus::Null)
                && j.job_type() != "backup"
        });
        if let Some(j) = busy {
            return Err(generic(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                source.name(),
                j.job_type()
            )));
        }
        if target.options().read_only || target.filter().is_some() {
            return Err(generic(format!(
                "Node '{}' cannot be a backup target",
                a.target
            )));
        }
        let image: Arc<dyn Image> = svc.disk.image();
        let cbw = CopyBeforeWrite::new(
            image.clone(),
            target.image().clone(),
            CbwOptions::default(),
            None,
        )
        .map_err(generic)?;
        let filter_name = match &a.filter_node_name {
            Some(n) => n.clone(),
            None => svc.graph.auto_name(),
        };
        let create = |e: GraphError| generic(format!("Could not create node: {e}"));
        if a.filter_node_name.is_some() {
            svc.graph.check_new_name(&filter_name).map_err(create)?;
        }
        let job_id = self.job_id.clone();
        let node = Node::new(
            &filter_name,
            Driver::CopyBeforeWrite,
            image,
            NodeOptions {
                // Nothing may use the filter as a writable image.
                read_only: true,
                ..NodeOptions::default()
            },
            Some(source.name().to_string()),
            true,
        )
        .with_filter(cbw.clone());
        svc.graph.add(node, None).map_err(create)?;
        // The guest's disk writes through the filter (in QEMU its
        // BlockBackend moves onto the filter node), and the job holds the
        // filter and the target with op blockers: blockdev-del refuses both
        // with QEMU's words.
        let holder = User::BackupJob(job_id.clone());
        let _ = svc.graph.claim(&filter_name, User::Disk);
        let _ = svc.graph.claim(&filter_name, holder.clone());
        let driver = Arc::new(BackupJob {
            disk: svc.disk.clone(),
            graph: svc.graph.clone(),
            cbw,
            filter_node: filter_name,
            target_node: a.target.clone(),
            push: (a.sync != "none").then_some(Push {
                on_source_error: a.on_source_error,
                on_target_error: a.on_target_error,
            }),
            bitmap: Mutex::new(None),
        });
        if let Err(e) = svc.graph.claim(&a.target, holder) {
            svc.graph.drop_node(&driver.filter_node);
            return Err(generic(e.to_string()));
        }
        self.partial = Some(driver.clone());
        // The target is written: locked as a guest's disk is, so that no
        // other process writes it meanwhile (QEMU 7.2 takes no lock here).
        let (take, share) = crate::lock::guest_disk_perms(false);
        target
            .image()
            .lock_perms(take, share)
            .map_err(|e| generic(format!("{e} on backup target '{}'", a.target)))?;
        if a.speed < 0 {
            return Err(JobError::NegativeSpeed.into());
        }
        let opts = JobOptions {
            id: job_id,
            auto_finalize: a.auto_finalize,
            auto_dismiss: a.auto_dismiss,
            speed: a.speed.unsigned_abs(),
        };
        let job = svc.jobs.create(opts, driver.clone())?;
        if let Some(group) = group {
            group.add(&job);
        }
        // QEMU's successor makes the bitmap busy from here on.
        let bitmap = match (&a.bitmap, svc.ctx.bitmaps()) {
            (Some(name), Some(b)) => {
                let mode = match (a.sync.as_str(), a.bitmap_mode.as_deref()) {
                    ("incremental", _) | (_, Some("on-success")) => BitmapMode::OnSuccess,
                    (_, Some("never")) => BitmapMode::Never,
                    _ => BitmapMode::Always,
                };
                if let Err(e) = b.set_busy(name, true) {
                    job.early_fail();
                    return Err(generic(e.to_string()));
                }
                Some((name.clone(), mode))
            }
            _ => None,
        };
        self.prepared = Some(Prepared {
            job,
            driver: driver.clone(),
            started: false,
            bitmap,
        });
        Ok(())
    }
}

impl Action for BackupAction {
    fn prepare(&mut self, tx: &mut TxContext<'_>) -> Result<(), QmpError> {
        self.prepare_inner(tx.job_txn())
    }

    fn commit(&mut self, _tx: &mut TxContext<'_>) {
        let Some(p) = self.prepared.as_mut() else {
            return;
        };
        p.started = true;
        if let (Some((name, mode)), Some(bitmaps)) = (&p.bitmap, self.svc.ctx.bitmaps()) {
            // The copy set is the bitmap at this instant (guest I/O held).
            match bitmaps.begin_backup(name) {
                Ok(frozen) => {
                    let limited =
                        match self.args.sync == "bitmap" || self.args.sync == "incremental" {
                            true => p.driver.cbw.limit_to(&frozen.copy),
                            false => Ok(()),
                        };
                    if let Err(e) = limited {
                        // Copies everything: a larger backup, still right.
                        log::warn!("backup '{}': copying the whole disk: {e}", p.job.id());
                    }
                    *p.driver.bitmap.lock().unwrap_or_else(|e| e.into_inner()) = Some(SyncBitmap {
                        bitmaps,
                        ctx: self.svc.ctx.clone(),
                        mode: *mode,
                        frozen,
                    });
                }
                Err(e) => {
                    log::warn!(
                        "backup '{}': bitmap '{name}' left as it is: {e}",
                        p.job.id()
                    );
                    let _ = bitmaps.set_busy(name, false);
                }
            }
        }
        if let Some(ctx) = p.job.context() {
            p.driver.track_progress(ctx);
        }
        self.svc.disk.add_hook(p.driver.cbw.clone());
        // A job thread that cannot start fails the job, which removes
        // the filter again.
        if let Err(e) = p.job.start() {
            log::warn!("backup job '{}' did not start: {e}", p.job.id());
        }
    }

    fn abort(&mut self, _tx: &mut TxContext<'_>) {
        if let Some(p) = self.prepared.take() {
            if p.started {
                return;
            }
            p.job.early_fail();
            if let (Some((name, _)), Some(b)) = (&p.bitmap, self.svc.ctx.bitmaps()) {
                let _ = b.set_busy(name, false);
            }
        }
        if let Some(d) = self.partial.take() {
            d.remove_filter(&self.job_id);
        }
    }
}

impl BackupService {
    fn action(self: &Arc<Self>, data: Args) -> Result<Box<dyn Action>, QmpError> {
        let args = parse(data)?;
        Ok(Box::new(BackupAction {
            svc: self.clone(),
            job_id: args.job_id.clone().unwrap_or_else(|| args.device.clone()),
            args,
            partial: None,
            prepared: None,
        }))
    }
}

/// Registers `blockdev-backup`, and `transaction` knowing its action.
pub fn register_backup_commands(d: &Dispatcher, svc: Arc<BackupService>) {
    let s = svc.clone();
    d.register("blockdev-backup", move |call: &mut Call<'_>| {
        let action = s.action(std::mem::take(&mut call.args))?;
        transaction::run(s.ctx.as_ref(), vec![action], CompletionMode::Individual)?;
        Ok(json!({}))
    });
    d.register("transaction", move |call: &mut Call<'_>| {
        let parse = |data: Args| svc.action(data);
        transaction::transaction_with(
            svc.ctx.as_ref(),
            std::mem::take(&mut call.args),
            &[("blockdev-backup", &parse)],
        )
    });
}

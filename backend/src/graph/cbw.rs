//! `blockdev-add driver=copy-before-write`: a client builds the fleecing
//! graph itself (QEMU 7.2's `file`, `target`, `bitmap`, `on-cbw-error`,
//! `cbw-timeout`, checked in QEMU's order with its texts).
//!
//! vubd has one guest device, always on its disk: where QEMU needs a
//! `qom-set` (or an export moved onto the filter) to put the filter into
//! the guest's path, vubd puts a filter over the disk's node there at
//! once, with guest I/O held for the instant, so the snapshot is the disk
//! at that instant and a `bitmap` is taken at it. `blockdev-del` of the
//! filter (refused while a snapshot-access node reads through it) takes it
//! out again. A filter over any other node would see no writes: refused.

use super::node::{Driver, Node, NodeOptions};
use super::registry::{Graph, User};
use crate::backup::{CbwOptions, CopyBeforeWrite, OnCbwError};
use crate::dirty::DirtyBitmap;
use crate::disk::{Disk, WriteHook};
use crate::jobs::{JobRegistry, JobStatus};
use crate::qmp::{Args, BitmapOpError, DirtyBitmaps, ManagementContext, QmpError};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// What adding and removing a filter in the guest's path needs.
pub struct Filters {
    /// The guest's disk, whose write hooks the filters are.
    pub disk: Arc<Disk>,
    /// Holds guest I/O for the insertion instant; the disk's bitmaps.
    pub ctx: Arc<dyn ManagementContext>,
    /// The daemon's jobs: a mirror's pivot would swap the image under a
    /// filter.
    pub jobs: Arc<JobRegistry>,
}

/// The driver-specific members (QAPI `BlockdevOptionsCbw`).
pub(super) struct CbwSpec {
    file: String,
    target: String,
    bitmap: Option<(String, String)>,
    on_error: OnCbwError,
    timeout: Option<Duration>,
}

fn generic(s: impl Into<String>) -> QmpError {
    QmpError::generic(s)
}

/// A `BlockdevRef` member that vubd takes by name only.
fn node_ref(args: &mut Args, member: &str) -> Result<String, QmpError> {
    let path = args.path(member);
    match args.required(member)? {
        Value::String(s) => Ok(s),
        Value::Object(_) => Err(generic(format!(
            "vubd's copy-before-write takes the name of a node as '{path}'"
        ))),
        _ => Err(generic(format!(
            "Invalid parameter type for '{path}', expected: BlockdevRef"
        ))),
    }
}

/// Reads the members in schema order (the first error is QEMU's).
pub(super) fn parse(args: &mut Args) -> Result<CbwSpec, QmpError> {
    let file = node_ref(args, "file")?;
    let target = node_ref(args, "target")?;
    let bitmap = match args.take("bitmap") {
        None => None,
        Some(v) => {
            let mut b = Args::nested(&args.path("bitmap"), v)?;
            let node = b.req_str("node")?;
            let name = b.req_str("name")?;
            b.finish()?;
            Some((node, name))
        }
    };
    let on_error = match args
        .opt_enum("on-cbw-error", &["break-guest-write", "break-snapshot"])?
        .as_deref()
    {
        Some("break-snapshot") => OnCbwError::BreakSnapshot,
        _ => OnCbwError::BreakGuestWrite,
    };
    // Seconds; 0 (the default) means no limit, as in QEMU.
    let timeout = args
        .opt_u32("cbw-timeout")?
        .filter(|&s| s > 0)
        .map(|s| Duration::from_secs(u64::from(s)));
    Ok(CbwSpec {
        file,
        target,
        bitmap,
        on_error,
        timeout,
    })
}

fn not_found(name: &str) -> QmpError {
    generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

/// The bits of the disk's bitmap `name` now, at the bitmap's granularity.
fn copy_bitmap(
    bitmaps: &dyn DirtyBitmaps,
    name: &str,
    size: u64,
    granularity: u64,
) -> Result<DirtyBitmap, String> {
    const RUNS: usize = 1 << 16;
    let copy = DirtyBitmap::new(size, granularity, false).map_err(|e| e.to_string())?;
    let mut pos = 0;
    while pos < size {
        let runs = bitmaps
            .extents(name, pos, size - pos, RUNS)
            .map_err(|e| e.to_string())?;
        if runs.is_empty() {
            return Err(format!("Dirty bitmap '{name}' has no bits at {pos}"));
        }
        for (len, dirty) in runs {
            if dirty {
                copy.set_range(pos, len);
            }
            pos += len;
        }
    }
    Ok(copy)
}

impl Filters {
    /// QEMU's checks of the bitmap (node, then name), and vubd's: bitmaps
    /// live on the disk only. Returns its name and granularity.
    fn check_bitmap(
        &self,
        graph: &Graph,
        disk: &Arc<Node>,
        node: &str,
        name: &str,
    ) -> Result<(String, u64), QmpError> {
        let n = graph
            .lookup(node)
            .ok_or_else(|| generic(format!("Node '{node}' not found")))?;
        let missing = || generic(BitmapOpError::NotFound(name.to_string()).to_string());
        if !Arc::ptr_eq(&n, disk) {
            return Err(missing());
        }
        let bitmaps = self.ctx.bitmaps().ok_or_else(missing)?;
        let info = bitmaps
            .list()
            .into_iter()
            .find(|b| b.name == name)
            .ok_or_else(missing)?;
        if info.inconsistent {
            return Err(generic(
                BitmapOpError::Inconsistent(name.to_string()).to_string(),
            ));
        }
        Ok((info.name, info.granularity))
    }

    /// Adds the filter node `name` and puts it into the guest's path.
    pub(super) fn add(&self, graph: &Graph, name: &str, spec: CbwSpec) -> Result<(), QmpError> {
        let file = graph
            .lookup(&spec.file)
            .ok_or_else(|| not_found(&spec.file))?;
        let target = graph
            .lookup(&spec.target)
            .ok_or_else(|| not_found(&spec.target))?;
        let disk = graph.disk_node().ok_or_else(|| not_found(&spec.file))?;
        let bitmap = match &spec.bitmap {
            Some((node, bname)) => Some(self.check_bitmap(graph, &disk, node, bname)?),
            None => None,
        };
        if !Arc::ptr_eq(&file, &disk) {
            return Err(generic(format!(
                "vubd puts a copy-before-write filter over the guest's disk only, not over node '{}'",
                spec.file
            )));
        }
        if Arc::ptr_eq(&target, &disk) || target.options().read_only || target.filter().is_some() {
            return Err(generic(format!(
                "Node '{}' cannot be a copy-before-write target",
                spec.target
            )));
        }
        if let Some(j) = self.jobs.list().into_iter().find(|j| {
            j.job_type() == "mirror"
                && !matches!(j.status(), JobStatus::Concluded | JobStatus::Null)
        }) {
            return Err(generic(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                disk.name(),
                j.job_type()
            )));
        }
        let source = self.disk.image();
        if target.image().size() != source.size() {
            return Err(generic("Source and target image have different sizes"));
        }
        let opts = CbwOptions {
            on_error: spec.on_error,
            timeout: spec.timeout,
            ..CbwOptions::default()
        };
        // Everything from the bitmap's bits to the hook happens at one
        // instant for the guest: the snapshot and the bitmap agree on
        // every write.
        let mut outcome: Option<Result<(), QmpError>> = None;
        self.ctx.with_guest_io_held(&mut || {
            if outcome.is_some() {
                return;
            }
            outcome = Some(self.insert(graph, name, &spec, &target, bitmap.as_ref(), opts));
        })?;
        outcome.unwrap_or_else(|| Err(generic("guest I/O was not held")))
    }

    /// The insertion proper (guest I/O held).
    fn insert(
        &self,
        graph: &Graph,
        name: &str,
        spec: &CbwSpec,
        target: &Node,
        bitmap: Option<&(String, u64)>,
        opts: CbwOptions,
    ) -> Result<(), QmpError> {
        let source = self.disk.image();
        let bits = match bitmap {
            Some((bname, granularity)) => {
                let bitmaps = self
                    .ctx
                    .bitmaps()
                    .ok_or_else(|| generic(BitmapOpError::NotFound(bname.clone()).to_string()))?;
                Some(
                    copy_bitmap(bitmaps.as_ref(), bname, source.size(), *granularity)
                        .map_err(generic)?,
                )
            }
            None => None,
        };
        let cbw = CopyBeforeWrite::new(source.clone(), target.image().clone(), opts, bits.as_ref())
            .map_err(generic)?;
        let node = Node::new(
            name,
            Driver::CopyBeforeWrite,
            source,
            NodeOptions {
                // Writes must go through the disk (and so the filter).
                read_only: true,
                ..NodeOptions::default()
            },
            Some(spec.file.clone()),
            true,
        )
        .with_filter(cbw.clone());
        // The target is written: locked as a guest's disk is (QEMU 7.2
        // takes no lock here); refused before anything changed.
        let (take, share) = crate::lock::guest_disk_perms(false);
        target
            .image()
            .lock_perms(take, share)
            .map_err(|e| generic(format!("{e} on copy-before-write target '{}'", spec.target)))?;
        if let Err(e) = graph.add(node, None) {
            target.image().unlock();
            return Err(generic(e.to_string()));
        }
        let _ = graph.claim(&spec.target, User::Parent(name.to_string()));
        self.disk.add_hook(cbw);
        Ok(())
    }

    /// After `blockdev-del` removed `node`: a filter leaves the guest's
    /// path and lets its target go.
    pub(super) fn removed(&self, graph: &Graph, node: &Node) {
        let Some(cbw) = node.filter() else {
            return;
        };
        if node.driver() != Driver::CopyBeforeWrite {
            return;
        }
        let hook: Arc<dyn WriteHook> = cbw.clone();
        self.disk.remove_hook(&hook);
        cbw.detach();
        let parent = User::Parent(node.name().to_string());
        for (n, users) in graph.nodes() {
            if users.contains(&parent) {
                graph.release(n.name(), &parent);
                // Never the disk's own locks (its file is the filter's child).
                if n.image().identity() != self.disk.image().identity() {
                    n.image().unlock();
                }
            }
        }
    }
}

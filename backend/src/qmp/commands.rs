//! vubd's standard QMP commands, with QEMU 7.2's names, arguments, result
//! shapes and error texts: `query-block`, `query-named-block-nodes`, `quit`,
//! the `block-dirty-bitmap-*` family and `transaction` (in
//! `transaction.rs`). They reach the daemon only through
//! [`ManagementContext`] and [`DirtyBitmaps`].

use super::args::Args;
use super::context::{BitmapInfo, BitmapOpError, DirtyBitmaps, ManagementContext};
use super::dispatch::{Call, Dispatcher};
use super::error::QmpError;
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

/// Smallest bitmap granularity (QEMU's minimum too).
pub const MIN_GRANULARITY: u64 = 512;
/// Largest bitmap granularity vubd accepts (64 MiB).
pub const MAX_GRANULARITY: u64 = 64 << 20;
/// Granularity when `block-dirty-bitmap-add` gives none (QEMU's default
/// for a raw image).
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;
/// Longest bitmap name (QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_BITMAP_NAME: usize = 1023;

/// Registers every standard command on `d`, bound to `ctx`.
pub fn register_standard(d: &Dispatcher, ctx: Arc<dyn ManagementContext>) {
    let c = ctx.clone();
    d.register("query-block", move |call: &mut Call<'_>| {
        std::mem::take(&mut call.args).finish()?;
        Ok(json!([block_info(c.as_ref())]))
    });
    let c = ctx.clone();
    d.register("query-named-block-nodes", move |call: &mut Call<'_>| {
        let mut args = std::mem::take(&mut call.args);
        // vubd has one node, so the flat and the nested view are the same.
        let _flat = args.opt_bool("flat")?;
        args.finish()?;
        Ok(json!([block_device_info(c.as_ref())]))
    });
    let c = ctx.clone();
    d.register("quit", move |call: &mut Call<'_>| {
        std::mem::take(&mut call.args).finish()?;
        log::info!("QMP quit: shutting down");
        // QEMU emits SHUTDOWN before the reply reaches the client; the
        // daemon is asked to stop only once both are queued.
        call.events.emit(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        );
        let c = c.clone();
        call.after_reply(move || c.quit());
        Ok(json!({}))
    });
    let c = ctx.clone();
    d.register("block-dirty-bitmap-add", move |call: &mut Call<'_>| {
        bitmap_add(c.as_ref(), &mut call.args)
    });
    for (cmd, op) in [
        ("block-dirty-bitmap-remove", Op::Remove),
        ("block-dirty-bitmap-clear", Op::Clear),
        ("block-dirty-bitmap-enable", Op::Enable),
        ("block-dirty-bitmap-disable", Op::Disable),
        ("x-debug-block-dirty-bitmap-sha256", Op::Sha256),
    ] {
        let c = ctx.clone();
        d.register(cmd, move |call: &mut Call<'_>| {
            bitmap_op(c.as_ref(), &mut call.args, op)
        });
    }
    let c = ctx.clone();
    d.register("block-dirty-bitmap-merge", move |call: &mut Call<'_>| {
        bitmap_merge(c.as_ref(), &mut call.args)
    });
    let c = ctx;
    d.register("transaction", move |call: &mut Call<'_>| {
        super::transaction::transaction(c.as_ref(), std::mem::take(&mut call.args))
    });
}

fn bitmap_json(b: &BitmapInfo) -> Value {
    // QEMU omits `inconsistent` unless true; vubd always reports it so
    // that clients need not special-case its absence (QEMU's schema marks
    // it optional, so both forms are valid QMP).
    json!({
        "name": b.name,
        "count": b.count,
        "granularity": b.granularity,
        "recording": b.recording,
        "busy": b.busy,
        "persistent": b.persistent,
        "inconsistent": b.inconsistent,
    })
}

/// What QEMU's `BlockDeviceInfo` says about one node.
pub struct NodeDescription<'a> {
    /// The node's name.
    pub node_name: &'a str,
    /// The driver (`drv`, and the image's `format`).
    pub driver: &'a str,
    /// The file the node reads and writes.
    pub file: &'a Path,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes allocated (optional in QEMU's schema: omitted when unknown).
    pub allocated: Option<u64>,
    /// `ro`.
    pub read_only: bool,
    /// `cache.writeback`.
    pub writeback: bool,
    /// `cache.direct`.
    pub direct: bool,
}

/// QEMU's `BlockDeviceInfo` of a node (vubd has no I/O throttling,
/// encryption, backing chains or zero detection: those members are fixed).
pub fn node_device_info(n: &NodeDescription<'_>) -> Value {
    let file = n.file.to_string_lossy().into_owned();
    let mut image = serde_json::Map::new();
    image.insert("filename".into(), json!(file));
    image.insert("format".into(), json!(n.driver));
    image.insert("dirty-flag".into(), json!(false));
    if let Some(bytes) = n.allocated {
        image.insert("actual-size".into(), json!(bytes));
    }
    image.insert("virtual-size".into(), json!(n.size));
    json!({
        "file": file,
        "node-name": n.node_name,
        "ro": n.read_only,
        "drv": n.driver,
        "backing_file_depth": 0,
        "encrypted": false,
        "detect_zeroes": "off",
        "bps": 0,
        "bps_rd": 0,
        "bps_wr": 0,
        "iops": 0,
        "iops_rd": 0,
        "iops_wr": 0,
        "image": Value::Object(image),
        "cache": {"writeback": n.writeback, "direct": n.direct, "no-flush": false},
        "write_threshold": 0,
    })
}

/// QEMU's `BlockDeviceInfo` for the disk (`query-block`'s `inserted`), with
/// its dirty bitmaps.
pub fn block_device_info(ctx: &dyn ManagementContext) -> Value {
    let disk = ctx.disk_info();
    let mut info = node_device_info(&NodeDescription {
        node_name: &ctx.node_name(),
        driver: "raw",
        file: &disk.image,
        size: disk.size,
        // As `qemu-img info` reports "disk size".
        allocated: std::fs::metadata(&disk.image)
            .ok()
            .map(|m| m.blocks() * 512),
        read_only: disk.read_only,
        writeback: disk.writeback,
        direct: disk.direct,
    });
    let bitmaps: Vec<Value> = ctx
        .bitmaps()
        .map(|b| b.list().iter().map(bitmap_json).collect())
        .unwrap_or_default();
    // QEMU omits an empty list; an empty list is easier on clients.
    info["dirty-bitmaps"] = Value::Array(bitmaps);
    info
}

/// QEMU's `BlockInfo` for the disk (one element of `query-block`). The
/// `device` is the node name: vubd has no separate drive id, and every
/// command that takes a device accepts the node name.
pub fn block_info(ctx: &dyn ManagementContext) -> Value {
    json!({
        "device": ctx.node_name(),
        "type": "unknown",
        "removable": false,
        "locked": false,
        "inserted": block_device_info(ctx),
    })
}

/// The refusal of bitmap commands on a daemon that tracks no bitmaps.
pub(crate) const NO_BITMAPS: &str = "Dirty bitmaps are not available on this disk";

pub(crate) fn bitmaps(ctx: &dyn ManagementContext) -> Result<Arc<dyn DirtyBitmaps>, QmpError> {
    ctx.bitmaps().ok_or_else(|| QmpError::generic(NO_BITMAPS))
}

/// The lookup used by the bitmap commands other than `add` (QEMU's
/// `block_dirty_bitmap_lookup`).
pub(crate) fn check_node(ctx: &dyn ManagementContext, node: &str) -> Result<(), QmpError> {
    if node == ctx.node_name() {
        Ok(())
    } else {
        Err(QmpError::generic(format!("Node '{node}' not found")))
    }
}

/// The lookup used by commands that take a device or a node name (QEMU's
/// `bdrv_lookup_bs`), e.g. `block-dirty-bitmap-add`; public so that block
/// job commands word it the same way.
pub fn check_device_or_node(ctx: &dyn ManagementContext, name: &str) -> Result<(), QmpError> {
    if name == ctx.node_name() {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        )))
    }
}

/// The arguments of `block-dirty-bitmap-add` (QEMU's `BlockDirtyBitmapAdd`).
pub(crate) struct AddArgs {
    node: String,
    name: String,
    granularity: Option<u32>,
    persistent: bool,
    disabled: bool,
}

impl AddArgs {
    /// Reads the members in schema order and finishes `args`.
    pub(crate) fn parse(mut args: Args) -> Result<AddArgs, QmpError> {
        let node = args.req_str("node")?;
        let name = args.req_str("name")?;
        let granularity = args.opt_u32("granularity")?;
        let persistent = args.opt_bool("persistent")?.unwrap_or(false);
        let disabled = args.opt_bool("disabled")?.unwrap_or(false);
        args.finish()?;
        Ok(AddArgs {
            node,
            name,
            granularity,
            persistent,
            disabled,
        })
    }

    /// Checks in QEMU's order (name, node, granularity; the engine checks
    /// the rest) and hands the bitmap to `add`.
    pub(crate) fn apply(
        &self,
        ctx: &dyn ManagementContext,
        add: impl FnOnce(&str, u64, bool, bool) -> Result<(), BitmapOpError>,
    ) -> Result<(), QmpError> {
        let name = &self.name;
        if name.is_empty() {
            return Err(QmpError::generic("Bitmap name cannot be empty"));
        }
        check_device_or_node(ctx, &self.node)?;
        let granularity = match self.granularity {
            None => DEFAULT_GRANULARITY,
            Some(g) => {
                let g = u64::from(g);
                if g < MIN_GRANULARITY || !g.is_power_of_two() {
                    return Err(QmpError::generic(
                        "Granularity must be power of 2 and at least 512",
                    ));
                }
                if g > MAX_GRANULARITY {
                    // Worded as the dirty engine (and QEMU's qcow2 limit) words it.
                    return Err(QmpError::generic(format!(
                        "Granularity exceeds maximum ({MAX_GRANULARITY} bytes)"
                    )));
                }
                g
            }
        };
        if name.len() > MAX_BITMAP_NAME {
            return Err(QmpError::generic(format!("Bitmap name too long: {name}")));
        }
        add(name, granularity, self.persistent, self.disabled)
            .map_err(|e| QmpError::generic(e.to_string()))
    }
}

fn bitmap_add(ctx: &dyn ManagementContext, args: &mut Args) -> Result<Value, QmpError> {
    let a = AddArgs::parse(std::mem::take(args))?;
    // Looked up after the argument checks, as before.
    a.apply(ctx, |name, g, p, d| match ctx.bitmaps() {
        Some(b) => b.add(name, g, p, d),
        None => Err(BitmapOpError::Failed(NO_BITMAPS.into())),
    })?;
    Ok(json!({}))
}

/// QEMU's `BlockDirtyBitmap` (`node`, `name`), read and finished.
pub(crate) fn parse_node_name(mut args: Args) -> Result<(String, String), QmpError> {
    let node = args.req_str("node")?;
    let name = args.req_str("name")?;
    args.finish()?;
    Ok((node, name))
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Remove,
    Clear,
    Enable,
    Disable,
    Sha256,
}

fn bitmap_op(ctx: &dyn ManagementContext, args: &mut Args, op: Op) -> Result<Value, QmpError> {
    let (node, name) = parse_node_name(std::mem::take(args))?;
    check_node(ctx, &node)?;
    let b = bitmaps(ctx)?;
    let err = |e: BitmapOpError| QmpError::generic(e.to_string());
    match op {
        Op::Remove => b.remove(&name).map_err(err)?,
        Op::Clear => b.clear(&name).map_err(err)?,
        Op::Enable => b.enable(&name).map_err(err)?,
        Op::Disable => b.disable(&name).map_err(err)?,
        Op::Sha256 => return Ok(json!({"sha256": b.sha256(&name).map_err(err)?})),
    }
    Ok(json!({}))
}

/// The arguments of `block-dirty-bitmap-merge` (`BlockDirtyBitmapMerge`).
pub(crate) struct MergeArgs {
    node: String,
    target: String,
    /// Each source: a bitmap name, on `node` or on the given node.
    sources: Vec<(Option<String>, String)>,
}

impl MergeArgs {
    /// Reads the members in schema order and finishes `args`.
    pub(crate) fn parse(mut args: Args) -> Result<MergeArgs, QmpError> {
        let node = args.req_str("node")?;
        let target = args.req_str("target")?;
        let items = args.req_list("bitmaps")?;
        // Each source is a bitmap name on `node`, or {node, name} (QEMU's
        // BlockDirtyBitmapOrStr); all are parsed before anything is looked up.
        let mut sources = Vec::with_capacity(items.len());
        for (path, v) in items {
            match v {
                Value::String(s) => sources.push((None, s)),
                Value::Object(_) => {
                    let (n, name) = parse_node_name(Args::nested(&path, v)?)?;
                    sources.push((Some(n), name));
                }
                _ => {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for '{path}', expected: BlockDirtyBitmapOrStr"
                    )))
                }
            }
        }
        args.finish()?;
        Ok(MergeArgs {
            node,
            target,
            sources,
        })
    }

    /// Looks the target and then each source up in QEMU's order (node,
    /// then name with `exists`) and hands the names to `merge`.
    pub(crate) fn apply(
        &self,
        ctx: &dyn ManagementContext,
        exists: impl Fn(&str) -> bool,
        merge: impl FnOnce(&str, &[String]) -> Result<(), BitmapOpError>,
    ) -> Result<(), QmpError> {
        let not_found = |n: &str| QmpError::generic(BitmapOpError::NotFound(n.into()).to_string());
        check_node(ctx, &self.node)?;
        if !exists(&self.target) {
            return Err(not_found(&self.target));
        }
        let mut names = Vec::with_capacity(self.sources.len());
        for (n, name) in &self.sources {
            if let Some(n) = n {
                check_node(ctx, n)?;
            }
            if !exists(name) {
                return Err(not_found(name));
            }
            names.push(name.clone());
        }
        merge(&self.target, &names).map_err(|e| QmpError::generic(e.to_string()))
    }
}

fn bitmap_merge(ctx: &dyn ManagementContext, args: &mut Args) -> Result<Value, QmpError> {
    let m = MergeArgs::parse(std::mem::take(args))?;
    check_node(ctx, &m.node)?;
    let b = bitmaps(ctx)?;
    let list = b.list();
    m.apply(
        ctx,
        |n| list.iter().any(|i| i.name == n),
        |target, names| b.merge(target, names),
    )?;
    Ok(json!({}))
}

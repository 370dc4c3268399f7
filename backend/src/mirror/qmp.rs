//! `blockdev-mirror` and `drive-mirror`, with QEMU 7.2's arguments read in
//! schema order (so the first error is the one QEMU reports):
//! `blockdev-mirror`'s `target` is a node of the graph (`blockdev-add`
//! first), `drive-mirror`'s a file path (`mode` defaults to
//! `absolute-paths`, i.e. create a new sparse raw image). vubd's
//! extensions: `unmap` on `blockdev-mirror` too, `x-resume: true`,
//! which continues a mirror interrupted by a daemon crash or kill from its
//! persistent state (a path target is then opened as `mode: existing`),
//! and `x-target-timeout` (seconds), the longest a write-blocking guest
//! write waits for the target.

use super::manager::{MirrorManager, MirrorRequest, TargetMode};
use super::CopyMode;
use crate::jobs::OnError;
use crate::qmp::{Args, Call, Dispatcher, QmpError};
use serde_json::json;
use std::sync::Arc;

const SYNC: &[&str] = &["top", "full", "none", "incremental", "bitmap"];
const MODES: &[&str] = &["existing", "absolute-paths"];
const COPY_MODES: &[&str] = &["background", "write-blocking"];

fn on_error(args: &mut Args, name: &str) -> Result<OnError, QmpError> {
    Ok(args
        .opt_enum(name, &OnError::NAMES)?
        .and_then(|s| OnError::parse(&s))
        .unwrap_or(OnError::Report))
}

fn mode(s: Option<String>, default: TargetMode) -> TargetMode {
    match s.as_deref() {
        Some("existing") => TargetMode::Existing,
        Some(_) => TargetMode::Create,
        None => default,
    }
}

/// Parses `blockdev-mirror` (`drive` false) or `drive-mirror` arguments.
pub fn parse_request(args: &mut Args, drive: bool) -> Result<MirrorRequest, QmpError> {
    let mut args = std::mem::take(args);
    let job_id = args.opt_str("job-id")?;
    let device = args.req_str("device")?;
    let target = args.req_str("target")?;
    let mut req = MirrorRequest::new(&device, target, "full");
    req.job_id = job_id;
    let mut mode_arg = None;
    if drive {
        req.format = args.opt_str("format")?;
        let _node_name = args.opt_str("node-name")?;
        req.replaces = args.opt_str("replaces")?;
        req.sync = args.req_enum("sync", SYNC)?;
        mode_arg = args.opt_enum("mode", MODES)?;
    } else {
        req.replaces = args.opt_str("replaces")?;
        req.sync = args.req_enum("sync", SYNC)?;
    }
    req.speed = args.opt_i64("speed")?.unwrap_or(0);
    req.granularity = u64::from(args.opt_u32("granularity")?.unwrap_or(0));
    req.buf_size = args.opt_i64("buf-size")?.unwrap_or(0);
    req.on_source_error = on_error(&mut args, "on-source-error")?;
    req.on_target_error = on_error(&mut args, "on-target-error")?;
    if drive {
        req.unmap = args.opt_bool("unmap")?.unwrap_or(true);
    } else {
        req.filter_node_name = args.opt_str("filter-node-name")?;
    }
    req.copy_mode = match args.opt_enum("copy-mode", COPY_MODES)?.as_deref() {
        Some("write-blocking") => CopyMode::WriteBlocking,
        _ => CopyMode::Background,
    };
    req.auto_finalize = args.opt_bool("auto-finalize")?.unwrap_or(true);
    req.auto_dismiss = args.opt_bool("auto-dismiss")?.unwrap_or(true);
    if !drive {
        req.unmap = args.opt_bool("unmap")?.unwrap_or(true);
    }
    req.resume = args.opt_bool("x-resume")?.unwrap_or(false);
    req.target_timeout = args.opt_u32("x-target-timeout")?;
    args.finish()?;
    let default = if drive && !req.resume {
        TargetMode::Create
    } else {
        TargetMode::Existing
    };
    req.mode = mode(mode_arg, default);
    Ok(req)
}

fn not_found(name: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

/// `blockdev-mirror`: the target is a node (QEMU looks up the device
/// first, then the target).
fn blockdev_mirror(m: &MirrorManager, args: &mut Args) -> Result<(), QmpError> {
    let req = parse_request(args, false)?;
    if req.device != m.node_name() {
        return Err(not_found(&req.device));
    }
    let name = req.target.to_string_lossy().into_owned();
    let node = m
        .graph()
        .and_then(|g| g.lookup(&name))
        .ok_or_else(|| not_found(&name))?;
    m.start_to_node(req, node)?;
    Ok(())
}

/// Registers `blockdev-mirror` and `drive-mirror` on `d`.
pub fn register_mirror_commands(d: &Dispatcher, manager: Arc<MirrorManager>) {
    let m = manager.clone();
    d.register("blockdev-mirror", move |call: &mut Call<'_>| {
        blockdev_mirror(&m, &mut call.args)?;
        Ok(json!({}))
    });
    d.register("drive-mirror", move |call: &mut Call<'_>| {
        manager.start(parse_request(&mut call.args, true)?)?;
        Ok(json!({}))
    });
}

/// Registers every block-job command (the `job-*` / `block-job-*` /
/// `query-*jobs` set and the two mirror commands) on `d` — the one call the
/// daemon needs.
pub fn register_block_job_commands(d: &Dispatcher, manager: Arc<MirrorManager>) {
    crate::jobs::qmp::register_job_commands(d, manager.registry().clone());
    register_mirror_commands(d, manager);
}

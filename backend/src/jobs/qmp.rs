//! The job commands with QEMU 7.2's names, arguments and result shapes:
//! `query-jobs`, `query-block-jobs`, `job-{pause,resume,cancel,complete,
//! finalize,dismiss}`, `block-job-{pause,resume,cancel,complete,finalize,
//! dismiss,set-speed}`, and QEMU 8.2's `block-job-change`.
//!
//! `job-*` commands say "Job not found" for an unknown id; `block-job-*`
//! commands say "Block job 'x' not found" with class `DeviceNotActive`, as
//! QEMU does. A block job's `device` is its job id.

use super::{Job, JobError, JobRegistry};
use crate::qmp::{Args, Call, Dispatcher, ErrorClass, QmpError};
use serde_json::{json, Map, Value};
use std::sync::Arc;

impl From<JobError> for QmpError {
    fn from(e: JobError) -> QmpError {
        let class = match e {
            JobError::BlockJobNotFound(_) => ErrorClass::DeviceNotActive,
            _ => ErrorClass::GenericError,
        };
        QmpError::new(class, e.to_string())
    }
}

/// `query-jobs` element (QAPI `JobInfo`).
pub fn job_info_json(job: &Job) -> Value {
    let i = job.info();
    let mut m = Map::new();
    m.insert("id".into(), json!(i.id));
    m.insert("type".into(), json!(i.job_type));
    m.insert("status".into(), json!(i.status.as_str()));
    m.insert("current-progress".into(), json!(i.current));
    m.insert("total-progress".into(), json!(i.total));
    if let Some(e) = i.error {
        m.insert("error".into(), json!(e));
    }
    Value::Object(m)
}

/// `query-block-jobs` element (QAPI `BlockJobInfo`, plus the job kind's
/// own members such as QEMU 8.2's `actively-synced` for a mirror).
pub fn block_job_info_json(job: &Job) -> Value {
    let i = job.info();
    let mut m = Map::new();
    m.insert("type".into(), json!(i.job_type));
    m.insert("device".into(), json!(i.id));
    m.insert("len".into(), json!(i.total));
    m.insert("offset".into(), json!(i.current));
    m.insert("busy".into(), json!(i.busy));
    m.insert("paused".into(), json!(i.paused));
    m.insert("speed".into(), json!(i.speed));
    m.insert("io-status".into(), json!(i.io_status.as_str()));
    m.insert("ready".into(), json!(i.status.is_ready()));
    m.insert("status".into(), json!(i.status.as_str()));
    m.insert("auto-finalize".into(), json!(i.auto_finalize));
    m.insert("auto-dismiss".into(), json!(i.auto_dismiss));
    if let Some(e) = i.error {
        m.insert("error".into(), json!(e));
    }
    m.extend(job.query_extra());
    Value::Object(m)
}

fn take(call: &mut Call<'_>) -> Args {
    std::mem::take(&mut call.args)
}

/// Registers every job command on `d`, bound to `registry`.
pub fn register_job_commands(d: &Dispatcher, registry: Arc<JobRegistry>) {
    let r = registry.clone();
    d.register("query-jobs", move |call: &mut Call<'_>| {
        take(call).finish()?;
        Ok(Value::Array(
            r.list().iter().map(|j| job_info_json(j)).collect(),
        ))
    });
    let r = registry.clone();
    d.register("query-block-jobs", move |call: &mut Call<'_>| {
        take(call).finish()?;
        Ok(Value::Array(
            r.list().iter().map(|j| block_job_info_json(j)).collect(),
        ))
    });

    type Verb = fn(&Job) -> Result<(), JobError>;
    let job_verbs: [(&str, Verb); 6] = [
        ("job-pause", Job::user_pause),
        ("job-resume", Job::user_resume),
        ("job-cancel", |j| j.cancel(true)),
        ("job-complete", Job::complete),
        ("job-finalize", Job::finalize),
        ("job-dismiss", Job::dismiss),
    ];
    for (name, verb) in job_verbs {
        let r = registry.clone();
        d.register(name, move |call: &mut Call<'_>| {
            let mut args = take(call);
            let id = args.req_str("id")?;
            args.finish()?;
            verb(&*r.find(&id)?)?;
            Ok(json!({}))
        });
    }

    let block_verbs: [(&str, &str, Verb); 5] = [
        ("block-job-pause", "device", Job::user_pause),
        ("block-job-resume", "device", Job::user_resume),
        ("block-job-complete", "device", Job::complete),
        ("block-job-finalize", "id", Job::finalize),
        ("block-job-dismiss", "id", Job::dismiss),
    ];
    for (name, member, verb) in block_verbs {
        let r = registry.clone();
        d.register(name, move |call: &mut Call<'_>| {
            let mut args = take(call);
            let id = args.req_str(member)?;
            args.finish()?;
            verb(&*r.find_block_job(&id)?)?;
            Ok(json!({}))
        });
    }

    let r = registry.clone();
    d.register("block-job-cancel", move |call: &mut Call<'_>| {
        let mut args = take(call);
        let device = args.req_str("device")?;
        let force = args.opt_bool("force")?.unwrap_or(false);
        args.finish()?;
        let job = r.find_block_job(&device)?;
        if job.user_paused() && !force {
            return Err(JobError::PausedNeedsForce(device).into());
        }
        job.cancel(force)?;
        Ok(json!({}))
    });

    let r = registry.clone();
    d.register("block-job-set-speed", move |call: &mut Call<'_>| {
        let mut args = take(call);
        let device = args.req_str("device")?;
        let speed = args.req_i64("speed")?;
        args.finish()?;
        r.find_block_job(&device)?.set_speed(speed)?;
        Ok(json!({}))
    });

    let r = registry;
    d.register("block-job-change", move |call: &mut Call<'_>| {
        let mut args = take(call);
        let id = args.req_str("id")?;
        let job_type = args.req_enum("type", JOB_TYPES)?;
        // The members of the job kind's variant are checked by the driver;
        // hand them over as they came.
        let mut rest = Map::new();
        for name in ["copy-mode"] {
            if let Some(v) = args.take(name) {
                rest.insert(name.to_string(), v);
            }
        }
        args.finish()?;
        let job = r.find_block_job(&id)?;
        if job.job_type() != job_type {
            return Err(QmpError::generic(format!(
                "Job type does not match: job '{id}' is a {} job",
                job.job_type()
            )));
        }
        job.change(&rest)?;
        Ok(json!({}))
    });
}

/// QAPI `JobType` values.
pub const JOB_TYPES: &[&str] = &[
    "commit",
    "stream",
    "mirror",
    "backup",
    "create",
    "amend",
    "snapshot-load",
    "snapshot-save",
    "snapshot-delete",
];

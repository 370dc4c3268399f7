//! Life-cycle tests of the job layer through its QMP commands, with a
//! driver that only counts. The expected event sequences are the ones
//! qemu-storage-daemon 7.2 emits for a mirror job in the same situations.

use super::qmp::register_job_commands;
use super::*;
use crate::qmp::{Dispatcher, Event, VersionInfo};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

/// Becomes ready after a few steps; finishes when completed or cancelled.
struct Counter {
    steps: AtomicU32,
    ready_after: u32,
    fail_with: Option<String>,
    fail_write_once: AtomicBool,
    policy: OnError,
    committed: AtomicBool,
    aborted: AtomicBool,
}

impl Counter {
    fn new() -> Counter {
        Counter {
            steps: AtomicU32::new(0),
            ready_after: 10,
            fail_with: None,
            fail_write_once: AtomicBool::new(false),
            policy: OnError::Report,
            committed: AtomicBool::new(false),
            aborted: AtomicBool::new(false),
        }
    }
}

impl JobDriver for Counter {
    fn job_type(&self) -> &'static str {
        "mirror"
    }

    fn run(&self, ctx: &JobContext) -> Result<(), String> {
        ctx.progress_set_remaining(10);
        loop {
            ctx.pause_point();
            if ctx.is_cancelled() {
                return Ok(());
            }
            if ctx.status().is_ready() && (ctx.should_complete() || ctx.cancel_requested()) {
                return Ok(());
            }
            if self.fail_write_once.swap(false, Ordering::SeqCst)
                && ctx.error_action(self.policy, IoOperation::Write, libc::ENOSPC)
                    == ErrorAction::Report
            {
                return Err("No space left on device".into());
            }
            let n = self.steps.fetch_add(1, Ordering::SeqCst);
            if n == self.ready_after {
                if let Some(e) = &self.fail_with {
                    return Err(e.clone());
                }
            }
            if n < self.ready_after {
                ctx.progress_update(1);
            } else {
                ctx.transition_to_ready();
            }
            ctx.sleep(Duration::from_millis(2));
        }
    }

    fn complete(&self, _ctx: &JobContext) -> Result<(), JobError> {
        Ok(())
    }

    fn cancel(&self, force: bool, ready: bool) -> bool {
        force || !ready
    }

    fn commit(&self, _ctx: &JobContext) -> Result<(), String> {
        self.committed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn abort(&self, _ctx: &JobContext) {
        self.aborted.store(true, Ordering::SeqCst);
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

struct Fixture {
    d: std::sync::Arc<Dispatcher>,
    reg: std::sync::Arc<JobRegistry>,
    rx: Receiver<std::sync::Arc<Event>>,
}

impl Fixture {
    fn new() -> Fixture {
        let events = crate::qmp::EventBus::new();
        let (_id, rx) = events.subscribe_channel(1000);
        let d = Dispatcher::new(events.clone(), VersionInfo::default());
        let reg = JobRegistry::new(events);
        register_job_commands(&d, reg.clone());
        Fixture { d, reg, rx }
    }

    fn start(
        &self,
        id: &str,
        driver: Counter,
        auto_finalize: bool,
        auto_dismiss: bool,
    ) -> std::sync::Arc<Job> {
        let job = self
            .reg
            .create(
                JobOptions {
                    id: id.into(),
                    auto_finalize,
                    auto_dismiss,
                    speed: 0,
                },
                std::sync::Arc::new(driver),
            )
            .unwrap();
        job.start().unwrap();
        job
    }

    /// Creates the jobs, makes them one grouped transaction, starts them.
    fn start_group(&self, jobs: Vec<(&str, Counter, bool)>) -> Vec<std::sync::Arc<Job>> {
        let txn = JobTxn::new();
        let jobs: Vec<_> = jobs
            .into_iter()
            .map(|(id, driver, auto_finalize)| {
                let opts = JobOptions {
                    id: id.into(),
                    auto_finalize,
                    auto_dismiss: true,
                    speed: 0,
                };
                let job = self.reg.create(opts, std::sync::Arc::new(driver)).unwrap();
                txn.add(&job);
                job
            })
            .collect();
        for j in &jobs {
            j.start().unwrap();
        }
        jobs
    }

    fn exec(&self, name: &str, args: Value) -> Result<Value, crate::qmp::QmpError> {
        let Value::Object(m) = args else {
            panic!("args")
        };
        self.d.execute(name, m)
    }

    /// Events so far, as "NAME" or "JOB_STATUS_CHANGE:status".
    fn events(&self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(e) = self.rx.recv_timeout(Duration::from_millis(50)) {
            let data = e.data.clone().unwrap_or(Value::Null);
            out.push(match e.name.as_str() {
                "JOB_STATUS_CHANGE" => data["status"].as_str().unwrap().to_string(),
                "BLOCK_JOB_ERROR" => format!("ERROR:{}", data["action"].as_str().unwrap()),
                n => n.to_string(),
            });
        }
        out
    }
}

fn wait(job: &Job, s: JobStatus) {
    assert_eq!(job.wait_for(&[s], Duration::from_secs(10)), s);
}

/// The status changes and events of a job that became READY and completed
/// (QEMU's sequence).
const READY_THEN_COMPLETED: [&str; 9] = [
    "created",
    "running",
    "ready",
    "BLOCK_JOB_READY",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
];

#[test]
fn complete_with_auto_finalize_and_dismiss() {
    let f = Fixture::new();
    let job = f.start("j1", Counter::new(), true, true);
    let err = f.exec("job-complete", json!({"id": "j1"})).unwrap_err();
    assert_eq!(
        err.desc,
        "Job 'j1' in state 'running' cannot accept command verb 'complete'"
    );
    let err = f.exec("job-finalize", json!({"id": "j1"})).unwrap_err();
    assert_eq!(
        err.desc,
        "Job 'j1' in state 'running' cannot accept command verb 'finalize'"
    );
    wait(&job, JobStatus::Ready);
    let q = f.exec("query-block-jobs", json!({})).unwrap();
    assert_eq!(q[0]["ready"], true);
    assert_eq!(q[0]["device"], "j1");
    assert_eq!(q[0]["offset"], 10);
    assert_eq!(q[0]["len"], 10);
    f.exec("job-complete", json!({"id": "j1"})).unwrap();
    wait(&job, JobStatus::Null);
    assert_eq!(f.events(), READY_THEN_COMPLETED);
    assert_eq!(f.exec("query-jobs", json!({})).unwrap(), json!([]));
    let err = f
        .exec("block-job-pause", json!({"device": "j1"}))
        .unwrap_err();
    assert_eq!(err.desc, "Block job 'j1' not found");
    assert_eq!(err.class, crate::qmp::ErrorClass::DeviceNotActive);
    assert_eq!(
        f.exec("job-pause", json!({"id": "j1"})).unwrap_err().desc,
        "Job not found"
    );
}

#[test]
fn manual_finalize_and_dismiss() {
    let f = Fixture::new();
    let job = f.start("j2", Counter::new(), false, false);
    wait(&job, JobStatus::Ready);
    f.exec("block-job-complete", json!({"device": "j2"}))
        .unwrap();
    wait(&job, JobStatus::Pending);
    let q = f.exec("query-block-jobs", json!({})).unwrap();
    assert_eq!(
        (
            q[0]["status"].clone(),
            q[0]["paused"].clone(),
            q[0]["ready"].clone()
        ),
        (json!("pending"), json!(true), json!(false))
    );
    let err = f.exec("job-dismiss", json!({"id": "j2"})).unwrap_err();
    assert_eq!(
        err.desc,
        "Job 'j2' in state 'pending' cannot accept command verb 'dismiss'"
    );
    f.exec("job-finalize", json!({"id": "j2"})).unwrap();
    assert_eq!(job.status(), JobStatus::Concluded);
    let q = f.exec("query-jobs", json!({})).unwrap();
    assert_eq!(
        q,
        json!([{"id": "j2", "type": "mirror", "status": "concluded", "current-progress": 10, "total-progress": 10}])
    );
    f.exec("job-dismiss", json!({"id": "j2"})).unwrap();
    assert_eq!(
        f.events(),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    assert!(f.reg.list().is_empty());
}

#[test]
fn cancel_before_ready_is_forced() {
    let f = Fixture::new();
    let mut c = Counter::new();
    c.ready_after = u32::MAX;
    let job = f.start("j3", c, true, false);
    f.exec("job-pause", json!({"id": "j3"})).unwrap();
    assert_eq!(
        f.exec("job-pause", json!({"id": "j3"})).unwrap_err().desc,
        "Job is already paused"
    );
    wait(&job, JobStatus::Paused);
    let err = f
        .exec("block-job-cancel", json!({"device": "j3"}))
        .unwrap_err();
    assert_eq!(
        err.desc,
        "The block job for device 'j3' is currently paused"
    );
    f.exec("block-job-cancel", json!({"device": "j3", "force": true}))
        .unwrap();
    wait(&job, JobStatus::Concluded);
    let q = f.exec("query-jobs", json!({})).unwrap();
    assert_eq!(q[0]["error"], "Operation canceled");
    assert_eq!(
        f.events(),
        [
            "created",
            "running",
            "paused",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded"
        ]
    );
}

#[test]
fn soft_cancel_after_ready_completes_and_forced_cancels() {
    let f = Fixture::new();
    let job = f.start("soft", Counter::new(), true, true);
    wait(&job, JobStatus::Ready);
    f.exec("block-job-cancel", json!({"device": "soft"}))
        .unwrap();
    wait(&job, JobStatus::Null);
    assert_eq!(f.events(), READY_THEN_COMPLETED);
    let job = f.start("hard", Counter::new(), true, true);
    wait(&job, JobStatus::Ready);
    f.exec("job-cancel", json!({"id": "hard"})).unwrap();
    wait(&job, JobStatus::Null);
    assert_eq!(
        f.events(),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
}

#[test]
fn pause_resume_standby_and_resume_errors() {
    let f = Fixture::new();
    let job = f.start("p", Counter::new(), true, true);
    wait(&job, JobStatus::Ready);
    let err = f.exec("job-resume", json!({"id": "p"})).unwrap_err();
    assert_eq!(err.desc, "Can't resume a job that was not paused");
    f.exec("block-job-pause", json!({"device": "p"})).unwrap();
    wait(&job, JobStatus::Standby);
    let q = f.exec("query-block-jobs", json!({})).unwrap();
    assert_eq!(
        (
            q[0]["paused"].clone(),
            q[0]["ready"].clone(),
            q[0]["busy"].clone()
        ),
        (json!(true), json!(true), json!(false))
    );
    let err = f.exec("job-complete", json!({"id": "p"})).unwrap_err();
    assert_eq!(
        err.desc,
        "Job 'p' in state 'standby' cannot accept command verb 'complete'"
    );
    f.exec("block-job-set-speed", json!({"device": "p", "speed": 1000}))
        .unwrap();
    let err = f
        .exec("block-job-set-speed", json!({"device": "p", "speed": -1}))
        .unwrap_err();
    assert_eq!(err.desc, "Parameter 'speed' expects a non-negative value");
    f.exec("block-job-resume", json!({"device": "p"})).unwrap();
    wait(&job, JobStatus::Ready);
    f.exec("job-complete", json!({"id": "p"})).unwrap();
    wait(&job, JobStatus::Null);
    let ev = f.events();
    assert_eq!(
        &ev[..6],
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "standby",
            "ready"
        ]
    );
}

#[test]
fn failure_and_error_policies() {
    let f = Fixture::new();
    let mut c = Counter::new();
    c.fail_with = Some("Input/output error".into());
    let job = f.start("bad", c, true, false);
    wait(&job, JobStatus::Concluded);
    let q = f.exec("query-block-jobs", json!({})).unwrap();
    assert_eq!(q[0]["error"], "Input/output error");
    assert_eq!(
        f.events(),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded"
        ]
    );
    f.exec("job-dismiss", json!({"id": "bad"})).unwrap();
    f.events();

    // stop: paused with io-status nospace; resume retries.
    let mut c = Counter::new();
    c.policy = OnError::Stop;
    c.fail_write_once.store(true, Ordering::SeqCst);
    let job = f.start("stop", c, true, true);
    wait(&job, JobStatus::Paused);
    let q = f.exec("query-block-jobs", json!({})).unwrap();
    assert_eq!(
        (q[0]["io-status"].clone(), q[0]["paused"].clone()),
        (json!("nospace"), json!(true))
    );
    f.exec("job-resume", json!({"id": "stop"})).unwrap();
    wait(&job, JobStatus::Ready);
    assert_eq!(
        f.exec("query-block-jobs", json!({})).unwrap()[0]["io-status"],
        "ok"
    );
    f.exec("job-complete", json!({"id": "stop"})).unwrap();
    wait(&job, JobStatus::Null);
    let ev = f.events();
    assert_eq!(
        &ev[..5],
        ["created", "running", "ERROR:stop", "paused", "running"]
    );

    // enospc on ENOSPC stops too; report ends the job.
    assert_eq!(OnError::Enospc.action(libc::ENOSPC), ErrorAction::Stop);
    assert_eq!(OnError::Auto.action(libc::EIO), ErrorAction::Report);
    let c = Counter::new();
    c.fail_write_once.store(true, Ordering::SeqCst);
    let job = f.start("rep", c, true, true);
    wait(&job, JobStatus::Null);
    assert_eq!(
        f.events(),
        [
            "created",
            "running",
            "ERROR:report",
            "aborting",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
}

#[test]
fn ids_are_checked() {
    let f = Fixture::new();
    let reg = &f.reg;
    let opts = |id: &str| JobOptions {
        id: id.into(),
        auto_finalize: true,
        auto_dismiss: true,
        speed: 0,
    };
    for bad in ["", "1a", "a b", "a/b"] {
        let e = reg
            .create(opts(bad), std::sync::Arc::new(Counter::new()))
            .unwrap_err();
        assert_eq!(e.to_string(), format!("Invalid job ID '{bad}'"));
    }
    let job = reg
        .create(opts("ok-1.x_y"), std::sync::Arc::new(Counter::new()))
        .unwrap();
    let e = reg
        .create(opts("ok-1.x_y"), std::sync::Arc::new(Counter::new()))
        .unwrap_err();
    assert_eq!(e.to_string(), "Job ID 'ok-1.x_y' already in use");
    job.early_fail();
    assert!(reg.list().is_empty());
    assert_eq!(f.events(), ["created", "null"]);
    let _ = Map::<String, Value>::new();
}

/// Events of job `id` only, as [`Fixture::events`] names them.
fn events_of(f: &Fixture, id: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(e) = f.rx.recv_timeout(Duration::from_millis(50)) {
        let data = e.data.clone().unwrap_or(Value::Null);
        if data["id"] != id && data["device"] != id {
            continue;
        }
        out.push(match e.name.as_str() {
            "JOB_STATUS_CHANGE" => data["status"].as_str().unwrap().to_string(),
            n => n.to_string(),
        });
    }
    out
}

#[test]
fn a_failing_member_cancels_its_group() {
    let f = Fixture::new();
    let mut bad = Counter::new();
    bad.fail_with = Some("Input/output error".into());
    let mut slow = Counter::new();
    slow.ready_after = u32::MAX;
    let jobs = f.start_group(vec![("bad", bad, true), ("slow", slow, true)]);
    wait(&jobs[0], JobStatus::Null);
    wait(&jobs[1], JobStatus::Null);
    let slow = jobs[1].driver().as_any().downcast_ref::<Counter>().unwrap();
    assert!(slow.aborted.load(Ordering::SeqCst) && !slow.committed.load(Ordering::SeqCst));
    let events: Vec<String> = f.events();
    let completed = events
        .iter()
        .filter(|e| *e == "BLOCK_JOB_COMPLETED")
        .count();
    let cancelled = events
        .iter()
        .filter(|e| *e == "BLOCK_JOB_CANCELLED")
        .count();
    assert_eq!((completed, cancelled), (1, 1), "{events:?}");
}

#[test]
fn a_group_becomes_pending_together_and_finalizes_together() {
    let f = Fixture::new();
    let jobs = f.start_group(vec![
        ("a", Counter::new(), false),
        ("b", Counter::new(), false),
    ]);
    wait(&jobs[0], JobStatus::Ready);
    wait(&jobs[1], JobStatus::Ready);
    f.exec("job-complete", json!({"id": "a"})).unwrap();
    wait(&jobs[0], JobStatus::Waiting);
    // a waits for b; nothing is committed before b's work is done too.
    assert_eq!(jobs[1].status(), JobStatus::Ready);
    f.events();
    f.exec("job-complete", json!({"id": "b"})).unwrap();
    wait(&jobs[0], JobStatus::Pending);
    wait(&jobs[1], JobStatus::Pending);
    let driver = |j: &Job| {
        j.driver()
            .as_any()
            .downcast_ref::<Counter>()
            .unwrap()
            .committed
            .load(Ordering::SeqCst)
    };
    assert!(!driver(&jobs[0]) && !driver(&jobs[1]));
    // job-finalize on one member finalizes both.
    f.exec("job-finalize", json!({"id": "b"})).unwrap();
    wait(&jobs[0], JobStatus::Null);
    wait(&jobs[1], JobStatus::Null);
    assert!(driver(&jobs[0]) && driver(&jobs[1]));
}

#[test]
fn cancelling_a_waiting_member_cancels_its_group() {
    let f = Fixture::new();
    let jobs = f.start_group(vec![
        ("a", Counter::new(), true),
        ("b", Counter::new(), true),
    ]);
    wait(&jobs[0], JobStatus::Ready);
    f.exec("job-complete", json!({"id": "a"})).unwrap();
    wait(&jobs[0], JobStatus::Waiting);
    f.events();
    f.exec("job-cancel", json!({"id": "a"})).unwrap();
    wait(&jobs[1], JobStatus::Null);
    wait(&jobs[0], JobStatus::Null);
    assert_eq!(
        events_of(&f, "a"),
        ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    );
}

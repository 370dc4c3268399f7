//! One job: QEMU's generic job life cycle (`qemu/job.c`) around a
//! kind-specific [`JobDriver`].
//!
//! The driver's `run` works on its own thread and calls back into a
//! [`JobContext`] at its pause points, to report progress, to announce
//! READY and to apply an error policy. Management verbs arrive on QMP
//! threads and only change flags under the job's lock and wake the job
//! thread; the life-cycle steps after `run` (waiting, pending, finalize,
//! abort, conclude, dismiss) run on whichever thread gets there, under a
//! `finishing` flag so that they happen exactly once. Every status change
//! emits `JOB_STATUS_CHANGE` under the lock, so events come out in the order
//! the states were taken.

use super::state::{transition_allowed, verb_allowed, JobStatus, JobVerb};
use super::txn::{Claimed, JobTxn};
use super::JobError;
use crate::qmp::EventBus;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// QEMU's `BlockdevOnError`: what a job does when an I/O operation fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// End the job with the error.
    Report,
    /// Carry on (the operation is retried later).
    Ignore,
    /// Stop on ENOSPC, report anything else.
    Enospc,
    /// Pause the job (BLOCK_JOB_ERROR); `job-resume` retries.
    Stop,
    /// For jobs the same as `enospc`.
    Auto,
}

impl OnError {
    /// QAPI enum values, for argument parsing.
    pub const NAMES: [&'static str; 5] = ["report", "ignore", "enospc", "stop", "auto"];

    /// Parses a QAPI name (one of [`OnError::NAMES`]).
    pub fn parse(s: &str) -> Option<OnError> {
        Some(match s {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "enospc" => OnError::Enospc,
            "stop" => OnError::Stop,
            "auto" => OnError::Auto,
            _ => return None,
        })
    }

    /// The action for an error with OS error number `errno` (QEMU's
    /// `block_job_error_action`).
    pub fn action(self, errno: i32) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => {
                if errno == libc::ENOSPC {
                    ErrorAction::Stop
                } else {
                    ErrorAction::Report
                }
            }
        }
    }
}

/// What was done about one failed operation (QAPI `BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// The job ends with the error.
    Report,
    /// The job carries on.
    Ignore,
    /// The job pauses until resumed.
    Stop,
}

impl ErrorAction {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// QAPI `BlockDeviceIoStatus` of a block job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// No error.
    Ok,
    /// Stopped on an error other than ENOSPC.
    Failed,
    /// Stopped on ENOSPC.
    NoSpace,
}

impl IoStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::NoSpace => "nospace",
        }
    }
}

/// Which way an I/O operation went (QAPI `IoOperationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOperation {
    /// Reading (the source, for a mirror).
    Read,
    /// Writing (the target, for a mirror).
    Write,
}

impl IoOperation {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// The text QEMU reports for a cancelled job (`strerror(ECANCELED)`).
pub const CANCELLED_ERROR: &str = "Operation canceled";

/// The kind-specific part of a job.
pub trait JobDriver: Send + Sync + 'static {
    /// QAPI `JobType` name, e.g. `"mirror"`.
    fn job_type(&self) -> &'static str;

    /// The job's work, on the job's own thread. Must call
    /// [`JobContext::pause_point`] regularly and return soon after
    /// [`JobContext::is_cancelled`]; returns once its work is done (for a
    /// mirror: once completion or a soft cancel was requested), or the
    /// error text that ends the job.
    fn run(&self, ctx: &JobContext) -> Result<(), String>;

    /// Whether `complete` is possible now (the verb table was checked);
    /// the default refuses as QEMU does for jobs without `complete`.
    fn complete(&self, ctx: &JobContext) -> Result<(), JobError> {
        Err(JobError::CannotComplete(ctx.id().to_string()))
    }

    /// A cancel request; returns whether it is a forced one (QEMU's
    /// `.cancel`: a mirror treats any cancel before READY as forced).
    fn cancel(&self, force: bool, ready: bool) -> bool {
        let _ = ready;
        let _ = force;
        true
    }

    /// The success path after `run` (QEMU's prepare + commit): for a
    /// mirror, the pivot. An error turns the job into a failed one.
    fn commit(&self, ctx: &JobContext) -> Result<(), String>;

    /// The failure / cancel path after `run`.
    fn abort(&self, ctx: &JobContext);

    /// Runs after `commit` or `abort`, whatever happened.
    fn clean(&self, _ctx: &JobContext) {}

    /// `block-job-change` (verb checked); `options` are the command's
    /// arguments beyond `id` and `type`.
    fn change(&self, _ctx: &JobContext, _options: &Map<String, Value>) -> Result<(), JobError> {
        Err(JobError::Generic("Job type does not support change".into()))
    }

    /// Extra members for `query-block-jobs` (a mirror: `actively-synced`).
    fn query_extra(&self, _ctx: &JobContext) -> Map<String, Value> {
        Map::new()
    }

    /// For downcasting to the concrete driver (statistics, tests).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// How a job is created.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// The job id (QMP `job-id`).
    pub id: String,
    /// Finalize without waiting for `job-finalize`.
    pub auto_finalize: bool,
    /// Dismiss without waiting for `job-dismiss`.
    pub auto_dismiss: bool,
    /// Initial speed limit in bytes per second (0: none).
    pub speed: u64,
}

struct State {
    status: JobStatus,
    pause_count: u32,
    user_paused: bool,
    paused: bool,
    busy: bool,
    cancelled: bool,
    force_cancel: bool,
    should_complete: bool,
    /// `run` has returned: the rest of the life cycle is under way.
    deferred: bool,
    /// Someone is running finalize/abort: nobody else may.
    finishing: bool,
    speed: u64,
    current: u64,
    total: u64,
    io_status: IoStatus,
    error: Option<String>,
    /// Bumped on every management action, so sleepers notice them.
    generation: u64,
}

/// A snapshot of a job for `query-jobs` and `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// QAPI job type.
    pub job_type: &'static str,
    /// Status.
    pub status: JobStatus,
    /// Progress done (bytes for a mirror).
    pub current: u64,
    /// Progress total (bytes for a mirror).
    pub total: u64,
    /// Speed limit in bytes per second.
    pub speed: u64,
    /// The job's thread is working (not paused, sleeping or done).
    pub busy: bool,
    /// A pause is requested or in effect (QEMU: `pause_count > 0`).
    pub paused: bool,
    /// I/O status after an error with `stop`.
    pub io_status: IoStatus,
    /// Finalizes by itself.
    pub auto_finalize: bool,
    /// Dismisses itself.
    pub auto_dismiss: bool,
    /// The error that ended the job, if any.
    pub error: Option<String>,
}

/// What runs once a job reaches `null` (the registry drops it).
type OnNull = Box<dyn FnOnce(&str) + Send>;

/// A job: its identity, its state machine and its driver.
pub struct Job {
    id: String,
    auto_finalize: bool,
    auto_dismiss: bool,
    driver: Arc<dyn JobDriver>,
    events: EventBus,
    state: Mutex<State>,
    cond: Condvar,
    /// Called once the job reaches `null`, to drop it from its registry.
    on_null: Mutex<Option<OnNull>>,
    /// The grouped transaction the job belongs to, if any.
    txn: OnceLock<Arc<JobTxn>>,
    me: Weak<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("type", &self.driver.job_type())
            .field("status", &self.status())
            .finish()
    }
}

/// What the driver's code sees of its job (a cheap handle).
#[derive(Clone)]
pub struct JobContext {
    job: Arc<Job>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.job.fmt(f)
    }
}

impl Job {
    /// Creates a job in state `created` (emitting JOB_STATUS_CHANGE).
    /// Call [`Job::start`] to run it.
    pub fn new(opts: JobOptions, driver: Arc<dyn JobDriver>, events: EventBus) -> Arc<Job> {
        let job = Arc::new_cyclic(|me| Job {
            id: opts.id,
            auto_finalize: opts.auto_finalize,
            auto_dismiss: opts.auto_dismiss,
            driver,
            events,
            state: Mutex::new(State {
                status: JobStatus::Undefined,
                pause_count: 0,
                user_paused: false,
                paused: true,
                busy: false,
                cancelled: false,
                force_cancel: false,
                should_complete: false,
                deferred: false,
                finishing: false,
                speed: opts.speed,
                current: 0,
                total: 0,
                io_status: IoStatus::Ok,
                error: None,
                generation: 0,
            }),
            cond: Condvar::new(),
            on_null: Mutex::new(None),
            txn: OnceLock::new(),
            me: me.clone(),
        });
        let mut st = job.lock();
        job.transition(&mut st, JobStatus::Created);
        drop(st);
        job
    }

    /// Registers what to do once the job reaches `null`.
    pub(crate) fn set_on_null(&self, f: Box<dyn FnOnce(&str) + Send>) {
        *self.on_null.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- membership of a grouped transaction (see `txn.rs`) ----

    pub(super) fn join_txn(&self, txn: Arc<JobTxn>) {
        let _ = self.txn.set(txn);
    }

    /// Claims the job for an abort of its transaction: `cancel` requests
    /// a forced cancel first. True if the caller must now abort it (its
    /// work is done and nobody else finishes it).
    pub(super) fn claim_for_abort(&self, cancel: bool) -> bool {
        let mut st = self.lock();
        if cancel {
            st.cancelled = true;
            st.force_cancel = true;
        }
        if !st.deferred || st.finishing {
            return false;
        }
        st.finishing = true;
        st.error.get_or_insert_with(|| CANCELLED_ERROR.to_string());
        true
    }

    /// Stops a running member of a transaction being aborted.
    fn stop_for_txn(&self) {
        let ready = self.status().is_ready();
        self.driver.cancel(true, ready);
        let mut st = self.lock();
        st.cancelled = true;
        st.force_cancel = true;
        self.wake(&mut st);
    }

    pub(super) fn is_deferred(&self) -> bool {
        self.lock().deferred
    }

    /// Its work succeeded and it waits for the other members.
    pub(super) fn is_waiting_ok(&self) -> bool {
        let st = self.lock();
        st.status == JobStatus::Waiting && !st.finishing && !st.cancelled && st.error.is_none()
    }

    pub(super) fn auto_finalizes(&self) -> bool {
        self.auto_finalize
    }

    /// `waiting` -> `pending` with the group; `finalize` claims it too.
    pub(super) fn to_pending(&self, finalize: bool) {
        let mut st = self.lock();
        self.transition(&mut st, JobStatus::Pending);
        if !self.auto_finalize {
            self.events.emit(
                "BLOCK_JOB_PENDING",
                json!({"type": self.job_type(), "id": self.id}),
            );
        }
        st.finishing |= finalize;
        self.wake(&mut st);
    }

    /// Claims a pending job for `job-finalize` of its group.
    pub(super) fn claim_for_finalize(&self) -> bool {
        let mut st = self.lock();
        if st.status != JobStatus::Pending || st.finishing {
            return false;
        }
        st.finishing = true;
        true
    }

    /// Carries out what a group decision claimed.
    fn run_claimed(claimed: Claimed) {
        for j in claimed.stop {
            j.stop_for_txn();
        }
        for j in claimed.abort {
            if let Some(ctx) = j.context() {
                j.do_abort(&ctx);
            }
        }
        for j in claimed.finalize {
            if let Some(ctx) = j.context() {
                j.do_finalize(&ctx);
            }
        }
    }

    /// The job's grouped transaction, with the job itself.
    fn group(&self) -> Option<(Arc<JobTxn>, Arc<Job>)> {
        Some((self.txn.get()?.clone(), self.arc()?))
    }

    fn arc(&self) -> Option<Arc<Job>> {
        self.me.upgrade()
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The QAPI job type.
    pub fn job_type(&self) -> &'static str {
        self.driver.job_type()
    }

    /// The driver (for kind-specific management commands).
    pub fn driver(&self) -> &Arc<dyn JobDriver> {
        &self.driver
    }

    /// Current status.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// A context handle for driver code outside `run` (e.g. write hooks).
    pub fn context(&self) -> Option<JobContext> {
        self.arc().map(|job| JobContext { job })
    }

    fn transition(&self, st: &mut State, to: JobStatus) {
        let from = st.status;
        if !transition_allowed(from, to) {
            // QEMU asserts; a bug here must not take the daemon down.
            log::error!("job '{}': illegal transition {from} -> {to}", self.id);
            debug_assert!(false, "illegal job transition {from} -> {to}");
        }
        st.status = to;
        // Waiters (wait_for, pause points) look at the status.
        self.cond.notify_all();
        if from != to {
            log::debug!("job '{}': {from} -> {to}", self.id);
            self.events.emit(
                "JOB_STATUS_CHANGE",
                json!({"id": self.id, "status": to.as_str()}),
            );
        }
    }

    fn check_verb(&self, st: &State, verb: JobVerb) -> Result<(), JobError> {
        if verb_allowed(verb, st.status) {
            Ok(())
        } else {
            Err(JobError::VerbRefused {
                id: self.id.clone(),
                status: st.status,
                verb,
            })
        }
    }

    fn wake(&self, st: &mut State) {
        st.generation = st.generation.wrapping_add(1);
        self.cond.notify_all();
    }

    /// Starts the job's thread (`created` -> `running`).
    pub fn start(&self) -> Result<(), JobError> {
        let Some(job) = self.arc() else {
            return Err(JobError::Generic("job is being destroyed".into()));
        };
        {
            let mut st = self.lock();
            st.paused = false;
            st.busy = true;
            self.transition(&mut st, JobStatus::Running);
        }
        let thread_job = job.clone();
        std::thread::Builder::new()
            .name(format!("job-{}", self.id))
            .spawn(move || {
                crate::thread_kind::started(crate::thread_kind::ThreadKind::Job);
                thread_job.thread_main()
            })
            .map(|_| ())
            .map_err(|e| {
                // Could not start: behave as a job that failed at once.
                let ctx = JobContext { job };
                ctx.job
                    .finish_run(Err(format!("cannot start the job thread: {e}")), &ctx);
                JobError::Generic(format!("cannot start the job thread: {e}"))
            })
    }

    /// Ends a job that was created but could not be started (QEMU's
    /// `job_early_fail`): `created` -> `null`.
    pub fn early_fail(&self) {
        let mut st = self.lock();
        st.deferred = true;
        st.finishing = true;
        self.transition(&mut st, JobStatus::Null);
        drop(st);
        self.run_on_null();
    }

    fn thread_main(self: Arc<Job>) {
        let ctx = JobContext { job: self.clone() };
        let result = self.driver.run(&ctx);
        self.finish_run(result, &ctx);
    }

    /// After `run`: QEMU's `job_exit` / `job_completed`.
    fn finish_run(&self, result: Result<(), String>, ctx: &JobContext) {
        let mut st = self.lock();
        st.busy = false;
        st.deferred = true;
        let cancelled = st.cancelled && st.force_cancel;
        if let Err(e) = &result {
            log::warn!("job '{}' failed: {e}", self.id);
        }
        if result.is_err() || cancelled {
            st.error = Some(match result {
                Err(e) if !cancelled => e,
                _ => CANCELLED_ERROR.to_string(),
            });
            if let Some((txn, me)) = self.group() {
                drop(st);
                Self::run_claimed(txn.abort_from(&me));
                return;
            }
            st.finishing = true;
            drop(st);
            self.do_abort(ctx);
            return;
        }
        self.transition(&mut st, JobStatus::Waiting);
        if let Some((txn, _)) = self.group() {
            drop(st);
            Self::run_claimed(txn.member_done());
            return;
        }
        self.transition(&mut st, JobStatus::Pending);
        if !self.auto_finalize {
            self.events.emit(
                "BLOCK_JOB_PENDING",
                json!({"type": self.job_type(), "id": self.id}),
            );
            self.wake(&mut st);
            return;
        }
        st.finishing = true;
        drop(st);
        self.do_finalize(ctx);
    }

    /// Finalize (pending): commit, then conclude. `finishing` is set.
    fn do_finalize(&self, ctx: &JobContext) {
        match self.driver.commit(ctx) {
            Ok(()) => {
                self.driver.clean(ctx);
                let st = self.lock();
                self.emit_completed(&st, None);
                self.conclude(st);
            }
            Err(e) => {
                log::warn!("job '{}' could not be finalized: {e}", self.id);
                self.lock().error = Some(e);
                self.do_abort(ctx);
            }
        }
    }

    /// Abort path: aborting, driver abort, event, conclude.
    fn do_abort(&self, ctx: &JobContext) {
        {
            let mut st = self.lock();
            self.transition(&mut st, JobStatus::Aborting);
        }
        self.driver.abort(ctx);
        self.driver.clean(ctx);
        let st = self.lock();
        if st.cancelled && st.force_cancel {
            self.events
                .emit("BLOCK_JOB_CANCELLED", self.block_event_data(&st));
        } else {
            let err = st.error.clone();
            self.emit_completed(&st, err.as_deref());
        }
        self.conclude(st);
    }

    fn block_event_data(&self, st: &State) -> Value {
        json!({
            "type": self.job_type(),
            "device": self.id,
            "len": st.total,
            "offset": st.current,
            "speed": st.speed,
        })
    }

    fn emit_completed(&self, st: &State, error: Option<&str>) {
        let mut data = self.block_event_data(st);
        if let (Some(e), Value::Object(m)) = (error, &mut data) {
            m.insert("error".into(), json!(e));
        }
        self.events.emit("BLOCK_JOB_COMPLETED", data);
    }

    fn conclude(&self, mut st: MutexGuard<'_, State>) {
        st.paused = false;
        st.busy = false;
        st.io_status = IoStatus::Ok;
        self.transition(&mut st, JobStatus::Concluded);
        self.wake(&mut st);
        if self.auto_dismiss {
            self.transition(&mut st, JobStatus::Null);
            drop(st);
            self.run_on_null();
        }
    }

    fn run_on_null(&self) {
        let f = self
            .on_null
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(f) = f {
            f(&self.id);
        }
    }

    // ---- management verbs (QMP threads) ----

    /// `job-pause` / `block-job-pause`.
    pub fn user_pause(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, JobVerb::Pause)?;
        if st.user_paused {
            return Err(JobError::AlreadyPaused);
        }
        st.user_paused = true;
        st.pause_count += 1;
        self.wake(&mut st);
        Ok(())
    }

    /// `job-resume` / `block-job-resume` (checks in QEMU's order).
    pub fn user_resume(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        if !st.user_paused || st.pause_count == 0 {
            return Err(JobError::NotPaused);
        }
        self.check_verb(&st, JobVerb::Resume)?;
        st.io_status = IoStatus::Ok;
        st.user_paused = false;
        st.pause_count -= 1;
        self.wake(&mut st);
        Ok(())
    }

    /// Whether the user (or a `stop` error) paused the job.
    pub fn user_paused(&self) -> bool {
        self.lock().user_paused
    }

    /// `block-job-set-speed` (verb first, then the value, as QEMU).
    pub fn set_speed(&self, speed: i64) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, JobVerb::SetSpeed)?;
        let speed = u64::try_from(speed).map_err(|_| JobError::NegativeSpeed)?;
        st.speed = speed;
        self.wake(&mut st);
        Ok(())
    }

    /// `job-complete` / `block-job-complete`.
    pub fn complete(&self) -> Result<(), JobError> {
        {
            let st = self.lock();
            self.check_verb(&st, JobVerb::Complete)?;
            if st.cancelled {
                return Err(JobError::CannotComplete(self.id.clone()));
            }
        }
        let ctx = self
            .context()
            .ok_or(JobError::CannotComplete(self.id.clone()))?;
        self.driver.complete(&ctx)?;
        let mut st = self.lock();
        st.should_complete = true;
        self.wake(&mut st);
        Ok(())
    }

    /// `job-cancel` (`force` = true) / `block-job-cancel` (QEMU's
    /// `job_user_cancel` + `job_cancel`).
    pub fn cancel(&self, force: bool) -> Result<(), JobError> {
        let st = self.lock();
        self.check_verb(&st, JobVerb::Cancel)?;
        let ready = st.status.is_ready();
        drop(st);
        let force = self.driver.cancel(force, ready);
        let mut st = self.lock();
        if st.user_paused {
            st.user_paused = false;
            st.pause_count = st.pause_count.saturating_sub(1);
        }
        // A soft cancel after the job's work is done changes nothing.
        if !st.deferred || force {
            st.cancelled = true;
            st.force_cancel |= force;
        }
        self.wake(&mut st);
        let done = matches!(st.status, JobStatus::Waiting | JobStatus::Pending);
        if st.deferred && st.force_cancel && !st.finishing && done {
            if let Some((txn, me)) = self.group() {
                // The whole group is cancelled with it.
                drop(st);
                Self::run_claimed(txn.abort_from(&me));
                return Ok(());
            }
        }
        if st.deferred && st.force_cancel && !st.finishing && st.status == JobStatus::Pending {
            // Waiting for job-finalize: abort right here.
            st.finishing = true;
            st.error = Some(CANCELLED_ERROR.to_string());
            drop(st);
            if let Some(ctx) = self.context() {
                self.do_abort(&ctx);
            }
        }
        Ok(())
    }

    /// `job-finalize`.
    pub fn finalize(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, JobVerb::Finalize)?;
        if st.finishing {
            return Ok(());
        }
        if let Some((txn, _)) = self.group() {
            drop(st);
            let finalize = txn.finalize_all();
            Self::run_claimed(Claimed {
                abort: Vec::new(),
                stop: Vec::new(),
                finalize,
            });
            return Ok(());
        }
        st.finishing = true;
        drop(st);
        if let Some(ctx) = self.context() {
            self.do_finalize(&ctx);
        }
        Ok(())
    }

    /// `job-dismiss`.
    pub fn dismiss(&self) -> Result<(), JobError> {
        let mut st = self.lock();
        self.check_verb(&st, JobVerb::Dismiss)?;
        self.transition(&mut st, JobStatus::Null);
        drop(st);
        self.run_on_null();
        Ok(())
    }

    /// `block-job-change` (verb checked here, the rest by the driver).
    pub fn change(&self, options: &Map<String, Value>) -> Result<(), JobError> {
        {
            let st = self.lock();
            self.check_verb(&st, JobVerb::Change)?;
        }
        let ctx = self
            .context()
            .ok_or_else(|| JobError::Generic("job is being destroyed".into()))?;
        self.driver.change(&ctx, options)?;
        let mut st = self.lock();
        self.wake(&mut st);
        Ok(())
    }

    /// A snapshot for the query commands.
    pub fn info(&self) -> JobInfo {
        let st = self.lock();
        JobInfo {
            id: self.id.clone(),
            job_type: self.job_type(),
            status: st.status,
            current: st.current,
            total: st.total,
            speed: st.speed,
            busy: st.busy,
            // QEMU reports a pending job as paused (its node is drained).
            paused: st.pause_count > 0 || st.status == JobStatus::Pending,
            io_status: st.io_status,
            auto_finalize: self.auto_finalize,
            auto_dismiss: self.auto_dismiss,
            error: st.error.clone(),
        }
    }

    /// Kind-specific members for `query-block-jobs`.
    pub fn query_extra(&self) -> Map<String, Value> {
        match self.context() {
            Some(ctx) => self.driver.query_extra(&ctx),
            None => Map::new(),
        }
    }

    /// Waits until the job reaches one of `statuses` or `timeout` passes;
    /// returns the status it has then.
    pub fn wait_for(&self, statuses: &[JobStatus], timeout: Duration) -> JobStatus {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !statuses.contains(&st.status) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .cond
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        st.status
    }
}

impl JobContext {
    /// The job id.
    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// The job itself.
    pub fn job(&self) -> &Arc<Job> {
        &self.job
    }

    /// Current status.
    pub fn status(&self) -> JobStatus {
        self.job.status()
    }

    /// Forced cancel requested (QEMU's `job_is_cancelled`): stop now.
    pub fn is_cancelled(&self) -> bool {
        let st = self.job.lock();
        st.cancelled && st.force_cancel
    }

    /// Any cancel requested, soft or forced (QEMU's `job_cancel_requested`).
    pub fn cancel_requested(&self) -> bool {
        self.job.lock().cancelled
    }

    /// `complete` was accepted.
    pub fn should_complete(&self) -> bool {
        self.job.lock().should_complete
    }

    /// A pause is requested (the driver should quiesce and call
    /// [`JobContext::pause_point`]).
    pub fn should_pause(&self) -> bool {
        let st = self.job.lock();
        st.pause_count > 0 && !(st.cancelled && st.force_cancel)
    }

    /// Current speed limit (bytes per second, 0 = none).
    pub fn speed(&self) -> u64 {
        self.job.lock().speed
    }

    /// QEMU's `job_pause_point`: if a pause is requested, go to `paused`
    /// (or `standby` from `ready`) and wait for resume or cancel.
    pub fn pause_point(&self) {
        let job = &self.job;
        let mut st = job.lock();
        if st.pause_count == 0 || (st.cancelled && st.force_cancel) {
            return;
        }
        let prev = st.status;
        let paused_status = if prev == JobStatus::Ready {
            JobStatus::Standby
        } else {
            JobStatus::Paused
        };
        job.transition(&mut st, paused_status);
        st.paused = true;
        st.busy = false;
        job.cond.notify_all();
        while st.pause_count > 0 && !(st.cancelled && st.force_cancel) {
            st = job.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.paused = false;
        st.busy = true;
        job.transition(&mut st, prev);
    }

    /// Sleeps up to `d` (not busy), waking early on any management action.
    pub fn sleep(&self, d: Duration) {
        let job = &self.job;
        let mut st = job.lock();
        if st.cancelled && st.force_cancel {
            return;
        }
        let gen = st.generation;
        st.busy = false;
        let deadline = Instant::now() + d;
        while st.generation == gen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = job
                .cond
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        st.busy = true;
    }

    /// Reports whether the job's thread is working (`busy` in queries), for
    /// drivers that wait on something of their own.
    pub fn set_busy(&self, busy: bool) {
        self.job.lock().busy = busy;
    }

    /// Wakes the job's thread out of [`JobContext::sleep`] (e.g. when work
    /// arrives).
    pub fn kick(&self) {
        let mut st = self.job.lock();
        self.job.wake(&mut st);
    }

    /// `running` -> `ready` with BLOCK_JOB_READY.
    pub fn transition_to_ready(&self) {
        let job = &self.job;
        let mut st = job.lock();
        if st.status != JobStatus::Running {
            return;
        }
        job.transition(&mut st, JobStatus::Ready);
        job.events
            .emit("BLOCK_JOB_READY", job.block_event_data(&st));
        job.wake(&mut st);
    }

    /// Adds `done` to the progress (QEMU's `job_progress_update`).
    pub fn progress_update(&self, done: u64) {
        let mut st = self.job.lock();
        st.current = st.current.saturating_add(done);
        st.total = st.total.max(st.current);
    }

    /// Sets the remaining work (QEMU's `job_progress_set_remaining`).
    pub fn progress_set_remaining(&self, remaining: u64) {
        let mut st = self.job.lock();
        st.total = st.current.saturating_add(remaining);
    }

    /// Current (done, total) progress.
    pub fn progress(&self) -> (u64, u64) {
        let st = self.job.lock();
        (st.current, st.total)
    }

    /// QEMU's `block_job_error_action`: emits BLOCK_JOB_ERROR and, for
    /// `stop`, pauses the job as if the user had (so `job-resume` retries).
    pub fn error_action(&self, policy: OnError, op: IoOperation, errno: i32) -> ErrorAction {
        let action = policy.action(errno);
        let job = &self.job;
        let mut st = job.lock();
        job.events.emit(
            "BLOCK_JOB_ERROR",
            json!({"device": job.id, "operation": op.as_str(), "action": action.as_str()}),
        );
        if action == ErrorAction::Stop {
            if !st.user_paused {
                st.user_paused = true;
                st.pause_count += 1;
            }
            st.io_status = if errno == libc::ENOSPC {
                IoStatus::NoSpace
            } else {
                IoStatus::Failed
            };
            job.wake(&mut st);
        }
        action
    }
}

//! Block jobs: QEMU's job model (states, verbs, events) and the registry of
//! a daemon's jobs.
//!
//! - [`state`]: the state machine tables, exactly QEMU's `JobSTT` and
//!   `JobVerbTable`.
//! - [`job`]: one job's life cycle around a kind-specific [`JobDriver`]
//!   (mirror and backup).
//! - [`txn`]: grouped transactions, whose jobs finish together.
//! - [`JobRegistry`]: jobs by id, as `query-jobs` lists them.
//! - [`qmp`]: the job commands (`job-*`, `block-job-*`, `query-jobs`,
//!   `query-block-jobs`) for a [`crate::qmp::Dispatcher`].
//!
//! Events (`JOB_STATUS_CHANGE`, `BLOCK_JOB_*`) go out on the QMP
//! [`EventBus`] with QEMU's data members, in QEMU's order.

pub mod job;
pub mod qmp;
pub mod state;
pub mod txn;

pub use job::{
    ErrorAction, IoOperation, IoStatus, Job, JobContext, JobDriver, JobInfo, JobOptions, OnError,
    CANCELLED_ERROR,
};
pub use state::{transition_allowed, verb_allowed, JobStatus, JobVerb};
pub use txn::JobTxn;

use crate::qmp::EventBus;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Refusals of the job layer; the texts are QEMU 7.2's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// A verb the job's state does not allow.
    #[error("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")]
    VerbRefused {
        /// Job id.
        id: String,
        /// Its state.
        status: JobStatus,
        /// The refused verb.
        verb: JobVerb,
    },
    /// `job-*` with an unknown id.
    #[error("Job not found")]
    JobNotFound,
    /// `block-job-*` with an unknown id (class `DeviceNotActive`).
    #[error("Block job '{0}' not found")]
    BlockJobNotFound(String),
    /// Pause of a paused job.
    #[error("Job is already paused")]
    AlreadyPaused,
    /// Resume of a job that is not paused.
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    /// `complete` that the job cannot do now.
    #[error("The active block job '{0}' cannot be completed")]
    CannotComplete(String),
    /// A negative `speed`.
    #[error("Parameter 'speed' expects a non-negative value")]
    NegativeSpeed,
    /// A job id that is not an identifier.
    #[error("Invalid job ID '{0}'")]
    InvalidId(String),
    /// A job id that is taken.
    #[error("Job ID '{0}' already in use")]
    IdInUse(String),
    /// `block-job-cancel` without `force` on a paused job.
    #[error("The block job for device '{0}' is currently paused")]
    PausedNeedsForce(String),
    /// Anything else, verbatim.
    #[error("{0}")]
    Generic(String),
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// The jobs of one daemon, newest first (QEMU's list order).
pub struct JobRegistry {
    jobs: Mutex<Vec<Arc<Job>>>,
    events: EventBus,
    me: Weak<JobRegistry>,
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.lock().iter()).finish()
    }
}

impl JobRegistry {
    /// An empty registry whose jobs emit on `events`.
    pub fn new(events: EventBus) -> Arc<JobRegistry> {
        Arc::new_cyclic(|me| JobRegistry {
            jobs: Mutex::new(Vec::new()),
            events,
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bus the jobs emit on.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Creates a job (state `created`) after QEMU's id checks; the caller
    /// starts it with [`Job::start`]. The job leaves the registry when it
    /// reaches `null`.
    pub fn create(
        &self,
        opts: JobOptions,
        driver: Arc<dyn JobDriver>,
    ) -> Result<Arc<Job>, JobError> {
        if !id_wellformed(&opts.id) {
            return Err(JobError::InvalidId(opts.id));
        }
        let mut jobs = self.lock();
        if jobs.iter().any(|j| j.id() == opts.id) {
            return Err(JobError::IdInUse(opts.id));
        }
        let job = Job::new(opts, driver, self.events.clone());
        let me = self.me.clone();
        let ptr = Arc::downgrade(&job);
        job.set_on_null(Box::new(move |_id| {
            if let Some(reg) = me.upgrade() {
                reg.lock()
                    .retain(|j| !std::ptr::eq(Arc::as_ptr(j), ptr.as_ptr()));
            }
        }));
        jobs.insert(0, job.clone());
        Ok(job)
    }

    /// The job with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.lock().iter().find(|j| j.id() == id).cloned()
    }

    /// The job for a `job-*` command.
    pub fn find(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.get(id).ok_or(JobError::JobNotFound)
    }

    /// The job for a `block-job-*` command.
    pub fn find_block_job(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.get(id)
            .ok_or_else(|| JobError::BlockJobNotFound(id.to_string()))
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<Arc<Job>> {
        self.lock().clone()
    }
}

#[cfg(test)]
mod tests;

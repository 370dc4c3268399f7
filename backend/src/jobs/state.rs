//! QEMU's job state machine, table for table: the states (`JobStatus`), the
//! management verbs (`JobVerb`), the transition table (`JobSTT` in
//! qemu/job.c) and the verb table (`JobVerbTable`). Management tools decide
//! what they may send from `query-jobs`' status, so the tables must match
//! QEMU's exactly; the unit tests below spell every row out again.

use std::fmt;

/// A job's status (QAPI `JobStatus`), in QEMU's enum order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Erroneous, default state; never seen by a client.
    Undefined,
    /// Created but not started.
    Created,
    /// Working.
    Running,
    /// Paused while running (by the user or by an error with `stop`).
    Paused,
    /// Caught up: waiting for `complete` (mirror: keeps the target in sync).
    Ready,
    /// Paused while ready.
    Standby,
    /// Finished its work, waiting for the other jobs of its transaction.
    Waiting,
    /// Waiting for `job-finalize` (or finalizing automatically).
    Pending,
    /// Failed or cancelled, cleaning up.
    Aborting,
    /// Done; waiting for `job-dismiss` (or dismissed automatically).
    Concluded,
    /// Gone.
    Null,
}

/// Every status, in table order.
pub const ALL_STATUSES: [JobStatus; 11] = [
    JobStatus::Undefined,
    JobStatus::Created,
    JobStatus::Running,
    JobStatus::Paused,
    JobStatus::Ready,
    JobStatus::Standby,
    JobStatus::Waiting,
    JobStatus::Pending,
    JobStatus::Aborting,
    JobStatus::Concluded,
    JobStatus::Null,
];

impl JobStatus {
    /// The QAPI name (`"running"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// QEMU's `job_is_ready`: ready or standby.
    pub fn is_ready(self) -> bool {
        matches!(self, JobStatus::Ready | JobStatus::Standby)
    }

    /// QEMU's `job_is_completed`: the job's work is over.
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A management verb (QAPI `JobVerb`; `change` is QEMU 8.2's
/// `block-job-change`, which vubd offers on top of 7.2's set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobVerb {
    /// `job-cancel`, `block-job-cancel`.
    Cancel,
    /// `job-pause`, `block-job-pause`.
    Pause,
    /// `job-resume`, `block-job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete`, `block-job-complete`.
    Complete,
    /// `job-finalize`, `block-job-finalize`.
    Finalize,
    /// `job-dismiss`, `block-job-dismiss`.
    Dismiss,
    /// `block-job-change`.
    Change,
}

/// Every verb, in table order.
pub const ALL_VERBS: [JobVerb; 8] = [
    JobVerb::Cancel,
    JobVerb::Pause,
    JobVerb::Resume,
    JobVerb::SetSpeed,
    JobVerb::Complete,
    JobVerb::Finalize,
    JobVerb::Dismiss,
    JobVerb::Change,
];

impl JobVerb {
    /// The QAPI name (`"set-speed"`, ...), as used in QEMU's error message.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }
}

impl fmt::Display for JobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QEMU's `JobSTT`: row = from, column = to, in [`ALL_STATUSES`] order
/// (U, C, R, P, Y, S, W, D, X, E, N).
const STT: [[u8; 11]; 11] = [
    /* U: */ [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    /* C: */ [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
    /* R: */ [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    /* P: */ [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    /* Y: */ [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
    /* S: */ [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    /* W: */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
    /* D: */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* X: */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    /* E: */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    /* N: */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
];

/// QEMU's `JobVerbTable`: row = verb in [`ALL_VERBS`] order, column = state.
/// `change` has the row QEMU 8.2 gave it (the same as `set-speed`).
const VERBS: [[u8; 11]; 8] = [
    /*                 U, C, R, P, Y, S, W, D, X, E, N */
    /* cancel    */
    [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    /* pause     */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    /* resume    */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    /* set-speed */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    /* complete  */ [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    /* finalize  */ [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
    /* dismiss   */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
    /* change    */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
];

/// Whether QEMU allows the transition `from` -> `to`.
pub fn transition_allowed(from: JobStatus, to: JobStatus) -> bool {
    STT[from.index()][to.index()] != 0
}

/// Whether QEMU accepts `verb` in `status`.
pub fn verb_allowed(verb: JobVerb, status: JobStatus) -> bool {
    VERBS[verb as usize][status.index()] != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    fn allowed_targets(from: JobStatus) -> Vec<JobStatus> {
        ALL_STATUSES
            .into_iter()
            .filter(|&to| transition_allowed(from, to))
            .collect()
    }

    fn allowed_states(verb: JobVerb) -> Vec<JobStatus> {
        ALL_STATUSES
            .into_iter()
            .filter(|&s| verb_allowed(verb, s))
            .collect()
    }

    #[test]
    fn transition_table_is_qemus() {
        // Spelled out from qemu/job.c, row by row.
        assert_eq!(allowed_targets(Undefined), [Created]);
        assert_eq!(allowed_targets(Created), [Running, Aborting, Null]);
        assert_eq!(allowed_targets(Running), [Paused, Ready, Waiting, Aborting]);
        assert_eq!(allowed_targets(Paused), [Running]);
        assert_eq!(allowed_targets(Ready), [Standby, Waiting, Aborting]);
        assert_eq!(allowed_targets(Standby), [Ready]);
        assert_eq!(allowed_targets(Waiting), [Pending, Aborting]);
        assert_eq!(allowed_targets(Pending), [Aborting, Concluded]);
        assert_eq!(allowed_targets(Aborting), [Aborting, Concluded]);
        assert_eq!(allowed_targets(Concluded), [Null]);
        assert_eq!(allowed_targets(Null), []);
    }

    #[test]
    fn verb_table_is_qemus() {
        let live = [Created, Running, Paused, Ready, Standby];
        assert_eq!(
            allowed_states(JobVerb::Cancel),
            [Created, Running, Paused, Ready, Standby, Waiting, Pending]
        );
        assert_eq!(allowed_states(JobVerb::Pause), live);
        assert_eq!(allowed_states(JobVerb::Resume), live);
        assert_eq!(allowed_states(JobVerb::SetSpeed), live);
        assert_eq!(allowed_states(JobVerb::Complete), [Ready]);
        assert_eq!(allowed_states(JobVerb::Finalize), [Pending]);
        assert_eq!(allowed_states(JobVerb::Dismiss), [Concluded]);
        assert_eq!(allowed_states(JobVerb::Change), live);
    }

    #[test]
    fn names_and_predicates() {
        let names: Vec<&str> = ALL_STATUSES.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null"
            ]
        );
        let verbs: Vec<String> = ALL_VERBS.iter().map(|v| v.to_string()).collect();
        assert_eq!(
            verbs,
            [
                "cancel",
                "pause",
                "resume",
                "set-speed",
                "complete",
                "finalize",
                "dismiss",
                "change"
            ]
        );
        assert!(Ready.is_ready() && Standby.is_ready() && !Running.is_ready());
        assert!(!Standby.is_completed() && Waiting.is_completed() && Null.is_completed());
    }
}

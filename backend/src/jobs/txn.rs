//! Job transactions (QEMU's `JobTxn`): the jobs that one QMP `transaction`
//! with `completion-mode: grouped` started succeed together or not at all.
//!
//! A member whose work is done waits (`waiting`) until every member's work
//! is done; then all of them become `pending` together and, unless one
//! waits for `job-finalize`, finalize. A member that fails or is cancelled
//! cancels every other member at once, whatever they copied: none of their
//! results counts any more (QEMU's `job_completed_txn_abort`).
//!
//! Every group decision is taken under the transaction's lock, and each
//! member is claimed (its `finishing` flag) under its own lock inside it,
//! so a failure and the group's success can never both claim one member.
//! Lock order: transaction, then job.

use super::job::Job;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// The members of one grouped transaction.
#[derive(Debug, Default)]
pub struct JobTxn {
    state: Mutex<TxnState>,
}

#[derive(Debug, Default)]
struct TxnState {
    jobs: Vec<Weak<Job>>,
    aborting: bool,
}

/// What the group's lock decided a member's caller must do next.
pub(super) struct Claimed {
    /// Members to abort (claimed: their `finishing` is set).
    pub abort: Vec<Arc<Job>>,
    /// Running members to stop (forced cancel requested).
    pub stop: Vec<Arc<Job>>,
    /// Members to finalize (claimed).
    pub finalize: Vec<Arc<Job>>,
}

impl JobTxn {
    /// An empty transaction.
    pub fn new() -> Arc<JobTxn> {
        Arc::default()
    }

    /// Makes `job` (created, not yet started) a member.
    pub fn add(self: &Arc<Self>, job: &Arc<Job>) {
        job.join_txn(self.clone());
        self.lock().jobs.push(Arc::downgrade(job));
    }

    fn lock(&self) -> MutexGuard<'_, TxnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn members(st: &TxnState) -> Vec<Arc<Job>> {
        st.jobs.iter().filter_map(Weak::upgrade).collect()
    }

    /// `failed` failed or was cancelled: it and, the first time, every
    /// other member are to be aborted or stopped.
    pub(super) fn abort_from(&self, failed: &Arc<Job>) -> Claimed {
        let mut st = self.lock();
        let first = !st.aborting;
        st.aborting = true;
        let mut out = Claimed {
            abort: Vec::new(),
            stop: Vec::new(),
            finalize: Vec::new(),
        };
        if failed.claim_for_abort(false) {
            out.abort.push(failed.clone());
        }
        if first {
            for j in Self::members(&st) {
                if Arc::ptr_eq(&j, failed) {
                    continue;
                }
                match j.claim_for_abort(true) {
                    true => out.abort.push(j),
                    false if !j.is_deferred() => out.stop.push(j),
                    false => {}
                }
            }
        }
        out
    }

    /// `job`'s work is done: if every member's is, all become pending;
    /// those to finalize now are returned claimed.
    pub(super) fn member_done(&self) -> Claimed {
        let st = self.lock();
        let mut out = Claimed {
            abort: Vec::new(),
            stop: Vec::new(),
            finalize: Vec::new(),
        };
        let members = Self::members(&st);
        // A failing or cancelled member's abort claims everyone.
        if st.aborting || !members.iter().all(|j| j.is_waiting_ok()) {
            return out;
        }
        let auto = members.iter().all(|j| j.auto_finalizes());
        for j in &members {
            j.to_pending(auto);
        }
        if auto {
            out.finalize = members;
        }
        out
    }

    /// `job-finalize` on one member finalizes every pending member.
    pub(super) fn finalize_all(&self) -> Vec<Arc<Job>> {
        let st = self.lock();
        Self::members(&st)
            .into_iter()
            .filter(|j| j.claim_for_finalize())
            .collect()
    }
}

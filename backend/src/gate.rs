//! A gate that lets a block job pause guest I/O: stop new requests from
//! starting, wait for the ones in flight, do something (copy the last dirty
//! chunks, switch images), and let I/O resume.
//!
//! Queue workers hold the gate while they run requests and look at it
//! before each request they take (a load; entering costs two atomic
//! operations), so a pause waits for at most one request per queue (or
//! what the io_uring engine has in flight), not for a busy ring to drain.
//! A worker that finds the gate closed leaves its queues (and their vring
//! locks) first and only then waits ([`IoGate::wait_resumed`]): the
//! vhost-user control channel (GET_VRING_BASE) needs those locks, and the
//! frontend's main loop waits for its answer.
//!
//! Pausers may overlap (a block job's pivot, a QMP `transaction`): I/O
//! resumes when the last of them lets go.
//!
//! A pauser that cannot have the gate within a bound
//! ([`IoGate::pause_timeout`]) gives up and lets I/O go on, so a stuck
//! request does not freeze the other queues for longer than that bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Pause/resume control over guest I/O.
#[derive(Default)]
pub struct IoGate {
    /// Pausers holding (or waiting for) the gate.
    pausers: AtomicUsize,
    in_flight: AtomicUsize,
    /// Threads in [`IoGate::wait_resumed`] (changed under `lock`).
    waiting: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
}

/// Held by a queue worker while it runs a batch of requests.
pub struct BatchGuard<'a> {
    gate: &'a IoGate,
}

/// Held by whoever paused I/O; dropping the last one resumes I/O.
pub struct PauseGuard<'a> {
    gate: &'a IoGate,
}

impl IoGate {
    /// Enters the gate for a batch, waiting while I/O is paused. Callers
    /// that hold locks other threads need during a pause use
    /// [`IoGate::try_enter`] and wait without them.
    pub fn enter(&self) -> BatchGuard<'_> {
        loop {
            if let Some(batch) = self.try_enter() {
                return batch;
            }
            self.wait_resumed();
        }
    }

    /// Enters the gate unless I/O is paused (then `None`, at once).
    pub fn try_enter(&self) -> Option<BatchGuard<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if !self.is_paused() {
            return Some(BatchGuard { gate: self });
        }
        self.leave();
        None
    }

    /// Waits until I/O is not paused (returns at once if it is not).
    pub fn wait_resumed(&self) {
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if !self.is_paused() {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        while self.is_paused() {
            guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Threads waiting for the current pause to end (diagnostics; tests use
    /// it to know a worker has reached its wait).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    fn leave(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && self.is_paused() {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.changed.notify_all();
        }
    }

    /// Stops new batches and waits until none is running.
    pub fn pause(&self) -> PauseGuard<'_> {
        self.pausers.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        PauseGuard { gate: self }
    }

    /// [`IoGate::pause`], but gives up after `timeout` if batches are still
    /// running (a request stuck in slow storage): then I/O resumes at once
    /// and `None` is returned. New batches wait meanwhile, so `timeout`
    /// bounds how long the guest's other queues stall for nothing.
    pub fn pause_timeout(&self, timeout: Duration) -> Option<PauseGuard<'_>> {
        let deadline = Instant::now() + timeout;
        self.pausers.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            let now = Instant::now();
            if now >= deadline {
                self.pausers.fetch_sub(1, Ordering::SeqCst);
                self.changed.notify_all();
                return None;
            }
            guard = self
                .changed
                .wait_timeout(guard, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Some(PauseGuard { gate: self })
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.pausers.load(Ordering::SeqCst) != 0
    }
}

impl Drop for BatchGuard<'_> {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        let _guard = self.gate.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.gate.pausers.fetch_sub(1, Ordering::SeqCst);
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn pause_waits_for_batches_and_blocks_new_ones() {
        let gate = Arc::new(IoGate::default());
        let counter = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (gate, counter, stop) = (gate.clone(), counter.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _batch = gate.enter();
                        counter.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(50));
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(2));
            let pause = gate.pause();
            let seen = counter.load(Ordering::SeqCst);
            assert_eq!(seen % 2, 0, "a batch was still running while paused");
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(
                counter.load(Ordering::SeqCst),
                seen,
                "a batch ran while paused"
            );
            drop(pause);
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        assert!(counter.load(Ordering::SeqCst) > 0);
    }

    /// A pivot and a transaction may pause at the same time: the first to
    /// let go must not let I/O run under the other.
    #[test]
    fn overlapping_pausers_resume_io_only_when_the_last_lets_go() {
        let gate = IoGate::default();
        let first = gate.pause();
        let second = gate
            .pause_timeout(Duration::from_secs(60))
            .expect("no batch runs");
        drop(first);
        assert!(gate.is_paused());
        assert!(
            gate.try_enter().is_none(),
            "I/O ran under the second pauser"
        );
        drop(second);
        assert!(gate.try_enter().is_some());
    }

    #[test]
    fn pause_timeout_gives_up_on_a_stuck_batch_and_resumes() {
        let gate = IoGate::default();
        let stuck = gate.enter();
        assert!(gate.pause_timeout(Duration::from_millis(20)).is_none());
        assert!(!gate.is_paused(), "I/O must resume after a failed pause");
        assert!(gate.try_enter().is_some());
        drop(stuck);
        let pause = gate.pause_timeout(Duration::from_secs(60));
        assert!(pause.is_some());
        assert!(gate.try_enter().is_none());
        drop(pause);
        assert!(gate.try_enter().is_some());
    }
}

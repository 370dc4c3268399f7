//! A gate that lets a block job pause guest I/O: stop new requests from
//! starting, wait for the ones in flight, do something (copy the last dirty
//! chunks, switch images), and let I/O resume.
//!
//! Queue workers enter the gate once per batch of requests, not per
//! request, so the cost on the data path is two atomic operations a batch.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// Pause/resume control over guest I/O.
#[derive(Default)]
pub struct IoGate {
    paused: AtomicBool,
    in_flight: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
}

/// Held by a queue worker while it runs a batch of requests.
pub struct BatchGuard<'a> {
    gate: &'a IoGate,
}

/// Held by whoever paused I/O; dropping it resumes I/O.
pub struct PauseGuard<'a> {
    gate: &'a IoGate,
}

impl IoGate {
    /// Enters the gate for a batch, waiting while I/O is paused.
    pub fn enter(&self) -> BatchGuard<'_> {
        loop {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            if !self.paused.load(Ordering::SeqCst) {
                return BatchGuard { gate: self };
            }
            self.leave();
            let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            while self.paused.load(Ordering::SeqCst) {
                guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    fn leave(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 && self.paused.load(Ordering::SeqCst)
        {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.changed.notify_all();
        }
    }

    /// Stops new batches and waits until none is running. Only one pauser
    /// at a time is expected (block jobs serialize their pivots).
    pub fn pause(&self) -> PauseGuard<'_> {
        self.paused.store(true, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        PauseGuard { gate: self }
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
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
        self.gate.paused.store(false, Ordering::SeqCst);
        self.gate.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
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
}

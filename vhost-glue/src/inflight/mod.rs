//! In-flight request tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), so
//! that a restarted vubd neither loses nor repeats a request when requests
//! completed out of order before it died.
//!
//! The frontend restarts a queue at the guest's used index after a backend
//! crash. With out-of-order completions that index says how many requests
//! finished, not which: the entries of the avail ring behind it are a mix of
//! finished and unfinished requests. The shared region records, per head
//! descriptor, whether it is in flight and in what order it was fetched;
//! after a restart the backend first resubmits the heads still in flight in
//! fetch order, then continues at used index + in-flight count.

pub mod proxy;
pub mod queues;
pub mod region;

use region::Region;
use std::collections::VecDeque;
use std::sync::Arc;

/// Tracks one queue's requests in the shared region; lives on the thread
/// serving that queue.
pub struct QueueTracker {
    region: Arc<Region>,
    queue: u16,
    /// The next fetch counter; larger than every counter in the region.
    counter: u64,
    /// Heads to serve again before new ones, in fetch order.
    resubmit: VecDeque<u16>,
}

impl QueueTracker {
    /// A tracker of queue `queue` of `region`; None if the region has no
    /// such queue.
    pub fn new(region: Arc<Region>, queue: u16) -> Option<QueueTracker> {
        region.queue(queue)?;
        Some(QueueTracker {
            region,
            queue,
            counter: 1,
            resubmit: VecDeque::new(),
        })
    }

    /// Reconciles the region with the ring when the queue starts, given the
    /// used index in guest memory. Returns the avail index to continue at,
    /// or None when the region is fresh and the frontend's vring base holds.
    ///
    /// A crash between the used-ring update and clearing the head leaves
    /// the region's used index behind the ring's: that head (the last
    /// batch head) has completed and is not resubmitted.
    pub fn start(&mut self, guest_used_idx: u16) -> Option<u16> {
        let q = self.region.queue(self.queue)?;
        self.resubmit.clear();
        if q.version() == 0 {
            q.init(guest_used_idx);
            self.counter = 1;
            return None;
        }
        if q.used_idx() != guest_used_idx {
            q.clear_inflight(q.last_batch_head());
            q.set_used_idx(guest_used_idx);
        }
        let mut inflight: Vec<(u64, u16)> = (0..q.desc_num())
            .filter(|&h| q.is_inflight(h))
            .map(|h| (q.counter(h), h))
            .collect();
        inflight.sort_unstable();
        self.counter = inflight.last().map_or(0, |&(c, _)| c).saturating_add(1);
        // desc_num <= 32768, so the count fits a u16.
        let in_use = inflight.len() as u16;
        self.resubmit = inflight.into_iter().map(|(_, h)| h).collect();
        Some(guest_used_idx.wrapping_add(in_use))
    }

    /// The next head to serve again, in fetch order.
    pub fn next_resubmit(&mut self) -> Option<u16> {
        self.resubmit.pop_front()
    }

    /// Heads still waiting to be served again.
    pub fn resubmit_pending(&self) -> usize {
        self.resubmit.len()
    }

    /// Marks a head fetched from the avail ring as in flight. A resubmitted
    /// head is not fetched again: it keeps its mark and its counter.
    pub fn fetched(&mut self, head: u16) {
        if let Some(q) = self.region.queue(self.queue) {
            if q.set_inflight(head, self.counter) {
                self.counter += 1;
            }
        }
    }

    /// Call just before putting `head` into the used ring.
    pub fn completing(&self, head: u16) {
        if let Some(q) = self.region.queue(self.queue) {
            q.set_last_batch_head(head);
        }
    }

    /// Call right after the used ring (and its index, now `used_idx`) was
    /// updated for `head`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        if let Some(q) = self.region.queue(self.queue) {
            q.clear_inflight(head);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            q.set_used_idx(used_idx);
        }
    }
}

#[cfg(test)]
mod tests;

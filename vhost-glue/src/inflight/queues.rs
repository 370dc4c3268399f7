//! The device's side of in-flight tracking: pops requests (those to serve
//! again first) and puts them in the used ring in the order the spec asks,
//! keeping the shared region up to date.

use super::proxy::Slot;
use super::region::Region;
use super::QueueTracker;
use crate::request::GuestMemoryMmap;
use log::{info, warn};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// A popped request, over the memory its descriptors are read from.
pub type Chain = DescriptorChain<Arc<GuestMemoryMmap>>;

/// Bytes of an avail ring's header (flags, idx).
const AVAIL_HEADER: u64 = 4;

/// In-flight tracking of every queue of a session.
pub struct Tracking {
    slot: Arc<Slot>,
    queues: Vec<Mutex<QueueState>>,
}

#[derive(Default)]
struct QueueState {
    tracker: Option<QueueTracker>,
    /// The region `tracker` writes to (to notice the frontend replacing it).
    region: Option<Arc<Region>>,
    resubmit: Option<Resubmission>,
}

impl Tracking {
    /// Tracking of `num_queues` queues in the region the frontend puts in `slot`.
    pub fn new(slot: Arc<Slot>, num_queues: usize) -> Tracking {
        Tracking {
            slot,
            queues: (0..num_queues).map(|_| Mutex::default()).collect(),
        }
    }

    fn queue(&self, index: usize) -> Option<MutexGuard<'_, QueueState>> {
        self.queues
            .get(index)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Requests to serve on queue `index` (those to serve again, then the
    /// avail ring's); None if the ring is unusable. The first look at a
    /// ready queue with a region (new or replaced) reconciles the two:
    /// the avail position moves past the requests still in flight.
    pub fn available(&self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> Option<u16> {
        if !queue.ready() {
            return None;
        }
        let mut again = 0;
        if let Some(mut state) = self.queue(index) {
            let region = self.slot.get();
            let same = match (&region, &state.region) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                *state = QueueState::default();
                if let Some(region) = region {
                    start(index, &mut state, region, queue, mem);
                }
            }
            again = state.resubmit.as_ref().map_or(0, Resubmission::pending);
        }
        let idx = queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .ok()?;
        let count = idx.0.wrapping_sub(queue.next_avail());
        (count <= queue.size()).then_some(count.saturating_add(again))
    }

    /// Pops the next request of queue `index`: one to serve again first,
    /// else the avail ring's next, marked in flight.
    pub fn pop(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &Arc<GuestMemoryMmap>,
    ) -> Result<Option<Chain>, virtio_queue::Error> {
        let mut state = self.queue(index);
        if let Some(state) = state.as_deref_mut() {
            if let Some(chain) = state.resubmit.as_mut().and_then(Resubmission::next) {
                return Ok(Some(chain));
            }
            state.resubmit = None;
        }
        let chain = queue.iter(mem.clone())?.next();
        let tracker = state.as_deref_mut().and_then(|s| s.tracker.as_mut());
        if let (Some(chain), Some(tracker)) = (&chain, tracker) {
            tracker.fetched(chain.head_index());
        }
        Ok(chain)
    }

    /// Puts `head` in queue `index`'s used ring, recording the batch head
    /// before and clearing the head after, as the spec orders it.
    pub fn put_used(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        let state = self.queue(index);
        let tracker = state.as_ref().and_then(|s| s.tracker.as_ref());
        if let Some(t) = tracker {
            t.completing(head);
        }
        queue.add_used(mem, head, len)?;
        if let Some(t) = tracker {
            t.completed(head, queue.next_used());
        }
        Ok(())
    }
}

fn start(
    index: usize,
    state: &mut QueueState,
    region: Arc<Region>,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) {
    let Some(mut tracker) = u16::try_from(index)
        .ok()
        .and_then(|q| QueueTracker::new(region.clone(), q))
    else {
        warn!("queue {index}: not in the inflight region");
        state.region = Some(region);
        return;
    };
    let used = match queue.used_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(used) => used.0,
        Err(e) => {
            warn!("queue {index}: used index unreadable ({e}); not tracking");
            state.region = Some(region);
            return;
        }
    };
    if let Some(next_avail) = tracker.start(used) {
        let heads: Vec<u16> = std::iter::from_fn(|| tracker.next_resubmit()).collect();
        info!(
            "queue {index}: resuming at avail {next_avail} (used {used}), {} requests to serve again",
            heads.len()
        );
        queue.set_next_avail(next_avail);
        queue.set_next_used(used);
        if !heads.is_empty() {
            state.resubmit = Resubmission::new(queue, mem, &heads);
            if state.resubmit.is_none() {
                warn!("queue {index}: cannot serve the in-flight requests again");
            }
        }
    }
    state.tracker = Some(tracker);
    state.region = Some(region);
}

/// Requests to serve again, popped as descriptor chains: a private avail
/// ring listing their heads, mapped beside the guest's memory (the
/// virtio-queue crate makes chains only from an avail ring).
struct Resubmission {
    mem: Arc<GuestMemoryMmap>,
    queue: Queue,
    left: usize,
}

impl Resubmission {
    fn new(real: &Queue, mem: &GuestMemoryMmap, heads: &[u16]) -> Option<Resubmission> {
        let base = mem.last_addr().checked_add(1)?.checked_align_up(4096)?;
        let len = usize::try_from(AVAIL_HEADER).ok()? + 2 * usize::from(real.size()) + 2;
        let ring = vm_memory::GuestRegionMmap::<()>::from_range(base, len, None).ok()?;
        let ext = mem.insert_region(Arc::new(ring)).ok()?;
        let count = u16::try_from(heads.len()).ok()?;
        for (i, &head) in heads.iter().enumerate() {
            let slot = base.checked_add(AVAIL_HEADER + 2 * i as u64)?;
            ext.write_obj(head.to_le(), slot).ok()?;
        }
        ext.write_obj(count.to_le(), base.checked_add(2)?).ok()?;
        let mut queue = Queue::new(real.max_size()).ok()?;
        queue.set_size(real.size());
        queue
            .try_set_desc_table_address(GuestAddress(real.desc_table()))
            .ok()?;
        queue.try_set_avail_ring_address(base).ok()?;
        queue
            .try_set_used_ring_address(GuestAddress(real.used_ring()))
            .ok()?;
        queue.set_ready(true);
        Some(Resubmission {
            mem: Arc::new(ext),
            queue,
            left: heads.len(),
        })
    }

    fn pending(&self) -> u16 {
        u16::try_from(self.left).unwrap_or(u16::MAX)
    }

    fn next(&mut self) -> Option<Chain> {
        let chain = self.queue.iter(self.mem.clone()).ok()?.next()?;
        self.left = self.left.saturating_sub(1);
        Some(chain)
    }
}

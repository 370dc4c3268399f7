//! The vhost-user-blk device: feature negotiation, config space, and the
//! per-queue workers that pop requests from the guest's rings, run them on
//! the disk, and complete them.
//!
//! Each queue has its own worker thread and its own state behind its own
//! lock, so queues never wait for each other (vhost-user-backend's
//! `RwLock<VhostUserBackendMut>` adaptor would serialize them).

use crate::config_space::DeviceConfig;
use crate::request::{GuestMemoryMmap, RequestParser};
use log::{debug, warn};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringStateMutGuard, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vubd_backend::Disk;

/// Guest memory shared with the frontend, swappable as regions come and go.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
/// A virtqueue with its kick/call eventfds.
pub type Vring = VringMutex<GuestMemory>;

/// Per-queue state, owned by that queue's worker thread.
#[derive(Default)]
struct QueueWorker {
    parser: RequestParser,
    mem: Option<GuestMemory>,
}

/// One frontend session's vhost-user-blk device. A new one is made for each
/// connection; the `Disk` it serves outlives them all.
pub struct BlockDevice {
    disk: Arc<Disk>,
    cfg: DeviceConfig,
    workers: Vec<Mutex<QueueWorker>>,
    event_idx: AtomicBool,
    stopping: Arc<AtomicBool>,
}

impl BlockDevice {
    /// A device serving `disk` with `cfg`; `stopping` is raised at shutdown,
    /// after which no new request is taken from any queue.
    pub fn new(disk: Arc<Disk>, cfg: DeviceConfig, stopping: Arc<AtomicBool>) -> BlockDevice {
        let workers = (0..cfg.num_queues)
            .map(|_| Mutex::new(QueueWorker::default()))
            .collect();
        BlockDevice {
            disk,
            cfg,
            workers,
            event_idx: AtomicBool::new(false),
            stopping,
        }
    }

    fn worker(&self, index: usize) -> Option<MutexGuard<'_, QueueWorker>> {
        // A poisoned lock means a worker panicked mid-request; the state is
        // still usable (the parser is scratch space), so keep serving.
        self.workers
            .get(index)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until no queue is in the middle of a request. Call after raising
    /// `stopping`: from then on every request taken has been completed.
    pub fn quiesce(&self) {
        for index in 0..self.workers.len() {
            drop(self.worker(index));
        }
    }

    /// Serves queue `index` until it is empty (and, when polling, until it
    /// has stayed empty for the poll window), then re-arms notifications.
    fn serve_queue(&self, index: usize, vring: &Vring) {
        let Some(mut worker) = self.worker(index) else {
            return;
        };
        let Some(mem) = worker.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let poll = Duration::from_micros(self.cfg.poll_us);
        let mut state = vring.get_mut();
        loop {
            // Suppress kicks while we are looking at the ring anyway.
            if event_idx || !poll.is_zero() {
                if let Err(e) = state.disable_notification() {
                    debug!("queue {index}: cannot disable notifications: {e}");
                }
            }
            {
                // A block job may pause guest I/O (mirror pivot): wait here,
                // between batches, never in the middle of a request.
                let _batch = self.disk.gate().enter();
                self.drain(index, &mut state, &mem, &mut worker.parser);
            }
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if !poll.is_zero() && wait_for_work(&state, &mem, poll, &self.stopping) {
                continue;
            }
            if !(event_idx || !poll.is_zero()) {
                return;
            }
            // Re-enable kicks; if work slipped in meanwhile, go round again.
            match state.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    debug!("queue {index}: cannot enable notifications: {e}");
                    return;
                }
            }
        }
    }

    /// Runs every request currently available on the ring.
    fn drain(
        &self,
        index: usize,
        state: &mut <Vring as VringStateMutGuard<'_, GuestMemory>>::G,
        mem: &GuestMemoryMmap,
        parser: &mut RequestParser,
    ) {
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let chain = match state.get_queue_mut().iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    // Not ready, or a corrupted avail index: nothing we can
                    // take from this ring until the driver resets it.
                    debug!("queue {index}: {e}");
                    None
                }
            };
            let Some(chain) = chain else {
                return;
            };
            let head = chain.head_index();
            let done = parser.process(chain, mem, &self.disk, &self.cfg);
            if let Err(e) = state.get_queue_mut().add_used(mem, head, done.used_len) {
                warn!("queue {index}: cannot complete request {head}: {e}");
                continue;
            }
            match state.get_queue_mut().needs_notification(mem) {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    if let Err(e) = state.signal_used_queue() {
                        debug!("queue {index}: cannot signal the frontend: {e}");
                    }
                }
            }
        }
    }
}

/// Spins for up to `window` waiting for new requests; true if some arrived.
fn wait_for_work(
    state: &<Vring as VringStateMutGuard<'_, GuestMemory>>::G,
    mem: &GuestMemoryMmap,
    window: Duration,
    stopping: &AtomicBool,
) -> bool {
    let queue = state.get_queue();
    let deadline = Instant::now() + window;
    loop {
        match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) if idx.0 != queue.next_avail() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        if stopping.load(Ordering::Relaxed) || Instant::now() >= deadline {
            return false;
        }
        std::hint::spin_loop();
    }
}

impl VhostUserBackend for BlockDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        self.cfg.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.cfg
            .config_bytes(self.disk.writeback(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-back flag is writable (VIRTIO_BLK_F_CONFIG_WCE).
        match buf {
            [wce] if offset == DeviceConfig::wce_offset() => {
                debug!("write cache {}", if *wce != 0 { "on" } else { "off" });
                self.disk.set_writeback(*wce != 0);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only the writeback field of the config space is writable",
            )),
        }
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        // The atomic is shared: storing it once per worker is enough for
        // every later update to be seen.
        for index in 0..self.workers.len() {
            if let Some(mut w) = self.worker(index) {
                w.mem = Some(mem.clone());
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per thread: the thread index is the queue index and the
        // thread's only vring is event 0.
        if let Some(vring) = vrings.get(usize::from(device_event)) {
            self.serve_queue(thread_id, vring);
        }
        // Never return an error: it would end this queue's worker thread.
        Ok(())
    }
}

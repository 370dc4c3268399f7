//! Tests of the queue workers against the disk's I/O gate: a pause is
//! reached while a ring still has work, and a worker waiting for the end of
//! a pause holds no vring lock. A real device on in-memory virtqueues, with
//! a test image that parks a chosen write so the interleaving is forced.

use super::*;
use crate::config_space::AioEngine;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Condvar, Weak};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vubd_backend::image::ImageError;
use vubd_backend::IoBuf;

const DISK_SIZE: u64 = 1 << 20;
const QUEUE_SIZE: u16 = 64;
/// Requests put on the ring (3 descriptors each).
const REQUESTS: u16 = 12;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM_SIZE: usize = 0x100_0000;
/// Generous, only so that a broken build fails instead of hanging.
const HANG: Duration = Duration::from_secs(20);

#[derive(Default)]
struct ParkState {
    writes: usize,
    /// Writes that started while the disk's gate was paused.
    started_while_paused: usize,
    parked: bool,
    release: bool,
}

/// Counts writes; the `park_at`-th one waits until released.
struct ParkImage {
    disk: Weak<Disk>,
    park_at: usize,
    state: Mutex<ParkState>,
    cv: Condvar,
    path: PathBuf,
}

impl ParkImage {
    fn lock(&self) -> MutexGuard<'_, ParkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_parked(&self) {
        let deadline = Instant::now() + HANG;
        let mut st = self.lock();
        while !st.parked {
            assert!(Instant::now() < deadline, "no write reached the park");
            st = self.cv.wait_timeout(st, HANG).unwrap().0;
        }
    }

    fn release(&self) {
        self.lock().release = true;
        self.cv.notify_all();
    }
}

impl vubd_backend::Image for ParkImage {
    fn size(&self) -> u64 {
        DISK_SIZE
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn read_at(&self, _bufs: &[IoBuf], _offset: u64) -> Result<(), ImageError> {
        Ok(())
    }
    fn write_at(&self, _bufs: &[IoBuf], _offset: u64, _fua: bool) -> Result<(), ImageError> {
        let paused = self.disk.upgrade().is_some_and(|d| d.gate().is_paused());
        let mut st = self.lock();
        st.writes += 1;
        if paused {
            st.started_while_paused += 1;
        }
        if st.writes == self.park_at {
            st.parked = true;
            self.cv.notify_all();
            while !st.release {
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), ImageError> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), ImageError> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<(), ImageError> {
        Ok(())
    }
    fn allocated_bytes(&self) -> u64 {
        0
    }
}

/// A device with one queue holding `REQUESTS` 512-byte writes.
struct Rig {
    device: Arc<BlockDevice>,
    disk: Arc<Disk>,
    image: Arc<ParkImage>,
    vrings: Arc<Vec<Vring>>,
    mem: GuestMemory,
    used_ring: GuestAddress,
}

impl Rig {
    fn new(aio: AioEngine, park_at: usize) -> Rig {
        let mut image = None;
        let disk = Arc::new_cyclic(|weak| {
            let img = Arc::new(ParkImage {
                disk: weak.clone(),
                park_at,
                state: Mutex::new(ParkState::default()),
                cv: Condvar::new(),
                path: PathBuf::from("/park-image"),
            });
            image = Some(img.clone());
            Disk::new(Box::new(img), false)
        });
        let image = image.expect("image built");
        let cfg = DeviceConfig {
            size: DISK_SIZE,
            num_queues: 1,
            queue_size: QUEUE_SIZE,
            logical_block_size: 512,
            physical_block_size: 4096,
            read_only: false,
            serial: "gate".into(),
            poll_us: 0,
            aio,
            threads: 1,
            allow_unsealed_memory: false,
        };
        let device = Arc::new(BlockDevice::new(
            disk.clone(),
            cfg,
            Arc::new(AtomicBool::new(false)),
        ));
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        );
        let vring = Vring::new(mem.clone(), QUEUE_SIZE).unwrap();
        let used_ring = {
            let guard = mem.memory();
            let mock = MockSplitQueue::new(&*guard, QUEUE_SIZE);
            let mut descs = Vec::new();
            for i in 0..REQUESTS {
                let (hdr, data, status) = (
                    HDR + u64::from(i) * 16,
                    DATA + u64::from(i) * 512,
                    STATUS + u64::from(i),
                );
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
                h[8..16].copy_from_slice(&u64::from(i).to_le_bytes());
                guard.write_slice(&h, GuestAddress(hdr)).unwrap();
                let first = i * 3;
                let next = VRING_DESC_F_NEXT as u16;
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    hdr,
                    16,
                    next,
                    first + 1,
                )));
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    data,
                    512,
                    next,
                    first + 2,
                )));
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    status,
                    1,
                    VRING_DESC_F_WRITE as u16,
                    0,
                )));
            }
            mock.add_desc_chains(&descs, 0).unwrap();
            vring.set_queue_size(QUEUE_SIZE);
            vring
                .set_queue_info(
                    mock.desc_table_addr().0,
                    mock.avail_addr().0,
                    mock.used_addr().0,
                )
                .unwrap();
            mock.used_addr()
        };
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        device.update_memory(mem.clone()).unwrap();
        Rig {
            device,
            disk,
            image,
            vrings: Arc::new(vec![vring]),
            mem,
            used_ring,
        }
    }

    /// Requests completed so far: the used ring's index, read from guest
    /// memory (no vring lock; a new mock queue would reset the rings).
    fn used(&self) -> u16 {
        let idx = GuestAddress(self.used_ring.0 + 2);
        u16::from_le(self.mem.memory().read_obj(idx).unwrap())
    }

    /// Runs the worker's handler for a kick, as vhost-user-backend's epoll
    /// thread would.
    fn kick(&self) -> std::thread::JoinHandle<()> {
        let (device, vrings) = (self.device.clone(), self.vrings.clone());
        std::thread::spawn(move || {
            device
                .handle_event(0, EventSet::IN, &vrings, 0)
                .expect("handle_event");
        })
    }
}

fn engines() -> [(&'static str, AioEngine); 2] {
    [
        ("sync", AioEngine::Sync),
        (
            "io_uring",
            AioEngine::IoUring {
                inline_lone: false,
                inline_memory: false,
            },
        ),
    ]
}

/// A worker draining a busy ring stops taking requests once a pause has
/// begun: `pause()` returns with requests still on the ring, and no write
/// starts while paused; the rest are served after the resume.
#[test]
fn pause_is_reached_while_the_ring_still_has_work() {
    for (name, aio) in engines() {
        let rig = Rig::new(aio, 2);
        let worker = rig.kick();
        // The second request is at the disk: the worker is mid-drain.
        rig.image.wait_parked();
        let (tx, rx) = mpsc::channel();
        let disk = rig.disk.clone();
        let pauser = std::thread::spawn(move || {
            let pause = disk.gate().pause();
            tx.send(()).unwrap();
            // Held until the test has looked.
            std::thread::park();
            drop(pause);
        });
        let deadline = Instant::now() + HANG;
        while !rig.disk.gate().is_paused() {
            assert!(Instant::now() < deadline, "{name}: pause never began");
            std::thread::sleep(Duration::from_millis(1));
        }
        rig.image.release();
        rx.recv_timeout(HANG)
            .unwrap_or_else(|_| panic!("{name}: pause() never returned"));
        let (writes, while_paused) = {
            let st = rig.image.lock();
            (st.writes, st.started_while_paused)
        };
        let used = rig.used();
        assert_eq!(
            while_paused, 0,
            "{name}: {while_paused} writes started after the pause began"
        );
        assert!(
            used < REQUESTS,
            "{name}: pause() returned only after the ring was drained ({used} done)"
        );
        assert_eq!(writes, 2, "{name}: writes before the pause");
        pauser.thread().unpark();
        pauser.join().unwrap();
        worker.join().unwrap();
        assert_eq!(rig.used(), REQUESTS, "{name}: requests served after resume");
    }
}

/// While a worker waits for a pause to end, GET_VRING_BASE's path (stop
/// the ring under the vring lock, `stop_vring`, read the ring's base)
/// completes: the worker waits holding neither the vring lock nor its own.
#[test]
fn waiting_worker_holds_no_vring_lock() {
    for (name, aio) in engines() {
        let rig = Rig::new(aio, usize::MAX);
        let pause = rig.disk.gate().pause();
        let worker = rig.kick();
        let deadline = Instant::now() + HANG;
        while rig.disk.gate().waiting() == 0 {
            assert!(Instant::now() < deadline, "{name}: the worker never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = mpsc::channel();
        let (device, vrings) = (rig.device.clone(), rig.vrings.clone());
        let control = std::thread::spawn(move || {
            vrings[0].set_queue_ready(false);
            device.stop_vring(0).unwrap();
            tx.send(vrings[0].queue_next_avail()).unwrap();
        });
        let base = rx.recv_timeout(HANG);
        drop(pause);
        control.join().unwrap();
        worker.join().unwrap();
        assert_eq!(
            base.ok(),
            Some(0),
            "{name}: GET_VRING_BASE did not complete while the worker waited at the gate"
        );
        assert_eq!(rig.used(), 0, "{name}: nothing served on a stopped ring");
    }
}

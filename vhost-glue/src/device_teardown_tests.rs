//! Tests of the queue worker's teardown order.

use super::*;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vubd_backend::{Image, ImageError, IoBuf};

/// An image whose asynchronous fd is the read end of a pipe: a read on it
/// stays in flight until someone writes to the pipe.
struct PipeImage(OwnedFd);

impl Image for PipeImage {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn path(&self) -> &Path {
        Path::new("pipe")
    }
    fn read_at(&self, _: &[IoBuf], _: u64) -> Result<(), ImageError> {
        Ok(())
    }
    fn write_at(&self, _: &[IoBuf], _: u64, _: bool) -> Result<(), ImageError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), ImageError> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), ImageError> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), ImageError> {
        Ok(())
    }
    fn allocated_bytes(&self) -> u64 {
        0
    }
    fn async_fd(&self, _: &[IoBuf]) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

#[test]
fn guest_memory_outlives_an_engine_that_cannot_wait_for_its_requests() {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let disk = Disk::new(Box::new(PipeImage(rd)), false);
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).expect("guest memory"),
    );
    let mut snapshots = Pins::default();
    snapshots.refresh(
        |m: &Arc<GuestMemoryMmap>| Arc::ptr_eq(m, &mem),
        || mem.clone(),
    );
    let _pin = snapshots.pin();
    // A read into guest memory, in flight on the pipe.
    let Ok(mut engine) = UringEngine::new(4) else {
        eprintln!("SKIPPED: guest_memory_outlives_an_engine...: no io_uring here");
        return;
    };
    let host = mem
        .get_host_address(GuestAddress(0))
        .expect("mapped address");
    // SAFETY: guest memory that the test never unmaps (the check below
    // expects it to be leaked).
    let buf = unsafe { IoBuf::new(host, 4096) };
    // SAFETY: as above.
    unsafe { engine.read(&disk, 0, &[buf], 0) };
    engine.submit();
    let worker = Worker {
        parser: RequestParser::default(),
        mem: None,
        engine: Engine::Uring(Box::new(engine)),
        pending: Slab::default(),
        zeroing: Vec::new(),
        snapshots,
    };
    // The ring is single-issuer: on another thread the engine cannot wait
    // for the read, so the memory it reads into must stay mapped.
    let (dropped_tx, dropped) = std::sync::mpsc::channel();
    let dropper = std::thread::spawn(move || {
        drop(worker);
        let _ = dropped_tx.send(());
    });
    if dropped.recv_timeout(Duration::from_secs(30)).is_err() {
        // Only a ring set up without IORING_SETUP_SINGLE_ISSUER (an older
        // kernel) can wait here: the case under test cannot be made.
        drop(wr);
        dropper.join().unwrap();
        eprintln!("SKIPPED: guest_memory_outlives_an_engine...: io_uring without single-issuer");
        return;
    }
    dropper.join().unwrap();
    assert_eq!(
        Arc::strong_count(&mem),
        2,
        "guest memory released while the kernel may still write into it"
    );
    drop(wr);
}

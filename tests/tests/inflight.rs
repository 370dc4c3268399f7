//! In-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) over the
//! socket, with the raw frontend: the region vubd hands out has the spec's
//! split-ring layout and follows the requests it serves; regions a
//! frontend must not hand back (unsealed, too small) are refused without
//! harm to the session. The restart behaviour itself is in restart.rs.

use anyhow::{ensure, Context, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use tests::daemon::{create_image, Daemon, ScratchDir};
use tests::raw_frontend::{Options, RawFrontend};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;

fn u16_at(file: &File, offset: u64) -> Result<u16> {
    let mut b = [0u8; 2];
    file.read_exact_at(&mut b, offset)?;
    Ok(u16::from_le_bytes(b))
}

fn memfd(len: u64) -> Result<File> {
    // SAFETY: a NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
    ensure!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is fresh and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

#[test]
fn inflight_region_follows_requests_and_bad_regions_are_refused() -> Result<()> {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = ScratchDir::new_in("/dev/shm", "inflight")?;
    let (image, socket) = (dir.join("disk.img"), dir.join("vhost.sock"));
    create_image(&image, 16 << 20)?;
    let mut daemon = Daemon::vubd_sealed_only(&socket, &image, &[])?;
    let mut fe = RawFrontend::connect(&socket, Options::default())?;
    ensure!(
        fe.protocol_features()
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "INFLIGHT_SHMFD not offered"
    );
    let qsize = fe.queue_size(0)?;

    // A geometry the backend cannot serve: no descriptor comes back.
    let zero = VhostUserInflight::new(0, 0, 0, qsize);
    ensure!(
        fe.vhost().get_inflight_fd(&zero).is_err(),
        "0 queues accepted"
    );
    // Regions the frontend could shrink, or smaller than the geometry.
    let unsealed = memfd(1 << 20)?;
    let asked = VhostUserInflight::new(1 << 20, 0, 1, qsize);
    let res = fe.vhost().set_inflight_fd(&asked, unsealed.as_raw_fd());
    ensure!(res.is_err(), "unsealed inflight memfd accepted");
    let one = VhostUserInflight::new(0, 0, 1, qsize);
    let (given, region) = fe
        .vhost()
        .get_inflight_fd(&one)
        .context("GET_INFLIGHT_FD")?;
    let short = VhostUserInflight::new(64, 0, 1, qsize);
    ensure!(
        fe.vhost()
            .set_inflight_fd(&short, region.as_raw_fd())
            .is_err(),
        "a region too small for its queues accepted"
    );
    fe.write(0, &[0x5a; 4096])?;

    // The real thing: the region vubd gave, handed back.
    ensure!(
        given.mmap_size >= 16 + 16 * u64::from(qsize) && given.num_queues == 1,
        "GET_INFLIGHT_FD answered {} bytes for {} queues",
        given.mmap_size,
        given.num_queues
    );
    fe.vhost()
        .set_inflight_fd(&given, region.as_raw_fd())
        .context("SET_INFLIGHT_FD")?;
    for i in 0..5u64 {
        fe.write(8 * i, &[i as u8; 4096])?;
    }
    ensure!(
        fe.read(8, 4096)? == vec![1u8; 4096],
        "data read back differs"
    );
    ensure!(u16_at(&region, 8)? == 1, "region version not set");
    ensure!(
        u16_at(&region, 10)? == qsize,
        "desc_num is not the queue size"
    );
    let used = fe.used_idx(0)?;
    ensure!(
        u16_at(&region, 14)? == used,
        "region used_idx {} vs ring {used}",
        u16_at(&region, 14)?
    );
    let mut flags = vec![0u8; 16 * usize::from(qsize)];
    region.read_exact_at(&mut flags, 16)?;
    ensure!(
        flags.chunks(16).all(|d| d[0] == 0),
        "a completed request is still marked in flight"
    );
    ensure!(daemon.try_wait()?.is_none(), "vubd died");
    Ok(())
}

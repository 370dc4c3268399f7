//! The flush latch on a device whose writeback really fails: a loop device
//! over a sparse file on a tmpfs far too small for it. Writes land in the
//! loop device's page cache; writeback hits ENOSPC in the backing file, the
//! kernel drops the pages and reports EIO to one `fdatasync` only, after
//! which `fdatasync` succeeds again. Every later flush must fail instead:
//! through `Disk::flush`, through the io_uring engine's asynchronous
//! fdatasync, and for a mirror's target (no pivot onto lost data).
//!
//! Needs root (mount, losetup); without it each test says it skipped.

#[path = "mirror_util.rs"]
mod util;

use anyhow::{bail, ensure, Result};
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use util::*;
use vubd_backend::disk::uring::UringEngine;
use vubd_backend::jobs::OnError;
use vubd_backend::mirror::manager::TargetMode;
use vubd_backend::mirror::MirrorRequest;
use vubd_backend::{Disk, Image, IoBuf, RawImage, RawImageOptions};

const DEV_SIZE: u64 = 16 * MIB;

/// A loop device over a 16 MiB sparse file on a 256 KiB tmpfs.
struct FailingDev {
    mount: PathBuf,
    dev: PathBuf,
}

impl FailingDev {
    /// None (after saying so) where loop devices or mounts are not allowed.
    fn new(tag: &str) -> Option<FailingDev> {
        let mount = std::env::temp_dir().join(format!("vubd-latch-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&mount).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
            .arg(&mount)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("SKIPPED: cannot mount a tmpfs (needs root)");
            let _ = std::fs::remove_dir(&mount);
            return None;
        }
        let backing = mount.join("backing");
        let dev = std::fs::File::create(&backing)
            .and_then(|f| f.set_len(DEV_SIZE))
            .ok()
            .and_then(|()| {
                Command::new("losetup")
                    .args(["-f", "--show"])
                    .arg(&backing)
                    .output()
                    .ok()
            })
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        let Some(dev) = dev else {
            eprintln!("SKIPPED: cannot set up a loop device (needs root and losetup)");
            let _ = Command::new("umount").arg(&mount).status();
            let _ = std::fs::remove_dir(&mount);
            return None;
        };
        Some(FailingDev { mount, dev })
    }

    fn open(&self) -> Result<RawImage> {
        Ok(RawImage::open(&self.dev, RawImageOptions::default())?)
    }
}

impl Drop for FailingDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}

/// Writes 2 MiB (far more than the backing tmpfs holds) through `disk`.
fn fill(disk: &Disk) -> Result<()> {
    let mut data = pattern(1, 1, 2 * MIB as usize);
    disk.write(0, &[IoBuf::from_slice(&mut data)])?;
    Ok(())
}

#[test]
fn a_failed_fdatasync_fails_every_later_flush() -> Result<()> {
    let Some(dev) = FailingDev::new("sync") else {
        return Ok(());
    };
    let disk = Disk::new(Box::new(dev.open()?), false);
    fill(&disk)?;
    ensure!(disk.flush().is_err(), "writeback cannot have succeeded");
    // The kernel has reported its error; a plain fdatasync now succeeds.
    ensure!(
        disk.flush().is_err(),
        "a flush after a failed flush succeeded"
    );
    let mut more = pattern(2, 1, 4096);
    disk.write(4 * MIB, &[IoBuf::from_slice(&mut more)])?;
    ensure!(disk.flush().is_err(), "the latch went away after a write");
    Ok(())
}

#[test]
fn a_failed_write_through_write_fails_every_later_flush() -> Result<()> {
    let Some(dev) = FailingDev::new("wt") else {
        return Ok(());
    };
    let disk = Disk::new(Box::new(dev.open()?), false);
    // Its sync half reports the writeback error, which the next fdatasync
    // then no longer sees.
    disk.set_writeback(false);
    ensure!(fill(&disk).is_err(), "write-through cannot have succeeded");
    disk.set_writeback(true);
    ensure!(
        disk.flush().is_err(),
        "a flush after a failed write-through write succeeded"
    );
    Ok(())
}

#[test]
fn a_failed_io_uring_write_through_write_fails_every_later_flush() -> Result<()> {
    let Some(dev) = FailingDev::new("uring-wt") else {
        return Ok(());
    };
    let disk = Disk::new(Box::new(dev.open()?), false);
    let mut engine = UringEngine::new(8)?;
    disk.set_writeback(false);
    let mut data = pattern(1, 1, 2 * MIB as usize);
    // SAFETY: `data` outlives the reaping below.
    unsafe { engine.write(&disk, 0, &[IoBuf::from_slice(&mut data)], 3) };
    let t0 = Instant::now();
    let mut result = None;
    while result.is_none() {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "write never completed"
        );
        engine.wait(&[], Some(Duration::from_millis(100)));
        engine.reap(&disk, |_, r| result = Some(r.is_ok()));
    }
    ensure!(result == Some(false), "write-through cannot have succeeded");
    disk.set_writeback(true);
    ensure!(
        !engine_flush(&mut engine, &disk)?,
        "a flush after a failed write-through write succeeded"
    );
    Ok(())
}

/// Submits a flush on `engine` and waits for its result.
fn engine_flush(engine: &mut UringEngine, disk: &Disk) -> Result<bool> {
    engine.flush(disk, 7);
    let t0 = Instant::now();
    let mut result = None;
    while result.is_none() {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "flush never completed"
        );
        engine.wait(&[], Some(Duration::from_millis(100)));
        engine.reap(disk, |token, r| {
            assert_eq!(token, 7);
            result = Some(r.is_ok());
        });
    }
    Ok(result.unwrap_or(false))
}

#[test]
fn a_failed_io_uring_fdatasync_fails_every_later_flush() -> Result<()> {
    let Some(dev) = FailingDev::new("uring") else {
        return Ok(());
    };
    let disk = Disk::new(Box::new(dev.open()?), false);
    let mut engine = UringEngine::new(8)?;
    fill(&disk)?;
    ensure!(
        !engine_flush(&mut engine, &disk)?,
        "writeback cannot have succeeded"
    );
    ensure!(
        !engine_flush(&mut engine, &disk)?,
        "an io_uring flush after a failed one succeeded"
    );
    // One latch per image, whichever path flushes.
    ensure!(disk.flush().is_err(), "the synchronous flush forgot it");
    Ok(())
}

#[test]
fn a_failed_synchronous_fdatasync_fails_later_io_uring_flushes() -> Result<()> {
    let Some(dev) = FailingDev::new("mixed") else {
        return Ok(());
    };
    let disk = Disk::new(Box::new(dev.open()?), false);
    let mut engine = UringEngine::new(8)?;
    fill(&disk)?;
    ensure!(disk.flush().is_err(), "writeback cannot have succeeded");
    ensure!(
        !engine_flush(&mut engine, &disk)?,
        "an io_uring flush after a failed flush succeeded"
    );
    Ok(())
}

#[test]
fn a_mirror_never_gets_ready_on_a_target_whose_flush_failed() -> Result<()> {
    let Some(dev) = FailingDev::new("mirror") else {
        return Ok(());
    };
    let dir = Scratch::new("latch");
    let src = dir.join("src.img");
    make_image(&src, DEV_SIZE, 2)?;
    let rig = Rig::new(&src)?;
    let target: Arc<dyn Image> = Arc::new(dev.open()?);
    let mut req = MirrorRequest::new("disk0", &dev.dev, "full");
    req.job_id = Some("m".into());
    req.mode = TargetMode::Existing;
    req.on_target_error = OnError::Ignore;
    let job = rig
        .manager
        .start_to(req, target)
        .map_err(|e| anyhow::anyhow!(e.desc))?;
    // The copy fills the target's page cache; its flush fails, and under
    // `ignore` it is retried. Without the latch the retry succeeds (the
    // kernel reported the loss once) and the job gets ready.
    let mut seen = Vec::new();
    let t0 = Instant::now();
    loop {
        seen.extend(rig.event_names());
        if seen.iter().any(|n| n == "ready" || n == "BLOCK_JOB_READY") {
            bail!("the mirror got ready on a target that lost data: {seen:?}");
        }
        let errors = seen.iter().filter(|n| *n == "ERROR:write:ignore").count();
        if errors >= 2 {
            break;
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "no second flush error: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let refused = rig.qmp("job-complete", json!({"id": "m"}));
    ensure!(refused.is_err(), "job-complete accepted: {refused:?}");
    rig.qmp("block-job-cancel", json!({"device": "m", "force": true}))
        .map_err(anyhow::Error::msg)?;
    job.wait_for(
        &[vubd_backend::jobs::JobStatus::Null],
        Duration::from_secs(30),
    );
    ensure!(rig.disk.image().path() == src, "the disk left its source");
    Ok(())
}

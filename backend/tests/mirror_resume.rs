//! Resuming an interrupted mirror from its persistent state. The "crash" is
//! simulated in-process: the first daemon's job is frozen (paused) and
//! forgotten, and a second `Disk` + `MirrorManager` is opened on the same
//! image, as a restarted daemon would. (tests/tests/mirror.rs does the same
//! with kill -9 of a real vubd.)

#[path = "mirror_util.rs"]
mod util;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use util::*;
use vubd_backend::jobs::JobStatus;
use vubd_backend::mirror::state_file::{boot_id, sidecar_path, StateFile, StateHeader};
use vubd_backend::{Disk, DiskError, IoBuf, WriteHook};

const T: Duration = Duration::from_secs(30);

#[test]
fn resume_copies_only_what_is_dirty_including_writes_before_the_resume() -> Result<()> {
    let dir = Scratch::new("resume");
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 32 * MIB;
    let mut model = make_image(&src, size, 1)?;

    // First life: copy part of the disk, slowly, then "crash".
    let first = Rig::new(&src)?;
    first
        .qmp("drive-mirror", json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "speed": 2 * MIB, "job-id": "m"}))
        .map_err(anyhow::Error::msg)?;
    let job = first.job("m")?;
    // Until 4 MiB are copied (two seconds; 24 MiB would take ten more).
    let t0 = std::time::Instant::now();
    while first.block_job()?["offset"].as_u64().unwrap_or(0) < 4 * MIB {
        ensure!(t0.elapsed() < T, "the first life never copied 4 MiB");
        std::thread::sleep(Duration::from_millis(10));
    }
    first
        .qmp("job-pause", json!({"id": "m"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Paused, T)?;
    let copied = first.block_job()?["offset"].as_u64().context("offset")?;
    ensure!(
        (4 * MIB..24 * MIB).contains(&copied),
        "copied {copied} bytes before the crash"
    );
    ensure!(dir.join("src.img.vubd-mirror").exists());
    std::mem::forget(first);
    close_fds_of(&tgt.canonicalize()?)?;

    // Second life: the state is found and tracks writes at once.
    let second = Rig::new(&src)?;
    ensure!(
        second.manager.pending_resume() == Some(tgt.canonicalize()?),
        "pending resume: {:?}",
        second.manager.pending_resume()
    );
    // A guest write into the part copied before the crash, before the resume.
    let data = pattern(3, 3, 65536);
    {
        let mut buf = data.clone();
        let _b = second.disk.gate().enter();
        second.disk.write(MIB, &[IoBuf::from_slice(&mut buf)])?;
    }
    model[MIB as usize..(MIB + 65536) as usize].copy_from_slice(&data);

    // Wrong resumes are refused.
    let other = dir.join("other.img");
    std::fs::File::create(&other)?.set_len(size)?;
    assert_eq!(
        second
            .qmp("drive-mirror", json!({"device": "disk0", "target": other.to_str(), "sync": "full", "x-resume": true}))
            .unwrap_err(),
        format!(
            "The interrupted mirror of 'disk0' was to '{}', not '{}'",
            tgt.canonicalize()?.display(),
            other.display()
        )
    );
    assert_eq!(
        second
            .qmp("drive-mirror", json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "mode": "absolute-paths", "x-resume": true}))
            .unwrap_err(),
        "x-resume needs mode 'existing' (the target already holds the copy)"
    );

    second
        .qmp("drive-mirror", json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "job-id": "m", "x-resume": true}))
        .map_err(anyhow::Error::msg)?;
    let job = second.job("m")?;
    wait_status(&job, JobStatus::Ready, T)?;
    let len = second.block_job()?["len"].as_u64().context("len")?;
    // What was copied before the last checkpoint is not copied again; the
    // chunk written before the resume is.
    ensure!(
        len <= size - copied + 4 * MIB && len < size - 2 * MIB,
        "resume copied {len} bytes; {copied} of {size} were done before the crash"
    );
    ensure!(len >= 64 * KIB, "resume copied nothing");
    second
        .qmp("job-complete", json!({"id": "m"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    compare_file(&tgt, &model)?;
    ensure!(
        !dir.join("src.img.vubd-mirror").exists(),
        "state left after completion"
    );
    eprintln!("copied {copied} bytes before the crash, {len} after the resume");
    Ok(())
}

#[test]
fn a_new_mirror_discards_an_interrupted_one() -> Result<()> {
    let dir = Scratch::new("discard");
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let model = make_image(&src, 8 * MIB, 1)?;
    let first = Rig::new(&src)?;
    first
        .qmp("drive-mirror", json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "speed": MIB, "job-id": "a"}))
        .map_err(anyhow::Error::msg)?;
    std::thread::sleep(Duration::from_millis(100));
    std::mem::forget(first);
    let second = Rig::new(&src)?;
    ensure!(second.manager.pending_resume().is_some());
    let tgt2 = dir.join("tgt2.img");
    second
        .qmp(
            "drive-mirror",
            json!({"device": "disk0", "target": tgt2.to_str(), "sync": "full", "job-id": "b"}),
        )
        .map_err(anyhow::Error::msg)?;
    ensure!(second.manager.pending_resume().is_none());
    let job = second.job("b")?;
    wait_status(&job, JobStatus::Ready, T)?;
    second
        .qmp("job-complete", json!({"id": "b"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    compare_file(&tgt2, &model)?;
    Ok(())
}

/// The state of a mirror of `src` to `tgt` interrupted with the target in
/// sync: `tgt` is a copy of `src`, nothing is marked dirty.
fn interrupted_in_sync(src: &Path, tgt: &Path) -> Result<()> {
    std::fs::copy(src, tgt)?;
    let header = StateHeader {
        disk_size: std::fs::metadata(src)?.len(),
        granularity: 64 * KIB,
        target: tgt.canonicalize()?,
        boot_id: boot_id(),
    };
    drop(StateFile::create(&sidecar_path(src), header)?);
    Ok(())
}

/// A write hook placed before the resume tracker that holds the first
/// write after `arm` between its start (its hook list is fixed) and the
/// tracker's mark, until `release` or until someone pauses guest I/O (a
/// pause waits for the writes in flight, so it must let this one go on).
struct Park {
    disk: Weak<Disk>,
    armed: AtomicBool,
    parked: AtomicBool,
    release: AtomicBool,
}

impl WriteHook for Park {
    fn before_write(&self, _offset: u64, _len: u64) -> std::result::Result<(), DiskError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.parked.store(true, Ordering::SeqCst);
            let t0 = Instant::now();
            while !self.release.load(Ordering::SeqCst)
                && !self.disk.upgrade().is_some_and(|d| d.gate().is_paused())
                && t0.elapsed() < T
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

fn complete_and_compare(rig: &Rig, id: &str, tgt: &Path, model: &[u8]) -> Result<()> {
    let job = rig.job(id)?;
    wait_status(&job, JobStatus::Ready, T)?;
    rig.qmp("job-complete", json!({"id": id}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    compare_file(tgt, model)
}

/// A guest write that has started (before the resume command) but marks
/// the persistent bitmap only while `x-resume` installs the mirror: it
/// must reach the target. Before the fix the job took P into D first and
/// installed its hook later, and its first checkpoint (P := D) erased such
/// a write: the target lacked it, by construction of this interleaving.
#[test]
fn a_write_in_flight_while_x_resume_starts_reaches_the_target() -> Result<()> {
    let dir = Scratch::new("resume-window");
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let mut model = make_image(&src, 4 * MIB, 1)?;
    interrupted_in_sync(&src, &tgt)?;
    let disk = open_disk(&src)?;
    let park = Arc::new(Park {
        disk: Arc::downgrade(&disk),
        armed: AtomicBool::new(true),
        parked: AtomicBool::new(false),
        release: AtomicBool::new(false),
    });
    disk.add_hook(park.clone());
    let rig = Rig::with_disk(disk.clone(), &src)?;
    ensure!(rig.manager.pending_resume().is_some(), "no pending resume");

    let (off, data) = (2 * MIB + 4096, pattern(77, 1, 4096));
    let writer = {
        let (disk, mut buf) = (disk.clone(), data.clone());
        std::thread::spawn(move || -> Result<()> {
            let _batch = disk.gate().enter();
            disk.write(off, &[IoBuf::from_slice(&mut buf)])?;
            Ok(())
        })
    };
    let t0 = Instant::now();
    while !park.parked.load(Ordering::SeqCst) {
        ensure!(t0.elapsed() < T, "the write never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "r", "x-resume": true}),
    )
    .map_err(anyhow::Error::msg)?;
    park.release.store(true, Ordering::SeqCst);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    complete_and_compare(&rig, "r", &tgt, &model)
}

/// Guest writers keep going while `x-resume` starts, and stop soon after
/// (so that a write lost at the start is not covered by a later write to
/// its chunk): the target ends equal to what they last wrote. (The forced
/// interleaving above is the deterministic test; this one is the load.)
#[test]
fn writes_running_while_x_resume_starts_all_reach_the_target() -> Result<()> {
    for round in 0..3 {
        let dir = Scratch::new("resume-load");
        let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
        let size = 64 * MIB;
        let model = make_image(&src, size, 1)?;
        interrupted_in_sync(&src, &tgt)?;
        let rig = Rig::new(&src)?;
        // Paced, so that few chunks are dirty when the resume starts: a
        // write lost then is most likely the only one on its chunk.
        let pace = Some(Duration::from_micros(20));
        let writers = Writers::start(&rig.disk, model, 2, 4096, size, true, pace);
        std::thread::sleep(Duration::from_millis(2));
        rig.qmp(
            "drive-mirror",
            json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "r", "x-resume": true}),
        )
        .map_err(anyhow::Error::msg)?;
        let (writes, model) = writers.stop()?;
        complete_and_compare(&rig, "r", &tgt, &model)
            .with_context(|| format!("round {round}, {writes} writes"))?;
    }
    Ok(())
}

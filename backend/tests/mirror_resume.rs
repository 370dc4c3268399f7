//! Resuming an interrupted mirror from its persistent state. The "crash" is
//! simulated in-process: the first daemon's job is frozen (paused) and
//! forgotten, and a second `Disk` + `MirrorManager` is opened on the same
//! image, as a restarted daemon would. (tests/tests/mirror.rs does the same
//! with kill -9 of a real vubd.)

#[path = "mirror_util.rs"]
mod util;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::time::Duration;
use util::*;
use vubd_backend::jobs::JobStatus;
use vubd_backend::IoBuf;

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
            .qmp("blockdev-mirror", json!({"device": "disk0", "target": other.to_str(), "sync": "full", "x-resume": true}))
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
        .qmp("blockdev-mirror", json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "job-id": "m", "x-resume": true}))
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

//! The mirror job on a real disk (raw files on /dev/shm, `Disk` with its
//! gate, the QMP commands through a dispatcher), without vhost: life cycle
//! and events, sync modes, sparseness, the pivot, cancel, speed, pause and
//! QEMU's argument errors.

#[path = "mirror_util.rs"]
mod util;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::time::{Duration, Instant};
use util::*;
use vubd_backend::jobs::JobStatus;
use vubd_backend::IoBuf;

const T: Duration = Duration::from_secs(30);

fn read_disk(rig: &Rig, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    rig.disk.read(off, &[IoBuf::from_slice(&mut buf)])?;
    Ok(buf)
}

fn write_disk(rig: &Rig, off: u64, data: &[u8]) -> Result<()> {
    let mut buf = data.to_vec();
    let _b = rig.disk.gate().enter();
    rig.disk.write(off, &[IoBuf::from_slice(&mut buf)])?;
    Ok(())
}

/// The status changes and events of a job that became READY and completed
/// (QEMU's sequence).
const READY_THEN_COMPLETED: [&str; 9] = [
    "created",
    "running",
    "ready",
    "BLOCK_JOB_READY",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
];

#[test]
fn full_mirror_pivots_keeps_sparse_and_leaves_source_alone() -> Result<()> {
    let dir = Scratch::new("full");
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 64 * MIB;
    let mut model = make_image(&src, size, 2)?;
    let rig = Rig::new(&src)?;
    rig.qmp("drive-mirror", json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "format": "raw", "job-id": "m"}))
        .map_err(anyhow::Error::msg)?;
    let job = rig.job("m")?;
    wait_status(&job, JobStatus::Ready, T)?;
    let info = rig.block_job()?;
    assert_eq!(info["len"], json!(size));
    assert_eq!(info["offset"], json!(size));
    assert_eq!(info["ready"], json!(true));
    assert_eq!(info["type"], json!("mirror"));
    assert_eq!(info["actively-synced"], json!(false));
    assert_eq!(info["io-status"], json!("ok"));
    // Half the source is holes, and so is the target.
    let (sa, ta) = (allocated(&src), allocated(&tgt));
    ensure!(ta <= sa + MIB, "target allocates {ta} bytes, source {sa}");
    ensure!(ta >= 32 * MIB, "target allocates only {ta} bytes");
    ensure!(
        dir.join("src.img.vubd-mirror").exists(),
        "no persistent state while running"
    );

    // Guest writes in READY are mirrored, then complete.
    write_disk(&rig, 5 * MIB + 4096, &pattern(7, 7, 8192))?;
    model[(5 * MIB + 4096) as usize..(5 * MIB + 4096 + 8192) as usize]
        .copy_from_slice(&pattern(7, 7, 8192));
    let src_before = std::fs::read(&src)?;
    rig.qmp("job-complete", json!({"id": "m"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    assert_eq!(rig.event_names(), READY_THEN_COMPLETED);
    ensure!(
        rig.disk.image().path() == tgt,
        "the disk still uses {:?}",
        rig.disk.image().path()
    );
    compare_file(&tgt, &model)?;
    ensure!(
        !dir.join("src.img.vubd-mirror").exists(),
        "state file left behind"
    );

    // After the pivot the guest writes to the target only; reads come from it.
    write_disk(&rig, 0, &[0xabu8; 4096])?;
    ensure!(
        std::fs::read(&src)? == src_before,
        "the source changed after the pivot"
    );
    assert_eq!(read_disk(&rig, 0, 4096)?, vec![0xabu8; 4096]);
    let mut f = std::fs::OpenOptions::new().write(true).open(&tgt)?;
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(8192))?;
    f.write_all(&[0x5a; 512])?;
    drop(f);
    assert_eq!(
        read_disk(&rig, 8192, 512)?,
        vec![0x5a; 512],
        "reads do not come from the target"
    );
    Ok(())
}

#[test]
fn sync_top_copies_the_whole_disk_and_none_only_new_writes() -> Result<()> {
    let dir = Scratch::new("top");
    let src = dir.join("src.img");
    let size = 32 * MIB;
    let model = make_image(&src, size, 4)?;
    let rig = Rig::new(&src)?;
    let tgt = dir.join("top.img");
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt.to_str(), "sync": "top"}),
    )
    .map_err(anyhow::Error::msg)?;
    // The job id defaults to the device.
    let job = rig.job("disk0")?;
    wait_status(&job, JobStatus::Ready, T)?;
    // A raw disk has no backing file: top is the whole disk, as in QEMU.
    assert_eq!(
        rig.block_job()?["len"],
        json!(size),
        "top goes over the whole disk"
    );
    rig.qmp("block-job-complete", json!({"device": "disk0"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    compare_file(&tgt, &model)?;

    // sync none on the new active image (the top target): only new writes.
    let rig = Rig::new(&tgt)?;
    let none = dir.join("none.img");
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": none.to_str(), "sync": "none", "job-id": "n"}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job("n")?;
    wait_status(&job, JobStatus::Ready, T)?;
    assert_eq!(rig.block_job()?["len"], json!(0));
    write_disk(&rig, 3 * MIB, &pattern(1, 2, 4096))?;
    // Its chunk is copied (once, or twice if a copy raced the write).
    let t0 = Instant::now();
    loop {
        let info = rig.block_job()?;
        let done = info["offset"].as_u64().unwrap_or(0);
        if done >= 64 * KIB && info["len"] == info["offset"] {
            ensure!(done <= 128 * KIB, "copied {done} bytes for one 4 KiB write");
            break;
        }
        ensure!(t0.elapsed() < T, "the new write was not copied: {info}");
        std::thread::sleep(Duration::from_millis(5));
    }
    rig.qmp("job-complete", json!({"id": "n"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    let got = std::fs::read(&none)?;
    let mut expect = vec![0u8; size as usize];
    // The whole 64 KiB chunk of the write is copied, with what was there.
    let chunk = (3 * MIB) as usize..(3 * MIB + 64 * KIB) as usize;
    expect[chunk.clone()].copy_from_slice(&model[chunk]);
    expect[(3 * MIB) as usize..(3 * MIB + 4096) as usize].copy_from_slice(&pattern(1, 2, 4096));
    ensure!(
        got == expect,
        "sync none copied more (or less) than the new write's chunk"
    );
    Ok(())
}

#[test]
fn cancel_before_ready_and_soft_and_forced_cancel_after_ready() -> Result<()> {
    let dir = Scratch::new("cancel");
    let src = dir.join("src.img");
    let mut model = make_image(&src, 32 * MIB, 1)?;
    let rig = Rig::new(&src)?;
    let tgt = dir.join("t.img");

    // Before READY: a forced cancel, whatever was asked.
    rig.qmp("drive-mirror", json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "speed": MIB, "job-id": "c1", "auto-dismiss": false}))
        .map_err(anyhow::Error::msg)?;
    let job = rig.job("c1")?;
    std::thread::sleep(Duration::from_millis(300));
    rig.qmp("block-job-cancel", json!({"device": "c1"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Concluded, T)?;
    let info = rig.block_job()?;
    assert_eq!(info["error"], json!("Operation canceled"));
    let copied = info["offset"].as_u64().context("offset")?;
    ensure!(
        copied < 32 * MIB,
        "the speed-limited job copied everything before the cancel"
    );
    rig.qmp("job-dismiss", json!({"id": "c1"}))
        .map_err(anyhow::Error::msg)?;
    assert_eq!(
        rig.event_names(),
        [
            "created",
            "running",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
    ensure!(rig.disk.image().path() == src, "cancel switched images");

    // After READY, block-job-cancel: the target is a point-in-time copy.
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "job-id": "c2"}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job("c2")?;
    wait_status(&job, JobStatus::Ready, T)?;
    write_disk(&rig, MIB, &pattern(9, 9, 65536))?;
    model[MIB as usize..(MIB + 65536) as usize].copy_from_slice(&pattern(9, 9, 65536));
    rig.qmp("block-job-cancel", json!({"device": "c2"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    assert_eq!(rig.event_names(), READY_THEN_COMPLETED);
    ensure!(rig.disk.image().path() == src, "soft cancel pivoted");
    compare_file(&tgt, &model)?;
    // Later writes no longer reach the target.
    write_disk(&rig, 0, &[1u8; 4096])?;
    compare_file(&tgt, &model)?;

    // After READY, job-cancel is forced: BLOCK_JOB_CANCELLED.
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "mode": "existing", "job-id": "c3"}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job("c3")?;
    wait_status(&job, JobStatus::Ready, T)?;
    rig.qmp("job-cancel", json!({"id": "c3"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    assert_eq!(
        rig.event_names(),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "aborting",
            "BLOCK_JOB_CANCELLED",
            "concluded",
            "null"
        ]
    );
    ensure!(!dir.join("src.img.vubd-mirror").exists());
    Ok(())
}

#[test]
fn speed_limit_holds_and_changes_live() -> Result<()> {
    let dir = Scratch::new("speed");
    let src = dir.join("src.img");
    let model = make_image(&src, 48 * MIB, 1)?;
    let rig = Rig::new(&src)?;
    let tgt = dir.join("t.img");
    let speed = 8 * MIB;
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "speed": speed}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job("disk0")?;
    std::thread::sleep(Duration::from_millis(400));
    // Only the limit is asserted: a loaded machine may copy more slowly,
    // never faster. The window runs from before the first query to after
    // the second, so it can only be overestimated; one copy (at most a
    // tenth of a second's worth) may be in flight or unreported at each end.
    let t1 = Instant::now();
    let o1 = rig.block_job()?["offset"].as_u64().context("offset")?;
    std::thread::sleep(Duration::from_millis(2000));
    let o2 = rig.block_job()?["offset"].as_u64().context("offset")?;
    let window = t1.elapsed().as_secs_f64();
    ensure!(
        (o2 - o1) as f64 <= speed as f64 * window + 2.0 * MIB as f64,
        "copied {} bytes in {window:.2} s with a limit of {} MiB/s",
        o2 - o1,
        speed / MIB
    );
    eprintln!(
        "observed {:.2} MiB/s with a limit of {} MiB/s",
        (o2 - o1) as f64 / window / MIB as f64,
        speed / MIB
    );
    assert_eq!(rig.block_job()?["speed"], json!(speed));
    rig.qmp(
        "block-job-set-speed",
        json!({"device": "disk0", "speed": 0}),
    )
    .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Ready, T)?;
    rig.qmp("job-complete", json!({"id": "disk0"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    compare_file(&tgt, &model)?;
    Ok(())
}

#[test]
fn pause_stops_copying_until_resumed() -> Result<()> {
    let dir = Scratch::new("pause");
    let src = dir.join("src.img");
    let model = make_image(&src, 32 * MIB, 1)?;
    let rig = Rig::new(&src)?;
    let tgt = dir.join("t.img");
    rig.qmp("drive-mirror", json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "speed": MIB, "job-id": "p"}))
        .map_err(anyhow::Error::msg)?;
    let job = rig.job("p")?;
    std::thread::sleep(Duration::from_millis(200));
    rig.qmp("job-pause", json!({"id": "p"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Paused, T)?;
    let a = rig.block_job()?;
    assert_eq!(
        (a["paused"].clone(), a["busy"].clone(), a["status"].clone()),
        (json!(true), json!(false), json!("paused"))
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        rig.block_job()?["offset"],
        a["offset"],
        "copying went on while paused"
    );
    assert_eq!(
        rig.qmp("job-pause", json!({"id": "p"})).unwrap_err(),
        "Job is already paused"
    );
    rig.qmp("block-job-set-speed", json!({"device": "p", "speed": 0}))
        .map_err(anyhow::Error::msg)?;
    rig.qmp("block-job-resume", json!({"device": "p"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Ready, T)?;
    rig.qmp("job-pause", json!({"id": "p"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Standby, T)?;
    assert_eq!(
        rig.qmp("job-complete", json!({"id": "p"})).unwrap_err(),
        "Job 'p' in state 'standby' cannot accept command verb 'complete'"
    );
    rig.qmp("job-resume", json!({"id": "p"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Ready, T)?;
    rig.qmp("job-complete", json!({"id": "p"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    let names = rig.event_names();
    assert_eq!(&names[..4], ["created", "running", "paused", "running"]);
    assert!(
        names.windows(2).any(|w| w == ["standby", "ready"]),
        "{names:?}"
    );
    compare_file(&tgt, &model)?;
    Ok(())
}

#[test]
fn manual_finalize_keeps_the_target_in_sync_while_pending() -> Result<()> {
    let dir = Scratch::new("manual");
    let src = dir.join("src.img");
    let model = make_image(&src, 16 * MIB, 1)?;
    let rig = Rig::new(&src)?;
    let tgt = dir.join("t.img");
    rig.qmp("drive-mirror", json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "job-id": "f", "auto-finalize": false, "auto-dismiss": false}))
        .map_err(anyhow::Error::msg)?;
    let job = rig.job("f")?;
    wait_status(&job, JobStatus::Ready, T)?;
    let writers = Writers::start(
        &rig.disk,
        model,
        2,
        4096,
        16 * MIB,
        true,
        Some(Duration::from_micros(200)),
    );
    rig.qmp("job-complete", json!({"id": "f"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Pending, T)?;
    writers.wait_writes(300, T)?;
    rig.qmp("job-finalize", json!({"id": "f"}))
        .map_err(anyhow::Error::msg)?;
    assert_eq!(job.status(), JobStatus::Concluded);
    writers.wait_writes(100, T)?;
    let (_, model) = writers.stop()?;
    rig.qmp("job-dismiss", json!({"id": "f"}))
        .map_err(anyhow::Error::msg)?;
    let names = rig.event_names();
    assert_eq!(
        names,
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    compare_file(&tgt, &model)?;
    Ok(())
}

#[test]
fn arguments_are_checked_with_qemus_words() -> Result<()> {
    let dir = Scratch::new("args");
    let src = dir.join("src.img");
    make_image(&src, 4 * MIB, 1)?;
    let rig = Rig::new(&src)?;
    let t = dir.join("t.img");
    let t = t.to_str().context("path")?;
    let err = |args: serde_json::Value| rig.qmp("drive-mirror", args).unwrap_err();
    let base = |extra: serde_json::Value| {
        let mut a = json!({"device": "disk0", "target": t, "sync": "full"});
        for (k, v) in extra.as_object().into_iter().flatten() {
            a[k] = v.clone();
        }
        a
    };
    assert_eq!(
        err(base(json!({"granularity": 1000}))),
        "Parameter 'granularity' expects a power of 2"
    );
    assert_eq!(
        err(base(json!({"granularity": 256}))),
        "Parameter 'granularity' expects a value in range [512B, 64MB]"
    );
    assert_eq!(
        err(base(json!({"buf-size": -5}))),
        "Invalid parameter 'buf-size'"
    );
    assert_eq!(
        err(base(json!({"sync": "incremental"}))),
        "Sync mode 'incremental' not supported"
    );
    assert_eq!(
        err(base(json!({"sync": "fast"}))),
        "Parameter 'sync' does not accept value 'fast'"
    );
    assert_eq!(
        err(base(json!({"device": "nope"}))),
        "Cannot find device='nope' nor node-name='nope'"
    );
    assert_eq!(err(base(json!({"job-id": "a b"}))), "Invalid job ID 'a b'");
    assert_eq!(
        err(base(json!({"format": "qcow3"}))),
        "Unknown file format 'qcow3'"
    );
    assert_eq!(
        err(base(json!({"bogus": 1}))),
        "Parameter 'bogus' is unexpected"
    );
    assert_eq!(
        err(base(json!({"target": src.to_str()}))),
        "Can't mirror node into itself"
    );
    let missing = dir.join("nodir/x.img");
    assert_eq!(
        rig.qmp(
            "drive-mirror",
            json!({"device": "disk0", "target": missing.to_str(), "sync": "full", "mode": "existing"})
        )
        .unwrap_err(),
        format!(
            "Could not open '{}': No such file or directory",
            missing.display()
        )
    );
    // blockdev-mirror takes a node name, never a path.
    assert_eq!(
        rig.qmp(
            "blockdev-mirror",
            json!({"device": "disk0", "target": t, "sync": "full"})
        )
        .unwrap_err(),
        format!("Cannot find device='{t}' nor node-name='{t}'")
    );
    assert_eq!(
        err(base(json!({"speed": -1}))),
        "Parameter 'speed' expects a non-negative value"
    );
    assert_eq!(rig.event_names(), ["created", "null"]);
    assert_eq!(
        rig.qmp(
            "drive-mirror",
            json!({"device": "disk0", "target": t, "sync": "full", "x-resume": true})
        )
        .unwrap_err(),
        "No interrupted mirror of 'disk0' to resume"
    );
    // One mirror per disk: the first one's filter node sits above the
    // disk's node, hence QEMU 7.2's words.
    rig.qmp("drive-mirror", base(json!({"job-id": "one", "speed": MIB})))
        .map_err(anyhow::Error::msg)?;
    let one = rig.job("one")?;
    assert_eq!(
        err(base(json!({"job-id": "two"}))),
        "Need a root block node"
    );
    assert_eq!(
        err(base(json!({"job-id": "one"}))),
        "Job ID 'one' already in use"
    );
    rig.qmp("job-cancel", json!({"id": "one"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&one, JobStatus::Null, T)?;
    // The slot is free again.
    rig.qmp("drive-mirror", base(json!({"job-id": "three"})))
        .map_err(anyhow::Error::msg)?;
    let three = rig.job("three")?;
    wait_status(&three, JobStatus::Ready, T)?;
    Ok(())
}

//! Guest writes racing the copier: writer threads (the "guest") write
//! patterns, zeroes and discards through `Disk` while the mirror copies,
//! becomes READY and pivots; they keep writing across the pivot. Afterwards
//! the target must hold exactly what the writers last wrote, block for
//! block, and the source must not have changed after the pivot.
//!
//! Small granularities and 4 KiB writes make a guest write land inside a
//! chunk that is being copied as often as possible: that is the race the
//! in-flight protocol (and its after-write re-mark) must win every time.

#[path = "mirror_util.rs"]
mod util;

use anyhow::{ensure, Result};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use util::*;
use vubd_backend::jobs::JobStatus;
use vubd_backend::mirror::MirrorManager;
use vubd_backend::Disk;

const T: Duration = Duration::from_secs(60);

/// Runs one mirror under load; `change_midway` switches to write-blocking
/// after READY with `block-job-change`; `slow` puts the source on storage
/// whose writes land 100 us after the mirror's mark.
fn stress(
    tag: &str,
    granularity: u64,
    copy_mode: &str,
    change_midway: bool,
    writers: u64,
) -> Result<()> {
    stress_with(tag, granularity, copy_mode, change_midway, writers, false)
}

fn stress_with(
    tag: &str,
    granularity: u64,
    copy_mode: &str,
    change_midway: bool,
    writers: u64,
    slow: bool,
) -> Result<()> {
    let dir = Scratch::new(tag);
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 16 * MIB;
    let model = make_image(&src, size, 3)?;
    let rig = if slow {
        Rig::with_disk(
            Arc::new(Disk::new(Box::new(Flaky::slow(&src)?), false)),
            &src,
        )?
    } else {
        Rig::new(&src)?
    };
    // In background mode a mirror is READY only once its copier has
    // caught up: unpaced writers on a loaded 2-core machine can re-dirty
    // 4 KiB chunks faster than it copies them, for as long as the
    // scheduler favours them. A short pause between each writer's writes
    // keeps the copier ahead; the writes still race every copy.
    let pace = (copy_mode == "background").then(|| Duration::from_micros(100));
    let load = Writers::start(&rig.disk, model, writers, 4096, size, true, pace);
    load.wait_writes(20, T)?;
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "job-id": "s",
               "granularity": granularity, "copy-mode": copy_mode}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job("s")?;
    wait_status(&job, JobStatus::Ready, T)?;
    if change_midway {
        rig.qmp(
            "block-job-change",
            json!({"id": "s", "type": "mirror", "copy-mode": "write-blocking"}),
        )
        .map_err(anyhow::Error::msg)?;
    }
    // Keep the guest busy in READY for a while: the copier chases it.
    load.wait_writes(500, T)?;
    let t0 = Instant::now();
    rig.qmp("job-complete", json!({"id": "s"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    let pivot_ms = elapsed_ms(t0);
    ensure!(rig.disk.image().path() == tgt, "no pivot");
    let src_after_pivot = std::fs::read(&src)?;
    load.wait_writes(50, T)?;
    let (writes, model) = load.stop()?;
    compare_file(&tgt, &model)?;
    ensure!(
        std::fs::read(&src)? == src_after_pivot,
        "the source changed after the pivot"
    );
    eprintln!("{tag}: {writes} guest writes, complete took {pivot_ms} ms");
    Ok(())
}

#[test]
fn background_mirror_loses_no_racing_write_4k_chunks() -> Result<()> {
    stress("bg4k", 4096, "background", false, 3)
}

#[test]
fn background_mirror_loses_no_racing_write_64k_chunks() -> Result<()> {
    stress("bg64k", 65536, "background", false, 3)
}

#[test]
fn write_blocking_mirror_loses_no_racing_write() -> Result<()> {
    stress("wb", 65536, "write-blocking", false, 3)
}

#[test]
fn change_to_write_blocking_under_load_loses_no_write() -> Result<()> {
    stress("chg", 16384, "background", true, 3)
}

/// Write-blocking converges even when the guest dirties faster than a
/// speed-limited copier could ever copy: its writes go to the target too.
#[test]
fn write_blocking_converges_where_background_cannot() -> Result<()> {
    let dir = Scratch::new("conv");
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 16 * MIB;
    let model = make_image(&src, size, 1)?;
    let rig = Rig::new(&src)?;
    // sync none: READY at once; from then on only guest writes matter.
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "job-id": "c", "copy-mode": "background"}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job("c")?;
    wait_status(&job, JobStatus::Ready, T)?;
    rig.qmp(
        "block-job-set-speed",
        json!({"device": "c", "speed": 256 * KIB}),
    )
    .map_err(anyhow::Error::msg)?;
    let load = Writers::start(&rig.disk, model, 2, 4096, size, false, None);
    // At 256 KiB/s the copier falls behind the writers: wait until it has.
    let t0 = Instant::now();
    let behind_bg = loop {
        let info = rig.block_job()?;
        let behind = info["len"].as_u64().unwrap_or(0) - info["offset"].as_u64().unwrap_or(0);
        if behind > MIB {
            break behind;
        }
        ensure!(t0.elapsed() < T, "background kept up at 256 KiB/s? {info}");
        std::thread::sleep(Duration::from_millis(5));
    };
    rig.qmp(
        "block-job-change",
        json!({"id": "c", "type": "mirror", "copy-mode": "write-blocking"}),
    )
    .map_err(anyhow::Error::msg)?;
    rig.qmp("block-job-set-speed", json!({"device": "c", "speed": 0}))
        .map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    loop {
        let info = rig.block_job()?;
        if info["actively-synced"] == json!(true) {
            break;
        }
        ensure!(
            t0.elapsed() < T,
            "write-blocking never became actively synced: {info}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let converge_ms = elapsed_ms(t0);
    load.wait_writes(200, T)?;
    rig.qmp("job-complete", json!({"id": "c"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    let (_, model) = load.stop()?;
    compare_file(&tgt, &model)?;
    eprintln!(
        "background was {behind_bg} bytes behind; write-blocking synced after {converge_ms} ms"
    );
    Ok(())
}

/// The same race with slow storage (each guest write lands 100 us after its
/// mark): the window is wide, and still no write is lost. The proof that
/// the after-write mark is what closes it is deterministic:
/// `without_the_after_write_mark_racing_writes_are_lost` in
/// mirror_interleave.rs.
#[test]
fn background_mirror_loses_no_write_on_slow_storage() -> Result<()> {
    stress_with("slow", 4096, "background", false, 3, true)
}

/// `complete` under writes the background copier cannot outrun (several
/// unpaced writers, 4 KiB writes into 64 KiB chunks): after a second
/// without converging the job finishes in write-blocking mode, so the
/// pivot comes quickly and with little to copy while the guest is paused.
#[test]
fn complete_converges_under_a_write_load_the_copier_cannot_outrun() -> Result<()> {
    let dir = Scratch::new("outrun");
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 64 * MIB;
    let model = make_image(&src, size, 1)?;
    let rig = Rig::new(&src)?;
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "job-id": "o"}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job("o")?;
    wait_status(&job, JobStatus::Ready, T)?;
    let load = Writers::start(&rig.disk, model, 4, 4096, size, false, None);
    load.wait_writes(1000, T)?;
    let t0 = Instant::now();
    rig.qmp("job-complete", json!({"id": "o"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    let took = t0.elapsed();
    let (writes, model) = load.stop()?;
    compare_file(&tgt, &model)?;
    let stats = MirrorManager::mirror_driver(&job)
        .ok_or_else(|| anyhow::anyhow!("not a mirror"))?
        .stats();
    let pause = stats.pivot_pause.unwrap_or_default();
    eprintln!(
        "{writes} writes; complete took {took:?}, guest paused {pause:?} for {} bytes",
        stats.pivot_bytes
    );
    Ok(())
}

/// How an [`overlapping`] run ends.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// `job-complete`: the disk pivots to the target.
    Complete,
    /// `block-job-cancel` after READY: the target is a copy, no pivot.
    Cancel,
}

/// Writers whose writes overlap on the same chunks (4 KiB writes, zeroes
/// and discards inside 64 KiB chunks, whole-chunk writes, four threads on
/// the same 2 MiB) while the mirror copies, becomes READY, optionally
/// switches to write-blocking mid-run, and ends; then the target must equal
/// the source byte for byte. Each writer owning its blocks, as above, never
/// puts two writes in flight on one chunk: this does, all the time.
fn overlapping(tag: &str, copy_mode: &str, change: bool, end: End) -> Result<()> {
    let dir = Scratch::new(tag);
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 16 * MIB;
    let chunk = 64 * KIB;
    make_image(&src, size, 1)?;
    let rig = Rig::new(&src)?;
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt.to_str(), "sync": "full", "job-id": "o",
               "granularity": chunk, "copy-mode": copy_mode}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job("o")?;
    // During the first pass; then quiet, so that READY is certain to come.
    let load = Overlapping::start(&rig.disk, 4, 2 * MIB, chunk);
    load.wait_writes(2000, T)?;
    let mut writes = load.stop()?;
    wait_status(&job, JobStatus::Ready, T)?;
    // In READY, across the switch if asked.
    let load = Overlapping::start(&rig.disk, 4, 2 * MIB, chunk);
    load.wait_writes(2000, T)?;
    if change {
        rig.qmp(
            "block-job-change",
            json!({"id": "o", "type": "mirror", "copy-mode": "write-blocking"}),
        )
        .map_err(anyhow::Error::msg)?;
        load.wait_writes(2000, T)?;
    }
    writes += load.stop()?;
    match end {
        End::Complete => rig.qmp("job-complete", json!({"id": "o"})),
        End::Cancel => rig.qmp("block-job-cancel", json!({"device": "o"})),
    }
    .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    let pivoted = rig.disk.image().path() == tgt;
    ensure!(pivoted == (end == End::Complete), "pivot: {pivoted}");
    compare_file(&tgt, &std::fs::read(&src)?)?;
    eprintln!("{tag}: {writes} overlapping guest writes");
    Ok(())
}

#[test]
fn overlapping_writers_background() -> Result<()> {
    overlapping("ovbg", "background", false, End::Complete)
}

#[test]
fn overlapping_writers_write_blocking() -> Result<()> {
    overlapping("ovwb", "write-blocking", false, End::Complete)
}

#[test]
fn overlapping_writers_write_blocking_cancel_after_ready() -> Result<()> {
    overlapping("ovwbc", "write-blocking", false, End::Cancel)
}

#[test]
fn overlapping_writers_across_a_change_to_write_blocking() -> Result<()> {
    overlapping("ovchg", "background", true, End::Complete)
}

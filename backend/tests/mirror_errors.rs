//! Error policies with a target (or source) that fails on demand: `report`
//! ends the job with the error, `stop` pauses it with BLOCK_JOB_ERROR until
//! `job-resume`, `ignore` retries; `enospc` stops on ENOSPC. Guest writes
//! never fail because of the target, in background or write-blocking mode,
//! and the source always keeps exactly what the guest wrote.

#[path = "mirror_util.rs"]
mod util;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use util::*;
use vubd_backend::jobs::{Job, JobStatus, OnError};
use vubd_backend::mirror::manager::TargetMode;
use vubd_backend::mirror::{CopyMode, MirrorRequest};
use vubd_backend::{Disk, Image, RawImage, RawImageOptions};

const T: Duration = Duration::from_secs(30);

struct Case {
    _dir: Scratch,
    rig: Rig,
    src: std::path::PathBuf,
    tgt: std::path::PathBuf,
    target: Arc<Flaky>,
    source: Arc<Flaky>,
    model: Vec<u8>,
}

fn setup(tag: &str) -> Result<Case> {
    let dir = Scratch::new(tag);
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let model = make_image(&src, 16 * MIB, 2)?;
    std::fs::File::create(&tgt)?.set_len(16 * MIB)?;
    let source = Arc::new(Flaky::open(&src)?);
    let disk = Arc::new(Disk::new(Box::new(source.clone()), false));
    let rig = Rig::with_disk(disk, &src)?;
    let target = Arc::new(Flaky::open(&tgt)?);
    Ok(Case {
        _dir: dir,
        rig,
        src,
        tgt,
        target,
        source,
        model,
    })
}

fn start(c: &Case, id: &str, f: impl FnOnce(&mut MirrorRequest)) -> Result<Arc<Job>> {
    let mut req = MirrorRequest::new("disk0", &c.tgt, "full");
    req.job_id = Some(id.into());
    req.mode = TargetMode::Existing;
    f(&mut req);
    let target: Arc<dyn Image> = c.target.clone();
    c.rig
        .manager
        .start_to(req, target)
        .map_err(|e| anyhow::anyhow!(e.desc))
}

/// Waits for event `name` after position `pos` of `seen` (which collects
/// every event), and moves `pos` past it.
fn wait_event(c: &Case, name: &str, seen: &mut Vec<String>, pos: &mut usize) -> Result<()> {
    let t0 = Instant::now();
    loop {
        if let Some(i) = seen[*pos..].iter().position(|n| n == name) {
            *pos += i + 1;
            return Ok(());
        }
        ensure!(
            t0.elapsed() < T,
            "no {name} event after #{pos}; saw {seen:?}"
        );
        seen.extend(c.rig.event_names());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn report_ends_the_job_and_spares_the_guest() -> Result<()> {
    let c = setup("report")?;
    c.target.fail_writes.store(true, Ordering::SeqCst);
    let load = Writers::start(
        &c.rig.disk,
        c.model.clone(),
        2,
        4096,
        16 * MIB,
        true,
        Some(Duration::from_micros(100)),
    );
    let job = start(&c, "r", |r| r.auto_dismiss = false)?;
    wait_status(&job, JobStatus::Concluded, T)?;
    load.wait_writes(50, T)?;
    let (_, model) = load.stop()?;
    let info = c.rig.block_job()?;
    assert_eq!(info["error"], json!("No space left on device"));
    assert_eq!(info["io-status"], json!("ok"));
    let names = c.rig.event_names();
    ensure!(
        names.contains(&"ERROR:write:report".to_string()),
        "{names:?}"
    );
    let tail: Vec<&str> = names.iter().rev().take(3).map(String::as_str).collect();
    assert_eq!(tail, ["concluded", "BLOCK_JOB_COMPLETED", "aborting"]);
    let completed = c.rig.drain_events();
    ensure!(completed.is_empty());
    compare_file(&c.src, &model)?;
    ensure!(c.rig.disk.image().path() == c.src);
    Ok(())
}

#[test]
fn stop_pauses_until_resumed_then_completes() -> Result<()> {
    let c = setup("stop")?;
    c.target.fail_writes.store(true, Ordering::SeqCst);
    let load = Writers::start(
        &c.rig.disk,
        c.model.clone(),
        2,
        4096,
        16 * MIB,
        true,
        Some(Duration::from_micros(100)),
    );
    let job = start(&c, "s", |r| r.on_target_error = OnError::Stop)?;
    wait_status(&job, JobStatus::Paused, T)?;
    let info = c.rig.block_job()?;
    assert_eq!(
        (info["io-status"].clone(), info["paused"].clone()),
        (json!("nospace"), json!(true))
    );
    let (mut seen, mut pos) = (Vec::new(), 0);
    wait_event(&c, "ERROR:write:stop", &mut seen, &mut pos)?;
    wait_event(&c, "paused", &mut seen, &mut pos)?;
    // Stopped means stopped: nothing is retried until resume.
    let failures = c.target.failures.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.target.failures.load(Ordering::SeqCst), failures);
    // Resuming into the same error stops again.
    c.rig
        .qmp("job-resume", json!({"id": "s"}))
        .map_err(anyhow::Error::msg)?;
    wait_event(&c, "running", &mut seen, &mut pos)?;
    wait_event(&c, "ERROR:write:stop", &mut seen, &mut pos)?;
    wait_event(&c, "paused", &mut seen, &mut pos)?;
    c.target.fail_writes.store(false, Ordering::SeqCst);
    c.rig
        .qmp("block-job-resume", json!({"device": "s"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Ready, T)?;
    assert_eq!(c.rig.block_job()?["io-status"], json!("ok"));
    c.rig
        .qmp("job-complete", json!({"id": "s"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    let (_, model) = load.stop()?;
    compare_file(&c.tgt, &model)?;
    Ok(())
}

#[test]
fn ignore_retries_until_the_target_heals() -> Result<()> {
    let c = setup("ignore")?;
    c.target.fail_writes.store(true, Ordering::SeqCst);
    let job = start(&c, "i", |r| r.on_target_error = OnError::Ignore)?;
    let (mut seen, mut pos) = (Vec::new(), 0);
    wait_event(&c, "ERROR:write:ignore", &mut seen, &mut pos)?;
    // Retried: a second error, without anyone resuming the job.
    wait_event(&c, "ERROR:write:ignore", &mut seen, &mut pos)?;
    ensure!(
        job.status() == JobStatus::Running,
        "job is {}",
        job.status()
    );
    c.target.fail_writes.store(false, Ordering::SeqCst);
    wait_status(&job, JobStatus::Ready, T)?;
    c.rig
        .qmp("job-complete", json!({"id": "i"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    compare_file(&c.tgt, &c.model)?;
    Ok(())
}

#[test]
fn enospc_stops_on_enospc() -> Result<()> {
    let c = setup("enospc")?;
    c.target.fail_writes.store(true, Ordering::SeqCst);
    let job = start(&c, "e", |r| r.on_target_error = OnError::Enospc)?;
    wait_status(&job, JobStatus::Paused, T)?;
    c.target.fail_writes.store(false, Ordering::SeqCst);
    c.rig
        .qmp("job-resume", json!({"id": "e"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Ready, T)?;
    c.rig
        .qmp("job-cancel", json!({"id": "e"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    Ok(())
}

#[test]
fn write_blocking_target_errors_never_reach_the_guest() -> Result<()> {
    let c = setup("wberr")?;
    let job = start(&c, "w", |r| {
        r.on_target_error = OnError::Stop;
        r.copy_mode = CopyMode::WriteBlocking;
    })?;
    wait_status(&job, JobStatus::Ready, T)?;
    let load = Writers::start(
        &c.rig.disk,
        c.model.clone(),
        2,
        4096,
        16 * MIB,
        true,
        Some(Duration::from_micros(100)),
    );
    let t0 = Instant::now();
    while c.rig.block_job()?["actively-synced"] != json!(true) {
        ensure!(t0.elapsed() < T, "never actively synced");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The target fails under the guest's writes: the guest does not notice
    // (its writers would stop with an error), the job stops.
    c.target.fail_writes.store(true, Ordering::SeqCst);
    wait_status(&job, JobStatus::Standby, T)?;
    let info = c.rig.block_job()?;
    assert_eq!(
        (info["io-status"].clone(), info["actively-synced"].clone()),
        (json!("nospace"), json!(false))
    );
    std::thread::sleep(Duration::from_millis(200));
    c.target.fail_writes.store(false, Ordering::SeqCst);
    c.rig
        .qmp("job-resume", json!({"id": "w"}))
        .map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    while c.rig.block_job()?["actively-synced"] != json!(true) {
        ensure!(
            t0.elapsed() < T,
            "never in sync again after resume: {}",
            c.rig.block_job()?
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    c.rig
        .qmp("job-complete", json!({"id": "w"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    load.wait_writes(100, T)?;
    let (_, model) = load.stop().context("a guest write failed")?;
    compare_file(&c.tgt, &model)?;
    Ok(())
}

#[test]
fn source_read_errors_follow_on_source_error() -> Result<()> {
    let c = setup("srcerr")?;
    c.source.fail_reads.store(true, Ordering::SeqCst);
    let job = start(&c, "r", |r| {
        r.on_source_error = OnError::Stop;
        r.on_target_error = OnError::Report;
    })?;
    wait_status(&job, JobStatus::Paused, T)?;
    let names = c.rig.event_names();
    ensure!(names.contains(&"ERROR:read:stop".to_string()), "{names:?}");
    assert_eq!(c.rig.block_job()?["io-status"], json!("failed"));
    c.source.fail_reads.store(false, Ordering::SeqCst);
    c.rig
        .qmp("job-resume", json!({"id": "r"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Ready, T)?;
    c.rig
        .qmp("job-complete", json!({"id": "r"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    compare_file(&c.tgt, &c.model)?;
    Ok(())
}

/// The job finds nothing dirty in write-blocking mode and is about to say
/// "actively synced" when a guest write's target write fails, marks its
/// chunk and clears the flag: the job's statement must not win. Forced
/// order: the failed write runs whole between the job's look at the dirty
/// count and its store (a job that stored `true` blindly reported a
/// stopped job with a dirty chunk as in sync).
#[test]
fn a_write_through_error_beats_the_jobs_in_sync_flag() -> Result<()> {
    use vubd_backend::disk::{WriteHook, WriteOp};
    use vubd_backend::mirror::hook::{MirrorHook, MirrorState};
    let dir = Scratch::new("wbsync");
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    make_image(&src, MIB, 1)?;
    std::fs::File::create(&tgt)?.set_len(MIB)?;
    let disk = open_disk(&src)?;
    let target = Arc::new(Flaky::open(&tgt)?);
    let state = Arc::new(MirrorState::new(
        disk,
        target.clone(),
        64 * 1024,
        None,
        (CopyMode::WriteBlocking, None),
    )?);
    let hook = MirrorHook::new(state.clone());
    // The job looks: nothing is dirty.
    ensure!(state.dirty.count() == 0);
    // A guest write whose target write fails.
    target.fail_writes.store(true, Ordering::SeqCst);
    let mut data = vec![7u8; 4096];
    let bufs = [vubd_backend::IoBuf::from_slice(&mut data)];
    hook.before_write(0, 4096)?;
    hook.after_write(0, 4096, WriteOp::Data(&bufs))?;
    ensure!(
        state.dirty.count() == 1,
        "the failed write left its chunk clean"
    );
    // The job stores its conclusion.
    state.set_actively_synced();
    ensure!(
        !state.actively_synced.load(Ordering::SeqCst),
        "actively synced with a chunk the target lacks"
    );
    // Once the error is handled, a clean target is in sync again.
    state.clear_wb_suspension();
    state.dirty.clear(0, 0);
    state.set_actively_synced();
    ensure!(state.actively_synced.load(Ordering::SeqCst));
    Ok(())
}

/// Two write-blocking guest writes fail on the target: B has passed the
/// suspension check and is parked in the target when A fails; the job takes
/// A's error and stops; B then fails too. B's error belongs to the error
/// the job is already handling (its chunk is dirty): after the resume the
/// job must not find it and stop again (it did, under load, before the
/// resume forgot it).
#[test]
fn a_write_through_failing_while_the_job_handles_an_earlier_one_does_not_stop_it_again(
) -> Result<()> {
    use vubd_backend::disk::{WriteHook, WriteOp};
    use vubd_backend::mirror::hook::{MirrorHook, MirrorState};
    const CHUNK: u64 = 64 * 1024;
    let dir = Scratch::new("wbstale");
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    make_image(&src, MIB, 1)?;
    std::fs::File::create(&tgt)?.set_len(MIB)?;
    let disk = open_disk(&src)?;
    let (parked_tx, parked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    // Every target write fails with ENOSPC; the data write into chunk 1
    // first says it is under way and waits for a release, so the test holds
    // a write-through between its suspension check and its failure.
    let (parked_tx, release_rx) = (Mutex::new(parked_tx), Mutex::new(release_rx));
    let target = Flaky::with_hook(&tgt, move |op, offset| {
        if op == Op::Write && offset == CHUNK {
            let _ = parked_tx.lock().map(|tx| tx.send(()));
            let _ = release_rx.lock().map(|rx| rx.recv_timeout(T));
        }
    })?;
    target.fail_writes.store(true, Ordering::SeqCst);
    let target = Arc::new(target);
    let state = Arc::new(MirrorState::new(
        disk,
        target,
        CHUNK,
        None,
        (CopyMode::WriteBlocking, None),
    )?);
    let hook = Arc::new(MirrorHook::new(state.clone()));
    let guest_write = |hook: &MirrorHook, offset: u64| -> Result<()> {
        let mut data = vec![7u8; 4096];
        let bufs = [vubd_backend::IoBuf::from_slice(&mut data)];
        hook.before_write(offset, 4096)?;
        hook.after_write(offset, 4096, WriteOp::Data(&bufs))?;
        Ok(())
    };
    // B: into chunk 1, parked in the target after the suspension check.
    let b = {
        let hook = hook.clone();
        std::thread::spawn(move || guest_write(&hook, CHUNK))
    };
    parked_rx
        .recv_timeout(T)
        .context("write B never reached the target")?;
    // A: into chunk 0, fails; the job takes its error (and stops).
    guest_write(&hook, 0)?;
    ensure!(
        state.take_wb_error() == Some(ENOSPC),
        "A's error not raised"
    );
    // B fails while the job is stopped.
    release_tx.send(())?;
    b.join()
        .map_err(|_| anyhow::anyhow!("write B panicked"))??;
    ensure!(
        state.dirty.get(0) && state.dirty.get(1),
        "a failed write-through left its chunk clean"
    );
    // job-resume: the job looks for errors again.
    state.clear_wb_suspension();
    let stale = state.take_wb_error();
    ensure!(
        stale.is_none(),
        "after the resume the job finds B's error ({stale:?}) and stops again"
    );
    Ok(())
}

/// A target that hangs under a write-blocking mirror (its writes park
/// until released, as on a dead NFS server): a guest write waits for it at
/// most `x-target-timeout`, then completes with its chunks dirty; the job
/// hears ETIMEDOUT and stops by its policy; once the target answers again
/// and the job is resumed, the target ends equal to what the guest wrote.
#[test]
fn a_hung_write_blocking_target_holds_guest_writes_at_most_the_target_timeout() -> Result<()> {
    let dir = Scratch::new("wbhang");
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let model = make_image(&src, 16 * MIB, 2)?;
    std::fs::File::create(&tgt)?.set_len(16 * MIB)?;
    let disk = Arc::new(Disk::new(
        Box::new(RawImage::open(&src, RawImageOptions::default())?),
        false,
    ));
    let rig = Rig::with_disk(disk, &src)?;
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let g2 = gate.clone();
    let target: Arc<dyn Image> = Arc::new(Flaky::with_hook(&tgt, move |op, _| {
        let (parked, cv) = &*g2;
        let mut p = parked.lock().unwrap_or_else(|e| e.into_inner());
        while *p && op.writes() {
            p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    })?);
    let mut req = MirrorRequest::new("disk0", &tgt, "full");
    req.job_id = Some("h".into());
    req.mode = TargetMode::Existing;
    req.on_target_error = OnError::Stop;
    req.copy_mode = CopyMode::WriteBlocking;
    req.target_timeout = Some(1);
    let job = rig
        .manager
        .start_to(req, target)
        .map_err(|e| anyhow::anyhow!(e.desc))?;
    wait_status(&job, JobStatus::Ready, T)?;
    let load = Writers::start(
        &rig.disk,
        model,
        2,
        4096,
        16 * MIB,
        true,
        Some(Duration::from_micros(100)),
    );
    load.wait_writes(100, T)?;
    let park = |on: bool| {
        let (parked, cv) = &*gate;
        *parked.lock().unwrap_or_else(|e| e.into_inner()) = on;
        cv.notify_all();
    };
    park(true);
    // Every write-through from now on hangs: the guest's writes go on
    // (after one time-out), or this waits in vain.
    let result = load.wait_writes(500, T);
    park(false);
    result.context("guest writes hung behind the target")?;
    wait_status(&job, JobStatus::Standby, T)?;
    let info = rig.block_job()?;
    assert_eq!(info["io-status"], json!("failed"), "{info}");
    rig.qmp("job-resume", json!({"id": "h"}))
        .map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    while rig.block_job()?["actively-synced"] != json!(true) {
        ensure!(
            t0.elapsed() < T,
            "never in sync again: {}",
            rig.block_job()?
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    rig.qmp("job-complete", json!({"id": "h"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    let (_, model) = load.stop().context("a guest write failed")?;
    compare_file(&tgt, &model)?;
    Ok(())
}

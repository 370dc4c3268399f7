//! The live mirror against the real daemon: vubd with `--qmp`, a libblkio
//! client writing random blocks with recorded patterns the whole time, a
//! raw QMP client driving the job. After each run the target file must hold
//! exactly what the client last wrote, block for block, and the client must
//! have seen no error. qemu-storage-daemon is the reference for event
//! sequences and error texts.
//!
//! Images live on /dev/shm; the target-error test mounts a small tmpfs
//! (needs root, like CI).

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::bench_mirror::{make_image, pattern, LoadConfig, LoadReport, MirrorDaemon, WriteLoad};
use tests::client::{Client, Queue};
use tests::daemon::{open_files, wait_files_closed, Daemon, ScratchDir};
use tests::qmp_client::{QmpClient, QmpErrorReply};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

fn shm(tag: &str) -> Result<ScratchDir> {
    ScratchDir::new_in("/dev/shm", tag)
}

fn load_cfg(span: u64) -> LoadConfig {
    LoadConfig {
        span,
        queue_depth: 4,
        pace: Some(Duration::from_micros(50)),
        ..LoadConfig::default()
    }
}

fn status_is(s: &'static str) -> impl Fn(&Value) -> bool {
    move |d| d["status"] == s
}

fn block_job(q: &mut QmpClient) -> Result<Value> {
    let v = q.ok("query-block-jobs", json!({}))?;
    v.get(0).cloned().context("no block job")
}

fn image_file(q: &mut QmpClient) -> Result<PathBuf> {
    let v = q.ok("query-block", json!({}))?;
    Ok(PathBuf::from(
        v[0]["inserted"]["file"].as_str().context("no file")?,
    ))
}

/// Compares `path` with `expect` in 4 KiB blocks (every block is checked).
fn compare(path: &Path, expect: &[u8]) -> Result<()> {
    let got = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    ensure!(got.len() >= expect.len(), "{} is too short", path.display());
    let bad: Vec<usize> = (0..expect.len() / 4096)
        .filter(|&b| got[b * 4096..(b + 1) * 4096] != expect[b * 4096..(b + 1) * 4096])
        .collect();
    ensure!(
        bad.is_empty(),
        "{}: {} blocks differ from what the client wrote, first {:?}",
        path.display(),
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    Ok(())
}

/// Writes `data` into a file directly (behind the daemon's back).
fn poke(path: &Path, off: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, off)?;
    Ok(())
}

/// Proves the daemon reads from `active` and not from `other`: changes a
/// block of `other` behind its back (the client must not see it), then a
/// block of `active` (the client must see it).
fn reads_come_from(report: &mut LoadReport, active: &Path, other: &Path) -> Result<()> {
    let off = 12 * MIB;
    let before = report.model[off as usize..off as usize + 4096].to_vec();
    poke(other, off, &[0xee; 4096])?;
    let got = report.client.read(off, 4096)?;
    ensure!(
        got == before,
        "a change to {} showed through to the client",
        other.display()
    );
    poke(active, off, &[0x77; 4096])?;
    let got = report.client.read(off, 4096)?;
    ensure!(
        got == vec![0x77; 4096],
        "the client does not read from {}",
        active.display()
    );
    poke(active, off, &before)?;
    Ok(())
}

#[test]
fn complete_under_load_switches_the_guest_to_the_target() -> Result<()> {
    let dir = shm("mirror-complete")?;
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 64 * MIB;
    let model = make_image(&src, size, 2)?;
    let d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    let load = WriteLoad::start(d.client()?, model, load_cfg(size))?;
    load.wait_requests(200, T)?;
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "format": "raw", "job-id": "m"}),
    )?;
    let ready = q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    ensure!(
        ready["data"]["len"] == ready["data"]["offset"],
        "READY with work left: {ready}"
    );
    load.wait_requests(1000, T)?;
    let info = block_job(&mut q)?;
    ensure!(info["ready"] == true && info["status"] == "ready", "{info}");
    let t0 = Instant::now();
    q.ok("job-complete", json!({"id": "m"}))?;
    q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d.get("error").is_none())?;
    let t1 = Instant::now();
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    ensure!(
        image_file(&mut q)? == tgt.canonicalize()?,
        "query-block still shows the source"
    );
    let src_at_pivot = std::fs::read(&src)?;
    load.wait_requests(200, T)?;
    let mut report = load.stop().context("the client saw an error")?;
    compare(&tgt, &report.model)?;
    ensure!(
        std::fs::read(&src)? == src_at_pivot,
        "the source changed after the pivot"
    );
    reads_come_from(&mut report, &tgt, &src)?;
    assert_eq!(
        q.history_names(),
        [
            "created",
            "running",
            "ready",
            "BLOCK_JOB_READY",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    eprintln!(
        "{} requests; largest latency around complete {:?} (complete took {:?})",
        report.requests,
        report.max_latency_between(t0, t1),
        t1 - t0
    );
    Ok(())
}

/// True if process `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> Result<bool> {
    let path = path.canonicalize()?;
    Ok(open_files(pid)?.contains(&path))
}

/// Waits (up to 10 s, against hangs) until process `pid` no longer has
/// `path` open.
fn wait_closed(pid: u32, path: &Path) -> Result<()> {
    let path = path.canonicalize()?;
    wait_files_closed(pid, Duration::from_secs(10), |f| f == path)
}

#[test]
fn a_pivot_closes_the_old_image_while_the_queues_are_idle() -> Result<()> {
    let dir = shm("mirror-close")?;
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 16 * MIB;
    let model = make_image(&src, size, 2)?;
    let d = MirrorDaemon::start(dir.path(), &src, &["--aio", "io_uring"])?;
    let mut q = d.qmp()?;
    // Requests through every queue's ring, then silence: the queue threads
    // sleep with the source as the last image they used.
    let load = WriteLoad::start(d.client()?, model, load_cfg(size))?;
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop().context("the client saw an error")?;
    ensure!(report.requests > 0);
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "m"}),
    )?;
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    q.ok("job-complete", json!({"id": "m"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    let pid = d.daemon.pid();
    ensure!(
        has_open(pid, &tgt)?,
        "the target is not open after the pivot"
    );
    // No guest request comes; the old image must close anyway (at the
    // pivot: the wait only keeps a broken build from hanging).
    wait_closed(pid, &src).context("the old image stays open with every queue idle")
}

#[test]
fn write_blocking_keeps_the_target_in_sync_under_load() -> Result<()> {
    let dir = shm("mirror-wb")?;
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 64 * MIB;
    let model = make_image(&src, size, 1)?;
    let d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    let load = WriteLoad::start(d.client()?, model, load_cfg(size))?;
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "mode": "absolute-paths", "job-id": "w", "copy-mode": "write-blocking"}),
    )?;
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    let t0 = Instant::now();
    loop {
        let info = block_job(&mut q)?;
        if info["actively-synced"] == true {
            break;
        }
        ensure!(t0.elapsed() < T, "never actively synced: {info}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Actively synced: the guest's writes reach the target before they
    // complete; keep writing in that state, then complete.
    load.wait_requests(1000, T)?;
    q.ok("block-job-complete", json!({"device": "w"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    let report = load.stop().context("the client saw an error")?;
    compare(&tgt, &report.model)?;
    Ok(())
}

#[test]
fn speed_limit_pause_resume_and_cancel() -> Result<()> {
    let dir = shm("mirror-speed")?;
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 64 * MIB;
    let model = make_image(&src, size, 1)?;
    let d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    let speed = 4 * MIB;
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "s", "speed": speed}),
    )?;
    std::thread::sleep(Duration::from_millis(400));
    // Only the limit is asserted: a loaded machine may copy more slowly,
    // never faster. The window is measured from before the first query to
    // after the second, so it can only be overestimated.
    let t1 = Instant::now();
    let o1 = block_job(&mut q)?["offset"].as_u64().unwrap_or(0);
    std::thread::sleep(Duration::from_millis(2500));
    let o2 = block_job(&mut q)?["offset"].as_u64().unwrap_or(0);
    let window = t1.elapsed().as_secs_f64();
    // One copy (at most a tenth of a second's worth) may be in flight or
    // not yet reported at either end.
    let allowed = speed as f64 * window + 2.0 * MIB as f64;
    ensure!(
        (o2 - o1) as f64 <= allowed,
        "copied {} bytes in {window:.2} s with speed {} MiB/s",
        o2 - o1,
        speed / MIB
    );
    eprintln!(
        "observed {:.2} MiB/s with speed {} MiB/s",
        (o2 - o1) as f64 / window / MIB as f64,
        speed / MIB
    );

    q.ok("job-pause", json!({"id": "s"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("paused"))?;
    let a = block_job(&mut q)?;
    ensure!(a["paused"] == true && a["busy"] == false, "{a}");
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        block_job(&mut q)?["offset"] == a["offset"],
        "copying went on while paused"
    );
    let e = q.err("block-job-cancel", json!({"device": "s"}))?;
    assert_eq!(e.desc, "The block job for device 's' is currently paused");
    q.ok("block-job-resume", json!({"device": "s"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("running"))?;
    let t0 = Instant::now();
    while block_job(&mut q)?["offset"].as_u64() <= a["offset"].as_u64() {
        ensure!(t0.elapsed() < T, "no progress after resume");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Cancel before READY: BLOCK_JOB_CANCELLED, the guest stays on the source.
    q.ok("block-job-cancel", json!({"device": "s"}))?;
    let c = q.wait_event("BLOCK_JOB_CANCELLED", T, |_| true)?;
    ensure!(
        c["data"]["offset"].as_u64() < Some(size),
        "cancelled after copying all: {c}"
    );
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    ensure!(image_file(&mut q)? == src.canonicalize()?);

    // Cancel after READY (block-job-cancel, not forced): BLOCK_JOB_COMPLETED,
    // no pivot, and the target is a copy of the disk at that moment.
    let load = WriteLoad::start(d.client()?, model, load_cfg(size))?;
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "s2"}),
    )?;
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    load.wait_requests(500, T)?;
    let mut report = load.stop().context("the client saw an error")?;
    q.ok("block-job-cancel", json!({"device": "s2"}))?;
    q.wait_event("BLOCK_JOB_COMPLETED", T, |_| true)?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    ensure!(
        image_file(&mut q)? == src.canonicalize()?,
        "soft cancel switched images"
    );
    compare(&tgt, &report.model)?;
    // Writes after the cancel stay on the source.
    report.client.write(0, &pattern(0, 999, 4096))?;
    let t = std::fs::read(&tgt)?;
    ensure!(
        t[..4096] == report.model[..4096],
        "a write after the cancel reached the target"
    );
    reads_come_from(&mut report, &src, &tgt)?;
    Ok(())
}

/// Client threads, one per queue, whose writes overlap on purpose: all of
/// them write into the first `span` bytes, 4 KiB writes, write-zeroes and
/// discards inside 64 KiB chunks and whole-chunk writes, eight in flight
/// per queue, so that requests from both queues are often in flight on one
/// chunk at once. No model: the test compares target and source after they
/// stopped. Stopping hands the queues back for the next batch.
struct OverlapLoad {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<Queue>>>,
}

const CHUNK: u64 = 64 * 1024;

impl OverlapLoad {
    fn start(queues: Vec<Queue>, span: u64) -> OverlapLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let threads = queues
            .into_iter()
            .map(|mut q| {
                let (stop, done) = (stop.clone(), done.clone());
                std::thread::spawn(move || -> Result<Queue> {
                    const QD: usize = 8;
                    let slot_len = CHUNK as usize;
                    let mut buf = q.alloc_buffer(QD * slot_len)?;
                    let mut x = 0x6a09_e667_f3bc_c909u64 ^ ((q.index() as u64 + 1) << 32);
                    let mut free: Vec<usize> = (0..QD).collect();
                    let mut completed = Vec::new();
                    loop {
                        while !stop.load(Ordering::Relaxed) {
                            let Some(slot) = free.pop() else { break };
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let c = (x >> 8) % (span / CHUNK);
                            let small = c * CHUNK + (x >> 32) % (CHUNK / 4096) * 4096;
                            let base = slot * slot_len;
                            match x % 32 {
                                0 => q.submit_discard(small, 4096, slot as u64)?,
                                1 | 2 => {
                                    q.submit_write_zeroes(small, 4096, x & 64 != 0, slot as u64)?
                                }
                                3..=10 => {
                                    let data = pattern(c, x, slot_len);
                                    buf.as_mut_slice()[base..base + slot_len]
                                        .copy_from_slice(&data);
                                    q.submit_write(
                                        c * CHUNK,
                                        &buf,
                                        base..base + slot_len,
                                        slot as u64,
                                    )?;
                                }
                                _ => {
                                    let data = pattern(small, x, 4096);
                                    buf.as_mut_slice()[base..base + 4096].copy_from_slice(&data);
                                    q.submit_write(small, &buf, base..base + 4096, slot as u64)?;
                                }
                            }
                        }
                        if q.in_flight() == 0 {
                            return Ok(q);
                        }
                        completed.clear();
                        q.wait(1, &mut completed)?;
                        for d in &completed {
                            d.result(|| format!("queue {} request", q.index()))?;
                            free.push(d.user_data as usize);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        OverlapLoad {
            stop,
            done,
            threads,
        }
    }

    /// Waits until `more` requests have completed from now on.
    fn wait_requests(&self, more: u64) -> Result<()> {
        let goal = self.done.load(Ordering::Relaxed) + more;
        let t0 = Instant::now();
        while self.done.load(Ordering::Relaxed) < goal {
            ensure!(
                t0.elapsed() < T && !self.threads.iter().any(|t| t.is_finished()),
                "the clients did not complete {more} requests"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Stops after the requests in flight; returns the queues.
    fn stop(self) -> Result<Vec<Queue>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
            })
            .collect()
    }
}

/// Two queues of a libblkio client write overlapping requests (see
/// [`OverlapLoad`]) into the same 2 MiB of vubd's disk while it mirrors:
/// during the first pass, then in READY (and across `block-job-change`
/// if `change`); then the job completes (or is cancelled after READY) and
/// the target must equal the source byte for byte.
fn overlapping_queues(tag: &str, copy_mode: &str, change: bool, cancel: bool) -> Result<()> {
    let dir = shm(tag)?;
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 16 * MIB;
    make_image(&src, size, 1)?;
    let d = MirrorDaemon::start(dir.path(), &src, &["--queues", "2"])?;
    let mut q = d.qmp()?;
    let mut client = Client::connect(&d.socket, 2, false)?;
    ensure!(client.num_queues() == 2, "{} queues", client.num_queues());
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "o",
               "granularity": CHUNK, "copy-mode": copy_mode}),
    )?;
    let load = OverlapLoad::start(client.take_queues(), 2 * MIB);
    load.wait_requests(2000)?;
    let queues = load.stop()?;
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    let load = OverlapLoad::start(queues, 2 * MIB);
    load.wait_requests(2000)?;
    if change {
        q.ok(
            "block-job-change",
            json!({"id": "o", "type": "mirror", "copy-mode": "write-blocking"}),
        )?;
        load.wait_requests(2000)?;
    }
    drop(load.stop()?);
    if cancel {
        q.ok("block-job-cancel", json!({"device": "o"}))?;
    } else {
        q.ok("job-complete", json!({"id": "o"}))?;
    }
    q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d.get("error").is_none())?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    let active = image_file(&mut q)?;
    let expect = if cancel { &src } else { &tgt };
    ensure!(
        active == expect.canonicalize()?,
        "the disk is on {}",
        active.display()
    );
    compare(&tgt, &std::fs::read(&src)?)?;
    Ok(())
}

#[test]
fn overlapping_queues_background() -> Result<()> {
    overlapping_queues("mirror-ov-bg", "background", false, false)
}

#[test]
fn overlapping_queues_write_blocking() -> Result<()> {
    overlapping_queues("mirror-ov-wb", "write-blocking", false, false)
}

#[test]
fn overlapping_queues_write_blocking_cancel_after_ready() -> Result<()> {
    overlapping_queues("mirror-ov-wbc", "write-blocking", false, true)
}

#[test]
fn overlapping_queues_across_a_change_to_write_blocking() -> Result<()> {
    overlapping_queues("mirror-ov-chg", "background", true, false)
}

/// Mounts a tmpfs of `size` at `dir`; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .context("cannot run mount")?;
        ensure!(
            st.success(),
            "mount -t tmpfs failed ({st}): this test needs root"
        );
        Ok(Tmpfs(dir.to_path_buf()))
    }

    /// Resizes the mount. Shrinking below a removed file's size fails while
    /// a process still has it open: vubd must have closed it by then.
    fn resize(&self, size: &str) -> Result<()> {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()?;
        ensure!(st.success(), "remount to {size} failed: {st}");
        Ok(())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_target_under_each_error_policy() -> Result<()> {
    let dir = shm("mirror-enospc")?;
    let src = dir.join("src.img");
    let size = 32 * MIB;
    let model = make_image(&src, size, 1)?;
    let small = Tmpfs::mount(&dir.join("small"), "8M")?;
    let tgt = small.0.join("tgt.img");
    let d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    let load = WriteLoad::start(d.client()?, model, load_cfg(size))?;

    // report: the job ends with the error; the guest carries on.
    q.ok("drive-mirror", json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "r", "on-target-error": "report", "auto-dismiss": false}))?;
    q.wait_event("BLOCK_JOB_ERROR", T, |d| {
        d["action"] == "report" && d["operation"] == "write"
    })?;
    let done = q.wait_event("BLOCK_JOB_COMPLETED", T, |_| true)?;
    assert_eq!(done["data"]["error"], "No space left on device");
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("concluded"))?;
    assert_eq!(block_job(&mut q)?["error"], "No space left on device");
    q.ok("job-dismiss", json!({"id": "r"}))?;

    // ignore: retried until there is room.
    q.ok("drive-mirror", json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "i", "on-target-error": "ignore"}))?;
    q.wait_event("BLOCK_JOB_ERROR", T, |d| d["action"] == "ignore")?;
    q.wait_event("BLOCK_JOB_ERROR", T, |d| d["action"] == "ignore")?;
    ensure!(block_job(&mut q)?["status"] == "running");
    small.resize("64M")?;
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    q.ok("job-cancel", json!({"id": "i"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;

    // stop: paused with io-status nospace; resume after making room.
    // The cancelled job lets go of its target as it is torn down, just
    // after its `null` event: wait for that, then the space is free.
    wait_closed(d.daemon.pid(), &tgt)?;
    std::fs::remove_file(&tgt)?;
    small.resize("8M")?;
    q.ok("drive-mirror", json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "st", "on-target-error": "stop"}))?;
    q.wait_event("BLOCK_JOB_ERROR", T, |d| d["action"] == "stop")?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("paused"))?;
    let info = block_job(&mut q)?;
    ensure!(
        info["io-status"] == "nospace" && info["paused"] == true,
        "{info}"
    );
    small.resize("64M")?;
    q.ok("job-resume", json!({"id": "st"}))?;
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    ensure!(block_job(&mut q)?["io-status"] == "ok");
    q.ok("job-complete", json!({"id": "st"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    std::thread::sleep(Duration::from_millis(200));
    let report = load.stop().context("the client saw an error")?;
    compare(&tgt, &report.model)?;
    drop(d);
    Ok(())
}

#[test]
fn kill_and_resume_copies_only_the_dirty_part() -> Result<()> {
    let dir = shm("mirror-resume")?;
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 64 * MIB;
    let span = 4 * MIB;
    let speed = 8 * MIB;
    let model = make_image(&src, size, 1)?;
    let mut d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    // The guest keeps rewriting the first 4 MiB while the mirror copies.
    let load = WriteLoad::start(d.client()?, model, load_cfg(span))?;
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "k", "speed": speed}),
    )?;
    // Until 20 MiB are copied (2.5 s at this speed; 52 MiB, the most the
    // test allows, would take 4 s more).
    let t0 = Instant::now();
    while block_job(&mut q)?["offset"].as_u64().unwrap_or(0) < 20 * MIB {
        ensure!(t0.elapsed() < T, "the first life never copied 20 MiB");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut report = load.stop().context("the client saw an error")?;
    // A last burst of completed writes all over the disk, then kill -9.
    let mut extra = 0;
    for i in 0..32u64 {
        let off = (i * 2 + 1) * MIB + 4096;
        let data = pattern(off, 7777, 4096);
        report.client.write(off, &data)?;
        report.model[off as usize..off as usize + 4096].copy_from_slice(&data);
        extra += 64 * 1024;
    }
    let copied = block_job(&mut q)?["offset"].as_u64().unwrap_or(0);
    d.daemon.kill();
    drop(q);
    ensure!(
        copied > 12 * MIB && copied < size - 12 * MIB,
        "copied {copied} of {size} before the kill"
    );
    let mut model = report.model;
    drop(report.client);

    // Same arguments again. Writes before the resume command are tracked.
    let d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    let mut client = d.client()?;
    for i in 0..16u64 {
        let off = i * 3 * MIB + 8192;
        let data = pattern(off, 8888, 4096);
        client.write(off, &data)?;
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
        extra += 64 * 1024;
    }
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "k", "x-resume": true}),
    )?;
    let ready = q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    let resumed = ready["data"]["len"].as_u64().unwrap_or(0);
    // Not copied again: what was done before the last checkpoint (every
    // 0.5 s, so up to speed/2 of progress is redone), minus the chunks the
    // guest wrote since.
    let bound = (size - copied) + span + extra + speed / 2 + 2 * MIB;
    ensure!(
        resumed <= bound && resumed < size - 8 * MIB,
        "the resumed mirror copied {resumed} bytes; {copied} of {size} were done before the kill (bound {bound})"
    );
    let load = WriteLoad::start(client, model, load_cfg(size))?;
    load.wait_requests(200, T)?;
    q.ok("job-complete", json!({"id": "k"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    let report = load.stop().context("the client saw an error")?;
    compare(&tgt, &report.model)?;
    eprintln!("copied {copied} before the kill; the resumed job copied {resumed}");
    Ok(())
}

/// Persistent dirty bitmaps belong to the disk: after a pivot they keep
/// recording, their sidecar sits beside the new image, and vubd restarted on
/// the new image (even after kill -9) finds them with every change.
#[test]
fn persistent_bitmaps_follow_the_disk_across_a_pivot() -> Result<()> {
    let dir = shm("mirror-bitmaps")?;
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    let size = 32 * MIB;
    make_image(&src, size, 4)?;
    let mut d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "backup", "persistent": true, "granularity": 65536}),
    )?;
    let mut client = d.client()?;
    client.write(MIB, &pattern(MIB, 1, 4096))?;
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "format": "raw", "job-id": "m"}),
    )?;
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    q.ok("job-complete", json!({"id": "m"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    ensure!(image_file(&mut q)? == tgt.canonicalize()?, "no pivot");
    let sidecar = |img: &Path| PathBuf::from(format!("{}.vubd-bitmaps", img.display()));
    ensure!(sidecar(&tgt).exists(), "no sidecar beside the new image");
    let old_sidecar = std::fs::read(sidecar(&src))?;

    // Written after the pivot: lands on the target and in the bitmap.
    client.write(9 * MIB, &pattern(9 * MIB, 2, 4096))?;
    client.write(17 * MIB + 65536, &pattern(17 * MIB, 3, 4096))?;
    let bitmap = |q: &mut QmpClient| -> Result<Value> {
        let v = q.ok("query-block", json!({}))?;
        v[0]["inserted"]["dirty-bitmaps"][0]
            .clone()
            .as_object()
            .cloned()
            .map(Value::Object)
            .context("no bitmap")
    };
    let before = bitmap(&mut q)?;
    ensure!(
        before["count"] == 3 * 65536,
        "three chunks written: {before}"
    );
    let hash = q.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "disk0", "name": "backup"}),
    )?;
    ensure!(
        std::fs::read(sidecar(&src))? == old_sidecar,
        "the old sidecar changed after the pivot"
    );

    // kill -9, then restart on the new image: the bitmap is all there.
    drop(client);
    drop(q);
    d.daemon.kill();
    let d = MirrorDaemon::start(dir.path(), &tgt, &[])?;
    let mut q = d.qmp()?;
    let after = bitmap(&mut q)?;
    ensure!(
        after["name"] == "backup" && after["persistent"] == true,
        "{after}"
    );
    ensure!(after["inconsistent"] == false, "{after}");
    let hash_after = q.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "disk0", "name": "backup"}),
    )?;
    // Recovery after kill -9 may over-mark (whole logged extents), never miss:
    // the exact bits come back after a clean stop, so compare the counts.
    ensure!(
        after["count"].as_u64() >= before["count"].as_u64(),
        "bitmap lost changes across the pivot and kill: {before} -> {after}"
    );
    q.ok("quit", json!({}))?;
    let mut d2 = d;
    d2.daemon.wait_exit(Duration::from_secs(10))?;
    let d = MirrorDaemon::start(dir.path(), &tgt, &[])?;
    let mut q = d.qmp()?;
    let clean = q.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "disk0", "name": "backup"}),
    )?;
    ensure!(clean == hash_after, "a clean restart changed the bits");
    ensure!(
        hash_after == hash || after["count"].as_u64() > before["count"].as_u64(),
        "same count, different bits"
    );
    Ok(())
}

/// Runs the same scenarios against qemu-storage-daemon and vubd and
/// compares the event sequences and error texts.
#[test]
fn events_and_errors_match_qemu_storage_daemon() -> Result<()> {
    let dir = shm("mirror-qsd")?;
    let src = dir.join("src.img");
    let size = 32 * MIB;
    make_image(&src, size, 1)?;
    let (t1, t2) = (dir.join("t1.img"), dir.join("t2.img"));
    for t in [&t1, &t2] {
        std::fs::File::create(t)?.set_len(size)?;
    }

    // qemu-storage-daemon with the source and two target nodes.
    let qsd_qmp = dir.join("qsd-qmp.sock");
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk0,filename={}",
            src.display()
        ))
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=t1,filename={}",
            t1.display()
        ))
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=t2,filename={}",
            t2.display()
        ))
        .arg("--chardev")
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            qsd_qmp.display()
        ))
        .arg("--monitor")
        .arg("chardev=m0");
    let _qsd = Daemon::spawn(cmd, &qsd_qmp, "qemu-storage-daemon")?;
    let mut qsd = QmpClient::connect(&qsd_qmp, T)?;

    let vdir = dir.join("v");
    std::fs::create_dir_all(&vdir)?;
    let v = MirrorDaemon::start(&vdir, &src, &[])?;
    let mut vubd = v.qmp()?;
    // The same nodes as qemu-storage-daemon's command line has.
    for (name, file) in [("t1", &t1), ("t2", &t2)] {
        vubd.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": name, "filename": file}),
        )?;
    }

    type Scenario = fn(&mut QmpClient, &str, &str) -> Result<Vec<String>>;
    fn events(q: &mut QmpClient) -> Vec<String> {
        let names = q.history_names();
        q.clear_history();
        names
    }
    let complete: Scenario = |q, target, _| {
        q.ok(
            "blockdev-mirror",
            json!({"device": "disk0", "target": target, "sync": "full", "job-id": "a"}),
        )?;
        q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
        q.ok("job-complete", json!({"id": "a"}))?;
        q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
        Ok(events(q))
    };
    let soft_cancel: Scenario = |q, _, target| {
        q.ok(
            "blockdev-mirror",
            json!({"device": "disk0", "target": target, "sync": "full", "job-id": "b"}),
        )?;
        q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
        q.ok("block-job-cancel", json!({"device": "b"}))?;
        q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
        Ok(events(q))
    };
    let manual: Scenario = |q, _, target| {
        q.ok("blockdev-mirror", json!({"device": "disk0", "target": target, "sync": "full", "job-id": "c", "auto-finalize": false, "auto-dismiss": false}))?;
        q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
        let mut errs = Vec::new();
        for (cmd, args) in [
            ("job-finalize", json!({"id": "c"})),
            ("job-dismiss", json!({"id": "c"})),
            ("job-resume", json!({"id": "c"})),
            ("job-pause", json!({"id": "nope"})),
            ("block-job-pause", json!({"device": "nope"})),
        ] {
            let e: QmpErrorReply = q.err(cmd, args)?;
            errs.push(format!("{cmd}: {}", e));
        }
        q.ok("job-complete", json!({"id": "c"}))?;
        q.wait_event("BLOCK_JOB_PENDING", T, |_| true)?;
        let info = q.ok("query-jobs", json!({}))?;
        errs.push(format!("query-jobs status {}", info[0]["status"]));
        q.ok("job-finalize", json!({"id": "c"}))?;
        q.wait_event("JOB_STATUS_CHANGE", T, status_is("concluded"))?;
        q.ok("job-dismiss", json!({"id": "c"}))?;
        q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
        let mut out = events(q);
        out.extend(errs);
        Ok(out)
    };
    // On vubd, "manual finalize" moved the disk onto the second target: a
    // mirror onto it now is one into itself.
    let cancel_running: Scenario = |q, target, _| {
        q.ok("blockdev-mirror", json!({"device": "disk0", "target": target, "sync": "full", "job-id": "d", "speed": 1 << 20, "auto-dismiss": false}))?;
        q.wait_event("JOB_STATUS_CHANGE", T, status_is("running"))?;
        let e = q.err("job-complete", json!({"id": "d"}))?;
        let mut out = vec![e.desc];
        q.ok("job-pause", json!({"id": "d"}))?;
        out.push(q.err("job-pause", json!({"id": "d"}))?.desc);
        q.ok("job-resume", json!({"id": "d"}))?;
        q.ok("job-cancel", json!({"id": "d"}))?;
        q.wait_event("JOB_STATUS_CHANGE", T, status_is("concluded"))?;
        out.push(format!(
            "error: {}",
            q.ok("query-jobs", json!({}))?[0]["error"]
        ));
        q.ok("job-dismiss", json!({"id": "d"}))?;
        q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
        let mut ev = events(q);
        // A pause may be requested and lifted before the job reaches a
        // pause point: only compare the rest.
        ev.retain(|e| e != "paused" && e != "running");
        ev.extend(out);
        Ok(ev)
    };
    let bad_args: Scenario = |q, target, _| {
        let mut out = Vec::new();
        for extra in [
            json!({"granularity": 1000}),
            json!({"granularity": 256}),
            json!({"buf-size": -1}),
            json!({"speed": -1}),
            json!({"sync": "incremental"}),
            json!({"job-id": "a b"}),
            json!({"device": "nope"}),
        ] {
            let mut args =
                json!({"device": "disk0", "target": target, "sync": "full", "job-id": "x"});
            for (k, val) in extra.as_object().into_iter().flatten() {
                args[k] = val.clone();
            }
            out.push(q.err("blockdev-mirror", args)?.desc);
        }
        out.extend(events(q));
        Ok(out)
    };
    // `complete` last: on qemu-storage-daemon the pivot replaces node disk0.
    for (name, scenario) in [
        ("soft cancel", soft_cancel),
        ("manual finalize", manual),
        ("cancel while running", cancel_running),
        ("bad arguments", bad_args),
        ("complete", complete),
    ] {
        let want = scenario(&mut qsd, "t1", "t2")
            .with_context(|| format!("{name} on qemu-storage-daemon"))?;
        let got = scenario(&mut vubd, "t1", "t2").with_context(|| format!("{name} on vubd"))?;
        if got != want {
            bail!(
                "{name}: vubd differs from qemu-storage-daemon\n  qsd:  {want:?}\n  vubd: {got:?}"
            );
        }
    }
    Ok(())
}

/// The benchmark figures (tests::bench_mirror), on demand:
/// `cargo test --release -p tests --test mirror -- --ignored --nocapture mirror_benchmark`
/// (`VUBD_BENCH_MIB` sets the bulk image size, default 1024; `VUBD_BENCH_RUNS`
/// the repetitions, default 3; `VUBD_BENCH_SLOW_DIR` a directory on a real
/// file system for the pivot figures' targets, default /var/tmp;
/// `VUBD_BENCH_PIVOT_ONLY=1` runs only those).
#[test]
#[ignore]
fn mirror_benchmark() -> Result<()> {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let cfg = tests::bench_mirror::BenchConfig {
        size: env("VUBD_BENCH_MIB", 1024) * MIB,
        runs: env("VUBD_BENCH_RUNS", 3) as usize,
        ..Default::default()
    };
    let cfg = match std::env::var_os("VUBD_BENCH_SLOW_DIR") {
        Some(dir) => tests::bench_mirror::BenchConfig {
            slow_dir: dir.into(),
            ..cfg
        },
        None => cfg,
    };
    let rows = if std::env::var_os("VUBD_BENCH_PIVOT_ONLY").is_some() {
        tests::bench_mirror::pivot_pause_rows(&cfg)?
    } else {
        tests::bench_mirror::run(&cfg)?
    };
    println!("{}", tests::bench_mirror::markdown(&rows));
    Ok(())
}

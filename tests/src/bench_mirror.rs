//! The live mirror measured on a real vubd: a libblkio write load that keeps
//! a model of what it wrote (shared with tests/tests/mirror.rs), and the
//! benchmark figures of issue 4:
//!
//! - bulk-phase throughput of a 1 GiB mirror on /dev/shm (time to
//!   BLOCK_JOB_READY) against `cp --sparse=always` of the same file in the
//!   same run, for a fully written and a half-sparse image;
//! - the guest-visible stall at the pivot: the client's largest request
//!   latency around `job-complete` with 2 MiB still dirty, next to its
//!   largest latency without any mirror;
//! - time to READY and time from `job-complete` to BLOCK_JOB_COMPLETED
//!   under a steady 4 KiB random-write load, background vs write-blocking;
//! - the pivot's guest-visible pause on a disk with a persistent 4 KiB
//!   bitmap (its sidecar moves at the pivot) and the target on a real file
//!   system (its flushes reach a device), per I/O engine, under a paced and
//!   a flat-out load ([`pivot_pause_rows`]).
//!
//! [`run`] returns rows; [`markdown`] renders them for README.md. Each
//! figure is the median of `runs` repetitions.

use crate::client::Client;
use crate::daemon::{Daemon, ScratchDir};
use crate::qmp_client::QmpClient;
use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Deterministic bytes for (block, generation).
pub fn pattern(block: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes an image of `size` bytes with data in every `data_every`-th MiB
/// (1: fully written, 2: half sparse) and returns its contents.
pub fn make_image(path: &Path, size: u64, data_every: u64) -> Result<Vec<u8>> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)?;
    let mut model = vec![0u8; size as usize];
    let mut off = 0;
    while off < size {
        let n = MIB.min(size - off);
        if (off / MIB).is_multiple_of(data_every) {
            let data = pattern(off / MIB, 0, n as usize);
            f.write_all_at(&data, off)?;
            model[off as usize..(off + n) as usize].copy_from_slice(&data);
        }
        off += n;
    }
    Ok(model)
}

/// Shape of a [`WriteLoad`].
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Bytes per request.
    pub block: u64,
    /// The load writes into `[0, span)`.
    pub span: u64,
    /// Requests in flight (never two on the same block).
    pub queue_depth: usize,
    /// Pause after each completion (a steady rather than a flat-out load).
    pub pace: Option<Duration>,
    /// Every n-th request is a write-zeroes instead of a write.
    pub zeroes_every: Option<u64>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            block: 4096,
            span: 64 * MIB,
            queue_depth: 4,
            pace: None,
            zeroes_every: Some(16),
        }
    }
}

/// What a load did.
pub struct LoadReport {
    /// The disk contents the load expects (initial model plus its writes).
    pub model: Vec<u8>,
    /// Requests completed.
    pub requests: u64,
    /// (submission time since the load started, latency) of every request.
    pub samples: Vec<(Duration, Duration)>,
    /// When the load started.
    pub started: Instant,
    /// The client, for reads afterwards.
    pub client: Client,
}

impl LoadReport {
    /// Largest latency of requests that were in flight at some point of
    /// `[from, to]`.
    pub fn max_latency_between(&self, from: Instant, to: Instant) -> Duration {
        let (f, t) = (
            from.saturating_duration_since(self.started),
            to.saturating_duration_since(self.started),
        );
        self.samples
            .iter()
            .filter(|(s, l)| *s <= t && *s + *l >= f)
            .map(|(_, l)| *l)
            .max()
            .unwrap_or_default()
    }

    /// Largest latency overall.
    pub fn max_latency(&self) -> Duration {
        self.samples
            .iter()
            .map(|(_, l)| *l)
            .max()
            .unwrap_or_default()
    }
}

/// A libblkio client writing random blocks with recorded patterns on its
/// own thread; any request error ends it with that error.
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    /// Requests completed so far.
    done: Arc<AtomicU64>,
    thread: JoinHandle<Result<LoadReport>>,
}

impl WriteLoad {
    /// Starts writing through `client` (queue 0); `model` is the disk's
    /// contents now.
    pub fn start(client: Client, model: Vec<u8>, cfg: LoadConfig) -> Result<WriteLoad> {
        ensure!(cfg.span <= model.len() as u64 && cfg.block > 0 && cfg.queue_depth > 0);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (stop2, done2) = (stop.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("write-load".into())
            .spawn(move || load_loop(client, model, cfg, stop2, done2))
            .context("cannot start the load thread")?;
        Ok(WriteLoad { stop, done, thread })
    }

    /// Waits until `more` requests have completed from now on (tests count
    /// the guest's writes rather than trusting a sleep to have seen some).
    pub fn wait_requests(&self, more: u64, timeout: Duration) -> Result<()> {
        let goal = self.done.load(Ordering::Relaxed) + more;
        let t0 = Instant::now();
        while self.done.load(Ordering::Relaxed) < goal {
            ensure!(
                t0.elapsed() < timeout && !self.thread.is_finished(),
                "the load did not complete {more} requests"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Stops the load after the requests in flight and returns its report.
    pub fn stop(self) -> Result<LoadReport> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))?
    }
}

/// A request of the load in flight: (block, data or `None` for zeroes,
/// submitted at).
type InFlight = (u64, Option<Vec<u8>>, Instant);

fn load_loop(
    mut client: Client,
    mut model: Vec<u8>,
    cfg: LoadConfig,
    stop: Arc<AtomicBool>,
    done_count: Arc<AtomicU64>,
) -> Result<LoadReport> {
    let started = Instant::now();
    let bs = cfg.block as usize;
    let qd = cfg.queue_depth;
    let blocks = cfg.span / cfg.block;
    let mut buf = client.alloc_buffer(bs * qd)?;
    let mut slots: Vec<Option<InFlight>> = vec![None; qd];
    let mut samples = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut seq = 0u64;
    let mut requests = 0u64;
    let mut done = Vec::new();
    loop {
        // Borrowed per round, so the client keeps its queue for later reads.
        let queue = client.queue(0)?;
        let stopping = stop.load(Ordering::SeqCst);
        if !stopping {
            for slot in 0..qd {
                if slots[slot].is_some() {
                    continue;
                }
                let block = loop {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let b = x % blocks;
                    if !slots.iter().flatten().any(|(ob, _, _)| *ob == b) {
                        break b;
                    }
                };
                seq += 1;
                let off = block * cfg.block;
                let now = Instant::now();
                if cfg.zeroes_every.is_some_and(|n| seq.is_multiple_of(n)) {
                    queue.submit_write_zeroes(
                        off,
                        cfg.block,
                        seq.is_multiple_of(2),
                        slot as u64,
                    )?;
                    slots[slot] = Some((block, None, now));
                } else {
                    let data = pattern(block, seq, bs);
                    buf.as_mut_slice()[slot * bs..(slot + 1) * bs].copy_from_slice(&data);
                    queue.submit_write(off, &buf, slot * bs..(slot + 1) * bs, slot as u64)?;
                    slots[slot] = Some((block, Some(data), now));
                }
            }
        }
        if slots.iter().all(Option::is_none) {
            break;
        }
        done.clear();
        queue.wait(1, &mut done)?;
        for d in &done {
            let slot = d.user_data as usize;
            let Some((block, data, at)) = slots.get_mut(slot).and_then(Option::take) else {
                bail!("completion for an unknown slot {slot}");
            };
            d.result(|| format!("write of block {block}"))?;
            let off = (block * cfg.block) as usize;
            match data {
                Some(d) => model[off..off + bs].copy_from_slice(&d),
                None => model[off..off + bs].fill(0),
            }
            samples.push((at.duration_since(started), at.elapsed()));
            requests += 1;
            done_count.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(p) = cfg.pace {
            std::thread::sleep(p);
        }
    }
    Ok(LoadReport {
        model,
        requests,
        samples,
        started,
        client,
    })
}

/// A vubd serving `image` with a QMP socket, in `dir`.
pub struct MirrorDaemon {
    /// The daemon.
    pub daemon: Daemon,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The QMP socket.
    pub qmp_path: PathBuf,
}

impl MirrorDaemon {
    /// Starts vubd on `image` with `--qmp` (sockets in `dir`), plus `extra`.
    pub fn start(dir: &Path, image: &Path, extra: &[&str]) -> Result<MirrorDaemon> {
        let socket = dir.join("vhost.sock");
        let qmp_path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let qmp_arg = qmp_path.to_string_lossy().into_owned();
        let mut args = vec!["--qmp", qmp_arg.as_str()];
        args.extend_from_slice(extra);
        let daemon = Daemon::vubd(&socket, image, &args)?;
        crate::qmp_client::wait_for_socket(&qmp_path, Duration::from_secs(10))?;
        Ok(MirrorDaemon {
            daemon,
            socket,
            qmp_path,
        })
    }

    /// A negotiated QMP connection.
    pub fn qmp(&self) -> Result<QmpClient> {
        QmpClient::connect(&self.qmp_path, Duration::from_secs(60))
    }

    /// A libblkio client with one queue.
    pub fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.socket, 1, false)?)
    }
}

/// One benchmark figure.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// The figure.
    pub value: String,
    /// How to read it.
    pub note: String,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Where the images go (tmpfs: /dev/shm).
    pub dir: PathBuf,
    /// Image size for the bulk figures.
    pub size: u64,
    /// Repetitions per figure (the median is reported).
    pub runs: usize,
    /// A directory on a real file system (not tmpfs) for slow targets.
    pub slow_dir: PathBuf,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            dir: PathBuf::from("/dev/shm"),
            size: 1 << 30,
            runs: 3,
            slow_dir: PathBuf::from("/var/tmp"),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn cp_sparse(src: &Path, dst: &Path) -> Result<Duration> {
    let _ = std::fs::remove_file(dst);
    let t0 = Instant::now();
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(dst)
        .status()
        .context("cannot run cp")?;
    let took = t0.elapsed();
    ensure!(st.success(), "cp failed: {st}");
    Ok(took)
}

/// Time from `drive-mirror` to BLOCK_JOB_READY for `image` -> `target`.
fn mirror_bulk(dir: &Path, image: &Path, target: &Path) -> Result<Duration> {
    let _ = std::fs::remove_file(target);
    let d = MirrorDaemon::start(dir, image, &[])?;
    let mut q = d.qmp()?;
    let t0 = Instant::now();
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": target, "sync": "full", "job-id": "bulk"}),
    )?;
    q.wait_event("BLOCK_JOB_READY", Duration::from_secs(600), |_| true)?;
    let took = t0.elapsed();
    q.ok("job-cancel", json!({"id": "bulk"}))?;
    q.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(60), |d| {
        d["status"] == "null"
    })?;
    Ok(took)
}

/// Bulk copy: mirror vs cp, `data_every` as in [`make_image`].
fn bulk_rows(cfg: &BenchConfig, data_every: u64, label: &str) -> Result<Vec<Row>> {
    let dir = ScratchDir::new_in(&cfg.dir, "bench-mirror")?;
    let src = dir.join("src.img");
    make_image(&src, cfg.size, data_every)?;
    let (mut cp, mut mirror) = (Vec::new(), Vec::new());
    for _ in 0..cfg.runs {
        cp.push(cp_sparse(&src, &dir.join("cp.img"))?.as_secs_f64());
        let _ = std::fs::remove_file(dir.join("cp.img"));
        mirror.push(mirror_bulk(dir.path(), &src, &dir.join("mirror.img"))?.as_secs_f64());
        let _ = std::fs::remove_file(dir.join("mirror.img"));
    }
    let (cp, mirror) = (median(cp), median(mirror));
    let gib = cfg.size as f64 / (1u64 << 30) as f64;
    Ok(vec![Row {
        name: format!("bulk copy, {label} {gib:.0} GiB image on {}", cfg.dir.display()),
        value: format!("{:.2}x cp", cp / mirror),
        note: format!(
            "mirror to READY {:.0} ms ({:.0} MiB/s of disk), cp --sparse=always {:.0} ms; target >= 0.9x",
            mirror * 1e3,
            cfg.size as f64 / MIB as f64 / mirror,
            cp * 1e3
        ),
    }])
}

/// Dirties `bytes` in distinct 64 KiB chunks with one 4 KiB write each.
fn dirty_chunks(client: &mut Client, model: &mut [u8], bytes: u64, salt: u64) -> Result<()> {
    let chunks = bytes / (64 * 1024);
    let stride = (model.len() as u64 / (64 * 1024) / chunks).max(1) * 64 * 1024;
    for i in 0..chunks {
        let off = i * stride + 8192;
        let data = pattern(off, salt, 4096);
        client.write(off, &data)?;
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    Ok(())
}

/// Pivot stall with 2 MiB dirty under a QD1 4 KiB write load, plus the
/// same load's largest latency without a mirror.
fn stall_rows(cfg: &BenchConfig) -> Result<Vec<Row>> {
    let size = 256 * MIB;
    let (mut stalls, mut baselines, mut pauses) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..cfg.runs {
        let dir = ScratchDir::new_in(&cfg.dir, "bench-stall")?;
        let src = dir.join("src.img");
        let mut model = make_image(&src, size, 2)?;
        let d = MirrorDaemon::start(dir.path(), &src, &[])?;
        let mut q = d.qmp()?;
        // A steady guest: QD1 4 KiB writes with a 200 us think time.
        let load_cfg = LoadConfig {
            queue_depth: 1,
            span: size,
            zeroes_every: None,
            pace: Some(Duration::from_micros(200)),
            ..LoadConfig::default()
        };
        let load = WriteLoad::start(d.client()?, model, load_cfg.clone())?;
        std::thread::sleep(Duration::from_millis(500));
        let base = load.stop()?;
        baselines.push(base.max_latency().as_secs_f64());
        model = base.model;
        let tgt = dir.join("tgt.img");
        q.ok(
            "drive-mirror",
            json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "p"}),
        )?;
        q.wait_event("BLOCK_JOB_READY", Duration::from_secs(120), |_| true)?;
        // 2 MiB dirty, then the load runs while complete converges and pivots.
        q.ok("job-pause", json!({"id": "p"}))?;
        q.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(10), |d| {
            d["status"] == "standby"
        })?;
        let mut client = base.client;
        dirty_chunks(&mut client, &mut model, 2 * MIB, run as u64 + 100)?;
        let load = WriteLoad::start(client, model, load_cfg.clone())?;
        q.ok("job-resume", json!({"id": "p"}))?;
        q.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(10), |d| {
            d["status"] == "ready"
        })?;
        let t0 = Instant::now();
        q.ok("job-complete", json!({"id": "p"}))?;
        q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |_| true)?;
        let t1 = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        let report = load.stop()?;
        stalls.push(report.max_latency_between(t0, t1).as_secs_f64());
        pauses.push((t1 - t0).as_secs_f64());
        let got = std::fs::read(&tgt)?;
        ensure!(
            got == report.model,
            "the target differs from what the client wrote"
        );
    }
    Ok(vec![Row {
        name: "guest-visible stall at pivot (2 MiB dirty, QD1 4 KiB writes, 200 us think time)".into(),
        value: format!("{:.2} ms", median(stalls) * 1e3),
        note: format!(
            "largest request latency around job-complete; same load without a mirror: {:.2} ms; complete -> COMPLETED {:.1} ms; target < 20 ms",
            median(baselines) * 1e3,
            median(pauses) * 1e3
        ),
    }])
}

/// Time to READY and from complete to COMPLETED under a steady 4 KiB
/// random-write load (QD4, paced), for one copy mode.
fn converge_rows(cfg: &BenchConfig, mode: &str) -> Result<Vec<Row>> {
    let size = 256 * MIB;
    let (mut ready, mut complete, mut iops) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.runs {
        let dir = ScratchDir::new_in(&cfg.dir, "bench-conv")?;
        let src = dir.join("src.img");
        let model = make_image(&src, size, 1)?;
        let d = MirrorDaemon::start(dir.path(), &src, &[])?;
        let mut q = d.qmp()?;
        let load = WriteLoad::start(
            d.client()?,
            model,
            LoadConfig {
                queue_depth: 4,
                span: size,
                pace: Some(Duration::from_micros(100)),
                ..LoadConfig::default()
            },
        )?;
        std::thread::sleep(Duration::from_millis(200));
        let tgt = dir.join("tgt.img");
        let t0 = Instant::now();
        q.ok("drive-mirror", json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "c", "copy-mode": mode}))?;
        q.wait_event("BLOCK_JOB_READY", Duration::from_secs(300), |_| true)?;
        ready.push(t0.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(500));
        let t1 = Instant::now();
        q.ok("job-complete", json!({"id": "c"}))?;
        q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(300), |_| true)?;
        complete.push(t1.elapsed().as_secs_f64());
        let report = load.stop()?;
        let secs = report.started.elapsed().as_secs_f64();
        iops.push(report.requests as f64 / secs);
        let got = std::fs::read(&tgt)?;
        ensure!(
            got == report.model,
            "the target differs from what the client wrote"
        );
    }
    Ok(vec![Row {
        name: format!("256 MiB mirror under 4 KiB random writes, {mode}"),
        value: format!(
            "READY {:.0} ms, complete {:.1} ms",
            median(ready) * 1e3,
            median(complete) * 1e3
        ),
        note: format!("load: QD4 paced, {:.0} IOPS during the run", median(iops)),
    }])
}

/// The pivot's guest-visible pause: a `cfg.size` disk (one MiB in 16
/// written) on `cfg.dir` with a persistent bitmap of 4 KiB granularity,
/// mirrored to `cfg.slow_dir`, for each I/O engine, under a paced QD1 load
/// (4 KiB writes, 200 us think time) and a flat-out QD8 one. The figure is
/// the largest latency of the requests around `job-complete`.
pub fn pivot_pause_rows(cfg: &BenchConfig) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for aio in ["sync", "io_uring"] {
        for flat in [false, true] {
            let (mut stalls, mut completes, mut iops) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..cfg.runs {
                let dir = ScratchDir::new_in(&cfg.dir, "bench-pivot")?;
                let slow = ScratchDir::new_in(&cfg.slow_dir, "bench-pivot-tgt")?;
                let src = dir.join("src.img");
                let model = make_image(&src, cfg.size, 16)?;
                let d = MirrorDaemon::start(dir.path(), &src, &["--aio", aio])?;
                let mut q = d.qmp()?;
                q.ok(
                    "block-dirty-bitmap-add",
                    json!({"node": "disk0", "name": "b0", "persistent": true, "granularity": 4096}),
                )?;
                let paced = LoadConfig {
                    queue_depth: 1,
                    span: cfg.size,
                    zeroes_every: None,
                    pace: Some(Duration::from_micros(200)),
                    ..LoadConfig::default()
                };
                let mut load = WriteLoad::start(d.client()?, model, paced)?;
                let tgt = slow.join("tgt.img");
                q.ok(
                    "drive-mirror",
                    json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "v"}),
                )?;
                q.wait_event("BLOCK_JOB_READY", Duration::from_secs(300), |_| true)?;
                if flat {
                    // A flat-out guest never lets a background mirror reach
                    // READY; it starts once the target has caught up.
                    let r = load.stop()?;
                    let flat_cfg = LoadConfig {
                        queue_depth: 8,
                        span: cfg.size,
                        zeroes_every: None,
                        pace: None,
                        ..LoadConfig::default()
                    };
                    load = WriteLoad::start(r.client, r.model, flat_cfg)?;
                }
                std::thread::sleep(Duration::from_millis(300));
                let t0 = Instant::now();
                q.ok("job-complete", json!({"id": "v"}))?;
                q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(300), |_| true)?;
                let t1 = Instant::now();
                std::thread::sleep(Duration::from_millis(100));
                let report = load.stop()?;
                stalls.push(report.max_latency_between(t0, t1).as_secs_f64());
                completes.push((t1 - t0).as_secs_f64());
                iops.push(report.requests as f64 / report.started.elapsed().as_secs_f64());
                let got = std::fs::read(&tgt)?;
                ensure!(
                    got == report.model,
                    "the target differs from what the client wrote"
                );
                let mut sidecar = tgt.clone().into_os_string();
                sidecar.push(".vubd-bitmaps");
                ensure!(
                    Path::new(&sidecar).exists(),
                    "the bitmap sidecar did not move beside the target"
                );
            }
            rows.push(Row {
                name: format!(
                    "pivot pause, {} MiB disk, 4 KiB persistent bitmap, target on {}, --aio {aio}, {}",
                    cfg.size / MIB,
                    cfg.slow_dir.display(),
                    if flat {
                        "flat-out QD8 4 KiB writes"
                    } else {
                        "QD1 4 KiB writes, 200 us think time"
                    }
                ),
                value: format!("{:.1} ms", median(stalls) * 1e3),
                note: format!(
                    "largest request latency around job-complete; complete -> COMPLETED {:.0} ms; load {:.0} IOPS",
                    median(completes) * 1e3,
                    median(iops)
                ),
            });
        }
    }
    Ok(rows)
}

/// Runs every mirror figure.
pub fn run(cfg: &BenchConfig) -> Result<Vec<Row>> {
    if !cfg.dir.is_dir() {
        bail!("{} is not a directory", cfg.dir.display());
    }
    let mut rows = Vec::new();
    rows.extend(bulk_rows(cfg, 1, "fully written")?);
    rows.extend(bulk_rows(cfg, 2, "half-sparse")?);
    rows.extend(stall_rows(cfg)?);
    rows.extend(converge_rows(cfg, "background")?);
    rows.extend(converge_rows(cfg, "write-blocking")?);
    rows.extend(pivot_pause_rows(cfg)?);
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from("| mirror figure | result | notes |\n|---|---|---|\n");
    for r in rows {
        s.push_str(&format!("| {} | {} | {} |\n", r.name, r.value, r.note));
    }
    s
}

//! The changed-block-tracking section of `vubd-bench` (issue 3): what dirty
//! bitmaps cost vubd's write path and a guest flush, and how much a
//! persistent bitmap over-marks after a crash.
//!
//! - **IOPS**: 4 KiB random writes at QD32 with no bitmap, one in-memory
//!   bitmap, one persistent bitmap and four persistent bitmaps (all 64 KiB
//!   granularity). Every measurement starts a fresh vubd (and a fresh
//!   sidecar), adds the bitmaps over QMP, measures, then checks over QMP
//!   that every bitmap really recorded the load. The variants alternate
//!   within each repetition (forwards on even, backwards on odd
//!   repetitions, so no variant always runs first or last); the ratio to
//!   "no bitmap" is the median of the per-repetition ratios.
//! - **Flush latency**: one queue writes 4 KiB at random at QD16 while a
//!   second queue issues write+flush pairs; the flush latencies are the
//!   figure, with no bitmap against one persistent bitmap.
//! - **Over-marking after a crash**: vubd with two persistent bitmaps
//!   (64 KiB and 4 KiB) is killed with SIGKILL at a random instant under a
//!   random-write load (uniform over the disk, or inside one 64 MiB hot
//!   region); the sidecar is recovered with the loader vubd runs at start
//!   (`vubd_backend::dirty::recover`) and compared with the chunks the
//!   client wrote. A restarted vubd must report the same counts, and no
//!   completed write may be missing (that would be a bug, not a figure).
//!
//! Targets from issue 3: one persistent bitmap costs at most 3% of IOPS,
//! and a guest flush's p99 latency grows by at most 10%.

use super::{
    die_with_parent, fill_image, fill_random, load_thread, measure, median, percentile,
    Measurement, Pattern, Rng, Window, Workload,
};
use crate::client::{Client, ConnectOptions, Done, Queue};
use crate::daemon::{process_cpu_time, Daemon, ScratchDir};
use crate::qmp_client::QmpClient;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vubd_backend::dirty::{recover, sidecar_path, FileStore};

mod instructions;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Block size of every request of this section.
const BLOCK: u64 = 4096;
/// vubd's default bitmap granularity, used by the IOPS and flush variants.
const DEFAULT_GRANULARITY: u64 = 64 * KIB;
/// Size of the hot region of the localized over-marking load.
const HOT_REGION: u64 = 64 * MIB;
/// Queue depth of the over-marking load.
const OVERMARK_QD: usize = 32;

/// Issue 3's target: one persistent bitmap keeps at least this share of the
/// IOPS without bitmaps.
pub const TARGET_IOPS_RATIO: f64 = 0.97;
/// Issue 3's target: a guest flush's p99 latency with one persistent bitmap
/// is at most this multiple of the one without bitmaps.
pub const TARGET_FLUSH_P99_RATIO: f64 = 1.10;

/// Which bitmaps a measurement runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// No bitmap at all: the baseline.
    NoBitmap,
    /// One in-memory (non-persistent) bitmap.
    Memory,
    /// One persistent bitmap.
    Persistent1,
    /// Four persistent bitmaps.
    Persistent4,
}

impl Variant {
    /// Every variant of the IOPS table, in table order.
    pub const ALL: [Variant; 4] = [
        Variant::NoBitmap,
        Variant::Memory,
        Variant::Persistent1,
        Variant::Persistent4,
    ];

    /// The label in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Variant::NoBitmap => "none",
            Variant::Memory => "1 in-memory",
            Variant::Persistent1 => "1 persistent",
            Variant::Persistent4 => "4 persistent",
        }
    }

    /// (name, persistent) of each bitmap to add.
    fn bitmaps(self) -> Vec<(String, bool)> {
        match self {
            Variant::NoBitmap => vec![],
            Variant::Memory => vec![("mem".into(), false)],
            Variant::Persistent1 => vec![("p0".into(), true)],
            Variant::Persistent4 => (0..4).map(|i| (format!("p{i}"), true)).collect(),
        }
    }
}

/// Where a measured image lives.
#[derive(Clone, Debug)]
pub struct Storage {
    /// Short name: `shm` or `direct`.
    pub name: String,
    /// Directory of the image (and of its sidecar).
    pub dir: PathBuf,
    /// vubd --direct (O_DIRECT on the image).
    pub direct: bool,
}

impl Storage {
    /// `shm`: a page-cache image in /dev/shm (no disk noise); `direct`: an
    /// O_DIRECT image in `direct_dir` (a real disk).
    pub fn parse(name: &str, direct_dir: &Path) -> Result<Storage> {
        Ok(match name {
            "shm" => Storage {
                name: "shm".into(),
                dir: PathBuf::from("/dev/shm"),
                direct: false,
            },
            "direct" => Storage {
                name: "direct".into(),
                dir: direct_dir.to_path_buf(),
                direct: true,
            },
            other => bail!("unknown bitmap storage {other:?} (known: shm, direct)"),
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} ({}{})",
            self.name,
            self.dir.display(),
            if self.direct { ", O_DIRECT" } else { "" }
        )
    }
}

/// Which parts of the section to run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sections {
    /// The IOPS table.
    pub iops: bool,
    /// The flush latency table.
    pub flush: bool,
    /// The over-marking figure.
    pub overmark: bool,
    /// Instructions per write under callgrind.
    pub instructions: bool,
}

impl Sections {
    /// Whether any part is selected.
    pub fn any(&self) -> bool {
        self.iops || self.flush || self.overmark || self.instructions
    }

    /// Selects the part called `name` (`bitmaps` = all four); false if the
    /// name is not one of this section's.
    pub fn select(&mut self, name: &str) -> bool {
        match name {
            "bitmaps" => {
                self.iops = true;
                self.flush = true;
                self.overmark = true;
                self.instructions = true;
            }
            "bitmap-iops" => self.iops = true,
            "bitmap-instructions" => self.instructions = true,
            "bitmap-flush" => self.flush = true,
            "bitmap-overmark" => self.overmark = true,
            _ => return false,
        }
        true
    }

    /// The names [`Sections::select`] knows.
    pub const NAMES: [&'static str; 5] = [
        "bitmaps",
        "bitmap-iops",
        "bitmap-flush",
        "bitmap-overmark",
        "bitmap-instructions",
    ];
}

/// Parameters of the section.
#[derive(Clone, Debug)]
pub struct Config {
    /// The vubd binary.
    pub vubd: PathBuf,
    /// Image size in bytes.
    pub image_size: u64,
    /// Repetitions of every IOPS and flush measurement.
    pub reps: usize,
    /// Timing of each IOPS and flush measurement.
    pub window: Window,
    /// Queue counts of the IOPS table.
    pub queues: Vec<usize>,
    /// vubd --bitmap-flush-interval (None: vubd's default).
    pub flush_interval: Option<f64>,
    /// Queue depth of the writer beside the flushing queue.
    pub flush_writer_qd: usize,
    /// Kill -9 trials per load shape.
    pub overmark_trials: usize,
    /// The kill comes this many seconds (uniformly at random between the
    /// two) after the first write completed.
    pub overmark_kill_after: (f64, f64),
    /// Seed of the over-marking trials (hot region, kill instants, offsets).
    pub seed: u64,
    /// Writes of the shorter callgrind run (the longer one has twice as many).
    pub instruction_writes: u64,
}

/// One flush-latency measurement.
#[derive(Clone, Debug)]
pub struct FlushMeasurement {
    /// Flush latencies inside the window, nanoseconds, sorted.
    pub latencies_ns: Vec<u32>,
    /// Writes completed by the writer queue inside the window.
    pub writer_ios: u64,
    /// Length of the window.
    pub elapsed: Duration,
    /// Daemon CPU time during the window.
    pub daemon_cpu: Duration,
}

impl FlushMeasurement {
    /// The `q`-quantile of the flush latency in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        percentile(&self.latencies_ns, q) / 1e3
    }

    /// The writer queue's IOPS.
    pub fn writer_iops(&self) -> f64 {
        self.writer_ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn to_json(&self) -> Value {
        json!({
            "flushes": self.latencies_ns.len(),
            "p50_us": self.quantile_us(0.50),
            "p90_us": self.quantile_us(0.90),
            "p99_us": self.quantile_us(0.99),
            "p999_us": self.quantile_us(0.999),
            "max_us": self.quantile_us(1.0),
            "writer_iops": self.writer_iops(),
            "seconds": self.elapsed.as_secs_f64(),
            "daemon_cpu_s": self.daemon_cpu.as_secs_f64(),
        })
    }
}

/// Shape of the over-marking load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Locality {
    /// 4 KiB writes anywhere on the disk.
    Uniform,
    /// 4 KiB writes inside one 64 MiB region at a random MiB-aligned offset.
    Hot64M,
}

impl Locality {
    /// The label in tables and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Locality::Uniform => "uniform random",
            Locality::Hot64M => "64 MiB hot region",
        }
    }
}

/// One bitmap of one kill -9 trial.
#[derive(Clone, Debug)]
pub struct OvermarkTrial {
    /// The load.
    pub locality: Locality,
    /// The bitmap's granularity.
    pub granularity: u64,
    /// Seconds between the first completed write and the kill.
    pub kill_after: f64,
    /// Writes that completed before the kill.
    pub completed_ios: u64,
    /// Chunks touched by a submitted write (completed or in flight).
    pub written: u64,
    /// Chunks set in the recovered bitmap.
    pub recovered: u64,
    /// Recovered chunks that no submitted write touched.
    pub over: u64,
    /// Chunks of completed writes missing from the recovered bitmap (must
    /// be 0; anything else is a broken guarantee).
    pub missed: u64,
    /// Chunks the recovery set only from the activity log.
    pub from_log: u64,
}

impl OvermarkTrial {
    fn to_json(&self) -> Value {
        json!({
            "load": self.locality.label(),
            "granularity": self.granularity,
            "kill_after_s": self.kill_after,
            "completed_writes": self.completed_ios,
            "written_chunks": self.written,
            "recovered_chunks": self.recovered,
            "over_marked_chunks": self.over,
            "missed_chunks": self.missed,
            "chunks_from_log": self.from_log,
        })
    }
}

type Runs<T> = Vec<(usize, std::result::Result<T, String>)>;

/// Everything the section measured.
pub struct Report {
    /// The storages, indexed by the keys below.
    pub storages: Vec<Storage>,
    /// (storage, queues, variant) -> (repetition, result) per run.
    pub iops: BTreeMap<(usize, usize, Variant), Runs<Measurement>>,
    /// (storage, variant) -> (repetition, result) per run.
    pub flush: BTreeMap<(usize, Variant), Runs<FlushMeasurement>>,
    /// The storage the over-marking trials ran on.
    pub overmark_storage: Option<usize>,
    /// One row per bitmap per trial, or the trial's failure.
    pub overmark: Vec<std::result::Result<OvermarkTrial, String>>,
    /// Instructions per write of each variant (first storage only).
    pub instructions: BTreeMap<Variant, std::result::Result<instructions::Count, String>>,
    /// User-space share of vubd's CPU time under load without bitmaps.
    pub user_share: Option<std::result::Result<f64, String>>,
}

/// The vhost-user and QMP socket paths (in /tmp: a long image directory
/// could overflow sun_path).
struct Sockets {
    _dir: ScratchDir,
    vhost: PathBuf,
    qmp: PathBuf,
    /// vubd's stdout and stderr, appended over all starts.
    log: PathBuf,
}

/// A filled image on one storage, removed (with its sidecar) on drop.
struct Image {
    _dir: ScratchDir,
    path: PathBuf,
    direct: bool,
}

impl Image {
    fn create(st: &Storage, size: u64, stop: &AtomicBool) -> Result<Image> {
        let dir = ScratchDir::new_in(&st.dir, "bench-bitmaps")?;
        let path = dir.join("bench.img");
        fill_image(&path, size, stop)?;
        Ok(Image {
            _dir: dir,
            path,
            direct: st.direct,
        })
    }

    /// Deletes the sidecar, so that the next vubd starts without bitmaps.
    fn remove_sidecar(&self) -> Result<()> {
        let side = sidecar_path(&self.path);
        let mut tmp = side.clone().into_os_string();
        tmp.push(".tmp");
        for p in [side, PathBuf::from(tmp)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("remove {}", p.display())),
            }
        }
        Ok(())
    }
}

/// A running vubd and its QMP connection; the daemon is killed on drop.
struct Running {
    daemon: Daemon,
    qmp: QmpClient,
}

fn start_vubd(cfg: &Config, img: &Image, socks: &Sockets, queues: usize) -> Result<Running> {
    start_vubd_command(
        Command::new(&cfg.vubd),
        img,
        socks,
        queues,
        cfg.flush_interval,
    )
}

/// Starts `cmd` (vubd, or a wrapper whose last argument is vubd) with
/// vubd's arguments for `img`, and connects to its QMP socket.
fn start_vubd_command(
    mut cmd: Command,
    img: &Image,
    socks: &Sockets,
    queues: usize,
    flush_interval: Option<f64>,
) -> Result<Running> {
    cmd.arg("--socket")
        .arg(&socks.vhost)
        .arg("--image")
        .arg(&img.path)
        .arg("--queues")
        .arg(queues.to_string())
        .arg("--qmp")
        .arg(&socks.qmp)
        // libblkio's memfds cannot be sealed.
        .arg("--allow-unsealed-memory");
    if img.direct {
        cmd.arg("--direct");
    }
    if let Some(s) = flush_interval {
        cmd.arg("--bitmap-flush-interval").arg(s.to_string());
    }
    cmd.env_remove("RUST_LOG");
    // vubd's log goes to a file beside the sockets (a start per measurement
    // would flood the progress lines); its tail explains a failed start.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&socks.log)
        .with_context(|| format!("open {}", socks.log.display()))?;
    cmd.stdout(log.try_clone()?).stderr(log);
    die_with_parent(&mut cmd);
    // A killed vubd leaves its QMP socket file behind; vubd replaces a stale
    // socket, but waiting for the path to appear must not see the old one.
    let _ = std::fs::remove_file(&socks.qmp);
    let daemon = Daemon::spawn(cmd, &socks.vhost, "vubd")
        .map_err(|e| e.context(format!("vubd's log ends with: {}", log_tail(&socks.log))))?;
    let t0 = Instant::now();
    let qmp = loop {
        match QmpClient::connect(&socks.qmp, Duration::from_secs(10)) {
            Ok(q) => break q,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => {
                return Err(e.context("connect to vubd's QMP socket"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    Ok(Running { daemon, qmp })
}

/// The last lines of vubd's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" / ")
}

fn add_bitmap(qmp: &mut QmpClient, name: &str, granularity: u64, persistent: bool) -> Result<()> {
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": name, "granularity": granularity,
               "persistent": persistent}),
    )?;
    Ok(())
}

/// The `dirty-bitmaps` list of query-block.
fn query_bitmaps(qmp: &mut QmpClient) -> Result<Vec<Value>> {
    let blocks = qmp.ok("query-block", json!({}))?;
    blocks
        .get(0)
        .and_then(|b| b["inserted"]["dirty-bitmaps"].as_array())
        .cloned()
        .with_context(|| format!("query-block without dirty-bitmaps: {blocks}"))
}

/// Checks that each named bitmap exists, records, is consistent and has
/// marked something: a variant whose bitmaps did not track the load would
/// measure nothing.
fn check_recorded(qmp: &mut QmpClient, names: &[(String, bool)]) -> Result<()> {
    let list = query_bitmaps(qmp)?;
    for (name, persistent) in names {
        let b = list
            .iter()
            .find(|b| b["name"] == json!(name))
            .with_context(|| format!("bitmap {name} missing from query-block"))?;
        ensure!(
            b["recording"] == json!(true)
                && b["inconsistent"] != json!(true)
                && b["persistent"] == json!(persistent)
                && b["count"].as_u64().is_some_and(|c| c > 0),
            "bitmap {name} did not record the load: {b}"
        );
    }
    Ok(())
}

fn randwrite_qd32() -> Workload {
    Workload {
        name: "randwrite-4k-qd32",
        pattern: Pattern::RandWrite,
        block_size: BLOCK as usize,
        queue_depth: 32,
    }
}

/// One IOPS measurement of `variant` with `queues` queues.
fn iops_once(
    cfg: &Config,
    img: &Image,
    socks: &Sockets,
    queues: usize,
    variant: Variant,
    stop: &'static AtomicBool,
) -> Result<Measurement> {
    img.remove_sidecar()?;
    let mut vubd = start_vubd(cfg, img, socks, queues)?;
    let names = variant.bitmaps();
    for (name, persistent) in &names {
        add_bitmap(&mut vubd.qmp, name, DEFAULT_GRANULARITY, *persistent)?;
    }
    let m = measure(
        &socks.vhost,
        &randwrite_qd32(),
        queues,
        cfg.window,
        vubd.daemon.pid(),
        stop,
    );
    if let Some(status) = vubd.daemon.try_wait()? {
        let died = anyhow::anyhow!("vubd exited during the run: {status}");
        return Err(match m {
            Ok(_) => died,
            Err(e) => e.context(died),
        });
    }
    let m = m?;
    check_recorded(&mut vubd.qmp, &names)?;
    if names.iter().any(|(_, p)| *p) {
        let side = sidecar_path(&img.path);
        ensure!(side.exists(), "no sidecar {} was written", side.display());
    }
    vubd.daemon.kill();
    img.remove_sidecar()?;
    Ok(m)
}

/// Write+flush pairs on one queue until `end`; returns the latencies of
/// the flushes that were issued and completed inside `[start, end)`.
fn flush_pairs(
    mut q: Queue,
    capacity: u64,
    start: Instant,
    end: Instant,
    stop: &AtomicBool,
) -> Result<Vec<u32>> {
    let mut buf = q.alloc_buffer(BLOCK as usize)?;
    fill_random(buf.as_mut_slice(), 0xf1u64);
    let blocks = capacity / BLOCK;
    let mut rng = Rng(0xf1a5_4000);
    let mut lat = Vec::with_capacity(1 << 14);
    let mut done: Vec<Done> = Vec::with_capacity(1);
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        q.submit_write(rng.next_u64() % blocks * BLOCK, &buf, 0..BLOCK as usize, 0)?;
        done.clear();
        q.wait(1, &mut done)?;
        for d in &done {
            d.result(|| "write before a flush".into())?;
        }
        let t0 = Instant::now();
        q.submit_flush(1)?;
        done.clear();
        q.wait(1, &mut done)?;
        let t1 = Instant::now();
        for d in &done {
            d.result(|| "flush".into())?;
        }
        if t0 >= start && t1 < end {
            lat.push(t1.duration_since(t0).as_nanos().min(u128::from(u32::MAX)) as u32);
        }
    }
    Ok(lat)
}

/// A writer at `writer_qd` on queue 0 and write+flush pairs on queue 1.
fn measure_flush(
    socket: &Path,
    writer_qd: usize,
    window: Window,
    daemon_pid: u32,
    stop: &'static AtomicBool,
) -> Result<FlushMeasurement> {
    let mut client = Client::connect_with(
        socket,
        &ConnectOptions {
            num_queues: 2,
            read_only: false,
            queue_size: None,
            timeout: window.request_timeout,
        },
    )
    .with_context(|| format!("connect to {}", socket.display()))?;
    let capacity = client.capacity();
    ensure!(capacity >= 64 * MIB, "disk of {capacity} bytes too small");
    let mut queues = client.take_queues().into_iter();
    let (Some(wq), Some(fq)) = (queues.next(), queues.next()) else {
        bail!("vubd offered fewer than 2 queues");
    };
    let origin = Instant::now() + Duration::from_millis(20);
    let start = origin + window.warmup;
    let end = start + window.duration;
    let w = Workload {
        name: "randwrite-4k",
        pattern: Pattern::RandWrite,
        block_size: BLOCK as usize,
        queue_depth: writer_qd,
    };
    let writer = std::thread::Builder::new()
        .name("flush-writer".into())
        .spawn(move || load_thread(wq, &w, 0, 1, writer_qd, capacity, start, end, stop))
        .context("spawn writer thread")?;
    let flusher = std::thread::Builder::new()
        .name("flusher".into())
        .spawn(move || flush_pairs(fq, capacity, start, end, stop))
        .context("spawn flush thread")?;
    super::sleep_until(start);
    let d0 = process_cpu_time(daemon_pid).context("daemon CPU time")?;
    let t0 = Instant::now();
    super::sleep_until_or(end, || {
        writer.is_finished() || flusher.is_finished() || stop.load(Ordering::Relaxed)
    });
    let d1 = process_cpu_time(daemon_pid).context("daemon CPU time (did it die?)")?;
    let elapsed = t0.elapsed();
    let w = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))?
        .context("writer queue")?;
    let mut lat = flusher
        .join()
        .map_err(|_| anyhow::anyhow!("flush thread panicked"))?
        .context("flush queue")?;
    if stop.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    ensure!(!lat.is_empty(), "no flush completed inside the window");
    lat.sort_unstable();
    Ok(FlushMeasurement {
        latencies_ns: lat,
        writer_ios: w.ios,
        elapsed,
        daemon_cpu: d1.saturating_sub(d0),
    })
}

fn flush_once(
    cfg: &Config,
    img: &Image,
    socks: &Sockets,
    variant: Variant,
    stop: &'static AtomicBool,
) -> Result<FlushMeasurement> {
    img.remove_sidecar()?;
    let mut vubd = start_vubd(cfg, img, socks, 2)?;
    let names = variant.bitmaps();
    for (name, persistent) in &names {
        add_bitmap(&mut vubd.qmp, name, DEFAULT_GRANULARITY, *persistent)?;
    }
    let m = measure_flush(
        &socks.vhost,
        cfg.flush_writer_qd,
        cfg.window,
        vubd.daemon.pid(),
        stop,
    );
    if let Some(status) = vubd.daemon.try_wait()? {
        bail!("vubd exited during the run: {status}");
    }
    let m = m?;
    check_recorded(&mut vubd.qmp, &names)?;
    vubd.daemon.kill();
    img.remove_sidecar()?;
    Ok(m)
}

/// What the over-marking load did, per 4 KiB block of the disk.
struct WriteRecord {
    attempted: Vec<bool>,
    completed: Vec<bool>,
    completed_ios: u64,
}

/// 4 KiB writes at QD32 into `[region.0, region.0 + region.1)` until
/// `stop`; polls, so that it notices when vubd is gone (requests in flight
/// at a kill never complete).
fn overmark_load(
    mut q: Queue,
    disk_blocks: u64,
    region: (u64, u64),
    seed: u64,
    stop: Arc<AtomicBool>,
    first: mpsc::Sender<()>,
) -> Result<WriteRecord> {
    let mut buf = q.alloc_buffer(OVERMARK_QD * BLOCK as usize)?;
    fill_random(buf.as_mut_slice(), seed);
    let mut rng = Rng(seed);
    let (first_block, region_blocks) = (region.0 / BLOCK, (region.1 / BLOCK).max(1));
    let mut rec = WriteRecord {
        attempted: vec![false; disk_blocks as usize],
        completed: vec![false; disk_blocks as usize],
        completed_ios: 0,
    };
    let mut first = Some(first);
    let mut slots: Vec<Option<u64>> = vec![None; OVERMARK_QD];
    let mut done = Vec::with_capacity(OVERMARK_QD);
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping {
            for (slot, block) in slots.iter_mut().enumerate() {
                if block.is_some() {
                    continue;
                }
                let b = first_block + rng.next_u64() % region_blocks;
                let range = slot * BLOCK as usize..(slot + 1) * BLOCK as usize;
                q.submit_write(b * BLOCK, &buf, range, slot as u64)?;
                rec.attempted[b as usize] = true;
                *block = Some(b);
            }
        }
        done.clear();
        if q.wait(0, &mut done)? == 0 {
            if stopping {
                return Ok(rec);
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        for d in &done {
            let Some(b) = slots.get_mut(d.user_data as usize).and_then(Option::take) else {
                continue;
            };
            if d.ret == 0 {
                rec.completed[b as usize] = true;
                rec.completed_ios += 1;
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// Per-chunk "any block of the chunk set" for granularity `g`.
fn chunk_set(blocks: &[bool], g: u64) -> Vec<bool> {
    let per = (g / BLOCK).max(1) as usize;
    blocks.chunks(per).map(|c| c.iter().any(|&b| b)).collect()
}

/// One kill -9 trial: returns a row per bitmap (64 KiB and 4 KiB).
fn overmark_trial(
    cfg: &Config,
    img: &Image,
    socks: &Sockets,
    locality: Locality,
    rng: &mut Rng,
) -> Result<Vec<OvermarkTrial>> {
    let size = cfg.image_size;
    let grans = [DEFAULT_GRANULARITY, BLOCK];
    img.remove_sidecar()?;
    let mut vubd = start_vubd(cfg, img, socks, 1)?;
    for g in grans {
        add_bitmap(&mut vubd.qmp, &format!("g{}k", g / KIB), g, true)?;
    }
    let region = match locality {
        Locality::Uniform => (0, size),
        Locality::Hot64M if size > HOT_REGION => (
            rng.next_u64() % ((size - HOT_REGION) / MIB + 1) * MIB,
            HOT_REGION,
        ),
        Locality::Hot64M => (0, size),
    };
    let mut client = Client::connect_with(
        &socks.vhost,
        &ConnectOptions {
            num_queues: 1,
            read_only: false,
            queue_size: None,
            timeout: cfg.window.request_timeout,
        },
    )?;
    let q = client.take_queue(0)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (seed, stop2) = (rng.next_u64(), stop.clone());
    let loader = std::thread::Builder::new()
        .name("overmark-load".into())
        .spawn(move || overmark_load(q, size / BLOCK, region, seed, stop2, tx))
        .context("spawn load thread")?;
    let (lo, hi) = cfg.overmark_kill_after;
    let kill_after = lo + (hi - lo) * (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let first = rx.recv_timeout(cfg.window.request_timeout);
    if first.is_ok() {
        std::thread::sleep(Duration::from_secs_f64(kill_after));
    }
    vubd.daemon.kill();
    stop.store(true, Ordering::Relaxed);
    let rec = loader
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    drop(client);
    drop(vubd);
    first.context("no write completed")?;

    let recovery = recover(&FileStore::new(sidecar_path(&img.path)), size)?;
    ensure!(!recovery.clean, "a kill -9 left a clean sidecar");
    let mut rows = Vec::new();
    for g in grans {
        let name = format!("g{}k", g / KIB);
        let b = recovery
            .bitmaps
            .iter()
            .find(|b| b.name == name)
            .with_context(|| format!("bitmap {name} not in the recovered sidecar"))?;
        ensure!(!b.inconsistent, "bitmap {name} inconsistent after kill -9");
        let attempted = chunk_set(&rec.attempted, g);
        let completed = chunk_set(&rec.completed, g);
        let count = |f: &dyn Fn(usize) -> bool| (0..attempted.len()).filter(|&c| f(c)).count();
        let over = count(&|c| b.bitmap.get_chunk(c as u64) && !attempted[c]) as u64;
        let missed = count(&|c| completed[c] && !b.bitmap.get_chunk(c as u64)) as u64;
        rows.push(OvermarkTrial {
            locality,
            granularity: g,
            kill_after,
            completed_ios: rec.completed_ios,
            written: count(&|c| attempted[c]) as u64,
            recovered: b.bitmap.dirty_chunks(),
            over,
            missed,
            from_log: b.chunks_from_log,
        });
    }
    // vubd itself must come back with what the loader recovered.
    let mut again = start_vubd(cfg, img, socks, 1)?;
    let list = query_bitmaps(&mut again.qmp)?;
    for r in &rows {
        let name = format!("g{}k", r.granularity / KIB);
        let count = list
            .iter()
            .find(|b| b["name"] == json!(name))
            .and_then(|b| b["count"].as_u64())
            .with_context(|| format!("restarted vubd lacks bitmap {name}"))?;
        ensure!(
            count == r.recovered * r.granularity,
            "restarted vubd reports {count} dirty bytes in {name}, the loader recovered {} chunks",
            r.recovered
        );
    }
    again.daemon.kill();
    img.remove_sidecar()?;
    Ok(rows)
}

/// Runs the selected parts on every storage (the over-marking trials on the
/// first one only: a kill -9 does not lose the page cache, so the storage
/// changes little there) and returns what was measured. A failed
/// measurement is recorded in the report; setup failures end the run.
pub fn run(
    cfg: &Config,
    sections: Sections,
    storages: &[Storage],
    stop: &'static AtomicBool,
) -> Result<Report> {
    let mut report = Report {
        storages: storages.to_vec(),
        iops: BTreeMap::new(),
        flush: BTreeMap::new(),
        overmark_storage: None,
        overmark: Vec::new(),
        instructions: BTreeMap::new(),
        user_share: None,
    };
    let sock_dir = ScratchDir::new("bench-bitmaps-sock")?;
    let socks = Sockets {
        vhost: sock_dir.join("vhost.sock"),
        qmp: sock_dir.join("qmp.sock"),
        log: sock_dir.join("vubd.log"),
        _dir: sock_dir,
    };
    let stopped = || stop.load(Ordering::Relaxed);
    'storages: for (si, st) in storages.iter().enumerate() {
        if stopped() {
            break;
        }
        eprintln!(
            "bitmaps: filling a {} MiB image on {}...",
            cfg.image_size >> 20,
            st.describe()
        );
        let img = Image::create(st, cfg.image_size, stop)?;
        if sections.iops {
            for rep in 0..cfg.reps {
                for &q in &cfg.queues {
                    let mut order = Variant::ALL.to_vec();
                    if rep % 2 == 1 {
                        order.reverse();
                    }
                    for v in order {
                        if stopped() {
                            break 'storages;
                        }
                        let r = iops_once(cfg, &img, &socks, q, v, stop);
                        if r.is_err() && stopped() {
                            break 'storages;
                        }
                        match &r {
                            Ok(m) => eprintln!(
                                "[{}/{}] {:<6} q{} {:<13} {:>9.0} IOPS  p99 {:>8.1} us  daemon {:.2} s/MIO",
                                rep + 1,
                                cfg.reps,
                                st.name,
                                q,
                                v.label(),
                                m.iops(),
                                m.p99_us,
                                m.daemon_cpu_per_mio()
                            ),
                            Err(e) => eprintln!(
                                "[{}/{}] {} q{} {}: FAILED: {e:#}",
                                rep + 1,
                                cfg.reps,
                                st.name,
                                q,
                                v.label()
                            ),
                        }
                        report
                            .iops
                            .entry((si, q, v))
                            .or_default()
                            .push((rep, r.map_err(|e| format!("{e:#}"))));
                    }
                }
            }
        }
        if sections.flush {
            for rep in 0..cfg.reps {
                let mut order = vec![Variant::NoBitmap, Variant::Persistent1];
                if rep % 2 == 1 {
                    order.reverse();
                }
                for v in order {
                    if stopped() {
                        break 'storages;
                    }
                    let r = flush_once(cfg, &img, &socks, v, stop);
                    if r.is_err() && stopped() {
                        break 'storages;
                    }
                    match &r {
                        Ok(m) => eprintln!(
                            "[{}/{}] {:<6} flush {:<13} {:>6} flushes  p50 {:>8.1} us  p99 {:>8.1} us  writer {:>7.0} IOPS",
                            rep + 1,
                            cfg.reps,
                            st.name,
                            v.label(),
                            m.latencies_ns.len(),
                            m.quantile_us(0.5),
                            m.quantile_us(0.99),
                            m.writer_iops()
                        ),
                        Err(e) => eprintln!(
                            "[{}/{}] {} flush {}: FAILED: {e:#}",
                            rep + 1,
                            cfg.reps,
                            st.name,
                            v.label()
                        ),
                    }
                    report
                        .flush
                        .entry((si, v))
                        .or_default()
                        .push((rep, r.map_err(|e| format!("{e:#}"))));
                }
            }
        }
        if sections.instructions && si == 0 && !instructions::valgrind_available() {
            eprintln!("bitmaps: valgrind not found; no instruction counts");
        } else if sections.instructions && si == 0 {
            let r = instructions::user_share(cfg, &img, &socks, stop);
            match &r {
                Ok(share) => eprintln!(
                    "[callgrind] {:<6} user space is {:.1}% of vubd's CPU time (native run, no bitmap)",
                    st.name,
                    share * 100.0
                ),
                Err(e) => eprintln!("[callgrind] {} user share: FAILED: {e:#}", st.name),
            }
            report.user_share = Some(r.map_err(|e| format!("{e:#}")));
            for v in Variant::ALL {
                if stopped() {
                    break;
                }
                let r = instructions::count(&cfg.vubd, &img, &socks, v, cfg.instruction_writes);
                match &r {
                    Ok(c) => eprintln!(
                        "[callgrind] {:<6} {:<13} {:>8.0} instructions per write",
                        st.name,
                        v.label(),
                        c.per_write()
                    ),
                    Err(e) => eprintln!("[callgrind] {} {}: FAILED: {e:#}", st.name, v.label()),
                }
                report
                    .instructions
                    .insert(v, r.map_err(|e| format!("{e:#}")));
            }
        }
        if sections.overmark && si == 0 {
            report.overmark_storage = Some(si);
            let mut rng = Rng(cfg.seed);
            for trial in 0..cfg.overmark_trials {
                for locality in [Locality::Uniform, Locality::Hot64M] {
                    if stopped() {
                        break 'storages;
                    }
                    match overmark_trial(cfg, &img, &socks, locality, &mut rng) {
                        Ok(rows) => {
                            for r in &rows {
                                eprintln!(
                                    "[{}/{}] kill -9 {:<17} {:>2} KiB: killed {:.2}s in, {} written, {} recovered, {} over-marked, {} missed",
                                    trial + 1,
                                    cfg.overmark_trials,
                                    locality.label(),
                                    r.granularity / KIB,
                                    r.kill_after,
                                    r.written,
                                    r.recovered,
                                    r.over,
                                    r.missed
                                );
                            }
                            report.overmark.extend(rows.into_iter().map(Ok));
                        }
                        Err(e) => {
                            if stopped() {
                                break 'storages;
                            }
                            eprintln!(
                                "[{}/{}] kill -9 {}: FAILED: {e:#}",
                                trial + 1,
                                cfg.overmark_trials,
                                locality.label()
                            );
                            report
                                .overmark
                                .push(Err(format!("{}: {e:#}", locality.label())));
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}

fn oks<T>(runs: &Runs<T>) -> Vec<&T> {
    runs.iter().filter_map(|(_, r)| r.as_ref().ok()).collect()
}

fn failures<T>(runs: &Runs<T>) -> Vec<&String> {
    runs.iter().filter_map(|(_, r)| r.as_ref().err()).collect()
}

/// `f(variant run) / f(baseline run)` per repetition, pairing the runs of
/// the same repetition (those where both succeeded).
fn paired_ratios<T>(runs: &Runs<T>, base: &Runs<T>, f: impl Fn(&T) -> f64) -> Vec<f64> {
    runs.iter()
        .filter_map(|(rep, r)| {
            let a = r.as_ref().ok()?;
            let b = base
                .iter()
                .find(|(r2, _)| r2 == rep)
                .and_then(|(_, b)| b.as_ref().ok())?;
            Some(f(a) / f(b))
        })
        .filter(|x| x.is_finite())
        .collect()
}

/// Median of [`paired_ratios`]; NaN without a pair.
fn paired_ratio<T>(runs: &Runs<T>, base: &Runs<T>, f: impl Fn(&T) -> f64) -> f64 {
    median(&paired_ratios(runs, base, f))
}

/// "median (min-max)" of per-repetition ratios: the spread tells whether a
/// few percent are signal or the noise of a shared machine.
fn fmt_ratios(ratios: &[f64]) -> String {
    let m = median(ratios);
    if !m.is_finite() {
        return "-".into();
    }
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if ratios.len() < 2 {
        format!("{m:.3}")
    } else {
        format!("{m:.3} ({lo:.2}-{hi:.2})")
    }
}

fn failure_note<T>(runs: &Runs<T>) -> String {
    let failed = failures(runs);
    match failed.first() {
        None => String::new(),
        Some(first) => format!(" ({} of {} runs FAILED: {first})", failed.len(), runs.len()),
    }
}

/// Over-marking rows aggregated per (load, granularity).
struct OvermarkSummary {
    locality: Locality,
    granularity: u64,
    trials: usize,
    written: f64,
    recovered: f64,
    over_median: f64,
    over_max: u64,
    over_pct_of_recovered: f64,
    over_pct_of_written: f64,
    missed: u64,
    kill_after: f64,
}

impl Report {
    fn overmark_summary(&self) -> Vec<OvermarkSummary> {
        let mut groups: BTreeMap<(Locality, u64), Vec<&OvermarkTrial>> = BTreeMap::new();
        for t in self.overmark.iter().flatten() {
            groups
                .entry((t.locality, t.granularity))
                .or_default()
                .push(t);
        }
        let mut out: Vec<OvermarkSummary> = groups
            .into_iter()
            .map(|((locality, granularity), ts)| {
                let med = |f: &dyn Fn(&OvermarkTrial) -> f64| {
                    median(&ts.iter().map(|t| f(t)).collect::<Vec<_>>())
                };
                let sum = |f: &dyn Fn(&OvermarkTrial) -> u64| ts.iter().map(|t| f(t)).sum::<u64>();
                OvermarkSummary {
                    locality,
                    granularity,
                    trials: ts.len(),
                    written: med(&|t| t.written as f64),
                    recovered: med(&|t| t.recovered as f64),
                    over_median: med(&|t| t.over as f64),
                    over_max: ts.iter().map(|t| t.over).max().unwrap_or(0),
                    over_pct_of_recovered: 100.0 * sum(&|t| t.over) as f64
                        / sum(&|t| t.recovered).max(1) as f64,
                    over_pct_of_written: 100.0 * sum(&|t| t.over) as f64
                        / sum(&|t| t.written).max(1) as f64,
                    missed: sum(&|t| t.missed),
                    kill_after: med(&|t| t.kill_after),
                }
            })
            .collect();
        // Coarse granularity first within each load.
        out.sort_by_key(|s| (s.locality, std::cmp::Reverse(s.granularity)));
        out
    }

    /// Whether every measurement succeeded and no completed write was
    /// missing from a recovered bitmap.
    pub fn all_ok(&self) -> bool {
        self.iops.values().flatten().all(|(_, r)| r.is_ok())
            && self.flush.values().flatten().all(|(_, r)| r.is_ok())
            && self.instructions.values().all(|r| r.is_ok())
            && self.user_share.as_ref().is_none_or(|r| r.is_ok())
            && self
                .overmark
                .iter()
                .all(|r| r.as_ref().is_ok_and(|t| t.missed == 0))
    }

    /// Prints the tables (Markdown, ready for README.md) to stdout.
    pub fn print(&self, cfg: &Config) {
        let interval = cfg
            .flush_interval
            .map(|s| format!("{s} s"))
            .unwrap_or_else(|| "vubd's default".into());
        if !self.iops.is_empty() {
            println!();
            println!(
                "### Dirty bitmaps: 4 KiB random writes, QD32 ({} MiB image, {} x {:.1} s, medians)",
                cfg.image_size >> 20,
                cfg.reps,
                cfg.window.duration.as_secs_f64()
            );
            println!();
            println!("| storage | queues | bitmaps | IOPS | vs none | p50 us | p99 us | daemon CPU s/MIO | vs none |");
            println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
            let mut keys: Vec<(usize, usize)> = self.iops.keys().map(|&(s, q, _)| (s, q)).collect();
            keys.dedup();
            for &(si, q) in &keys {
                let base = self.iops.get(&(si, q, Variant::NoBitmap));
                for v in Variant::ALL {
                    let Some(runs) = self.iops.get(&(si, q, v)) else {
                        continue;
                    };
                    let ok = oks(runs);
                    let med = |f: fn(&Measurement) -> f64| {
                        median(&ok.iter().map(|m| f(m)).collect::<Vec<_>>())
                    };
                    let (ri, rc) = match (base, v) {
                        (Some(b), v) if v != Variant::NoBitmap => (
                            fmt_ratios(&paired_ratios(runs, b, Measurement::iops)),
                            fmt_ratios(&paired_ratios(runs, b, Measurement::daemon_cpu_per_mio)),
                        ),
                        _ => ("1".into(), "1".into()),
                    };
                    println!(
                        "| {} | {q} | {} | {:.0} | {ri} | {:.1} | {:.1} | {:.2} | {rc} |{}",
                        self.storages[si].name,
                        v.label(),
                        med(Measurement::iops),
                        med(|m| m.p50_us),
                        med(|m| m.p99_us),
                        med(Measurement::daemon_cpu_per_mio),
                        failure_note(runs)
                    );
                }
            }
            println!();
            println!(
                "\"vs none\": median (min-max) over repetitions of the ratio to the no-bitmap run of the same repetition. \
                 Bitmaps of 64 KiB granularity; shm = image in /dev/shm (page cache), direct = O_DIRECT image on disk."
            );
            for &(si, q) in &keys {
                if let (Some(b), Some(p)) = (
                    self.iops.get(&(si, q, Variant::NoBitmap)),
                    self.iops.get(&(si, q, Variant::Persistent1)),
                ) {
                    let r = paired_ratio(p, b, Measurement::iops);
                    println!(
                        "target {} q{q}: 1 persistent bitmap keeps {} of the IOPS (>= {:.0}%): {}",
                        self.storages[si].name,
                        if r.is_finite() {
                            format!("{:.1}%", r * 100.0)
                        } else {
                            "-".into()
                        },
                        TARGET_IOPS_RATIO * 100.0,
                        verdict(r.is_finite().then_some(r >= TARGET_IOPS_RATIO))
                    );
                }
            }
        }
        if !self.instructions.is_empty() {
            self.print_instructions(cfg);
        }
        if !self.flush.is_empty() {
            println!();
            println!(
                "### Dirty bitmaps: guest flush latency under load (writer QD{} + write/flush pairs, {} x {:.1} s)",
                cfg.flush_writer_qd,
                cfg.reps,
                cfg.window.duration.as_secs_f64()
            );
            println!();
            println!("| storage | bitmaps | flushes | p50 us | p99 us | p99 vs none | p99 pooled us | p99.9 pooled us | writer IOPS |");
            println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            let mut sis: Vec<usize> = self.flush.keys().map(|&(s, _)| s).collect();
            sis.dedup();
            for &si in &sis {
                let base = self.flush.get(&(si, Variant::NoBitmap));
                for v in [Variant::NoBitmap, Variant::Persistent1] {
                    let Some(runs) = self.flush.get(&(si, v)) else {
                        continue;
                    };
                    let ok = oks(runs);
                    let med = |f: &dyn Fn(&FlushMeasurement) -> f64| {
                        median(&ok.iter().map(|m| f(m)).collect::<Vec<_>>())
                    };
                    let mut pooled: Vec<u32> = ok
                        .iter()
                        .flat_map(|m| m.latencies_ns.iter().copied())
                        .collect();
                    pooled.sort_unstable();
                    let ratio = match base {
                        Some(b) if v != Variant::NoBitmap => {
                            fmt_ratios(&paired_ratios(runs, b, |m| m.quantile_us(0.99)))
                        }
                        _ => "1".into(),
                    };
                    println!(
                        "| {} | {} | {} | {:.1} | {:.1} | {ratio} | {:.1} | {:.1} | {:.0} |{}",
                        self.storages[si].name,
                        v.label(),
                        pooled.len(),
                        med(&|m| m.quantile_us(0.5)),
                        med(&|m| m.quantile_us(0.99)),
                        percentile(&pooled, 0.99) / 1e3,
                        percentile(&pooled, 0.999) / 1e3,
                        med(&|m| m.writer_iops()),
                        failure_note(runs)
                    );
                }
            }
            println!();
            println!(
                "p50/p99: medians over repetitions; \"vs none\": median (min-max) of per-repetition p99 ratios; \
                 pooled: over every flush of every repetition."
            );
            for &si in &sis {
                if let (Some(b), Some(p)) = (
                    self.flush.get(&(si, Variant::NoBitmap)),
                    self.flush.get(&(si, Variant::Persistent1)),
                ) {
                    let r = paired_ratio(p, b, |m| m.quantile_us(0.99));
                    println!(
                        "target {}: flush p99 with 1 persistent bitmap is {} of none (<= {:.0}%): {}",
                        self.storages[si].name,
                        if r.is_finite() { format!("{:.1}%", r * 100.0) } else { "-".into() },
                        TARGET_FLUSH_P99_RATIO * 100.0,
                        verdict(r.is_finite().then_some(r <= TARGET_FLUSH_P99_RATIO))
                    );
                }
            }
        }
        if !self.overmark.is_empty() {
            let st = self
                .overmark_storage
                .and_then(|i| self.storages.get(i))
                .map(|s| s.name.as_str())
                .unwrap_or("?");
            println!();
            println!(
                "### Dirty bitmaps: over-marking after kill -9 ({} MiB image on {st}, 4 KiB writes at QD{OVERMARK_QD}, \
                 killed {:.1}-{:.1} s into the load, bitmap flush interval {interval})",
                cfg.image_size >> 20,
                cfg.overmark_kill_after.0,
                cfg.overmark_kill_after.1
            );
            println!();
            println!("| load | granularity | trials | chunks written | chunks recovered | over-marked (median) | over-marked (max) | over-marked % of recovered | extra vs written | missed |");
            println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            for s in self.overmark_summary() {
                println!(
                    "| {} | {} KiB | {} | {:.0} | {:.0} | {:.0} ({:.1} MiB) | {} | {:.1}% | {:.1}% | {} |",
                    s.locality.label(),
                    s.granularity / KIB,
                    s.trials,
                    s.written,
                    s.recovered,
                    s.over_median,
                    s.over_median * s.granularity as f64 / MIB as f64,
                    s.over_max,
                    s.over_pct_of_recovered,
                    s.over_pct_of_written,
                    s.missed
                );
            }
            println!();
            println!(
                "written: chunks touched by any submitted write (completed or in flight at the kill); \
                 over-marked: recovered chunks no write touched; missed: chunks of completed writes \
                 not recovered (must be 0). Medians over trials; percentages over all trials."
            );
            for e in self.overmark.iter().filter_map(|r| r.as_ref().err()) {
                println!("FAILED trial: {e}");
            }
        }
    }

    fn print_instructions(&self, cfg: &Config) {
        println!();
        println!(
            "### Dirty bitmaps: user-space instructions per 4 KiB random write (callgrind, {} vs {} writes at QD32, {})",
            cfg.instruction_writes,
            2 * cfg.instruction_writes,
            self.storages.first().map(|s| s.name.as_str()).unwrap_or("-")
        );
        println!();
        println!("| bitmaps | instructions per write | vs none |");
        println!("| --- | ---: | ---: |");
        let base = self
            .instructions
            .get(&Variant::NoBitmap)
            .and_then(|r| r.as_ref().ok())
            .map(instructions::Count::per_write);
        for (v, r) in &self.instructions {
            match r {
                Ok(c) => println!(
                    "| {} | {:.0} | {} |",
                    v.label(),
                    c.per_write(),
                    base.map(|b| format!("{:.3}", c.per_write() / b))
                        .unwrap_or_else(|| "-".into())
                ),
                Err(e) => println!("| {} | FAILED: {e} | |", v.label()),
            }
        }
        println!();
        println!(
            "The difference of two runs' totals over the extra writes: start-up and set-up cancel out. \
             The kernel's part of a write is not counted and is the same with bitmaps (no syscall on their hot path), \
             so \"vs none\" - 1 bounds a bitmap's share of the daemon's work per write from above."
        );
        let share = match &self.user_share {
            Some(Ok(share)) => Some(*share),
            Some(Err(e)) => {
                println!("user-space share of vubd's CPU: FAILED: {e}");
                None
            }
            None => None,
        };
        if let Some(share) = share {
            println!(
                "User space is {:.1}% of vubd's CPU time under this load without bitmaps (native run, 1 queue): \
                 a bitmap's share of the daemon's CPU per write is about (\"vs none\" - 1) x {:.3}.",
                share * 100.0,
                share
            );
        }
        if let (Some(b), Some(Ok(p))) = (base, self.instructions.get(&Variant::Persistent1)) {
            let added = p.per_write() / b - 1.0;
            let limit = 1.0 - TARGET_IOPS_RATIO;
            println!(
                "target (instructions): 1 persistent bitmap adds {:.1}% of the user-space instructions per write, \
                 {} of the daemon's CPU per write (<= {:.0}%): {}",
                added * 100.0,
                share
                    .map(|s| format!("about {:.1}%", added * s * 100.0))
                    .unwrap_or_else(|| "-".into()),
                limit * 100.0,
                verdict(share.map(|s| added * s <= limit))
            );
        }
    }

    /// The measurements as JSON.
    pub fn to_json(&self, cfg: &Config) -> Value {
        let iops: Vec<Value> = self
            .iops
            .iter()
            .map(|(&(si, q, v), runs)| {
                let base = self.iops.get(&(si, q, Variant::NoBitmap));
                let ok = oks(runs);
                let med = |f: fn(&Measurement) -> f64| {
                    median(&ok.iter().map(|m| f(m)).collect::<Vec<_>>())
                };
                json!({
                    "storage": self.storages[si].name,
                    "queues": q,
                    "bitmaps": v.label(),
                    "runs": runs.iter().map(|(rep, r)| match r {
                        Ok(m) => json!({"rep": rep, "result": m.to_json()}),
                        Err(e) => json!({"rep": rep, "error": e}),
                    }).collect::<Vec<_>>(),
                    "median": {
                        "iops": med(Measurement::iops),
                        "p50_us": med(|m| m.p50_us),
                        "p99_us": med(|m| m.p99_us),
                        "daemon_cpu_s_per_mio": med(Measurement::daemon_cpu_per_mio),
                    },
                    "iops_ratio_to_none": base.map(|b| paired_ratio(runs, b, Measurement::iops)),
                    "iops_ratios_per_rep": base.map(|b| paired_ratios(runs, b, Measurement::iops)),
                    "daemon_cpu_per_io_ratio_to_none":
                        base.map(|b| paired_ratio(runs, b, Measurement::daemon_cpu_per_mio)),
                })
            })
            .collect();
        let flush: Vec<Value> = self
            .flush
            .iter()
            .map(|(&(si, v), runs)| {
                let base = self.flush.get(&(si, Variant::NoBitmap));
                json!({
                    "storage": self.storages[si].name,
                    "bitmaps": v.label(),
                    "runs": runs.iter().map(|(rep, r)| match r {
                        Ok(m) => json!({"rep": rep, "result": m.to_json()}),
                        Err(e) => json!({"rep": rep, "error": e}),
                    }).collect::<Vec<_>>(),
                    "p99_ratio_to_none": base.map(|b| paired_ratio(runs, b, |m| m.quantile_us(0.99))),
                    "p99_ratios_per_rep": base.map(|b| paired_ratios(runs, b, |m| m.quantile_us(0.99))),
                })
            })
            .collect();
        let summary: Vec<Value> = self
            .overmark_summary()
            .iter()
            .map(|s| {
                json!({
                    "load": s.locality.label(),
                    "granularity": s.granularity,
                    "trials": s.trials,
                    "median_written_chunks": s.written,
                    "median_recovered_chunks": s.recovered,
                    "median_over_marked_chunks": s.over_median,
                    "max_over_marked_chunks": s.over_max,
                    "over_marked_pct_of_recovered": s.over_pct_of_recovered,
                    "over_marked_pct_of_written": s.over_pct_of_written,
                    "missed_chunks": s.missed,
                    "median_kill_after_s": s.kill_after,
                })
            })
            .collect();
        json!({
            "config": {
                "image_size": cfg.image_size,
                "storages": self.storages.iter().map(|s| json!({
                    "name": s.name, "dir": s.dir.display().to_string(), "direct": s.direct,
                })).collect::<Vec<_>>(),
                "reps": cfg.reps,
                "duration_s": cfg.window.duration.as_secs_f64(),
                "warmup_s": cfg.window.warmup.as_secs_f64(),
                "queues": cfg.queues,
                "granularity": DEFAULT_GRANULARITY,
                "bitmap_flush_interval_s": cfg.flush_interval,
                "flush_writer_qd": cfg.flush_writer_qd,
                "overmark_trials": cfg.overmark_trials,
                "overmark_kill_after_s": [cfg.overmark_kill_after.0, cfg.overmark_kill_after.1],
                "seed": cfg.seed,
            },
            "targets": {
                "iops_ratio_min": TARGET_IOPS_RATIO,
                "flush_p99_ratio_max": TARGET_FLUSH_P99_RATIO,
            },
            "iops": iops,
            "flush": flush,
            "user_space_share_of_cpu": self.user_share.as_ref().map(|r| match r {
                Ok(v) => json!(v),
                Err(e) => json!({"error": e}),
            }),
            "instructions_per_write": self.instructions.iter().map(|(v, r)| match r {
                Ok(c) => json!({"bitmaps": v.label(), "per_write": c.per_write(),
                                "total_n": c.total_n, "total_2n": c.total_2n, "writes_n": c.writes}),
                Err(e) => json!({"bitmaps": v.label(), "error": e}),
            }).collect::<Vec<_>>(),
            "overmark": {
                "storage": self.overmark_storage.and_then(|i| self.storages.get(i)).map(|s| s.name.clone()),
                "summary": summary,
                "trials": self.overmark.iter().map(|r| match r {
                    Ok(t) => t.to_json(),
                    Err(e) => json!({"error": e}),
                }).collect::<Vec<_>>(),
            },
        })
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "no data",
    }
}

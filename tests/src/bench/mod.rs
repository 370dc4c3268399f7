//! The measuring half of `vubd-bench`: workloads, the per-queue load
//! threads (libblkio client at a fixed queue depth), and the statistics.
//!
//! One measurement = one fresh connection to a running daemon, a short
//! warm-up, then a timed window during which completions are counted and
//! their latencies recorded, while the daemon's and the client's CPU time
//! are sampled at the window's edges. Requests still in flight at the end are
//! drained but not counted.
//!
//! [`bitmaps`] is the changed-block-tracking section (issue 3): the cost of
//! dirty bitmaps on vubd's write path, on a guest flush, and the
//! over-marking after a crash.

pub mod bitmaps;

use crate::client::{Client, ConnectOptions, Done};
use crate::daemon::process_cpu_time;
pub use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Access pattern of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Random reads, block-aligned over the whole disk.
    RandRead,
    /// Random writes, block-aligned over the whole disk.
    RandWrite,
    /// Sequential writes; each thread streams through its own slice.
    SeqWrite,
}

/// A named load: pattern, block size and total queue depth.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Short name used on the command line and in the table.
    pub name: &'static str,
    /// What the load does.
    pub pattern: Pattern,
    /// Bytes per request.
    pub block_size: usize,
    /// Requests in flight in total (split across the queues).
    pub queue_depth: usize,
}

/// The standard set, in table order.
pub fn standard_workloads() -> Vec<Workload> {
    vec![
        Workload {
            name: "randread-4k-qd1",
            pattern: Pattern::RandRead,
            block_size: 4096,
            queue_depth: 1,
        },
        Workload {
            name: "randread-4k-qd32",
            pattern: Pattern::RandRead,
            block_size: 4096,
            queue_depth: 32,
        },
        Workload {
            name: "randwrite-4k-qd32",
            pattern: Pattern::RandWrite,
            block_size: 4096,
            queue_depth: 32,
        },
        Workload {
            name: "seqwrite-64k-qd8",
            pattern: Pattern::SeqWrite,
            block_size: 65536,
            queue_depth: 8,
        },
    ]
}

impl Workload {
    /// Queue depth of each of `threads` threads: the total split evenly,
    /// at least 1 (so QD1 on 2 queues runs 2 x QD1).
    pub fn per_thread_depth(&self, threads: usize) -> usize {
        (self.queue_depth / threads.max(1)).max(1)
    }
}

/// Timing of one measurement.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// Load before the window starts (not counted).
    pub warmup: Duration,
    /// The counted window.
    pub duration: Duration,
    /// Deadline of every request; a daemon that does not answer in time
    /// fails the measurement.
    pub request_timeout: Duration,
}

/// The outcome of one measurement.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// Completed requests inside the window.
    pub ios: u64,
    /// Bytes moved by them.
    pub bytes: u64,
    /// Length of the window actually measured.
    pub elapsed: Duration,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Daemon CPU time (user + system) during the window.
    pub daemon_cpu: Duration,
    /// This process's CPU time during the window.
    pub client_cpu: Duration,
}

impl Measurement {
    /// I/Os per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Megabytes (10^6) per second.
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Daemon CPU seconds per million I/Os.
    pub fn daemon_cpu_per_mio(&self) -> f64 {
        self.daemon_cpu.as_secs_f64() * 1e6 / (self.ios.max(1) as f64)
    }

    /// Client CPU seconds per million I/Os.
    pub fn client_cpu_per_mio(&self) -> f64 {
        self.client_cpu.as_secs_f64() * 1e6 / (self.ios.max(1) as f64)
    }

    /// As JSON.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "ios": self.ios,
            "bytes": self.bytes,
            "seconds": self.elapsed.as_secs_f64(),
            "iops": self.iops(),
            "mb_per_s": self.mbps(),
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "daemon_cpu_s": self.daemon_cpu.as_secs_f64(),
            "client_cpu_s": self.client_cpu.as_secs_f64(),
            "daemon_cpu_s_per_mio": self.daemon_cpu_per_mio(),
            "client_cpu_s_per_mio": self.client_cpu_per_mio(),
        })
    }
}

/// What one load thread brings back.
struct ThreadResult {
    ios: u64,
    bytes: u64,
    latencies_ns: Vec<u32>,
}

/// Fills `buf` with pseudo-random bytes (so nothing in the path can take a
/// shortcut on zero pages).
pub fn fill_random(buf: &mut [u8], seed: u64) {
    Rng(seed).fill(buf);
}

/// Makes a child die with us, even if we are killed with SIGKILL: a
/// benchmark interrupted at any point must not leave daemons behind.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; no memory is touched.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Writes pseudo-random data over a whole new image of `size` bytes so that
/// reads hit real, allocated data and writes overwrite allocated blocks
/// (no allocation cost in the figures). `stop` interrupts it.
pub fn fill_image(path: &Path, size: u64, stop: &AtomicBool) -> Result<()> {
    let chunk = 4 << 20;
    let mut buf = vec![0u8; chunk];
    fill_random(&mut buf, 0xf111);
    let mut f =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut off = 0u64;
    while off < size {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let n = chunk.min((size - off) as usize);
        // Stamp the chunk index so no two chunks are identical.
        buf[..8].copy_from_slice(&off.to_le_bytes());
        f.write_all(&buf[..n])?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Connects to `socket` with `queues` queues and runs `w` on them, one
/// thread per queue, measuring the window. `daemon_pid` is sampled for CPU.
/// `stop` ends the load early (Ctrl-C).
pub fn measure(
    socket: &Path,
    w: &Workload,
    queues: usize,
    window: Window,
    daemon_pid: u32,
    stop: &'static AtomicBool,
) -> Result<Measurement> {
    let mut client = Client::connect_with(
        socket,
        &ConnectOptions {
            num_queues: queues,
            read_only: false,
            queue_size: None,
            timeout: window.request_timeout,
        },
    )
    .with_context(|| format!("connect to {}", socket.display()))?;
    let capacity = client.capacity();
    if capacity < (w.block_size * 64) as u64 {
        bail!("disk of {capacity} bytes too small for {}", w.name);
    }
    let qd = w.per_thread_depth(queues);
    let origin = Instant::now() + Duration::from_millis(20);
    let start = origin + window.warmup;
    let end = start + window.duration;
    let failed = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for (t, q) in client.take_queues().into_iter().enumerate() {
        let w = w.clone();
        let failed = Arc::clone(&failed);
        let handle = std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || {
                let r = load_thread(q, &w, t, queues, qd, capacity, start, end, stop);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                r
            })
            .context("spawn load thread")?;
        handles.push(handle);
    }
    // Sample CPU at the edges of the window.
    sleep_until(start);
    let d0 = process_cpu_time(daemon_pid).context("daemon CPU time")?;
    let c0 = process_cpu_time(std::process::id())?;
    let t0 = Instant::now();
    sleep_until_or(end, || {
        failed.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed)
    });
    let d1 = process_cpu_time(daemon_pid).context("daemon CPU time (did it die?)")?;
    let c1 = process_cpu_time(std::process::id())?;
    let elapsed = t0.elapsed();
    let mut ios = 0;
    let mut bytes = 0;
    let mut lat = Vec::new();
    let mut first_err = None;
    for (t, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(r)) => {
                ios += r.ios;
                bytes += r.bytes;
                lat.extend_from_slice(&r.latencies_ns);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e.context(format!("load thread {t}")));
            }
            Err(_) => {
                first_err.get_or_insert(anyhow::anyhow!("load thread {t} panicked"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if stop.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    if ios == 0 {
        bail!("no request completed inside the window");
    }
    lat.sort_unstable();
    Ok(Measurement {
        ios,
        bytes,
        elapsed,
        p50_us: percentile(&lat, 0.50) / 1e3,
        p99_us: percentile(&lat, 0.99) / 1e3,
        daemon_cpu: d1.saturating_sub(d0),
        client_cpu: c1.saturating_sub(c0),
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn sleep_until_or(t: Instant, cancel: impl Fn() -> bool) {
    while Instant::now() < t && !cancel() {
        let left = t.saturating_duration_since(Instant::now());
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// The `q`-quantile of sorted samples (nearest rank), as f64.
pub fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[idx])
}

/// Median of values (NaN if none).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One queue's load: keep `qd` requests in flight until `end`, count the
/// completions that land inside `[start, end)`, then drain.
#[allow(clippy::too_many_arguments)]
fn load_thread(
    mut q: crate::client::Queue,
    w: &Workload,
    thread: usize,
    threads: usize,
    qd: usize,
    capacity: u64,
    start: Instant,
    end: Instant,
    stop: &AtomicBool,
) -> Result<ThreadResult> {
    let bs = w.block_size;
    let mut buf = q.alloc_buffer(qd * bs)?;
    fill_random(buf.as_mut_slice(), 0xb10c + thread as u64);
    let blocks = capacity / bs as u64;
    // Sequential writers stream through their own slice of the disk.
    let slice = blocks / threads as u64;
    let slice_start = slice * thread as u64;
    let mut seq = 0u64;
    let mut rng = Rng(0x5eed ^ (thread as u64) << 32);
    let mut next_offset = || -> u64 {
        let block = match w.pattern {
            Pattern::RandRead | Pattern::RandWrite => rng.next_u64() % blocks,
            Pattern::SeqWrite => {
                let b = slice_start + seq % slice.max(1);
                seq += 1;
                b
            }
        };
        block * bs as u64
    };
    let mut free: Vec<usize> = (0..qd).collect();
    let mut submitted = vec![Instant::now(); qd];
    let mut done: Vec<Done> = Vec::with_capacity(qd);
    let mut result = ThreadResult {
        ios: 0,
        bytes: 0,
        latencies_ns: Vec::with_capacity(1 << 16),
    };
    loop {
        let now = Instant::now();
        if now >= end || stop.load(Ordering::Relaxed) {
            break;
        }
        while let Some(slot) = free.pop() {
            let range = slot * bs..(slot + 1) * bs;
            let off = next_offset();
            match w.pattern {
                Pattern::RandRead => q.submit_read(off, &buf, range, slot as u64)?,
                Pattern::RandWrite | Pattern::SeqWrite => {
                    q.submit_write(off, &buf, range, slot as u64)?
                }
            }
            submitted[slot] = now;
        }
        done.clear();
        q.wait(1, &mut done)?;
        let t = Instant::now();
        let counted = t >= start && t < end;
        for d in &done {
            d.result(|| format!("{} request", w.name))?;
            let slot = d.user_data as usize;
            if counted {
                result.ios += 1;
                result.bytes += bs as u64;
                let ns = t.duration_since(submitted[slot]).as_nanos();
                result
                    .latencies_ns
                    .push(ns.min(u128::from(u32::MAX)) as u32);
            }
            free.push(slot);
        }
    }
    // Drain what is still in flight (not counted).
    while q.in_flight() > 0 {
        done.clear();
        q.wait(1, &mut done)?;
        for d in &done {
            d.result(|| format!("{} request (drain)", w.name))?;
        }
    }
    Ok(result)
}

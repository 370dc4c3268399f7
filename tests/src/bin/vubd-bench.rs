//! vubd-bench: vubd against qemu-storage-daemon, side by side, in one run.
//!
//! Both daemons serve the same pre-filled image and are driven by the same
//! libblkio client (tests::client) through the same workloads; each
//! measurement starts a fresh daemon, and the daemons alternate (vubd, qsd,
//! vubd, qsd...) over several short repetitions so that the noise of a shared
//! machine hits both alike. The table reports medians, and per workload the
//! median of the paired vubd/qsd ratios: the ratio is the figure, not the
//! absolute numbers.
//!
//! `--workloads bitmaps` runs the changed-block-tracking section instead
//! (tests::bench::bitmaps): vubd alone, with and without dirty bitmaps, on
//! a /dev/shm image and an O_DIRECT image, plus the over-marking after
//! kill -9. Standard workloads and the bitmap parts can be mixed in one
//! `--workloads` list.
//!
//! Run: `cargo run --release -p tests --bin vubd-bench -- [options]`.

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tests::bench::{self, bitmaps, median, Measurement, Window, Workload};
use tests::daemon::{vubd_binary, workspace_root, Daemon, ScratchDir};

/// Benchmark vubd against qemu-storage-daemon with the same libblkio client.
#[derive(Parser, Debug)]
#[command(name = "vubd-bench")]
struct Args {
    /// Seconds of each measured window.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of load before each window (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Repetitions of every (workload, queues, daemon) measurement.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Workloads to run (comma separated): randread-4k-qd1, randread-4k-qd32,
    /// randwrite-4k-qd32, seqwrite-64k-qd8 (vubd vs qsd); bitmaps (the dirty
    /// bitmap section: bitmap-iops, bitmap-flush, bitmap-overmark and
    /// bitmap-instructions, also selectable one by one). Default: the four vubd-vs-qsd workloads.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Queue counts to run each workload with (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    queues: Vec<usize>,
    /// Directory for the image (default /dev/shm; /var/tmp with --direct).
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// Image size, bytes with an optional K/M/G suffix.
    #[arg(long, default_value = "1G")]
    size: String,
    /// O_DIRECT: vubd --direct, qsd cache.direct=on (use a real disk).
    #[arg(long)]
    direct: bool,
    /// Also run vubd with --poll-us N for the QD1 workload (0 = skip).
    #[arg(long, default_value_t = 50)]
    poll_us: u32,
    /// Write the results as JSON to this file ("-" = stdout, no table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// The vubd binary (default: target/release/vubd).
    #[arg(long)]
    vubd: Option<PathBuf>,
    /// Another vubd binary (e.g. a build of the previous main) measured in
    /// the same alternation, with vubd/base ratios: a regression check.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// qemu-storage-daemon's aio mode (io_uring, threads, native).
    #[arg(long, default_value = "io_uring")]
    qsd_aio: String,
    /// Per-request time-out in seconds (a daemon that hangs fails the run).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Bitmap section (`--workloads bitmaps`): storages to run on: shm (an
    /// image in /dev/shm) and direct (an O_DIRECT image in --direct-dir).
    #[arg(long, value_delimiter = ',', default_value = "shm,direct")]
    bitmap_storage: Vec<String>,
    /// Bitmap section: directory of the O_DIRECT image (a real disk).
    #[arg(long, default_value = "/var/tmp")]
    direct_dir: PathBuf,
    /// Bitmap section: vubd --bitmap-flush-interval (default: vubd's).
    #[arg(long)]
    bitmap_flush_interval: Option<f64>,
    /// Bitmap section: queue depth of the writer beside the flushing queue.
    #[arg(long, default_value_t = 16)]
    flush_writer_qd: usize,
    /// Bitmap section: kill -9 trials per load shape (uniform, hot region).
    #[arg(long, default_value_t = 5)]
    overmark_trials: usize,
    /// Bitmap section: earliest kill, seconds after the first completed write.
    #[arg(long, default_value_t = 0.2)]
    overmark_min_secs: f64,
    /// Bitmap section: latest kill, seconds after the first completed write.
    #[arg(long, default_value_t = 6.0)]
    overmark_max_secs: f64,
    /// Bitmap section: seed of the kill -9 trials.
    #[arg(long, default_value_t = 0x0b17_3a95)]
    seed: u64,
    /// Bitmap section: writes of the shorter callgrind run of
    /// bitmap-instructions (the longer one has twice as many).
    #[arg(long, default_value_t = 20_000)]
    instruction_writes: u64,
}

/// Set by SIGINT/SIGTERM: stop the load, kill the daemons, report.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Which daemon (and variant) a measurement ran against.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Vubd,
    Qsd,
    VubdPoll(u32),
    /// The `--baseline` binary.
    Base,
}

impl Kind {
    fn label(&self) -> String {
        match self {
            Kind::Vubd => "vubd".into(),
            Kind::Qsd => "qsd".into(),
            Kind::VubdPoll(us) => format!("vubd poll{us}*"),
            Kind::Base => "vubd base".into(),
        }
    }
}

/// Everything a daemon start needs.
struct Env {
    vubd: PathBuf,
    baseline: Option<PathBuf>,
    image: PathBuf,
    socket: PathBuf,
    direct: bool,
    qsd_aio: String,
}

fn start_daemon(env: &Env, kind: &Kind, queues: usize) -> Result<Daemon> {
    let (mut cmd, name) = match kind {
        Kind::Vubd | Kind::VubdPoll(_) | Kind::Base => {
            let binary = match (kind, &env.baseline) {
                (Kind::Base, Some(base)) => base,
                _ => &env.vubd,
            };
            let mut cmd = Command::new(binary);
            cmd.arg("--socket")
                .arg(&env.socket)
                .arg("--image")
                .arg(&env.image)
                .arg("--queues")
                .arg(queues.to_string());
            // libblkio's memfds cannot be sealed; a baseline older than the
            // flag accepts them anyway.
            if !matches!(kind, Kind::Base) || knows_flag(binary, "--allow-unsealed-memory") {
                cmd.arg("--allow-unsealed-memory");
            }
            if env.direct {
                cmd.arg("--direct");
            }
            if let Kind::VubdPoll(us) = kind {
                cmd.arg("--poll-us").arg(us.to_string());
            }
            (cmd, "vubd")
        }
        Kind::Qsd => {
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=f0,filename={},cache.direct={},aio={},discard=unmap",
                env.image.display(),
                if env.direct { "on" } else { "off" },
                env.qsd_aio
            ));
            cmd.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                env.socket.display()
            ));
            (cmd, "qemu-storage-daemon")
        }
    };
    cmd.env_remove("RUST_LOG");
    bench::die_with_parent(&mut cmd);
    Daemon::spawn(cmd, &env.socket, name).with_context(|| format!("start {}", kind.label()))
}

/// Starts a daemon, measures one workload on it, stops it.
fn run_one(
    env: &Env,
    kind: &Kind,
    w: &Workload,
    queues: usize,
    window: Window,
) -> Result<Measurement> {
    let mut daemon = start_daemon(env, kind, queues)?;
    let m = bench::measure(&env.socket, w, queues, window, daemon.pid(), &STOP);
    if let Some(status) = daemon.try_wait()? {
        let died = anyhow::anyhow!("{} exited during the run: {status}", kind.label());
        return Err(match m {
            Ok(_) => died,
            Err(e) => e.context(died),
        });
    }
    daemon.kill();
    m
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mult).context("size overflows")
}

/// Whether `binary --help` lists `flag`.
fn knows_flag(binary: &Path, flag: &str) -> bool {
    Command::new(binary)
        .arg("--help")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}

fn resolve_vubd(arg: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.clone());
    }
    let release = workspace_root().join("target/release/vubd");
    if release.exists() {
        return Ok(release);
    }
    let any = vubd_binary();
    if !any.exists() {
        bail!("no vubd binary: run `cargo build --release -p vhost-glue` or pass --vubd");
    }
    eprintln!("warning: using {} (not a release build)", any.display());
    Ok(any)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

type Key = (usize, usize, Kind); // (workload index, queues, daemon)

fn main() {
    env_logger::init();
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("vubd-bench: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Returns Ok(false) if some measurements failed (reported in the table).
fn run() -> Result<bool> {
    let args = Args::parse();
    install_signal_handlers();
    if args.duration <= 0.0 || args.warmup < 0.0 || args.reps == 0 || args.timeout <= 0.0 {
        bail!("--duration and --timeout must be > 0, --warmup >= 0, --reps >= 1");
    }
    if args.queues.is_empty() || args.queues.contains(&0) {
        bail!("--queues takes positive numbers");
    }
    let all = bench::standard_workloads();
    // Names of the bitmap section select it; the rest are standard workloads.
    let mut sections = bitmaps::Sections::default();
    let standard_names: Vec<&String> = args
        .workloads
        .iter()
        .filter(|name| !sections.select(name))
        .collect();
    let workloads: Vec<Workload> = if args.workloads.is_empty() {
        all.clone()
    } else {
        standard_names
            .iter()
            .map(|name| {
                all.iter()
                    .find(|w| {
                        w.name == name.as_str()
                            || w.name.replace("-4k", "").replace("-64k", "") == **name
                    })
                    .cloned()
                    .with_context(|| {
                        let mut names: Vec<_> = all.iter().map(|w| w.name).collect();
                        names.extend(bitmaps::Sections::NAMES);
                        format!("unknown workload {name:?} (known: {})", names.join(", "))
                    })
            })
            .collect::<Result<_>>()?
    };
    let size = parse_size(&args.size)?;
    let vubd = resolve_vubd(&args.vubd)?;
    let window = Window {
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.duration),
        request_timeout: Duration::from_secs_f64(args.timeout),
    };
    let bitmap_cfg = if sections.any() {
        let (lo, hi) = (args.overmark_min_secs, args.overmark_max_secs);
        if !(lo >= 0.0 && hi >= lo) {
            bail!("--overmark-min-secs must be >= 0 and <= --overmark-max-secs");
        }
        if args.flush_writer_qd == 0 {
            bail!("--flush-writer-qd must be >= 1");
        }
        let storages = args
            .bitmap_storage
            .iter()
            .map(|s| bitmaps::Storage::parse(s, &args.direct_dir))
            .collect::<Result<Vec<_>>>()?;
        if storages.is_empty() {
            bail!("--bitmap-storage is empty");
        }
        Some((
            bitmaps::Config {
                vubd: vubd.clone(),
                image_size: size,
                reps: args.reps,
                window,
                queues: args.queues.clone(),
                flush_interval: args.bitmap_flush_interval,
                flush_writer_qd: args.flush_writer_qd,
                overmark_trials: args.overmark_trials,
                overmark_kill_after: (lo, hi),
                seed: args.seed,
                instruction_writes: args.instruction_writes.max(1),
            },
            storages,
        ))
    } else {
        None
    };
    let to_stdout = args.json.as_deref() == Some(Path::new("-"));
    let load_before = loadavg();
    let mut all_ok = true;
    let mut doc = json!({});
    if !workloads.is_empty() {
        let (ok, part) = run_standard(&args, &workloads, &vubd, size, window, to_stdout)?;
        all_ok &= ok;
        doc = part;
    }
    if let Some((cfg, storages)) = &bitmap_cfg {
        if !STOP.load(Ordering::Relaxed) {
            eprintln!(
                "vubd-bench bitmaps: {}, {} x {:.1}s (+{:.1}s warm-up), load {}",
                vubd.display(),
                args.reps,
                args.duration,
                args.warmup,
                loadavg()
            );
            let report = bitmaps::run(cfg, sections, storages, &STOP)?;
            all_ok &= report.all_ok();
            if !to_stdout {
                report.print(cfg);
            }
            doc["bitmaps"] = report.to_json(cfg);
        }
    }
    let load_after = loadavg();
    if STOP.load(Ordering::Relaxed) {
        eprintln!("interrupted: reported what was measured");
    }
    if !to_stdout {
        eprintln!("load average: before {load_before}, after {load_after}");
    }
    if let Some(path) = &args.json {
        doc["host"] = json!({
            "vubd": vubd.display().to_string(),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        if to_stdout {
            println!("{text}");
        } else {
            std::fs::write(path, text + "\n")
                .with_context(|| format!("write {}", path.display()))?;
            eprintln!("JSON written to {}", path.display());
        }
    }
    Ok(all_ok)
}

/// The vubd-vs-qsd comparison: prints its table (unless JSON goes to
/// stdout) and returns (every run succeeded, its JSON).
fn run_standard(
    args: &Args,
    workloads: &[Workload],
    vubd: &Path,
    size: u64,
    window: Window,
    to_stdout: bool,
) -> Result<(bool, serde_json::Value)> {
    let image_dir = args
        .image_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(if args.direct { "/var/tmp" } else { "/dev/shm" }));
    let image_scratch = ScratchDir::new_in(&image_dir, "bench-img")?;
    // Sockets live in /tmp: a long image directory could overflow sun_path.
    let sock_scratch = ScratchDir::new("bench-sock")?;
    let env = Env {
        vubd: vubd.to_path_buf(),
        baseline: args.baseline.clone(),
        image: image_scratch.join("bench.img"),
        socket: sock_scratch.join("vhost.sock"),
        direct: args.direct,
        qsd_aio: args.qsd_aio.clone(),
    };
    let load_before = loadavg();
    eprintln!(
        "vubd-bench: {} on {} ({} MiB{}), {} x {:.1}s (+{:.1}s warm-up), load {load_before}",
        env.vubd.display(),
        image_dir.display(),
        size >> 20,
        if args.direct { ", O_DIRECT" } else { "" },
        args.reps,
        args.duration,
        args.warmup
    );
    eprintln!("filling the image...");
    bench::fill_image(&env.image, size, &STOP)?;

    let kinds_for = |w: &Workload| {
        let mut k = vec![Kind::Vubd, Kind::Qsd];
        if args.baseline.is_some() {
            k.push(Kind::Base);
        }
        if args.poll_us > 0 && w.queue_depth == 1 {
            k.push(Kind::VubdPoll(args.poll_us));
        }
        k
    };
    let mut results: BTreeMap<Key, Vec<Result<Measurement, String>>> = BTreeMap::new();
    'outer: for rep in 0..args.reps {
        for (wi, w) in workloads.iter().enumerate() {
            for &q in &args.queues {
                for kind in kinds_for(w) {
                    if STOP.load(Ordering::Relaxed) {
                        eprintln!("interrupted: reporting what was measured");
                        break 'outer;
                    }
                    let r = run_one(&env, &kind, w, q, window);
                    if r.is_err() && STOP.load(Ordering::Relaxed) {
                        // Cut short by Ctrl-C: not a failure of the daemon.
                        break 'outer;
                    }
                    match &r {
                        Ok(m) => eprintln!(
                            "[{}/{}] {:<18} q{} {:<14} {:>9.0} IOPS  p50 {:>7.1} us  daemon {:.2}s",
                            rep + 1,
                            args.reps,
                            w.name,
                            q,
                            kind.label(),
                            m.iops(),
                            m.p50_us,
                            m.daemon_cpu.as_secs_f64()
                        ),
                        Err(e) => eprintln!(
                            "[{}/{}] {} q{} {}: FAILED: {e:#}",
                            rep + 1,
                            args.reps,
                            w.name,
                            q,
                            kind.label()
                        ),
                    }
                    results
                        .entry((wi, q, kind))
                        .or_default()
                        .push(r.map_err(|e| format!("{e:#}")));
                }
            }
        }
    }
    let load_after = loadavg();

    let report = Report::new(workloads, &args.queues, &results);
    let all_ok = results.values().flatten().all(|r| r.is_ok());
    if !to_stdout {
        report.print(workloads, &args.queues, args.poll_us, &results);
    }
    let doc = json!({
        "config": {
            "vubd": env.vubd.display().to_string(),
            "baseline": env.baseline.as_ref().map(|b| b.display().to_string()),
            "image_dir": image_dir.display().to_string(),
            "image_size": size,
            "direct": args.direct,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "reps": args.reps,
            "qsd_aio": args.qsd_aio,
            "poll_us": args.poll_us,
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "results": report.json_results(workloads, &results),
        "ratios": report.json_ratios(),
    });
    Ok((all_ok, doc))
}

impl Ratio {
    fn label(&self) -> &'static str {
        match self.against {
            Kind::Base => "vubd/base",
            _ => "vubd/qsd",
        }
    }
}

/// Medians per row and paired ratios per (workload, queues).
struct Report {
    ratios: Vec<Ratio>,
}

/// vubd over another daemon (qsd, or the baseline build), median over
/// repetitions of the per-repetition ratios.
struct Ratio {
    against: Kind,
    workload: &'static str,
    queues: usize,
    pairs: usize,
    iops: f64,
    cpu_per_io: f64,
    p50: f64,
}

fn med_of(ms: &[&Measurement], f: impl Fn(&Measurement) -> f64) -> f64 {
    median(&ms.iter().map(|m| f(m)).collect::<Vec<_>>())
}

impl Report {
    fn new(
        workloads: &[Workload],
        queues: &[usize],
        results: &BTreeMap<Key, Vec<Result<Measurement, String>>>,
    ) -> Report {
        let mut ratios = Vec::new();
        for (wi, w) in workloads.iter().enumerate() {
            for (&q, against) in queues
                .iter()
                .flat_map(|q| [(q, Kind::Qsd), (q, Kind::Base)])
            {
                let (Some(v), Some(s)) = (
                    results.get(&(wi, q, Kind::Vubd)),
                    results.get(&(wi, q, against.clone())),
                ) else {
                    continue;
                };
                let mut ri = Vec::new();
                let mut rc = Vec::new();
                let mut rp = Vec::new();
                for (a, b) in v.iter().zip(s) {
                    if let (Ok(a), Ok(b)) = (a, b) {
                        ri.push(a.iops() / b.iops());
                        rc.push(a.daemon_cpu_per_mio() / b.daemon_cpu_per_mio());
                        rp.push(a.p50_us / b.p50_us);
                    }
                }
                ratios.push(Ratio {
                    against,
                    workload: w.name,
                    queues: q,
                    pairs: ri.len(),
                    iops: median(&ri),
                    cpu_per_io: median(&rc),
                    p50: median(&rp),
                });
            }
        }
        Report { ratios }
    }

    fn print(
        &self,
        workloads: &[Workload],
        queues: &[usize],
        poll_us: u32,
        results: &BTreeMap<Key, Vec<Result<Measurement, String>>>,
    ) {
        println!();
        println!(
            "{:<18} {:>8} {:<14} {:>10} {:>8} {:>9} {:>9} {:>11} {:>11}",
            "workload", "queues", "daemon", "IOPS", "MB/s", "p50 us", "p99 us", "daemon", "client"
        );
        println!(
            "{:<18} {:>8} {:<14} {:>10} {:>8} {:>9} {:>9} {:>11} {:>11}",
            "", "(n x qd)", "", "", "", "", "", "CPU s/MIO", "CPU s/MIO"
        );
        println!("{}", "-".repeat(107));
        for (wi, w) in workloads.iter().enumerate() {
            for &q in queues {
                let qd = format!("{q}({}x{})", q, w.per_thread_depth(q));
                let mut kinds: Vec<&Kind> = results
                    .keys()
                    .filter(|(i, qq, _)| *i == wi && *qq == q)
                    .map(|(_, _, k)| k)
                    .collect();
                kinds.sort();
                for kind in kinds {
                    let runs = &results[&(wi, q, kind.clone())];
                    let ok: Vec<&Measurement> =
                        runs.iter().filter_map(|r| r.as_ref().ok()).collect();
                    let failed: Vec<&String> =
                        runs.iter().filter_map(|r| r.as_ref().err()).collect();
                    if ok.is_empty() {
                        println!(
                            "{:<18} {:>8} {:<14} FAILED ({}/{}): {}",
                            w.name,
                            qd,
                            kind.label(),
                            failed.len(),
                            runs.len(),
                            failed.first().map(|s| s.as_str()).unwrap_or("")
                        );
                        continue;
                    }
                    println!(
                        "{:<18} {:>8} {:<14} {:>10.0} {:>8.1} {:>9.1} {:>9.1} {:>11.2} {:>11.2}{}",
                        w.name,
                        qd,
                        kind.label(),
                        med_of(&ok, Measurement::iops),
                        med_of(&ok, Measurement::mbps),
                        med_of(&ok, |m| m.p50_us),
                        med_of(&ok, |m| m.p99_us),
                        med_of(&ok, Measurement::daemon_cpu_per_mio),
                        med_of(&ok, Measurement::client_cpu_per_mio),
                        if failed.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "  ({} of {} runs FAILED: {})",
                                failed.len(),
                                runs.len(),
                                failed[0]
                            )
                        }
                    );
                }
                for r in self
                    .ratios
                    .iter()
                    .filter(|r| r.workload == w.name && r.queues == q && r.pairs > 0)
                {
                    println!(
                        "{:<18} {:>8} {:<14} {:>9.2}x {:>8} {:>8.2}x {:>9} {:>10.2}x {:>11}",
                        w.name,
                        qd,
                        r.label(),
                        r.iops,
                        "",
                        r.p50,
                        "",
                        r.cpu_per_io,
                        ""
                    );
                }
            }
        }
        println!("{}", "-".repeat(107));
        println!(
            "medians of the runs; vubd/qsd (and vubd/base) rows: median of per-repetition ratios (IOPS, p50, daemon CPU per I/O)"
        );
        println!("queues(n x d): n queues, one client thread each, d requests in flight per queue");
        if results
            .keys()
            .any(|(_, _, k)| matches!(k, Kind::VubdPoll(_)))
        {
            println!(
                "* vubd --poll-us {poll_us}: queue polling, burns CPU while it waits; its CPU/IO is not comparable"
            );
        }
    }

    fn json_results(
        &self,
        workloads: &[Workload],
        results: &BTreeMap<Key, Vec<Result<Measurement, String>>>,
    ) -> serde_json::Value {
        let rows: Vec<_> = results
            .iter()
            .map(|((wi, q, kind), runs)| {
                let w = &workloads[*wi];
                let ok: Vec<&Measurement> = runs.iter().filter_map(|r| r.as_ref().ok()).collect();
                json!({
                    "workload": w.name,
                    "block_size": w.block_size,
                    "queue_depth": w.queue_depth,
                    "queues": q,
                    "daemon": kind.label(),
                    "runs": runs.iter().map(|r| match r {
                        Ok(m) => m.to_json(),
                        Err(e) => json!({ "error": e }),
                    }).collect::<Vec<_>>(),
                    "median": {
                        "iops": med_of(&ok, Measurement::iops),
                        "mb_per_s": med_of(&ok, Measurement::mbps),
                        "p50_us": med_of(&ok, |m| m.p50_us),
                        "p99_us": med_of(&ok, |m| m.p99_us),
                        "daemon_cpu_s_per_mio": med_of(&ok, Measurement::daemon_cpu_per_mio),
                        "client_cpu_s_per_mio": med_of(&ok, Measurement::client_cpu_per_mio),
                    },
                })
            })
            .collect();
        json!(rows)
    }

    fn json_ratios(&self) -> serde_json::Value {
        json!(self
            .ratios
            .iter()
            .map(|r| json!({
                "against": r.against.label(),
                "workload": r.workload,
                "queues": r.queues,
                "pairs": r.pairs,
                "iops_ratio": r.iops,
                "daemon_cpu_per_io_ratio": r.cpu_per_io,
                "p50_ratio": r.p50,
            }))
            .collect::<Vec<_>>())
    }
}

//! kill -9 at random instants under a libblkio random-write load: the
//! persistent dirty bitmaps recovered afterwards must hold every chunk of
//! every write the client saw complete (writes still in flight may go either
//! way).
//!
//! One image and one sidecar live through all trials. Each trial starts vubd
//! (which recovers the sidecar left by the previous kill), checks that what
//! vubd loaded is exactly what the library's loader recovers, clears bitmap
//! `p`, runs writes, discards and write-zeroes from two queues for a random
//! time, and kills vubd with SIGKILL. Then the sidecar is read with
//! `vubd_backend::dirty::recover` (the loader vubd runs at start) and checked:
//! - `p` (64 KiB, cleared every trial) ⊇ this trial's completed writes;
//! - `fine` (4 KiB, never cleared) ⊇ every completed write of every trial,
//!   across all restarts.
//!
//! Over-marking (chunks set that no attempted write touched) is printed.
//! `CRASH_TRIALS` sets the number of trials (default 50; a longer stress run:
//! `CRASH_TRIALS=1000 cargo test --release -p tests --test crash`).

use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::client::{Buffer, Client, ConnectOptions, Queue};
use tests::daemon::{create_image, Daemon, ScratchDir};
use tests::qmp_client::QmpClient;
use tests::rng::Rng;
use vubd_backend::dirty::{recover, sidecar_path, DirtyBitmap, FileStore, Recovery};

const MIB: u64 = 1 << 20;
const DISK: u64 = 1024 * MIB;
const QD: usize = 16;
const P_GRAN: u64 = 64 * 1024;
const FINE_GRAN: u64 = 4096;
const BUF_LEN: usize = 64 * 1024;

/// What one load thread did: ranges whose request completed successfully,
/// and every range it submitted.
#[derive(Default)]
struct Log {
    completed: Vec<(u64, u64)>,
    attempted: Vec<(u64, u64)>,
}

/// Random writes (with some discards and write-zeroes) at queue depth QD,
/// concentrated on three hot 8 MiB areas with rare writes anywhere, so that
/// the activity log does not simply cover the whole disk (which would make
/// the check vacuous); polls completions so it can stop when vubd is gone.
fn load(
    mut q: Queue,
    mut buf: Buffer,
    seed: u64,
    stop: Arc<AtomicBool>,
    first: mpsc::Sender<()>,
) -> Result<Log> {
    let mut rng = Rng(seed);
    let buf_len = BUF_LEN;
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i as u64 ^ seed) as u8;
    }
    let mut first = Some(first);
    let hot: Vec<u64> = (0..3).map(|_| rng.below(DISK / MIB - 8) * MIB).collect();
    let mut log = Log::default();
    let mut ranges: Vec<Option<(u64, u64)>> = vec![None; QD];
    let mut done = Vec::new();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping {
            for (slot, range) in ranges.iter_mut().enumerate() {
                if range.is_some() {
                    continue;
                }
                // 1 request in 500 lands anywhere on the disk.
                let off = if rng.below(500) != 0 {
                    hot[rng.below(3) as usize] + rng.below(8 * MIB / 4096) * 4096
                } else {
                    rng.below(DISK / 4096) * 4096
                };
                let len = ((1 + rng.below(16)) * 4096).min(DISK - off);
                match rng.below(20) {
                    0 => q.submit_discard(off, len, slot as u64)?,
                    1 => q.submit_write_zeroes(off, len, rng.below(2) == 0, slot as u64)?,
                    _ => {
                        let start = slot * buf_len;
                        q.submit_write(off, &buf, start..start + len as usize, slot as u64)?
                    }
                }
                log.attempted.push((off, len));
                *range = Some((off, len));
            }
        }
        done.clear();
        if q.wait(0, &mut done)? == 0 {
            if stopping {
                // vubd is dead: what is still in flight never completes.
                return Ok(log);
            }
            std::thread::sleep(Duration::from_micros(30));
        }
        for d in &done {
            let Some(range) = ranges.get_mut(d.user_data as usize).and_then(Option::take) else {
                continue;
            };
            if d.ret == 0 {
                log.completed.push(range);
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

fn chunks(ranges: &[(u64, u64)], g: u64) -> Vec<bool> {
    let mut v = vec![false; DISK.div_ceil(g) as usize];
    for &(off, len) in ranges {
        for c in off / g..=(off + len - 1) / g {
            v[c as usize] = true;
        }
    }
    v
}

/// Chunks of `need` missing from `b`, as a short description, or None.
fn missing(b: &DirtyBitmap, need: &[bool]) -> Option<String> {
    let miss: Vec<usize> = (0..need.len())
        .filter(|&c| need[c] && !b.get_chunk(c as u64))
        .collect();
    (!miss.is_empty()).then(|| {
        format!(
            "{} chunk(s), e.g. {:?}",
            miss.len(),
            &miss[..miss.len().min(8)]
        )
    })
}

/// Connects to vubd's QMP socket once it listens.
fn connect_qmp(path: &std::path::Path) -> Result<QmpClient> {
    let start = Instant::now();
    loop {
        match QmpClient::connect(path, Duration::from_secs(10)) {
            Ok(q) => return Ok(q),
            Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn recover_sidecar(image: &std::path::Path) -> Result<Recovery> {
    let store = FileStore::new(sidecar_path(image));
    Ok(recover(&store, DISK)?)
}

#[test]
fn kill9_never_loses_a_completed_write() -> Result<()> {
    let trials: u64 = std::env::var("CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xc0ffee);
    let dir = ScratchDir::new_in("/dev/shm", "crash")?;
    let image = dir.join("disk.raw");
    create_image(&image, DISK)?;
    let sock = dir.join("vubd.sock");
    let qmp_path = dir.join("qmp.sock");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut all_completed: Vec<(u64, u64)> = Vec::new();
    let mut all_attempted: Vec<(u64, u64)> = Vec::new();
    let (mut over_total, mut over_max, mut completed_total, mut in_flight_total) =
        (0u64, 0u64, 0u64, 0u64);
    let mut log_extents_total = 0u64;
    let mut recovered_total = 0u64;

    for trial in 0..trials {
        // A killed vubd leaves its QMP socket file behind.
        let _ = std::fs::remove_file(&qmp_path);
        let interval = format!("{:.3}", [0.01, 0.05, 0.2, 1.0, 5.0][rng.below(5) as usize]);
        let mut vubd = Daemon::vubd(
            &sock,
            &image,
            &[
                "--queues",
                "2",
                "--qmp",
                qmp_path.to_str().context("path")?,
                "--bitmap-flush-interval",
                &interval,
            ],
        )?;
        let mut qmp = connect_qmp(&qmp_path)?;
        if trial == 0 {
            for (name, g) in [("p", P_GRAN), ("fine", FINE_GRAN)] {
                qmp.ok(
                    "block-dirty-bitmap-add",
                    json!({"node": "disk0", "name": name, "granularity": g, "persistent": true}),
                )?;
            }
        } else {
            // What vubd loaded at start is what the loader recovered.
            let rec = recover_sidecar(&image)?;
            for b in &rec.bitmaps {
                let sha = qmp.ok(
                    "x-debug-block-dirty-bitmap-sha256",
                    json!({"node": "disk0", "name": b.name}),
                )?;
                ensure!(
                    sha["sha256"] == json!(b.bitmap.sha256_hex()),
                    "trial {trial}: vubd loaded bitmap {} differently from the loader",
                    b.name
                );
            }
        }
        qmp.ok(
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "p"}),
        )?;

        let mut client = Client::connect_with(
            &sock,
            &ConnectOptions {
                num_queues: 2,
                timeout: Duration::from_secs(10),
                ..ConnectOptions::default()
            },
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let (first_tx, first_rx) = mpsc::channel();
        let mut loaders = Vec::new();
        for q in client.take_queues() {
            let buf = q.alloc_buffer(BUF_LEN * QD)?;
            let (stop, s, first) = (stop.clone(), rng.next_u64(), first_tx.clone());
            loaders.push(std::thread::spawn(move || load(q, buf, s, stop, first)));
        }
        // Once writes are completing, SIGKILL at a random instant of the load.
        first_rx
            .recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("trial {trial}: no write completed"))?;
        std::thread::sleep(Duration::from_micros(rng.below(600_000)));
        vubd.kill();
        stop.store(true, Ordering::Relaxed);
        let mut completed = Vec::new();
        let mut attempted = Vec::new();
        for h in loaders {
            let log = h
                .join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
            completed.extend(log.completed);
            attempted.extend(log.attempted);
        }
        drop(client);
        drop(qmp);
        ensure!(
            !completed.is_empty(),
            "trial {trial}: no write completed before the kill"
        );
        completed_total += completed.len() as u64;
        in_flight_total += (attempted.len() - completed.len()) as u64;
        all_completed.extend(&completed);
        all_attempted.extend(&attempted);

        let rec = recover_sidecar(&image)?;
        log_extents_total += rec.log_extents;
        ensure!(!rec.clean, "trial {trial}: a kill -9 left a clean sidecar");
        for b in &rec.bitmaps {
            ensure!(
                !b.inconsistent,
                "trial {trial}: bitmap {} inconsistent after kill -9",
                b.name
            );
            ensure!(
                b.recording,
                "trial {trial}: bitmap {} stopped recording",
                b.name
            );
            let (need, what) = if b.name == "p" {
                (chunks(&completed, P_GRAN), "this trial's")
            } else {
                (chunks(&all_completed, FINE_GRAN), "all trials'")
            };
            if let Some(m) = missing(&b.bitmap, &need) {
                anyhow::bail!(
                    "trial {trial} (seed {seed}): bitmap {} misses {m} of {what} completed writes",
                    b.name
                );
            }
            if b.name == "p" {
                let touched = chunks(&attempted, P_GRAN);
                let over = (0..touched.len() as u64)
                    .filter(|&c| b.bitmap.get_chunk(c) && !touched[c as usize])
                    .count() as u64;
                over_total += over;
                recovered_total += b.bitmap.dirty_chunks();
                over_max = over_max.max(over);
            }
        }
    }
    println!(
        "kill -9: {trials} trials in {:.1}s, {completed_total} requests completed before a kill (all recovered), \
         {in_flight_total} in flight at a kill; over-marking of bitmap p (64 KiB chunks, 4 MiB log extents): \
         {:.1} chunks ({:.2} MiB, {:.1}% of the {:.1} recovered) per trial on average, {over_max} at most; \
         {:.1} log extents applied per recovery",
        started.elapsed().as_secs_f64(),
        over_total as f64 / trials.max(1) as f64,
        over_total as f64 * P_GRAN as f64 / MIB as f64 / trials.max(1) as f64,
        over_total as f64 * 100.0 / recovered_total.max(1) as f64,
        recovered_total as f64 / trials.max(1) as f64,
        log_extents_total as f64 / trials.max(1) as f64,
    );
    Ok(())
}

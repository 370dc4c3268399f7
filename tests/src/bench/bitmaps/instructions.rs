//! What a dirty bitmap adds to each guest write, in instructions counted by
//! callgrind: a repeatable figure beside the IOPS ratios, which on a shared
//! two-core machine swing by tens of percent between back-to-back runs,
//! far more than the 3% target they are meant to judge.
//!
//! vubd runs under `valgrind --tool=callgrind` with a fixed load (4 KiB
//! random writes at QD32, one queue, a fixed seed) of N writes and again of
//! 2N writes; the difference of the two totals over N is the user-space
//! instructions per write, free of start-up, set-up and shutdown. The
//! kernel's share of a write (the syscalls, the copy into the page cache)
//! is not counted and does not change with bitmaps (their hot path makes
//! no syscall), so a bitmap's share of the counted instructions is an upper
//! bound of its share of the daemon's work per write. A native run without
//! bitmaps gives the user-space share of the daemon's CPU time; the product
//! of the two estimates the bitmap's share of the daemon's CPU per write.

use super::{
    add_bitmap, check_recorded, randwrite_qd32, start_vubd, Config, Image, Sockets, Variant, BLOCK,
    DEFAULT_GRANULARITY,
};
use crate::bench::{measure, Rng};
use crate::client::{Client, Done};
use crate::daemon::process_cpu_times;
use crate::qmp_client::QmpClient;
use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Requests in flight.
const QUEUE_DEPTH: usize = 32;

/// Counted instructions of one variant.
#[derive(Clone, Copy, Debug)]
pub struct Count {
    /// Total instructions of the run with N writes.
    pub total_n: u64,
    /// Total instructions of the run with 2N writes.
    pub total_2n: u64,
    /// N.
    pub writes: u64,
}

impl Count {
    /// User-space instructions per write (the marginal cost).
    pub fn per_write(&self) -> f64 {
        (self.total_2n as f64 - self.total_n as f64) / self.writes as f64
    }
}

/// Whether valgrind can be run.
pub fn valgrind_available() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Counts `variant` with `writes` and `2 * writes` writes.
pub fn count(
    vubd: &Path,
    img: &Image,
    socks: &Sockets,
    variant: Variant,
    writes: u64,
) -> Result<Count> {
    let total_n = one_run(vubd, img, socks, variant, writes, 1)?;
    let total_2n = one_run(vubd, img, socks, variant, 2 * writes, 2)?;
    ensure!(
        total_2n > total_n,
        "{} writes counted no more instructions than {writes} ({total_2n} <= {total_n})",
        2 * writes
    );
    Ok(Count {
        total_n,
        total_2n,
        writes,
    })
}

/// The user-space share of vubd's CPU time under the IOPS load without
/// bitmaps (one queue), measured natively.
pub fn user_share(
    cfg: &Config,
    img: &Image,
    socks: &Sockets,
    stop: &'static AtomicBool,
) -> Result<f64> {
    img.remove_sidecar()?;
    let mut vubd = start_vubd(cfg, img, socks, 1)?;
    let pid = vubd.daemon.pid();
    let (u0, s0) = process_cpu_times(pid)?;
    measure(&socks.vhost, &randwrite_qd32(), 1, cfg.window, pid, stop)?;
    let (u1, s1) = process_cpu_times(pid)?;
    vubd.daemon.kill();
    let (user, total) = ((u1 - u0).as_secs_f64(), (u1 + s1 - u0 - s0).as_secs_f64());
    ensure!(total > 0.0, "vubd used no CPU under load");
    Ok(user / total)
}

/// One vubd under callgrind: add the variant's bitmaps, write, quit, and
/// return the instruction total of the whole process.
fn one_run(
    vubd: &Path,
    img: &Image,
    socks: &Sockets,
    variant: Variant,
    writes: u64,
    seed: u64,
) -> Result<u64> {
    img.remove_sidecar()?;
    let out = socks.log.with_file_name("callgrind.out");
    let _ = std::fs::remove_file(&out);
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg("--log-file=/dev/null")
        .arg(vubd);
    let mut running = super::start_vubd_command(cmd, img, socks, 1, None)?;
    let names = variant.bitmaps();
    for (name, persistent) in &names {
        add_bitmap(&mut running.qmp, name, DEFAULT_GRANULARITY, *persistent)?;
    }
    write_random(&socks.vhost, img_blocks(img)?, writes, seed)?;
    check_recorded(&mut running.qmp, &names)?;
    quit(&mut running.qmp);
    let status = running.daemon.wait_exit(Duration::from_secs(120))?;
    ensure!(status.success(), "vubd under valgrind exited with {status}");
    img.remove_sidecar()?;
    let text = std::fs::read_to_string(&out)
        .with_context(|| format!("read callgrind output {}", out.display()))?;
    total_instructions(&text).with_context(|| format!("no totals in {}", out.display()))
}

fn img_blocks(img: &Image) -> Result<u64> {
    let len = std::fs::metadata(&img.path)
        .with_context(|| format!("stat {}", img.path.display()))?
        .len();
    Ok(len / BLOCK)
}

fn quit(qmp: &mut QmpClient) {
    // The reply may or may not arrive before the socket closes.
    let _ = qmp.ok("quit", json!({}));
}

/// `writes` 4 KiB writes at random block offsets, QD32 on one queue.
fn write_random(socket: &Path, blocks: u64, writes: u64, seed: u64) -> Result<()> {
    let mut client = Client::connect(socket, 1, false)?;
    let mut q = client.take_queue(0)?;
    // Requests run ~50x slower under valgrind.
    q.set_timeout(Duration::from_secs(60));
    let bs = BLOCK as usize;
    let mut buf = q.alloc_buffer(bs * QUEUE_DEPTH)?;
    crate::bench::fill_random(buf.as_mut_slice(), seed);
    let mut rng = Rng(seed);
    let mut free: Vec<usize> = (0..QUEUE_DEPTH).collect();
    let mut done: Vec<Done> = Vec::with_capacity(QUEUE_DEPTH);
    let (mut submitted, mut completed) = (0u64, 0u64);
    while completed < writes {
        while submitted < writes {
            let Some(slot) = free.pop() else { break };
            let offset = (rng.next_u64() % blocks) * BLOCK;
            q.submit_write(offset, &buf, slot * bs..(slot + 1) * bs, slot as u64)?;
            submitted += 1;
        }
        done.clear();
        q.wait(1, &mut done)?;
        for d in &done {
            d.result(|| "write".into())?;
            free.push(d.user_data as usize);
            completed += 1;
        }
    }
    Ok(())
}

/// The `totals:` (or `summary:`) line of a callgrind output file.
fn total_instructions(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_line_is_parsed() {
        let text =
            "version: 1\ncreator: callgrind\nevents: Ir\nfl=(1)\n0 5\nsummary: 123\ntotals: 4567\n";
        assert_eq!(total_instructions(text), Some(123));
        assert_eq!(total_instructions("events: Ir\ntotals: 99 1\n"), Some(99));
        assert_eq!(total_instructions("events: Ir\n"), None);
    }
}

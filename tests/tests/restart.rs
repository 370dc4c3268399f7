//! Restarting vubd under guest I/O: a QEMU guest runs fio verify at QD32 on
//! a vhost-user disk (`reconnect=1`) while the test kills vubd with SIGKILL
//! and starts it again, many times. The image is a slow disk with parallel
//! I/O: nbdkit's memory plugin behind its delay filter (50 ms a write),
//! mounted as a file by nbdfuse, opened with O_DIRECT and served through
//! io_uring. The guest's 32 requests are all in flight on the host when
//! vubd dies and complete out of submission order (the test checks that
//! they did, from vubd's `vubd::reorder` trace). With in-flight tracking (INFLIGHT_SHMFD)
//! the guest sees no error and fio's verify passes; without it
//! (`VUBD_NO_INFLIGHT=1` runs vubd with `--no-inflight`) a restart repeats
//! or loses requests.
//!
//! `VUBD_RESTARTS=N` sets the number of kills (default: a short CI run).
//! The guest reports every pause of 100 ms or more between two completed
//! I/Os (from fio's per-I/O completion log): the stall each restart caused.

use anyhow::{bail, ensure, Context, Result};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tests::daemon::{vubd_binary, Daemon, ScratchDir};
use tests::guest::{wait_for_marker, Guest};

const MIB: u64 = 1 << 20;
/// The block the host marks when the guest should stop (beyond fio's area).
const STOP_BLOCK: u64 = 8192;
const STOP_MARK: &[u8] = b"VUBD-STOP-RESTARTS";
/// Kills in the CI run: about a minute on a loaded 2-core host (QEMU
/// reconnects a second after each).
const CI_RESTARTS: usize = 25;

fn restarts() -> usize {
    std::env::var("VUBD_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CI_RESTARTS)
}

/// nbdkit's write and read delays: every request of the guest is still in
/// flight for a while after vubd took it.
const NBDKIT_DELAYS: [&str; 2] = ["wdelay=50ms", "rdelay=5ms"];

/// The slow disk: a file under `dir`, served by nbdfuse from nbdkit;
/// unmounted on drop.
struct SlowDisk {
    nbdfuse: Child,
    mount: PathBuf,
    file: PathBuf,
}

impl SlowDisk {
    fn new(dir: &Path, size: u64) -> Result<SlowDisk> {
        let mount = dir.join("mnt");
        std::fs::create_dir(&mount)?;
        let file = mount.join("disk.img");
        let mut cmd = Command::new("nbdfuse");
        cmd.arg(&file)
            .args(["--command", "nbdkit", "-s", "--exit-with-parent"])
            .args(["--filter=delay", "memory", &size.to_string()])
            .args(NBDKIT_DELAYS)
            .stdin(Stdio::null());
        let nbdfuse = cmd.spawn().context("cannot run nbdfuse")?;
        let disk = SlowDisk {
            nbdfuse,
            mount,
            file,
        };
        let t = Instant::now();
        while std::fs::metadata(&disk.file).map(|m| m.len()).unwrap_or(0) != size {
            ensure!(
                t.elapsed() < Duration::from_secs(20),
                "nbdfuse did not mount {}",
                disk.file.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(disk)
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
    }
}

/// Starts vubd on `image` with O_DIRECT and io_uring, appending its log to
/// `log` (the reorder trace included).
fn start_vubd(socket: &Path, image: &Path, log: &Path) -> Result<Daemon> {
    let mut cmd = Command::new(vubd_binary());
    cmd.arg("--socket").arg(socket).arg("--image").arg(image);
    cmd.args([
        "--direct",
        "--aio",
        "io_uring",
        "--logical-block-size",
        "4096",
    ]);
    if std::env::var_os("VUBD_NO_INFLIGHT").is_some() {
        cmd.arg("--no-inflight");
    }
    cmd.env("RUST_LOG", "info,vubd::reorder=trace");
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stderr(Stdio::from(out));
    Daemon::spawn(cmd, socket, "vubd")
}

/// The guest: fio verify rounds at QD32 until the host marks the stop
/// block; after each round, the pauses between completions of 100 ms or
/// more (fio's per-I/O log has the completion time in ms, in order).
fn script() -> String {
    format!(
        r#"
echo VUBD-FIO-START
i=0
while :; do
    i=$((i+1))
    echo 3 >/proc/sys/vm/drop_caches
    if dd if=/dev/vda bs=4096 skip={STOP_BLOCK} count=1 2>/dev/null | grep -q VUBD-STOP; then
        break
    fi
    $FIO --name=r$i --filename=/dev/vda --thread --direct=1 --ioengine=io_uring \
        --rw=randwrite --bs=4k --iodepth=32 --size=8M --randseed=$i \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=0 \
        --write_lat_log=/tmp/lat --log_avg_msec=0 \
        --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err
    rc=$?
    result gaps_$i "$(awk -F, 'NR > 1 && $1 - p >= 100 {{ printf "%d ", $1 - p }} {{ p = $1 }}' /tmp/lat_clat.1.log)"
    if [ $rc != 0 ]; then
        cat /tmp/fio.err
        result fio_rc $rc
        fail "fio round $i exited $rc"
    fi
    result verified_kb_$i "$(cut -d';' -f6 /tmp/fio.out)"
done
result rounds $((i-1))
"#
    )
}

/// Starts vubd again after a kill, as a supervisor would: until the
/// killed one's image lock is gone (the kernel drops an io_uring's file
/// references, and with them the lock, a little after the process is reaped).
fn restart_vubd(socket: &Path, image: &Path, log: &Path, lock_waits: &mut usize) -> Result<Daemon> {
    let t = Instant::now();
    loop {
        match start_vubd(socket, image, log) {
            Err(_) if t.elapsed() < Duration::from_secs(10) && tail(log).ends_with("lock") => {
                *lock_waits += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// vubd's log line when a queue starts on a region in use before.
const RESUMED: &str = "resuming at avail";

/// Lines of vubd's log so far with `what`.
fn count(log: &Path, what: &str) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.matches(what).count()
}

/// Waits until vubd's log has more than `seen` lines with `what`.
fn wait_for(
    log: &Path,
    what: &str,
    seen: usize,
    guest: &std::thread::JoinHandle<Result<tests::guest::GuestOutput>>,
) -> Result<()> {
    let t = Instant::now();
    while count(log, what) <= seen {
        ensure!(!guest.is_finished(), "the guest ended while vubd was down");
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "QEMU did not reconnect within 60 s; vubd log ends:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The end of vubd's log, for a failure message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// min/median/max of `v` (sorted in place).
fn spread(v: &mut [u64]) -> Option<(u64, u64, u64)> {
    v.sort_unstable();
    Some((*v.first()?, v[v.len() / 2], *v.last()?))
}

/// fio verify at QD32 survives `VUBD_RESTARTS` SIGKILL restarts of vubd
/// with reordering completions: no guest I/O error, verify passes.
#[test]
fn fio_verify_survives_kill9_restarts_with_reordering() -> Result<()> {
    let _ = env_logger::builder().is_test(true).try_init();
    let kills = restarts();
    let dir = ScratchDir::new_in("/dev/shm", "restart")?;
    let disk = SlowDisk::new(dir.path(), 64 * MIB)?;
    let image = disk.file.clone();
    let socket = dir.join("vhost.sock");
    let log = dir.join("vubd.log");
    let mut daemon = start_vubd(&socket, &image, &log)
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;

    let name = "restart_fio_verify";
    let guest = Guest::new(name, &socket, &script())
        .reconnect(true)
        .timeout(Duration::from_secs(240 + 6 * kills as u64))
        .spawn()?;
    wait_for_marker(name, "VUBD-FIO-START", Duration::from_secs(180), &guest)?;

    let mut restart_ms = Vec::new();
    let mut lock_waits = 0;
    let tracking = std::env::var_os("VUBD_NO_INFLIGHT").is_none();
    for k in 0..kills {
        // Kill at varying points of the I/O stream (deterministic spacing).
        std::thread::sleep(Duration::from_millis(100 + (k as u64 * 137) % 500));
        if guest.is_finished() {
            break;
        }
        if let Some(status) = daemon.try_wait()? {
            bail!("vubd exited by itself before kill {k}: {status}");
        }
        let t = Instant::now();
        let sessions = count(&log, "frontend connected");
        let resumed = count(&log, RESUMED);
        daemon.kill();
        daemon = restart_vubd(&socket, &image, &log, &mut lock_waits)
            .with_context(|| format!("restart {k}; vubd log ends:\n{}", tail(&log)))?;
        restart_ms.push(t.elapsed().as_millis() as u64);
        // Kill again only once QEMU (which retries every second) has
        // restarted the queue: QEMU 7.2 does not recover from a backend that
        // dies during its vhost-user handshake ("vhost_backend_init failed:
        // Protocol error", then it never starts the device again).
        if tracking {
            wait_for(&log, RESUMED, resumed, &guest)?;
        } else {
            // The readiness probe's session comes first; QEMU's is the next.
            wait_for(&log, "frontend connected", sessions + 1, &guest)?;
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let done = restart_ms.len();
    let file = OpenOptions::new().write(true).open(&image)?;
    file.write_all_at(STOP_MARK, STOP_BLOCK * 4096)?;
    file.sync_all()?;

    let out = guest
        .join()
        .map_err(|_| anyhow::anyhow!("guest thread panicked"))?
        .with_context(|| format!("vubd log ends:\n{}", tail(&log)))?;
    let vubd_log = std::fs::read_to_string(&log)?;
    let reordered = vubd_log
        .lines()
        .filter(|l| l.contains("completed after"))
        .count();
    let resubmitted: usize = vubd_log
        .lines()
        .filter_map(|l| {
            l.split(", ")
                .nth(1)?
                .strip_suffix(" requests to serve again")
        })
        .filter_map(|n| n.parse::<usize>().ok())
        .sum();
    let mut gaps: Vec<u64> = out
        .results
        .iter()
        .filter(|(k, _)| k.starts_with("gaps_"))
        .flat_map(|(_, v)| v.split_whitespace().filter_map(|g| g.parse().ok()))
        .collect();
    // The longest pauses are the restarts' (the slow disk's own are ~50 ms).
    gaps.sort_unstable_by(|a, b| b.cmp(a));
    let gaps_len = gaps.len();
    eprintln!(
        "restarts {done} (lock still held at restart: {lock_waits}); rounds {}; completions out of order {reordered}; \
         requests served again after a restart {resubmitted}; \
         vubd restart (kill to listening) ms min/median/max {:?}; \
         guest stall per restart (the {done} longest pauses between completions) \
         ms min/median/max {:?}",
        out.get("rounds").unwrap_or("?"),
        spread(&mut restart_ms),
        spread(&mut gaps[..done.min(gaps_len)]),
    );
    out.ensure_clean()?;
    ensure!(
        done == kills,
        "the guest finished after {done} of {kills} restarts"
    );
    ensure!(
        out.get_parsed::<u64>("rounds")? >= 1,
        "no fio round completed"
    );
    ensure!(
        reordered > 0,
        "no completion came out of order: the test does not exercise reordering"
    );
    daemon
        .try_wait()?
        .map_or(Ok(()), |s| bail!("vubd exited: {s}"))?;
    Ok(())
}

//! What the image-fleecing tests (`tests/tests/backup.rs`, `cbw_node.rs`)
//! share: a peer daemon (vubd or qemu-storage-daemon 7.2) serving `disk0`
//! over vhost-user with a QMP monitor, its half-written image, and a
//! libblkio writer that keeps writing during a backup.

use crate::client::Client;
use crate::daemon::{Daemon, ScratchDir};
use crate::qmp_client::QmpClient;
use anyhow::{bail, ensure, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Size of the peers' images.
pub const SIZE: u64 = 64 << 20;
/// The writer's block.
pub const BLOCK: u64 = 4096;
/// Anti-hang bound of the waits here.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Data in the first half (a pattern per 4 KiB block), a hole after.
pub fn make_image(path: &Path) -> Result<()> {
    let mut data = vec![0u8; (SIZE / 2) as usize];
    for (i, chunk) in data.chunks_mut(BLOCK as usize).enumerate() {
        chunk.fill((i % 251) as u8 + 1);
    }
    std::fs::write(path, &data)?;
    std::fs::File::options()
        .write(true)
        .open(path)?
        .set_len(SIZE)?;
    Ok(())
}

/// vubd or qemu-storage-daemon, serving `disk0` over vhost-user.
pub struct Peer {
    _daemon: Daemon,
    /// Its QMP monitor.
    pub qmp: QmpClient,
    /// Its vhost-user socket.
    pub vhost: PathBuf,
    /// Where its NBD server listens.
    pub nbd: PathBuf,
    /// Its disk's image.
    pub image: PathBuf,
    /// A scratch file for a fleecing target (not created).
    pub tmp: PathBuf,
    /// Whether it is qemu-storage-daemon.
    pub qsd: bool,
    /// "vubd" or "qsd".
    pub name: &'static str,
}

impl Peer {
    /// Starts the peer on a new image in `dir`; `qsd_file_options` are
    /// extra options of qsd's `file` node (comma separated).
    pub fn start(dir: &ScratchDir, qsd: bool, qsd_file_options: &str) -> Result<Peer> {
        let name = if qsd { "qsd" } else { "vubd" };
        let image = dir.join(&format!("{name}.img"));
        make_image(&image)?;
        let vhost = dir.join(&format!("{name}-vhost.sock"));
        let qmp = dir.join(&format!("{name}-qmp.sock"));
        let daemon = if qsd {
            Daemon::qsd_with_monitor(&vhost, &qmp, &image, qsd_file_options, true)?
        } else {
            let q = qmp.to_string_lossy().into_owned();
            Daemon::vubd(&vhost, &image, &["--qmp", &q])?
        };
        let qmp = QmpClient::connect(&qmp, TIMEOUT)?;
        Ok(Peer {
            _daemon: daemon,
            qmp,
            vhost,
            nbd: dir.join(&format!("{name}-nbd.sock")),
            tmp: dir.join(&format!("{name}-tmp.raw")),
            image,
            qsd,
            name,
        })
    }

    /// A scratch path of this peer in its directory, `{name}-{suffix}`.
    pub fn scratch(&self, suffix: &str) -> PathBuf {
        self.image.with_file_name(format!("{}-{suffix}", self.name))
    }

    /// The URI of its NBD export `export`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd.display())
    }

    /// The reply as a comparable value, with the image masked as IMG and
    /// `tmp` as TMP.
    pub fn reply(&mut self, cmd: &str, args: Value) -> Result<Value> {
        self.reply_masked(cmd, args, &[])
    }

    /// The reply as a comparable value, with the peer's paths masked: the
    /// image as IMG, `tmp` as TMP, and each of `more` as its label.
    pub fn reply_masked(
        &mut self,
        cmd: &str,
        args: Value,
        more: &[(&Path, &str)],
    ) -> Result<Value> {
        let v = match self.qmp.execute(cmd, args)? {
            Ok(v) => json!({ "return": v }),
            Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
        };
        let mut text = v
            .to_string()
            .replace(&self.tmp.display().to_string(), "TMP");
        for (path, label) in more {
            text = text.replace(&path.display().to_string(), label);
        }
        let text = text.replace(&self.image.display().to_string(), "IMG");
        Ok(serde_json::from_str(&text)?)
    }
}

/// A libblkio client writing 4 KiB blocks at pseudo-random places, each
/// with a new byte, until stopped; records the blocks it wrote.
pub struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<BTreeSet<u64>>>,
}

impl Writer {
    /// Starts writing through `vhost`, the places drawn from `seed`.
    pub fn start(vhost: &Path, seed: u64) -> Result<Writer> {
        Writer::paced(vhost, seed, Duration::ZERO)
    }

    /// As [`Writer::start`], resting `pause` after each write.
    pub fn paced(vhost: &Path, seed: u64, pause: Duration) -> Result<Writer> {
        let mut client = Client::connect(vhost, 1, false)?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let thread = std::thread::spawn(move || -> Result<BTreeSet<u64>> {
            let mut x = seed | 1;
            let mut written = BTreeSet::new();
            while !s.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = x % (SIZE / BLOCK);
                client.write(block * BLOCK, &vec![(x >> 56) as u8 | 0x80; BLOCK as usize])?;
                written.insert(block);
                c.fetch_add(1, Ordering::Relaxed);
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            client.flush()?;
            Ok(written)
        });
        Ok(Writer {
            stop,
            count,
            thread,
        })
    }

    /// Writes completed so far.
    pub fn writes(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` more writes have completed.
    pub fn wait_writes(&self, n: u64) -> Result<()> {
        let target = self.count.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + TIMEOUT;
        while self.count.load(Ordering::Relaxed) < target {
            ensure!(Instant::now() < deadline, "the writer stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Stops and flushes; the blocks written.
    pub fn stop(self) -> Result<BTreeSet<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => bail!("writer panicked"),
        }
    }
}

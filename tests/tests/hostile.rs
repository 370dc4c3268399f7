//! Hostile-frontend tests: a hand-made vhost-user frontend
//! (`tests::raw_frontend`) feeds vubd descriptor chains no honest driver
//! would build — addresses outside guest memory, loops, wrong shapes,
//! out-of-range requests, malformed indirect tables, a corrupted avail
//! ring — and checks after every case that vubd
//!   * answered with the exact status expected (IOERR / UNSUPP), or, where
//!     the chain has no usable status byte, did not complete it with OK;
//!   * is still alive and still serves a well-formed request;
//!   * wrote nothing outside the disk: the image file keeps its size and
//!     every byte the test did not legally write (a per-byte pattern), and
//!     the parts of the shared memfd never offered as guest memory keep
//!     their guard pattern.
//!
//! Run: `cargo build --release -p vhost-glue && cargo test -p tests --test hostile`.
//! `HOSTILE_TARGET=qsd` runs the same cases against qemu-storage-daemon for
//! comparison (it is expected to fail many: it drops malformed chains and
//! stops a queue on the first bad descriptor). Each case's outcome is
//! printed (`-- --nocapture` shows them all).

use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tests::daemon::{Daemon, ScratchDir};
use tests::raw_frontend::*;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const DISK_SIZE: u64 = 32 << 20;
/// Sectors the after-each-case sanity write cycles through (8 MiB in).
const SCRATCH_FIRST: u64 = 16384;
const SCRATCH_SECTORS: u64 = 2048;
/// A sector the bad writes aim at (its pattern must survive them).
const VICTIM: u64 = 100;
/// How long to wait for a chain that may legitimately never come back,
/// once a later well-formed request has completed.
const GRACE: Duration = Duration::from_millis(300);

const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const OK: u8 = VIRTIO_BLK_S_OK as u8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Vubd,
    Qsd,
}

fn target() -> Target {
    match std::env::var("HOSTILE_TARGET").as_deref() {
        Ok("qsd") => Target::Qsd,
        _ => Target::Vubd,
    }
}

/// The initial content of the image: a byte pattern that depends on the
/// position and never equals 0, 1, 2 or the sentinels, so a stray copy of
/// disk data, a status byte or an unwritten buffer is told apart.
fn pattern_byte(off: u64) -> u8 {
    0x10 + ((off.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 57) as u8 % 0x70)
}

/// Fresh data for the `n`th legal write (different from the pattern).
fn fresh_data(n: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| 0x80 + ((i.wrapping_add(n * 7919).wrapping_mul(31)) % 0x20) as u8)
        .collect()
}

struct Setup {
    daemon_args: Vec<String>,
    queues: u16,
    fe: Options,
    readonly: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            daemon_args: Vec::new(),
            queues: 1,
            fe: Options::default(),
            readonly: false,
        }
    }
}

/// One daemon on a patterned image, one hostile frontend, and a model of
/// what the image must contain.
struct Harness {
    target: Target,
    _dir: ScratchDir,
    image: PathBuf,
    socket: PathBuf,
    daemon: Daemon,
    fe: RawFrontend,
    fe_opts: Options,
    cfg: BlkConfig,
    model: Vec<u8>,
    /// Per sector: contents no longer defined (discarded, or a failed
    /// request that may legitimately have written part of its range).
    unknown: Vec<bool>,
    readonly: bool,
    io_count: u64,
}

impl Harness {
    fn start(setup: Setup) -> Result<Self> {
        let target = target();
        let dir = ScratchDir::new("hostile")?;
        let image = dir.join("disk.img");
        let model: Vec<u8> = (0..DISK_SIZE).map(pattern_byte).collect();
        std::fs::write(&image, &model).context("write image")?;
        let socket = dir.join("vhost.sock");
        let daemon = match target {
            Target::Vubd => {
                let mut args: Vec<&str> = setup.daemon_args.iter().map(String::as_str).collect();
                let q = setup.queues.to_string();
                args.extend(["--queues", &q]);
                if setup.readonly {
                    args.push("--readonly");
                }
                Daemon::vubd(&socket, &image, &args)?
            }
            Target::Qsd => {
                ensure!(!setup.readonly, "read-only qsd not wired up");
                Daemon::qsd(&socket, &image, setup.queues, false)?
            }
        };
        let mut fe = RawFrontend::connect(&socket, setup.fe).context("hostile frontend setup")?;
        let cfg = fe.config()?;
        Ok(Harness {
            target,
            _dir: dir,
            image,
            socket,
            daemon,
            fe,
            fe_opts: setup.fe,
            cfg,
            model,
            unknown: vec![false; (DISK_SIZE / SECTOR_SIZE) as usize],
            readonly: setup.readonly,
            io_count: 0,
        })
    }

    fn capacity(&self) -> u64 {
        self.cfg.capacity
    }

    fn note(&self, what: &str, o: &Outcome) {
        eprintln!("[{:?}] {what}: {o}", self.target);
    }

    fn alive(&mut self, what: &str) -> Result<()> {
        if let Some(status) = self.daemon.try_wait()? {
            bail!("{:?} died after `{what}`: {status}", self.target);
        }
        Ok(())
    }

    /// Records a legal write in the model.
    fn model_write(&mut self, sector: u64, data: &[u8]) {
        let off = (sector * SECTOR_SIZE) as usize;
        self.model[off..off + data.len()].copy_from_slice(data);
        for s in sector..sector + (data.len() as u64).div_ceil(SECTOR_SIZE) {
            self.unknown[s as usize] = false;
        }
    }

    fn model_unknown(&mut self, sector: u64, count: u64) {
        for s in sector..(sector + count).min(self.unknown.len() as u64) {
            self.unknown[s as usize] = true;
        }
    }

    /// A well-formed write then read of fresh data (read only, against
    /// the model, on a read-only disk): the device still serves requests.
    fn good_io(&mut self, what: &str) -> Result<()> {
        self.io_count += 1;
        let n = self.io_count;
        let sector = SCRATCH_FIRST + (n * 8) % SCRATCH_SECTORS;
        if !self.readonly {
            let data = fresh_data(n, 4096);
            self.fe
                .write(sector, &data)
                .with_context(|| format!("well-formed write after `{what}`"))?;
            self.model_write(sector, &data);
        }
        let got = self
            .fe
            .read(sector, 4096)
            .with_context(|| format!("well-formed read after `{what}`"))?;
        let off = (sector * SECTOR_SIZE) as usize;
        ensure!(
            got == self.model[off..off + 4096],
            "after `{what}`: read back of sector {sector} differs from what was written"
        );
        Ok(())
    }

    /// The image file still has its size and, wherever defined, exactly
    /// the model's bytes.
    fn check_disk(&self, what: &str) -> Result<()> {
        let mut f = std::fs::File::open(&self.image)?;
        let len = f.metadata()?.len();
        ensure!(
            len == DISK_SIZE,
            "after `{what}`: image size changed from {DISK_SIZE} to {len}"
        );
        let mut buf = vec![0u8; DISK_SIZE as usize];
        f.seek(SeekFrom::Start(0))?;
        f.read_exact(&mut buf)?;
        for (s, (got, want)) in buf
            .chunks(SECTOR_SIZE as usize)
            .zip(self.model.chunks(SECTOR_SIZE as usize))
            .enumerate()
        {
            if !self.unknown[s] && got != want {
                bail!("after `{what}`: image sector {s} was modified by a request that must not write it");
            }
        }
        Ok(())
    }

    /// Everything that must hold after any case.
    fn check(&mut self, what: &str) -> Result<()> {
        self.alive(what)?;
        self.fe
            .mem()
            .check_guards()
            .with_context(|| format!("after `{what}`"))?;
        self.good_io(what)?;
        self.check_disk(what)?;
        self.alive(what)
    }

    /// Expects `req` to complete with exactly one of `want`.
    fn expect(&mut self, what: &str, req: Request, want: &[u8]) -> Result<Outcome> {
        let o = self.fe.outcome(&req, DEFAULT_TIMEOUT)?;
        self.note(what, &o);
        let ok = o.status().is_some_and(|s| want.contains(&s));
        if !ok {
            let names: Vec<&str> = want.iter().map(|s| status_name(*s)).collect();
            bail!("`{what}`: expected status {names:?}, got: {o}");
        }
        self.check(what)?;
        Ok(o)
    }

    /// For a chain the device cannot answer properly: after a later
    /// well-formed request has been served, the chain must either not have
    /// come back, or have come back without an OK status. `watch` lists
    /// (address, bytes) that must still hold exactly those bytes.
    fn expect_refused(
        &mut self,
        what: &str,
        req: Request,
        watch: &[(u64, Vec<u8>)],
    ) -> Result<Outcome> {
        self.check(what)?;
        let o = self.fe.outcome(&req, GRACE)?;
        self.note(what, &o);
        if o.status() == Some(OK) {
            bail!("`{what}`: a malformed chain completed with OK: {o}");
        }
        for (gpa, bytes) in watch {
            let now = self.fe.mem().read(*gpa, bytes.len() as u64)?;
            if &now != bytes {
                bail!(
                    "`{what}`: the device wrote to a buffer it must not write ({gpa:#x}): \
                     now {:02x?}",
                    &now[..now.len().min(16)]
                );
            }
        }
        self.check_disk(what)?;
        Ok(o)
    }

    /// Snapshot of guest memory for `expect_refused`'s watch list.
    fn snap(&self, gpa: u64, len: u64) -> Result<(u64, Vec<u8>)> {
        Ok((gpa, self.fe.mem().read(gpa, len)?))
    }

    /// Submits `descs` on queue 0 as a request whose status byte (if any)
    /// is at `status` and data buffer at `data`.
    fn submit(
        &mut self,
        descs: &[Desc],
        status: Option<u64>,
        data: Option<(u64, u64)>,
    ) -> Result<Request> {
        let head = self.fe.submit_chain(0, descs)?;
        Ok(Request {
            queue: 0,
            head,
            status_gpa: status,
            data_gpa: data.map(|d| d.0),
            data_len: data.map_or(0, |d| d.1),
        })
    }

    /// A chain whose descriptors the test wrote by hand (head given).
    fn publish_raw(&mut self, head: u16, status: Option<u64>) -> Result<Request> {
        self.fe.publish(0, head)?;
        Ok(Request {
            queue: 0,
            head,
            status_gpa: status,
            data_gpa: None,
            data_len: 0,
        })
    }

    /// Drops the frontend connection and connects a fresh one.
    fn reconnect(&mut self) -> Result<()> {
        // Disconnect first: vubd serves one frontend at a time.
        self.fe.disconnect();
        self.fe = RawFrontend::connect(&self.socket, self.fe_opts)?;
        Ok(())
    }

    /// Final checks: disk, guards, survival of the disconnect, clean exit
    /// on SIGTERM.
    fn finish(mut self, what: &str) -> Result<()> {
        self.check(what)?;
        let Harness {
            mut daemon,
            fe,
            target,
            ..
        } = self;
        drop(fe);
        std::thread::sleep(Duration::from_millis(100));
        if let Some(status) = daemon.try_wait()? {
            bail!("{target:?} died when the hostile frontend disconnected: {status}");
        }
        if target == Target::Vubd {
            daemon.signal(libc::SIGTERM)?;
            let status = daemon.wait_exit(Duration::from_secs(20))?;
            ensure!(status.success(), "vubd exited with {status} on SIGTERM after `{what}`");
        }
        Ok(())
    }
}
